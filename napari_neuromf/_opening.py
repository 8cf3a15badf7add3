"""Opening volumes without holding napari's GUI thread: read in a worker, then one layer per turn of the event loop.

napari calls a reader, and a sample, on its GUI thread and adds all they return in one go. For one 2 mm FLAIR that
held the GUI ~0.3-0.35 s on a 2-core CPU (reading, the viewer's dims going from 2D to 3D ~0.1 s, the layer's visual
and controls ~0.1-0.2 s, turning the view axial); a 1 mm scan adds ~0.3-0.5 s of reading. So when napari's GUI opens
something (File > Open, drag and drop, File > Open Sample), `open_in_turns` spreads that work: the files are read in
a worker (napari shows it as activity), an empty viewer gets its three axial dims in a turn of their own, then each
layer arrives in a turn of its own. Only napari's own GUI actions go this way (`opened_from_the_gui`): a script, a
notebook or napari's console that calls ``viewer.open`` gets its layers back at once, as napari's reader contract
has it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import napari

TURN_MS = 30  # between two steps of an opening: a turn of the event loop to draw and take input

# A Labels layer's editing overlays (napari's polygon tool and brush outline). napari builds their visuals when the
# layer is inserted, about half of a hidden Labels layer's insertion, but only for overlays that are visible: the
# others get theirs when they turn visible. `insert_layer` holds them back; `_show_overlays` lets them in a turn later.
EDITING_OVERLAYS = ("polygon", "brush_stroke")
_held_overlays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its overlays held back


# napari's own GUI entry points that open files and samples (File > Open and drag and drop, the reader dialog,
# File > Open Sample), as (function, file): a call from one of them hands its layers over in later turns. A call
# from anywhere else (a script, a notebook, napari's console, a test) gets its layers back at once, as napari's
# reader and sample contracts have it; so does every call if a napari version renames these.
GUI_OPENERS = (("_qt_open", "qt_viewer.py"), ("open_with_dialog_choices", "qt_reader_dialog.py"),
               ("_add_sample", "_qnpe2.py"))


def in_gui_event_loop() -> bool:
    """Whether this runs on the GUI thread inside a running Qt event loop (napari's app, a test's wait): where work
    may be spread over later turns. A script or a test calling outside a loop gets its result at once."""
    import sys

    if threading.current_thread() is not threading.main_thread() or "qtpy" not in sys.modules:
        return False
    from qtpy.QtCore import QCoreApplication, QThread

    return QCoreApplication.instance() is not None and QThread.currentThread().loopLevel() >= 1


def opened_from_the_gui() -> bool:
    """Whether this call comes from napari's GUI opening a file or a sample (`GUI_OPENERS` on the call stack),
    inside its running Qt event loop on the GUI thread: then the layers may come a turn later."""
    import sys

    if not in_gui_event_loop():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if any(code.co_name == name and Path(code.co_filename).name == file for name, file in GUI_OPENERS):
            return "napari" in Path(code.co_filename).parts
        frame = frame.f_back
    return False


class Opening:
    """One opening's layers, in its viewer's queue from the moment it is asked for, so openings keep their order (of
    two files dropped together, a mask read first still goes above its FLAIR). ``steps`` is None while its files are
    being read; ``tuples`` are the layers still to add, ``layers`` those added; ``then(layers)`` runs after the last
    one; ``done`` once it has run every step (or its viewer closed)."""

    def __init__(self, then: Callable[[list], Any] | None = None,
                 add: Callable[[napari.Viewer, tuple], Any] | None = None) -> None:
        self.steps: list[Callable[[napari.Viewer], Any]] | None = None
        self.tuples: list[tuple] = []
        self.layers: list = []
        self.then = then
        self.add = add or functools.partial(insert_layer, hold_overlays=True)
        self.done = False


_queues: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # viewer -> its openings not yet done


def open_in_turns(viewer: napari.Viewer, read: Callable[[], tuple[list[tuple], list[str]]], what: str) -> Opening:
    """Run ``read`` (-> layer data tuples and error messages) in a worker (napari shows it as activity), then show
    each error as a notification and add the layers to ``viewer`` one per turn (`add_in_turns`), after the
    openings asked for before it."""
    viewer_ref, opening = weakref.ref(viewer), _queued(viewer, Opening())

    def arrived(tuples: list[tuple], errors: list[str]) -> None:
        notify_unreadable(errors)
        _fill(viewer_ref, opening, tuples)

    def failed(err: Exception) -> None:
        notify_unreadable([_unexpected(what, err)])
        _fill(viewer_ref, opening, [])

    _read_in_worker(read, what, arrived, failed)
    return opening


def _unexpected(what: str, err: Exception) -> str:
    return f"{what}: unexpected error ({type(err).__name__}: {err})"


def _read_in_worker(read: Callable[[], tuple[list[tuple], list[str]]], what: str,
                    arrived: Callable[[list[tuple], list[str]], Any], failed: Callable[[Exception], Any]) -> None:
    """``read`` in a napari worker, shown as activity ("Opening <what>"); ``arrived(*result)`` or ``failed(error)``
    on the GUI thread."""
    from napari.qt.threading import create_worker

    from napari_neuromf._jobs import start_worker

    worker = create_worker(read, _progress={"total": 0, "desc": f"Opening {what}"}, _start_thread=False,
                           _connect={"returned": lambda result: arrived(*result), "errored": failed})  # not re-raised
    start_worker(worker)


def add_in_turns(viewer: napari.Viewer, tuples: Sequence[tuple], then: Callable[[list], Any] | None = None,
                 add: Callable[[napari.Viewer, tuple], Any] | None = None) -> Opening:
    """Add layer data tuples to ``viewer`` a turn of the event loop at a time, after the openings under way: an
    empty viewer's dims turned axial first, then each layer added hidden and shown a turn later (`add(viewer,
    data_tuple)`, default `insert_layer` holding back editing overlays for a turn), then ``then(layers)``. A dock's
    viewer (napari's public-only proxy) is queued as the viewer behind it: the queue outlives the proxy."""
    from napari_neuromf._viewing import unproxied

    viewer = unproxied(viewer)
    opening = _queued(viewer, Opening(then, add))
    _fill(weakref.ref(viewer), opening, tuples)
    return opening


def sample_in_turns(viewer: napari.Viewer, tuples: Sequence[tuple]) -> list[tuple]:
    """What a sample returns to napari, which adds it in the same stretch: its first layer only, hidden (napari's
    sample contract wants at least one); showing it and the other layers follow a turn at a time."""
    if not tuples:
        return list(tuples)
    data, kwargs, kind = tuples[0]
    opening = _queued(viewer, Opening())
    _fill(weakref.ref(viewer), opening, tuples[1:], first=_first_layer_steps(opening, data, tuples[0]))
    return [(data, {**kwargs, "visible": False}, kind)]


def sample_read_in_turns(viewer: napari.Viewer, placeholder: tuple,
                         read: Callable[[], tuple[list[tuple], list[str]]], what: str) -> list[tuple]:
    """What a sample whose first layer's grid is known before reading returns to napari: ``placeholder``, a layer of
    that grid holding zeros (allocated lazily), added hidden in napari's call, while ``read`` (-> layer data tuples
    and warnings) runs in a worker. At the opening's first step the placeholder takes the first layer's voxels,
    contrast and metadata (napari's sample source stays), then it shows; the other layers follow a turn at a time.
    So napari's call holds neither the reading nor its imports (nibabel: ~40 ms). A first layer read on another
    grid or type replaces the placeholder; a failed read removes it and says why (an error notification)."""
    from napari.utils.notifications import show_error, show_warning

    zeros, kwargs, kind = placeholder
    viewer_ref, opening = weakref.ref(viewer), _queued(viewer, Opening())

    def arrived(tuples: list[tuple], warnings: list[str]) -> None:
        for message in warnings:
            show_warning(message)
        _fill(viewer_ref, opening, tuples[1:], first=_first_layer_steps(opening, zeros, tuples[0] if tuples else None))

    def failed(err: Exception) -> None:
        show_error(str(err) if isinstance(err, RuntimeError | ValueError | OSError) else _unexpected(what, err))
        _fill(viewer_ref, opening, [], first=_first_layer_steps(opening, zeros, None))

    _read_in_worker(read, what, arrived, failed)
    return [(zeros, {**kwargs, "visible": False}, kind)]


def _first_layer_steps(opening: Opening, added: Any, data_tuple: tuple | None) -> list[Callable[[napari.Viewer], Any]]:
    """A sample's first steps: the layer napari added in its call becomes ``data_tuple``'s (`_taker`), the view
    turns axial if it waits for that, then the layer shows as the tuple's kwargs ask."""
    first: list = []  # the first layer, once `_taker` found or made it

    def show(viewer: napari.Viewer) -> None:
        for layer in first:
            if layer in viewer.layers:
                layer.visible = data_tuple[1].get("visible", True)

    return [_taker(opening, added, data_tuple, first), _axial_if_waiting, show]


def _taker(opening: Opening, added: Any, data_tuple: tuple | None, first: list) -> Callable[[napari.Viewer], None]:
    """The step that finds the layer napari added in a sample's call (the one whose data is ``added``) and makes it
    ``data_tuple``'s layer: as it is when ``added`` is that tuple's data; else (a placeholder) the same layer given
    the tuple's voxels, contrast limits and metadata when grid and type agree, or replaced in place by a new hidden
    layer; removed when nothing was read. The layer ends in ``first``. When the user removed it meanwhile, the
    rest of the sample is not added either."""
    def take_over(viewer: napari.Viewer) -> None:
        layer = next((layer for layer in viewer.layers if layer.data is added), None)
        if layer is None:
            opening.steps = []  # the user took the sample away: its other layers do not come back
            return
        if data_tuple is None:
            viewer.layers.remove(layer)
            return
        data, kwargs, kind = data_tuple
        if data is added:
            first.append(layer)
            return
        if kind == type(layer).__name__.lower() and _same_grid(layer, data, kwargs):
            layer.metadata = kwargs.get("metadata") or {}
            layer.data = data
            if "contrast_limits" in kwargs:
                layer.contrast_limits_range = layer.contrast_limits = kwargs["contrast_limits"]
            first.append(layer)
            return
        index = viewer.layers.index(layer)
        viewer.layers.remove(layer)
        new = insert_layer(viewer, (data, {**kwargs, "visible": False}, kind))
        viewer.layers.move(viewer.layers.index(new), index)
        first.append(new)
    return take_over


def _same_grid(layer: Any, data: Any, kwargs: dict) -> bool:
    import numpy as np

    return (tuple(layer.data.shape) == tuple(data.shape) and layer.data.dtype == data.dtype
            and np.allclose(layer.scale, kwargs.get("scale", 1.0)) and np.allclose(layer.translate,
                                                                                kwargs.get("translate", 0.0)))


def adding(viewer: napari.Viewer) -> bool:
    """Whether layers of an opening are still to come into ``viewer``."""
    return bool(_queues.get(viewer))


def _queued(viewer: napari.Viewer, opening: Opening) -> Opening:
    _queues.setdefault(viewer, []).append(opening)
    return opening


def _fill(viewer_ref: weakref.ref, opening: Opening, tuples: Sequence[tuple],
          first: Sequence[Callable[[napari.Viewer], Any]] = ()) -> None:
    """The opening's steps, now that its layers are known; started when it heads its viewer's queue."""
    steps = list(first)
    if any(len(getattr(t[0], "shape", ())) == 3 for t in tuples):
        steps.append(_prepare_axial)  # a no-op unless the viewer is still empty when its turn comes
    for data_tuple in tuples:
        steps += _add_then_show(opening, data_tuple)
    if opening.then is not None:
        steps.append(lambda _: opening.then(opening.layers))
    opening.tuples, opening.steps = list(tuples), steps
    viewer = viewer_ref()
    queue = [] if viewer is None else _queues.get(viewer, [])
    if queue and queue[0] is opening:
        _schedule(viewer_ref)


def notify_unreadable(errors: list[str]) -> None:
    """One error notification per file the reader could not read (its path and the problem)."""
    from napari.utils.notifications import show_error

    for message in errors:
        show_error(f"NeuroMF reader: {message}")


def _prepare_axial(viewer: napari.Viewer) -> None:
    from napari_neuromf._viewing import view_guard

    view_guard(viewer).ready_for_volume()  # a no-op unless the viewer is still empty and 2D


def _axial_if_waiting(viewer: napari.Viewer) -> None:
    from napari_neuromf._viewing import view_guard

    view_guard(viewer).axial_if_waiting()  # a first volume that arrived hidden: its axial turn, before it shows


def insert_layer(viewer: napari.Viewer, data_tuple: tuple, hold_overlays: bool = False) -> Any:
    """A new layer from a layer data tuple, added to ``viewer`` as napari's ``add_<kind>`` does, its source set to
    its file as napari sets it for a reader's layers; with ``hold_overlays`` its editing overlays
    (`EDITING_OVERLAYS`) are held back until `_show_overlays` (an opening's next step)."""
    from napari.layers import Layer

    data, kwargs, kind = data_tuple
    with _file_source(((kwargs.get("metadata") or {}).get("nifti") or {}).get("path")):
        layer = Layer.create(data, kwargs, kind)
    overlays = getattr(layer, "_overlays", {}) if hold_overlays else {}  # napari's own (private): else none held
    held = [overlays[name] for name in EDITING_OVERLAYS if name in overlays and overlays[name].visible]
    for overlay in held:
        overlay.visible = False
    if held:
        _held_overlays[layer] = held
    viewer.layers.append(layer)
    return layer


def _show_overlays(layer: Any) -> None:
    """Let in the editing overlays `insert_layer` held back (napari builds their visuals now)."""
    for overlay in _held_overlays.pop(layer, []):
        overlay.visible = True


def _file_source(path: str | None) -> contextlib.AbstractContextManager:
    try:
        from napari.layers._source import layer_source  # napari's own: no public way to set a layer's source
    except ImportError:
        return contextlib.nullcontext()
    from napari_neuromf._viewing import PLUGIN_NAME

    return layer_source(path=str(path), reader_plugin=PLUGIN_NAME) if path else contextlib.nullcontext()


def _add_then_show(opening: Opening, data_tuple: tuple) -> list[Callable[[napari.Viewer], Any]]:
    """Two steps, three for a Labels layer: the layer added hidden (napari makes its model, visual and controls,
    and repaints its lists), its editing overlays let in (`insert_layer` held them back), then the layer shown
    (napari slices it and the canvas draws it). A layer `add` updated in place (a preview of the same name) keeps
    its visibility."""
    data, kwargs, kind = data_tuple
    new: list = []

    def add(viewer: napari.Viewer) -> None:
        before = {id(layer) for layer in viewer.layers}
        layer = opening.add(viewer, (data, {**kwargs, "visible": False}, kind))
        opening.tuples.pop(0)
        opening.layers.append(layer)
        new.append(layer if id(layer) not in before else None)

    def overlays(viewer: napari.Viewer) -> None:
        if new and new[0] is not None:
            _show_overlays(new[0])

    def show(viewer: napari.Viewer) -> None:
        if new and new[0] is not None and new[0] in viewer.layers:
            _axial_if_waiting(viewer)  # usually turned already (`_prepare_axial`, the empty viewer's own turn)
            new[0].visible = kwargs.get("visible", True)

    return [add, overlays, show] if kind == "labels" else [add, show]


def _schedule(viewer_ref: weakref.ref) -> None:
    from qtpy.QtCore import QTimer

    QTimer.singleShot(TURN_MS, lambda: _next_step(viewer_ref))


def _abandon(queue: list[Opening]) -> None:
    """Every opening of a closed viewer's queue: done, nothing more added."""
    for opening in queue:
        opening.done = True
    queue.clear()


def _next_step(viewer_ref: weakref.ref) -> None:
    """Run the next step of the viewer's first opening, then schedule the one after (also when a step raised: the
    openings behind it still come); an opening whose files are being read holds the queue until they are."""
    from napari_neuromf._viewing import viewer_window_open

    viewer = viewer_ref()
    queue = [] if viewer is None else _queues.get(viewer, [])
    if not queue or queue[0].steps is None:
        return
    if not viewer_window_open(viewer):  # closed meanwhile: napari's dims and controls no longer take layers
        _abandon(queue)
        return
    try:
        if queue[0].steps:
            queue[0].steps.pop(0)(viewer)
    except RuntimeError:  # the window closed during the step (its Qt objects are gone)
        _abandon(queue)
    finally:
        while queue and queue[0].steps == []:
            queue.pop(0).done = True
        if queue and queue[0].steps:
            _schedule(viewer_ref)


__all__ = ["EDITING_OVERLAYS", "GUI_OPENERS", "TURN_MS", "Opening", "add_in_turns", "adding", "in_gui_event_loop",
           "insert_layer", "notify_unreadable", "open_in_turns", "opened_from_the_gui", "sample_in_turns",
           "sample_read_in_turns"]
