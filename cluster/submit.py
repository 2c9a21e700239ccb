"""`pretrain launch CONFIG|RECIPE --executor slurm|local`: a training run or a recipe as one job.

- `slurm`: submitted through submitit, one task per GPU (`--gpus-per-node`; on CPU `--tasks-per-node`), each task
  running `pretrain train` in-process (cluster/job.py); a recipe is one task that starts each phase's processes.
  The job is requeueable: on SLURM's warning signal (`--signal-lead` seconds before the time limit, or at a
  preemption) it saves and requeues itself; after a failure it restarts up to `--max-restarts` times.
- `local`: the same command on this machine through torchrun, restarted after a failure the same way.

Everything is checked before anything is submitted: the config (or every phase of a recipe), the layout against
nodes × tasks, the run folder and the options. `--dry-run` prints the resolved layout and the sbatch script that
submitit would submit, and submits nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cluster.signal_lead import SignalLead, signal_lead
from pretrain.config import ConfigError, load_config, validate_world_size

if TYPE_CHECKING:
    from cluster.job import JobSpec

MAX_TIMEOUT_REQUEUES = 100  # requeues after the time limit (submitit's countdown); preemptions are not counted
DEFAULT_TIME = "24:00:00"


@dataclass(frozen=True)
class Layout:
    nodes: int
    tasks_per_node: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


def parse_time(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) as whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise ConfigError("--time", f"'{text}' is not a SLURM time (minutes, H:M:S or D-H:M:S)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + first * 3600 + (second or 0) * 60 + (third or 0)
    elif third is not None:  # H:M:S
        seconds = first * 3600 + second * 60 + third
    else:  # M or M:S
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise ConfigError("--time", f"'{text}' must be positive")
    return -(-seconds // 60)


def resolve_layout(args: argparse.Namespace) -> Layout:
    if args.nodes < 1:
        raise ConfigError("--nodes", f"must be at least 1, got {args.nodes}")
    gpus = args.gpus_per_node or 0
    if gpus < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise ConfigError("--tasks-per-node" if gpus >= 0 else "--gpus-per-node", "must be positive")
    if gpus and args.tasks_per_node and args.tasks_per_node != gpus:
        raise ConfigError("--tasks-per-node", f"one task per GPU: {gpus} with --gpus-per-node {gpus}, got "
                          f"{args.tasks_per_node}")
    return Layout(args.nodes, gpus or args.tasks_per_node or 1, gpus)


def is_recipe(path: Path) -> bool:
    try:
        content = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError("CONFIG", f"{path} cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("CONFIG", f"{path} is not YAML: {str(exc).splitlines()[0]}") from None
    return isinstance(content, dict) and "phases" in content


def check_train(args: argparse.Namespace, layout: Layout) -> tuple[JobSpec, list[str]]:
    """The config with its overrides and the layout, then the run folder (as `pretrain train` checks them)."""
    from cluster.job import JobSpec
    from pretrain.cli import check_run_dir, default_run_dir

    cfg = load_config(args.config, args.overrides, check_paths=not args.dry_run)
    validate_world_size(cfg, layout.world)
    run_dir = Path(args.run_dir or default_run_dir(args.config)).resolve()
    if not args.dry_run:
        check_run_dir(run_dir)
        if any((run_dir / "checkpoints").glob("step_*")) and not args.resume:
            raise ConfigError("--run-dir", f"{run_dir} already holds checkpoints; pass --resume auto to continue "
                              "it, or a new --run-dir")
    p = cfg.parallel
    lines = [f"layout: {layout.nodes} node(s) x {layout.tasks_per_node} task(s) = {layout.world} process(es), the "
             f"config's tp={p.tp} cp={p.cp} dp={p.dp} pp={p.pp} (ep={p.ep}) = {p.world_size}: fits"]
    spec = JobSpec("train", str(Path(args.config).resolve()), str(run_dir), tuple(args.overrides), args.resume,
                   args.max_restarts)
    return spec, lines


def check_recipe(args: argparse.Namespace, layout: Layout) -> tuple[JobSpec, list[str]]:
    """Every phase's config and layout; the recipe runs as one task on one node, each phase's processes in it."""
    from cluster.job import JobSpec
    from pretrain.recipe import check_phases, load_recipe

    if args.overrides:
        raise ConfigError("overrides", "a recipe's phases carry their own overrides (in the recipe file)")
    if layout.nodes != 1 or (args.tasks_per_node or 1) != 1:
        raise ConfigError("--nodes", "a recipe runs on one node as one task (each phase starts its own processes)")
    path = Path(args.config)
    recipe = load_recipe(path)
    check_phases(recipe)
    lines = []
    for index, phase in enumerate(recipe.phases):
        follows = ["train.init_from=<previous phase>"] if index else []
        cfg = load_config(phase.config or None, [*phase.overrides, *follows], check_paths=False)
        try:
            validate_world_size(cfg, phase.nproc or 1)
        except ConfigError as exc:
            raise ConfigError(f"phases[{index}] ({phase.name}): {exc.key}", exc.message) from None
        if layout.gpus_per_node and (phase.nproc or 1) > layout.gpus_per_node:
            raise ConfigError("--gpus-per-node", f"phase {phase.name} runs {phase.nproc} processes, one per GPU")
        lines.append(f"phase {phase.name}: {phase.nproc or 1} process(es)")
    run_dir = Path(args.run_dir or recipe.run_dir or Path("runs") / path.stem).resolve()
    if not args.dry_run:
        from pretrain.cli import check_run_dir

        check_run_dir(run_dir)
    return JobSpec("recipe", str(path.resolve()), str(run_dir), (), None, args.max_restarts), lines


def slurm_parameters(args: argparse.Namespace, minutes: int, layout: Layout, spec: JobSpec, lead: SignalLead,
                     folder: Path, cpus_per_task: int) -> dict:
    """submitit's sbatch parameters (its own names, passed through to _make_sbatch_string unchanged)."""
    if lead.seconds >= minutes * 60:
        raise ConfigError("--signal-lead", f"{lead.seconds} s ({lead.reason}) is not shorter than --time "
                          f"{args.time or DEFAULT_TIME}")
    python = shlex.quote(sys.executable)
    params: dict = {
        "job_name": f"pretrain-{Path(spec.run_dir).name}",
        "time": minutes,
        "nodes": layout.nodes,
        "ntasks_per_node": layout.tasks_per_node,
        "signal_delay_s": lead.seconds,
        "additional_parameters": {"requeue": True},
        # srun's exit status is that of the failed attempt: restart it if allowed (cluster/restart.py)
        "teardown": ["status=$?", f'{python} -m cluster.restart {shlex.quote(str(folder))} "$SLURM_JOB_ID" "$status"'],
    }
    optional = {"gpus_per_node": layout.gpus_per_node, "partition": args.partition, "account": args.account,
                "qos": args.qos, "cpus_per_task": cpus_per_task if cpus_per_task > 1 else None}
    params.update({key: value for key, value in optional.items() if value})
    return params


def sbatch_script(folder: Path, params: dict) -> str:
    """The script submitit writes and submits for these parameters (SlurmExecutor._make_submission_file_text)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


def refuse_line_breaks(args: argparse.Namespace) -> None:
    """Values that go into the sbatch script are shell-quoted there (submitit), but a line break would end an
    `#SBATCH` comment line and leave the rest of the value as a command of the script: refused."""
    for option in ("config", "partition", "account", "qos", "time", "run_dir"):
        value = getattr(args, option, None)
        if value and any(char in value for char in "\n\r\0"):
            raise ConfigError(f"--{option.replace('_', '-')}" if option != "config" else "CONFIG",
                              f"{value!r} holds a line break or NUL, which cannot go into a batch script")


def cmd_launch(args: argparse.Namespace) -> int:
    from cluster.local_run import run_local

    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", f"must be 0 or more, got {args.max_restarts}")
    if args.signal_lead is not None and args.signal_lead < 1:
        raise ConfigError("--signal-lead", f"must be at least 1 second, got {args.signal_lead}")
    refuse_line_breaks(args)
    layout = resolve_layout(args)
    if args.executor == "local":
        slurm_only = [name for name, value in (("--partition", args.partition), ("--account", args.account),
                      ("--qos", args.qos), ("--time", args.time), ("--signal-lead", args.signal_lead)) if value]
        if layout.nodes > 1 or slurm_only:
            raise ConfigError(slurm_only[0] if slurm_only else "--nodes", "applies to --executor slurm only")
    minutes = parse_time(args.time or DEFAULT_TIME)
    if args.signal_lead is not None and args.signal_lead >= minutes * 60:
        raise ConfigError("--signal-lead", f"{args.signal_lead} s is not shorter than --time {args.time}")
    recipe = is_recipe(Path(args.config)) if Path(args.config).is_file() else False
    spec, lines = (check_recipe if recipe else check_train)(args, layout)
    if args.executor == "local":
        return run_local(spec, layout.world, lines, args.dry_run)
    from cluster.slurm_submit import submit

    lead = (SignalLead(args.signal_lead, "--signal-lead") if args.signal_lead is not None
            else signal_lead(Path(spec.run_dir)))
    folder = Path(spec.run_dir) / "slurm" / "%j"
    cpus = max(_phase_processes(spec), default=1)
    params = slurm_parameters(args, minutes, layout, spec, lead, folder, cpus)
    lines.append(f"signal lead: {lead.seconds} s before the time limit ({lead.reason}); after a failure: up to "
                 f"{spec.max_restarts} restart(s)")
    if args.dry_run:
        print("\n".join([*lines, "sbatch script (what submitit would submit):", sbatch_script(folder, params)]))
        return 0
    print("\n".join(lines), flush=True)
    return submit(spec, folder, params, MAX_TIMEOUT_REQUEUES, args.wait)


def _phase_processes(spec: JobSpec) -> list[int]:
    """A recipe's task needs a CPU per process of its largest phase."""
    if spec.command != "recipe":
        return []
    from pretrain.recipe import load_recipe

    return [phase.nproc or 1 for phase in load_recipe(Path(spec.config)).phases]


def add_launch_parser(sub) -> None:
    launch = sub.add_parser(
        "launch", help="run a config or a recipe as one job: on SLURM through submitit (requeued on preemption and "
        "at the time limit, restarted after a failure) or on this machine")
    launch.add_argument("config", help="a training config (e.g. configs/tiny.yaml) or a recipe (a YAML with phases)")
    launch.add_argument("--executor", choices=["slurm", "local"], default="slurm")
    launch.add_argument("--nodes", type=int, default=1)
    launch.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task (process) per GPU")
    launch.add_argument("--tasks-per-node", type=int, help="processes per node without GPUs (default 1)")
    launch.add_argument("--partition")
    launch.add_argument("--time", help=f"time limit, SLURM's format (minutes, H:M:S, D-H:M:S; default {DEFAULT_TIME})")
    launch.add_argument("--account")
    launch.add_argument("--qos")
    launch.add_argument("--signal-lead", type=int, metavar="S", help="seconds before the time limit that SLURM warns "
                        "the job (which then saves and requeues); default: derived from the checkpoint save time "
                        "measured in the run folder, else 120")
    launch.add_argument("--run-dir", help="output folder (default: runs/<config name>, a recipe's run_dir)")
    launch.add_argument("--resume", choices=["auto"], help="continue the run folder's newest checkpoint")
    launch.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="after a failed attempt (a rank crashed), restart from the newest checkpoint, up to K "
                        "times")
    launch.add_argument("--wait", action="store_true", help="slurm: wait for the job to end and report its outcome")
    launch.add_argument("--dry-run", action="store_true", help="check everything, print the layout and the sbatch "
                        "script, submit nothing")
    launch.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    launch.set_defaults(func=cmd_launch)
