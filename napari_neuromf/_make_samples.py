"""Make the pre-made sample pairs of File > Open Sample > NeuroMF (``napari_neuromf/samples/``).

Opening a sample runs on napari's GUI thread, so the generated samples are not generated there (a model run and
the torch import froze napari for 6-15 s): this script samples them once, seed 0 on the CPU, with the shipped 2 mm
adapters in the settings that make lesion pairs (``SETTINGS``: the Generate widget's defaults), and writes each
pair as

    samples/<prefix>_FLAIR.nii.gz      the FLAIR on the model grid, int16 with a scale factor (steps of 1e-3)
    samples/<prefix>_FLAIR_roi.nii.gz  its lesion mask, uint8
    samples/<prefix>.json              the provenance the layers carry (seed, steps, adapter, mode, ...)

for ``gen_000`` (joint: the mask from the ``joint_fine`` adapter, 32 Euler steps, the FLAIR rendered for it by
``cond_fine``) and ``cond_000`` (conditional: a FLAIR from ``cond_fine`` for a lesion drawn from the training
lesions). Rerun it after retraining an embedded adapter:

    python -m napari_neuromf._make_samples [--out napari_neuromf/samples]

(minutes on a CPU: the joint pair takes 64 network calls on the 2 mm grid). It also records every sample's
first-layer grid in ``samples/grids.json``: File > Open Sample adds that layer before reading any file
(`_sample_data.record_sample_grids`).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
PAIRS = {"joint": "gen_000", "conditional": "cond_000"}  # mode -> file prefix
ADAPTERS = {"joint": "joint_fine + cond_fine", "conditional": "cond_fine"}  # the shipped models each mode uses
EMBEDDED = "embedded"  # the shipped 2 mm set: the one whose pairs carry lesions
SETTINGS = {"joint": {"steps": 32, "method": "euler", "render": EMBEDDED},  # the Generate widget's defaults
            "conditional": {"steps": 1, "method": "meanflow"}}
QUANTUM = 1e-3  # FLAIR intensity step of the stored int16 values (intensities lie in [0, 2]; a display shows 256)


def generate(mode: str) -> Any:
    """The sample's pair: seed 0, on the CPU, in the mode's ``SETTINGS``."""
    if mode == "conditional":
        from neuromf.generation.conditional import generate_conditional_pairs as sample
    else:
        from neuromf.generation.joint import generate_pairs as sample
    return next(iter(sample(EMBEDDED, n=1, seed=0, device="cpu", **SETTINGS[mode])))


def provenance(pair: Any, mode: str) -> dict[str, Any]:
    """The metadata the sample's layers carry (no path of the machine that made it)."""
    meta = {"seed": 0, "steps": SETTINGS[mode]["steps"], "checkpoint": EMBEDDED, "index": int(pair.index),
            **(pair.meta or {}), "generated": True}
    meta["adapter"] = f"{EMBEDDED} ({ADAPTERS[mode]})"
    if "rendered_by" in meta:  # the renderer's folder on the machine that made it: named instead
        meta["rendered_by"] = f"{EMBEDDED} (cond_fine)"
    meta["made_by"] = "python -m napari_neuromf._make_samples"
    return json.loads(json.dumps(meta, default=str))


def _write_gz(image: nib.Nifti1Image, path: Path) -> None:
    """gzip level 9 with no timestamp: the same pair gives the same bytes."""
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=9, mtime=0))


def write_pair(pair: Any, mode: str, folder: Path) -> list[Path]:
    """Write one pair as the sample files of ``mode``; returns their paths."""
    prefix = PAIRS[mode]
    folder.mkdir(parents=True, exist_ok=True)
    image = np.asarray(pair.image, dtype=np.float64)
    if image.min() < 0 or image.max() * (1 / QUANTUM) > np.iinfo(np.int16).max:
        raise ValueError(f"{mode} sample: intensities {image.min():.3g}..{image.max():.3g} do not fit int16 steps "
                         f"of {QUANTUM}")
    flair = nib.Nifti1Image(np.round(image / QUANTUM).astype(np.int16), np.asarray(pair.affine, dtype=np.float64))
    flair.header.set_slope_inter(QUANTUM, 0.0)
    flair.header.set_xyzt_units("mm")
    mask = nib.Nifti1Image(np.asarray(pair.mask).astype(np.uint8), np.asarray(pair.affine, dtype=np.float64))
    mask.header.set_xyzt_units("mm")
    paths = [folder / f"{prefix}_FLAIR.nii.gz", folder / f"{prefix}_FLAIR_roi.nii.gz", folder / f"{prefix}.json"]
    _write_gz(flair, paths[0])
    _write_gz(mask, paths[1])
    paths[2].write_text(json.dumps(provenance(pair, mode), indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="folder for the sample files")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the same numbers on every machine's CPU count
    for mode in PAIRS:
        for path in write_pair(generate(mode), mode, args.out):
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    if args.out.resolve() == SAMPLES_DIR:  # the grids of the samples File > Open Sample reads
        from napari_neuromf._sample_data import record_sample_grids

        print(f"wrote {record_sample_grids()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
