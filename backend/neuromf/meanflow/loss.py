"""The MeanFlow objective: JVP target, adaptive weight and the per-channel Lp distance of the seed (Eq. 28-29)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from neuromf.config import LossConfig
from neuromf.meanflow.time_sampler import TimeSampler

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


class PathSample(NamedTuple):
    """A point of the straight path from data to noise, and the path's velocity there."""

    z: torch.Tensor  # (B, C, h, w, d) noisy latents z_t
    v: torch.Tensor  # (B, C, h, w, d) velocity dz/dt = eps - x


class MeanFlowPrediction(NamedTuple):
    """The network's average velocity and the (stop-gradient) MeanFlow target it is regressed on."""

    u: torch.Tensor  # (B, C, h, w, d) u(z_t, r, t), with grad
    target: torch.Tensor  # (B, C, h, w, d) v - (t - r) du/dt, detached


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
    """z_t = (1 - t) x + t eps and its velocity v = eps - x (t = 0 data, t = 1 noise).

    Args:
        x: (B, C, h, w, d) clean latents.
        noise: (B, C, h, w, d) Gaussian noise eps.
        t: (B,) times in [0, 1].
    Returns:
        PathSample(z, v), both (B, C, h, w, d).
    """
    tt = _expand(t, x)
    return PathSample((1 - tt) * x + tt * noise, noise - x)


def _bind(model: VelocityFn, cond: torch.Tensor | None) -> VelocityFn:
    """u(z, r, t) with a per-sample conditioning (the conditional mode's mask) bound, or the model itself."""
    if cond is None:
        return model
    return lambda z, r, t: model(z, r, t, cond=cond)


def plain_module(model: VelocityFn) -> VelocityFn:
    """`model` without its DistributedDataParallel / torch.compile wrappers: the module the JVP differentiates.

    Under DDP the JVP must not go through the wrapper: its forward would count as a second forward with grad
    state for the reducer, and ranks differentiate different numbers of samples (only those with r != t).
    """
    while isinstance(model, torch.nn.Module):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            break
        model = inner
    return model


def _jvp_fp32(fn: VelocityFn, primals: tuple[torch.Tensor, ...],
              tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """du/dt by forward-mode AD in fp32 whatever autocast is active (forward-mode AD under bf16 autocast fails,
    and the target must not carry bf16 rounding), without grad: the target is stop-gradient."""
    device_type = primals[0].device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        primals = tuple(p.float() for p in primals)
        tangents = tuple(t.float() for t in tangents)
        return torch.func.jvp(fn, primals, tangents)[1]


# du/dt by a central difference: the step along (v, 0, 1). The time embedding's fastest feature is sin(1000 t), whose
# truncation error (1000 h)^2 / 6 is 1.7e-3 relative at 1e-4; a smaller step lets fp32 rounding of the network's
# output (~1e-7 of |u|, divided by 2 h) take over. tests/backend/test_meanflow.py and docs/one_step.md give the
# measured error against the exact JVP over the steps tried.
FD_STEP = 1e-4
JVP_METHODS = ("exact", "finite_difference")


def _central_difference_fp32(fn: VelocityFn, primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...],
                             step: float = FD_STEP) -> torch.Tensor:
    """du/dt ~ (u(p + h d) - u(p - h d)) / 2h in fp32 without grad: two plain forwards instead of forward-mode AD
    (which costs ~3 forwards on CPU). Both forwards start from the same RNG state, so a stochastic layer (dropout)
    draws the same mask at both points, as the exact JVP differentiates one draw."""
    device_type = primals[0].device.type
    devices = [primals[0].device] if device_type == "cuda" else []
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        primals = tuple(p.float() for p in primals)
        tangents = tuple(t.float() for t in tangents)
        ends = []
        for sign in (1.0, -1.0):
            with torch.random.fork_rng(devices=devices, device_type=device_type):
                ends.append(fn(*(p + sign * step * d for p, d in zip(primals, tangents))).float())
        return (ends[0] - ends[1]) / (2 * step)


def meanflow_target(model: VelocityFn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                    cheap: bool = True, cond: torch.Tensor | None = None,
                    jvp: str = "exact") -> MeanFlowPrediction:
    """u and its target u_tgt = v - (t - r) du/dt, du/dt = JVP of u over (z, r, t) along (v, 0, 1).

    `cheap=True`: a normal forward with grad for u plus a JVP under no_grad for du/dt (no forward-mode
    graph kept for the backward pass), only over the samples with r != t. `cheap=False`: one `torch.func.jvp`
    whose primal output carries the gradient. Both give the same parameter gradients because the target is
    stop-gradient. `jvp="finite_difference"` (with `cheap=True`) replaces the JVP by a central difference along
    (v, 0, 1): two no-grad forwards of the moving samples (`FD_STEP`) instead of forward-mode AD (docs/one_step.md).

    Args:
        model: u(z, r, t) -> (B, C, h, w, d).
        z, v: (B, C, h, w, d) path point and velocity (`interpolate`).
        r, t: (B,) interval ends, r <= t.
        cond: optional (B, ...) conditioning passed to the model as `cond=`, subset with the samples.
        jvp: "exact" (forward-mode AD) or "finite_difference".
    Returns:
        MeanFlowPrediction(u, target), both (B, C, h, w, d); the target is detached.
    """
    if jvp not in JVP_METHODS:
        raise ValueError(f"jvp must be one of {JVP_METHODS}, got {jvp!r}")
    plain = plain_module(model)
    if cheap:
        u = _bind(model, cond)(z, r, t)  # the one forward with grad (through DDP / autocast when active)
        u_tgt = v.clone()
        # (t - r) du/dt vanishes where r = t (most samples): differentiate only the others; every layer acts
        # per sample (group norm, attention within a sample), so the subset's JVP equals the full batch's
        moving = (t - r) != 0
        if moving.any():
            sub = (z[moving], r[moving], t[moving])
            fn = _bind(plain, None if cond is None else cond[moving])
            derivative = _jvp_fp32 if jvp == "exact" else _central_difference_fp32
            dudt = derivative(fn, sub, (v[moving], torch.zeros_like(sub[1]), torch.ones_like(sub[2])))
            u_tgt[moving] = v[moving] - _expand(sub[2] - sub[1], dudt) * dudt
        return MeanFlowPrediction(u, u_tgt.detach())
    if jvp != "exact":
        raise ValueError("loss.jvp: finite_difference needs loss.cheap_jvp: true (the difference runs without grad)")
    if plain is not model:
        raise ValueError("loss.cheap_jvp: false differentiates through the model's forward with grad, which DDP and "
                         "torch.compile do not support: set loss.cheap_jvp: true for multi-GPU or compiled runs")
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    u, dudt = torch.func.jvp(_bind(model, cond), (z, r, t), tangents)
    u_tgt = v - _expand(t - r, v) * dudt
    return MeanFlowPrediction(u, u_tgt.detach())


@dataclass(frozen=True)
class ChannelLp:
    """Per-channel Lp distance (Eq. 28): sum_c lambda_c mean_hwd |delta_c|^p_c, one value per sample.

    `groups` lists (channel count, p, lambda) in channel order, e.g. image latents then mask latents.
    """

    groups: tuple[tuple[int, float, float], ...] = ((4, 2.0, 1.0),)

    @classmethod
    def for_channels(cls, n_image: int, n_mask: int = 0, p_img: float = 2.0, p_mask: float = 2.0,
                     lambda_img: float = 1.0, lambda_mask: float = 1.0) -> ChannelLp:
        """Groups for `n_image` image channels, then `n_mask` mask channels (none when 0)."""
        groups = [(n_image, p_img, lambda_img)]
        if n_mask:
            groups.append((n_mask, p_mask, lambda_mask))
        return cls(tuple(groups))

    @property
    def channels(self) -> int:
        """Total channel count over the groups."""
        return sum(g[0] for g in self.groups)

    def per_group(self, delta: torch.Tensor, voxel_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One (B,) tensor per group: lambda * sum over its channels of the spatial mean of w |delta|^p.

        Args:
            delta: (B, C, h, w, d) prediction minus target.
            voxel_weight: optional (B, 1, h, w, d) weight per latent voxel (e.g. 1 + w * lesion region), so a
                lesion that fills 0.4% of the grid is not averaged away.
        """
        if delta.shape[1] != self.channels:
            raise ValueError(f"loss expects {self.channels} channels, got {delta.shape[1]}")
        out, start = [], 0
        for n, p, lam in self.groups:
            part = delta[:, start:start + n].abs().pow(p)
            if voxel_weight is not None:
                part = part * voxel_weight
            out.append(lam * part.flatten(2).mean(dim=2).sum(dim=1))
            start += n
        return out

    def __call__(self, delta: torch.Tensor, voxel_weight: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack(self.per_group(delta, voxel_weight)).sum(dim=0)

    def region_mean(self, delta: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """(B,) unweighted Lp of the first group (the image latents) averaged over `region` (B, 1, h, w, d) only:
        the lesion-voxel part the training log reports separately."""
        n, p, lam = self.groups[0]
        part = delta[:, :n].abs().pow(p).sum(dim=1, keepdim=True)
        weight = region.expand_as(part)
        return lam * (part * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1.0)


def adaptive_weight(per_sample: torch.Tensor, power: float = 1.0, c: float = 1e-3) -> torch.Tensor:
    """w = 1 / (L + c)^p with stop-gradient: turns the loss into a robust, roughly scale-free objective."""
    return 1.0 / (per_sample.detach() + c).pow(power)


@dataclass
class MeanFlowLoss:
    """MeanFlow (or, with `flow_matching=True`, plain flow-matching) training loss on a latent batch."""

    distance: ChannelLp = field(default_factory=ChannelLp)
    time_sampler: TimeSampler = field(default_factory=TimeSampler)
    adaptive_power: float = 1.0
    adaptive_c: float = 1e-3
    adaptive_mask: bool = True  # False: the groups after the first (mask channels) enter without the adaptive weight
    flow_matching: bool = False
    cheap_jvp: bool = True
    jvp: str = "exact"  # du/dt: "exact" (forward-mode AD) or "finite_difference" (two no-grad forwards)
    group_names: Sequence[str] = ("img", "mask")

    lesion_weight: float = 0.0

    @classmethod
    def from_config(cls, loss: LossConfig, n_image: int = 4, n_mask: int = 0) -> MeanFlowLoss:
        """The loss a run's `loss:` config section describes, for `n_image` image and `n_mask` mask channels.

        Args:
            loss: the config section (p, lambda per channel group, time sampler, adaptive weight, lesion weight).
            n_image, n_mask: channel counts of the model's latents (image first).
        Returns:
            The configured MeanFlowLoss (flow matching when `loss.kind` is "flow_matching").
        """
        return cls(
            distance=ChannelLp.for_channels(n_image, n_mask, loss.p_img, loss.p_mask, loss.lambda_img,
                                            loss.lambda_mask),
            time_sampler=TimeSampler(loss.time_mean, loss.time_std, loss.ratio_r_neq_t),
            adaptive_power=loss.adaptive_power, adaptive_c=loss.adaptive_c, adaptive_mask=loss.adaptive_mask,
            flow_matching=loss.kind == "flow_matching", cheap_jvp=loss.cheap_jvp, jvp=loss.jvp,
            lesion_weight=loss.lesion_weight,
        )

    def __call__(self, model: VelocityFn, x: torch.Tensor, generator: torch.Generator | None = None,
                 lesion: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a latent batch.

        Args:
            model: u(z, r, t) with z (B, C, h, w, d) and r, t (B,).
            x: (B, C, h, w, d) clean latents.
            lesion: optional (B, 1, h, w, d) lesion region in [0, 1]: the loss weighs it by 1 + `lesion_weight`,
                and the unweighted image-latent loss inside it is reported as `raw_lesion`.
            cond: optional per-sample conditioning passed to the model as `cond=` (the conditional mode's mask).
        Returns:
            (adaptive-weighted loss to minimise, unweighted parts `raw`, `raw_img`, `raw_mask`, `raw_lesion`).
        """
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(x.device, x.dtype)
        r, t = self.time_sampler(x.shape[0], device=x.device, generator=generator)
        if self.flow_matching:
            r = t
        z, v = interpolate(x, noise, t)
        if self.flow_matching:
            u, target = _bind(model, cond)(z, t, t), v
        else:
            u, target = meanflow_target(model, z, r, t, v, cheap=self.cheap_jvp, cond=cond, jvp=self.jvp)
        delta = u.float() - target.float()
        groups = self.distance.per_group(delta)
        per_sample = torch.stack(groups).sum(dim=0)
        parts = {"raw": float(per_sample.detach().mean())}
        for name, g in zip(self.group_names, groups):
            parts[f"raw_{name}"] = float(g.detach().mean())
        if lesion is not None:
            parts["raw_lesion"] = float(self.distance.region_mean(delta.detach(), lesion).mean())
            if self.lesion_weight:
                groups = self.distance.per_group(delta, 1.0 + self.lesion_weight * lesion)
        weighted, plain = (groups, groups[:0]) if self.adaptive_mask else (groups[:1], groups[1:])
        per_sample = torch.stack(weighted).sum(dim=0)
        weight = adaptive_weight(per_sample, self.adaptive_power, self.adaptive_c) if self.adaptive_power else 1.0
        loss = (weight * per_sample + sum(plain, torch.zeros_like(per_sample))).mean()
        return loss, parts
