"""Time estimates from measured rates (neuromf.estimates): the arithmetic, the scaling to another grid, and the
shipped rates file's shape."""

from __future__ import annotations

import pytest
from testkit import TEST_RATES as RATES


def test_estimates_multiply_the_measured_rates_and_name_the_machine():
    from neuromf.estimates import generation_estimate, mask_test_estimate, training_estimate

    assert mask_test_estimate("vae_fine", 3, rates=RATES).seconds == pytest.approx(2 + 3 * 20)
    assert mask_test_estimate("maisi", 3, rates=RATES) is None  # no rate: no guess
    # encoding once per case, steps at the batch size's share of the measured batch
    assert training_estimate("joint_2mm", 10, 100, 4, rates=RATES).seconds == pytest.approx(10 + 60 + 100 * 4)
    assert training_estimate("joint_2mm", 10, 100, 8, encode=False, rates=RATES).seconds == pytest.approx(810)
    # joint + FLAIR pass per pair; without a renderer the joint pass alone; conditional: the FLAIR pass alone
    assert generation_estimate(2, 32, rates=RATES).seconds == pytest.approx(5 + 2 * 32 * 6)
    assert generation_estimate(2, 32, render=False, rates=RATES).seconds == pytest.approx(5 + 2 * 32 * 4)
    assert generation_estimate(1, 8, mode="conditional", rates=RATES).seconds == pytest.approx(5 + 8 * 2)
    guided = generation_estimate(1, 8, mode="inpaint", rates=RATES, flair_calls=2)  # two calls per guided step
    assert guided.seconds == pytest.approx(5 + 8 * 2 * 2) and "2 network calls per FLAIR step" in guided.basis
    # another grid: scaled by its voxel count, and said so
    small = generation_estimate(1, 32, grid=(48, 48, 48), rates=RATES)
    assert small.seconds == pytest.approx(5 + 32 * 6 / 8) and "scaled from the 96³ grid" in small.basis
    text = generation_estimate(1, 32, rates=RATES).describe()
    assert text.startswith("about 3 min") and "2-core Test CPU, 1 torch thread, load 3.0" in text
    assert generation_estimate(1, 1, rates={}) is None


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
