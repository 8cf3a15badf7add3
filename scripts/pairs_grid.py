"""One picture of a folder of generated pairs with `neuromf evaluate`'s verdict on each: per pair the axial slice
through the mask's centroid (FLAIR, mask contour in red), titled with volume, contrast and the failed criteria.

    python scripts/pairs_grid.py GENERATED_DIR [--metrics GENERATED_DIR/metrics.json] [--out GRID.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generated", type=Path)
    parser.add_argument("--metrics", type=Path, help="evaluate's JSON (default: GENERATED/metrics.json)")
    parser.add_argument("--out", type=Path, help="PNG (default: GENERATED/pairs_grid.png)")
    args = parser.parse_args(argv)
    metrics_path = args.metrics or args.generated / "metrics.json"
    verdicts = json.loads(metrics_path.read_text())["lesion_like"]["samples"] if metrics_path.is_file() else []
    flairs = sorted(args.generated.glob("sample_*_flair.nii.gz"))
    if not flairs:
        raise SystemExit(f"{args.generated}: no sample_*_flair.nii.gz")
    cols = min(8, len(flairs))
    rows = math.ceil(len(flairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), dpi=90, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (ax, flair) in enumerate(zip(axes.flat, flairs, strict=False)):
        image = np.asarray(nib.load(flair).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(str(flair).replace("_flair.nii.gz", "_mask.nii.gz")).dataobj) > 0.5
        z = int(np.argwhere(mask)[:, 2].mean().round()) if mask.any() else image.shape[2] // 2
        ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=float(np.percentile(image, 99.5)))
        if mask[:, :, z].any():
            ax.contour(mask[:, :, z].T.astype(np.float32), levels=[0.5], colors="red", linewidths=0.8)
        title = f"{i}: {mask.sum()} vox"
        if i < len(verdicts):
            v = verdicts[i]
            title = (f"{i}: {'PASS' if v['lesion_like'] else 'fail'} {v.get('volume_cm3', 0) or 0:.1f}cm3\n"
                     + (",".join(v["failed"]) if v["failed"] else f"contrast {v.get('contrast') or 0:.2f}"))
        ax.set_title(title, fontsize=7, color="green" if i < len(verdicts) and verdicts[i]["lesion_like"] else "k")
    fig.tight_layout()
    out = args.out or args.generated / "pairs_grid.png"
    fig.savefig(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
