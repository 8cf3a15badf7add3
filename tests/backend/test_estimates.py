"""Time estimates from measured rates (neuromf.estimates): the arithmetic, the scaling to another grid, and the
shipped rates file's shape."""

from __future__ import annotations

import os

import pytest
from testkit import TEST_RATES as RATES

AS_MEASURED = (3.0, 2)  # the load and cores TEST_RATES were measured at: no rescaling


@pytest.fixture(autouse=True)
def _own_user_folder(tmp_path, monkeypatch):
    """Each test its own user data folder: no pace recorded on this machine leaks into the arithmetic."""
    monkeypatch.setenv("NEUROMF_HOME", str(tmp_path / "home"))


def test_estimates_multiply_the_measured_rates_and_name_the_machine():
    from neuromf.estimates import FINISH_CALLS, generation_estimate, mask_test_estimate, training_estimate

    assert mask_test_estimate("vae_fine", 3, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(2 + 3 * 20)
    assert mask_test_estimate("maisi", 3, rates=RATES, load=AS_MEASURED) is None  # no rate: no guess
    # encoding once per case, steps at the batch size's share of the measured batch
    assert training_estimate("joint_2mm", 10, 100, 4, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        10 + 60 + 100 * 4)
    assert training_estimate("joint_2mm", 10, 100, 8, encode=False, rates=RATES,
                             load=AS_MEASURED).seconds == pytest.approx(810)
    # joint + FLAIR pass per pair; without a renderer the joint pass alone; conditional: the FLAIR pass alone; the
    # second pair's finishing (decoding, figures) on top: the measured one-pair run's load_s holds the first one's
    finish = FINISH_CALLS * 2
    assert generation_estimate(2, 32, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        5 + 2 * 32 * 6 + finish)
    assert generation_estimate(2, 32, render=False, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        5 + 2 * 32 * 4 + finish)
    # a conditional pair whose lesion comes from the prior: placed on a lesion-free brain first, two passes
    placed = generation_estimate(1, 8, mode="conditional", rates=RATES, load=AS_MEASURED, flair_passes=2)
    assert placed.seconds == pytest.approx(5 + 2 * 8 * 2) and "2 passes (the lesion placed first)" in placed.basis
    assert generation_estimate(1, 8, mode="conditional", rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        5 + 8 * 2)
    guided = generation_estimate(1, 8, mode="inpaint", rates=RATES, flair_calls=2, load=AS_MEASURED)
    assert guided.seconds == pytest.approx(5 + 8 * 2 * 2) and "2 network calls per FLAIR step" in guided.basis
    # another grid: scaled by its voxel count, and said so
    small = generation_estimate(1, 32, grid=(48, 48, 48), rates=RATES, load=AS_MEASURED)
    assert small.seconds == pytest.approx(5 + 32 * 6 / 8) and "scaled from the 96³ grid" in small.basis
    text = generation_estimate(1, 32, rates=RATES, load=AS_MEASURED).describe()
    assert text.startswith("about 3 min") and "2-core Test CPU, 1 torch thread, load 3.0" in text
    assert generation_estimate(1, 1, rates={}, load=AS_MEASURED) is None


def test_estimates_follow_the_load_by_fair_sharing(monkeypatch):
    """Rates measured at load 3 on 2 cores (each thread had half a core: 2x an idle machine's time) are brought back
    to an idle machine, then scaled by the load now; the text says both."""
    from neuromf import estimates
    from neuromf.estimates import generation_estimate, mask_test_estimate, slowdown

    assert [slowdown(load, 2) for load in (0.0, 1.0, 3.0, 5.0)] == [1.0, 1.0, 2.0, 3.0]
    assert slowdown(3.0, 4) == 1.0 and slowdown(7.0, 4) == 2.0
    measured = 5 + 32 * 6  # one pair at the rates' own load
    idle = generation_estimate(1, 32, rates=RATES, load=(0.2, 2))
    assert idle.seconds == idle.idle_seconds == pytest.approx(measured / 2)
    assert idle.describe() == f"about {estimates.format_duration(measured / 2)} ({idle.basis})"  # no load note
    busy = generation_estimate(1, 32, rates=RATES, load=(5.0, 2))
    assert busy.seconds == pytest.approx(3 * measured / 2) and busy.idle_seconds == pytest.approx(measured / 2)
    assert busy.describe().startswith("about 5 min (about 2 min on an idle machine, ×3.0 at load 5.0 on 2 cores now;")
    # no load recorded with the rates: taken as measured on an idle machine
    bare = {k: v for k, v in RATES.items() if k != "env"}
    assert mask_test_estimate("vae_fine", 3, rates=bare, load=(3.0, 2)).seconds == pytest.approx(2 * (2 + 3 * 20))
    # rates in CPU seconds of the measuring process are an idle core's time whatever the load was then
    cpu_clock = {**RATES, "env": {k: {**v, "clock": "process_cpu"} for k, v in RATES["env"].items()}}
    timed_in_cpu = generation_estimate(1, 32, rates=cpu_clock, load=(5.0, 2))
    assert timed_in_cpu.idle_seconds == pytest.approx(measured) and timed_in_cpu.seconds == pytest.approx(3 * measured)
    assert timed_in_cpu.describe().endswith("measured in CPU seconds on a 2-core Test CPU, 1 torch thread)")
    # the default is this machine's load now
    monkeypatch.setattr(estimates, "current_load", lambda: (5.0, 2))
    assert generation_estimate(1, 32, rates=RATES).seconds == pytest.approx(busy.seconds)


def test_durations_read_as_estimates():
    from neuromf.estimates import format_duration

    assert [format_duration(s) for s in (3, 42, 100, 3000, 4900)] == ["3 s", "40 s", "2 min", "50 min", "1 h 22 min"]


def test_rates_under_a_second_read_as_such_in_the_basis():
    """A rate of 0.31 s per case read "× 0 s" when rounded to whole seconds."""
    from neuromf.estimates import format_rate, training_estimate

    assert [format_rate(s) for s in (0.31, 0.85, 4.04, 8.82, 16.1)] == ["0.31 s", "0.85 s", "4 s", "8.8 s", "16 s"]
    rates = {**RATES, "training": {"joint_3mm": {"cases": 8, "batch_size": 8, "load_s": 0.5,
                                                 "per_case_encoding_s": 0.31, "per_step_s": 0.85}}}
    basis = training_estimate("joint_3mm", 18, 150, 8, rates=rates, load=AS_MEASURED).basis
    assert "encoding 18 cases × 0.31 s" in basis and "150 steps × 0.85 s" in basis


def test_a_rates_file_of_ones_own_machine_replaces_the_shipped_one(tmp_path, monkeypatch):
    import json

    from neuromf.estimates import RATES_ENV, RATES_FILE, generation_estimate, rates_file

    assert rates_file() == RATES_FILE
    mine = tmp_path / "rates.json"
    mine.write_text(json.dumps(RATES))
    monkeypatch.setenv(RATES_ENV, str(mine))
    monkeypatch.setattr("neuromf.estimates.current_load", lambda: AS_MEASURED)
    assert rates_file() == mine
    assert generation_estimate(1, 32).seconds == pytest.approx(5 + 32 * 6)


def test_the_shipped_rates_cover_every_shipped_job():
    """The rates file the widgets read: every shipped VAE's mask test, every packaged CPU config's training and the
    Generate dock's default pair, each part with the machine it was measured on."""
    from neuromf.estimates import RATES_FILE, generation_estimate, measured_rates
    from neuromf.weights import EMBEDDED_MODELS

    rates = measured_rates()
    assert RATES_FILE.is_file() and rates, "benchmarks/measure_rates.py writes it"
    assert set(EMBEDDED_MODELS["vae"].values()) <= set(rates["mask_test"])
    assert {"joint_3mm", "joint_2mm"} <= set(rates["training"])
    assert rates["generation"]["joint_per_step_s"] > 0 and rates["generation"]["render_per_step_s"] > 0
    assert rates["generation"]["grid"] == [96, 96, 96] and generation_estimate(1, 32) is not None
    for part in ("mask_test", "training", "generation"):
        env = rates["env"][part]
        assert env["cpu_count"] >= 1 and env["loadavg_start"] and env["torch_threads"] >= 1


def test_a_recorded_pace_scales_later_estimates_and_says_so(tmp_path):
    """A machine 1.5x slower than the rates' one: after its runs are recorded, the estimate is 1.5x the rates' and
    names the pace; the ratio is taken against the rates alone, so recording again does not compound it."""
    from neuromf.estimates import generation_estimate, machine_pace, pace_file, record_pace

    plain = generation_estimate(1, 32, rates=RATES, load=(0.0, 2))
    assert machine_pace("generation") is None and "pace" not in plain.basis
    # 60 s of work by the rates, on an idle machine (no slowdown), took 90 s
    assert record_pace("generation", 60.0, 90.0, (0.0, 2)) == pytest.approx(1.5)
    paced = generation_estimate(1, 32, rates=RATES, load=(0.0, 2))
    assert paced.seconds == pytest.approx(1.5 * plain.seconds) and paced.idle_seconds == pytest.approx(
        1.5 * plain.idle_seconds)
    assert "×1.50, this machine's pace in its last 1 run" in paced.describe()
    assert record_pace("generation", 60.0, 90.0, (0.0, 2)) == pytest.approx(1.5)
    assert machine_pace("generation") == (pytest.approx(1.5), 2)
    # under load 3 on 2 cores a job takes 2x: 120 s there is the rates' pace
    assert record_pace("generation", 60.0, 120.0, (3.0, 2)) == pytest.approx(1.0)
    assert machine_pace("generation") == (pytest.approx(1.5), 3)  # the median of 1.5, 1.5, 1.0
    # another kind of job keeps its own pace
    assert machine_pace("training") is None
    assert pace_file().parent == tmp_path / "home"


def test_the_pace_is_the_median_of_the_last_runs_clipped():
    from neuromf.estimates import PACE_LIMITS, PACE_RUNS, machine_pace, record_pace

    for taken in (100.0, 100.0, 100.0, 20.0, 30.0, 30.0, 30.0):  # ratios 10, 10, 10, 2, 3, 3, 3 against 10 s
        record_pace("mask_test", 10.0, taken, (0.0, 1))
    pace, runs = machine_pace("mask_test")
    assert runs == PACE_RUNS and pace == pytest.approx(3.0)  # the first two runs have left the window
    for _ in range(PACE_RUNS):
        record_pace("mask_test", 10.0, 1000.0, (0.0, 1))
    assert machine_pace("mask_test")[0] == PACE_LIMITS[1]


def test_a_pace_is_not_recorded_from_short_or_broken_runs_and_a_bad_file_is_ignored():
    from neuromf.estimates import PACE_MIN_S, machine_pace, pace_file, record_pace

    assert record_pace("generation", PACE_MIN_S / 2, 30.0, (0.0, 2)) is None  # too short to time
    assert record_pace("generation", 60.0, float("nan"), (0.0, 2)) is None
    assert record_pace("generation", 60.0, 0.0, (0.0, 2)) is None
    assert not pace_file().exists()
    pace_file().parent.mkdir(parents=True)
    for text in ("not json", "[1, 2]", '{"generation": "fast"}', '{"generation": [{"ratio": "x"}, 3]}'):
        pace_file().write_text(text)
        assert machine_pace("generation") is None
    # a broken file is replaced by a good one on the next record, not a reason to fail a finished job
    assert record_pace("generation", 60.0, 120.0, (0.0, 2)) == pytest.approx(2.0)
    assert machine_pace("generation") == (pytest.approx(2.0), 1)


def test_the_load_now_is_capped_by_the_threads_runnable_at_this_instant(tmp_path, monkeypatch):
    """The 1-minute load average still counts a job that ended seconds ago; /proc/loadavg's runnable count (the
    caller's own thread left out) caps it."""

    from neuromf import estimates

    loadavg, no_tasks = tmp_path / "loadavg", tmp_path / "no_proc"  # no task files: the loadavg count
    loadavg.write_text("2.40 2.10 1.90 2/345 6789\n")  # two runnable: the caller and one other
    assert estimates.runnable_now(loadavg, no_tasks) == 1.0
    assert estimates.runnable_now(tmp_path / "missing", no_tasks) is None
    loadavg.write_text("garbage\n")
    assert estimates.runnable_now(loadavg, no_tasks) is None
    monkeypatch.setattr(os, "getloadavg", lambda: (2.4, 2.1, 1.9))
    monkeypatch.setattr(estimates, "runnable_now", lambda: 0.0)  # the job that made the average has ended
    assert estimates.current_load()[0] == 0.0
    monkeypatch.setattr(estimates, "runnable_now", lambda: 5.0)  # a burst: the average is the steadier figure
    assert estimates.current_load()[0] == 2.4
    monkeypatch.setattr(estimates, "runnable_now", lambda: None)  # no /proc: the average alone
    assert estimates.current_load()[0] == 2.4


def test_the_load_a_job_shared_the_machine_with_leaves_its_own_threads_out(tmp_path):
    """Between two snapshots 10 s apart the machine was busy 15 CPU-s, 12 of them this process's: the others
    used 0.3 cores on average. /proc/stat's first line is read in clock ticks."""

    from neuromf.estimates import CpuSnapshot, cpu_snapshot, load_since

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  {3 * hz} 0 {hz} {50 * hz} {hz} 0 0 0 0 0\ncpu0 1 2 3 4\n")
    snapshot = cpu_snapshot(stat)
    assert snapshot.busy_s == pytest.approx(4.0)  # user + system; idle and iowait are not busy
    assert cpu_snapshot(tmp_path / "missing") is None
    start, end = CpuSnapshot(100.0, 50.0, 7.0), CpuSnapshot(110.0, 65.0, 19.0)
    assert load_since(start, (9.0, 2), end) == (pytest.approx(0.3), os.cpu_count() or 1)
    assert load_since(None, (9.0, 2)) == (9.0, 2)  # no snapshot at the start: the fallback
    assert load_since(start, (9.0, 2), CpuSnapshot(100.0, 50.0, 7.0)) == (9.0, 2)  # no time between
    # the real /proc/stat of this machine, where there is one: a load, never negative
    real = cpu_snapshot()
    if real is not None:
        assert load_since(real, (9.0, 2))[0] >= 0.0


def test_a_run_estimate_reads_the_adapters_grid_and_guidance_from_their_sidecars():
    """The shipped 2 mm adapters: a 96³ grid (no scaling) and the renderer's own mask guidance (1.2), two network
    calls per FLAIR step; a prior-drawn conditional lesion doubles the FLAIR work; an unreadable adapter falls back
    to the plain rate rather than failing an estimate."""
    from neuromf.estimates import generation_estimate, measured_rates
    from neuromf.generation.estimates import adapter_grid, flair_calls_per_step, generation_run_estimate

    assert adapter_grid("embedded", "joint") == adapter_grid("embedded", "conditional") == (96, 96, 96)
    assert flair_calls_per_step("embedded", "joint", "embedded", None) == 2
    assert flair_calls_per_step("embedded", "joint", "embedded", 1.0) == 1  # guidance 1: one call
    assert flair_calls_per_step("embedded", "joint", None, None) == 1  # no renderer: no FLAIR pass to guide
    assert flair_calls_per_step("/no/such/adapter", "conditional", None, None) == 1
    assert adapter_grid("/no/such/adapter", "joint") is None
    load = (0.0, 2)
    joint = generation_run_estimate("embedded", "joint", 2, 32, "embedded", load=load)
    assert joint.seconds == pytest.approx(generation_estimate(2, 32, "joint", True, (96, 96, 96), flair_calls=2,
                                                              load=load).seconds)
    given, drawn = (generation_run_estimate("embedded", "conditional", 1, 8, prior_lesions=prior, load=load)
                    for prior in (False, True))
    flair = measured_rates()["generation"]["render_per_step_s"] * 2 * 8  # guided: two calls per step
    assert drawn.seconds - given.seconds == pytest.approx(flair * drawn.seconds / drawn.idle_seconds)


def test_the_cli_says_the_expected_time_on_the_cpu_only(capsys, monkeypatch):
    from neuromf import estimates
    from neuromf.cli._common import say_expected_time

    found = estimates.Estimate(120.0, "2 × 32 steps, measured on a test CPU")
    say_expected_time(lambda: found, "cpu")
    assert capsys.readouterr().err == f"Expected time: {found.describe()}\n"
    say_expected_time(lambda: None, "cpu")  # no rate: nothing rather than a guess
    monkeypatch.setattr(estimates, "runs_on_cpu", lambda device: False)  # a GPU: the rates are CPU ones
    say_expected_time(lambda: found, "cuda")
    assert capsys.readouterr().err == ""


def test_the_cli_mask_test_says_its_time_first_and_records_this_machines_pace(tmp_path, monkeypatch, capsys,
                                                                              phantom_dir):
    """`neuromf mask-test` with a shipped VAE on the CPU: the expected time before the first case, and after the
    test the pace of its cases after the first against the rate (here a made-up, slower machine's: 10 s a case
    for the shipped 3 mm VAE), so the next estimate follows this machine."""
    import json

    from neuromf.cli import main
    from neuromf.estimates import RATES_ENV, machine_pace, pace_file

    (tmp_path / "rates.json").write_text(json.dumps(RATES))
    monkeypatch.setenv(RATES_ENV, str(tmp_path / "rates.json"))
    monkeypatch.setattr("neuromf.estimates.runnable_now", lambda: 0.0)  # a quiet machine, whatever runs beside
    assert main(["mask-test", "--data", str(phantom_dir), "--vae", "embedded-3mm", "--max-cases", "2", "--device",
                 "cpu", "--out", str(tmp_path / "mask_test.json")]) == 0
    err = capsys.readouterr().err
    said = err.index("Expected time: about ")
    assert "2 cases × 10 s" in err[said:] and said < err.index("mask-test: ")  # before the bar starts
    runs = json.loads(pace_file().read_text())["mask_test"]
    assert len(runs) == 1 and runs[0]["taken_s"] > 0 and runs[0]["expected_s"] >= 10.0
    assert machine_pace("mask_test")[1] == 1
    assert machine_pace("generation") is None and machine_pace("training") is None


def test_a_cli_training_of_a_packaged_config_says_its_time_and_keeps_a_pace_clock(capsys, tmp_path, monkeypatch):
    """`train-joint --config joint_3mm` on the CPU: the expected time of a fresh run (its cases listed from the
    shipped 3 mm data), said at the run's first event, and a PaceClock at the config's seconds per step; a resumed
    run says no total; a config file of one's own has no rate: neither."""
    import json
    from argparse import Namespace

    from neuromf.cli._common import drive
    from neuromf.cli.train import _timing
    from neuromf.config import load_config
    from neuromf.estimates import RATES_ENV, PaceClock
    from neuromf.events import TrainEvent, TrainResult
    from neuromf.pipelines.estimates import training_run_estimate

    (tmp_path / "rates.json").write_text(json.dumps(RATES))
    monkeypatch.setenv(RATES_ENV, str(tmp_path / "rates.json"))
    # one load for both estimates compared below: the machine's own load moves between two readings (a CI run
    # said "×1.5 at load 2.0" in one and nothing in the other)
    monkeypatch.setattr("neuromf.estimates.current_load", lambda: (1.0, 2))
    cfg = load_config("joint_3mm", {"training.device": "cpu", "training.batch_size": 4})
    expected, (clock, per_step) = _timing(Namespace(config="joint_3mm", resume=False), cfg)
    assert isinstance(clock, PaceClock) and clock.load is not None and per_step == pytest.approx(4.0 * 4 / 8)
    assert expected == f"Expected time: {training_run_estimate('joint_3mm', cfg).describe()}"
    assert "encoding" in expected and capsys.readouterr().err == ""  # nothing said before the run starts

    def run():  # a pipeline that accepted its config: an encoding event, then one step
        yield TrainEvent("encoding", step=1, epoch=0, total_steps=1)
        yield TrainEvent("step", step=1, epoch=0, total_steps=1, loss=1.0)
        return TrainResult(tmp_path, step=1, stopped=False, checkpoint=tmp_path / "checkpoint.safetensors",
                           export=None, skipped_steps=0)

    assert drive(run(), "train-joint", clock, expected).step == 1
    err = capsys.readouterr().err
    assert err.count("Expected time: about ") == 1 and clock.first is not None  # said once; the step marked
    resumed, pace = _timing(Namespace(config="joint_3mm", resume=True), cfg)
    assert resumed is None and pace is not None  # resumed: the bar's own pace says the time left
    (tmp_path / "mine.yaml").write_text("{}")
    assert _timing(Namespace(config=str(tmp_path / "mine.yaml"), resume=False), cfg) == (None, None)


def test_runnable_threads_count_by_their_share_of_a_core(tmp_path):
    """A fake /proc: other processes' runnable threads count by their CFS weight against ours (nice 0: 1, nice 19:
    1.25^-19), sleeping ones and this process's own not at all, unreadable entries are skipped."""
    import os

    from neuromf.estimates import NICE_WEIGHT_STEP, runnable_now

    def task(pid: int, tid: int, state: str, nice: int, comm: str = "python") -> None:
        folder = tmp_path / str(pid) / "task" / str(tid)
        folder.mkdir(parents=True)
        # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
        # priority nice ...
        (folder / "stat").write_text(f"{tid} ({comm}) {state} 1 1 1 0 -1 0 0 0 0 0 5 5 0 0 {20 + nice} {nice} 1 0\n")

    task(100, 100, "R", 0)
    task(100, 101, "R", 0, comm="a (weird) name")  # a name with spaces and parentheses
    task(200, 200, "R", 19)  # a niced benchmark
    task(200, 201, "S", 0)  # sleeping: not competing
    task(os.getpid(), os.getpid(), "R", 0)  # this process: its own threads are the job
    (tmp_path / "300" / "task" / "300").mkdir(parents=True)  # ended while being read: no stat file
    (tmp_path / "self").mkdir()  # not a process folder
    assert runnable_now(tmp_path / "no_loadavg", tmp_path) == pytest.approx(2 + NICE_WEIGHT_STEP ** -19)
    assert NICE_WEIGHT_STEP ** -19 < 0.02  # a nice-19 thread barely slows a job at nice 0


def test_a_pace_is_learnt_from_quiet_runs_only(monkeypatch):
    """The load a finished job shared the machine with is the mean of the other threads runnable at its marks
    (after the first), not the CPU time the others got (a job that took the cores from waiting threads was still
    slowed by them); a run that shared the machine (`PACE_QUIET_LOAD` or more) records no pace: its time says more
    about the sharing than about this machine's speed."""
    from neuromf import estimates
    from neuromf.estimates import PACE_QUIET_LOAD, PaceClock, machine_pace

    monkeypatch.setattr(estimates, "cpu_snapshot", lambda: None)

    def run(samples: list[float]) -> PaceClock:
        sampled = iter(samples)
        monkeypatch.setattr(estimates, "runnable_now", lambda: next(sampled))
        clock = PaceClock((0.0, 2))
        for second, done in ((0.0, 0), (20.0, 1), (40.0, 2), (60.0, 3)):  # 3 units in 60 s
            clock.mark(second, done)
        return clock

    busy = run([3.0, 3.0, 1.0])
    assert busy.runnable == [3.0, 3.0, 1.0] and busy.shared_load() == (pytest.approx(7 / 3), os.cpu_count() or 1)
    assert busy.record("generation", 10.0) is None and machine_pace("generation") is None
    assert run([0.6, 0.4, 0.6]).record("generation", 10.0) is None  # 0.53 on average: still shared
    quiet = run([0.0, 0.3, 0.0])
    assert quiet.shared_load()[0] == pytest.approx(0.1) and 0.1 < PACE_QUIET_LOAD
    assert quiet.record("generation", 10.0) == pytest.approx(2.0)  # 30 s of rated work in 60 s, no slowdown
    assert machine_pace("generation") == (pytest.approx(2.0), 1)


def test_an_estimate_beside_other_jobs_cautions_a_job_of_several_torch_threads(monkeypatch):
    """Fair sharing models a one-thread job: beside other jobs, a job of 2 torch threads on 2 cores took 1.6x the
    time of one thread, so the estimate says so (and the remedy); alone, or with one thread, it says nothing."""
    import torch

    from neuromf.estimates import OVERSUBSCRIBED, generation_estimate

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    busy = generation_estimate(1, 32, rates=RATES, load=(2.0, 2)).describe()
    assert f"with 2 torch threads beside other jobs it can take up to {OVERSUBSCRIBED:.1f}x longer" in busy
    assert "OMP_NUM_THREADS=1" in busy
    assert "torch threads" not in generation_estimate(1, 32, rates=RATES, load=(0.0, 2)).describe()  # alone
    assert "torch threads" not in generation_estimate(1, 32, rates=RATES, load=(2.0, 8)).describe()  # cores spare
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert "torch threads" not in generation_estimate(1, 32, rates=RATES, load=(2.0, 2)).describe()


def test_a_joint_pass_of_several_pairs_costs_its_measured_share():
    """The joint pass draws up to `joint_batch` pairs at once: 4 pairs took 1.6x one pair's pass, not 4x (16 default
    pairs were estimated at 16 min and took 10). Rates that did not measure it count each pair as its own pass."""
    from neuromf.estimates import FINISH_CALLS, generation_estimate, joint_batch_factor, measured_rates

    batched = {**RATES, "generation": {**RATES["generation"], "joint_batch": 4, "joint_batch_ratio": 1.6}}
    assert [joint_batch_factor(n, batched) for n in (0, 1, 2, 4)] == pytest.approx([0.0, 1.0, 1.2, 1.6])
    assert [joint_batch_factor(n, RATES) for n in (1, 2, 4)] == [1.0, 2.0, 4.0]  # not measured: no saving
    # 6 pairs without their FLAIR pass: a joint pass of 4 (1.6) and one of 2 (1.2) at 4 s a step, 8 steps
    alone = generation_estimate(6, 8, render=False, rates=batched, load=AS_MEASURED)
    assert alone.seconds == pytest.approx(5 + 8 * 4 * (1.6 + 1.2) + 5 * FINISH_CALLS * 2)
    linear = generation_estimate(6, 8, render=False, rates=RATES, load=AS_MEASURED)
    assert linear.seconds == pytest.approx(5 + 8 * 4 * 6 + 5 * FINISH_CALLS * 2)
    assert generation_estimate(1, 8, rates=batched, load=AS_MEASURED).seconds == pytest.approx(
        generation_estimate(1, 8, rates=RATES, load=AS_MEASURED).seconds)  # one pair: nothing shared
    rate = measured_rates()["generation"]  # the shipped rates measured it
    assert rate["joint_batch"] >= 2 and 1.0 < rate["joint_batch_ratio"] < rate["joint_batch"]


def test_a_cli_generate_records_this_machines_pace_from_its_first_step(tmp_path, monkeypatch, capsys,
                                                                       conditional_run):
    """`neuromf generate` on the CPU, on the rates' grid (here a made-up rates file on the tiny adapter's grid):
    timed from its first network step to its last pair written, against the run's work over that span in the
    rates' seconds, like the Generate dock; a run on another grid records nothing."""
    import json

    from neuromf.cli import main
    from neuromf.estimates import RATES_ENV, machine_pace, pace_file
    from neuromf.generation.estimates import adapter_grid, generation_run_work

    adapter = conditional_run.export
    rates = json.loads(json.dumps(RATES))
    rates["generation"]["grid"] = list(adapter_grid(adapter, "conditional"))
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    monkeypatch.setenv(RATES_ENV, str(tmp_path / "rates.json"))
    monkeypatch.setattr("neuromf.estimates.runnable_now", lambda: 0.0)  # a quiet machine, whatever runs beside
    args = ["generate", "--mode", "conditional", "--adapter", str(adapter), "--n", "2", "--steps", "2", "--device",
            "cpu"]
    assert main([*args, "--out", str(tmp_path / "pairs")]) == 0
    runs = json.loads(pace_file().read_text())["generation"]
    work = generation_run_work(adapter, "conditional", 2, 2, prior_lesions=True)
    assert len(runs) == 1 and work.passes == 4  # two pairs, each its lesion placed first
    assert runs[0]["expected_s"] == pytest.approx(work.after_first_step_s, abs=0.06)
    assert 0 < runs[0]["taken_s"] < work.after_first_step_s and machine_pace("generation")[1] == 1

    rates["generation"]["grid"] = [96, 96, 96]  # the tiny adapter is not on the rates' grid: no pace
    (tmp_path / "rates.json").write_text(json.dumps(rates))
    from neuromf.estimates import _read

    _read.cache_clear()
    assert main([*args, "--out", str(tmp_path / "more"), "--seed", "1"]) == 0
    assert len(json.loads(pace_file().read_text())["generation"]) == 1
