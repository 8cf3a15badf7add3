"""Pieces the four dock widgets share: path fields, tables, layer choices, the job panel, workers, layers.

Everything here runs on the GUI thread and stays cheap: no backend import (torch, MONAI) happens at module or
widget construction; ``when_backend_ready`` imports the backend once, in a worker, and then fills defaults.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox
from napari.layers import Image, Labels, Layer
from napari.qt.threading import create_worker
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDockWidget,
    QDoubleSpinBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTabBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _environment, _jobs, _state
from napari_neuromf._jobs import start_worker
from napari_neuromf._opening import TURN_MS, add_in_turns, insert_layer
from napari_neuromf._viewing import is_view_aid

if TYPE_CHECKING:
    import napari

LAYER_TYPES: dict[str, type[Layer]] = {"image": Image, "labels": Labels}


def debounce_timer(parent: QObject, slot: Any, interval_ms: int = 200) -> QTimer:
    """A single-shot timer that calls `slot` once after a burst of `start()` calls (a form's edits, a config that
    fills ten fields): one time estimate, not one per keystroke."""
    timer = QTimer(parent)
    timer.setSingleShot(True)
    timer.setInterval(interval_ms)
    timer.timeout.connect(slot)
    return timer

def tip(widget: Any, text: str) -> Any:
    """Set a tooltip (Qt or magicgui widget) and return the widget, so forms read as one expression per row."""
    (widget.native if hasattr(widget, "native") else widget).setToolTip(text)
    return widget


class PathField(QWidget):
    """A line edit with a browse button (``mode``: "dir", "file" or "save")."""

    def __init__(self, text: str = "", mode: str = "dir", caption: str = "Choose", filter: str = "",
                 tooltip: str = "") -> None:
        super().__init__()
        self.mode, self.caption, self.filter = mode, caption, filter
        self.edit = QLineEdit(text)
        self.edit.setToolTip(tooltip or caption)
        button = QPushButton("...")
        button.setFixedWidth(30)
        button.setToolTip(f"Browse: {caption}")
        button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(button)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(text)

    def fill(self, text: str) -> None:
        """A default: only when the field is still empty (never overwrite what the user typed)."""
        if not self.text() and text:
            self.setText(text)

    def _browse(self) -> None:
        start = self.text()
        if self.mode == "dir":
            chosen = QFileDialog.getExistingDirectory(self, self.caption, start)
        elif self.mode == "save":
            chosen, _ = QFileDialog.getSaveFileName(self, self.caption, start, self.filter)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.filter)
        if chosen:
            self.setText(chosen)
            self.edit.textEdited.emit(chosen)  # a choice in the dialog counts as a user edit


DOCS = Path(__file__).resolve().parents[1] / "docs"  # in a source checkout; a wheel ships no docs


def help_link(page: str, text: str) -> QLabel:
    """A link to ``docs/<page>`` (opens in the system's viewer), or where to find it when this install has no
    docs folder: each widget starts with one."""
    path = DOCS / page
    label = QLabel(f'<a href="{path.as_uri()}">{text}</a>' if path.is_file()
                   else f"{text}: docs/{page} in the NeuroMF repository")
    label.setOpenExternalLinks(True)
    label.setToolTip(str(path))
    return label


def float_box(lo: float, hi: float, step: float, decimals: int) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(lo, hi)
    box.setSingleStep(step)
    return box


# ------------------------------------------------------------------------------------------------ tables
def make_table(headers: list[str], tooltips: list[str], multi: bool = False) -> QTableWidget:
    """A read-only table that grows with the dock: columns share the width, rows take the free height."""
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    for col, text in enumerate(tooltips):
        table.horizontalHeaderItem(col).setToolTip(text)
    table.setSelectionBehavior(QAbstractItemView.SelectRows)
    table.setSelectionMode(QAbstractItemView.ExtendedSelection if multi else QAbstractItemView.SingleSelection)
    table.setEditTriggers(QAbstractItemView.NoEditTriggers)
    header = table.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeToContents)  # short columns as narrow as their contents
    header.setStretchLastSection(True)  # the last (longest) column takes the rest and shows the rest on hover
    table.setWordWrap(False)
    table.verticalHeader().setVisible(False)
    table.setMinimumHeight(160)
    table.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
    return table


def set_row(table: QTableWidget, row: int, cells: list[str]) -> None:
    if row >= table.rowCount():
        table.setRowCount(row + 1)
    for col, text in enumerate(cells):
        item = QTableWidgetItem(text)
        item.setToolTip(text)  # a long problem text stays readable
        table.setItem(row, col, item)


def selected_rows(table: QTableWidget) -> list[int]:
    return sorted({index.row() for index in table.selectionModel().selectedRows()})


def selected_row(table: QTableWidget) -> int | None:
    rows = selected_rows(table)
    return rows[0] if rows else None


# ------------------------------------------------------------------------------------------ layer choices
def layer_choice(viewer: napari.Viewer, layer_type: type[Layer], tooltip: str, first: str | None = None,
                 keep: Callable[[Layer], bool] | None = None) -> ComboBox:
    """A magicgui ComboBox of the open layers of ``layer_type`` (``first``: an extra leading choice whose value
    is that string; ``keep``: which of them to offer), kept up to date as layers are added, removed or reordered."""

    def choices(_: Any) -> list[tuple[str, Any]]:
        found = [(layer.name, layer) for layer in viewer.layers
                 if isinstance(layer, layer_type) and not is_view_aid(layer) and (keep is None or keep(layer))]
        return [(first, first), *found] if first else found

    combo = ComboBox(choices=choices, tooltip=tooltip)
    events = (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered)

    def refresh(*_: Any) -> None:
        try:
            combo.reset_choices()
        except RuntimeError:  # the dock was closed (Qt object deleted) while the viewer lives on: let go
            for event in events:
                event.disconnect(refresh)

    # not on the combo's `destroyed` signal: a Python callback of a widget's own destruction, in a reference cycle
    # with that widget, segfaulted once in the suite (PyQt called it while the garbage collector freed the cycle)
    for event in events:
        event.connect(refresh)
    combo.reset_choices()
    return combo


def pair_mismatch(image: Any, labels: Any, atol: float = 1e-3) -> str | None:
    """Why an Image and a Labels layer are not one case (shape, scale/translate or stored affine), else None."""
    if image.data.shape != labels.data.shape:
        return f"shapes differ ({image.data.shape} vs {labels.data.shape})"
    if not (np.allclose(image.scale, labels.scale, atol=atol) and
            np.allclose(image.translate, labels.translate, atol=atol)):
        return (f"grids differ (scale {tuple(image.scale)} vs {tuple(labels.scale)}, translate "
                f"{tuple(image.translate)} vs {tuple(labels.translate)})")
    a = (image.metadata.get("nifti") or {}).get("canonical_affine")
    b = (labels.metadata.get("nifti") or {}).get("canonical_affine")
    if a is not None and b is not None and not np.allclose(a, b, atol=atol):
        return f"affines differ by up to {float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.3g} mm"
    return None


# ---------------------------------------------------------------------------------------------- workers
def launch(widget: QWidget, worker: Any) -> Any:
    """Start ``worker`` as ``widget.worker``, with ``widget.busy`` True until its ``finished`` handler ran on the
    GUI thread (a handler may already have started the widget's next worker: that one keeps it busy)."""
    widget.busy = True
    widget.worker = worker

    def finished() -> None:
        if widget.worker is not worker:
            return
        if layers_pending(widget):  # the job's last layers are still being added, one per turn
            QTimer.singleShot(TURN_MS, finished)
            return
        widget.busy = False

    worker.finished.connect(finished)
    run = getattr(widget, "run", None)
    stop = getattr(run, "cancel", None) or getattr(run, "stop", None)  # set at exit: the job ends within a step
    start_worker(worker, stop if isinstance(stop, threading.Event) else None)
    return worker


_backend_worker: Any = None
_backend_waiting: list[Callable[[_environment.Environment], None]] = []


def when_backend_ready(widget: QWidget, apply: Callable[[_environment.Environment], None]) -> None:
    """Call ``apply(environment)`` on the GUI thread once the backend is imported; sets ``widget.ready``.

    The first widget of a session starts one worker that imports torch and MONAI (seconds); every widget
    created meanwhile waits for that same worker. Later widgets get their defaults at once.
    """
    global _backend_worker
    widget.ready = False

    def done(env: _environment.Environment) -> None:
        try:
            _state.attach_state()
            apply(env)
            widget.ready = True
        except RuntimeError:  # the widget was closed before the backend was ready
            pass

    if _environment.environment_ready():
        done(_environment.environment())
        return
    _backend_waiting.append(done)
    if _backend_worker is None:
        def deliver(env: _environment.Environment) -> None:
            global _backend_worker
            waiting = list(_backend_waiting)
            _backend_waiting.clear()
            _backend_worker = None
            for callback in waiting:
                callback(env)

        _backend_worker = create_worker(_environment.environment)
        _backend_worker.returned.connect(deliver)
        start_worker(_backend_worker)


# ------------------------------------------------------------------------------------------- dock tabs
FULL_TITLES = "neuromf_full_tab_titles"  # object name of the event filter on napari's main window


def show_full_titles(bar: QTabBar) -> None:
    """Tabs as wide as their whole title (no "Gener..."), with scroll arrows when they do not all fit."""
    bar.setElideMode(Qt.ElideNone)
    bar.setUsesScrollButtons(True)


class _FullTabTitles(QObject):
    """Event filter on the main window: each tab bar Qt creates for tabified docks gets whole titles."""

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt naming)
        if event.type() == QEvent.ChildPolished and isinstance(event.child(), QTabBar):
            show_full_titles(event.child())
        return False


class _DockTitle(QObject):
    """Once its widget is docked (reparented into a QDockWidget), names the dock and sets up its window's tabs."""

    def __init__(self, widget: QWidget, title: str) -> None:
        super().__init__(widget)
        self.widget, self.title = widget, title
        widget.installEventFilter(self)

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 (Qt naming)
        if obj is self.widget and event.type() == QEvent.ParentChange:
            QTimer.singleShot(0, self.apply)  # napari docks, then tabifies, in the same call: look after both
        return False

    def apply(self) -> None:
        try:
            dock = self.widget.parentWidget()
            while dock is not None and not isinstance(dock, QDockWidget):
                dock = dock.parentWidget()
            if dock is None:
                return
            dock.setWindowTitle(self.title)
            window = dock.parentWidget()
            if isinstance(window, QMainWindow):
                full_tab_titles(window)
        except RuntimeError:  # the widget or its dock was deleted meanwhile
            pass


def full_tab_titles(window: QMainWindow) -> None:
    """Every tab bar of tabified docks in ``window`` shows whole titles, now and whenever Qt makes a new one."""
    if window.findChild(QObject, FULL_TITLES) is None:
        watcher = _FullTabTitles(window)
        watcher.setObjectName(FULL_TITLES)
        window.installEventFilter(watcher)
    for bar in window.findChildren(QTabBar, options=Qt.FindDirectChildrenOnly):
        show_full_titles(bar)


def dock_title(widget: QWidget, title: str) -> None:
    """Once ``widget`` is docked in napari's window, its tab reads ``title`` in full.

    napari titles a plugin dock "<widget> (<plugin>)"; four of those tabbed side by side were cut to "FCD ...",
    "Gener...". The dock gets the widget's own name (as in napari.yaml), and the window's dock tab bars stop
    eliding (scroll arrows appear when the tabs are wider than the dock area).
    """
    _DockTitle(widget, title)


# ------------------------------------------------------------------------------------------- job panel
class JobPanel(QWidget):
    """Progress of one job inside a widget: a bar with counts and ETA, a Cancel button, and a status line that
    shows every message in full (wrapped, selectable), so nothing is cut off in a toast."""

    def __init__(self, cancel_tip: str) -> None:
        super().__init__()
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.bar.setFormat("idle")
        self.bar.setToolTip("Progress of the running job: items done, total, and the estimated time left")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip(cancel_tip)
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.status.setToolTip("What the job is doing, and the full text of any problem")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, 1)
        row.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.status)
        self.clock: _jobs.ProgressClock | None = None

    def begin(self, message: str, total: int | None = None) -> None:
        """A job starts: an indeterminate bar until ``total`` is known."""
        self.cancel_button.setEnabled(True)
        self.status.setText(message)
        if total:
            self.count(0, total)
        else:
            self.waiting(message)

    def waiting(self, message: str) -> None:
        self.bar.setRange(0, 0)  # busy indicator: the count is not known yet
        self.status.setText(message)

    def count(self, done: int, total: int, unit: str = "items") -> None:
        if self.clock is None or self.clock.total != total or done < self.clock.done:
            self.clock = _jobs.ProgressClock(total)
        self.clock.done = done
        self.bar.setRange(0, max(1, total))
        self.bar.setValue(min(done, total))
        self.bar.setFormat(self.clock.text(unit))

    def finish(self, message: str) -> None:
        self.cancel_button.setEnabled(False)
        if self.bar.maximum() == 0:  # a job without counts: a full bar says it is over
            self.bar.setRange(0, 1)
            self.bar.setValue(1)
            self.bar.setFormat("done")
        self.status.setText(message)

    def fail(self, message: str) -> None:
        self.finish(message)
        self.bar.setFormat("failed")


def add_layers(widget: QWidget, tuples: list, then: Callable[[list], None] | None = None) -> None:
    """Add a result's layers to ``widget.viewer`` a turn of the event loop at a time, then call ``then(layers)``
    (`_opening.add_in_turns`: an empty viewer's dims first, each layer added hidden and shown a turn later).

    Added in one go, a FLAIR and its lesion into an empty viewer held the GUI thread ~0.3-0.45 s on a 2-core CPU
    (napari's dims, each layer's controls and visual, the first draw). ``launch`` keeps the widget busy until its
    layers are in, so a finished job has all its layers.
    """
    openings: list = widget.__dict__.setdefault("_openings", [])
    openings[:] = [opening for opening in openings if not opening.done]
    add = functools.partial(add_layer, hold_overlays=True)
    openings.append(add_in_turns(widget.viewer, tuples, then=then, add=add))


def layers_pending(widget: QWidget) -> bool:
    """True while ``add_layers`` still has layers of this widget to add."""
    return any(not opening.done for opening in widget.__dict__.get("_openings", []))


def pending_layer_tuples(widget: QWidget) -> list[tuple]:
    """The layer data tuples ``add_layers`` has still to add for this widget."""
    return [t for opening in widget.__dict__.get("_openings", []) if not opening.done for t in opening.tuples]


def add_layer(viewer: napari.Viewer, data_tuple: tuple, hold_overlays: bool = False) -> Layer:
    """Add a LayerDataTuple, or update the layer of the same name and type in place (previews, reloads);
    ``hold_overlays``: a new Labels layer's editing overlays wait for the opening's next step (`insert_layer`)."""
    data, kwargs, kind = data_tuple
    name = kwargs.get("name")
    if name in viewer.layers:
        layer = viewer.layers[name]
        if isinstance(layer, LAYER_TYPES[kind]) and layer.data.shape == np.shape(data):
            layer.data = data
            layer.metadata = kwargs.get("metadata", {})
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
            return layer
    return insert_layer(viewer, data_tuple, hold_overlays)
