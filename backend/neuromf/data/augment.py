"""Small random affine moves of an image + mask pair, made before encoding: more training pairs from few cases.

A stage-2 data set has tens of lesions (ds004199: 85); a generative model fitted to 64 of them, mirrored, learns
those lesions rather than their distribution. Each augmented copy rotates, scales and shifts the preprocessed
FLAIR and its mask together by a small amount (a few degrees / percent / millimetres: the anatomy stays where
the base model expects it), so the lesion keeps its place in the anatomy while its exact shape, size and grid
alignment vary. The moves are drawn from a generator seeded by (seed, case, copy), so a copy is the same in
every run and the latent cache can key it by its parameters.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from neuromf.config import DataConfig


@dataclass(frozen=True)
class AffineAugment:
    """`copies` moved copies per case (0: none), each with a rotation about each axis within +-`rotate_deg`,
    an isotropic scale within 1 +- `scale` and a shift within +-`shift_mm` per axis."""

    copies: int = 0
    rotate_deg: float = 6.0
    scale: float = 0.06
    shift_mm: float = 6.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.copies < 0:
            raise ValueError(f"augment copies must be >= 0, got {self.copies}")
        if not (0 <= self.rotate_deg <= 45 and 0 <= self.scale < 0.5 and self.shift_mm >= 0):
            raise ValueError(f"augment ranges out of bounds (rotate_deg 0-45, scale 0-0.5, shift_mm >= 0): {self}")

    def moves(self, case_id: str, copy: int) -> dict[str, list[float]]:
        """The move of copy `copy` (1..copies) of `case_id`: {'rotate_deg', 'scale', 'shift_mm'}, 3 values each."""
        digest = hashlib.sha256(f"{self.seed}:{case_id}:{copy}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return {"rotate_deg": [round(float(v), 4) for v in rng.uniform(-self.rotate_deg, self.rotate_deg, 3)],
                "scale": [round(float(1 + rng.uniform(-self.scale, self.scale)), 4)] * 3,
                "shift_mm": [round(float(v), 4) for v in rng.uniform(-self.shift_mm, self.shift_mm, 3)]}

    @classmethod
    def from_config(cls, data: DataConfig) -> AffineAugment:
        """The `data:` section's augment_* settings."""
        return cls(data.augment_copies, data.augment_rotate_deg, data.augment_scale, data.augment_shift_mm)

    @staticmethod
    def variant(moves: dict[str, list[float]]) -> str:
        """The latent cache's name for a move: its parameters, so a changed range never reuses a stale entry."""
        return "affine:" + ",".join(f"{k}={'/'.join(f'{v:g}' for v in vals)}" for k, vals in sorted(moves.items()))


def apply_moves(image: torch.Tensor, mask: torch.Tensor | None, moves: dict[str, list[float]],
                spacing: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`image` (1, H, W, D) moved by `moves` about the volume's centre (bilinear, zeros outside), `mask` the same
    way (bilinear, then > 0.5, so its boundary moves smoothly rather than in whole voxels)."""
    from monai.transforms import Affine

    move = Affine(rotate_params=[math.radians(a) for a in moves["rotate_deg"]], scale_params=moves["scale"],
                  translate_params=[mm / s for mm, s in zip(moves["shift_mm"], spacing, strict=True)],
                  padding_mode="zeros", image_only=True, device=image.device)
    moved_image = _plain(move(image.float(), mode="bilinear"))
    if mask is None:
        return moved_image, None
    return moved_image, (_plain(move(mask.float(), mode="bilinear")) > 0.5).float()


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (what the latent cache stores and the VAE takes)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
