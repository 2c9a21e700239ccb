"""The process grid: which ranks form each tensor/context/expert/data/pipeline-parallel group.

Rank order follows Megatron: tensor-parallel fastest, then context, then data, then pipeline:

    rank = tp_rank + TP * (cp_rank + CP * (dp_rank + DP * pp_rank))

Expert parallelism is carved out of the data-parallel dimension (as in Megatron and DeepSpeed-MoE): the DP
ranks of one (pp, cp, tp) position are split into groups of EP consecutive ranks (the expert-parallel
groups); ranks holding the same experts across those groups form the expert-data-parallel group.
`layout` is pure arithmetic (testable without processes); `ProcessGrid.build` creates the torch groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DIMENSIONS = ("tp", "cp", "dp", "pp")


class GridError(ValueError):
    """Parallel sizes that cannot form a grid over the given world."""


@dataclass(frozen=True)
class GridShape:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def check(self, world_size: int | None = None) -> None:
        for name in ("tp", "pp", "dp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise GridError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if world_size is not None and self.world_size != world_size:
            raise GridError(
                f"parallel sizes tp={self.tp} x cp={self.cp} x dp={self.dp} x pp={self.pp} = {self.world_size} "
                f"do not multiply to the world size {world_size}"
            )
        if self.dp % self.ep != 0:
            raise GridError(
                f"parallel.ep={self.ep} must divide the data-parallel size {self.dp} (experts are spread over DP ranks)"
            )


def layout(shape: GridShape) -> dict[str, list[list[int]]]:
    """All groups of every kind, each a sorted list of global ranks."""
    shape.check()
    ranks = np.arange(shape.world_size).reshape(shape.pp, shape.dp, shape.cp, shape.tp)
    groups: dict[str, list[list[int]]] = {
        "tp": [ranks[p, d, c, :].tolist() for p in range(shape.pp) for d in range(shape.dp) for c in range(shape.cp)],
        "cp": [ranks[p, d, :, t].tolist() for p in range(shape.pp) for d in range(shape.dp) for t in range(shape.tp)],
        "dp": [ranks[p, :, c, t].tolist() for p in range(shape.pp) for c in range(shape.cp) for t in range(shape.tp)],
        "pp": [ranks[:, d, c, t].tolist() for d in range(shape.dp) for c in range(shape.cp) for t in range(shape.tp)],
    }
    # Data and context ranks together see different tokens: gradients are reduced over both.
    groups["dp_cp"] = [
        ranks[p, :, :, t].flatten().tolist() for p in range(shape.pp) for t in range(shape.tp)
    ]
    # First and last pipeline stage of each pipeline sum the tied embedding / LM head grads (middle stages: alone).
    groups["embedding"] = [sorted({g[0], g[-1]}) for g in groups["pp"]] + [[r] for g in groups["pp"] for r in g[1:-1]]
    # Tensor x pipeline: the ranks that together hold one copy of the model.
    groups["model"] = [ranks[:, d, c, :].flatten().tolist() for d in range(shape.dp) for c in range(shape.cp)]
    split = ranks.reshape(shape.pp, shape.dp // shape.ep, shape.ep, shape.cp, shape.tp)
    groups["ep"] = [
        split[p, o, :, c, t].tolist()
        for p in range(shape.pp) for o in range(shape.dp // shape.ep) for c in range(shape.cp) for t in range(shape.tp)
    ]
    groups["expert_dp"] = [
        split[p, :, e, c, t].tolist()
        for p in range(shape.pp) for e in range(shape.ep) for c in range(shape.cp) for t in range(shape.tp)
    ]
    # ... and the ranks holding the same experts in every expert-parallel group and context-parallel position
    groups["expert_dp_cp"] = [
        split[p, :, e, :, t].flatten().tolist()
        for p in range(shape.pp) for e in range(shape.ep) for t in range(shape.tp)
    ]
    return {k: [sorted(g) for g in v] for k, v in groups.items()}


def own_groups(shape: GridShape, rank: int) -> dict[str, list[int]]:
    """The members of `rank`'s group of every kind."""
    return {kind: next(g for g in groups if rank in g) for kind, groups in layout(shape).items()}


def coordinates(shape: GridShape, rank: int) -> dict[str, int]:
    tp = rank % shape.tp
    cp = (rank // shape.tp) % shape.cp
    dp = (rank // (shape.tp * shape.cp)) % shape.dp
    pp = rank // (shape.tp * shape.cp * shape.dp)
    return {"tp": tp, "cp": cp, "dp": dp, "pp": pp, "ep": dp % shape.ep, "expert_dp": dp // shape.ep}


@dataclass
class ProcessGrid:
    """This rank's place in the grid and its torch process groups (None for size-1 dimensions in 1-rank runs)."""

    shape: GridShape
    rank: int
    coords: dict[str, int]
    groups: dict[str, object] = field(default_factory=dict)
    group_ranks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, shape: GridShape, world_size: int, rank: int, timeout_s: float | None = None) -> ProcessGrid:
        """Creates this rank's group of each kind, and only those: members create a group together
        (`use_local_synchronization`), so a rank makes at most one group per kind whatever the world size (at
        2,048 ranks, not the thousands of groups of every kind). Kinds with the same members share one group.
        Subgroups do not inherit the world group's timeout, so it is passed to each."""
        import datetime

        import torch.distributed as dist

        shape.check(world_size)
        grid = cls(shape=shape, rank=rank, coords=coordinates(shape, rank))
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        created: dict[tuple[int, ...], object] = {}
        for kind, members in own_groups(shape, rank).items():
            if world_size > 1 and tuple(members) not in created:
                created[tuple(members)] = dist.new_group(members, timeout=timeout, use_local_synchronization=True)
            grid.groups[kind] = created.get(tuple(members))
            grid.group_ranks[kind] = members
        return grid

    @classmethod
    def single(cls) -> ProcessGrid:
        shape = GridShape()
        kinds = ("tp", "cp", "dp", "pp", "dp_cp", "model", "ep", "expert_dp", "expert_dp_cp", "embedding")
        return cls(shape=shape, rank=0, coords=coordinates(shape, 0), group_ranks={k: [0] for k in kinds})

    def size(self, kind: str) -> int:
        return len(self.group_ranks[kind])

    def group(self, kind: str):
        return self.groups.get(kind)
