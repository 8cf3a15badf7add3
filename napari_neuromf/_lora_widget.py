"""LoRA fine-tuning dock widget: the form, explicit run folders (new / resume / overwrite), progress, loss plot."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QPointF, QRectF, Qt, QTimer
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_neuromf import _environment, _jobs, _state, _training_run
from napari_neuromf._helpers import (
    JobPanel,
    PathField,
    add_layer,
    debounce_timer,
    dock_title,
    float_box,
    help_link,
    launch,
    tip,
    when_backend_ready,
)
from napari_neuromf._jobs import Failure, Phase, format_eta
from napari_neuromf._layers import pair_layers
from napari_neuromf._training_run import NEW_RUN, RESUME, RUN_MODES
from napari_neuromf._viewing import view_guard
from neuromf.weights import EMBEDDED_NAMES

if TYPE_CHECKING:
    import napari

REFRESH_S = 1.0  # the bar, status line and loss plot refresh at most once per second during training
STRATEGY_TIPS = ("auto: use the recommendation of the last Mask-VAE test\n"
                 "vae: encode the mask with the image VAE (8 latent channels)\n"
                 "downsample: shrink the mask to the latent grid (5 latent channels)\n"
                 "sdf: shrink the mask as a signed distance map (keeps small lesions)")
DEVICE_TIP = ("auto: the first GPU when there is one, else the CPU\n"
              "cpu: the CPU (slow: use the joint_3mm starting values)\n"
              "cuda:N: that GPU\n"
              "all GPUs (N): one process per GPU, started by PyTorch's torchrun, each training on its share of "
              "every batch (the batch size is the total over all GPUs)")
RUN_MODE_TIPS = {NEW_RUN: "Train from scratch in a fresh folder (a new timestamped folder when this one is used)",
                 RESUME: "Continue the run saved in the output folder from its last checkpoint",
                 _training_run.OVERWRITE: "Delete the run in the output folder and train from scratch there"}


class LoRAWidget(QWidget):
    """LoRA fine-tuning of the base MeanFlow model on FCD image + mask latents, in a background thread."""

    TITLE = "LoRA fine-tuning"  # as in napari.yaml: the dock tab's text

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        view_guard(napari_viewer)  # axial view, caption and orientation letters for every volume added
        self.busy = False  # a worker of this widget is running
        self.run: _training_run.TrainingRun | None = None
        self.worker = None

        self.config = tip(QComboBox(), "Starting values for the form: joint_3mm is sized for a CPU (3 mm grid), "
                                       "joint_2mm is the shipped 2 mm recipe, joint_gpu is for a GPU; the expected "
                                       "time of the form's values shows under Start")
        self.base = PathField("embedded", "dir", "Base checkpoint folder (model.safetensors + model.json)",
                              tooltip="The healthy-brain model to adapt: 'embedded' = the 2 mm one shipped with "
                                      "NeuroMF, 'embedded-3mm' = the 3 mm one (what joint_3mm is sized for), or "
                                      "a folder with model.safetensors + model.json")
        self.data = PathField("embedded", "dir", "FCD dataset folder",
                              tooltip="Training cases (FLAIR + lesion mask): 'embedded' = the shipped 2 mm "
                                      "phantoms, 'embedded-3mm' = the 3 mm ones")
        self.rank = tip(QSpinBox(), "Size of the LoRA update matrices: higher learns more, trains slower")
        self.rank.setRange(1, 256)
        self.alpha = tip(float_box(0.1, 1024, 1.0, 1), "Scale of the LoRA update (often equal to the rank)")
        self.targets = tip(QLineEdit(), "Network layers that get a LoRA update, comma separated (e.g. to_q, to_k, "
                                        "to_v: the attention projections)")
        self.strategy = tip(QComboBox(), STRATEGY_TIPS)
        self.strategy.addItems(["auto", "vae", "downsample", "sdf"])
        self.p_img = tip(float_box(0.5, 4.0, 0.1, 2), "Exponent of the image part of the loss (2 = squared error; "
                                                      "lower is more robust to outliers)")
        self.p_mask = tip(float_box(0.5, 4.0, 0.1, 2), "Exponent of the mask part of the loss")
        self.lr = tip(float_box(1e-7, 1.0, 1e-5, 7), "Learning rate of the optimizer")
        self.epochs = tip(QSpinBox(), "Passes over the training cases (used when Max steps is 'by epochs')")
        self.epochs.setRange(1, 1_000_000)
        self.max_steps = tip(QSpinBox(), "Stop after this many training steps ('by epochs': use Epochs)")
        self.max_steps.setRange(0, 100_000_000)
        self.max_steps.setSpecialValueText("by epochs")
        self.batch_size = tip(QSpinBox(), "Cases per training step: lower it when memory runs out")
        self.batch_size.setRange(1, 1024)
        self.preview_every = tip(QSpinBox(), "Every N steps, generate one sample and show it as 'preview 0' layers")
        self.preview_every.setRange(0, 1_000_000)
        self.preview_every.setSpecialValueText("off")
        self.device = tip(QComboBox(), DEVICE_TIP)
        self.device_plans: dict[str, _environment.DevicePlan] = {}
        self.set_device_plans(_environment.device_plans(0))
        self.output = PathField("", "dir", "Output folder",
                                tooltip="The run's folder: checkpoints, the adapter, losses.csv")
        self.run_mode = tip(QComboBox(), "\n".join(f"{m}: {t}" for m, t in RUN_MODE_TIPS.items()))
        self.run_mode.addItems(list(RUN_MODES))
        self.start_button = tip(QPushButton("Start"), "Start training as chosen under Run")
        self.stop_button = tip(QPushButton("Stop"), "Stop after the current step: a checkpoint and the adapter are "
                                                    "saved, and Run switches to Resume")
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.setEnabled(False)
        self._estimate_timer = debounce_timer(self, self._show_estimate)
        self.estimate = QLabel("")
        self.estimate.setWordWrap(True)
        self.estimate.setToolTip("How long the run should take here, from rates measured on the machine named: "
                                 "loading, encoding each training case (first run only; cached after) and each "
                                 "step at this batch size; scaled by the load now and, once a run has trained "
                                 "here, by this machine's own pace in its last runs")
        for signal in (self.config.currentTextChanged, self.max_steps.valueChanged, self.epochs.valueChanged,
                       self.batch_size.valueChanged, self.data.edit.textChanged):
            signal.connect(self._estimate_timer.start)
        self.job = JobPanel("Stop after the current step (same as Stop)")
        self.job.cancel_button.clicked.connect(self.stop)
        self.progress_bar, self.status = self.job.bar, self.job.status
        self._preparing = QTimer(self)  # counts the seconds of loading the models, before the encoding counts
        self._preparing.setInterval(1000)
        self._preparing.timeout.connect(self._show_preparing)
        self._phase = ("", 0.0)
        self._pending: Any = None  # the newest step event not shown yet
        self._last_refresh = 0.0  # time.monotonic() of the last refresh of the bar, status line and plot
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.timeout.connect(self._refresh)

        self.loss_plot = LossPlot(getattr(napari_viewer, "theme", "dark"))
        self.loss_plot.setToolTip("Raw training loss per step, log scale: the unweighted distance between the "
                                  "model's velocity and the target (after Resume: the earlier steps too). The "
                                  "objective the optimiser minimises is adaptive-weighted and stays about 1")

        form = QFormLayout()
        form.addRow("Starting values", self.config)
        form.addRow("Base model", self.base)
        form.addRow("Training data", self.data)
        form.addRow("LoRA rank", self.rank)
        form.addRow("LoRA scale (alpha)", self.alpha)
        form.addRow("Adapted layers", self.targets)
        form.addRow("Mask encoding", self.strategy)
        form.addRow("Image loss exponent", self.p_img)
        form.addRow("Mask loss exponent", self.p_mask)
        form.addRow("Learning rate", self.lr)
        form.addRow("Epochs", self.epochs)
        form.addRow("Max steps", self.max_steps)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Preview every (steps)", self.preview_every)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.output)
        form.addRow("Run", self.run_mode)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addWidget(help_link("user_guide.md", "Help: fine-tuning an adapter"))
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.estimate)
        layout.addWidget(self.job)
        layout.addWidget(self.loss_plot, 1)

        self.config.currentTextChanged.connect(self.fill_from_config)
        dock_title(self, self.TITLE)
        when_backend_ready(self, self._fill_defaults)

    def _fill_defaults(self, env: _environment.Environment) -> None:
        """Configs sized for this machine first (the remembered one if any), devices, the next run folder."""
        self.set_device_plans(env.device_plans)
        self.config.blockSignals(True)
        self.config.clear()
        self.config.addItems(list(env.lora_configs))
        remembered = _state.STATE.last_config
        if remembered in env.lora_configs:
            self.config.setCurrentText(remembered)
        self.config.blockSignals(False)
        if self.config.count():
            self.fill_from_config(self.config.currentText())
        runs = Path(_state.STATE.last_run_dir).parent if _state.STATE.last_run_dir else \
            _state.user_folder() / "runs"
        self.output.fill(str(_training_run.fresh_run_folder(runs)))

    def set_device_plans(self, plans: dict[str, _environment.DevicePlan]) -> None:
        """The Device choices, each a label and what it runs (processes, training.device)."""
        current = self.device.currentText()
        self.device_plans = dict(plans)
        self.device.clear()
        self.device.addItems(list(plans))
        if current in plans:
            self.device.setCurrentText(current)

    @property
    def device_plan(self) -> _environment.DevicePlan:
        label = self.device.currentText()
        return self.device_plans.get(label) or _environment.DevicePlan(1, label or "auto")

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
        if cfg.data.data_dir in EMBEDDED_NAMES:  # the shipped base of the config's grid (joint_3mm: the 3 mm one)
            self.base.setText(cfg.data.data_dir)
        if cfg.training.device in [self.device.itemText(i) for i in range(self.device.count())]:
            self.device.setCurrentText(cfg.training.device)

    def time_estimate(self, settings: dict[str, Any] | None = None) -> Any:
        """The estimate of training with the form's settings (`neuromf.estimates`), or None: no rate for the
        config, or the data folder cannot be read (the start reports why)."""
        from neuromf.pipelines.estimates import training_run_estimate

        config = self.config.currentText()
        settings = dict(settings or self.settings())
        if settings.get("data.mask_strategy") == "auto":  # the time does not hang on which test result decides
            settings["data.mask_strategy"] = "downsample"
        try:
            return training_run_estimate(config, _training_run.build_lora_config(config, settings))
        except Exception:  # a half-typed field or a missing folder: no estimate now, the start says what is wrong
            return None

    def _show_estimate(self, *_: Any) -> None:
        if not _environment.environment_ready():  # the backend is imported in a worker first
            return
        estimate = self.time_estimate()
        self.estimate.setText("Expected time: " + (estimate.describe() if estimate else "no measured rate for "
                                                   "this configuration"))

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
            "training.device": self.device_plan.device,
            "training.output_dir": self.output.text(),
        }

    def _refuse(self, message: str) -> None:
        show_error(message)
        self.job.fail(message)

    def start(self, overrides: dict[str, Any] | None = None) -> Any:
        """Start, resume or overwrite (as chosen under Run) in a thread worker; ``overrides`` adds config keys.

        The config is read and checked here (a small YAML file and the base checkpoint's JSON sidecar), so a bad
        setting is reported before anything starts; everything heavy runs in the worker.
        """
        if self.busy:
            show_warning("LoRA fine-tuning: a run is already in progress; press Stop first")
            return None
        if not self.ready:
            show_warning("LoRA fine-tuning: still loading the backend; try again in a moment")
            return None
        if not self.output.text():
            self._refuse("LoRA fine-tuning: choose an output folder")
            return None
        settings = {**self.settings(), **(overrides or {})}
        if not settings["lora.target_modules"]:
            self._refuse("LoRA fine-tuning: list at least one adapted layer (e.g. to_q, to_k, to_v)")
            return None
        mode = self.run_mode.currentText()
        folder, resume, overwrite, note = _training_run.plan_run_folder(settings["training.output_dir"], mode)
        settings["training.output_dir"] = str(folder)
        config = self.config.currentText() or "joint_3mm"
        try:
            cfg = _training_run.build_lora_config(config, settings)
        except Exception as err:  # config errors name the key; missing mask test names the remedy
            self._refuse(_jobs.describe_error(err, "LoRA fine-tuning"))
            return None
        self.output.setText(str(folder))
        history = self.run.plotted if self.run is not None and self.run.out_dir == folder else \
            _training_run.loss_history(folder)
        plan = self.device_plan
        common = {"resume": resume, "overwrite": overwrite, "history": history if resume else [], "config": config}
        if plan.nproc > 1:  # local processes under torchrun; their events arrive as from the thread
            self.run = _training_run.ProcessTrainingRun(cfg, settings["base_checkpoint"], nproc=plan.nproc,
                                                   device=plan.device, **common)
        else:
            self.run = _training_run.TrainingRun(cfg, settings["base_checkpoint"], **common)
        _state.STATE.remember(last_config=config)
        self.destroyed.connect(self.run.stop.set)  # closing the dock stops the run (checkpoint + adapter saved)
        self._plot()
        self._set_running(True)
        estimate = self.time_estimate(settings)
        self.job.begin(f"{note} Expected time: {estimate.describe()}." if estimate else note)
        worker = create_worker(self.run.drive)
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_done)
        worker.finished.connect(self._on_finished)
        return launch(self, worker)

    def stop(self) -> None:
        """Ask the loop to stop: it saves a resumable checkpoint and the adapter, then returns. Before the first
        step (models loading, cases being encoded) the start ends after the current case, as a failed start."""
        if self.run is not None and self.busy:
            self.run.stop.set()
            if self.run.training_started:
                self.job.waiting("Stopping after the current step ...")
            else:
                self.job.waiting("Stopping: the start ends once the case being encoded is done (encoded cases stay "
                                 "cached) ...")
        self.stop_button.setEnabled(False)

    def _set_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.run_mode.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _show_preparing(self) -> None:
        message, since = self._phase
        self.job.status.setText(f"{message} {format_eta(time.monotonic() - since)} so far")

    def _on_event(self, event: Any) -> None:
        if isinstance(event, Failure):
            show_error(event.message)
            self.job.fail(event.message)
            return
        if isinstance(event, Phase):
            self._phase = (event.message, time.monotonic())
            self.job.waiting(event.message)
            self._preparing.start()
            return
        if self._preparing.isActive():
            self._preparing.stop()
        self.run.record(event)
        kind = event.kind
        if kind == "step":
            self._throttled_refresh(event)
        elif kind == "encoding":
            self._show_encoding(event)
        elif kind == "skipped":
            show_warning(f"LoRA fine-tuning: {event.message}")
            self.job.status.setText(f"LoRA fine-tuning: {event.message}")
        elif kind == "checkpoint":
            self._refresh()
            self.job.status.setText(f"checkpoint saved at step {event.step}: {event.path}")
        elif kind == "preview" and event.preview:
            self._show_previews(event)
        elif kind in ("done", "stopped"):
            self._refresh()  # the last steps, which the throttle may have held back
        # "epoch" events (every few steps) change nothing on screen: their steps were already counted

    def _throttled_refresh(self, event: Any) -> None:
        """Show a step at once when the last refresh is REFRESH_S old, else remember it for a timer that shows
        the newest one when the interval is over (so the last step of a burst is never left unshown).

        Every repaint of napari's window costs the GUI thread a composition of the whole window (about 9 ms on
        a software renderer), taken from the training thread: the bar, the status line and the plot are
        refreshed together, at most once per REFRESH_S, however many steps arrive in between.
        """
        self._pending = event
        wait_s = REFRESH_S - (time.monotonic() - self._last_refresh)
        if wait_s <= 0:
            self._refresh()
        elif not self._refresh_timer.isActive():
            self._refresh_timer.start(max(1, int(wait_s * 1000)))

    def _refresh(self) -> None:
        """Show the newest step not yet shown: count, ETA, loss and learning rate, and the loss plot."""
        self._refresh_timer.stop()
        event, self._pending = self._pending, None
        if event is None or self.run is None:
            return
        self._last_refresh = time.monotonic()
        total = event.total_steps or 0
        if total:
            self.job.count(min(event.step, total), total, "steps")
            self.progress_bar.setFormat(f"%v / %m steps  ·  ETA {format_eta(event.eta_s)}")
        if not self.run.stop.is_set():  # keep "Stopping ..." in view until the run has stopped
            lr = f"  learning rate {event.lr:.2e}" if event.lr else ""
            raw = (event.parts or {}).get("raw")
            loss = (f"  raw loss {raw:.4g}" if raw is not None else
                    f"  loss {event.loss:.4f}" if event.loss is not None else "")
            self.job.status.setText(f"step {event.step}/{total}{loss}{lr}")
        self._plot()

    def _show_encoding(self, event: Any) -> None:
        """Before the first step: cases encoded into latents so far, of how many, and the time left."""
        self.job.count(event.step, event.total_steps, "cases")
        self.progress_bar.setFormat(f"Encoding latents: %v / %m cases  ·  ETA {format_eta(event.eta_s)}")
        if self.run.stop.is_set():
            self.job.status.setText(f"Stopping after this case ({event.step} of {event.total_steps} encoded) ...")
        elif event.step < event.total_steps:
            self.job.status.setText(f"{event.message[:1].upper()}{event.message[1:]}; each scan is encoded once, "
                                    "later runs read it from the cache")
        else:
            self.job.status.setText(f"All {event.total_steps} training cases encoded; starting the first step ...")

    def _plot(self) -> None:
        self.loss_plot.set_points(self.run.plotted if self.run is not None else [])

    def _show_previews(self, event: Any) -> None:
        from neuromf.generation.images import model_grid_affine

        data = self.run.cfg.data
        for i, (image, mask) in enumerate(event.preview):
            affine = model_grid_affine(np.shape(image), data.spacing)
            meta = {"step": event.step, "run": str(self.run.out_dir), "preview": True}
            for t in pair_layers(f"preview {i}", image, mask, affine, meta):
                add_layer(self.viewer, t)

    def _on_done(self, result: Any) -> None:
        self._preparing.stop()
        self._refresh()  # a step still held back by the throttle
        if result is None:
            return
        if result.export:
            _state.STATE.set_adapter(Path(result.export), Path(result.out_dir))
        if self.run is not None and not isinstance(self.run, _training_run.ProcessTrainingRun):
            self.run.record_pace()  # one process on the CPU: what the rates measure
            self._show_estimate()
        verb = "Stopped" if result.stopped else "Finished"
        last = self.run.losses[-1] if self.run is not None and self.run.losses else None
        loss = f" (loss {last[1]:.4f} at step {last[0]})" if last else ""
        message = (f"{verb} at step {result.step}{loss}. Adapter: {result.export}. Checkpoint: {result.checkpoint}"
                   + (f". {result.skipped_steps} steps skipped" if result.skipped_steps else "")
                   + (". Press Start to resume it." if result.stopped else "."))
        # said in the widget only: a napari toast costs tens of ms of GUI thread while the training thread ends
        self.job.finish(message)
        self.progress_bar.setFormat("stopped at %v / %m" if result.stopped else "done: %v / %m")
        # the next Start continues a stopped run; after a finished one it starts afresh
        self.run_mode.setCurrentText(RESUME if result.stopped else NEW_RUN)

    def _on_finished(self) -> None:
        self._preparing.stop()
        self._refresh_timer.stop()
        self._set_running(False)
        if self.run is not None and self.run.failure is not None:
            self.progress_bar.setFormat("failed")
        elif self.run is not None and self.run.stopped_encoding is not None:
            self.job.finish(self._stopped_encoding_message())
            self.progress_bar.setFormat("stopped while encoding: %v / %m cases")
        elif self.run is not None and self.run.result is None:
            self.job.finish("Stopped before the first step")

    def _stopped_encoding_message(self) -> str:
        from neuromf.train.checkpoint import checkpoint_paths

        done, total = self.run.stopped_encoding
        folder = self.run.out_dir
        if checkpoint_paths(folder)[0].is_file():
            where = f"the run in {folder} is as it was: press Start to resume it"
        elif _training_run.holds_run(folder):
            where = f"{folder} holds no checkpoint: under Run choose 'Resume' to start it from step 0"
        else:
            where = f"nothing was left in {folder}, as after a failed start"
        return (f"Stopped before training, while encoding the training cases ({done} of {total} encoded; they stay "
                f"cached, so the next start skips them). Nothing was trained; {where}.")


class LossPlot(QWidget):
    """Loss per step as a line, painted with QPainter: a redraw costs well under a millisecond of GUI thread,
    where a matplotlib canvas took tens to hundreds (a stall, and time taken from the training thread)."""

    MARGINS = (72, 8, 10, 40)  # left (axis title and loss labels), top, right, bottom (step labels, axis title)

    def __init__(self, theme_name: str = "dark") -> None:
        super().__init__()
        self.points: list[tuple[int, float]] = []
        self.setMinimumHeight(160)
        self.setAttribute(Qt.WA_OpaquePaintEvent)  # paints its whole rectangle: the dock below is not repainted
        self.background, self.text, self.line = QColor("#262930"), QColor("#f0f1f2"), QColor("#3d9be9")
        try:
            from napari.utils.theme import get_theme

            theme = get_theme(theme_name)
            self.background, self.text = QColor(theme.background.as_hex()), QColor(theme.text.as_hex())
        except Exception:  # an unknown or custom theme: keep the dark defaults
            pass

    def set_points(self, points: list[tuple[int, float]]) -> None:
        self.points = list(points)
        self.update()  # painted with the next repaint, once however many updates came in between

    def paintEvent(self, event: Any) -> None:  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        painter.fillRect(self.rect(), self.background)
        left, top, right, bottom = self.MARGINS
        area = QRectF(left, top, max(1, self.width() - left - right), max(1, self.height() - top - bottom))
        painter.setPen(QPen(self.text, 1))
        painter.drawRect(area)
        painter.drawText(QRectF(0, area.bottom() + 18, self.width(), 20), Qt.AlignHCenter, "training step")
        log = bool(self.points) and min(v for _, v in self.points) > 0
        painter.save()  # the vertical axis title, turned a quarter
        painter.translate(12, area.center().y())
        painter.rotate(-90)
        # short enough for the dock's plot height ("raw loss (log scale)" was clipped); the tooltip says the rest
        painter.drawText(QRectF(-self.height() / 2, -10, self.height(), 20), Qt.AlignCenter,
                         "raw loss (log)" if log or not self.points else "raw loss")
        painter.restore()
        if not self.points:
            painter.drawText(area, Qt.AlignCenter, "the raw loss of each step appears here")
            return
        points = [(s, math.log10(v) if log else v) for s, v in self.points]
        steps, losses = zip(*points)
        x0, x1 = min(steps), max(steps)
        y0, y1 = min(losses), max(losses)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 1e-3 + 1e-9)
        shown = (lambda v: 10 ** v) if log else (lambda v: v)  # noqa: E731
        painter.drawText(QRectF(16, area.top() - 2, left - 20, 16), Qt.AlignRight, f"{shown(y1):.3g}")
        painter.drawText(QRectF(16, area.bottom() - 14, left - 20, 16), Qt.AlignRight, f"{shown(y0):.3g}")
        painter.drawText(QRectF(area.left(), area.bottom() + 2, 80, 16), Qt.AlignLeft, str(x0))
        painter.drawText(QRectF(area.right() - 80, area.bottom() + 2, 80, 16), Qt.AlignRight, str(x1))
        line = QPolygonF([QPointF(area.left() + (s - x0) / (x1 - x0) * area.width(),
                                  area.bottom() - (v - y0) / (y1 - y0) * area.height())
                          for s, v in decimate(points, int(area.width()))])
        painter.setPen(QPen(self.line, 1.5))
        painter.drawPolyline(line)


def decimate(points: list[tuple[int, float]], columns: int) -> list[tuple[int, float]]:
    """At most about four points per pixel column (first, lowest, highest, last of the steps falling in it), so a
    long run draws as fast as a short one and keeps its spikes."""
    if len(points) <= 4 * max(1, columns):
        return points
    steps = np.fromiter((s for s, _ in points), float, len(points))
    values = np.fromiter((v for _, v in points), float, len(points))
    column = ((steps - steps[0]) / max(steps[-1] - steps[0], 1) * (columns - 1)).astype(int)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], len(points)]
    keep = set()
    for a, b in zip(starts, ends):
        chunk = values[a:b]
        keep.update((a, b - 1, a + int(np.argmin(chunk)), a + int(np.argmax(chunk))))
    return [points[i] for i in sorted(keep)]


__all__ = ["REFRESH_S", "LoRAWidget", "LossPlot", "decimate"]
