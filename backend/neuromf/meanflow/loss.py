"""The MeanFlow objective: JVP target, adaptive weight and the per-channel Lp distance of the seed (Eq. 28-29)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from neuromf.meanflow.time_sampler import TimeSampler

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z_t = (1 - t) x + t eps and its velocity v = eps - x (t = 0 data, t = 1 noise)."""
    tt = _expand(t, x)
    return (1 - tt) * x + tt * noise, noise - x


def _bind(model: VelocityFn, cond: torch.Tensor | None) -> VelocityFn:
    """u(z, r, t) with a per-sample conditioning (the conditional mode's mask) bound, or the model itself."""
    if cond is None:
        return model
    return lambda z, r, t: model(z, r, t, cond=cond)


def meanflow_target(model: VelocityFn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                    cheap: bool = True, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (u, u_tgt) with u_tgt = v - (t - r) du/dt, du/dt = JVP of u over (z, r, t) along (v, 0, 1).

    `cheap=True`: a normal forward with grad for u plus a JVP under no_grad for du/dt (no forward-mode
    graph kept for the backward pass), only over the samples with r != t. `cheap=False`: one `torch.func.jvp`
    whose primal output carries the gradient. Both give the same parameter gradients because the target is
    stop-gradient. `cond` (B, ...): a conditioning passed to the model as `cond=`, subset with the samples.
    """
    if cheap:
        u = _bind(model, cond)(z, r, t)
        u_tgt = v.clone()
        # (t - r) du/dt vanishes where r = t (most samples): differentiate only the others; every layer acts
        # per sample (group norm, attention within a sample), so the subset's JVP equals the full batch's
        moving = (t - r) != 0
        if moving.any():
            sub = (z[moving], r[moving], t[moving])
            fn = _bind(model, None if cond is None else cond[moving])
            with torch.no_grad():
                _, dudt = torch.func.jvp(fn, sub, (v[moving], torch.zeros_like(sub[1]), torch.ones_like(sub[2])))
            u_tgt[moving] = v[moving] - _expand(sub[2] - sub[1], dudt) * dudt
        return u, u_tgt.detach()
    tangents = (v, torch.zeros_like(r), torch.ones_like(t))
    u, dudt = torch.func.jvp(_bind(model, cond), (z, r, t), tangents)
    u_tgt = v - _expand(t - r, v) * dudt
    return u, u_tgt.detach()


@dataclass(frozen=True)
class ChannelLp:
    """Per-channel Lp distance (Eq. 28): sum_c lambda_c mean_hwd |delta_c|^p_c, one value per sample.

    `groups` lists (channel count, p, lambda) in channel order, e.g. image latents then mask latents.
    """

    groups: tuple[tuple[int, float, float], ...] = ((4, 2.0, 1.0),)

    @classmethod
    def for_channels(cls, n_image: int, n_mask: int = 0, p_img: float = 2.0, p_mask: float = 2.0,
                     lambda_img: float = 1.0, lambda_mask: float = 1.0) -> ChannelLp:
        groups = [(n_image, p_img, lambda_img)]
        if n_mask:
            groups.append((n_mask, p_mask, lambda_mask))
        return cls(tuple(groups))

    @property
    def channels(self) -> int:
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
        the lesion-voxel part that P7-T4 reports separately."""
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
    flow_matching: bool = False
    cheap_jvp: bool = True
    group_names: Sequence[str] = ("img", "mask")

    lesion_weight: float = 0.0

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
            u, target = meanflow_target(model, z, r, t, v, cheap=self.cheap_jvp, cond=cond)
        delta = u.float() - target.float()
        groups = self.distance.per_group(delta)
        per_sample = torch.stack(groups).sum(dim=0)
        parts = {"raw": float(per_sample.detach().mean())}
        for name, g in zip(self.group_names, groups):
            parts[f"raw_{name}"] = float(g.detach().mean())
        if lesion is not None:
            parts["raw_lesion"] = float(self.distance.region_mean(delta.detach(), lesion).mean())
            if self.lesion_weight:
                per_sample = self.distance(delta, 1.0 + self.lesion_weight * lesion)
        weight = adaptive_weight(per_sample, self.adaptive_power, self.adaptive_c) if self.adaptive_power else 1.0
        loss = (weight * per_sample).mean()
        return loss, parts
