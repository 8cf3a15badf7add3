"""Measure lesion inpainting into real healthy scans (docs/inpainting.md): writes a JSON of figures and a montage.

    nice -n 10 python scripts/measure_inpainting.py --out runs/inpaint_eval --json docs/inpaint_results.json \
        --montage docs/inpaint_montage.png

For n healthy phantom scans of `--data` (participants.tsv group hc: the held-out test controls first; `--skip-scans`
leaves out the first ones), a lesion drawn from the adapter's prior is inpainted
(`neuromf.generation.inpaint.inpaint_lesion`; pair i has seed 1000 s + i, s the --seeds in turn, as the prior's
lesion draw follows the seed) and written on the scan's own grid. Measured:
voxels beyond the margin that differ from the input as read back from the written files (must be 0); the pairs
mapped onto the model grid and judged by `neuromf evaluate`'s lesion-likeness check against the real lesions of
`--real` (embedded: the 85 real 2 mm phantom lesions); the FLAIR contrast of the inpainted lesions vs the real
ones (median, two-sample KS test) and of the same regions in the healthy scan before inpainting (a control: how much
of the contrast the inpainting adds). Resumable: written pairs are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats

from neuromf.eval.lesion_metrics import lesion_contrast
from neuromf.eval.metrics import evaluate_generated
from neuromf.generation.conditional import load_conditional_model
from neuromf.generation.inpaint import inpaint_lesion, write_inpainted
from neuromf.io.nifti import VolumeError, preprocess_pair, save_nifti
from neuromf.utils import atomic_write_json


def healthy_scans(data: Path) -> list[Path]:
    """FLAIRs of the healthy controls of a BIDS tree, held-out test controls first."""
    with open(data / "participants.tsv") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r["group"] == "hc"]
    rows.sort(key=lambda r: (r.get("split") != "test", r["participant_id"]))
    return [next((data / r["participant_id"] / "anat").glob("*_FLAIR.nii*")) for r in rows]


def changed_beyond_margin(source: Path, flair: Path, mask: Path, margin_mm: float) -> tuple[int, float]:
    """Voxels farther than `margin_mm` from the lesion whose stored value differs from the input's (read back from
    the files), and the largest distance (mm) of any changed voxel."""
    before, after = nib.load(str(source)), nib.load(str(flair))
    a, b = np.asanyarray(before.dataobj), np.asanyarray(after.dataobj)
    lesion = np.asanyarray(nib.load(str(mask)).dataobj) > 0
    spacing = np.linalg.norm(before.affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(~lesion, sampling=spacing)
    changed = a != b
    return int((changed & (distance > margin_mm)).sum()), float(distance[changed].max()) if changed.any() else 0.0


def montage(rows: list[tuple[Path, Path, Path]], out_png: Path, title: str) -> Path:
    """healthy | inpainted | difference, axial and coronal slices through each lesion's centroid (contour in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(rows), 3, figsize=(7.5, 2.5 * 2 * len(rows)), dpi=100)
    for k, (source, flair, mask) in enumerate(rows):
        a = np.asanyarray(nib.load(str(source)).dataobj).astype(np.float32)
        b = np.asanyarray(nib.load(str(flair)).dataobj).astype(np.float32)
        m = np.asanyarray(nib.load(str(mask)).dataobj) > 0
        c = np.round(ndimage.center_of_mass(m)).astype(int)
        brain = a > 0.1 * np.percentile(a, 99)
        vmax = 1.05 * float(max(b[m].max(), np.percentile(a[brain], 99.5)))  # the lesion unsaturated
        whole = slice(None)
        for j, (name, index) in enumerate((("axial", (whole, whole, c[2])), ("coronal", (whole, c[1], whole)))):
            def cut(v: np.ndarray, index: tuple = index) -> np.ndarray:
                return v[index].T

            ax = axes[2 * k + j]
            ax[0].imshow(cut(a), cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax[1].imshow(cut(b), cmap="gray", origin="lower", vmin=0, vmax=vmax)
            ax[1].contour(cut(m).astype(np.float32), levels=[0.5], colors="red", linewidths=0.6)
            ax[2].imshow(cut(b - a), cmap="RdBu_r", origin="lower", vmin=-0.4 * vmax, vmax=0.4 * vmax)
            ax[0].set_ylabel(f"{source.name.split('_')[0]} {name}", fontsize=7)
            for col, label in enumerate(("healthy", "inpainted (mask outlined)", "difference")):
                ax[col].set_xticks([])
                ax[col].set_yticks([])
                if k == 0 and j == 0:
                    ax[col].set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # the title above the column labels
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("sample_data/fcd_phantoms"))
    parser.add_argument("--real", default="embedded", help="data whose real FCD lesions the check uses")
    parser.add_argument("--adapter", default="embedded")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--skip-scans", type=int, default=0,
                        help="start after this many healthy scans (fresh scans for a re-measurement)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--composite", default="residual")
    parser.add_argument("--guidance", type=float, default=None,
                        help="mask guidance (default: the adapter's own for inpainting)")
    parser.add_argument("--margin-mm", type=float, default=6.0)
    parser.add_argument("--mask-source", default="prior", choices=["prior", "joint"],
                        help="where each lesion comes from: the conditional adapter's prior or the joint model")
    parser.add_argument("--joint-adapter", default="embedded")
    parser.add_argument("--joint-steps", type=int, default=32)
    parser.add_argument("--joint-guidance", type=float, default=None, help="default: the joint adapter's own")
    parser.add_argument("--out", type=Path, default=Path("runs/inpaint_eval"))
    parser.add_argument("--json", type=Path, default=Path("docs/inpaint_results.json"))
    parser.add_argument("--montage", type=Path, default=Path("docs/inpaint_montage.png"))
    args = parser.parse_args()

    cond = load_conditional_model(args.adapter, "cpu")
    prep = cond.prep
    source = {}
    if args.mask_source == "joint":
        from neuromf.models.joint import load_joint_model

        source = {"mask_source": "joint", "joint": load_joint_model(args.joint_adapter, "cpu"),
                  "joint_steps": args.joint_steps, "joint_guidance": args.joint_guidance}
    refused = []
    pairs_dir, grid_dir = args.out / "pairs", args.out / "model_grid"
    rows = []
    for i, scan in enumerate(healthy_scans(args.data)[args.skip_scans:args.skip_scans + args.n]):
        stem, seed = f"sample_{i:03d}", 1000 * args.seeds[i % len(args.seeds)] + i
        sidecar = pairs_dir / f"{stem}.json"
        if not sidecar.is_file():
            try:
                result = inpaint_lesion(scan, None, cond, seed=seed, steps=args.steps, margin_mm=args.margin_mm,
                                        composite=args.composite, guidance=args.guidance, **source)
            except VolumeError as err:  # a joint draw outside this brain: counted as a failed pair
                refused.append({"id": stem, "source": str(scan), "seed": seed, "error": str(err)})
                print(f"{stem}: refused: {err}", flush=True)
                continue
            result.info.update(adapter=args.adapter, **({"joint_adapter": args.joint_adapter} if source else {}))
            write_inpainted(result, pairs_dir, stem)
            print(f"{stem} {scan.name} seed {seed}: {result.info['lesion_cm3']:.2f} cm^3, contrast "
                  f"{result.info['contrast']:.3f}, {result.info['seconds']:.0f} s", flush=True)
        info = json.loads(sidecar.read_text())
        flair, mask = pairs_dir / f"{stem}_flair.nii.gz", pairs_dir / f"{stem}_mask.nii.gz"
        beyond, reach = changed_beyond_margin(scan, flair, mask, args.margin_mm)
        image, lesion = preprocess_pair(flair, mask, prep)
        healthy, _ = preprocess_pair(scan, mask, prep)
        save_nifti(image.data, image.affine, grid_dir / f"{stem}_flair.nii.gz")
        save_nifti(lesion.data, lesion.affine, grid_dir / f"{stem}_mask.nii.gz", dtype=np.uint8)
        rows.append({"id": stem, "source": str(scan), "seed": seed, "lesion_cm3": info["lesion_cm3"],
                     "seconds": info["seconds"], "changed_beyond_margin": beyond, "largest_change_mm": reach,
                     "contrast_before": lesion_contrast(healthy.data, lesion.data)})

    evaluation = evaluate_generated(grid_dir, args.real, prep, grid_dir / "evaluation.json")
    section = evaluation["lesion_like"]
    by_id = {s["id"]: s for s in section["samples"]}
    for row in rows:
        sample = by_id[row["id"]]
        row.update(contrast=sample["contrast"], lesion_like=sample["lesion_like"], failed=sample["failed"],
                   model_grid_cm3=sample["volume_cm3"])
    real = [r["contrast"] for r in section["real_cases"] if r["contrast"] is not None]
    made = [r["contrast"] for r in rows if r["contrast"] is not None]
    before = [r["contrast_before"] for r in rows if r["contrast_before"] is not None]
    ks = stats.ks_2samp(made, real)
    passed = [bool(r["lesion_like"]) for r in rows] + [False] * len(refused)  # a refused draw is a failed pair
    summary = {
        "n_pairs": len(rows), "skip_scans": args.skip_scans, "seeds": args.seeds, "steps": args.steps,
        "composite": args.composite,
        "guidance": cond.meta.inpaint_guidance_scale(args.guidance),
        "margin_mm": args.margin_mm, "adapter": args.adapter, "scans": str(args.data), "real_lesions": args.real,
        "mask_source": args.mask_source, "refused": refused,
        **({"joint_adapter": args.joint_adapter, "joint_steps": args.joint_steps,
            "joint_guidance": source["joint"].meta.guidance_scale(args.joint_guidance)} if source else {}),
        "changed_beyond_margin_total": int(sum(r["changed_beyond_margin"] for r in rows)),
        "largest_change_mm": max(r["largest_change_mm"] for r in rows),
        "lesion_like_rate": float(np.mean(passed)), "lesion_like": f"{sum(passed)}/{len(passed)}",
        "lesion_like_target": 0.95,
        "contrast": {"median_inpainted": float(np.median(made)), "median_real": float(np.median(real)),
                     "median_same_region_before": float(np.median(before)), "n_real": len(real),
                     "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue),
                     "definition": "mean FLAIR in the mask / mean in its 2-voxel ring of brain, on the 2 mm model "
                                   "grid (as `neuromf evaluate`)"},
        "lesion_cm3_median": float(np.median([r["model_grid_cm3"] for r in rows])),
        "seconds_per_pair_median": float(np.median([r["seconds"] for r in rows])),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "pairs": rows,
    }
    atomic_write_json(args.json, summary)
    shown = [(Path(r["source"]), pairs_dir / f"{r['id']}_flair.nii.gz", pairs_dir / f"{r['id']}_mask.nii.gz")
             for r in rows[:4]]
    montage(shown, args.montage, f"{args.mask_source} lesions inpainted into healthy phantom scans ({args.adapter}, "
                                 f"{args.steps} steps, guidance {summary['guidance']:g}, margin {args.margin_mm:g} mm)")
    print(json.dumps({k: v for k, v in summary.items() if k != "pairs"}, indent=1))


if __name__ == "__main__":
    main()
