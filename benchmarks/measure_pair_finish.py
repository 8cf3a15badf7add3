"""Measure a generated pair's finishing against a FLAIR network step, the ratio the Generate dock's time left uses.

A pair's work does not end with its last network step: its FLAIR is decoded by the VAE, given the scanner
texture, and the dock works out its lesion figures. The time left at a run's own pace counts that finishing as
`napari_neuromf._generate_run.FINISH_CALLS` network calls of the FLAIR pass; this script measures it with the
shipped 2 mm models (joint_fine + cond_fine, Euler, the dock's defaults but `--steps` steps), on the CPU, one
PyTorch thread unless told: for each of `--pairs` pairs, the seconds from its last network step until the
generator yields it plus its lesion figures, over the median seconds between two network steps of its FLAIR pass.
Both scale alike with the load (one thread on a shared CPU), so the ratio holds on a busy machine too.

    flock /work/logs/cpu.lock python benchmarks/measure_pair_finish.py   # -> benchmarks/results/pair_finish.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO_ROOT, environment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "pair_finish.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from napari_neuromf._generate_run import FINISH_CALLS, lesion_figures
    from neuromf.generation.joint import generate_pairs

    env = environment("cpu")
    stamps: list[float] = []
    rows = []
    def on_step(i: int, n: int) -> None:
        stamps.append(time.perf_counter())

    for pair in generate_pairs("embedded", n=args.pairs, steps=args.steps, seed=0, device="cpu", method="euler",
                               render="embedded", mask_draws=1, on_step=on_step,
                               guidance=1.0):  # one network call per FLAIR step: the unit of FINISH_CALLS
        yielded = time.perf_counter()
        lesion_figures(pair.image, pair.mask, pair.affine)
        figures = time.perf_counter() - yielded
        flair = stamps[-args.steps:]  # this pair's FLAIR pass (the joint pass of all pairs ran first)
        step = statistics.median(b - a for a, b in zip(flair, flair[1:], strict=False))
        finish = yielded - stamps[-1] + figures
        rows.append({"finish_s": round(finish, 2), "of_which_figures_s": round(figures, 2),
                     "flair_step_s": round(step, 3), "finish_in_flair_calls": round(finish / step, 2)})
        print(rows[-1], flush=True)
    ratios = [row["finish_in_flair_calls"] for row in rows]
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {"what": __doc__.splitlines()[0], "models": "embedded (joint_fine, rendered by cond_fine), Euler",
              "steps": args.steps, "pairs": rows, "median_finish_in_flair_calls": statistics.median(ratios),
              "range": [min(ratios), max(ratios)], "used_by_the_dock": FINISH_CALLS, "env": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_finish_in_flair_calls", "range", "used_by_the_dock")}))


if __name__ == "__main__":
    main()
