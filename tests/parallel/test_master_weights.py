"""`train.param_dtype=bf16`: bf16 weights with fp32 master weights in the plain engine.

The bf16 copy of a master is exactly what bf16 autocast makes of an fp32 weight, and its bf16 gradient is added to
an fp32 gradient just as autocast's cast backward adds it: so training with bf16 weights must equal training with
fp32 weights under bf16 autocast *bit for bit* (losses, gradient norms, masters and AdamW moments) - any loss of
master precision, a missed refresh or a gradient accumulated in bf16 breaks that. Also: which parameters stay fp32,
bytes per parameter against the planner's formula, 100 steps against fp32 training, the checkpoint resumed by an
fp32-weights run, the same equality under TP+SP x DP (overlapped reduction, in bf16) and PP, config errors.
"""

import pytest
import torch

from parallel.master_weights import MasterWeights
from parallel.memory_plan import parameters_per_pipeline_rank, state_bytes
from pretrain.callbacks.metrics_log import read_metrics
from pretrain.config import ConfigError, load_config
from pretrain.optim import build_optimizer
from tests.parallel.cli_runs import checkpoint_tensors, train, train_metrics
from tests.parallel.test_moe_parallel import MOE, MTP

BF16 = ["train.precision=bf16"]
BF16_WEIGHTS = [*BF16, "train.param_dtype=bf16"]
SMALL_MOE = ["model.vocab_size=512", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.max_seq_len=64", "data.seq_len=64", "model.moe.expert_hidden=32", "model.mtp_depth=1",
             "model.tie_embeddings=false", "optim.fused=false"]


def _moe_model():
    cfg = load_config("configs/tiny_moe.yaml", SMALL_MOE, check_paths=False)
    torch.manual_seed(0)
    return cfg, cfg.model.build()


def _two_micro_batches(model) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 512, (2, 64), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, ids)
        (logits.float().logsumexp(-1).mean() + sum(model.last_mtp_losses)).backward()


def test_bf16_copies_compute_and_their_gradients_accumulate_in_fp32_masters_exactly():
    """The MoE + MTP model (untied head): matrices and experts computed in bf16; embeddings, routers and vectors
    kept fp32; two micro-batches' gradients in the masters equal those of the fp32 model under autocast, bit for
    bit, and no bf16 gradient outlives its backward."""
    _, reference = _moe_model()
    _two_micro_batches(reference)
    _, model = _moe_model()
    weights = MasterWeights(model)
    kept = sorted(name for name, p in model.named_parameters() if p.dtype == torch.float32)
    assert all(p.dtype == torch.bfloat16 for name, p in model.named_parameters() if name not in kept)
    assert all(name == "embed.weight" or ".router." in name or name.endswith("norm.weight") for name in kept), kept
    assert any(".router." in name for name in kept) and "lm_head.weight" not in kept
    assert any(".experts." in name for name, p in model.named_parameters() if p.dtype == torch.bfloat16)

    _two_micro_batches(model)
    assert all(p.grad is None for p in weights.copies.values())
    with weights.masters():
        masters = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in masters.values())
    for name, want in reference.named_parameters():
        assert torch.equal(masters[name].grad, want.grad), name


def test_overlapped_reduction_starts_when_the_bf16_gradients_reach_their_masters(tmp_path):
    """The overlapped average's buckets (of masters) start during the backward: the bf16 copies' hooks signal them
    (autograd never accumulates into a master, so its own hook would never fire)."""
    import torch.distributed as dist

    from parallel.data_parallel import OverlappedGradientAverager

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
        weights = MasterWeights(model)
        signal = weights.register_post_accumulate_grad_hook
        with weights.masters():
            averager = OverlappedGradientAverager([(list(model.parameters()), None, 1)], microbatches=1,
                                                  bucket_bytes=64, register_hook=signal)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.ones(2, 8)).float().sum().backward()
        assert averager.started == len(averager.buckets) == 2
        averager.finish()
    finally:
        dist.destroy_process_group()


def test_bytes_per_parameter_are_the_planners():
    """After an optimizer step, every tensor the step keeps (bf16 copies, fp32 masters and their gradients, AdamW
    moments) adds up to the planner's 2 + 4 + 4 + 8 bytes per copied parameter and 4 + 4 + 8 per kept one."""
    cfg, model = _moe_model()
    optimizer = build_optimizer(model, cfg.optim)
    weights = MasterWeights(model)
    _two_micro_batches(model)
    with weights.masters():
        optimizer.step()
    weights.refresh()
    storages: dict[int, int] = {}

    def held(t: torch.Tensor | None) -> None:
        if t is not None and t.dim() > 0:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():  # the bf16 copies and the kept fp32 parameters, as the model computes with them
        held(p)
        held(p.grad)
    for group in optimizer.param_groups:
        for p in group["params"]:
            held(p)
            held(p.grad)
            for value in optimizer.state[p].values():
                held(value)
    bf16_cfg = load_config("configs/tiny_moe.yaml", [*SMALL_MOE, *BF16_WEIGHTS], check_paths=False)
    assert sum(storages.values()) == sum(state_bytes(bf16_cfg, parameters_per_pipeline_rank(bf16_cfg)[0]))
    copied = weights.num_copied()
    total = sum(p.numel() for p in optimizer.param_groups[0]["params"] + optimizer.param_groups[1]["params"])
    assert sum(storages.values()) == 18 * copied + 16 * (total - copied)


def test_bf16_weights_train_exactly_like_fp32_weights_under_autocast(shared_run, parallel_data, tmp_path):
    """MoE + MTP, 4 micro-batches per step, 8 steps with a checkpoint at 4: curves and checkpoints (masters and
    moments) equal; the bf16-weights checkpoint of step 4 resumed with fp32 weights ends equal too (the same format)."""
    model = [*MOE, *MTP, "train.micro_batch_size=2"]
    ref_dir, _ = shared_run(*model, *BF16)
    run_dir, _ = shared_run(*model, *BF16_WEIGHTS)
    _assert_same_run(run_dir, ref_dir)
    resumed = tmp_path / "resumed"
    train(parallel_data, resumed, *model, *BF16, resume=run_dir / "checkpoints/step_00000004")
    _assert_same_run(resumed, ref_dir, steps=range(5, 9))


def _assert_same_run(run_dir, ref_dir, steps=range(1, 9)) -> None:
    """Losses and gradient norms of `steps` equal; the step-8 checkpoints' tensors equal, in the same dtypes."""
    got, want = train_metrics(run_dir), train_metrics(ref_dir)
    for step in steps:
        assert (got[step]["loss"], got[step]["grad_norm"]) == (want[step]["loss"], want[step]["grad_norm"]), step
    final = "checkpoints/step_00000008"
    for got_tensors, want_tensors in zip(checkpoint_tensors(run_dir / final), checkpoint_tensors(ref_dir / final),
                                         strict=True):
        assert got_tensors.keys() == want_tensors.keys()
        for key, want_tensor in want_tensors.items():
            assert got_tensors[key].dtype == want_tensor.dtype and torch.equal(got_tensors[key], want_tensor), key


def test_bf16_weights_track_fp32_training_over_100_steps(shared_run):
    """The tiny dense model, 100 steps: mean |loss difference| per step under 0.02 and the final validation loss
    within 1% of fp32 training's (measured: 0.008 and 0.17%)."""
    steps = ["train.steps=100", "train.eval_every=100", "train.checkpoint_every=100", "optim.warmup_steps=10",
             "train.eval_batches=4"]
    fp32_dir, fp32 = shared_run(*steps)
    bf16_dir, bf16 = shared_run(*steps, *BF16_WEIGHTS)
    assert sorted(bf16) == list(range(1, 101))
    assert sum(abs(bf16[s] - fp32[s]) for s in fp32) / 100 < 0.02
    val = {run: [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "val"] for run in (fp32_dir, bf16_dir)}
    assert abs(val[bf16_dir][-1]["val_loss"] / val[fp32_dir][-1]["val_loss"] - 1) < 0.01


LAYOUTS = {
    # the data-parallel sums in bf16, started during the backward
    "tp2 sp x dp2, bf16 reduce, overlap": (["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.dp=2",
                                            "parallel.grad_reduce_dtype=bf16", "parallel.overlap_grad_reduce=true"], 4),
    "pp2": (["parallel.pp=2"], 2),  # the pipeline schedule's backward passes, the tied embedding on both stages
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_weights_train_exactly_like_fp32_weights_on_other_layouts(shared_run, name):
    """The same equality on other layouts, each against fp32 weights under autocast on the same layout (against one
    process, bf16 matmuls split over ranks round differently: 1.2% in a grad norm, the same with fp32 weights)."""
    layout, nproc = LAYOUTS[name]
    micro = ["train.micro_batch_size=2"]
    ref_dir, _ = shared_run(*micro, *BF16, *layout, nproc=nproc)
    run_dir, _ = shared_run(*micro, *BF16_WEIGHTS, *layout, nproc=nproc)
    _assert_same_run(run_dir, ref_dir)


@pytest.mark.parametrize("overrides, key, message", [
    (["train.precision=fp32", "train.param_dtype=bf16"], "train.param_dtype", "need bf16 compute"),
    (["train.param_dtype=fp16"], "train.param_dtype", "must be fp32 or bf16"),
    (["train.precision=bf16", "train.param_dtype=bf16", "deepspeed.enabled=true"], "train.param_dtype",
     "already computes with bf16 weights"),
    (["parallel.grad_reduce_dtype=fp16"], "parallel.grad_reduce_dtype", "must be fp32 or bf16"),
])
def test_bad_settings_are_config_errors(overrides, key, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", overrides, check_paths=False)
    assert key in str(error.value) and message in str(error.value)


def test_bf16_weights_where_auto_picks_fp32_fail_before_training(tiny_overrides, tmp_path, monkeypatch):
    """train.precision=auto on a CPU without native bf16 (imitated with oneDNN's ISA cap) computes in fp32: bf16
    weights then fail with the reason, before any step."""
    from pretrain.trainer import Trainer

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    cfg = load_config(None, [*tiny_overrides, "train.precision=auto", "train.param_dtype=bf16"])
    with pytest.raises(ValueError, match="param_dtype=bf16 needs bf16 compute, but precision fp32"):
        Trainer(cfg, tmp_path)
