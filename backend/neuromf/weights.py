"""Loading tensors from local weight files safely, and locating the embedded sample data and models.

torch and safetensors are imported where tensors are read, so locating the sample data stays cheap (napari's
File > Open Sample runs on its GUI thread).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import neuromf

if TYPE_CHECKING:
    import torch


def sample_data_root() -> Path:
    """`sample_data/` of a source checkout, or the copy packaged into the wheel."""
    package_dir = Path(neuromf.__file__).resolve().parent
    for candidate in (package_dir.parents[1] / "sample_data", package_dir / "_sample_data"):
        if (candidate / "models").is_dir() or (candidate / "fcd_phantoms").is_dir():
            return candidate
    raise FileNotFoundError(
        f"embedded sample data not found next to {package_dir} (looked for ../../sample_data and _sample_data)"
    )


def embedded_model_dir(name: str) -> Path:
    """The folder of a shipped model (`sample_data/models/<name>`); FileNotFoundError when absent."""
    path = sample_data_root() / "models" / name
    if not path.is_dir():
        raise FileNotFoundError(f"embedded model {name!r} not found at {path}")
    return path


# the shipped defaults by name: "embedded" is the 3 mm one (64^3), "embedded-fine" the 2 mm one (96^3);
# "embedded-3mm" names the 3 mm set explicitly (for when "embedded" moves to the 2 mm set)
EMBEDDED_NAMES = ("embedded", "embedded-fine", "embedded-3mm")
EMBEDDED_MODELS: dict[str, dict[str, str]] = {
    "vae": {"embedded": "vae_small", "embedded-fine": "vae_fine", "embedded-3mm": "vae_small"},
    "base": {"embedded": "base_small", "embedded-fine": "base_fine", "embedded-3mm": "base_small"},
    "joint": {"embedded": "lora_demo", "embedded-fine": "joint_fine", "embedded-3mm": "lora_demo"},
    "conditional": {"embedded": "cond_demo", "embedded-fine": "cond_fine", "embedded-3mm": "cond_demo"},
}


def embedded_model(spec: str | Path, kind: str) -> Path | None:
    """The folder a shipped model's name ("embedded", "embedded-fine") stands for; None for any other spec."""
    names = EMBEDDED_MODELS[kind]
    if str(spec) not in EMBEDDED_NAMES:
        return None
    if str(spec) not in names:
        raise FileNotFoundError(f"no shipped {kind} model is called {str(spec)!r} (shipped: {', '.join(names)})")
    return embedded_model_dir(names[str(spec)])


class WeightFileError(ValueError):
    """A weight file that cannot be used (corrupt, truncated, pickled, not a state_dict); names the file."""


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

    path = Path(path)
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
