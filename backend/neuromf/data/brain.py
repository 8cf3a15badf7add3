"""The brain on the model grid and depth below its surface, measured one way for every user: the mask prior
(where a generated lesion may go) and the lesion-likeness check (where a lesion is) must agree on both."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

BRAIN_THRESHOLD = 0.05  # FLAIR intensities on the model grid are ~[0, 1.5]; background is ~0
# 26-connectivity: voxels touching at an edge or corner belong to the same component
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def as_volume(x: Any) -> np.ndarray:
    """(H, W, D) numpy view of an array or tensor with optional leading singleton axes."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {x.shape}")
    return x


def brain_mask(image: Any, threshold: float = BRAIN_THRESHOLD) -> np.ndarray:
    """Foreground of a FLAIR on the model grid (intensities ~[0, 1.5]): voxels > `threshold`, largest
    26-connected component, holes filled (dark ventricles count as brain, so depth is measured from the outside).
    """
    fg = as_volume(image) > threshold
    labels, n = ndimage.label(fg, structure=STRUCTURE_26)
    if n == 0:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(sizes.argmax()))


def depth_map(brain: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance (mm) of each brain voxel to the nearest non-brain voxel; 0 outside the brain.

    The grid is padded by one empty voxel so that a brain touching the grid edge has its surface there.
    """
    padded = np.pad(np.asarray(brain, dtype=bool), 1)
    depth = ndimage.distance_transform_edt(padded, sampling=tuple(float(s) for s in spacing))
    return depth[1:-1, 1:-1, 1:-1]
