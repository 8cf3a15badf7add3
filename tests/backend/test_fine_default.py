"""The finer (2 mm) embedded default: generated phantoms by name, shipped models by name, and warm starts."""

from __future__ import annotations

import pytest
import torch
from testkit import TEST_SHAPE, TEST_SPACING, tiny_config

from neuromf.data import embedded
from neuromf.data.embedded import GeneratedPhantoms, generated_phantoms, resolve_data_dir
from neuromf.io.bids import discover_cases
from neuromf.train import run_to_end
from neuromf.weights import embedded_model

SMALL = GeneratedPhantoms(n_healthy=1, n_fcd=2, seed=5, shape=TEST_SHAPE, spacing=TEST_SPACING)


def test_generated_phantoms_are_made_once_and_keyed_by_their_settings(tmp_path):
    first = generated_phantoms(SMALL, tmp_path, progress=False)
    cases = discover_cases(first)
    assert len(cases) == 3 and sum(c.mask is not None for c in cases) == 2
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")}
    assert generated_phantoms(SMALL, tmp_path, progress=False) == first  # reused, not regenerated
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")} == stamps
    other = generated_phantoms(GeneratedPhantoms(1, 2, seed=6, shape=TEST_SHAPE, spacing=TEST_SPACING), tmp_path,
                               progress=False)
    assert other != first and other.parent == first.parent
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".generating-")]  # scratch folders removed


def test_an_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from neuromf.data import phantom

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom, "make_phantom_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        generated_phantoms(SMALL, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_embedded_fine_data_resolves_to_the_generated_set(tmp_path, monkeypatch):
    real = embedded.FINE_PHANTOMS
    # the real set: as many cases as ds004199 (85 FCD + 85 healthy), at <= 2 mm
    assert real.n_fcd >= 85 and real.n_healthy >= 85 and max(real.spacing) <= 2.0
    monkeypatch.setenv("NEUROMF_DATA", str(tmp_path))
    monkeypatch.setattr(embedded, "FINE_PHANTOMS", SMALL)  # same code path, 3 coarse cases instead of 170
    root = resolve_data_dir("embedded")
    assert root.parent == tmp_path and len(discover_cases(root)) == 3
    with pytest.warns(FutureWarning, match="'embedded-fine' is deprecated"):  # the old name: the same set
        assert resolve_data_dir("embedded-fine") == root
    assert resolve_data_dir("embedded-3mm").name == "fcd_phantoms"  # the committed 3 mm phantoms


def test_shipped_model_names(monkeypatch):
    from neuromf.weights import EMBEDDED_MODELS

    assert [embedded_model("embedded", k).name for k in ("vae", "base", "joint", "conditional")] == [
        "vae_fine", "base_fine", "joint_fine", "cond_fine"]
    assert [embedded_model("embedded-3mm", k).name for k in ("vae", "base", "joint", "conditional")] == [
        "vae_small", "base_small", "lora_demo", "cond_demo"]
    with pytest.warns(FutureWarning, match="use 'embedded'"):
        assert embedded_model("embedded-fine", "joint").name == "joint_fine"
    assert embedded_model("some/folder", "vae") is None
    monkeypatch.delitem(EMBEDDED_MODELS["joint"], "embedded-3mm")
    with pytest.raises(FileNotFoundError, match="no shipped joint model is called 'embedded-3mm'"):
        embedded_model("embedded-3mm", "joint")


# ------------------------------------------------------------------------------------------------ warm starts
def test_train_base_starts_from_init_from_weights(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir):
    from neuromf.models.flow_model import load_flow_model
    from neuromf.pipelines.stage1 import train_base

    source, _ = load_flow_model(tiny_base_dir)
    cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{"data.group": "hc", "model.init_from": str(tiny_base_dir),
                                                                "training.lr": 1e-12, "training.ema_decay": 0.0,
                                                                "training.max_steps": 1})
    run_to_end(train_base(cfg, progress=False))
    trained, meta = load_flow_model(tmp_path / "run")
    assert meta["init_from"] == str(tiny_base_dir)
    for (name, a), b in zip(source.state_dict().items(), trained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # lr ~0: the run's weights are the warm start's

    cold = tiny_config(tmp_path / "cold", phantom_dir, tiny_vae_dir, **{"data.group": "hc", "training.lr": 1e-12,
                                                                        "training.ema_decay": 0.0,
                                                                        "training.max_steps": 1})
    run_to_end(train_base(cold, progress=False))
    fresh, _ = load_flow_model(tmp_path / "cold" / "run")
    assert any(not torch.allclose(a, b) for a, b in zip(source.state_dict().values(), fresh.state_dict().values()))


def test_warm_start_from_another_architecture_is_refused(tiny_base_dir):
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.pipelines.stage1 import warm_start

    with pytest.raises(ValueError, match="model.init_from has a different architecture"):
        warm_start(tiny_base_dir, MeanFlowUNet(in_channels=8, preset="tiny"))


# ------------------------------------------------------------------------------------------ the shipped models
def _healthy_fine_phantoms(tmp_path, n: int = 6):
    """The first `n` healthy subjects of the fine set: a subject's volume depends only on (seed, group, index),
    so these are the same scans `embedded` holds, without generating all 170."""
    spec = GeneratedPhantoms(n_healthy=n, n_fcd=0, seed=embedded.FINE_PHANTOMS.seed,
                             shape=embedded.FINE_PHANTOMS.shape, spacing=embedded.FINE_PHANTOMS.spacing)
    return discover_cases(generated_phantoms(spec, tmp_path, progress=False))


def test_fine_models_name_each_other_and_their_cards_quote_their_sidecars():
    import json

    vae_meta = json.loads((embedded_model("embedded", "vae") / "model.json").read_text())
    base_meta = json.loads((embedded_model("embedded", "base") / "model.json").read_text())
    assert vae_meta["preprocessing"]["shape"] == [96, 96, 96] and vae_meta["preprocessing"]["spacing"] == [2, 2, 2]
    assert base_meta["vae"] == "embedded" and base_meta["latent_shape"] == [4, 24, 24, 24]
    q = vae_meta["held_out_quality"]
    assert q["ssim"] >= 0.90 and q["psnr_db"] >= 28.0  # the transfer target at the new grid
    card = (embedded_model("embedded", "vae") / "README.md").read_text()
    assert f"{q['ssim']:.3f}" in card and f"{q['psnr_db']:.1f}" in card
    for kind in ("vae", "base", "conditional", "joint"):
        directory = embedded_model("embedded", kind)
        assert (directory / "README.md").is_file()
        assert all(f.stat().st_size <= 15 * 2**20 for f in directory.glob("*.safetensors"))


def test_fine_base_samples_look_like_healthy_fine_brains(tmp_path):
    import numpy as np

    from neuromf.generation.images import generate_images
    from neuromf.io.nifti import Preprocessing, preprocess_image
    from neuromf.models.flow_model import load_flow_model

    _, meta = load_flow_model("embedded")
    prep = Preprocessing.from_dict(meta["preprocessing"])

    def stats(volume):
        brain = volume > 0.1
        return float(volume[brain].mean()), int(brain.sum())

    real = [stats(preprocess_image(c.image, prep).data[0].numpy()) for c in _healthy_fine_phantoms(tmp_path)]
    samples = [stats(v.image) for v in generate_images("embedded", n=2, steps=1, seed=0, device="cpu")]
    assert np.mean([s[0] for s in samples]) == pytest.approx(np.mean([r[0] for r in real]), rel=0.10)
    assert np.mean([s[1] for s in samples]) == pytest.approx(np.mean([r[1] for r in real]), rel=0.10)


def test_fine_conditional_adapter_generates_a_lesion_on_the_2mm_grid():
    from neuromf.eval.lesion_metrics import lesion_stats
    from neuromf.generation.conditional import generate_conditional_pairs
    from neuromf.models.adapter_meta import adapter_meta

    meta = adapter_meta("embedded", "conditional")
    assert meta.mode == "conditional" and meta.base_checkpoint == "embedded" and meta.data_dir == "embedded"
    with pytest.warns(FutureWarning):  # the deprecated name keeps its old meaning alone: the conditional adapter
        assert adapter_meta("embedded-fine") == meta
    pair = next(generate_conditional_pairs("embedded", n=1, steps=1, seed=0, device="cpu"))
    assert pair.image.shape == pair.mask.shape == (96, 96, 96)
    stats = lesion_stats(pair.image, pair.mask, (2.0, 2.0, 2.0))
    assert stats.inside_brain_share >= 0.9 and stats.contrast > 1.05


def test_fine_joint_adapter_draws_masks_that_the_conditional_adapter_renders():
    """The shipped 2 mm joint adapter on its own grid, and two-stage: the same masks, FLAIRs from `cond_fine`.
    (Two Euler steps to keep the test short; the card's figures use 32.)"""
    import json

    import numpy as np

    from neuromf.generation.joint import generate_pairs
    from neuromf.models.adapter_meta import SIDECAR, adapter_meta

    meta = adapter_meta("embedded")
    assert meta.mode == "joint" and meta.base_checkpoint == meta.data_dir == "embedded"
    assert meta.strategy == "sdf" and meta.mask_prediction == "x"
    sidecar = (embedded_model("embedded", "joint") / SIDECAR).read_text()
    assert "/tmp" not in sidecar and json.loads(sidecar)["config"]["loss"]["adaptive_power"] == 0.0
    plain = next(generate_pairs("embedded", n=1, steps=2, seed=0, device="cpu", method="euler", mask_draws=1))
    rendered = next(generate_pairs("embedded", n=1, steps=2, seed=0, device="cpu", method="euler",
                                   render="embedded", mask_draws=1))
    assert plain.image.shape == plain.mask.shape == rendered.image.shape == (96, 96, 96)
    assert np.array_equal(plain.mask, rendered.mask) and not np.allclose(plain.image, rendered.image, atol=1e-3)
    assert rendered.meta["rendered_by"].endswith("cond_fine")
    # the renderer's own guidance for joint masks, chosen apart from its conditional one
    assert rendered.meta["guidance"] == adapter_meta("embedded", "conditional").render_guidance_scale() == 1.2
