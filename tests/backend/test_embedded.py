"""The embedded default: committed phantoms and weights load by name with no network, and meet their cards."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from neuromf.cli import main as cli
from neuromf.data.embedded import resolve_data_dir
from neuromf.generation.images import generate_images
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import Preprocessing, preprocess_image
from neuromf.models.flow_model import load_flow_model
from neuromf.vae import MAISIVAEWrapper
from neuromf.weights import embedded_model_dir

BRAIN_THRESHOLD = 0.1  # background is 0, CSF is the darkest brain tissue at about 0.15-0.2


def test_check_data_lists_all_phantom_subjects(capsys):
    assert cli(["check-data", "embedded-3mm"]) == 0
    out = capsys.readouterr().out
    assert "64 cases (24 with lesion masks), 0 unusable" in out
    assert out.count("sub-000") == 64


def test_embedded_vae_meets_its_card():
    vae = MAISIVAEWrapper.embedded()
    card = vae.metadata["held_out_quality"]
    assert vae.preset == "small" and vae.scale_factor != 1.0
    case = discover_cases(resolve_data_dir("embedded-3mm"), split="test")[0]
    x = preprocess_image(case.image, Preprocessing.from_dict(vae.metadata["preprocessing"]))
    recon = vae.decode(vae.encode(x.data[None])).clamp(0, 1)
    ssim = float(SSIMMetric(spatial_dims=3, data_range=1.0)(recon, x.data[None]))
    assert ssim >= card["ssim"] - 0.02
    # the card quotes the same figures as the sidecar
    text = (embedded_model_dir("vae_small") / "README.md").read_text()
    assert f"{card['ssim']:.3f}" in text and f"{card['psnr_db']:.1f}" in text


def _brain_stats(volume: np.ndarray) -> tuple[float, int]:
    brain = volume > BRAIN_THRESHOLD
    return float(volume[brain].mean()), int(brain.sum())


def test_embedded_base_model_samples_look_like_healthy_training_brains():
    model, meta = load_flow_model("embedded-3mm")
    assert meta["channels"] == {"image": 4, "mask": 0} and model.preset == "small"
    prep = Preprocessing.from_dict(meta["preprocessing"])
    cases = discover_cases(resolve_data_dir("embedded-3mm"), group="hc", split="train")
    real = [_brain_stats(preprocess_image(c.image, prep).data[0].numpy()) for c in cases]
    real_intensity, real_volume = np.mean([r[0] for r in real]), np.mean([r[1] for r in real])
    torch.manual_seed(0)
    samples = [_brain_stats(v.image) for v in generate_images("embedded-3mm", n=4, steps=1, seed=0, device="cpu")]
    gen_intensity, gen_volume = np.mean([s[0] for s in samples]), np.mean([s[1] for s in samples])
    assert gen_intensity == pytest.approx(real_intensity, rel=0.10)
    assert gen_volume == pytest.approx(real_volume, rel=0.10)


def test_embedded_files_have_cards_and_sizes():
    for name in ("vae_small", "base_small"):  # lora_demo has its own card (README.md) too
        directory = embedded_model_dir(name)
        assert (directory / "README.md").is_file() and (directory / "model.json").is_file()
        assert (directory / "model.safetensors").stat().st_size <= 15 * 2**20
        json.loads((directory / "model.json").read_text())


def test_embedded_demo_adapter_generates_a_pair():
    from neuromf.generation.joint import generate_pairs
    from neuromf.models.joint import check_adapter

    pair = next(generate_pairs("embedded-3mm", n=1, steps=1, seed=0, device="cpu"))
    assert pair.image.shape == pair.mask.shape == (64, 64, 64)
    assert pair.meta["index"] == pair.index == 0 and pair.meta["seed"] == 0
    assert pair.mask.dtype == np.uint8 and set(np.unique(pair.mask)) <= {0, 1}
    # intensities are not clipped at the 99.5th percentile any more (lesions are brighter): bounded by clip_max
    assert np.isfinite(pair.image).all() and 0.0 <= pair.image.min() and pair.image.max() <= 2.0
    checks = check_adapter("embedded-3mm")
    assert checks["forward_ok"] and checks["fraction"] < 0.01


def test_embedded_conditional_adapter_puts_prior_lesions_in_the_brain_it_generates():
    """Prior-drawn lesions go where lesions go in the FLAIR generated for them: inside its brain, at a real
    lesion's depth in that brain, and the FLAIR shows them brighter than their surroundings."""
    from neuromf.eval.lesion_metrics import lesion_stats
    from neuromf.generation.conditional import generate_conditional_pairs, load_conditional_model

    prior = load_conditional_model("embedded-3mm").prior
    low, high = prior.depth_range
    for pair in generate_conditional_pairs("embedded-3mm", n=3, steps=1, seed=0, device="cpu"):
        assert pair.meta["mask_source"] == "prior" and pair.meta["placed_in"] == "generated brain"
        stats = lesion_stats(pair.image, pair.mask, prior.spacing)
        assert stats.inside_brain_share >= 0.9, pair.index
        assert low - 1.0 <= stats.median_depth_mm <= high + 1.0, (pair.index, stats.median_depth_mm)
        assert stats.contrast > 1.05, (pair.index, stats.contrast)


def test_shipped_demo_adapter_carries_no_machine_paths():
    """The adapter sidecar travels in the wheel: it must name embedded models/data, not this machine's folders."""
    meta = json.loads((embedded_model_dir("lora_demo") / "neuromf_adapter.json").read_text())
    assert meta["base_checkpoint"] == meta["vae"] == meta["data_dir"] == "embedded-3mm"

    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    absolute = [s for s in strings(meta) if s.startswith("/") or s[1:3] == ":\\"]
    assert not absolute, f"absolute paths in the shipped sidecar: {absolute}"
    for card in (embedded_model_dir("lora_demo").parent).glob("*/README.md"):  # generated outputs are not shipped
        for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.read_text()):
            assert (card.parent / link).is_file(), f"{card} links a missing picture {link}"
