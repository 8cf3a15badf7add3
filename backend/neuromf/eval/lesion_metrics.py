"""Is this mask a lesion, and does the FLAIR show it? Automatic lesion-likeness figures (P7-T5, issue 9).

A generated (FLAIR, mask) pair on the model grid is judged against the *real* FCD lesions preprocessed onto the
same grid. Per pair (`lesion_stats`): lesion volume, connected components (26-connectivity) and the largest
one's share, share of the mask inside the brain, median depth below the brain surface and FLAIR contrast (mask
vs a 2-voxel ring of brain around it). `reference_from_real` turns the real lesions' figures into ranges, and
`lesion_like` applies the issue's acceptance criteria:

- non-empty;
- largest component >= 80% of the mask (one compact lesion, not scattered pieces);
- volume within [0.5 x smallest, 2 x largest] real lesion;
- >= 90% of the mask inside the brain;
- median depth within the real lesions' range (min..max of their median depths);
- location: the lesion's centroid, in coordinates normalised to its brain's bounding box (0..1 per axis, so head
  size and position on the grid drop out), lies no farther from the nearest real lesion's than the real lesions
  lie from each other (the largest leave-one-out nearest-neighbour distance among them); the real sites count in
  both hemispheres (mirrored left-right, as training mirrors the cases), for the lesion and for that spread alike
  (until round 10 the spread was taken in one hemisphere: 0.219 instead of 0.186 of the brain box for the 85
  lesions at 2 mm, which let a cerebellar joint lesion pass): a lesion in the cerebellum, brainstem or
  any other place no real lesion comes near fails, though its depth may be right;
- contrast >= 1 + 0.5 x (median real contrast - 1), i.e. at least half of the real lesions' median excess.

numpy / scipy only: tensors are accepted (anything with ``.detach()``), torch is never imported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.stats import ks_2samp

from neuromf.data.brain import (
    BRAIN_THRESHOLD,
    STRUCTURE_26,
    as_volume,
    brain_box,
    brain_mask,
    depth_map,
    lesion_position,
    mirrored_sites,
    nearest_site_distances,
    position_spread,
    site_spread,
)

SHELL_VOXELS = 2
LARGEST_SHARE_MIN = 0.8
VOLUME_LOW_FACTOR = 0.5
VOLUME_HIGH_FACTOR = 2.0
INSIDE_BRAIN_MIN = 0.9
CONTRAST_EXCESS_FRACTION = 0.5
# acceptance of the joint mode (issue 9): share of generated masks that pass every criterion, and the largest
# correlation of a generated mask latent with the noise it started from
LESION_LIKE_RATE_TARGET = 0.7
NOISE_CORRELATION_MAX = 0.1
CRITERIA = ("nonempty", "largest_share", "volume", "inside_brain", "depth", "location", "contrast")


def _binary(x: Any) -> np.ndarray:
    x = as_volume(x)
    return x.astype(bool) if x.dtype == bool else x > 0.5


def lesion_contrast(image: Any, mask: Any, shell: int = SHELL_VOXELS, brain_threshold: float = BRAIN_THRESHOLD,
                    brain: np.ndarray | None = None) -> float | None:
    """Mean FLAIR inside the mask / mean FLAIR in a ring (dilation by `shell` voxels minus the mask) of tissue.

    Ring voxels must be > `brain_threshold` (dark CSF or background would inflate the ratio) and, when `brain`
    is given, inside it. FCD lesions are FLAIR-hyperintense, so real ones sit above 1; None when the mask or
    its ring is empty.
    """
    image = as_volume(image).astype(np.float64)
    mask = _binary(mask)
    if not mask.any():
        return None
    inside = image > brain_threshold
    if brain is not None:
        inside &= _binary(brain)
    ring = ndimage.binary_dilation(mask, iterations=shell) & ~mask & inside
    if not ring.any():
        return None
    outside = float(image[ring].mean())
    if outside <= 0:
        return None
    return float(image[mask].mean()) / outside


# the lesion's edge: voxels from the mask boundary (<= 0 inside, 0 the mask's own boundary voxels; 1.. outside),
# each distance's mean FLAIR over the tissue farther out (EDGE_TISSUE voxels), the lesion's own surroundings
EDGE_DISTANCES = (-2, -1, 0, 1, 2, 3)
EDGE_TISSUE = (5, 8)
EDGE_SPILL = (1, 2)  # where a soft edge shows: the first two voxels outside the mask


def signed_boundary_distance(mask: Any) -> np.ndarray:
    """Whole-voxel distance of every voxel to the mask boundary: 0 on the mask's boundary voxels, -1, -2, ...
    deeper inside, 1, 2, ... outside (Euclidean distance rounded up, so a diagonal neighbour counts as 2)."""
    mask = _binary(mask)
    inside = np.ceil(ndimage.distance_transform_edt(mask))
    outside = np.ceil(ndimage.distance_transform_edt(~mask))
    return np.where(mask, 1 - inside, outside).astype(np.int32)


def lesion_edge_profile(image: Any, mask: Any, distances: tuple[int, ...] = EDGE_DISTANCES,
                        brain_threshold: float = BRAIN_THRESHOLD) -> dict[int, float] | None:
    """How sharply the FLAIR hyperintensity ends where the mask ends: mean FLAIR of the tissue at each distance
    from the mask boundary (`signed_boundary_distance`) over the mean of the tissue `EDGE_TISSUE` voxels out.

    A real lesion's level drops to ~1 within a voxel or two of its mask; a decoded lesion whose brightness spills
    past its mask (a soft edge) stays above 1 there, and a segmenter trained on it learns a boundary that real
    lesions do not have. Tissue: voxels > `brain_threshold`. None for an empty mask or no tissue around it; a
    distance with no tissue voxel is left out.
    """
    image = as_volume(image).astype(np.float64)
    mask = _binary(mask)
    if not mask.any():
        return None
    distance = signed_boundary_distance(mask)
    tissue = image > brain_threshold
    around = tissue & (distance >= EDGE_TISSUE[0]) & (distance <= EDGE_TISSUE[1])
    if not around.any() or image[around].mean() <= 0:
        return None
    level = float(image[around].mean())
    out = {}
    for d in distances:
        at = tissue & (distance == d)
        if at.any():
            out[int(d)] = float(image[at].mean()) / level
    return out


def edge_spill(profile: dict[int, float] | None) -> float | None:
    """Mean excess brightness of the first voxels outside the mask (`EDGE_SPILL`) over the tissue around:
    ~0.05 for a sharp real edge, more when the lesion's brightness runs past its mask."""
    if not profile:
        return None
    levels = [profile[d] for d in EDGE_SPILL if d in profile]
    return float(np.mean(levels)) - 1.0 if levels else None


def summarise_edges(profiles: list[dict[int, float] | None]) -> dict[str, Any]:
    """Median level per distance and the median spill over a set of pairs (None entries skipped)."""
    kept = [p for p in profiles if p]
    distances = sorted({d for p in kept for d in p})
    return {"n": len(kept),
            "median_level": {str(d): median_or_none([p.get(d) for p in kept]) for d in distances},
            "median_spill": median_or_none([edge_spill(p) for p in kept])}


@dataclass
class LesionStats:
    """Lesion-likeness figures of one (FLAIR, mask) pair; None where a figure is undefined (empty mask)."""

    volume_cm3: float
    n_voxels: int
    n_components: int
    largest_share: float | None
    inside_brain_share: float | None
    median_depth_mm: float | None
    contrast: float | None
    empty: bool
    position: list[float] | None = None  # centroid in brain-box-normalised coordinates (0..1 per axis)

    def to_dict(self) -> dict[str, Any]:
        """The figures as a JSON-ready dict."""
        return asdict(self)


def lesion_stats(image: Any, mask: Any, spacing: tuple[float, float, float],
                 brain: np.ndarray | None = None) -> LesionStats:
    """Figures of one pair on a grid of voxel size `spacing` (mm); `brain` defaults to `brain_mask(image)`."""
    image = as_volume(image)
    mask = _binary(mask)
    if image.shape != mask.shape:
        raise ValueError(f"lesion_stats: image shape {image.shape} differs from mask shape {mask.shape}")
    brain = brain_mask(image) if brain is None else _binary(brain)
    n_voxels = int(mask.sum())
    volume = n_voxels * float(np.prod(spacing)) / 1000.0
    if n_voxels == 0:
        return LesionStats(0.0, 0, 0, None, None, None, None, True)
    labels, n_components = ndimage.label(mask, structure=STRUCTURE_26)
    largest = int(np.bincount(labels.ravel())[1:].max())
    depth = depth_map(brain, spacing)
    return LesionStats(
        volume_cm3=volume,
        n_voxels=n_voxels,
        n_components=int(n_components),
        largest_share=largest / n_voxels,
        inside_brain_share=float((mask & brain).sum()) / n_voxels,
        median_depth_mm=float(np.median(depth[mask])),
        contrast=lesion_contrast(image, mask, brain=brain),
        empty=False,
        position=lesion_position(mask, brain_box(brain)) if brain.any() else None,
    )


@dataclass
class LesionReference:
    """Ranges of the real lesions that generated ones are judged against (`reference_from_real`)."""

    min_volume_cm3: float
    max_volume_cm3: float
    min_depth_mm: float
    max_depth_mm: float
    median_contrast: float
    volumes_cm3: list[float] = field(default_factory=list)
    contrasts: list[float] = field(default_factory=list)  # each real lesion's FLAIR contrast (mask / ring)
    n: int = 0
    positions: list[list[float]] = field(default_factory=list)  # real lesion centroids, brain-box-normalised
    max_position_distance: float | None = None  # largest leave-one-out nearest-neighbour distance among them

    def position_distance(self, stats: LesionStats) -> float | None:
        """Distance of a lesion's normalised centroid to the nearest real lesion's, in either hemisphere (axis 0
        of the RAS model grid runs left -> right); None if undefined."""
        if stats.position is None or not self.positions:
            return None
        return float(nearest_site_distances(np.asarray([stats.position]), mirrored_sites(self.positions))[0])

    @property
    def volume_range(self) -> tuple[float, float]:
        """Accepted volumes: [0.5 x smallest, 2 x largest] real lesion."""
        return VOLUME_LOW_FACTOR * self.min_volume_cm3, VOLUME_HIGH_FACTOR * self.max_volume_cm3

    @property
    def min_contrast(self) -> float:
        """Smallest accepted contrast: 1 + half of the real lesions' median excess over 1."""
        return 1.0 + CONTRAST_EXCESS_FRACTION * (self.median_contrast - 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The reference ranges plus the accepted bounds derived from them, JSON-ready."""
        low, high = self.volume_range
        return {**asdict(self), "accepted_volume_cm3": [low, high], "accepted_depth_mm": [self.min_depth_mm,
                self.max_depth_mm], "accepted_min_contrast": self.min_contrast,
                "accepted_min_largest_share": LARGEST_SHARE_MIN, "accepted_min_inside_brain": INSIDE_BRAIN_MIN}


def reference_from_real(real: list[LesionStats]) -> LesionReference:
    """Reference ranges from the figures of real lesions (empty masks are ignored); ValueError if none is left."""
    kept = [s for s in real if not s.empty]
    if not kept:
        raise ValueError("reference_from_real: no non-empty real lesion to build a reference from")
    volumes = [s.volume_cm3 for s in kept]
    depths = [s.median_depth_mm for s in kept if s.median_depth_mm is not None]
    contrasts = [s.contrast for s in kept if s.contrast is not None]
    if not contrasts:
        raise ValueError("reference_from_real: no real lesion has a defined contrast (empty rings)")
    positions = [s.position for s in kept if s.position is not None]
    # the spread in both hemispheres, as `position_distance` measures a lesion against the sites
    return LesionReference(positions=positions, max_position_distance=site_spread(np.asarray(positions), mirrored=True),
                           min_volume_cm3=min(volumes), max_volume_cm3=max(volumes), min_depth_mm=min(depths),
                           max_depth_mm=max(depths), median_contrast=float(np.median(contrasts)),
                           volumes_cm3=[float(v) for v in volumes], contrasts=[float(c) for c in contrasts],
                           n=len(kept))


def lesion_like(stats: LesionStats, ref: LesionReference) -> dict[str, bool]:
    """Each criterion of the module docstring (keys `CRITERIA`) and ``all``; an empty mask fails every one."""
    if stats.empty:
        return {**{name: False for name in CRITERIA}, "all": False}
    low, high = ref.volume_range
    result = {
        "nonempty": True,
        "largest_share": stats.largest_share is not None and stats.largest_share >= LARGEST_SHARE_MIN,
        "volume": low <= stats.volume_cm3 <= high,
        "inside_brain": stats.inside_brain_share is not None and stats.inside_brain_share >= INSIDE_BRAIN_MIN,
        "depth": stats.median_depth_mm is not None and ref.min_depth_mm <= stats.median_depth_mm <= ref.max_depth_mm,
        "location": _near_real_sites(stats, ref),
        "contrast": stats.contrast is not None and stats.contrast >= ref.min_contrast,
    }
    result["all"] = all(result.values())
    return result


def _near_real_sites(stats: LesionStats, ref: LesionReference) -> bool:
    """The location criterion; with fewer than two real lesions there is no spread to judge by, so it passes."""
    if ref.max_position_distance is None:
        return True
    distance = ref.position_distance(stats)
    return distance is not None and distance <= ref.max_position_distance


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values that are not None; None when none is left."""
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def summarise_lesion_like(stats_list: list[LesionStats], ref: LesionReference) -> dict[str, Any]:
    """Pass rate of each criterion and of all together, KS statistics of the non-empty masks' volumes and FLAIR
    contrasts vs the real ones (the criteria bound the contrast from below only: the contrast KS and the share above
    the brightest real lesion show a FLAIR that is brighter than any real one), and medians of each figure over
    non-empty masks. `position_spread` (median distance between two lesion sites, brain-box-normalised, hemispheres
    folded; of all non-empty masks and of the lesion-like ones) beside the real lesions' shows whether the sites
    vary as much as the real ones or collapse onto a few (every criterion can pass while every lesion lies in the
    same place). Rates are None for an empty list."""
    verdicts = [lesion_like(s, ref) for s in stats_list]
    n = len(verdicts)
    rates = {name: (sum(v[name] for v in verdicts) / n if n else None) for name in (*CRITERIA, "all")}
    nonempty = [s for s in stats_list if not s.empty]
    ks_stat, ks_p = _ks([s.volume_cm3 for s in nonempty], ref.volumes_cm3)
    contrasts = [s.contrast for s in nonempty if s.contrast is not None]
    contrast_ks, contrast_p = _ks(contrasts, ref.contrasts)
    above = (sum(c > max(ref.contrasts) for c in contrasts) / len(contrasts)) if contrasts and ref.contrasts else None
    medians = {key: median_or_none([getattr(s, key) for s in nonempty])
               for key in ("volume_cm3", "n_components", "largest_share", "inside_brain_share", "median_depth_mm",
                           "contrast")}
    return {"n": n, "n_lesion_like": sum(v["all"] for v in verdicts), "rate": rates["all"], "rates": rates,
            "volume_ks_statistic": ks_stat, "volume_ks_pvalue": ks_p, "contrast_ks_statistic": contrast_ks,
            "contrast_ks_pvalue": contrast_p, "share_brighter_than_real": above, "medians": medians,
            "position_spread": position_spread([s.position for s in nonempty if s.position is not None]),
            "position_spread_lesion_like": position_spread([s.position for s, v in zip(stats_list, verdicts)
                                                            if v["all"] and s.position is not None]),
            "real_position_spread": position_spread(ref.positions)}


def _ks(generated: list[float], real: list[float]) -> tuple[float | None, float | None]:
    """Two-sample KS statistic and p-value, (None, None) when either side is empty."""
    if not generated or not real:
        return None, None
    ks = ks_2samp(generated, real)
    return float(ks.statistic), float(ks.pvalue)


def noise_correlation(latent: Any, noise: Any) -> float:
    """Pearson correlation of a generated mask latent with the noise it was sampled from (flattened).

    Near 1 means the sampler passed its input noise through instead of drawing a mask (issue 9: 0.88 before the
    fix); the acceptance is < `NOISE_CORRELATION_MAX`. NaN when either input is constant.
    """
    a = (latent.detach().cpu().numpy() if hasattr(latent, "detach") else np.asarray(latent)).astype(np.float64)
    b = (noise.detach().cpu().numpy() if hasattr(noise, "detach") else np.asarray(noise)).astype(np.float64)
    if a.size != b.size:
        raise ValueError(f"noise_correlation: sizes differ ({a.shape} vs {b.shape})")
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else float("nan")
