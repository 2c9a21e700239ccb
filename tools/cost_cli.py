"""`pretrain cost estimate …` and `pretrain cost report …` (registered by `pretrain/cli.py`'s build_parser)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_cost_estimate(args: argparse.Namespace) -> int:
    from pretrain.config import ConfigError
    from tools.cost_estimate import estimate, format_estimate, parse_tokens

    try:
        tokens = parse_tokens(args.tokens)
    except ValueError as exc:
        raise ConfigError("--tokens", str(exc)) from None
    result = estimate(args.config, tokens, args.gpu, args.gpus, args.mfu, args.precision, args.price_per_gpu_hour,
                      args.pue, args.grid_kgco2_per_kwh, args.seq_len)
    _emit(format_estimate(result, args.format) + "\n", args.out)
    return 0


def cmd_cost_report(args: argparse.Namespace) -> int:
    from tools.cost_report import build_report, format_report, plot_report

    report = build_report(Path(args.path), args.price_per_gpu_hour, args.mfu, args.pue, args.grid_kgco2_per_kwh,
                          args.tdp_watts)
    _emit(format_report(report, args.format), args.out)
    if args.plot:
        _writing("--plot", lambda: plot_report(report, Path(args.plot)))
        print(f"plot -> {args.plot}", file=sys.stderr if not args.out else sys.stdout)
    return 0


def _emit(text: str, out: str | None) -> None:
    if not out:
        sys.stdout.write(text)
        return

    def write() -> None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)

    _writing("--out", write)
    print(f"-> {out}")


def _writing(option: str, write) -> None:
    """A file that cannot be written is the user's to fix: one line naming the option, no traceback."""
    from pretrain.config import ConfigError

    try:
        write()
    except OSError as exc:
        raise ConfigError(option, f"cannot write {exc.filename or ''}: {exc.strerror or exc}") from None


def add_cost_parser(sub: argparse._SubParsersAction) -> None:
    from cluster.gpu_specs import known
    from tools.cost_estimate import DEFAULT_MFU, PRECISIONS

    cost = sub.add_parser("cost", help="GPU-hours, dollars and energy: estimate a training run, or report a run's "
                          "accounting ledger")
    cost_sub = cost.add_subparsers(dest="cost_command", required=True)

    def energy_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pue", type=float, help="data-centre power usage effectiveness, e.g. 1.1: adds an energy "
                       "line (GPU-hours x TDP x PUE)")
        p.add_argument("--grid-kgco2-per-kwh", type=float, metavar="G", help="grid carbon intensity, e.g. 0.4: adds "
                       "CO2 = energy x G (PUE 1.0 unless --pue)")
        p.add_argument("--price-per-gpu-hour", type=float, metavar="X", help="dollars per GPU-hour, e.g. 2.0")
        p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                       help=f"model FLOPs utilization the estimate assumes (default {DEFAULT_MFU})")
        p.add_argument("--out", metavar="FILE", help="write the output here instead of to stdout")

    est = cost_sub.add_parser("estimate", help="FLOPs, GPU-hours, wall-clock days and dollars of training CONFIG's "
                              "model on T tokens (6N + attention, see tools/cost_estimate.py)")
    est.add_argument("config", help="YAML config, e.g. configs/llama3_405b.yaml")
    est.add_argument("--tokens", required=True, help="training tokens, e.g. 15.6T, 2B, 500M")
    est.add_argument("--gpu", required=True, help=f"GPU type, one of {known()} (cluster/gpu_specs.py)")
    est.add_argument("--gpus", type=int, required=True, help="number of GPUs (sets the wall-clock time)")
    est.add_argument("--precision", choices=PRECISIONS, default="bf16", help="which dense peak MFU is measured "
                     "against (default bf16)")
    est.add_argument("--seq-len", type=int, default=0, help="sequence length (default: the config's data.seq_len)")
    est.add_argument("--format", choices=["md", "json"], default="md")
    energy_options(est)
    est.set_defaults(func=cmd_cost_estimate)

    rep = cost_sub.add_parser("report", help="per-phase GPU-hours, badput, tokens, MFU and cost of a run or recipe, "
                              "from its accounting.json ledger(s), with the estimate for comparison")
    rep.add_argument("path", metavar="RUN_DIR|RECIPE_DIR|LEDGER.json")
    rep.add_argument("--format", choices=["md", "csv", "json"], default="md")
    rep.add_argument("--plot", metavar="FILE.png", help="also save a stacked bar plot of the hours by category")
    rep.add_argument("--tdp-watts", type=float, help="power per accelerator for the energy line (default: the GPU "
                     "table's TDP; needed on CPU)")
    energy_options(rep)
    rep.set_defaults(func=cmd_cost_report)
