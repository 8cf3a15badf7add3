"""Sampling volumes from a trained model: noise -> 1- or k-step MeanFlow -> VAE decode -> NIfTI on the model grid."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.io.nifti import Preprocessing, save_nifti
from neuromf.meanflow import sample
from neuromf.models.flow_model import load_flow_model, read_model_meta
from neuromf.models.unet import MeanFlowUNet
from neuromf.utils import atomic_write_json, resolve_device
from neuromf.vae import MAISIVAEWrapper


def model_grid_affine(shape: tuple[int, ...], spacing: tuple[float, ...]) -> np.ndarray:
    """RAS affine of the model grid, centred on the origin (generated volumes have no scanner of their own)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -np.asarray(spacing, dtype=float) * (np.asarray(shape[:3], dtype=float) - 1) / 2
    return affine


def vae_for(meta: dict, device: str | torch.device = "cpu") -> MAISIVAEWrapper:
    """The VAE a model was trained with, with the scale factor stored in the model's sidecar."""
    vae = MAISIVAEWrapper.resolve(meta["vae"], preset=meta.get("vae_preset", "maisi"), device=device)
    vae.scale_factor = float(meta["scale_factor"])
    vae._identity = None
    if vae.identity.split(":")[-1] != str(meta.get("vae_identity", "")).split(":")[-1]:
        raise ValueError(f"the VAE {meta['vae']!r} is not the one the model was trained with "
                         f"(identity {vae.identity} vs {meta.get('vae_identity')})")
    return vae


@dataclass
class GeneratedVolume:
    index: int
    image: np.ndarray  # (H, W, D) float32 in [0, clip_max]: about [0, 1], lesions brighter
    latent: torch.Tensor


@dataclass
class GeneratedPair:
    """One generated FLAIR + lesion mask on the model grid (joint or conditional mode)."""

    index: int
    image: np.ndarray  # (H, W, D) float32 in [0, clip_max]
    mask: np.ndarray  # (H, W, D) uint8 {0, 1}
    affine: np.ndarray  # (4, 4) voxel -> world (RAS, mm)
    meta: dict[str, Any]  # written as sample_XXX.json: seed, steps, adapter, mode, ...


def write_pairs(pairs: Iterable[GeneratedPair], out_dir: Path) -> list[Path]:
    """`sample_XXX_flair.nii.gz` + `sample_XXX_mask.nii.gz` (same affine) + `sample_XXX.json`, each atomic."""
    paths = []
    for pair in pairs:
        stem = Path(out_dir) / f"sample_{pair.index:03d}"
        paths.append(save_nifti(pair.image, pair.affine, f"{stem}_flair.nii.gz"))
        paths.append(save_nifti(pair.mask, pair.affine, f"{stem}_mask.nii.gz", dtype=np.uint8))
        paths.append(atomic_write_json(Path(f"{stem}.json"), pair.meta))
    return paths


@torch.no_grad()
def sample_latents(model: MeanFlowUNet, latent_shape: list[int], n: int, steps: int, seed: int,
                   device: torch.device, method: str = "meanflow",
                   batch_size: int = 4) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(noise, latents) batches (B, C, h, w, d) from fixed-seed noise: sample i always gets the same noise,
    whatever the batch size."""
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *latent_shape), generator=generator)
    for start in range(0, n, batch_size):
        batch = noise[start:start + batch_size]
        yield batch, sample(model, batch.to(device), steps=steps, method=method).cpu()


def generate_images(model_spec: str | Path, n: int, steps: int = 1, seed: int = 0, device: str = "auto",
                    method: str = "meanflow") -> Iterator[GeneratedVolume]:
    dev = resolve_device(device)
    model, meta = load_flow_model(model_spec)
    vae = vae_for(meta, device=dev)
    index = 0
    clip_max = Preprocessing.from_dict(meta["preprocessing"]).clip_max
    for _, z in sample_latents(model, meta["latent_shape"], n, steps, seed, dev, method):
        images = vae.decode(z[:, :vae.latent_channels].to(dev)).clamp(0, clip_max).cpu()
        for i in range(z.shape[0]):
            yield GeneratedVolume(index, images[i, 0].numpy(), z[i].cpu())
            index += 1


def write_generated_images(model_spec: str | Path, out_dir: Path, n: int, steps: int = 1, seed: int = 0,
                           device: str = "auto") -> list[Path]:
    prep = read_model_meta(model_spec)["preprocessing"]
    affine = model_grid_affine(prep["shape"], prep["spacing"])
    paths = []
    for volume in generate_images(model_spec, n, steps, seed, device):
        paths.append(save_nifti(volume.image.astype(np.float32), affine,
                                Path(out_dir) / f"sample_{volume.index:03d}_flair.nii.gz"))
    return paths
