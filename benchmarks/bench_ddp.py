"""Data-parallel scaling on this machine: training throughput of 2 gloo processes vs 1 process (1 thread each).

Each configuration runs the real loop (`neuromf.train.loop.train`: MeanFlow loss with the cheap JVP, DDP, the
per-step all-reduces) on random latents; the per-rank batch is the same, so 2 processes do twice the work per
step. Throughput = samples per second over the timed steps (after warm-up). The two configurations alternate
repeat by repeat. `scaling_efficiency` = throughput(2) / (2 x throughput(1)); 1.0 is perfect.

    .venv/bin/python benchmarks/bench_ddp.py            # small UNet on 16^3 latents, batch 4 per process
    .venv/bin/python benchmarks/bench_ddp.py --quick    # tiny UNet on 8^3

On a GPU machine the same loop runs one process per GPU under torchrun (NCCL); that scaling is untested here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import REPO_ROOT, base_parser, environment, finish, pick, ratio, summarize  # noqa: E402


def worker(spec: dict) -> None:
    """One rank: train `warmup + steps` steps, rank 0 writes the throughput of the timed ones."""
    import torch

    from neuromf.config import TrainingConfig
    from neuromf.meanflow import MeanFlowLoss
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.train import TrainTask, train
    from neuromf.train import distributed as dist

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = MeanFlowUNet(4, preset=spec["preset"])
    n = spec["batch"] * world * 4
    data = torch.randn((n, 4, *[spec["latent"]] * 3), generator=torch.Generator().manual_seed(1))
    out = Path(spec["out_dir"])
    cfg = TrainingConfig(max_steps=spec["warmup"] + spec["steps"], batch_size=spec["batch"] * world, warmup_steps=0,
                         device="cpu", checkpoint_every=0, output_dir=str(out))
    stamps = []
    for event in train(TrainTask(model, MeanFlowLoss()), data, cfg, out):
        if event.kind == "step":
            stamps.append(time.perf_counter())
    if dist.is_main():
        timed = stamps[spec["warmup"] - 1:] if spec["warmup"] else stamps
        seconds = timed[-1] - timed[0]
        samples = (len(timed) - 1) * spec["batch"] * world
        Path(spec["result"]).write_text(json.dumps({"seconds": seconds, "samples": samples}))
    dist.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, spec: dict) -> dict:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT / "backend"))
        if world == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env))
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise SystemExit(f"a rank of the {world}-process run failed (exit {p.returncode})")
    return json.loads(Path(spec["result"]).read_text())


def main() -> dict:
    parser = base_parser("bench_ddp", __doc__.splitlines()[0])
    parser.add_argument("--preset")
    parser.add_argument("--latent", type=int)
    parser.add_argument("--batch", type=int, help="samples per process per step")
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--worker", help=argparse_hidden())
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    started = time.perf_counter()
    spec = {"preset": pick(args, "preset", "small", "tiny"), "latent": pick(args, "latent", 16, 8),
            "batch": pick(args, "batch", 4, 2), "steps": pick(args, "steps", 12, 4), "warmup": 2}
    repeats = pick(args, "repeats", 3, 1)
    import torch

    env = environment(torch.device("cpu"))  # load average at the start
    throughput: dict[str, list[float]] = {"1_process": [], "2_processes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for world in ((1, 2) if r % 2 == 0 else (2, 1)):
                run = {**spec, "out_dir": f"{tmp}/run_{r}_{world}", "result": f"{tmp}/result_{r}_{world}.json"}
                res = launch(world, run)
                key = "1_process" if world == 1 else "2_processes"
                throughput[key].append(res["samples"] / res["seconds"])
    one = summarize(throughput["1_process"])["median_s"]  # (samples/s; summarize names its fields *_s)
    two = summarize(throughput["2_processes"])["median_s"]
    result = {
        "config": {**spec, "repeats": repeats, "threads_per_process": 1, "backend": "gloo", "device": "cpu"},
        "method": {"throughput": "samples/s over the timed steps of the real training loop, median of repeats; "
                                 "1- and 2-process runs alternate", "weights": "random"},
        "timing": {"samples_per_s_1_process": throughput["1_process"],
                   "samples_per_s_2_processes": throughput["2_processes"]},
        "ratios": {"throughput_2_over_1": ratio(two, one), "scaling_efficiency": ratio(two, 2 * one)},
        "env": env,
    }
    return finish(result, args.out, started)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
