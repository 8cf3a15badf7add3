"""Mask-VAE test dock widget: can the image VAE carry the lesion mask? Dice per case, the recommendation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _environment, _mask_test_run, _state
from napari_neuromf._helpers import (
    JobPanel,
    PathField,
    add_layer,
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
from napari_neuromf._jobs import Failure
from napari_neuromf._layers import LayerDataError, case_layers, layer_tuple
from napari_neuromf._viewing import view_guard

if TYPE_CHECKING:
    import napari

STRATEGY_NAMES = {"vae": "encode the mask with the image VAE (mask encoding 'vae')",
                  "downsample": "shrink the mask to the latent grid (mask encoding 'downsample')",
                  "sdf": "shrink the mask as a signed distance map (mask encoding 'sdf')"}

FROM_SIDECAR = "from its sidecar"  # the preset its model.json names (maisi for a bare MAISI file)
FOLDER, LAYERS = "Data folder", "Open layers"  # what the test runs on


class MaskTestWidget(QWidget):
    """Can the image VAE carry the lesion mask? Dice per case for strategy A (VAE) vs B (downsampled)."""

    TITLE = "Mask-VAE test"  # as in napari.yaml: the dock tab's text

    HEADERS = ["case", "cm³", "VAE", "distance", "nearest", "area", "max"]
    HEADER_TIPS = ["Case name", "Lesion volume in cubic centimetres",
                   "Overlap (Dice, 1 = perfect) of the mask after encoding and decoding it with the image VAE",
                   "Dice after shrinking the mask to the latent grid as a signed distance map and growing it back",
                   "Dice after shrinking the mask by nearest-neighbour sampling and growing it back",
                   "Dice after shrinking by averaging (area) and growing back",
                   "Dice after shrinking by taking the maximum and growing back"]

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        view_guard(napari_viewer)  # axial view, caption and orientation letters for every volume added
        self.busy = False  # a worker of this widget is running
        self.run: _mask_test_run.MaskTestRun | None = None
        self.worker = None

        self.vae_source = tip(QComboBox(), "The image autoencoder to test: the small one shipped with NeuroMF, or "
                                           "a MAISI weight file on this computer")
        self.vae_source.addItems(["shipped with NeuroMF", "MAISI file on this computer"])
        self.vae_file = PathField("", "file", "MAISI VAE weights", "Weights (*.pt *.pth *.safetensors);;All (*)",
                                  tooltip="autoencoder_v1.pt / autoencoder_v2.pt (NV-Generate-CT/-MR) or a NeuroMF "
                                          "VAE folder")
        self.vae_preset = tip(QComboBox(), "Size of that network: as its sidecar (model.json) says, else maisi = the "
                                           "released MAISI model; small/tiny = NeuroMF's reduced versions")
        self.vae_preset.addItems([FROM_SIDECAR, "maisi", "small", "tiny"])
        self.vae_source.currentIndexChanged.connect(self._toggle_vae)
        self.source = tip(QComboBox(), f"{FOLDER}: every FCD case of a data set (the result is saved and used by "
                                       f"strategy 'auto'). {LAYERS}: one FLAIR image layer and its lesion labels "
                                       "layer open in napari, e.g. a lesion you painted (nothing is saved)")
        self.source.addItems([FOLDER, LAYERS])
        self.source.currentIndexChanged.connect(self._toggle_source)
        self.folder = PathField("", "dir", "Dataset folder", tooltip="Data set with FCD cases and their lesion masks")
        self.image_layer = layer_choice(napari_viewer, Image, "The open FLAIR image layer to test with its lesion")
        self.labels_layer = layer_choice(napari_viewer, Labels, "The open lesion labels layer on that FLAIR's grid "
                                                                "(every nonzero label counts as lesion)")
        self.max_cases = tip(QSpinBox(), "Test only the first N cases (all: every case with a mask)")
        self.max_cases.setRange(0, 100000)
        self.max_cases.setSpecialValueText("all")
        self.threshold = tip(QDoubleSpinBox(), "A decoded mask voxel counts as lesion above this value (0-1)")
        self.threshold.setRange(0.01, 0.99)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.output = PathField("", "save", "Result JSON", "JSON (*.json)",
                                tooltip="Where the result is saved; LoRA training with strategy 'auto' reads it")
        self.run_button = tip(QPushButton("Run test"), "Encode and decode each case's mask and measure the overlap "
                                                       "(the time per case is shown once the backend is loaded)")
        self.run_button.clicked.connect(self.start)
        self.job = JobPanel("Stop the test after the current case (the cases done so far stay in the table)")
        self.job.cancel_button.clicked.connect(self.cancel)
        self.table = make_table(self.HEADERS, self.HEADER_TIPS)
        self.recommendation = QLabel("Recommendation: run the test")
        self.recommendation.setWordWrap(True)
        self.recommendation.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.recommendation.setToolTip("Which way of passing the mask to the generator works better on these cases")
        self.reconstruct_button = tip(QPushButton("Show the selected case's mask as the generator learns it"),
                                      "Open the selected case and overlay (cyan) its mask after the round trip of "
                                      "the recommended mask encoding: what a model trained with it can draw")
        self.reconstruct_button.clicked.connect(self.show_reconstruction)

        form = QFormLayout()
        form.addRow("Image VAE", self.vae_source)
        form.addRow("VAE file", self.vae_file)
        form.addRow("VAE size", self.vae_preset)
        form.addRow("Test on", self.source)
        form.addRow("Data folder", self.folder)
        form.addRow("Cases", self.max_cases)
        form.addRow("FLAIR layer", self.image_layer.native)
        form.addRow("Lesion layer", self.labels_layer.native)
        form.addRow("Mask threshold", self.threshold)
        form.addRow("Save result to", self.output)
        layout = QVBoxLayout(self)
        layout.addWidget(help_link("user_guide.md", "Help: the mask-VAE test"))
        layout.addLayout(form)
        layout.addWidget(self.run_button)
        layout.addWidget(self.job)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.recommendation)
        layout.addWidget(self.reconstruct_button)
        self._toggle_vae()
        self._toggle_source()
        dock_title(self, self.TITLE)
        when_backend_ready(self, self._fill_defaults)

    def _fill_defaults(self, env: _environment.Environment) -> None:
        state = _state.STATE
        self.folder.fill(str(state.last_data_dir) if state.last_data_dir else env.phantom_root)
        self.output.fill(str(state.last_mask_test or _state.user_folder() / "mask_test" / "mask_vae_test.json"))
        self._show_rate()

    def _toggle_vae(self, *_: Any) -> None:
        local = self.vae_source.currentIndex() == 1
        self.vae_file.setEnabled(local)
        self.vae_preset.setEnabled(local)

    def _toggle_source(self, *_: Any) -> None:
        layers = self.source.currentText() == LAYERS
        for control in (self.folder, self.max_cases, self.output):
            control.setEnabled(not layers)
        for choice in (self.image_layer, self.labels_layer):
            choice.native.setEnabled(layers)

    def _layer_pair(self) -> _mask_test_run.LayerPair | None:
        """Snapshots of the chosen open layers (the user may keep painting while the test runs), or None with
        the reason shown."""
        image, labels = self.image_layer.value, self.labels_layer.value
        if image is None or labels is None:
            self._refuse("Mask-VAE test: open a FLAIR image layer and a lesion labels layer first")
            return None
        problem = pair_mismatch(image, labels)
        if problem:
            self._refuse(f"Mask-VAE test: {image.name!r} and {labels.name!r} are not one case: {problem}")
            return None
        return _mask_test_run.LayerPair((np.array(image.data), image.as_layer_data_tuple()[1]),
                                  (np.array(labels.data), labels.as_layer_data_tuple()[1]))

    def _refuse(self, message: str) -> None:
        show_error(message)
        self.job.fail(message)

    def vae_spec(self) -> tuple[str, str | None] | None:
        if self.vae_source.currentIndex() == 0:
            return _state.EMBEDDED, "small"
        path = self.vae_file.text()
        if not path or not Path(path).exists():
            show_error(f"Mask-VAE test: VAE file {path!r} does not exist; choose a local MAISI weight file")
            return None
        preset = self.vae_preset.currentText()
        return path, None if preset == FROM_SIDECAR else preset

    def start(self) -> Any:
        if self.busy:
            show_warning("Mask-VAE test: a test is already running")
            return None
        spec = self.vae_spec()
        if spec is None:
            return None
        if self.source.currentText() == LAYERS:
            pair = self._layer_pair()
            if pair is None:
                return None
            self.run = _mask_test_run.MaskTestRun(None, 0, spec[0], spec[1], self.threshold.value(), layers=pair)
            message = f"Loading the VAE and preparing the {pair.description} ..."
        else:
            if not self.folder.text():
                self._refuse("Mask-VAE test: choose a data folder first")
                return None
            output = Path(self.output.text()) if self.output.text() else None
            self.run = _mask_test_run.MaskTestRun(Path(self.folder.text()), self.max_cases.value(), spec[0], spec[1],
                                            self.threshold.value(), output)
            message = "Loading the VAE and finding the cases ..."
        self.table.setRowCount(0)
        self.recommendation.setText("Recommendation: the test is running")
        self.run_button.setEnabled(False)
        self.job.begin(message)
        worker = create_worker(self.run.drive)
        worker.yielded.connect(self._on_item)
        worker.returned.connect(self._on_done)
        worker.finished.connect(self._test_finished)
        return launch(self, worker)

    def _test_finished(self) -> None:
        self.run_button.setEnabled(True)
        self._show_rate()  # the test may have recorded this machine's pace

    def cancel(self) -> None:
        if self.run is not None and self.busy:
            self.run.cancel.set()
            self.job.waiting("Cancelling after the current case ...")

    def time_estimate(self, cases: int) -> Any:
        """The estimate of testing ``cases`` cases with the chosen VAE (`neuromf.estimates`); None for a VAE with
        no measured rate (a MAISI file)."""
        from neuromf.estimates import mask_test_estimate
        from neuromf.weights import EMBEDDED_MODELS

        if self.vae_source.currentIndex() != 0:
            return None
        return mask_test_estimate(EMBEDDED_MODELS["vae"][_state.EMBEDDED], cases)

    def _show_rate(self) -> None:
        one = self.time_estimate(1)
        if one is not None:
            self.run_button.setToolTip("Encode and decode each case's mask and measure the overlap: "
                                       f"{one.describe()} for one case with the shipped VAE; the bar estimates "
                                       "the rest from the cases done")

    def _on_item(self, item: Any) -> None:
        if isinstance(item, Failure):
            show_error(item.message)
            self.job.fail(item.message)
            self.recommendation.setText("Recommendation: the test failed (see above)")
            return
        if isinstance(item, list):  # the cases: now the total is known
            self.job.count(0, len(item), "cases")
            estimate = self.time_estimate(len(item))
            expected = f" (expected: {estimate.describe()})" if estimate is not None else ""
            self.job.status.setText(f"Testing {len(item)} cases{expected} ...")
            return
        self.run.rows.append(item)
        self.job.count(len(self.run.rows), len(self.run.cases), "cases")
        b = item.get("dice_downsample", {})
        sdf = item.get("dice_sdf")
        set_row(self.table, len(self.run.rows) - 1, [
            str(item["id"]), f"{item['lesion_cm3']:.1f}", f"{item['dice_vae']:.2f}",
            f"{sdf:.2f}" if sdf is not None else "-", *(f"{b[m]:.2f}" if m in b else "-" for m in ("nearest", "area",
                                                                                                  "max"))])

    def _on_done(self, result: dict | None) -> None:
        if self.run.cancelled:
            self.job.finish(f"Cancelled after {len(self.run.rows)} of {len(self.run.cases)} cases; nothing saved")
            self.recommendation.setText("Recommendation: run the test on all cases")
            return
        if not result:
            return
        summary = result["summary"]
        best_b = max(summary["mean_dice_downsample"].items(), key=lambda kv: kv[1])
        if self.run.layers is not None:  # one lesion: a measurement, not a decision for training
            self.job.finish(f"Tested the {self.run.layers.description} (not saved: strategy 'auto' uses the test "
                            "of a data folder).")
            self.recommendation.setText(
                f"This lesion: Dice with the VAE {summary['mean_dice_vae']:.3f}, best shrunk mask ({best_b[0]}) "
                f"{best_b[1]:.3f}. For the training recommendation, test the training data folder.")
            return
        saved = f" Saved to {self.run.output}." if self.run.output else ""
        if self.run.output is not None:
            _state.STATE.remember(last_mask_test=self.run.output)
        self.job.finish(f"Tested {len(self.run.rows)} cases.{saved}")
        self.recommendation.setText(
            f"Recommendation: {STRATEGY_NAMES.get(result['decision'], result['decision'])}. Mean Dice with the VAE "
            f"{summary['mean_dice_vae']:.3f}, best shrunk mask ({best_b[0]}) {best_b[1]:.3f}; "
            f"{result.get('reason', '')}.{saved}")

    def show_reconstruction(self) -> Any:
        """The selected case's mask after the recommended encoding's round trip (the test's decision), as a
        Labels layer next to the case itself."""
        row = selected_row(self.table)
        if self.run is None or row is None or row >= len(self.run.rows):
            show_warning("Mask-VAE test: run the test and select a case in the table first")
            return None
        if self.busy:
            show_warning("Mask-VAE test: wait for the running job or press Cancel")
            return None
        if self.run.result is None:
            show_warning("Mask-VAE test: the test did not finish, so no encoding is recommended yet: run it to the "
                         "end first")
            return None
        from neuromf.eval.mask_test import recommended_encoding

        strategy, mode = recommended_encoding(self.run.result)
        case_id = self.run.rows[row]["id"]
        case = next((c for c in self.run.cases if c.case_id == case_id), None)
        if case is None:
            show_error(f"Mask-VAE test: case {case_id} is no longer in {self.run.data_dir}")
            return None
        label = _mask_test_run.encoding_label(strategy, mode)
        self.job.begin(f"Round trip of the mask of {case_id} ({label}) ...")
        open_case = self.run.layers is None and f"{case_id} FLAIR" not in self.viewer.layers
        worker = create_worker(reconstruct_with_case, case, self.run.vae_spec, self.run.vae_preset, open_case,
                               strategy, mode, self.run.threshold)
        worker.returned.connect(lambda out: self._add_reconstruction(case_id, label, *out))
        return launch(self, worker)

    def _add_reconstruction(self, case_id: str, label: str, case_tuples: list, out: Any) -> None:
        for layer_tuple_ in case_tuples:
            add_layer(self.viewer, layer_tuple_)
        if isinstance(out, Failure):
            show_error(out.message)
            self.job.fail(out.message)
            return
        mask, affine = out
        data, kwargs, kind = layer_tuple(np.asarray(mask, dtype=np.uint8), affine, f"{case_id} lesion ({label})",
                                         "labels", extra={"role": "reconstruction", "case": case_id,
                                                          "encoding": label})
        kwargs["colormap"] = {0: "transparent", 1: "cyan", None: "cyan"}  # not the lesion colour: a comparison
        add_layer(self.viewer, (data, kwargs, kind))
        self.job.finish(f"Cyan: the mask of {case_id} after the round trip of the recommended encoding ({label})")


def reconstruct_with_case(case: Any, vae_spec: str, vae_preset: str | None, open_case: bool, strategy: str,
                          downsample_mode: str, threshold: float) -> tuple[list, Any]:
    """Worker body: (the case's own layers when ``open_case``, the reconstruction or a Failure)."""
    tuples: list = []
    if open_case:
        try:
            tuples, _ = case_layers(case.image, case.mask, case.case_id)
        except LayerDataError:
            tuples = []  # the reconstruction reports the unreadable case itself
    return tuples, _mask_test_run.reconstruct(case, vae_spec, vae_preset, strategy, downsample_mode, threshold)


__all__ = ["MaskTestWidget"]
