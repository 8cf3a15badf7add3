"""Generate dock widget: sample (FLAIR, lesion) pairs, or a FLAIR for a painted lesion; save the chosen pairs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Points
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _compare, _environment, _generate_run, _state
from napari_neuromf._helpers import (
    JobPanel,
    PathField,
    add_layers,
    debounce_timer,
    dock_title,
    help_link,
    launch,
    layer_choice,
    pair_mismatch,
    pending_layer_tuples,
    tip,
    when_backend_ready,
)
from napari_neuromf._jobs import Caution, Failure, format_eta, start_worker
from napari_neuromf._layers import pair_layers
from napari_neuromf._viewing import show_alone, view_guard
from neuromf.config import SAMPLERS
from neuromf.weights import EMBEDDED_NAMES

if TYPE_CHECKING:
    import napari

GENERATION_MODES = ("joint", "conditional", "inpaint")
# the sampler and steps each mode needs with the shipped 2 mm models (set when the mode is chosen)
MODE_SAMPLING = {"joint": ("euler", 32), "conditional": ("meanflow", 1), "inpaint": ("meanflow", 8)}
PRIOR_LESION = "drawn from the training lesions"
DRAWN_SITES = "drawn from the training lesions' sites"
MODE_TIPS = ("joint: FLAIR and lesion mask both generated from noise (a LoRA adapter).\n"
             "conditional: a FLAIR that carries a lesion you give (a ControlNet adapter): paint one in a Labels layer, "
             "pick a case's mask, or let one be drawn from the training lesions.\n"
             "inpaint: the lesion put into the scan you painted on (Scan): a new FLAIR of that scan that keeps its "
             "own voxels beyond a few millimetres of the lesion")
ADAPTER_GUIDANCE = "adapter's"
GUIDANCE_TIP = ("How bright the lesion is drawn in the FLAIR. 'adapter's' = the value measured for the adapter (1 "
                "unless set, for inpaint its own inpainting value: 1.3 for the shipped 2 mm one in every mode); 1 = "
                "as trained; higher = a brighter lesion than the training showed (any value but 1 makes each step "
                "take twice as long); too high makes lesions brighter than real ones")
JOINT_GUIDANCE_TIP = ("How strongly the mask commits to a lesion. 'adapter's' = the value measured for the adapter; "
                      "1 = no push; slightly above 1 (e.g. 1.1) when the masks come out empty or as specks; too high "
                      "makes lesions larger than real ones. Each step then takes twice as long")
SAMPLER_TIPS = ("How the image is computed from noise.\n"
                "euler (default): many small steps (32); what the shipped 2 mm joint adapter needs for a lesion.\n"
                "meanflow: big jumps; 1 step is the fastest but the 2 mm joint masks then come out empty")
# the configuration that makes lesion pairs with the shipped models: the 2 mm joint adapter draws the lesion mask,
# the 2 mm conditional adapter draws the FLAIR for it, 32 Euler steps (see docs/user_guide.md)
DEFAULT_ADAPTER = "embedded"
DEFAULT_RENDER = "embedded"
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_PAIRS = "euler", 32, 1
PROGRESS_MS = 250  # how often the bar reads the run's network step


def guidance_box(tooltip: str, step: float) -> QDoubleSpinBox:
    """A guidance scale field whose lowest value reads "adapter's": the adapter's own (sidecar) guidance."""
    box = tip(QDoubleSpinBox(), tooltip)
    box.setRange(-0.25, 5.0)
    box.setSpecialValueText(ADAPTER_GUIDANCE)
    box.setSingleStep(step)
    box.setValue(box.minimum())
    return box


def chosen_guidance(box: QDoubleSpinBox) -> float | None:
    """A guidance field's scale, None for "adapter's" (the adapter's own)."""
    value = box.value()
    return None if value == box.minimum() else value


def _adapter_name(adapter: str | Path) -> str:
    """A run's name for its adapter (``runs/lora_1/adapter`` -> ``lora_1``)."""
    path = Path(adapter)
    return path.parent.name if path.name == "adapter" else path.name


class GenerateWidget(QWidget):
    """Sample (FLAIR, lesion) pairs from an adapter and overlay them; save the chosen ones as NIfTI."""

    TITLE = "Generate"  # as in napari.yaml: the dock tab's text

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        view_guard(napari_viewer)  # axial view, caption and orientation letters for every volume added
        self.busy = False  # a worker of this widget is running
        self.run: _generate_run.GenerateRun | _generate_run.SaveRun | None = None
        self.worker = None

        self.adapter = PathField(DEFAULT_ADAPTER, "dir", "Adapter folder",
                                 tooltip="The trained model to draw pairs from: 'embedded' (default) = the 2 mm "
                                         "models shipped with NeuroMF, which make lesion pairs; 'embedded-3mm' = the "
                                         "older 3 mm demo (its joint masks come out empty); or a trained adapter "
                                         "folder")
        _state.STATE.on_adapter(self._new_adapter)
        self.use_latest = tip(QPushButton("Use it"), "Select the adapter of the last LoRA run (remembered across "
                                                     "sessions); possible only once its quick lesion check passed")
        self.use_latest.clicked.connect(self._use_latest)
        self.check_latest = tip(QPushButton("Check it"), "Draw a few pairs from the last trained adapter and put "
                                                         "their masks through the lesion check (empty masks, lesions "
                                                         "outside the brain, sizes, depths and sites no real lesion "
                                                         "has): it is offered only when every pair passes")
        self.check_latest.clicked.connect(self.start_check)
        self.offer = QLabel("")
        self.offer.setWordWrap(True)
        self.offer_row = QWidget()
        offer_layout = QHBoxLayout(self.offer_row)
        offer_layout.setContentsMargins(0, 0, 0, 0)
        offer_layout.addWidget(self.offer, 1)
        offer_layout.addWidget(self.check_latest)
        offer_layout.addWidget(self.use_latest)
        self.offer_row.setVisible(False)
        self.n = tip(QSpinBox(), "How many pairs to generate (on a CPU one 2 mm pair takes minutes)")
        self.n.setRange(1, 256)
        self.n.setValue(DEFAULT_PAIRS)
        self.steps = tip(QSpinBox(), "Network steps per image: more steps take proportionally longer; the 2 mm joint "
                                     "adapter needs about 32 for a lesion to appear")
        self.steps.setRange(1, 100)
        self.steps.setValue(DEFAULT_STEPS)
        self.sampler = tip(QComboBox(), SAMPLER_TIPS)
        self.sampler.addItems(list(SAMPLERS))
        self.sampler.setCurrentText(DEFAULT_SAMPLER)
        self.seed = tip(QSpinBox(), "Random seed: the same seed and settings give the same pairs")
        self.seed.setRange(0, 2**31 - 1)
        self.device = tip(QComboBox(), "auto: the first GPU when there is one, else the CPU")
        self.device.addItems(["auto", "cpu"])
        self.mode = tip(QComboBox(), MODE_TIPS)
        self.mode.addItems(list(GENERATION_MODES))
        self.scan = layer_choice(napari_viewer, Image, "Inpaint mode: the scan (Image layer) the lesion goes into; "
                                                       "paint the lesion in a Labels layer over it")
        self.lesion = layer_choice(napari_viewer, Labels, "Conditional / inpaint mode: the Labels layer whose "
                                                          "lesion the FLAIR should carry", first=PRIOR_LESION)
        self.site = layer_choice(napari_viewer, Points, "Joint mode, site-conditioned adapters (the 2 mm "
                                                        "'embedded'): the Points layer whose points are where "
                                                        "the lesions go, one per pair in turn, placed on a generated "
                                                        "pair (the model grid); by default sites are drawn from the "
                                                        "training lesions' sites", first=DRAWN_SITES)
        self.render = PathField(DEFAULT_RENDER, "dir", "Conditional adapter that draws the FLAIRs",
                                tooltip="Joint mode: which model draws the FLAIR for each generated mask. "
                                        "'embedded' (default) = the 2 mm conditional model, which shows the "
                                        "lesion as a bright region under the mask; empty = the joint model's own "
                                        "FLAIR (the lesion barely shows in it)")
        self.guidance = guidance_box(GUIDANCE_TIP, step=0.25)
        self.joint_guidance = guidance_box(JOINT_GUIDANCE_TIP, step=0.05)
        self.mode.currentTextChanged.connect(self._toggle_mode_fields)
        self.mode.currentTextChanged.connect(self._mode_chosen)
        self.render.edit.textChanged.connect(self._toggle_mode_fields)
        self._toggle_mode_fields()
        self.generate_button = tip(QPushButton("Generate"), "Generate the pairs; each appears as 'gen_NNN FLAIR' + "
                                                            "'gen_NNN lesion' layers")
        self.generate_button.clicked.connect(self.start)
        self._estimate_timer = debounce_timer(self, self._show_estimate)
        self.estimate = QLabel("")
        self.estimate.setWordWrap(True)
        self.estimate.setToolTip("How long the pairs should take here, from rates measured on the machine named "
                                 "(seconds per network step of each pass), scaled by the load now and, once a run has "
                                 "finished here, by this machine's own pace in its last runs")
        for signal in (self.n.valueChanged, self.steps.valueChanged, self.mode.currentTextChanged,
                       self.render.edit.textChanged, self.adapter.edit.textChanged, self.guidance.valueChanged):
            signal.connect(self._estimate_timer.start)
        self.lesion.changed.connect(lambda *_: self._estimate_timer.start())  # none: a pair places one first
        self.job = JobPanel("Stop within one network step (generating; the pairs done so far stay) or after the "
                            "current file (saving)")
        self.job.cancel_button.clicked.connect(self.cancel)
        self.progress_timer = QTimer(self)
        self.progress_timer.setInterval(PROGRESS_MS)
        self.progress_timer.timeout.connect(self._show_step)

        self.pairs = tip(QListWidget(), "Generated pairs open in the viewer: select the ones to save")
        self.pairs.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.save_all = tip(QCheckBox("all pairs"), "Save every generated pair, not only the selected ones")
        self.out_dir = PathField("", "dir", "Folder for generated pairs",
                                 tooltip="gen_NNN_FLAIR.nii.gz + gen_NNN_FLAIR_roi.nii.gz + gen_NNN.json go here: a "
                                         "folder the FCD data widget and training read directly")
        self.real_case = layer_choice(napari_viewer, Image, "The real FLAIR to compare with (its lesion Labels layer "
                                                            "on the same grid comes along when one is open)",
                                      keep=lambda layer: not (layer.metadata.get("neuromf") or {}).get("generated"))
        self.compare_button = tip(QPushButton("Side by side"),
                                  "Open a second window: the real case (left) on the generated pair's grid, as "
                                  "training sees it, and the selected pair (right); one slice position and one "
                                  "grey window for both")
        self.compare_button.clicked.connect(self.compare)
        self.compare_viewer: Any = None
        self.save_button = tip(QPushButton("Save pairs"), "Write the selected pairs (or all) as NIfTI")
        self.save_button.clicked.connect(self.save_pairs)
        # let go of the viewer at its first layer change after the dock is deleted (`_refresh_pairs`), not from the
        # dock's own `destroyed` signal (a callback of a widget's destruction segfaulted once, see `layer_choice`)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_pairs)

        form = QFormLayout()
        form.addRow("Model", self.adapter)
        self.offer_label = QLabel("Last trained")
        self.offer_label.setVisible(False)
        form.addRow(self.offer_label, self.offer_row)
        form.addRow("Mode", self.mode)
        form.addRow("Scan", self.scan.native)
        form.addRow("Lesion", self.lesion.native)
        form.addRow("Lesion sites", self.site.native)
        form.addRow("Pairs", self.n)
        form.addRow("Seed", self.seed)
        self.advanced = QWidget()  # collapsed: the defaults make lesion pairs; these change how
        advanced_form = QFormLayout(self.advanced)
        advanced_form.setContentsMargins(0, 0, 0, 0)
        advanced_form.addRow("FLAIR drawn by", self.render)
        advanced_form.addRow("Lesion brightness", self.guidance)
        advanced_form.addRow("Mask commitment", self.joint_guidance)
        advanced_form.addRow("Sampler", self.sampler)
        advanced_form.addRow("Network steps", self.steps)
        advanced_form.addRow("Device", self.device)
        self.advanced.setVisible(False)
        self.advanced_toggle = tip(QToolButton(), "Show the settings that change how pairs are drawn")
        self.advanced_toggle.setText("Advanced")
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.RightArrow)
        self.advanced_toggle.toggled.connect(self._toggle_advanced)
        layout = QVBoxLayout(self)
        layout.addWidget(help_link("user_guide.md", "Help: generating pairs"))
        layout.addLayout(form)
        layout.addWidget(self.advanced_toggle)
        layout.addWidget(self.advanced)
        layout.addWidget(self.generate_button)
        layout.addWidget(self.estimate)
        layout.addWidget(self.job)
        box = QGroupBox("Save")
        box_layout = QVBoxLayout(box)
        box_layout.addWidget(self.pairs, 1)
        save_form = QFormLayout()
        save_form.addRow("Which", self.save_all)
        save_form.addRow("Save into", self.out_dir)
        box_layout.addLayout(save_form)
        box_layout.addWidget(self.save_button)
        compare_row = QHBoxLayout()
        compare_row.addWidget(QLabel("Compare with"))
        compare_row.addWidget(self.real_case.native, 1)
        compare_row.addWidget(self.compare_button)
        box_layout.addLayout(compare_row)
        layout.addWidget(box, 1)
        self._refresh_pairs()
        dock_title(self, self.TITLE)
        when_backend_ready(self, self._fill_defaults)

    def _fill_defaults(self, env: _environment.Environment) -> None:
        current = self.device.currentText()
        self.device.clear()
        self.device.addItems(list(env.devices))
        self.device.setCurrentText(current)
        if _state.STATE.last_adapter is not None and Path(_state.STATE.last_adapter).is_dir():
            self._new_adapter(_state.STATE.last_adapter)
        self.out_dir.fill(str(_state.user_folder() / "generated"))
        self._show_estimate()
        QTimer.singleShot(0, self._refresh_pairs)  # once ready: the figures of pairs opened before (samples)

    def time_estimate(self) -> Any:
        """The estimate of generating with the form's settings (`neuromf.estimates`), or None (no rate)."""
        from neuromf.generation.estimates import generation_run_estimate

        mode, adapter = self.mode.currentText(), self.adapter.text() or DEFAULT_ADAPTER
        pairs = 1 if mode == "inpaint" else self.n.value()  # inpainting puts one lesion into the scan
        return generation_run_estimate(adapter, mode, pairs, self.steps.value(), self.render.text() or None,
                                       chosen_guidance(self.guidance), prior_lesions=self.lesion.value == PRIOR_LESION)

    def _show_estimate(self, *_: Any) -> None:
        if not _environment.environment_ready():  # the backend is imported in a worker first
            return
        estimate = self.time_estimate()
        self.estimate.setText("Expected time: " + (estimate.describe() if estimate else "no measured rate"))

    def _disconnect(self, *_: Any) -> None:
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.disconnect(self._refresh_pairs)

    def _mode_chosen(self, mode: str) -> None:
        sampler, steps = MODE_SAMPLING[mode]
        self.sampler.setCurrentText(sampler)
        self.steps.setValue(steps)

    def _toggle_mode_fields(self, *_: Any) -> None:
        self.scan.enabled = self.mode.currentText() == "inpaint"
        self.lesion.enabled = self.mode.currentText() in ("conditional", "inpaint")
        self.site.enabled = self.mode.currentText() == "joint"
        self.render.setEnabled(self.mode.currentText() == "joint")
        self.guidance.setEnabled(self.mode.currentText() in ("conditional", "inpaint") or bool(self.render.text()))
        self.joint_guidance.setEnabled(self.mode.currentText() == "joint")

    def _refresh_pairs(self, *_: Any) -> None:
        """The list of open generated pairs, each with its lesion figures and the lesion check's verdict (worked
        out in a worker for a pair opened without them, e.g. a sample). Once the dock is deleted (closed while the
        viewer lives on) it disconnects itself from the viewer instead."""
        try:
            selected = set(self.selected_pairs())
        except RuntimeError:  # the dock's Qt objects are gone
            self._disconnect()
            return
        self.pairs.clear()
        for prefix, info in _generate_run.generated_pairs(self.viewer.layers).items():
            if "lesion" not in info and getattr(self, "ready", False):
                self._work_out_figures(prefix)
            item = QListWidgetItem(f"{prefix} · {_generate_run.pair_summary(info.get('lesion'))}")
            item.setData(Qt.UserRole, prefix)
            item.setToolTip(f"{prefix}: {_generate_run.describe_lesion(info.get('lesion'))}")
            self.pairs.addItem(item)
            item.setSelected(prefix in selected)

    def _work_out_figures(self, prefix: str) -> None:
        names = (f"{prefix} FLAIR", f"{prefix} lesion")
        pending = self.__dict__.setdefault("_figures_pending", set())
        if prefix in pending or not all(name in self.viewer.layers for name in names):
            return
        image, lesion = (self.viewer.layers[name] for name in names)
        affine = _generate_run.layer_affine(image.as_layer_data_tuple()[1])
        info = dict(image.metadata.get("neuromf") or {})
        pending.add(prefix)
        worker = create_worker(_generate_run.figures_of_layers, np.array(image.data), np.array(lesion.data), affine,
                               info)

        def done(figures: dict) -> None:
            pending.discard(prefix)
            for layer in (image, lesion):  # the layers may have gone meanwhile: then nothing to show
                if layer in self.viewer.layers:
                    layer.metadata = {**layer.metadata, "neuromf": {**layer.metadata.get("neuromf", {}),
                                                                    "lesion": figures}}
            self._refresh_pairs()

        worker.returned.connect(done)
        worker.errored.connect(lambda *_: pending.discard(prefix))
        start_worker(worker)

    def selected_pairs(self) -> list[str]:
        """Names (``gen_000``) of the pairs selected in the list."""
        return [item.data(Qt.UserRole) for item in self.pairs.selectedItems()]

    def _toggle_advanced(self, shown: bool) -> None:
        self.advanced.setVisible(shown)
        self.advanced_toggle.setArrowType(Qt.DownArrow if shown else Qt.RightArrow)

    def _new_adapter(self, adapter: Path) -> None:
        """A trained adapter is offered, never switched to, and only once its own quick lesion check passed: a
        short training often draws empty masks or lesions outside the brain. One line says which adapter and what
        its check found; the tooltip has the details."""
        from neuromf.estimates import format_duration
        from neuromf.generation.adapter_check import AdapterCheck

        self.offer_row.setVisible(True)
        self.offer_label.setVisible(True)
        name = _adapter_name(adapter)
        check = _state.STATE.adapter_check(adapter)
        self.check_latest.setEnabled(True)  # while a job runs, a press says so (start_check)
        self.use_latest.setEnabled(bool(check and check.get("recommended")))
        if check is None:
            estimate = _generate_run.check_estimate(adapter)
            took = f" (a check takes about {format_duration(estimate.seconds)})" if estimate else ""
            self.offer.setText(f"{name}: not checked yet{took}")
            self.offer.setToolTip("Your last trained adapter is not selected. 'Check it' draws a few pairs and puts "
                                  "their masks through the lesion check" + (f" ({estimate.describe()})" if estimate
                                                                            else "")
                                  + "; 'Use it' is offered once every pair passes.")
            return
        result = AdapterCheck.from_dict(check)
        if result.recommended:
            self.offer.setText(f"{name}: {result.summary()}")
            self.offer.setToolTip(f"Its quick check: {result.reason}. 'Use it' selects it; each pair still gets its "
                                  "own lesion check.")
        else:
            self.offer.setText(f"{name}: not recommended, {result.summary()}")
            self.offer.setToolTip(f"Its quick check: {result.reason}.")

    def _use_latest(self) -> None:
        adapter = _state.STATE.last_adapter
        if adapter is None:
            show_info("Generate: no LoRA run has finished yet")
            return
        check = _state.STATE.adapter_check(adapter)
        if not (check and check.get("recommended")):
            show_warning("Generate: the last trained adapter has not passed its quick lesion check; press 'Check it'")
            return
        self.adapter.setText(str(adapter))
        self.offer.setText(f"{_adapter_name(adapter)}: selected (its quick check passed)")
        self.offer.setToolTip("Each pair it draws still gets its own lesion check, shown in the pair list.")

    def start_check(self) -> Any:
        """The last trained adapter's quick lesion check, in a worker with progress and Cancel."""
        adapter = _state.STATE.last_adapter
        if self.busy:
            show_warning("Generate: a job is already running")
            return None
        if adapter is None or not Path(adapter).is_dir():
            show_info("Generate: no trained adapter to check")
            return None
        self.run = _generate_run.AdapterCheckRun(str(adapter), device=self.device.currentText())
        self.generate_button.setEnabled(False)
        self.check_latest.setEnabled(False)
        self.job.begin(self.run.progress_text())
        self.progress_timer.start()
        worker = create_worker(self.run.drive)
        worker.yielded.connect(self._on_checked)
        worker.finished.connect(self._check_finished)
        return launch(self, worker)

    def _on_checked(self, item: Any) -> None:
        if isinstance(item, Failure):
            show_error(item.message)
            self.job.fail(item.message)
            return
        _state.STATE.remember_check(item.adapter, item.to_dict())

    def _check_finished(self) -> None:
        self.progress_timer.stop()
        self.generate_button.setEnabled(True)
        run = self.run
        if run.failure is None:
            self.job.finish("Lesion check cancelled" if run.check is None else
                            f"Lesion check: {'recommended' if run.check.recommended else 'not recommended'}: "
                            f"{run.check.reason}")
        if _state.STATE.last_adapter is not None:
            self._new_adapter(_state.STATE.last_adapter)

    # -- generating ---------------------------------------------------------------------------------------
    def start(self) -> Any:
        if self.busy:
            show_warning("Generate: a job is already running")
            return None
        adapter = self.adapter.text() or DEFAULT_ADAPTER
        if adapter not in EMBEDDED_NAMES and not Path(adapter).is_dir():
            show_error(f"Generate: adapter folder {adapter} does not exist")
            return None
        mode, lesion = self.mode.currentText(), None
        chosen = self.lesion.value
        if mode in ("conditional", "inpaint") and chosen != PRIOR_LESION:
            if chosen is None or chosen not in self.viewer.layers:
                show_error("Generate: the chosen Labels layer is no longer open")
                return None
            data, state, _ = chosen.as_layer_data_tuple()
            if not np.asarray(data).any():
                show_error(f"Generate: Labels layer {chosen.name!r} is empty: paint a lesion first")
                return None
            lesion = (np.asarray(data).copy(), state)  # a copy: the user may keep painting while we generate
        sites = None
        chosen_sites = self.site.value
        if mode == "joint" and chosen_sites != DRAWN_SITES:
            if chosen_sites is None or chosen_sites not in self.viewer.layers:
                show_error("Generate: the chosen Points layer is no longer open")
                return None
            if not len(chosen_sites.data):
                show_error(f"Generate: Points layer {chosen_sites.name!r} has no points: add a point where the "
                           "lesion should go")
                return None
            sites = np.array([chosen_sites.data_to_world(point) for point in chosen_sites.data])
        scan = None
        if mode == "inpaint":
            chosen_scan = self.scan.value
            if chosen_scan is None or chosen_scan not in self.viewer.layers:
                show_error("Generate: inpaint needs a scan: open a FLAIR (Image layer) and choose it under Scan")
                return None
            scan_data, scan_state, _ = chosen_scan.as_layer_data_tuple()
            scan = (np.asarray(scan_data).copy(), scan_state)
        render = self.render.text() if mode == "joint" else ""
        if render and render not in EMBEDDED_NAMES and not Path(render).is_dir():
            show_error(f"Generate: conditional adapter folder {render} (Render with) does not exist")
            return None
        self.run = _generate_run.GenerateRun(adapter, self.n.value(), self.steps.value(), self.seed.value(),
                                        self.device.currentText(), mode=mode, lesion=lesion,
                                        method=self.sampler.currentText(), render=render or None,
                                        guidance=chosen_guidance(self.guidance),
                                        joint_guidance=chosen_guidance(self.joint_guidance), sites_world=sites,
                                        scan=scan)
        self.generate_button.setEnabled(False)
        self.job.begin(self.run.progress_text())
        self.run.estimate = self.time_estimate()
        self.progress_timer.start()
        worker = create_worker(self.run.drive)
        worker.yielded.connect(self._on_pair)
        worker.finished.connect(self._generation_finished)
        return launch(self, worker)

    def cancel(self) -> None:
        if self.run is not None and self.busy:
            self.run.cancel.set()
            self.job.status.setText("Cancelling within one network step; the pairs done so far stay ...")

    def _show_step(self) -> None:
        """Timer: the run's network step on the bar (the worker only writes attributes; no signal per step)."""
        run = self.run
        if not isinstance(run, _generate_run.GenerateRun) or run.cancelled:
            return
        if run.step is None:
            self.job.waiting(run.progress_text())
            return
        i, n = run.step
        self.job.bar.setRange(0, max(1, n))
        self.job.bar.setValue(i)
        left = run.time_left_s()
        eta = "" if left is None else f" · ETA {format_eta(left)}"
        self.job.bar.setFormat(f"pair {min(run.pairs + 1, run.n)} / {run.n} · step %v / %m{eta}")
        self.job.status.setText(run.progress_text())

    def _next_number(self) -> int:
        """After the pairs open in the viewer and those still being added (`add_layers` adds them a turn apart)."""
        waiting = [kwargs.get("metadata", {}).get("neuromf", {}) for _, kwargs, _ in pending_layer_tuples(self)]
        prefixes = [*_generate_run.generated_prefixes(self.viewer.layers), *(info.get("pair", "") for info in waiting)]
        numbers = [int(p.split("_")[1]) for p in prefixes if p.split("_")[-1].isdigit()]
        return max(numbers, default=-1) + 1

    def _on_pair(self, pair: Any) -> None:
        if isinstance(pair, Failure):
            show_error(pair.message)
            self.job.fail(pair.message)
            return
        if isinstance(pair, Caution):  # generation goes on; the caution stays in view in the status
            show_warning(pair.message)
            return
        run = self.run
        meta = {**(pair.meta or {}), "generated": True, "seed": run.seed, "sample_index": int(pair.index),
                "steps": run.steps, "checkpoint": (pair.meta or {}).get("adapter", run.adapter)}
        prefix = f"gen_{self._next_number():03d}"
        add_layers(self, pair_layers(prefix, pair.image, pair.mask, pair.affine, meta),
                   then=lambda layers: self._show_pair(run, layers))
        self.job.status.setText("\n".join([f"{prefix}: {_generate_run.describe_lesion(meta.get('lesion'))}",
                                           *run.cautions]))

    def _show_pair(self, run: _generate_run.GenerateRun, layers: list) -> None:
        """A pair's layers are in: shown alone when scans on other grids were open (hidden, not removed); the run
        keeps the note for its closing status."""
        if not show_alone(self.viewer, layers):
            return
        run.view_note = view_guard(self.viewer).alone_note
        self.job.status.setText("\n".join([self.job.status.text(), run.view_note]))

    def _generation_finished(self) -> None:
        self.progress_timer.stop()
        self.generate_button.setEnabled(True)
        run = self.run
        if run.failure is None:
            cancelled = " (cancelled)" if run.cancelled else ""
            self.job.count(run.pairs, run.n, "pairs")
            self.job.finish("\n".join([f"Generated {run.pairs} of {run.n} pairs{cancelled}", *run.cautions,
                                       *([run.view_note] if run.view_note else [])]))
        self._show_estimate()  # the run may have recorded this machine's pace

    # -- comparing ----------------------------------------------------------------------------------------
    def compare(self) -> Any:
        """The chosen real case | the first selected (else the last) generated pair, side by side in a second
        viewer; the resampling runs in a worker."""
        pairs = self.selected_pairs() or _generate_run.generated_prefixes(self.viewer.layers)[-1:]
        real = self.real_case.value
        if not pairs:
            show_warning("Generate: generate a pair first, then compare it with a real case")
            return None
        if real is None or real not in self.viewer.layers:
            show_warning("Generate: open a real FLAIR to compare with (File > Open or the FCD data dock)")
            return None
        prefix = pairs[0]
        image, lesion = self.viewer.layers[f"{prefix} FLAIR"], self.viewer.layers[f"{prefix} lesion"]
        real_lesion = next((layer for layer in self.viewer.layers if isinstance(layer, Labels)
                            and not (layer.metadata.get("neuromf") or {}).get("generated")
                            and pair_mismatch(real, layer) is None), None)

        def snapshot(layer: Any) -> tuple[Any, dict]:
            data, state, _ = layer.as_layer_data_tuple()
            return np.asarray(data), state

        worker = create_worker(_compare.build_comparison, snapshot(real),
                               None if real_lesion is None else snapshot(real_lesion), snapshot(image),
                               snapshot(lesion))
        worker.returned.connect(self._show_comparison)
        worker.errored.connect(lambda err: show_error(f"Generate: cannot compare {real.name} with {prefix}: {err}"))
        self.compare_button.setEnabled(False)
        worker.finished.connect(lambda: self.compare_button.setEnabled(True))
        self.compare_worker = worker
        start_worker(worker)
        return worker

    def _show_comparison(self, comparison: _compare.Comparison) -> None:
        self.compare_viewer = self.new_viewer(title=f"NeuroMF: {comparison.real_name} | {comparison.pair_name}")
        _compare.show_comparison(self.compare_viewer, comparison)

    @staticmethod
    def new_viewer(**kwargs: Any) -> Any:
        """The second window of a comparison (a napari viewer of its own)."""
        import napari

        return napari.Viewer(**kwargs)

    # -- saving -------------------------------------------------------------------------------------------
    def chosen_prefixes(self) -> list[str]:
        everything = _generate_run.generated_prefixes(self.viewer.layers)
        if self.save_all.isChecked():
            return everything
        selected = set(self.selected_pairs())
        return [p for p in everything if p in selected]

    def save_pairs(self) -> Any:
        """The chosen pairs as ``gen_XXX_FLAIR.nii.gz`` + ``gen_XXX_FLAIR_roi.nii.gz`` (+ JSON), in a worker."""
        if self.busy:
            show_warning("Generate: a job is already running")
            return None
        prefixes = self.chosen_prefixes()
        if not prefixes:
            show_warning("Generate: select the pairs to save in the list (or tick 'all pairs')")
            return None
        snapshots = []
        for prefix in prefixes:
            image, lesion = f"{prefix} FLAIR", f"{prefix} lesion"
            if image not in self.viewer.layers or lesion not in self.viewer.layers:
                show_warning(f"Generate: {prefix} is missing its FLAIR or lesion layer; skipped")
                continue
            # copies taken now: saving runs in the background while the user may keep editing
            snapshots.append((prefix, *((np.array(layer.data), layer.as_layer_data_tuple()[1])
                                        for layer in (self.viewer.layers[image], self.viewer.layers[lesion]))))
        folder = Path(self.out_dir.text() or _state.user_folder() / "generated")
        self.run = _generate_run.SaveRun(folder, snapshots)
        self.job.begin(f"Saving {len(snapshots)} pairs into {folder} ...", total=len(snapshots))
        self.save_button.setEnabled(False)
        worker = create_worker(self.run.drive)
        worker.yielded.connect(self._on_saved)
        worker.finished.connect(self._saving_finished)
        return launch(self, worker)

    def _on_saved(self, item: Any) -> None:
        if isinstance(item, Failure):
            show_error(item.message)
            self.job.fail(item.message)
            return
        self.job.count(len(self.run.written) // 2, len(self.run.pairs), "pairs saved")

    def _saving_finished(self) -> None:
        self.save_button.setEnabled(True)
        run = self.run
        if run.failure is None:
            message = f"Saved {len(run.written) // 2} pairs in {run.folder}"
            self.job.finish(message + (" (cancelled)" if run.cancel.is_set() else ""))


__all__ = ["DRAWN_SITES", "GENERATION_MODES", "PRIOR_LESION", "GenerateWidget"]
