"""npe2 reader for ``*.nii`` / ``*.nii.gz``: masks open as Labels, everything else as Image (see ``_layers``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from napari_neuromf._layers import LayerDataError, is_nifti_path, read_layer
from napari_neuromf._opening import notify_unreadable, open_in_turns, opened_from_the_gui
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
    orientation letters and a caption that stays true (``_viewing.ViewGuard``). Called by napari's GUI (File >
    Open, drag and drop, the reader dialog), the files are read in a worker and their layers added a turn at a
    time (``_opening``), and the sentinel is returned at once: the GUI is never held for the whole opening. A
    window closed before the reader runs (napari's progress bar for the opening lets events in) gets the sentinel
    alone: nothing is added to a closed viewer.
    """
    viewer = guard_current_viewer()
    paths = [path] if isinstance(path, str | Path) else list(path)
    if opened_from_the_gui():
        if viewer is not None:  # None: its window closed while napari's progress bar let events in
            open_in_turns(viewer, lambda: read_files(paths), ", ".join(Path(p).name for p in paths))
        return [(None,)]
    layers, errors = read_files(paths)
    notify_unreadable(errors)
    return layers or [(None,)]


def read_files(paths: Sequence[str | Path]) -> tuple[list[tuple], list[str]]:
    """(layer data tuples of the readable files, one message per file that is not: its path and the problem)."""
    layers, errors = [], []
    for p in paths:
        try:
            layers.append(read_layer(p))
        except LayerDataError as err:
            errors.append(str(err))
        except Exception as err:  # never let a reader bug take the GUI down
            errors.append(f"{p}: unexpected error ({type(err).__name__}: {err})")
    return layers, errors
