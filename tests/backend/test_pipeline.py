"""End-to-end backend pipelines on real NIfTI phantoms with tiny real models: stage 1, FCD dataset, mask test,
LoRA fine-tuning, joint generation, evaluation and the verification report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from testkit import TEST_LATENT, TEST_SHAPE, TEST_SPACING, coarse_prep, tiny_config

from neuromf.cli import main as cli
from neuromf.data.fcd_dataset import FCDDataset, downsample_mask, upsample_mask
from neuromf.eval.checks import fmt, ks_p
from neuromf.eval.mask_test import mask_vae_test, read_decision, save_mask_test
from neuromf.generation.joint import generate_pairs, write_generated_pairs
from neuromf.models.flow_model import load_flow_model
from neuromf.models.joint import check_adapter
from neuromf.pipelines.joint import train_lora
from neuromf.train import run_to_end
from neuromf.vae import MAISIVAEWrapper


def test_stage1_export_and_generate_cli(tiny_base_dir, tmp_path):
    model, meta = load_flow_model(tiny_base_dir)
    assert meta["latent_shape"] == [4, *TEST_LATENT] and meta["channels"] == {"image": 4, "mask": 0}
    assert (tiny_base_dir / "losses.csv").is_file() and (tiny_base_dir / "checkpoint.safetensors").is_file()
    out = tmp_path / "gen"
    assert cli(["generate", "--checkpoint", str(tiny_base_dir), "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    files = sorted(out.glob("sample_*_flair.nii.gz"))
    assert len(files) == 2
    img = nib.load(str(files[0]))
    assert img.shape == TEST_SHAPE and np.allclose(img.header.get_zooms(), TEST_SPACING)
    assert np.isfinite(img.get_fdata()).all()


def test_wrong_preset_base_checkpoint_is_refused(tiny_base_dir):
    with pytest.raises(ValueError, match="'tiny' UNet but the config asks for 'small'"):
        load_flow_model(tiny_base_dir, preset="small")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("strategy,mode,channels", [("vae", "nearest", 8), ("downsample", "nearest", 5),
                                                    ("downsample", "area", 5), ("downsample", "max", 5)])
def test_fcd_dataset_shapes(phantom_dir, tiny_vae_dir, shared_cache, strategy, mode, channels):
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir)
    ds = FCDDataset(phantom_dir, strategy, vae=vae, prep=coarse_prep(), cache_dir=shared_cache, downsample_mode=mode,
                    flip=True, split=None, return_volumes=True)
    assert len(ds) == 2 * len(ds.cases) == 8
    item = ds[1]
    assert item["z"].shape == (channels, *TEST_LATENT) and item["case_id"].endswith("_flip")
    assert item["image"].shape == item["mask"].shape == (1, *TEST_SHAPE)
    assert ds.latents().shape == (8, channels, *TEST_LATENT)
    if strategy == "downsample":
        low = torch.stack([ds[i]["z"][4] for i in range(len(ds))])
        assert low.min() == pytest.approx(-ds.mask_scale)  # background maps to -scale, lesion upwards
        if mode != "nearest":  # nearest may miss a small lesion on this coarse grid; area/max never do
            assert (low.flatten(1).max(dim=1).values > -ds.mask_scale).all()
    # flipped copy mirrors the mask left-right
    torch.testing.assert_close(ds[1]["mask"], ds[0]["mask"].flip(1))
    # a second dataset over the same cache encodes nothing
    again = FCDDataset(phantom_dir, strategy, vae=vae, prep=coarse_prep(), cache_dir=shared_cache,
                       downsample_mode=mode, flip=True, split=None)
    assert again.cache.stats()["misses"] == 0 and again.cache.stats()["hits"] == 8


def test_downsample_modes_numerics():
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[0, 0, :2, :4, :4] = 1  # half of the first 4x4x4 block
    assert downsample_mask(mask, "area")[0, 0, 0, 0, 0] == pytest.approx(0.5)
    assert downsample_mask(mask, "max")[0, 0, 0, 0, 0] == 1
    assert downsample_mask(mask, "nearest")[0, 0, 0, 0, 0] == 1  # picks the block's first voxel
    full = torch.zeros(1, 1, 8, 8, 8)
    full[0, 0, :4, :4, :4] = 1
    assert torch.equal(upsample_mask(downsample_mask(full, "area"))[0, 0, 1:3, 1:3, 1:3], torch.ones(2, 2, 2))


def test_fcd_dataset_without_fcd_cases_and_empty_mask(tmp_path, tiny_vae_dir, phantom_dir):
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset
    from neuromf.io.bids import DataError

    healthy = make_phantom_dataset(tmp_path / "hc", n_healthy=2, n_fcd=0, seed=1,
                                   cfg=PhantomConfig(shape=TEST_SHAPE, spacing=TEST_SPACING))
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir)
    with pytest.raises(DataError, match="FCD"):
        FCDDataset(healthy, "vae", vae=vae, prep=coarse_prep(), cache_dir=tmp_path / "c", split=None)
    # an empty mask: the case is skipped with a warning naming the file
    flat = tmp_path / "flat"
    flat.mkdir()
    roi = sorted(phantom_dir.glob("sub-*/anat/*_roi.nii.gz"))
    images = [next(r.parent.glob("*_FLAIR.nii.gz")) for r in roi[:2]]
    for i, (image, mask) in enumerate(zip(images, roi[:2])):
        (flat / f"case{i}_FLAIR.nii.gz").write_bytes(image.read_bytes())
        m = nib.load(str(mask))
        data = np.asarray(m.dataobj) * (0 if i == 0 else 1)
        nib.save(nib.Nifti1Image(data.astype(np.uint8), m.affine), str(flat / f"case{i}_roi.nii.gz"))
    with pytest.warns(UserWarning, match="case0_roi.nii.gz: empty lesion mask"):
        ds = FCDDataset(flat, "downsample", vae=vae, prep=coarse_prep(), cache_dir=tmp_path / "c2", split=None)
    assert len(ds) == 1


def test_mask_test_schema_and_decision(phantom_dir, tiny_vae_dir, tmp_path):
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir)
    seen = []
    result = mask_vae_test(phantom_dir, vae, coarse_prep(), on_case=seen.append)
    assert len(seen) == len(result["cases"]) == 4
    row = result["cases"][0]
    assert set(row) >= {"id", "lesion_cm3", "size_bin", "dice_vae", "dice_downsample"}
    assert set(row["dice_downsample"]) == {"nearest", "area", "max"}
    assert all(0 <= r["dice_vae"] <= 1 and r["lesion_cm3"] > 0 for r in result["cases"])
    mean_a = np.mean([r["dice_vae"] for r in result["cases"]])
    assert result["summary"]["mean_dice_vae"] == pytest.approx(mean_a)
    # an untrained VAE cannot carry a mask: the rule picks strategy B, as a signed distance when that round-trips
    # better than every binary downsampling
    summary = result["summary"]
    assert summary["mean_dice_sdf"] == pytest.approx(np.mean([r["dice_sdf"] for r in result["cases"]]))
    expected = "sdf" if summary["mean_dice_sdf"] > max(summary["mean_dice_downsample"].values()) else "downsample"
    assert mean_a < 0.85 and result["decision"] == expected
    assert not any(k.startswith("_") for r in seen + result["cases"] for k in r)  # no in-memory objects saved
    # ceilings: phantom lesions are hyperintense after preprocessing (no clip at the 99.5th percentile)
    ceilings = summary["ceilings"]
    assert ceilings["median_contrast_preprocessed"] > 1.1
    assert 0.0 <= ceilings["sdf_round_trip_lesion_like"] <= 1.0
    path = save_mask_test(result, tmp_path / "m.json")
    assert read_decision(path) == expected
    forced = dict(result, decision="vae")
    assert read_decision(save_mask_test(forced, tmp_path / "f.json")) == "vae"
    with pytest.raises(FileNotFoundError, match="neuromf mask-test"):
        read_decision(tmp_path / "missing.json")
    # through a latent cache: the same figures, and a training dataset on the grid reads the images' latents from it
    from neuromf.data.latents import make_cache
    from neuromf.io.bids import discover_cases

    first = [c for c in discover_cases(phantom_dir, group="fcd") if c.mask is not None][:1]
    cache = make_cache(tmp_path / "cache", vae, coarse_prep())
    cached = mask_vae_test(phantom_dir, vae, coarse_prep(), cases=first, cache=cache)
    assert cache.stats()["misses"] == 1 and cached["cases"] == result["cases"][:1]
    ds = FCDDataset(phantom_dir, "sdf", vae=vae, prep=coarse_prep(), cache_dir=tmp_path / "cache", split=None)
    assert ds.cache.stats() == {"hits": 1, "misses": 3, "rebuilt": 0}  # the tested case was not encoded again


def lora_cfg(tmp: Path, phantom_dir: Path, tiny_vae_dir: Path, mask_test: Path, **kw):
    values = {"data.mask_strategy": "auto", "data.mask_test": str(mask_test), "data.group": None,
              "data.downsample_mode": "area", "lora.rank": 4, "lora.alpha": 4.0, "loss.p_img": 1.5, "loss.p_mask": 2.0,
              "training.max_steps": 8, "training.lr": 5e-3, "training.warmup_steps": 1}
    values.update(kw)
    return tiny_config(tmp, phantom_dir, tiny_vae_dir, **values)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, phantom_dir, tiny_vae_dir, tiny_base_dir):
    tmp = tmp_path_factory.mktemp("lora")
    mask_test = save_mask_test({"decision": "downsample"}, tmp / "mask_vae_test.json")
    cfg = lora_cfg(tmp, phantom_dir, tiny_vae_dir, mask_test)
    events = []
    result = run_to_end(train_lora(cfg, tiny_base_dir, progress=False), events.append)
    return tmp, cfg, result, events


def test_train_lora_lowers_loss_and_exports_adapter(lora_run):
    tmp, cfg, result, events = lora_run
    assert result.step == 8 and not result.stopped
    adapter = result.export
    for name in ("adapter_config.json", "adapter_model.safetensors", "neuromf_adapter.json"):
        assert (adapter / name).is_file()
    meta = json.loads((adapter / "neuromf_adapter.json").read_text())
    assert meta["strategy"] == "downsample" and meta["channels"] == {"image": 4, "mask": 1}
    assert meta["trainable_params"] < meta["total_params"]
    steps = [e for e in events if e.kind == "step"]
    assert {"raw_img", "raw_mask"} <= set(steps[0].parts)
    first, last = np.mean([e.loss for e in steps[:2]]), np.mean([e.loss for e in steps[-2:]])
    assert last < first
    header = (result.out_dir / "losses.csv").read_text().splitlines()[0]
    assert "raw_mask" in header and (result.out_dir / "loss_curve.png").is_file()


def test_warm_start_trains_part_of_an_adapter_from_its_weights(lora_run, phantom_dir, tiny_vae_dir, tiny_base_dir,
                                                               tmp_path):
    """`lora.init_from` starts from a saved adapter's weights; `lora.train_only` trains the LoRA of those targets
    (and the widened convs) only: the other LoRA matrices leave the run as they came, and the adapter check counts
    what this run trained."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from neuromf.models.joint import build_joint_model

    tmp, _, source, _ = lora_run
    mask_test = tmp / "mask_vae_test.json"
    cfg = lora_cfg(tmp_path, phantom_dir, tiny_vae_dir, mask_test, **{
        "lora.init_from": str(source.export), "lora.train_only": ["to_q"], "training.max_steps": 2,
        "data.cache_dir": str(tmp / "cache")})  # the source run's latents
    before = load_file(str(source.export / "adapter_model.safetensors"))
    model, _ = build_joint_model(cfg, tiny_base_dir, n_mask=1)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == before.keys() and all(torch.equal(loaded[k], v) for k, v in before.items())
    result = run_to_end(train_lora(cfg, tiny_base_dir, progress=False))
    after = load_file(str(result.export / "adapter_model.safetensors"))

    def trains(key: str) -> bool:  # to_q's LoRA matrices and the widened convs (saved without "lora_")
        return "to_q.lora_" in key or "lora_" not in key

    for key, value in before.items():
        assert torch.equal(after[key], value) != trains(key), key
    meta = json.loads((result.export / "neuromf_adapter.json").read_text())
    q_only = sum(v.numel() for k, v in before.items() if trains(k))
    checks = check_adapter(result.export)
    assert meta["trainable_params"] == checks["trainable"] == q_only
    # the report's trainable-share row judges this run and names what the adapter it continued had trained
    from neuromf.eval.checks import CHECKS, ReportContext

    ctx = ReportContext(tmp_path, result.out_dir, tmp_path / "report", checks, 0)
    row = next(c for c in CHECKS if c.test == "P7-T3").run(ctx)
    source_meta = json.loads((source.export / "neuromf_adapter.json").read_text())
    assert f"trainable {q_only:,} /" in row.figure and "continued the adapter" in row.figure
    assert f"trained {source_meta['trainable_params']:,} = " in row.figure
    with pytest.raises(ValueError, match="lora.rank: 4 vs 8"):
        build_joint_model(lora_cfg(tmp_path, phantom_dir, tiny_vae_dir, mask_test, **{
            "lora.init_from": str(source.export), "lora.rank": 8}), tiny_base_dir, n_mask=1)


def test_generate_pairs_and_evaluate_and_verify(lora_run, phantom_dir, tmp_path, capsys):
    _, _, result, _ = lora_run
    out = tmp_path / "generated"
    paths = write_generated_pairs(result.export, out, n=3, seed=1, device="cpu")
    assert len(paths) == 9  # FLAIR + mask + provenance JSON per sample
    provenance = json.loads((out / "sample_002.json").read_text())
    assert provenance["index"] == 2 and abs(provenance["mask_noise_correlation"]) <= 1
    flair, mask = nib.load(str(out / "sample_000_flair.nii.gz")), nib.load(str(out / "sample_000_mask.nii.gz"))
    assert flair.shape == mask.shape == TEST_SHAPE
    np.testing.assert_allclose(flair.affine, mask.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    # the same seed reproduces the same pair, whatever the batch
    again = next(generate_pairs(result.export, n=1, seed=1, device="cpu"))
    np.testing.assert_allclose(again.image, flair.get_fdata(dtype=np.float32), atol=1e-5)
    checks = check_adapter(result.export)
    assert checks["forward_ok"] and checks["output_shape"] == [1, 5, *TEST_LATENT]
    stage = tmp_path / "stage"
    assert cli(["evaluate", str(out), "--adapter", str(result.export), "--data", str(phantom_dir),
                "--out", str(stage / "metrics" / "metrics.json")]) == 0  # the folder by position, as a user types it
    printed = capsys.readouterr().out
    with pytest.raises(SystemExit, match="give the generated pairs' folder once"):
        cli(["evaluate", str(out), "--generated", str(tmp_path / "other"), "--adapter", str(result.export)])
    metrics = json.loads((stage / "metrics" / "metrics.json").read_text())
    assert metrics["n_generated"] == 3
    # the summary line names the KS statistic and its p-value apart (a bare "KS 0.28" reads as a p-value)
    ks = metrics["lesion_like"]["summary"]
    assert f"contrast KS D {fmt(ks['contrast_ks_statistic'])} p {ks_p(ks.get('contrast_ks_pvalue'))}" in printed
    assert (stage / "metrics" / "metrics_sites.png").stat().st_size > 0  # where the lesions lie, beside the real
    import importlib.util

    spec = importlib.util.spec_from_file_location("pairs_grid", Path(__file__).parents[2] / "scripts" / "pairs_grid.py")
    pairs_grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs_grid)
    grid = tmp_path / "grid.png"
    assert pairs_grid.main([str(out), "--metrics", str(stage / "metrics" / "metrics.json"), "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0
    (stage / "generated").mkdir()
    for p in out.iterdir():
        (stage / "generated" / p.name).write_bytes(p.read_bytes())
    report = tmp_path / "phase_7" / "verification_report.md"
    assert cli(["verify", "--run", str(result.out_dir), "--stage-dir", str(stage), "--report", str(report)]) == 0
    text = report.read_text()
    for test_id in ("P7-T1", "P7-T2", "P7-T3", "P7-T4", "P7-T5", "P7-T6", "P7-T7"):
        assert test_id in text
    assert "| P7-T2 |" in text and "PASS" in text.split("| P7-T2 |")[1].split("\n")[0]


def test_x_prediction_joint_adapter_round_trips_and_samples_with_euler(tmp_path, phantom_dir, tiny_vae_dir,
                                                                       tiny_base_dir, shared_cache):
    """An sdf joint run with `lora.mask_prediction: x` and its skip (LoRA on ResBlock convs too) records both in its
    sidecar, the skip's centre being the training masks' mean; the loaded adapter reproduces the trained model, and
    `generate --sampler euler` samples a different, recorded path."""
    cfg = lora_cfg(tmp_path, phantom_dir, tiny_vae_dir, tmp_path / "unused.json", **{
        "data.mask_strategy": "sdf", "lora.mask_prediction": "x", "lora.mask_sigma_data": 0.5,
        "data.cache_dir": str(shared_cache),
        "lora.target_modules": ["to_q", "to_k", "to_v", "conv1.conv"], "training.max_steps": 3})
    result = run_to_end(train_lora(cfg, tiny_base_dir, progress=False))
    meta = json.loads((result.export / "neuromf_adapter.json").read_text())
    assert meta["mask_prediction"] == "x" and meta["strategy"] == "sdf"
    from neuromf.models.joint import load_joint_model

    model = load_joint_model(result.export, "cpu").model
    assert model.x_channels == meta["channels"]["mask"] and model.skip_channels == 0
    # sdf channels are tanh of the signed distance: almost everywhere the empty mask's -mask_scale
    assert meta["mask_sigma_data"] == 0.5 and -meta["mask_scale"] < meta["mask_mean"] < -0.8 * meta["mask_scale"]
    assert (model.x_sigma_data, model.x_mean) == (0.5, meta["mask_mean"])
    outputs = {}
    for sampler, steps in (("meanflow", "1"), ("euler", "4")):
        out = tmp_path / sampler
        assert cli(["generate", "--adapter", str(result.export), "--n", "1", "--steps", steps, "--sampler", sampler,
                    "--device", "cpu", "--out", str(out)]) == 0
        provenance = json.loads((out / "sample_000.json").read_text())
        assert provenance["sampler"] == sampler and provenance["steps"] == int(steps)
        outputs[sampler] = nib.load(str(out / "sample_000_flair.nii.gz")).get_fdata()
    assert np.abs(outputs["meanflow"] - outputs["euler"]).max() > 1e-4
    # joint guidance: recorded, 1 = the model itself (the adapter's default), refused outside the joint mode
    masks = {}
    for scale in ("1", "3"):
        out = tmp_path / f"guided{scale}"
        assert cli(["generate", "--adapter", str(result.export), "--n", "1", "--steps", "4", "--sampler", "euler",
                    "--joint-guidance", scale, "--device", "cpu", "--out", str(out)]) == 0
        assert json.loads((out / "sample_000.json").read_text())["joint_guidance"] == float(scale)
        masks[scale] = nib.load(str(out / "sample_000_flair.nii.gz")).get_fdata()
    np.testing.assert_array_equal(masks["1"], outputs["euler"])
    assert provenance["joint_guidance"] == 1.0
    with pytest.raises(SystemExit, match="joint-guidance"):
        cli(["generate", "--checkpoint", str(tiny_base_dir), "--joint-guidance", "2", "--out", str(tmp_path / "b")])

    # calibration: per scale the median volume of the drawn masks (empty = 0), pooled over seeds, vs the real
    # lesions' median
    from neuromf.eval.metrics import load_real_cases
    from neuromf.generation.joint import calibrate_joint_guidance, log_ratio_gap
    from neuromf.models.adapter_meta import AdapterMeta

    table = tmp_path / "calibration.json"
    assert cli(["calibrate-guidance", "--adapter", str(result.export), "--scales", "1", "4", "--n", "2", "--steps",
                "2", "--seeds", "1000", "1001", "--device", "cpu", "--data", str(phantom_dir), "--out", str(table),
                "--store"]) == 0
    calibration = json.loads(table.read_text())
    sidecar = AdapterMeta.load(result.export)
    assert sidecar.guidance == calibration["chosen"]  # --store: the adapter's default from now on
    real, _ = load_real_cases(phantom_dir, sidecar.prep)
    real_volumes = [float(r["mask"].sum()) * r["voxel_cm3"] for r in real]
    assert calibration["target_cm3"] == pytest.approx(np.median(real_volumes))
    rows = calibration["rows"]
    assert [row["guidance"] for row in rows] == [1.0, 4.0] and all(0 <= row["empty"] <= 4 for row in rows)
    for row in rows:  # two seeds of two masks, pooled
        assert len(row["volumes_cm3"]) == 4 and len(row["seed_medians_cm3"]) == 2
        assert row["median_cm3"] == pytest.approx(np.median(row["volumes_cm3"]))
    gaps = [abs(np.log(row["median_cm3"] / calibration["target_cm3"])) if row["median_cm3"] else np.inf
            for row in rows]
    assert calibration["chosen"] == rows[int(np.argmin(gaps))]["guidance"]
    with pytest.raises(ValueError, match="scale"):
        calibrate_joint_guidance(result.export, scales=(), device="cpu")
    with pytest.raises(ValueError, match="reference"):
        calibrate_joint_guidance(result.export, scales=(1.0,), device="cpu", reference="test")
    with pytest.raises(SystemExit, match="shipped adapter"):
        cli(["calibrate-guidance", "--adapter", "embedded", "--store"])
    # judged by ratio: twice and half the target are equally far, all-empty (median 0) never wins
    assert log_ratio_gap(8.1, 4.05) == pytest.approx(log_ratio_gap(2.025, 4.05)) == pytest.approx(np.log(2))
    assert log_ratio_gap(0.0, 4.05) == np.inf
    # a grid that misses the target on either side is flagged (the volume grows with the scale)
    from neuromf.generation.joint import target_outside_scales

    assert calibration["outside_range"] == target_outside_scales(rows, calibration["target_cm3"])
    # between two grid scales whose medians bracket the target: log-linear, exact for an exponential growth
    from neuromf.generation.joint import interpolate_scale

    grown = [{"guidance": g, "median_cm3": 2.0 * np.exp(5 * (g - 1))} for g in (1.0, 1.1, 1.2)]
    assert interpolate_scale(grown, 2.0 * np.exp(5 * 0.13)) == pytest.approx(1.13, abs=1e-3)
    assert interpolate_scale(grown, 1.0) is None and interpolate_scale(grown, 50.0) is None
    grid = [{"guidance": g, "median_cm3": v} for g, v in ((1.1, 99.0), (1.0, 48.0), (1.2, 188.0))]
    assert target_outside_scales(grid, 4.05) and not target_outside_scales(grid, 60.0)
    assert target_outside_scales(grid, 200.0)


def test_site_conditioned_joint_adapter_trains_saves_its_sites_and_generates_at_them(tmp_path, capsys, phantom_dir,
                                                                                    tiny_vae_dir, tiny_base_dir,
                                                                                    shared_cache, conditional_run):
    """`lora.site_condition`: the model takes one more input channel (the site blob), the adapter carries the
    training lesions' mask prior, and generation draws a site per pair from it, records it and conditions on it.
    Its masks also serve as the lesions inpainted into a healthy scan (`--mask-source joint`), at a site in that
    scan's own brain."""
    from neuromf.data.mask_prior import PRIOR, MaskPrior
    from neuromf.generation.joint import joint_velocity, sample_joint
    from neuromf.models.joint import load_joint_model
    from neuromf.models.site import draw_sites

    cfg = lora_cfg(tmp_path, phantom_dir, tiny_vae_dir, tmp_path / "unused.json", **{
        "data.mask_strategy": "sdf", "lora.mask_prediction": "x", "lora.site_condition": True,
        "data.cache_dir": str(shared_cache), "training.max_steps": 3})
    result = run_to_end(train_lora(cfg, tiny_base_dir, progress=False))
    meta = json.loads((result.export / "neuromf_adapter.json").read_text())
    assert meta["site_condition"] is True
    prior = MaskPrior.load(result.export / PRIOR)
    assert len(prior.lesions) == len([c for c in meta["train_cases"]])  # every phantom FCD case has a lesion
    joint = load_joint_model(result.export, "cpu")
    assert joint.model.model.conv_in.conv.in_channels == 4 + meta["channels"]["mask"] + 1
    assert check_adapter(result.export)["forward_ok"]
    out = tmp_path / "gen"
    assert cli(["generate", "--adapter", str(result.export), "--n", "2", "--steps", "2", "--sampler", "euler",
                "--seed", "5", "--device", "cpu", "--out", str(out)]) == 0
    assert "Expected time: about " in capsys.readouterr().err  # said before the run starts, on the CPU
    sites = [json.loads((out / f"sample_{i:03d}.json").read_text())["site_voxel"] for i in range(2)]
    np.testing.assert_allclose(sites, draw_sites(prior, 2, seed=5).numpy(), atol=0.05)
    # a given site (--site, used in turn) instead of a drawn one; off the grid or without site conditioning: refused
    given = tmp_path / "given"
    assert cli(["generate", "--adapter", str(result.export), "--n", "3", "--steps", "2", "--sampler", "euler",
                "--site", "10", "12", "14", "--site", "20", "8.5", "9", "--device", "cpu", "--out", str(given)]) == 0
    records = [json.loads((given / f"sample_{i:03d}.json").read_text()) for i in range(3)]
    assert [r["site_voxel"] for r in records] == [[10.0, 12.0, 14.0], [20.0, 8.5, 9.0], [10.0, 12.0, 14.0]]
    assert all(r["site_given"] for r in records) and not json.loads((out / "sample_000.json").read_text())["site_given"]
    grid = meta["preprocessing"]["shape"]
    assert cli(["generate", "--adapter", str(result.export), "--site", str(grid[0]), "1", "1", "--sampler", "euler",
                "--device", "cpu", "--out", str(tmp_path / "off")]) == 2
    assert "model grid" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--mode joint"):
        cli(["generate", "--checkpoint", str(tiny_base_dir), "--site", "1", "1", "1", "--out", str(tmp_path / "b")])
    noise = torch.randn(1, *meta["latent_shape"])
    with pytest.raises(ValueError, match="sites"):
        joint_velocity(joint, noise)
    with torch.no_grad():  # the trained site column makes the place matter
        at = [joint_velocity(joint, noise, sites=torch.tensor([site]))(noise, torch.zeros(1), torch.ones(1))
              for site in ([8.0, 10.0, 12.0], [20.0, 14.0, 10.0])]
    assert not torch.allclose(at[0], at[1])
    with pytest.warns(DeprecationWarning, match="JointModel.sample is deprecated"):  # the old method, one release
        old = [z for _, z, _ in joint.sample(1, 1, 5, torch.device("cpu"), "euler")]
    torch.testing.assert_close(old, [z for _, z, _ in sample_joint(joint, 1, 1, 5, torch.device("cpu"), "euler")])
    _inpaints_joint_masks(result.export, conditional_run.export, phantom_dir, tmp_path, capsys)


def _inpaints_joint_masks(joint_dir: Path, cond_dir: Path, phantom_dir: Path, tmp_path: Path, capsys) -> None:
    """`--mask-source joint`: the joint model draws the inpainted lesion at a site where its prior would centre one
    in the given brain; a draw that is empty or mostly outside the brain is redrawn, and after the last one the CLI
    refuses in one line with nothing written."""
    from neuromf.data.brain import depth_map
    from neuromf.generation.inpaint import draw_joint_mask
    from neuromf.generation.joint import MASK_DRAWS, sample_joint
    from neuromf.models.joint import load_joint_model

    joint = load_joint_model(joint_dir)
    brain = np.ones(joint.meta.prep.shape, dtype=bool)  # every voxel counts as brain: the first draw is kept
    mask, drawn = draw_joint_mask(joint, brain, seed=3, steps=2)
    centres = joint.prior.candidate_centres(brain, depth_map(brain, joint.prior.spacing))
    assert drawn["joint_draws"] == 1 and drawn["joint_seed"] == 3 and drawn["site_voxel"] in centres.tolist()
    _, z, sites = next(iter(sample_joint(joint, 1, 2, 3, torch.device("cpu"), "euler", 1.0, [drawn["site_voxel"]])))
    assert mask.any() and np.array_equal(mask, joint.mask(z)[0, 0].numpy().astype(np.uint8))  # the model's own draw

    from neuromf.io.bids import discover_cases

    healthy = discover_cases(phantom_dir, group="hc")[0].image
    base = ["generate", "--mode", "inpaint", "--adapter", str(cond_dir), "--image", str(healthy), "--steps", "1",
            "--device", "cpu"]
    capsys.readouterr()
    # this 3-step adapter draws its masks in the background of a real scan (0-1% inside its brain): refused
    assert cli(base + ["--mask-source", "joint", "--joint-adapter", str(joint_dir), "--joint-steps", "2",
                       "--out", str(tmp_path / "inpainted")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"drew no lesion inside this brain in {MASK_DRAWS} draws" in err and not (tmp_path / "inpainted").exists()
    # a mask and a joint draw at once, or --mask-source outside the inpaint mode: refused
    with pytest.raises(SystemExit, match="leave out --mask"):
        cli(base + ["--mask-source", "joint", "--mask", str(healthy), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="--mask-source are for --mode inpaint"):
        cli(["generate", "--adapter", str(joint_dir), "--mask-source", "joint", "--out", str(tmp_path / "y")])


def test_stop_leaves_adapter_and_resume_continues(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir, shared_cache):
    from threading import Event

    mask_test = save_mask_test({"decision": "vae"}, tmp_path / "mt.json")
    cfg = lora_cfg(tmp_path, phantom_dir, tiny_vae_dir, mask_test,
                   **{"training.max_steps": 6, "data.cache_dir": str(shared_cache)})
    stop = Event()

    def stop_at_2(event):
        if event.kind == "step" and event.step == 2:
            stop.set()

    result = run_to_end(train_lora(cfg, tiny_base_dir, stop=stop, progress=False), stop_at_2)
    assert result.stopped and result.step == 2 and (result.export / "adapter_model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        run_to_end(train_lora(cfg, tiny_base_dir, progress=False))
    with pytest.raises(ValueError, match="conflict"):
        run_to_end(train_lora(cfg, tiny_base_dir, resume=True, overwrite=True, progress=False))
    resumed = run_to_end(train_lora(cfg, tiny_base_dir, resume=True, progress=False))
    assert resumed.step == 6 and not resumed.stopped
    meta = json.loads((resumed.export / "neuromf_adapter.json").read_text())
    assert meta["strategy"] == "vae" and meta["channels"]["mask"] == 4


def test_cli_errors_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lrr: 1.0\n")
    assert cli(["train-base", "--config", str(bad)]) == 2
    assert "unknown key 'training.lrr'" in capsys.readouterr().err
    bad.write_text("training:\n  lr: fast\n")
    assert cli(["train-base", "--config", str(bad)]) == 2
    assert "'training.lr' must be a number" in capsys.readouterr().err
    assert cli(["check-data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["generate", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "base model not found" in capsys.readouterr().err
