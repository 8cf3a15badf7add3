"""The one training loop: a generator of progress events, driven by the CLI (tqdm) and the napari worker.

It checks a stop flag every step; on stop it saves a resumable checkpoint (and the task's export, e.g. a LoRA
adapter) before returning, because a napari worker's quit() never closes the generator for us.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import Any

import torch
from torch import nn

from neuromf.config import TrainingConfig
from neuromf.train.checkpoint import TrainState, checkpoint_paths, load_checkpoint, save_checkpoint
from neuromf.train.ema import EMA, trainable_parameters
from neuromf.train.logging import EpochLog
from neuromf.utils import resolve_device

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainTask:
    """What to train: the model (only parameters with requires_grad train), its loss, and what to export."""

    model: nn.Module
    loss_fn: LossFn
    meta: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint sidecar
    export: Callable[[nn.Module, Path], Path] | None = None  # called with EMA weights applied
    preview: Callable[[nn.Module], Any] | None = None  # called with EMA weights applied
    # loss parts on a FIXED draw (cases, noise, times), logged each epoch as eval_*: the curve that P7-T4
    # compares, since per-batch losses of random draws swing more than training moves them
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class TrainEvent:
    kind: str  # "step" | "skipped" | "epoch" | "checkpoint" | "preview" | "done" | "stopped"
    step: int
    epoch: int
    total_steps: int
    loss: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    lr: float = 0.0
    eta_s: float | None = None
    path: Path | None = None
    message: str = ""
    preview: Any = None


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    stopped: bool
    checkpoint: Path
    export: Path | None
    skipped_steps: int


class NonFiniteLossError(RuntimeError):
    pass


def lr_at(step: int, total: int, cfg: TrainingConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * ratio
    return cfg.lr


def fixed_draw_evaluator(loss_fn: LossFn, data: torch.Tensor, n: int = 8,
                         seed: int = 20_251_126) -> Callable[[nn.Module], dict[str, float]]:
    """Unweighted loss parts of `n` evenly spaced samples of `data` under one fixed noise/time draw."""
    batch = data[torch.linspace(0, data.shape[0] - 1, min(n, data.shape[0])).round().long()]

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            _, parts = loss_fn(model, batch.to(device), generator)
        return parts

    return evaluate


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Shuffle order derived from (seed, epoch): a resumed run visits the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train(task: TrainTask, data: torch.Tensor, cfg: TrainingConfig, out_dir: Path, stop: Event | None = None,
          resume: bool = False) -> Generator[TrainEvent, None, TrainResult]:
    """Train `task.model` on the samples of `data` (N, C, ...); yields a TrainEvent per step and per epoch."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model = task.model.to(device)
    model.train()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    state = TrainState()
    if resume:
        state = load_checkpoint(out_dir, model, ema, optimizer, generator)

    n = data.shape[0]
    if n == 0:
        raise ValueError("no training samples")
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * steps_per_epoch
    started = time.perf_counter()
    log = EpochLog(out_dir)
    meta = {**task.meta, "training": cfg.__dict__, "steps_per_epoch": steps_per_epoch}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda"
                else contextlib.nullcontext())

    prior_wall_s = float(state.extra.get("wall_time_s", 0.0))

    def checkpoint() -> Path:
        # cumulative training wall time across resumes, for model cards
        state.extra["wall_time_s"] = round(prior_wall_s + time.perf_counter() - started, 1)
        return save_checkpoint(out_dir, model, ema, optimizer, generator, state, meta)

    def export() -> Path | None:
        if task.export is None:
            return None
        with ema.applied(model):
            return task.export(model, out_dir)

    bad_in_row = 0
    epoch_sums: dict[str, float] = {}
    epoch_count = 0
    start_step = state.step
    while state.step < total:
        epoch = state.step // steps_per_epoch
        order = epoch_order(n, cfg.seed, epoch)
        batch_index = state.step % steps_per_epoch
        idx = order[batch_index * batch_size:(batch_index + 1) * batch_size]
        if stop is not None and stop.is_set():
            path = checkpoint()
            exported = export()
            log.plot()
            log.close()
            yield TrainEvent("stopped", state.step, epoch, total, path=path, message=f"stopped at step {state.step}")
            return TrainResult(out_dir, state.step, True, path, exported, state.skipped_steps)

        lr = lr_at(state.step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[idx].to(device, non_blocking=True)
        with autocast:
            loss, parts = task.loss_fn(model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
            finite = bool(torch.isfinite(grad_norm))
        state.step += 1
        if not finite:  # known MeanFlow failure mode: skip the update, report it, give up after a streak
            state.skipped_steps += 1
            bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            yield TrainEvent("skipped", state.step, epoch, total, lr=lr,
                             message=f"non-finite loss or gradient at step {state.step}, update skipped")
            if bad_in_row >= cfg.max_bad_steps:
                log.close()
                raise NonFiniteLossError(
                    f"{bad_in_row} non-finite steps in a row (last at step {state.step}); lower training.lr or "
                    f"raise loss.adaptive_c. The last good checkpoint is in {out_dir}")
            continue
        bad_in_row = 0
        optimizer.step()
        ema.update(model)

        loss_value = float(loss.detach())
        row = {"loss": loss_value, **parts}
        for key, value in row.items():
            epoch_sums[key] = epoch_sums.get(key, 0.0) + value
        epoch_count += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / (state.step - start_step) * (total - state.step)
        yield TrainEvent("step", state.step, epoch, total, loss=loss_value, parts=parts, lr=lr, eta_s=eta)

        if state.step % steps_per_epoch == 0 or state.step == total:
            means = {k: v / epoch_count for k, v in epoch_sums.items()}
            if task.evaluate is not None:
                means.update({f"eval_{k}": v for k, v in task.evaluate(model).items()})
            log.append({"epoch": epoch + 1, "step": state.step, **means, "lr": lr}, keep_until_step=state.step)
            epoch_sums, epoch_count = {}, 0
            yield TrainEvent("epoch", state.step, epoch + 1, total, loss=means["loss"], parts=means, lr=lr, eta_s=eta)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < total:
            yield TrainEvent("checkpoint", state.step, epoch, total, path=checkpoint())
        if task.preview is not None and cfg.preview_every and state.step % cfg.preview_every == 0:
            with ema.applied(model), torch.no_grad():
                model.eval()
                sample = task.preview(model)
                model.train()
            yield TrainEvent("preview", state.step, epoch, total, preview=sample)

    path = checkpoint()
    exported = export()
    log.plot()
    log.close()
    yield TrainEvent("done", state.step, state.step // steps_per_epoch, total, path=exported or path,
                     message=f"finished {state.step} steps")
    return TrainResult(out_dir, state.step, False, path, exported, state.skipped_steps)


def run_to_end(events: Generator[TrainEvent, None, TrainResult],
               on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Drive a training generator to completion (used by the CLI and tests); returns its TrainResult."""
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            return finished.value
        if on_event is not None:
            on_event(event)


__all__ = ["TrainEvent", "TrainResult", "TrainTask", "checkpoint_paths", "fixed_draw_evaluator", "lr_at", "run_to_end",
           "train"]
