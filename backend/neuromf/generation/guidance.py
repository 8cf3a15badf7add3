"""Guidance of the velocity at sampling time: classifier-free guidance with an "empty" branch.

`empty_path_guidance` guides a joint model's mask estimate against the path an empty mask takes from the same
noise; `guided_velocity` guides a conditioned (ControlNet) model by its mask against the same model given an empty
mask. Both return a velocity function u(z, r, t) for `neuromf.meanflow.sample`.
"""

from __future__ import annotations

import functools

import torch

from neuromf.meanflow.loss import VelocityFn
from neuromf.models.controlnet import ConditionedFlowModel
from neuromf.models.unet import X_PREDICTION_MIN_T


def empty_path_guidance(model: VelocityFn, n_image: int, empty_value: float, noise: torch.Tensor,
                        guidance: float) -> VelocityFn:
    """A joint x-prediction model whose mask estimate is guided against the empty mask's path.

    x^_g = x^_empty + s (x^ - x^_empty), where x^_empty is the model's mask estimate when the mask channels of z are
    replaced by (1 - t) e + t eps, the straight path an empty mask (value e) takes from the same starting noise eps:
    classifier-free guidance with "no lesion drawn so far" as the unconditional branch. s > 1 extrapolates along
    what the lesion drawn so far changes, so a model that commits too weakly (its lesions fade into empty masks and
    specks) commits more; the image channels keep the model's own velocity. Two model calls per step.

    Args:
        model: the joint model, u(z, r, t) over (B, n_image + n_mask, h, w, d), mask channels x-predicted.
        n_image: image channels (the mask channels follow them).
        empty_value: the mask channels' latent value for an empty mask (`JointModel.empty_mask_value`).
        noise: (B, C, h, w, d) the batch's starting noise, at t = 1.
        guidance: s >= 0.
    Returns:
        u(z, r, t) with guided mask channels.
    """
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    mask_noise = noise[:, n_image:]

    def velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_col = t.view(-1, *([1] * (z.dim() - 1)))
        empty_z = torch.cat([z[:, :n_image], (1 - t_col) * empty_value + t_col * mask_noise], dim=1)
        u, u_empty = model(z, r, t), model(empty_z, r, t)
        t_safe = t_col.clamp(min=X_PREDICTION_MIN_T)  # the clamp the model's u = (z - x^) / t uses
        estimate = z[:, n_image:] - t_safe * u[:, n_image:]
        empty_estimate = empty_z[:, n_image:] - t_safe * u_empty[:, n_image:]
        guided = empty_estimate + guidance * (estimate - empty_estimate)
        return torch.cat([u[:, :n_image], (z[:, n_image:] - guided) / t_safe], dim=1)

    return velocity


def guided_velocity(model: ConditionedFlowModel, cond: torch.Tensor, guidance: float = 1.0) -> VelocityFn:
    """u(z, r, t | mask) with mask guidance: u_empty + s (u_mask - u_empty), u_empty = the same model given an empty
    mask (what it learned from the healthy cases), s = `guidance`.

    Classifier-free guidance with the empty mask as the unconditional branch: s > 1 extrapolates along what the mask
    changes, so a lesion the trained model renders too faintly (a small one on a coarse grid) comes out brighter,
    at the price of a second model call per step. s = 1 is the conditioned model itself (one call).
    """
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if guidance == 1.0:
        return functools.partial(model, cond=cond)
    empty = torch.zeros_like(cond)

    def velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u_empty = model(z, r, t, cond=empty)
        return u_empty + guidance * (model(z, r, t, cond=cond) - u_empty)

    return velocity
