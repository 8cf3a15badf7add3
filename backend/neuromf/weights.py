"""Loading tensors from local weight files safely, and locating the embedded sample data and models.

torch and safetensors are imported where tensors are read, so locating the sample data stays cheap (napari's
File > Open Sample runs on its GUI thread).
"""

from __future__ import annotations

import json
import pickle
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuromf.utils import file_sha256, sample_data_root

if TYPE_CHECKING:
    import torch


def embedded_model_dir(name: str) -> Path:
    """The folder of a shipped model (`sample_data/models/<name>`, or its name by kind and grid, e.g.
    `joint_2mm` for `joint_fine`: see `SHIPPED_NAMES`); FileNotFoundError when absent."""
    path = sample_data_root() / "models" / SHIPPED_NAMES.get(name, name)
    if not path.is_dir():
        raise FileNotFoundError(f"embedded model {name!r} not found at {path}")
    return path


# the shipped defaults by name: "embedded" is the set whose joint pairs carry lesions, at 2 mm (96^3);
# "embedded-3mm" the faster 3 mm set (64^3, the tests' and the old default); "embedded-fine" is the 2 mm set's
# name before "embedded" moved to it (deprecated: kept for one release, and read in saved sidecars)
EMBEDDED_NAMES = ("embedded", "embedded-3mm", "embedded-fine")
DEPRECATED_NAMES = {"embedded-fine": "embedded"}
EMBEDDED_MODELS: dict[str, dict[str, str]] = {
    "vae": {"embedded": "vae_fine", "embedded-3mm": "vae_small", "embedded-fine": "vae_fine"},
    "base": {"embedded": "base_fine", "embedded-3mm": "base_small", "embedded-fine": "base_fine"},
    "joint": {"embedded": "joint_fine", "embedded-3mm": "lora_demo", "embedded-fine": "joint_fine"},
    "conditional": {"embedded": "cond_fine", "embedded-3mm": "cond_demo", "embedded-fine": "cond_fine"},
}


# the shipped folders by what they are (kind + grid); the folder names stay as shipped to keep git history small
SHIPPED_NAMES = {f"{kind}_{grid}": folder for kind, by_grid in EMBEDDED_MODELS.items()
                 for grid, folder in zip(("3mm", "2mm"), (by_grid["embedded-3mm"], by_grid["embedded"]), strict=True)}


def recorded_name(name: Any, spacing: list[float] | tuple[float, ...] | None) -> Any:
    """A shipped name as read from a saved sidecar, in today's names: sidecars written before "embedded" moved to
    the 2 mm set say "embedded" for the 3 mm one, which their grid (`spacing`, mm) tells apart, and
    "embedded-fine" for the 2 mm one; any other entry unchanged."""
    if name == "embedded" and spacing is not None and [float(s) for s in spacing] == [3.0, 3.0, 3.0]:
        return "embedded-3mm"
    return DEPRECATED_NAMES.get(name, name) if isinstance(name, str) else name


def warn_deprecated_name(spec: str | Path) -> None:
    """A FutureWarning for a deprecated shipped name (`DEPRECATED_NAMES`) given by a user."""
    if str(spec) in DEPRECATED_NAMES:
        warnings.warn(f"{str(spec)!r} is deprecated, use {DEPRECATED_NAMES[str(spec)]!r} (the same 2 mm set; "
                      "'embedded-3mm' names the 3 mm one)", FutureWarning, stacklevel=3)


def embedded_model(spec: str | Path, kind: str) -> Path | None:
    """The folder a shipped model's name ("embedded": 2 mm, "embedded-3mm") stands for; None for any other spec."""
    names = EMBEDDED_MODELS[kind]
    if str(spec) not in EMBEDDED_NAMES:
        return None
    warn_deprecated_name(spec)
    if str(spec) not in names:
        raise FileNotFoundError(f"no shipped {kind} model is called {str(spec)!r} (shipped: {', '.join(names)})")
    return embedded_model_dir(names[str(spec)])


class WeightFileError(ValueError):
    """A weight file that cannot be used (corrupt, truncated, pickled, not a state_dict); names the file."""


# One registry of the shipped weight files (pooch-style): the sha256 and size of each, checked when one is loaded,
# and the files two models share (stored once: "same_as"). `scripts/update_weights_registry.py` rewrites it.
REGISTRY = "registry.json"


def _models_root() -> Path | None:
    try:
        return (sample_data_root() / "models").resolve()
    except FileNotFoundError:
        return None


def weights_registry() -> dict[str, dict[str, Any]]:
    """`sample_data/models/registry.json`'s files: {relative path: {"sha256", "bytes"} or {"same_as": path}}."""
    root = _models_root()
    if root is None or not (root / REGISTRY).is_file():
        return {}
    return read_json_sidecar(root / REGISTRY, "the shipped weights registry")["files"]


@lru_cache(maxsize=64)
def _verified(path: Path, size: int, mtime_ns: int, sha256: str) -> bool:
    return file_sha256(path) == sha256  # cached per (size, mtime): a file is hashed once per process


def shipped_file(path: Path | str) -> Path:
    """The file to read for `path`: for a shipped weight file, the one stored copy it resolves to, after checking
    its sha256 against the registry (WeightFileError naming the file on a mismatch); any other path unchanged."""
    path = Path(path)
    root = _models_root()
    try:
        relative = path.resolve().relative_to(root).as_posix() if root else None
    except ValueError:
        relative = None
    entry = weights_registry().get(relative) if relative else None
    if entry is None:
        return path
    if "same_as" in entry:
        relative, path = entry["same_as"], root / entry["same_as"]
        entry = weights_registry()[relative]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shipped weight file is missing (listed in {root / REGISTRY})")
    stat = path.stat()
    if stat.st_size != entry["bytes"] or not _verified(path, stat.st_size, stat.st_mtime_ns, entry["sha256"]):
        raise WeightFileError(
            f"{path}: shipped weight file does not match {root / REGISTRY} (expected sha256 {entry['sha256'][:16]}..., "
            f"{entry['bytes']} bytes; got {file_sha256(path)[:16]}..., {stat.st_size} bytes): restore it "
            "(git checkout / reinstall), or after retraining it on purpose run scripts/update_weights_registry.py")
    return path


def update_registry(models_root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Rewrite the registry from the weight files on disk (after a retrain); a file byte-identical to one already
    listed is deleted and recorded as "same_as" that one. Returns the new registry's files."""
    from neuromf.utils import atomic_write_text

    root = Path(models_root or _models_root() or "sample_data/models")
    old = read_json_sidecar(root / REGISTRY, "the shipped weights registry")["files"] if (
        root / REGISTRY).is_file() else {}
    files: dict[str, dict[str, Any]] = {}
    by_hash: dict[str, str] = {}
    for path in sorted(root.glob("*/*.safetensors")):
        relative, sha = path.relative_to(root).as_posix(), file_sha256(path)
        if sha in by_hash:
            path.unlink()
            files[relative] = {"same_as": by_hash[sha]}
            continue
        by_hash[sha] = relative
        files[relative] = {"sha256": sha, "bytes": path.stat().st_size}
    for relative, entry in old.items():  # shared files stay shared while their one copy exists
        if "same_as" in entry and relative not in files and entry["same_as"] in files:
            files[relative] = entry
    registry = {"about": "sha256 of every shipped weight file, checked at load (neuromf.weights.shipped_file); "
                         "rewrite with scripts/update_weights_registry.py after a retrain",
                "files": dict(sorted(files.items()))}
    atomic_write_text(root / REGISTRY, json.dumps(registry, indent=1) + "\n")
    return registry["files"]


def read_json_sidecar(path: Path, what: str) -> dict[str, Any]:
    """A JSON sidecar as a dict; WeightFileError naming the file (and `what` it is) when it is not a JSON object."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightFileError(f"{path}: {what} is not readable JSON ({err})") from err
    if not isinstance(meta, dict):
        raise WeightFileError(f"{path}: {what} must be a JSON object, got {type(meta).__name__}")
    return meta


def _safetensors_problem(path: Path, err: Exception) -> str:
    """Plain words for safetensors' header errors, plus a hint when the file is really a pickle/zip."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    size = path.stat().st_size
    if size == 0:
        what = "the file is empty (0 bytes)"
    elif head[:2] == b"PK" or head[:1] == b"\x80":
        what = "the file is a PyTorch pickle/zip archive, not safetensors (rename it to .pt to read it as tensors)"
    elif "incomplete metadata" in str(err) or "not fully covered" in str(err):
        what = f"the file is truncated ({size} bytes, shorter than its header says)"
    else:
        what = "the file is corrupt or not a safetensors file"
    return f"{path}: not a readable safetensors weight file: {what} ({err})"


def load_state_dict(path: Path | str, nested_key: str | None = "unet_state_dict") -> dict[str, torch.Tensor]:
    """Read a state_dict from `.safetensors` or `.pt`/`.pth` without ever unpickling arbitrary objects.

    Released MAISI files are either a plain state_dict or nest it under `unet_state_dict`. A corrupt,
    truncated, empty or pickled file raises WeightFileError (a ValueError) naming the file and the problem.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = shipped_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise WeightFileError(_safetensors_problem(path, err)) from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # torch's message suggests weights_only=False (arbitrary code execution): keep only its diagnosis
            text = str(err)
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text else ""
            raise WeightFileError(
                f"{path}: refused to load: the file contains pickled Python objects, not only tensors "
                f"(weights_only=True). Convert it to safetensors or a plain state_dict. Detail: {detail}"
            ) from err
        except Exception as err:  # zip/EOF errors on truncated files
            empty = " (the file is empty, 0 bytes)" if path.stat().st_size == 0 else ""
            raise WeightFileError(f"{path}: not a readable PyTorch weight file{empty} ({err})") from err
    if not isinstance(state, dict):
        raise WeightFileError(
            f"{path}: expected a state_dict (mapping of names to tensors), got {type(state).__name__}")
    if nested_key and nested_key in state and isinstance(state[nested_key], dict):
        state = state[nested_key]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightFileError(f"{path}: entries that are not tensors: {bad[:5]}")
    return state


def check_keys(path: Path | str, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise an error listing missing/unexpected/mis-shaped keys instead of torch's generic message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with wrong shape (e.g. {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(expected[k].shape)})")
        raise ValueError(f"{path}: weights do not match the {type(model).__name__} architecture: " + "; ".join(parts)
                         + ". Is the preset right?")


def save_half_precision(src: Path | str, dst: Path | str) -> Path:
    """Copy a safetensors weight file with floating tensors stored as float16 (halves embedded model size).

    Loading casts back: `load_state_dict` copies into the model's float32 parameters.
    """
    from safetensors.torch import save_file

    from neuromf.utils import atomic_write

    state = load_state_dict(src, nested_key=None)
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    return atomic_write(Path(dst), lambda p: save_file(half, str(p)))
