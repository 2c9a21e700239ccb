"""`pretrain cost report RUN_DIR|RECIPE_DIR|LEDGER.json`: what a run (or each phase of a recipe) cost, from its
accounting ledger (`cluster/accounting.py`): accelerator-hours split into productive (training steps), overhead
(startup, evaluation, checkpoint save and load, the end of the run) and badput (work lost to crashes, restarts),
tokens, achieved MFU and dollars per phase, a total, a stacked bar plot, and what the estimator
(`tools/cost_estimate.py`) would have predicted for the same tokens.

Estimate vs measured, per phase: the estimator's FLOPs for the phase's kept tokens, from its own config.yaml (the
ledger's FLOPs/token where there is none), at an assumed MFU (--mfu, the estimate's default) and the ledger's peak,
against the measured hours. Two MFUs say where the difference went: over every hour (the ledger's MFU; an
estimate at this MFU reproduces the measured hours by construction, so it is the one to plan the next run with)
and over the training steps' hours alone (what the step loop achieved; the gap between the two is overhead and
badput).
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.accounting import BADPUT, CATEGORIES, LEDGER_FILE, Ledger, read_ledger_folders
from cluster.gpu_specs import match_device
from tools.cost_estimate import DEFAULT_MFU, energy, gpu_hours, mfu_for_hours, quantity, training_flops

PRODUCTIVE = ("training",)
OVERHEAD = tuple(c for c in CATEGORIES if c not in PRODUCTIVE + BADPUT)
REPORT_MD, REPORT_PNG = "cost_report.md", "cost_report.png"
COLORS = {"training": "tab:green", "startup": "tab:gray", "evaluation": "tab:blue", "checkpoint_save": "tab:cyan",
          "checkpoint_load": "tab:purple", "other": "tab:olive", "badput_lost": "tab:red",
          "badput_restart": "tab:orange"}


@dataclass
class Phase:
    ledger: Ledger
    folder: Path  # where its config.yaml would be


def read_phases(path: Path) -> list[Phase]:
    """`read_ledgers`' ledgers (in its order), each with the folder it came from."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: give a run folder, a recipe folder or an {LEDGER_FILE}")
    return [Phase(ledger, folder) for folder, ledger in read_ledger_folders(path)]


def is_cpu(hardware: str) -> bool:
    return hardware.startswith("CPU")


def hours_unit(ledgers: list[Ledger]) -> str:
    """GPU-hours; on CPU an accelerator is a process (cluster/accounting.py): process-hours."""
    kinds = {is_cpu(a.hardware) for ledger in ledgers for a in ledger.attempts}
    return "process-hours" if kinds == {True} else "GPU-hours" if kinds <= {False} else "accelerator-hours"


def tdp_of(hardware: str, tdp_watts: float | None) -> float | None:
    if tdp_watts is not None:
        return tdp_watts
    gpu = None if is_cpu(hardware) else match_device(hardware)
    return None if gpu is None else gpu.tdp_watts


def _estimate(phase: Phase, mfu: float) -> tuple[dict[str, Any], str | None]:
    """The estimator's view of the phase's kept tokens (see the module docstring), and a note if the estimator
    and the ledger count its FLOPs differently."""
    from pretrain.config import ConfigError, load_config

    ledger = phase.ledger
    config = phase.folder / "config.yaml"
    per_token, source, note = ledger.flops_per_token, "ledger", None
    try:
        cfg = load_config(config, check_paths=False) if config.is_file() else None
    except ConfigError as exc:  # e.g. a run of an older version: the ledger's own count stands
        cfg, note = None, f"{ledger.phase}: {config} not read ({exc}); the estimate uses the ledger's FLOPs/token"
    if cfg is not None:
        per_token, source = training_flops(cfg.model, cfg.data.seq_len, ledger.tokens).per_token, "config.yaml"
        if ledger.flops_per_token and abs(per_token - ledger.flops_per_token) > 1e-3 * per_token:
            note = (f"{ledger.phase}: the ledger counts {ledger.flops_per_token:.4g} FLOPs/token, the estimator "
                    f"{per_token:.4g} from config.yaml" + (" (LoRA: no weight gradients for the frozen base)"
                                                           if cfg.lora.enabled else ""))
    hours = ledger.accelerator_hours()
    flops = ledger.tokens * ledger.flops_per_token
    known = ledger.tokens > 0 and ledger.peak_flops > 0 and per_token > 0
    estimate_hours = gpu_hours(ledger.tokens * per_token, ledger.peak_flops, mfu) if known else None
    training_hours = ledger.accelerator_hours(PRODUCTIVE)
    return {
        "estimate_flops_per_token": per_token or None, "estimate_flops_source": source if per_token else None,
        "estimate_mfu": mfu, "estimate_hours": estimate_hours,
        "measured_over_estimate": hours / estimate_hours if estimate_hours else None,
        "training_mfu": mfu_for_hours(flops, ledger.peak_flops, training_hours)
        if flops and ledger.peak_flops and training_hours else None,
    }, note


def phase_row(phase: Phase, price: float | None, mfu: float, power: tuple | None) -> tuple[dict[str, Any], str | None]:
    ledger = phase.ledger
    totals = ledger.totals()
    hours = totals["accelerator_hours"]
    row = {
        "phase": ledger.phase, "hardware": totals["hardware"], "unit": hours_unit([ledger]),
        "attempts": totals["attempts"], "accelerator_hours": hours,
        "productive_hours": ledger.accelerator_hours(PRODUCTIVE), "overhead_hours": ledger.accelerator_hours(OVERHEAD),
        "badput_hours": totals["badput_hours"], "badput_share": totals["badput_share"],
        **{f"{c}_hours": totals[f"{c}_hours"] for c in CATEGORIES},
        "tokens": ledger.tokens, "steps": ledger.steps, "steps_recomputed": totals["steps_recomputed"],
        "precision": ledger.precision, "peak_flops": ledger.peak_flops, "flops_per_token": ledger.flops_per_token,
        "mfu": totals["mfu"],
    }
    estimate, note = _estimate(phase, mfu)
    row.update(estimate)
    row["cost"] = None if price is None else hours * price
    row["energy_kwh"] = row["co2_tonnes"] = None
    if power is not None:
        tdp, pue, grid = power
        watts = [tdp_of(a.hardware, tdp) for a in ledger.attempts]
        if ledger.attempts and None not in watts:
            parts = [energy(a.accelerator_hours(), w, pue, grid) for a, w in zip(ledger.attempts, watts, strict=True)]
            row["energy_kwh"] = sum(p.kwh for p in parts)
            row["co2_tonnes"] = None if grid is None else sum(p.tonnes_co2 for p in parts)
    return row, note


def total_row(rows: list[dict[str, Any]], unit: str) -> dict[str, Any]:
    add = lambda key: sum(r[key] for r in rows)  # noqa: E731
    maybe = lambda key: add(key) if rows and all(r[key] is not None for r in rows) else None  # noqa: E731
    hours = add("accelerator_hours")
    total = {key: None for key in rows[0]} if rows else {}
    total.update({
        "phase": "total", "hardware": "", "unit": unit, "attempts": add("attempts"), "accelerator_hours": hours,
        **{key: add(key) for key in ("productive_hours", "overhead_hours", "badput_hours", "tokens", "steps",
                                     "steps_recomputed", *(f"{c}_hours" for c in CATEGORIES))},
        "badput_share": add("badput_hours") / hours if hours else 0.0,
        "cost": maybe("cost"), "energy_kwh": maybe("energy_kwh"), "co2_tonnes": maybe("co2_tonnes"),
    })
    return total


def build_report(path: Path | str, price_per_gpu_hour: float | None = None, mfu: float = DEFAULT_MFU,
                 pue: float | None = None, grid_kgco2_per_kwh: float | None = None,
                 tdp_watts: float | None = None) -> dict[str, Any]:
    """The report as data (what --format json prints). Raises ConfigError for bad inputs."""
    from pretrain.config import ConfigError
    from tools.cost_estimate import energy_option

    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise ConfigError("--price-per-gpu-hour", f"must not be negative, got {price_per_gpu_hour}")
    if not 0 < mfu <= 1:
        raise ConfigError("--mfu", f"a fraction of the peak in (0, 1], got {mfu}")
    if tdp_watts is not None and tdp_watts <= 0:
        raise ConfigError("--tdp-watts", f"must be positive, got {tdp_watts}")
    try:
        phases = read_phases(Path(path))
    except ValueError as exc:
        raise ConfigError("RUN_DIR", str(exc)) from None
    power = energy_option(tdp_watts, pue, grid_kgco2_per_kwh)  # tdp None: each attempt's GPU's from the table
    rows, notes = [], []
    for phase in phases:
        row, note = phase_row(phase, price_per_gpu_hour, mfu, power)
        rows.append(row)
        notes += [note] if note else []
        if power is not None and row["energy_kwh"] is None:
            notes.append(f"{row['phase']}: no energy figure: the hardware ({row['hardware']}) has no TDP in "
                         "cluster/gpu_specs.py; give --tdp-watts")
    unit = hours_unit([p.ledger for p in phases])
    return {
        "source": str(path), "unit": unit, "price_per_gpu_hour": price_per_gpu_hour, "assumed_mfu": mfu,
        "energy_parameters": None if power is None else {
            "tdp_watts": tdp_watts if tdp_watts is not None else "per GPU, cluster/gpu_specs.py",
            "pue": power[1], "grid_kgco2_per_kwh": power[2]},
        "phases": rows, "total": total_row(rows, unit), "notes": notes,
    }


# -- formats -------------------------------------------------------------------------------------------------------
def _money(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.2f}"


def _short_money(x: float) -> str:
    return f"${x / 1e6:,.4g}M" if x >= 1e6 else f"${x / 1e3:.4g}K" if x >= 1e4 else f"${x:,.2f}"


def _short_hours(h: float) -> str:
    return f"{h / 1e3:,.0f}K" if h >= 1e4 else quantity(h)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _mfu(x: float | None, precision: str = "") -> str:
    return "n/a" if x is None else (f"{x:.3f}" if x >= 0.01 else f"{x:.2g}") + (f" ({precision})" if precision else "")


def _tokens(n: int) -> str:
    from tools.cost_estimate import count

    return count(n) if n else "0"


def format_md(report: dict[str, Any]) -> str:
    unit, rows, total = report["unit"], report["phases"], report["total"]
    price = report["price_per_gpu_hour"]
    lines = [f"# Cost report: {report['source']}", "",
             f"| phase | hardware | attempts | {unit} | productive | overhead | badput | badput share | tokens | MFU "
             f"| cost |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['hardware']} | {r['attempts']} | {quantity(r['accelerator_hours'])} | "
                     f"{quantity(r['productive_hours'])} | {quantity(r['overhead_hours'])} | "
                     f"{quantity(r['badput_hours'])} | {_pct(r['badput_share'])} | {_tokens(r['tokens'])} | "
                     f"{_mfu(r['mfu'], r['precision'])} | {_money(r['cost'])} |")
    t = total
    lines.append(f"| **total** | | {t['attempts']} | **{quantity(t['accelerator_hours'])}** | "
                 f"{quantity(t['productive_hours'])} | {quantity(t['overhead_hours'])} | "
                 f"{quantity(t['badput_hours'])} | {_pct(t['badput_share'])} | {_tokens(t['tokens'])} | | "
                 f"**{_money(t['cost'])}** |")
    hours = t["accelerator_hours"]
    summary = f"Total: {_short_hours(hours)} {unit}" + (f" ({quantity(hours)})" if hours >= 1e4 else "")
    if price is not None:
        summary += f", {_short_money(t['cost'])} at ${price:,.2f} per {unit.removesuffix('s')}"
    lines += ["", summary + "."]
    if unit != "GPU-hours":
        lines.append("On CPU an accelerator is a process: its hours are process-hours (the hardware column says "
                     "which).")
    lines += ["", "Productive: training steps; overhead: startup, evaluation, checkpoint save and load, the end of the "
              "run; badput: work a crash threw away and the startup of every restart (cluster/accounting.py). MFU: "
              "the kept tokens' FLOPs over every accelerator-second at the ledger's peak in its precision."]
    if report["energy_parameters"] is not None:
        e = report["energy_parameters"]
        lines += ["", "### Energy", ""]
        for r in [*rows, t]:
            if r["energy_kwh"] is None:
                lines.append(f"- {r['phase']}: n/a")
                continue
            co2 = "" if r["co2_tonnes"] is None else f", {quantity(r['co2_tonnes'])} t CO2"
            lines.append(f"- {r['phase']}: {quantity(r['energy_kwh'])} kWh{co2}")
        grid, tdp = e["grid_kgco2_per_kwh"], e["tdp_watts"]
        tdp = f"{tdp:g} W" if isinstance(tdp, int | float) else "each GPU's, from cluster/gpu_specs.py"
        lines.append(f"\nEnergy = {unit} x TDP ({tdp}) x PUE {e['pue']:g}"
                     + ("" if grid is None else f"; CO2 = energy x {grid:g} kg CO2/kWh")
                     + ": the accelerators at their rated board power, the rest of the site through the PUE.")
    lines += ["", "### Hours by category", "", "| phase | " + " | ".join(CATEGORIES) + " |",
              "|---|" + "---:|" * len(CATEGORIES)]
    for r in [*rows, t]:
        lines.append(f"| {r['phase']} | " + " | ".join(quantity(r[f'{c}_hours']) for c in CATEGORIES) + " |")
    lines += ["", "### Estimate vs measured", "",
              f"| phase | FLOPs/token (from) | estimate at MFU {report['assumed_mfu']:.2f} | measured | measured / "
              "estimate | MFU, all hours | MFU, training steps |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fpt, source, estimate, ratio = (r[k] for k in ("estimate_flops_per_token", "estimate_flops_source",
                                                       "estimate_hours", "measured_over_estimate"))
        lines.append(f"| {r['phase']} | {'n/a' if fpt is None else f'{fpt:.4g} ({source})'} | "
                     f"{'n/a' if estimate is None else quantity(estimate)} | {quantity(r['accelerator_hours'])} | "
                     f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {_mfu(r['mfu'])} | {_mfu(r['training_mfu'])} |")
    lines += ["", "The estimate is `pretrain cost estimate` for the phase's kept tokens on its hardware's peak. At the "
              "'all hours' MFU it reproduces the measured hours exactly: plan the next run with that one. The "
              "training-steps MFU is what the step loop achieved; the gap between the two is overhead and badput."]
    if report["notes"]:
        lines += ["", *(f"Note: {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def format_csv(report: dict[str, Any]) -> str:
    rows = [*report["phases"], report["total"]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return out.getvalue()


def format_report(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=1) + "\n"
    return format_csv(report) if fmt == "csv" else format_md(report)


def plot_report(report: dict[str, Any], out: Path):
    """A stacked bar per phase (its hours by category, the categories with any hours), saved as a PNG; returns
    the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = report["phases"]
    labels = [f"{r['phase']}\n{textwrap.fill(r['hardware'], 28)}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(rows) + 3.5), 4.5))
    bottom = [0.0] * len(rows)
    for category in CATEGORIES:
        heights = [r[f"{category}_hours"] for r in rows]
        if not any(heights):
            continue
        ax.bar(range(len(rows)), heights, bottom=bottom, label=category.replace("_", " "), color=COLORS[category])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for i, r in enumerate(rows):
        cost = "" if r["cost"] is None else f"\n{_short_money(r['cost'])}"
        ax.annotate(f"{_short_hours(r['accelerator_hours'])}{cost}", (i, bottom[i]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel(report["unit"])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
    ax.set_ylim(0, max(bottom + [0.0]) * 1.18 or 1.0)
    total = report["total"]
    ax.set_title(f"{Path(report['source']).name}: {_short_hours(total['accelerator_hours'])} {report['unit']}"
                 + ("" if total["cost"] is None else f", {_short_money(total['cost'])}"), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def write_cost_report(folder: Path | str, price_per_gpu_hour: float | None = None,
                      mfu: float = DEFAULT_MFU, plot: bool = True) -> tuple[Path, Path | None]:
    """Drop cost_report.md and (`plot`) cost_report.png into a run or recipe folder (at the end of training or of
    a recipe); returns their paths. Raises ConfigError if the folder holds no ledger."""
    folder = Path(folder)
    report = build_report(folder, price_per_gpu_hour, mfu)
    md, png = folder / REPORT_MD, folder / REPORT_PNG
    md.write_text(format_md(report))
    if plot:
        plot_report(report, png)
    return md, png if plot else None
