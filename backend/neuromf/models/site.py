"""Site conditioning for the joint mode: the model is told where the lesion goes, and draws it and the FLAIR.

Unconditioned joint trainings put their lesions in one region each (the frontal pole, the cerebellum: see
docs/research_log.md), and a lesion seeded in the mask channels alone is erased by the model unless its image
channels carry it too. Here the site enters as one clean input channel from the first step: a Gaussian blob on the
latent grid at the lesion's centroid (training) or at a site drawn from the real lesions' sites (generation). The
lesion's shape, size and the FLAIR around it stay the model's; only its place is given.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuromf.data.brain import depth_map
from neuromf.data.mask_codec import DOWNSAMPLE
from neuromf.data.mask_prior import MaskPrior

# the blob's width in latent voxels (8 mm at the 2 mm grid): about a median lesion's radius
SITE_SIGMA = 1.0


def lesion_centres(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W, D) masks -> (B, 3) centroids in voxel index coordinates; NaN rows for empty masks."""
    mask = mask.float()
    total = mask.flatten(1).sum(1)
    axes = [torch.arange(n, device=mask.device, dtype=mask.dtype) for n in mask.shape[2:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    centres = torch.stack([(mask[:, 0] * g).flatten(1).sum(1) for g in grids], dim=1) / total[:, None]
    return torch.where(total[:, None] > 0, centres, torch.full_like(centres, float("nan")))


def site_map(centres: torch.Tensor, latent_shape: tuple[int, int, int], sigma: float = SITE_SIGMA) -> torch.Tensor:
    """(B, 3) sites in image-grid voxel coordinates -> (B, 1, h, w, d) Gaussian blobs (peak 1) on the latent grid,
    each latent voxel at the centre of its DOWNSAMPLE^3 image voxels; a NaN site (no lesion) gives zeros."""
    latent = (centres + 0.5) / DOWNSAMPLE - 0.5
    axes = [torch.arange(n, device=centres.device, dtype=centres.dtype) for n in latent_shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    sq = sum((g[None] - latent[:, i, None, None, None]) ** 2 for i, g in enumerate(grids))
    blob = torch.exp(-sq / (2 * sigma ** 2))
    return torch.nan_to_num(blob, nan=0.0)[:, None]


class SiteConditionedJoint(nn.Module):
    """u(z, r, t | site): a widened joint model whose input is [image, site blob, mask] (the mask channels stay
    last, where x-prediction reads them). `cond` gives the site: in training the lesion mask (its centroid), in
    generation a drawn site's coordinates."""

    def __init__(self, model: nn.Module, n_image: int = 4, sigma: float = SITE_SIGMA) -> None:
        super().__init__()
        self.model = model
        self.n_image = n_image
        self.sigma = sigma

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, n_image + n_mask, h, w, d) latents at t, (B,) times, and the sites: (B, 1, 4h, 4w, 4d) masks whose
        centroids they are, or (B, 3) image-grid voxel coordinates -> velocity of the same shape as z."""
        centres = cond.to(z.dtype) if cond.dim() == 2 else lesion_centres(cond)
        site = site_map(centres, tuple(z.shape[2:]), self.sigma).to(z.dtype)
        return self.model(torch.cat([z[:, :self.n_image], site, z[:, self.n_image:]], dim=1), r, t)


def draw_sites(prior: MaskPrior, n: int, seed: int) -> torch.Tensor:
    """(n, 3) lesion sites (image-grid voxel coordinates) where the prior would centre a lesion (`MaskPrior.
    centre_draw` among the `candidate_centres` of its reference brain: real depth, height and sites, near a real
    site drawn at random); site i depends only on (seed, i)."""
    centres = prior.candidate_centres(prior.brain, depth_map(prior.brain, prior.spacing))
    if not len(centres):
        raise ValueError("the mask prior has no voxel at the real lesions' depth and sites to put a lesion")
    draw = prior.centre_draw(centres, prior.brain)
    picks = [draw(np.random.default_rng([seed, i])) for i in range(n)]
    return torch.tensor(np.asarray(picks, dtype=np.float32).reshape(n, 3))
