"""TokenWindowLoader: packed EOS-separated windows, one global stream for any ranks/workers, exact resume,
blending by weight, epoch rollover, damaged shards."""

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from data.loader import BlendSchedule, ShardedTokenStream, TokenWindowLoader
from data.prepare import prepare_dataset
from data.shards.manifest import Manifest, ManifestError
from data.shards.reader import CorruptShardError, index_shard, read_shard_docs
from tests.data.conftest import SEQ_LEN, data_cfg, split_docs, write_jsonl


def make(*dirs, mb=2, gbs=4, rank=0, dp=1, seed=0, split="train", weights=None, **cfg_kw) -> TokenWindowLoader:
    return TokenWindowLoader(data_cfg(*dirs, weights=weights, **cfg_kw), split=split, micro_batch_size=mb,
                             global_batch_size=gbs, dp_rank=rank, dp_size=dp, seed=seed)


def windows(batches) -> np.ndarray:
    """[n, seq_len + 1] windows back from micro-batches (labels are the inputs shifted by one)."""
    return np.concatenate([torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).numpy() for b in batches])


def take(loader, n):
    return [next(loader) for _ in range(n)]


def epoch_stream(loader, epoch=0) -> list[np.ndarray]:
    """The epoch's windows regrouped by lane, each lane's concatenated in order: its documents, cut only at the end."""
    stream, wpe = loader.streams[0], loader.windows_per_epoch
    by_lane = defaultdict(dict)
    for g in range(epoch * wpe, (epoch + 1) * wpe):
        lane, position = stream.window_origin(g)
        by_lane[lane][position] = loader.dataset[g].numpy()
    assert all(sorted(windows) == list(range(len(windows))) for windows in by_lane.values())
    return [np.concatenate([windows[p] for p in range(len(windows))]) for windows in by_lane.values()]


def assert_packs_documents(lanes, docs, eos):
    """Each lane is whole documents each followed by EOS, each document at most once in all lanes, cut only at the
    lane's end."""
    pieces = Counter()
    for stream in lanes:
        ends = np.flatnonzero(stream == eos)
        starts = np.concatenate([[0], ends[:-1] + 1])
        pieces.update(stream[s:e].astype(np.int64).tobytes() for s, e in zip(starts, ends, strict=True))
    by_key = {d.astype(np.int64).tobytes(): d for d in docs}
    assert len(by_key) == len(docs)
    assert max(pieces.values()) == 1 and set(pieces) <= set(by_key)
    missing = [d for k, d in by_key.items() if k not in pieces]
    # Only the documents after each lane's last complete one are missing: the cut tail and the dropped remainder.
    kept = sum(int(np.flatnonzero(stream == eos)[-1]) + 1 for stream in lanes)
    assert sum(len(d) + 1 for d in missing) == sum(len(d) + 1 for d in docs) - kept
    assert sum(len(d) + 1 for d in missing) < len(lanes) * (2 * (SEQ_LEN + 1) + max(len(d) for d in docs))


def test_micro_batches_are_shifted_windows(tiny_dir):
    loader = make(tiny_dir, mb=3, gbs=6)
    batch = next(loader)
    assert set(batch) == {"input_ids", "labels", "window_ids"}
    assert batch["window_ids"].tolist() == [0, 1, 2]  # each window's index in the global stream
    for name in ("input_ids", "labels"):
        assert batch[name].dtype == torch.long and batch[name].shape == (3, SEQ_LEN)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert np.array_equal(windows([batch]), np.stack([loader.dataset[g].numpy() for g in range(3)]))
    assert loader.vocab_size == 512 and loader.special_ids.eos == 1
    assert loader.tokens_per_epoch == loader.windows_per_epoch * (SEQ_LEN + 1)


def test_windows_pack_whole_documents_with_eos(tiny_dir):
    loader = make(tiny_dir)
    stream = epoch_stream(loader)
    assert_packs_documents(stream, split_docs(tiny_dir, "train"), loader.special_ids.eos)
    total = sum(s.num_tokens + s.num_docs for s in Manifest.load(tiny_dir).splits["train"].shards)
    lanes = len(loader.streams[0].lanes)  # each drops less than one window
    assert len(stream) == lanes and total // (SEQ_LEN + 1) - lanes < loader.windows_per_epoch <= total // (SEQ_LEN + 1)


def test_epoch_rollover_uses_a_new_permutation(tiny_dir):
    loader = make(tiny_dir, mb=2, gbs=4)
    e0, e1 = epoch_stream(loader, 0), epoch_stream(loader, 1)
    assert_packs_documents(e1, split_docs(tiny_dir, "train"), loader.special_ids.eos)
    assert not np.array_equal(e0[0][: SEQ_LEN + 1], e1[0][: SEQ_LEN + 1])
    # The loader itself runs across the boundary: resume two steps before it and read four steps.
    wpe = loader.windows_per_epoch
    steps_before = wpe // 4 - 2
    loader.load_state_dict({**loader.state_dict(), "consumed_windows": steps_before * 4})
    got = windows(take(loader, 8))
    want = np.stack([loader.dataset[g].numpy() for g in range(steps_before * 4, steps_before * 4 + 16)])
    assert np.array_equal(got, want)
    assert steps_before * 4 + 16 > wpe


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tiny_dir, workers):
    reference = make(tiny_dir, mb=2, gbs=4)
    states, batches = [], []
    for _ in range(14):
        states.append(reference.state_dict())
        batches.append(next(reference))
    for done in [0, 1, 3, 6, 11]:  # micro-batches consumed; odd ones stop inside an optimizer step
        state = json.loads(json.dumps(states[done]))  # plain values only
        assert state["consumed_windows"] == (done // 2) * 4
        resumed = make(tiny_dir, mb=2, gbs=4, num_workers=workers)
        take(resumed, 3)  # whatever it did before is forgotten
        resumed.load_state_dict(state)
        assert np.array_equal(windows(take(resumed, 14 - done)), windows(batches[done:])), done


def test_state_dict_survives_weights_only_torch_save(tiny_dir, tmp_path):
    loader = make(tiny_dir)
    take(loader, 5)
    torch.save({"loader": loader.state_dict()}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["loader"] == loader.state_dict()


def run_ranks(dirs, dp, steps, state=None, mb=2, gbs=8):
    """`steps` optimizer steps on `dp` ranks; the windows in global order and the ranks' final states."""
    loaders = [make(*dirs, mb=mb, gbs=gbs, rank=r, dp=dp) for r in range(dp)]
    per_step = gbs // dp // mb
    for ld in loaders:
        if state is not None:
            ld.load_state_dict(state)
    out = []
    for _ in range(steps):
        for ld in loaders:  # rank r's slice of a step follows rank r-1's
            out.append(windows(take(ld, per_step)))
    states = [ld.state_dict() for ld in loaders]
    assert all(s["consumed_windows"] == states[0]["consumed_windows"] for s in states)
    return np.concatenate(out), states[0]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_number_of_ranks(tiny_dir, before, after):
    single, _ = run_ranks([tiny_dir], 1, 4)
    first, state = run_ranks([tiny_dir], before, 2)
    assert state["consumed_windows"] == 16
    second, _ = run_ranks([tiny_dir], after, 2, state=state)
    assert np.array_equal(np.concatenate([first, second]), single)  # no window dropped, none repeated


def test_resume_errors(tiny_dir):
    loader = make(tiny_dir, mb=2, gbs=8)
    take(loader, 4)  # one step of 8 windows
    with pytest.raises(ValueError, match="global batch"):
        make(tiny_dir, mb=2, gbs=16).load_state_dict(loader.state_dict())
    next(loader)  # inside a step
    with pytest.raises(ValueError, match="inside an optimizer step"):
        make(tiny_dir, mb=2, gbs=8, rank=0, dp=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="seed"):
        make(tiny_dir, mb=2, gbs=8, seed=1).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="interleave_shards=64"):
        make(tiny_dir, mb=2, gbs=8, interleave_shards=4).load_state_dict(loader.state_dict())


def test_state_from_the_previous_stream_resumes_with_a_warning(tiny_dir, caplog):
    loader = make(tiny_dir, mb=2, gbs=8)
    state = {k: v for k, v in make(tiny_dir, mb=2, gbs=8).state_dict().items()
             if k not in ("stream_version", "interleave_shards")}
    loader.load_state_dict({**state, "consumed_windows": 16})
    assert "orders the data differently" in caplog.text
    assert np.array_equal(windows(take(loader, 1)), np.stack([loader.dataset[g].numpy() for g in (16, 17)]))


def shard_of_each_window(loader, data_dir, count) -> list[set[int]]:
    """For each of the first `count` windows, the shards its complete documents come from (read back by content)."""
    manifest = Manifest.load(data_dir)
    home = {doc.astype(np.int64).tobytes(): i for i, info in enumerate(manifest.splits["train"].shards)
            for doc in read_shard_docs(data_dir / info.path, np.uint16)}
    eos, found = loader.special_ids.eos, []
    for g in range(count):
        window = loader.dataset[g].numpy()
        ends = np.flatnonzero(window == eos)
        found.append({home[window[a + 1:b].tobytes()] for a, b in zip(ends[:-1], ends[1:], strict=True) if b > a + 1})
    return found


def test_a_global_batch_draws_from_many_shards(tiny_dir):
    """Eight consecutive windows (one global batch) come from eight shards read side by side; with one lane they
    come from the few shards that 8 windows' tokens span, cut one after the other."""
    kw = dict(seq_len=512, mb=2, gbs=8)
    mixed = shard_of_each_window(make(tiny_dir, interleave_shards=8, **kw), tiny_dir, 8)
    assert all(len(shards) == 1 for shards in mixed)  # each window's documents come from its lane's one shard
    assert len(set().union(*mixed)) == 8
    sequential = shard_of_each_window(make(tiny_dir, interleave_shards=1, **kw), tiny_dir, 8)
    smallest = min(s.num_tokens + s.num_docs for s in Manifest.load(tiny_dir).splits["train"].shards)
    assert len(set().union(*sequential)) <= 2 + 8 * 513 // smallest < 8


def test_windows_read_only_their_tokens(tiny_dir, monkeypatch):
    """Shards are never decoded whole: every read is a piece of one window, and an epoch reads each token once."""
    import data.loader

    counts = []
    real = data.loader.read_tokens
    monkeypatch.setattr(data.loader, "read_tokens", lambda fd, offset, count, dtype, path: counts.append(count) or real(
        fd, offset, count, dtype, path))
    loader = make(tiny_dir)
    lanes = epoch_stream(loader)
    eos = loader.special_ids.eos
    assert max(counts) <= SEQ_LEN + 1
    assert sum(counts) == sum(len(lane) - int((lane == eos).sum()) for lane in lanes)


def test_global_order_ignores_workers_and_ranks(tiny_dir):
    reference = np.stack([make(tiny_dir).dataset[g].numpy() for g in range(48)])
    assert np.array_equal(windows(take(make(tiny_dir, mb=4, gbs=8), 12)), reference)
    assert np.array_equal(windows(take(make(tiny_dir, mb=4, gbs=8, num_workers=2), 12)), reference)
    assert np.array_equal(run_ranks([tiny_dir], 4, 6)[0], reference)
    assert not np.array_equal(np.stack([make(tiny_dir, seed=5).dataset[g].numpy() for g in range(48)]), reference)


def test_blend_schedule_follows_weights_and_is_deterministic():
    schedule = BlendSchedule([3.0, 1.0, 0.5])
    picks = [schedule(g) for g in range(9000)]
    again = BlendSchedule([3.0, 1.0, 0.5])
    assert picks == [again(g) for g in range(9000)]
    counts = Counter(d for d, _ in picks)
    for d, share in enumerate([3 / 4.5, 1 / 4.5, 0.5 / 4.5]):
        assert abs(counts[d] / 9000 - share) < 0.002
        assert abs(sum(1 for d2, _ in picks[:200] if d2 == d) / 200 - share) < 0.02  # also on short prefixes
        # each dataset's own windows are used in order, none skipped or repeated
        assert [i for d2, i in picks if d2 == d] == list(range(counts[d]))


def test_blended_loader_takes_windows_from_each_dataset(tiny_dir, bible_dir):
    dirs = [tiny_dir, bible_dir]
    loader = make(*dirs, weights=[3.0, 1.0], mb=4, gbs=8)
    got = windows(take(loader, 100))
    streams = [ShardedTokenStream(d, "train", SEQ_LEN, seed=0, dataset_index=i) for i, d in enumerate(dirs)]
    schedule = BlendSchedule([3.0, 1.0])
    want = np.stack([streams[d][i] for d, i in map(schedule, range(400))])
    assert np.array_equal(got, want)
    assert 0.7 < sum(1 for g in range(400) if schedule(g)[0] == 0) / 400 < 0.8
    assert np.array_equal(windows(take(make(tiny_dir, bible_dir, weights=[3.0, 1.0], mb=4, gbs=8), 100)), got)


def test_blending_folders_with_different_tokenizers_fails(tiny_dir, tmp_path):
    other = tmp_path / "other"
    jsonl = write_jsonl(tmp_path / "o.jsonl", [f"another text number {i} " * 5 for i in range(200)])
    prepare_dataset(other, sources=[str(jsonl)], vocab_size=300, val_fraction=0.1, shard_tokens=2000)
    with pytest.raises(ManifestError, match="different tokenizers"):
        make(tiny_dir, other)


def test_validation_reset_repeats_the_first_windows(tiny_dir):
    val = make(tiny_dir, split="val", mb=2, gbs=2)
    first = windows(take(val, 3))
    val.reset()
    assert np.array_equal(windows(take(val, 3)), first)
    assert np.array_equal(first[0], val.dataset[0].numpy())


def flip_byte(path, offset=2000):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_named_when_first_opened(damaged_dir, monkeypatch):
    """No shard is read when the loader is built; a shard is checked when a window first needs it, once."""
    import data.loader

    shard = damaged_dir / Manifest.load(damaged_dir).splits["train"].shards[3].path
    flip_byte(shard)
    hashed, indexed = [], []
    real = data.loader.index_shard

    def recording(path, dtype, info, sha256=None):
        indexed.append(path)
        if sha256:
            hashed.append(path)
        return real(path, dtype, info, sha256)

    monkeypatch.setattr(data.loader, "index_shard", recording)
    stream = make(damaged_dir)
    assert indexed == []
    with pytest.raises(CorruptShardError, match=f"{shard.name} is corrupt"):
        epoch_stream(stream)
    assert len(hashed) == len(set(hashed)) and shard in hashed  # each shard hashed once


def test_damaged_tar_header_is_named_without_checksums(damaged_dir):
    info = Manifest.load(damaged_dir).splits["train"].shards[2]
    shard = damaged_dir / info.path
    second_header = int(index_shard(shard, np.uint16, info).offsets[1]) - 512  # a header precedes its data
    flip_byte(shard, offset=second_header + 10)  # a byte of the member's name
    header_damaged = make(damaged_dir, verify_checksums=False)
    with pytest.raises(CorruptShardError, match=f"{shard.name}.*(tar header|documents)"):
        epoch_stream(header_damaged)


def test_truncated_shard_is_named_also_without_checksums(damaged_dir):
    info = Manifest.load(damaged_dir).splits["train"].shards[1]
    shard = damaged_dir / info.path
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match=shard.name):
        epoch_stream(make(damaged_dir))
    unchecked = make(damaged_dir, verify_checksums=False)
    with pytest.raises(CorruptShardError, match=shard.name):
        epoch_stream(unchecked)  # the damage shows when the shard is first read


def test_corrupt_shard_can_be_skipped_and_counted(damaged_dir, tiny_dir):
    shards = Manifest.load(damaged_dir).splits["train"].shards
    flip_byte(damaged_dir / shards[2].path)
    (damaged_dir / shards[5].path).unlink()
    skipping = make(damaged_dir, skip_corrupt_shards=True)
    assert skipping.skipped_shards == [shards[2].path, shards[5].path]
    assert skipping.windows_per_epoch < make(tiny_dir).windows_per_epoch
    kept = [d for i, s in enumerate(shards) if i not in (2, 5) for d in read_shard_docs(tiny_dir / s.path, np.uint16)]
    assert_packs_documents(epoch_stream(skipping), kept, skipping.special_ids.eos)
    next(skipping)


def test_manifest_tokenizer_mismatch_is_an_error(damaged_dir):
    tok = damaged_dir / "tokenizer.json"
    tok.write_text(tok.read_text().replace("<|bos|>", "<|b|>"))
    with pytest.raises(ManifestError, match="tokenizer"):
        make(damaged_dir)


def test_missing_shard_is_named_when_the_loader_is_built(damaged_dir):
    shard = damaged_dir / Manifest.load(damaged_dir).splits["train"].shards[4].path
    shard.unlink()
    with pytest.raises(CorruptShardError, match=f"{shard.name} is missing"):
        make(damaged_dir)


def test_close_ends_the_workers_and_reading_goes_on_from_the_same_window(tiny_dir):
    reference = windows(take(make(tiny_dir, mb=4, gbs=8), 6))
    loader = make(tiny_dir, mb=4, gbs=8, num_workers=2)
    first = take(loader, 3)
    workers = loader._iterator._workers
    loader.close()
    assert all(w.exitcode is not None for w in workers)
    assert np.array_equal(windows([*first, *take(loader, 3)]), reference)
