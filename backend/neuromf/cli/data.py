"""Data subcommands: make-phantoms, check-data and mask-test."""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

from neuromf.cli._common import GRID_SHAPE, SEED, STAGE_DIR, VOXEL_MM, AddCommand, number, say_expected_time


def cmd_make_phantoms(args) -> int:
    """`neuromf make-phantoms`: write a synthetic BIDS data set of healthy and FCD phantom subjects."""
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset
    from neuromf.utils import ensure_writable, first_missing

    ensure_writable(args.out)
    if args.lesion_volume[0] > args.lesion_volume[1]:
        raise ValueError(f"--lesion-volume: the smallest volume {args.lesion_volume[0]:g} is above the largest "
                         f"{args.lesion_volume[1]:g}")
    cfg = PhantomConfig(shape=tuple(args.shape), spacing=tuple(args.spacing), lesion_strength=args.lesion_strength,
                        lesion_volume_cm3=tuple(args.lesion_volume))
    created = first_missing(args.out)
    try:
        out = make_phantom_dataset(args.out, args.n_healthy, args.n_fcd, seed=args.seed, cfg=cfg, progress=True)
    except BaseException:
        if created is not None:  # a failed or interrupted run leaves no folder it made
            shutil.rmtree(created, ignore_errors=True)
        raise
    print(f"wrote {args.n_healthy} healthy + {args.n_fcd} FCD phantom subjects to {out}")
    return 0


def cmd_check_data(args) -> int:
    """`neuromf check-data`: table of the cases found in a data folder; exit code 1 when one is unusable."""
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.io.bids import case_report, discover_cases, format_case_table

    skipped: list[dict] = []  # broken subjects (ROI without FLAIR, 2D image): problem rows, not an abort
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cases = discover_cases(resolve_data_dir(args.data), skipped=skipped)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    rows = sorted([case_report(case) for case in cases] + skipped, key=lambda r: r["id"])
    print(format_case_table(rows))
    unusable = [r["id"] for r in rows if not r["usable"]]
    n_fcd = sum(1 for c in cases if c.mask is not None)
    print(f"{len(rows)} cases ({n_fcd} with lesion masks), {len(unusable)} unusable")
    if unusable:
        print("unusable: " + ", ".join(unusable), file=sys.stderr)
        return 1
    return 0


def cmd_mask_test(args) -> int:
    """`neuromf mask-test`: round-trip Dice of FCD masks through the VAE vs downsampling."""
    from tqdm.auto import tqdm

    from neuromf.data.embedded import resolve_data_dir
    from neuromf.data.latents import make_cache
    from neuromf.estimates import PaceClock, current_load, mask_test_estimate, measured_rates, runs_on_cpu
    from neuromf.eval.mask_test import mask_vae_test, model_grid, save_mask_test
    from neuromf.io.bids import discover_cases
    from neuromf.utils import default_cache_dir, ensure_writable
    from neuromf.vae import MAISIVAEWrapper
    from neuromf.weights import EMBEDDED_MODELS

    ensure_writable(Path(args.out), file=True)  # before the VAE round trips, not after them
    skipped: list[dict] = []  # broken subjects (ROI without FLAIR, 2D image) are skipped, not an abort
    cases = discover_cases(resolve_data_dir(args.data), group="fcd", skipped=skipped)
    if args.max_cases:  # the first N FCD cases with a lesion mask (as the napari widget's limit)
        cases = [c for c in cases if c.mask is not None][:args.max_cases]
    vae = MAISIVAEWrapper.resolve(args.vae, preset=args.vae_preset, device=args.device)
    prep = model_grid(vae, args.shape, args.spacing)
    shipped = EMBEDDED_MODELS["vae"].get(str(args.vae))  # the rates cover the shipped VAEs
    tested = len([case for case in cases if case.mask is not None])
    say_expected_time(lambda: shipped and mask_test_estimate(shipped, tested, prep.shape), args.device)
    # the shared latent cache (keyed by content, VAE and grid): a training run on these cases reuses the encodings
    cache = make_cache(default_cache_dir(), vae, prep)
    rate = (measured_rates().get("mask_test") or {}).get(shipped or "")
    pace = PaceClock(current_load()) if rate and runs_on_cpu(args.device) and list(prep.shape) == rate["grid"] \
        else None

    def on_case(row: dict) -> None:
        bar.update(1)
        if pace is not None:
            pace.mark(time.perf_counter(), bar.n)

    with tqdm(total=len(cases), desc="mask-test", unit="case") as bar:
        result = mask_vae_test(args.data, vae, prep, cases=cases, on_case=on_case, cache=cache)
    if pace is not None:  # this machine's pace, for later estimates (the cases after the first: warm-up aside)
        pace.record("mask_test", rate["per_case_s"])
    result["skipped"] = [r for r in skipped if r["group"] != "hc"] + result.get("skipped", [])
    for row in result["skipped"]:
        print(f"skipped {row['id']}: {'; '.join(row['problems'])}", file=sys.stderr)
    save_mask_test(result, args.out)
    s = result["summary"]
    print(f"strategy A (VAE) mean Dice {s['mean_dice_vae']:.3f} (median {s['median_dice_vae']:.3f}); strategy B "
          + ", ".join(f"{m} {d:.3f}" for m, d in s["mean_dice_downsample"].items()))
    c = s["ceilings"]
    print(f"strategy B as a signed distance (sdf) {s['mean_dice_sdf']:.3f} (min {s['min_dice_sdf']:.3f}); ceilings: "
          f"lesion contrast {c['median_contrast_preprocessed']:.3f} after preprocessing, "
          f"{c['median_contrast_vae_round_trip']:.3f} after the VAE round trip "
          f"({c['share_hyperintense_vae_round_trip']:.0%} hyperintense); sdf round trips lesion-like: "
          f"{c['sdf_round_trip_lesion_like']:.0%}")
    print(f"decision: {result['decision']} ({result['reason']}); wrote {args.out}")
    return 0


def cmd_export_dataset(args) -> int:
    """`neuromf export-dataset`: generated or inpainted pairs as an nnU-Net v2 raw dataset or a BIDS derivative."""
    from neuromf.io.export import export_dataset

    target = export_dataset(args.pairs, args.format, args.out, args.name, args.dataset_id, args.overwrite)
    print(f"wrote a {args.format} data set to {target}")
    return 0


def register(add: AddCommand) -> None:
    """Add the data subcommands (make-phantoms, check-data, mask-test, export-dataset) through `add`."""
    p = add("make-phantoms", cmd_make_phantoms, "write a synthetic FCD phantom data set (BIDS, like ds004199)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-healthy", type=number(0, 10_000, integer=True), default=40)
    p.add_argument("--n-fcd", type=number(0, 10_000, integer=True), default=24)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--shape", type=GRID_SHAPE, nargs=3, default=[64, 64, 64])
    p.add_argument("--spacing", type=VOXEL_MM, nargs=3, default=[3.0, 3.0, 3.0])
    p.add_argument("--lesion-strength", type=number(0.0, 10.0), default=1.0,
                   help="scale of the lesions' FLAIR hyperintensity (1: as the embedded phantoms; 0.4: subtle)")
    p.add_argument("--lesion-volume", type=number(0.01, 1000.0), nargs=2, default=[1.0, 15.0], metavar=("LO", "HI"),
                   help="lesion volumes in cm^3, drawn log-uniform in [LO, HI]")

    p = add("check-data", cmd_check_data, "list the cases of a BIDS tree or flat folder and their problems")
    p.add_argument("data", help="data folder, 'embedded' (2 mm phantoms) or 'embedded-3mm'")

    p = add("mask-test", cmd_mask_test, "round-trip Dice of lesion masks through the VAE vs downsampling")
    p.add_argument("--data", default="embedded",
                   help="BIDS tree / flat folder with FCD cases, 'embedded' (2 mm phantoms) or 'embedded-3mm'")
    p.add_argument("--vae", default="embedded",
                   help="'embedded' / 'embedded-3mm' (the shipped 2 mm / 3 mm VAE) or a local MAISI weight file")
    p.add_argument("--vae-preset", default=None, choices=["maisi", "small", "tiny"],
                   help="architecture of a local VAE file (default: the preset in its model.json sidecar, else "
                        "maisi); refused when it disagrees with the sidecar")
    p.add_argument("--shape", type=GRID_SHAPE, nargs=3, default=None,
                   help="model grid in voxels (default: the grid the VAE was trained on, else 64 64 64)")
    p.add_argument("--spacing", type=VOXEL_MM, nargs=3, default=None,
                   help="model grid spacing in mm (default: the VAE's, else 3 3 3)")
    p.add_argument("--max-cases", type=number(0, 100_000, integer=True), default=0, metavar="N",
                   help="test only the first N FCD cases with a lesion mask (0 = all; at 2 mm a case takes several "
                        "seconds on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(STAGE_DIR / "mask_vae_test.json"))

    p = add("export-dataset", cmd_export_dataset,
            "write generated or inpainted pairs as an nnU-Net v2 raw dataset or a BIDS derivative")
    p.add_argument("--pairs", type=Path, action="append", required=True, metavar="DIR",
                   help="a folder written by `neuromf generate` (repeat for several)")
    p.add_argument("--format", required=True, choices=["nnunet", "bids"])
    p.add_argument("--out", type=Path, required=True,
                   help="nnunet: the nnUNet_raw folder (Dataset<ID>_<NAME> is written in it); bids: the data set's "
                        "folder")
    p.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", default="FCDSynth", help="data set name (letters and digits)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
