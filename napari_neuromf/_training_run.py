"""A LoRA fine-tuning run started from the GUI, Qt-free: its run folder, its config from the widget's
settings, and the run object whose ``drive()`` generator a napari worker iterates (in this process, or in
torchrun processes)."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_neuromf import _state
from napari_neuromf._jobs import Failure, Phase, StopFlag, describe_error, release_memory, timestamp
from napari_neuromf._state import EMBEDDED

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
        remembered = _state.STATE.last_mask_test
        if (configured is None or not configured.is_file()) and remembered is not None and remembered.is_file():
            cfg.data.mask_test = str(remembered)
        elif configured is None or not configured.is_file():
            raise FileNotFoundError(
                f"strategy 'auto' needs a mask-VAE test result ({configured} not found): run the Mask-VAE test "
                "widget first, or choose strategy 'vae' or 'downsample'")
    return cfg


def loss_history(out_dir: Path) -> list[tuple[int, float]]:
    """The per-epoch raw losses a run folder logged (``losses.csv``, column ``raw``; ``loss`` in runs that did not
    log it): the earlier history of a resumed run."""
    import csv

    path = Path(out_dir) / "losses.csv"
    try:
        with open(path, newline="") as fh:
            return [(int(float(row["step"])), float(row.get("raw") or row["loss"])) for row in csv.DictReader(fh)
                    if row.get("step") and (row.get("raw") or row.get("loss"))]
    except (OSError, KeyError, ValueError):
        return []


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
    config: str | None = None  # the packaged config it was built from: its measured step rate (`neuromf.estimates`)
    # `neuromf.estimates.PaceClock`: the load at the start, (clock, step) at the first and latest step events
    pace: Any = None

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
        """Called from the GUI thread for every yielded event: one raw-loss point per step event.

        The raw loss (``parts["raw"]``, the unweighted Lp distance) is what shows learning; the objective the
        optimiser minimises is adaptive-weighted and stays about 1 by construction."""
        self.last_event = event
        if getattr(event, "kind", None) == "step" and self.pace is not None:
            self.pace.mark(time.perf_counter(), int(event.step))
        if getattr(event, "kind", None) == "step" and event.loss is not None:
            raw = (getattr(event, "parts", None) or {}).get("raw")
            self.losses.append((int(event.step), float(event.loss if raw is None else raw)))

    def record_pace(self) -> float | None:
        """Record how this run's steps kept to the measured rate of its config (`neuromf.estimates.record_pace`),
        so later estimates on this machine follow its pace; only a run on the CPU of a config with a rate. Returns
        the ratio recorded, or None."""
        from neuromf.estimates import runs_on_cpu, training_step_seconds

        per_step = training_step_seconds(self.config, self.cfg.training.batch_size) if self.config else None
        if per_step is None or self.pace is None or not runs_on_cpu(self.cfg.training.device):
            return None
        return self.pace.record("training", per_step)

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
        from neuromf.estimates import PaceClock, current_load
        from neuromf.train.launch import StopBeforeTraining

        events = None
        self.pace = PaceClock(current_load())
        try:
            yield Phase(f"Preparing: loading the base model and the VAE, finding the training cases in "
                        f"{self.cfg.data.data_dir} ...")
            from neuromf.pipelines.joint import train_joint

            events = train_joint(self.cfg, self.base_checkpoint, resume=self.resume, overwrite=self.overwrite,
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
