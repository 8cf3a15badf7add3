"""Evaluation of generated pairs (`neuromf.eval.metrics`) and the Phase 7 verification report (`.report`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuromf.eval.metrics import (
    dice,
    evaluate_generated,
    find_generated_pairs,
    lesion_contrast,
    ms_ssim,
    ms_ssim_settings,
)
from neuromf.eval.report import lesion_montage, write_verification_report
from neuromf.io.nifti import Preprocessing, preprocess_pair, save_nifti

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
    div = metrics["diversity"]
    assert div["n_pairs"] == 6 and 0.0 < div["mean_pairwise_ms_ssim"] <= 1.0


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
    (run / "adapter" / "neuromf_adapter.json").write_text(json.dumps({
        "strategy": "vae", "channels": {"image": 4, "mask": 4}, "trainable_params": 12_000,
        "total_params": 3_000_000, "lora_params": 10_000}))
    rows = [{"epoch": e, "step": 2 * e, "loss": 1.0 / e, "raw": 1.0 / e, "lr": 5e-5} for e in range(1, 5)]
    with open(run / "losses.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_loss_curve(rows, run / "loss_curve.png")
    return stage, run


def _table(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| P7-")}


def test_report_all_present(world, metrics, tmp_path):
    stage, run = _complete_run(world)
    report = write_verification_report(stage, run, tmp_path / "phase_7" / "verification_report.md",
                                       max_montages=3)
    text = report.read_text()
    rows = _table(text)
    assert list(rows) == [f"P7-T{i}" for i in range(1, 8)]
    for test in ("P7-T1", "P7-T2", "P7-T3", "P7-T4"):
        assert rows[test][3].startswith("PASS"), rows[test]
    assert rows["P7-T5"][3] == "REVIEW (visual inspection)"
    assert rows["P7-T6"][3] == rows["P7-T7"][3] == "INFO"
    assert "0.910" in rows["P7-T1"][4] and "vae" in rows["P7-T1"][4]
    assert "0.400%" in rows["P7-T3"][4]
    assert "epoch 1 = 1" in rows["P7-T4"][4] and "epoch 4 = 0.25" in rows["P7-T4"][4]
    assert "automatic checks PASS; P7-T5 awaits visual inspection" in text
    montages = sorted((report.parent / "montages").glob("*.png"))
    assert [p.stem for p in montages] == ["sample_000", "sample_001", "sample_002"]  # non-empty first
    assert "![sample_000](montages/sample_000.png)" in text
    assert (report.parent / "loss_curve.png").is_file() and "![loss curve](loss_curve.png)" in text


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
