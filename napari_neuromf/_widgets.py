"""Dock widgets: FCD data, Mask-VAE test, LoRA fine-tuning, Generate.

Thin by design (napari-plugin-template / micro-sam style): each widget reads its form, calls the backend through
the Qt-free run objects of ``_session``, and shows the results. Long work runs in napari thread workers that only
call the backend; layers, tables and plots change in the yielded/returned handlers, on the GUI thread. Bad input
and failures become napari notifications that name the file and the problem.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _session
from napari_neuromf._layers import (
    LayerDataError,
    case_layers,
    layer_tuple,
    pair_layers,
    write_layer,
)
from napari_neuromf._session import STATE, Failure, format_eta

if TYPE_CHECKING:
    import napari


# ------------------------------------------------------------------------------------------------ helpers
REFRESH_S = 0.5  # GUI refresh interval during training
GENERATION_MODES = ("joint", "conditional")
PRIOR_LESION = "drawn from the training lesions"

def _phantom_root() -> str:
    try:
        from neuromf.weights import sample_data_root

        return str(sample_data_root() / "fcd_phantoms")
    except FileNotFoundError:
        return ""


def _output_root() -> Path:
    from neuromf.utils import default_output_root

    return default_output_root()


def _devices() -> list[str]:
    import torch

    return ["auto", *(f"cuda:{i}" for i in range(torch.cuda.device_count())), "cpu"]


class PathField(QWidget):
    """A line edit with a browse button (``mode``: "dir", "file" or "save")."""

    def __init__(self, text: str = "", mode: str = "dir", caption: str = "Choose", filter: str = "") -> None:
        super().__init__()
        self.mode, self.caption, self.filter = mode, caption, filter
        self.edit = QLineEdit(text)
        button = QPushButton("...")
        button.setFixedWidth(30)
        button.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(button)

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(text)

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


def _table(headers: list[str]) -> QTableWidget:
    table = QTableWidget(0, len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.setSelectionBehavior(QAbstractItemView.SelectRows)
    table.setSelectionMode(QAbstractItemView.SingleSelection)
    table.setEditTriggers(QAbstractItemView.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
    table.horizontalHeader().setStretchLastSection(True)
    table.setMinimumHeight(160)
    return table


def _set_row(table: QTableWidget, row: int, cells: list[str]) -> None:
    if row >= table.rowCount():
        table.setRowCount(row + 1)
    for col, text in enumerate(cells):
        table.setItem(row, col, QTableWidgetItem(text))


def _selected_row(table: QTableWidget) -> int | None:
    rows = sorted({index.row() for index in table.selectionModel().selectedRows()})
    return rows[0] if rows else None


def launch(widget: QWidget, worker: Any) -> Any:
    """Start ``worker`` with ``widget.busy`` True until its ``finished`` handler ran on the GUI thread."""
    widget.busy = True

    def finished() -> None:
        widget.busy = False

    worker.finished.connect(finished)
    worker.start()
    return worker


def add_layer(viewer: napari.Viewer, data_tuple: tuple) -> Any:
    """Add a LayerDataTuple, or update the layer of the same name and type in place (previews, reloads)."""
    data, kwargs, kind = data_tuple
    name = kwargs.get("name")
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer._type_string == kind and layer.data.shape == np.shape(data):
            layer.data = data
            layer.metadata = kwargs.get("metadata", {})
            layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
            return layer
    return getattr(viewer, f"add_{kind}")(data, **kwargs)


# ------------------------------------------------------------------------------------------------ FCD data
class FCDDataWidget(QWidget):
    """Browse a dataset (BIDS or flat), check its cases, load one as FLAIR + lesion overlay, register new ones."""

    HEADERS = ["id", "group", "split", "shape", "spacing (mm)", "lesion cm³", "problems"]

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.busy = False  # a worker of this widget is running
        self.cases: list = []  # neuromf.io.bids.Case, in table order
        self.worker = None

        self.folder = PathField(_phantom_root(), "dir", "Dataset folder (BIDS tree or flat folder)")
        self.scan_button = QPushButton("Scan")
        self.scan_button.clicked.connect(self.scan)
        self.table = _table(self.HEADERS)
        self.table.doubleClicked.connect(lambda _: self.load_selected())
        self.load_button = QPushButton("Load selected case")
        self.load_button.clicked.connect(self.load_selected)
        self.contour = QCheckBox("lesion as contour")
        self.contour.toggled.connect(self._apply_contour)

        self.image_layer = QComboBox()
        self.labels_layer = QComboBox()
        self.case_id = QLineEdit("my_case_001")
        self.register_folder = PathField(str(_output_root() / "my_cases"), "dir", "Folder for registered cases")
        self.register_button = QPushButton("Register open layers as a case")
        self.register_button.clicked.connect(self.register_open_layers)

        form = QFormLayout()
        form.addRow("Dataset", self.folder)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.scan_button)
        layout.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(self.load_button)
        row.addWidget(self.contour)
        layout.addLayout(row)
        box = QGroupBox("Register open layers as a case")
        box_form = QFormLayout(box)
        box_form.addRow("FLAIR image", self.image_layer)
        box_form.addRow("lesion labels", self.labels_layer)
        box_form.addRow("case id", self.case_id)
        box_form.addRow("save into", self.register_folder)
        box_form.addRow(self.register_button)
        layout.addWidget(box)
        layout.addStretch(1)

        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                      self.viewer.layers.events.reordered):
            event.connect(self._refresh_layer_choices)
        self._refresh_layer_choices()

    # -- scanning -----------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Discover cases (GUI thread, headers only), then check each one in a worker, row by row."""
        from neuromf.io.bids import DataError, discover_cases

        folder = self.folder.text()
        if not folder:
            show_error("FCD data: choose a dataset folder first")
            return
        skipped: list[dict] = []  # broken subjects (ROI without FLAIR, 2D image): shown as rows, not an error
        try:
            cases = discover_cases(Path(folder), skipped=skipped)
        except (DataError, ValueError, OSError) as err:
            show_error(f"FCD data: {err}")
            return
        self.cases = cases
        self.table.setRowCount(0)
        for i, case in enumerate(cases):
            _set_row(self.table, i, [case.case_id, case.group, case.split, "…", "…", "…", "checking"])
        for i, row in enumerate(skipped, start=len(cases)):  # after the cases: row index i < len(cases) loads
            self._show_row((i, row))
        self.worker = create_worker(_report_rows, cases, _progress={"total": len(cases), "desc": "Checking cases"})
        self.worker.yielded.connect(self._show_row)
        launch(self, self.worker)

    def _show_row(self, item: tuple[int, dict]) -> None:
        i, row = item
        shape, spacing, lesion = row.get("shape"), row.get("spacing"), row.get("lesion_cm3")
        problems = "; ".join(row.get("problems") or []) or "-"
        if row.get("usable") is False:
            problems = f"UNUSABLE: {problems}"
        _set_row(self.table, i, [
            str(row.get("id")), str(row.get("group")), str(row.get("split")),
            "x".join(map(str, shape)) if shape else "-",
            "x".join(f"{s:.2f}" for s in spacing) if spacing else "-",
            f"{lesion:.2f}" if lesion is not None else "-", problems])

    # -- loading ------------------------------------------------------------------------------------------
    def load_selected(self) -> list:
        row = _selected_row(self.table)
        if row is None or row >= len(self.cases):
            show_warning("FCD data: select a case in the table first")
            return []
        return self.load_case(self.cases[row])

    def load_case(self, case: Any) -> list:
        """FLAIR as Image + lesion as Labels (opacity 0.5), same scale and translate; returns the layers."""
        try:
            tuples, problems = case_layers(case.image, case.mask, case.case_id)
        except LayerDataError as err:
            show_error(f"FCD data: {err}")
            return []
        for problem in problems:
            show_warning(f"FCD data: {problem}")
        layers = [add_layer(self.viewer, t) for t in tuples]
        self._apply_contour()
        return layers

    def _apply_contour(self, *_: Any) -> None:
        width = 1 if self.contour.isChecked() else 0
        for layer in self.viewer.layers:
            if layer._type_string == "labels" and (layer.metadata.get("neuromf") or {}).get("role") == "lesion":
                layer.contour = width

    # -- registering open layers --------------------------------------------------------------------------
    def _refresh_layer_choices(self, *_: Any) -> None:
        try:
            self._fill_layer_choices()
        except RuntimeError:  # the dock was closed (Qt object deleted) while the viewer lives on
            for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                          self.viewer.layers.events.reordered):
                event.disconnect(self._refresh_layer_choices)

    def _fill_layer_choices(self) -> None:
        for combo, kind in ((self.image_layer, "image"), (self.labels_layer, "labels")):
            current = combo.currentText()
            combo.clear()
            names = [layer.name for layer in self.viewer.layers if layer._type_string == kind]
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)

    def register_open_layers(self) -> list[Path]:
        """Write the chosen Image + Labels as ``<id>_FLAIR.nii.gz`` + ``<id>_FLAIR_roi.nii.gz`` and rescan."""
        image_name, labels_name = self.image_layer.currentText(), self.labels_layer.currentText()
        case_id = self.case_id.text().strip()
        if not image_name or not labels_name:
            show_error("FCD data: open an image layer and a labels layer first")
            return []
        if not case_id or any(c in case_id for c in "/\\ "):
            show_error(f"FCD data: case id {case_id!r} must be a non-empty name without spaces or slashes")
            return []
        image, labels = self.viewer.layers[image_name], self.viewer.layers[labels_name]
        problem = pair_mismatch(image, labels)
        if problem:
            show_error(f"FCD data: cannot register {image_name!r} + {labels_name!r}: {problem}")
            return []
        folder = Path(self.register_folder.text() or _output_root() / "my_cases")
        try:
            paths = [write_layer(folder / f"{case_id}_FLAIR.nii.gz", *image.as_layer_data_tuple()[:2]),
                     write_layer(folder / f"{case_id}_FLAIR_roi.nii.gz", *labels.as_layer_data_tuple()[:2])]
        except (LayerDataError, OSError, ValueError) as err:
            show_error(f"FCD data: cannot write case {case_id} into {folder}: {err}")
            return []
        show_info(f"FCD data: registered {case_id} in {folder}")
        self.folder.setText(str(folder))
        self.scan()
        return paths


def _report_rows(cases: list):
    """Worker body: (row index, case_report) for each case."""
    from neuromf.io.bids import case_report

    for i, case in enumerate(cases):
        try:
            yield i, case_report(case)
        except Exception as err:  # one bad case must not stop the scan
            yield i, {"id": case.case_id, "group": case.group, "split": case.split, "usable": False,
                      "problems": [f"{case.image.name}: {err}"]}


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


# ------------------------------------------------------------------------------------------ Mask-VAE test
class MaskTestWidget(QWidget):
    """Can the image VAE carry the lesion mask? Dice per case for strategy A (VAE) vs B (downsampled)."""

    HEADERS = ["id", "lesion cm³", "size bin", "Dice A (VAE)", "B nearest", "B area", "B max"]

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.busy = False  # a worker of this widget is running
        self.run: _session.MaskTestRun | None = None
        self.worker = None

        self.vae_source = QComboBox()
        self.vae_source.addItems(["embedded", "local MAISI file"])
        self.vae_file = PathField("", "file", "MAISI VAE weights", "Weights (*.pt *.pth *.safetensors);;All (*)")
        self.vae_preset = QComboBox()
        self.vae_preset.addItems(["maisi", "small", "tiny"])
        self.vae_source.currentIndexChanged.connect(self._toggle_vae)
        self.folder = PathField(_phantom_root(), "dir", "Dataset folder")
        self.max_cases = QSpinBox()
        self.max_cases.setRange(0, 100000)
        self.max_cases.setSpecialValueText("all")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.output = PathField(str(_output_root() / "mask_test" / "mask_vae_test.json"), "save", "Result JSON",
                                "JSON (*.json)")
        self.run_button = QPushButton("Run test")
        self.run_button.clicked.connect(self.start)
        self.table = _table(self.HEADERS)
        self.recommendation = QLabel("Recommendation: run the test")
        self.recommendation.setWordWrap(True)
        self.reconstruct_button = QPushButton("Show VAE reconstruction of selected case")
        self.reconstruct_button.clicked.connect(self.show_reconstruction)

        form = QFormLayout()
        form.addRow("VAE", self.vae_source)
        form.addRow("VAE file", self.vae_file)
        form.addRow("VAE preset", self.vae_preset)
        form.addRow("Dataset", self.folder)
        form.addRow("Cases", self.max_cases)
        form.addRow("Mask threshold", self.threshold)
        form.addRow("Save result to", self.output)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.table)
        layout.addWidget(self.recommendation)
        layout.addWidget(self.reconstruct_button)
        layout.addStretch(1)
        self._toggle_vae()

    def _toggle_vae(self, *_: Any) -> None:
        local = self.vae_source.currentIndex() == 1
        self.vae_file.setEnabled(local)
        self.vae_preset.setEnabled(local)

    def vae_spec(self) -> tuple[str, str] | None:
        if self.vae_source.currentIndex() == 0:
            return _session.EMBEDDED, "small"
        path = self.vae_file.text()
        if not path or not Path(path).exists():
            show_error(f"Mask-VAE test: VAE file {path!r} does not exist; choose a local MAISI weight file")
            return None
        return path, self.vae_preset.currentText()

    def _fcd_cases(self) -> list | None:
        from neuromf.io.bids import DataError, discover_cases

        try:
            cases = discover_cases(Path(self.folder.text()), group="fcd")
        except (DataError, ValueError, OSError) as err:
            show_error(f"Mask-VAE test: {err}")
            return None
        limit = self.max_cases.value()
        return cases[:limit] if limit else cases

    def start(self) -> Any:
        if self.busy:
            show_warning("Mask-VAE test: a test is already running")
            return None
        spec, cases = self.vae_spec(), self._fcd_cases()
        if spec is None or cases is None:
            return None
        self.run = _session.MaskTestRun(Path(self.folder.text()), cases, spec[0], spec[1], self.threshold.value(),
                                        Path(self.output.text()) if self.output.text() else None)
        self.table.setRowCount(0)
        self.recommendation.setText(f"Running on {len(cases)} cases ...")
        self.run_button.setEnabled(False)
        self.worker = create_worker(self.run.drive, _progress={"total": len(cases), "desc": "Mask-VAE test"})
        self.worker.yielded.connect(self._on_item)
        self.worker.returned.connect(self._on_done)
        self.worker.finished.connect(lambda: self.run_button.setEnabled(True))
        launch(self, self.worker)
        return self.worker

    def _on_item(self, item: Any) -> None:
        if isinstance(item, Failure):
            show_error(item.message)
            self.recommendation.setText("Recommendation: test failed (see notification)")
            return
        self.run.rows.append(item)
        b = item.get("dice_downsample", {})
        _set_row(self.table, len(self.run.rows) - 1, [
            str(item["id"]), f"{item['lesion_cm3']:.2f}", str(item["size_bin"]), f"{item['dice_vae']:.3f}",
            *(f"{b[m]:.3f}" if m in b else "-" for m in ("nearest", "area", "max"))])

    def _on_done(self, result: dict | None) -> None:
        if not result:
            return
        summary = result["summary"]
        best_b = max(summary["mean_dice_downsample"].items(), key=lambda kv: kv[1])
        strategy = ("A: VAE-encoded mask (C=8)" if result["decision"] == "vae"
                    else "B: downsampled mask (C=5)")
        saved = f" Saved to {self.run.output}." if self.run.output else ""
        self.recommendation.setText(
            f"Recommendation: strategy {strategy}. Mean Dice A {summary['mean_dice_vae']:.3f}, best B "
            f"({best_b[0]}) {best_b[1]:.3f}; {result.get('reason', '')}.{saved}")

    def show_reconstruction(self) -> Any:
        """The selected case's strategy-A mask reconstruction as a Labels layer, next to the case itself."""
        row = _selected_row(self.table)
        if self.run is None or row is None or row >= len(self.run.rows):
            show_warning("Mask-VAE test: run the test and select a case in the table first")
            return None
        case_id = self.run.rows[row]["id"]
        case = next((c for c in self.run.cases if c.case_id == case_id), None)
        if case is None:
            show_error(f"Mask-VAE test: case {case_id} is no longer in {self.run.data_dir}")
            return None
        if f"{case_id} FLAIR" not in self.viewer.layers:
            try:
                tuples, problems = case_layers(case.image, case.mask, case_id)
                for t in tuples:
                    add_layer(self.viewer, t)
            except LayerDataError as err:
                show_warning(f"Mask-VAE test: {err}")
        worker = create_worker(_session.reconstruct, case, self.run.vae_spec, self.run.vae_preset,
                               _progress={"desc": f"Reconstructing {case_id}"})
        worker.returned.connect(lambda out: self._add_reconstruction(case_id, out))
        self.worker = worker
        return launch(self, worker)

    def _add_reconstruction(self, case_id: str, out: Any) -> None:
        if isinstance(out, Failure):
            show_error(out.message)
            return
        mask, affine = out
        data, kwargs, kind = layer_tuple(np.asarray(mask, dtype=np.uint8), affine, f"{case_id} lesion (VAE)",
                                         "labels", extra={"role": "reconstruction", "case": case_id})
        kwargs["colormap"] = {1: "cyan", None: "transparent"}
        try:
            add_layer(self.viewer, (data, kwargs, kind))
        except (TypeError, ValueError):  # colormap dict formats differ across napari versions
            kwargs.pop("colormap")
            add_layer(self.viewer, (data, kwargs, kind))


# --------------------------------------------------------------------------------------- LoRA fine-tuning
class LoRAWidget(QWidget):
    """LoRA fine-tuning of the base MeanFlow model on FCD image + mask latents, in a background thread."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.viewer = napari_viewer
        self.busy = False  # a worker of this widget is running
        self.run: _session.TrainingRun | None = None
        self.worker = None
        self.pbar: progress | None = None

        self.config = QComboBox()
        self.config.addItems(_lora_configs())
        self.base = PathField("embedded", "dir", "Base checkpoint folder (model.safetensors + model.json)")
        self.data = PathField("embedded", "dir", "FCD dataset folder")
        self.rank = QSpinBox()
        self.rank.setRange(1, 256)
        self.alpha = QDoubleSpinBox()
        self.alpha.setRange(0.1, 1024)
        self.targets = QLineEdit()
        self.strategy = QComboBox()
        self.strategy.addItems(["auto", "vae", "downsample"])
        self.p_img = _float_box(0.5, 4.0, 0.1, 2)
        self.p_mask = _float_box(0.5, 4.0, 0.1, 2)
        self.lr = _float_box(1e-7, 1.0, 1e-5, 7)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1_000_000)
        self.max_steps = QSpinBox()
        self.max_steps.setRange(0, 100_000_000)
        self.max_steps.setSpecialValueText("by epochs")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 1024)
        self.preview_every = QSpinBox()
        self.preview_every.setRange(0, 1_000_000)
        self.preview_every.setSpecialValueText("off")
        self.device = QComboBox()
        self.device.addItems(_devices())
        self.output = PathField(str(_output_root() / "runs" / f"lora_{_session.timestamp()}"), "dir",
                                "Output folder")
        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.resume_button = QPushButton("Resume")
        self.start_button.clicked.connect(lambda: self.start(resume=False))
        self.stop_button.clicked.connect(self.stop)
        self.resume_button.clicked.connect(lambda: self.start(resume=True))
        self.stop_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("idle")
        self.progress_bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.figure = Figure(figsize=(4, 2.4), tight_layout=True)
        self.axes = self.figure.add_subplot(111)
        self.axes.set_xlabel("step")
        self.axes.set_ylabel("loss")
        (self.loss_line,) = self.axes.plot([], [], ".-", markersize=3, linewidth=1)
        _theme_plot(self.figure, self.axes, getattr(napari_viewer, "theme", "dark"))
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(180)

        form = QFormLayout()
        form.addRow("Config", self.config)
        form.addRow("Base checkpoint", self.base)
        form.addRow("FCD data", self.data)
        form.addRow("LoRA rank", self.rank)
        form.addRow("LoRA alpha", self.alpha)
        form.addRow("Targets", self.targets)
        form.addRow("Mask strategy", self.strategy)
        form.addRow("p (image)", self.p_img)
        form.addRow("p (mask)", self.p_mask)
        form.addRow("Learning rate", self.lr)
        form.addRow("Epochs", self.epochs)
        form.addRow("Max steps", self.max_steps)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Preview every (steps)", self.preview_every)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.output)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button, self.resume_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        layout.addStretch(1)

        self.config.currentTextChanged.connect(self.fill_from_config)
        if self.config.count():
            self.fill_from_config(self.config.currentText())

    def fill_from_config(self, name: str) -> None:
        """Show a packaged config's values in the form (the defaults the user then edits)."""
        from neuromf.config import ConfigError, load_config

        try:
            cfg = load_config(name)
        except (ConfigError, OSError) as err:
            show_error(f"LoRA fine-tuning: {err}")
            return
        self.rank.setValue(cfg.lora.rank)
        self.alpha.setValue(cfg.lora.alpha)
        self.targets.setText(", ".join(cfg.lora.target_modules))
        self.strategy.setCurrentText(cfg.data.mask_strategy)
        self.p_img.setValue(cfg.loss.p_img)
        self.p_mask.setValue(cfg.loss.p_mask)
        self.lr.setValue(cfg.training.lr)
        self.epochs.setValue(cfg.training.max_epochs)
        self.max_steps.setValue(cfg.training.max_steps or 0)
        self.batch_size.setValue(cfg.training.batch_size)
        self.preview_every.setValue(cfg.training.preview_every or 50)
        self.data.setText(cfg.data.data_dir)
        if cfg.training.device in [self.device.itemText(i) for i in range(self.device.count())]:
            self.device.setCurrentText(cfg.training.device)

    def settings(self) -> dict[str, Any]:
        """The form as dotted config overrides (plus ``base_checkpoint``)."""
        targets = [t.strip() for t in self.targets.text().replace(";", ",").split(",") if t.strip()]
        return {
            "base_checkpoint": self.base.text() or "embedded",
            "data.data_dir": self.data.text() or "embedded",
            "lora.rank": self.rank.value(),
            "lora.alpha": float(self.alpha.value()),
            "lora.target_modules": targets,
            "data.mask_strategy": self.strategy.currentText(),
            "loss.p_img": float(self.p_img.value()),
            "loss.p_mask": float(self.p_mask.value()),
            "training.lr": float(self.lr.value()),
            "training.max_epochs": self.epochs.value(),
            "training.max_steps": self.max_steps.value() or None,
            "training.batch_size": self.batch_size.value(),
            "training.preview_every": self.preview_every.value(),
            "training.device": self.device.currentText(),
            "training.output_dir": self.output.text(),
        }

    def start(self, resume: bool = False, overrides: dict[str, Any] | None = None) -> Any:
        """Start (or resume) training in a thread worker; ``overrides`` adds config keys (tests, scripts)."""
        if self.busy:
            show_warning("LoRA fine-tuning: a run is already in progress; press Stop first")
            return None
        if not self.output.text():
            show_error("LoRA fine-tuning: choose an output folder")
            return None
        settings = {**self.settings(), **(overrides or {})}
        if not settings["lora.target_modules"]:
            show_error("LoRA fine-tuning: list at least one target module (e.g. to_q, to_k, to_v)")
            return None
        base = settings["base_checkpoint"]
        try:
            cfg = _session.build_lora_config(self.config.currentText() or "lora_fcd", settings)
        except Exception as err:  # config errors name the key; missing mask test names the remedy
            show_error(_session.describe_error(err, "LoRA fine-tuning"))
            return None
        self.run = _session.TrainingRun(cfg, base, resume=resume)
        self.destroyed.connect(self.run.stop.set)  # closing the dock stops the run (checkpoint + adapter saved)
        self.loss_line.set_data([], [])
        self.canvas.draw_idle()
        self._set_running(True)
        self.status.setText(f"{'Resuming' if resume else 'Starting'} in {self.run.out_dir} ...")
        self.progress_bar.setRange(0, 0)  # busy until the first step reports the total
        self.worker = create_worker(self.run.drive)
        self.worker.yielded.connect(self._on_event)
        self.worker.returned.connect(self._on_done)
        self.worker.finished.connect(self._on_finished)
        launch(self, self.worker)
        return self.worker

    def stop(self) -> None:
        """Ask the loop to stop: it saves a resumable checkpoint and the adapter, then returns."""
        if self.run is not None:
            self.run.stop.set()
            self.status.setText("Stopping after the current step ...")
        self.stop_button.setEnabled(False)

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.resume_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    _last_refresh = 0.0

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Failure):
            show_error(event.message)
            self.status.setText("Failed: see the notification")
            return
        self.run.record(event)
        # redrawing the plot and napari's progress bar costs tens of ms on the GUI thread, which competes with
        # the training thread for the GIL: refresh at most a few times per second (every point is recorded)
        if event.kind == "step":  # only step events are throttled; previews, epochs and the end always show
            now = time.monotonic()
            if event.step < event.total_steps and now - self._last_refresh < REFRESH_S:
                return
            self._last_refresh = now
        if event.total_steps:
            if self.pbar is None:
                self.pbar = progress(total=event.total_steps, desc="LoRA fine-tuning")
            if self.progress_bar.maximum() != event.total_steps:
                self.progress_bar.setRange(0, event.total_steps)
            self.progress_bar.setValue(min(event.step, event.total_steps))
            self.pbar.update(max(0, event.step - self.pbar.n))
        if event.kind == "step":
            eta = format_eta(event.eta_s)
            self.progress_bar.setFormat(f"%v / %m steps  ·  ETA {eta}")
            if self.pbar is not None:
                self.pbar.set_description(f"LoRA fine-tuning (ETA {eta})")
            self.status.setText(f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}")
            self._plot()
        elif event.kind == "skipped":
            show_warning(f"LoRA fine-tuning: {event.message}")
        elif event.kind == "checkpoint":
            self.status.setText(f"checkpoint saved at step {event.step}: {event.path}")
        elif event.kind == "preview" and event.preview:
            self._show_previews(event)
        elif event.kind in ("done", "stopped"):
            self._plot()  # the throttled redraw may have skipped the last steps
            self.status.setText(f"{event.message}; saved in {self.run.out_dir}")

    def _plot(self) -> None:
        steps, losses = zip(*self.run.losses) if self.run.losses else ((), ())
        self.loss_line.set_data(steps, losses)
        self.axes.relim()
        self.axes.autoscale_view()
        self.canvas.draw_idle()

    def _show_previews(self, event: Any) -> None:
        from neuromf.generate import model_grid_affine

        data = self.run.cfg.data
        for i, (image, mask) in enumerate(event.preview):
            affine = model_grid_affine(np.shape(image), data.spacing)
            meta = {"step": event.step, "run": str(self.run.out_dir), "preview": True}
            for t in pair_layers(f"preview {i}", image, mask, affine, meta):
                add_layer(self.viewer, t)

    def _on_done(self, result: Any) -> None:
        if result is None:
            return
        if result.export:
            STATE.set_adapter(Path(result.export), Path(result.out_dir))
        verb = "stopped" if result.stopped else "finished"
        show_info(f"LoRA fine-tuning {verb} at step {result.step}: adapter {result.export}, checkpoint "
                  f"{result.checkpoint}" + (f", {result.skipped_steps} skipped steps" if result.skipped_steps else ""))

    def _on_finished(self) -> None:
        self._set_running(False)
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        if self.progress_bar.maximum() == 0:
            self.progress_bar.setRange(0, 1)
        if self.run is not None and self.run.failure is None and self.run.result is not None:
            self.progress_bar.setFormat("stopped at %v / %m" if self.run.result.stopped else "done: %v / %m")
        else:
            self.progress_bar.setFormat("idle")


def _theme_plot(figure: Any, axes: Any, theme_name: str) -> None:
    """Match the loss plot to napari's theme (background, text and line colours)."""
    try:
        from napari.utils.theme import get_theme

        theme = get_theme(theme_name)
        background, text = theme.background.as_hex(), theme.text.as_hex()
    except Exception:  # unknown/custom theme: keep matplotlib's defaults
        return
    figure.set_facecolor(background)
    axes.set_facecolor(background)
    for spine in axes.spines.values():
        spine.set_color(text)
    axes.tick_params(colors=text)
    axes.xaxis.label.set_color(text)
    axes.yaxis.label.set_color(text)
    axes.lines[0].set_color("#3d9be9")  # readable on napari's dark and light backgrounds


def _float_box(lo: float, hi: float, step: float, decimals: int) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(lo, hi)
    box.setSingleStep(step)
    return box


def _lora_configs() -> list[str]:
    from neuromf.config import PACKAGED_CONFIGS

    names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml") if "lora" in p.stem)
    preferred = [n for n in ("lora_fcd", "demo_lora") if n in names]
    return preferred + [n for n in names if n not in preferred]


# ------------------------------------------------------------------------------------------------ Generate
class GenerateWidget(QWidget):
    """Sample (FLAIR, lesion) pairs from a LoRA adapter and overlay them; save them as NIfTI."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.busy = False  # a worker of this widget is running
        self.run: _session.GenerateRun | None = None
        self.worker = None

        self.adapter = PathField(STATE.default_adapter(), "dir", "LoRA adapter folder")
        self.follow_training = True  # until the user edits the adapter, follow the latest trained one
        self.adapter.edit.textEdited.connect(self._adapter_edited)
        STATE.on_adapter(self._new_adapter)
        latest = QPushButton("last trained")
        latest.setToolTip("Use the adapter of the last LoRA run of this session")
        latest.clicked.connect(self._use_latest)
        self.n = QSpinBox()
        self.n.setRange(1, 256)
        self.n.setValue(4)
        self.steps = QSpinBox()
        self.steps.setRange(1, 100)
        self.steps.setValue(1)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.device = QComboBox()
        self.device.addItems(_devices())
        self.mode = QComboBox()
        self.mode.addItems(list(GENERATION_MODES))
        self.mode.setToolTip("joint: FLAIR and lesion mask both generated from noise (LoRA adapter).\n"
                             "conditional: a FLAIR that carries a given lesion (ControlNet adapter): paint one in "
                             "a Labels layer, pick a case's mask, or draw one from the training lesions")
        self.lesion = QComboBox()
        self.lesion.setToolTip("conditional mode: the Labels layer whose lesion the FLAIR should carry")
        self.mode.currentTextChanged.connect(self._refresh_lesions)
        self.viewer.layers.events.inserted.connect(self._refresh_lesions)
        self.viewer.layers.events.removed.connect(self._refresh_lesions)
        self._refresh_lesions()
        self.generate_button = QPushButton("Generate")
        self.generate_button.clicked.connect(self.start)
        self.out_dir = PathField(str(_output_root() / "generated"), "dir", "Folder for generated pairs")
        self.save_button = QPushButton("Save pairs")
        self.save_button.clicked.connect(self.save_pairs)

        adapter_row = QHBoxLayout()
        adapter_row.addWidget(self.adapter)
        adapter_row.addWidget(latest)
        form = QFormLayout()
        form.addRow("Adapter", adapter_row)
        form.addRow("Mode", self.mode)
        form.addRow("Lesion", self.lesion)
        form.addRow("Samples", self.n)
        form.addRow("Steps", self.steps)
        form.addRow("Seed", self.seed)
        form.addRow("Device", self.device)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.generate_button)
        save_form = QFormLayout()
        save_form.addRow("Save into", self.out_dir)
        layout.addLayout(save_form)
        layout.addWidget(self.save_button)
        layout.addStretch(1)

    def _adapter_edited(self, *_: Any) -> None:
        self.follow_training = False

    def _refresh_lesions(self, *_: Any) -> None:
        """Lesion choices: the prior, then every open Labels layer (a painted lesion, a case's mask)."""
        current = self.lesion.currentText()
        self.lesion.clear()
        self.lesion.addItem(PRIOR_LESION)
        self.lesion.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Labels)])
        if current and self.lesion.findText(current) >= 0:
            self.lesion.setCurrentText(current)
        self.lesion.setEnabled(self.mode.currentText() == "conditional")

    def _new_adapter(self, adapter: Path) -> None:
        if self.follow_training:
            self.adapter.setText(str(adapter))

    def _use_latest(self) -> None:
        if STATE.last_adapter is None:
            show_info("Generate: no LoRA run has finished in this session yet")
            return
        self.follow_training = True
        self.adapter.setText(str(STATE.last_adapter))

    def start(self) -> Any:
        if self.busy:
            show_warning("Generate: generation is already running")
            return None
        adapter = self.adapter.text() or _session.EMBEDDED
        if adapter != _session.EMBEDDED and not Path(adapter).is_dir():
            show_error(f"Generate: adapter folder {adapter} does not exist")
            return None
        mode, lesion = self.mode.currentText(), None
        if mode == "conditional" and self.lesion.currentText() != PRIOR_LESION:
            name = self.lesion.currentText()
            if name not in self.viewer.layers:
                show_error(f"Generate: Labels layer {name!r} is no longer open")
                return None
            data, state, _ = self.viewer.layers[name].as_layer_data_tuple()
            if not np.asarray(data).any():
                show_error(f"Generate: Labels layer {name!r} is empty: paint a lesion first")
                return None
            lesion = (np.asarray(data).copy(), state)  # a copy: the user may keep painting while we generate
        self.run = _session.GenerateRun(adapter, self.n.value(), self.steps.value(), self.seed.value(),
                                        self.device.currentText(), mode=mode, lesion=lesion)
        self.generate_button.setEnabled(False)
        self.worker = create_worker(self.run.drive, _progress={"total": self.run.n, "desc": "Generating pairs"})
        self.worker.yielded.connect(self._on_pair)
        self.worker.finished.connect(lambda: self.generate_button.setEnabled(True))
        launch(self, self.worker)
        return self.worker

    def _next_number(self) -> int:
        numbers = [int(p.split("_")[1]) for p in _session.generated_prefixes(self.viewer.layers)
                   if p.split("_")[-1].isdigit()]
        return max(numbers, default=-1) + 1

    def _on_pair(self, pair: Any) -> None:
        if isinstance(pair, Failure):
            show_error(pair.message)
            return
        run = self.run
        meta = {**(pair.meta or {}), "generated": True, "seed": run.seed, "sample_index": int(pair.index),
                "steps": run.steps, "checkpoint": (pair.meta or {}).get("adapter", run.adapter)}
        for t in pair_layers(f"gen_{self._next_number():03d}", pair.image, pair.mask, pair.affine, meta):
            add_layer(self.viewer, t)

    def save_pairs(self) -> list[Path]:
        """Each generated pair as ``gen_XXX_FLAIR.nii.gz`` + ``gen_XXX_FLAIR_roi.nii.gz`` (+ JSON provenance)."""
        from napari_neuromf._writer import write_image, write_labels

        prefixes = _session.generated_prefixes(self.viewer.layers)
        if not prefixes:
            show_warning("Generate: no generated pairs in the viewer to save")
            return []
        folder = Path(self.out_dir.text() or _output_root() / "generated")
        written: list[Path] = []
        for prefix in prefixes:
            image, lesion = f"{prefix} FLAIR", f"{prefix} lesion"
            if image not in self.viewer.layers or lesion not in self.viewer.layers:
                show_warning(f"Generate: {prefix} is missing its FLAIR or lesion layer; skipped")
                continue
            img_data, img_meta, _ = self.viewer.layers[image].as_layer_data_tuple()
            les_data, les_meta, _ = self.viewer.layers[lesion].as_layer_data_tuple()
            paths = write_image(str(folder / f"{prefix}_FLAIR.nii.gz"), img_data, img_meta)
            paths += write_labels(str(folder / f"{prefix}_FLAIR_roi.nii.gz"), les_data, les_meta)
            if len(paths) != 2:
                return written  # the writer has shown the error
            info = img_meta["metadata"].get("neuromf", {})
            try:
                (folder / f"{prefix}.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
            except OSError as err:
                show_warning(f"Generate: {folder / f'{prefix}.json'}: {err}")
            written += [Path(p) for p in paths]
        if written:
            show_info(f"Generate: saved {len(written) // 2} pairs in {folder}")
        return written


__all__ = ["FCDDataWidget", "GenerateWidget", "LoRAWidget", "MaskTestWidget", "add_layer", "pair_mismatch"]
