"""Drive a rank's pipeline stages with a torch.distributed.pipelining schedule (1F1B, interleaved 1F1B, GPipe).

One training step pushes the step's micro-batches through the pipeline; the schedule accumulates gradients
over them, each micro-batch's loss divided by their number before its backward as in the single-process loop's
`loss / accum` (not the schedule's scaling of the gradients after the last backward: a gradient is then complete
as soon as its last backward ends, which the overlapped data-parallel reduction relies on).
Per-micro-batch losses exist on the last stage only; `train_step` returns their mean on every rank.
Evaluation is a plain forward pass stage by stage (blocking send/recv), which needs no schedule and works for
any number of batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from parallel.pipeline.stages import StageModule
from pretrain.model.documents import Documents
from pretrain.model.moe import moe_statistics_paused

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe, "interleaved_1f1b": ScheduleInterleaved1F1B}


class PipelineRunner:
    def __init__(self, stages: list[StageModule], stage_ids: list[int], num_stages: int, pp_group, pp_ranks: list[int],
                 schedule: str, n_microbatches: int, activation_shape: Callable[[int], tuple[int, ...]]):
        self.stages = stages
        self.stage_ids = stage_ids
        self.num_stages = num_stages
        self.pp_group = pp_group
        self.pp_ranks = pp_ranks  # global rank of each pipeline rank
        self.schedule_name = schedule
        self.n_microbatches = n_microbatches
        self.activation_shape = activation_shape  # micro-batch size -> shape of what flows between stages
        self._micro_documents: list[Documents] | None = None  # this step's, per micro-batch (document masking)
        self._schedule = None
        self._loss_fn: Callable | None = None

    @property
    def pp(self) -> int:
        return len(self.pp_ranks)

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    def owner(self, stage_id: int) -> int:
        return self.pp_ranks[stage_id % self.pp]

    def _build(self, device: torch.device) -> None:
        pipeline_stages = [
            PipelineStage(module, stage_id, self.num_stages, device, group=self.pp_group)
            for module, stage_id in zip(self.stages, self.stage_ids, strict=True)
        ]
        for stage, module in zip(pipeline_stages, self.stages, strict=True):
            _pause_statistics_during_metadata_inference(stage, module)
            _documents_per_chunk(stage, module, self)
        cls = SCHEDULES[self.schedule_name]
        loss = lambda output, target: self._loss_fn(output, target)  # noqa: E731 (set per step)
        if self.schedule_name == "interleaved_1f1b":
            self._schedule = cls(pipeline_stages, self.n_microbatches, loss_fn=loss, scale_grads=False)
        else:
            (stage,) = pipeline_stages
            self._schedule = cls(stage, self.n_microbatches, loss_fn=loss, scale_grads=False)

    def _set_autocast(self, autocast) -> None:
        for stage in self.stages:
            stage.autocast = autocast

    def current_documents(self) -> Documents | None:
        """The documents of the micro-batch the last stage ran last (its loss runs right after its forward)."""
        return self.stages[-1].documents if self.has_last_stage else None

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_fn, autocast,
                   n_extra: int = 0, documents: Documents | None = None) -> torch.Tensor:
        """`input_ids`/`labels` (and `documents`, with document masking): the step's micro-batches concatenated
        along dim 0. `loss_fn(output, labels)` returns (loss, parts); `parts["extra"]` (n_extra values, e.g. MTP
        losses) is averaged too, and `parts["reported_loss"]` (if given) is what is reported instead of the loss
        that is backpropagated. Returns [mean loss, mean plain CE, *mean extras] over the micro-batches, on every
        rank."""
        if self._schedule is None:
            self._build(input_ids.device)
        self._set_autocast(autocast)
        self._micro_documents = documents.split(self.n_microbatches) if documents is not None else None
        reported: list[torch.Tensor] = []
        ces: list[torch.Tensor] = []
        extras: list[torch.Tensor] = []

        def scalar_loss(output, target):
            loss, parts = loss_fn(output, target)
            reported.append(parts.get("reported_loss", loss).detach().float())
            ces.append(parts["ce"])
            if n_extra:
                extras.append(parts["extra"].float())
            return loss / self.n_microbatches

        self._loss_fn = scalar_loss
        losses: list[torch.Tensor] = []
        args = (input_ids,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        self._schedule.step(*args, target=target, losses=losses if self.has_last_stage else None,
                            return_outputs=False)
        result = torch.zeros(2 + n_extra, device=input_ids.device)
        if self.has_last_stage:
            # the first step also calls the loss once on placeholder outputs (metadata inference): keep the last m
            m = self.n_microbatches
            result = torch.stack([torch.stack(reported[-m:]).mean(), torch.stack(ces[-m:]).mean().float()])
            if n_extra:
                result = torch.cat([result, torch.stack(extras[-m:]).mean(0)])
        dist.broadcast(result, src=self.owner(self.num_stages - 1), group=self.pp_group)
        return result

    @torch.no_grad()
    def evaluate_batch(self, input_ids: torch.Tensor, labels: torch.Tensor, loss_fn, autocast,
                       documents: Documents | None = None) -> torch.Tensor:
        """Plain CE of one batch, on every rank (forward only, stage after stage)."""
        self._set_autocast(autocast)
        for stage in self.stages:
            stage.documents = documents
        h = input_ids
        for stage_id in range(self.num_stages):
            owner = self.owner(stage_id)
            mine = stage_id in self.stage_ids
            if stage_id > 0 and mine and self.owner(stage_id - 1) != owner:
                h = torch.empty(self.activation_shape(input_ids.shape[0]), device=input_ids.device)
                dist.recv(h, src=self.owner(stage_id - 1), group=self.pp_group)
            if mine:
                h = self.stages[self.stage_ids.index(stage_id)](h)
                if stage_id + 1 < self.num_stages and self.owner(stage_id + 1) != owner:
                    dist.send(h.float().contiguous(), dst=self.owner(stage_id + 1), group=self.pp_group)
        ce = torch.zeros((), device=input_ids.device)
        if self.has_last_stage:
            _, parts = loss_fn(h, labels)
            ce = parts["ce"].float()
        dist.broadcast(ce, src=self.owner(self.num_stages - 1), group=self.pp_group)
        return ce


def _documents_per_chunk(stage: PipelineStage, module: StageModule, runner: PipelineRunner) -> None:
    """Before the schedule runs micro-batch i on this stage (in whatever order it runs them), the stage gets
    micro-batch i's documents; the shape inference before the first step gets the first one's."""
    run_chunk = stage.forward_one_chunk

    def forward_one_chunk(fwd_chunk_id, *args, **kwargs):
        chunks = runner._micro_documents
        module.documents = None if chunks is None else chunks[fwd_chunk_id]
        return run_chunk(fwd_chunk_id, *args, **kwargs)

    stage.forward_one_chunk = forward_one_chunk
    inference = getattr(stage, "_forward_metadata_inference", None)
    if inference is not None:
        def first_documents(*args, **kwargs):
            chunks = runner._micro_documents
            module.documents = None if chunks is None else chunks[0]
            return inference(*args, **kwargs)

        stage._forward_metadata_inference = first_documents


def _pause_statistics_during_metadata_inference(stage: PipelineStage, module: StageModule) -> None:
    """The first schedule step runs each stage (and the last stage's loss) once on example inputs (uninitialized
    on later stages) to learn the shapes it sends; that pass must not count as training (MoE load statistics,
    also of the MTP modules that run in the loss)."""
    for name in ("_forward_metadata_inference", "_prepare_backward_infra"):
        inference = getattr(stage, name, None)
        if inference is None:
            continue

        def paused(*args, _inference=inference, **kwargs):
            with moe_statistics_paused(module._model):
                return _inference(*args, **kwargs)

        setattr(stage, name, paused)
