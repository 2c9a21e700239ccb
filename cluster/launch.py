"""Launching: `pretrain train … --nproc N` re-runs itself under torchrun, on this machine alone or as one node of a
multi-node job (`--nnodes`, `--node-rank`, `--master-addr`, `--master-port`: torchrun's static rendezvous, every
node started with the same command and its own `--node-rank`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

# The launch options that the re-run under torchrun must not see again (flag -> takes a value).
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass(frozen=True)
class Nodes:
    """Where this launcher sits in a multi-node job; one node: a standalone rendezvous on a free local port."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def problem(self) -> tuple[str, str] | None:
        """(option, what is wrong) for the first value that cannot work, else None."""
        if self.count < 1:
            return "--nnodes", f"must be at least 1, got {self.count}"
        if not 0 <= self.rank < self.count:
            return "--node-rank", f"must be in [0, {self.count}) with --nnodes {self.count}, got {self.rank}"
        if not 0 < self.master_port < 65536:
            return "--master-port", f"must be a TCP port, got {self.master_port}"
        return None


def torchrun_command(nproc: int, cli_args: list[str], nodes: Nodes = Nodes()) -> list[str]:
    if nodes.count == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={nodes.count}", f"--node-rank={nodes.rank}", f"--master-addr={nodes.master_addr}",
                      f"--master-port={nodes.master_port}"]
    return [sys.executable, "-m", "cluster.torchrun", *rendezvous, f"--nproc-per-node={nproc}",
            "-m", "pretrain.cli", *cli_args]


def launch(nproc: int, cli_args: list[str], nodes: Nodes = Nodes()) -> int:
    """Runs torchrun in its own session and hands it one stop request: Ctrl-C, SIGTERM, SIGUSR1 or SIGUSR2 here
    becomes one SIGTERM to torchrun, which passes it to the ranks (they save and exit; torchrun gives them 30 s before
    killing them). Without this, Ctrl-C would reach the ranks twice (from the terminal and from torchrun) and the
    second would abort them. A second Ctrl-C kills everything at once."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, cli_args, nodes), env=env, start_new_session=True)
    requests = []

    def forward(signum, frame):
        if requests and signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGKILL)
        elif not requests:
            proc.send_signal(signal.SIGTERM)
        requests.append(signum)

    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, forward) for sig in stop_signals}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def strip_launch_options(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in LAUNCH_OPTIONS)):
            out.append(arg)
    return out
