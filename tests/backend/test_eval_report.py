"""Evaluation of generated pairs (`neuromf.eval.metrics`) and the Phase 7 verification report (`.report`)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from neuromf.eval.checks import CHECKS
from neuromf.eval.figures import lesion_montage
from neuromf.eval.metrics import (
    dice,
    dice_reference_points,
    evaluate_generated,
    find_generated_pairs,
    lesion_contrast,
    ms_ssim,
    ms_ssim_settings,
)
from neuromf.eval.report import write_verification_report
from neuromf.io.nifti import Preprocessing, preprocess_pair, save_nifti
from neuromf.models.adapter_meta import AdapterMeta

PREP = Preprocessing((64, 64, 64), (3.0, 3.0, 3.0))
CENTRED = np.diag([3.0, 3.0, 3.0, 1.0])
CENTRED[:3, 3] = -1.5 * 63


def _write_pair(folder: Path, sid: str, image: np.ndarray, mask: np.ndarray) -> None:
    save_nifti(image.astype(np.float32), CENTRED, folder / f"{sid}_flair.nii.gz")
    save_nifti(mask.astype(np.uint8), CENTRED, folder / f"{sid}_mask.nii.gz", dtype=np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """3 phantom FCD cases (2 train, 1 test) and 4 generated pairs with known overlaps, in a stage folder."""
    from neuromf.data.phantom import make_phantom_dataset
    from neuromf.io.bids import discover_cases

    root = tmp_path_factory.mktemp("eval")
    data = make_phantom_dataset(root / "bids", n_healthy=1, n_fcd=3, seed=1)
    real = {}
    for split in ("train", "test"):
        for case in discover_cases(data, group="fcd", split=split):
            image, mask = preprocess_pair(case.image, case.mask, PREP)
            real[case.case_id] = (split, image.data[0].numpy(), mask.data[0].numpy() > 0.5)
    train_id = next(k for k, v in real.items() if v[0] == "train")
    test_id = next(k for k, v in real.items() if v[0] == "test")
    stage = root / "stage"
    gen = stage / "generated"
    _, img_tr, mask_tr = real[train_id]
    _, img_te, mask_te = real[test_id]
    shifted = np.roll(mask_tr, 2, axis=0)
    _write_pair(gen, "sample_000", img_tr, mask_tr)  # copy of a training case: train Dice 1
    _write_pair(gen, "sample_001", img_te, mask_te)  # copy of the test case: test Dice 1
    _write_pair(gen, "sample_002", img_tr, shifted)  # shifted training mask
    _write_pair(gen, "sample_003", img_te * 0.9, np.zeros_like(mask_tr))  # empty mask
    # the generator's provenance files: a recorded noise correlation, one without it, one unreadable
    (gen / "sample_000.json").write_text(json.dumps({"seed": 0, "mask_noise_correlation": -0.02, "mask_draws": 2}))
    (gen / "sample_001.json").write_text(json.dumps({"seed": 1}))
    (gen / "sample_002.json").write_text("{not json")
    return {"data": data, "stage": stage, "gen": gen, "real": real, "train_id": train_id, "test_id": test_id,
            "shifted": shifted, "root": root}


@pytest.fixture(scope="module")
def metrics(world) -> dict:
    out = world["stage"] / "metrics" / "metrics.json"
    return evaluate_generated(world["gen"], world["data"], PREP, out_json=out)


def test_dice_hand_computed():
    a = np.array([1, 1, 0, 0])
    b = np.array([1, 0, 1, 0])
    assert dice(a, b) == pytest.approx(0.5)  # 2*1 / (2+2)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(4), np.zeros(4)) == 1.0  # both empty
    assert dice(a, np.zeros(4)) == 0.0  # one empty
    assert dice(np.array([1, 1, 1, 0]), np.array([0, 0, 1, 0])) == pytest.approx(0.5)  # 2*1 / (3+1)
    assert dice(torch.tensor([0.7, 0.2, 0.9]), np.array([True, False, False])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros(3), np.zeros(4))


def test_lesion_contrast_and_ms_ssim():
    image = np.zeros((16, 16, 16), np.float32)
    image[2:14, 2:14, 2:14] = 0.5
    mask = np.zeros_like(image, dtype=bool)
    mask[6:9, 6:9, 6:9] = True
    image[mask] = 0.8
    assert lesion_contrast(image, mask) == pytest.approx(1.6)
    assert lesion_contrast(image, np.zeros_like(mask)) is None
    assert ms_ssim_settings((64, 64, 64))["kernel_size"] == 3
    assert len(ms_ssim_settings((64, 64, 64))["weights"]) == 3
    rng = np.random.default_rng(0)
    vol = rng.random((64, 64, 64)).astype(np.float32)
    assert ms_ssim(vol, vol) == pytest.approx(1.0, abs=1e-4)
    assert ms_ssim(vol, rng.random((64, 64, 64)).astype(np.float32)) < 0.5
    small = vol[:16, :16, :16]
    assert ms_ssim(small, small) == pytest.approx(1.0, abs=1e-4)  # fewer scales on small grids


def test_evaluate_generated_figures(world, metrics):
    assert json.loads((world["stage"] / "metrics" / "metrics.json").read_text())["n_generated"] == 4
    for key in ("dice", "fraction_nonempty", "lesion_volume_cm3", "lesion_contrast", "diversity", "samples",
                "real_cases", "n_real_train", "n_real_test"):
        assert key in metrics
    assert (metrics["n_real_train"], metrics["n_real_test"]) == (2, 1)
    rows = {r["id"]: r for r in metrics["samples"]}
    assert rows["sample_000"]["best_dice_train"] == pytest.approx(1.0)
    assert rows["sample_000"]["best_match_train"] == world["train_id"]
    assert rows["sample_001"]["best_dice_test"] == pytest.approx(1.0)
    assert rows["sample_001"]["best_match_test"] == world["test_id"]
    expected = max(dice(world["shifted"], m) for s, _, m in world["real"].values() if s == "train")
    assert 0.0 < expected < 1.0
    assert rows["sample_002"]["best_dice_train"] == pytest.approx(expected)
    assert rows["sample_003"]["nonempty"] is False and rows["sample_003"]["best_dice_train"] == 0.0
    assert metrics["fraction_nonempty"] == pytest.approx(0.75)
    mean_train = np.mean([r["best_dice_train"] for r in rows.values()])
    assert metrics["dice"]["mean_best_train"] == pytest.approx(mean_train)
    assert metrics["dice"]["target"] == 0.3
    _, _, mask_tr = world["real"][world["train_id"]]
    assert rows["sample_000"]["lesion_cm3"] == pytest.approx(mask_tr.sum() * 27 / 1000)
    vols = metrics["lesion_volume_cm3"]
    assert vols["generated"]["n"] == 3 and vols["real"]["n"] == 3
    assert 0.0 <= vols["ks_statistic"] <= 1.0
    contrast = metrics["lesion_contrast"]
    assert contrast["generated_mean"] > 1.0 and contrast["real_mean"] > 1.0  # phantom lesions are hyperintense
    edge = metrics["lesion_edge"]  # 3 non-empty generated masks, 3 real lesions; their levels over the tissue
    assert edge["generated"]["n"] == 3 and edge["real"]["n"] == 3
    assert edge["real"]["median_level"]["0"] > 1.0 and edge["real"]["median_spill"] is not None
    div = metrics["diversity"]
    assert div["n_pairs"] == 6 and 0.0 < div["mean_pairwise_ms_ssim"] <= 1.0

    # P7-T6 reference points: from the real masks only, as defined in dice_reference_points
    masks = {split: [m for s, _, m in world["real"].values() if s == split] for split in ("train", "test")}
    reference = metrics["dice"]["reference"]
    expected_ref = dice_reference_points(masks["train"], masks["test"])
    for key in ("real_test_vs_train", "train_leave_one_out", "memoriser_best_train", "memoriser_best_test"):
        assert reference[key] == pytest.approx(expected_ref[key]), key
    assert reference["real_test_vs_train"] == pytest.approx(max(dice(masks["test"][0], m) for m in masks["train"]))
    assert "memoriser" in reference["definitions"]


def test_evaluate_lesion_like_section(world, metrics):
    section = metrics["lesion_like"]
    samples = {s["id"]: s for s in section["samples"]}
    # copies of real lesions on their own FLAIR pass every criterion; the empty mask fails every one
    assert samples["sample_000"]["lesion_like"] and samples["sample_001"]["lesion_like"]
    assert samples["sample_003"]["lesion_like"] is False and "nonempty" in samples["sample_003"]["failed"]
    assert samples["sample_000"]["n_components"] == 1 and samples["sample_000"]["inside_brain_share"] == 1.0
    _, _, mask_tr = world["real"][world["train_id"]]
    assert samples["sample_000"]["volume_cm3"] == pytest.approx(mask_tr.sum() * 27 / 1000)
    n_like = sum(s["lesion_like"] for s in samples.values())
    assert section["summary"]["n_lesion_like"] == n_like and section["rate"] == pytest.approx(n_like / 4)
    assert section["meets_acceptance"] == (n_like / 4 >= 0.7)
    # noise correlation: read from sample_000.json; absent key, unreadable file and no file give null
    assert samples["sample_000"]["noise_correlation"] == pytest.approx(-0.02)
    assert [samples[f"sample_00{i}"]["noise_correlation"] for i in (1, 2, 3)] == [None, None, None]
    assert section["noise_correlation"]["n"] == 1 and section["noise_correlation"]["max_abs"] == pytest.approx(0.02)
    assert any("sample_002.json" in note for note in metrics["notes"])
    # re-drawn joint masks are counted from the same records
    assert {k: section["mask_draws"][k] for k in ("redrawn", "recorded", "max")} == {"redrawn": 1, "recorded": 1,
                                                                                      "max": 2}
    # the reference ranges come from the 3 real lesions, which all pass their own reference
    ref = section["reference"]
    real_volumes = sorted(r["lesion_cm3"] for r in metrics["real_cases"])
    assert ref["n"] == 3 and ref["accepted_volume_cm3"] == pytest.approx([0.5 * real_volumes[0],
                                                                         2.0 * real_volumes[-1]])
    assert ref["accepted_min_contrast"] == pytest.approx(1 + 0.5 * (ref["median_contrast"] - 1))
    assert section["real_summary"]["rate"] == 1.0
    assert {r["split"] for r in section["real_cases"]} == {"train", "test"}


def test_dice_reference_points_hand_computed():
    def line(lo: int, hi: int) -> np.ndarray:
        m = np.zeros((20, 1, 1), bool)
        m[lo:hi] = True
        return m

    a, b, c = line(0, 10), line(5, 15), line(10, 20)  # Dice(a, b) = Dice(b, c) = 0.5, Dice(a, c) = 0
    ref = dice_reference_points([a, b], [c])
    assert ref["real_test_vs_train"] == pytest.approx(0.5)  # c's best over {a, b}
    assert ref["train_leave_one_out"] == pytest.approx(0.5)  # a vs {b}, b vs {a}
    assert ref["memoriser_best_train"] == 1.0
    assert ref["memoriser_best_test"] == pytest.approx(0.25)  # mean of a vs c (0) and b vs c (0.5)
    alone = dice_reference_points([a], [])
    assert alone["train_leave_one_out"] is None and alone["real_test_vs_train"] is None
    assert alone["memoriser_best_test"] is None


def test_evaluate_generated_bad_folders(world, tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        evaluate_generated(tmp_path, world["data"], PREP)
    save_nifti(np.zeros((64, 64, 64), np.float32), CENTRED, tmp_path / "sample_009_flair.nii.gz")
    with pytest.raises(ValueError, match="sample_009 \\(missing mask\\)"):
        find_generated_pairs(tmp_path)


def _complete_run(world) -> tuple[Path, Path]:
    from neuromf.train.logging import plot_loss_curve

    stage = world["stage"]
    (stage / "mask_vae_test.json").write_text(json.dumps({
        "cases": [], "summary": {"mean_dice_vae": 0.91, "median_dice_vae": 0.92}, "threshold": 0.85,
        "decision": "vae"}))
    (stage / "ablation_lp.json").write_text(json.dumps({
        "per_channel_lp": {"p_img": 1.5, "p_mask": 2.0, "mean_dice_train": 0.5, "mean_dice_test": 0.31},
        "uniform_l2": {"p_img": 2.0, "p_mask": 2.0, "mean_dice_train": 0.45, "mean_dice_test": 0.28},
        "better": "per_channel_lp"}))
    run = world["root"] / "run"
    (run / "adapter").mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "adapter" / name).write_text("{}")
    AdapterMeta(mode="joint", base_checkpoint="base", base_sha256="-", base_preset="tiny", vae="-", vae_preset="tiny",
                vae_identity="-", scale_factor=1.0, preprocessing={}, latent_shape=[8, 8, 8, 8],
                channels={"image": 4, "mask": 4}, config={}, strategy="vae", trainable_params=12_000,
                total_params=3_000_000, lora_params=10_000).save(run / "adapter")
    rows = [{"epoch": e, "step": 2 * e, "loss": 1.0 / e, "raw": 1.0 / e, "lr": 5e-5} for e in range(1, 5)]
    with open(run / "losses.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_curve(rows, run / "loss_curve.png")
    return stage, run


def _table(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith(("| P7-", "| C-"))}


def _report(stage: Path, run: Path, out: Path, **kwargs) -> tuple[str, dict[str, list[str]]]:
    text = write_verification_report(stage, run, out / "phase_7" / "verification_report.md", **kwargs).read_text()
    return text, _table(text)


IN_PROCESS = {"forward_ok": True, "output_shape": [1, 8, 16, 16, 16], "trainable": 50, "total": 100_000,
              "fraction": 5e-4}


def _write_losses(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(run / "losses.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_checks_registry():
    # the spec's seven checks, then the conditional mode's two (beyond the spec, informational)
    assert [c.test for c in CHECKS] == [f"P7-T{i}" for i in range(1, 8)] + ["C-1", "C-2"]
    assert [c.critical for c in CHECKS] == [True] * 5 + [False] * 4
    assert len({c.description for c in CHECKS}) == 9


def test_report_all_present(world, metrics, tmp_path):
    stage, run = _complete_run(world)
    text, rows = _report(stage, run, tmp_path, max_montages=3)
    report_dir = tmp_path / "phase_7"
    assert list(rows) == [f"P7-T{i}" for i in range(1, 8)] + ["C-1", "C-2"]
    assert rows["C-1"][3] == rows["C-2"][3] == "NOT RUN"  # no conditional run in this stage folder
    for check in CHECKS:  # each row carries its registry description
        assert rows[check.test][1] == check.description.replace("|", "\\|")
    for test in ("P7-T1", "P7-T2", "P7-T3", "P7-T4"):
        assert rows[test][3].startswith("PASS"), rows[test]
    assert rows["P7-T6"][3] == rows["P7-T7"][3] == "INFO"
    assert "0.910" in rows["P7-T1"][4] and "vae" in rows["P7-T1"][4]
    assert "0.400%" in rows["P7-T3"][4]
    assert "epoch 1 = 1" in rows["P7-T4"][4] and "epoch 4 = 0.25" in rows["P7-T4"][4]
    assert "no fixed evaluation draw" in rows["P7-T4"][4]
    # P7-T5 is decided by the automatic figures: 3 of 4 generated pairs are lesion-like (>= 70%)
    section = metrics["lesion_like"]
    assert section["summary"]["n_lesion_like"] == 3
    assert rows["P7-T5"][3] == "PASS", rows["P7-T5"]
    assert "3/4 generated pairs lesion-like (75%" in rows["P7-T5"][4]
    assert "non-empty 75%" in rows["P7-T5"][4] and "max abs(r) 0.020" in rows["P7-T5"][4]
    assert "**Phase 7 PASSED** (P7-T1..P7-T5 all PASS)" in text
    # per-sample figures beside the montages
    assert "| sample_003 | 0.00 | 0 | n/a |" in text and "no (fails: non-empty" in text
    assert "| sample_000 |" in text and "| -0.020 | yes |" in text
    montages = sorted((report_dir / "montages").glob("*.png"))
    assert [p.stem for p in montages] == ["sample_000", "sample_001", "sample_002"]  # non-empty first
    assert "![sample_000](montages/sample_000.png)" in text
    assert (report_dir / "loss_curve.png").is_file() and "![loss curve](loss_curve.png)" in text
    # P7-T6: best-match Dice beside its reference points, with their definitions
    ref = metrics["dice"]["reference"]
    assert f"held-out vs train {ref['real_test_vs_train']:.3f}" in rows["P7-T6"][4]
    assert f"perfect memoriser vs test {ref['memoriser_best_test']:.3f} (vs train 1.000)" in rows["P7-T6"][4]
    assert "| perfect memoriser | 1.000 |" in text and "mask-representation loss" in text
    assert "(one seed)" in rows["P7-T7"][4]


def test_report_p7_t5_fails_on_non_lesions(world, metrics, tmp_path):
    """Scattered noise masks in two of four samples: 50% lesion-like < 70%, so P7-T5 FAILs and says why."""
    stage = tmp_path / "stage"
    shutil.copytree(world["stage"], stage)
    rng = np.random.default_rng(0)
    for sid in ("sample_001", "sample_002"):
        image = np.asarray(nib.load(str(stage / "generated" / f"{sid}_flair.nii.gz")).dataobj)
        _write_pair(stage / "generated", sid, image, rng.random(image.shape) > 0.995)
    out = evaluate_generated(stage / "generated", world["data"], PREP, out_json=stage / "metrics" / "metrics.json")
    samples = {s["id"]: s for s in out["lesion_like"]["samples"]}
    assert not samples["sample_001"]["lesion_like"] and "largest_share" in samples["sample_001"]["failed"]
    assert samples["sample_001"]["n_components"] > 50
    assert out["lesion_like"]["rate"] == 0.25 and out["lesion_like"]["meets_acceptance"] is False
    _, run = _complete_run(world)
    text, rows = _report(stage, run, tmp_path)
    assert rows["P7-T5"][3] == "FAIL"
    assert rows["P7-T5"][4].startswith("FAILED: only 25% lesion-like (< 70%")
    assert "largest component >= 80% 25%" in rows["P7-T5"][4]
    assert "**Phase 7 NOT PASSED**: P7-T5 not PASS" in text


def _edit_metrics(stage: Path, edit) -> None:
    path = stage / "metrics" / "metrics.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_report_p7_t5_noise_stale_and_missing_figures(world, metrics, tmp_path):
    _, run = _complete_run(world)
    stage = tmp_path / "stage"
    shutil.copytree(world["stage"], stage)

    def noisy(data: dict) -> None:  # every pair lesion-like, but the masks carry their starting noise
        for s in data["lesion_like"]["samples"]:
            s["lesion_like"], s["noise_correlation"] = True, 0.88
            s["criteria"] = {c: True for c in s["criteria"]}

    _edit_metrics(stage, noisy)
    _, rows = _report(stage, run, tmp_path / "a")
    assert rows["P7-T5"][3] == "FAIL" and "FAILED: noise correlation max abs(r) 0.880 >= 0.1" in rows["P7-T5"][4]
    assert "4/4 generated pairs lesion-like (100%" in rows["P7-T5"][4]
    # the report names the re-drawn masks evaluate counted (sample_000.json records 2 draws)
    assert "1/4 masks drawn again after an empty or too small first draw" in rows["P7-T5"][4]

    _edit_metrics(stage, lambda d: d["lesion_like"]["samples"].pop())  # scored before sample_003 existed
    _, rows = _report(stage, run, tmp_path / "b")
    assert rows["P7-T5"][3] == "FAIL" and "stale figures" in rows["P7-T5"][4]

    _edit_metrics(stage, lambda d: d.pop("lesion_like"))  # written by an older `neuromf evaluate`
    _, rows = _report(stage, run, tmp_path / "c")
    assert rows["P7-T5"][3] == "FAIL" and "no lesion_like section" in rows["P7-T5"][4]
    assert "4 montage(s) below" in rows["P7-T5"][4]  # the montages are still drawn
    assert "no reference points" not in rows["P7-T6"][4]

    (stage / "metrics" / "metrics.json").unlink()
    _, rows = _report(stage, run, tmp_path / "d")
    assert rows["P7-T5"][3] == "FAIL" and "no automatic figures: missing file" in rows["P7-T5"][4]


def test_report_p7_t4_fixed_evaluation_draw(tmp_path):
    stage, run = tmp_path / "stage", tmp_path / "run"
    stage.mkdir()
    # the training loss falls, but on the fixed draw the image part rises (issue 9's finding): FAIL
    rows = [{"epoch": e, "step": e, "loss": 1.0 / e, "raw": 1.0 / e, "eval_raw": 2.0 - 0.1 * e,
             "eval_raw_img": 0.5 + 0.01 * e, "eval_raw_mask": 1.5 - 0.1 * e, "eval_raw_lesion": 3.0 - 0.2 * e}
            for e in range(1, 4)]
    _write_losses(run, rows)
    _, table = _report(stage, run, tmp_path / "a", t2_t3=IN_PROCESS)
    figure = table["P7-T4"][4]
    assert table["P7-T4"][3] == "FAIL", figure
    assert "fixed evaluation draw, epoch 1 -> 3" in figure and "image 0.51 -> 0.53" in figure
    assert "mask 1.4 -> 1.2" in figure and "lesion voxels 2.8 -> 2.4" in figure
    assert figure.endswith("not lower: image")

    for r in rows:
        r["eval_raw_img"] = 0.6 - 0.01 * r["epoch"]
    _write_losses(run, rows)
    _, table = _report(stage, run, tmp_path / "b", t2_t3=IN_PROCESS)
    assert table["P7-T4"][3] == "PASS" and "not lower" not in table["P7-T4"][4]

    # an evaluation before training (epoch 0, no training means) is the reference; a part that was lower at an epoch
    # in between is named beside the comparison, which still decides
    zero = {"epoch": 0, "step": 0, "eval_raw": 2.5, "eval_raw_img": 0.7, "eval_raw_mask": 1.8, "eval_raw_lesion": 3.5}
    rows[1]["eval_raw_mask"] = 1.0
    _write_losses(run, [zero, *rows])
    _, table = _report(stage, run, tmp_path / "b0", t2_t3=IN_PROCESS)
    figure = table["P7-T4"][4]
    assert table["P7-T4"][3] == "PASS" and "epoch 0 -> 3" in figure and "mask 1.8 -> 1.2" in figure, figure
    assert figure.endswith("lowest in between: mask 1 at epoch 2")
    _write_losses(run, [{**zero, "eval_raw_img": 0.55}, *rows])
    _, table = _report(stage, run, tmp_path / "b1", t2_t3=IN_PROCESS)
    assert table["P7-T4"][3] == "FAIL" and table["P7-T4"][4].endswith("not lower: image"), table["P7-T4"][4]

    # conditional run: no mask part logged; the fixed draw evaluated on two epochs only (blank cells elsewhere)
    cond = [{"epoch": e, "step": e, "loss": 1.0, "raw": 1.0, "eval_raw": "" if e == 2 else 1.0 / e,
             "eval_raw_img": "" if e == 2 else 1.0 / e, "eval_raw_lesion": "" if e == 2 else 2.0 / e}
            for e in range(1, 4)]
    _write_losses(run, cond)
    _, table = _report(stage, run, tmp_path / "c", t2_t3=IN_PROCESS)
    assert table["P7-T4"][3] == "PASS" and "epoch 1 -> 3" in table["P7-T4"][4]
    assert "mask" not in table["P7-T4"][4]
    # the column exists but only one epoch was evaluated: no comparison, no PASS (no fallback to random batches)
    _write_losses(run, [{"epoch": 1, "loss": 2.0, "eval_raw": 1.0}, {"epoch": 2, "loss": 1.0, "eval_raw": ""}])
    _, table = _report(stage, run, tmp_path / "d", t2_t3=IN_PROCESS)
    assert table["P7-T4"][3] == "FAIL" and "1 epoch(s) with a fixed-draw evaluation" in table["P7-T4"][4]
    _write_losses(run, [{"epoch": 1, "loss": 2.0, "eval_raw": 1.0}, {"epoch": 2, "loss": 1.0, "eval_raw": "nan"}])
    _, table = _report(stage, run, tmp_path / "e", t2_t3=IN_PROCESS)
    assert table["P7-T4"][3] == "FAIL" and "not lower: total" in table["P7-T4"][4]


def test_report_names_what_each_check_judged(world, metrics, tmp_path):
    """The learning checks judge the run's adapter, the lesion checks the adapter the pairs record: a shipped one
    named as such, with a note above the table; pairs of the run's own adapter get no note."""
    from neuromf.models.adapter_meta import resolve_adapter_dir

    stage, run = _complete_run(world)
    stage = shutil.copytree(stage, tmp_path / "stage")
    shipped = resolve_adapter_dir("embedded", "joint")
    for record in (stage / "generated").glob("sample_00[01].json"):
        record.write_text(json.dumps({"seed": 0, "adapter": str(shipped)}))
    text, rows = _report(stage, run, tmp_path / "a")
    assert all(rows[t][6].startswith("the adapter this training run trained") for t in ("P7-T2", "P7-T3", "P7-T4"))
    assert "a fresh LoRA" in rows["P7-T4"][6]
    assert rows["P7-T5"][6] == rows["P7-T6"][6] == (
        f"pairs generated by shipped `{shipped.name}`, not by the adapter this training run trained")
    assert "P7-T2, P7-T3, P7-T4 judged the adapter this training run trained; P7-T5, P7-T6 judged pairs of another" \
        in text
    assert rows["P7-T7"][6] == rows["C-1"][6] == "-" and rows["P7-T1"][6].startswith("the VAE")  # C-1: no pairs
    for record in (stage / "generated").glob("sample_00[01].json"):  # the run's own pairs
        record.write_text(json.dumps({"seed": 0, "adapter": str(run / "adapter")}))
    text, rows = _report(stage, run, tmp_path / "b")
    assert rows["P7-T5"][6] == f"pairs generated by `{run / 'adapter'}`" and "Not every check" not in text


def test_report_p7_t7_seeds(tmp_path):
    stage, run = tmp_path / "stage", tmp_path / "run"
    stage.mkdir()
    (stage / "ablation_lp.json").write_text(json.dumps({
        "seeds": [0, 1, 2],
        "per_channel_lp": {"p_img": 1.5, "p_mask": 2.0, "mean_dice_test": [0.30, 0.32, 0.34]},
        "uniform_l2": {"p_img": 2.0, "p_mask": 2.0, "mean_dice_test": [0.20, 0.21, 0.22]},
        "better": "per_channel_lp"}))
    _, table = _report(stage, run, tmp_path / "a", t2_t3=IN_PROCESS)
    figure = table["P7-T7"][4]
    assert table["P7-T7"][3] == "INFO"
    assert "n = 3 / 3" in figure and "0.320 ± 0.020" in figure and "0.210 ± 0.010" in figure
    assert "null result" not in figure
    # per-seed reports under the top-level key, with a chosen metric; overlapping arms are a null result
    (stage / "ablation_lp.json").write_text(json.dumps({
        "metric": "lesion_like_rate",
        "seeds": [{"seed": s, "per_channel_lp": {"lesion_like_rate": v}, "uniform_l2": {"lesion_like_rate": w}}
                  for s, v, w in ((0, 0.5, 0.4), (1, 0.3, 0.5), (2, 0.4, 0.45))]}))
    _, table = _report(stage, run, tmp_path / "b", t2_t3=IN_PROCESS)
    figure = table["P7-T7"][4]
    assert "lesion_like_rate" in figure and "0.400 ± 0.100" in figure and "0.450 ± 0.050" in figure
    assert "within one sd: null result" in figure


def test_report_missing_inputs(tmp_path):
    stage, run = tmp_path / "stage", tmp_path / "run"
    stage.mkdir()
    (stage / "mask_vae_test.json").write_text("{not json")
    report = write_verification_report(stage, run, tmp_path / "out" / "report.md",
                                       t2_t3={"forward_ok": True, "output_shape": [1, 8, 16, 16, 16],
                                              "trainable": 50, "total": 1000, "fraction": 0.05})
    text = report.read_text()
    rows = _table(text)
    assert rows["P7-T1"][3] == "FAIL" and "cannot read input" in rows["P7-T1"][4]
    assert rows["P7-T2"][3] == "PASS"  # from the in-process check
    assert rows["P7-T3"][3] == "FAIL" and "5.000%" in rows["P7-T3"][4]
    assert rows["P7-T4"][3] == "FAIL" and "losses.csv" in rows["P7-T4"][4]
    assert rows["P7-T5"][3] == "FAIL" and "generated" in rows["P7-T5"][4]
    assert rows["P7-T6"][3] == "NOT RUN" and "metrics.json" in rows["P7-T6"][4]
    assert rows["P7-T7"][3] == "NOT RUN" and "not run" in rows["P7-T7"][4]
    assert "**Phase 7 NOT PASSED**" in text
    with pytest.raises(OSError):
        write_verification_report(stage, run, report / "nested.md")  # parent is a file: unwritable


def test_lesion_montage_empty_mask(tmp_path):
    image = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    png = lesion_montage(image, np.zeros((1, 16, 16, 16)), tmp_path / "m.png", title="empty")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_p_values_are_printed_with_two_significant_digits() -> None:
    from neuromf.eval.checks import ks_p

    assert [ks_p(p) for p in (0.0864514, 0.14, 1.0, 0.0039, 1.1e-18)] == ["0.086", "0.14", "1", "0.0039", "< 0.001"]
    assert ks_p(None) == ks_p(float("nan")) == "n/a"
