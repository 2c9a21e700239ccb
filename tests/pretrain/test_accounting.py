"""GPU-hour accounting: the ledger's arithmetic, and what real runs (crashed, resumed, stopped) write into it."""

import json

import pytest

from cluster.accounting import CATEGORIES, LEDGER_FILE, Attempt, Ledger, Stopwatch, newer, read_ledgers
from pretrain.callbacks.base import Callback
from pretrain.checkpoint import read_meta
from tests.pretrain.test_train_e2e import COMMON, StopAfter, run


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def attempt(number=1, accelerators=4, first=0, last=10, **seconds):
    return Attempt(number=number, started_at=0.0, updated_at=0.0, accelerators=accelerators, hardware="H800",
                   first_step=first, last_step=last, seconds={**dict.fromkeys(CATEGORIES, 0.0), **seconds})


def test_stopwatch_charges_every_second_once():
    clock = Clock()
    a = attempt(last=0)
    a.started_at = clock.now
    watch = Stopwatch(a, clock)
    clock.now += 5
    assert watch.charge("training") == "startup"
    clock.now += 30
    watch.charge("evaluation")
    clock.now += 4
    watch.charge("training")
    clock.now += 10
    watch.flush()
    assert a.seconds["startup"] == 5 and a.seconds["training"] == 40 and a.seconds["evaluation"] == 4
    assert a.wall_seconds == clock.now - a.started_at == 49
    assert a.accelerator_hours() == pytest.approx(49 * 4 / 3600)


def test_work_after_the_resumed_checkpoint_is_lost():
    a = attempt(first=0, last=10, startup=10, training=80, evaluation=20, checkpoint_save=5)
    a.checkpoints = {"4": 40.0, "8": 88.0}  # work seconds when those steps were saved
    a.settle_before_resume(8)
    assert a.status == "failed"
    assert a.steps_recomputed == 2
    assert a.seconds["badput_lost"] == pytest.approx(100 - 88)
    # moved out of training and evaluation in proportion: the attempt's total is still its wall time
    assert a.seconds["training"] == pytest.approx(80 * 88 / 100)
    assert a.seconds["evaluation"] == pytest.approx(20 * 88 / 100)
    assert a.wall_seconds == pytest.approx(115)


def test_resuming_an_older_attempts_checkpoint_loses_the_whole_attempt():
    a = attempt(first=8, last=12, startup=3, training=40)
    a.checkpoints = {"12": 40.0}  # its own checkpoint was unreadable: the next attempt resumed from step 8
    a.settle_before_resume(8)
    assert a.seconds["badput_lost"] == 40 and a.seconds["training"] == 0 and a.steps_recomputed == 4


def test_clean_ends_lose_nothing():
    stopped = attempt(last=10, training=50)
    stopped.status = "stopped"
    stopped.settle_before_resume(10)
    assert stopped.status == "stopped" and stopped.seconds["badput_lost"] == 0
    unknown = attempt(last=10, training=50)  # no end recorded, but it had saved its last step
    unknown.settle_before_resume(10)
    assert unknown.status == "ended" and unknown.seconds["badput_lost"] == 0


def test_ledger_totals_over_attempts():
    ledger = Ledger(phase="pretrain", flops_per_token=6e9, peak_flops=1e15, tokens=10**12, steps=100, attempts=[
        attempt(1, 8, training=3600, startup=360, badput_lost=720),
        attempt(2, 16, training=1800, badput_restart=180),
    ])
    totals = ledger.totals()
    assert totals["accelerator_hours"] == pytest.approx(8 * 4680 / 3600 + 16 * 1980 / 3600)
    assert totals["training_hours"] == pytest.approx(8 + 8)
    assert totals["badput_hours"] == pytest.approx(8 * 0.2 + 16 * 0.05)
    assert totals["badput_share"] == pytest.approx(2.4 / totals["accelerator_hours"])
    assert totals["mfu"] == pytest.approx(6e9 * 1e12 / (totals["accelerator_hours"] * 3600 * 1e15))
    assert Ledger.from_dict(json.loads(json.dumps(ledger.to_dict()))) == ledger


def test_newer_prefers_what_has_seen_more():
    one, two = Ledger("p", attempts=[attempt(1)]), Ledger("p", attempts=[attempt(1), attempt(2)])
    assert newer(one, two) is two and newer(two, one) is two and newer(None, one) is one


def test_read_ledgers_of_a_recipe_in_its_order(tmp_path):
    for name in ("pretrain", "sft", "long"):
        (tmp_path / name).mkdir()
        Ledger(phase=name, attempts=[attempt()]).save(tmp_path / name / LEDGER_FILE)
    (tmp_path / "results.json").write_text(json.dumps([{"phase": "pretrain"}, {"phase": "long"}, {"phase": "sft"}]))
    assert [ledger.phase for ledger in read_ledgers(tmp_path)] == ["pretrain", "long", "sft"]
    assert [ledger.phase for ledger in read_ledgers(tmp_path / "sft")] == ["sft"]
    (tmp_path / "sft" / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a readable accounting ledger"):
        read_ledgers(tmp_path / "sft")
    with pytest.raises(ValueError, match="holds no accounting.json"):
        read_ledgers(tmp_path / "pretrain" / "nothing")


def ledger_of(run_dir):
    return Ledger.load(run_dir / LEDGER_FILE)


def test_crash_and_resume_add_up(tiny_overrides, tmp_path):
    """A crash after step 9 (checkpoint at 8), then a resume: the first attempt failed and lost its work after step
    8; the second paid a restart and finished. Each attempt's categories add up to its wall time."""
    overrides = [*tiny_overrides, *COMMON, "tracking.progress_bar=false"]
    r = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run(overrides, r, extra_callbacks=[StopAfter(8)])
    crashed = ledger_of(r)
    (first,) = crashed.attempts
    assert first.status == "failed" and first.last_step == 9 and set(first.checkpoints) == {"4", "8"}
    assert first.seconds["training"] > 0 and first.seconds["checkpoint_save"] > 0 and first.seconds["startup"] > 0
    summary = run(overrides, r, resume="auto")
    ledger = ledger_of(r)
    first, second = ledger.attempts
    assert first.status == "failed" and first.steps_recomputed == 1
    assert first.seconds["badput_lost"] > 0
    assert first.work_seconds() == pytest.approx(first.checkpoints["8"])  # what the step-8 checkpoint kept
    assert second.status == "finished" and (second.first_step, second.last_step) == (8, 12)
    assert second.seconds["badput_restart"] > 0 and second.seconds["startup"] == 0
    assert second.seconds["checkpoint_load"] == 0  # a restart's loading is badput
    assert second.seconds["evaluation"] > 0 and second.seconds["other"] >= 0
    for a in ledger.attempts:
        assert a.wall_seconds == pytest.approx(a.updated_at - a.started_at, abs=1e-6)
        assert a.accelerators == 1 and "CPU process" in a.hardware
    assert ledger.tokens == 12 * 8 * 64 and ledger.steps == 12 and ledger.phase == "r"
    assert 0 < ledger.mfu() < 1 and ledger.precision == "fp32"
    saves = len(first.checkpoints) + len(second.checkpoints)  # 4, 8, then 12 after the resume
    assert saves == 3
    assert first.seconds_per_checkpoint_save() == pytest.approx(first.seconds["checkpoint_save"] / 2)
    assert second.seconds_per_checkpoint_save() == pytest.approx(second.seconds["checkpoint_save"] / 1)
    assert second.seconds_per_step() == pytest.approx(second.seconds["training"] / 4)
    assert summary["accounting"]["attempts"] == 2 and summary["accounting"]["steps_recomputed"] == 1
    # every checkpoint carries the ledger as of its save: the final one knows both attempts
    held = read_meta(r / "checkpoints" / "step_00000012").state["accounting"]
    assert len(held["attempts"]) == 2


def test_ledger_survives_without_the_run_folders_file(tiny_overrides, tmp_path):
    """A run folder copied without accounting.json takes the ledger of the checkpoint it resumes from."""
    overrides = [*tiny_overrides, *COMMON, "tracking.progress_bar=false", "train.steps=8"]
    r = tmp_path / "r"
    run(overrides, r)
    (r / LEDGER_FILE).unlink()
    run([*overrides[:-1], "train.steps=12"], r, resume="auto")
    first, second = ledger_of(r).attempts
    assert first.status == "ended" and first.seconds["badput_lost"] == 0 and first.steps_recomputed == 0
    assert second.status == "finished" and second.number == 2


class PeakProbedOnABusyMachine(Callback):
    """As if the CPU peak probe at start had run while other work held the cores: a peak of 1 kFLOP/s."""

    def on_train_start(self, trainer):
        trainer.peak_flops = 1e3
        trainer.accounting.describe(trainer.flops_per_token, 1e3, trainer.cfg.train.precision)


def test_an_mfu_above_100_percent_remeasures_the_cpu_peak(tiny_overrides, tmp_path, capsys):
    """A CPU run whose MFU exceeds 100% probes the peak again and logs MFU against the better probe."""
    from pretrain.callbacks.metrics_log import read_metrics
    from pretrain.trainer import CPU_PEAK_REMEASURES

    r = tmp_path / "busy"
    overrides = [*tiny_overrides, *COMMON, "train.steps=3", "train.checkpoint_every=3", "train.eval_every=3",
                 "tracking.progress_bar=false"]
    summary = run(overrides, r, extra_callbacks=[PeakProbedOnABusyMachine()])
    assert summary["peak_flops"] > 1e6  # the re-measured peak replaced the low one
    records = [m for m in read_metrics(r / "metrics.jsonl") if m["split"] == "train"]
    assert all(0 < m["mfu"] < 1 for m in records)
    assert ledger_of(r).peak_flops == summary["peak_flops"] and 0 < ledger_of(r).mfu() < 1
    out = capsys.readouterr().out
    assert 1 <= out.count("note: above 100% MFU") < CPU_PEAK_REMEASURES
