"""Shared by the benchmarks: describe the machine, replace one named section of BENCHMARKS.md, launch workers."""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {device}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{datetime.date.today().isoformat()}"
    )


def current_rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def write_section(path: Path, name: str, title: str, machine: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n## {title}\n\nMachine: {machine}\n\n{body}\n{end}"
    header = "# Benchmarks\n\nWritten by the tools in `tools/`; rerun them to refresh.\n"
    text = path.read_text() if path.exists() else header
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def torchrun(module: str, nproc: int, args: list[str], one_thread: bool = True) -> None:
    """`python -m module args` under torchrun (standalone rendezvous) with `nproc` processes and this repository
    on the path; `one_thread`: one OpenMP thread per process (else the worker sets its own)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", module,
           *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run(cmd, check=True, env=env)


def micro_batch_for_dp(config: str, overrides: list[str], dp: int) -> int:
    """The config's micro-batch size, halved (divided by dp) only when the global batch does not split over dp
    ranks with it."""
    from pretrain.config import load_config

    base = load_config(config, [*overrides, "tracking.mlflow=false"])
    micro = base.train.micro_batch_size
    if base.train.global_batch_size % (micro * dp):
        micro = max(1, micro // dp)
    return micro
