"""One markdown table from several `pretrain eval --out` reports: loss by position bucket, passkey accuracy (and,
where reported, how often the key was found and its tokens' mean log-probability) by length, a row per evaluated
model (e.g. before extension, and after it with each RoPE scaling).

    python -m tools.long_context_report base=runs/lc/base.json yarn=runs/lc/yarn.json [--out table.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def passkey_by_length(report: dict, field: str = "accuracy") -> dict[int, float]:
    cells = report["passkey"]["cells"]
    out: dict[int, list[float]] = {}
    for cell in cells:
        out.setdefault(cell["length"], []).append(cell.get(field, float("nan")))
    return {length: sum(values) / len(values) for length, values in out.items()}


def table(labelled: list[tuple[str, dict]]) -> list[str]:
    first = labelled[0][1]
    buckets = [(b["start"], b["end"]) for b in first.get("long_ppl", {}).get("buckets", [])]
    lengths = sorted(passkey_by_length(first)) if "passkey" in first else []
    graded = bool(lengths) and "key_logprob" in first["passkey"]["cells"][0]
    graded_lengths = lengths if graded else []
    header = ["model", "RoPE", *(f"loss {a}-{b}" for a, b in buckets), *(f"passkey {n}" for n in lengths),
              *(f"found {n}" for n in graded_lengths), *(f"key lp {n}" for n in graded_lengths)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in labelled:
        rope = report["rope_scaling"] + (f" x{report['rope_factor']:g}" if report["rope_scaling"] != "none" else "")
        row = [label, rope]
        if buckets:
            row += [f"{b['loss']:.3f}" for b in report["long_ppl"]["buckets"]]
        if lengths:
            by_length = passkey_by_length(report)
            row += [f"{by_length.get(n, float('nan')):.0%}" for n in lengths]
        if graded:
            found = passkey_by_length(report, "first_token_accuracy")
            row += [f"{found.get(n, float('nan')):.0%}" for n in lengths]
            logprob = passkey_by_length(report, "key_logprob")
            row += [f"{logprob.get(n, float('nan')):.2f}" for n in lengths]
        lines.append("| " + " | ".join(row) + " |")
    trials = first["passkey"]["cells"][0]["trials"] * len(first["passkey"]["depths"]) if lengths else 0
    notes = []
    if buckets:
        r = first["long_ppl"]
        notes.append(f"loss: mean next-token loss by position in {r['windows']} validation windows of {r['seq_len']} "
                     f"tokens of {r['data_dir']}")
    if lengths:
        notes.append(f"passkey: exact-match accuracy over {trials} prompts per length (depths "
                     f"{', '.join(f'{d:g}' for d in first['passkey']['depths'])})")
    if graded:
        notes.append("found: the first key token right (greedy), i.e. the key was found, whether or not copied on")
        notes.append("key lp: mean log-probability of the key's tokens given the prompt and the key's earlier tokens "
                     "(teacher-forced; 0 = certain, about -2.3 = a guess among 10 digits)")
    return lines + [""] + [f"{n}." for n in notes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="LABEL=REPORT.json")
    parser.add_argument("--out", help="write the table here too")
    args = parser.parse_args(argv)
    labelled = []
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"'{item}': write LABEL=REPORT.json")
        labelled.append((label, json.loads(Path(path).read_text())))
    text = "\n".join(table(labelled))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
