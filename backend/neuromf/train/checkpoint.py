"""Training checkpoints: safetensors (trainable weights, EMA, optimizer, RNG) + a JSON sidecar, written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from neuromf.train.ema import EMA, trainable_parameters
from neuromf.utils import atomic_write, atomic_write_json, library_versions

CHECKPOINT_NAME = "checkpoint"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{CHECKPOINT_NAME}.safetensors", out_dir / f"{CHECKPOINT_NAME}.json"


def save_checkpoint(out_dir: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: TrainState, meta: dict[str, Any]) -> Path:
    """Write weights then sidecar, each through a temp file + rename; both carry the step so a torn pair shows."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in trainable_parameters(model).items():
        tensors[f"model/{name}"] = p.detach().cpu().contiguous()
    for name, t in ema.state_dict().items():
        tensors[f"ema/{name}"] = t.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    scalar_state: dict[str, dict[str, Any]] = {}
    for idx, slots in opt_state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalar_state.setdefault(str(idx), {})[key] = value
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    weights, sidecar = checkpoint_paths(out_dir)
    atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"step": str(state.step)}))
    atomic_write_json(sidecar, {
        "step": state.step, "epoch": state.epoch, "skipped_steps": state.skipped_steps, "extra": state.extra,
        "optimizer_param_groups": opt_state["param_groups"], "optimizer_scalar_state": scalar_state,
        "generator_device": str(generator.device), "versions": library_versions(), **meta,
    })
    return weights


def read_checkpoint_meta(out_dir: Path) -> dict[str, Any]:
    weights, sidecar = checkpoint_paths(out_dir)
    if not weights.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"{out_dir}: no resumable checkpoint ({weights.name} + {sidecar.name})")
    meta = json.loads(sidecar.read_text())
    with safe_open(str(weights), framework="pt") as fh:
        step = (fh.metadata() or {}).get("step")
    if step is not None and int(step) != meta["step"]:
        raise ValueError(f"{out_dir}: checkpoint weights (step {step}) and sidecar (step {meta['step']}) disagree")
    return meta


def load_checkpoint(out_dir: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> TrainState:
    """Restore trainable weights, EMA, optimizer and RNG states; returns the saved step counters."""
    meta = read_checkpoint_meta(out_dir)
    weights, _ = checkpoint_paths(out_dir)
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    params = trainable_parameters(model)
    saved = {k[len("model/"):] for k in tensors if k.startswith("model/")}
    if saved != set(params):
        diff = sorted(saved ^ set(params))
        raise ValueError(f"{weights}: trainable parameters differ from the model being resumed (e.g. {diff[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"model/{name}"])
    ema.load_state_dict({k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["optimizer_param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, slot = key.split("/", 2)
            opt_state["state"].setdefault(int(idx), {})[slot] = value
    for idx, slots in meta["optimizer_scalar_state"].items():
        opt_state["state"].setdefault(int(idx), {}).update(slots)
    optimizer.load_state_dict(opt_state)
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return TrainState(step=meta["step"], epoch=meta["epoch"], skipped_steps=meta["skipped_steps"],
                      extra=meta.get("extra", {}))
