"""The training loader: a deterministic global stream of packed windows, split over data-parallel ranks.

The global stream (it depends on the seed only, never on ranks or workers):
  - per dataset, the shards are dealt once (seeded) into `interleave` lanes of near-equal token counts. Per
    epoch, each lane orders its shards by a seeded permutation, and each shard its documents; a lane's documents
    are concatenated, each followed by EOS, and cut into consecutive `seq_len + 1` windows (each lane's remainder
    is dropped). The epoch's windows are taken one from each lane in turn, so consecutive windows (one global
    batch) come from up to `interleave` different shards;
  - a shard is never decoded whole: its document offsets come from the tar headers, and a window reads just
    the token ranges it covers (positioned reads), so a worker's memory is independent of shard size; locating
    a window needs only the manifest's per-shard token counts;
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
import hashlib
import logging
import multiprocessing
import os
import signal
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.shards.manifest import Manifest, ManifestError, ShardInfo
from data.shards.reader import CorruptShardError, index_shard, read_tokens, verify_shard
from data.tokenizer import SpecialIds

log = logging.getLogger(__name__)
BLEND_BLOCK = 1000
STREAM_VERSION = 2  # 1: one lane, shards decoded whole
_DEAL, _LANE_ORDER, _DOC_ORDER = 1, 2, 3  # seed-stream tags


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


class ShardedTokenStream:
    """One prepared dataset's split as an endless, indexable sequence of `seq_len + 1` windows, read from up to
    `interleave` shards at once (see the module docstring)."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int, dataset_index: int = 0,
                 verify_checksums: bool = True, skip_corrupt_shards: bool = False, interleave: int = 64):
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
        if not self.shards:
            raise ManifestError(f"{self.data_dir} split '{split}' has no readable shard")
        self.shard_lengths = np.array([s.num_tokens + s.num_docs for s in self.shards], dtype=np.int64)
        self.lanes = self._deal_into_lanes(min(interleave, len(self.shards)))
        lane_windows = np.array([self.shard_lengths[lane].sum() // self.window for lane in self.lanes], np.int64)
        self.windows_per_epoch = int(lane_windows.sum())
        if self.windows_per_epoch == 0:
            raise ManifestError(
                f"{self.data_dir} split '{split}' holds {int(self.shard_lengths.sum())} tokens, fewer than one "
                f"window of {self.window} per interleaved shard group; lower data.seq_len or "
                "data.interleave_shards, or add data"
            )
        self._rounds = _RoundRobin(lane_windows)
        self._doc_layouts: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._files: OrderedDict[int, int] = OrderedDict()
        self._open_limit = 2 * len(self.lanes) + 2

    def _deal_into_lanes(self, count: int) -> list[np.ndarray]:
        """Shards in a seeded order, each to the lane holding the fewest tokens so far: lanes of near-equal length,
        so no lane runs dry long before the others. Fixed for the whole run (epochs reorder inside lanes)."""
        lanes: list[list[int]] = [[] for _ in range(count)]
        tokens = np.zeros(count, dtype=np.int64)
        for shard in _rng(self.seed, self.dataset_index, _DEAL).permutation(len(self.shards)):
            k = int(np.argmin(tokens))
            lanes[k].append(int(shard))
            tokens[k] += self.shard_lengths[shard]
        return [np.array(lane, dtype=np.int64) for lane in lanes]

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows_per_epoch * self.window

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one stream object per dataset; bounded)
    def _lane_layout(self, epoch: int, lane: int) -> tuple[np.ndarray, np.ndarray]:
        """The lane's shards in this epoch's order and the token offset where each starts."""
        shards = self.lanes[lane][_rng(self.seed, self.dataset_index, _LANE_ORDER, epoch, lane).permutation(
            len(self.lanes[lane]))]
        return shards, np.concatenate([[0], np.cumsum(self.shard_lengths[shards])])

    def _doc_layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This epoch's document order in a shard: byte offsets, token counts, and where each document (with its
        EOS) starts in the shard's stream. Built from the tar headers; a few shards' layouts are kept."""
        key = (epoch, shard)
        if key in self._doc_layouts:
            self._doc_layouts.move_to_end(key)
            return self._doc_layouts[key]
        info = self.shards[shard]
        verify = self.verify_checksums and shard not in self.verified
        index = index_shard(self.data_dir / info.path, self.dtype, info, sha256=info.sha256 if verify else None)
        self.verified.add(shard)
        order = _rng(self.seed, self.dataset_index, _DOC_ORDER, epoch, shard).permutation(len(index.lengths))
        lengths = index.lengths[order]
        layout = (index.offsets[order], lengths, np.concatenate([[0], np.cumsum(lengths + 1)]))
        self._doc_layouts[key] = layout
        if len(self._doc_layouts) > self._open_limit:
            self._doc_layouts.popitem(last=False)
        return layout

    def _fd(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        fd = os.open(self.data_dir / self.shards[shard].path, os.O_RDONLY)
        self._files[shard] = fd
        if len(self._files) > self._open_limit:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _shard_piece(self, epoch: int, shard: int, begin: int, end: int) -> list[np.ndarray]:
        """Tokens [begin, end) of the shard's stream (its documents in this epoch's order, each followed by EOS),
        read document piece by document piece: memory is the window, whatever the shard's size."""
        offsets, lengths, starts = self._doc_layout(epoch, shard)
        fd, path = self._fd(shard), self.data_dir / self.shards[shard].path
        pieces = []
        doc = int(np.searchsorted(starts, begin, side="right")) - 1
        while begin < end:
            doc_start, n = int(starts[doc]), int(lengths[doc])
            first, last = begin - doc_start, min(end - doc_start, n + 1)  # position n is the EOS
            if first < n:
                stop = min(last, n)
                pieces.append(read_tokens(fd, int(offsets[doc]) + first * self.dtype.itemsize, stop - first,
                                          self.dtype, path))
            if last == n + 1:
                pieces.append(np.array([self.eos], dtype=self.dtype))
            begin = doc_start + last
            doc += 1
        return pieces

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, local = divmod(int(index), self.windows_per_epoch)
        lane, position = self._rounds.locate(local)
        shards, starts = self._lane_layout(epoch, lane)
        begin, end = position * self.window, (position + 1) * self.window
        pos = int(np.searchsorted(starts, begin, side="right")) - 1
        pieces = []
        while begin < end:
            shard_start, shard_end = int(starts[pos]), int(starts[pos + 1])
            take = min(end, shard_end) - begin
            pieces += self._shard_piece(epoch, int(shards[pos]), begin - shard_start, begin - shard_start + take)
            begin += take
            pos += 1
        return np.concatenate(pieces)

    def window_origin(self, index: int) -> tuple[int, int]:
        """(lane, window within the lane's epoch stream) of a stream index: a lane's windows in order are
        consecutive cuts of its documents."""
        return self._rounds.locate(int(index) % self.windows_per_epoch)

    def __getstate__(self):  # DataLoader workers started by spawn open their own files
        state = dict(self.__dict__)
        state["_files"], state["_doc_layouts"] = OrderedDict(), OrderedDict()
        return state

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)


class _RoundRobin:
    """The epoch's windows taken one from each lane in turn (lanes that have run out drop out of the rounds):
    window `local` -> (lane, its index in the lane), in O(log lanes) from the lanes' window counts alone."""

    def __init__(self, lane_windows: np.ndarray):
        self.order = np.argsort(-lane_windows, kind="stable")  # lanes, longest first
        counts = lane_windows[self.order]
        # Between two distinct lane lengths the rounds are full of the same lanes: one segment per length.
        self.round_starts = np.unique(np.concatenate([[0], counts]))  # ascending
        self.active = np.array([(counts > r).sum() for r in self.round_starts], dtype=np.int64)
        self.window_starts = np.array([np.minimum(counts, r).sum() for r in self.round_starts], dtype=np.int64)

    def locate(self, local: int) -> tuple[int, int]:
        segment = int(np.searchsorted(self.window_starts, local, side="right")) - 1
        into = local - int(self.window_starts[segment])
        rounds, slot = divmod(into, int(self.active[segment]))
        return int(self.order[slot]), int(self.round_starts[segment]) + rounds


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


class _NumberedWindows(Dataset):
    """(g, window g): the index travels with its window into the batch (data accounting)."""

    def __init__(self, windows: WindowDataset):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, g: int) -> tuple[int, torch.Tensor]:
        return g, self.windows[g]


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


def _collate(windows: list[tuple[int, torch.Tensor]], eos: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids, labels and `window_ids` (each window's index in the global stream). `eos` given (document
    masking): also `document_ids`, each input position's document in its window (the number of EOS before it: an
    EOS belongs to the document it ends)."""
    batch = torch.stack([tokens for _, tokens in windows])
    out = {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous(),
           "window_ids": torch.tensor([g for g, _ in windows], dtype=torch.long)}
    if eos is not None:
        ends = (out["input_ids"] == eos).long()
        out["document_ids"] = ends.cumsum(dim=1) - ends
    return out


def shielded_batches(dataset: Dataset, **options):
    """`iter(DataLoader(dataset, **options))` whose worker processes (if any) are shielded from stop signals
    (`_shield_from_stop_signals`). The workers are forked wherever fork exists, whatever the training process's own
    default (fork for a rank that torchrun started, before Python 3.14; spawn for one started by `mp.spawn`), and
    started with SIGTERM blocked in the calling thread: a forked worker begins life with only that thread and its
    mask, so every thread it runs keeps SIGTERM blocked and only `_end_on_parents_sigterm` takes it. A spawned
    worker starts threads with SIGTERM open (interpreter and torch start-up) before `worker_init_fn`; such a thread
    would run torch's worker handler, which ends the worker on anyone's SIGTERM (a preemption warning would kill the
    step in flight)."""
    if options.get("num_workers"):
        fork = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
        options |= {"multiprocessing_context": fork, "worker_init_fn": _shield_from_stop_signals}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(DataLoader(dataset, **options))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _shield_from_stop_signals(worker_id: int) -> None:
    """A stop signal is for the training process (it finishes its step, which may need more batches, and saves):
    workers leave the process group that Ctrl-C or `kill -- -PGID` reach, and ignore SIGINT, SIGUSR1 and SIGUSR2 (a
    scheduler's warning: SLURM signals every process of a job step). SIGTERM ends a worker only when the training
    process sends it (the loader's and multiprocessing's shutdown); from anyone else — SLURM at a preemption, which
    would otherwise kill the worker and with it the step in flight — it is ignored (a worker whose training process
    is gone still ends, by the loader's own watchdog)."""
    os.setpgid(0, 0)
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


class TokenWindowLoader:
    """Micro-batches `{"input_ids", "labels"}` of shape [micro_batch_size, seq_len] for one data-parallel rank."""

    def __init__(self, data_cfg, split: str = "train", micro_batch_size: int = 8, global_batch_size: int = 8,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, reads: bool = True):
        """`reads=False`: a rank that gets its batches from a peer (or does not use them) keeps the position
        and state but reads nothing, yielding zeros of the right shape."""
        self._set_batching(data_cfg, split, micro_batch_size, global_batch_size, dp_rank, dp_size, seed, reads)
        dirs = data_cfg.dataset_dirs()
        self.streams = [
            ShardedTokenStream(d, split, data_cfg.seq_len, seed, i, data_cfg.verify_checksums,
                               data_cfg.skip_corrupt_shards, data_cfg.interleave_shards)
            for i, (d, _) in enumerate(dirs)
        ]
        hashes = {s.manifest.tokenizer_sha256 for s in self.streams}
        if len(hashes) > 1:
            raise ManifestError(f"blended data folders {[d for d, _ in dirs]} were prepared with different tokenizers")
        self.schedule = BlendSchedule([w for _, w in dirs])
        self.dataset = WindowDataset(self.streams, self.schedule)
        self.collate = functools.partial(_collate, eos=self.special_ids.eos if data_cfg.document_masking else None)

    def _set_batching(self, data_cfg, split: str, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                      dp_size: int, seed: int, reads: bool) -> None:
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
        self.reads = reads
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

    def data_fingerprint(self) -> list[dict[str, Any]]:
        """What this loader reads, independent of where the folders lie: per blended folder its weight, tokenizer
        hash and a hash of its split's shard checksums (a resume on other data changes it)."""
        out = []
        for stream, (_, weight) in zip(self.streams, self.cfg.dataset_dirs(), strict=True):
            shards = stream.manifest.splits[self.split].shards
            digest = hashlib.sha256("".join(info.sha256 for info in shards).encode()).hexdigest()
            out.append({"dir": str(stream.data_dir), "weight": weight,
                        "tokenizer_sha256": stream.manifest.tokenizer_sha256, "shards_sha256": digest})
        return out

    # -- iteration ----------------------------------------------------------------------------------
    def _position(self) -> tuple[int, int]:
        windows = self.consumed_micro_batches * self.micro_batch_size
        return divmod(windows, self.per_rank)  # (optimizer steps done, windows into the current step)

    def _make_iterator(self):
        step, offset = self._position()
        sampler = RankSampler(self.global_batch_size, self.dp_rank, self.dp_size, step, offset)
        workers = self.cfg.num_workers
        return shielded_batches(self.numbered_windows(), batch_size=self.micro_batch_size, sampler=sampler,
                                num_workers=workers, collate_fn=self.collate, persistent_workers=False,
                                prefetch_factor=4 if workers else None)

    def numbered_windows(self) -> Dataset:
        """The dataset the DataLoader reads: item `g` is window `g` of the global stream, with its number."""
        return _NumberedWindows(self.dataset)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self.reads:
            self.consumed_micro_batches += 1
            shape = (self.micro_batch_size, self.cfg.seq_len)
            names = ["input_ids", "labels"] + (["document_ids"] if self.cfg.document_masking else [])
            batch = {name: torch.zeros(shape, dtype=torch.long) for name in names}
            return batch | {"window_ids": torch.full((self.micro_batch_size,), -1, dtype=torch.long)}
        if self._iterator is None:
            self._iterator = self._make_iterator()
        batch = next(self._iterator)
        self.consumed_micro_batches += 1
        return batch

    def reset(self) -> None:
        """Back to the start of the stream (evaluation sees the same windows every time)."""
        self.consumed_micro_batches = 0
        self.close()

    def close(self) -> None:
        """Ends the worker processes now (the position is kept: reading again starts new ones). Left to the garbage
        collector, the shutdown may run inside another thread's import and wait seconds on each worker."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

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
            "stream_version": STREAM_VERSION,
            "interleave_shards": self.cfg.interleave_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state has seed {state['seed']}, this run uses {self.seed}")
        if state.get("stream_version", 1) != STREAM_VERSION:
            log.warning("the checkpoint's data position was counted in loader stream version %s, this version orders "
                        "the data differently (%s): the run goes on at the same window count, so some documents may "
                        "repeat or be skipped", state.get("stream_version", 1), STREAM_VERSION)
        elif state["interleave_shards"] != self.cfg.interleave_shards:
            raise ValueError(
                f"loader state was written with data.interleave_shards={state['interleave_shards']}, this run uses "
                f"{self.cfg.interleave_shards}, which orders the data differently: resume with the same value"
            )
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
