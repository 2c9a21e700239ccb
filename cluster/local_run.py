"""`pretrain launch --executor local`: the job on this machine, without a scheduler — `pretrain train --nproc N`
(torchrun) or `pretrain recipe` — restarted from the newest checkpoint after a failure up to `--max-restarts` times.
A stop (Ctrl-C, SIGTERM) saves and ends it with exit code 75, as `pretrain train` does; nothing requeues it here."""

from __future__ import annotations

from dataclasses import replace

from cluster.job import JobSpec
from pretrain.stop import EXIT_RESUMABLE

NOT_A_CRASH = (0, EXIT_RESUMABLE, 2)  # done, stopped on request, a config error (the same again would fail)


def command(spec: JobSpec, world: int) -> list[str]:
    return spec.argv() + (["--nproc", str(world)] if spec.command == "train" else [])


def run_once(argv: list[str]) -> int:
    from pretrain.cli import main

    try:
        return main(argv)
    except SystemExit as exc:  # a recipe passes a stopped phase's 75 on this way
        return exc.code if isinstance(exc.code, int) else 1


def run_local(spec: JobSpec, world: int, lines: list[str], dry_run: bool) -> int:
    print("\n".join([*lines, f"runs here: pretrain {' '.join(command(spec, world))}"]), flush=True)
    if dry_run:
        return 0
    attempt = spec
    while True:
        code = run_once(command(attempt, world))
        if code in NOT_A_CRASH:
            return code
        if attempt.restarts >= attempt.max_restarts:
            print(f"error: the job failed (exit code {code}) after {attempt.restarts} restart(s), --max-restarts "
                  f"{attempt.max_restarts}; --resume auto continues from the newest checkpoint in {spec.run_dir}",
                  flush=True)
            return 1
        attempt = replace(attempt, resume="auto", restarts=attempt.restarts + 1)
        print(f"launch: the attempt failed (exit code {code}); restart {attempt.restarts} of --max-restarts "
              f"{attempt.max_restarts} from the newest checkpoint in {spec.run_dir}", flush=True)
