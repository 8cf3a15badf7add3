"""Time estimates from measured rates (neuromf.estimates): the arithmetic, the scaling to another grid, and the
shipped rates file's shape."""

from __future__ import annotations

import pytest
from testkit import TEST_RATES as RATES

AS_MEASURED = (3.0, 2)  # the load and cores TEST_RATES were measured at: no rescaling


def test_estimates_multiply_the_measured_rates_and_name_the_machine():
    from neuromf.estimates import generation_estimate, mask_test_estimate, training_estimate

    assert mask_test_estimate("vae_fine", 3, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(2 + 3 * 20)
    assert mask_test_estimate("maisi", 3, rates=RATES, load=AS_MEASURED) is None  # no rate: no guess
    # encoding once per case, steps at the batch size's share of the measured batch
    assert training_estimate("joint_2mm", 10, 100, 4, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        10 + 60 + 100 * 4)
    assert training_estimate("joint_2mm", 10, 100, 8, encode=False, rates=RATES,
                             load=AS_MEASURED).seconds == pytest.approx(810)
    # joint + FLAIR pass per pair; without a renderer the joint pass alone; conditional: the FLAIR pass alone
    assert generation_estimate(2, 32, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(5 + 2 * 32 * 6)
    assert generation_estimate(2, 32, render=False, rates=RATES, load=AS_MEASURED).seconds == pytest.approx(
        5 + 2 * 32 * 4)
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
