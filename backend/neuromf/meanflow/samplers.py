"""Generating latents from noise: 1-step and k-step MeanFlow, and the k-step Euler baseline."""

from __future__ import annotations

import torch

from neuromf.meanflow.loss import VelocityFn


def _full(batch: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), value, device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_meanflow(model: VelocityFn, noise: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """k-step MeanFlow: z_{t'} = z_t - (t - t') u(z_t, r=t', t); with steps=1, x = eps - u(eps, 0, 1)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, t_next in zip(times[:-1], times[1:]):
        b = z.shape[0]
        z = z - (t - t_next) * model(z, _full(b, t_next, z), _full(b, t, z))
    return z


@torch.no_grad()
def sample_euler(model: VelocityFn, noise: torch.Tensor, steps: int = 50) -> torch.Tensor:
    """Flow-matching baseline: Euler steps with the instantaneous velocity u(z, t, t)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, t_next in zip(times[:-1], times[1:]):
        tt = _full(z.shape[0], t, z)
        z = z - (t - t_next) * model(z, tt, tt)
    return z


def sample(model: VelocityFn, noise: torch.Tensor, steps: int = 1, method: str = "meanflow") -> torch.Tensor:
    if method == "meanflow":
        return sample_meanflow(model, noise, steps)
    if method == "euler":
        return sample_euler(model, noise, steps)
    raise ValueError(f"unknown sampler {method!r}; choose 'meanflow' or 'euler'")
