"""LoRA training steps per second inside the napari worker (viewer open, layers shown) vs headless, same run.

Three ways to drive the same `neuromf.pipelines.joint.train_joint` generator with the same config, interleaved
repeat by repeat:

- headless: `neuromf.train.run_to_end` on the main thread (what the CLI does), no Qt event loop running;
- worker: the plugin's worker body (`napari_neuromf._training_run.TrainingRun.drive`) in
  `napari.qt.threading.create_worker`, while the main thread runs a Qt event loop with a shown napari viewer
  holding a FLAIR image and its lesion labels;
- widget: the LoRA dock widget itself (`LoRAWidget.start`), docked in that viewer, so its per-step handlers
  (progress bar, status text, loss plot redraw) run too.

Rate = steps/s between the first step after `--skip` warm-up steps and the last step, from timestamps taken
where the training generator yields (the worker thread for worker/widget). Target (issue 5): worker and widget
rates at least 0.9x headless. Needs a display:

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/bench_gui_worker.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchlib import base_parser, environment, finish, pick, ratio, setup_torch, target  # noqa: E402

from napari_neuromf import _training_run  # noqa: E402
from neuromf.data.phantom import PhantomConfig, make_phantom_dataset  # noqa: E402
from neuromf.io.bids import discover_cases  # noqa: E402
from neuromf.io.nifti import Preprocessing, preprocess_pair  # noqa: E402
from neuromf.models.flow_model import save_flow_model  # noqa: E402
from neuromf.models.unet import MeanFlowUNet  # noqa: E402
from neuromf.pipelines.joint import train_joint as train_lora  # noqa: E402
from neuromf.train import run_to_end  # noqa: E402
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper  # noqa: E402

TARGET_RATIO = 0.9
CONFIG = "demo_lora"
VARIANTS = ("headless", "worker", "widget")


@dataclass
class TimedRun(_training_run.TrainingRun):
    """The plugin's TrainingRun, timestamping step events where the generator yields them and where the GUI
    thread receives them."""

    yield_stamps: list[float] = field(default_factory=list)
    receive_stamps: list[float] = field(default_factory=list)
    worker_threads: int | None = None

    def drive(self):
        events = super().drive()
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    return done.value
                if getattr(event, "kind", None) == "step":
                    self.yield_stamps.append(time.perf_counter())
                    self.worker_threads = torch.get_num_threads()
                yield event
        finally:
            events.close()

    def record(self, event) -> None:
        super().record(event)
        if getattr(event, "kind", None) == "step":
            self.receive_stamps.append(time.perf_counter())


def steps_per_s(stamps: list[float], skip: int) -> float:
    kept = stamps[skip:]
    if len(kept) < 2:
        raise RuntimeError(f"only {len(stamps)} step events; raise --steps above --skip + 1")
    return (len(kept) - 1) / (kept[-1] - kept[0])


def make_tiny_base(root: Path, preset: str, grid: int, spacing: float, seed: int) -> Path:
    """A random UNet saved like a stage-1 model with a random `tiny` VAE (as tests/plugin/test_plugin_widgets.py)."""
    torch.manual_seed(seed)
    prep = Preprocessing(shape=(grid,) * 3, spacing=(spacing,) * 3)
    vae = MAISIVAEWrapper("tiny", scale_factor=1.0)
    vae_dir = vae.save(root / "vae_tiny", extra={"preprocessing": prep.key()})
    latent = grid // DOWNSAMPLE
    meta = {"vae": str(vae_dir), "vae_preset": "tiny", "vae_identity": vae.identity, "scale_factor": 1.0,
            "preprocessing": prep.key(), "latent_shape": [4, latent, latent, latent],
            "channels": {"image": 4, "mask": 0}, "stage": 1}
    save_flow_model(MeanFlowUNet(4, preset=preset), root / f"base_{preset}", meta)
    return root / f"base_{preset}"


def main() -> dict:
    parser = base_parser("bench_gui_worker", __doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="UNet preset of the random base model")
    parser.add_argument("--grid", type=int, default=32, help="phantom volume edge (32 -> 8^3 latents at 6 mm)")
    parser.add_argument("--cases", type=int, default=None, help="FCD phantom cases (default 4; quick: 2)")
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--rank", type=int, default=2, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 60; quick: 12)")
    parser.add_argument("--skip", type=int, default=None, help="first steps left out of the rate (default 5; "
                                                               "quick: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 5; quick: 2)")
    parser.add_argument("--preview-every", type=int, default=0, help="preview sample every N steps (0: off)")
    parser.add_argument("--ndisplay", type=int, default=2, choices=[2, 3], help="viewer display mode")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per GUI run")
    args = parser.parse_args()
    started = time.perf_counter()
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise SystemExit('no display: run under xvfb-run -a -s "-screen 0 1280x1024x24" (see benchmarks/README.md)')
    device = setup_torch(args.threads, args.device)
    env = environment(device)
    cases_n, steps = pick(args, "cases", 4, 2), pick(args, "steps", 60, 12)
    skip, repeats = pick(args, "skip", 5, 2), pick(args, "repeats", 5, 2)
    spacing = 3.0 * 64 / args.grid

    import napari
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QApplication

    import napari_neuromf._lora_widget as widgets_module
    from napari_neuromf._lora_widget import LoRAWidget

    with tempfile.TemporaryDirectory(prefix="neuromf_bench_gui_") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["NEUROMF_HOME"] = str(tmp / "neuromf_home")
        data_root = make_phantom_dataset(tmp / "bids", n_healthy=0, n_fcd=cases_n, seed=args.seed,
                                         test_fraction=0.0,
                                         cfg=PhantomConfig(shape=(args.grid,) * 3, spacing=(spacing,) * 3))
        base = make_tiny_base(tmp / "models", args.preset, args.grid, spacing, args.seed)

        viewer = napari.Viewer(show=True, title="bench_gui_worker")
        case = discover_cases(data_root, group="fcd", split=None)[0]
        image, mask = preprocess_pair(case.image, case.mask, Preprocessing(shape=(args.grid,) * 3,
                                                                             spacing=(spacing,) * 3))
        viewer.add_image(image.data[0].numpy(), name=f"{case.case_id} FLAIR", scale=(spacing,) * 3)
        viewer.add_labels(mask.data[0].numpy().astype(np.uint8), name=f"{case.case_id} lesion",
                          scale=(spacing,) * 3, opacity=0.5)
        viewer.dims.ndisplay = args.ndisplay
        widget = LoRAWidget(viewer)
        viewer.window.add_dock_widget(widget, name="LoRA fine-tuning", area="right")
        app = QApplication.instance()
        while not widget.ready:  # the widget imports the backend in a worker, then fills its defaults
            app.processEvents()
            time.sleep(0.01)
        widget.config.setCurrentText(CONFIG)
        widget.base.setText(str(base))
        widget.data.setText(str(data_root))
        widget.strategy.setCurrentText("downsample")
        widget.rank.setValue(args.rank)
        widget.batch_size.setValue(args.batch)
        widget.max_steps.setValue(steps)
        widget.preview_every.setValue(args.preview_every)
        widget.device.setCurrentText("cpu" if device.type == "cpu" else "auto")  # the widget lists cuda:N
        overrides = {"data.cache_dir": str(tmp / "latent_cache"), "data.flip": False,
                     "training.checkpoint_every": 0}
        settings = {**widget.settings(), **overrides}
        for _ in range(20):  # let the window map and draw its layers
            app.processEvents()
            time.sleep(0.01)

        def config(out_dir: Path):
            return _training_run.build_lora_config(CONFIG, {**settings, "training.output_dir": str(out_dir)})

        def wait(done, finished_signal) -> None:
            """Run a Qt event loop (as napari.run would) until `done()`; a slow poll guards the race."""
            loop = QEventLoop()
            finished_signal.connect(loop.quit)
            poll = QTimer()
            poll.timeout.connect(lambda: loop.quit() if done() else None)
            poll.start(200)
            deadline = time.perf_counter() + args.timeout
            while not done():
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"GUI training run did not finish in {args.timeout} s")
                loop.exec_() if hasattr(loop, "exec_") else loop.exec()
            poll.stop()

        def run_headless(out: Path) -> dict:
            stamps: list[float] = []
            t0 = time.perf_counter()
            result = run_to_end(train_lora(config(out), str(base), progress=False),
                                on_event=lambda e: stamps.append(time.perf_counter()) if e.kind == "step" else None)
            return {"wall_s": time.perf_counter() - t0, "steps": result.step, "yield": stamps,
                    "threads": torch.get_num_threads()}

        def run_worker(out: Path) -> dict:
            run = TimedRun(config(out), str(base))
            worker = create_worker(run.drive)
            worker.yielded.connect(run.record)
            t0 = time.perf_counter()
            worker.start()
            wait(lambda: not worker.is_running and run.result is not None or run.failure is not None,
                 worker.finished)
            if run.failure is not None:
                raise RuntimeError(run.failure.message) from run.failure.error
            return {"wall_s": time.perf_counter() - t0, "steps": run.result.step, "yield": run.yield_stamps,
                    "receive": run.receive_stamps, "threads": run.worker_threads}

        gui_time = {"handler_s": 0.0, "plot_draw_s": 0.0, "draws": 0, "window_repaints": 0}
        depth = [0]  # _on_event calls _refresh: count the outermost call only

        def timed(fn, key: str, count: str | None = None):
            def wrapper(*a, **k):
                depth[0] += 1
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    depth[0] -= 1
                    if depth[0] == 0:
                        gui_time[key] += time.perf_counter() - t
                    if count:
                        gui_time[count] += 1
            return wrapper

        # GUI-thread cost of the widget per step: its yielded handler and its timer-driven refresh (bar, status
        # line, plot), the loss-plot repaints (QPainter), and how often napari's window is repainted (each
        # repaint composes the whole window: the cost that dominates on a software renderer)
        widget._on_event = timed(widget._on_event, "handler_s")
        if hasattr(widget, "_refresh"):
            widget._refresh_timer.timeout.disconnect()
            widget._refresh = timed(widget._refresh, "handler_s")
            widget._refresh_timer.timeout.connect(widget._refresh)
        widget.loss_plot.paintEvent = timed(widget.loss_plot.paintEvent, "plot_draw_s", "draws")
        from qtpy.QtCore import QEvent, QObject

        main_window = viewer.window._qt_window

        class RepaintCounter(QObject):
            def eventFilter(self, obj, event):  # noqa: N802 (Qt naming)
                if event.type() == QEvent.UpdateRequest and obj is main_window:
                    gui_time["window_repaints"] += 1
                return False

        counter = RepaintCounter()
        app.installEventFilter(counter)

        def run_widget(out: Path) -> dict:
            widget.output.setText(str(out))
            original = _training_run.TrainingRun
            _training_run.TrainingRun = TimedRun  # the widget builds its run through _training_run.TrainingRun
            before = dict(gui_time)
            try:
                t0 = time.perf_counter()
                worker = widget.start(overrides=overrides)
                if worker is None:
                    raise RuntimeError("LoRAWidget.start refused to start (see the notifications above)")
                wait(lambda: not widget.busy, worker.finished)
            finally:
                _training_run.TrainingRun = original
            run = widget.run
            if run.failure is not None:
                raise RuntimeError(run.failure.message) from run.failure.error
            gui = {k: gui_time[k] - before[k] for k in gui_time}
            return {"wall_s": time.perf_counter() - t0, "steps": run.result.step, "yield": run.yield_stamps,
                    "receive": run.receive_stamps, "threads": run.worker_threads,
                    "gui_ms_per_step": {"yielded_handler_and_refresh": 1e3 * gui["handler_s"] / run.result.step,
                                        "loss_plot_draw": 1e3 * gui["plot_draw_s"] / run.result.step,
                                        "plot_draws_per_step": gui["draws"] / run.result.step,
                                        "window_repaints_per_step": gui["window_repaints"] / run.result.step}}

        runners = {"headless": run_headless, "worker": run_worker, "widget": run_widget}
        if widgets_module._training_run is not _training_run:
            raise RuntimeError("napari_neuromf._lora_widget does not use napari_neuromf._training_run: cannot time its "
                               "runs")
        run_headless(tmp / "runs" / "warmup_headless")  # fills the latent cache, warms up the step
        run_worker(tmp / "runs" / "warmup_worker")
        samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for v in order:
                samples[v].append(runners[v](tmp / "runs" / f"{v}_{r}"))
        viewer.close()

    per_variant = {}
    for v, runs in samples.items():
        rates = [steps_per_s(run["yield"], skip) for run in runs]
        rate = statistics.median(rates)
        entry = {"steps_per_s": round(rate, 4), "ms_per_step": round(1e3 / rate, 3),
                 "runs_steps_per_s": [round(x, 4) for x in rates],
                 "run_wall_s": [round(run["wall_s"], 3) for run in runs], "steps_per_run": runs[0]["steps"],
                 "torch_threads_in_training_thread": runs[0]["threads"]}
        if "receive" in runs[0]:
            received = [steps_per_s(run["receive"], skip) for run in runs]
            entry["gui_received_steps_per_s"] = round(statistics.median(received), 4)
        if "gui_ms_per_step" in runs[0]:
            entry["gui_thread_ms_per_step"] = {
                k: round(statistics.median([run["gui_ms_per_step"][k] for run in runs]), 3)
                for k in runs[0]["gui_ms_per_step"]}
        per_variant[v] = entry
    ratios = {f"{v}_over_headless": ratio(per_variant[v]["steps_per_s"], per_variant["headless"]["steps_per_s"])
              for v in ("worker", "widget")}
    result = {
        "benchmark": "gui_worker",
        "quick": args.quick,
        "config": {"base_config": CONFIG, "unet_preset": args.preset, "vae_preset": "tiny",
                   "volume_shape": [args.grid] * 3, "spacing_mm": spacing, "cases": cases_n,
                   "mask_strategy": "downsample", "batch": args.batch, "lora_rank": args.rank,
                   "steps_per_run": steps, "skipped_steps": skip, "repeats": repeats,
                   "preview_every": args.preview_every, "viewer_ndisplay": args.ndisplay,
                   "layers_shown": ["FLAIR image", "lesion labels"], "device": str(device)},
        "weights": "random-init tiny base UNet and tiny VAE (throughput does not depend on the weight values)",
        "method": "same train_lora config for every variant (only output_dir differs), latent cache warm; runs "
                  "interleaved per repeat (order alternating) after one untimed headless and worker run; rate = "
                  "(steps after the skipped ones - 1) / time between their yield timestamps (taken in the training "
                  "thread), median over runs; the GUI variants run a QEventLoop on the main thread until the worker "
                  "finishes, like napari.run(); gui_received_steps_per_s = the same from GUI-thread receipt times; "
                  "gui_thread_ms_per_step = GUI-thread time in the widget's yielded handler and its timer-driven "
                  "refresh, and in its loss-plot repaints, per training step: Python time that competes with the "
                  "training thread for the GIL; window_repaints_per_step = repaints of napari's main window "
                  "(each composes the whole window) during the widget's run, per step (also while idle)",
        "variants": per_variant,
        "ratios": ratios,
        "targets": {k.removesuffix("_over_headless"): target(v, TARGET_RATIO, "min") for k, v in ratios.items()},
        "env": env,
    }
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
