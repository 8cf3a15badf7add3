"""The downstream benchmark (neuromf.eval.downstream, `neuromf benchmark-downstream`).

The statistics are checked against scipy and hand arithmetic on a toy table, lesion-wise detection on constructed
masks, and the runner end to end on the tiny phantom tree: resume, a missing source, arms by mask source, the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from testkit import TEST_SHAPE, TEST_SPACING, coarse_prep, write_nifti

from neuromf.eval import downstream as ds

TINY = dataclasses.replace(ds.QUICK, steps=2, patch=16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny volumes gain nothing from a second thread (see test_segmenter); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_paired_difference_matches_scipy_and_hand_arithmetic():
    arm = {0: 0.60, 1: 0.70, 2: 0.50, 3: 0.65, 4: 0.55, 9: 0.99}  # seed 9 has no R partner: left out
    ref = {0: 0.50, 1: 0.58, 2: 0.47, 3: 0.55, 4: 0.50}
    out = ds.paired_difference(arm, ref)
    diffs = np.array([0.10, 0.12, 0.03, 0.10, 0.05])
    assert out["seeds"] == [0, 1, 2, 3, 4]
    assert out["mean"] == pytest.approx(0.08)
    half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert out["ci_low"] == pytest.approx(0.08 - half) and out["ci_high"] == pytest.approx(0.08 + half)
    scipy_ci = stats.ttest_rel([arm[s] for s in range(5)], [ref[s] for s in range(5)]).confidence_interval(0.95)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((scipy_ci.low, scipy_ci.high))
    assert out["excludes_zero"] is True
    straddling = ds.paired_difference({0: 0.5, 1: 0.7}, {0: 0.6, 1: 0.6})
    assert straddling["mean"] == pytest.approx(0.0, abs=1e-12) and straddling["excludes_zero"] is False
    assert ds.paired_difference({0: 0.5}, {0: 0.4})["ci_low"] is None  # one seed: no interval


def test_lesion_detection_counts_detected_missed_and_false_positive():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[2:5, 2:5, 2:5] = 1  # lesion A: hit by one voxel
    truth[12:15, 12:15, 12:15] = 1  # lesion B: missed
    predicted = np.zeros_like(truth)
    predicted[4:7, 4:7, 4:7] = 1  # overlaps A in a corner
    predicted[2:4, 15:18, 2:4] = 1  # far from both: a false positive
    out = ds.lesion_detection(predicted, truth)
    assert out == {"lesions": 2, "detected": 1, "predicted_components": 2, "false_positives": 1,
                   "lesion_voxels": 54, "found_voxels": 27}  # the false positive's 12 voxels left out
    # diagonal neighbours are one 26-connected component
    diagonal = np.zeros_like(truth)
    diagonal[8, 8, 8] = diagonal[9, 9, 9] = 1
    assert ds.lesion_detection(diagonal, np.zeros_like(truth))["false_positives"] == 1


def test_plan_arms_by_source_and_mask_source_without_duplicates():
    pool = {"conditional/a": {"source": "conditional", "mask_source": "prior"},
            "joint/b": {"source": "joint", "mask_source": "joint"},
            "inpainted/c": {"source": "inpainted", "mask_source": "prior"},
            "inpainted/d": {"source": "inpainted", "mask_source": "joint"}}
    arms = {a.name: a for a in ds.plan_arms(pool)}
    assert list(arms) == ["R", "R+inpainted", "R+joint", "R+conditional", "R+synthetic", "R+joint masks",
                          "R+prior masks", "synthetic-only", "50%R+synthetic", "50%R"]
    assert arms["R+prior masks"].synthetic == ["conditional/a", "inpainted/c"]
    assert arms["50%R+synthetic"].real_fraction == 0.5 and arms["synthetic-only"].real_fraction == 0.0
    assert arms["50%R"].real_fraction == 0.5 and arms["50%R"].synthetic == []  # the control of 50%R+synthetic
    only_joint = [a.name for a in ds.plan_arms({"joint/b": pool["joint/b"]})]
    assert only_joint == ["R", "R+joint", "synthetic-only", "50%R+synthetic", "50%R"]  # duplicates left out
    assert [a.name for a in ds.plan_arms({})] == ["R"]  # no pairs: no control to compare them with


def _write_pairs(folder, cases, meta):
    affine = np.diag([*TEST_SPACING, 1.0])
    for i, case in enumerate(cases):
        write_nifti(folder / f"sample_{i:03d}_flair.nii.gz", case["image"].astype(np.float32), affine)
        write_nifti(folder / f"sample_{i:03d}_mask.nii.gz", case["mask"].astype(np.uint8), affine)
        (folder / f"sample_{i:03d}.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def pair_folders(phantom_dir, tmp_path_factory):
    """'Synthetic' pair folders on the coarse grid: the phantom train cases themselves (real files on disk), one
    folder recorded as conditional prior-mask pairs, one as joint pairs."""
    from neuromf.eval.metrics import load_real_cases

    real, _ = load_real_cases(phantom_dir, coarse_prep())
    train = [c for c in real if c["split"] == "train"]
    root = tmp_path_factory.mktemp("pairs")
    return {"conditional": _write_pairs(root / "cond", train[:2], {"mode": "conditional", "mask_source": "prior"}),
            "joint": _write_pairs(root / "joint", train[-2:], {"mode": "joint"})}


def test_resume_skips_finished_runs_and_redoes_stale_ones(phantom_dir, pair_folders, tmp_path, monkeypatch):
    sources = {"conditional": pair_folders["conditional"]}
    first = ds.run_downstream_benchmark(tmp_path, phantom_dir, coarse_prep(), sources, seeds=[0], settings=TINY,
                                        arms=["R+conditional"])
    assert set(first["arms"]) == {"R", "R+conditional"}
    assert (tmp_path / "downstream.png").stat().st_size > 0
    calls = []
    real_run = ds.run_arm_seed

    def counting(arm, seed, *args, **kwargs):
        calls.append((arm.name, seed))
        return real_run(arm, seed, *args, **kwargs)

    monkeypatch.setattr(ds, "run_arm_seed", counting)
    again = ds.run_downstream_benchmark(tmp_path, phantom_dir, coarse_prep(), sources, seeds=[0, 1], settings=TINY,
                                        arms=["R+conditional"])
    assert calls == [("R", 1), ("R+conditional", 1)]  # seed 0 was finished
    assert again["arms"]["R"]["dice"]["values"][0] == first["arms"]["R"]["dice"]["values"][0]
    calls.clear()
    ds.run_downstream_benchmark(tmp_path, phantom_dir, coarse_prep(), sources, seeds=[0, 1],
                                settings=dataclasses.replace(TINY, synthetic_share=0.5), arms=["R+conditional"])
    assert calls == [("R+conditional", 0), ("R+conditional", 1)]  # R ignores the share: its results are kept
    calls.clear()
    ds.run_downstream_benchmark(tmp_path, phantom_dir, coarse_prep(), sources, seeds=[0],
                                settings=dataclasses.replace(TINY, steps=3), arms=["R"])
    assert calls == [("R", 0)]  # other settings: the stored result is stale


def test_missing_source_is_skipped_with_a_note(phantom_dir, tmp_path):
    notes = []
    out = ds.run_downstream_benchmark(tmp_path, phantom_dir, coarse_prep(), {"joint": tmp_path / "nope"}, seeds=[0],
                                      settings=TINY, on_note=notes.append)
    assert list(out["arms"]) == ["R"]
    assert any("joint" in n and "does not exist" in n for n in notes), notes
    assert any("no folder given" in n for n in out["notes"])


def test_cli_end_to_end_on_the_tiny_grid(phantom_dir, pair_folders, tmp_path, capsys):
    from neuromf.cli import main

    grid = ["--shape", *map(str, TEST_SHAPE), "--spacing", *map(str, TEST_SPACING)]
    code = main(["benchmark-downstream", "--data", str(phantom_dir), *grid, "--quick", "--budget-steps", "2",
                 "--seeds", "0", "1", "--conditional", str(pair_folders["conditional"]), "--joint",
                 str(pair_folders["joint"]), "--arms", "R+conditional", "R+prior masks",
                 "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert list(result["arms"]) == ["R", "R+conditional"]
    # the conditional folder holds exactly the prior-mask pairs, so that arm is R+conditional and not run twice
    assert any("'R+prior masks' is not available" in n for n in result["notes"]), result["notes"]
    assert result["mask_sources"] == {"joint": 2, "prior": 2}
    assert result["arms"]["R"]["dice"]["n"] == 2
    assert "| R+conditional |" in printed and "R+conditional beats R by >= 0.05 Dice" in printed
    bad = tmp_path / "bad"
    _write_pairs(bad, [{"image": np.zeros((8, 8, 8)), "mask": np.zeros((8, 8, 8))}], {})
    assert main(["benchmark-downstream", "--data", str(phantom_dir), *grid, "--quick", "--seeds", "0",
                 "--joint", str(bad), "--out", str(tmp_path / "out2")]) == 2
    assert "shape" in capsys.readouterr().err


def test_lesion_like_filter_drops_pairs_that_fail_the_check(phantom_dir):
    from neuromf.eval.metrics import load_real_cases

    real, _ = load_real_cases(phantom_dir, coarse_prep())
    train = [c for c in real if c["split"] == "train"]
    pool = {"joint/real": {"image": train[0]["image"], "mask": train[0]["mask"].astype(np.uint8), "source": "joint"},
            "joint/empty": {"image": train[0]["image"], "mask": np.zeros_like(train[0]["mask"], np.uint8),
                            "source": "joint"}}
    notes = []
    kept = ds.keep_lesion_like(pool, train, coarse_prep(), notes)
    assert list(kept) == ["joint/real"] and notes == ["lesion-like filter: 1 of 2 synthetic pairs kept"]


def test_parallel_workers_give_the_same_results_as_one_by_one(phantom_dir, tmp_path):
    one = ds.run_downstream_benchmark(tmp_path / "one", phantom_dir, coarse_prep(), {}, seeds=[0, 1], settings=TINY)
    two = ds.run_downstream_benchmark(tmp_path / "two", phantom_dir, coarse_prep(), {}, seeds=[0, 1], settings=TINY,
                                      workers=2)
    assert two["arms"]["R"]["dice"]["values"] == one["arms"]["R"]["dice"]["values"]
    assert two["arms"]["R"]["fp_per_scan"]["values"] == one["arms"]["R"]["fp_per_scan"]["values"]


def test_half_r_control_is_paired_with_the_half_r_arm_on_the_same_real_cases():
    pool = {"joint/b": {"source": "joint", "mask_source": "joint"}}
    arms = ds.plan_arms(pool)
    # both half arms draw the same real cases for a seed, so their difference is the pairs' own
    assert ds.real_subset(64, 0.5, 3) == ds.real_subset(64, 0.5, 3) != ds.real_subset(64, 0.5, 4)
    dice = {"R": [0.70, 0.72, 0.74], "50%R": [0.60, 0.66, 0.61], "50%R+synthetic": [0.65, 0.67, 0.70],
            "R+joint": [0.71, 0.70, 0.75], "synthetic-only": [0.5, 0.6, 0.55]}
    rows = [{"arm": arm, "seed": seed, "dice": d, "sensitivity": 1.0, "fp_per_scan": 0.0}
            for arm, values in dice.items() for seed, d in enumerate(values)]
    summary = ds.summarise(rows, arms)
    assert "volume_ratio" not in summary["R"]  # rows stored before the volumes were recorded
    added = summary["50%R+synthetic"]["dice_minus_50%R"]
    assert added["mean"] == pytest.approx((0.05 + 0.01 + 0.09) / 3)
    assert "dice_minus_50%R" not in summary["R+joint"] and "dice_minus_50%R" not in summary["50%R"]
    goal = next(g for g in ds.judge_goals(summary) if g["arm"] == "50%R+synthetic")
    assert goal["met"] is False and goal["dice_gain_over_half_R"] == pytest.approx(0.05)
    table = ds.format_table({"n_real_train": 64, "arms": summary, "goals": ds.judge_goals(summary)})
    assert "| 50%R | 32 + 0 |" in table and "the pairs add +0.050 Dice to the same half of R" in table


def test_extra_real_cases_make_the_ceiling_arms_apart_from_the_synthetic_ones():
    pool = {"joint/b": {"source": "joint", "mask_source": "joint"},
            "extra-real/x": {"source": "extra-real", "mask_source": "real"}}
    arms = {a.name: a for a in ds.plan_arms(pool)}
    assert list(arms) == ["R", "R+joint", "synthetic-only", "50%R+synthetic", "R+extra-real", "50%R+extra-real",
                          "50%R"]
    assert arms["R+joint"].synthetic == ["joint/b"] and arms["synthetic-only"].synthetic == ["joint/b"]
    assert arms["50%R+extra-real"].real_fraction == 0.5 and arms["50%R+extra-real"].synthetic == ["extra-real/x"]
    only_extra = [a.name for a in ds.plan_arms({"extra-real/x": pool["extra-real/x"]})]
    assert only_extra == ["R", "R+extra-real", "50%R+extra-real", "50%R"]


def test_extra_real_ceiling_end_to_end_and_refused_when_it_repeats_the_benchmark_cases(phantom_dir, tmp_path):
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset

    extra = make_phantom_dataset(tmp_path / "extra", n_healthy=0, n_fcd=2, seed=4,
                                 cfg=PhantomConfig(shape=TEST_SHAPE, spacing=TEST_SPACING))
    out = ds.run_downstream_benchmark(tmp_path / "out", phantom_dir, coarse_prep(), {}, seeds=[0, 1], settings=TINY,
                                      arms=["R+extra-real", "50%R", "50%R+extra-real"], extra_real=extra)
    assert list(out["arms"]) == ["R", "R+extra-real", "50%R", "50%R+extra-real"]
    assert out["n_extra_real"] == 2 and out["arms"]["R+extra-real"]["n_synthetic"] == 2
    assert out["mask_sources"] == {}  # the extra cases are not synthetic pairs
    row = json.loads(next((tmp_path / "out" / "runs").glob("R__seed0.json")).read_text())
    ratios = [c["found_voxels"] / c["lesion_voxels"] for c in row["per_case"]]
    assert row["volume_ratio"] == pytest.approx(float(np.median(ratios)))
    assert out["arms"]["R+extra-real"]["volume_ratio_minus_R"]["n"] == 2
    assert "dice_minus_50%R" in out["arms"]["50%R+extra-real"]
    assert out["goals"] == []  # the ceiling is not a goal, and goals of arms not asked for are left out
    rows = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*seed1.json")]
    runs = {row["arm"]: row for row in rows}
    assert runs["50%R+extra-real"]["real_ids"] == runs["50%R"]["real_ids"]  # the same half: the control pairs
    table = ds.format_table(out)
    assert "ceiling (not a goal): 2 extra real cases add" in table and "to the same half of R" in table
    with pytest.raises(FileNotFoundError, match="nope: data folder does not exist"):
        ds.run_downstream_benchmark(tmp_path / "none", phantom_dir, coarse_prep(), {}, seeds=[0], settings=TINY,
                                    extra_real=tmp_path / "nope")
    assert not (tmp_path / "none").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="is the benchmark's own case"):
        ds.run_downstream_benchmark(tmp_path / "dup", phantom_dir, coarse_prep(), {}, seeds=[0], settings=TINY,
                                    extra_real=phantom_dir)


def test_a_second_scarce_share_gets_its_own_arms_control_and_line():
    pool = {"joint/b": {"source": "joint", "mask_source": "joint"},
            "extra-real/x": {"source": "extra-real", "mask_source": "real"}}
    arms = ds.plan_arms(pool, (0.5, 0.25))
    assert [a.name for a in arms] == ["R", "R+joint", "synthetic-only", "50%R+synthetic", "25%R+synthetic",
                                      "R+extra-real", "50%R+extra-real", "25%R+extra-real", "50%R", "25%R"]
    by_name = {a.name: a for a in arms}
    assert by_name["25%R"].real_fraction == 0.25 and by_name["25%R"].synthetic == []
    # the default share keeps the arms (and so the stored runs' fingerprints) of earlier rounds
    assert by_name["50%R"].description == "the same random half of R as 50%R+synthetic, no synthetic pair (its control)"
    assert ds.real_subset(64, 0.25, 3) == ds.real_subset(64, 0.25, 3) and len(ds.real_subset(64, 0.25, 3)) == 16
    dice = {"R": [0.70, 0.72], "25%R": [0.50, 0.56], "25%R+synthetic": [0.58, 0.60], "25%R+extra-real": [0.61, 0.63]}
    rows = [{"arm": arm, "seed": seed, "dice": d, "sensitivity": 1.0, "fp_per_scan": 0.0}
            for arm, values in dice.items() for seed, d in enumerate(values)]
    summary = ds.summarise(rows, arms)
    assert summary["25%R+synthetic"]["dice_minus_25%R"]["mean"] == pytest.approx(0.06)
    assert summary["25%R+extra-real"]["dice_minus_25%R"]["mean"] == pytest.approx(0.09)
    assert "dice_minus_50%R" not in summary["25%R+synthetic"]
    table = ds.format_table({"n_real_train": 64, "arms": summary, "goals": ds.judge_goals(summary)})
    assert "| 25%R | 16 + 0 |" in table
    assert "scarce labels (not a goal): the pairs add 0.060" in table and "to the same 25% of R" in table
    assert "ceiling (not a goal): 1 extra real cases add 0.090" in table
    with pytest.raises(ValueError, match="scarce_fractions must be distinct shares"):
        ds.run_downstream_benchmark("unused", "embedded-3mm", None, {}, scarce_fractions=(0.5, 1.0))


def test_scarce_label_data_script_keeps_one_seeds_draw_and_every_test_case(tmp_path):
    """scripts/scarce_label_data.py: the FCD training cases of the folder are exactly those `real_subset` draws for
    the seed (the benchmark's scarce arms' draw), the first N healthy training cases and every test case, all as
    links to the source's subject folders; the source is left as it was and an existing output is refused."""
    import csv
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "scarce_label_data", Path(__file__).resolve().parents[2] / "scripts" / "scarce_label_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    source = tmp_path / "data"
    rows = [(f"sub-{i:03d}", group, split) for i, (group, split) in enumerate(
        [("fcd", "train")] * 16 + [("hc", "train")] * 6 + [("fcd", "test")] * 3 + [("hc", "test")] * 2)]
    for sub, _, _ in rows:
        (source / sub / "anat").mkdir(parents=True)
        (source / sub / "anat" / f"{sub}_FLAIR.nii.gz").write_bytes(b"x")
    table = "participant_id\tgroup\tsplit\n" + "".join("\t".join(r) + "\n" for r in rows)
    (source / "participants.tsv").write_text(table)

    out = tmp_path / "scarce"
    kept = script.make_scarce_label_data(out, str(source), fraction=0.25, seed=3, healthy=2)
    fcd_train = [sub for sub, group, split in rows if group == "fcd" and split == "train"]
    assert kept == sorted(fcd_train[i] for i in ds.real_subset(16, 0.25, 3)) and len(kept) == 4
    with open(out / "participants.tsv", newline="") as handle:
        written = [(r["participant_id"], r["group"], r["split"]) for r in csv.DictReader(handle, delimiter="\t")]
    assert sorted(s for s, g, sp in written if g == "fcd" and sp == "train") == kept
    assert [s for s, g, sp in written if g == "hc" and sp == "train"] == ["sub-016", "sub-017"]
    assert sorted(s for s, _, sp in written if sp == "test") == [s for s, _, sp in rows if sp == "test"]
    assert all((out / s).is_symlink() and (out / s / "anat" / f"{s}_FLAIR.nii.gz").is_file() for s, _, _ in written)
    assert (source / "participants.tsv").read_text() == table  # the source is not changed
    assert kept != script.make_scarce_label_data(tmp_path / "other", str(source), fraction=0.25, seed=4, healthy=2)
    with pytest.raises(FileExistsError, match="already exists"):
        script.make_scarce_label_data(out, str(source))
