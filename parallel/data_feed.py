"""Which ranks read training data from disk, and how the others get it.

Tensor-parallel peers train on the same micro-batches: only the group's first rank reads them, and broadcasts
them to its peers on the training device (as Megatron does), so a TP=8 node reads its data once, not eight times.
Pipeline stages in the middle use neither token ids nor labels (only their shape), so they read nothing, unless
documents are masked apart (every stage's attention needs the document ids). Every
rank still advances its loader by the same count, so loader state stays identical across peers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataFeed:
    reads: bool  # this rank reads its micro-batches from disk
    needed: bool  # this rank's model chunks consume token ids or labels
    peers: object | None = None  # the tensor-parallel group the reader broadcasts to (None: no one to share with)

    @classmethod
    def for_rank(cls, grid, pipeline=None, every_stage: bool = False) -> DataFeed:
        """`every_stage`: middle pipeline stages need the batches too (document masking: their document ids)."""
        needed = pipeline is None or every_stage or pipeline.has_first_stage or pipeline.has_last_stage
        shared = needed and grid.size("tp") > 1
        return cls(reads=needed and grid.coords["tp"] == 0, needed=needed, peers=grid.group("tp") if shared else None)

    def deliver(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The micro-batch on `device`: the reader's own, its peers' received (collectives on the training
        device, which NCCL requires)."""
        on_device = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        if self.peers is not None:  # the window ids stay with the reader (data accounting is the readers')
            shared = [t for name, t in on_device.items() if name != "window_ids"]
            pending = [dist.broadcast(t, group=self.peers, group_src=0, async_op=True) for t in shared]
            for work in pending:
                work.wait()
        return on_device
