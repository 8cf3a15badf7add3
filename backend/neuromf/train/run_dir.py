"""Output folders: refuse to mix two different runs in one folder unless asked to resume or overwrite, and
leave nothing behind when a run fails before it starts training."""

from __future__ import annotations

import functools
import inspect
import shutil
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from neuromf.config import RunConfig, save_config
from neuromf.train.checkpoint import checkpoint_paths
from neuromf.utils import ensure_writable

Result = TypeVar("Result")


def prepare_run_dir(out_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Check (resume) or create (fresh, empty) the output folder; refuses a folder that holds another run."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite conflict: resume continues a run, overwrite deletes it")
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    weights, _ = checkpoint_paths(out_dir)
    if resume:
        if not weights.is_file():
            raise FileNotFoundError(f"{out_dir}: nothing to resume (no {weights.name})")
        saved = out_dir / "config.yaml"
        if saved.is_file():
            before = yaml.safe_load(saved.read_text())
            now = cfg.to_dict()
            changed = [f"{s}.{k}" for s in ("model", "data", "lora") for k in now.get(s, {})
                       if before.get(s, {}).get(k) != now[s][k]]
            if changed:
                raise ValueError(f"{out_dir}: cannot resume with a different setup; changed keys: {changed}")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: output folder already holds a run; pass --resume to continue it or "
                                  "--overwrite to replace it")
        if not (weights.is_file() or (out_dir / "config.yaml").is_file()):
            raise FileExistsError(f"{out_dir}: not a NeuroMF run folder (no config.yaml or checkpoint); refusing to "
                                  "delete it with --overwrite: choose an empty or new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what creating `path` would create), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _remove_created(out_dir: Path, created: Path | None) -> None:
    """Undo a fresh start: the folders this start created, else what was put into the existing folder."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in list(out_dir.iterdir()) if out_dir.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def in_run_dir(train_fn: Callable[..., Generator[Any, None, Result]]) -> Callable[..., Generator[Any, None, Result]]:
    """Decorate a training generator `f(cfg, ..., resume=, overwrite=)` that works in `cfg.training.output_dir`.

    Before the body runs, the folder is prepared (`prepare_run_dir`) and `config.yaml` saved. If the body fails
    before its first event (bad data, a corrupt base checkpoint, a wrong setting), everything this start
    created is removed again: otherwise the leftover `config.yaml` makes the same command refuse the folder
    ("already holds a run") while `--resume` finds nothing to resume. A resumed run is never touched.
    """
    signature = inspect.signature(train_fn)

    @functools.wraps(train_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, None, Result]:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        cfg: RunConfig = bound.arguments["cfg"]
        resume, overwrite = bool(bound.arguments.get("resume")), bool(bound.arguments.get("overwrite"))
        out_dir = Path(cfg.training.output_dir)
        created = _first_missing(out_dir)
        prepare_run_dir(out_dir, cfg, resume=resume, overwrite=overwrite)
        events = train_fn(*args, **kwargs)
        try:
            save_config(cfg, out_dir / "config.yaml")
            first = next(events)
        except StopIteration as finished:
            return finished.value
        except BaseException:
            if not resume:
                events.close()
                _remove_created(out_dir, created)
            raise
        try:
            yield first
        except GeneratorExit:
            events.close()
            raise
        return (yield from events)

    return wrapper
