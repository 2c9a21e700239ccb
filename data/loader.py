"""The training loader: a deterministic global stream of packed windows, split over data-parallel ranks.

The global stream (it depends on the seed only, never on ranks or workers):
  - per dataset and epoch, the shard order is a seeded permutation, and so is the document order inside each
    shard; documents are concatenated, each followed by EOS, and cut into consecutive `seq_len + 1` windows
    (the epoch's remainder is dropped). Locating a window needs only the manifest's per-shard token counts;
    a shard is decoded (with webdataset) when a window first needs it, and a few decoded shards are cached;
  - several datasets are interleaved by weight with a fixed block schedule (`BlendSchedule`);
  - optimizer step s consumes windows [s*G, (s+1)*G) of the stream, G = global batch size; data-parallel rank
    r of W takes the contiguous slice [s*G + r*G/W, s*G + (r+1)*G/W) as micro-batches.
Damaged shards: a missing shard is an error naming it when the loader is built; a shard's checksum is verified
when it is first opened (`verify_checksums`), by the rank (worker) that reads it, so no rank hashes every shard at
start; a bad one is a `CorruptShardError` naming it. With `skip_corrupt_shards` every shard is verified when the
loader is built instead, and a bad one is left out of the stream from the start (logged, listed in
`skipped_shards`), so the stream never shifts mid-run.
The loader's state is the number of windows consumed by all ranks, so a resume continues the stream exactly,
also with another number of ranks (at an optimizer-step boundary) or workers.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.shards.manifest import Manifest, ManifestError, ShardInfo
from data.shards.reader import CorruptShardError, read_shard_docs, verify_shard
from data.tokenizer import SpecialIds

log = logging.getLogger(__name__)
BLEND_BLOCK = 1000
SHARD_CACHE = 3


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class ShardedTokenStream:
    """One prepared dataset's split as an endless, indexable sequence of `seq_len + 1` windows."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int, dataset_index: int = 0,
                 verify_checksums: bool = True, skip_corrupt_shards: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        if split not in self.manifest.splits:
            raise ManifestError(f"{self.data_dir / 'manifest.json'} has no '{split}' split")
        self.window = seq_len + 1
        self.seed = seed
        self.dataset_index = dataset_index
        self.dtype = np.dtype(self.manifest.dtype)
        self.eos = self.manifest.eos_id
        # Skipping corrupt shards needs them all checked before the stream is built, so that skipping one changes
        # the stream from the start, never in the middle; otherwise a shard is checked when first opened.
        self.verify_checksums = verify_checksums and not skip_corrupt_shards
        self.verified: set[int] = set()
        self.skipped_shards: list[str] = []
        self.shards: list[ShardInfo] = []
        for info in self.manifest.splits[split].shards:
            try:
                if skip_corrupt_shards:
                    verify_shard(self.data_dir / info.path, info.sha256)
                elif not (self.data_dir / info.path).is_file():
                    raise CorruptShardError(f"shard {self.data_dir / info.path} is missing")
                self.shards.append(info)
            except CorruptShardError as exc:
                if not skip_corrupt_shards:
                    raise
                log.warning("skipping %s (data.skip_corrupt_shards=true)", exc)
                self.skipped_shards.append(info.path)
        self.shard_lengths = np.array([s.num_tokens + s.num_docs for s in self.shards], dtype=np.int64)
        self.windows_per_epoch = int(self.shard_lengths.sum() // self.window)
        if self.windows_per_epoch == 0:
            raise ManifestError(
                f"{self.data_dir} split '{split}' holds {int(self.shard_lengths.sum())} tokens, fewer than one "
                f"window of {self.window}; lower data.seq_len or add data"
            )
        self._decoded: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows_per_epoch * self.window

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one stream object per dataset; bounded)
    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = _rng(self.seed, self.dataset_index, epoch).permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.shard_lengths[order])])
        return order, starts

    def _shard_tokens(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        info = self.shards[shard]
        if self.verify_checksums and shard not in self.verified:
            verify_shard(self.data_dir / info.path, info.sha256)
            self.verified.add(shard)
        docs = read_shard_docs(self.data_dir / info.path, self.dtype, info)
        order = _rng(self.seed, self.dataset_index, epoch, shard).permutation(len(docs))
        eos = np.array([self.eos], dtype=self.dtype)
        tokens = np.concatenate([piece for i in order for piece in (docs[i], eos)])
        self._decoded[key] = tokens
        if len(self._decoded) > SHARD_CACHE:
            self._decoded.popitem(last=False)
        return tokens

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, local = divmod(int(index), self.windows_per_epoch)
        order, starts = self._epoch_layout(epoch)
        begin, end = local * self.window, (local + 1) * self.window
        pos = int(np.searchsorted(starts, begin, side="right")) - 1
        pieces = []
        while begin < end:
            shard_start, shard_end = int(starts[pos]), int(starts[pos + 1])
            take = min(end, shard_end) - begin
            tokens = self._shard_tokens(epoch, int(order[pos]))
            pieces.append(tokens[begin - shard_start : begin - shard_start + take])
            begin += take
            pos += 1
        return np.concatenate(pieces)


class BlendSchedule:
    """Maps global window g to (dataset, index within dataset) by a block schedule repeated every `block`
    windows: inside a block each dataset gets its weight's share (largest remainder), placed by greedy
    largest deficit, so any prefix of the stream follows the weights closely. Lookup is O(1)."""

    def __init__(self, weights: list[float], block: int = BLEND_BLOCK):
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.block = block if len(w) > 1 else 1
        quota = np.floor(w * self.block).astype(np.int64)
        for i in np.argsort(-(w * self.block - quota), kind="stable")[: self.block - quota.sum()]:
            quota[i] += 1
        self.per_block = quota
        self.dataset = np.empty(self.block, dtype=np.int64)
        self.offset = np.empty(self.block, dtype=np.int64)
        taken = np.zeros(len(w), dtype=np.int64)
        for j in range(self.block):
            deficit = np.where(taken < quota, w * (j + 1) - taken, -np.inf)
            d = int(np.argmax(deficit))
            self.dataset[j], self.offset[j] = d, taken[d]
            taken[d] += 1

    def __call__(self, g: int) -> tuple[int, int]:
        b, j = divmod(int(g), self.block)
        d = int(self.dataset[j])
        return d, b * int(self.per_block[d]) + int(self.offset[j])


class WindowDataset(Dataset):
    def __init__(self, streams: list[ShardedTokenStream], schedule: BlendSchedule):
        self.streams = streams
        self.schedule = schedule

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs a number
        return 2**62

    def __getitem__(self, g: int) -> torch.Tensor:
        d, i = self.schedule(g)
        return torch.from_numpy(self.streams[d][i].astype(np.int64))


class RankSampler(Sampler[int]):
    """This rank's global window indices, from optimizer step `start_step` on, forever."""

    def __init__(self, global_batch: int, dp_rank: int, dp_size: int, start_step: int, start_offset: int = 0):
        self.global_batch, self.per_rank = global_batch, global_batch // dp_size
        self.dp_rank, self.start_step, self.start_offset = dp_rank, start_step, start_offset

    def __iter__(self):
        step, offset = self.start_step, self.start_offset
        while True:
            base = step * self.global_batch + self.dp_rank * self.per_rank
            for j in range(offset, self.per_rank):
                yield base + j
            step, offset = step + 1, 0


def _collate(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    batch = torch.stack(windows)
    return {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}


class TokenWindowLoader:
    """Micro-batches `{"input_ids", "labels"}` of shape [micro_batch_size, seq_len] for one data-parallel rank."""

    def __init__(self, data_cfg, split: str = "train", micro_batch_size: int = 8, global_batch_size: int = 8,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} x dp {dp_size}"
            )
        self.cfg = data_cfg
        self.split = split
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch_size // dp_size
        self.seed = seed
        dirs = data_cfg.dataset_dirs()
        self.streams = [
            ShardedTokenStream(d, split, data_cfg.seq_len, seed, i, data_cfg.verify_checksums,
                               data_cfg.skip_corrupt_shards)
            for i, (d, _) in enumerate(dirs)
        ]
        hashes = {s.manifest.tokenizer_sha256 for s in self.streams}
        if len(hashes) > 1:
            raise ManifestError(f"blended data folders {[d for d, _ in dirs]} were prepared with different tokenizers")
        self.schedule = BlendSchedule([w for _, w in dirs])
        self.dataset = WindowDataset(self.streams, self.schedule)
        self.consumed_micro_batches = 0  # by this rank, since the start of the stream
        self._iterator = None

    # -- facts for the trainer --------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.streams[0].manifest

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def skipped_shards(self) -> list[str]:
        return [p for s in self.streams for p in s.skipped_shards]

    @property
    def special_ids(self) -> SpecialIds:
        m = self.manifest
        return SpecialIds(m.bos_id, m.eos_id, m.pad_id)

    @property
    def windows_per_epoch(self) -> int:
        """Summed over blended datasets (each one rolls over to its next epoch on its own)."""
        return sum(s.windows_per_epoch for s in self.streams)

    @property
    def tokens_per_epoch(self) -> int:
        return sum(s.tokens_per_epoch for s in self.streams)

    def tokenizer_reference(self) -> dict[str, str]:
        s = self.streams[0]
        return {"path": str((s.data_dir / s.manifest.tokenizer_file).resolve()), "sha256": s.manifest.tokenizer_sha256}

    # -- iteration ----------------------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        windows = self.consumed_micro_batches * self.micro_batch_size
        return divmod(windows, self.per_rank)  # (optimizer steps done, windows into the current step)

    def _make_iterator(self):
        step, offset = self._position()
        sampler = RankSampler(self.global_batch_size, self.dp_rank, self.dp_size, step, offset)
        workers = self.cfg.num_workers
        loader = DataLoader(self.dataset, batch_size=self.micro_batch_size, sampler=sampler, num_workers=workers,
                            collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if workers else None)
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self.consumed_micro_batches += 1
        return batch

    def reset(self) -> None:
        """Back to the start of the stream (evaluation sees the same windows every time)."""
        self.consumed_micro_batches = 0
        self._iterator = None

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """`consumed_windows`: windows of the global stream in completed optimizer steps (all ranks);
        `step_offset`: windows this rank has taken of the step in progress (0 at a step boundary)."""
        step, offset = self._position()
        return {
            "consumed_windows": step * self.global_batch_size,
            "step_offset": offset,
            "global_batch_size": self.global_batch_size,
            "dp_size": self.dp_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        if state["consumed_windows"] % self.global_batch_size:
            raise ValueError(
                f"loader state consumed {state['consumed_windows']} windows, not a multiple of this run's global "
                f"batch {self.global_batch_size}: resume with the same train.global_batch_size"
            )
        same_layout = state["dp_size"] == self.dp_size and state["global_batch_size"] == self.global_batch_size
        if state["step_offset"] and not same_layout:
            raise ValueError(
                "a loader stopped inside an optimizer step can only resume with the same number of ranks and "
                "global batch size"
            )
        steps = state["consumed_windows"] // self.global_batch_size
        self.consumed_micro_batches = (steps * self.per_rank + state["step_offset"]) // self.micro_batch_size
        self._iterator = None
