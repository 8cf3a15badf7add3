"""Scanner texture on decodes: the noise estimator, the Rician texture and its fit against real sharpness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from neuromf.data.texture import add_texture, noise_level
from neuromf.eval.realism import brain_interior, fit_texture_sigma, sharpness

SIGMA = 0.03


def smooth_brain(seed: int, shape: tuple[int, int, int] = (40, 40, 40)) -> np.ndarray:
    """A skull-stripped-like volume: smooth tissue ~0.5-0.9 inside a ball, exactly 0 outside."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    ball = (grid ** 2).sum(0) < 0.8
    tissue = 0.7 + 0.2 * ndimage.gaussian_filter(rng.standard_normal(shape), 4) / 0.05
    return np.where(ball, np.clip(tissue, 0.4, 1.0), 0.0).astype(np.float32)


def test_noise_level_recovers_the_added_noise():
    clean = smooth_brain(0)
    noisy = clean + np.random.default_rng(1).standard_normal(clean.shape).astype(np.float32) * SIGMA
    inside = brain_interior(clean)
    assert noise_level(noisy, inside) == pytest.approx(SIGMA, rel=0.1)
    assert noise_level(clean, inside) < 0.2 * SIGMA


def test_add_texture_keeps_the_background_and_the_input():
    clean = smooth_brain(2)
    before = clean.copy()
    out = add_texture(clean, SIGMA, np.random.default_rng(3))
    np.testing.assert_array_equal(clean, before)  # the input is not modified
    outside = clean == 0
    np.testing.assert_array_equal(out[outside], 0.0)
    bright = brain_interior(clean) & (clean > 0.5)
    # Rician magnitude of a bright voxel: ~ value + small bias, spread ~ sigma
    assert np.std(out[bright] - clean[bright]) == pytest.approx(SIGMA, rel=0.1)
    assert abs(np.mean(out[bright] - clean[bright])) < 0.2 * SIGMA
    np.testing.assert_array_equal(out, add_texture(clean, SIGMA, np.random.default_rng(3)))  # seeded
    np.testing.assert_array_equal(add_texture(clean, 0.0, np.random.default_rng(3)), clean)


@pytest.mark.parametrize("sigma", [float("nan"), -0.01, 0.9])
def test_add_texture_refuses_a_bad_sigma(sigma):
    with pytest.raises(ValueError, match="texture sigma"):
        add_texture(smooth_brain(0), sigma, np.random.default_rng(0))


def test_fit_texture_sigma_finds_the_level_that_restores_sharpness():
    """Originals = smooth anatomy + Rician noise; 'decodes' = the smooth anatomy alone: the fit recovers a level
    near the noise's, and the textured decodes are as sharp as the originals."""
    clean = [smooth_brain(seed) for seed in range(3)]
    originals = torch.stack([torch.from_numpy(add_texture(c, SIGMA, np.random.default_rng(10 + i)))[None]
                             for i, c in enumerate(clean)])
    decodes = torch.stack([torch.from_numpy(c)[None] for c in clean])
    fit = fit_texture_sigma(originals, decodes, seed=5)
    assert fit["sharpness_ratio_untextured"] < 0.5
    assert fit["sharpness_ratio"] == pytest.approx(1.0, abs=0.02)
    assert fit["sigma"] == pytest.approx(SIGMA, rel=0.1)
    masks = [brain_interior(o) for o in originals]
    assert sharpness(originals[0], masks[0]) > 2 * sharpness(decodes[0], masks[0])


@pytest.mark.parametrize("value", ["0.03", -0.01, float("nan"), True, 0.9])
def test_vae_sidecar_refuses_a_bad_texture_sigma(tmp_path, tiny_vae_dir, value):
    import json
    import shutil

    from neuromf.vae import MAISIVAEWrapper
    from neuromf.weights import WeightFileError

    vae_dir = tmp_path / "vae"
    shutil.copytree(tiny_vae_dir, vae_dir)
    meta = json.loads((vae_dir / "model.json").read_text())
    (vae_dir / "model.json").write_text(json.dumps({**meta, "texture_sigma": value}))
    with pytest.raises(WeightFileError, match=r"model\.json: texture_sigma"):
        MAISIVAEWrapper.from_file(vae_dir, preset="tiny")
    (vae_dir / "model.json").write_text(json.dumps({**meta, "texture_sigma": 0.03}))
    assert MAISIVAEWrapper.from_file(vae_dir, preset="tiny").texture_sigma == 0.03


def test_generation_adds_the_vaes_texture_reproducibly():
    from neuromf.generation.images import with_texture
    from neuromf.vae import MAISIVAEWrapper

    vae = MAISIVAEWrapper(preset="tiny")
    image = smooth_brain(4)
    same, meta = with_texture(image, vae, seed=0, index=0)  # no fitted level: the decode as it is
    assert same is image and meta == {"texture_sigma": None}
    vae.texture_sigma = SIGMA
    first, meta = with_texture(image, vae, seed=0, index=3)
    assert meta == {"texture_sigma": SIGMA}
    np.testing.assert_array_equal(first, with_texture(image, vae, seed=0, index=3)[0])  # pair i from (seed, i)
    assert not np.array_equal(first, with_texture(image, vae, seed=0, index=4)[0])
    assert not np.array_equal(first, with_texture(image, vae, seed=1, index=3)[0])
    inside = brain_interior(image)
    assert noise_level(first, inside) == pytest.approx(SIGMA, rel=0.15)
    off, meta = with_texture(image, vae, seed=0, index=3, texture=False)
    assert off is image and meta == {"texture_sigma": None}


def test_texture_pairs_script_gives_what_generation_with_texture_gives(tmp_path):
    """scripts/texture_pairs.py on pairs saved without texture: each FLAIR becomes what `with_texture` gives the
    decode at generation time (same (seed, index) draw), masks are copied, the input folder is left as it was, and
    pairs that are already textured or not generated (inpainted) are refused with the file named."""
    import importlib.util
    import json
    from pathlib import Path

    from neuromf.generation.images import GeneratedPair, with_texture, write_pairs
    from neuromf.io.nifti import read_nifti
    from neuromf.vae import MAISIVAEWrapper

    spec = importlib.util.spec_from_file_location(
        "texture_pairs", Path(__file__).resolve().parents[2] / "scripts" / "texture_pairs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    vae = MAISIVAEWrapper(preset="tiny")
    vae.texture_sigma = SIGMA
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    images = [smooth_brain(10 + i) for i in range(2)]
    mask = (smooth_brain(12) > 0.85).astype(np.uint8)
    plain = tmp_path / "plain"
    write_pairs([GeneratedPair(i, img, mask, affine, {"index": i, "seed": 100, "mode": "joint"})
                 for i, img in enumerate(images)], plain)
    before = {p.name: p.read_bytes() for p in plain.iterdir()}
    paths = script.texture_folder(plain, tmp_path / "textured", vae)
    assert len(paths) == 6
    assert {p.name: p.read_bytes() for p in plain.iterdir()} == before
    for i, image in enumerate(images):
        stem = tmp_path / "textured" / f"sample_{i:03d}"
        expected, _ = with_texture(image, vae, 100, i)  # what generation does to the decode before writing it
        np.testing.assert_array_equal(read_nifti(f"{stem}_flair.nii.gz")[0], expected)
        assert noise_level(expected, brain_interior(image)) == pytest.approx(SIGMA, rel=0.15)
        assert Path(f"{stem}_mask.nii.gz").read_bytes() == before[f"sample_{i:03d}_mask.nii.gz"]
        assert json.loads(Path(f"{stem}.json").read_text())["texture_sigma"] == SIGMA
    with pytest.raises(ValueError, match=r"sample_000\.json: already textured"):
        script.texture_folder(tmp_path / "textured", tmp_path / "again", vae)
    (plain / "sample_001.json").write_text(json.dumps({"index": 1, "seed": 100, "mask_source": "prior"}))
    with pytest.raises(ValueError, match=r"sample_001\.json: not a joint/conditional pair"):
        script.texture_folder(plain, tmp_path / "inpainted", vae)
