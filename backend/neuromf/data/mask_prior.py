"""A prior over lesion masks for the conditional mode: real training lesions, augmented and re-placed.

A drawn mask is one of the training lesions (cropped to its bounding box), mirrored left-right at random, and
moved to a new centre chosen among brain voxels whose depth below the brain surface lies within the range of
the real lesions' depths (FCD lesions sit at the grey/white junction, a few mm to ~2 cm deep) and whose height
(inferior-superior) lies within the real lesions' range (FCD is a cortical malformation of the cerebrum: no
lesion in the cerebellum or brainstem unless the training lesions go there), and whose position in the brain
(normalised to its bounding box) lies near a real lesion's site drawn at random (within the real sites' typical
distance to their nearest neighbour: new sites follow the real sites' density, and the gaps between distant real
sites, such as the deep grey matter between medial and insular cortex, stay empty). A placement is kept when
>= 95% of the lesion lies inside the brain, its median depth is in the real range and its centroid is near a real
site; volumes follow the training
distribution. Depth is measured as the lesion-likeness check measures it (`neuromf.data.brain`): each real
lesion in its own scan's brain, and a new lesion in the brain it is placed in, which is the generated brain when
the caller passes one (`sample(rng, brain=...)`), else the mean of the training FLAIRs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from scipy import ndimage

from neuromf.data.brain import (
    brain_box,
    brain_mask,
    depth_map,
    lesion_position,
    nearest_site_distances,
    normalised_positions,
    site_spread,
)
from neuromf.utils import atomic_write
from neuromf.weights import shipped_file

# the prior's file in an adapter folder (a conditional adapter's lesions, a site-conditioned joint adapter's sites)
PRIOR = "mask_prior.safetensors"
MIN_INSIDE = 0.95
# centres are drawn this share of the depth range away from its ends: the lesion's own median depth then
# lands inside the range, not on its edge
DEPTH_MARGIN = 0.15
# centres are drawn within this share of the site radius: the lesion's own centroid, a little off its centre, and
# the brain generated around it then still lie within the radius
SITE_MARGIN = 0.8


MIN_SITE_RADIUS = 0.05  # share of the brain's bounding box: the site radius of lesions that share one site


def _min_site_radius(brain: np.ndarray) -> float:
    """The smallest site radius: `MIN_SITE_RADIUS`, and at least three voxels of the brain's box on a coarse grid."""
    low, high = brain_box(brain)
    return max(MIN_SITE_RADIUS, 3.0 / float(max(np.min(high - low), 1)))


def _at_least(lo: float, hi: float, width: float) -> tuple[float, float]:
    """(lo, hi) widened symmetrically to at least `width`."""
    missing = max(0.0, width - (hi - lo))
    return lo - missing / 2, hi + missing / 2


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
    # (K, 3) real lesion centroids normalised to their brains' bounding boxes, and how far from one a lesion may
    # lie (`site_spread`); None = anywhere (priors saved before sites existed)
    sites: np.ndarray | None = None
    site_radius: float | None = None

    @classmethod
    def from_cases(cls, masks: list[np.ndarray], images: list[np.ndarray],
                   spacing: tuple[float, float, float]) -> MaskPrior:
        """Build from training masks (H, W, D) and their own FLAIRs on the model grid, pairwise (same order)."""
        if len(masks) != len(images):
            raise ValueError(f"the mask prior needs one FLAIR per mask, got {len(masks)} masks, {len(images)} FLAIRs")
        pairs = [(np.asarray(m) > 0.5, np.asarray(i)) for m, i in zip(masks, images) if np.asarray(m).any()]
        if not pairs:
            raise ValueError("the mask prior needs at least one non-empty training lesion")
        lesions = [m for m, _ in pairs]
        # median depth of the lesion's voxels in its own scan's brain, as the lesion-likeness check measures it
        depths = [float(np.median(depth_map(brain_mask(image), spacing)[m])) for m, image in pairs]
        heights = [float(np.round(ndimage.center_of_mass(m))[2]) for m in lesions]
        brain = brain_mask(np.mean(np.stack([image for _, image in pairs]), axis=0))
        sites = np.array([lesion_position(m, brain_box(brain_mask(image))) for m, image in pairs])
        spread = site_spread(sites)
        # lesions at one site (or depth, or height) give an empty range: widen it to a few voxels,
        # so that the prior can still place a lesion there (two lesions at the same site are valid data)
        voxel_mm = float(max(spacing))
        return cls([_crop(m) for m in lesions], brain, tuple(float(s) for s in spacing),
                   _at_least(min(depths), max(depths), 4 * voxel_mm), _at_least(min(heights), max(heights), 2.0),
                   sites, None if spread is None else max(spread, _min_site_radius(brain)))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The model grid (H, W, D) of the reference brain, and so of the drawn masks."""
        return tuple(self.brain.shape)

    def candidate_centres(self, brain: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """(K, 3) voxel indices where a lesion centre may go in `brain`, given its `depth_map` (mm)."""
        lo, hi = self.depth_range
        margin = DEPTH_MARGIN * (hi - lo)
        allowed = brain & (depth >= lo + margin) & (depth <= hi - margin)
        if self.height_range is not None:
            height = np.arange(self.shape[2])[None, None, :]
            allowed &= (height >= self.height_range[0]) & (height <= self.height_range[1])
        centres = np.argwhere(allowed)
        if self.site_radius is not None and len(centres):
            near = nearest_site_distances(normalised_positions(centres, brain_box(brain)), self.sites)
            centres = centres[near <= SITE_MARGIN * self.site_radius]
        return centres

    def site_neighbourhood(self, brain: np.ndarray) -> float:
        """How far from a real site (normalised units) `draw_centre` puts a new centre: the median distance from a
        real site to its nearest other one (at least `_min_site_radius`). Small next to `site_radius` (the largest
        such distance, which bounds where a lesion may lie): new sites then follow the real sites' density, e.g.
        a frontal majority stays one, instead of filling every gap between distant real sites (deep grey matter
        lies within `site_radius` of the medial and insular cortex, and no FCD lesion sits there)."""
        floor = _min_site_radius(brain)
        if self.sites is None or len(self.sites) < 2:
            return max(self.site_radius or 0.0, floor)
        gaps = np.linalg.norm(self.sites[:, None] - self.sites[None], axis=-1)
        np.fill_diagonal(gaps, np.inf)
        return max(float(np.median(gaps.min(axis=1))), floor)

    def centre_draw(self, centres: np.ndarray, brain: np.ndarray) -> Callable[[np.random.Generator], np.ndarray]:
        """A draw of one of `centres` (`candidate_centres` of `brain`) near a real site drawn at random: within
        `site_neighbourhood` of it, or the candidate nearest it when none is that near; uniform over the centres
        when the prior has no sites. The centres' positions and the neighbourhood are computed once, for the many
        draws of a placement."""
        if self.sites is None or not len(self.sites):
            return lambda rng: centres[rng.integers(len(centres))]
        positions = normalised_positions(centres, brain_box(brain))
        reach = self.site_neighbourhood(brain)

        def draw(rng: np.random.Generator) -> np.ndarray:
            distance = np.linalg.norm(positions - self.sites[rng.integers(len(self.sites))], axis=1)
            near = np.flatnonzero(distance <= reach)
            return centres[near[rng.integers(len(near))] if len(near) else int(distance.argmin())]

        return draw

    def draw_centre(self, rng: np.random.Generator, centres: np.ndarray, brain: np.ndarray) -> np.ndarray:
        """One centre by `centre_draw` (for a single draw)."""
        return self.centre_draw(centres, brain)(rng)

    def sample(self, rng: np.random.Generator, brain: np.ndarray | None = None, max_tries: int = 200) -> np.ndarray:
        """One (H, W, D) uint8 lesion mask on the model grid, placed in `brain` (H, W, D) bool when given (e.g.
        the brain of the FLAIR it will be generated into), else in the reference brain."""
        if brain is not None and tuple(np.shape(brain)) != self.shape:
            raise ValueError(f"brain shape {tuple(np.shape(brain))} is not the prior's grid {self.shape}")
        brain = self.brain if brain is None else np.asarray(brain, dtype=bool)
        depth = depth_map(brain, self.spacing)
        centres = self.candidate_centres(brain, depth)
        if not len(centres):
            raise ValueError("the brain has no voxel at the real lesions' depth and sites to place a lesion in")
        # the lesion's own median depth, kept half a margin inside the real range: the FLAIR generated around it
        # has a slightly different brain, and its depth must still lie in the real range there
        lo, hi = self.depth_range
        lo, hi = lo + DEPTH_MARGIN / 2 * (hi - lo), hi - DEPTH_MARGIN / 2 * (hi - lo)
        box = brain_box(brain)  # candidate_centres found voxels, so the brain is not empty
        draw_centre = self.centre_draw(centres, brain)
        best, best_inside = None, -1.0
        for _ in range(max_tries):
            lesion = self.lesions[rng.integers(len(self.lesions))]
            if rng.random() < 0.5:
                lesion = lesion[::-1]  # left-right mirror (axis 0 runs left -> right on the RAS grid)
            placed = self._place(lesion, draw_centre(rng))
            if not placed.any():
                continue
            inside = float((placed & brain).sum()) / float(placed.sum())
            if inside >= MIN_INSIDE and lo <= float(np.median(depth[placed])) <= hi and self._near_site(placed, box):
                return placed.astype(np.uint8)
            if inside > best_inside:
                best, best_inside = placed, inside
        if best is None:
            raise ValueError("the mask prior could not place any lesion inside the grid")
        return best.astype(np.uint8)

    def fits(self, mask: np.ndarray, brain: np.ndarray) -> bool:
        """Whether a placed lesion (H, W, D) lies where real ones do in `brain`: >= 95% inside it, median depth
        within the real lesions' range, centroid near a real lesion's site."""
        mask, brain = np.asarray(mask) > 0, np.asarray(brain, dtype=bool)
        if not mask.any() or float((mask & brain).sum()) < MIN_INSIDE * float(mask.sum()):
            return False
        lo, hi = self.depth_range
        depth_ok = lo <= float(np.median(depth_map(brain, self.spacing)[mask])) <= hi
        return depth_ok and self._near_site(mask, brain_box(brain))  # the brain holds the mask: not empty

    def _near_site(self, mask: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> bool:
        if self.site_radius is None:
            return True
        position = np.asarray([lesion_position(mask, box)])
        return bool(nearest_site_distances(position, self.sites)[0] <= self.site_radius)

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
        tensors = {**_packed("brain", self.brain),
                   "spacing": torch.tensor(self.spacing, dtype=torch.float64),
                   "depth_range": torch.tensor(self.depth_range, dtype=torch.float64)}
        if self.height_range is not None:
            tensors["height_range"] = torch.tensor(self.height_range, dtype=torch.float64)
        if self.site_radius is not None:
            tensors["sites"] = torch.from_numpy(np.asarray(self.sites, dtype=np.float64))
            tensors["site_radius"] = torch.tensor([self.site_radius], dtype=torch.float64)
        for i, lesion in enumerate(self.lesions):
            tensors.update(_packed(f"lesion_{i:04d}", lesion))
        return atomic_write(Path(path), lambda p: save_file(tensors, str(p)))

    @classmethod
    def load(cls, path: Path | str) -> MaskPrior:
        """Read a prior written by `save`; ValueError naming `path` when it is missing or corrupt."""
        path = shipped_file(path)  # a shipped prior: its sha256 checked, shared copies resolved
        try:
            tensors = load_file(str(path))
            names = sorted({k.split(".")[0] for k in tensors if k.startswith("lesion_")})
            lesions = [_unpacked(tensors, k) for k in names]
            height = tuple(tensors["height_range"].tolist()) if "height_range" in tensors else None
            sites = tensors["sites"].numpy() if "sites" in tensors else None
            radius = float(tensors["site_radius"][0]) if "site_radius" in tensors else None
            return cls(lesions, _unpacked(tensors, "brain"), tuple(tensors["spacing"].tolist()),
                       tuple(tensors["depth_range"].tolist()), height, sites, radius)
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path}: not a readable NeuroMF mask prior ({err})") from err


def _packed(name: str, mask: np.ndarray) -> dict[str, torch.Tensor]:
    """A binary volume as 1 bit per voxel (`name.bits`) plus its shape (`name.shape`): 8x smaller than uint8."""
    mask = np.asarray(mask, dtype=bool)
    return {f"{name}.bits": torch.from_numpy(np.packbits(mask.ravel())),
            f"{name}.shape": torch.tensor(mask.shape, dtype=torch.int64)}


def _unpacked(tensors: dict[str, torch.Tensor], name: str) -> np.ndarray:
    """The boolean volume `_packed` stored under `name` (or the uint8 volume older priors stored as `name`)."""
    if name in tensors:
        return tensors[name].numpy() > 0
    shape = tuple(tensors[f"{name}.shape"].tolist())
    return np.unpackbits(tensors[f"{name}.bits"].numpy(), count=int(np.prod(shape))).reshape(shape).astype(bool)
