"""Output folders: one training at a time per folder (a lock), refuse to mix two different runs in one folder
unless asked to resume or overwrite, and leave no trap behind when a run fails or is killed.

- **Lock.** A training holds ``fcntl.flock`` on ``<output_dir>/.neuromf.lock`` from the first check of the folder
  until it ends; a second training, resume or overwrite of the same folder is refused while it runs. The kernel
  drops the lock when the process dies, so a SIGKILLed run never leaves a stale lock behind.
- **Failure.** A fresh run that fails before it has saved a checkpoint removes what it created, so the same
  command can simply be run again; one that fails later keeps its folder for ``--resume``.
- **Kill.** ``--resume`` clears the temp files a killed writer left; a run killed before its first checkpoint
  is started again from step 0 by ``--resume`` (there is nothing to lose).
- **Ownership.** A fresh run claims its folder (``neuromf.io.owned``: a manifest of the files the run writes,
  updated with its config, at each checkpoint and when it ends). ``--overwrite`` and the undo of a failed start
  remove only those files. A folder without a manifest (written before manifests existed) is replaced only when
  every entry in it is a name a run writes (`RUN_OUTPUT_NAMES`); any other folder is refused, naming what it holds.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import inspect
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neuromf.config import RunConfig, save_config
from neuromf.io import owned
from neuromf.train import distributed
from neuromf.train.checkpoint import checkpoint_paths, read_checkpoint_meta
from neuromf.utils import atomic_write, ensure_writable, first_missing

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one training per folder is then up to the user
    fcntl = None  # type: ignore[assignment]

Result = TypeVar("Result")
LOCK_NAME = ".neuromf.lock"
# what a training run writes at the top of its folder (the exports of every stage): a folder without an ownership
# manifest is replaced by --overwrite only when it holds nothing else
RUN_OUTPUT_NAMES = frozenset({"config.yaml", "checkpoint.safetensors", "checkpoint.json", "losses.csv",
                              "loss_curve.png", "model.safetensors", "model.json", "adapter", "tensorboard",
                              owned.MANIFEST})


class RunInUseError(FileExistsError):
    """Another training (resume, overwrite) holds the output folder."""


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.neuromf.lock``; the file names the holder's pid.

    The file is removed on release. Whoever locks checks that the file it locked is still the one at the path
    (a holder may have removed it in between), so removing it never lets two processes in.
    """

    def __init__(self, folder: Path, activity: str = "training") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.activity = activity  # what the refusal says is running there
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock."""
        return self.fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise naming the process that holds it (pid, host)."""
        if self.fd is not None or fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held by another process (or another open file here)
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                who = f" ({holder})" if holder else ""
                raise RunInUseError(
                    f"{self.path.parent}: another {self.activity} is running in this output folder{who}; wait for "
                    "it to finish (or stop it), or choose another output folder") from None
            try:
                mine = os.fstat(fd)
                there = os.stat(self.path)
                if (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        """Release the lock and remove its file."""
        if self.fd is None:
            return
        try:
            mine, there = os.fstat(self.fd), os.stat(self.path)
            if (mine.st_ino, mine.st_dev) == (there.st_ino, there.st_dev):
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _entries(out_dir: Path) -> list[Path]:
    """What the folder holds, its lock file aside."""
    return [p for p in out_dir.iterdir() if p.name != LOCK_NAME] if out_dir.is_dir() else []


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _clear(out_dir: Path) -> None:
    """Remove what this project wrote in a run folder: the files its manifest lists and the run's own top-level
    names (`RUN_OUTPUT_NAMES`, all a folder written before manifests is judged by); anything else stays, with a
    warning."""
    if owned.read_manifest(out_dir) is not None:
        owned.remove_owned(out_dir)
    # a run's own names go too: a run killed before its first checkpoint has recorded only its config
    kept = []
    for child in _entries(out_dir):
        if child.name not in RUN_OUTPUT_NAMES and not _is_temporary(child.name):
            kept.append(child)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    for child in _entries(out_dir):
        if _is_temporary(child.name):
            child.unlink(missing_ok=True)
    if kept:
        warnings.warn(f"{out_dir}: kept {len(kept)} entries NeuroMF did not write: "
                      + ", ".join(p.name for p in kept[:5]) + (", ..." if len(kept) > 5 else ""), stacklevel=3)


def _foreign_entries(out_dir: Path) -> list[str]:
    """Top-level entries of a folder without a manifest that no run writes (a user's files)."""
    return sorted(p.name for p in _entries(out_dir) if p.name not in RUN_OUTPUT_NAMES and not _is_temporary(p.name))


def _claim(out_dir: Path, cfg: RunConfig) -> None:
    owned.claim(out_dir, {"command": "train", "output_dir": str(out_dir), "pid": os.getpid(),
                          "host": socket.gethostname()})


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Remove what a killed writer leaves in a run folder: ``.<name>.*.tmp`` files of atomic writes (anywhere
    below) and hidden ``.<name>.*`` staging / swap folders of an export (top level). Call only while holding
    the folder's lock: a live writer's temp files look the same."""
    removed = []
    for path in sorted(Path(out_dir).rglob(".*")):
        if path.name == LOCK_NAME or not path.exists() and not path.is_symlink():
            continue
        stale_file = path.is_file() and path.name.endswith(".tmp")
        stale_dir = (path.is_dir() and not path.is_symlink() and path.parent == Path(out_dir)
                     and path.name.count(".") >= 2)
        if stale_file:
            path.unlink(missing_ok=True)
            removed.append(path)
        elif stale_dir:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def truncate_loss_log(out_dir: Path, step: int) -> None:
    """Drop the rows of ``losses.csv`` logged after `step`: a killed run logs steps past its last checkpoint,
    which the resumed run repeats; without this the log would hold those steps twice."""
    path = Path(out_dir) / "losses.csv"
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames or [], list(reader)

    def logged_at(row: dict) -> float:
        try:
            return float(row.get("step") or "nan")
        except ValueError:
            return float("nan")

    kept = [r for r in rows if logged_at(r) <= step]
    if len(kept) == len(rows):
        return

    def write(p: Path) -> None:
        with open(p, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)

    atomic_write(path, write)


def prepare_run_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool,
                    lock: RunLock | None = None) -> Path:
    """Check (resume) or create (fresh, empty) the output folder; refuses a folder that holds another run.

    With `lock`, the folder's lock is taken before anything in it is read or removed (and kept: the caller
    releases it). A resume of a run that has no checkpoint yet (killed or failed before its first one) empties
    the folder: the run then starts again from step 0.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite conflict: resume continues a run, overwrite deletes it")
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    if lock is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    weights, _ = checkpoint_paths(out_dir)
    saved = out_dir / "config.yaml"
    if resume:
        if not weights.is_file():
            if saved.is_file():
                warnings.warn(f"{out_dir}: the run saved no checkpoint before it stopped; starting it again from "
                              "step 0", stacklevel=3)
                _refuse_foreign(out_dir, "start it again")
                _clear(out_dir)
                _claim(out_dir, cfg)
                return out_dir
            raise FileNotFoundError(f"{out_dir}: nothing to resume (no {weights.name})")
        if saved.is_file():
            before = yaml.safe_load(saved.read_text())
            now = cfg.to_dict()
            changed = [f"{s}.{k}" for s in ("model", "data", "lora") for k in now.get(s, {})
                       if before.get(s, {}).get(k) != now[s][k]]
            if changed:
                raise ValueError(f"{out_dir}: cannot resume with a different setup; changed keys: {changed}")
        remove_stale_temporaries(out_dir)
        try:
            step = int(read_checkpoint_meta(out_dir)["step"])
        except (OSError, ValueError, KeyError, TypeError):  # a damaged checkpoint: loading it reports the problem
            return out_dir
        truncate_loss_log(out_dir, step)
        return out_dir
    if _entries(out_dir):
        if not overwrite:
            hint = ("" if weights.is_file() else
                    " (it stopped before its first checkpoint: --resume starts it again from step 0)")
            raise FileExistsError(f"{out_dir}: output folder already holds a run{hint}; pass --resume to continue "
                                  "it or --overwrite to replace it")
        if not (weights.is_file() or saved.is_file()):
            raise FileExistsError(f"{out_dir}: not a NeuroMF run folder (no config.yaml or checkpoint); refusing to "
                                  "delete it with --overwrite: choose an empty or new folder")
        _refuse_foreign(out_dir, "delete it with --overwrite")
        _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _claim(out_dir, cfg)
    return out_dir


def _refuse_foreign(out_dir: Path, action: str) -> None:
    """A folder without an ownership manifest that holds files no run writes is not a run: refuse `action`."""
    if owned.read_manifest(out_dir) is not None:
        return
    foreign = _foreign_entries(out_dir)
    if foreign:
        raise owned.FolderNotOwnedError(
            f"{out_dir}: not a NeuroMF run folder (no {owned.MANIFEST}; it holds "
            + ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            + f", which no run writes); refusing to {action}: choose an empty or new folder")


def _remove_created(out_dir: Path, created: Path | None) -> None:
    """Undo a fresh start: the folders this start created, else what it wrote into the existing folder."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    owned.record_written_since_claim(out_dir)
    if owned.read_manifest(out_dir) is not None:
        owned.remove_owned(out_dir)


def in_run_dir(train_fn: Callable[..., Generator[Any, None, Result]]) -> Callable[..., Generator[Any, None, Result]]:
    """Decorate a training generator `f(cfg, ..., resume=, overwrite=)` that works in `cfg.training.output_dir`.

    Before the body runs, the folder is locked and prepared (`prepare_run_dir`) and `config.yaml` saved; the lock
    is held until the body ends. If a fresh run fails before it has saved a checkpoint (bad data, a corrupt base
    checkpoint, a wrong setting, non-finite losses from the start), everything this start created is removed
    again: otherwise the leftover `config.yaml` makes the same command refuse the folder ("already holds a run")
    while `--resume` finds nothing to resume. A run with a checkpoint, and a resumed run, are never touched.
    """
    signature = inspect.signature(train_fn)

    @functools.wraps(train_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, None, Result]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg: RunConfig = bound.arguments["cfg"]
        resume, overwrite = bool(bound.arguments.get("resume")), bool(bound.arguments.get("overwrite"))
        out_dir = Path(cfg.training.output_dir)
        if not distributed.is_main():  # several processes: rank 0 alone locks, prepares and cleans the folder
            if "resume" in bound.arguments:  # as rank 0 decides: a run without a checkpoint starts at step 0
                bound.arguments["resume"] = resume and checkpoint_paths(out_dir)[0].is_file()
            return (yield from train_fn(*bound.args, **bound.kwargs))
        created = first_missing(out_dir)
        lock = RunLock(out_dir)
        try:
            prepare_run_dir(out_dir, cfg, resume=resume, overwrite=overwrite, lock=lock)
        except BaseException:
            lock.release()
            if created is not None:  # a refused start leaves no folder it made
                shutil.rmtree(created, ignore_errors=True)
            raise
        weights, _ = checkpoint_paths(out_dir)
        fresh = not weights.is_file()  # also a --resume of a run that never saved a checkpoint
        if "resume" in bound.arguments:
            bound.arguments["resume"] = not fresh
        try:
            events = train_fn(*bound.args, **bound.kwargs)
            try:
                save_config(cfg, out_dir / "config.yaml")
                owned.record(out_dir, [out_dir / "config.yaml"])
                return (yield from events)
            except GeneratorExit:  # closed by the caller: like a kill, the folder stays for --resume
                events.close()
                raise
            except BaseException:
                events.close()
                if fresh and not weights.is_file():  # nothing resumable was saved: undo this start
                    _remove_created(out_dir, created)
                raise
        finally:
            if out_dir.is_dir():
                owned.record_written_since_claim(out_dir)
            lock.release()

    return wrapper


GENERATED_NAME = re.compile(r"^sample_\d+(_flair|_mask)?\.(nii\.gz|nii|json)$")  # what generate writes


@contextlib.contextmanager
def output_folder(folder: Path, owner: dict[str, Any], overwrite: bool = False) -> Iterator[Callable]:
    """Own `folder` for one run of a writer (e.g. `generate`) while the block runs; yields `record(paths)`.

    The folder is locked against a second writer. A folder holding files of another run (another owner, or files
    NeuroMF did not write) is refused, unless `overwrite`: then only NeuroMF's own files are removed (the
    manifest's, or for a folder written before manifests, `sample_*` files) and anything else still refuses.
    The same run may write into its own folder again. If the block fails, a folder it created is removed.
    """
    folder = Path(folder)
    created = first_missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder, "generate")
    try:
        lock.acquire()
        manifest = owned.read_manifest(folder)
        mine = manifest is not None and manifest.get("owner") == owner
        entries = [p for p in folder.iterdir() if not p.name.startswith(".neuromf")]
        if entries and not mine:
            if not overwrite:
                whose = "another run's files" if manifest is not None else "files NeuroMF did not write here"
                raise owned.FolderNotOwnedError(f"{folder}: output folder holds {whose} ({entries[0].name}, ...); pass "
                                          "--overwrite to replace NeuroMF's files there, or choose another folder")
            if manifest is not None:
                owned.remove_owned(folder)
            else:
                for path in entries:
                    if path.is_file() and GENERATED_NAME.match(path.name):
                        path.unlink()
            left = [p.name for p in folder.iterdir() if not p.name.startswith(".neuromf")]
            if left:
                raise owned.FolderNotOwnedError(f"{folder}: output folder also holds files NeuroMF did not write ("
                                          + ", ".join(left[:3]) + "); refusing to mix them with generated ones: "
                                          "choose another folder")
        if not mine:
            owned.claim(folder, owner)
        yield lambda paths: owned.record(folder, paths)
    except BaseException:
        lock.release()
        if created is not None:  # nothing of a failed run stays behind in a folder it made
            shutil.rmtree(created, ignore_errors=True)
        raise
    lock.release()
