"""Gradient averaging over the data-parallel group, in flat buckets (one all-reduce per bucket)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def buckets(tensors: Iterable[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors, each group at most `bucket_bytes` (or one oversize tensor)."""
    out: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and (size + nbytes > bucket_bytes or t.dtype != current[0].dtype):
            out.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        out.append(current)
    return out


def average_gradients(params: Iterable[torch.nn.Parameter], group, bucket_bytes: int = 25 * 2**20,
                      divide_by: int | None = None, reduce_dtype: torch.dtype | None = None) -> None:
    """Sum the grads over `group` and divide by its size (or by `divide_by`); `reduce_dtype`: the sums are
    taken in it (bf16: half the traffic of fp32 gradients), the grads keep theirs."""
    world = dist.get_world_size(group) if group is not None else 1
    divisor = divide_by or world
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1:
        if divisor != 1 and grads:
            torch._foreach_div_(grads, divisor)
        return
    for bucket in buckets(grads, bucket_bytes):
        flat, _ = _start_average(bucket, group, divisor, async_op=False, reduce_dtype=reduce_dtype)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
            g.copy_(synced)


def _start_average(grads: list[torch.Tensor], group, divisor: int, async_op: bool,
                   reduce_dtype: torch.dtype | None = None):
    """(the grads flattened, divided and being summed over `group` in `reduce_dtype` if given, the all-reduce's
    work handle if async)."""
    flat = _flatten_dense_tensors(grads).div_(divisor)
    if reduce_dtype is not None:
        flat = flat.to(reduce_dtype)
    return flat, dist.all_reduce(flat, group=group, async_op=async_op)


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    group: object
    divisor: int
    waiting: int = 0  # parameters whose gradient has not received the step's last micro-batch yet
    flat: torch.Tensor | None = None
    work: dist.Work | None = None


class OverlappedGradientAverager:
    """`average_gradients` started during the backward, as torch DDP's reducer does: a bucket's all-reduce begins
    once every gradient in it holds all of the step's micro-batches (a hook counts each parameter's accumulations),
    so communication runs while the backward computes the earlier layers' gradients.

    Buckets start strictly in their order (the reverse of the parameters', the order gradients become ready), so
    every rank issues the same collectives in the same order even when a parameter gets no gradient on some rank
    (an expert no token reached): that bucket and the later ones then start in `finish()`, which also waits for
    all of them and writes the averages back into `.grad`. The sums are the same as `average_gradients`'s."""

    def __init__(self, groups: list[tuple[list[torch.nn.Parameter], object, int]], microbatches: int,
                 bucket_bytes: int = 25 * 2**20, reduce_dtype: torch.dtype | None = None,
                 register_hook: Callable[[torch.nn.Parameter, Callable], None] | None = None):
        """`groups`: (parameters, process group, divisor) for each set averaged alike (dense, experts);
        `register_hook(param, hook)`: calls `hook(param)` once a backward's gradient has reached `param` (default:
        autograd's post-accumulate-grad hook; bf16 weights signal their fp32 masters' gradients)."""
        self.microbatches, self.reduce_dtype = microbatches, reduce_dtype
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[torch.nn.Parameter, _Bucket] = {}
        for params, group, divisor in groups:
            trainable = [p for p in reversed(params) if p.requires_grad]
            for members in buckets(trainable, bucket_bytes):
                bucket = _Bucket(members, group, divisor)
                self.buckets.append(bucket)
                self.bucket_of.update((p, bucket) for p in members)
        self.counts: dict[torch.nn.Parameter, int] = {}
        self.started = 0  # buckets whose all-reduce has begun, in order
        for p in self.bucket_of:
            if register_hook is None:
                p.register_post_accumulate_grad_hook(self._accumulated)
            else:
                register_hook(p, self._accumulated)
        self._reset()

    def _reset(self) -> None:
        self.counts = dict.fromkeys(self.bucket_of, 0)
        for bucket in self.buckets:
            bucket.waiting, bucket.flat, bucket.work = len(bucket.params), None, None
        self.started = 0

    def _accumulated(self, param: torch.nn.Parameter) -> None:
        self.counts[param] += 1
        if self.counts[param] > self.microbatches:
            raise RuntimeError(
                f"a parameter received {self.counts[param]} gradients in a step of {self.microbatches} micro-batches "
                "(more than one backward per micro-batch): set parallel.overlap_grad_reduce=false for this objective")
        if self.counts[param] == self.microbatches:
            self.bucket_of[param].waiting -= 1
            while self.started < len(self.buckets) and self.buckets[self.started].waiting == 0:
                self._start(self.buckets[self.started])

    def _start(self, bucket: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params]
        bucket.flat, bucket.work = _start_average(grads, bucket.group, bucket.divisor, async_op=True,
                                                  reduce_dtype=self.reduce_dtype)
        self.started += 1

    def finish(self) -> None:
        """Start the buckets that have not started (in order), wait for all, write the averages back; ready for the
        next step."""
        while self.started < len(self.buckets):
            self._start(self.buckets[self.started])
        for bucket in self.buckets:
            bucket.work.wait()
            synced = _unflatten_dense_tensors(bucket.flat, bucket.params)
            for p, value in zip(bucket.params, synced, strict=True):
                if p.grad is not None:
                    p.grad.copy_(value)
                elif value.any():  # another rank's gradient: this replica takes the same average
                    p.grad = value.to(p.dtype)
        self._reset()
