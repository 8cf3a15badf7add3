"""npe2 writers: one Image or one Labels layer to ``.nii.gz`` (or ``.nii``), restoring the stored affine.

A layer read by this plugin goes back in its original orientation, with its original affine, header and (when
lossless) data type; other layers get an axis-aligned RAS affine from their scale and translate.
"""

from __future__ import annotations

from typing import Any

from napari_neuromf._layers import LayerDataError, write_layer


def _write(path: str, data: Any, meta: dict) -> list[str]:
    from napari.utils.notifications import show_error

    try:
        return [str(write_layer(path, data, meta))]
    except (LayerDataError, OSError, ValueError) as err:
        show_error(f"NeuroMF writer: {path}: {err}")
        return []


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    return _write(path, data, meta)


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    return _write(path, data, meta)
