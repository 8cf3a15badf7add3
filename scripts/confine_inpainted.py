"""A downstream lever, measured in docs/downstream.md: confine each inpainted pair's change to its lesion mask.

Usage: python scripts/confine_inpainted.py PAIRS_IN PAIRS_OUT

Inpainting adds the decoded change (generated minus the VAE's reconstruction of the scan) to the real scan within a
6 mm margin, so the lesion keeps the VAE's soft edge: its brightness runs 1-2 voxels past its mask. Here the change
(pair minus its healthy scan, read from the path in the pair's JSON and put on the pair's grid and intensity scale)
is kept inside the mask, half of it in the first voxel outside and none beyond. Masks and JSON records are copied
(the record names the lever); the input folder is not modified.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def confine(pair: np.ndarray, scan: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`scan` + the change (`pair` - `scan`) weighted 1 inside `mask`, 0.5 one voxel outside, 0 beyond."""
    outside = ndimage.distance_transform_edt(~mask)
    weight = np.where(mask, 1.0, np.where(outside <= 1.0, 0.5, 0.0))
    return scan + (pair - scan) * weight


def scan_on_pair_grid(meta: dict, pair: nib.Nifti1Image) -> np.ndarray:
    """The healthy scan the pair was inpainted into, on the pair's grid (an integer voxel shift) and scale."""
    scan = nib.load(meta["source_image"])
    to_scan = np.linalg.inv(scan.affine) @ pair.affine
    if not (np.allclose(to_scan[:3, :3], np.eye(3)) and np.allclose(to_scan[:3, 3], np.round(to_scan[:3, 3]))):
        raise ValueError(f"{meta['source_image']}: not on the pair's grid up to a whole-voxel shift")
    data = ndimage.affine_transform(scan.get_fdata(), np.eye(3), offset=to_scan[:3, 3], output_shape=pair.shape,
                                    order=0, mode="constant", cval=0.0)
    low, high = meta["intensity_bounds"]
    return (data - low) / (high - low)


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for record in sorted(src.glob("sample_*.json")):
        meta = json.loads(record.read_text())
        flair_path = src / record.name.replace(".json", "_flair.nii.gz")
        mask_path = src / record.name.replace(".json", "_mask.nii.gz")
        pair, mask_image = nib.load(flair_path), nib.load(mask_path)
        mask = mask_image.get_fdata() > 0
        confined = confine(pair.get_fdata(), scan_on_pair_grid(meta, pair), mask)
        nib.save(nib.Nifti1Image(confined.astype(np.float32), pair.affine, pair.header), dst / flair_path.name)
        shutil.copy(mask_path, dst / mask_path.name)
        meta["lever"] = "inpainted change confined to the mask (scripts/confine_inpainted.py)"
        (dst / record.name).write_text(json.dumps(meta, indent=2))
        print(f"{flair_path.name}: change outside the mask {np.abs(pair.get_fdata() - confined)[~mask].sum():.1f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
