"""torchrun (torch.distributed.run, its own launcher and rendezvous), with a failed job reported as one line per
failed rank instead of torchrun's traceback: the rank that failed first (a rank killed by a signal is named with
it), then the others. Its command line is torchrun's."""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

CAUSES = {"SIGKILL": "killed (out of memory, or from outside the job)", "SIGSEGV": "crashed (segmentation fault)",
          "SIGTERM": "stopped by the launcher once another rank had failed", "SIGABRT": "aborted"}


def describe(rank: int, failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        name = failure.signal_name()
        return f"rank {rank} (pid {failure.pid}) ended by {name}: {CAUSES.get(name, 'a signal')}"
    return f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode} (its error is printed above)"


def failure_report(exc: ChildFailedError) -> str:
    first, _ = exc.get_first_failure()
    ranks = [first] + sorted(rank for rank in exc.failures if rank != first)
    lines = [describe(rank, exc.failures[rank]) for rank in ranks]
    return "error: the job failed: " + lines[0] + "".join(f"\n  then {line}" for line in lines[1:])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as exc:
        print(failure_report(exc), file=sys.stderr, flush=True)
        return 1
    except SignalException as exc:  # a stop request passed on to the ranks, which saved and exited
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # A scheduler's warning (SLURM's --signal reaches every process of a job step) is for the ranks, which get it
    # themselves; torchrun's stop comes as SIGTERM from the launcher. Left at their default it would kill torchrun.
    for warning in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(warning, signal.SIG_IGN)
    sys.exit(main())
