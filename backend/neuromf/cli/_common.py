"""Helpers every subcommand shares: config loading with --set overrides, the progress bar, Ctrl-C handling."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Generator
from pathlib import Path
from threading import Event
from typing import Any

import yaml

STAGE_DIR = Path("runs/stage2")
REPORT = Path("runs/report/verification_report.md")
AddCommand = Callable[[str, Callable, str], argparse.ArgumentParser]


def number(low: float | None = None, high: float | None = None, *, integer: bool = False,
           low_open: bool = False) -> Callable[[str], float | int]:
    """An argparse `type` for a finite number within [low, high] (`low_open`: low itself excluded).

    Refuses NaN, infinities and values out of range at the command line, before anything is loaded, so a
    `--scales nan` or `--n -3` is a usage error naming the flag instead of a traceback or a silent NaN result.
    """
    def parse(text: str) -> float | int:
        try:
            value: float | int = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text!r}")
        return value

    parse.__name__ = "integer" if integer else "number"  # argparse names the type in its message
    return parse


COUNT = number(1, 100_000, integer=True)  # --n: samples, cases, seeds (0 or negative: nothing to do)
STEPS = number(1, 10_000, integer=True)  # sampler / segmenter steps
SEED = number(0, 2**63 - 1, integer=True)
GRID_SHAPE = number(8, 1024, integer=True)  # voxels per axis of a model grid
VOXEL_MM = number(0.1, 20.0)  # mm per voxel of a model grid: MRI voxels, with room for the tests' coarse grids
SCALE = number(0.0, 100.0)  # guidance scales (1 = none)


def parse_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` pairs -> {dotted key: YAML-parsed value} for `load_config`."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. training.lr=1e-4), got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def unweighted(event) -> dict[str, str]:
    """The unweighted Lp for the bar, where the loss has one: MeanFlow's adaptive-weighted loss is ~1 by
    construction, the Lp is the figure that falls (a VAE's loss has no such part, so nothing is shown)."""
    raw = event.parts.get("raw")
    return {} if raw is None else {"lp": f"{raw:.4g}"}


def drive(events: Generator, desc: str, pace: Any = None, expected: str | None = None):
    """Run a training generator with a tqdm bar; returns its TrainResult.

    The bar starts with the first training event: the "encoding" events before it are already shown by the
    pipeline's own encoding bar (`progress=True`), so the terminal never shows two bars at once. `pace`: a
    `neuromf.estimates.PaceClock` marked at every step, for this machine's recorded pace; `expected`: the run's
    expected time, said at its first event (after the pipeline accepted its config and data: a refused run prints
    its error alone).
    """
    import time

    from tqdm.auto import tqdm

    from neuromf.train import run_to_end

    bar = None
    say = say_once(expected)

    def on_event(event) -> None:
        nonlocal bar
        say()
        if event.kind == "encoding":
            return
        if bar is None:
            bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)
        if bar.total != event.total_steps:
            bar.total = event.total_steps
        bar.n = event.step
        if event.kind == "step":
            if pace is not None:
                pace.mark(time.perf_counter(), int(event.step))
            bar.set_postfix(**unweighted(event), loss=f"{event.loss:.4g}", lr=f"{event.lr:.2g}", refresh=False)
        elif event.kind in ("skipped", "stopped"):
            tqdm.write(event.message)
        elif event.kind == "epoch":
            bar.set_postfix(epoch=event.epoch, **unweighted(event), loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()

    try:
        return run_to_end(events, on_event)
    finally:
        if bar is not None:
            bar.close()


def stop_on_sigint() -> Event:
    """First Ctrl-C asks the loop to stop after the current step (it saves a checkpoint); a second one aborts."""
    stop = Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again to abort without saving)...", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    return stop


def load_cfg(args):
    """The RunConfig of a training subcommand: `--config`, then `--set`, `--output-dir` and `--device` overrides.

    Also applies `training.num_threads` to torch before any work starts.
    """
    from neuromf.config import load_config

    overrides = parse_overrides(args.set)
    if getattr(args, "output_dir", None):
        overrides["training.output_dir"] = str(args.output_dir)
    if getattr(args, "device", None):
        overrides["training.device"] = args.device
    cfg = load_config(args.config, overrides)
    if cfg.training.num_threads:
        import torch

        torch.set_num_threads(cfg.training.num_threads)
    return cfg


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags every `train-*` subcommand shares (config, resume/overwrite, output folder, device, --set)."""
    p.add_argument("--config", required=True, help="YAML config file, or a packaged config name")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="overrides training.output_dir")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides training.device)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.lr=1e-4")


def add_base_checkpoint_flag(p: argparse.ArgumentParser) -> None:
    """`--base-checkpoint`: the frozen stage-1 model stage 2 starts from (default: the embedded one)."""
    p.add_argument("--base_checkpoint", "--base-checkpoint", dest="base_checkpoint", default="embedded",
                   help="stage-1 model folder / model.safetensors, 'embedded' (2 mm) or 'embedded-3mm' (for the "
                        "*_3mm configs)")


def expected_time(estimate: Callable[[], Any], device: str | None) -> str | None:
    """`Expected time: about ...` of a long job on the CPU (`neuromf.estimates`: the measured rates scaled by the
    load now and this machine's recorded pace), for a user to decide before waiting; None on a GPU (the rates are
    CPU ones), where no rate covers the job, or where the estimate fails (the job itself says what is wrong)."""
    from neuromf.estimates import runs_on_cpu

    if not runs_on_cpu(device or "auto"):
        return None
    try:
        found = estimate()
    except Exception:  # e.g. a data folder that is not there: the job reports it, not the estimate
        return None
    return f"Expected time: {found.describe()}" if found else None


def say_expected_time(estimate: Callable[[], Any], device: str | None) -> None:
    """Print `expected_time` on stderr now (before a job's own progress bar)."""
    line = expected_time(estimate, device)
    if line:
        print(line, file=sys.stderr, flush=True)


def say_once(line: str | None) -> Callable[[], None]:
    """A callable that writes `line` (e.g. `expected_time`) on stderr the first time it is called, above any tqdm
    bar, and does nothing after (or ever, for None): a job calls it at its first progress, once its inputs are
    accepted, so that a refused input prints its error alone."""
    said = [line is None]

    def say() -> None:
        if not said[0]:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
            said[0] = True

    return say
