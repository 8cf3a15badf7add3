"""A prior over lesion masks for the conditional mode: real training lesions, augmented and re-placed.

A drawn mask is one of the training lesions (cropped to its bounding box), mirrored left-right at random, and
moved to a new centre chosen among brain voxels whose depth below the brain surface lies within the range of
the real lesions' depths (FCD lesions sit at the grey/white junction, a few mm to ~2 cm deep) and whose height
(inferior-superior) lies within the real lesions' range (FCD is a cortical malformation of the cerebrum: no
lesion in the cerebellum or brainstem unless the training lesions go there). A placement is
kept when >= 95% of the lesion lies inside the reference brain; volumes therefore follow the training
distribution. The reference brain is the voxel-wise mean of the training FLAIRs on the model grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage

from neuromf.utils import atomic_write

BRAIN_THRESHOLD = 0.05
MIN_INSIDE = 0.95


def brain_of(mean_image: np.ndarray, threshold: float = BRAIN_THRESHOLD) -> np.ndarray:
    """Largest foreground component of a FLAIR on the model grid, holes filled."""
    labels, n = ndimage.label(mean_image > threshold)
    if n == 0:
        return np.zeros(mean_image.shape, dtype=bool)
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def _crop(mask: np.ndarray) -> np.ndarray:
    coords = np.argwhere(mask)
    lo, hi = coords.min(0), coords.max(0) + 1
    return mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy()


@dataclass
class MaskPrior:
    """Real lesions (cropped, bool) + a reference brain on the model grid + the real lesions' depth range (mm)."""

    lesions: list[np.ndarray]
    brain: np.ndarray
    spacing: tuple[float, float, float]
    depth_range: tuple[float, float]
    # inferior-superior voxel range (axis 2 of the RAS grid) of the real lesion centroids; None = anywhere
    height_range: tuple[float, float] | None = None

    @classmethod
    def from_cases(cls, masks: list[np.ndarray], images: list[np.ndarray],
                   spacing: tuple[float, float, float]) -> MaskPrior:
        """Build from training masks and FLAIRs on the model grid (all the same shape)."""
        lesions = [np.asarray(m) > 0.5 for m in masks if np.asarray(m).any()]
        if not lesions:
            raise ValueError("the mask prior needs at least one non-empty training lesion")
        brain = brain_of(np.mean(np.stack(images), axis=0))
        depth = ndimage.distance_transform_edt(brain, sampling=spacing)
        centres = [np.round(ndimage.center_of_mass(m)).astype(int) for m in lesions]
        # median depth of the lesion's voxels, as the lesion-likeness check measures it
        depths = [float(np.median(depth[m])) for m in lesions]
        heights = [float(c[2]) for c in centres]
        return cls([_crop(m) for m in lesions], brain, tuple(float(s) for s in spacing),
                   (min(depths), max(depths)), (min(heights), max(heights)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.brain.shape)

    def candidate_centres(self) -> np.ndarray:
        """(K, 3) voxel indices where a lesion centre may go."""
        depth = ndimage.distance_transform_edt(self.brain, sampling=self.spacing)
        lo, hi = self.depth_range
        allowed = self.brain & (depth >= lo) & (depth <= hi)
        if self.height_range is not None:
            height = np.arange(self.shape[2])[None, None, :]
            allowed &= (height >= self.height_range[0]) & (height <= self.height_range[1])
        return np.argwhere(allowed)

    def sample(self, rng: np.random.Generator, max_tries: int = 200) -> np.ndarray:
        """One (H, W, D) uint8 lesion mask on the model grid."""
        centres = self.candidate_centres()
        if not len(centres):
            raise ValueError("the mask prior's reference brain has no voxel at the real lesions' depth")
        depth = ndimage.distance_transform_edt(self.brain, sampling=self.spacing)
        lo, hi = self.depth_range
        best, best_inside = None, -1.0
        for _ in range(max_tries):
            lesion = self.lesions[rng.integers(len(self.lesions))]
            if rng.random() < 0.5:
                lesion = lesion[::-1]  # left-right mirror (axis 0 runs left -> right on the RAS grid)
            centre = centres[rng.integers(len(centres))]
            placed = self._place(lesion, centre)
            if not placed.any():
                continue
            inside = float((placed & self.brain).sum()) / float(placed.sum())
            if inside >= MIN_INSIDE and lo <= float(np.median(depth[placed])) <= hi:
                return placed.astype(np.uint8)
            if inside > best_inside:
                best, best_inside = placed, inside
        if best is None:
            raise ValueError("the mask prior could not place any lesion inside the grid")
        return best.astype(np.uint8)

    def _place(self, lesion: np.ndarray, centre: np.ndarray) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        start = np.asarray(centre) - np.asarray(lesion.shape) // 2
        lo = np.maximum(start, 0)
        hi = np.minimum(start + lesion.shape, self.shape)
        if np.any(hi <= lo):
            return out
        src_lo = lo - start
        src_hi = src_lo + (hi - lo)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = lesion[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1],
                                                             src_lo[2]:src_hi[2]]
        return out

    def save(self, path: Path | str) -> Path:
        """safetensors (no pickle): the brain, each lesion, the spacing and depth range."""
        tensors = {"brain": torch.from_numpy(self.brain.astype(np.uint8)),
                   "spacing": torch.tensor(self.spacing, dtype=torch.float64),
                   "depth_range": torch.tensor(self.depth_range, dtype=torch.float64)}
        if self.height_range is not None:
            tensors["height_range"] = torch.tensor(self.height_range, dtype=torch.float64)
        for i, lesion in enumerate(self.lesions):
            tensors[f"lesion_{i:04d}"] = torch.from_numpy(lesion.astype(np.uint8))
        return atomic_write(Path(path), lambda p: save_file(tensors, str(p)))

    @classmethod
    def load(cls, path: Path | str) -> MaskPrior:
        try:
            tensors = load_file(str(path))
            lesions = [tensors[k].numpy() > 0 for k in sorted(tensors) if k.startswith("lesion_")]
            height = tuple(tensors["height_range"].tolist()) if "height_range" in tensors else None
            return cls(lesions, tensors["brain"].numpy() > 0, tuple(tensors["spacing"].tolist()),
                       tuple(tensors["depth_range"].tolist()), height)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable NeuroMF mask prior ({err})") from err
