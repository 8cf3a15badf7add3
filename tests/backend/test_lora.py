"""Phase 7: LoRA injection (P7-T2), trainable budget (P7-T3, Eq. 35), widened convs, adapters, FCD dataset."""

from __future__ import annotations

import copy

import pytest
import torch

from neuromf.models.adapter_meta import AdapterMeta
from neuromf.models.lora import (
    WIDENED_MODULES,
    attention_layers,
    count_lora_params,
    count_trainable_params,
    expected_lora_params,
    freeze_base_unfreeze_lora,
    inject_lora,
    load_adapter,
    save_adapter,
    widen_io_channels,
)
from neuromf.models.unet import MeanFlowUNet


def sidecar(n_mask: int) -> AdapterMeta:
    """The sidecar of an adapter made outside a training run (no base file, VAE or data behind it)."""
    return AdapterMeta(mode="joint", base_checkpoint="-", base_sha256="-", base_preset="tiny", vae="-",
                       vae_preset="tiny", vae_identity="-", scale_factor=1.0, preprocessing={},
                       latent_shape=[4 + n_mask, 8, 8, 8], channels={"image": 4, "mask": n_mask}, config={},
                       strategy="downsample")


def jittered(preset: str = "tiny") -> MeanFlowUNet:
    torch.manual_seed(0)
    model = MeanFlowUNet(4, preset=preset)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("channels", [8, 5])
def test_inject_and_forward_both_strategies(channels):  # P7-T2
    model = inject_lora(widen_io_channels(jittered(), channels, channels), modules_to_save=WIDENED_MODULES)
    z = torch.randn(2, channels, 4, 4, 4)
    out = model(z, torch.tensor([0.0, 0.2]), torch.tensor([1.0, 0.6]))
    assert out.shape == z.shape and torch.isfinite(out).all()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or ".modules_to_save." in n for n in names)
    # the JVP of the MeanFlow target runs through peft's layers
    _, dudt = torch.func.jvp(model, (z, torch.zeros(2), torch.ones(2)), (z, torch.zeros(2), torch.ones(2)))
    assert torch.isfinite(dudt).all()


@pytest.mark.parametrize("preset", ["small", "base"])
def test_trainable_share_below_one_percent_and_eq35(preset):  # P7-T3
    base = MeanFlowUNet(4, preset=preset)
    layers = attention_layers(base)
    widths = {d for _, d in layers}
    model = inject_lora(widen_io_channels(base, 8, 8), rank=16, alpha=16.0, modules_to_save=WIDENED_MODULES)
    trainable, total = count_trainable_params(model)
    assert trainable / total < 0.01
    lora = count_lora_params(model)
    # Eq. 35: 6 L r d for L attention layers of width d (q, k, v are d x d), summed over the widths present
    assert lora == sum(6 * sum(1 for _, d in layers if d == w) * 16 * w for w in widths)
    assert lora == expected_lora_params(model, 16)
    widened = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n)
    assert trainable == lora + widened


def test_widened_model_reproduces_base_image_velocity():
    base = jittered()
    widened = widen_io_channels(copy.deepcopy(base), 8, 8)
    x = torch.randn(2, 4, 8, 8, 8)
    joint = torch.cat([x, torch.randn(2, 4, 8, 8, 8)], dim=1)  # whatever the mask channels hold
    r, t = torch.tensor([0.0, 0.3]), torch.tensor([1.0, 0.8])
    with torch.no_grad():
        ref = base(x, r, t)
        out = widened(joint, r, t)
    assert ref.abs().max() > 0
    torch.testing.assert_close(out[:, :4], ref)
    assert out[:, 4:].abs().max() == 0


def test_freeze_helper_and_adapter_round_trip_and_merge(tmp_path):
    base = jittered()
    model = inject_lora(widen_io_channels(copy.deepcopy(base), 5, 5), rank=4, alpha=8.0,
                        modules_to_save=WIDENED_MODULES)
    with torch.no_grad():  # move away from the identity initialisation (lora_B = 0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_base_unfreeze_lora(model)
    assert all(("lora_" in n or ".modules_to_save." in n) == p.requires_grad for n, p in model.named_parameters())
    z = torch.randn(1, 5, 8, 8, 8)
    r, t = torch.tensor([0.2]), torch.tensor([0.9])
    with torch.no_grad():
        expected = model(z, r, t)
    directory = save_adapter(model, tmp_path / "adapter", sidecar(1))
    assert (directory / "adapter_config.json").is_file() and (directory / "adapter_model.safetensors").is_file()
    loaded = load_adapter(copy.deepcopy(base), directory)
    merged = load_adapter(copy.deepcopy(base), directory, merge=True)
    assert type(merged) is MeanFlowUNet
    with torch.no_grad():
        torch.testing.assert_close(loaded(z, r, t), expected)
        torch.testing.assert_close(merged(z, r, t), expected, rtol=1e-4, atol=1e-5)
        assert (expected[:, :4] - base(z[:, :4], r, t)).abs().max() > 1e-4  # the adapter changed something


def test_bad_target_and_channel_mismatch(tmp_path):
    with pytest.raises(ValueError, match="to_x"):
        inject_lora(jittered(), target_modules=["to_x"])
    model = inject_lora(widen_io_channels(jittered(), 8, 8), modules_to_save=WIDENED_MODULES)
    directory = save_adapter(model, tmp_path / "a", sidecar(4))
    other = widen_io_channels(jittered(), 5, 5)
    with pytest.raises(ValueError, match="input channels"):
        load_adapter(other, directory)


def test_x_prediction_mask_outputs_are_exact_velocities_and_one_step_returns_the_estimate():
    """With `mask_prediction: x` the mask outputs are clean-latent estimates g: u = (z - g) / t, so one step from
    t = 1 lands on g, and a k-step move z_r = z - (t - r) u = (r / t) z + (1 - r / t) g (DDIM on the straight path)."""
    from neuromf.meanflow import sample_meanflow
    from neuromf.models.lora import set_mask_outputs

    raw = widen_io_channels(jittered(), 6, 6)
    with torch.no_grad():
        raw.out[2].conv.weight[4:].normal_(0, 0.05)  # the new mask rows start at zero: give them a value
    x_pred = set_mask_outputs(copy.deepcopy(raw), 2, "x", passthrough=True)
    assert x_pred.x_channels == 2 and x_pred.skip_channels == 0
    z = torch.randn(2, 6, 8, 8, 8)
    r, t = torch.tensor([0.25, 0.0]), torch.tensor([0.5, 1.0])
    with torch.no_grad():
        g, u = raw(z, r, t), x_pred(z, r, t)
        torch.testing.assert_close(u[:, :4], g[:, :4])  # image channels unchanged
        torch.testing.assert_close(u[:, 4:], (z[:, 4:] - g[:, 4:]) / t.view(-1, 1, 1, 1, 1))
        z_r = z - (t - r).view(-1, 1, 1, 1, 1) * u
        ratio = (r / t).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(z_r[:, 4:], ratio * z[:, 4:] + (1 - ratio) * g[:, 4:])
        one_step = sample_meanflow(x_pred, z[:1], steps=1)
        torch.testing.assert_close(one_step[:, 4:], raw(z[:1], torch.zeros(1), torch.ones(1))[:, 4:])
    with pytest.raises(ValueError, match="mask_prediction"):
        set_mask_outputs(raw, 2, "epsilon", passthrough=False)


def test_empty_path_guidance_extrapolates_the_mask_estimate_away_from_the_empty_masks():
    """Joint guidance: x^_g = x^_empty + s (x^ - x^_empty), x^_empty the estimate with the mask channels on the empty
    mask's path (1 - t) e + t eps from the same noise. Checked against two direct model calls; at t = 1 both branches
    see the same input (guidance changes nothing); s = 0 gives the empty branch; image channels keep u; s = 1 is the
    model itself; an adapter without x-prediction is refused."""
    from neuromf.generation.guidance import empty_path_guidance
    from neuromf.generation.joint import joint_velocity
    from neuromf.models.joint import JointModel
    from neuromf.models.lora import set_mask_outputs

    model = widen_io_channels(jittered(), 6, 6)
    with torch.no_grad():
        model.out[2].conv.weight[4:].normal_(0, 0.05)
    set_mask_outputs(model, 2, "x", passthrough=False)
    noise, z = torch.randn(2, 6, 8, 8, 8), torch.randn(2, 6, 8, 8, 8)
    t = torch.tensor([0.3, 0.6])
    t_col = t.view(-1, 1, 1, 1, 1)
    empty_z = torch.cat([z[:, :4], (1 - t_col) * -1.0 + t_col * noise[:, 4:]], dim=1)
    with torch.no_grad():
        u, u_empty = model(z, t, t), model(empty_z, t, t)
        estimate, empty_estimate = z[:, 4:] - t_col * u[:, 4:], empty_z[:, 4:] - t_col * u_empty[:, 4:]
        for s in (0.0, 1.5):
            guided = empty_path_guidance(model, 4, -1.0, noise, s)(z, t, t)
            torch.testing.assert_close(guided[:, :4], u[:, :4])
            torch.testing.assert_close(z[:, 4:] - t_col * guided[:, 4:],
                                       empty_estimate + s * (estimate - empty_estimate))
        ones = torch.ones(2)
        torch.testing.assert_close(empty_path_guidance(model, 4, -1.0, noise, 3.0)(noise, ones, ones),
                                   model(noise, ones, ones))
    with pytest.raises(ValueError, match="guidance"):
        empty_path_guidance(model, 4, -1.0, noise, -0.5)
    meta = sidecar(2)
    joint = JointModel(model, vae=None, meta=meta)
    assert joint_velocity(joint, noise, 1.0) is model and joint.meta.guidance_scale(None) == meta.guidance == 1.0
    with pytest.raises(ValueError, match="x-prediction"):
        joint_velocity(joint, noise, 1.5)  # the sidecar says velocity prediction
    meta.mask_prediction, meta.mask_scale = "x", 2.0
    assert joint.empty_mask_value == -2.0 and joint_velocity(joint, noise, 1.5) is not model
    with pytest.warns(DeprecationWarning, match="JointModel.velocity is deprecated"):  # the old method, one release
        assert joint.velocity(noise, 1.0, None) is joint_velocity(joint, noise, 1.0)


def test_x_preconditioning_gives_the_network_a_unit_variance_target_and_the_input_at_t0():
    """EDM's scales on the straight path: for data of spread sigma_data and z = (1 - t) x + t eps, the network's
    target (x - c_skip z) / c_out has unit variance at every t (checked by sampling); c_skip = 1, c_out = 0 at t = 0
    and c_skip = 0, c_out = sigma_data at t = 1."""
    from neuromf.models.unet import x_preconditioning

    sigma = 0.5
    ends = x_preconditioning(torch.tensor([0.0, 1.0]), sigma)
    torch.testing.assert_close(ends[0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(ends[1], torch.tensor([0.0, sigma]))
    generator = torch.Generator().manual_seed(0)
    x = sigma * torch.randn(200_000, generator=generator)
    eps = torch.randn(200_000, generator=generator)
    for t in (0.05, 0.3, 0.6, 0.95):
        c_skip, c_out = x_preconditioning(torch.tensor(t), sigma)
        target = (x - c_skip * ((1 - t) * x + t * eps)) / c_out
        assert abs(float(target.var()) - 1.0) < 0.02, t


def test_x_prediction_with_skip_keeps_the_input_at_t0_and_centres_the_estimate_at_t1():
    """`mask_sigma_data`: x^ = mean + c_skip (z - (1 - t) mean) + c_out F. At t = 0 the mask velocity is 0 whatever
    the network says (the estimate is the input); at t = 1 the estimate is mean + sigma_data F, F being what the
    plain x-prediction model returns as its estimate; the image channels are untouched."""
    from neuromf.models.lora import set_mask_outputs

    raw = widen_io_channels(jittered(), 6, 6)
    with torch.no_grad():
        raw.out[2].conv.weight[4:].normal_(0, 0.05)
    plain = set_mask_outputs(copy.deepcopy(raw), 2, "x", passthrough=False)
    skip = set_mask_outputs(copy.deepcopy(raw), 2, "x", passthrough=False, sigma_data=0.5, mean=-1.0)
    assert (skip.x_sigma_data, skip.x_mean) == (0.5, -1.0)
    z = torch.randn(2, 6, 8, 8, 8)
    zeros, ones = torch.zeros(2), torch.ones(2)
    with torch.no_grad():
        at_zero = skip(z, zeros, zeros)
        torch.testing.assert_close(at_zero[:, 4:], torch.zeros_like(at_zero[:, 4:]))
        network = z[:, 4:] - plain(z, ones, ones)[:, 4:]  # F: the plain model's estimate at t = 1
        torch.testing.assert_close(skip(z, ones, ones)[:, 4:], z[:, 4:] - (-1.0 + 0.5 * network))
        torch.testing.assert_close(skip(z, zeros, ones)[:, :4], raw(z, zeros, ones)[:, :4])
    with pytest.raises(ValueError, match="mask_sigma_data"):
        set_mask_outputs(raw, 2, "x", passthrough=False, sigma_data=0.0)
    assert set_mask_outputs(copy.deepcopy(raw), 2, "velocity", True, sigma_data=0.5).x_sigma_data == 0.0
