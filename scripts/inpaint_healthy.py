"""Inpainted pairs for the downstream benchmark: a prior-drawn lesion inpainted into each of the first N healthy
*training* scans of a data set (`neuromf.inpaint_lesion`), written on the model grid as `sample_XXX_{flair,mask}`
+ `sample_XXX.json` (provenance: the inpainting's info, `mask_source` "prior"). Resumable: a finished pair is
skipped. Usage: python scripts/inpaint_healthy.py OUT_DIR [N] [FIRST_SEED] [DATA] [START]
(pairs START .. N - 1 only: two processes can share one folder, e.g. 0-15 and 16-31).
"""

from __future__ import annotations

import sys
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


def main(out_dir: Path, n: int = 24, first_seed: int = 100, data: str = "embedded", start: int = 0) -> None:
    cond = load_conditional_model("embedded", "cpu")
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
        atomic_write_json(Path(f"{stem}.json"), {**result.info, "adapter": "embedded", "seed": first_seed,
                                                 "lesion_seed": first_seed + i, "healthy_case": case.case_id,
                                                 "index": i})


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]), *(int(a) for a in args[1:3]), *args[3:4], *(int(a) for a in args[4:5]))
