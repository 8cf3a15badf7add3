"""Image-quality figures: PSNR and SSIM of VAE reconstructions, with MONAI's metrics."""

from __future__ import annotations

import torch
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
