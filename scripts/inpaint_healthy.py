"""Inpainted pairs for the downstream benchmark: a prior-drawn lesion inpainted into each of the first N healthy
*training* scans of a data set (`neuromf.inpaint_lesion`), written on the model grid as `sample_XXX_{flair,mask}`
+ `sample_XXX.json` (provenance: the inpainting's info, `mask_source` "prior"). Resumable: a finished pair is
skipped. Usage: python scripts/inpaint_healthy.py OUT_DIR [N] [FIRST_SEED] [DATA] [START] [--adapter A]
(pairs START .. N - 1 only: two processes can share one folder, e.g. 0-15 and 16-31; `--adapter` a conditional
adapter folder other than the shipped `embedded`, e.g. one trained on fewer labelled cases).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from neuromf import inpaint_lesion
from neuromf.data.embedded import resolve_data_dir
from neuromf.generation.conditional import load_conditional_model
from neuromf.generation.inpaint import write_inpainted
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import preprocess_pair, save_nifti
from neuromf.utils import atomic_write_json


def main(out_dir: Path, n: int = 24, first_seed: int = 100, data: str = "embedded", start: int = 0,
         adapter: str = "embedded") -> None:
    cond = load_conditional_model(adapter, "cpu")
    prep = cond.prep
    healthy = discover_cases(resolve_data_dir(data), group="hc", split="train")[:n]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(tqdm(healthy, desc="inpainted pairs", unit="pair")):
        stem = out_dir / f"sample_{i:03d}"
        if i < start or Path(f"{stem}.json").is_file():
            continue
        result = inpaint_lesion(case.image, None, cond, seed=first_seed + i)
        with tempfile.TemporaryDirectory() as tmp:
            # back through the same preprocessing as the real cases: the benchmark compares like with like
            write_inpainted(result, Path(tmp), "pair")
            image, mask = preprocess_pair(Path(tmp) / "pair_flair.nii.gz", Path(tmp) / "pair_mask.nii.gz", prep)
        save_nifti(image.data[0], image.affine, f"{stem}_flair.nii.gz")
        save_nifti(mask.data[0] > 0.5, image.affine, f"{stem}_mask.nii.gz", dtype=np.uint8)
        atomic_write_json(Path(f"{stem}.json"), {**result.info, "adapter": adapter, "seed": first_seed,
                                                 "lesion_seed": first_seed + i, "healthy_case": case.case_id,
                                                 "index": i})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("n", type=int, nargs="?", default=24)
    parser.add_argument("first_seed", type=int, nargs="?", default=100)
    parser.add_argument("data", nargs="?", default="embedded")
    parser.add_argument("start", type=int, nargs="?", default=0)
    parser.add_argument("--adapter", default="embedded", help="conditional adapter ('embedded' or a folder)")
    main(**vars(parser.parse_args()))
