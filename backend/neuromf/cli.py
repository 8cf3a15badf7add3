"""`neuromf <subcommand>`: the headless front end. Each subcommand is a thin call into the backend."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings
from collections.abc import Callable, Generator
from pathlib import Path
from threading import Event

import yaml


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. training.lr=1e-4), got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _drive(events: Generator, desc: str):
    """Run a training generator with a tqdm bar; returns its TrainResult."""
    from tqdm.auto import tqdm

    from neuromf.train import run_to_end

    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)

    def on_event(event) -> None:
        if bar.total != event.total_steps:
            bar.total = event.total_steps
        bar.n = event.step
        if event.kind == "step":
            # the adaptive-weighted loss is ~1 by construction; the unweighted Lp is the one that falls
            bar.set_postfix(lp=f"{event.parts.get('raw', float('nan')):.4g}", loss=f"{event.loss:.4g}",
                            lr=f"{event.lr:.2g}", refresh=False)
        elif event.kind in ("skipped", "stopped"):
            tqdm.write(event.message)
        elif event.kind == "epoch":
            bar.set_postfix(epoch=event.epoch, lp=f"{event.parts.get('raw', float('nan')):.4g}",
                            loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()

    try:
        return run_to_end(events, on_event)
    finally:
        bar.close()


def _stop_on_sigint() -> Event:
    """First Ctrl-C asks the loop to stop after the current step (it saves a checkpoint); a second one aborts."""
    stop = Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step (Ctrl-C again to abort without saving)...", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    return stop


def _load_cfg(args):
    from neuromf.config import load_config

    overrides = _overrides(args.set)
    if getattr(args, "output_dir", None):
        overrides["training.output_dir"] = str(args.output_dir)
    if getattr(args, "device", None):
        overrides["training.device"] = args.device
    cfg = load_config(args.config, overrides)
    if cfg.training.num_threads:
        import torch

        torch.set_num_threads(cfg.training.num_threads)
    return cfg


def cmd_make_phantoms(args) -> int:
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset

    cfg = PhantomConfig(shape=tuple(args.shape), spacing=tuple(args.spacing))
    out = make_phantom_dataset(args.out, args.n_healthy, args.n_fcd, seed=args.seed, cfg=cfg, progress=True)
    print(f"wrote {args.n_healthy} healthy + {args.n_fcd} FCD phantom subjects to {out}")
    return 0


def cmd_check_data(args) -> int:
    from neuromf.data.latents import resolve_data_dir
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


def cmd_train_vae(args) -> int:
    from neuromf.train.vae_trainer import train_vae

    cfg = _load_cfg(args)
    result = _drive(train_vae(cfg, preset=args.preset, resume=args.resume, overwrite=args.overwrite,
                                     stop=_stop_on_sigint()), "train-vae")
    print(f"VAE saved to {result.export or result.checkpoint}")
    return 0


def cmd_train_base(args) -> int:
    from neuromf.train.stage1 import train_base

    cfg = _load_cfg(args)
    result = _drive(train_base(cfg, resume=args.resume, overwrite=args.overwrite, stop=_stop_on_sigint()), "train-base")
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; model: {result.export}; "
          f"checkpoint: {result.checkpoint}; loss curve: {result.out_dir / 'loss_curve.png'}")
    return 0


def cmd_generate(args) -> int:
    from neuromf.generate import write_generated_images

    if bool(args.checkpoint) == bool(args.adapter):
        raise SystemExit("generate: give exactly one of --checkpoint (base model) or --adapter (LoRA joint model)")
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out))  # before loading and sampling, not at the first write
    from neuromf.pipelines.conditional import generation_mode

    mode = generation_mode(args.adapter, args.mode) if args.adapter else "base"
    if (args.mask or args.image) and mode != "conditional":
        raise SystemExit("generate: --mask/--image need a conditional adapter (--mode conditional)")
    if mode == "conditional":
        paths = _generate_conditional(args)
    elif mode == "joint":
        from neuromf.lora_pipeline import write_generated_pairs

        paths = write_generated_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed, args.device)
    else:
        paths = write_generated_images(args.checkpoint, Path(args.out), args.n, args.steps, args.seed, args.device)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def _generate_conditional(args) -> list[Path]:
    """FLAIRs for `--mask` files (on each mask's own model-grid window) or for masks drawn from the prior."""
    from neuromf.io.nifti import Preprocessing, preprocess_mask
    from neuromf.pipelines.conditional import adapter_meta, write_conditional_pairs

    masks = affines = None
    if args.mask:
        prep = Preprocessing.from_dict(adapter_meta(args.adapter, "conditional")["preprocessing"])
        volumes = [preprocess_mask(path, prep, args.image) for path in args.mask]
        masks, affines = [v.data[0].numpy() for v in volumes], [v.affine for v in volumes]
    return write_conditional_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed, args.device,
                                   masks, affines)


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file, or a packaged config name")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in the output folder")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", help="overrides training.output_dir")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides training.device)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. training.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuromf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    commands: dict[str, Callable] = {}

    def add(name: str, func: Callable, help_text: str) -> argparse.ArgumentParser:
        commands[name] = func
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("make-phantoms", cmd_make_phantoms, "write a synthetic FCD phantom data set (BIDS, like ds004199)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-healthy", type=int, default=40)
    p.add_argument("--n-fcd", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0])

    p = add("check-data", cmd_check_data, "list the cases of a BIDS tree or flat folder and their problems")
    p.add_argument("data", help="data folder, or 'embedded'")

    p = add("train-vae", cmd_train_vae, "train a MAISI-class VAE on patches of the scans of a data set")
    _add_train_flags(p)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "maisi"])

    p = add("train-base", cmd_train_base, "stage 1: train the MeanFlow UNet on latents of healthy scans")
    _add_train_flags(p)

    p = add("generate", cmd_generate, "sample volumes (base model) or image+mask pairs (LoRA adapter)")
    p.add_argument("--checkpoint", help="base model folder, model.safetensors, or 'embedded'")
    p.add_argument("--adapter", help="adapter folder: LoRA (joint image + mask) or ControlNet (conditional); "
                                     "'embedded' for the shipped demo of the chosen mode")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional"],
                   help="joint: image + mask from noise; conditional: a FLAIR for each given or prior-drawn mask")
    p.add_argument("--mask", nargs="+", metavar="FILE", help="conditional mode: lesion mask NIfTI file(s)")
    p.add_argument("--image", metavar="FILE",
                   help="conditional mode: the FLAIR the masks belong to (centres the model grid on its brain)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="experiments/stage2_fcd/generated")

    try:
        from neuromf.phase7_cli import register

        register(add)
    except ImportError as err:  # phase-7 commands ship in their own module
        if "phase7_cli" not in str(err):
            raise
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from neuromf.config import ConfigError
    from neuromf.io.nifti import VolumeError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, VolumeError, ValueError, OSError) as err:  # OSError: unreadable input, full disk, ...
        print(f"neuromf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neuromf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
