"""What the dock widgets run, Qt-free: run objects that drive the backend and hold the state of a run.

The widgets only wire these to Qt and napari: a napari thread worker iterates one of the ``*.drive()``
generators (backend calls only, never layers), and the widget's yielded/returned handlers update layers and
plots from the GUI thread. Errors become a ``Failure`` item with a message that names the problem and the
remedy, so nothing escapes into Qt.
"""

from __future__ import annotations

import json
import os
import queue
import re
import tempfile
import threading
import time
import weakref
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"


@dataclass
class Failure:
    """A failed run: ``message`` is ready for a notification."""

    message: str
    error: BaseException | None = None


@dataclass
class PluginState:
    """Shared between widgets and remembered across sessions: the last data folder, mask-test result, adapter,
    run folder and config. ``attach(path)`` reads the JSON file once; every ``remember`` writes it back."""

    last_adapter: Path | None = None
    last_run_dir: Path | None = None
    last_mask_test: Path | None = None
    last_data_dir: Path | None = None
    last_config: str | None = None
    path: Path | None = None  # the JSON file in the user data folder; None until attached (nothing persisted)
    _vae: tuple[tuple, Any] | None = None
    _adapter_listeners: list = field(default_factory=list)  # weak references to callables(Path)

    REMEMBERED = ("last_adapter", "last_run_dir", "last_mask_test", "last_data_dir", "last_config")

    def attach(self, path: Path) -> None:
        """Read the remembered values from ``path`` (once per state object); missing or broken files are ignored
        (a remembered default is a convenience, never a reason to fail)."""
        if self.path is not None:
            return
        self.path = Path(path)
        try:
            values = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        for key in self.REMEMBERED:
            value = values.get(key) if isinstance(values, dict) else None
            if isinstance(value, str) and value:
                setattr(self, key, value if key == "last_config" else Path(value))

    def remember(self, **values: Any) -> None:
        """Set some of the REMEMBERED values and write the file (a few hundred bytes: fine on the GUI thread)."""
        for key, value in values.items():
            if key not in self.REMEMBERED:
                raise KeyError(f"{key!r} is not remembered; choose one of {self.REMEMBERED}")
            setattr(self, key, value if value is None or key == "last_config" else Path(value))
        if self.path is None:
            return
        data = {key: (str(getattr(self, key)) if getattr(self, key) is not None else None) for key in self.REMEMBERED}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.path)
        except OSError:  # a read-only home folder: the defaults are just not remembered
            pass

    def set_adapter(self, adapter: Path, run_dir: Path | None = None) -> None:
        """Record a newly trained adapter and tell the widgets that default to it."""
        self.remember(last_adapter=adapter, last_run_dir=run_dir)
        alive = []
        for ref in self._adapter_listeners:
            callback = ref()
            if callback is None:
                continue
            try:
                callback(self.last_adapter)
            except RuntimeError:  # the widget behind it was deleted by Qt
                continue
            alive.append(ref)
        self._adapter_listeners = alive

    def on_adapter(self, callback: Any) -> None:
        """Call ``callback(path)`` on each new adapter; bound methods are held weakly."""
        self._adapter_listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__")
                                       else weakref.ref(callback))

    def vae(self, spec: str, preset: str | None = None) -> Any:
        """The VAE for ``spec`` ("embedded" or a local MAISI file), loaded once and kept for the next call."""
        from neuromf.vae import MAISIVAEWrapper

        path = Path(spec)
        key = (str(spec), preset, path.stat().st_mtime if spec != EMBEDDED and path.exists() else None)
        if self._vae is None or self._vae[0] != key:
            self._vae = None  # release the previous one before loading the next
            self._vae = (key, MAISIVAEWrapper.resolve(spec, preset=preset))
        return self._vae[1]

    def default_adapter(self) -> str:
        adapter = self.last_adapter
        return str(adapter) if adapter and (Path(adapter).is_dir() or str(adapter) == EMBEDDED) else EMBEDDED


STATE = PluginState()

def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


@dataclass
class ProgressClock:
    """Counts the items of a job and estimates the time left from the mean time per item so far."""

    total: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tick(self, n: int = 1) -> None:
        self.done += n

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def eta_s(self) -> float | None:
        if not self.done or not self.total:
            return None
        return self.elapsed_s / self.done * max(0, self.total - self.done)

    def text(self, unit: str) -> str:
        """``"3 / 10 cases · ETA 1m 05s"`` (the ETA once one item is done)."""
        eta = f" · ETA {format_eta(self.eta_s)}" if self.done < self.total and self.done else ""
        return f"{self.done} / {self.total} {unit}{eta}"


class Cancelled(Exception):
    """Raised inside a backend callback to abandon a job the user cancelled."""


# ------------------------------------------------------------------------------------- backend and folders
@dataclass(frozen=True)
class DevicePlan:
    """What a Device choice of the LoRA widget runs: ``nproc`` processes (1: in napari's process, in a thread;
    more: local processes under torchrun, data-parallel) on ``device`` (the config's ``training.device``)."""

    nproc: int
    device: str


def device_plans(gpus: int) -> dict[str, DevicePlan]:
    """The LoRA widget's Device choices for a machine with ``gpus`` GPUs: ``auto``, ``cpu``, each ``cuda:N``, and
    ``all GPUs (N)`` (one torchrun process per GPU) when there are several."""
    plans = {"auto": DevicePlan(1, "auto"), "cpu": DevicePlan(1, "cpu")}
    plans.update({f"cuda:{i}": DevicePlan(1, f"cuda:{i}") for i in range(gpus)})
    if gpus > 1:
        plans[f"all GPUs ({gpus})"] = DevicePlan(gpus, "auto")  # under torchrun "auto" = cuda:LOCAL_RANK
    return plans


@dataclass(frozen=True)
class Environment:
    """What the widgets need from the backend before they can offer defaults (found once, in a worker)."""

    devices: tuple[str, ...]  # "auto", each "cuda:N", "cpu"
    has_cuda: bool
    lora_configs: tuple[str, ...]  # packaged LoRA configs, the one sized for this machine first
    phantom_root: str  # the shipped phantom data set ("" when this install has none)
    gpus: int = 0

    @property
    def device_plans(self) -> dict[str, DevicePlan]:
        return device_plans(self.gpus)


_environment: Environment | None = None
_environment_lock = threading.Lock()


def environment() -> Environment:
    """Import the backend (torch, MONAI: seconds) and look at the machine; cached for the process.

    Widgets call this from a worker thread so that napari stays responsive while the imports run.
    """
    global _environment
    with _environment_lock:
        if _environment is None:
            import importlib

            import torch

            from neuromf.config import PACKAGED_CONFIGS

            # every backend module a job needs, imported now rather than inside the job's worker: importing
            # holds the GIL for long stretches (extension modules, MONAI, peft), which would freeze the GUI then
            for module in ("neuromf.io.bids", "neuromf.eval.mask_test", "neuromf.pipelines.lora",
                           "neuromf.pipelines.conditional", "neuromf.generate"):
                importlib.import_module(module)

            has_cuda = torch.cuda.is_available()
            names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml") if "lora" in p.stem)
            sized = ("lora_fcd", "demo_lora") if has_cuda else ("demo_lora", "lora_fcd")  # 2,500 steps: GPU only
            preferred = [n for n in sized if n in names]
            try:
                from neuromf.weights import sample_data_root

                phantoms = str(sample_data_root() / "fcd_phantoms")
            except FileNotFoundError:
                phantoms = ""
            _environment = Environment(
                devices=("auto", *(f"cuda:{i}" for i in range(torch.cuda.device_count())), "cpu"),
                has_cuda=has_cuda, lora_configs=(*preferred, *(n for n in names if n not in preferred)),
                phantom_root=phantoms, gpus=torch.cuda.device_count() if has_cuda else 0)
        return _environment


def environment_ready() -> bool:
    return _environment is not None


def user_folder() -> Path:
    """The per-user data folder (``$NEUROMF_HOME``, else ``~/.local/share/neuromf``): runs, generated pairs and
    the remembered widget state live here, never in the working directory."""
    from neuromf.utils import default_output_root

    return default_output_root()


def attach_state() -> PluginState:
    """The shared state, read from the user data folder on first use."""
    STATE.attach(user_folder() / "napari_state.json")
    return STATE


# ------------------------------------------------------------------------------------------ run folders
NEW_RUN, RESUME, OVERWRITE = "New run", "Resume", "Overwrite"
RUN_MODES = (NEW_RUN, RESUME, OVERWRITE)


def fresh_run_folder(parent: Path, prefix: str = "lora") -> Path:
    """``<parent>/<prefix>_<timestamp>``, with a counter when that name is taken (two starts in one second)."""
    folder = Path(parent) / f"{prefix}_{timestamp()}"
    n = 1
    while folder.exists():
        folder = Path(parent) / f"{prefix}_{timestamp()}_{n}"
        n += 1
    return folder


def holds_run(folder: Path) -> bool:
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def plan_run_folder(folder: str | Path, mode: str) -> tuple[Path, bool, bool, str]:
    """(folder to train in, resume, overwrite, note for the user) for a run mode of the LoRA widget.

    "New run" never touches an existing run: a folder that already holds one is replaced by a fresh timestamped
    sibling. "Resume" and "Overwrite" work in the folder as given (the backend checks that it holds a run).
    """
    if mode not in RUN_MODES:
        raise ValueError(f"run mode must be one of {RUN_MODES}, got {mode!r}")
    folder = Path(folder)
    if mode == RESUME:
        return folder, True, False, f"Resuming the run in {folder}"
    if mode == OVERWRITE:
        return folder, False, True, f"Replacing the run in {folder}"
    if holds_run(folder):
        fresh = fresh_run_folder(folder.parent, folder.name.split("_")[0] or "lora")
        return fresh, False, False, f"{folder} already holds a run: starting a new run in {fresh}"
    return folder, False, False, f"Starting a new run in {folder}"


def is_oom(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return "out of memory" in str(err).lower()


def describe_error(err: BaseException, what: str, device: str | None = None, batch_size: int | None = None,
                   out_dir: Path | str | None = None) -> str:
    """A notification text for ``err``: what failed, why, and what to do about it."""
    if is_oom(err):
        hints = [f"lower the batch size (now {batch_size})" if batch_size else "lower the batch size",
                 "lower the LoRA rank", "pick another GPU or 'cpu' under Device"]
        resume = f"; then press Resume to continue from the last checkpoint in {out_dir}" if out_dir else ""
        return (f"{what}: CUDA out of memory on {device or 'the GPU'}. Remedy: {', '.join(hints)}{resume}. "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if isinstance(err, FileExistsError):  # the backend's text names CLI flags: say it in the widget's terms
        where = out_dir or str(err).split(":")[0]
        return (f"{what}: {where} already holds a run or other files. Under Run choose 'New run' (a fresh folder), "
                "'Resume' (continue that run) or 'Overwrite' (replace it).")
    if isinstance(err, FileNotFoundError) and "nothing to resume" in str(err):
        where = out_dir or str(err).split(":")[0]
        return f"{what}: there is no run to resume in {where}. Under Run choose 'New run', or pick the run's folder."
    if isinstance(err, FileNotFoundError) and EMBEDDED in str(err):
        return (f"{what}: {err}. The embedded default is not shipped in this install: choose a local file "
                "or folder instead.")
    text = str(err) or type(err).__name__
    return f"{what}: {text}" if isinstance(err, ValueError | FileNotFoundError | OSError | KeyError) else \
        f"{what}: {type(err).__name__}: {text}"


# ------------------------------------------------------------------------------------------ LoRA training
def model_preset_of(base_checkpoint: str) -> str | None:
    """The UNet preset recorded in a base checkpoint's sidecar (None when it cannot be read)."""
    try:
        from neuromf.models.flow_model import read_model_meta

        return read_model_meta(base_checkpoint)["arch"]["preset"]
    except Exception:  # the training run reports a missing/broken checkpoint with its own message
        return None


def build_lora_config(config: str, settings: dict[str, Any]) -> Any:
    """``load_config(config, overrides)`` from the widget's settings (dotted keys), with GUI-friendly defaults:

    the UNet preset follows the base checkpoint, and ``mask_strategy: auto`` uses the last mask test (remembered
    across sessions) when the config's own result file is not there.
    """
    from neuromf.config import load_config

    overrides = dict(settings)
    base = overrides.pop("base_checkpoint", EMBEDDED)
    preset = model_preset_of(base)
    if preset:
        overrides.setdefault("model.preset", preset)
    cfg = load_config(config, overrides)
    if cfg.data.mask_strategy == "auto":
        configured = Path(cfg.data.mask_test) if cfg.data.mask_test else None
        remembered = STATE.last_mask_test
        if (configured is None or not configured.is_file()) and remembered is not None and remembered.is_file():
            cfg.data.mask_test = str(remembered)
        elif configured is None or not configured.is_file():
            raise FileNotFoundError(
                f"strategy 'auto' needs a mask-VAE test result ({configured} not found): run the Mask-VAE test "
                "widget first, or choose strategy 'vae' or 'downsample'")
    return cfg


@dataclass
class Phase:
    """A stretch of a job before its first counted item, e.g. encoding the training cases into latents."""

    message: str


def loss_history(out_dir: Path) -> list[tuple[int, float]]:
    """The per-epoch losses a run folder logged (``losses.csv``): the earlier history of a resumed run."""
    import csv

    path = Path(out_dir) / "losses.csv"
    try:
        with open(path, newline="") as fh:
            return [(int(float(row["step"])), float(row["loss"])) for row in csv.DictReader(fh)
                    if row.get("step") and row.get("loss")]
    except (OSError, KeyError, ValueError):
        return []


class StopFlag(threading.Event):
    """A stop request that also calls hooks when it is set (e.g. tells training processes at once)."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Any] = []

    def set(self) -> None:
        super().set()
        for hook in list(self._hooks):
            hook()

    def when_set(self, hook: Any) -> None:
        """Call ``hook()`` when the flag is set (now, if it already is); a hook may be called twice."""
        self._hooks.append(hook)
        if self.is_set():
            hook()


@dataclass
class TrainingRun:
    """One LoRA fine-tuning run started from the GUI: config, stop flag, loss history, result."""

    cfg: Any  # neuromf.config.RunConfig
    base_checkpoint: str = EMBEDDED
    resume: bool = False
    overwrite: bool = False
    history: list[tuple[int, float]] = field(default_factory=list)  # losses logged before this run (resume)
    stop: StopFlag = field(default_factory=StopFlag)
    losses: list[tuple[int, float]] = field(default_factory=list)
    last_event: Any = None
    result: Any = None  # neuromf.train.TrainResult
    failure: Failure | None = None
    stopped_encoding: tuple[int, int] | None = None  # (cases encoded, cases) when stopped before training
    started: float = field(default_factory=time.perf_counter)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.training.output_dir)

    @property
    def training_started(self) -> bool:
        """Whether a training step (or a stop at step 0) was reported: before, a stop ends the start itself."""
        return self.last_event is not None and getattr(self.last_event, "kind", "encoding") != "encoding"

    @property
    def plotted(self) -> list[tuple[int, float]]:
        """Every loss point to plot: the history of a resumed run up to where it resumed, then this run's."""
        first = self.losses[0][0] if self.losses else None
        earlier = [(s, v) for s, v in self.history if first is None or s < first]
        return earlier + self.losses

    def record(self, event: Any) -> None:
        """Called from the GUI thread for every yielded event: one loss point per step event."""
        self.last_event = event
        if getattr(event, "kind", None) == "step" and event.loss is not None:
            self.losses.append((int(event.step), float(event.loss)))

    def _fail(self, err: BaseException) -> Failure:
        self.failure = Failure(describe_error(err, "LoRA fine-tuning", self.cfg.training.device,
                                              self.cfg.training.batch_size, self.out_dir), err)
        return self.failure

    def drive(self) -> Generator[Any, None, Any]:
        """Worker body: the backend's training generator, errors turned into a Failure, memory released.

        A Phase covers the loading of the models; then the backend encodes every training case into latents
        (minutes for a real data set on the first run; cached after), one "encoding" event per case. A stop
        during the encoding takes effect after the current case: the start ends as a failed one (the backend
        removes a fresh run's folder and leaves a resumed run as it was; encoded cases stay cached).
        """
        from neuromf.train.launch import StopBeforeTraining

        events = None
        try:
            yield Phase(f"Preparing: loading the base model and the VAE, finding the training cases in "
                        f"{self.cfg.data.data_dir} ...")
            from neuromf.pipelines.lora import train_lora

            events = train_lora(self.cfg, self.base_checkpoint, resume=self.resume, overwrite=self.overwrite,
                                stop=self.stop, progress=False)
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    self.result = done.value
                    break
                yield event
                if event.kind == "encoding" and self.stop.is_set():
                    self.stopped_encoding = (int(event.step), int(event.total_steps))
                    try:
                        events.throw(StopBeforeTraining())
                    except StopBeforeTraining:
                        pass
                    break
        except Exception as err:  # reported in the widget and as a notification, never raised into Qt
            yield self._fail(err)
        finally:
            if events is not None:
                events.close()
            del events
            release_memory()
        return self.result


@dataclass
class ProcessTrainingRun(TrainingRun):
    """A TrainingRun in ``nproc`` local processes under torchrun (the "all GPUs" device): the same events, result
    and stop, from ``neuromf.train.launch``; previews arrive as files, errors with the tail of the output."""

    nproc: int = 2
    device: str = "auto"
    process: Any = None  # neuromf.train.launch.TrainingProcess while it runs

    def drive(self) -> Generator[Any, None, Any]:
        """Worker body: start torchrun, hand on rank 0's events, forward a stop; a Failure on a failed exit."""
        from neuromf.train.launch import launch_lora

        process = events = None
        try:
            yield Phase(f"Starting {self.nproc} training processes (torchrun, device {self.device}): each loads "
                        f"the base model and the VAE, then the training cases in {self.cfg.data.data_dir} are "
                        "encoded ...")
            process = self.process = launch_lora(self.cfg, self.nproc, self.device, self.base_checkpoint,
                                                 resume=self.resume, overwrite=self.overwrite)
            self.stop.when_set(process.stop)  # Stop (the button, or the dock closing) reaches the ranks at once
            events = process.events()
            self.result = yield from events
            self.stopped_encoding = process.cancelled
        except Exception as err:
            yield self._fail(err)
        finally:
            if events is not None:
                events.close()
            if process is not None:
                process.close()  # kills what still runs (a failed start), removes the scratch folder
        return self.result

    def _fail(self, err: BaseException) -> Failure:
        from neuromf.train.launch import TrainingProcessError

        if not isinstance(err, TrainingProcessError):
            return super()._fail(err)
        cause = _builtin_error(err.error_type, err.error_message)
        what = describe_error(cause, "LoRA fine-tuning", self.device, self.cfg.training.batch_size,
                              self.out_dir) if cause is not None else f"LoRA fine-tuning: {err}"
        if cause is not None:
            what += f" (in the {self.nproc} training processes)"
        ranks = "".join(f"\n{line}" for line in err.rank_lines)
        tail = "\n".join(err.tail[-12:])
        message = what + ranks + (f"\nLast lines of the training processes' output:\n{tail}" if tail else "")
        self.failure = Failure(message, err)
        return self.failure


def _builtin_error(name: str, message: str) -> BaseException | None:
    """The error rank 0 reported, rebuilt as the built-in type it had, so it is described in the widget's words
    (an occupied folder, nothing to resume, out of memory ...); None for other types."""
    kinds = {"FileExistsError": FileExistsError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError,
             "KeyError": KeyError, "OSError": OSError, "ConfigError": ValueError}
    if "out of memory" in message.lower():
        return RuntimeError(message)
    kind = kinds.get(name)
    return kind(message) if kind is not None else None


def release_memory() -> None:
    """Give GPU memory back after a run. On a CPU there is nothing to give back early: the backend's full
    ``gc.collect()`` walks every object of the napari process while holding the GIL (0.4 s measured), which
    freezes the GUI; the run's objects are freed by reference counting and Python's own collections."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    from neuromf.pipelines.lora import release_memory as backend_release

    backend_release()


# --------------------------------------------------------------------------------------------- mask test
def preprocessing_for(vae: Any) -> Any:
    """The grid the VAE was trained on (its sidecar), else the default model grid."""
    from neuromf.io.nifti import Preprocessing

    prep = (getattr(vae, "metadata", None) or {}).get("preprocessing")
    if isinstance(prep, dict):
        return Preprocessing.from_dict(prep)
    return Preprocessing()


def fcd_cases(folder: Path, limit: int = 0) -> list:
    """The FCD cases with a lesion mask in ``folder`` (the first ``limit``; 0 = all). Raises DataError."""
    from neuromf.io.bids import discover_cases

    cases = [c for c in discover_cases(Path(folder), group="fcd") if c.mask is not None]
    return cases[:limit] if limit else cases


@dataclass
class LayerPair:
    """An open FLAIR Image + lesion Labels layer, snapshotted on the GUI thread as (data, layer state) each."""

    image: tuple[Any, dict]
    labels: tuple[Any, dict]

    @property
    def name(self) -> str:
        """The image layer's name, usable as a case and file name."""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", str(self.image[1].get("name") or "layer")).strip("_") or "layer"

    @property
    def description(self) -> str:
        return f"open layers {self.image[1].get('name')!r} + {self.labels[1].get('name')!r}"

    def write_case(self, folder: Path) -> Any:
        """The pair as a flat-folder case (FLAIR + binary mask NIfTI) in ``folder``, a scratch folder of this
        run: the layers' own files are never touched. Returns the ``neuromf.io.bids.Case``."""
        import numpy as np

        from napari_neuromf._layers import write_layer
        from neuromf.io.bids import Case

        image = write_layer(folder / f"{self.name}_FLAIR.nii.gz", *self.image)
        mask = write_layer(folder / f"{self.name}_FLAIR_roi.nii.gz",
                           (np.asarray(self.labels[0]) > 0).astype(np.uint8), self.labels[1])
        return Case(self.name, image, mask, "fcd", "unknown")


@dataclass
class MaskTestRun:
    """The mask-VAE Dice test (strategy A vs B) on some FCD cases; rows arrive one case at a time.

    ``drive`` yields the list of cases first (so the widget can show the total), then one row per case. With
    ``layers`` it tests that open layer pair instead of ``data_dir``: written into a scratch folder of its own
    (kept while the run object lives, for the reconstruction overlay), and the result is not saved.
    """

    data_dir: Path | None
    max_cases: int = 0
    vae_spec: str = EMBEDDED
    vae_preset: str | None = None  # None: the VAE file's sidecar says
    threshold: float = 0.5
    output: Path | None = None
    layers: LayerPair | None = None
    cases: list = field(default_factory=list)  # neuromf.io.bids.Case with masks
    rows: list[dict] = field(default_factory=list)
    result: dict | None = None
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    _scratch: Any = field(default=None, repr=False)  # TemporaryDirectory of the layer pair: removed with the run

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def _fail(self, err: BaseException) -> Failure:
        message = describe_error(err, "Mask-VAE test")
        if self._scratch is not None:  # say which layers, not which scratch folder
            message = message.replace(str(self.data_dir), f"the {self.layers.description}")
        self.failure = Failure(message, err)
        return self.failure

    def _find_cases(self) -> list:
        if self.layers is None:
            return fcd_cases(self.data_dir, self.max_cases)
        self._scratch = tempfile.TemporaryDirectory(prefix="neuromf_mask_test_")
        self.data_dir = Path(self._scratch.name)
        return [self.layers.write_case(self.data_dir)]

    def drive(self) -> Generator[Any, None, dict | None]:
        """Worker body: yields the case list, then each case's row as soon as it is computed; returns the result
        (None when cancelled or failed)."""
        try:
            self.cases = self._find_cases()
        except Exception as err:
            yield self._fail(err)
            return None
        yield list(self.cases)
        from neuromf.eval.mask_test import mask_vae_test, save_mask_test

        rows: queue.Queue = queue.Queue()
        done = object()
        outcome: dict[str, Any] = {}

        def on_case(row: dict) -> None:
            rows.put(row)
            if self.cancel.is_set():  # the only way into mask_vae_test's loop: stop it after this case
                raise Cancelled

        def work() -> None:
            try:
                vae = STATE.vae(self.vae_spec, self.vae_preset)
                result = mask_vae_test(self.data_dir, vae, preprocessing_for(vae), threshold=self.threshold,
                                       on_case=on_case, cases=self.cases)
                if self.layers is not None:
                    result["data_dir"] = self.layers.description
                elif self.output is not None:
                    save_mask_test(result, self.output)
                outcome["result"] = result
            except Exception as err:  # handed to the GUI thread as a Failure
                outcome["error"] = err
            finally:
                rows.put(done)

        thread = threading.Thread(target=work, name="neuromf-mask-test", daemon=True)
        thread.start()
        while (row := rows.get()) is not done:
            yield row
        thread.join()
        error = outcome.get("error")
        if isinstance(error, Cancelled):
            return None
        if error is not None:
            yield self._fail(error)
            return None
        self.result = outcome["result"]
        return self.result


def reconstruct(case: Any, vae_spec: str, vae_preset: str | None) -> Any:
    """Worker body for one case's strategy-A mask reconstruction: (mask, affine) or a Failure."""
    try:
        from neuromf.eval.mask_test import reconstruct_mask

        vae = STATE.vae(vae_spec, vae_preset)
        return reconstruct_mask(case, vae, preprocessing_for(vae))
    except Exception as err:
        return Failure(describe_error(err, f"Mask reconstruction of {case.case_id}"), err)


# --------------------------------------------------------------------------------------------- generation
def lesion_on_model_grid(data: Any, layer_meta: dict, adapter: str) -> tuple[Any, Any]:
    """A Labels layer (painted, or a case's mask) as a binary mask on a conditional adapter's model grid, and
    that grid's affine in the layer's world (scanner) coordinates, so the generated FLAIR overlays the layer."""
    import numpy as np

    from napari_neuromf._layers import nifti_from_layer
    from neuromf.io.nifti import mask_to_model_grid
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(adapter, "conditional").prep
    image = nifti_from_layer(np.asarray(data) > 0, layer_meta)
    volume = mask_to_model_grid(np.asarray(image.dataobj), image.affine, prep,
                                source=f"layer {layer_meta.get('name', 'lesion')!r}")
    return volume.data[0].numpy().astype(np.uint8), volume.affine


def sites_on_model_grid(points_world: Any, adapter: str) -> Any:
    """Points in world mm (napari's world, where generated pairs lie on the joint adapter's model grid) as voxel
    coordinates of that grid, the lesion sites `generate_pairs(sites=)` takes."""
    import numpy as np

    from napari_neuromf._layers import world_placement
    from neuromf.generate import model_grid_affine
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(adapter, "joint").prep
    scale, translate = world_placement(model_grid_affine(prep.shape, prep.spacing))
    points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    return (points - np.asarray(translate)) / np.asarray(scale)


@dataclass
class Caution:
    """Something the user should know before trusting a result (a lesion unlike the training lesions)."""

    message: str


def lesion_cautions(mask: Any, adapter: str) -> list[str]:
    """Why a lesion on a conditional adapter's model grid looks implausible next to the lesions it was trained
    on: a volume far outside theirs, or a lesion mostly outside the brain of the training scans."""
    import numpy as np

    from neuromf.data.mask_prior import PRIOR, MaskPrior
    from neuromf.models.adapter_meta import resolve_adapter_dir

    prior = MaskPrior.load(resolve_adapter_dir(adapter, "conditional") / PRIOR)
    lesion = np.asarray(mask) > 0
    voxel_cm3 = float(np.prod(prior.spacing)) / 1000.0
    volume = float(lesion.sum()) * voxel_cm3
    trained = [float(np.count_nonzero(known)) * voxel_cm3 for known in prior.lesions]
    cautions = []
    if trained and not min(trained) / 2 <= volume <= max(trained) * 2:
        cautions.append(f"the lesion is {volume:.1f} cm³ on the model grid, far from the training lesions "
                        f"({min(trained):.1f}-{max(trained):.1f} cm³): the FLAIR may not look like an FCD")
    if prior.brain.shape == lesion.shape and lesion.any():
        outside = 1.0 - float((lesion & prior.brain).sum()) / float(lesion.sum())
        if outside > 0.5:
            cautions.append(f"{outside:.0%} of the lesion lies outside the brain of the training scans")
    return cautions


@dataclass
class GenerateRun:
    adapter: str = EMBEDDED
    n: int = 4
    steps: int = 1
    seed: int = 0
    device: str = "auto"
    mode: str = "joint"  # "joint" (image + mask from noise) | "conditional" (a FLAIR for a lesion)
    lesion: tuple[Any, dict] | None = None  # conditional: (Labels data, layer state); None = the mask prior
    method: str = "meanflow"  # the sampler: "meanflow" or "euler" (`neuromf.meanflow.sample`)
    render: str | None = None  # joint: a conditional adapter that renders the FLAIR for each joint mask
    guidance: float | None = None  # conditional adapter (conditional mode or render): mask guidance; None = its own
    joint_guidance: float | None = None  # joint adapter: guidance against the empty mask's path; None = its own
    # joint, site-conditioned adapter: lesion sites as (k, 3) world mm points on the model grid; None = drawn
    sites_world: Any = None
    pairs: int = 0
    cautions: list[str] = field(default_factory=list)  # why the given lesion looks implausible
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def drive(self) -> Generator[Any, None, int]:
        """Worker body: one generated pair per yield (then a Failure if anything went wrong); a cancel takes
        effect between pairs."""
        pairs = None
        try:
            if self.mode == "conditional":
                from neuromf.pipelines.conditional import generate_conditional_pairs

                masks = affines = None
                if self.lesion is not None:
                    mask, affine = lesion_on_model_grid(*self.lesion, self.adapter)
                    masks, affines = [mask] * self.n, [affine] * self.n
                    for message in lesion_cautions(mask, self.adapter):
                        self.cautions.append(f"Generation: {message}")
                        yield Caution(self.cautions[-1])
                pairs = generate_conditional_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed,
                                                   device=self.device, masks=masks, affines=affines,
                                                   method=self.method, guidance=self.guidance)
            else:
                from neuromf.pipelines.lora import generate_pairs

                sites = None if self.sites_world is None else sites_on_model_grid(self.sites_world, self.adapter)
                pairs = generate_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed, device=self.device,
                                       method=self.method, render=self.render, guidance=self.guidance,
                                       joint_guidance=self.joint_guidance, sites=sites)
            for pair in pairs:
                if self.cancel.is_set():
                    break
                self.pairs += 1
                yield pair
        except Exception as err:
            what = "Generation"
            if isinstance(err, FileNotFoundError) and self.adapter == EMBEDDED:
                self.failure = Failure(f"{what}: no embedded demo adapter is shipped in this install ({err}). "
                                       "Train one in the LoRA fine-tuning widget (it becomes the default here) or "
                                       "choose an adapter folder.", err)
            else:
                self.failure = Failure(describe_error(err, what, self.device), err)
            yield self.failure
        finally:
            if pairs is not None and hasattr(pairs, "close"):
                pairs.close()
            release_memory()
        return self.pairs


def generated_prefixes(layers: Iterable[Any]) -> list[str]:
    """Names (``gen_003``) of generated pairs present in the viewer, in layer order."""
    seen: list[str] = []
    for layer in layers:
        info = (getattr(layer, "metadata", None) or {}).get("neuromf") or {}
        if info.get("generated") and info.get("pair") not in seen:
            seen.append(info["pair"])
    return seen


# ------------------------------------------------------------------------------------------------ saving
@dataclass
class SaveRun:
    """Write generated pairs as ``<prefix>_FLAIR.nii.gz`` + ``<prefix>_FLAIR_roi.nii.gz`` + ``<prefix>.json``.

    ``pairs`` holds (prefix, image (data, state), lesion (data, state)) snapshots taken on the GUI thread.
    """

    folder: Path
    pairs: list[tuple[str, tuple[Any, dict], tuple[Any, dict]]]
    written: list[Path] = field(default_factory=list)
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def drive(self) -> Generator[Any, None, list[Path]]:
        """Worker body: yields each saved prefix; a cancel takes effect between pairs."""
        from napari_neuromf._layers import write_layer

        for prefix, (image, image_state), (lesion, lesion_state) in self.pairs:
            if self.cancel.is_set():
                break
            try:
                paths = [write_layer(self.folder / f"{prefix}_FLAIR.nii.gz", image, image_state),
                         write_layer(self.folder / f"{prefix}_FLAIR_roi.nii.gz", lesion, lesion_state)]
                info = (image_state.get("metadata") or {}).get("neuromf", {})
                provenance = self.folder / f"{prefix}.json"
                tmp = provenance.with_name(f".{provenance.name}.tmp")
                tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
                os.replace(tmp, provenance)
            except (OSError, ValueError) as err:
                self.failure = Failure(f"Save pairs: cannot write {prefix} into {self.folder}: {err}", err)
                yield self.failure
                break
            self.written += paths
            yield prefix
        return self.written
