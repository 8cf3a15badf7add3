"""Generating latents from noise: 1-step and k-step MeanFlow, and the k-step Euler baseline."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import torch

from neuromf.meanflow.loss import VelocityFn

StepCallback = Callable[[int, int], None]  # on_step(i, n): network step i of n is done
SAMPLE_BATCH = 4  # samples per model call of `sample_latents` unless told otherwise


class SamplingStopped(Exception):
    """Raised before the next network step when the caller's `stop` event is set (a cancel from a GUI)."""


def _step(i: int, n: int, on_step: StepCallback | None, stop: threading.Event | None) -> None:
    """Before step i: raise SamplingStopped when asked to stop; after step i-1: report it."""
    if i and on_step is not None:
        on_step(i, n)
    if i < n and stop is not None and stop.is_set():
        raise SamplingStopped(f"stopped before sampling step {i + 1} of {n}")


def _full(batch: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), value, device=like.device, dtype=like.dtype)


@torch.no_grad()
def sample_meanflow(model: VelocityFn, noise: torch.Tensor, steps: int = 1, on_step: StepCallback | None = None,
                    stop: threading.Event | None = None) -> torch.Tensor:
    """k-step MeanFlow: z_{t'} = z_t - (t - t') u(z_t, r=t', t); with steps=1, x = eps - u(eps, 0, 1).

    Args:
        model: u(z, r, t) with z (B, C, h, w, d) and r, t (B,) -> (B, C, h, w, d).
        noise: (B, C, h, w, d) Gaussian noise, the state at t = 1.
        steps: number of equal steps from t = 1 to t = 0.
        on_step: called with (i, steps) after each step (progress per network step).
        stop: when set, SamplingStopped is raised before the next step (a cancel takes one step at most).
    Returns:
        (B, C, h, w, d) latents at t = 0, on noise's device.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        _step(i, steps, on_step, stop)
        b = z.shape[0]
        z = z - (t - t_next) * model(z, _full(b, t_next, z), _full(b, t, z))
    _step(steps, steps, on_step, stop)
    return z


@torch.no_grad()
def sample_euler(model: VelocityFn, noise: torch.Tensor, steps: int = 50, last_t: float = 0.0,
                 on_step: StepCallback | None = None, stop: threading.Event | None = None) -> torch.Tensor:
    """Flow-matching baseline: Euler steps with the instantaneous velocity u(z, t, t).

    Args:
        model: u(z, r, t) with z (B, C, h, w, d) and r, t (B,) -> (B, C, h, w, d); called with r = t.
        noise: (B, C, h, w, d) Gaussian noise, the state at t = 1.
        steps: number of Euler steps from t = 1 to t = 0.
        last_t: 0 for equal steps; else the last step starts here (steps - 1 equal steps from 1 to `last_t`, then
            one to 0). An x-prediction model's u = (z - x^) / max(t, t_min) lands exactly on its estimate x^ only
            from t >= t_min: below it, equal steps leave part of the noise in the result.
        on_step: called with (i, steps) after each step.
        stop: when set, SamplingStopped is raised before the next step.
    Returns:
        (B, C, h, w, d) latents at t = 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= last_t < 1.0:
        raise ValueError(f"last_t must lie in [0, 1), got {last_t}")
    if last_t > 0 and steps > 1:
        times = torch.linspace(1.0, last_t, steps).tolist() + [0.0]
    else:
        times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        _step(i, steps, on_step, stop)
        tt = _full(z.shape[0], t, z)
        z = z - (t - t_next) * model(z, tt, tt)
    _step(steps, steps, on_step, stop)
    return z


def sample(model: VelocityFn, noise: torch.Tensor, steps: int = 1, method: str = "meanflow",
           last_t: float = 0.0, on_step: StepCallback | None = None,
           stop: threading.Event | None = None) -> torch.Tensor:
    """Latents from noise with the named sampler.

    Args:
        model: u(z, r, t) with z (B, C, h, w, d) and r, t (B,) -> (B, C, h, w, d).
        noise: (B, C, h, w, d) Gaussian noise at t = 1.
        steps: sampling steps.
        method: "meanflow" (`sample_meanflow`) or "euler" (`sample_euler`).
        last_t: Euler only: where the last step starts (`sample_euler`).
        on_step: called with (i, steps) after each network step.
        stop: when set, SamplingStopped is raised before the next step.
    Returns:
        (B, C, h, w, d) latents at t = 0.
    """
    if method == "meanflow":
        return sample_meanflow(model, noise, steps, on_step, stop)
    if method == "euler":
        return sample_euler(model, noise, steps, last_t, on_step, stop)
    raise ValueError(f"unknown sampler {method!r}; choose 'meanflow' or 'euler'")


def sample_latents(model: torch.nn.Module, latent_shape: list[int], n: int, steps: int, seed: int,
                   device: torch.device, method: str = "meanflow", batch_size: int = SAMPLE_BATCH,
                   velocity: Callable[[torch.Tensor, int], VelocityFn] | None = None, last_t: float = 0.0,
                   on_step: Callable[[int, int], None] | None = None, stop: threading.Event | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Latent batches from fixed-seed noise: sample i always gets the same noise, whatever the batch size.

    Args:
        model: u(z, r, t) over (B, C, h, w, d) latents (a base UNet, or a joint model with mask channels).
        latent_shape: (C, h, w, d) of one sample.
        n: number of samples.
        steps: sampler steps (1 = one-step MeanFlow).
        seed: seeds the noise of all n samples, drawn at once on the CPU.
        device: where the model runs.
        method: "meanflow" or "euler" (`neuromf.meanflow.sample`).
        batch_size: samples per model call; the last batch may be smaller.
        velocity: builds the velocity a batch is sampled with from its noise (on `device`) and the index of its
            first sample, e.g. guidance that follows each sample's own noise; None: `model` itself.
        last_t: Euler only: where the last step starts (`neuromf.meanflow.samplers.sample_euler`).
        on_step, stop: per network step progress and cancel (`sample`), for each batch.
    Yields:
        (noise, latents): both (B, C, h, w, d) on the CPU, noise at t = 1 and the sampled latents at t = 0.
    """
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *latent_shape), generator=generator)
    for start in range(0, n, batch_size):
        batch = noise[start:start + batch_size]
        on_device = batch.to(device)
        fn = model if velocity is None else velocity(on_device, start)
        yield batch, sample(fn, on_device, steps=steps, method=method, last_t=last_t, on_step=on_step, stop=stop).cpu()
