"""Data-loader workers and the signals a scheduler sends to every process of a job (SLURM signals the whole job
step): a worker ignores the warning signals and a SIGTERM from anyone but its training process, which can still end
it (the loader's and multiprocessing's shutdown)."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.loader import shielded_batches


class Numbers(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.01)
        return torch.tensor(index)


def batches():
    return shielded_batches(Numbers(), batch_size=4, num_workers=1, prefetch_factor=2)


def test_a_worker_survives_the_schedulers_signals_and_still_ends_with_the_loader():
    loader = batches()
    assert next(loader).tolist() == [0, 1, 2, 3]
    worker = loader._workers[0]
    for sig in ("TERM", "USR2", "USR1", "INT"):  # sent by another process, as slurmstepd does
        subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    assert [b.tolist()[0] for b in loader] == list(range(4, 64, 4))  # every batch still arrives
    del loader
    worker.join(timeout=10)
    assert worker.exitcode is not None  # ended by the loader's shutdown


def test_a_sigterm_from_the_training_process_still_ends_the_worker():
    loader = batches()
    next(loader)
    worker = loader._workers[0]
    worker.terminate()  # SIGTERM from its parent, as multiprocessing's and the loader's shutdown send it
    worker.join(timeout=10)
    assert worker.exitcode is not None
    loader._shutdown_workers()


def test_a_process_started_by_spawn_keeps_its_workers_shielded_and_still_exits_without_closing_them(tmp_path):
    """A training process started by `mp.spawn` (spawn is then its default start method too) still forks its
    workers, so they ignore another process's SIGTERM; and when it exits without shutting its loaders down,
    multiprocessing's exit SIGTERMs the workers and waits for them: they end (a worker that swallowed that
    signal hung its training process forever)."""
    script = tmp_path / "leave_loaders_open.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, subprocess, sys, time
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from tests.data.test_loader_signals import batches
        OPEN = []
        if __name__ == "__main__":
            multiprocessing.set_start_method("spawn")
            for _ in range(2):
                loader = batches()
                next(loader)
                OPEN.append((loader, OPEN))  # a cycle: alive until the interpreter's exit
            worker = loader._workers[0]
            subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
            time.sleep(0.5)
            print("alive" if worker.is_alive() else "killed", flush=True)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive"
