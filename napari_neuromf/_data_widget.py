"""FCD data dock widget: scan a data set, check its cases, open one as FLAIR + lesion, register open layers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _environment, _state
from napari_neuromf._helpers import (
    JobPanel,
    PathField,
    add_layers,
    dock_title,
    help_link,
    launch,
    layer_choice,
    make_table,
    pair_mismatch,
    selected_row,
    set_row,
    tip,
    when_backend_ready,
)
from napari_neuromf._layers import LayerDataError, case_layers, write_layer
from napari_neuromf._viewing import (
    CONVENTIONS,
    RADIOLOGICAL,
    current_convention,
    go_to_lesion,
    show_axial,
    view_guard,
)

if TYPE_CHECKING:
    import napari


class FCDDataWidget(QWidget):
    """Browse a dataset (BIDS or flat), check its cases, load one as FLAIR + lesion overlay, register new ones."""

    TITLE = "FCD data"  # as in napari.yaml: the dock tab's text

    HEADERS = ["case", "group", "split", "voxels", "mm", "lesion cm³", "problems"]
    HEADER_TIPS = ["Subject or case name", "fcd = patient with a lesion, hc = healthy control",
                   "Which part of the data set the case belongs to (train / test)",
                   "Number of voxels along each axis", "Size of one voxel in millimetres along each axis",
                   "Lesion volume in cubic centimetres", "Why a case may be unusable or need a look"]

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        view_guard(napari_viewer)  # axial view, caption and orientation letters for every volume added
        self.busy = False  # a worker of this widget is running
        self.cases: list = []  # neuromf.io.bids.Case, in table order
        self.worker = None

        self.folder = PathField("", "dir", "Dataset folder (BIDS tree or flat folder)",
                                tooltip="A BIDS tree (sub-*/anat/*_FLAIR.nii.gz + *_roi masks) or a flat folder of "
                                        "*_FLAIR.nii.gz files with *_roi.nii.gz masks")
        self.scan_button = tip(QPushButton("Scan"), "List the cases in the folder and check each one "
                                                    "(shape, voxel size, lesion volume, problems)")
        self.scan_button.clicked.connect(self.scan)
        self.table = make_table(self.HEADERS, self.HEADER_TIPS)
        self.table.doubleClicked.connect(lambda _: self.load_selected())
        self.load_button = tip(QPushButton("Open selected case"),
                               "Open the selected case as a FLAIR image with its lesion on top (or double-click "
                               "a row)")
        self.load_button.clicked.connect(self.load_selected)
        self.contour = tip(QCheckBox("lesion as outline"), "Draw lesions as an outline so the FLAIR under them "
                                                           "stays visible")
        self.contour.toggled.connect(self._apply_contour)
        self.convention = tip(QComboBox(), "Radiological: the patient's right on the left of the screen (as read "
                                           "in radiology). Neurological: the patient's right on the right")
        self.convention.addItems([c.capitalize() for c in CONVENTIONS])
        self.convention.currentTextChanged.connect(self.apply_view)
        self.convention.activated.connect(self.apply_view)  # re-choosing the shown convention restores it
        self.three_views = tip(QCheckBox("three views"), "Also show coronal and sagittal views (in a dock below the "
                                                         "canvas), linked to the axial view: they cross at the same "
                                                         "point, and a slider in any view moves it in all three")
        self.three_views.toggled.connect(self.show_three_views)
        self.ortho: Any = None  # the OrthoViews dock while three views are shown
        self.job = JobPanel("Stop scanning, opening or writing after the current case")
        self.job.cancel_button.clicked.connect(self.cancel)

        self.image_layer = layer_choice(napari_viewer, Image, "The open FLAIR image to save as a case")
        self.labels_layer = layer_choice(napari_viewer, Labels, "The open lesion labels (e.g. painted with "
                                                                "napari's brush) that belong to that FLAIR")
        self.case_id = tip(QLineEdit("my_case_001"), "Name of the new case: letters, digits, - and _ (no spaces)")
        self.register_folder = PathField("", "dir", "Folder for registered cases",
                                         tooltip="Where the case's two NIfTI files are written; the folder can then "
                                                 "be scanned here and used for training")
        self.register_button = tip(QPushButton("Save open layers as a case"),
                                   "Write the chosen FLAIR and lesion as <case>_FLAIR.nii.gz and "
                                   "<case>_FLAIR_roi.nii.gz, then scan that folder")
        self.register_button.clicked.connect(self.register_open_layers)

        form = QFormLayout()
        form.addRow("Data folder", self.folder)
        layout = QVBoxLayout(self)
        layout.addWidget(help_link("user_guide.md", "Help: opening and viewing cases"))
        layout.addLayout(form)
        layout.addWidget(self.scan_button)
        layout.addWidget(self.table, 1)  # the table takes the dock's free height
        row = QHBoxLayout()
        row.addWidget(self.load_button)
        row.addWidget(self.contour)
        layout.addLayout(row)
        view = QHBoxLayout()
        view.addWidget(QLabel("View"))
        view.addWidget(self.convention, 1)
        view.addWidget(self.three_views)
        layout.addLayout(view)
        layout.addWidget(self.job)
        box = QGroupBox("Save open layers as a new case")
        box_form = QFormLayout(box)
        box_form.addRow("FLAIR image", self.image_layer.native)
        box_form.addRow("Lesion labels", self.labels_layer.native)
        box_form.addRow("Case name", self.case_id)
        box_form.addRow("Save into", self.register_folder)
        box_form.addRow(self.register_button)
        layout.addWidget(box)
        dock_title(self, self.TITLE)
        when_backend_ready(self, self._fill_defaults)

    def _fill_defaults(self, env: _environment.Environment) -> None:
        state = _state.STATE
        self.folder.fill(str(state.last_data_dir) if state.last_data_dir else env.phantom_root)
        self.register_folder.fill(str(_state.user_folder() / "my_cases"))

    # -- view ---------------------------------------------------------------------------------------------
    def apply_view(self, *_: Any) -> None:
        """Axial view in the chosen convention (radiological unless the user picked neurological)."""
        convention = self.convention.currentText().lower()
        show_axial(self.viewer, convention)
        if self.ortho is not None:
            self.ortho.set_convention(convention)

    def show_three_views(self, on: bool) -> None:
        """Axial in the main canvas plus linked coronal and sagittal views in a dock (``on``), or the main view
        alone again."""
        from napari_neuromf._ortho_views import OrthoViews

        if on and self.ortho is None:
            self.apply_view()  # the main canvas is the axial one of the three
            try:
                self.ortho = OrthoViews(self.viewer, self.convention.currentText().lower())
                self.ortho.closed.connect(self._three_views_closed)
                self.ortho.show_in("bottom")
            except Exception as err:  # a canvas that cannot be created (no OpenGL): say so, keep one view
                message = f"FCD data: cannot show three views: {err}"
                show_error(message)
                self.job.fail(message)
                if self.ortho is not None:
                    self.ortho.close_views()
                self._three_views_closed()
        elif not on and self.ortho is not None:
            self.ortho.close_views()

    def _three_views_closed(self) -> None:
        self.ortho = None
        self.three_views.blockSignals(True)
        self.three_views.setChecked(False)
        self.three_views.blockSignals(False)

    def _view_after_adding(self, lesion: Any = None) -> None:
        if current_convention(self.viewer) is None or len(view_guard(self.viewer).volumes()) <= 2:
            self.apply_view()  # a first case, or the user moved away from axial: back to the chosen axial view
            view_guard(self.viewer).fit_to()
        if lesion is not None and lesion.data.any():
            go_to_lesion(self.viewer, lesion)

    # -- jobs -----------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        if self.busy and self.worker is not None:
            self.worker.quit()  # a scan stops at its next yield, i.e. after the current case
        self.job.finish("Cancelled")

    def _start(self, body: Any, *args: Any, message: str) -> Any:
        self.job.begin(message)
        return create_worker(body, *args)

    # -- scanning -----------------------------------------------------------------------------------------
    def scan(self) -> Any:
        """Discover cases and check each one in a worker; rows appear one by one."""
        folder = self.folder.text()
        if not folder:
            show_error("FCD data: choose a dataset folder first")
            return None
        if self.busy:
            show_warning("FCD data: wait for the current job or press Cancel")
            return None
        self.cases = []
        self.table.setRowCount(0)
        worker = self._start(scan_rows, Path(folder), message=f"Scanning {folder} ...")
        worker.yielded.connect(self._on_scan_item)
        worker.finished.connect(lambda: self._scan_finished(folder))
        return launch(self, worker)

    def _on_scan_item(self, item: tuple) -> None:
        kind, payload = item
        if kind == "error":
            show_error(f"FCD data: {payload}")
            self.job.fail(f"FCD data: {payload}")
        elif kind == "cases":
            self.cases, skipped = payload
            for i, case in enumerate(self.cases):
                set_row(self.table, i, [case.case_id, case.group, case.split, "…", "…", "…", "checking"])
            for i, row in enumerate(skipped, start=len(self.cases)):  # after the cases: row i < len(cases) loads
                self._show_row(i, row)
            self.job.count(0, len(self.cases), "cases checked")
        else:
            i, row = payload
            self._show_row(i, row)
            self.job.count(i + 1, len(self.cases), "cases checked")

    def _scan_finished(self, folder: str) -> None:
        if self.job.bar.format() != "failed" and not self.worker.abort_requested:
            self.job.finish(f"{len(self.cases)} cases in {folder}")
            if self.cases:
                _state.STATE.remember(last_data_dir=folder)

    def _show_row(self, i: int, row: dict) -> None:
        shape, spacing, lesion = row.get("shape"), row.get("spacing"), row.get("lesion_cm3")
        problems = "; ".join(row.get("problems") or []) or "-"
        if row.get("usable") is False:
            problems = f"UNUSABLE: {problems}"
        set_row(self.table, i, [
            str(row.get("id")), str(row.get("group")), str(row.get("split")), compact(shape, "{}", "³"),
            compact(spacing, "{:.2g}"), f"{lesion:.2f}" if lesion is not None else "-", problems])

    # -- loading ------------------------------------------------------------------------------------------
    def load_selected(self) -> Any:
        row = selected_row(self.table)
        if row is None or row >= len(self.cases):
            show_warning("FCD data: select a case in the table first")
            return None
        return self.load_case(self.cases[row])

    def load_case(self, case: Any) -> Any:
        """Read the FLAIR and its lesion in a worker; they appear as Image + Labels on the same grid."""
        if self.busy:
            show_warning("FCD data: wait for the current job or press Cancel")
            return None
        worker = self._start(read_case, case, message=f"Opening {case.case_id} ...")
        worker.returned.connect(self._add_case)
        return launch(self, worker)

    def _add_case(self, out: tuple) -> None:
        case_id, tuples, problems, error = out
        if error:
            show_error(f"FCD data: {error}")
            self.job.fail(f"FCD data: {error}")
            return
        for problem in problems:
            show_warning(f"FCD data: {problem}")

        def opened(layers: list) -> None:
            self._apply_contour()
            self._view_after_adding(next((layer for layer in layers if isinstance(layer, Labels)), None))
            self.job.finish(f"Opened {case_id}" + (f" ({'; '.join(problems)})" if problems else ""))

        add_layers(self, tuples, opened)

    def _apply_contour(self, *_: Any) -> None:
        width = 1 if self.contour.isChecked() else 0
        for layer in self.viewer.layers:
            if isinstance(layer, Labels) and (layer.metadata.get("neuromf") or {}).get("role") == "lesion":
                layer.contour = width

    # -- registering open layers --------------------------------------------------------------------------
    def register_open_layers(self) -> Any:
        """Write the chosen Image + Labels as ``<id>_FLAIR.nii.gz`` + ``<id>_FLAIR_roi.nii.gz``, then rescan."""
        image, labels = self.image_layer.value, self.labels_layer.value
        case_id = self.case_id.text().strip()
        if image is None or labels is None:
            show_error("FCD data: open an image layer and a labels layer first")
            return None
        if not case_id or any(c in case_id for c in "/\\ "):
            show_error(f"FCD data: case name {case_id!r} must be a non-empty name without spaces or slashes")
            return None
        problem = pair_mismatch(image, labels)
        if problem:
            show_error(f"FCD data: cannot register {image.name!r} + {labels.name!r}: {problem}")
            return None
        if self.busy:
            show_warning("FCD data: wait for the current job or press Cancel")
            return None
        folder = Path(self.register_folder.text() or _state.user_folder() / "my_cases")
        # snapshots: the user may keep painting while the files are written
        layers = [(np.array(layer.data), layer.as_layer_data_tuple()[1]) for layer in (image, labels)]
        worker = self._start(write_case, folder, case_id, layers, message=f"Writing {case_id} into {folder} ...")
        worker.returned.connect(lambda out: self._registered(folder, case_id, out))
        return launch(self, worker)

    def _registered(self, folder: Path, case_id: str, out: Any) -> None:
        if isinstance(out, str):
            show_error(out)
            self.job.fail(out)
            return
        self.folder.setText(str(folder))
        self.busy = False  # the rescan's worker replaces this one (whose finished handler then changes nothing)
        self.scan()


# ---------------------------------------------------------------------------------------------- worker bodies
def scan_rows(folder: Path):
    """Worker body: ("cases", (cases, skipped subjects)) once, then ("row", (index, case_report)) per case."""
    from neuromf.io.bids import DataError, case_report, discover_cases

    skipped: list[dict] = []  # broken subjects (ROI without FLAIR, 2D image): shown as rows, not an error
    try:
        cases = discover_cases(folder, skipped=skipped)
    except (DataError, ValueError, OSError) as err:
        yield "error", str(err)
        return
    yield "cases", (cases, skipped)
    for i, case in enumerate(cases):
        try:
            yield "row", (i, case_report(case))
        except Exception as err:  # one bad case must not stop the scan
            yield "row", (i, {"id": case.case_id, "group": case.group, "split": case.split, "usable": False,
                              "problems": [f"{case.image.name}: {err}"]})


def read_case(case: Any) -> tuple[str, list, list[str], str | None]:
    """Worker body: (case id, layer tuples, problems, error) of one case."""
    try:
        tuples, problems = case_layers(case.image, case.mask, case.case_id)
    except LayerDataError as err:
        return case.case_id, [], [], str(err)
    return case.case_id, tuples, problems, None


def write_case(folder: Path, case_id: str, layers: list[tuple[Any, dict]]) -> list[Path] | str:
    """Worker body: the two NIfTI files of a registered case, or the message of what went wrong."""
    try:
        return [write_layer(folder / f"{case_id}{suffix}.nii.gz", data, state)
                for suffix, (data, state) in zip(("_FLAIR", "_FLAIR_roi"), layers, strict=True)]
    except (LayerDataError, OSError, ValueError) as err:
        return f"FCD data: cannot write case {case_id} into {folder}: {err}"


def compact(values: Any, fmt: str, same: str = "") -> str:
    """``64³`` / ``3`` for equal values (isotropic), ``0.9x0.9x3`` otherwise; ``-`` when unknown."""
    if not values:
        return "-"
    texts = [fmt.format(v) for v in values]
    return texts[0] + same if len(set(texts)) == 1 else "x".join(texts)


__all__ = ["RADIOLOGICAL", "FCDDataWidget", "pair_mismatch"]
