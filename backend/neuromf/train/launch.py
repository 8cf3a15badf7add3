"""LoRA fine-tuning in N local processes under torchrun, as a background job that another program drives (the
napari plugin's "all GPUs" device): progress as events, a stop that saves, errors with the output's tail.

Parent side: `launch_joint(cfg, nproc, device)` writes the config and a small JSON spec into a scratch folder and
starts `python -m torch.distributed.run --standalone --nproc_per_node N -m neuromf.train.launch SPEC`, the same
torchrun launch as `neuromf train-lora --nproc N`. `TrainingProcess.events()` yields the run's `TrainEvent`s
(encoding, step, epoch, checkpoint, preview, done/stopped) and returns its `TrainResult`; `stop()` asks the ranks
to stop at the next step, where rank 0 saves a resumable checkpoint and the adapter (a stop file, polled by rank 0
at every event and agreed on by all ranks, as SIGINT/SIGTERM are); a stop while rank 0 is still encoding the
training cases ends the start there, as a failed start (a fresh run's folder is removed, a resumed run is left
as it was). A non-zero exit raises `TrainingProcessError` with the last lines of the processes' output and, when
rank 0 reported it, the type and text of the error.

Rank side (`python -m neuromf.train.launch SPEC`, one process per rank): the CLI's training path (process
group, signals, the spec's training pipeline, failure naming the rank); rank 0 also prints each event as one JSON
line. The pipeline is named in the spec ("module:function", a `neuromf.pipelines` generator such as
`train_joint`), so this generic launcher imports no pipeline: `train` stays below `pipelines`.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuromf.train.distributed import torchrun_prefix

EVENT_PREFIX = "@neuromf "  # rank 0's machine-readable lines on stdout start with this
TAIL_LINES = 40  # lines of other output kept for an error message
CANCEL_GRACE_S = 10.0  # after a stop during encoding, the other ranks get this long to notice before a kill


class StopBeforeTraining(Exception):  # noqa: N818 (a request, not an error)
    """Raised into a training generator stopped while its training cases are still being encoded."""


class TrainingProcessError(RuntimeError):
    """The training processes exited with an error. `tail`: the last lines of their output; `rank_lines`: each
    failing rank's one-line report (`[neuromf] rank 1/2 failed: ...`, often far above the tail); `error_type` and
    `error_message`: the exception rank 0 reported, or, when another rank failed first and rank 0 was stopped
    before it could report, the first failing rank's (`rank_error`); empty when no rank named one."""

    def __init__(self, message: str, tail: list[str], returncode: int | None, error_type: str = "",
                 error_message: str = "", rank_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.tail, self.returncode = tail, returncode
        self.error_type, self.error_message = error_type, error_message
        self.rank_lines = list(rank_lines or [])


@dataclass
class Spec:
    """What each rank needs: the config file, the base model, resume/overwrite, where to look for the stop
    request and where rank 0 puts preview volumes."""

    config: str
    base_checkpoint: str
    resume: bool
    overwrite: bool
    stop_file: str
    preview_dir: str
    pipeline: str = "neuromf.pipelines.joint:train_joint"  # the training generator each rank runs


def torchrun_command(nproc: int, spec: Path) -> list[str]:
    """The command that runs `spec` in `nproc` local processes (torchrun's standalone rendezvous)."""
    return [*torchrun_prefix(nproc), "-m", "neuromf.train.launch", str(spec)]


# ------------------------------------------------------------------------------------------ parent side
class TrainingProcess:
    """A running torchrun job of a training pipeline (the joint one by default); see the module docstring."""

    def __init__(self, cfg: Any, nproc: int, base_checkpoint: str | Path = "embedded", resume: bool = False,
                 overwrite: bool = False, env: dict[str, str] | None = None, pipeline: str | None = None) -> None:
        from neuromf.config import save_config

        if nproc < 1:
            raise ValueError(f"nproc must be at least 1, got {nproc}")
        self.cfg, self.nproc = cfg, int(nproc)
        self.scratch = Path(tempfile.mkdtemp(prefix="neuromf_launch_"))
        save_config(cfg, self.scratch / "config.yaml")
        self.spec = Spec(config=str(self.scratch / "config.yaml"), base_checkpoint=str(base_checkpoint),
                         resume=bool(resume), overwrite=bool(overwrite), stop_file=str(self.scratch / "stop"),
                         preview_dir=str(self.scratch / "previews"), **({"pipeline": pipeline} if pipeline else {}))
        spec_path = self.scratch / "spec.json"
        spec_path.write_text(json.dumps(self.spec.__dict__, indent=2))
        self.command = torchrun_command(self.nproc, spec_path)
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.rank_lines: list[str] = []  # "[neuromf] rank k/N failed: ..." lines (distributed.report_failure)
        self.error: dict[str, str] = {}  # rank 0's exception: type, message
        self.cancelled: tuple[int, int] | None = None  # (cases encoded, cases) of a stop during encoding
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, env=child_env, start_new_session=True)

    @property
    def running(self) -> bool:
        """Whether torchrun is still running."""
        return self.proc.poll() is None

    def stop(self) -> None:
        """Ask the ranks to stop at the next step (rank 0 saves a checkpoint and the adapter), or, while the
        cases are being encoded, after the current case (nothing is saved)."""
        try:
            Path(self.spec.stop_file).touch()
        except OSError:  # the scratch folder is gone: the job has ended
            pass

    def kill(self) -> None:
        """End torchrun and every rank at once (no checkpoint is saved)."""
        if self.running:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()

    def events(self) -> Generator[Any, None, Any]:
        """The run's TrainEvents as rank 0 reports them; returns the TrainResult (None after a stop during
        encoding, see `cancelled`). Raises TrainingProcessError when the job exits with an error."""
        from neuromf.train.loop import TrainEvent, TrainResult

        result = None
        cancel_deadline = None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.startswith(EVENT_PREFIX):
                if line.strip():
                    self.tail.append(line.rstrip("\n"))
                if line.startswith("[neuromf] rank") and len(self.rank_lines) < 16:
                    self.rank_lines.append(line.strip())
                continue
            record = json.loads(line[len(EVENT_PREFIX):])
            kind = record.pop("kind")
            if kind == "result":
                result = TrainResult(**{k: (Path(v) if k in ("out_dir", "checkpoint", "export") and v else v)
                                        for k, v in record.items()})
            elif kind == "error":
                self.error = record
            elif kind == "cancelled":
                self.cancelled = (int(record["done"]), int(record["total"]))
                cancel_deadline = time.monotonic() + CANCEL_GRACE_S
                threading.Thread(target=self._kill_after, args=(cancel_deadline,), daemon=True).start()
            else:
                preview = record.pop("preview", None)
                if preview:
                    record["preview"] = _read_previews(preview)
                if record.get("path"):
                    record["path"] = Path(record["path"])
                yield TrainEvent(kind, **record)
        code = self.proc.wait()
        if self.cancelled is not None:  # the other ranks end with an error once rank 0 has left: expected
            return None
        if code != 0 or result is None:
            if not self.error:  # rank 0 did not report: another rank failed first and torchrun stopped it
                self.error = rank_error(self.rank_lines)
            raise TrainingProcessError(self._describe(code), list(self.tail), code, self.error.get("type", ""),
                                       self.error.get("message", ""), self.rank_lines)
        return result

    def _kill_after(self, deadline: float) -> None:
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running:
            self.kill()

    def _describe(self, code: int | None) -> str:
        what = f"{self.nproc} training processes (torchrun)"
        cause = f": {self.error['type']}: {self.error['message']}" if self.error else ""
        if code == 0:
            return f"{what} ended without a result{cause}"
        return f"{what} exited with code {code}{cause}"

    def close(self) -> None:
        """Kill the job if it still runs and remove the scratch folder."""
        self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def launch_joint(cfg: Any, nproc: int, device: str | None = None, base_checkpoint: str | Path = "embedded",
                 resume: bool = False, overwrite: bool = False) -> TrainingProcess:
    """Start `train_joint(cfg, ...)` in `nproc` local processes (torchrun); `device` overrides
    `cfg.training.device` ("auto"/"cuda": each rank takes cuda:LOCAL_RANK; "cpu": gloo on the CPU)."""
    if device is not None:
        import copy

        cfg = copy.deepcopy(cfg)
        cfg.training.device = device
    return TrainingProcess(cfg, nproc, base_checkpoint, resume=resume, overwrite=overwrite)



launch_lora = launch_joint  # the deprecated name (one release): the napari plugin still calls it

_RANK_FAILED = re.compile(r"^\[neuromf\] rank \d+/\d+ failed: ([A-Za-z_][\w.]*): (.*)$")


def rank_error(rank_lines: list[str]) -> dict[str, str]:
    """The exception of the first rank that reported one (`distributed.describe_failure`'s "rank k/N failed:
    Type: message" line) as {"type", "message"}; {} when none did (a rank that only lost contact names no cause)."""
    for line in rank_lines:
        found = _RANK_FAILED.match(line.strip())
        if found:
            return {"type": found.group(1), "message": found.group(2)}
    return {}


def _read_previews(paths: list[str]) -> list[tuple[Any, Any]]:
    import numpy as np

    pairs = []
    for path in paths:
        with np.load(path) as data:
            pairs.append((data["image"], data["mask"]))
        Path(path).unlink(missing_ok=True)
    return pairs


# -------------------------------------------------------------------------------------------- rank side
_parent_gone = threading.Event()  # rank 0's stdout is closed: whoever launched the run is gone


def _emit(kind: str, **fields: Any) -> None:
    if _parent_gone.is_set():
        return
    try:
        print(EVENT_PREFIX + json.dumps({"kind": kind, **fields}, default=str), flush=True)
    except OSError:  # BrokenPipeError: the GUI closed; the run stops at the next step and saves
        _parent_gone.set()


def _event_fields(event: Any, preview_dir: Path) -> dict[str, Any]:
    fields = {"step": event.step, "epoch": event.epoch, "total_steps": event.total_steps, "loss": event.loss,
              "parts": dict(event.parts or {}), "lr": event.lr, "eta_s": event.eta_s,
              "path": str(event.path) if event.path else None, "message": event.message}
    if event.preview:
        import numpy as np

        preview_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (image, mask) in enumerate(event.preview):
            path = preview_dir / f"preview_{event.step}_{i}.npz"
            np.savez(path, image=np.asarray(image), mask=np.asarray(mask))
            paths.append(str(path))
        fields["preview"] = paths
    return fields


def pipeline_function(name: str) -> Any:
    """The training generator a spec names ("neuromf.pipelines.<module>:<function>"); ValueError for anything
    outside `neuromf.pipelines` (a spec never makes a rank import arbitrary code)."""
    import importlib

    module, _, function = name.partition(":")
    if not module.startswith("neuromf.pipelines.") or not function.isidentifier():
        raise ValueError(f"not a training pipeline of neuromf.pipelines: {name!r}")
    return getattr(importlib.import_module(module), function)


def rank_main(spec_path: str | Path) -> int:
    """One rank of a launched run (see the module docstring); returns the exit status."""
    from neuromf.config import load_config
    from neuromf.train import distributed as dist

    spec = Spec(**json.loads(Path(spec_path).read_text()))
    train_fn = pipeline_function(spec.pipeline)
    stop_file, preview_dir = Path(spec.stop_file), Path(spec.preview_dir)
    try:
        cfg = load_config(spec.config)
        dist.init(cfg.training.device, cfg.training.dist_timeout_s)
        main = dist.is_main()
        stop = dist.stop_on_signals()
        events = train_fn(cfg, spec.base_checkpoint, resume=spec.resume, overwrite=spec.overwrite, stop=stop,
                            progress=False)
        while True:
            try:
                event = next(events)
            except StopIteration as finished:
                result = finished.value
                break
            if main and not stop.is_set() and (_parent_gone.is_set() or stop_file.exists()):
                stop.set()  # every rank stops at the same step: the loop agrees on it
            if main:
                _emit(event.kind, **_event_fields(event, preview_dir))
            if main and event.kind == "encoding" and stop.is_set():
                try:  # ends the start as a failed one: a fresh folder is removed, a resumed run left as it was
                    events.throw(StopBeforeTraining())
                except StopBeforeTraining:
                    pass
                _emit("cancelled", done=event.step, total=event.total_steps)
                return 0
        if main:
            _emit("result", out_dir=str(result.out_dir), step=result.step, stopped=result.stopped,
                  checkpoint=str(result.checkpoint), export=str(result.export) if result.export else None,
                  skipped_steps=result.skipped_steps)
        return 0
    except Exception as err:
        if dist.is_main():
            _emit("error", type=type(err).__name__, message=str(err))
        dist.report_failure(err)
        raise
    finally:
        dist.cleanup()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m neuromf.train.launch SPEC.json (started by neuromf.train.launch)")
    raise SystemExit(rank_main(sys.argv[1]))


__all__ = ["EVENT_PREFIX", "Spec", "StopBeforeTraining", "TrainingProcess", "TrainingProcessError", "launch_joint",
           "launch_lora", "rank_error", "rank_main", "torchrun_command"]
