"""npe2 reader for ``*.nii`` / ``*.nii.gz``: masks open as Labels, everything else as Image (see ``_layers``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from napari_neuromf._layers import LayerDataError, is_nifti_path, read_layer
from napari_neuromf._viewing import guard_current_viewer

PathOrPaths = str | Sequence[str]


def napari_get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list] | None:
    """Return the reader when every path is a NIfTI file, else None (let other readers try)."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(is_nifti_path(p) for p in paths):
        return None
    return read_nifti_files


def read_nifti_files(path: PathOrPaths, **_: object) -> list:
    """Layer data tuples for the readable files; a notification names each file that is not readable.

    Returns napari's null-layer sentinel ``[(None,)]`` when nothing could be read, so a bad file gives one
    clear notification instead of an exception dialog. The viewer opened into shows the volumes axial, with
    orientation letters and a caption that stays true (``_viewing.ViewGuard``).
    """
    from napari.utils.notifications import show_error

    guard_current_viewer()
    paths = [path] if isinstance(path, str | Path) else list(path)
    layers = []
    for p in paths:
        try:
            layers.append(read_layer(p))
        except LayerDataError as err:
            show_error(f"NeuroMF reader: {err}")
        except Exception as err:  # never let a reader bug take the GUI down
            show_error(f"NeuroMF reader: {p}: unexpected error ({type(err).__name__}: {err})")
    return layers or [(None,)]
