"""`neuromf demo`: the whole pipeline on the embedded data and weights, one subcommand after another.

The default (2 mm) demo runs the path that makes lesion pairs, within minutes on a CPU, on FCD cases the shipped
models never saw (16 new 2 mm phantoms, seed 1): the mask test on them; a learning leg, a fresh small LoRA (attention
q, k, v and the widened convolutions, under 1% of the parameters) trained on their training split, which the
learning checks (LoRA forward, trainable share, loss decrease) judge; pairs from the shipped 2 mm joint adapter in
its own settings (Euler steps, joint guidance, FLAIRs rendered by the shipped 2 mm conditional adapter), which the
lesion checks judge against the 85 lesions of the 2 mm set. A few minutes of training cannot make a lesion
generator at 2 mm (the shipped one took hours), and the shipped adapter has converged on cases like these (its loss
does not fall any more), so each check judges the adapter that can answer it; the report names it. It does not
retrain the VAE, the base model or the shipped adapters (`scripts/pretrain_fine.sh` does, in hours).
`--grid 3mm` runs the 3 mm pipeline of earlier releases (a joint training from scratch and the conditional mode,
whose joint pairs are not lesion-like).
"""

from __future__ import annotations

import time
from pathlib import Path

from neuromf.cli._common import COUNT, SEED, STEPS, AddCommand, number
from neuromf.data.embedded import GeneratedPhantoms

# the demo's learning leg: the shipped joint adapter's recipe (joint_2mm) from scratch on the base model, with LoRA
# on the attention projections only (with the widened convs under 1% of the parameters, the report's
# trainable-share limit; the recipe's ResBlock LoRA is 12.9%), on the unmirrored training cases (their latents are
# the mask test's, read from the cache). Its loss is judged on a fixed draw of every training case twice (24
# samples): 8 samples can hold no MeanFlow pair with r != t, which carry most of the loss (docs/demo.md)
LEARNING_LEG = ["lora.target_modules=[to_q, to_k, to_v]", "data.flip=false", "training.batch_size=4",
                "training.warmup_steps=3", "training.checkpoint_every=0", "training.eval_samples=24"]
# peak learning rate of the leg: at the recipe's 1e-3 the 12 cases' batches of 4 (heavy-tailed MeanFlow losses)
# raised every part of the loss after the first epoch; at 3e-4 every part fell (docs/demo.md)
LEARNING_LR = 3.0e-4
FULL_RECIPE = "scripts/pretrain_fine.sh joint (neuromf train-joint --config joint_2mm --base_checkpoint embedded)"
SHIPPED_JOINT = "embedded"  # the adapter whose pairs the lesion checks judge
# the cases the 2 mm demo trains and tests on: new phantoms of the 2 mm set's generator (another seed: subjects the
# shipped adapters never saw; 12 in the train split), made once into $NEUROMF_DATA
DEMO_PHANTOMS = GeneratedPhantoms(n_healthy=0, n_fcd=16, seed=1)


def demo_steps(args) -> list[list[str]]:
    """The subcommands the demo runs, in order (each a `neuromf` argv)."""
    return steps_2mm(args) if args.grid == "2mm" else steps_3mm(args)


def steps_2mm(args) -> list[list[str]]:
    """mask-test -> train-joint (the learning leg on `args.data`) -> generate (the shipped joint adapter, its own
    settings) -> evaluate (against the 2 mm set's real lesions) -> [ablate-lp] -> verify."""
    stage, run = Path(args.out) / "stage2", Path(args.runs) / "lora_demo"
    mask_test = stage / "mask_vae_test.json"
    steps = [
        ["mask-test", "--data", str(args.data), "--vae", "embedded", "--out", str(mask_test)],
        ["train-joint", "--config", "joint_2mm", "--base_checkpoint", "embedded", "--output-dir", str(run),
         "--overwrite", "--set", f"data.data_dir={args.data}", "--set", f"data.mask_test={mask_test}",
         "--set", f"training.max_steps={args.steps}", "--set", f"training.lr={args.lr}",
         *[flag for item in LEARNING_LEG for flag in ("--set", item)]],
        ["generate", "--adapter", SHIPPED_JOINT, "--n", str(args.n), "--seed", "0", "--overwrite",
         "--out", str(stage / "generated")],
        ["evaluate", "--adapter", SHIPPED_JOINT, "--mode", "joint", "--generated", str(stage / "generated"),
         "--data", "embedded", "--out", str(stage / "metrics" / "metrics.json")],
    ]
    if args.ablation:
        steps.append(["ablate-lp", "--config", "joint_2mm", "--base_checkpoint", "embedded", "--n", str(args.n),
                      "--out", str(stage), "--set", f"data.mask_test={mask_test}",
                      "--set", f"training.max_steps={args.ablation_steps}", "--seeds", *map(str, args.ablation_seeds)])
    return [*steps, ["verify", "--run", str(run), "--stage-dir", str(stage), "--report", str(report_path(args))]]


def steps_3mm(args) -> list[list[str]]:
    """The 3 mm pipeline of earlier releases: mask-test -> train-joint (from scratch) -> generate -> evaluate ->
    [ablate-lp] -> [train-conditional -> generate -> evaluate -> consistency] -> verify."""
    stage, run = Path(args.out) / "stage2", Path(args.runs) / "lora_demo"
    cond_run, cond_stage = Path(args.runs) / "cond_demo", stage / "conditional"
    mask_test = stage / "mask_vae_test.json"
    steps = [
        ["mask-test", "--data", "embedded-3mm", "--vae", "embedded-3mm", "--out", str(mask_test)],
        ["train-joint", "--config", "joint_3mm", "--base_checkpoint", "embedded-3mm", "--output-dir", str(run),
         "--overwrite", "--set", f"data.mask_test={mask_test}"],
        ["generate", "--adapter", str(run / "adapter"), "--n", str(args.n), "--steps", "1", "--seed", "0",
         "--overwrite", "--out", str(stage / "generated")],
        ["evaluate", "--adapter", str(run / "adapter"), "--generated", str(stage / "generated"), "--data",
         "embedded-3mm", "--out", str(stage / "metrics" / "metrics.json")],
    ]
    if not args.skip_ablation:
        steps.append(["ablate-lp", "--config", "joint_3mm", "--base_checkpoint", "embedded-3mm", "--n", str(args.n),
                      "--out", str(stage), "--set", f"data.mask_test={mask_test}",
                      "--set", f"training.max_steps={args.ablation_steps}", "--seeds", *map(str, args.ablation_seeds)])
    if not args.skip_conditional:
        steps += [
            ["train-conditional", "--config", "conditional_3mm", "--base_checkpoint", "embedded-3mm", "--output-dir",
             str(cond_run), "--overwrite"],
            ["generate", "--adapter", str(cond_run / "adapter"), "--mode", "conditional", "--n", str(args.n),
             "--steps", "1", "--seed", "0", "--overwrite", "--out", str(cond_stage / "generated")],
            ["evaluate", "--adapter", str(cond_run / "adapter"), "--generated", str(cond_stage / "generated"),
             "--data", "embedded-3mm", "--out", str(cond_stage / "metrics.json"), "--empty-mask-control"],
            ["consistency", "--adapter", str(cond_run / "adapter"), "--generated", str(cond_stage / "generated"),
             "--data", "embedded-3mm", "--out", str(cond_stage / "consistency.json"), "--seeds",
             *map(str, args.ablation_seeds)],
        ]
    return [*steps, ["verify", "--run", str(run), "--stage-dir", str(stage), "--report", str(report_path(args))]]


def report_path(args) -> Path:
    """Where `verify` writes the verification report."""
    return Path(args.out) / "report" / "verification_report.md"


def cmd_demo(args) -> int:
    """Run `demo_steps` one after another, timing each; stop at the first that fails."""
    cli = args.run_subcommand
    if args.grid == "3mm" and args.steps is not None:
        raise SystemExit("demo: --steps sets the 2 mm learning leg (the 3 mm demo trains joint_3mm's schedule)")
    if args.grid == "3mm" and args.ablation:
        raise SystemExit("demo: the 3 mm demo runs the ablation unless --skip-ablation")
    args.steps = args.steps or 18
    args.n = args.n or (6 if args.grid == "2mm" else 8)
    if args.grid == "2mm":
        from neuromf.data.embedded import generated_phantoms

        args.data = generated_phantoms(DEMO_PHANTOMS)
        print(f"demo (2 mm): on {DEMO_PHANTOMS.n_fcd} FCD cases the shipped models never saw ({args.data}): the mask "
              f"test; a fresh small LoRA (attention and widened convolutions, under 1% of the parameters) trained "
              f"{args.steps} steps on their training split, judged by the learning checks; {args.n} pairs from the "
              "shipped 2 mm joint adapter in its own settings, judged against the 2 mm set's 85 real lesions. It "
              f"retrains no shipped model; the full recipe of the shipped joint adapter: {FULL_RECIPE}.", flush=True)
    started, timings = time.perf_counter(), []
    for argv in demo_steps(args):
        print(f"\n== neuromf {' '.join(argv)}", flush=True)
        begun = time.perf_counter()
        code = cli(argv)
        timings.append((argv[0], time.perf_counter() - begun))
        print(f"== {argv[0]}: {timings[-1][1] / 60:.1f} min", flush=True)
        if code:
            print(f"demo: step `neuromf {argv[0]}` failed with exit code {code}")
            return code
    stage, run = Path(args.out) / "stage2", Path(args.runs) / "lora_demo"
    minutes = (time.perf_counter() - started) / 60
    print(f"\ndemo finished in {minutes:.1f} min ({', '.join(f'{name} {s / 60:.1f}' for name, s in timings)})\n"
          f"  report:    {report_path(args)}\n  montages:  {report_path(args).parent / 'montages'}\n"
          f"  generated: {stage / 'generated'}\n  metrics:   {stage / 'metrics' / 'metrics.json'}\n"
          f"  adapter:   {run / 'adapter'}")
    return 0


def register(add: AddCommand) -> None:
    """Add the `demo` subcommand through `add`."""
    p = add("demo", cmd_demo, "the main job: the whole pipeline on the embedded data and weights")
    p.add_argument("--grid", default="2mm", choices=["2mm", "3mm"],
                   help="2mm: train a small LoRA briefly on new cases (learning checks), generate lesion pairs with "
                        "the shipped adapter and check them; 3mm: the earlier 3 mm pipeline (joint training from "
                        "scratch, conditional mode)")
    p.add_argument("--out", default="runs")
    p.add_argument("--runs", default="runs")
    p.add_argument("--n", type=COUNT, default=None,
                   help="pairs to generate (default: 6 at 2 mm, about 25 s each on 2 CPU cores; 8 at 3 mm)")
    p.add_argument("--steps", type=STEPS, default=None,
                   help="2 mm: steps of the learning leg (default 18: six epochs of the 12 new training cases at "
                        "batch 4)")
    p.add_argument("--lr", type=number(0.0, 1.0, low_open=True), default=LEARNING_LR,
                   help="2 mm: peak learning rate of the learning leg (cosine down to a tenth; the recipe's 1e-3 "
                        "makes the loss rise after the first epoch on these 12 cases)")
    p.add_argument("--ablation", action="store_true",
                   help="2 mm: also run the per-channel Lp ablation (informational: 2 x 3 trainings from scratch, "
                        "tens of minutes on a CPU)")
    p.add_argument("--ablation-steps", type=STEPS, default=40)
    p.add_argument("--ablation-seeds", type=SEED, nargs="+", default=[0, 1, 2])
    p.add_argument("--skip-ablation", action="store_true", help="3 mm: leave out the per-channel Lp ablation")
    p.add_argument("--skip-conditional", action="store_true",
                   help="3 mm: leave out the conditional mode (mask -> FLAIR)")
