import itertools
import json

import pytest

from data import sources
from data.sources import DEFAULT_SOURCES, SourceError, iter_documents


@pytest.mark.parametrize("name", DEFAULT_SOURCES)
def test_default_sources_yield_text(name):
    docs = list(itertools.islice(iter_documents(name), 5))
    assert len(docs) == 5 and all(d.strip() for d in docs)


def test_fortunes_are_split_on_percent_lines():
    docs = list(itertools.islice(iter_documents("fortunes"), 200))
    assert not any(line.strip() == "%" for d in docs for line in d.splitlines())


def test_user_files_dir_glob_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha text")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma"}))
    (tmp_path / "d" / "skip.bin").write_text("no")
    assert sorted(iter_documents(str(tmp_path / "d"))) == ["alpha text", "beta", "gamma"]
    assert list(iter_documents(str(tmp_path / "d" / "*.txt"))) == ["alpha text"]
    assert list(iter_documents(str(tmp_path / "d" / "a.txt"))) == ["alpha text"]


def test_bad_sources_are_clear(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="nowhere"):
        list(iter_documents(str(tmp_path / "nowhere")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(SourceError, match="bad.jsonl:2"):
        list(iter_documents(str(bad)))
    monkeypatch.setattr(sources, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(SourceError, match="Debian package fortunes"):
        list(iter_documents("fortunes"))


@pytest.mark.parametrize(("long", "short", "count"), [
    ("bible-books", "bible", 66), ("anarchism-chapters", "anarchism", None), ("shakespeare-plays", "shakespeare", 38),
])
def test_long_document_variants_hold_the_same_text_in_fewer_documents(long, short, count):
    """The context-extension sources: the same corpus, cut into whole books / chapter files / plays."""
    long_docs, short_docs = list(iter_documents(long)), list(iter_documents(short))
    assert count is None or len(long_docs) == count
    assert len(long_docs) < len(short_docs) / 5
    words = lambda docs: "".join("".join(d.split()) for d in docs)  # noqa: E731
    assert words(long_docs) == words(short_docs)  # nothing lost or added, only fewer boundaries


def test_passkey_source_is_seeded_and_checked():
    docs = list(iter_documents("passkey:20:500"))
    assert len(docs) == 20 and docs == list(iter_documents("passkey:20:500"))
    for doc in docs:
        key = doc.rsplit(" ", 1)[1].rstrip(".")
        assert doc.count(key) == 3 and len(key) == 5  # stated twice in the filler, once as the answer
    for bad in ("passkey:0:500", "passkey:ten:500", "passkey:10"):
        with pytest.raises(SourceError, match="passkey:COUNT:MAX_CHARS"):
            list(iter_documents(bad))
