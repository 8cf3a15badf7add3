"""`neuromf demo`: the whole pipeline on the embedded data and weights, one subcommand after another."""

from __future__ import annotations

import time
from pathlib import Path

from neuromf.cli._common import COUNT, SEED, STEPS, AddCommand


def cmd_demo(args) -> int:
    """mask-test -> train-joint (demo schedule) -> generate -> evaluate -> ablate-lp -> train-conditional ->
    generate --mode conditional -> evaluate -> verify, on the embedded data and weights."""
    cli = args.run_subcommand
    stage = Path(args.out) / "stage2"
    report = Path(args.out) / "report" / "verification_report.md"
    run = Path(args.runs) / "lora_demo"
    cond_run, cond_stage = Path(args.runs) / "cond_demo", stage / "conditional"
    started = time.perf_counter()
    steps = [
        ["mask-test", "--data", "embedded", "--vae", "embedded", "--out", str(stage / "mask_vae_test.json")],
        ["train-joint", "--config", "joint_3mm", "--base_checkpoint", "embedded", "--output-dir", str(run),
         "--overwrite", "--set", f"data.mask_test={stage / 'mask_vae_test.json'}"],
        ["generate", "--adapter", str(run / "adapter"), "--n", str(args.n), "--steps", "1", "--seed", "0",
         "--out", str(stage / "generated")],
        ["evaluate", "--adapter", str(run / "adapter"), "--generated", str(stage / "generated"), "--data", "embedded",
         "--out", str(stage / "metrics" / "metrics.json")],
    ]
    if not args.skip_ablation:
        steps.append(["ablate-lp", "--config", "joint_3mm", "--base_checkpoint", "embedded", "--n", str(args.n),
                      "--out", str(stage), "--set", f"data.mask_test={stage / 'mask_vae_test.json'}",
                      "--set", f"training.max_steps={args.ablation_steps}",
                      "--seeds", *map(str, args.ablation_seeds)])
    if not args.skip_conditional:
        steps += [
            ["train-conditional", "--config", "conditional_3mm", "--base_checkpoint", "embedded", "--output-dir",
             str(cond_run), "--overwrite"],
            ["generate", "--adapter", str(cond_run / "adapter"), "--mode", "conditional", "--n", str(args.n),
             "--steps", "1", "--seed", "0", "--out", str(cond_stage / "generated")],
            ["evaluate", "--adapter", str(cond_run / "adapter"), "--generated", str(cond_stage / "generated"),
             "--data", "embedded", "--out", str(cond_stage / "metrics.json"), "--empty-mask-control"],
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


def register(add: AddCommand) -> None:
    """Add the `demo` subcommand through `add`."""
    p = add("demo", cmd_demo, "the main job: the whole pipeline on the embedded data and weights")
    p.add_argument("--out", default="runs")
    p.add_argument("--runs", default="runs")
    p.add_argument("--n", type=COUNT, default=8)
    p.add_argument("--ablation-steps", type=STEPS, default=40)
    p.add_argument("--ablation-seeds", type=SEED, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-ablation", action="store_true")
    p.add_argument("--skip-conditional", action="store_true", help="leave out the conditional mode (mask -> FLAIR)")
