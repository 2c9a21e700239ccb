"""`pretrain launch` without a scheduler: the dry run's sbatch script and layout, the signal lead derived from a run's
measured checkpoint saves, and options or configs that are refused before anything is submitted."""

from pathlib import Path

import pytest

from cluster.accounting import CATEGORIES, Attempt, Ledger
from cluster.signal_lead import DEFAULT_LEAD_S, signal_lead
from cluster.submit import parse_time
from pretrain.cli import main
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).parents[2]


def launch(capsys, *args):
    code = main(["launch", "configs/tiny.yaml", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_prints_the_sbatch_script_submitit_would_submit(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, _ = launch(capsys, "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                          "--time", "1-02:30:00", "--account", "acme", "--qos", "high", "--signal-lead", "300",
                          "--max-restarts", "3", "--run-dir", str(run_dir), *TINY_MODEL, "parallel.dp=8",
                          "train.global_batch_size=32")
    assert code == 0, out
    assert "layout: 2 node(s) x 4 task(s) = 8 process(es), the config's tp=1 cp=1 dp=8 pp=1 (ep=1) = 8: fits" in out
    assert "signal lead: 300 s before the time limit (--signal-lead); after a failure: up to 3 restart(s)" in out
    script = out.split("sbatch script (what submitit would submit):\n", 1)[1]
    directives = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --time=1590",
            "#SBATCH --partition=gpu", "#SBATCH --account=acme", "#SBATCH --qos=high", "#SBATCH --signal=USR2@300",
            "#SBATCH --requeue", "#SBATCH --job-name=pretrain-run"} <= directives, directives
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.endswith(f"-m submitit.core._submit {run_dir}/slurm/%j")  # each task runs the pickled job
    teardown = script.split("# teardown\n", 1)[1].splitlines()
    assert teardown[0] == "status=$?" and "-m cluster.restart" in teardown[1]  # srun's status decides a restart
    assert not run_dir.exists()  # a dry run creates nothing


def test_the_signal_lead_follows_the_measured_checkpoint_save(tmp_path, capsys):
    assert signal_lead(tmp_path).seconds == DEFAULT_LEAD_S
    def attempt(number, first, last, checkpoints, save, training):
        return Attempt(number, 0.0, 0.0, 2, "CPU", first, last, checkpoints=checkpoints,
                       seconds={**dict.fromkeys(CATEGORIES, 0.0), "checkpoint_save": save, "training": training})

    Ledger("run", attempts=[
        attempt(1, 0, 100, {"50": 1.0, "100": 2.0}, 40.0, 50.0),  # 20 s a save, 0.5 s a step
        attempt(2, 100, 200, {"200": 3.0}, 35.0, 30.0),  # 35 s, the longest save
    ]).save(tmp_path / "accounting.json")
    lead = signal_lead(tmp_path)
    assert lead.seconds == 30 + 2 * (35 + 0.5) and "checkpoint save 35.0 s" in lead.reason
    code, out, _ = launch(capsys, "--dry-run", "--time", "2:00:00", "--run-dir", str(tmp_path), *TINY_MODEL)
    assert code == 0 and "#SBATCH --signal=USR2@101" in out and "derived from" in out


@pytest.mark.parametrize("text,minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440),
                                          ("1-02:30", 1590), ("0-00:00:30", 1)])
def test_slurm_time_formats(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("args,key", [
    (["--tasks-per-node", "2"], "parallel"),  # 2 processes for a 1-process layout
    (["--gpus-per-node", "2", "--tasks-per-node", "3", "parallel.dp=2"], "--tasks-per-node"),
    (["--time", "2", "--signal-lead", "300"], "--signal-lead"),
    (["--time", "soon"], "--time"),
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--executor", "local", "--partition", "gpu"], "--partition"),
    (["--executor", "local", "--nodes", "2", "parallel.dp=2"], "--nodes"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
])
def test_bad_options_and_configs_fail_naming_the_key(args, key, tmp_path, capsys):
    code, _, err = launch(capsys, "--dry-run", "--run-dir", str(tmp_path / "run"), *TINY_MODEL, *args)
    assert code == 2 and f"config error at '{key}'" in err, err


def test_a_recipe_runs_as_one_task_and_each_phase_layout_is_checked(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"phases:\n  - name: first\n    config: {tmp_path.parents[0]}/missing.yaml\n")
    code = main(["launch", str(recipe), "--dry-run", "--tasks-per-node", "2"])
    assert code == 2 and "a recipe runs on one node as one task" in capsys.readouterr().err
    recipe.write_text(f"phases:\n  - name: first\n    config: {ROOT}/configs/tiny.yaml\n    nproc: 2\n")
    code = main(["launch", str(recipe), "--dry-run"])  # 2 processes for the config's 1-process layout
    assert code == 2 and "config error at 'phases[0] (first): parallel'" in capsys.readouterr().err


def test_values_cannot_add_commands_to_the_batch_script(tmp_path, capsys):
    """Shell syntax in a value stays quoted in the script; a line break, which would end the #SBATCH comment line, is
    refused. Config overrides never reach the script (they travel in the pickled job)."""
    run_dir = tmp_path / "a b" / "$(touch pwned)"
    code, out, _ = launch(capsys, "--dry-run", "--account", "a;touch pwned", "--run-dir", str(run_dir),
                          *TINY_MODEL, "tracking.run_name=$(touch pwned)")
    assert code == 0, out
    script = out.split("sbatch script (what submitit would submit):\n", 1)[1]
    assert "#SBATCH --account='a;touch pwned'" in script.splitlines()
    assert "tracking.run_name" not in script
    executed = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    for line in executed:  # every executed line quotes the run folder whole
        assert "$(touch pwned)" not in line.replace(f"'{run_dir}", "")
    for option in ("--partition", "--account", "--qos", "--run-dir"):
        code, _, err = launch(capsys, "--dry-run", option, "gpu\necho pwned", *TINY_MODEL)
        assert code == 2 and f"config error at '{option}'" in err and "line break" in err, err
