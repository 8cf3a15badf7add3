"""MAISI VAE wrapper: released architecture, safe loading, shapes, split choice and input checks."""

from __future__ import annotations

import argparse

import pytest
import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiConvolution
from safetensors.torch import save_file

from neuromf.vae import MAISIVAEWrapper, build_maisi_autoencoder, choose_num_splits


def test_maisi_preset_has_released_parameter_count():
    model = build_maisi_autoencoder("maisi")
    assert sum(p.numel() for p in model.parameters()) == 20_944_897


def test_nested_unet_state_dict_loads_from_pt(tmp_path):
    source = MAISIVAEWrapper("tiny")
    path = tmp_path / "autoencoder.pt"
    torch.save({"unet_state_dict": source.autoencoder.state_dict()}, path)
    loaded = MAISIVAEWrapper.from_file(path, preset="tiny")
    for (k, a), (_, b) in zip(source.autoencoder.state_dict().items(), loaded.autoencoder.state_dict().items()):
        assert torch.equal(a, b), k


def test_plain_safetensors_loads_and_wrong_preset_lists_keys(tmp_path):
    source = MAISIVAEWrapper("tiny")
    path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in source.autoencoder.state_dict().items()}, str(path))
    MAISIVAEWrapper.from_file(path, preset="tiny")
    with pytest.raises(ValueError, match=r"vae.safetensors.*(missing|wrong shape)"):
        MAISIVAEWrapper.from_file(path, preset="small")


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"  # an arbitrary Python object: unpickling it could run code
    torch.save({"unet_state_dict": {}, "payload": argparse.Namespace(cmd="rm -rf /")}, path)
    with pytest.raises(ValueError, match="evil.pt.*pickled"):
        MAISIVAEWrapper.from_file(path, preset="tiny")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        MAISIVAEWrapper.from_file(tmp_path / "nowhere.pt", preset="tiny")


def test_encode_decode_shapes_64_cubed_and_posterior_mean_is_deterministic():
    vae = MAISIVAEWrapper("tiny", scale_factor=2.0)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        z1, z2 = vae.encode(x), vae.encode(x)
        zs = vae.encode(x, sample=True)
        y = vae.decode(z1)
    assert z1.shape == (1, 4, 16, 16, 16) and y.shape == (1, 1, 64, 64, 64)
    assert torch.equal(z1, z2) and not torch.equal(z1, zs)
    with torch.no_grad():  # scale factor multiplies the latent
        vae.scale_factor = 1.0
        torch.testing.assert_close(vae.encode(x) * 2.0, z1)


@pytest.mark.parametrize("length,requested,expected", [(64, 4, 4), (32, 4, 2), (48, 4, 3), (128, 4, 4), (16, 4, 1),
                                                      (96, 16, 6)])
def test_num_splits_choice(length, requested, expected):
    n = choose_num_splits(length, requested)
    assert n == expected
    latent = length // 4
    assert n == 1 or (latent % n == 0 and latent // n > 3)


def test_split_encoding_equals_unsplit():
    vae = MAISIVAEWrapper("tiny")
    x = torch.rand(1, 1, 32, 64, 32)  # MAISI splits along the second spatial axis: 64 -> 4 chunks
    with torch.no_grad():
        split = vae.encode(x)
        splits = {m.num_splits for m in vae.autoencoder.modules() if isinstance(m, MaisiConvolution)}
        assert splits == {4}
        vae.set_num_splits_for(4)  # a 1-voxel latent axis forces a single chunk
        whole = vae.autoencoder.encode(x)[0]
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(1, 64, 64, 64), "5D"),
    (torch.rand(1, 1, 62, 64, 64), "divisible by 4"),
    (torch.full((1, 1, 16, 16, 16), float("nan")), "NaN"),
    (torch.ones(1, 1, 16, 16, 16, dtype=torch.int64), "floating"),
    (torch.rand(1, 2, 16, 16, 16), "channel"),
])
def test_bad_inputs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        MAISIVAEWrapper("tiny").encode(bad)


def test_fit_scale_factor_gives_unit_std():
    vae = MAISIVAEWrapper("tiny")
    vols = [torch.rand(1, 32, 32, 32) for _ in range(3)]
    factor = vae.fit_scale_factor(vols)
    with torch.no_grad():
        z = torch.cat([vae.encode(v[None]).flatten() for v in vols])
    assert factor > 0 and abs(float(z.std()) - 1.0) < 1e-3


def test_separable_ssim_equals_monai_metric_and_has_gradients():
    from monai.metrics import SSIMMetric

    from neuromf.eval.image_metrics import ssim_3d

    torch.manual_seed(0)
    x = torch.rand(2, 1, 20, 24, 18)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    expected = SSIMMetric(spatial_dims=3, data_range=1.0)(y, x).flatten()
    assert float(ssim_3d(x, x).min()) == pytest.approx(1.0, abs=1e-5)
    x.requires_grad_(True)
    got = ssim_3d(y, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (1 - got.mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vae_training_splits_nothing_and_inference_restores_preset_splits():
    vae = MAISIVAEWrapper(preset="tiny")
    vae.set_num_splits_for(64, requested=1)
    assert {m.num_splits for m in vae.modules() if isinstance(m, MaisiConvolution)} == {1}
    vae.encode(torch.rand(1, 1, 32, 64, 32))
    assert {m.num_splits for m in vae.modules() if isinstance(m, MaisiConvolution)} == {choose_num_splits(64, 4)} == {4}


def test_the_embedded_preset_does_not_split_and_the_released_one_does():
    """Splitting bounds the released VAE's GPU memory on large volumes; the small preset's 96^3 volumes need none,
    and on a CPU it only costs time (benchmarks/bench_vae_splits.py)."""
    small, maisi = MAISIVAEWrapper(preset="small"), build_maisi_autoencoder("maisi")
    small.encode(torch.rand(1, 1, 64, 64, 64))
    assert {m.num_splits for m in small.modules() if isinstance(m, MaisiConvolution)} == {1}
    assert {m.num_splits for m in maisi.modules() if isinstance(m, MaisiConvolution)} == {4}


def test_tiled_decode_keeps_the_shape_and_decodes_each_tile_on_its_own():
    """`decode(z, tile)`: overlapping cubes of latent voxels, each decoded alone and blended. A change of the latent
    in one corner reaches only the tiles that hold it: the whole decode (group norms over the whole volume) changes
    everywhere, the tiled one nowhere past those tiles. A tile as large as the latent is the whole decode."""
    torch.manual_seed(0)
    vae = MAISIVAEWrapper("tiny")
    z = torch.randn(1, vae.latent_channels, 8, 8, 8)
    whole, tiled = vae.decode(z), vae.decode(z, tile=4)
    assert tiled.shape == whole.shape == (1, 1, 32, 32, 32) and torch.isfinite(tiled).all()
    assert not torch.allclose(tiled, whole, atol=1e-4)
    assert torch.equal(vae.decode(z, tile=8), whole)
    vae.decode_tile = 4
    assert torch.equal(vae.decode(z), tiled)  # the wrapper's default tile

    changed = z.clone()
    changed[..., 0, 0, 0] += 5.0
    # tiles of 4 latent voxels at a stride of 2 (overlap 0.5): the tiles over latent x >= 4 start at x >= 2 and
    # never hold the changed voxel, so output x >= 16 (4 voxels per latent voxel) must not move at all
    assert torch.equal(vae.decode(changed)[..., 16:, :, :], tiled[..., 16:, :, :])
    assert not torch.equal(vae.decode(changed)[..., :16, :16, :16], tiled[..., :16, :16, :16])
    assert not torch.allclose(vae.decode(changed, tile=8)[..., 16:, :, :], whole[..., 16:, :, :], atol=1e-6)


@pytest.mark.parametrize("value", ["16", 2, 16.0, True, -8])
def test_vae_sidecar_sets_the_decode_tile_and_refuses_a_bad_one(tmp_path, tiny_vae_dir, value):
    import json
    import shutil

    from neuromf.weights import WeightFileError

    vae_dir = tmp_path / "vae"
    shutil.copytree(tiny_vae_dir, vae_dir)
    meta = json.loads((vae_dir / "model.json").read_text())
    assert MAISIVAEWrapper.from_file(vae_dir, preset="tiny").decode_tile is None  # no entry: whole decodes
    (vae_dir / "model.json").write_text(json.dumps({**meta, "decode_tile": value}))
    with pytest.raises(WeightFileError, match=r"model\.json: decode_tile"):
        MAISIVAEWrapper.from_file(vae_dir, preset="tiny")
    (vae_dir / "model.json").write_text(json.dumps({**meta, "decode_tile": 16}))
    assert MAISIVAEWrapper.from_file(vae_dir, preset="tiny").decode_tile == 16


def test_save_keeps_the_decode_tile(tmp_path, tiny_vae_dir):
    """A VAE saved from a tiled one (what `train-vae` does from `model.init_from`) decodes in the same tiles."""
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir, preset="tiny")
    vae.save(tmp_path / "whole")
    assert MAISIVAEWrapper.from_file(tmp_path / "whole", preset="tiny").decode_tile is None
    vae.decode_tile = 4
    vae.save(tmp_path / "tiled")
    reloaded = MAISIVAEWrapper.from_file(tmp_path / "tiled", preset="tiny")
    assert reloaded.decode_tile == 4
    z = torch.randn(1, vae.latent_channels, 8, 8, 8)
    assert torch.equal(reloaded.decode(z), vae.decode(z, tile=4))
