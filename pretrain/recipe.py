"""`pretrain recipe CONFIG`: a model's lifecycle as a list of phases (pretraining, context extension, SFT, DPO),
each a `pretrain train` run of its own config in RUN_DIR/<phase>, started from the previous phase's final checkpoint.

Each phase runs as its own process (or `--nproc` processes), so any layout works per phase. Done phases (a summary
with all their steps) are skipped, an interrupted one resumes from its newest checkpoint (`--resume auto`), so
running the same command again continues a half-done recipe where it stopped. The data a phase needs is prepared
first when missing; after a phase, `pretrain eval` runs the tasks it lists. With MLflow on, the recipe is one parent
run and each phase a child run in one experiment. At the end: a table per phase (RUN_DIR/results.md and .json).
A stop signal (Ctrl-C, SIGTERM, a scheduler's warning) at any time ends the recipe with exit code 75 once the
running phase has saved (`Steps`), and the same command continues it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.callbacks.mlflow_tracking import PARENT_RUN_ENV
from pretrain.config import ConfigError, load_config
from pretrain.fault_injection import signal_point
from pretrain.stop import EXIT_RESUMABLE, StopSignalHandler


@dataclass
class PhaseSpec:
    name: str = ""
    config: str = ""  # relative to the recipe file
    overrides: list[str] = field(default_factory=list)
    nproc: int = 0  # 0: one process
    # `pretrain data prepare` argument lists for the data this phase reads, each run when its --out folder lacks
    # a manifest
    prepare: list[list[str]] = field(default_factory=list)
    # `pretrain eval` on the phase's final checkpoint: its tasks and further arguments
    eval_tasks: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)


@dataclass
class RecipeSpec:
    name: str = "recipe"  # the MLflow experiment of every phase
    run_dir: str = ""  # default: runs/<recipe file name>
    mlflow: bool = True
    phases: list[PhaseSpec] = field(default_factory=list)


def load_recipe(path: Path) -> RecipeSpec:
    if not path.is_file():
        raise ConfigError("<recipe>", f"recipe file {path} does not exist")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RecipeSpec), OmegaConf.load(path))
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<recipe>"
        raise ConfigError(key, f"{str(exc).splitlines()[0]} ({path})") from None
    if not recipe.phases:
        raise ConfigError("phases", f"{path} lists no phase")
    names = [phase.name for phase in recipe.phases]
    for index, phase in enumerate(recipe.phases):
        if not phase.name or not phase.name.replace("_", "").isalnum():
            raise ConfigError(f"phases[{index}].name", f"'{phase.name}' must be a word (letters, digits, _)")
        if names.count(phase.name) > 1:
            raise ConfigError(f"phases[{index}].name", f"'{phase.name}' names two phases")
        phase.config = str((path.parent / phase.config).resolve()) if phase.config else ""
    return recipe


def check_phases(recipe: RecipeSpec) -> None:
    """Every phase's config, with its overrides, validates before any phase starts (data folders may not exist
    yet: they are prepared on the way)."""
    for index, phase in enumerate(recipe.phases):
        follows = ["train.init_from=<previous phase>"] if index else []
        try:
            load_config(phase.config or None, [*phase.overrides, *follows], check_paths=False)
        except ConfigError as exc:
            raise ConfigError(f"phases[{index}] ({phase.name}): {exc.key}", exc.message) from None


def newest_checkpoint(phase_dir: Path) -> Path | None:
    from pretrain.checkpoint import CheckpointManager

    manager = CheckpointManager(phase_dir / "checkpoints")
    valid = [path for path in manager.checkpoints() if (path / "meta.json").is_file()]
    return valid[-1] if valid else None


def merged_if_adapters(checkpoint: Path, phase_dir: Path, steps: Steps, name: str) -> Path:
    """A LoRA phase's checkpoint holds adapters only: the next phase (and the evaluation) starts from the merged
    weights, written once to PHASE_DIR/merged/step_N."""
    from pretrain.checkpoint import read_meta
    from pretrain.lora_checkpoint import is_adapter_checkpoint

    if not is_adapter_checkpoint(read_meta(checkpoint)):
        return checkpoint
    merged = phase_dir / "merged" / checkpoint.name
    if not (merged / "meta.json").is_file():
        merged.parent.mkdir(parents=True, exist_ok=True)
        steps.run(_cli("checkpoint", "merge", str(checkpoint), str(merged)), f"{name}: merge the LoRA adapters")
    return merged


def phase_done(phase_dir: Path) -> dict[str, Any] | None:
    """The phase's summary when it ran all its steps."""
    summary_file, config_file = phase_dir / "summary.json", phase_dir / "config.yaml"
    if not summary_file.is_file() or not config_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    steps = OmegaConf.load(config_file).train.steps
    return summary if summary.get("steps") == steps and not summary.get("stopped") else None


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.cli", *args]


class Steps(StopSignalHandler):
    """Runs the recipe's steps (a phase's training, a data preparation, an evaluation, a merge) one process at a
    time, and stops the recipe on a signal without losing anything.

    SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 to the recipe, to its process alone (`kill PID`) or to its process group
    (Ctrl-C, a scheduler): the running step is sent one SIGTERM (not for SIGINT, which a terminal sends the whole group
    anyway: a second signal that is SIGINT would abort a phase instead of letting it save), so a phase finishes its
    step, saves a checkpoint and exits 75; the recipe then exits 75 instead of going on to the next step, and the same
    command continues it. A signal between steps stops the recipe before the next one."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.requested: str | None = None
        self.child: subprocess.Popen | None = None

    def _handle(self, signum, frame) -> None:
        first = self.requested is None
        self.requested = self.requested or signal.Signals(signum).name
        running = self.child is not None and self.child.poll() is None
        if running and signum != signal.SIGINT:
            self.child.send_signal(signal.SIGTERM)
        if first:
            print(f"recipe: {self.requested} received: "
                  + ("the running step stops (a phase saves a checkpoint), then " if running else "")
                  + "the recipe stops; the same command continues it", flush=True)

    def stop_if_requested(self) -> None:
        if self.requested is not None:
            print(f"recipe: stopped by {self.requested}; run the same command again to continue (exit code "
                  f"{EXIT_RESUMABLE})", flush=True)
            raise SystemExit(EXIT_RESUMABLE)

    def run(self, command: list[str], what: str) -> None:
        self.stop_if_requested()
        print(f"recipe: {what}: {' '.join(command[2:])}", flush=True)
        self.child = subprocess.Popen(command, env=self.env)
        if self.requested is not None:  # arrived while the step was being started: it has not seen it
            self.child.send_signal(signal.SIGTERM)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        self.stop_if_requested()  # whatever the step's exit code: it was stopped, or finished just before
        if code:
            if code == EXIT_RESUMABLE:
                raise SystemExit(EXIT_RESUMABLE)  # stopped on request, checkpoint saved: the same command continues
            raise RuntimeError(f"recipe: {what} failed (exit code {code}); run the same command again to continue "
                               "from where it stopped")


def prepare_data(phase: PhaseSpec, steps: Steps) -> None:
    for arguments in phase.prepare:
        out = Path(arguments[arguments.index("--out") + 1]) if "--out" in arguments else None
        if out is not None and any((out / name).is_file() for name in
                                   ("manifest.json", "chat_manifest.json", "preference_manifest.json")):
            continue
        steps.run(_cli("data", "prepare", *arguments), f"{phase.name}: prepare data")


class RecipeTracking:
    """The recipe's parent MLflow run (its id kept in RUN_DIR, so a resumed recipe keeps it)."""

    def __init__(self, recipe: RecipeSpec, run_dir: Path):
        from mlflow.tracking import MlflowClient

        from pretrain.callbacks.mlflow_tracking import local_artifact_location, resolve_tracking_uri

        uri = resolve_tracking_uri("", run_dir / "phase")  # the store the phases' runs use: RUN_DIR/mlflow.db
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_dir / "mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            return
        experiment = self.client.get_experiment_by_name(recipe.name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            recipe.name, artifact_location=local_artifact_location(uri))
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"run_dir": str(run_dir.resolve())}).info.run_id
        id_file.write_text(self.run_id)

    def finish(self, results: list[dict[str, Any]], files: list[Path]) -> None:
        for row in results:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "steps":
                    self.client.log_metric(self.run_id, f"{row['phase']}/{key}", float(value))
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FINISHED")


def run_recipe(path: Path, run_dir: Path | None = None) -> list[dict[str, Any]]:
    recipe = load_recipe(path)
    check_phases(recipe)
    run_dir = Path(run_dir or recipe.run_dir or Path("runs") / path.stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    tracking = RecipeTracking(recipe, run_dir) if recipe.mlflow else None
    if tracking is not None:
        env[PARENT_RUN_ENV] = tracking.run_id
    with Steps(env) as steps:
        results = _run_phases(recipe, run_dir, steps)
    table = run_dir / "results.md"
    table.write_text("\n".join(format_results(results)) + "\n")
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    from tools.cost_report import write_cost_report

    cost_files = write_cost_report(run_dir)  # every phase's ledger: one table and plot
    print(f"recipe: cost report {cost_files[0]}", flush=True)
    if tracking is not None:
        tracking.finish(results, [table, *cost_files])
    return results


def _run_phases(recipe: RecipeSpec, run_dir: Path, steps: Steps) -> list[dict[str, Any]]:
    """Each phase not done yet: its data, its training, its evaluation; then its row of the results."""
    previous: Path | None = None
    results = []
    for phase in recipe.phases:
        phase_dir = run_dir / phase.name
        started = time.perf_counter()
        if phase_done(phase_dir) is None:
            prepare_data(phase, steps)
            command = _cli("train", phase.config, "--run-dir", str(phase_dir), "--resume", "auto")
            if previous is not None:
                command += ["--init-from", str(previous)]
            if phase.nproc:
                command += ["--nproc", str(phase.nproc)]
            tracking_options = [f"tracking.experiment={recipe.name}", f"tracking.run_name={phase.name}"]
            if not recipe.mlflow:
                tracking_options.append("tracking.mlflow=false")
            steps.run(command + [*phase.overrides, *tracking_options], f"phase {phase.name}")
        else:
            print(f"recipe: phase {phase.name} already done ({phase_dir})", flush=True)
        previous = newest_checkpoint(phase_dir)
        if previous is None:
            raise RuntimeError(f"recipe: phase {phase.name} left no checkpoint in {phase_dir / 'checkpoints'}")
        previous = merged_if_adapters(previous, phase_dir, steps, phase.name)
        evaluation = phase_dir / "eval.json"
        if phase.eval_tasks and not evaluation.is_file():
            steps.run(_cli("eval", str(previous), "--tasks", ",".join(phase.eval_tasks), "--out", str(evaluation),
                           *([] if recipe.mlflow else ["--no-mlflow"]), *phase.eval_args), f"{phase.name}: evaluate")
        results.append(phase_result(phase.name, phase_dir, evaluation, time.perf_counter() - started))
        signal_point("between phases")
    return results


def phase_result(name: str, phase_dir: Path, evaluation: Path, seconds: float) -> dict[str, Any]:
    summary = json.loads((phase_dir / "summary.json").read_text())
    row: dict[str, Any] = {"phase": name, "steps": summary["steps"], "train_seconds": summary["wall_seconds"],
                           "train_loss": summary.get("final_train_loss"), "val_loss": summary.get("val_loss")}
    validation = summary.get("validation") or {}
    if "val_reward_accuracy" in validation:
        row["reward_accuracy"] = validation["val_reward_accuracy"]
        row["reward_margin"] = validation["val_reward_margin"]
    if evaluation.is_file():
        report = json.loads(evaluation.read_text())
        if "long_ppl" in report:
            row["long_loss"] = report["long_ppl"]["loss"]
        if "passkey" in report:
            row["passkey_accuracy"] = report["passkey"]["accuracy"]
        if "sft" in report:
            row["answer_exact_match"] = report["sft"]["exact_match"]
            row["answer_f1"] = report["sft"]["f1"]
    return row


def format_results(results: list[dict[str, Any]]) -> list[str]:
    def show(value: Any) -> str:
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| phase | steps | train time | train loss | val loss | other |", "|---|---:|---:|---:|---:|---|"]
    for row in results:
        minutes, seconds = divmod(round(row["train_seconds"]), 60)
        other = ", ".join(f"{key} {show(value)}" for key, value in row.items()
                          if key not in ("phase", "steps", "train_seconds", "train_loss", "val_loss"))
        lines.append(f"| {row['phase']} | {row['steps']} | {minutes} min {seconds:02d} s | {show(row['train_loss'])} "
                     f"| {show(row['val_loss'])} | {other} |")
    return lines
