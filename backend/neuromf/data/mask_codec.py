"""Lesion-mask representations on the latent grid (the mask channels of joint synthesis) and their inverses.

- "vae" (strategy A, Eq. 37): the mask through the image VAE -> 4 channels.
- "downsample" (strategy B, Eq. 38): the binary mask reduced 4x per axis (nearest, area fraction or max) -> 1 channel.
- "sdf": tanh of the signed distance to the lesion boundary (mm / `sdf_scale_mm`, positive inside), sampled at
  the voxel centres of a grid `subgrid` times finer than the latent grid and pixel-shuffled into `subgrid**3`
  channels. Decoded by trilinear upsampling and a threshold, so boundaries fall between voxels. A bounded, dense
  signal: a binary channel at 3 mm made a median lesion 1-3 latent voxels and decoded a third of them to nothing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from neuromf.vae import DOWNSAMPLE

STRATEGIES = ("vae", "downsample", "sdf")
DOWNSAMPLE_MODES = ("nearest", "area", "max")


def mask_channels(strategy: str, latent_channels: int = 4, subgrid: int = 2) -> int:
    """Number of mask channels a strategy adds to the image latents."""
    if strategy not in STRATEGIES:
        raise ValueError(f"mask_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "vae":
        return latent_channels
    return subgrid ** 3 if strategy == "sdf" else 1


def downsample_mask(mask: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """(B, 1, H, W, D) binary mask -> (B, 1, H/4, W/4, D/4) values in [0, 1]."""
    if mode == "nearest":
        return F.interpolate(mask, scale_factor=1 / DOWNSAMPLE, mode="nearest")
    if mode == "area":
        return F.avg_pool3d(mask, DOWNSAMPLE)
    if mode == "max":
        return F.max_pool3d(mask, DOWNSAMPLE)
    raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")


def upsample_mask(low: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Strategy B's inverse: trilinear 4x upsampling of a [0, 1] map, then threshold -> binary float mask."""
    return (F.interpolate(low, scale_factor=DOWNSAMPLE, mode="trilinear", align_corners=False) > threshold).float()


def encode_mask_channel(low: torch.Tensor, scale: float) -> torch.Tensor:
    """Strategy B: [0, 1] -> [-scale, scale] (about the image latents' spread)."""
    return (2.0 * low - 1.0) * scale


def decode_mask_channel(channel: torch.Tensor, scale: float) -> torch.Tensor:
    """Strategy B's inverse of `encode_mask_channel`: [-scale, scale] -> [0, 1], clamped."""
    return ((channel / scale + 1.0) / 2.0).clamp(0, 1)


def pixel_unshuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, fH, fW, fD) -> (B, C f^3, H, W, D): each f^3 block becomes channels (lossless)."""
    b, c, h, w, d = x.shape
    if h % factor or w % factor or d % factor:
        raise ValueError(f"grid {tuple(x.shape[2:])} is not divisible by {factor}")
    x = x.reshape(b, c, h // factor, factor, w // factor, factor, d // factor, factor)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor ** 3, h // factor, w // factor, d // factor)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of `pixel_unshuffle_3d`: (B, C f^3, H, W, D) -> (B, C, fH, fW, fD)."""
    b, cf, h, w, d = x.shape
    c = cf // factor ** 3
    x = x.reshape(b, c, factor, factor, factor, h, w, d)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, h * factor, w * factor, d * factor)


def signed_distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Signed distance (mm) to the lesion boundary, positive inside, measured from voxel faces (+-half a voxel)."""
    mask = np.asarray(mask, dtype=bool)
    half = 0.5 * min(spacing)
    if not mask.any():
        # no boundary: every voxel is "far outside"; a large finite value keeps tanh at -1
        return np.full(mask.shape, -1e3, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    return np.where(mask, inside - half, -(outside - half)).astype(np.float32)


def _sample_cell_centres(values: torch.Tensor, stride: int) -> torch.Tensor:
    """Values at the centres of `stride`^3 cells by trilinear interpolation (even strides: mean of the 2^3
    voxels around the centre). Point sampling, not an average over the cell, which biases small lesions."""
    if stride == 1:
        return values
    if stride % 2:
        offset = stride // 2
        return values[..., offset::stride, offset::stride, offset::stride]
    offset = stride // 2 - 1
    return F.avg_pool3d(values[..., offset:, offset:, offset:], kernel_size=2, stride=stride)


def encode_sdf(mask: torch.Tensor, spacing: tuple[float, float, float], scale_mm: float = 6.0,
               subgrid: int = 2) -> torch.Tensor:
    """(B, 1, H, W, D) binary mask -> (B, subgrid^3, H/4, W/4, D/4) tanh(signed distance / scale) in (-1, 1)."""
    if DOWNSAMPLE % subgrid:
        raise ValueError(f"sdf subgrid must divide {DOWNSAMPLE}, got {subgrid}")
    phi = torch.stack([torch.from_numpy(signed_distance_mm(m[0].cpu().numpy() > 0.5, spacing))[None]
                       for m in mask]).to(mask.device)
    fine = torch.tanh(_sample_cell_centres(phi, DOWNSAMPLE // subgrid) / scale_mm)
    return pixel_unshuffle_3d(fine, subgrid)


def decode_sdf(channels: torch.Tensor, subgrid: int = 2, threshold: float = 0.0) -> torch.Tensor:
    """Inverse of `encode_sdf`: (B, subgrid^3, h, w, d) -> (B, 1, 4h, 4w, 4d) binary float mask.

    `threshold` is on the tanh scale (0 = the boundary; tanh(-2 mm / scale) grows masks by about 2 mm).
    """
    fine = pixel_shuffle_3d(channels, subgrid)
    stride = DOWNSAMPLE // subgrid
    full = F.interpolate(fine, scale_factor=stride, mode="trilinear", align_corners=False) if stride > 1 else fine
    return (full > threshold).float()


def tanh_threshold(threshold_mm: float, scale_mm: float) -> float:
    """A boundary offset in mm expressed on the tanh(sd / scale) scale of `encode_sdf`."""
    return math.tanh(threshold_mm / scale_mm)


def lesion_region(mask: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """(B, 1, H, W, D) image-grid mask -> (B, 1, H/4, W/4, D/4) latent voxels touching the lesion, grown by
    `dilate` latent voxels: where the lesion-weighted loss puts its weight."""
    region = F.max_pool3d(mask.float(), DOWNSAMPLE)
    if dilate:
        region = F.max_pool3d(region, 2 * dilate + 1, stride=1, padding=dilate)
    return region
