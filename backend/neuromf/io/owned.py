"""Output folders the project owns: a manifest of the files it wrote, so replacing a run removes nothing else.

A command that creates an output folder (a training run, a folder of generated pairs) writes
``.neuromf-owned.json`` into it first: who owns it (``owner``: the command and what identifies its run) and the
files it wrote (``files``, paths relative to the folder). ``--overwrite`` removes exactly those files (resolved,
and only inside the folder) and never a folder without a manifest: a user's folder that merely holds a
``config.yaml`` is not a run. Every path read back from a manifest must stay inside its folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neuromf.utils import atomic_write_json

MANIFEST = ".neuromf-owned.json"
KIND = "neuromf_owned_folder"


class FolderNotOwnedError(FileExistsError):
    """An output folder the project did not create (or another run's): never emptied or mixed into."""


class ManifestError(ValueError):
    """A manifest that cannot be trusted (not JSON, wrong kind, a path outside its folder)."""


def inside(root: Path, relative: str | Path, what: str = "entry") -> Path:
    """`root / relative`, resolved; ManifestError when it leaves `root` (``..``, an absolute path, a link out).

    The last component is not followed (a link inside the folder is the folder's own entry, removed as a link).
    """
    root_resolved = Path(root).resolve()
    relative = Path(relative)
    if relative.is_absolute() or not relative.parts:
        raise ManifestError(f"{root}: {what} {str(relative)!r} is not a path inside the folder")
    try:
        parent = (root_resolved / relative).parent.resolve(strict=False)
    except (OSError, RuntimeError) as err:  # a symbolic-link loop on the way
        raise ManifestError(f"{root}: {what} {str(relative)!r} cannot be resolved ({err})") from err
    candidate = parent / relative.name
    if relative.name in ("", ".", "..") or (candidate != root_resolved and root_resolved not in candidate.parents):
        raise ManifestError(f"{root}: {what} {str(relative)!r} points outside the folder; refusing to use it")
    return candidate


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest (None when it has none); ManifestError when it is damaged."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: damaged ownership manifest ({err}); remove the folder by hand if it is "
                            "yours") from err
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("files", []), list) \
            or not all(isinstance(f, str) for f in data.get("files", [])):
        raise ManifestError(f"{path}: not a NeuroMF ownership manifest")
    return data


def claim(folder: Path, owner: dict[str, Any]) -> Path:
    """Create `folder` (parents too) and write its manifest naming `owner`, with no files yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / MANIFEST, {"kind": KIND, "owner": owner, "created": time.time(), "files": []})
    return folder


def record(folder: Path, paths: Iterable[Path | str]) -> None:
    """Add `paths` (inside `folder`) to its manifest: they were written by the owner."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    files = set(manifest["files"])
    for path in paths:
        relative = Path(os.path.relpath(Path(path).absolute(), folder.absolute()))
        inside(folder, relative, "written file")
        files.add(relative.as_posix())
    if files != set(manifest["files"]):
        atomic_write_json(folder / MANIFEST, {**manifest, "files": sorted(files)})


def record_written_since_claim(folder: Path, skip: Iterable[str] = ()) -> None:
    """Add every file below `folder` modified since it was claimed (a training run's outputs), hidden ones and
    `skip` names aside."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    since = float(manifest.get("created", 0)) - 2.0  # file-system timestamps are coarse
    skip = set(skip)
    new = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if name.startswith(".") or name in skip or path.is_symlink():
                continue
            try:
                if path.stat().st_mtime >= since:
                    new.append(path)
            except OSError:
                continue
    record(folder, new)


def owner_of(folder: Path) -> dict[str, Any] | None:
    """The `owner` entry of the folder's manifest, or None without one."""
    manifest = read_manifest(folder)
    return None if manifest is None else manifest.get("owner", {})


def remove_owned(folder: Path) -> list[Path]:
    """Remove the files the manifest lists (and folders left empty by that), then the manifest itself.

    Returns what remains in `folder` (files the project did not write); FolderNotOwnedError without a manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise FolderNotOwnedError(f"{folder}: not written by NeuroMF (no {MANIFEST}); refusing to delete anything")
    parents: set[Path] = set()
    for relative in manifest["files"]:
        path = inside(folder, relative, "manifest entry")
        if path.is_file() or path.is_symlink():
            path.unlink()
        parents.update(p for p in Path(relative).parents if p != Path("."))
    root = folder.resolve()
    for relative in sorted(parents, key=lambda p: len(p.parts), reverse=True):  # deepest first
        directory = root / relative
        if directory.is_dir() and not directory.is_symlink() and not any(directory.iterdir()):
            directory.rmdir()
    (folder / MANIFEST).unlink(missing_ok=True)
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".neuromf"))

