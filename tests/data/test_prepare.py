"""prepare_dataset: exact duplicates dropped, whole documents held out, every document recovered exactly."""

import json

import numpy as np

from data.prepare import prepare_dataset
from data.shards.manifest import Manifest
from data.shards.reader import verify_shard
from data.tokenizer import load_tokenizer
from tests.data.conftest import DUPLICATES, split_docs


def decoded(data_dir, split):
    tok = load_tokenizer(data_dir / "tokenizer.json")
    return [tok.decode(d.tolist(), skip_special_tokens=False) for d in split_docs(data_dir, split)]


def test_dedup_and_disjoint_validation(tiny_dir, fortunes_texts):
    m = Manifest.load(tiny_dir)
    assert m.duplicates_removed == DUPLICATES
    train, val = decoded(tiny_dir, "train"), decoded(tiny_dir, "val")
    assert len(train) == m.splits["train"].num_docs and len(val) == m.splits["val"].num_docs
    assert len(set(train)) == len(train) and len(set(val)) == len(val)  # no duplicate survived
    assert set(train).isdisjoint(val)
    assert 0 < len(val) < len(train)
    assert set(train) | set(val) == set(fortunes_texts)  # whole documents, exactly recovered
    for split in ("train", "val"):
        for info in m.splits[split].shards:
            verify_shard(tiny_dir / info.path, info.sha256)


def test_user_sources_and_determinism(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    texts = [f"document number {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(120)]
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (src / "sub" / "b.txt").write_text(texts[5])  # exact duplicate of a jsonl document
    (src / "c.md").write_text(texts[6].replace(" ", "  "))  # duplicate up to whitespace
    (src / "ignored.csv").write_text("not a document source")
    kw = dict(sources=[str(src)], vocab_size=300, val_fraction=0.1, shard_tokens=500, seed=3)
    m1 = prepare_dataset(tmp_path / "out1", **kw)
    m2 = prepare_dataset(tmp_path / "out2", **kw)
    assert m1.duplicates_removed == 2 and m1.sources == {str(src): 120}
    assert m1.splits["train"].num_docs + m1.splits["val"].num_docs == 120
    assert m1.to_json() == m2.to_json()  # same inputs, same shards (checksums included)
    assert sorted(decoded(tmp_path / "out1", "train") + decoded(tmp_path / "out1", "val")) == sorted(texts)
    assert np.dtype(m1.dtype) == np.uint16
