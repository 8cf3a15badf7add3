"""NIfTI <-> napari layer glue. Qt-free and torch-free (nibabel + numpy only), so the reader stays light.

Reading: the volume is reoriented to the closest canonical orientation (RAS+) with
``nibabel.as_closest_canonical``; the layer's ``scale`` is the voxel size and its ``translate`` the canonical
affine's origin, so an image and its mask (and a model-grid volume with its own affine) overlay in world
millimetres. ``metadata["nifti"]`` keeps the source path, the original affine and header and the orientation,
and the writer uses them to undo the reorientation and restore the original affine exactly.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

NIFTI_SUFFIXES = (".nii.gz", ".nii")
MASK_NAME = re.compile(r"(_roi|mask|seg|label)", re.IGNORECASE)
RAS = axcodes2ornt(("R", "A", "S"))


class LayerDataError(ValueError):
    """A file or layer that cannot be turned into a layer / a NIfTI file; the message names it."""


def is_nifti_path(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_mask_name(path: str | Path) -> bool:
    """File names of masks: ``*_roi*``, ``*mask*``, ``*seg*``, ``*label*`` (case-insensitive)."""
    return bool(MASK_NAME.search(strip_nifti(Path(path).name)))


def _integer_valued(data: np.ndarray) -> bool:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return True
    return bool(np.all(np.isfinite(data)) and np.all(np.mod(data, 1) == 0))


MAX_LABELS = 256  # a mask named so holds at most this many values (a scan stored as integers holds thousands)


def looks_like_mask(path: str | Path, data: np.ndarray) -> bool:
    """A mask by name holding few integer values, or integer data with exactly two values. A scan named like a
    mask (``FLAIR_brain_masked``: skull-stripped) stored as integers, as most clinical scans are, is an image: its
    values are too many (counted on ~100k voxels, every k-th per axis: `np.unique` of a whole 1 mm volume takes
    ~0.5 s)."""
    if is_mask_name(path):
        step = max(1, round((np.size(data) / 100_000) ** (1 / 3)))
        few = np.unique(np.asarray(data)[::step, ::step, ::step]).size <= MAX_LABELS if np.ndim(data) == 3 else True
        return few and _integer_valued(data)
    return np.issubdtype(data.dtype, np.integer) and np.unique(data).size == 2


def label_array(data: np.ndarray) -> np.ndarray:
    """Integer copy of integer-valued data for a Labels layer (uint8 when it fits, else int32)."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if lo >= 0 and hi <= 255:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return data
    return data.astype(np.int32)


def world_placement(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translate) of an axis-aligned RAS affine: voxel sizes and origin in mm."""
    affine = np.asarray(affine, dtype=np.float64)
    scale = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    translate = tuple(float(t) for t in affine[:3, 3])
    return scale, translate


def load_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Canonical (RAS) data, canonical affine, and the ``metadata["nifti"]`` record that undoes it.

    Raises LayerDataError naming the file for missing, unreadable, non-3D or non-finite volumes.
    """
    path = Path(path)
    if not path.is_file():
        raise LayerDataError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise TypeError(f"{type(img).__name__} is not a NIfTI image")
        original_shape = tuple(int(s) for s in img.shape)
        if len(original_shape) == 4 and original_shape[3] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise LayerDataError(f"{path}: expected a 3D volume, got {len(original_shape)}D with shape "
                                 f"{original_shape}")
        canonical = nib.as_closest_canonical(img)
        data = np.asanyarray(canonical.dataobj)
    except LayerDataError:
        raise
    except Exception as err:  # nibabel raises many exception types for corrupt or truncated files
        raise LayerDataError(f"{path}: not a readable NIfTI file ({err})") from err
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise LayerDataError(f"{path}: contains NaN or infinite values")
    record = {
        "path": str(path),
        "affine": np.asarray(img.affine, dtype=np.float64).copy(),
        "header": img.header.copy(),
        "ornt": io_orientation(img.affine),  # original axes -> RAS
        "canonical_affine": np.asarray(canonical.affine, dtype=np.float64).copy(),
        "shape": tuple(int(s) for s in img.shape),
        "canonical_shape": tuple(int(s) for s in data.shape),
        "dtype": str(data.dtype),
    }
    return data, record["canonical_affine"], record


def layer_tuple(data: np.ndarray, affine: np.ndarray, name: str, kind: str,
                nifti: dict | None = None, extra: dict | None = None) -> tuple:
    """A napari LayerDataTuple (data, kwargs, "image"|"labels") placed in world mm by ``affine`` (RAS)."""
    if nifti is None:  # an in-memory volume (generated, reconstructed, model grid): any orientation
        data, affine, nifti = canonical_array(np.asarray(data), affine)
    scale, translate = world_placement(affine)
    metadata: dict[str, Any] = {"nifti": nifti}
    if extra:
        metadata["neuromf"] = dict(extra)
    kwargs: dict[str, Any] = {"name": name, "scale": scale, "translate": translate, "metadata": metadata}
    if kind == "labels":
        kwargs.update(lesion_style())
        return label_array(np.asarray(data)), kwargs, "labels"
    if kind != "image":
        raise ValueError(f"kind must be 'image' or 'labels', got {kind!r}")
    kwargs["contrast_limits"] = brain_window(np.asarray(data))
    kwargs["colormap"] = "gray"
    return data, kwargs, "image"


LESION_COLOUR = (1.0, 0.27, 0.0, 1.0)  # one orange-red for every lesion layer: painted, loaded or generated
LESION_NAME = "lesion"


def lesion_style() -> dict[str, Any]:
    """Labels kwargs shared by every lesion layer: label 1 named "lesion" (napari shows the name under the
    cursor), drawn in LESION_COLOUR at half opacity."""
    return {"opacity": 0.5, "colormap": {0: "transparent", 1: LESION_COLOUR, None: LESION_COLOUR},
            "features": {"index": np.array([0, 1]), "name": np.array(["background", LESION_NAME])}}


def brain_window(values: np.ndarray) -> tuple[float, float]:
    """Initial contrast limits from the brain's intensities, wide enough to keep a lesion hyperintense.

    The brain is every voxel brighter than a tenth of the head's 99th percentile (background and most CSF fall
    below). The upper limit is the brain's 99.99th percentile: an FCD lesion is the brightest tissue in FLAIR
    and fills well under 1% of the brain, so any lower percentile (the 99.5th clipped 89% of a phantom lesion to
    white) lands inside the lesion's own intensity range.
    """
    if not values.size:
        return 0.0, 1.0
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    nonzero = finite[finite > lo]
    if nonzero.size < 0.01 * values.size:  # almost empty: any window shows it
        hi = float(finite.max()) if finite.size else 1.0
        return lo, hi if hi > lo else lo + 1.0
    brain = nonzero[nonzero > lo + 0.1 * (float(np.percentile(nonzero, 99)) - lo)]
    low, high = (float(v) for v in np.percentile(brain, (0.5, 99.99)))
    lo = max(lo, low * 0.5)  # dark CSF stays dark, the background black
    return lo, high if high > lo else lo + 1.0


def canonical_array(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """An in-memory volume reoriented like a file would be, with a header-less ``metadata["nifti"]`` record."""
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3 or affine.shape != (4, 4):
        raise LayerDataError(f"expected a 3D volume and a 4x4 affine, got shapes {data.shape} and {affine.shape}")
    ornt = io_orientation(affine)
    to_ras = ornt_transform(ornt, RAS)
    if np.array_equal(to_ras, RAS):
        canonical, canonical_affine = data, affine.copy()
    else:
        canonical = apply_orientation(data, to_ras)
        canonical_affine = affine @ nib.orientations.inv_ornt_aff(to_ras, data.shape)
    record = {"path": None, "affine": affine.copy(), "header": None, "ornt": ornt,
              "canonical_affine": canonical_affine, "shape": tuple(int(s) for s in data.shape),
              "canonical_shape": tuple(int(s) for s in canonical.shape), "dtype": str(data.dtype)}
    return canonical, canonical_affine, record


def read_layer(path: str | Path, kind: str | None = None, name: str | None = None) -> tuple:
    """One NIfTI file as a LayerDataTuple; ``kind`` None decides Image vs Labels from name and data."""
    data, affine, record = load_nifti(path)
    if kind is None:
        kind = "labels" if looks_like_mask(path, data) else "image"
    elif kind == "labels" and not _integer_valued(data):
        raise LayerDataError(f"{path}: a mask must hold integer values, this file has fractional ones")
    return layer_tuple(data, affine, name or strip_nifti(Path(path).name), kind, record)


def check_pair(image_path: str | Path, mask_path: str | Path, atol: float = 1e-3) -> None:
    """Raise LayerDataError naming the mask when its grid (shape or affine) differs from the image's."""
    try:
        image, mask = nib.load(str(image_path)), nib.load(str(mask_path))
    except Exception as err:
        raise LayerDataError(f"{mask_path}: cannot read the image/mask headers ({err})") from err
    if tuple(image.shape[:3]) != tuple(mask.shape[:3]):
        raise LayerDataError(f"{Path(mask_path).name}: mask shape {tuple(mask.shape)} differs from image "
                             f"{Path(image_path).name} shape {tuple(image.shape)}")
    gap = float(np.max(np.abs(np.asarray(mask.affine) - np.asarray(image.affine))))
    if gap > atol:
        raise LayerDataError(f"{Path(mask_path).name}: mask affine differs from image {Path(image_path).name}'s "
                             f"by up to {gap:.3g} mm")


# ---------------------------------------------------------------------------------------------- writing
def _record_for(data: np.ndarray, meta: dict) -> dict | None:
    record = (meta.get("metadata") or {}).get("nifti")
    if not record:
        return None
    if tuple(record.get("canonical_shape", data.shape)) != tuple(data.shape):
        return None  # the layer no longer matches the file it came from: place it by scale/translate
    return record


def nifti_from_layer(data: np.ndarray, meta: dict) -> nib.Nifti1Image:
    """Undo the reader: original orientation, original affine, original header (dtype kept when lossless).

    ``meta`` is the layer state napari passes to writers (``metadata``, ``scale``, ``translate``). A layer that
    did not come from a NIfTI file gets an axis-aligned RAS affine from its scale and translate.
    """
    data = np.asarray(data)
    if data.ndim != 3:
        raise LayerDataError(f"layer {meta.get('name', '?')!r}: only 3D layers can be written as NIfTI, "
                             f"this one has shape {data.shape}")
    record = _record_for(data, meta)
    header = None
    if record is None:
        scale = np.asarray(meta.get("scale", (1.0, 1.0, 1.0)), dtype=np.float64)[-3:]
        translate = np.asarray(meta.get("translate", (0.0, 0.0, 0.0)), dtype=np.float64)[-3:]
        affine = np.diag([*scale, 1.0])
        affine[:3, 3] = translate
        array = data
    else:
        back = ornt_transform(RAS, np.asarray(record["ornt"]))  # canonical array -> original array axes
        array = apply_orientation(data, back)
        affine = np.asarray(record["affine"], dtype=np.float64)
        header = record.get("header")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.dtype == np.int64:
        array = array.astype(np.int32) if _fits(array, np.dtype(np.int32)) else array
    sform_code = qform_code = 1
    if header is not None:
        header = header.copy()
        target = np.dtype(header.get_data_dtype())
        slope, inter = header.get_slope_inter()
        scaled = slope is not None and not (slope == 1 and (inter or 0) == 0)
        if not scaled and array.dtype != target and _fits(array, target):
            array = array.astype(target)  # e.g. a uint8 mask edited in napari as int32 goes back to uint8
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(np.nan, np.nan)
        sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
        if not sform_code and not qform_code:
            sform_code = 1
    image = nib.Nifti1Image(np.ascontiguousarray(array), affine, header=header)
    if header is None:
        image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    return image


def _fits(array: np.ndarray, dtype: np.dtype) -> bool:
    """True when every value of ``array`` is exactly representable in ``dtype``."""
    if not array.size:
        return True
    if np.issubdtype(dtype, np.integer):
        if not _integer_valued(array):
            return False
        info = np.iinfo(dtype)
        return info.min <= float(array.min()) and float(array.max()) <= info.max
    with np.errstate(all="ignore"):
        return bool(np.array_equal(array.astype(dtype).astype(array.dtype), array))


def nifti_path(path: str | Path) -> Path:
    """``path`` with a .nii.gz suffix unless it already ends in .nii or .nii.gz."""
    path = Path(path)
    return path if is_nifti_path(path) else path.with_name(path.name + ".nii.gz")


def write_layer(path: str | Path, data: np.ndarray, meta: dict) -> Path:
    """Write one layer as NIfTI, atomically (temporary file in the same folder, then rename)."""
    path = nifti_path(path)
    image = nifti_from_layer(data, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ---------------------------------------------------------------------------------------------- pairs
def case_layers(image_path: str | Path, mask_path: str | Path | None, case_id: str) -> tuple[list[tuple], list[str]]:
    """Image + lesion Labels of one case, with identical scale/translate; problems are returned, not raised.

    The image must be readable (LayerDataError otherwise); a mask whose grid differs from the image's, or that
    cannot be read, is left out and reported so the caller can show a notification.
    """
    layers = [read_layer(image_path, kind="image", name=f"{case_id} FLAIR")]
    problems: list[str] = []
    if mask_path is not None:
        try:
            check_pair(image_path, mask_path)
            mask = read_layer(mask_path, kind="labels", name=f"{case_id} lesion")
        except LayerDataError as err:
            problems.append(f"{err}; the mask was not loaded")
        else:
            mask[1]["metadata"]["neuromf"] = {"role": "lesion", "case": case_id}
            layers.append(mask)
    layers[0][1]["metadata"]["neuromf"] = {"role": "image", "case": case_id}
    return layers, problems


def pair_layers(prefix: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                extra: dict | None = None) -> list[tuple]:
    """``<prefix> FLAIR`` (Image) and ``<prefix> lesion`` (Labels) on the same grid, ``extra`` in metadata."""
    extra = dict(extra or {})
    return [
        layer_tuple(np.asarray(image, dtype=np.float32), affine, f"{prefix} FLAIR", "image",
                    extra={**extra, "role": "image", "pair": prefix}),
        layer_tuple(np.asarray(mask).astype(np.uint8), affine, f"{prefix} lesion", "labels",
                    extra={**extra, "role": "lesion", "pair": prefix}),
    ]
