"""Add the scanner texture to joint/conditional pairs generated without it (before texture shipped, or with
`--no-texture`), exactly as `neuromf generate` now does: `neuromf.generation.images.with_texture` with the pair's own
(seed, index) from its provenance JSON, so a re-textured pair equals one generated with texture on. Pairs that
already record a `texture_sigma` are refused; inpainted pairs are not for this script (inpainting blends a residual
into a real scan, which keeps the scan's own texture). Writes into a new folder; the input folder is not modified.
Usage: python scripts/texture_pairs.py IN_DIR OUT_DIR [VAE]   (VAE: a saved VAE folder, default the 2 mm `vae_fine`)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from neuromf.generation.images import with_texture
from neuromf.io.nifti import read_nifti, save_nifti
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper


def texture_folder(in_dir: Path, out_dir: Path, vae: MAISIVAEWrapper) -> list[Path]:
    """Textured copies of every `sample_XXX` pair of `in_dir` in `out_dir` (FLAIR textured, mask copied, JSON with
    `texture_sigma` and `textured_after`). Raises ValueError naming the file for a pair that cannot be textured."""
    if vae.texture_sigma is None:
        raise ValueError(f"{vae.source}: this VAE has no fitted texture_sigma (scripts/fit_texture.py)")
    sidecars = sorted(Path(in_dir).glob("sample_*.json"))
    if not sidecars:
        raise ValueError(f"{in_dir}: no sample_XXX.json pairs found")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for sidecar in sidecars:
        meta = json.loads(sidecar.read_text())
        if meta.get("texture_sigma") is not None:
            raise ValueError(f"{sidecar}: already textured (texture_sigma {meta['texture_sigma']})")
        if meta.get("mode") not in ("joint", "conditional") or "seed" not in meta or "index" not in meta:
            raise ValueError(f"{sidecar}: not a joint/conditional pair with seed and index in its provenance")
        stem = sidecar.with_suffix("")
        data, affine = read_nifti(f"{stem}_flair.nii.gz")
        image, texture_meta = with_texture(np.asarray(data, dtype=np.float32), vae, int(meta["seed"]),
                                           int(meta["index"]))
        target = out_dir / stem.name
        written.append(save_nifti(image, affine, f"{target}_flair.nii.gz"))
        shutil.copyfile(f"{stem}_mask.nii.gz", f"{target}_mask.nii.gz")
        written.append(Path(f"{target}_mask.nii.gz"))
        written.append(atomic_write_json(Path(f"{target}.json"), {**meta, **texture_meta, "textured_after": True}))
    return written


if __name__ == "__main__":
    args = sys.argv[1:]
    vae_path = args[2] if len(args) > 2 else Path(__file__).resolve().parents[1] / "sample_data/models/vae_fine"
    paths = texture_folder(Path(args[0]), Path(args[1]), MAISIVAEWrapper.from_file(vae_path))
    print(f"{len(paths) // 3} pairs textured into {args[1]}")
