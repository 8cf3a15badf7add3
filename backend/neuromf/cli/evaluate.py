"""Evaluation subcommands: evaluate, consistency, benchmark-downstream, ablate-lp, calibrate-guidance and
verify (the report)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuromf.cli._common import (
    COUNT,
    GRID_SHAPE,
    REPORT,
    SCALE,
    SEED,
    STAGE_DIR,
    STEPS,
    VOXEL_MM,
    AddCommand,
    drive,
    number,
    parse_overrides,
)
from neuromf.config import CALIBRATION_SCALES, SAMPLERS


def cmd_evaluate(args) -> int:
    """`neuromf evaluate`: lesion-likeness and Dice of generated pairs against real FCD masks."""
    from neuromf.eval.checks import fmt, ks_p
    from neuromf.eval.metrics import evaluate_generated
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(args.adapter, args.mode).prep
    result = evaluate_generated(generated_folder(args), args.data, prep, Path(args.out), progress=True)
    like = result["lesion_like"]
    summary = like["summary"]
    print(f"lesion-like: {like['summary']['n_lesion_like']}/{like['summary']['n']} ({like['rate']:.0%}); per "
          "criterion: " + ", ".join(f"{k} {v:.0%}" for k, v in like["summary"]["rates"].items() if k != "all")
          + f"; median contrast {fmt(summary['medians'].get('contrast'))} (real "
            f"{fmt(like['reference']['median_contrast'])}, contrast KS D {fmt(summary['contrast_ks_statistic'])} p "
            f"{ks_p(summary.get('contrast_ks_pvalue'))}, "
            f"brighter than any real lesion: {fmt(summary['share_brighter_than_real'])}); lesion sites' spread "
            f"{fmt(summary['position_spread'])} (real {fmt(summary['real_position_spread'])})")
    edge = result["lesion_edge"]
    print(f"lesion edge: brightness 1-2 voxels outside the mask over the tissue around, median "
          f"{fmt(edge['generated']['median_spill'])} (real {fmt(edge['real']['median_spill'])}; a soft edge spills "
          "past its mask)")
    if like["reference"] is not None:
        from neuromf.eval.figures import site_map

        sites = site_map(like["reference"]["positions"],
                         [(row["position"], bool(row["lesion_like"])) for row in like["samples"] if row["position"]],
                         Path(args.out).with_name(Path(args.out).stem + "_sites.png"),
                         title=f"lesion sites: spread {fmt(summary['position_spread'])} (lesion-like "
                               f"{fmt(summary['position_spread_lesion_like'])}), real "
                               f"{fmt(summary['real_position_spread'])}")
        print(f"wrote {sites}")
    if args.empty_mask_control:
        from neuromf.generation.conditional import empty_mask_control
        from neuromf.utils import atomic_write_json

        control = empty_mask_control(args.adapter, generated_folder(args), device=args.device)
        atomic_write_json(Path(args.out), {**result, "empty_mask_control": control})
        print(f"empty-mask control ({control['n']} pairs): median contrast {control['median_contrast_empty_mask']} "
              f"with an empty mask vs {control['median_contrast']} as generated; median gain "
              f"{control['median_gain']}, smallest {control['min_gain']}")
    print(f"wrote {args.out}")
    return 0


def cmd_consistency(args) -> int:
    """`neuromf consistency`: image-mask consistency and downstream use of generated pairs, judged by a segmenter."""
    from neuromf.eval.segmenter import evaluate_consistency
    from neuromf.models.adapter_meta import adapter_meta
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out), file=True)  # before the trainings, not after them
    prep = adapter_meta(args.adapter, args.mode).prep
    result = evaluate_consistency(generated_folder(args), args.data, prep, seeds=args.seeds, steps=args.steps,
                                  out_json=Path(args.out), device=args.device, progress=True)

    def pm(d: dict) -> str:
        return f"{d['mean']:.3f}" + ("" if d["sd"] is None else f" +- {d['sd']:.3f}")

    down = result["downstream"]
    print(f"segmenter ceiling (held-out real Dice) {pm(result['ceiling'])}; image-mask consistency Dice "
          f"{pm(result['consistency'])} on {result['n_generated']} generated pairs ({len(args.seeds)} seeds)")
    print(f"downstream: real only {pm(down['real_only'])}, real + generated {pm(down['real_plus_generated'])}; "
          f"{down['verdict']}")
    print(f"wrote {args.out}")
    return 0


def cmd_benchmark_downstream(args) -> int:
    """`neuromf benchmark-downstream`: segmenters trained on real, real + synthetic, synthetic-only and 50% real +
    synthetic, scored on the same held-out real cases (`neuromf.api.benchmark_downstream`)."""
    from neuromf.api import benchmark_downstream
    from neuromf.eval.downstream import format_table
    from neuromf.io.nifti import Preprocessing
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out))
    grid = None
    if args.shape or args.spacing:
        if not (args.shape and args.spacing):
            raise SystemExit("benchmark-downstream: --shape and --spacing go together (the model grid)")
        grid = Preprocessing(shape=tuple(args.shape), spacing=tuple(args.spacing))
    result = benchmark_downstream(args.out, args.inpainted, args.joint, args.conditional, args.adapter, args.data,
                                  tuple(args.seeds), args.budget_steps, args.quick, args.arms, args.synthetic_share,
                                  grid, args.lesion_like_only, args.workers, args.device, progress=True,
                                  extra_real=args.extra_real, scarce_fractions=tuple(args.scarce_fractions))
    for note in result["notes"]:
        print(f"note: {note}")

    print(format_table(result))
    print(f"wrote {Path(args.out) / 'downstream.json'} and {Path(args.out) / 'downstream.png'}")
    return 0


def cmd_ablate_lp(args) -> int:
    """`neuromf ablate-lp`: per-channel Lp vs uniform L2 over several seeds (`run_ablation`)."""
    from neuromf.pipelines.ablation import run_ablation

    report = run_ablation(args.config, args.base_checkpoint, Path(args.out), args.n, args.seeds, args.data,
                          parse_overrides(args.set), drive=drive)
    print(json.dumps(report, indent=2))
    return 0


def cmd_verify(args) -> int:
    """`neuromf verify`: check a run's adapter and write the verification report."""
    from neuromf.eval.report import write_verification_report
    from neuromf.models.joint import check_adapter

    run_dir = Path(args.run)
    checks = check_adapter(run_dir / "adapter")
    path = write_verification_report(Path(args.stage_dir), run_dir, Path(args.report), t2_t3=checks)
    print(f"wrote {path}")
    return 0


def _add_generated_flags(p: argparse.ArgumentParser, out: Path) -> None:
    """The flags of commands that judge a folder of generated pairs against real cases on the adapter's grid."""
    p.add_argument("--adapter", default="embedded", help="the adapter that generated the pairs (its grid)")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional"],
                   help="with --adapter embedded: which demo adapter")
    p.add_argument("folder", nargs="?", default=None, metavar="GENERATED",
                   help="folder of generated pairs (as --generated)")
    p.add_argument("--generated", default=None,
                   help=f"folder of generated pairs (default {STAGE_DIR / 'generated'})")
    p.add_argument("--data", default="embedded",
                   help="the real cases: a data folder, 'embedded' (2 mm) or 'embedded-3mm'")
    p.add_argument("--out", default=str(out))


def generated_folder(args) -> Path:
    """The pairs' folder, given by position or by --generated (not two different ones)."""
    if args.folder and args.generated and Path(args.folder) != Path(args.generated):
        raise SystemExit(f"give the generated pairs' folder once: {args.folder} and --generated {args.generated}")
    return Path(args.folder or args.generated or STAGE_DIR / "generated")


def cmd_calibrate_guidance(args) -> int:
    """`neuromf calibrate-guidance`: the joint guidance whose masks match the real lesions' median volume."""
    from neuromf.generation.joint import calibrate_joint_guidance
    from neuromf.models.adapter_meta import EMBEDDED_NAMES
    from neuromf.utils import atomic_write_json

    if args.store and args.adapter in EMBEDDED_NAMES:
        raise SystemExit("calibrate-guidance: --store writes into the adapter's folder; a shipped adapter is left as "
                         "it is (copy its folder and calibrate the copy)")
    if args.store:  # by path as well as by name: checked before the calibration's minutes of sampling
        from neuromf.models.adapter_meta import SIDECAR, resolve_adapter_dir
        from neuromf.utils import ensure_writable

        ensure_writable(resolve_adapter_dir(args.adapter) / SIDECAR, file=True)
    if args.out:
        from neuromf.utils import ensure_writable

        ensure_writable(Path(args.out), file=True)
    result = calibrate_joint_guidance(args.adapter, tuple(args.scales), args.n, args.steps, tuple(args.seeds),
                                      args.device, args.sampler, args.data, args.reference)
    drawn = args.n * len(args.seeds)
    print(f"{'real' if args.reference == 'real' else 'training'} lesions: median {result['target_cm3']:.2f} cm^3")
    for row in result["rows"]:
        ks = "" if row["ks_pvalue"] is None else f", KS p {row['ks_pvalue']:.2f}"
        print(f"  guidance {row['guidance']:g}: median {row['median_cm3']:.2f} cm^3, {row['empty']}/{drawn} empty{ks}")
    print(f"chosen: {result['chosen']:g} (generate --joint-guidance {result['chosen']:g})")
    if result["interpolated"] is not None:
        print(f"between the grid's scales (log-linear): {result['interpolated']:g}")
    if result["outside_range"]:
        print(f"warning: the reference lesions' median lies beyond the scales tried ({min(args.scales):g}-"
              f"{max(args.scales):g}): the chosen one is only the nearest end; try scales further "
              f"{'down' if result['chosen'] == min(args.scales) else 'up'}")
    if args.store:
        from neuromf.models.adapter_meta import AdapterMeta

        directory = Path(result["adapter"])
        meta = AdapterMeta.load(directory)
        meta.guidance = result["chosen"]
        meta.save(directory)
        print(f"stored as the default guidance of {directory}")
    if args.out:
        atomic_write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0


def register(add: AddCommand) -> None:
    """Add the evaluation subcommands (evaluate, consistency, ablate-lp, calibrate-guidance, verify) through `add`."""
    p = add("evaluate", cmd_evaluate, "metrics of generated pairs against real FCD masks")
    _add_generated_flags(p, STAGE_DIR / "metrics" / "metrics.json")
    p.add_argument("--empty-mask-control", action="store_true",
                   help="conditional pairs: generate each FLAIR again from the same noise with an empty mask and "
                        "report the contrast the mask adds (needs the adapter; one more pass per pair)")
    p.add_argument("--device", default="auto", help="for --empty-mask-control: auto | cpu | cuda | cuda:N")

    p = add("consistency", cmd_consistency,
            "image-mask consistency and downstream use of generated pairs, judged by a small MONAI segmenter")
    _add_generated_flags(p, STAGE_DIR / "metrics" / "consistency.json")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="one segmenter pair per seed")
    p.add_argument("--steps", type=STEPS, default=300, help="training steps of each segmenter")
    p.add_argument("--device", default="cpu")

    p = add("benchmark-downstream", cmd_benchmark_downstream,
            "downstream benchmark: a segmenter trained on real, real + synthetic, synthetic-only and 50% real + "
            "synthetic pairs, scored on the same held-out real cases (resumable)")
    p.add_argument("--inpainted", default=None, metavar="DIR", help="pairs inpainted into real healthy scans")
    p.add_argument("--joint", default=None, metavar="DIR", help="joint-generated pairs (new mask shapes)")
    p.add_argument("--conditional", default=None, metavar="DIR", help="conditional pairs (prior masks)")
    p.add_argument("--adapter", default="embedded", help="the adapter the pairs were generated with (its grid)")
    p.add_argument("--shape", type=GRID_SHAPE, nargs=3, default=None, help="the model grid instead of the adapter's")
    p.add_argument("--spacing", type=VOXEL_MM, nargs=3, default=None, help="with --shape: voxel size (mm)")
    p.add_argument("--data", default="embedded", help="the real FCD cases (train/test split)")
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2, 3, 4], help="one segmenter per arm and seed")
    p.add_argument("--budget-steps", type=STEPS, default=None, help="training steps per segmenter (default 300)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small patches and 30 steps")
    p.add_argument("--arms", nargs="+", default=None, help="only these arms, in this order (R always runs first)")
    p.add_argument("--synthetic-share", type=number(0.0, 1.0), default=None,
                   help="share of training patches drawn from synthetic pairs (default: uniform over cases)")
    p.add_argument("--workers", type=number(1, 64, integer=True), default=1,
                   help="trainings at once (threads sharing the loaded cases; results are the same as one by one)")
    p.add_argument("--lesion-like-only", action="store_true",
                   help="keep only the synthetic pairs that pass the lesion-likeness check (quality filter)")
    p.add_argument("--extra-real", default=None, metavar="DIR",
                   help="labelled real FCD cases outside --data's train and test sets: the ceiling arms "
                        "'R+extra-real' and '50%%R+extra-real' add them as the pairs are added")
    p.add_argument("--scarce-fractions", type=number(0.01, 0.99), nargs="+", default=[0.5], metavar="F",
                   help="shares of R for the scarce-labels arms (default 0.5: '50%%R+synthetic' and its control "
                        "'50%%R'; 0.5 0.25 adds '25%%R+synthetic', '25%%R', ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(STAGE_DIR / "downstream"), help="results folder (re-run to resume)")

    p = add("ablate-lp", cmd_ablate_lp, "per-channel Lp (1.5/2.0) vs uniform L2, same seed/data/budget")
    p.add_argument("--config", default="joint_3mm")
    p.add_argument("--base_checkpoint", "--base-checkpoint", dest="base_checkpoint", default="embedded")
    p.add_argument("--n", type=COUNT, default=8)
    p.add_argument("--seeds", type=SEED, nargs="+", default=[0, 1, 2], help="one run per arm and seed")
    p.add_argument("--data", default="embedded",
                   help="the real cases: a data folder, 'embedded' (2 mm) or 'embedded-3mm'")
    p.add_argument("--out", default=str(STAGE_DIR))
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = add("calibrate-guidance", cmd_calibrate_guidance,
            "joint x-prediction adapters: the joint guidance whose masks match the real lesions in median volume")
    p.add_argument("--adapter", default="embedded", help="a joint adapter folder, 'embedded' (2 mm) or 'embedded-3mm'")
    p.add_argument("--scales", type=SCALE, nargs="+", default=list(CALIBRATION_SCALES),
                   help="guidance scales to try (the volume rises steeply with the scale: keep them close; below 1 "
                        "for a training whose masks come out too large)")
    p.add_argument("--n", type=COUNT, default=8, help="masks drawn per scale and seed")
    p.add_argument("--steps", type=STEPS, default=32)
    p.add_argument("--sampler", default="euler", choices=SAMPLERS)
    p.add_argument("--seeds", "--seed", type=SEED, nargs="+", default=[1000, 1001],
                   help="pooled (one seed's median of 8 masks is noisy); apart from the usual evaluation seeds")
    p.add_argument("--reference", default="real", choices=["real", "train"],
                   help="the lesions whose median volume is the target: all real ones (what evaluate compares with) "
                        "or only the adapter's training lesions")
    p.add_argument("--data", default=None, help="the FCD data the adapter was trained on (default: its sidecar's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    p.add_argument("--store", action="store_true",
                   help="write the chosen scale into the adapter's sidecar as its default guidance (what "
                        "'adapter's' means in generate and the Generate widget)")

    p = add("verify", cmd_verify, "write the verification report (mask test, adapter, loss, lesions, Dice, ablation)")
    p.add_argument("--run", default="runs/lora_demo", help="train-lora output folder")
    p.add_argument("--stage-dir", default=str(STAGE_DIR))
    p.add_argument("--report", default=str(REPORT))
