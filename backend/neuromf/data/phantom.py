"""FLAIR-like brain phantoms with focal cortical dysplasia (FCD type II) lesions and their masks.

Why: no real FCD scans or pretrained weights can be downloaded here, yet training, the napari sample
menu and the tests need NIfTI FLAIR + lesion-mask cases. The anatomy comes from the MNI152 2009
grey/white/CSF probability maps (``tissue_template.npz``, derived by ``make_tissue_template``; see
its docstring for the copyright notice), so the phantoms have real gyri, sulci and ventricles.

One subject = template maps resampled onto the output grid through a random affine (global scale,
small rotation) plus a smooth displacement field, mixed with per-subject tissue intensities
(FLAIR contrast: CSF dark, grey matter brighter than white matter, background zero), an optional FCD
lesion, a smooth multiplicative bias field and Rician noise. Everything is drawn from the
``np.random.Generator`` passed in, so a seed fixes the subject exactly.

The FCD type II lesion sits at the grey/white junction of a random cortical location (frontal with
probability ``frontal_fraction``) and shows the four classic signs: cortical thickening (grey matter
dilated locally), a blurred grey/white junction (local smoothing), subcortical FLAIR hyperintensity
and, optionally, a transmantle tail (thin hyperintense streak toward the nearest ventricle). The mask
is the lesion extent, with a volume drawn log-uniform in ``lesion_volume_cm3``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

TEMPLATE_PATH = Path(__file__).parent / "tissue_template.npz"
FLAIR_SCALE = 1000.0  # float FLAIR (WM ~0.5) -> int16 stored in the NIfTI files
GENERATOR_NAME = "neuromf phantom generator"

# Region rules in MNI template coordinates (mm), used to place lesions in the cortex.
_MIN_DEPTH_MM = 3.0  # junction voxels deeper than this below the brain surface ...
_MAX_DEPTH_MM = 28.0  # ... and shallower than this (deep grey nuclei excluded separately)
_MIN_ABS_X_MM = 10.0  # keep away from the midline so the mirrored hemisphere is a clean control


@dataclass
class PhantomConfig:
    """Grid and lesion/noise parameters of a phantom subject."""

    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    lesion_volume_cm3: tuple[float, float] = (1.0, 15.0)  # log-uniform
    noise_sigma: float = 0.015  # Rician noise, relative to WM intensity ~0.5-0.6
    frontal_fraction: float = 0.6
    transmantle_prob: float = 0.4
    # Scales the lesion's FLAIR hyperintensity (subcortical and transmantle); the thickening and blurred junction stay.
    # 1 = the embedded phantoms; < 1 subtler lesions, closer to the FCDs that go unseen in real reading.
    lesion_strength: float = 1.0


@dataclass(frozen=True)
class _Template:
    maps: np.ndarray  # (3, X, Y, Z) float32: GM, WM, CSF fractions
    world_to_voxel: np.ndarray  # 4x4
    brain_centre: np.ndarray  # (3,) mm, x forced to the midline 0


@lru_cache(maxsize=4)
def _load_template(target_spacing: tuple[float, float, float]) -> _Template:
    """Load the packaged 2 mm maps, pre-blurred so resampling to ``target_spacing`` does not alias."""
    if not TEMPLATE_PATH.exists():
        raise FileNotFoundError(
            f"{TEMPLATE_PATH}: packaged tissue template missing; rebuild it with "
            "`python -m neuromf.data.make_tissue_template` (needs nilearn)"
        )
    with np.load(TEMPLATE_PATH) as data:
        affine = np.asarray(data["affine"], dtype=np.float64)
        maps = np.stack([data[k].astype(np.float32) / 255.0 for k in ("gm", "wm", "csf")])
    template_spacing = np.abs(np.diag(affine)[:3])
    # Gaussian with FWHM covering the extra voxel size: sigma = sqrt(s_out^2 - s_in^2) / 2.355.
    extra = np.sqrt(np.maximum(np.square(target_spacing) - np.square(template_spacing), 0.0))
    sigma_vox = extra / 2.355 / template_spacing
    if np.any(sigma_vox > 0.05):
        maps = np.stack([ndimage.gaussian_filter(m, sigma_vox, mode="constant") for m in maps])
    brain_idx = np.argwhere(maps.sum(axis=0) > 0.5)
    lo, hi = brain_idx.min(axis=0), brain_idx.max(axis=0)
    centre = (affine @ np.r_[(lo + hi) / 2.0, 1.0])[:3]
    centre[0] = 0.0  # the symmetric template's midline: mirroring the grid mirrors the brain
    return _Template(maps=maps, world_to_voxel=np.linalg.inv(affine), brain_centre=centre)


def grid_affine(cfg: PhantomConfig) -> np.ndarray:
    """RAS affine of the phantom grid: ``cfg.spacing`` voxels, centred on the template brain (MNI mm)."""
    template = _load_template(tuple(float(s) for s in cfg.spacing))
    spacing = np.asarray(cfg.spacing, dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = template.brain_centre - spacing * (np.asarray(cfg.shape) - 1) / 2.0
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], order: int, std: float) -> np.ndarray:
    """Low-frequency random field (3D cosine basis up to ``order``), scaled to the given std."""
    coeffs = rng.standard_normal((order, order, order))
    freq = np.arange(order)
    coeffs /= 1.0 + freq[:, None, None] + freq[None, :, None] + freq[None, None, :]  # 1/f falloff
    coeffs[0, 0, 0] = 0.0
    bases = [np.cos(np.pi * np.outer((np.arange(n) + 0.5) / n, freq)) for n in shape]
    field = np.einsum("ijk,xi,yj,zk->xyz", coeffs, *bases, optimize=True)
    return (field * (std / (field.std() + 1e-12))).astype(np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sample_template(
    cfg: PhantomConfig,
    affine: np.ndarray,
    scale: np.ndarray,
    rotation: np.ndarray,
    displacement: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the template maps onto the grid through a subject transform.

    The subject is the template scaled and rotated about the brain centre, then warped by
    ``displacement`` ((3,X,Y,Z) mm or None). Returns (maps (3,X,Y,Z) GM/WM/CSF on the grid,
    template-space mm coordinates (3,X,Y,Z) of every grid voxel, used to tell brain regions apart).
    """
    template = _load_template(tuple(float(s) for s in cfg.spacing))
    axes = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(cfg.shape)]
    world = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)  # (3, X, Y, Z) mm
    centre = template.brain_centre.astype(np.float32)[:, None, None, None]
    offset = np.einsum("ij,jxyz->ixyz", rotation.T.astype(np.float32), world - centre)
    template_mm = centre + offset / np.asarray(scale, dtype=np.float32)[:, None, None, None]
    if displacement is not None:
        template_mm += displacement
    w2v = template.world_to_voxel.astype(np.float32)
    voxel = np.einsum("ij,jxyz->ixyz", w2v[:3, :3], template_mm) + w2v[:3, 3, None, None, None]
    maps = np.stack(
        [ndimage.map_coordinates(m, voxel, order=1, mode="constant", cval=0.0) for m in template.maps]
    )
    return maps, template_mm


def template_tissue_on_grid(cfg: PhantomConfig) -> np.ndarray:
    """Undeformed GM/WM/CSF fractions (3,X,Y,Z) on the phantom grid: the mean anatomy of the phantoms."""
    maps, _ = _sample_template(cfg, grid_affine(cfg), np.ones(3), np.eye(3), None)
    return maps


def _warped_tissue(
    rng: np.random.Generator, cfg: PhantomConfig, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Template maps through a random subject transform: global scale, small rotation, smooth warp."""
    # MNI brains are ~5-10% larger than typical adult brains: scale 0.94 +-4%, per axis +-1.5% more.
    scale = rng.uniform(0.90, 0.98) * (1.0 + rng.uniform(-0.015, 0.015, size=3))
    rotation = _rotation(np.deg2rad(rng.uniform(-3.0, 3.0, size=3)))
    displacement = np.stack([_smooth_field(rng, cfg.shape, order=4, std=1.5) for _ in range(3)])
    return _sample_template(cfg, affine, scale, rotation, displacement)


def _lesion_centre_candidates(
    maps: np.ndarray, template_mm: np.ndarray, depth_mm: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean maps of cortical grey/white-junction voxels: (frontal, other lobes)."""
    gm, wm = maps[0], maps[1]
    x, y, z = template_mm
    junction = (gm > 0.3) & (wm > 0.3) & (depth_mm >= _MIN_DEPTH_MM) & (depth_mm <= _MAX_DEPTH_MM)
    junction &= np.abs(x) >= _MIN_ABS_X_MM
    cerebellum = (y < -30) & (z < -8)
    deep_grey = (np.abs(x) < 33) & (y > -40) & (y < 25) & (z > -15) & (z < 22)  # basal ganglia, thalamus
    cortical = junction & ~cerebellum & ~deep_grey
    frontal = (y > 25) | ((y > -15) & (z > 5))
    return cortical & frontal, cortical & ~frontal


def _add_lesion(
    rng: np.random.Generator, cfg: PhantomConfig, maps: np.ndarray, template_mm: np.ndarray, brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place one FCD type II lesion.

    Returns (modified maps, lesion mask uint8, weights (2,X,Y,Z) float32 in [0,1]: the lesion weight
    that drives the hyperintensity, and the transmantle-tail weight).
    """
    spacing = np.asarray(cfg.spacing, dtype=np.float64)
    voxel_cm3 = float(np.prod(spacing)) / 1000.0
    depth_mm = ndimage.distance_transform_edt(brain, sampling=spacing)
    frontal, other = _lesion_centre_candidates(maps, template_mm, depth_mm)
    pool = frontal if rng.random() < cfg.frontal_fraction else other
    if not pool.any():
        pool = frontal | other
    candidates = np.argwhere(pool)
    if len(candidates) == 0:
        raise RuntimeError("no cortical grey/white junction voxels found for the lesion centre")
    centre = candidates[rng.integers(len(candidates))]

    lo_cm3, hi_cm3 = cfg.lesion_volume_cm3
    volume_cm3 = float(np.exp(rng.uniform(np.log(lo_cm3), np.log(hi_cm3))))
    n_min, n_max = int(np.ceil(lo_cm3 / voxel_cm3 - 1e-9)), int(np.floor(hi_cm3 / voxel_cm3 + 1e-9))
    if n_min > n_max:
        raise ValueError(f"lesion_volume_cm3={cfg.lesion_volume_cm3} holds no whole number of voxels")
    n_voxels = int(np.clip(round(volume_cm3 / voxel_cm3), n_min, n_max))
    radius_mm = (3.0 * n_voxels * voxel_cm3 * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)

    # Inward axis: toward the nearest ventricle (deep CSF), the route of a transmantle sign.
    ventricles = np.argwhere((maps[2] > 0.6) & (depth_mm > 18.0))
    centre_mm = centre * spacing
    if len(ventricles):
        offsets = ventricles * spacing - centre_mm
        nearest = offsets[np.argmin((offsets**2).sum(axis=1))]
    else:
        nearest = np.argwhere(brain).mean(axis=0) * spacing - centre_mm
    ventricle_mm = float(np.linalg.norm(nearest))
    inward = nearest / max(ventricle_mm, 1e-6)

    # Work in a box around the centre, big enough for the blob and the tail.
    reach_mm = max(3.0 * radius_mm, ventricle_mm + 2 * spacing.max())
    lo = np.maximum(centre - np.ceil(reach_mm / spacing).astype(int), 0)
    hi = np.minimum(centre + np.ceil(reach_mm / spacing).astype(int) + 1, cfg.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"))
    rel = (idx - centre[:, None, None, None]) * spacing[:, None, None, None]
    along = np.einsum("i,ixyz->xyz", inward, rel)
    perp = np.sqrt(np.maximum((rel**2).sum(axis=0) - along**2, 0.0))
    # Funnel shape: elongated along the inward axis, irregular outline from a smooth random field.
    roughness = ndimage.gaussian_filter(rng.standard_normal(sub_shape), sigma=1.5)
    roughness /= roughness.std() + 1e-12
    distance = np.sqrt((along / 1.5) ** 2 + perp**2) * np.exp(0.2 * roughness)

    sub_gm, sub_wm, sub_csf = (m[box] for m in maps)
    allowed = brain[box] & (sub_gm + sub_wm > 0.5)
    tail = np.zeros(sub_shape, dtype=bool)
    if rng.random() < cfg.transmantle_prob:
        steps = np.arange(0.0, ventricle_mm, 0.5 * spacing.min())
        points = np.round((centre_mm + steps[:, None] * inward - lo * spacing) / spacing).astype(int)
        points = np.unique(points, axis=0)
        points = points[np.all((points >= 0) & (points < sub_shape), axis=1)]
        tail[tuple(points.T)] = True
        tail &= allowed
        tail_ids = np.argwhere(tail)
        # Keep the tail thin relative to the lesion: at most a third of the voxels, nearest the centre.
        if len(tail_ids) > n_voxels // 3:
            order = np.argsort(distance[tuple(tail_ids.T)])
            tail[:] = False
            tail[tuple(tail_ids[order[: n_voxels // 3]].T)] = True
    priority = np.where(tail, -1.0, distance)
    priority[~allowed] = np.inf
    flat_order = np.argsort(priority, axis=None, kind="stable")[:n_voxels]
    sub_mask = np.zeros(sub_shape, dtype=bool)
    sub_mask.flat[flat_order] = True
    sub_mask &= np.isfinite(priority)

    # Full effect inside the mask (it is the lesion extent), fading over about a voxel outside it.
    weight = np.clip(2.0 * ndimage.gaussian_filter(sub_mask.astype(np.float32), 0.7), 0.0, 1.0)
    weight = np.maximum(weight, sub_mask)
    # Cortical thickening: grey matter grows into the surrounding white matter (then CSF).
    gm_dilated = ndimage.grey_dilation(sub_gm, size=(3, 3, 3))
    gain = weight * rng.uniform(0.6, 1.0) * np.maximum(gm_dilated - sub_gm, 0.0)
    from_wm = np.minimum(gain, sub_wm)
    new_gm, new_wm = sub_gm + gain, sub_wm - from_wm
    new_csf = np.maximum(sub_csf - (gain - from_wm), 0.0)
    # Blurred junction: smooth GM and WM locally, keeping their sum (the CSF fraction is untouched).
    tissue = new_gm + new_wm
    blur_gm = ndimage.gaussian_filter(new_gm, 1.0)
    blur_wm = ndimage.gaussian_filter(new_wm, 1.0)
    blur_gm = tissue * blur_gm / (blur_gm + blur_wm + 1e-6)
    new_gm = (1 - weight) * new_gm + weight * blur_gm
    new_wm = tissue - new_gm

    out = maps.copy()
    out[0][box], out[1][box], out[2][box] = new_gm, new_wm, new_csf
    mask = np.zeros(cfg.shape, dtype=np.uint8)
    mask[box] = sub_mask
    weights = np.zeros((2, *cfg.shape), dtype=np.float32)
    weights[0][box] = weight
    weights[1][box] = np.clip(2.0 * ndimage.gaussian_filter(tail.astype(np.float32), 0.5), 0.0, 1.0)
    return out, mask, weights


def generate_subject_with_tissue(
    rng: np.random.Generator, cfg: PhantomConfig, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
    """Like ``generate_subject``, plus the subject's true GM/WM/CSF fractions (3,X,Y,Z) float32.

    The tissue maps are the ground truth behind the FLAIR (after the subject warp and the lesion's
    cortical thickening and blurring): use them for contrast checks and brain-volume metrics.
    """
    affine = grid_affine(cfg)
    maps, template_mm = _warped_tissue(rng, cfg, affine)
    brain = maps.sum(axis=0) > 0.5
    mask = None
    lesion_weight = tail_weight = None
    if with_lesion:
        maps, mask, weights = _add_lesion(rng, cfg, maps, template_mm, brain)
        lesion_weight, tail_weight = weights

    i_wm = 0.55 * (1.0 + 0.04 * rng.standard_normal())
    i_gm = i_wm * rng.uniform(1.18, 1.32)
    i_csf = rng.uniform(0.06, 0.14)
    flair = maps[0] * i_gm + maps[1] * i_wm + maps[2] * i_csf
    if with_lesion:
        # Subcortical hyperintensity (white matter under the lesion), milder in the thickened cortex.
        wm_gain, gm_gain = rng.uniform(0.40, 0.60), rng.uniform(0.10, 0.20)
        strength = cfg.lesion_strength
        flair += lesion_weight * strength * (maps[1] * i_wm * wm_gain + maps[0] * i_gm * gm_gain)
        flair += tail_weight * strength * i_wm * rng.uniform(0.3, 0.5)
    flair *= np.exp(_smooth_field(rng, cfg.shape, order=3, std=rng.uniform(0.03, 0.08)))
    noise = rng.standard_normal((2, *cfg.shape)).astype(np.float32) * cfg.noise_sigma
    flair = np.sqrt((flair + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
    flair = np.where(brain, flair, 0.0).astype(np.float32)
    if mask is not None:
        mask &= brain.astype(np.uint8)
    maps = np.where(brain, maps, 0.0).astype(np.float32)
    return flair, mask, affine, maps


def generate_subject(
    rng: np.random.Generator, cfg: PhantomConfig, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """-> (flair float32 volume, lesion mask uint8 or None, 4x4 RAS affine)

    FLAIR is skull-stripped (0 outside the brain), white matter ~0.5-0.6, grey matter ~20-30% brighter,
    CSF ~0.1. The mask is {0,1} on the same grid, inside the brain.
    """
    flair, mask, affine, _ = generate_subject_with_tissue(rng, cfg, with_lesion)
    return flair, mask, affine


def lesion_volume_cm3(mask: np.ndarray, spacing: tuple[float, float, float] | np.ndarray) -> float:
    """Lesion volume measured on the grid: n_voxels * prod(spacing) / 1000."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder (same suffixes), then rename into place."""
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; data files should be readable like any other
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, description: str) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = description.encode()[:79]
    _atomic_write(path, lambda p: nib.save(img, p))


def _assign_splits(ids: list[str], test_fraction: float, rng: np.random.Generator) -> dict[str, str]:
    """round(test_fraction * n) of the ids go to "test", chosen by ``rng``; the rest to "train"."""
    n_test = int(round(test_fraction * len(ids)))
    test = set(rng.permutation(len(ids))[:n_test].tolist())
    return {sid: ("test" if i in test else "train") for i, sid in enumerate(ids)}


GROUP_KEYS = {"hc": 0, "fcd": 1}  # first entry of a subject's SeedSequence spawn key


def subject_rng(seed: int, group: str, index: int) -> np.random.Generator:
    """The generator of the `index`-th subject of `group` ("fcd" or "hc") in a data set drawn with `seed`: a subject
    does not change when the other group grows, and can be drawn again alone (e.g. without its noise)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(GROUP_KEYS[group], index)))


def stored_flair(flair: np.ndarray) -> np.ndarray:
    """A phantom FLAIR as the data set stores it: scaled by FLAIR_SCALE, rounded to int16."""
    return np.clip(np.round(flair * FLAIR_SCALE), 0, np.iinfo(np.int16).max).astype(np.int16)


def make_phantom_dataset(
    out_dir: Path,
    n_healthy: int,
    n_fcd: int,
    seed: int = 0,
    cfg: PhantomConfig | None = None,
    test_fraction: float = 0.25,
    progress: bool = False,
) -> Path:
    """Write a BIDS tree shaped like OpenNeuro ds004199; return out_dir.

    Patients come first (sub-00001..), then controls. Each subject's generator is seeded from
    ``SeedSequence(seed, spawn_key=(group, index))``, so a subject does not change when the other
    group grows. ``test_fraction`` of each group (rounded) goes to the test split.
    """
    cfg = cfg or PhantomConfig()
    out_dir = Path(out_dir)
    if n_healthy < 0 or n_fcd < 0 or n_healthy + n_fcd == 0:
        raise ValueError(f"need at least one subject (n_healthy={n_healthy}, n_fcd={n_fcd})")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    subjects = [(f"sub-{i + 1:05d}", "fcd", i) for i in range(n_fcd)]
    subjects += [(f"sub-{n_fcd + j + 1:05d}", "hc", j) for j in range(n_healthy)]
    _refuse_stale_subjects(out_dir, {sid: group for sid, group, _ in subjects})
    out_dir.mkdir(parents=True, exist_ok=True)

    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2,)))
    splits = _assign_splits([s[0] for s in subjects if s[1] == "fcd"], test_fraction, split_rng)
    splits |= _assign_splits([s[0] for s in subjects if s[1] == "hc"], test_fraction, split_rng)

    iterator = subjects
    if progress:
        from tqdm import tqdm

        iterator = tqdm(subjects, desc="phantoms", unit="subject")
    for sid, group, index in iterator:
        flair, mask, affine = generate_subject(subject_rng(seed, group, index), cfg, with_lesion=(group == "fcd"))
        anat = out_dir / sid / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        stored = stored_flair(flair)
        _save_nifti(
            stored, affine, anat / f"{sid}_acq-phantom_FLAIR.nii.gz", "NeuroMF synthetic FLAIR phantom"
        )
        if mask is not None:
            _save_nifti(
                mask, affine, anat / f"{sid}_acq-phantom_FLAIR_roi.nii.gz", "NeuroMF synthetic FCD mask"
            )

    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", "group", "split"])
    for sid, group, _ in subjects:
        writer.writerow([sid, group, splits[sid]])
    _atomic_write(out_dir / "participants.tsv", lambda p: p.write_text(table.getvalue()))
    _atomic_write(
        out_dir / "participants.json", lambda p: p.write_text(json.dumps(_PARTICIPANTS_JSON, indent=2) + "\n")
    )
    _atomic_write(
        out_dir / "dataset_description.json",
        lambda p: p.write_text(
            json.dumps(_dataset_description(out_dir, n_healthy, n_fcd, seed, cfg), indent=2) + "\n"
        ),
    )
    _atomic_write(out_dir / ".bidsignore", lambda p: p.write_text(BIDSIGNORE))
    return out_dir


# The lesion ROIs keep ds004199's names (`*_FLAIR_roi.nii.gz`), which BIDS does not define (a BIDS mask would be
# `*_desc-lesion_mask.nii.gz` in a derivative); ds004199 declares them in a .bidsignore, and so do we, so the
# official validator (bids-validator-deno) reports no error for the tree.
BIDSIGNORE = """\
# Lesion masks named as in the Bonn FCD type II data set (OpenNeuro ds004199); not a BIDS suffix
*_FLAIR_roi.nii.gz
*_FLAIR_roi.nii
"""


_PARTICIPANTS_JSON = {
    "group": {"Description": "fcd: synthetic FCD type II patient (has a lesion ROI); hc: healthy control"},
    "split": {"Description": "train or test; test_fraction of each group goes to test"},
}


AUTHORS = ("NeuroMF contributors (synthetic data generator)",)


def _dataset_description(out_dir: Path, n_healthy: int, n_fcd: int, seed: int, cfg: PhantomConfig) -> dict:
    from neuromf import __version__
    from neuromf.data.make_tissue_template import MNI152_NOTICE

    command = f"neuromf make-phantoms --out {out_dir} --n-healthy {n_healthy} --n-fcd {n_fcd} --seed {seed}"
    if cfg != PhantomConfig():
        command = (
            f"make_phantom_dataset(Path({str(out_dir)!r}), n_healthy={n_healthy}, n_fcd={n_fcd}, "
            f"seed={seed}, cfg=PhantomConfig(**{asdict(cfg)}))"
        )
    return {
        "Name": "NeuroMF synthetic FCD type II FLAIR phantoms",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "Authors": list(AUTHORS),
        "License": "MNI152 2009 template notice (see HowToAcknowledge); synthetic data, no human subjects",
        "HowToAcknowledge": MNI152_NOTICE,
        "GeneratedBy": [
            {
                "Name": GENERATOR_NAME,
                "Version": __version__,
                "Description": f"command: {command}; seed: {seed}; config: {json.dumps(asdict(cfg))}",
            }
        ],
    }


def _refuse_stale_subjects(out_dir: Path, planned: dict[str, str]) -> None:
    """Refuse to mix a new data set with leftover subjects or ROIs that the new one would not replace."""
    if not out_dir.is_dir():
        return
    stale = sorted(p.name for p in out_dir.glob("sub-*") if p.name not in planned)
    stale += sorted(
        str(roi.relative_to(out_dir))
        for sid, group in planned.items()
        if group == "hc"
        for roi in (out_dir / sid / "anat").glob("*_roi.nii*")
    )
    if stale:
        raise FileExistsError(
            f"{out_dir}: holds files this data set would not overwrite ({', '.join(stale[:5])}"
            f"{', ...' if len(stale) > 5 else ''}); choose an empty folder"
        )
