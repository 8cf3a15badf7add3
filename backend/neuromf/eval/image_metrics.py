"""Image-quality figures: PSNR and SSIM of VAE reconstructions, with MONAI's metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from neuromf.vae import MAISIVAEWrapper


@torch.no_grad()
def reconstruction_metrics(vae: MAISIVAEWrapper, volumes: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of encode -> decode over volumes (N, 1, H, W, D) in [0, 1]."""
    psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    for volume in volumes:
        x = volume[None].float()
        y = vae.decode(vae.encode(x)).clamp(0, 1).cpu()
        psnr(y, x)
        ssim(y, x)
    return {"psnr_db": float(psnr.aggregate()), "ssim": float(ssim.aggregate()), "n": int(len(volumes))}


def _gaussian_1d(kernel_size: int, sigma: float) -> torch.Tensor:
    dist = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    gauss = torch.exp(-0.5 * (dist / sigma) ** 2)
    return gauss / gauss.sum()


def ssim_3d(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, kernel_size: int = 11,
            sigma: float = 1.5) -> torch.Tensor:
    """Differentiable per-volume SSIM of (B, 1, H, W, D) tensors, equal to MONAI's SSIMMetric (Gaussian window).

    The 3D Gaussian window is separable, so three 1D convolutions replace MONAI's 11^3-tap kernel: the SSIM
    loss then costs a few percent of a small VAE's step instead of doubling it.
    """
    if x.shape != y.shape or x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"ssim_3d expects two (B, 1, H, W, D) tensors of one shape, got {x.shape} and {y.shape}")
    window = _gaussian_1d(kernel_size, sigma).to(x)
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # the five local moments, blurred in one pass per axis
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel_size
        maps = F.conv3d(maps, window.view(shape).expand(5, *shape[1:]), groups=5)
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = maps.unbind(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_x, var_y, cov = mu_xx - mu_x**2, mu_yy - mu_y**2, mu_xy - mu_x * mu_y
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
