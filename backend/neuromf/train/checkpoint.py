"""Training checkpoints: safetensors (trainable weights, EMA, optimizer, RNG) + a JSON sidecar, written atomically.

The weights file is the checkpoint: its safetensors metadata carries the whole sidecar too, so the one rename
that puts it in place switches to the new checkpoint at once. `checkpoint.json` is a readable copy written
after it; a process killed between the two renames leaves a stale copy, which the next resume rewrites.

Fault injection (tests only): ``NEUROMF_FAULT_CHECKPOINT=<point>@<step>`` makes the process SIGKILL itself at
``<point>`` of the checkpoint written at ``<step>``: ``weights-written`` (weights in a temp file, not yet
renamed), ``weights-renamed`` (new weights in place, sidecar still the old one) or ``sidecar-written``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from neuromf.train.ema import EMA, trainable_parameters
from neuromf.utils import atomic_write, json_default, library_versions

CHECKPOINT_NAME = "checkpoint"


@dataclass
class TrainState:
    """Where a run stands: steps and epochs done, skipped steps, and task extras (wall time, world size)."""

    step: int = 0
    epoch: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_paths(out_dir: Path) -> tuple[Path, Path]:
    """The checkpoint's weights file and its readable JSON copy in a run folder."""
    return out_dir / f"{CHECKPOINT_NAME}.safetensors", out_dir / f"{CHECKPOINT_NAME}.json"


META_KEY = "neuromf_checkpoint"  # safetensors metadata entry holding the sidecar as JSON
FAULT_ENV = "NEUROMF_FAULT_CHECKPOINT"


def _fault(point: str, step: int) -> None:
    """Test hook: SIGKILL this process at `point` of the checkpoint of `step` (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _replace_atomically(path: Path, write: Callable[[Path], None], point: str, step: int) -> None:
    """`atomic_write` with the fault-injection point between write and rename (a SIGKILL there leaves the temp
    file: the next resume clears such leftovers, see run_dir.remove_stale_temporaries)."""
    atomic_write(path, write, before_rename=lambda: _fault(point, step))


def save_checkpoint(out_dir: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, state: TrainState, meta: dict[str, Any]) -> Path:
    """Write the weights (sidecar embedded) then the sidecar copy, each through a temp file + rename.

    Non-finite weights are never saved (NonFiniteWeightsError: the previous checkpoint stays the last good one);
    a failed write (disk full, file-size limit) is an OSError naming the file, and the previous checkpoint stays
    in place, so the run can be resumed from it.
    """
    tensors: dict[str, torch.Tensor] = {}
    bad = [name for name, p in trainable_parameters(model).items() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise NonFiniteWeightsError(
            f"{out_dir}: {len(bad)} weight tensors became NaN or infinite by step {state.step} (e.g. {bad[0]}); "
            "not saved: the last good checkpoint in the folder is kept (lower training.lr, then --resume or "
            "--overwrite)")
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
    sidecar_text = json.dumps({
        "step": state.step, "epoch": state.epoch, "skipped_steps": state.skipped_steps, "extra": state.extra,
        "optimizer_param_groups": opt_state["param_groups"], "optimizer_scalar_state": scalar_state,
        "generator_device": str(generator.device), "versions": library_versions(), **meta,
    }, indent=2, default=json_default) + "\n"
    weights, sidecar = checkpoint_paths(Path(out_dir))
    weights.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"step": str(state.step), META_KEY: sidecar_text}
    try:
        _replace_atomically(weights, lambda p: save_file(tensors, str(p), metadata=metadata), "weights-written",
                            state.step)
        _fault("weights-renamed", state.step)
        _replace_atomically(sidecar, lambda p: p.write_text(sidecar_text), "sidecar-written", state.step)
    except (SafetensorError, OSError) as err:  # disk full, file-size limit, quota: safetensors' own error type
        kept = "the previous checkpoint is kept; free space and --resume" if weights.is_file() else \
            "no checkpoint was saved"
        raise OSError(f"{weights}: cannot write the checkpoint at step {state.step} "
                      f"({getattr(err, 'strerror', None) or err}); {kept}") from err
    from neuromf.io.owned import record_written_since_claim

    record_written_since_claim(Path(out_dir))
    return weights


class NonFiniteWeightsError(ValueError):
    """The model's weights became NaN or infinite (a ValueError: bad settings such as a huge learning rate)."""


def _weights_metadata(weights: Path) -> dict[str, str]:
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights}: checkpoint weights are not a readable safetensors file ({err}); the "
                         "checkpoint is damaged: start the run again with --overwrite") from err


def read_checkpoint_meta(out_dir: Path) -> dict[str, Any]:
    """The checkpoint's sidecar: the copy inside the weights file (authoritative), else checkpoint.json."""
    weights, sidecar = checkpoint_paths(Path(out_dir))
    if not weights.is_file():
        raise FileNotFoundError(f"{out_dir}: no resumable checkpoint ({weights.name} + {sidecar.name})")
    metadata = _weights_metadata(weights)
    if META_KEY in metadata:
        return json.loads(metadata[META_KEY])
    if not sidecar.is_file():  # a checkpoint written before the sidecar was embedded
        raise FileNotFoundError(f"{out_dir}: no resumable checkpoint ({weights.name} + {sidecar.name})")
    meta = json.loads(sidecar.read_text())
    step = metadata.get("step")
    if step is not None and int(step) != meta["step"]:
        raise ValueError(f"{out_dir}: checkpoint weights (step {step}) and sidecar (step {meta['step']}) disagree")
    return meta


def _repair_sidecar(out_dir: Path) -> None:
    """Rewrite checkpoint.json from the weights file when a kill between the two renames left it stale."""
    weights, sidecar = checkpoint_paths(Path(out_dir))
    embedded = _weights_metadata(weights).get(META_KEY)
    if embedded is None:
        return
    try:
        current = sidecar.read_text() if sidecar.is_file() else None
    except (OSError, UnicodeDecodeError):
        current = None
    if current != embedded:
        step = json.loads(embedded)["step"]
        _replace_atomically(sidecar, lambda p: p.write_text(embedded), "sidecar-repaired", step)


def load_checkpoint(out_dir: Path, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator) -> TrainState:
    """Restore trainable weights, EMA, optimizer and RNG states; returns the saved step counters."""
    meta = read_checkpoint_meta(out_dir)
    _repair_sidecar(out_dir)
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
