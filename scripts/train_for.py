"""Train a stage-2 config for a wall-clock budget (a lent GPU session, a night on a workstation).

A fixed `max_steps` sets the cosine schedule's length, so a budget in minutes needs the step rate first: a short
calibration run (same config, its own scratch folder, latent cache filled on the way) measures it on this machine,
under whatever else runs beside it, then the real run gets `max_steps = rate x time left x safety`. At the deadline
the run is stopped and saves its checkpoint and adapter as after Ctrl-C, so a slower-than-measured run still leaves
a usable adapter. Writes `<output_dir>/train_for.json` (rate, steps, wall times).

    python scripts/train_for.py --pipeline lora --config joint_2mm --base embedded \
        --deadline "$(( $(date +%s) + 420 ))" --set training.output_dir=runs/joint_gpu
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from neuromf.cli._common import parse_overrides
from neuromf.config import load_config
from neuromf.train import run_to_end
from neuromf.utils import atomic_write_json

PIPELINES = ("lora", "conditional")


def trainer(pipeline: str) -> Callable:
    """The stage-2 training generator of `pipeline` (imported on use: only the chosen pipeline loads)."""
    if pipeline == "lora":
        from neuromf.pipelines.joint import train_joint

        return train_joint
    from neuromf.pipelines.conditional import train_conditional

    return train_conditional


def measure_step_rate(train_fn: Callable, cfg_overrides: dict, config: str, base: str, steps: int,
                      out_dir: Path) -> float:
    """Steps per second of `config` on this machine, timed over the second half of a `steps`-step run in an
    `<out_dir>_calibration` folder (the first half takes the warm-up: allocator, cuDNN autotuning)."""
    scratch = out_dir.with_name(out_dir.name + "_calibration")
    cfg = load_config(config, {**cfg_overrides, "training.output_dir": str(scratch), "training.max_steps": steps,
                               "training.checkpoint_every": 0, "training.preview_every": 0})
    times: dict[int, float] = {}

    def on_event(event) -> None:
        if event.kind == "step":
            times[event.step] = time.perf_counter()

    run_to_end(train_fn(cfg, base, overwrite=True, progress=False), on_event)
    first = steps // 2
    return (steps - first) / (times[steps] - times[first])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", choices=PIPELINES, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--base", default="embedded", help="base model: embedded (2 mm), embedded-3mm or a folder")
    parser.add_argument("--deadline", type=float, required=True, help="Unix time by which the adapter is saved")
    parser.add_argument("--calibrate-steps", type=int, default=30)
    parser.add_argument("--safety", type=float, default=0.85, help="share of the measured rate planned for")
    parser.add_argument("--save-margin-s", type=float, default=20.0, help="time kept for the final save")
    parser.add_argument("--max-steps", type=int, help="at most this many steps (the schedule's length when they fit)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.set)
    out_dir = Path(load_config(args.config, overrides).training.output_dir)
    overrides.setdefault("training.output_dir", str(out_dir))
    stop_at = args.deadline - args.save_margin_s  # the run stops here, leaving the margin for its save
    train_fn = trainer(args.pipeline)
    started = time.time()
    rate = measure_step_rate(train_fn, overrides, args.config, args.base, args.calibrate_steps, out_dir)
    left = stop_at - time.time()
    max_steps = max(args.calibrate_steps, int(rate * left * args.safety))
    max_steps = min(max_steps, args.max_steps) if args.max_steps else max_steps
    cfg = load_config(args.config, {**overrides, "training.max_steps": max_steps})
    print(f"[train_for] {rate:.2f} steps/s measured; {left:.0f} s left: max_steps = {max_steps}", flush=True)

    stop = threading.Event()
    timer = threading.Timer(max(0.0, stop_at - time.time()), stop.set)
    timer.start()
    try:
        result = run_to_end(train_fn(cfg, args.base, overwrite=True, stop=stop, progress=False))
    finally:
        timer.cancel()
    record = {"pipeline": args.pipeline, "config": args.config, "overrides": overrides, "base": args.base,
              "steps_per_s": rate, "seconds_left": left, "safety": args.safety, "planned_steps": max_steps,
              "reached_step": result.step, "stopped_at_deadline": result.stopped, "wall_s": time.time() - started,
              "export": str(result.export) if result.export else None}
    atomic_write_json(out_dir / "train_for.json", record)
    print(f"[train_for] {json.dumps(record)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
