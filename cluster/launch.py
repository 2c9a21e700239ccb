"""Local multi-process launch: `pretrain train … --nproc N` re-runs itself under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """Standalone rendezvous on a free local port, so parallel jobs on one machine never clash."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "pretrain.cli", *cli_args]


def launch_local(nproc: int, cli_args: list[str]) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_command(nproc, cli_args), env=env)


def strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
