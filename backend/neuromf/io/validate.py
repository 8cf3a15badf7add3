"""What makes a scan, a lesion mask or a model grid usable: one set of checks for every reader.

check-data, mask-test, the training data loaders and generate's `--mask` / `--image` inputs all go through
these functions (via `neuromf.io.nifti.read_nifti` and `neuromf.io.bids`), so a file refused by one command is
refused by all of them, with the same reason. Each check returns a problem in words (None when fine); the
caller adds the file name and raises its own error type.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np

VOXEL_MM = (0.1, 20.0)  # plausible MRI voxel sides (the tests' coarse phantoms use 6-12 mm)
MAX_LESION_SHARE = 0.25  # a focal lesion never fills a quarter of the scan: more is an inverted or brain mask
BYTES_PER_VOXEL = 4 * 16  # float32, about 16 copies live at once while a volume is resampled, cropped, encoded


def affine_problem(affine: np.ndarray) -> str | None:
    """Why a voxel-to-world affine cannot place a scan (non-finite, singular, implausible voxel size), or None."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "affine is not a finite 4x4 matrix"
    if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        return "affine is singular (zero or degenerate voxel axes): the scan has no position in space"
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return voxel_size_problem(zooms)


def voxel_size_problem(zooms: Sequence[float]) -> str | None:
    """Why voxel sides (mm) are not those of an MRI scan (outside `VOXEL_MM`), or None."""
    zooms = [float(z) for z in zooms[:3]]
    low, high = VOXEL_MM
    if not all(np.isfinite(zooms)) or any(z < low or z > high for z in zooms):
        shown = "x".join(f"{z:.4g}" for z in zooms)
        return f"voxel size {shown} mm is outside {low:g}-{high:g} mm (check the header's pixdim / affine)"
    return None


def image_problem(data: np.ndarray) -> str | None:
    """Why image data cannot be a FLAIR (complex, non-finite, constant e.g. all zero), or None."""
    if np.iscomplexobj(data):
        return "complex-valued image (magnitude expected; export the magnitude image)"
    if not np.issubdtype(data.dtype, np.number):
        return f"image data type {data.dtype} is not numeric"
    if data.size == 0:
        return "image has no voxels"
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        return "contains NaN or infinite values"
    low, high = float(np.min(data)), float(np.max(data))
    if low == high:
        return f"image is constant (every voxel {low:g}): no brain to learn from"
    return None


def binary_mask(data: np.ndarray) -> tuple[np.ndarray | None, str | None, str | None]:
    """A lesion mask's data as uint8 {0, 1}: (mask, note, problem).

    Accepted: {0, 1}, or 0 plus one positive label (e.g. {0, 255}: binarised, with a note). Refused (problem):
    complex or non-finite data, negative values (an inverted or signed mask such as {-1, 0}, whose background
    would become the lesion), more than two values, a single non-zero value (everything lesion).
    """
    if np.iscomplexobj(data) or not np.issubdtype(data.dtype, np.number):
        return None, None, f"mask data type {data.dtype} is not a real number type"
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        return None, None, "mask contains NaN or infinite values"
    if np.all((data == 0) | (data == 1)):
        return data.astype(np.uint8), None, None
    values = np.unique(data)
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if len(values) > 5 else "")
    if len(values) > 2:
        return None, None, f"mask has {len(values)} distinct values ({shown}); expected two (0 and 1)"
    if values[0] < 0:
        return None, None, (f"mask values {{{shown}}} include negative labels: an inverted or signed mask? "
                            "expected 0 for background and one positive lesion label")
    if values[0] != 0:
        return None, None, f"mask has no background (every voxel {values[0]:g}); expected 0 outside the lesion"
    label = values[-1]
    return (data == label).astype(np.uint8), f"two-valued mask {{{shown}}} binarised ({label:g} -> 1)", None


def lesion_share_problem(mask: np.ndarray) -> str | None:
    """Why a binary mask is not a focal lesion (it covers more than `MAX_LESION_SHARE` of the scan), or None."""
    share = float(np.count_nonzero(mask)) / max(mask.size, 1)
    if share > MAX_LESION_SHARE:
        return (f"mask covers {share:.0%} of the scan (more than {MAX_LESION_SHARE:.0%}): not a focal lesion mask "
                "(an inverted mask, or a brain mask?)")
    return None


def memory_limit_bytes() -> int:
    """The memory one volume may take while it is prepared: $NEUROMF_MAX_MEMORY_GB, else this machine's RAM."""
    env = os.environ.get("NEUROMF_MAX_MEMORY_GB")
    if env:
        return int(float(env) * 1e9)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a workstation
        return 64 * 10**9


def grid_memory_problem(voxels: float, what: str) -> str | None:
    """Why `voxels` float32 voxels cannot be prepared in memory (estimate above `memory_limit_bytes`), or None."""
    needed = float(voxels) * BYTES_PER_VOXEL
    limit = memory_limit_bytes()
    if needed > limit:
        return (f"{what} has {voxels:.3g} voxels: preparing it needs about {needed / 1e9:.1f} GB of memory, more "
                f"than the {limit / 1e9:.1f} GB available (coarser spacing or a smaller grid; NEUROMF_MAX_MEMORY_GB "
                "raises the limit)")
    return None


def resampled_voxels(shape: Sequence[int], zooms: Sequence[float], spacing: Sequence[float]) -> float:
    """Voxels of a scan of `shape` voxels of `zooms` mm once resampled to `spacing` mm (its field of view kept)."""
    return float(np.prod([max(1.0, s * z / t) for s, z, t in zip(shape[:3], zooms[:3], spacing[:3])]))


def entry_type_problem(values: dict, hints: dict[str, Any]) -> str | None:
    """Why an entry of a JSON sidecar has the wrong type for its field (`hints`: name -> type annotation), or None.

    A sidecar is data from disk: a dict where a path should be, or a string where a count should be, would
    otherwise surface as a TypeError deep inside a model constructor.
    """
    for name, annotation in hints.items():
        if name in values and not _matches(values[name], annotation):
            return f"entry '{name}' must be {_describe(annotation)}, got {type(values[name]).__name__} " \
                   f"({values[name]!r:.40})"
    return None


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, dict):
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    if annotation is type(None):
        return "null"
    if annotation is float:
        return "a finite number"
    name = getattr(origin or annotation, "__name__", str(annotation))
    return {"str": "a string", "int": "an integer", "bool": "true or false", "list": "a list",
            "dict": "an object"}.get(name, name)
