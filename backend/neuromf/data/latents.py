"""Turning discovered cases into cached latents on the model grid (shared by stage 1 and the FCD dataset)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from neuromf.data.latent_cache import LatentCache
from neuromf.io.nifti import Preprocessing, preprocess_pair
from neuromf.vae import MAISIVAEWrapper

LR_AXIS = 1  # (C, H, W, D) on the RAS grid: H runs left -> right


def make_cache(cache_dir: Path | str, vae: MAISIVAEWrapper, prep: Preprocessing) -> LatentCache:
    """The latent cache under `cache_dir` keyed by this VAE's identity and this preprocessing."""
    return LatentCache(cache_dir, vae.identity, prep.key())


@torch.no_grad()
def encode_case(image: Path, mask: Path | None, vae: MAISIVAEWrapper, prep: Preprocessing, cache: LatentCache,
                flip: bool = False, encode_mask: bool = False) -> dict[str, torch.Tensor]:
    """Cached tensors of one case: `z_img` (4,h,w,d), the model-grid `affine`, and with a mask `mask`
    (1,H,W,D) plus `z_mask` (4,h,w,d) when `encode_mask` (strategy A). `flip` mirrors left-right first."""
    sources = [image] + ([mask] if mask is not None else [])
    variant = ("flip" if flip else "orig") + ("+zmask" if encode_mask else "")

    def compute() -> dict[str, torch.Tensor]:
        img, msk = preprocess_pair(image, mask, prep)
        x = img.data.flip(LR_AXIS) if flip else img.data
        out = {"z_img": vae.encode(x[None])[0], "affine": torch.as_tensor(img.affine)}
        if msk is not None:
            m = msk.data.flip(LR_AXIS) if flip else msk.data
            out["mask"] = m.to(torch.uint8)
            if encode_mask:
                out["z_mask"] = vae.encode(m[None])[0]
        return out

    return cache.get(sources, variant, compute)


def encode_images(images: Iterable[Path], vae: MAISIVAEWrapper, prep: Preprocessing, cache: LatentCache,
                  flip: bool = False, progress: bool = True) -> torch.Tensor:
    """Stacked image latents (N, 4, h, w, d), with left-right mirrored copies appended when `flip`."""
    latents = []
    images = list(images)
    for path in tqdm(images, desc="encoding", disable=not progress, unit="vol"):
        for mirrored in ((False, True) if flip else (False,)):
            latents.append(encode_case(Path(path), None, vae, prep, cache, flip=mirrored)["z_img"])
    return torch.stack(latents)
