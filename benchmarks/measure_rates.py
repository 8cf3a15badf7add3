"""Measure the per-case / per-step rates the napari widgets' time estimates use (`neuromf.estimates`).

What is timed, each with the shipped models and the shipped phantoms, on the CPU:

- the mask-VAE test: seconds per case with each shipped VAE (`--cases` cases each; the VAE load apart);
- joint (LoRA) training with each packaged CPU config: seconds to load the models, seconds per training case
  encoded into latents (a fresh latent cache), seconds per training step at the config's batch size;
- generation with the widget's defaults (the 2 mm joint adapter, rendered by the 2 mm conditional adapter,
  Euler): seconds to load the models and seconds per network step of each pass (the joint pass at its own
  guidance, the FLAIR pass at mask guidance 1: one network call per step, which the estimates multiply by the calls
  of a guided step); and one joint pass of `SAMPLE_BATCH` pairs drawn at once against one of a single pair
  (`joint_batch_ratio`: a batch in single-pair passes).

Every rate is timed in CPU seconds of this process (`time.process_time`), not wall seconds: with one torch thread
that is the time the work takes a core of its own, whatever else runs beside it (a wall clock measures the other
jobs too: rates timed by the wall clock at load 3-4 next to niced jobs were about as fast as at load 1, so bringing
them back to an idle machine by the load divided them by 2-2.5 and the estimates came out 2-3x too short).
With several torch threads (`--threads 2`, what the napari widgets use on a 2-core machine) CPU seconds add up
over the threads, so `--clock wall` times them by the wall clock instead: on an idle machine only (nothing else
runnable), where the wall clock is the job's own time; the estimates then take the rates as that machine's idle
time with that many threads (`neuromf.estimates`, a rate timed by the wall clock at load ~0).
Writes JSON (default `backend/neuromf/measured_rates.json`, the file the backend reads) with the machine, torch
threads, load averages at start and end and the clock (`"process_cpu"` or `"wall"`).
Run it through the CPU lock on a shared machine (`flock /work/logs/cpu.lock python benchmarks/measure_rates.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO_ROOT, environment  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "backend" / "neuromf" / "measured_rates.json"
clock = time.process_time  # CPU seconds of this process: see the module doc


def _median_gap(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return float(statistics.median(gaps)) if gaps else float("nan")


def measure_mask_test(cases: int) -> dict:
    from neuromf.eval.mask_test import mask_vae_test
    from neuromf.io.bids import discover_cases
    from neuromf.io.nifti import Preprocessing
    from neuromf.vae import MAISIVAEWrapper
    from neuromf.weights import EMBEDDED_MODELS

    out = {}
    root = REPO_ROOT / "sample_data" / "fcd_phantoms"
    chosen = [c for c in discover_cases(root, group="fcd") if c.mask is not None][:cases]
    for name in ("embedded-3mm", "embedded"):
        start = clock()
        vae = MAISIVAEWrapper.resolve(name, preset="small")
        loaded = clock() - start
        prep = Preprocessing.from_dict(vae.metadata["preprocessing"]) if "preprocessing" in (vae.metadata or {}) \
            else Preprocessing()
        stamps = [clock()]

        def on_case(_row: dict, stamps: list[float] = stamps) -> None:
            stamps.append(clock())

        mask_vae_test(root, vae, prep, cases=chosen, on_case=on_case)
        per_case = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        folder = EMBEDDED_MODELS["vae"][name]  # keyed by the shipped folder: names may move between sets
        out[folder] = {"load_s": round(loaded, 2), "per_case_s": round(statistics.median(per_case), 2),
                       "samples_s": [round(s, 2) for s in per_case], "grid": list(prep.shape)}
        print(f"mask test {folder}: {out[folder]}", flush=True)
    return out


def _fcd_subset(source: Path, n: int, dst: Path) -> Path:
    """The first `n` FCD training subjects of a BIDS phantom tree, copied (so the cache and runs stay apart)."""
    lines = (source / "participants.tsv").read_text().splitlines()
    chosen = [line for line in lines[1:] if line.split("\t")[1:3] == ["fcd", "train"]][:n]
    dst.mkdir(parents=True)
    for line in chosen:
        shutil.copytree(source / line.split("\t")[0], dst / line.split("\t")[0])
    (dst / "participants.tsv").write_text("\n".join([lines[0], *chosen]) + "\n")
    for extra in ("dataset_description.json", "participants.json"):
        if (source / extra).is_file():
            shutil.copy(source / extra, dst / extra)
    return dst


def measure_training(config: str, base: str, cases: int, steps: int, tmp: Path) -> dict:
    from neuromf.config import load_config
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.pipelines.joint import train_joint
    from neuromf.train import run_to_end

    data = _fcd_subset(resolve_data_dir(load_config(config).data.data_dir), cases, tmp / f"data_{config}")
    overrides = {"data.data_dir": str(data), "data.cache_dir": str(tmp / f"cache_{config}"),
                 "training.max_steps": steps, "training.device": "cpu", "training.checkpoint_every": 0,
                 "training.preview_every": 0, "training.output_dir": str(tmp / f"run_{config}")}
    if load_config(config).data.mask_strategy == "auto":
        overrides["data.mask_strategy"] = "downsample"  # no saved mask test here; the rate does not depend on it
    cfg = load_config(config, overrides)
    start = clock()
    encoded, stepped = [], []

    def on_event(event) -> None:
        now = clock()
        if event.kind == "encoding":
            encoded.append(now)
        elif event.kind == "step":
            stepped.append(now)

    run_to_end(train_joint(cfg, base, progress=False), on_event)
    result = {"cases": cases, "batch_size": cfg.training.batch_size,
              "load_s": round(encoded[0] - start, 2) if encoded else None,
              "per_case_encoding_s": round(_median_gap(encoded), 2),
              "per_step_s": round(_median_gap(stepped), 2), "steps_timed": len(stepped)}
    print(f"training {config}: {result}", flush=True)
    return result


def measure_generation(steps: int) -> dict:
    from neuromf.generation.joint import generate_pairs

    stamps: list[tuple[float, int, int]] = []
    start = clock()
    pairs = list(generate_pairs("embedded", n=1, steps=steps, seed=0, device="cpu", method="euler",
                                render="embedded", mask_draws=1,  # one joint pass and one FLAIR pass, as timed
                                guidance=1.0,  # one network call per FLAIR step: the estimates count guided calls
                                on_step=lambda i, n: stamps.append((clock(), i, n))))
    end = clock()
    passes: list[list[float]] = []
    for stamp, i, _ in stamps:
        if i == 1:
            passes.append([])
        passes[-1].append(stamp)
    joint, render = passes[0], passes[-1]
    per_step = _median_gap(joint), _median_gap(render)
    result = {"joint": "joint_fine", "render": "cond_fine", "sampler": "euler", "steps": steps, "grid": [96, 96, 96],
              # everything of a one-pair run that is not a network step: loading both models, decoding, rendering
              "load_s": round(end - start - steps * sum(per_step), 2),
              "joint_per_step_s": round(per_step[0], 2), "render_per_step_s": round(per_step[1], 2),
              "total_s": round(end - start, 2), "passes": len(passes),
              "lesion_voxels": int(pairs[0].mask.sum()) if pairs else None}
    print(f"generation: {result}", flush=True)
    return result


def measure_joint_batch(steps: int) -> dict:
    """One joint pass of a single pair against one of `SAMPLE_BATCH` pairs drawn at once (the batch generation
    uses): seconds per network step of each, and their ratio, which the estimates use for a batch."""
    from neuromf.generation.joint import generate_pairs
    from neuromf.meanflow.samplers import SAMPLE_BATCH

    def first_pass(n: int) -> float:
        stamps: list[float] = []
        for _ in generate_pairs("embedded", n=n, steps=steps, seed=0, device="cpu", method="euler", render=None,
                                mask_draws=1, on_step=lambda i, k: stamps.append(clock()) if len(stamps) < k else None):
            pass
        return _median_gap(stamps)

    one, many = first_pass(1), first_pass(SAMPLE_BATCH)
    result = {"joint_batch": SAMPLE_BATCH, "joint_batch_per_step_s": round(many, 3),
              "joint_single_per_step_s": round(one, 3), "joint_batch_ratio": round(many / one, 2)}
    print(f"joint batch: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cases", type=int, default=2, help="mask-test cases per VAE")
    parser.add_argument("--train-cases", type=int, default=8, help="training cases encoded per config")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--generate-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="CPU seconds of this process (one thread), or the wall clock (several threads, idle "
                             "machine only)")
    parser.add_argument("--parts", default="mask_test,training,generation,joint_batch",
                        help="comma-separated parts to measure; the others are kept from an existing --out file")
    args = parser.parse_args()

    import torch

    from neuromf.utils import atomic_write_json

    global clock
    if args.clock == "wall":
        clock = time.perf_counter
    elif args.threads > 1:
        parser.error("--threads > 1 needs --clock wall: CPU seconds add up over the threads")
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    rates = json.loads(args.out.read_text()) if args.out.is_file() else {}
    rates["what"] = ("seconds per unit of work measured by benchmarks/measure_rates.py on the machine in `env` "
                     "(per part); the napari widgets' time estimates multiply them out (neuromf.estimates)")
    env = rates.setdefault("env", {})
    for part in parts:
        env[part] = {**environment("cpu"), "clock": "process_cpu" if args.clock == "cpu" else "wall"}
    if "mask_test" in parts:
        rates["mask_test"] = measure_mask_test(args.cases)
    if "training" in parts:
        with tempfile.TemporaryDirectory(prefix="neuromf_rates_") as tmp:
            rates["training"] = {config: measure_training(config, base, args.train_cases, args.train_steps,
                                                          Path(tmp))
                                 for config, base in (("joint_3mm", "embedded-3mm"), ("joint_2mm", "embedded"))}
    if "generation" in parts:
        rates["generation"] = measure_generation(args.generate_steps)
    if "joint_batch" in parts:  # kept beside the generation rates (a ratio: a batch in single-pair passes)
        rates.setdefault("generation", {}).update(measure_joint_batch(args.generate_steps))
    for part in parts:
        env[part]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    atomic_write_json(args.out, rates)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
