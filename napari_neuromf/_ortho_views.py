"""Three orthogonal views: the main canvas stays axial, a dock adds linked coronal and sagittal canvases.

The approach of napari's "multiple viewer widget" example: each extra view is a ``ViewerModel`` with its own
``QtViewer`` (canvas and slider). Every layer of the main viewer is mirrored into both (the same data array, its
display properties kept in sync), and the current point is shared in world millimetres, so the three views
always cross at the same voxel: moving a slider in any view moves the others' crossing point.

Orientation follows ``_viewing``: canonical RAS arrays, screen directions set through napari's camera.
Coronal: superior up, the patient's right on the screen's left (radiological) or right (neurological).
Sagittal: superior up, anterior on the screen's left (as both conventions show it).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

from napari.components import ViewerModel
from napari.layers import Labels, Layer
from napari.qt import QtViewer
from napari.utils.events.event import WarningEmitter
from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import QSplitter

from napari_neuromf._viewing import AXIS_LABELS, CONVENTIONS, NEUROLOGICAL, RADIOLOGICAL

if TYPE_CHECKING:
    import napari

CORONAL, SAGITTAL = "coronal", "sagittal"
PLANES = {CORONAL: (1, 2, 0), SAGITTAL: (0, 2, 1)}  # dims order: slice along A (rows S, columns R) / along R
# (vertical, horizontal) screen directions in which the displayed axes increase
SCREEN = {(CORONAL, RADIOLOGICAL): ("up", "left"), (CORONAL, NEUROLOGICAL): ("up", "right"),
          (SAGITTAL, RADIOLOGICAL): ("up", "left"), (SAGITTAL, NEUROLOGICAL): ("up", "left")}
CAPTIONS = {(CORONAL, RADIOLOGICAL): "Coronal · radiological\nscreen left = patient Right (R), right = Left (L)\n"
                                     "top = Superior (S), bottom = Inferior (I)",
            (CORONAL, NEUROLOGICAL): "Coronal · neurological\nscreen left = patient Left (L), right = Right (R)\n"
                                     "top = Superior (S), bottom = Inferior (I)",
            (SAGITTAL, RADIOLOGICAL): "Sagittal\nscreen left = Anterior (A), right = Posterior (P)\n"
                                      "top = Superior (S), bottom = Inferior (I)"}
CAPTIONS[(SAGITTAL, NEUROLOGICAL)] = CAPTIONS[(SAGITTAL, RADIOLOGICAL)]
# layer events not mirrored: the name follows by position, the data has its own handler, mirrors stay in
# pan/zoom mode (painting happens in the main view), the rest is per-canvas state
NOT_MIRRORED = {"name", "data", "mode", "thumbnail", "cursor", "cursor_size", "status", "help", "loaded", "extent"}


def mirrored_properties(layer: Layer) -> list[str]:
    """The layer's settable display properties that have an event (contrast, colormap, opacity, visibility ...)."""
    names = []
    for name, emitter in layer.events.emitters.items():
        attribute = getattr(type(layer), name, None)
        if (name not in NOT_MIRRORED and not name.startswith("_") and not isinstance(emitter, WarningEmitter)
                and isinstance(attribute, property) and attribute.fset is not None):
            names.append(name)
    return names


def mirror_of(layer: Layer) -> Layer:
    """A layer showing the same data array as ``layer``, with its display state."""
    return Layer.create(*layer.as_layer_data_tuple())


class _CloseWatcher(QObject):
    """Closes the views when napari's main window closes: a docked widget gets no close event of its own, and
    an extra QtViewer must release its canvas."""

    def __init__(self, views: OrthoViews) -> None:
        super().__init__(views)
        self.views = views

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt naming)
        if event.type() == QEvent.Close:
            self.views.close_views()
        return False


class OrthoViews(QSplitter):
    """Coronal and sagittal views of the main viewer's layers, linked to its current point (a dock widget)."""

    closed = Signal()  # the views were closed (turned off, or the dock's close button)

    def __init__(self, viewer: napari.Viewer, convention: str = RADIOLOGICAL) -> None:
        super().__init__(Qt.Horizontal)
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.viewer, self.convention = viewer, convention
        self.models = {plane: ViewerModel(title=plane) for plane in PLANES}
        self.qt_viewers = {plane: QtViewer(model, show_welcome_screen=False) for plane, model in self.models.items()}
        for qt_viewer in self.qt_viewers.values():
            self.addWidget(qt_viewer)
        self.dock: Any = None
        self._open = True
        self._syncing = False
        self._connections: list[tuple[Any, Any]] = []  # (emitter, callback) pairs to disconnect on close
        self._watched_window: Any = None
        self._watcher = _CloseWatcher(self)

        layers = viewer.layers
        self._connect(layers.events.inserted, self._layer_inserted)
        self._connect(layers.events.removed, self._layer_removed)
        self._connect(layers.events.moved, self._layer_moved)
        self._connect(viewer.dims.events.point, self._point_changed)
        self._connect(viewer.events.reset_view, self._reset_view)
        for model in self.models.values():
            self._connect(model.dims.events.point, self._point_changed)
            self._connect(model.events.status, self._status_changed)
        for index, layer in enumerate(layers):
            self._mirror(index, layer)
        self._orient()

    # -- lifetime -------------------------------------------------------------------------------------------
    def show_in(self, area: str = "bottom") -> Any:
        """Dock the views in napari's window (``area``: where napari puts the dock); returns the dock."""
        self.dock = self.viewer.window.add_dock_widget(self, name="Orthogonal views", area=area)
        window = self.dock.window()
        if window is not None:
            window.installEventFilter(self._watcher)
            self._watched_window = window
        for model in self.models.values():
            model.reset_view()
        return self.dock

    def close_views(self) -> None:
        """Remove the dock, stop mirroring and release both canvases (idempotent)."""
        if not self._open:
            return
        self._open = False
        for emitter, callback in self._connections:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                emitter.disconnect(callback)
        self._connections.clear()
        if self._watched_window is not None:
            with contextlib.suppress(RuntimeError):
                self._watched_window.removeEventFilter(self._watcher)
            self._watched_window = None
        dock, self.dock = self.dock, None
        if dock is not None and self.parent() is not None:
            with contextlib.suppress(LookupError, RuntimeError, AttributeError):
                self.viewer.window.remove_dock_widget(dock)
        for model in self.models.values():
            model.layers.clear()
        for qt_viewer in self.qt_viewers.values():
            qt_viewer.close()  # its closeEvent deletes the vispy canvas
            qt_viewer.deleteLater()
        self.deleteLater()
        self.closed.emit()

    def event(self, event: Any) -> bool:
        """The dock's own close button takes the views out of the window: close them as if turned off."""
        if event.type() == QEvent.ParentChange and self.parent() is None and self._open and self.dock is not None:
            self.dock = None  # napari already removed it
            self.close_views()
        return super().event(event)

    def _connect(self, emitter: Any, callback: Any) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    # -- orientation ------------------------------------------------------------------------------------------
    def set_convention(self, convention: str) -> None:
        """Show the coronal view in ``convention`` too (the sagittal one looks the same in both)."""
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.convention = convention
        self._orient()

    def _orient(self) -> None:
        for plane, model in self.models.items():
            caption = model.canvas.overlays.text
            caption.text = CAPTIONS[(plane, self.convention)]
            caption.position = "top_left"
            caption.visible = True
            if model.dims.ndim != 3:  # only volumes have an anatomical orientation
                continue
            model.dims.axis_labels = AXIS_LABELS
            model.dims.order = PLANES[plane]
            vertical, horizontal = SCREEN[(plane, self.convention)]
            model.scene.camera.orientation = ("towards", vertical, horizontal)

    # -- layers -----------------------------------------------------------------------------------------------
    def _mirror(self, index: int, layer: Layer) -> None:
        mirrors = []
        for model in self.models.values():
            mirror = mirror_of(layer)
            mirror.mode = "pan_zoom"
            model.layers.insert(index, mirror)
            mirrors.append(mirror)
        for name in mirrored_properties(layer):
            self._connect(getattr(layer.events, name), functools.partial(self._sync_property, name))
        self._connect(layer.events.data, self._sync_data)
        self._connect(layer.events.name, self._sync_name)
        if isinstance(layer, Labels):  # painted in the main view: the mirrors share the array, redraw them
            self._connect(layer.events.paint, self._refresh_mirrors)
        self._orient()
        self._point_changed(None)

    def _layer_inserted(self, event: Any) -> None:
        was_empty = all(len(model.layers) == 0 for model in self.models.values())
        self._mirror(event.index, event.value)
        if was_empty:
            for model in self.models.values():
                model.reset_view()

    def _layer_removed(self, event: Any) -> None:
        layer = event.value
        for emitter, callback in [(e, c) for e, c in self._connections if getattr(e, "source", None) is layer]:
            emitter.disconnect(callback)
            self._connections.remove((emitter, callback))
        for model in self.models.values():
            model.layers.pop(event.index)

    def _layer_moved(self, event: Any) -> None:
        destination = event.new_index if event.new_index < event.index else event.new_index + 1
        for model in self.models.values():
            model.layers.move(event.index, destination)

    def _mirrors(self, layer: Layer) -> list[Layer]:
        if layer not in self.viewer.layers:
            return []
        index = self.viewer.layers.index(layer)
        return [model.layers[index] for model in self.models.values() if index < len(model.layers)]

    def _sync_property(self, name: str, event: Any) -> None:
        for mirror in self._mirrors(event.source):
            with contextlib.suppress(ValueError, TypeError, AttributeError):  # a property a mirror cannot take
                setattr(mirror, name, getattr(event.source, name))

    def _sync_data(self, event: Any) -> None:
        for mirror in self._mirrors(event.source):
            mirror.data = event.source.data

    def _sync_name(self, event: Any) -> None:
        for mirror in self._mirrors(event.source):
            mirror.name = event.source.name

    def _refresh_mirrors(self, event: Any) -> None:
        for mirror in self._mirrors(event.source):
            mirror.refresh()

    # -- the shared point -------------------------------------------------------------------------------------
    def _point_changed(self, event: Any) -> None:
        """Copy the current point (world mm) from the view that moved to the others."""
        if self._syncing:
            return
        source = event.source if event is not None else self.viewer.dims
        self._syncing = True
        try:
            for dims in (self.viewer.dims, *(model.dims for model in self.models.values())):
                if dims is not source and dims.ndim == source.ndim:
                    dims.point = source.point
        finally:
            self._syncing = False

    def _reset_view(self, event: Any = None) -> None:
        for model in self.models.values():
            model.reset_view()

    def _status_changed(self, event: Any) -> None:
        self.viewer.status = event.value


__all__ = ["CORONAL", "PLANES", "SAGITTAL", "OrthoViews"]
