"""Stage 2's two modes on tiny real models: the conditional mode (MONAI ControlNet, mask -> FLAIR) and the joint
mode with the signed-distance mask channels and the noise pass-through; CLI generation from a mask file."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from testkit import TEST_SHAPE, tiny_config, write_nifti

from neuromf.cli import main as cli
from neuromf.meanflow.loss import meanflow_target
from neuromf.models.controlnet import ConditionedFlowModel, controlnet_from_unet
from neuromf.models.unet import MeanFlowUNet
from neuromf.train import run_to_end


def _conditioned(seed: int = 0) -> tuple[MeanFlowUNet, ConditionedFlowModel]:
    torch.manual_seed(seed)
    unet = MeanFlowUNet(4, preset="tiny").eval()
    with torch.no_grad():  # MONAI zero-initialises the output conv: a fresh UNet would output 0 whatever the input
        for p in unet.out.parameters():
            p.normal_(0, 0.1)
    return unet, ConditionedFlowModel(unet, controlnet_from_unet(unet, (4, 8, 8))).eval()


def _mask_sensitive() -> ConditionedFlowModel:
    """A conditioned model whose output depends on the mask: its zero convolutions opened."""
    _, model = _conditioned()
    with torch.no_grad():
        for block in [*model.controlnet.controlnet_down_blocks, model.controlnet.controlnet_mid_block,
                      model.controlnet.controlnet_cond_embedding.conv_out]:
            for p in block.parameters():
                p.normal_(0, 1.0)
    return model


def test_controlnet_starts_as_the_base_model_and_trains_alone():
    unet, model = _conditioned()
    z, r, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([0.1, 0.0]), torch.tensor([0.6, 1.0])
    cond = torch.zeros(2, 1, 16, 16, 16)
    cond[:, :, 4:9, 4:9, 4:9] = 1
    with torch.no_grad():
        assert torch.allclose(model(z, r, t, cond), unet(z, r, t), atol=1e-6)  # zero convs: nothing added yet
    u, target = meanflow_target(lambda *a: model(*a, cond=cond), z, r, t, torch.randn_like(z))
    (u - target).pow(2).mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.controlnet.parameters())


def test_conditioned_model_depends_on_the_mask_and_its_jvp_matches_finite_differences():
    model = _mask_sensitive()
    z, r, t = torch.randn(1, 4, 4, 4, 4), torch.tensor([0.2]), torch.tensor([0.7])
    empty, lesion = torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)
    lesion[..., 5:10, 5:10, 5:10] = 1
    with torch.no_grad():
        assert (model(z, r, t, lesion) - model(z, r, t, empty)).abs().max() > 1e-3
    v = torch.randn_like(z)

    def f(z_, r_, t_):
        return model(z_, r_, t_, cond=lesion)

    _, dudt = torch.func.jvp(f, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    eps = 1e-3
    with torch.no_grad():
        fd = (f(z + eps * v, r, t + eps) - f(z - eps * v, r, t - eps)) / (2 * eps)
    assert torch.allclose(dudt, fd, atol=2e-3, rtol=1e-2)


def test_mask_guidance_extrapolates_from_the_empty_mask():
    """u_empty + s (u_mask - u_empty): s = 1 is the model itself, s = 0 the empty-mask model, s = 2 doubles what the
    mask changes; an empty mask is not changed by any s."""
    from neuromf.generation.guidance import guided_velocity

    model = _mask_sensitive()
    z, r, t = torch.randn(1, 4, 4, 4, 4), torch.tensor([0.2]), torch.tensor([0.9])
    cond = torch.zeros(1, 1, 16, 16, 16)
    cond[:, :, 4:9, 4:9, 4:9] = 1
    empty = torch.zeros_like(cond)
    with torch.no_grad():
        u_mask, u_empty = model(z, r, t, cond=cond), model(z, r, t, cond=empty)
        assert (u_mask - u_empty).abs().max() > 1e-3
        torch.testing.assert_close(guided_velocity(model, cond, 1.0)(z, r, t), u_mask)
        torch.testing.assert_close(guided_velocity(model, cond, 0.0)(z, r, t), u_empty)
        torch.testing.assert_close(guided_velocity(model, cond, 2.0)(z, r, t), 2 * u_mask - u_empty)
        torch.testing.assert_close(guided_velocity(model, empty, 3.0)(z, r, t), u_empty)
    with pytest.raises(ValueError, match="guidance"):
        guided_velocity(model, cond, -1.0)


def test_mask_passthrough_adds_the_input_to_the_mask_outputs():
    torch.manual_seed(0)
    unet = MeanFlowUNet(6, preset="tiny").eval()
    z, r, t = torch.randn(1, 6, 4, 4, 4), torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        plain = unet(z, r, t)
        unet.skip_channels = 2
        skipped = unet(z, r, t)
    assert torch.equal(skipped[:, :4], plain[:, :4])
    assert torch.allclose(skipped[:, 4:], plain[:, 4:] + z[:, 4:])


def test_conditional_training_exports_an_adapter_and_logs_a_fixed_draw(conditional_run):
    from neuromf.generation.conditional import load_conditional_model
    from neuromf.models.adapter_meta import SIDECAR

    adapter = conditional_run.export
    meta = json.loads((adapter / SIDECAR).read_text())
    assert meta["mode"] == "conditional" and meta["n_healthy"] > 0
    header = (conditional_run.out_dir / "losses.csv").read_text().splitlines()[0].split(",")
    assert {"raw_lesion", "eval_raw", "eval_raw_img", "eval_raw_lesion"} <= set(header)
    loaded = load_conditional_model(adapter)
    trained = {k: v for k, v in loaded.model.controlnet.state_dict().items() if "controlnet_mid_block" in k}
    assert any(v.abs().sum() > 0 for v in trained.values())  # the zero convs moved
    mask = loaded.prior.sample(np.random.default_rng(0))
    assert mask.shape == TEST_SHAPE and mask.any()


def test_generate_conditional_from_a_mask_file_and_from_the_prior(conditional_run, phantom_dir, tmp_path):
    from neuromf.io.bids import discover_cases

    case = next(c for c in discover_cases(phantom_dir, group="fcd") if c.mask is not None)
    before = case.mask.read_bytes()
    out = tmp_path / "given"
    assert cli(["generate", "--adapter", str(conditional_run.export), "--mode", "conditional",
                "--mask", str(case.mask), "--image", str(case.image), "--out", str(out), "--device", "cpu"]) == 0
    flair, mask = nib.load(out / "sample_000_flair.nii.gz"), nib.load(out / "sample_000_mask.nii.gz")
    assert flair.shape == TEST_SHAPE and np.allclose(flair.affine, mask.affine)
    assert np.asarray(mask.dataobj).any() and np.isfinite(np.asarray(flair.dataobj)).all()
    assert json.loads((out / "sample_000.json").read_text())["mask_source"] == "given"
    assert case.mask.read_bytes() == before  # inputs are never modified
    prior_out = tmp_path / "prior"
    assert cli(["generate", "--adapter", str(conditional_run.export), "--n", "2", "--out", str(prior_out),
                "--device", "cpu"]) == 0  # auto mode finds the conditional adapter
    masks = [np.asarray(nib.load(prior_out / f"sample_00{i}_mask.nii.gz").dataobj) for i in range(2)]
    assert all(m.any() for m in masks) and not np.array_equal(masks[0], masks[1])
    placed = [json.loads((prior_out / f"sample_00{i}.json").read_text())["placed_in"] for i in range(2)]
    assert set(placed) <= {"generated brain", "reference brain"}


def test_an_adapter_sidecar_sets_its_default_guidance(conditional_run, tmp_path):
    """`guidance` in the sidecar (set from an adapter's measurements) is what generation uses unless told
    otherwise, and what each pair records; a negative or non-numeric value is refused when the adapter loads."""
    from safetensors.torch import load_file, save_file

    from neuromf.generation.conditional import generate_conditional_pairs, load_conditional_model, pair_noise
    from neuromf.models.adapter_meta import CONTROLNET_WEIGHTS, SIDECAR
    from neuromf.weights import WeightFileError

    adapter = tmp_path / "adapter"
    shutil.copytree(conditional_run.export, adapter)
    weights = load_file(str(adapter / CONTROLNET_WEIGHTS))  # 2 training steps: open its zero convs
    zero_convs = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    generator = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(v.shape, generator=generator).to(v.dtype)
               if k.startswith(zero_convs) else v for k, v in weights.items()}, str(adapter / CONTROLNET_WEIGHTS))
    sidecar = json.loads((adapter / SIDECAR).read_text())
    assert sidecar["guidance"] == 1.0  # what training writes
    (adapter / SIDECAR).write_text(json.dumps({**sidecar, "guidance": 2.0}))
    cond = load_conditional_model(adapter)
    mask = np.zeros(cond.prep.shape, np.uint8)
    mask[10:16, 10:16, 10:16] = 1
    pair = next(generate_conditional_pairs(adapter, masks=[mask], device="cpu"))
    noise = pair_noise(cond.meta.latent_shape, 0, 0)
    assert pair.meta["guidance"] == 2.0
    np.testing.assert_allclose(pair.image, cond.generate(mask, noise, guidance=2.0), atol=1e-5)
    told = next(generate_conditional_pairs(adapter, masks=[mask], device="cpu", guidance=1.0))
    assert told.meta["guidance"] == 1.0 and not np.allclose(told.image, pair.image, atol=1e-4)
    for bad in (-1.0, "strong", True):
        (adapter / SIDECAR).write_text(json.dumps({**sidecar, "guidance": bad}))
        with pytest.raises(WeightFileError, match="guidance"):
            load_conditional_model(adapter)


def test_generate_refuses_a_mode_the_adapter_cannot_do(conditional_run, tmp_path, capsys):
    code = cli(["generate", "--adapter", str(conditional_run.export), "--mode", "joint", "--out", str(tmp_path)])
    assert code != 0 and "conditional adapter cannot generate in joint mode" in capsys.readouterr().err
    empty = write_nifti(tmp_path / "empty_roi.nii.gz", np.zeros((20, 20, 20), np.uint8), np.diag([2, 2, 2, 1.0]))
    code = cli(["generate", "--adapter", str(conditional_run.export), "--mask", str(empty),
                "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "empty_roi.nii.gz" in err and "empty" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def joint_sdf_run(tmp_path_factory, phantom_dir, tiny_vae_dir, tiny_base_dir):
    """A joint sdf adapter on the same tiny base as `conditional_run`."""
    from neuromf.pipelines.joint import train_lora

    cfg = tiny_config(tmp_path_factory.mktemp("joint_sdf"), phantom_dir, tiny_vae_dir,
                      **{"data.mask_strategy": "sdf", "loss.lesion_weight": 20.0})
    return run_to_end(train_lora(cfg, tiny_base_dir, progress=False))


def test_joint_sdf_mode_trains_generates_and_records_noise_correlation(joint_sdf_run, tmp_path):
    from neuromf.generation.joint import write_generated_pairs
    from neuromf.models.joint import load_joint_model

    result = joint_sdf_run
    joint = load_joint_model(result.export)
    assert joint.strategy == "sdf" and joint.meta.n_mask == 8
    assert joint.model.skip_channels == 8  # the pass-through survives saving and loading
    write_generated_pairs(result.export, tmp_path / "gen", n=2)
    meta = json.loads((tmp_path / "gen" / "sample_001.json").read_text())
    assert -1.0 <= meta["mask_noise_correlation"] <= 1.0 and meta["strategy"] == "sdf"
    assert "rendered_by" not in meta
    header = (result.out_dir / "losses.csv").read_text().splitlines()[0].split(",")
    assert {"raw_mask", "raw_lesion", "eval_raw_mask", "eval_raw_lesion"} <= set(header)


def test_joint_masks_rendered_by_a_conditional_adapter(joint_sdf_run, conditional_run, tmp_path, capsys):
    """Two-stage synthesis: the masks are the joint model's own (same seed, same masks), the FLAIR is the
    ControlNet's rendering of that mask from the pair's image noise."""
    from neuromf.generation.conditional import load_conditional_model
    from neuromf.generation.joint import generate_pairs
    from neuromf.models.adapter_meta import adapter_meta

    joint_sdf_adapter = joint_sdf_run.export
    plain = list(generate_pairs(joint_sdf_adapter, n=2, steps=2, seed=3, device="cpu", method="euler"))
    out = tmp_path / "rendered"
    assert cli(["generate", "--adapter", str(joint_sdf_adapter), "--render", str(conditional_run.export),
                "--n", "2", "--steps", "2", "--sampler", "euler", "--seed", "3", "--out", str(out),
                "--device", "cpu"]) == 0
    cond = load_conditional_model(conditional_run.export)
    joint_shape = adapter_meta(joint_sdf_run.export, "joint").latent_shape
    noise = torch.randn((2, *joint_shape), generator=torch.Generator().manual_seed(3))  # as sample_latents draws it
    for i, pair in enumerate(plain):
        mask = np.asarray(nib.load(out / f"sample_00{i}_mask.nii.gz").dataobj)
        flair = np.asarray(nib.load(out / f"sample_00{i}_flair.nii.gz").dataobj, dtype=np.float32)
        meta = json.loads((out / f"sample_00{i}.json").read_text())
        assert np.array_equal(mask, pair.mask) and meta["mode"] == "joint"
        assert meta["rendered_by"] == str(conditional_run.export.resolve())
        expected = cond.generate(pair.mask, noise[i, :4], steps=2, method="euler")
        np.testing.assert_allclose(flair, expected, atol=1e-4)
        assert not np.allclose(flair, pair.image, atol=1e-3)  # the joint image was replaced
    import neuromf

    scripted = neuromf.generate_pairs(joint_sdf_adapter, n=2, steps=2, seed=3, device="cpu", method="euler",
                                      render=conditional_run.export)  # the Python API renders as the CLI does
    for i, pair in enumerate(scripted):
        assert np.array_equal(pair.mask, np.asarray(nib.load(out / f"sample_00{i}_mask.nii.gz").dataobj))
        np.testing.assert_allclose(pair.image, np.asarray(nib.load(out / f"sample_00{i}_flair.nii.gz").dataobj),
                                   atol=1e-4)
        assert pair.meta["rendered_by"] == str(conditional_run.export.resolve())
    with pytest.raises(ValueError, match="render, joint_guidance, sites and mask_draws are for a joint adapter"):
        neuromf.generate_pairs(conditional_run.export, mode="conditional", render=conditional_run.export)
    with pytest.raises(SystemExit, match="--render renders the masks of a joint adapter"):
        cli(["generate", "--adapter", str(conditional_run.export), "--mode", "conditional",
             "--render", str(conditional_run.export), "--out", str(tmp_path / "o")])
    # --render means joint mode: a conditional adapter given as the joint one is refused by name
    assert cli(["generate", "--adapter", str(conditional_run.export), "--render", str(conditional_run.export),
                "--out", str(tmp_path / "o")]) != 0
    assert "cannot generate in joint mode" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--guidance scales a conditional adapter"):
        cli(["generate", "--adapter", str(joint_sdf_adapter), "--guidance", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="not a NeuroMF conditional adapter"):
        next(generate_pairs(joint_sdf_adapter, n=1, device="cpu", render=joint_sdf_adapter))


def test_small_joint_masks_are_drawn_again_from_fresh_noise(joint_sdf_run, tmp_path):
    """A joint mask smaller than the smallest lesion the lesion check accepts (or empty) is drawn again from noise
    seeded by (seed, pair, draw); pairs whose first mask is large enough keep it, and the last draw is kept."""
    from neuromf.generation.joint import MASK_DRAWS, derived_seed, generate_pairs, sample_joint
    from neuromf.models.joint import load_joint_model

    adapter = tmp_path / "adapter"
    shutil.copytree(joint_sdf_run.export, adapter)
    kwargs = {"n": 2, "steps": 1, "seed": 3, "device": "cpu", "method": "euler"}
    first = list(generate_pairs(adapter, mask_draws=1, **kwargs))
    # no lesion reference in the folder: only empty masks are drawn again
    again = list(generate_pairs(adapter, **kwargs))
    for one, other in zip(first, again, strict=True):
        if one.mask.any():
            assert other.meta["mask_draws"] == 1 and "draw_seed" not in other.meta
            assert np.array_equal(one.mask, other.mask) and np.array_equal(one.image, other.image)
        else:
            assert other.meta["mask_draws"] > 1 and (other.mask.any() or other.meta["mask_draws"] == MASK_DRAWS)
    # a reference whose smallest lesion no mask of this grid reaches: every pair takes every draw, keeps the last
    (adapter / "lesion_reference.json").write_text(json.dumps(
        {"min_volume_cm3": 1e9, "max_volume_cm3": 2e9, "min_depth_mm": 0.0, "max_depth_mm": 50.0,
         "median_contrast": 1.25}))
    joint = load_joint_model(adapter)
    for i, pair in enumerate(generate_pairs(adapter, **kwargs)):
        seed = derived_seed(3, i, MASK_DRAWS - 1)
        assert pair.meta["mask_draws"] == MASK_DRAWS and pair.meta["draw_seed"] == seed
        _, z, _ = next(iter(sample_joint(joint, 1, 1, seed, torch.device("cpu"), "euler")))
        assert np.array_equal(pair.mask, joint.mask(z)[0, 0].numpy().astype(np.uint8))  # that draw's own mask
    assert len({derived_seed(3, i, k) for i in range(2) for k in range(1, MASK_DRAWS)}) == 2 * (MASK_DRAWS - 1)
    with pytest.raises(SystemExit, match="--mask-draws re-draws a joint adapter's small masks"):
        cli(["generate", "--adapter", "embedded", "--mode", "conditional", "--mask-draws", "2", "--out",
             str(tmp_path / "o")])


def test_a_renderer_on_another_base_or_grid_is_refused(joint_sdf_run, conditional_run):
    """A FLAIR rendered from another base model or on another grid would not belong to the joint mask."""
    import dataclasses

    from neuromf.generation.joint import load_renderer
    from neuromf.models.adapter_meta import adapter_meta

    joint = adapter_meta(joint_sdf_run.export, "joint")
    assert load_renderer(conditional_run.export, joint, torch.device("cpu")).meta.mode == "conditional"
    other_base = dataclasses.replace(joint, base_sha256="0" * 64)
    with pytest.raises(ValueError, match="trained on another base model"):
        load_renderer(conditional_run.export, other_base, torch.device("cpu"))
    other_grid = dataclasses.replace(joint, preprocessing={**joint.preprocessing, "shape": [48, 48, 48]})
    with pytest.raises(ValueError, match="grid"):
        load_renderer(conditional_run.export, other_grid, torch.device("cpu"))


def test_empty_mask_control_measures_what_the_mask_adds(conditional_run, phantom_dir, tmp_path):
    """The control regenerates each pair's FLAIR from its noise with an empty mask: its contrast in the mask region
    is what the placement alone gives. A FLAIR that ignores the mask (here: the control itself written as the
    pair's FLAIR) must show a gain of exactly 0."""
    from neuromf.eval.lesion_metrics import lesion_stats
    from neuromf.generation.conditional import empty_mask_control, load_conditional_model, pair_noise

    out = tmp_path / "pairs"
    assert cli(["generate", "--adapter", str(conditional_run.export), "--n", "2", "--out", str(out),
                "--device", "cpu"]) == 0
    control = empty_mask_control(conditional_run.export, out, device="cpu")
    assert control["n"] == 2
    cond = load_conditional_model(conditional_run.export)
    for i, row in enumerate(control["samples"]):
        flair = np.asarray(nib.load(out / f"sample_00{i}_flair.nii.gz").dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(out / f"sample_00{i}_mask.nii.gz").dataobj) > 0
        empty = cond.generate(np.zeros(mask.shape, np.uint8), pair_noise(cond.meta.latent_shape, 0, i), 1)
        spacing = cond.prep.spacing
        assert row["contrast"] == pytest.approx(lesion_stats(flair, mask, spacing).contrast, rel=1e-4)
        assert row["contrast_empty_mask"] == pytest.approx(lesion_stats(empty, mask, spacing).contrast, rel=1e-4)
        assert row["gain"] == pytest.approx(row["contrast"] - row["contrast_empty_mask"])
        # a FLAIR that does not depend on the mask: the control finds no gain
        img = nib.load(out / f"sample_00{i}_flair.nii.gz")
        nib.save(nib.Nifti1Image(empty, img.affine), str(out / f"sample_00{i}_flair.nii.gz"))
    again = empty_mask_control(conditional_run.export, out, device="cpu")
    assert all(abs(r["gain"]) < 1e-4 for r in again["samples"])

    (out / "sample_001.json").write_text(json.dumps({"mode": "joint"}))  # not a conditional pair: skipped
    report = tmp_path / "metrics.json"
    assert cli(["evaluate", "--adapter", str(conditional_run.export), "--generated", str(out), "--data",
                str(phantom_dir), "--out", str(report), "--empty-mask-control", "--device", "cpu"]) == 0
    written = json.loads(report.read_text())
    assert written["empty_mask_control"]["n"] == 1 and "lesion_like" in written
    # the verification report's conditional row carries the control beside the lesion-like rate
    from neuromf.eval.report import write_verification_report

    stage = tmp_path / "stage"
    (stage / "conditional").mkdir(parents=True)
    shutil.copytree(out, stage / "conditional" / "generated")
    shutil.copy(report, stage / "conditional" / "metrics.json")
    text = write_verification_report(stage, conditional_run.out_dir, tmp_path / "phase_7" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| C-1 |"))
    gain = written["empty_mask_control"]["median_gain"]
    assert "empty-mask control (1 pairs, same noise, no lesion)" in row and f"median {gain:.3f}" in row
