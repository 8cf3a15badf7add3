"""Phase-7 subcommands: mask-test, train-lora, evaluate, ablate-lp, verify and the end-to-end demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGE_DIR = Path("experiments/stage2_fcd")
REPORT = Path("experiments/phase_7/verification_report.md")


def cmd_mask_test(args) -> int:
    from tqdm.auto import tqdm

    from neuromf.data.latents import resolve_data_dir
    from neuromf.eval.mask_test import mask_vae_test, save_mask_test
    from neuromf.io.bids import discover_cases
    from neuromf.io.nifti import Preprocessing
    from neuromf.utils import ensure_writable
    from neuromf.vae import MAISIVAEWrapper

    ensure_writable(Path(args.out), file=True)  # before the VAE round trips, not after them
    skipped: list[dict] = []  # broken subjects (ROI without FLAIR, 2D image) are skipped, not an abort
    cases = discover_cases(resolve_data_dir(args.data), group="fcd", skipped=skipped)
    vae = MAISIVAEWrapper.resolve(args.vae, preset=args.vae_preset, device=args.device)
    prep = Preprocessing(shape=tuple(args.shape), spacing=tuple(args.spacing))
    with tqdm(total=len(cases), desc="mask-test", unit="case") as bar:
        result = mask_vae_test(args.data, vae, prep, cases=cases, on_case=lambda row: bar.update(1))
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


def _train_stage2(args, train_fn: Callable, name: str) -> Any:
    """Drive a stage-2 training generator from the command line (progress bar, Ctrl-C stops and saves)."""
    from neuromf.cli import _drive, _load_cfg, _stop_on_sigint

    cfg = _load_cfg(args)
    result = _drive(train_fn(cfg, args.base_checkpoint, resume=args.resume, overwrite=args.overwrite,
                             stop=_stop_on_sigint()), name)
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; adapter: {result.export}; "
          f"resume with --resume; loss curve: {result.out_dir / 'loss_curve.png'}")
    return result


def cmd_train_lora(args) -> int:
    from neuromf.lora_pipeline import train_lora

    _train_stage2(args, train_lora, "train-lora")
    return 0


def cmd_train_conditional(args) -> int:
    from neuromf.pipelines.conditional import train_conditional

    result = _train_stage2(args, train_conditional, "train-conditional")
    print(f"generate with: neuromf generate --adapter {result.export} --mode conditional [--mask FILE]")
    return 0


def cmd_evaluate(args) -> int:
    from neuromf.eval.metrics import evaluate_generated
    from neuromf.io.nifti import Preprocessing
    from neuromf.pipelines.conditional import adapter_meta

    prep = Preprocessing.from_dict(adapter_meta(args.adapter, args.mode)["preprocessing"])
    result = evaluate_generated(Path(args.generated), args.data, prep, Path(args.out), progress=True)
    like = result["lesion_like"]
    print(f"lesion-like: {like['summary']['n_lesion_like']}/{like['summary']['n']} ({like['rate']:.0%}); per "
          "criterion: " + ", ".join(f"{k} {v:.0%}" for k, v in like["summary"]["rates"].items() if k != "all")
          + f"; median contrast {like['summary']['medians'].get('contrast')}")
    print(f"wrote {args.out}")
    return 0


def cmd_consistency(args) -> int:
    from neuromf.eval.segmenter import evaluate_consistency
    from neuromf.io.nifti import Preprocessing
    from neuromf.pipelines.conditional import adapter_meta
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out), file=True)  # before the trainings, not after them
    prep = Preprocessing.from_dict(adapter_meta(args.adapter, args.mode)["preprocessing"])
    result = evaluate_consistency(Path(args.generated), args.data, prep, seeds=args.seeds, steps=args.steps,
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


def run_ablation(config: str, base_checkpoint: str, out_dir: Path, n: int, seeds: list[int], data: str,
                 overrides: dict | None = None) -> dict:
    """P7-T7: per-channel Lp (1.5 / 2.0) vs uniform L2, same data and budget, one run per arm and seed.

    Per arm, lists over seeds (training seed = generation seed) of the mask figures: best-match Dice against the
    held-out and training masks, the lesion-like rate and the non-empty fraction. "better" compares the mean
    held-out Dice and calls a difference within one standard deviation (or under 0.01) a tie.
    """
    import numpy as np

    from neuromf.cli import _drive
    from neuromf.config import load_config
    from neuromf.eval.metrics import evaluate_generated
    from neuromf.io.nifti import Preprocessing
    from neuromf.lora_pipeline import train_lora, write_generated_pairs
    from neuromf.pipelines.conditional import adapter_meta
    from neuromf.utils import atomic_write_json

    arms = {"per_channel_lp": {"loss.p_img": 1.5, "loss.p_mask": 2.0},
            "uniform_l2": {"loss.p_img": 2.0, "loss.p_mask": 2.0}}
    figures = ("mean_dice_test", "mean_dice_train", "lesion_like_rate", "nonempty_fraction", "train_seconds")
    report: dict = {"config": config, "n_generated": n, "seeds": list(seeds), "metric": "mean_dice_test"}
    for name, loss_keys in arms.items():
        arm = report[name] = {"p_img": loss_keys["loss.p_img"], "p_mask": loss_keys["loss.p_mask"],
                              **{key: [] for key in figures}}
        for seed in seeds:
            run = out_dir / name / f"seed_{seed}"
            cfg = load_config(config, {**(overrides or {}), **loss_keys, "training.output_dir": str(run),
                                       "training.seed": seed})
            started = time.perf_counter()
            result = _drive(train_lora(cfg, base_checkpoint, overwrite=True), f"ablate {name} seed {seed}")
            arm["steps"] = result.step
            write_generated_pairs(result.export, run / "generated", n=n, seed=seed)
            prep = Preprocessing.from_dict(adapter_meta(result.export)["preprocessing"])
            metrics = evaluate_generated(run / "generated", data, prep, run / "metrics.json")
            arm["mean_dice_test"].append(metrics["dice"]["mean_best_test"] or 0.0)
            arm["mean_dice_train"].append(metrics["dice"]["mean_best_train"] or 0.0)
            arm["lesion_like_rate"].append(metrics["lesion_like"]["rate"] or 0.0)
            arm["nonempty_fraction"].append(metrics["fraction_nonempty"])
            arm["train_seconds"].append(round(time.perf_counter() - started, 1))
    a, b = (np.asarray(report[arm]["mean_dice_test"]) for arm in arms)
    spread = max(a.std(ddof=1) if len(a) > 1 else 0.0, b.std(ddof=1) if len(b) > 1 else 0.0, 0.01)
    diff = float(a.mean() - b.mean())
    report["better"] = "tie" if abs(diff) <= spread else ("per_channel_lp" if diff > 0 else "uniform_l2")
    report["note"] = ("mask Dice on held-out test masks, mean over seeds; a difference within one sd (or < 0.01) "
                      "is reported as a tie (null result)")
    atomic_write_json(out_dir / "ablation_lp.json", report)
    return report


def cmd_ablate_lp(args) -> int:
    from neuromf.cli import _overrides

    report = run_ablation(args.config, args.base_checkpoint, Path(args.out), args.n, args.seeds, args.data,
                          _overrides(args.set))
    print(json.dumps(report, indent=2))
    return 0


def cmd_verify(args) -> int:
    from neuromf.eval.report import write_verification_report
    from neuromf.lora_pipeline import check_adapter

    run_dir = Path(args.run)
    checks = check_adapter(run_dir / "adapter")
    path = write_verification_report(Path(args.stage_dir), run_dir, Path(args.report), t2_t3=checks)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    """mask-test -> train-lora (demo schedule) -> generate -> evaluate -> ablate-lp -> train-conditional ->
    generate --mode conditional -> evaluate -> verify, on the embedded data and weights."""
    from neuromf.cli import main as cli

    stage = Path(args.out) / "stage2_fcd"
    report = Path(args.out) / "phase_7" / "verification_report.md"
    run = Path(args.runs) / "lora_demo"
    cond_run, cond_stage = Path(args.runs) / "cond_demo", stage / "conditional"
    started = time.perf_counter()
    steps = [
        ["mask-test", "--data", "embedded", "--vae", "embedded", "--out", str(stage / "mask_vae_test.json")],
        ["train-lora", "--config", "demo_lora", "--base_checkpoint", "embedded", "--output-dir", str(run),
         "--overwrite", "--set", f"data.mask_test={stage / 'mask_vae_test.json'}"],
        ["generate", "--adapter", str(run / "adapter"), "--n", str(args.n), "--steps", "1", "--seed", "0",
         "--out", str(stage / "generated")],
        ["evaluate", "--adapter", str(run / "adapter"), "--generated", str(stage / "generated"), "--data", "embedded",
         "--out", str(stage / "metrics" / "metrics.json")],
    ]
    if not args.skip_ablation:
        steps.append(["ablate-lp", "--config", "demo_lora", "--base_checkpoint", "embedded", "--n", str(args.n),
                      "--out", str(stage), "--set", f"data.mask_test={stage / 'mask_vae_test.json'}",
                      "--set", f"training.max_steps={args.ablation_steps}",
                      "--seeds", *map(str, args.ablation_seeds)])
    if not args.skip_conditional:
        steps += [
            ["train-conditional", "--config", "demo_cond", "--base_checkpoint", "embedded", "--output-dir",
             str(cond_run), "--overwrite"],
            ["generate", "--adapter", str(cond_run / "adapter"), "--mode", "conditional", "--n", str(args.n),
             "--steps", "1", "--seed", "0", "--out", str(cond_stage / "generated")],
            ["evaluate", "--adapter", str(cond_run / "adapter"), "--generated", str(cond_stage / "generated"),
             "--data", "embedded", "--out", str(cond_stage / "metrics.json")],
            ["consistency", "--adapter", str(cond_run / "adapter"), "--generated", str(cond_stage / "generated"),
             "--data", "embedded", "--out", str(cond_stage / "consistency.json"), "--seeds",
             *map(str, args.ablation_seeds)],
        ]
    steps.append(["verify", "--run", str(run), "--stage-dir", str(stage), "--report", str(report)])
    for argv in steps:
        print(f"\n== neuromf {' '.join(argv)}", flush=True)
        code = cli(argv)
        if code:
            print(f"demo: step `neuromf {argv[0]}` failed with exit code {code}")
            return code
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min\n  report:    {report}\n  montages:  {report.parent / 'montages'}\n"
          f"  generated: {stage / 'generated'}\n  metrics:   {stage / 'metrics' / 'metrics.json'}\n"
          f"  adapter:   {run / 'adapter'}")
    return 0


def register(add: Callable[[str, Callable, str], argparse.ArgumentParser]) -> None:
    from neuromf.cli import _add_train_flags

    p = add("mask-test", cmd_mask_test, "P7-T1: round-trip Dice of lesion masks through the VAE vs downsampling")
    p.add_argument("--data", default="embedded", help="BIDS tree / flat folder with FCD cases, or 'embedded'")
    p.add_argument("--vae", default="embedded", help="'embedded' or a local MAISI weight file")
    p.add_argument("--vae-preset", default="maisi", choices=["maisi", "small", "tiny"],
                   help="architecture of a local VAE file")
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(STAGE_DIR / "mask_vae_test.json"))

    p = add("train-lora", cmd_train_lora, "stage 2: LoRA fine-tuning on FCD image + mask latents")
    _add_train_flags(p)
    p.add_argument("--base_checkpoint", "--base-checkpoint", dest="base_checkpoint", default="embedded",
                   help="stage-1 model folder / model.safetensors, or 'embedded'")

    p = add("train-conditional", cmd_train_conditional,
            "conditional mode: a ControlNet that turns a lesion mask into a FLAIR carrying it")
    _add_train_flags(p)
    p.add_argument("--base_checkpoint", "--base-checkpoint", dest="base_checkpoint", default="embedded",
                   help="stage-1 model folder / model.safetensors, or 'embedded'")

    p = add("evaluate", cmd_evaluate, "metrics of generated pairs against real FCD masks (P7-T6)")
    p.add_argument("--adapter", default="embedded", help="the adapter that generated the pairs (its grid)")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional"],
                   help="with --adapter embedded: which demo adapter")
    p.add_argument("--generated", default=str(STAGE_DIR / "generated"))
    p.add_argument("--data", default="embedded")
    p.add_argument("--out", default=str(STAGE_DIR / "metrics" / "metrics.json"))

    p = add("consistency", cmd_consistency,
            "image-mask consistency and downstream use of generated pairs, judged by a small MONAI segmenter")
    p.add_argument("--adapter", default="embedded", help="the adapter that generated the pairs (its grid)")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional"],
                   help="with --adapter embedded: which demo adapter")
    p.add_argument("--generated", default=str(STAGE_DIR / "generated"))
    p.add_argument("--data", default="embedded")
    p.add_argument("--out", default=str(STAGE_DIR / "metrics" / "consistency.json"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one segmenter pair per seed")
    p.add_argument("--steps", type=int, default=300, help="training steps of each segmenter")
    p.add_argument("--device", default="cpu")

    p = add("ablate-lp", cmd_ablate_lp, "P7-T7: per-channel Lp (1.5/2.0) vs uniform L2, same seed/data/budget")
    p.add_argument("--config", default="demo_lora")
    p.add_argument("--base_checkpoint", "--base-checkpoint", dest="base_checkpoint", default="embedded")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm and seed")
    p.add_argument("--data", default="embedded")
    p.add_argument("--out", default=str(STAGE_DIR))
    p.add_argument("--set", action="append", metavar="KEY=VALUE")

    p = add("verify", cmd_verify, "write the phase-7 verification report (P7-T1..T7)")
    p.add_argument("--run", default="runs/lora_demo", help="train-lora output folder")
    p.add_argument("--stage-dir", default=str(STAGE_DIR))
    p.add_argument("--report", default=str(REPORT))

    p = add("demo", cmd_demo, "the main job: the whole phase-7 pipeline on the embedded data and weights")
    p.add_argument("--out", default="experiments")
    p.add_argument("--runs", default="runs")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--ablation-steps", type=int, default=40)
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--skip-conditional", action="store_true", help="leave out the conditional mode (mask -> FLAIR)")
