"""Turning discovered cases into cached latents on the model grid (shared by stage 1 and the FCD dataset).

Encoding a data set takes minutes on a CPU the first time, so it is a generator: it yields an `EncodingProgress`
after each case (a cached case is done in milliseconds) and returns the latents. `run_to_end` drives one to its
end; `encoding_events` hands the progress on as the training generators' `TrainEvent("encoding", ...)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from neuromf.data.augment import AffineAugment, apply_moves
from neuromf.data.latent_cache import LatentCache
from neuromf.events import TrainEvent, run_to_end
from neuromf.io.nifti import Preprocessing, Volume, preprocess_pair
from neuromf.vae import MAISIVAEWrapper

LR_AXIS = 1  # (C, H, W, D) on the RAS grid: H runs left -> right
Result = TypeVar("Result")


@dataclass(frozen=True)
class EncodingProgress:
    """`done` of `total` cases encoded (or read from the latent cache), the last one's name, the time left."""

    done: int
    total: int
    case_id: str
    eta_s: float | None = None


class EncodingClock:
    """Counts the encoded cases and estimates the time left from the mean time per case so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def tick(self, case_id: str) -> EncodingProgress:
        """One more case done: its progress record."""
        self.done += 1
        eta = (time.perf_counter() - self.started) / self.done * (self.total - self.done)
        return EncodingProgress(self.done, self.total, case_id, eta)


def encoding_events(steps: Generator[EncodingProgress, None, Result],
                    what: str = "training cases") -> Generator[TrainEvent, None, Result]:
    """An encoding generator as the training generators report it: one `TrainEvent("encoding")` per case (step =
    cases done, total_steps = cases, eta_s), before their first training step; returns the encoding's value."""
    while True:
        try:
            progress = next(steps)
        except StopIteration as finished:
            return finished.value
        yield TrainEvent("encoding", progress.done, 0, progress.total, eta_s=progress.eta_s,
                         message=f"encoding the {what} into latents: {progress.done}/{progress.total} "
                                 f"({progress.case_id})")


def make_cache(cache_dir: Path | str, vae: MAISIVAEWrapper, prep: Preprocessing) -> LatentCache:
    """The latent cache under `cache_dir` keyed by this VAE's identity and this preprocessing."""
    return LatentCache(cache_dir, vae.identity, prep.key())


@torch.no_grad()
def encode_case(image: Path, mask: Path | None, vae: MAISIVAEWrapper, prep: Preprocessing, cache: LatentCache,
                flip: bool = False, encode_mask: bool = False, moves: dict[str, list[float]] | None = None,
                preprocessed: Callable[[], tuple[Volume, Volume | None]] | None = None) -> dict[str, torch.Tensor]:
    """Cached tensors of one case: `z_img` (4,h,w,d), the model-grid `affine`, and with a mask `mask`
    (1,H,W,D) plus `z_mask` (4,h,w,d) when `encode_mask` (strategy A). `flip` mirrors left-right first, then
    `moves` (an `AffineAugment` move) moves image and mask together. `preprocessed` returns the case on the model
    grid (a memo shared by a case's variants, so the NIfTI work is done once per case, not per variant)."""
    sources = [image] + ([mask] if mask is not None else [])
    variant = ("flip" if flip else "orig") + ("+zmask" if encode_mask else "")
    variant += f"+{AffineAugment.variant(moves)}" if moves else ""

    def compute() -> dict[str, torch.Tensor]:
        img, msk = preprocessed() if preprocessed is not None else preprocess_pair(image, mask, prep)
        x = img.data.flip(LR_AXIS) if flip else img.data
        m = None if msk is None else (msk.data.flip(LR_AXIS) if flip else msk.data)
        if moves:  # on the VAE's device: on a GPU the move costs nothing beside the encoding
            x, m = apply_moves(x.to(vae.device_), None if m is None else m.to(vae.device_), moves, prep.spacing)
        out = {"z_img": vae.encode(x[None])[0], "affine": torch.as_tensor(img.affine)}
        if m is not None:
            out["mask"] = m.to(torch.uint8)
            if encode_mask:
                out["z_mask"] = vae.encode(m[None])[0]
        return out

    return cache.get(sources, variant, compute)


def encode_images_stepwise(images: Iterable[Path], vae: MAISIVAEWrapper, prep: Preprocessing, cache: LatentCache,
                           flip: bool = False,
                           progress: bool = False) -> Generator[EncodingProgress, None, torch.Tensor]:
    """`encode_images` one scan at a time: yields an EncodingProgress per scan, returns the stacked latents."""
    latents = []
    images = [Path(p) for p in images]
    clock = EncodingClock(len(images))
    for path in tqdm(images, desc="encoding", disable=not progress, unit="vol"):
        for mirrored in ((False, True) if flip else (False,)):
            latents.append(encode_case(path, None, vae, prep, cache, flip=mirrored)["z_img"])
        yield clock.tick(path.name)
    return torch.stack(latents)


def encode_images(images: Iterable[Path], vae: MAISIVAEWrapper, prep: Preprocessing, cache: LatentCache,
                  flip: bool = False, progress: bool = True) -> torch.Tensor:
    """Stacked image latents (N, 4, h, w, d), with left-right mirrored copies appended when `flip`."""
    return run_to_end(encode_images_stepwise(images, vae, prep, cache, flip, progress))
