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
