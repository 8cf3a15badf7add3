"""MeanFlow maths: JVP vs finite differences, cheap vs full JVP gradients, per-channel Lp, samplers."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from neuromf.meanflow import ChannelLp, MeanFlowLoss, TimeSampler, adaptive_weight, sample_euler, sample_meanflow
from neuromf.meanflow.loss import meanflow_target
from neuromf.models.unet import UNET_PRESETS, MeanFlowUNet


def _perturbed_tiny(dtype=torch.float64) -> MeanFlowUNet:
    """A tiny UNet with every weight jittered: MONAI zero-initialises the residual convs and the output conv,
    which would make r and t irrelevant and the derivative checks vacuous."""
    model = MeanFlowUNet(4, preset="tiny").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_jvp_matches_central_finite_differences():
    model = _perturbed_tiny()
    z = torch.randn(2, 4, 4, 4, 4, dtype=torch.float64)
    r = torch.tensor([0.1, 0.4], dtype=torch.float64)
    t = torch.tensor([0.7, 0.9], dtype=torch.float64)
    v = torch.randn_like(z)
    with torch.no_grad():
        _, dudt = torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        h = 1e-4
        fd = (model(z + h * v, r, t + h) - model(z - h * v, r, t - h)) / (2 * h)
    rel = (dudt - fd).norm() / fd.norm()
    assert rel < 1e-2
    # the interval embedding matters: moving t with r fixed changes t - r, so dropping it gives another answer
    with torch.no_grad():
        fd_interval_frozen = (model(z + h * v, r + h, t + h) - model(z - h * v, r - h, t - h)) / (2 * h)
    assert (dudt - fd_interval_frozen).norm() / fd.norm() > 1e-3


def test_cheap_and_single_jvp_give_same_gradients():
    model = _perturbed_tiny(torch.float32)
    z = torch.randn(2, 4, 8, 8, 8)
    r, t = torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.8])
    v = torch.randn_like(z)
    grads = []
    for cheap in (True, False):
        model.zero_grad()
        u, target = meanflow_target(model, z, r, t, v, cheap=cheap)
        ((u - target) ** 2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_cheap_target_differentiates_only_moving_samples_and_matches_the_full_jvp():
    """r = t samples need no JVP ((t - r) du/dt = 0): the cheap path skips them and still gives the same target."""
    model = _perturbed_tiny(torch.float32)
    z = torch.randn(3, 4, 8, 8, 8)
    r, t = torch.tensor([0.2, 0.7, 0.5]), torch.tensor([0.6, 0.7, 0.9])
    v = torch.randn_like(z)
    _, cheap = meanflow_target(model, z, r, t, v, cheap=True)
    _, full = meanflow_target(model, z, r, t, v, cheap=False)
    torch.testing.assert_close(cheap, full, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(cheap[1], v[1])  # r = t: the target is the instantaneous velocity
    assert not torch.allclose(cheap[0], v[0])
    _, all_still = meanflow_target(model, z, t, t, v, cheap=True)
    torch.testing.assert_close(all_still, v)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_finite_difference_target_matches_the_exact_jvp_in_fp32():
    """The central difference's error in fp32 is bounded by the time embedding's fastest feature, sin(1000 t):
    truncation (1000 h)^2 / 6 = 1.7e-3 relative at h = FD_STEP = 1e-4, plus rounding ~1e-7 |u| / 2h = 5e-4
    (measured on the shipped 2 mm joint model: 2.0e-3); 1e-2 leaves room for the tiny net's other features. A step
    100x larger must be visibly worse (the bound is not vacuous)."""
    from neuromf.meanflow.loss import FD_STEP, _central_difference_fp32, _jvp_fp32

    model = _perturbed_tiny(torch.float32)
    z = torch.randn(3, 4, 4, 4, 4)
    r, t = torch.tensor([0.1, 0.3, 0.05]), torch.tensor([0.9, 0.6, 0.2])
    v = torch.randn_like(z)
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    exact = _jvp_fp32(model, (z, r, t), tangents)
    assert exact.norm() > 0
    assert _rel(_central_difference_fp32(model, (z, r, t), tangents), exact) < 1e-2
    assert _rel(_central_difference_fp32(model, (z, r, t), tangents, 100 * FD_STEP), exact) > 2e-2


def test_finite_difference_loss_learns_what_the_exact_jvp_does():
    """Same batch, same RNG: the loss and the parameter gradients of the two du/dt methods agree within 1e-2
    (relative), i.e. a training step moves the weights the same way; every sample has r != t here."""
    model = _perturbed_tiny(torch.float32)
    x = torch.randn(2, 4, 4, 4, 4)
    results = []
    for jvp in ("exact", "finite_difference"):
        model.zero_grad()
        loss_fn = MeanFlowLoss(time_sampler=TimeSampler(ratio_r_neq_t=1.0), jvp=jvp)
        loss, _ = loss_fn(model, x, torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_exact, grad_exact), (loss_fd, grad_fd) = results
    assert abs(float(loss_fd / loss_exact) - 1) < 1e-2
    assert _rel(grad_fd, grad_exact) < 1e-2
    with pytest.raises(ValueError, match="jvp must be one of"):
        meanflow_target(model, x, torch.zeros(2), torch.ones(2), x, jvp="central")
    with pytest.raises(ValueError, match="cheap_jvp: true"):
        meanflow_target(model, x, torch.zeros(2), torch.ones(2), x, cheap=False, jvp="finite_difference")


def test_finite_difference_sees_the_same_dropout_draw_at_both_points():
    """With dropout on (train mode), both ends of the difference draw the same mask, so du/dt stays the derivative
    of one function (as the exact JVP's) rather than the difference of two random draws."""
    from neuromf.meanflow.loss import _central_difference_fp32

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 6)).train()

    def fn(z, r, t):
        return net(z * t[:, None])

    z, v = torch.randn(2, 6), torch.randn(2, 6)
    r, t = torch.zeros(2), torch.tensor([0.5, 0.8])
    fd = _central_difference_fp32(fn, (z, r, t), (v, torch.zeros(2), torch.ones(2)))
    assert float(fd.abs().max()) < 100  # two different masks would give ~|u| / 2h ~ 1e3 and more


def test_zero_interval_embedding_reproduces_plain_unet():
    model = MeanFlowUNet(4, preset="tiny")
    p = UNET_PRESETS["tiny"]
    plain = DiffusionModelUNet(spatial_dims=3, in_channels=4, out_channels=4, num_res_blocks=p.num_res_blocks,
                               channels=p.channels, attention_levels=p.attention_levels,
                               norm_num_groups=p.norm_num_groups, num_head_channels=p.num_head_channels)
    with torch.no_grad():  # jitter every weight so t actually reaches the output
        for param in plain.parameters():
            param.add_(0.05 * torch.randn_like(param))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("interval_embed") for k in missing)
    x = torch.randn(2, 4, 8, 8, 8)
    t = torch.tensor([0.3, 0.8])
    r = torch.tensor([0.0, 0.5])
    with torch.no_grad():
        ours = model(x, r, t)
        theirs = plain(x, t * 1000.0)
    torch.testing.assert_close(ours, theirs)
    with torch.no_grad():  # and t does matter, so the equality above is not vacuous
        assert (plain(x, t * 1000.0) - plain(x, (1 - t) * 1000.0)).abs().max() > 1e-4


def test_channel_lp_matches_hand_computation():
    delta = torch.tensor([[[[[1.0, -2.0]]], [[[0.5, 0.0]]], [[[3.0, 1.0]]]]])  # (1, 3, 1, 1, 2)
    lp = ChannelLp.for_channels(n_image=2, n_mask=1, p_img=1.5, p_mask=2.0, lambda_img=1.0, lambda_mask=0.5)
    img = ((1 ** 1.5 + 2 ** 1.5) / 2) + ((0.5 ** 1.5 + 0) / 2)
    mask = 0.5 * ((9 + 1) / 2)
    groups = lp.per_group(delta)
    assert abs(float(groups[0]) - img) < 1e-6
    assert abs(float(groups[1]) - mask) < 1e-6
    assert abs(float(lp(delta)) - (img + mask)) < 1e-6


def test_adaptive_weight_is_stop_gradient_and_per_sample():
    per_sample = torch.tensor([0.5, 2.0], requires_grad=True)
    w = adaptive_weight(per_sample, power=1.0, c=1e-3)
    assert not w.requires_grad
    torch.testing.assert_close(w, 1 / (per_sample.detach() + 1e-3))
    (w * per_sample).sum().backward()
    torch.testing.assert_close(per_sample.grad, w)


def test_adaptive_weight_pulls_a_regression_toward_the_frequent_outcome():
    """Why joint masks came out empty: one input, two outcomes (background 0 in 90% of the samples, a lesion 1 in
    10%). Trained to its fixed point, the plain L2 regression predicts their mean, 0.1; with the adaptive weight
    the rare outcome, always the one with the larger error, loses its say and the prediction collapses to 0."""
    targets = torch.tensor([0.0] * 9 + [1.0])

    def fitted(power: float) -> float:
        """The stationary point of the stop-gradient weighted L2 (each step solves it for the current weights)."""
        x = targets.mean()
        for _ in range(50):
            weight = adaptive_weight((x - targets) ** 2, power=power, c=1e-3)
            x = (weight * targets).sum() / weight.sum()
        return float(x)

    assert abs(fitted(0.0) - 0.1) < 1e-3  # adaptive_power 0: the conditional mean
    assert fitted(1.0) < 0.01  # adaptive_power 1 (MeanFlow's default): the frequent outcome


def test_adaptive_mask_false_weighs_only_the_image_channels():
    """With `adaptive_mask: False` the loss is w(L_img) L_img + L_mask, w = 1 / (L_img + c) stop-gradient: the
    image part keeps MeanFlow's adaptive weight and the mask part enters as the plain (lesion-weighted) Lp."""
    model = _perturbed_tiny(torch.float32)
    x = torch.randn(3, 4, 8, 8, 8)
    lesion = (torch.rand(3, 1, 8, 8, 8) < 0.1).float()
    lp = ChannelLp.for_channels(2, 2, p_img=1.5, p_mask=2.0, lambda_mask=0.3)

    def run(adaptive_mask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        loss_fn = MeanFlowLoss(distance=lp, adaptive_mask=adaptive_mask, lesion_weight=5.0, flow_matching=True)
        loss, _ = loss_fn(model, x, torch.Generator().manual_seed(1), lesion=lesion)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # the loss's own draws, replayed
        t = loss_fn.time_sampler(3, generator=_after_noise(x.shape))[1]
        z = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * noise
        img, mask = lp.per_group(model(z, t, t) - (noise - x), 1.0 + 5.0 * lesion)
        return loss, (img, mask)

    for adaptive_mask in (True, False):
        loss, (img, mask) = run(adaptive_mask)
        if adaptive_mask:
            expected = ((img + mask) / (img + mask + 1e-3).detach()).mean()
        else:
            expected = (img / (img + 1e-3).detach() + mask).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def _after_noise(shape: tuple[int, ...]) -> torch.Generator:
    """A generator in the state the loss's generator is in after drawing its noise (its times come next)."""
    generator = torch.Generator().manual_seed(1)
    torch.randn(shape, generator=generator)
    return generator


def test_time_sampler_orders_and_fraction():
    r, t = TimeSampler(ratio_r_neq_t=0.25)(20000, generator=torch.Generator().manual_seed(0))
    assert torch.all(r <= t) and torch.all((t > 0) & (t < 1))
    frac = (r != t).float().mean().item()
    assert abs(frac - 0.25) < 0.02
    # logit-normal with mean -0.4: the median of single draws is sigmoid(-0.4) ~ 0.40, t = max is higher
    assert 0.4 < t.median().item() < 0.65


def test_samplers_shapes_and_one_step_equivalence():
    model = _perturbed_tiny(torch.float32).eval()
    noise = torch.randn(3, 4, 8, 8, 8)
    one = sample_meanflow(model, noise, steps=1)
    assert one.shape == noise.shape and one.dtype == noise.dtype
    with torch.no_grad():
        manual = noise - model(noise, torch.zeros(3), torch.ones(3))
    torch.testing.assert_close(one, manual)
    two = sample_meanflow(model, noise, steps=2)
    assert not torch.allclose(one, two)
    euler = sample_euler(model, noise, steps=4)
    assert euler.shape == noise.shape and torch.isfinite(euler).all()


def test_euler_last_step_from_the_x_prediction_clamp_lands_on_the_estimate():
    """An x-prediction velocity u = (z - x^) / max(t, t_min) whose estimate is a fixed x^: equal Euler steps
    below t_min keep part of the starting noise; with `last_t = t_min` the result is x^ itself."""
    from neuromf.models.unet import X_PREDICTION_MIN_T

    torch.manual_seed(0)
    target, noise = torch.full((2, 3, 4, 4, 4), -1.0), torch.randn(2, 3, 4, 4, 4)

    def x_prediction(z, r, t):
        return (z - target) / t.view(-1, 1, 1, 1, 1).clamp(min=X_PREDICTION_MIN_T)

    equal = sample_euler(x_prediction, noise, steps=32)
    last = sample_euler(x_prediction, noise, steps=32, last_t=X_PREDICTION_MIN_T)
    torch.testing.assert_close(last, target)
    leftover = equal - target
    # the last equal step starts at t = 1/32 < t_min and moves only (1/32) / t_min of the way
    ratio = (1 - (1 / 32) / X_PREDICTION_MIN_T) * (1 / 32)
    torch.testing.assert_close(leftover, ratio * (noise - target), rtol=1e-4, atol=1e-5)
    assert abs(float(torch.corrcoef(torch.stack([equal.flatten(), noise.flatten()]))[0, 1])) > 0.9
    # steps whose equal grid already ends at t_min: the same path either way
    torch.testing.assert_close(sample_euler(x_prediction, noise, steps=20),
                               sample_euler(x_prediction, noise, steps=20, last_t=X_PREDICTION_MIN_T))
    with pytest.raises(ValueError, match="last_t"):
        sample_euler(x_prediction, noise, steps=4, last_t=1.0)


def test_flow_matching_loss_needs_no_jvp_and_meanflow_loss_is_finite():
    model = _perturbed_tiny(torch.float32)
    x = torch.randn(4, 4, 8, 8, 8)
    for fm in (False, True):
        loss, parts = MeanFlowLoss(flow_matching=fm)(model, x, torch.Generator().manual_seed(0))
        assert torch.isfinite(loss) and loss.requires_grad
        assert parts["raw"] > 0


def test_every_loss_setting_of_the_config_reaches_the_loss():
    """`loss.lesion_weight` was once configured, recorded in sidecars and never passed to the loss: every field of
    the config section (but `lesion_dilate`, which shapes the lesion region outside the loss) must change it."""
    import dataclasses

    from neuromf.config import LossConfig, load_config

    base = MeanFlowLoss.from_config(LossConfig(), 4, 1)
    assert MeanFlowLoss.from_config(LossConfig(), 4, 1) == base  # compared by value, not identity
    changed = {"kind": "flow_matching", "p_img": 1.5, "p_mask": 1.0, "lambda_img": 0.5, "lambda_mask": 0.25,
               "adaptive_power": 0.5, "adaptive_c": 0.01, "time_mean": 0.3, "time_std": 0.7, "ratio_r_neq_t": 0.5,
               "cheap_jvp": False, "jvp": "finite_difference", "lesion_weight": 7.0, "adaptive_mask": False}
    names = {f.name for f in dataclasses.fields(LossConfig)} - {"lesion_dilate"}
    assert set(changed) == names
    for key, value in changed.items():
        assert MeanFlowLoss.from_config(dataclasses.replace(LossConfig(), **{key: value}), 4, 1) != base, key
    assert MeanFlowLoss.from_config(load_config("demo_cond").loss).lesion_weight == 100.0
    assert MeanFlowLoss.from_config(LossConfig(), 4, 8).distance.channels == 12


@pytest.mark.parametrize("method", ["meanflow", "euler"])
def test_samplers_report_each_network_step_and_stop_within_one(method):
    import threading

    from neuromf.meanflow import SamplingStopped, sample

    calls, reported, stop = [], [], threading.Event()

    def velocity(z, r, t):
        calls.append(float(t[0]))
        return z  # u = z: a velocity whose steps are easy to count

    noise = torch.ones(1, 2, 3, 3, 3)
    out = sample(velocity, noise, steps=4, method=method, on_step=lambda i, n: reported.append((i, n)))
    assert reported == [(1, 4), (2, 4), (3, 4), (4, 4)] and len(calls) == 4
    torch.testing.assert_close(out, sample(velocity, noise, steps=4, method=method))  # the hook changes nothing

    calls.clear()

    def stop_after_two(i, n):
        if i == 2:
            stop.set()  # a cancel arriving during the second network call

    with pytest.raises(SamplingStopped, match="step 3 of 4"):
        sample(velocity, noise, steps=4, method=method, on_step=stop_after_two, stop=stop)
    assert len(calls) == 2  # no network call after the cancel
