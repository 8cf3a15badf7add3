"""Joint masks' sizes at several SDF decoding thresholds, per seed, against the real lesions (masks only, no FLAIR).

The shipped 2 mm joint adapter (`joint_fine`) draws lesion masks as signed-distance channels; `decode_sdf` turns
them into a binary mask at `sdf_threshold_mm` (its sidecar's; a negative threshold grows every mask by about that
many millimetres). This samples each seed's joint latents once, exactly as `neuromf generate --adapter embedded
--seed S --n N` does (same noise, sites, guidance, Euler steps, and the same re-draws of a mask that comes out
smaller than the smallest accepted lesion, made only where a threshold needs them), and decodes them at every
threshold given: per seed and threshold, the masks' median volume against the 85 real lesions' (the adapter
folder's `lesion_reference.json`), the KS test of the two volume distributions, and the masks still too small
after the re-draws; beside them, how far the median of as many lesions drawn from the real ones falls from the
real median (`median_spread`: the yardstick for one seed's median).

    python scripts/joint_mask_threshold.py --seeds 3111 3112 --thresholds -1.0 -0.75 -0.5 -0.25 0.0 \
        --out docs/joint_mask_threshold_calibration.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def median_spread(real: np.ndarray, n: int, draws: int = 20_000, seed: int = 0) -> dict:
    """How far the median of `n` lesions drawn from the real ones (with replacement) falls from the real median:
    the 2.5-97.5 % range of that ratio and the share of draws outside +-25 %. What a generator as good as the data
    itself shows on one seed of `n` pairs."""
    rng = np.random.default_rng(seed)
    ratios = np.median(rng.choice(real, (draws, n)), axis=1) / np.median(real)
    return {"n": n, "ratio_2.5_97.5": [round(float(v), 3) for v in np.percentile(ratios, [2.5, 97.5])],
            "share_outside_25pct": round(float(np.mean(np.abs(ratios - 1) > 0.25)), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="embedded")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--n", type=int, default=16, help="pairs per seed (generate's --n)")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[-1.0, -0.75, -0.5, -0.25, 0.0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch
    from scipy.stats import ks_2samp

    from neuromf.data.mask_codec import decode_sdf, tanh_threshold
    from neuromf.eval.lesion_check import shipped_reference
    from neuromf.generation.joint import MASK_DRAWS, derived_seed, sample_joint, smallest_lesion_voxels
    from neuromf.models.adapter_meta import resolve_adapter_dir
    from neuromf.models.joint import load_joint_model

    torch.set_grad_enabled(False)
    device = torch.device("cpu")
    joint = load_joint_model(args.adapter, device)
    meta = joint.meta
    if joint.strategy != "sdf":
        raise SystemExit(f"{args.adapter}: masks are not signed-distance channels (strategy {joint.strategy})")
    guidance = meta.guidance_scale(None)
    voxel_cm3 = float(np.prod(meta.prep.spacing)) / 1000.0
    floor = smallest_lesion_voxels(args.adapter, meta.prep.spacing)
    reference = shipped_reference(resolve_adapter_dir(args.adapter, "joint"))
    real = np.asarray(reference.volumes_cm3, dtype=float)
    low, _ = reference.volume_range

    def voxels(z: torch.Tensor, threshold_mm: float) -> float:
        channels = z[:, meta.n_image:] / meta.mask_scale
        return float(decode_sdf(channels, meta.sdf_subgrid, tanh_threshold(threshold_mm, meta.sdf_scale_mm)).sum())

    results: dict = {"what": __doc__.splitlines()[0], "adapter": str(resolve_adapter_dir(args.adapter, "joint")),
                     "shipped_threshold_mm": meta.sdf_threshold_mm, "joint_guidance": guidance, "steps": args.steps,
                     "n": args.n, "real": {"n": int(len(real)), "median_cm3": round(float(np.median(real)), 3),
                                           "median_of_n_spread": median_spread(real, args.n)},
                     "seeds": {}}
    started = time.time()
    for seed in args.seeds:
        draws: dict[tuple[int, int], torch.Tensor] = {}  # (pair, draw) -> its joint latent
        for _, z, _ in sample_joint(joint, args.n, args.steps, seed, device, "euler", guidance):
            for i in range(z.shape[0]):
                draws[(len(draws), 0)] = z[i:i + 1]
        per_threshold = {}
        for threshold in args.thresholds:
            volumes, redrawn, small = [], 0, 0
            for index in range(args.n):
                k = 0
                count = voxels(draws[(index, 0)], threshold)
                while k < MASK_DRAWS - 1 and count < floor:
                    k += 1
                    if (index, k) not in draws:  # as generate_pairs: fresh noise and a fresh site
                        _, z_new, _ = next(iter(sample_joint(joint, 1, args.steps, derived_seed(seed, index, k),
                                                             device, "euler", guidance)))
                        draws[(index, k)] = z_new
                    count = voxels(draws[(index, k)], threshold)
                redrawn += k > 0
                volume = count * voxel_cm3
                small += volume < low
                volumes.append(volume)
            ks = ks_2samp(volumes, real)
            median = statistics.median(volumes)
            per_threshold[f"{threshold:g}"] = {
                "median_cm3": round(median, 3), "median_over_real": round(median / float(np.median(real)), 3),
                "ks_p": round(float(ks.pvalue), 4), "ks_d": round(float(ks.statistic), 3),
                "redrawn": redrawn, "below_smallest_accepted": small,
                "volumes_cm3": [round(v, 3) for v in volumes]}
            print(f"seed {seed} threshold {threshold:+.2f} mm: median {median:.2f} cm3 "
                  f"({median / np.median(real):.2f}x real), KS p {ks.pvalue:.3f}, re-drawn {redrawn}, "
                  f"still too small {small}", file=sys.stderr, flush=True)
        results["seeds"][str(seed)] = per_threshold
    results["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
