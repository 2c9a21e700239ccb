"""SFT conversations from the packaged corpora, and `pretrain data prepare --format sft`."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from data import sources
from data.chat_prepare import prepare_chat_dataset
from data.chat_sources import BIBLE_BOOKS, MAX_DEFINITION_CHARS, bible_conversations, first_definition
from data.sources import SourceError
from data.tokenizer import train_tokenizer
from pretrain.cli import main

ABANDON = r""" ([.a]*b[a^]n"d[u^]n), v. t. [imp. & p. p.
   {Abandoned} (-d[u^]nd); p. pr. & vb. n. {Abandoning}.] [OF.
   abandoner, F. abandonner; a (L. ad) + bandon permission. See {Ban}.]
   1. To cast or drive out; to banish; to expel; to reject.
      [Obs.]
      [1913 Webster]

            That he might . . . abandon them from him. --Udall.
      [1913 Webster]

   2. To give up absolutely; to forsake entirely."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def questions(records: list[dict]) -> list[str]:
    return [r["messages"][0]["content"] for r in records]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["What does the word mean? Quote Genesis 1:1. In the beginning God created."] * 20, 300).save(
        str(path))
    return path


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tokenizer_file) -> Path:
    out = tmp_path_factory.mktemp("sft")
    prepare_chat_dataset(out, ["dictionary", "bible"], tokenizer_file, val_fraction=0.1, seed=0, max_per_source=300)
    return out


@pytest.mark.parametrize(("body", "definition"), [
    (ABANDON, "To cast or drive out; to banish; to expel; to reject."),
    (r""", n.; pl. E. {Apexes}, L. {Apices}. [L.]
   The tip, top, point, or angular summit of anything.""", "The tip, top, point, or angular summit of anything."),
    (r""", a. (Zool.)
   Pertaining to the Anthozoa. -- n. One of the Anthozoa.""", "Pertaining to the Anthozoa."),
    (r""", n.
   The act of pulling up by the roots; eradication. [R.] Deraign""",  # the next entry's headword strayed here
     "The act of pulling up by the roots; eradication."),
    (r""" n.
   1. a baseball game in which one team's pitchers allow the
      opposing team only one hit.""",
     "A baseball game in which one team's pitchers allow the opposing team only one hit."),
    (r""", n. pl. [NL. See {Aptera}.] (Zool.)
   Naked spaces between the feathered areas of birds. See
   {Pteryli[ae]}.""", "Naked spaces between the feathered areas of birds."),
    (r""", n.
   A small restaurant; a caf['e].""", None),  # an accent code: no clean spelling
    (r""", a.
   See under {Force}.""", None),
])
def test_first_definition_strips_gcide_markup(body, definition):
    assert first_definition(body) == definition


def test_conversations_have_the_chat_shape_and_clean_text(sft_dir):
    records = read_jsonl(sft_dir / "train.jsonl") + read_jsonl(sft_dir / "val.jsonl")
    assert len(records) == 600
    for record in records:
        assert list(record) == ["messages"]
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert all(m["content"] == m["content"].strip() and m["content"] for m in record["messages"])
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    words = [q for q in answers if q.startswith("What does the word ")]
    verses = [q for q in answers if q.startswith("Quote ")]
    assert len(words) == len(verses) == 300
    for q in words:
        assert re.fullmatch(r"What does the word [A-Za-z][\w'-]* mean\?", q)
        answer = answers[q]
        assert not re.search(r"[\\{}\[\]<>|*\"]|--|\s[,.;:]", answer), answer
        assert answer[0].isupper() and answer.endswith(".") and len(answer) <= MAX_DEFINITION_CHARS + 1
    books = "|".join(BIBLE_BOOKS.values())
    assert all(re.fullmatch(rf"Quote ({books}) \d+:\d+\.", q) for q in verses)


def test_bible_uses_full_book_names():
    conversations = list(bible_conversations())
    first = conversations[0]["messages"]
    assert first[0]["content"] == "Quote Genesis 1:1."
    assert first[1]["content"] == "In the beginning God created the heaven and the earth."
    asked = {c["messages"][0]["content"] for c in conversations}
    assert {"Quote 1 Samuel 1:1.", "Quote Song of Solomon 1:1.", "Quote Revelation 22:21."} <= asked
    assert {q.rsplit(" ", 1)[0].removeprefix("Quote ") for q in asked} == set(BIBLE_BOOKS.values())
    assert len(asked) == len(conversations) > 30_000
    assert all(len(c["messages"][1]["content"]) <= 300 for c in conversations)


def test_splits_manifest_and_tokenizer(sft_dir, tokenizer_file):
    manifest = json.loads((sft_dir / "chat_manifest.json").read_text())
    assert list(manifest) == ["format", "version", "tokenizer_file", "tokenizer_sha256", "vocab_size", "bos_id",
                              "eos_id", "pad_id", "splits", "sources", "seed"]
    assert (manifest["format"], manifest["version"], manifest["seed"]) == ("chat", 1, 0)
    assert manifest["sources"] == {"dictionary": 300, "bible": 300}
    train, val = read_jsonl(sft_dir / "train.jsonl"), read_jsonl(sft_dir / "val.jsonl")
    assert 0 < len(val) < len(train)
    assert set(questions(train)).isdisjoint(questions(val))
    for split, records in (("train", train), ("val", val)):
        info = manifest["splits"][split]
        assert info["file"] == f"{split}.jsonl" and info["records"] == len(records)
        assert info["sha256"] == hashlib.sha256((sft_dir / info["file"]).read_bytes()).hexdigest()
    copied = (sft_dir / "tokenizer.json").read_bytes()
    assert copied == tokenizer_file.read_bytes()
    assert manifest["tokenizer_sha256"] == hashlib.sha256(copied).hexdigest()
    assert (manifest["vocab_size"], manifest["bos_id"], manifest["eos_id"], manifest["pad_id"]) == (300, 0, 1, 2)


def test_same_seed_same_files_and_samples_independent_of_other_sources(tmp_path, tokenizer_file, sft_dir):
    files = ("train.jsonl", "val.jsonl", "chat_manifest.json")
    written = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_chat_dataset(tmp_path / name, ["bible"], tokenizer_file, val_fraction=0.1, seed=seed,
                             max_per_source=300)
        written[name] = [(tmp_path / name / f).read_bytes() for f in files]
    assert written["a"] == written["b"]
    assert written["a"][0] != written["c"][0]
    alone = read_jsonl(tmp_path / "a" / "train.jsonl") + read_jsonl(tmp_path / "a" / "val.jsonl")
    mixed = read_jsonl(sft_dir / "train.jsonl") + read_jsonl(sft_dir / "val.jsonl")
    assert set(questions(alone)) == {q for q in questions(mixed) if q.startswith("Quote ")}


def test_an_empty_validation_split_gets_one_conversation(tmp_path, tokenizer_file):
    manifest = prepare_chat_dataset(tmp_path, ["bible"], tokenizer_file, val_fraction=1e-9, max_per_source=3)
    assert (manifest["splits"]["train"]["records"], manifest["splits"]["val"]["records"]) == (2, 1)
    no_val = prepare_chat_dataset(tmp_path, ["bible"], tokenizer_file, val_fraction=0, max_per_source=3)
    assert (no_val["splits"]["train"]["records"], no_val["splits"]["val"]["records"]) == (3, 0)


def test_clear_errors(tmp_path, tokenizer_file, monkeypatch):
    with pytest.raises(SourceError, match="unknown chat source.*fortunes.*choose from dictionary, bible"):
        prepare_chat_dataset(tmp_path, ["bible", "fortunes"], tokenizer_file)
    with pytest.raises(SourceError, match=r"absent\.json not found.*pretrain data prepare --out data_cache/tiny"):
        prepare_chat_dataset(tmp_path, ["bible"], tmp_path / "absent.json")
    monkeypatch.setattr(sources, "GCIDE_FILE", tmp_path / "absent.dict.dz")
    with pytest.raises(SourceError, match="dict-gcide"):
        prepare_chat_dataset(tmp_path, ["dictionary"], tokenizer_file)
    monkeypatch.setattr(sources.shutil, "which", lambda program: None)
    with pytest.raises(SourceError, match="bible-kjv"):
        list(bible_conversations())
    assert not (tmp_path / "chat_manifest.json").exists()


def test_cli_prepares_sft_folders(tmp_path, tokenizer_file, capsys):
    out = tmp_path / "cli"
    argv = ["data", "prepare", "--format", "sft", "--out", str(out), "--source", "bible", "--max-per-source", "20"]
    assert main([*argv, "--tokenizer", str(tokenizer_file), "--val-fraction", "0.2", "--seed", "3"]) == 0
    manifest = json.loads((out / "chat_manifest.json").read_text())
    assert manifest["sources"] == {"bible": 20} and manifest["seed"] == 3
    assert manifest["splits"]["train"]["records"] + manifest["splits"]["val"]["records"] == 20
    assert f"prepared {out}: 20 conversations (bible 20)" in capsys.readouterr().out
    assert main(argv) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(tmp_path / "none.json")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["data", "prepare", "--out", str(tmp_path / "text"), "--max-per-source", "5"]) == 2
