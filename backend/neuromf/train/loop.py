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
from neuromf.events import TrainEvent, TrainResult, run_to_end  # re-exported: their home before
from neuromf.train import distributed as dist
from neuromf.train.checkpoint import TrainState, checkpoint_paths, load_checkpoint, save_checkpoint
from neuromf.train.ema import EMA, trainable_parameters
from neuromf.train.logging import EpochLog

LossFn = Callable[[nn.Module, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class TrainTask:
    """What to train: the model (only parameters with requires_grad train), its loss, and what to export."""

    model: nn.Module
    loss_fn: LossFn
    meta: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint sidecar
    export: Callable[[nn.Module, Path], Path] | None = None  # called with EMA weights applied
    preview: Callable[[nn.Module], Any] | None = None  # called with EMA weights applied
    # loss parts on a FIXED draw (cases, noise, times), logged each epoch as eval_*: the curve the report's
    # loss check compares, since per-batch losses of random draws swing more than training moves them
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None


class NonFiniteLossError(ValueError):
    """Training stopped: the loss stayed NaN/Inf for `max_bad_steps` steps (a ValueError: bad settings)."""

    pass


def lr_at(step: int, total: int, cfg: TrainingConfig) -> float:
    """Learning rate at `step` of `total`: linear warm-up, then constant or cosine down to min_lr_ratio * lr."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.lr * ratio
    return cfg.lr


def fixed_draw_evaluator(loss_fn: LossFn, data: torch.Tensor, n: int | None = None, seed: int = 20_251_126,
                         chunk: int = 8) -> Callable[[nn.Module], dict[str, float]]:
    """Unweighted loss parts of a fixed draw of `n` samples of `data` (the same noise and times every call).

    None: 8 evenly spaced samples, or every sample when there are fewer. Up to the sample count the draw takes `n`
    evenly spaced samples; beyond it every sample in turn, each again with new noise and times. A small draw can
    miss what the loss is made of: MeanFlow's loss is heavy-tailed over its (r, t) pairs, and 8 samples may hold no
    pair with r != t at all. The parts are means over the draw, computed `chunk` samples at a time (the same numbers
    as one batch when the draw is `chunk` or fewer; memory stays flat).
    """
    count = data.shape[0]
    n = min(8, count) if n is None else n
    index = torch.linspace(0, count - 1, n).round().long() if n <= count else torch.arange(n) % count

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        sums: dict[str, float] = {}
        with torch.no_grad():
            for part in index.split(chunk):
                _, parts = loss_fn(model, data[part].to(device), generator)
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value * len(part)
        return {key: value / len(index) for key, value in sums.items()}

    return evaluate


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Shuffle order derived from (seed, epoch): a resumed run visits the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def precision_of(cfg: TrainingConfig) -> str:
    """"bf16" or "fp32" (`training.bf16: true` is the old spelling of `precision: bf16`)."""
    return "bf16" if cfg.bf16 else cfg.precision


def autocast_for(cfg: TrainingConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast around the loss (the UNet forward); the MeanFlow JVP turns it off for itself."""
    if precision_of(cfg) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class BatchFetcher:
    """Batches of the in-memory samples on `device`; on CUDA through a pinned staging buffer (asynchronous copy).

    Reusing the buffer is safe: each step reads the loss back on the host before the next batch is gathered.
    """

    def __init__(self, data: torch.Tensor, device: torch.device) -> None:
        self.data, self.device = data, device
        self.pinned = device.type == "cuda" and data.device.type == "cpu"
        self._buffers: dict[int, torch.Tensor] = {}

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return self.data[idx].to(self.device)
        if len(idx) not in self._buffers:
            self._buffers[len(idx)] = torch.empty((len(idx), *self.data.shape[1:]), dtype=self.data.dtype,
                                                  pin_memory=True)
        buffer = torch.index_select(self.data, 0, idx, out=self._buffers[len(idx)])
        return buffer.to(self.device, non_blocking=True)


def train(task: TrainTask, data: torch.Tensor, cfg: TrainingConfig, out_dir: Path, stop: Event | None = None,
          resume: bool = False) -> Generator[TrainEvent, None, TrainResult]:
    """Train `task.model` on the samples of `data`; the one training loop of every task (stage 1, VAE, stage 2).

    Under torchrun (WORLD_SIZE > 1) every rank runs this with the same arguments: see `neuromf.train.distributed`.
    A failure names its rank (stderr and the exception's notes).

    Args:
        task: model, loss function, and optional export / preview / evaluation hooks.
        data: (N, C, ...) training samples (latents, or packed latents + mask channels), drawn in shuffled batches.
        cfg: the `training:` config section (steps, lr schedule, EMA, checkpoints, device, precision).
        out_dir: the run folder: checkpoint, losses.csv, loss curve, exported model.
        stop: set it to stop after the current step (a checkpoint and an export are saved).
        resume: continue from the checkpoint in `out_dir`.
    Yields:
        TrainEvent per step, epoch, checkpoint, preview, and at the end.
    Returns:
        TrainResult (the generator's return value; `run_to_end` hands it back).
    """
    try:
        return (yield from _train(task, data, cfg, Path(out_dir), stop, resume))
    except Exception as err:
        dist.report_failure(err)
        raise


def _train(task: TrainTask, data: torch.Tensor, cfg: TrainingConfig, out_dir: Path, stop: Event | None,
           resume: bool) -> Generator[TrainEvent, None, TrainResult]:
    dist.init(cfg.device, cfg.dist_timeout_s)
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = dist.device_for(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    model = task.model.to(device)  # the plain module: EMA, checkpoints, exports, previews and the JVP use it
    model.train()
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    forward_model = dist.wrap_ddp(model, device)  # the one forward with grad per step goes through DDP
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    ema = EMA(model, cfg.ema_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(dist.rank_seed(cfg.seed, rank))
    torch.manual_seed(dist.rank_seed(cfg.seed, rank))
    state = TrainState()
    if resume:
        state = load_checkpoint(out_dir, model, ema, optimizer, generator)
        if rank > 0:  # the checkpoint holds rank 0's random streams: the others derive their own again
            generator.manual_seed(dist.rank_seed(cfg.seed, rank, state.step))
            torch.manual_seed(dist.rank_seed(cfg.seed, rank, state.step))

    n = data.shape[0]
    if n == 0:
        raise ValueError("no training samples")
    batch_size = min(cfg.batch_size, n)  # the global batch: each rank takes its slice of it
    steps_per_epoch = math.ceil(n / batch_size)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.max_epochs * steps_per_epoch
    started = time.perf_counter()
    log = EpochLog(out_dir, enabled=main)
    meta = {**task.meta, "training": cfg.__dict__, "steps_per_epoch": steps_per_epoch}
    autocast = autocast_for(cfg, device)
    fetch = BatchFetcher(data, device)

    prior_wall_s = float(state.extra.get("wall_time_s", 0.0))

    def checkpoint() -> Path:  # written by rank 0; the others get the path it writes to
        if not main:
            return checkpoint_paths(out_dir)[0]
        # cumulative training wall time across resumes, for model cards
        state.extra["wall_time_s"] = round(prior_wall_s + time.perf_counter() - started, 1)
        state.extra["world_size"] = world
        return save_checkpoint(out_dir, model, ema, optimizer, generator, state, meta)

    def export() -> Path | None:
        if task.export is None or not main:
            return None
        with ema.applied(model):
            return task.export(model, out_dir)

    def finish() -> tuple[Path, Path | None]:
        path, exported = checkpoint(), export()
        log.plot()
        log.close()
        dist.barrier(long=True)  # the other ranks wait until rank 0 has written everything
        return path, exported

    if task.evaluate is not None and main and state.step == 0:
        # the fixed draw's loss before the first step (epoch 0): what a decrease is judged against, since the first
        # epoch's warm-up already moves a fresh adapter's untrained parts
        # (a start over a run killed before its first checkpoint replaces that run's rows: nothing of it was kept)
        log.append({"epoch": 0, "step": 0, **{f"eval_{k}": v for k, v in task.evaluate(model).items()}},
                   keep_until_step=-1)
    bad_in_row = 0
    epoch_sums: dict[str, float] = {}
    epoch_count = 0
    start_step = state.step
    while state.step < total:
        epoch = state.step // steps_per_epoch
        order = epoch_order(n, cfg.seed, epoch)  # the same on every rank
        batch_index = state.step % steps_per_epoch
        idx = order[batch_index * batch_size:(batch_index + 1) * batch_size]
        if dist.any_rank(stop is not None and stop.is_set(), device):  # all ranks stop at the same step
            path, exported = finish()
            yield TrainEvent("stopped", state.step, epoch, total, path=path, message=f"stopped at step {state.step}")
            return TrainResult(out_dir, state.step, True, path, exported, state.skipped_steps)

        lr = lr_at(state.step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local = dist.local_batch(idx, rank, world)
        batch = fetch(local)
        with autocast:
            loss, parts = task.loss_fn(forward_model, batch, generator)
        optimizer.zero_grad(set_to_none=True)
        # the global (sample-weighted) loss and parts: logged, and the finite check every rank agrees on
        values = dist.all_mean([float(loss.detach()), *parts.values()], len(local), device)
        loss_value, parts = values[0], dict(zip(parts, values[1:]))
        finite = math.isfinite(loss_value)
        if finite:
            # DDP averages gradients over ranks; weighting by the slice size makes that the global batch's mean
            share = world * len(local) / max(len(idx), world)
            (loss * share if world > 1 else loss).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
            finite = bool(torch.isfinite(grad_norm))  # gradients are all-reduced: the same on every rank
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
        ema.update(model)  # identical parameters on every rank -> identical EMA

        row = {"loss": loss_value, **parts}
        for key, value in row.items():
            epoch_sums[key] = epoch_sums.get(key, 0.0) + value
        epoch_count += 1
        elapsed = time.perf_counter() - started
        eta = elapsed / (state.step - start_step) * (total - state.step)
        yield TrainEvent("step", state.step, epoch, total, loss=loss_value, parts=parts, lr=lr, eta_s=eta)

        if state.step % steps_per_epoch == 0 or state.step == total:
            means = {k: v / epoch_count for k, v in epoch_sums.items()}
            if task.evaluate is not None and main:
                means.update({f"eval_{k}": v for k, v in task.evaluate(model).items()})
            log.append({"epoch": epoch + 1, "step": state.step, **means, "lr": lr}, keep_until_step=state.step)
            epoch_sums, epoch_count = {}, 0
            yield TrainEvent("epoch", state.step, epoch + 1, total, loss=means["loss"], parts=means, lr=lr, eta_s=eta)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.step < total:
            yield TrainEvent("checkpoint", state.step, epoch, total, path=checkpoint())
        if task.preview is not None and cfg.preview_every and state.step % cfg.preview_every == 0 and main:
            with ema.applied(model), torch.no_grad():
                model.eval()
                sample = task.preview(model)
                model.train()
            yield TrainEvent("preview", state.step, epoch, total, preview=sample)

    path, exported = finish()
    yield TrainEvent("done", state.step, state.step // steps_per_epoch, total, path=exported or path,
                     message=f"finished {state.step} steps")
    return TrainResult(out_dir, state.step, False, path, exported, state.skipped_steps)


__all__ = ["BatchFetcher", "TrainEvent", "TrainResult", "TrainTask", "autocast_for", "checkpoint_paths",
           "fixed_draw_evaluator", "lr_at", "precision_of", "run_to_end", "train"]
