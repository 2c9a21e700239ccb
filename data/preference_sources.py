"""Preference pairs for DPO, built from the conversations of data/chat_sources.py:

    dictionary   "What does the word X mean?"  chosen: X's definition; rejected: another word's, drawn by the seed
    bible        "Quote Genesis 1:3."          chosen: the verse; rejected: the next or previous verse of the same
                                               chapter (drawn by the seed where both exist)

Each pair is `{"prompt": [{"role": "user", "content": question}], "chosen": reply, "rejected": reply}`, chosen and
rejected always different; a source yields the same pairs in the same order for the same seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from typing import Any

from data.chat_sources import Conversation, bible_conversations, dictionary_conversations

Pair = dict[str, Any]

_VERSE_QUESTION = re.compile(r"Quote (?P<book>.+) (?P<chapter>\d+):(?P<verse>\d+)\.")


def pair(question: str, chosen: str, rejected: str) -> Pair:
    return {"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected}


def _question_and_answer(conversation: Conversation) -> tuple[str, str]:
    user, assistant = conversation["messages"]
    return user["content"], assistant["content"]


def dictionary_pairs(seed: int) -> Iterator[Pair]:
    """Every dictionary word, in dictionary order; the rejected reply is the definition of a word drawn at random."""
    entries = [_question_and_answer(c) for c in dictionary_conversations()]
    draw = random.Random(f"{seed}/dictionary/rejected")
    for question, definition in entries:
        while (other := entries[draw.randrange(len(entries))][1]) == definition:
            pass
        yield pair(question, definition, other)


def bible_pairs(seed: int) -> Iterator[Pair]:
    """Every verse of bible_conversations, in Bible order, that has a neighbour there (the verse before or after it
    in its chapter) with other words; the rejected reply is that neighbour, or one of the two drawn at random."""
    verses = {}
    for conversation in bible_conversations():
        question, text = _question_and_answer(conversation)
        reference = _VERSE_QUESTION.fullmatch(question)
        if reference is None:
            raise ValueError(f"data/chat_sources.py asked {question!r}, not 'Quote BOOK CHAPTER:VERSE.'")
        verses[reference["book"], int(reference["chapter"]), int(reference["verse"])] = (question, text)
    draw = random.Random(f"{seed}/bible/rejected")
    for (book, chapter, verse), (question, text) in verses.items():
        neighbours = [verses[book, chapter, v][1] for v in (verse - 1, verse + 1) if (book, chapter, v) in verses]
        neighbours = [n for n in neighbours if n != text]
        if neighbours:
            yield pair(question, text, neighbours[draw.randrange(len(neighbours))])


PREFERENCE_SOURCES: dict[str, Callable[[int], Iterator[Pair]]] = {
    "dictionary": dictionary_pairs,
    "bible": bible_pairs,
}
