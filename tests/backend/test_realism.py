"""Realism figures (sharpness, two-sample tests) on tiny synthetic volumes, and the decoder-only adversarial VAE
training that they judge (real MONAI VAE and PatchDiscriminator, real phantoms on disk, a few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import ndimage
from testkit import TEST_SHAPE, TEST_SPACING

from neuromf.eval.realism import (
    brain_interior,
    cnn_two_sample_test,
    feature_two_sample_test,
    sharpness,
    sharpness_ratio,
)


@pytest.fixture
def one_thread():
    """The judges' tiny convolutions in one thread: two OpenMP threads on a loaded 2-core machine spin-wait for
    each other (measured: a 6 s test took > 300 s under a load of 16)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def textured_brains(n: int, seed: int, size: int = 24, texture: float = 0.4) -> torch.Tensor:
    """(n, 1, size^3) balls of intensity ~0.5 with a smooth random texture, on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.indices((size,) * 3) - (size - 1) / 2
    ball = np.sqrt((grid**2).sum(0)) < size * 0.42
    vols = [np.where(ball, 0.5 + texture * ndimage.gaussian_filter(rng.standard_normal((size,) * 3), 0.7), 0.0)
            for _ in range(n)]
    return torch.tensor(np.stack(vols)[:, None], dtype=torch.float32)


def test_blurring_lowers_sharpness_and_identity_keeps_it():
    volume = textured_brains(1, seed=0)[0]
    blurred = torch.tensor(ndimage.gaussian_filter(volume[0].numpy(), 1.0))[None]
    mask = brain_interior(volume)
    assert mask.sum() > 0 and not mask[0].any()  # the interior excludes the brain's rim and the background
    assert sharpness_ratio(volume, volume) == pytest.approx(1.0)
    assert sharpness_ratio(blurred, volume) < 0.75
    # scale-free: a uniformly brighter copy is not sharper
    assert sharpness(2 * volume, mask) == pytest.approx(sharpness(volume, mask), rel=1e-6)


def test_cnn_two_sample_test_is_chance_on_one_distribution_and_perfect_on_different_ones(one_thread):
    kwargs = {"k": 3, "patch_size": 8, "patches_per_volume": 24, "steps": 120, "batch_size": 32, "seed": 0}
    real, same = textured_brains(6, seed=1), textured_brains(6, seed=2)
    blurred = torch.tensor(ndimage.gaussian_filter(same.numpy(), (0, 0, 1.2, 1.2, 1.2)))
    chance = cnn_two_sample_test(real, same, **kwargs)["balanced_accuracy"]
    assert abs(chance - 0.5) <= 0.15
    assert cnn_two_sample_test(real, blurred, **kwargs)["balanced_accuracy"] >= 0.9
    assert cnn_two_sample_test(real, same, **kwargs)["balanced_accuracy"] == chance  # seeded


def test_feature_two_sample_test_separates_blurred_volumes():
    real, same = textured_brains(8, seed=3), textured_brains(8, seed=4)
    blurred = torch.tensor(ndimage.gaussian_filter(same.numpy(), (0, 0, 1.2, 1.2, 1.2)))
    assert feature_two_sample_test(real, blurred, k=4)["balanced_accuracy"] == 1.0
    assert feature_two_sample_test(real, same, k=4)["balanced_accuracy"] <= 0.75
    with pytest.raises(ValueError, match="paired"):
        feature_two_sample_test(real, same[:3])


def test_decoder_only_adversarial_training_keeps_the_encoder_and_resumes(tmp_path, phantom_dir, tiny_vae_dir,
                                                                          one_thread):
    from neuromf.config import load_config
    from neuromf.pipelines.vae import train_vae
    from neuromf.train import run_to_end
    from neuromf.vae import MAISIVAEWrapper

    def config(steps: int):
        return load_config("vae_fine_sharp", {
            "data.data_dir": str(phantom_dir), "data.split": None, "data.shape": list(TEST_SHAPE),
            "data.spacing": list(TEST_SPACING), "model.init_from": str(tiny_vae_dir), "training.max_steps": steps,
            "training.checkpoint_every": 1, "training.device": "cpu", "training.output_dir": str(tmp_path / "run"),
            "vae_training.patch_size": 16, "vae_training.discriminator_channels": 4,
            "vae_training.discriminator_layers": 2})

    run_to_end(train_vae(config(1), preset="tiny", progress=False))
    checkpoint = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    assert any(k.startswith("model/discriminator.") for k in checkpoint)  # the discriminator resumes too
    assert not any(k.startswith("model/autoencoder.encoder.") for k in checkpoint)
    result = run_to_end(train_vae(config(2), preset="tiny", resume=True, progress=False))
    assert result.step == 2
    before = MAISIVAEWrapper.from_file(tiny_vae_dir, preset="tiny")
    after = MAISIVAEWrapper.from_file(result.export, preset="tiny")
    old, new = before.autoencoder.state_dict(), after.autoencoder.state_dict()
    assert set(old) == set(new) and not any(k.startswith("discriminator") for k in new)
    for name in old:
        if name.startswith(("decoder.", "post_quant_conv.")):
            continue
        assert torch.equal(old[name], new[name]), name  # encoder bit for bit: the latent space is unchanged
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))
    assert after.scale_factor == before.scale_factor
    # the export fits the scanner-texture level on the training scans and the sidecar carries it back
    assert after.texture_sigma is not None and 0.0 <= after.texture_sigma <= 0.5
    assert after.metadata["texture_fit"]["cases"] >= 1
