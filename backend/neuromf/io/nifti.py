"""NIfTI in and out, and the preprocessing that maps any scan onto the model grid.

Any orientation -> RAS, resampled to the target spacing, cropped/padded to the model shape around the brain's
centre, intensities scaled so the 0th..99.5th percentiles map to [0, 1] WITHOUT clipping the top (up to
`clip_max`): FCD lesions are the brightest tissue in FLAIR, and clipping at 1 erased most of their contrast
(measured: ring contrast 1.28 -> 1.12). Masks use nearest interpolation and are binarised.
The model-grid affine travels with the data so outputs are written back in scanner space.
"""

from __future__ import annotations

import gzip
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from neuromf.io.validate import affine_problem, grid_memory_problem, image_problem, resampled_voxels, voxel_size_problem
from neuromf.utils import atomic_write


class VolumeError(ValueError):
    """A scan that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Preprocessing:
    """The model grid and intensity scaling every volume goes through before the VAE.

    Volumes are resampled to `shape` voxels of `spacing` mm, scaled so the percentiles map to [0, 1], and clipped at
    `clip_max`. Stored in sidecars as a dict (`key`, `from_dict`): a model only works on the grid it was trained on.
    """
    shape: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    lower_percentile: float = 0.0
    upper_percentile: float = 99.5
    # intensities above the upper percentile are kept (lesions live there) up to this bound; 1.0 = the old clip
    clip_max: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if len(self.shape) != 3 or len(self.spacing) != 3:
            raise ValueError(f"shape and spacing need 3 values, got {self.shape} and {self.spacing}")
        if any(s % 4 for s in self.shape):
            raise ValueError(f"model grid shape {self.shape} must be divisible by 4 (the VAE downsamples 4x)")
        if not self.clip_max >= 1.0 or not np.isfinite(self.clip_max):
            raise ValueError(f"clip_max must be a finite number >= 1 (the upper percentile maps to 1), got "
                             f"{self.clip_max}")
        if any(s < 4 for s in self.shape):
            raise ValueError(f"model grid shape {self.shape} must have at least 4 voxels per axis")
        if (problem := voxel_size_problem(self.spacing)) is not None:
            raise ValueError(f"model grid spacing: {problem}")
        if (problem := grid_memory_problem(float(np.prod(self.shape)), f"the model grid {self.shape}")) is not None:
            raise ValueError(problem)

    def key(self) -> dict:
        """The settings as a plain dict: part of latent-cache keys and of model / adapter sidecars."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        """From a sidecar's `preprocessing` dict. Sidecars written before `clip_max` existed clipped at 1."""
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in cls.__dataclass_fields__}
        known.setdefault("clip_max", 1.0)
        return cls(**known)

    def bounds(self, data: torch.Tensor) -> tuple[float, float]:
        """The intensities `scale` maps to 0 and 1 (the percentiles of `data`): a scan's own normalisation, which
        maps model-grid values back to its scanner units (value * (hi - lo) + lo)."""
        lo, hi = np.percentile(data.numpy(), [self.lower_percentile, self.upper_percentile])
        return float(lo), float(lo) + max(float(hi - lo), 1e-8)

    def scale(self, data: torch.Tensor) -> torch.Tensor:
        """Percentile scaling: lower -> 0, upper -> 1, brighter values kept up to `clip_max`."""
        lo, hi = self.bounds(data)
        scaled = (data - lo) / (hi - lo)
        return scaled.clamp(0.0, self.clip_max)


def sidecar_grid_problem(values: dict) -> str | None:
    """Why a model or adapter sidecar's grid entries cannot be trusted, or None.

    `scale_factor` must be a finite number > 0 (0 or NaN decodes every latent to NaN), `preprocessing` a valid
    model grid, and `latent_shape` (C, h, w, d) the VAE's 4x-downsampled view of that grid (a 96^3 grid entry in
    a 64^3 model would write data of one grid under the affine of another).
    """
    if "scale_factor" in values:
        scale = values["scale_factor"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
            return f"'scale_factor' must be a finite number > 0, got {scale!r}"
    if "preprocessing" not in values:
        return None
    raw = values["preprocessing"]
    if not isinstance(raw, dict):
        return f"'preprocessing' must be an object, got {raw!r:.60}"
    try:
        prep = Preprocessing.from_dict(raw)
    except (TypeError, ValueError) as err:
        return f"'preprocessing' is not a valid model grid ({err})"
    latent = values.get("latent_shape")
    if latent is None:
        return None
    if not isinstance(latent, list) or len(latent) != 4 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in latent):
        return f"'latent_shape' must be 4 positive integers (C, h, w, d), got {latent!r:.60}"
    # the VAE shrinks every axis by one power of two (4 for MAISI): a grid that is not that multiple of the latent
    # on every axis (e.g. a 96^3 grid written into a 64^3 adapter's sidecar) cannot be what the model was trained on
    ratios = {s / v for s, v in zip(prep.shape, latent[1:], strict=True)}
    ratio = next(iter(ratios))
    if len(ratios) != 1 or ratio < 1 or not float(ratio).is_integer() or int(ratio) & (int(ratio) - 1):
        return (f"'latent_shape' {latent} does not match the grid {list(prep.shape)} in 'preprocessing' (the grid "
                "must be the latent grid times one power of two on every axis, e.g. 4 for the MAISI VAE)")
    return None


@dataclass
class Volume:
    """One volume on the model grid: data (1, H, W, D) and its RAS affine."""

    data: torch.Tensor
    affine: np.ndarray
    source: Path | None = None


def read_nifti(path: Path | str, role: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as float32 + affine, with errors that name the file and what is wrong with it.

    Every file is checked by `neuromf.io.validate`: a usable affine (finite, not singular, MRI voxel sizes), and
    for `role="image"` usable data (real, finite, not constant); a mask's values are checked by its own reader.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for corrupt/truncated files
        raise VolumeError(f"{path}: not a readable NIfTI file ({err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got {data.ndim}D with shape {data.shape}")
    if (problem := affine_problem(affine)) is not None:
        raise VolumeError(f"{path}: {problem}")
    if role == "image" and (problem := image_problem(data)) is not None:
        raise VolumeError(f"{path}: {problem}")
    if np.iscomplexobj(data):
        raise VolumeError(f"{path}: complex-valued data")
    with np.errstate(over="ignore", invalid="ignore"):
        data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise VolumeError(f"{path}: contains NaN or infinite values (or values beyond float32)")
    return data, affine


def _to_ras_grid(data: np.ndarray, affine: np.ndarray, prep: Preprocessing, mode: str,
                 source: Path | str = "volume") -> MetaTensor:
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    voxels = resampled_voxels(data.shape, zooms, prep.spacing)
    if (problem := grid_memory_problem(voxels, f"resampled to {prep.spacing} mm, the scan")) is not None:
        raise VolumeError(f"{source}: {problem}")  # refused before MONAI allocates it
    volume = MetaTensor(torch.from_numpy(np.ascontiguousarray(data))[None], affine=torch.from_numpy(affine))
    volume = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(volume)
    return Spacing(pixdim=prep.spacing, mode=mode, padding_mode="zeros")(volume)


def _window(volume: MetaTensor, start: np.ndarray, shape: tuple[int, int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """Crop/pad `volume` to `shape` starting at voxel `start` (may be negative); returns data and new affine."""
    src = volume.as_tensor()[0]
    out = torch.zeros(shape, dtype=src.dtype)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.array(shape), src.shape)
    if np.all(hi > lo):
        dst_lo = lo - start
        dst_hi = dst_lo + (hi - lo)
        out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
            src[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    affine = np.asarray(volume.affine, dtype=np.float64)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out[None], shifted


def brain_window_start(volume: MetaTensor, shape: tuple[int, int, int]) -> np.ndarray:
    """Window origin that centres the model grid on the brain's centre of mass (foreground > 10% of p99)."""
    data = volume.as_tensor()[0].numpy()
    threshold = 0.1 * np.percentile(data, 99)
    coords = np.argwhere(data > threshold)
    centre = coords.mean(axis=0) if len(coords) else np.array(data.shape) / 2
    return np.round(centre - np.array(shape) / 2).astype(int)


def image_window(image: np.ndarray, affine: np.ndarray, prep: Preprocessing,
                 source: Path | str = "volume") -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A scan resampled onto the model grid (RAS, `prep.spacing`, `prep.shape` voxels centred on its brain), in its
    own intensities (not yet scaled): (1, H, W, D) float32, the grid's (4, 4) affine and the window's start voxel."""
    grid = _to_ras_grid(np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=np.float64), prep,
                        mode="bilinear", source=source)
    start = brain_window_start(grid, prep.shape)
    data, grid_affine = _window(grid, start, prep.shape)
    return torch.as_tensor(data, dtype=torch.float32), grid_affine, start


def preprocess_pair(image_path: Path | str, mask_path: Path | str | None,
                    prep: Preprocessing) -> tuple[Volume, Volume | None]:
    """Image (and optional mask) on the model grid; the mask shares the image's window and affine."""
    image, affine = read_nifti(image_path)
    if mask_path is None:
        return arrays_to_model_grid(image, affine, None, prep, source=image_path)[0], None
    from neuromf.io.bids import load_mask_array

    mask = load_mask_array(Path(mask_path)).astype(np.float32)
    _, mask_affine = read_nifti(mask_path, role="mask")
    if mask.shape != image.shape:
        raise VolumeError(f"{mask_path}: mask shape {mask.shape} differs from image shape {image.shape}")
    # same tolerance as check-data (validate_case): a shifted or rotated mask would be resampled off the lesion
    affine_gap = float(np.max(np.abs(mask_affine - affine)))
    if affine_gap > 1e-3:
        raise VolumeError(f"{mask_path}: mask affine differs from the image's ({Path(image_path).name}) by up to "
                          f"{affine_gap:.4g} mm (tolerance 0.001): the mask is not on the image's voxel grid")
    image_volume, mask_volume = arrays_to_model_grid(image, affine, mask, prep, source=image_path)
    image_volume.source, mask_volume.source = Path(image_path), Path(mask_path)
    return image_volume, mask_volume


def arrays_to_model_grid(image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, prep: Preprocessing,
                         source: Path | str = "volume") -> tuple[Volume, Volume | None]:
    """An image (and a mask on its voxel grid) in memory, on the model grid as training sees them: the window
    centred on the brain, the image percentile-scaled, the mask binarised in the same window."""
    data, grid_affine, start = image_window(image, affine, prep, source=source)
    image_volume = Volume(prep.scale(data), grid_affine, None)
    if mask is None:
        return image_volume, None
    mask_grid = _to_ras_grid(np.asarray(mask, dtype=np.float32), np.asarray(affine, dtype=np.float64), prep,
                             mode="nearest", source=source)
    mask_data, _ = _window(mask_grid, start, prep.shape)
    return image_volume, Volume((mask_data > 0.5).to(torch.float32), grid_affine, None)


def preprocess_image(path: Path | str, prep: Preprocessing) -> Volume:
    """A FLAIR alone (no mask) on the model grid: `preprocess_pair` without a mask."""
    return preprocess_pair(path, None, prep)[0]


def save_nifti(array: np.ndarray | torch.Tensor, affine: np.ndarray, path: Path | str,
               dtype: type | None = None) -> Path:
    """Write a 3D volume atomically (temp file + rename); `dtype` e.g. np.uint8 for masks."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if dtype is not None:
        array = array.astype(dtype)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    payload = img.to_bytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    return atomic_write(path, lambda p: p.write_bytes(payload))


def mask_to_model_grid(mask: np.ndarray, affine: np.ndarray, prep: Preprocessing, source: str = "mask") -> Volume:
    """A lesion mask (any orientation and spacing) alone on the model grid, binarised.

    Without its FLAIR there is no brain to centre on, so the window is centred on the mask's field of view (a
    whole-head scan's grid is centred on the head). With the FLAIR, use `preprocess_pair` instead.
    """
    grid = _to_ras_grid(np.asarray(mask, dtype=np.float32), np.asarray(affine, dtype=np.float64), prep, "nearest",
                        source)
    start = np.round((np.array(grid.shape[1:]) - np.array(prep.shape)) / 2).astype(int)
    data, grid_affine = _window(grid, start, prep.shape)
    out = (data > 0.5).to(torch.float32)
    if not out.any():
        raise VolumeError(f"{source}: the lesion mask is empty on the model grid "
                          f"({prep.shape} voxels of {prep.spacing} mm around the centre of its field of view)")
    return Volume(out, grid_affine, None)


def preprocess_mask(mask_path: Path | str, prep: Preprocessing, image_path: Path | str | None = None) -> Volume:
    """A lesion-mask file on the model grid: in its FLAIR's brain-centred window when `image_path` is given."""
    if image_path is not None:
        _, mask = preprocess_pair(image_path, mask_path, prep)
        if not mask.data.any():
            raise VolumeError(f"{mask_path}: the lesion mask is empty on the model grid")
        return mask
    from neuromf.io.bids import load_mask_array

    _, affine = read_nifti(mask_path, role="mask")
    volume = mask_to_model_grid(load_mask_array(Path(mask_path)), affine, prep, source=str(mask_path))
    volume.source = Path(mask_path)
    return volume
