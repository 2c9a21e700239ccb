"""Conversations for supervised fine-tuning, built from the packaged corpora of data/sources.py.

    dictionary   GCIDE: "What does the word X mean?" → the first sense of X, cleaned to plain text
    bible        KJV:   "Quote Genesis 1:3." → the verse

Each conversation is `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`; both sources yield the
same conversations in the same order on every run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from data.sources import SourceError, bible_verse_lines, gcide_entries

Conversation = dict[str, list[dict[str, str]]]

MAX_DEFINITION_CHARS = 200
MAX_VERSE_CHARS = 300

# The book abbreviations the `bible` program (Debian bible-kjv) prints, in canonical order.
BIBLE_BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel",
    "1Ki": "1 Kings", "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra",
    "Neh": "Nehemiah", "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs",
    "Eccl": "Ecclesiastes", "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
    "Lam": "Lamentations", "Eze": "Ezekiel", "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos",
    "Obad": "Obadiah", "Jonah": "Jonah", "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk",
    "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi",
    "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts", "Rom": "Romans",
    "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians", "Eph": "Ephesians",
    "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians", "2Th": "2 Thessalonians",
    "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews",
    "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John",
    "Jude": "Jude", "Rev": "Revelation",
}

_VERSE_LINE = re.compile(r"(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.+)")
_HEADER_LINE = re.compile(r"(?P<headword>[^\\\n]+?) ?\\(?P<pronunciation>[^\\\n]*)\\")
_CLEAN_HEADWORD = re.compile(r"[A-Za-z]+(?:'s)?(?:-[A-Za-z]+(?:'s)?)*")  # not caf'e, whose ' is an accent
_SOURCE_NOTE = re.compile(r"\[(?:1913 Webster|WordNet|PJC|Webster 1913)")
_BALANCED_BRACKETS = r"\[[^][]*(?:\[[^][]*\][^][]*)*\]"  # one level of nesting: [OE. appel, AS. [ae]ppel]
_BALANCED_PARENS = r"\([^()]*(?:\([^()]*\)[^()]*)*\)"
# What comes before the definition, one piece at a time: part of speech (n., v. t.), inflections and plurals
# (pl. E. {Apexes}, L. {Apices}), etymology [...], pronunciation and field labels (...), further headwords
# (Aum \Aum\), sense numbers (1., (a)).
_HEADER_PIECE = re.compile(
    r"\s+|[,;:&.]|[a-z]{1,6}\.|(?:E|L|F|It|Gr|NL|Sp)\.|\{[^{}]*\}|\d{1,2}\.|\([a-z]\)|[^\s\\]*\\[^\\]*\\"
    rf"|{_BALANCED_BRACKETS}|{_BALANCED_PARENS}"
)
# Each alternative starts with a character class or literal, which keeps the scan of 126k entries fast.
_FIRST_SENSE_END = re.compile(
    r"\n\s*\d{1,2}\.\s"  # the next numbered sense
    r"|\s\([a-z]\)\s"  # sub-senses (a), (b), …: the general sense before them is the definition
    r"|\s(?:--\s+)?(?:n|a|adj|adv|v\. [ti])\.\s"  # the same word as another part of speech: -- n. …
    r"|--(?=\S)"  # a citation: --Shak.
)
# A quoted example or a cross-reference after the definition, also after an annotation: "[Obs.] See {Nerre}."
_TRAILERS = ('. "', ". See ", "; See ", '] "', "] See ")
_ANNOTATION = re.compile(rf" ?{_BALANCED_BRACKETS}")
_DASH = re.compile(r"[,;]? ?-- ")
_CHARACTER_CODE = re.compile(r"\[(?<=\w\[)|\](?=\w)")  # caf['e], [ae]ther: GCIDE's codes for accented letters
_STRAY_HEADWORD = re.compile(r"\. [A-Z][\w-]*\Z")  # "eradication. [R.] Deraign": the next entry's word
_SENTENCE_END = re.compile(r"(?<=[a-z)]\.)(?<!\b[A-Z][a-z]\.)(?<!\besp\.)(?<!\bsyn\.)(?<!\bcf\.)(?<!\bviz\.) (?=[A-Z])")
_NOT_A_DEFINITION = re.compile(r"(?:See|Same as|Alt\. of|Also|Plural of|pl\. of|imp\.|p\. p\.|of )", re.I)
_GRAMMAR_ABBREVIATION = re.compile(r"\b(?:p\. ?p|imp|pl|vb\. n|p\. pr|superl|compar)\.")
_MARKUP_LEFT = re.compile(r"[][\\{}<>|*\"`=#?]|--|\s[,.;:]|[,;][,.;]")  # also the gaps of removed symbols


def conversation(question: str, answer: str) -> Conversation:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def bible_conversations() -> Iterator[Conversation]:
    """Every KJV verse of at most MAX_VERSE_CHARS characters, in Bible order: "Quote John 3:16." → the verse."""
    for line in bible_verse_lines():
        match = _VERSE_LINE.fullmatch(line.strip())
        if match is None:
            continue
        book = BIBLE_BOOKS.get(match["book"])
        if book is None:
            raise SourceError(f"the `bible` program printed an unknown book abbreviation '{match['book']}' in "
                              f"'{line[:60]}'; add it to data/chat_sources.py BIBLE_BOOKS")
        text = " ".join(match["text"].split())
        if len(text) <= MAX_VERSE_CHARS:
            yield conversation(f"Quote {book} {match['chapter']}:{match['verse']}.", text)


def dictionary_conversations() -> Iterator[Conversation]:
    """One conversation per distinct single-word headword of GCIDE (ignoring case), in dictionary order: "What does
    the word X mean?" → the first sense of X's longest entry (of homographs, the main one: King the monarch, not
    King the Chinese instrument), or of the next longest where that gives no clean text."""
    entries_of: dict[str, list[tuple[str, re.Match[str]]]] = {}
    for entry in gcide_entries():
        header = _HEADER_LINE.match(entry)
        if header is not None and _CLEAN_HEADWORD.fullmatch(header["headword"]):
            entries_of.setdefault(header["headword"].lower(), []).append((entry, header))
    for entries in entries_of.values():
        for entry, header in sorted(entries, key=lambda item: -len(item[0])):
            definition = first_definition(entry[header.end():])
            if definition is not None:
                word = _question_word(header["headword"], in_webster=any(not _from_wordnet(*e) for e in entries))
                yield conversation(f"What does the word {word} mean?", definition)
                break


def _question_word(headword: str, in_webster: bool) -> str:
    """Webster 1913 capitalizes every headword, names or not: its words are asked in lower case (unless they have
    another capital, like AEsthetic). Words found only in entries from WordNet keep their case: there it marks names."""
    return headword.lower() if in_webster and headword[1:].islower() else headword


def _from_wordnet(entry: str, header: re.Match[str]) -> bool:
    """WordNet's entries mark no stress ("Brahms \\Brahms\\ n.") and cite no Webster, which Webster's (or what
    was added to them later) do: "Computer \\Com*put"er\\", "Harsh \\Harsh\\ … [1913 Webster]"."""
    return header["pronunciation"] == header["headword"] and "Webster" not in entry


def first_definition(body: str) -> str | None:
    """The first sense of a GCIDE entry (the text after its headword and pronunciation) as one or two plain
    sentences of at most MAX_DEFINITION_CHARS characters; None where no clean text comes out."""
    body = _SOURCE_NOTE.split(body.split("\n\n", 1)[0], maxsplit=1)[0]
    text = _plain(_FIRST_SENSE_END.split(_without_header(body), maxsplit=1)[0])
    if text is None:
        return None
    text = _shortened(text)
    if text is None or text.count("(") != text.count(")"):
        return None
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _without_header(body: str) -> str:
    position = 0
    while (piece := _HEADER_PIECE.match(body, position)) and piece.end() > position:
        position = piece.end()
    return body[position:]


def _plain(text: str) -> str | None:
    """Examples and cross-references cut off, annotations in [...] dropped, {...} unwrapped, whitespace and
    dashes tidied; None if other markup is left or what is left does not read as a definition."""
    text = " ".join(text.split())
    cuts = [found + 1 for trailer in _TRAILERS if (found := text.find(trailer)) >= 0]
    text = text[:min(cuts)] if cuts else text
    if _CHARACTER_CODE.search(text) or text.count("{") != text.count("}"):
        return None
    text = text.replace("{", "").replace("}", "")
    if "[" in text:
        text = _ANNOTATION.sub("", text)
    if "--" in text:
        text = _DASH.sub("; ", text)
    text = _without_dangling_end(text).lstrip(" ,;:").removesuffix(".") + "."
    if len(text) < 8 or not text[0].isalpha() or _NOT_A_DEFINITION.match(text):
        return None
    if _GRAMMAR_ABBREVIATION.search(text) or _MARKUP_LEFT.search(text):
        return None
    return text


def _without_dangling_end(text: str) -> str:
    """What the cut before sub-senses or examples leaves behind: "draws; as:" → "draws"."""
    text = _STRAY_HEADWORD.sub(".", text).rstrip(" :;,")
    for dangling in (" as", " Specifically", " specifically", " especially", " esp."):
        text = text.removesuffix(dangling)
    return text.rstrip(" :;,")


def _shortened(text: str) -> str | None:
    """At most two sentences and MAX_DEFINITION_CHARS characters: whole sentences where they fit, else the first
    sentence's leading clauses up to a semicolon; None if even those are too long."""
    ends = [m.start() for m in _SENTENCE_END.finditer(text) if _outside_parentheses(text, m.start())]
    ends.append(len(text))
    for end in reversed(ends[:2]):
        if end <= MAX_DEFINITION_CHARS:
            return text[:end]
    cut = text.rfind("; ", 0, MAX_DEFINITION_CHARS)
    return text[:cut] if cut >= 40 else None


def _outside_parentheses(text: str, position: int) -> bool:
    return text.count("(", 0, position) == text.count(")", 0, position)


CHAT_SOURCES: dict[str, Callable[[], Iterator[Conversation]]] = {
    "dictionary": dictionary_conversations,
    "bible": bible_conversations,
}
