"""The brain on the model grid, depth below its surface and positions within it, measured one way for every user:
the mask prior (where a generated lesion may go) and the lesion-likeness check (where a lesion is) must agree."""

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


def brain_box(brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) voxel index of a non-empty brain mask per axis: its bounding box."""
    voxels = np.argwhere(np.asarray(brain, dtype=bool))
    return voxels.min(axis=0), voxels.max(axis=0)


def normalised_positions(points: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(N, 3) voxel coordinates as positions in a brain's bounding box (`brain_box`), 0..1 per axis: head size and
    the brain's place on the grid drop out, so lesion sites of different scans compare."""
    low, high = box
    return (np.asarray(points, dtype=np.float64) - low) / np.maximum(high - low, 1)


def lesion_position(mask: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> list[float]:
    """The centroid of a lesion mask as a `normalised_positions` entry of its brain's `brain_box`."""
    centre = np.array(ndimage.center_of_mass(np.asarray(mask, dtype=bool)))
    return [float(v) for v in normalised_positions(centre[None], box)[0]]


def nearest_site_distances(positions: np.ndarray, sites: np.ndarray) -> np.ndarray:
    """(N,) distance of each normalised position to the nearest of the (K, 3) `sites`."""
    diff = np.asarray(positions, dtype=np.float64)[:, None, :] - np.asarray(sites, dtype=np.float64)[None]
    return np.linalg.norm(diff, axis=-1).min(axis=1)


def position_spread(positions: np.ndarray) -> float | None:
    """Median distance between two of (K, 3) normalised positions, hemispheres folded together (axis 0 runs
    left -> right; a site and its mirror image count as one place, as training mirrors the cases): how varied the
    lesion sites of a set are. None for fewer than two positions."""
    points = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(points) < 2:
        return None
    folded = np.concatenate([np.abs(points[:, :1] - 0.5), points[:, 1:]], axis=1)
    distances = np.linalg.norm(folded[:, None] - folded[None], axis=-1)
    return float(np.median(distances[np.triu_indices(len(points), k=1)]))


def mirrored_sites(sites: np.ndarray) -> np.ndarray:
    """(K, 3) normalised sites followed by their left-right mirror images (axis 0 runs left -> right): (2K, 3)."""
    sites = np.asarray(sites, dtype=np.float64).reshape(-1, 3)
    return np.concatenate([sites, sites * [-1.0, 1.0, 1.0] + [1.0, 0.0, 0.0]])


def site_spread(sites: np.ndarray, mirrored: bool = False) -> float | None:
    """The largest leave-one-out nearest-neighbour distance among (K, 3) sites: how far from every other site a
    real lesion can lie; None for fewer than two sites. With `mirrored`, the other sites count in both hemispheres
    (a lesion's own mirror image is left out with it), as distances to the sites are then measured."""
    sites = np.asarray(sites, dtype=np.float64).reshape(-1, 3)
    k = len(sites)
    if k < 2:
        return None
    others = mirrored_sites(sites) if mirrored else sites
    distances = np.linalg.norm(sites[:, None] - others[None], axis=-1)
    distances[np.arange(k), np.arange(k)] = np.inf
    if mirrored:
        distances[np.arange(k), k + np.arange(k)] = np.inf
    return float(distances.min(axis=1).max())
