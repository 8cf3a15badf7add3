"""What every background job of the widgets shares, Qt-free: the items a worker yields besides results
(Failure, Caution, Phase), cancelling (Cancelled, StopFlag), progress counting with an ETA, error texts that name
the problem and the remedy, giving GPU memory back after a run, and starting the Qt workers that run them so that
Python's exit waits for them."""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_neuromf._state import EMBEDDED


@dataclass
class Failure:
    """A failed run: ``message`` is ready for a notification."""

    message: str
    error: BaseException | None = None


@dataclass
class Caution:
    """Something the user should know before trusting a result (a lesion unlike the training lesions)."""

    message: str


@dataclass
class Phase:
    """A stretch of a job before its first counted item, e.g. encoding the training cases into latents."""

    message: str


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


def time_left_at_pace(first: tuple[float, float], last: tuple[float, float], work_left: float,
                      now: float) -> float | None:
    """Seconds left of a job at its own pace: ``first`` and ``last`` are (clock, work done) at the first and the
    latest progress report, ``work_left`` the work still to do after the latest (any unit, as work done). The pace is
    taken between the two reports, so whatever came before the first (loading models) does not count, and the time
    since the latest report is already spent. None until the two reports are apart."""
    (t0, w0), (t1, w1) = first, last
    if w1 <= w0 or t1 <= t0:
        return None
    return max(0.0, (t1 - t0) / (w1 - w0) * max(0.0, work_left) - max(0.0, now - t1))


class Cancelled(Exception):
    """Raised inside a backend callback to abandon a job the user cancelled."""


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


def release_memory() -> None:
    """Give GPU memory back after a run. On a CPU there is nothing to give back early: the backend's full
    ``gc.collect()`` walks every object of the napari process while holding the GIL (0.4 s measured), which
    freezes the GUI; the run's objects are freed by reference counting and Python's own collections."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    from neuromf.pipelines.joint import release_memory as backend_release

    backend_release()


EXIT_WAIT_MS = 15_000  # at exit, how long running workers get to stop (a generation stops within a network step)


_stops_at_exit: weakref.WeakSet = weakref.WeakSet()  # the running jobs' stop flags, set when Python exits


def start_worker(worker: Any, stop: threading.Event | None = None) -> Any:
    """``worker.start()`` (a napari/superqt worker), with `_wait_for_workers_at_exit` registered last: Python runs
    exit handlers last-registered first, so it runs before PyQt's own clean-up, which deletes the workers' signal
    objects; a worker that finishes after that emits into a deleted object and aborts the process. ``stop``: the
    job's own stop flag (a run's ``cancel`` or ``stop``), set at exit so the job ends within a step.

    napari's workers share Qt's global thread pool, as many threads as cores (2 on a small machine): with that many
    long jobs running (a generation, a training, a mask test), a new worker would wait in the pool's queue until
    one ended, File > Open's reading included. The pool grows by a thread when it is full, so every worker starts
    now."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    if pool.activeThreadCount() >= pool.maxThreadCount():
        pool.setMaxThreadCount(pool.activeThreadCount() + 1)
    atexit.unregister(_wait_for_workers_at_exit)
    atexit.register(_wait_for_workers_at_exit)
    if stop is not None:
        _stops_at_exit.add(stop)
    worker.start()
    return worker


def _wait_for_workers_at_exit() -> None:
    """Ask the workers still running when Python exits (napari closed during a generation, a file being read, a
    pair's figures being worked out) to stop, and wait up to `EXIT_WAIT_MS` for them: without it the process ends
    in "wrapped C/C++ object of type WorkerBaseSignals has been deleted", then "Aborted". The jobs' stop flags are
    set first; generators also stop at their next yield."""
    for stop in list(_stops_at_exit):  # a generation stops before its next network step, a training at its next
        stop.set()
    if "superqt.utils._qthreading" not in sys.modules:
        return
    from superqt.utils import WorkerBase

    try:
        WorkerBase.await_workers(msecs=EXIT_WAIT_MS)
    except RuntimeError:  # one did not stop in time: nothing more can be done for it
        pass
