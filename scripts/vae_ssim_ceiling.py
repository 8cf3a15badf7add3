"""How high can a VAE's round-trip SSIM go on the phantoms? The scanner noise of an original cannot be encoded in
a 4x-downsampled latent, so even a perfect decoder returns at best the noise-free scan, whose SSIM against the
noisy original is the ceiling of the `SSIM >= 0.93` target. The phantom generator draws the noise last, from the
subject's own seed, so each held-out case can be drawn again without noise (`noise_sigma` 0: the same random
draws, scaled by zero) and compared with its stored original and with the VAE's decode.

    python scripts/vae_ssim_ceiling.py [--vae embedded] [--cases 10] [--out benchmarks/results/vae_ssim_ceiling.json]

Reported per case and as means: SSIM(noise-free, original) = the ceiling; SSIM(decode, original) = the figure
`vae_realism.py` reports; SSIM(decode, noise-free) = how much of the anatomy the decode keeps; the sharpness ratio
of the noise-free scan (the share of the original's mean |Laplacian| that is anatomy, not noise).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from neuromf.config import load_config
from neuromf.data.embedded import FINE_PHANTOMS, resolve_data_dir
from neuromf.data.phantom import PhantomConfig, generate_subject, stored_flair, subject_rng
from neuromf.eval.image_metrics import ssim_3d
from neuromf.eval.realism import sharpness_ratio
from neuromf.io.nifti import image_window, read_nifti
from neuromf.pipelines.stage1 import preprocessing_of
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper

sys.path.insert(0, str(Path(__file__).parent))
from vae_realism import round_trip  # noqa: E402  (the same encode -> decode as the realism figures)


def subject_index(case_id: str, group: str, n_fcd: int) -> int:
    """The subject's index within its group: `make_phantom_dataset` numbers patients first, then controls."""
    number = int(case_id.removeprefix("sub-")) - 1
    return number if group == "fcd" else number - n_fcd


def noise_free_twin(case_id: str, group: str) -> np.ndarray:
    """The stored phantom `case_id` of the embedded set drawn again without noise, stored as the set stores it."""
    spec = FINE_PHANTOMS
    rng = subject_rng(spec.seed, group, subject_index(case_id, group, spec.n_fcd))
    cfg = PhantomConfig(shape=spec.shape, spacing=spec.spacing, noise_sigma=0.0)
    flair, _, _ = generate_subject(rng, cfg, with_lesion=(group == "fcd"))
    return stored_flair(flair).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="embedded")
    parser.add_argument("--config", default="vae_fine")
    parser.add_argument("--cases", type=int, default=10, help="the first N held-out (test split) cases")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vae_ssim_ceiling.json"))
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    prep = preprocessing_of(cfg)
    root = resolve_data_dir(cfg.data.data_dir)
    with open(root / "participants.tsv") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["split"] == "test"][:args.cases]
    vae = MAISIVAEWrapper.resolve(args.vae)
    start = time.time()
    cases = []
    for row in rows:
        sid = row["participant_id"]
        stored, affine = read_nifti(next((root / sid / "anat").glob("*_FLAIR.nii.gz")), role="image")
        clean = noise_free_twin(sid, row["group"])
        noisy_grid, _, window = image_window(stored, affine, prep)
        clean_grid, _, clean_window = image_window(clean, affine, prep)
        if not np.array_equal(window, clean_window):
            raise SystemExit(f"{sid}: the noise-free twin centres on another window ({clean_window} vs {window})")
        lo, hi = prep.bounds(noisy_grid)  # one intensity scale for both: SSIM compares them as stored
        original = ((noisy_grid - lo) / (hi - lo)).clamp(0, prep.clip_max)[None]
        noise_free = ((clean_grid - lo) / (hi - lo)).clamp(0, prep.clip_max)[None]
        decoded = round_trip(vae, original)
        cases.append({
            "case": sid,
            "ssim_noise_free_vs_original": float(ssim_3d(noise_free, original)),
            "ssim_decode_vs_original": float(ssim_3d(decoded, original)),
            "ssim_decode_vs_noise_free": float(ssim_3d(decoded, noise_free)),
            "sharpness_ratio_noise_free": sharpness_ratio(noise_free[0], original[0]),
        })
        print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else v for k, v in cases[-1].items()), flush=True)
    means = {k: float(np.mean([c[k] for c in cases])) for k in cases[0] if k != "case"}
    result = {"vae": args.vae, "grid": {"shape": list(prep.shape), "spacing": list(prep.spacing)},
              "held_out_cases": len(cases), "means": means, "cases": cases,
              "seconds": round(time.time() - start, 1)}
    atomic_write_json(args.out, result)
    print(json.dumps(means, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
