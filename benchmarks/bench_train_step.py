"""MeanFlow training step vs flow-matching step: time and peak memory, same UNet and batch.

One step = loss (forward, plus the JVP for MeanFlow) + backward + gradient clipping + AdamW update, as in
`neuromf.train.loop`. MeanFlow is measured with the cheap JVP pattern (u forward with grad, JVP under no_grad),
with the full `torch.func.jvp` (primal output carries the gradient) and with du/dt by a central difference (two
no-grad forwards, `loss.jvp: finite_difference`). Targets: at most 2.5x the time and 2x the peak memory of the
flow-matching step (issue 2); the finite-difference step at most 1.6x (issue 27).

    python benchmarks/bench_train_step.py                 # CPU default: small UNet, 16^3 latents, batch 4
    python benchmarks/bench_train_step.py --preset base --latent 32 --batch 8 --device cuda
    python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import (  # noqa: E402
    base_parser,
    environment,
    finish,
    memory_method,
    peak_memory,
    pick,
    ratio,
    setup_torch,
    target,
    time_interleaved,
)

from neuromf.meanflow import MeanFlowLoss  # noqa: E402
from neuromf.models.unet import MeanFlowUNet  # noqa: E402

TARGET_TIME = 2.5
TARGET_MEMORY = 2.0
TARGET_TIME_FD = 1.6
VARIANTS = {
    "flow_matching": {"flow_matching": True, "cheap_jvp": True},
    "meanflow_cheap_jvp": {"flow_matching": False, "cheap_jvp": True},
    "meanflow_full_jvp": {"flow_matching": False, "cheap_jvp": False},
    "meanflow_finite_difference": {"flow_matching": False, "cheap_jvp": True, "jvp": "finite_difference"},
}


def build_step(variant: str, preset: str, channels: int, latent: int, batch: int, seed: int, device: str,
               base: MeanFlowUNet | None = None):
    """A closure doing one training step of `variant`; the same initial weights, batch and RNG for every variant."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = copy.deepcopy(base) if base is not None else MeanFlowUNet(channels, preset=preset)
    model = model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = MeanFlowLoss(**VARIANTS[variant])
    data = torch.randn((batch, channels, latent, latent, latent), generator=torch.Generator().manual_seed(seed))
    data = data.to(dev)
    generator = torch.Generator(device=dev).manual_seed(seed)

    def step() -> float:
        loss, _ = loss_fn(model, data, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def memory_run(variant: str, preset: str, channels: int, latent: int, batch: int, seed: int, steps: int,
               device: str) -> dict:
    """Child-process body for the peak-memory measurement: build, then `steps` steps (the first is warm-up)."""
    step = build_step(variant, preset, channels, latent, batch, seed, device)
    losses = [step() for _ in range(steps)]
    return {"steps": steps, "last_loss": losses[-1]}


def main() -> dict:
    parser = base_parser("bench_train_step", __doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="UNet preset (default small; quick: tiny)")
    parser.add_argument("--latent", type=int, default=None, help="latent edge length (default 16; quick: 8)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 4; quick: 2)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (4 image; 8 image + mask)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 7; quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2; quick 1)")
    parser.add_argument("--memory-steps", type=int, default=None,
                        help="steps in each peak-memory process (default 3; quick: 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--cpu-time", action="store_true",
                        help="ratios and targets on the process's CPU time instead of the wall time: for a shared, "
                             "loaded machine, with --threads 1 (both are in the JSON either way)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup_torch(args.threads, args.device)
    env = environment(device)
    preset, latent = pick(args, "preset", "small", "tiny"), pick(args, "latent", 16, 8)
    batch = pick(args, "batch", 4, 2)
    repeats, warmup = pick(args, "repeats", 7, 3), pick(args, "warmup", 2, 1)
    memory_steps = pick(args, "memory_steps", 3, 2)

    torch.manual_seed(args.seed)
    base = MeanFlowUNet(args.channels, preset=preset)
    steps = {v: build_step(v, preset, args.channels, latent, batch, args.seed, str(device), base) for v in VARIANTS}
    timing = time_interleaved(steps, repeats=repeats, warmup=warmup, device=device)
    del steps
    clock = "cpu_median_s" if args.cpu_time else "median_s"
    median = {v: t[clock] for v, t in timing.items()}

    memory = {}
    if not args.no_memory:
        for v in VARIANTS:
            memory[v] = peak_memory(memory_run, {"variant": v, "preset": preset, "channels": args.channels,
                                                 "latent": latent, "batch": batch, "seed": args.seed,
                                                 "steps": memory_steps}, args.threads, device)

    ratios, targets = {}, {}
    for v in ("meanflow_cheap_jvp", "meanflow_full_jvp", "meanflow_finite_difference"):
        ratios[f"time_{v}_over_flow_matching"] = ratio(median[v], median["flow_matching"])
        limit = TARGET_TIME_FD if v == "meanflow_finite_difference" else TARGET_TIME
        targets[f"time_{v}"] = target(ratios[f"time_{v}_over_flow_matching"], limit, "max")
        if memory:
            key = f"memory_{v}_over_flow_matching"
            ratios[key] = ratio(memory[v]["peak_above_baseline_mb"], memory["flow_matching"]["peak_above_baseline_mb"])
            ratios[f"{key}_total_rss"] = ratio(memory[v]["peak_mb"], memory["flow_matching"]["peak_mb"])
            targets[f"memory_{v}"] = target(ratios[key], TARGET_MEMORY, "max")

    result = {
        "benchmark": "train_step",
        "quick": args.quick,
        "config": {"unet_preset": preset, "latent_shape": [args.channels, latent, latent, latent], "batch": batch,
                   "repeats": repeats, "warmup_steps": warmup, "memory_steps": memory_steps, "optimizer": "AdamW",
                   "grad_clip": 1.0, "unet_params": sum(p.numel() for p in base.parameters()),
                   "variants": VARIANTS},
        "weights": "random-init UNet (same initial weights for every variant)",
        "method": {"time": "one step = MeanFlowLoss (forward [+ JVP]) + backward + clip + AdamW.step, same batch and "
                           "RNG seed per variant; steps interleaved across variants (order alternating), median",
                   "memory": memory_method(device)},
        "clock": "process CPU time" if args.cpu_time else "wall time",
        "step_s": {v: round(m, 6) for v, m in median.items()},
        "timing": timing,
        "memory": memory,
        "ratios": ratios,
        "targets": targets,
        "env": env,
    }
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
