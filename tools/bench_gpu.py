"""GPU checks and benchmarks on one CUDA device (never part of CI; run where a GPU is):

    python -m tools.bench_gpu [--json results.json] [--out BENCHMARKS.md] [--quick]

1. Ceilings, measured in the same run: a bf16 8192³ matmul (TFLOP/s) and a device-to-device copy (GB/s, bytes
   read + written). MFU below is against the measured matmul rate, not the datasheet.
2. Correctness on the GPU: a small dense+MoE+MTP model in fp32 (TF32 off) on CUDA against the same model and
   batch on the CPU: loss and every gradient, relative error; then the same in bf16 autocast on CUDA against the
   CPU fp32 reference (the error bf16 training lives with).
3. Training-step throughput of our Transformer (forward + backward + fused AdamW, bf16 autocast): tokens/s, MFU,
   peak memory, for two dense shapes and two MoE shapes: eager, torch.compile (dense), and for the 1B dense and
   the MoE model the optimizations one at a time: bf16 weights with fp32 masters, selective recomputation.
4. The MoE layer (grouped GEMMs) against a dense SwiGLU of the same active parameters on the same tokens: tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from parallel.master_weights import MasterWeights
from pretrain.model import ModelConfig, Transformer, lm_loss
from pretrain.model.config import MLAConfig
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.model.moe import MoE, MoEConfig, SwiGLU
from tools.bench_report import machine_description, write_section

DEVICE = "cuda"  # --smoke-cpu runs every section on the CPU at toy sizes, to check the script before a GPU run


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _time(fn, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` on the device (synchronized around each call)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(n: int = 8192) -> dict:
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    matmul = _time(lambda: a @ b, 3, 10)
    src = torch.randn(n * n // 4, device=DEVICE)  # 64 MiB per 1024² of n²: 1 GiB at 8192
    dst = torch.empty_like(src)
    copy = _time(lambda: dst.copy_(src), 3, 10)
    return {"matmul_tflops": 2 * n**3 / matmul / 1e12, "copy_gbps": 2 * src.numel() * 4 / copy / 1e9}


def _small_config(**extra) -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=64, num_shared_experts=1, first_k_dense=1,
                                     score_func="sigmoid", aux_loss_weight=1e-3),
                       mtp_depth=1, **extra)


def _loss_and_grads(model: Transformer, ids, labels, autocast: bool):
    model.zero_grad()
    ctx = torch.autocast(DEVICE, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logits = model(ids, labels)
    loss = lm_loss(logits, labels)[0]
    loss.backward()
    return loss.detach().double().cpu(), {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}


def correctness() -> dict:
    torch.manual_seed(0)
    cpu = _small_config().build().train()
    gpu = _small_config().build().train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(DEVICE)
    ids = torch.randint(0, 512, (4, 128))
    labels = torch.randint(0, 512, (4, 128))
    ref_loss, ref_grads = _loss_and_grads(cpu, ids, labels, False)

    def compare(loss, grads) -> dict:
        errors = {n: (grads[n] - g).norm().item() / max(g.norm().item(), 1e-30) for n, g in ref_grads.items()}
        worst = max(errors, key=errors.get)
        flat = torch.cat([g.flatten() for g in grads.values()])
        ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
        return {"loss_rel": abs(loss - ref_loss).item() / ref_loss.item(), "worst_grad_rel": errors[worst],
                "worst_grad": worst, "all_grads_rel": ((flat - ref_flat).norm() / ref_flat.norm()).item()}

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fp32 = compare(*_loss_and_grads(gpu, ids.to(DEVICE), labels.to(DEVICE), False))
    bf16 = compare(*_loss_and_grads(gpu, ids.to(DEVICE), labels.to(DEVICE), True))
    return {"fp32": fp32, "bf16": bf16}


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """One training-step variant (the before/after of an optimization): `pretrain train`'s options of that name."""
    compiled: bool = False  # train.compile (here the whole model)
    param_dtype: str = "fp32"  # train.param_dtype: bf16 copies of the weights, AdamW on fp32 masters
    recompute: str = "none"  # train.activation_checkpointing

    def describe(self) -> str:
        parts = [*(["compiled"] if self.compiled else []),
                 *(["bf16 weights"] if self.param_dtype == "bf16" else []),
                 *([f"{self.recompute} recompute"] if self.recompute != "none" else [])]
        return ", ".join(parts) or "eager"


def train_throughput(name: str, cfg: ModelConfig, batch: int, seq: int, peak_tflops: float, options: StepOptions,
                     steps: int) -> dict:
    torch.manual_seed(0)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = cfg.build().to(DEVICE).train()
    model.recompute = options.recompute
    step_model = torch.compile(model) if options.compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # on the fp32 masters
    masters = MasterWeights(model) if options.param_dtype == "bf16" else None
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=DEVICE)
    labels = torch.randint(0, cfg.vocab_size, (batch, seq), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = step_model(ids, labels)
        lm_loss(logits, labels)[0].backward()
        with masters.masters() if masters else contextlib.nullcontext():
            opt.step()
            opt.zero_grad(set_to_none=True)
        if masters:
            masters.refresh()

    seconds = _time(step, 3, steps)
    tokens = batch * seq
    achieved = flops_per_token(cfg, seq) * tokens / seconds / 1e12
    result = {"name": name, "options": options.describe(), "params_m": count_parameters(cfg) / 1e6,
              "active_m": count_parameters(cfg, active=True) / 1e6, "batch": batch, "seq": seq,
              "tokens_per_s": tokens / seconds, "tflops": achieved, "mfu": achieved / peak_tflops,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0}
    return result


def _moe_layer_and_pass(d: int, experts: int, top_k: int, hidden: int, shared: int, tokens: int):
    """An MoE layer on the device, and a function running one forward + backward (bf16 autocast) of a layer on
    the same tokens, gradients written afresh as a training step does."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, num_shared_experts=shared,
                    score_func="sigmoid")
    moe = MoE(d, hidden, cfg).to(DEVICE)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(1, tokens, d, device=DEVICE, requires_grad=True)

    def run(layer):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = layer(x)
        out.float().sum().backward()

    return moe, run


def moe_layer_vs_dense(d: int, experts: int, top_k: int, hidden: int, shared: int, tokens: int) -> dict:
    moe, run = _moe_layer_and_pass(d, experts, top_k, hidden, shared, tokens)
    dense = SwiGLU(d, (top_k + shared) * hidden).to(DEVICE)
    t_moe = _time(lambda: run(moe), 3, 20)
    t_dense = _time(lambda: run(dense), 3, 20)
    return {"d_model": d, "experts": experts, "top_k": top_k, "expert_hidden": hidden, "shared": shared,
            "tokens": tokens, "moe_tokens_per_s": tokens / t_moe, "dense_tokens_per_s": tokens / t_dense,
            "ratio": t_dense / t_moe}


def _guarded(results: dict, key: str, fn) -> None:
    try:
        results[key] = fn()
    except Exception as exc:  # one failing section must not cost the others (device time is scarce)
        results[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(key, json.dumps(results[key], indent=1), flush=True)


def profile_moe_layer(d: int, experts: int, top_k: int, hidden: int, shared: int, tokens: int) -> str:
    """The MoE layer's forward + backward under torch.profiler: its kernels by total device time."""
    moe, run_layer = _moe_layer_and_pass(d, experts, top_k, hidden, shared, tokens)

    def run():
        run_layer(moe)

    _time(run, 3, 1)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(5):
            run()
        _sync()
    key = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)


def run_all(quick: bool, smoke: bool = False, moe_only: bool = False) -> dict:
    results: dict = {"machine": machine_description(), "torch": torch.__version__}
    _guarded(results, "ceilings", lambda: ceilings(512 if smoke else 8192))
    peak = results["ceilings"].get("matmul_tflops", 989.0)
    if not moe_only:
        _guarded(results, "correctness", correctness)
    steps = 5 if quick else 20
    dense_small = ModelConfig(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, max_seq_len=1024)
    dense_1b = ModelConfig(vocab_size=32768, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, max_seq_len=2048)
    moe_cfg = ModelConfig(vocab_size=32768, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=4, max_seq_len=2048,
                          moe=MoEConfig(num_experts=64, top_k=6, expert_hidden=512, num_shared_experts=2,
                                        first_k_dense=1, score_func="sigmoid", bias_update_rate=1e-3),
                          mtp_depth=1)
    mla_cfg = dataclasses.replace(moe_cfg, attention="mla", mla=MLAConfig(q_lora_rank=384, kv_lora_rank=256,
                                                                          qk_nope_head_dim=64, qk_rope_head_dim=32,
                                                                          v_head_dim=64))
    eager, bf16_weights, selective = StepOptions(), StepOptions(param_dtype="bf16"), StepOptions(recompute="selective")
    runs = [("dense 125M-class", dense_small, 16, 1024, eager),
            ("dense 125M-class", dense_small, 16, 1024, StepOptions(compiled=True)),
            *(("dense 1B-class", dense_1b, 8, 2048, o) for o in (eager, bf16_weights, selective)),
            *(("MoE 64x top-6 + MTP", moe_cfg, 8, 2048, o) for o in (eager, bf16_weights, selective)),
            ("MLA + MoE 64x top-6 + MTP", mla_cfg, 8, 2048, eager)]
    if smoke:  # toy sizes: the same code paths, minutes less
        shrink = dict(vocab_size=512, d_model=64, n_layers=2, max_seq_len=64)
        runs = [(name, ModelConfig(**{**cfg.__dict__, **shrink, "n_heads": 4, "n_kv_heads": 2}), 2, 64, options)
                for name, cfg, _, _, options in runs if not name.startswith("dense 1B")]
    if moe_only:
        runs = [r for r in runs if "MoE" in r[0]]
    results["throughput"] = []
    for name, cfg, batch, seq, options in runs:
        _guarded(results, "_last", lambda: train_throughput(name, cfg, batch, seq, peak, options, steps))  # noqa: B023
        results["throughput"].append(results.pop("_last"))
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["moe_layer"] = []
    shapes = [(2048, 64, 8, 1024, 1, 16384), (4096, 128, 8, 1408, 2, 16384)]
    for shape in [(64, 8, 2, 32, 1, 256)] if smoke else shapes:
        _guarded(results, "_last", lambda: moe_layer_vs_dense(*shape))  # noqa: B023
        results["moe_layer"].append(results.pop("_last"))
    if moe_only:
        shape = (64, 8, 2, 32, 1, 256) if smoke else shapes[0]
        _guarded(results, "moe_profile", lambda: profile_moe_layer(*shape))
        print(results["moe_profile"])
    return results


def _error_row(record: dict, columns: int) -> str:
    """A table row for a section that failed on the device: its error in the first column."""
    return f"| error: {record['error'][:120]} |" + " |" * (columns - 1)


def markdown(results: dict) -> str:
    c = results.get("ceilings", {})
    lines = [f"Measured ceilings: bf16 matmul {c.get('matmul_tflops', float('nan')):.0f} TFLOP/s, "
             f"device copy {c.get('copy_gbps', float('nan')):.0f} GB/s (read + write). MFU is against the measured "
             "matmul rate.", ""]
    corr = results.get("correctness", {})
    if "fp32" in corr:
        lines += ["GPU vs CPU, small dense+MoE+MTP model, same weights and batch (relative error):", "",
                  "| GPU precision | loss | all gradients | worst parameter's gradient |", "|---|---|---|---|"]
        for key in ("fp32", "bf16"):
            r = corr[key]
            lines.append(f"| {key} | {r['loss_rel']:.1e} | {r['all_grads_rel']:.1e} | {r['worst_grad_rel']:.1e} "
                         f"({r['worst_grad']}) |")
        lines.append("")
    lines += ["Training step (forward + backward + fused AdamW, bf16 autocast, random tokens):", "",
              "| model | params (active) | batch x seq | options | tokens/s | TFLOP/s | MFU | peak memory |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("throughput", []):
        if "error" in r:
            lines.append(_error_row(r, 8))
            continue
        options = r.get("options") or ("compiled" if r["compiled"] else "eager")  # a results file from before them
        lines.append(f"| {r['name']} | {r['params_m']:.0f}M ({r['active_m']:.0f}M) | {r['batch']} x {r['seq']} | "
                     f"{options} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                     f"{r['mfu']:.1%} | {r['peak_mem_gib']:.1f} GiB |")
    lines += ["", "MoE layer (router, grouped GEMMs, combine) vs a dense SwiGLU of the same active parameters, "
              "forward + backward, bf16:", "",
              "| d_model | experts (top-k, shared) | expert hidden | tokens | MoE tokens/s | dense tokens/s | ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in results.get("moe_layer", []):
        if "error" in r:
            lines.append(_error_row(r, 7))
            continue
        lines.append(f"| {r['d_model']} | {r['experts']} ({r['top_k']}, {r['shared']}) | {r['expert_hidden']} | "
                     f"{r['tokens']:,} | {r['moe_tokens_per_s']:,.0f} | {r['dense_tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f} |")
    if results.get("training_runs"):
        lines += ["", "`pretrain train` end to end on this GPU (300 steps, bf16; data: `pretrain data prepare --source "
                  "shakespeare` with the tiny tokenizer, so the losses are not comparable to the CPU runs' corpus):",
                  "", "| config | parameters | tokens/s | MFU (datasheet peak) | wall | final train loss | val loss |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["training_runs"]:
            lines.append(f"| {r['config']} | {r['num_parameters'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | "
                         f"{r['mfu']:.1%} | {r['wall_seconds']:.0f} s | {r['final_train_loss']:.3f} | "
                         f"{r['val_loss']:.3f} |")
    if results.get("notes"):
        lines += ["", results["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--from-json", help="only render a results file into --out (no GPU needed)")
    parser.add_argument("--out", help="write a section of this markdown file (BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--smoke-cpu", action="store_true", help="every section on the CPU at toy sizes")
    parser.add_argument("--moe-only", action="store_true", help="the MoE sections, with a profile of the layer")
    parser.add_argument("--add-run", action="append", default=[], metavar="CONFIG=SUMMARY",
                        help="add a `pretrain train` run's summary.json (with --from-json)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.smoke_cpu:
        DEVICE = "cpu"
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for item in args.add_run:
            config, summary = item.split("=", 1)
            runs = [r for r in results.get("training_runs", []) if r["config"] != config]
            results["training_runs"] = [*runs, {"config": config, **json.loads(Path(summary).read_text())}]
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    else:
        if DEVICE == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench_gpu needs a CUDA device (or --smoke-cpu)")
        results = run_all(args.quick, smoke=args.smoke_cpu, moe_only=args.moe_only)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(markdown(results))
    if args.out:
        write_section(Path(args.out), "bench_gpu", "GPU: correctness against the CPU, step throughput and MFU, "
                      "MoE layer (tools/bench_gpu.py)", results["machine"], markdown(results))


if __name__ == "__main__":
    main()
