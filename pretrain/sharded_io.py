"""Each rank writes and reads only its own pieces of the tensors, through `torch.distributed.checkpoint` (DCP) and
its safetensors storage (no pickles anywhere in a checkpoint).

A piece is a tensor plus its placement: the full tensor's shape and the offsets of the piece in it (from the
parallel plan, `ParallelPlan.placement`). Pieces several ranks hold identically (data-parallel replicas, a tied
embedding on two pipeline stages) are written once: DCP spreads them over the ranks holding them. Loading asks
for any other placement of the same tensors and DCP reads exactly the overlapping regions, which is what lets a
checkpoint resume on another layout or world size. A piece may also be a `Fragment`: a contiguous range of a
piece's elements in row-major order (how ZeRO partitions a parameter over data-parallel ranks), stored as the few
boxes that range is made of (`flat_range_boxes`), so it is written and read without assembling the whole tensor.

Every written file's sha256 travels to the coordinator with DCP's own write results; a reading rank checks the
files it reads from, and only those.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint._hf_utils import _gen_file_name
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

Placement = tuple[tuple[int, ...], tuple[int, ...]]  # (full shape, offsets of this rank's piece)


@dataclass(frozen=True)
class Fragment:
    """Where a 1-D tensor lies that holds elements [start, start + its numel) of a piece in row-major order: the
    piece's placement in the full tensor and the piece's shape."""

    placement: Placement
    piece_shape: tuple[int, ...]
    start: int


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes (offsets, sizes) that elements [start, stop) of a row-major tensor of `shape` are made of, in
    element order: at most 2 * len(shape) - 1 (a partial first row, whole rows, a partial last row, recursively)."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner

    def within(row: int, lo: int, hi: int) -> list:
        return [((row, *offsets), (1, *sizes)) for offsets, sizes in flat_range_boxes(shape[1:], lo, hi)]

    if first == last and (start % inner or stop % inner):
        return within(first, start - first * inner, stop - first * inner)
    boxes = within(first, start % inner, inner) if start % inner else []
    whole_from, whole_to = first + bool(start % inner), last + (stop % inner == 0)
    if whole_to > whole_from:
        boxes.append(((whole_from,) + (0,) * (len(shape) - 1), (whole_to - whole_from, *shape[1:])))
    if stop % inner:
        boxes += within(last, 0, stop - last * inner)
    return boxes


class ShardReadError(RuntimeError):
    """A shard file that is missing, corrupt or does not hold what the checkpoint says; names the file."""


class ShardWriteError(RuntimeError):
    """A rank could not write its shards (full disk, permissions); names the ranks and their errors."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One shard file as its writer saw it, carried to the coordinator inside DCP's write results."""

    name: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class StoredTensor:
    shape: tuple[int, ...]  # of the full tensor
    dtype: torch.dtype


def _chunks(where: Placement | Fragment | None, tensor: torch.Tensor
            ) -> tuple[torch.Size, list[tuple[ChunkStorageMetadata, torch.Tensor]]]:
    """(full shape, [(chunk of the full tensor, the view of `tensor` that holds it)]); a tensor without a placement
    is whole, a fragment is its boxes."""
    if not isinstance(where, Fragment):
        whole, offsets = where or (tuple(tensor.shape), (0,) * tensor.dim())
        return torch.Size(whole), [(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape), tensor)]
    whole, piece_offsets = where.placement
    chunks, position = [], 0
    for offsets, sizes in flat_range_boxes(where.piece_shape, where.start, where.start + tensor.numel()):
        count = math.prod(sizes)
        chunk = ChunkStorageMetadata(offsets=torch.Size(o + p for o, p in zip(offsets, piece_offsets, strict=True)),
                                     sizes=torch.Size(sizes))
        chunks.append((chunk, tensor[position:position + count].view(sizes)))
        position += count
    return torch.Size(whole), chunks


class _PieceSavePlanner(DefaultSavePlanner):
    def __init__(self, placements: dict[str, Placement | Fragment]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placements = placements
        self.views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def create_local_plan(self) -> SavePlan:
        items = []
        for fqn, tensor in self.state_dict.items():
            whole, chunks = _chunks(self.placements.get(fqn), tensor)
            for chunk, view in chunks:
                self.views[fqn, tuple(chunk.offsets)] = view
                items.append(WriteItem(
                    index=MetadataIndex(fqn, chunk.offsets), type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties.create_from_tensor(tensor),
                                                size=whole),
                ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        return self.views[write_item.index.fqn, tuple(write_item.index.offset)].detach().contiguous().cpu()


class _PieceLoadPlanner(DefaultLoadPlanner):
    def __init__(self, placements: dict[str, Placement | Fragment]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.placements = placements
        self.views: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, tensor in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise ShardReadError(f"the checkpoint has no tensor '{fqn}'")
            whole, chunks = _chunks(self.placements.get(fqn), tensor)
            if md.size != whole:
                raise ShardReadError(f"'{fqn}' is {tuple(md.size)} in the checkpoint but {tuple(whole)} in this model")
            for chunk, view in chunks:  # views of `tensor`: reading into them fills it in place
                self.views[fqn, tuple(chunk.offsets)] = view
            items += create_read_items_for_chunk_list(fqn, md, [chunk for chunk, _ in chunks])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.views[index.fqn, tuple(index.offset)]


class _HashingWriter(HuggingFaceStorageWriter):
    """DCP's sharded safetensors writer (one file per rank) that hashes what it wrote; the coordinator's
    `on_finish(files, tensors)` runs once every rank's files are written and synced."""

    def __init__(self, path: Path, on_start: Callable[[], None] | None,
                 on_finish: Callable[[list[StoredFile], dict[str, StoredTensor]], None] | None,
                 on_written: Callable[[], None] | None = None):
        super().__init__(str(path), save_distributed=True)
        self.on_start, self.on_finish, self.on_written = on_start, on_finish, on_written

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self.on_start is not None:  # the coordinator, after every rank planned and before any rank writes
            self.on_start()
        return super().prepare_global_plan(plans)

    def write_data(self, plan, planner) -> Future[list[WriteResult]]:
        results = self._write_files(plan, planner).wait()
        stored = {}
        for name in {r.storage_data.relative_path for r in results}:
            file = Path(self.path) / name
            stored[name] = StoredFile(name, sha256_file(file), file.stat().st_size)
        if self.on_written is not None:  # this rank's files are written; the checkpoint is not committed yet
            self.on_written()
        future: Future = Future()
        future.set_result([WriteResult(r.index, r.size_in_bytes, stored[r.storage_data.relative_path])
                           for r in results])
        return future

    def _write_files(self, plan: SavePlan, planner) -> Future[list[WriteResult]]:
        """One safetensors file per rank, as DCP writes them; a rank holding several chunks of a tensor (fragments)
        writes its k-th chunk of every tensor into its k-th file, since a safetensors file names a tensor once."""
        ordinal: dict[str, int] = {}
        files: dict[int, list[WriteItem]] = {}
        for item in plan.items:
            ordinal[item.index.fqn] = ordinal.get(item.index.fqn, 0) + 1
            files.setdefault(ordinal[item.index.fqn], []).append(item)
        if len(files) <= 1:
            return super().write_data(plan, planner)
        queue: Queue = Queue()
        for number, items in sorted(files.items()):
            name = _gen_file_name(number, len(files), plan.storage_data["shard_index"])
            queue.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, queue)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            covered = sum(math.prod(chunk.sizes) for chunk in md.chunks)
            if covered != math.prod(md.size):  # DCP checks this only with several ranks
                raise ShardWriteError(f"the pieces of '{fqn}' cover {covered} of its {math.prod(md.size)} elements")
            tensors[fqn] = StoredTensor(tuple(md.size), md.properties.dtype)
        files = {r.storage_data.name: r.storage_data for rank_results in results for r in rank_results}
        if self.on_finish is not None:
            self.on_finish(sorted(files.values(), key=lambda f: f.name), tensors)


@dataclass
class ReadRecord:
    """What this process's earlier reads of one checkpoint learnt: the shard files found intact (not hashed again)
    and the shard headers (not read and broadcast again). Every read sharing a record must be collective over the
    same group, so that all its ranks hold the headers or none do."""

    checked: set[str] = field(default_factory=set)
    metadata: Metadata | None = None


class _VerifyingReader(HuggingFaceStorageReader):
    """Reads only the regions a rank needs, after checking the sha256 of each file it reads from."""

    def __init__(self, path: Path, expected: dict[str, StoredFile], record: ReadRecord):
        super().__init__(str(path))
        self.expected = expected
        self.record = record

    def read_metadata(self) -> Metadata:
        if self.record.metadata is None:
            try:
                self.record.metadata = super().read_metadata()
            except Exception as exc:  # a truncated or garbled header
                raise ShardReadError(f"the shard files under {self.path} cannot be read: {exc}") from exc
        return self.record.metadata

    def read_data(self, plan, planner) -> Future[None]:
        for file in sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}):
            self._check(Path(file))
        return super().read_data(plan, planner)

    def _check(self, file: Path) -> None:
        if file.name in self.record.checked:
            return
        expected = self.expected.get(file.name)
        if expected is None:
            raise ShardReadError(f"{file} is not listed in the checkpoint's meta.json")
        if file.stat().st_size != expected.bytes or sha256_file(file) != expected.sha256:
            raise ShardReadError(f"{file} is corrupt: its size or sha256 does not match the checkpoint's meta.json")
        self.record.checked.add(file.name)


def _use_process_group(group) -> dict:
    return {"process_group": group} if dist.is_initialized() else {"no_dist": True}


@contextlib.contextmanager
def _quiet_about_one_process():
    """DCP warns on every call without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*unavailable or uninitialized")
        yield


def save_pieces(path: Path, pieces: dict[str, torch.Tensor], placements: dict[str, Placement | Fragment],
                on_start: Callable[[], None] | None = None,
                on_finish: Callable[[list[StoredFile], dict[str, StoredTensor]], None] | None = None, group=None,
                asynchronous: bool = False, on_written: Callable[[], None] | None = None):
    """Collective over `group` (all ranks when distributed): every rank writes its pieces into `path`.
    On the coordinator (rank 0 of the group), `on_start()` runs before any rank writes and `on_finish(files, tensors)`
    after every file is written and synced. Returns a future when `asynchronous` (the pieces are copied before
    it returns, so training may change them meanwhile). `on_written()` runs on each rank once its files are written."""
    writer = _HashingWriter(path, on_start, on_finish, on_written)
    planner = _PieceSavePlanner(placements)
    with _quiet_about_one_process():
        try:
            if asynchronous:
                return dcp.async_save(pieces, storage_writer=writer, planner=planner, **_use_process_group(group))
            dcp.save(pieces, storage_writer=writer, planner=planner, **_use_process_group(group))
        except CheckpointException as exc:
            raise ShardWriteError(_failures(exc)) from None
    return None


def load_pieces(path: Path, pieces: dict[str, torch.Tensor], placements: dict[str, Placement | Fragment],
                expected: dict[str, StoredFile], group=None, record: ReadRecord | None = None) -> None:
    """Collective: fill each of this rank's `pieces` (tensors of this rank's shapes) from the checkpoint at `path`.
    A failure on any rank raises ShardReadError on every rank (DCP gathers the failures). `record`: what earlier
    reads of this checkpoint learnt (updated), so a second read neither hashes a file nor reads a header again."""
    reader = _VerifyingReader(path, expected, record or ReadRecord())
    _share_metadata(reader, group)
    planner = _PieceLoadPlanner(placements)
    with _quiet_about_one_process():
        try:
            dcp.load(pieces, storage_reader=reader, planner=planner, **_use_process_group(group))
        except CheckpointException as exc:  # a BaseException: turn it into an error the caller can handle
            raise ShardReadError(_failures(exc)) from None


def _share_metadata(reader: _VerifyingReader, group) -> None:
    """The tensors' shapes and where each piece lies come from the shard files' headers: the group's first rank
    reads them and sends the result to the others (else every rank reads every file's header, ranks x files reads
    at scale). A failure reaches every rank alike. Nothing to do when an earlier read of the group shared them."""
    if reader.record.metadata is not None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    box: list[Metadata | str | None] = [None]
    if dist.get_rank(group) == 0:
        try:
            box[0] = reader.read_metadata()
        except ShardReadError as exc:
            box[0] = str(exc)
    dist.broadcast_object_list(box, group_src=0, group=group)
    if isinstance(box[0], str):
        raise ShardReadError(box[0])
    reader.record.metadata = box[0]


def _failures(exc: CheckpointException) -> str:
    return "; ".join(f"rank {rank}: {error}" for rank, (error, _) in sorted(exc.failures.items()))
