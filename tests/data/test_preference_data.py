"""Preference pairs for DPO: pairs from the packaged corpora, the folder and its splits, bad records by file:line,
pairs packed side by side (chosen 2k, rejected 2k+1), each pair once per epoch, and exact resume."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data import chat_sources, preference_sources
from data.chat import ChatFormatError, ChatTemplate
from data.chat_dataset import IGNORE_INDEX, write_chat_folder
from data.chat_prepare import prepare_chat_dataset
from data.chat_sources import bible_conversations, dictionary_conversations
from data.preference_dataset import read_pairs
from data.preference_loader import PreferenceWindowLoader
from data.preference_prepare import prepare_preference_dataset
from data.tokenizer import load_tokenizer
from tests.data.conftest import data_cfg

SEQ_LEN = 512
PER_SOURCE = 150
VERSE = re.compile(r"Quote (.+) (\d+):(\d+)\.")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def question(record: dict) -> str:
    return record["prompt"][0]["content"]


@pytest.fixture(scope="module")
def conversations() -> dict[str, list[dict]]:
    """The conversations of the two chat sources, read once (the dictionary takes seconds)."""
    return {"dictionary": list(dictionary_conversations()), "bible": list(bible_conversations())}


@pytest.fixture(scope="module")
def answers(conversations) -> dict[str, str]:
    return {c["messages"][0]["content"]: c["messages"][1]["content"] for cs in conversations.values() for c in cs}


def read_sources_once(patch: pytest.MonkeyPatch, conversations: dict[str, list[dict]]) -> None:
    """The sources give the conversations read by the fixture instead of reading them again."""
    patch.setattr(preference_sources, "dictionary_conversations", lambda: iter(conversations["dictionary"]))
    patch.setattr(preference_sources, "bible_conversations", lambda: iter(conversations["bible"]))
    for name, listed in conversations.items():
        patch.setitem(chat_sources.CHAT_SOURCES, name, lambda listed=listed: iter(listed))


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory, tiny_dir, conversations) -> Path:
    out = tmp_path_factory.mktemp("preference")
    with pytest.MonkeyPatch.context() as patch:
        read_sources_once(patch, conversations)
        prepare_preference_dataset(out, ["dictionary", "bible"], tiny_dir / "tokenizer.json", val_fraction=0.1,
                                   seed=0, max_per_source=PER_SOURCE)
    return out


@pytest.fixture(scope="module")
def template(tiny_dir) -> ChatTemplate:
    return ChatTemplate(load_tokenizer(tiny_dir / "tokenizer.json"))


def preference_cfg(folder: Path, **kw):
    return data_cfg(folder, format="preference", document_masking=True, **{"seq_len": SEQ_LEN, **kw})


def test_pairs_prefer_the_true_answer_over_another_words_or_the_neighbouring_verse(preference_dir, answers):
    records = read_jsonl(preference_dir / "train.jsonl") + read_jsonl(preference_dir / "val.jsonl")
    assert len(records) == 2 * PER_SOURCE
    definitions = {a for q, a in answers.items() if q.startswith("What")}
    words = [r for r in records if question(r).startswith("What does the word ")]
    verses = [r for r in records if question(r).startswith("Quote ")]
    assert len(words) == len(verses) == PER_SOURCE
    for record in records:
        assert list(record) == ["prompt", "chosen", "rejected"]
        assert [m["role"] for m in record["prompt"]] == ["user"]
        assert record["chosen"] == answers[question(record)] != record["rejected"]
    assert all(r["rejected"] in definitions for r in words)
    assert len({r["rejected"] for r in words}) > 0.9 * len(words)  # drawn at random, not one fixed decoy
    for record in verses:
        book, chapter, verse = VERSE.fullmatch(question(record)).groups()
        neighbours = {answers.get(f"Quote {book} {chapter}:{int(verse) + step}.") for step in (-1, 1)}
        assert record["rejected"] in neighbours
    assert {VERSE.fullmatch(question(r))[3] != "1" for r in verses} == {True, False}  # first verses too


def test_splits_are_disjoint_by_prompt_and_the_manifest_is_a_chat_manifest_with_format_preference(
        preference_dir, tiny_dir):
    manifest = json.loads((preference_dir / "preference_manifest.json").read_text())
    assert list(manifest) == ["format", "version", "tokenizer_file", "tokenizer_sha256", "vocab_size", "bos_id",
                              "eos_id", "pad_id", "splits", "sources", "seed"]
    assert (manifest["format"], manifest["version"], manifest["seed"]) == ("preference", 1, 0)
    assert manifest["sources"] == {"dictionary": PER_SOURCE, "bible": PER_SOURCE}
    train, val = read_jsonl(preference_dir / "train.jsonl"), read_jsonl(preference_dir / "val.jsonl")
    assert 0 < len(val) < len(train)
    assert {question(r) for r in train}.isdisjoint(question(r) for r in val)
    for split, records in (("train", train), ("val", val)):
        info = manifest["splits"][split]
        assert info["file"] == f"{split}.jsonl" and info["records"] == len(records)
        assert info["sha256"] == hashlib.sha256((preference_dir / info["file"]).read_bytes()).hexdigest()
    assert (preference_dir / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_same_seed_same_folder_and_a_question_in_the_same_split_as_for_sft(tmp_path, tiny_dir, conversations,
                                                                          monkeypatch):
    read_sources_once(monkeypatch, conversations)
    tokenizer = tiny_dir / "tokenizer.json"
    files = ("train.jsonl", "val.jsonl", "preference_manifest.json")
    written = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_preference_dataset(tmp_path / name, ["bible"], tokenizer, val_fraction=0.2, seed=seed,
                                   max_per_source=400)
        written[name] = [(tmp_path / name / f).read_bytes() for f in files]
    assert written["a"] == written["b"] and written["a"][0] != written["c"][0]
    prepare_chat_dataset(tmp_path / "sft", ["bible"], tokenizer, val_fraction=0.2, seed=0)
    sft_val = {r["messages"][0]["content"] for r in read_jsonl(tmp_path / "sft" / "val.jsonl")}
    for split in ("train", "val"):
        assert all((question(r) in sft_val) == (split == "val") for r in read_jsonl(tmp_path / "a" / f"{split}.jsonl"))


GOOD = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Go away"}


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "Hi", "rejected": "x"}, "the pair has no 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "the pair has no 'prompt'"),
    ({"prompt": "Hi"}, "no 'chosen' and no 'rejected'"),
    ({**GOOD, "chosen": "  "}, "'chosen' must be a non-empty reply"),
    ({**GOOD, "rejected": ""}, "'rejected' must be a non-empty reply"),
    ({**GOOD, "rejected": [{"role": "assistant", "content": "x"}]}, "'rejected' must be a non-empty reply"),
    ({**GOOD, "rejected": "Hello"}, "the same reply"),
    ({**GOOD, "prompt": [*GOOD["prompt"], {"role": "assistant", "content": "x"}]}, "a prompt ends with a user turn"),
    ({**GOOD, "prompt": []}, "non-empty list"),
    ({**GOOD, "chosen": "word " * 80}, r"the pair has \d+ tokens \(chosen \d+, rejected \d+\), more than a window"),
    ([1, 2], "expected an object"),
    ("not json", "not a JSON object"),
])
def test_a_bad_pair_is_an_error_naming_its_file_and_line_or_is_skipped(template, tmp_path, record, message):
    path = tmp_path / "pairs.jsonl"
    bad = record if record == "not json" else json.dumps(record)
    path.write_text(f"{json.dumps(GOOD)}\n\n{bad}\n")
    with pytest.raises(ChatFormatError, match=f"{path}:3: .*{message}"):
        read_pairs(path, template, 64, skip_invalid=False)
    pairs, skipped = read_pairs(path, template, 64, skip_invalid=True)
    assert (len(pairs), skipped) == (1, 1)


def test_a_text_prompt_is_one_user_message_and_both_replies_are_whole_conversations(template, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "prompt": "Hi"}) + "\n")
    (listed, text), _ = read_pairs(path, template, 64, skip_invalid=False)
    assert listed.chosen.ids.tolist() == text.chosen.ids.tolist()
    assert listed.rejected.ids.tolist() == text.rejected.ids.tolist()
    decode = template.tokenizer.decode
    assert decode(listed.rejected.ids.tolist(), skip_special_tokens=False) == \
        "<|bos|><|user|>Hi<|end_of_turn|><|assistant|>Go away<|end_of_turn|>"
    assert decode(listed.chosen.ids[listed.chosen.supervised].tolist(), skip_special_tokens=False) == \
        "Hello<|end_of_turn|>"


def test_a_chat_folder_is_not_taken_for_a_preference_folder(tmp_path, tiny_dir):
    write_chat_folder(tmp_path, {"train": [{"messages": [{"role": "user", "content": "a"},
                                                         {"role": "assistant", "content": "b"}]}]},
                      tiny_dir / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="no preference_manifest.json .it holds chat_manifest.json"):
        PreferenceWindowLoader(preference_cfg(tmp_path))


def test_every_window_holds_whole_pairs_side_by_side_and_an_epoch_each_pair_once(preference_dir, template):
    loader = PreferenceWindowLoader(preference_cfg(preference_dir), micro_batch_size=1, global_batch_size=1)
    expected = read_pairs(preference_dir / "train.jsonl", template, SEQ_LEN + 1, False)[0]
    index_of = {(tuple(p.chosen.ids.tolist()), tuple(p.rejected.ids.tolist())): i for i, p in enumerate(expected)}
    windows = loader.windows_per_epoch
    assert loader.pairs == len(expected) and windows < len(expected) / 2  # several pairs share a window
    seen_per_epoch, most_pairs, g = [], 0, 0
    for epoch in range(2):
        seen = []
        while loader.dataset.locate(g)[0] == epoch:  # epochs pack into different numbers of windows
            _, tokens, supervised, documents = loader.dataset[g]
            g += 1
            pairs = (int(documents.max()) + 1) // 2
            most_pairs = max(most_pairs, pairs)
            assert np.array_equal(np.unique(documents), np.arange(len(np.unique(documents))))  # contiguous, in order
            assert (np.diff(documents) >= 0).all()
            for k in range(pairs):
                chosen, rejected = (tuple(tokens[documents == d].tolist()) for d in (2 * k, 2 * k + 1))
                seen.append(index_of[chosen, rejected])
            padding = documents == 2 * pairs
            assert not supervised[padding].any() and (tokens[padding] == loader.chat_manifest.pad_id).all()
        assert sorted(seen) == list(range(len(expected)))
        seen_per_epoch.append(seen)
    assert seen_per_epoch[0] != seen_per_epoch[1]  # epochs reshuffle
    assert most_pairs <= loader.max_pairs_per_window


def test_labels_stay_inside_each_reply(preference_dir):
    batch = next(PreferenceWindowLoader(preference_cfg(preference_dir), micro_batch_size=4, global_batch_size=4))
    docs, labels, ids = batch["document_ids"], batch["labels"], batch["input_ids"]
    learned = labels != IGNORE_INDEX
    assert (labels[:, :-1][learned[:, :-1]] == ids[:, 1:][learned[:, :-1]]).all()  # the next token
    last_of_document = docs[:, :-1] != docs[:, 1:]
    assert last_of_document.sum() >= 4 * 2 and (labels[:, :-1][last_of_document] == IGNORE_INDEX).all()
    for row in range(4):
        pairs = (int(docs[row].max()) + 1) // 2
        supervised_documents = docs[row][learned[row]].unique().tolist()
        assert supervised_documents == list(range(2 * pairs))  # every reply learned from, the padding not


def read_steps(loaders, steps):
    out = {}
    for _ in range(steps):
        for loader in loaders:
            for _ in range(loader.per_rank // loader.micro_batch_size):
                batch = next(loader)
                for g, ids, docs in zip(batch["window_ids"].tolist(), batch["input_ids"], batch["document_ids"],
                                        strict=True):
                    out[g] = (ids, docs)
    return out


def test_resume_on_another_number_of_ranks_reads_each_window_once(preference_dir):
    cfg = preference_cfg(preference_dir)
    steps = PreferenceWindowLoader(cfg).windows_per_epoch // 4 + 2  # into the second epoch
    reference = read_steps([PreferenceWindowLoader(cfg, micro_batch_size=2, global_batch_size=4)], steps)
    two = [PreferenceWindowLoader(cfg, micro_batch_size=1, global_batch_size=4, dp_rank=r, dp_size=2)
           for r in range(2)]
    got = read_steps(two, 3)
    one = PreferenceWindowLoader(cfg, micro_batch_size=4, global_batch_size=4)
    one.load_state_dict(two[0].state_dict())
    got |= read_steps([one], steps - 3)
    assert sorted(got) == sorted(reference) == list(range(4 * steps))
    assert all(all(np.array_equal(a, b) for a, b in zip(got[g], reference[g], strict=True)) for g in reference)
