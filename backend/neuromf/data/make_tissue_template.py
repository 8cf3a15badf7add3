"""Derive the packaged tissue template (``tissue_template.npz``) from the MNI152 2009 maps in nilearn.

Run once, from a checkout, with nilearn installed (the ``phantoms`` extra)::

    python -m neuromf.data.make_tissue_template

nilearn ships the ICBM152 2009a symmetric T1 template and its grey/white-matter probability maps
inside its wheel (1 mm, 197x233x189), so this needs no network. The script

1. masks the GM/WM maps with the skull-stripped T1 (``T1 > 0``) and derives
   CSF = clip(brain - GM - WM, 0, 1), so GM + WM + CSF = 1 inside the brain and 0 outside;
2. crops to the brain bounding box (plus a margin) and averages 2x2x2 blocks, giving true
   partial-volume fractions on a 2 mm grid (the phantoms use 3 mm; 2 mm keeps the file small);
3. quantises each map to uint8 (0..255) and saves them with the 2 mm affine (MNI space, RAS, mm).

The phantom generator (``neuromf.data.phantom``) loads the result, so generating data needs
neither nilearn nor the 1 mm maps at run time.

Source and notice
-----------------
ICBM 2009a Nonlinear Symmetric template (MNI152 2009), as distributed with nilearn.
Fonov V. S. et al., NeuroImage 54(1):313-327 (2011); Fonov V. S. et al., NeuroImage 47:S102 (2009);
Collins D. L. et al., ANIMAL+INSECT: improved cortical structure segmentation, IPMI 1999 (LNCS 1613).

Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TEMPLATE_PATH = Path(__file__).parent / "tissue_template.npz"
BLOCK = 2  # 1 mm -> 2 mm by block averaging
MARGIN_MM = 4

MNI152_NOTICE = (
    "Derived from the ICBM 2009a Nonlinear Symmetric template (MNI152 2009) shipped with nilearn. "
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    'about the suitability of this software for any purpose. It is provided "as is" without express '
    "or implied warranty. The authors are not responsible for any data loss, equipment damage, "
    "property loss, or injury to subjects or patients resulting from the use or misuse of this "
    "software package."
)


def _block_mean(volume: np.ndarray, block: int) -> np.ndarray:
    """Average non-overlapping block^3 cubes (shape must be divisible by block)."""
    sx, sy, sz = (s // block for s in volume.shape)
    return volume.reshape(sx, block, sy, block, sz, block).mean(axis=(1, 3, 5))


def derive_tissue_maps() -> dict[str, np.ndarray]:
    """Return {"gm","wm","csf"} uint8 maps (255 = probability 1), "affine" (4x4) and "notice"."""
    from nilearn import datasets  # optional dependency, only needed to rebuild the template

    t1_img = datasets.load_mni152_template(resolution=1)
    t1 = np.asarray(t1_img.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    affine_1mm = np.asarray(t1_img.affine, dtype=np.float64)

    brain = (t1 > 0).astype(np.float32)
    gm = np.clip(gm, 0, 1) * brain
    wm = np.clip(wm, 0, 1) * brain
    csf = np.clip(brain - gm - wm, 0, 1)

    # Crop to the brain bounding box plus a margin, rounded up to whole blocks.
    idx = np.argwhere(brain > 0)
    lo = np.maximum(idx.min(axis=0) - MARGIN_MM, 0)
    hi = idx.max(axis=0) + 1 + MARGIN_MM
    hi = lo + ((hi - lo + BLOCK - 1) // BLOCK) * BLOCK
    pad_hi = np.maximum(hi - np.array(brain.shape), 0)
    maps = {}
    for name, vol in (("gm", gm), ("wm", wm), ("csf", csf)):
        vol = np.pad(vol, [(0, int(p)) for p in pad_hi])
        vol = vol[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        maps[name] = np.round(np.clip(_block_mean(vol, BLOCK), 0, 1) * 255).astype(np.uint8)

    # 2 mm voxel i covers 1 mm voxels lo + 2i and lo + 2i + 1: its centre is at lo + 2i + 0.5.
    to_1mm = np.eye(4)
    to_1mm[:3, :3] *= BLOCK
    to_1mm[:3, 3] = lo + (BLOCK - 1) / 2
    maps["affine"] = affine_1mm @ to_1mm
    maps["notice"] = np.array(MNI152_NOTICE)
    return maps


def main(argv: list[str] | None = None) -> None:
    """Derive the tissue probability maps and write them as a compressed .npz (default: the packaged template)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=TEMPLATE_PATH, help="output .npz (default: packaged copy)"
    )
    args = parser.parse_args(argv)
    maps = derive_tissue_maps()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp.npz")
    np.savez_compressed(tmp, **maps)
    tmp.replace(args.out)
    shape = maps["gm"].shape
    size_kb = args.out.stat().st_size / 1024
    print(f"wrote {args.out} ({shape[0]}x{shape[1]}x{shape[2]} at 2 mm, {size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
