"""Saving and loading trained MeanFlow models: safetensors weights + JSON sidecar (architecture, VAE, scale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from neuromf.io.nifti import sidecar_grid_problem
from neuromf.io.validate import entry_type_problem
from neuromf.models.unet import MeanFlowUNet
from neuromf.utils import atomic_write, atomic_write_json, file_sha256
from neuromf.weights import (
    WeightFileError,
    check_keys,
    embedded_model,
    load_state_dict,
    read_json_sidecar,
    recorded_name,
)


def save_flow_model(model: MeanFlowUNet, directory: Path, meta: dict[str, Any]) -> Path:
    """Save a stage-1 model: `model.safetensors` + `model.json` (architecture + whatever generation needs).

    Args:
        model: the trained UNet.
        directory: output folder (created).
        meta: sidecar entries beside `kind` and `arch`: VAE reference, `scale_factor`, `preprocessing`,
            `latent_shape` (C, h, w, d), ...
    Returns:
        Path of the weights file.
    """
    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))
    atomic_write_json(directory / "model.json", {"kind": "meanflow_unet", "arch": model.arch, **meta})
    return weights


def resolve_model_path(spec: str | Path) -> tuple[Path, Path]:
    """The weights and sidecar of a saved model.

    Args:
        spec: "embedded" / "embedded-3mm" (the shipped 2 mm / 3 mm base), a model folder, or a `.safetensors`
            file next to its `.json`.
    Returns:
        (weights path, sidecar path).
    Raises:
        FileNotFoundError: either file is missing.
    """
    spec = embedded_model(spec, "base") or spec
    path = Path(spec)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: base model not found (expected a folder with model.safetensors + "
                                "model.json, or the .safetensors file itself)")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{path}: missing sidecar {sidecar.name} (architecture and VAE settings)")
    return path, sidecar


# the types of a model sidecar's entries that code reads (`neuromf.vae.vae_for`, `load_flow_model`)
MODEL_SIDECAR_TYPES: dict[str, Any] = {"kind": str, "arch": dict, "vae": str, "vae_preset": str, "vae_identity": str,
                                       "scale_factor": float, "preprocessing": dict, "latent_shape": list,
                                       "channels": dict}


def _sidecar_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "model sidecar is not a JSON object"
    return entry_type_problem(meta, MODEL_SIDECAR_TYPES) or sidecar_grid_problem(meta)


def _read_model_sidecar(sidecar: Path, kind: str | None = None) -> dict[str, Any]:
    """A model sidecar (of `kind` when given), checked, with its VAE's shipped name in today's names
    (`neuromf.weights.recorded_name`: a sidecar written before "embedded" moved to the 2 mm set)."""
    meta = read_json_sidecar(sidecar, "model sidecar")
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{sidecar}: not a MeanFlow model sidecar (kind={meta.get('kind')!r})")
    if (problem := _sidecar_problem(meta)) is not None:
        raise WeightFileError(f"{sidecar}: {problem}")
    if "vae" in meta:
        meta["vae"] = recorded_name(meta["vae"], (meta.get("preprocessing") or {}).get("spacing"))
    return meta


def read_model_meta(spec: str | Path) -> dict[str, Any]:
    """The sidecar of a saved model (architecture, VAE, grid) without loading its weights."""
    _, sidecar = resolve_model_path(spec)
    return _read_model_sidecar(sidecar)


def load_flow_model(spec: str | Path, preset: str | None = None) -> tuple[MeanFlowUNet, dict[str, Any]]:
    """Rebuild the UNet from its sidecar and load the weights; `preset` guards against the wrong checkpoint.

    Args:
        spec: "embedded" / "embedded-3mm", a model folder or a `.safetensors` file (see `resolve_model_path`).
        preset: the preset the caller expects; None accepts any.
    Returns:
        (model on CPU, sidecar dict with `weights_path` and `weights_sha256` added).
    Raises:
        ValueError: not a MeanFlow sidecar, or a different preset than `preset`.
        WeightFileError: unreadable sidecar or weights, or weights that do not fit the architecture.
    """
    weights, sidecar = resolve_model_path(spec)
    meta = _read_model_sidecar(sidecar, kind="meanflow_unet")
    arch = meta.get("arch")
    if not isinstance(arch, dict) or not {"preset", "in_channels", "out_channels"} <= set(arch):
        raise WeightFileError(f"{sidecar}: model sidecar lacks the architecture ('arch' with preset, in_channels, "
                              "out_channels)")
    if preset is not None and arch["preset"] != preset:
        raise ValueError(f"{weights}: checkpoint is a {arch['preset']!r} UNet but the config asks for {preset!r} "
                         "(model.preset)")
    try:
        model = MeanFlowUNet(arch["in_channels"], arch["out_channels"], preset=arch["preset"])
    except (TypeError, ValueError) as err:
        raise WeightFileError(f"{sidecar}: invalid architecture in the model sidecar ({err})") from err
    state = load_state_dict(weights)
    check_keys(weights, model, state)
    model.load_state_dict(state)
    meta["weights_path"] = str(weights)
    meta["weights_sha256"] = file_sha256(weights)
    return model, meta


def freeze(model: nn.Module) -> nn.Module:
    """Turn off requires_grad on every parameter of `model`; returns it."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model
