"""The page's time line: the estimate before a run, the time left during it, what it took after.

The arithmetic is pure (app.timeline) and fed synthetic progress here; the recorded example's
event stream (assets/example) checks it on a real run's rhythm, replayed at its recorded times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app import timeline
from app.timeline import Plan, RoundLayout, remaining_seconds
from fedmitr.config import apply_overrides, preset_config
from fedmitr.events import Progress, StageFinished, StageStarted
from fedmitr.rundir import RunDir

EXAMPLE = RunDir.open(Path(__file__).resolve().parent.parent / "assets" / "example" / "run")


def test_durations_read_as_a_person_says_them():
    assert timeline.format_seconds(44.6) == "45 s"
    assert timeline.format_seconds(223) == "3 min 43 s"
    assert timeline.format_seconds(3 * 3600 + 300) == "3 h 05 min"
    assert timeline.format_estimate(223) == "3 min 40 s"  # an estimate is rounded: no false precision
    assert timeline.format_estimate(2.4) == "2 s" and timeline.format_estimate(0.2) == "1 s"  # a countdown's end
    assert timeline.format_estimate(47) == "45 s"


def synthetic_run(plan: dict[str, float], slowdown: float, steps: int = 100):
    """(time, stage, fraction, done) every step of a run that takes ``slowdown`` x its plan, each
    stage at an even pace."""
    t, done, samples = 0.0, {}, []
    for stage, planned in plan.items():
        took = planned * slowdown
        for k in range(1, steps + 1):
            samples.append((t + took * k / steps, stage, k / steps, t, dict(done)))
        t += took
        done[stage] = took
    return t, samples


@pytest.mark.parametrize("slowdown", [0.5, 1.0, 1.7, 3.0])
def test_the_time_left_learns_how_fast_this_machine_is(slowdown):
    plan = {"data": 1.0, "clients": 100.0, "fedavg": 0.5, "fedmitr": 80.0, "privacy": 3.0}
    end, samples = synthetic_run(plan, slowdown)
    for now, stage, fraction, started, done in samples:
        left = remaining_seconds(plan, done, current=stage, fraction=fraction, elapsed=now - started)
        actual = end - now
        if "clients" in done and actual > 5:  # from the end of the client stage on
            assert left == pytest.approx(actual, rel=0.1), (stage, fraction)
    assert remaining_seconds(plan, {}, current=None) == pytest.approx(sum(plan.values()))  # before anything ran


def test_the_current_stage_is_extrapolated_from_its_own_rate():
    plan = {"clients": 100.0}
    # Half the clients' steps in 30 s: 30 s more, whatever the plan said.
    assert remaining_seconds(plan, {}, current="clients", fraction=0.5, elapsed=30.0) == pytest.approx(30.0)
    # At the very start the plan still counts, scaled by the speed measured so far.
    early = remaining_seconds(plan, {}, current="clients", fraction=0.01, elapsed=1.0)
    assert 80 < early < 110


def test_steps_of_inversion_and_distillation_weigh_what_they_cost():
    layout = RoundLayout(rounds=2, inversion_steps=10, distill_steps=30, inversion_share=0.75)
    assert layout.fraction(10, 80) == pytest.approx(0.75 / 2)  # round 1's inversion done: 3/4 of round 1
    assert layout.fraction(40, 80) == pytest.approx(0.5)
    assert layout.fraction(80, 80) == pytest.approx(1.0)
    assert layout.fraction(20, 70) == pytest.approx(20 / 70)  # another layout: steps as they come


@pytest.fixture(autouse=True)
def two_workers(monkeypatch):
    """The app's setting on 2 cores (app.app.main), which the recorded example ran with."""
    monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", "2")


def test_the_plan_scales_the_recorded_run_to_the_settings():
    cfg = EXAMPLE.config
    assert EXAMPLE.metrics["method_workers"] == 2  # dense-kd and FedMITR ran side by side
    plan = timeline.stage_plan(cfg, EXAMPLE.metrics)
    assert list(plan.seconds) == ["data", "clients", *cfg.methods, "privacy"]
    assert plan.total == pytest.approx(EXAMPLE.metrics["seconds"]["total"], rel=0.05)  # its own settings
    more = apply_overrides(cfg, {"distill": {"rounds": 2 * cfg.distill.rounds}})
    assert timeline.stage_plan(more, EXAMPLE.metrics).seconds["fedmitr"] > 1.8 * plan.seconds["fedmitr"]
    dense = apply_overrides(cfg, {"methods": ["dense-kd", "fedmitr"]})
    dense_plan = timeline.stage_plan(dense, EXAMPLE.metrics).seconds
    # dense-kd ran in the recording: its own seconds (beside FedMITR, both on one thread).
    assert dense_plan["dense-kd"] == pytest.approx(EXAMPLE.metrics["methods"]["dense-kd"]["seconds"], rel=0.05)
    high = timeline.stage_plan(dataclasses.replace(preset_config("cpu-49"), methods=cfg.methods), EXAMPLE.metrics)
    assert high.seconds["clients"] > plan.seconds["clients"]
    assert timeline.stage_plan(cfg, None) is None


def test_the_paper_baselines_are_planned_at_their_measured_cost():
    """The recording holds dense-kd and FedMITR, not DENSE or Co-Boosting: they take their measured
    multiple of dense-kd (paired validation runs, one thread), not dense-kd's seconds."""
    cfg = apply_overrides(EXAMPLE.config, {"methods": ["dense-kd", "dense-gen", "co-boosting"]})
    plan = timeline.stage_plan(cfg, EXAMPLE.metrics).seconds
    assert 3.0 < plan["co-boosting"] / plan["dense-kd"] < 5.0
    assert 1.8 < plan["dense-gen"] / plan["dense-kd"] < 3.2
    assert timeline.cost_ratio("fedmitr", "fedmitr") == 1.0
    assert timeline.cost_ratio("no-such-method", "dense-kd") == 1.0  # no pair measured: planned alike


def replayed(speed: float):
    """The example's events into a live-like view whose plan is off by ``speed`` (the machine is
    that much slower than planned), read at every recorded event: (now, left, actual left, view)."""
    from app.runview import RunView

    plan = timeline.stage_plan(EXAMPLE.config, EXAMPLE.metrics)
    view = RunView(EXAMPLE.config)
    view.set_plan(Plan({s: v / speed for s, v in plan.seconds.items()}, plan.layouts, parallel=plan.parallel,
                       lanes=plan.lanes))
    events = list(EXAMPLE.events())
    end = events[-1][0]
    view.waiting(0)
    for t, event in events:
        view.apply(event, at=t)
        yield t, view.remaining(now=t), end - t, view


@pytest.mark.parametrize("speed", [0.6, 1.0, 1.6])
def test_the_time_left_of_the_recorded_run_is_within_a_quarter(speed):
    """The target: within ±25% of the actual time left at 25%, 50% and 75% of the run. (Between those
    readings, the first seconds of the methods side by side read up to 29% long, and the last seconds a
    few seconds long: the workers' start-up is planned at the run's end.)"""
    readings = [(now, left, actual, "clients" in view.finished) for now, left, actual, view in replayed(speed)]
    end = readings[-1][0] + readings[-1][2]
    for share in (0.25, 0.5, 0.75):
        now, left, actual, _ = min(readings, key=lambda r: abs(r[0] - share * end))
        assert abs(left - actual) / actual < 0.25, (share, left, actual)
    late = [(left - actual) / actual for now, left, actual, clients_done in readings if clients_done and actual > 5]
    assert late and max(map(abs, late)) < 0.7  # never off by more than that from the clients' end on


def test_the_bar_reaches_100_only_when_the_run_is_finished():
    from app.runview import RunView

    cfg = apply_overrides(preset_config("tiny"), {"methods": ["fedavg", "fedmitr"]})
    view = RunView(cfg)
    view.set_plan(timeline.stage_plan(cfg, EXAMPLE.metrics))
    assert view.stages[-1] == "privacy"  # the privacy check is a stage of its own
    view.waiting(0)
    for stage in ("data", "clients", "fedavg", "fedmitr"):
        view.apply(StageStarted(stage, total=10), at=1.0)
        view.apply(Progress(stage, 10, 10), at=2.0)
        view.apply(StageFinished(stage, 1.0), at=2.0)
    view.apply(StageStarted("privacy"), at=2.0)
    assert view.fraction() < 1.0 and "100%" not in view.status_html()
    view.apply(StageFinished("privacy", 1.0), at=3.0)
    assert view.fraction() < 1.0  # the run directory is still being written
    view.finish({"seconds": {"total": 3.0}}, seconds=3.2)
    assert view.fraction() == 1.0 and "took 3 s" in view.status_html()


def test_the_card_counts_down_while_the_run_goes():
    from app.runview import RunView

    cfg = EXAMPLE.config
    view = RunView(cfg)
    plan = timeline.stage_plan(cfg, EXAMPLE.metrics)
    view.set_plan(plan)
    view.waiting(0)
    view.apply(StageStarted("clients", total=100), at=0.0)
    per_step = plan.seconds["clients"] / 100  # the machine runs as fast as planned
    lines = []
    for k in (10, 40, 70):
        view.apply(Progress("clients", k, 100), at=k * per_step)
        lines.append(view.remaining(now=k * per_step))
    assert lines[0] > lines[1] > lines[2] > 0  # it counts down
    assert "left" in view.time_line()


def test_methods_side_by_side_end_with_their_last_lane():
    plan = {"data": 1.0, "clients": 10.0, "fedavg": 0.5, "dense-kd": 40.0, "fedmitr": 30.0, "privacy": 2.0}
    side = frozenset({"dense-kd", "fedmitr"})
    assert remaining_seconds(plan, {}, speed=1.0) == pytest.approx(83.5)  # one after another
    assert remaining_seconds(plan, {}, parallel=side, lanes=2, speed=1.0) == pytest.approx(53.5)
    assert Plan(plan, parallel=side, lanes=2).total == pytest.approx(53.5)
    # Both running, dense-kd half done in 20 s, fedmitr a quarter in 10 s (trusted rates): 20 and 30 s left.
    done = {"data": 1.0, "clients": 10.0, "fedavg": 0.5}
    left = remaining_seconds(plan, done, running={"dense-kd": (0.5, 20.0), "fedmitr": (0.25, 10.0)}, parallel=side,
                             lanes=2)
    assert left == pytest.approx(30.0 + 2.0, rel=0.01)  # the slower lane, then the privacy check


def test_a_plan_runs_the_synthesising_methods_side_by_side_as_the_run_will(monkeypatch):
    cfg = apply_overrides(preset_config("cpu"), {"methods": ["fedavg", "ensemble", "dense-kd", "fedmitr"]})
    monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", "2")
    plan = timeline.stage_plan(cfg, EXAMPLE.metrics)
    assert plan.lanes == 2 and plan.parallel == {"dense-kd", "fedmitr"}
    assert plan.total < sum(plan.seconds.values()) - min(plan.seconds["dense-kd"], plan.seconds["fedmitr"]) + 1
    assert timeline.stage_plan(cfg, EXAMPLE.metrics, device="cuda").lanes == 1


def test_the_plan_follows_this_machines_speed_and_its_client_workers():
    cfg = EXAMPLE.config
    plan = timeline.stage_plan(cfg, EXAMPLE.metrics)
    slow = timeline.stage_plan(cfg, EXAMPLE.metrics, speed=2.0)
    assert slow.total == pytest.approx(2 * plan.total)
    assert EXAMPLE.metrics["client_workers"] == 2
    alone = timeline.stage_plan(cfg, EXAMPLE.metrics, client_workers=1)
    assert alone.seconds["clients"] == pytest.approx(2 * plan.seconds["clients"])  # one at a time, not two
    assert timeline.stage_plan(cfg, EXAMPLE.metrics, client_workers=2).seconds == plan.seconds


def test_the_machine_speed_comes_from_the_probe_then_from_each_finished_run():
    speed = timeline.MachineSpeed()
    assert speed.factor == 1.0 and speed.source == "not measured"
    speed.probed(0.03, 0.02)
    assert speed.factor == pytest.approx(1.5) and speed.source == "a probe at start-up"
    speed.learn(planned=100.0, measured=230.0)  # a long run sets it
    assert speed.factor == pytest.approx((230 + 5 * 1.5) / 105) and speed.source == "the last run here"
    before = speed.factor
    speed.learn(planned=0.5, measured=0.25)  # a half-second run, twice as fast: it moves the factor little
    assert 0.9 * before < speed.factor < before


@pytest.mark.skipif(shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2,
                    reason="needs taskset and two cores")
def test_pinned_to_one_core_the_app_plans_one_client_and_one_method_at_a_time():
    """The app on one core (``taskset -c 0``, a slower machine's stand-in): one worker, one lane, and
    an estimate that grows to match (os.cpu_count would still say two cores)."""
    code = ("import os, json; from app.app import available_cores, client_workers, training_threads; "
            "os.environ['FEDMITR_CLIENT_WORKERS'] = str(client_workers()); "
            "from app import timeline; from fedmitr.rundir import RunDir; from app.replay import EXAMPLE; "
            "m = RunDir.open(EXAMPLE / 'run'); p = timeline.stage_plan(m.config, m.metrics, client_workers=client_workers()); "
            "print(json.dumps([available_cores(), client_workers(), training_threads(), p.lanes, p.total]))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("FEDMITR_CLIENT_WORKERS", None)
    pinned = json.loads(subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], env=env, cwd=root,
                                       check=True, capture_output=True, text=True).stdout)
    both = json.loads(subprocess.run([sys.executable, "-c", code], env=env, cwd=root, check=True,
                                     capture_output=True, text=True).stdout)
    assert pinned[:4] == [1, 1, 1, 1] and both[:4] == [2, 2, 1, 2]
    assert pinned[4] > 1.5 * both[4]  # clients one at a time, dense-kd and FedMITR one after the other
