"""Training subcommands: train-vae, train-base (stage 1), train-lora (stage 2 joint), train-conditional."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neuromf.cli._common import AddCommand, add_base_checkpoint_flag, add_train_flags, drive, load_cfg, stop_on_sigint


def cmd_train_vae(args) -> int:
    from neuromf.pipelines.vae import train_vae

    cfg = load_cfg(args)
    result = drive(train_vae(cfg, preset=args.preset, resume=args.resume, overwrite=args.overwrite,
                                     stop=stop_on_sigint()), "train-vae")
    print(f"VAE saved to {result.export or result.checkpoint}")
    return 0


def cmd_train_base(args) -> int:
    from neuromf.pipelines.stage1 import train_base

    cfg = load_cfg(args)
    result = drive(train_base(cfg, resume=args.resume, overwrite=args.overwrite, stop=stop_on_sigint()), "train-base")
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; model: {result.export}; "
          f"checkpoint: {result.checkpoint}; loss curve: {result.out_dir / 'loss_curve.png'}")
    return 0


def _train_stage2(args, train_fn: Callable, name: str) -> Any:
    """Drive a stage-2 training generator from the command line (progress bar, Ctrl-C stops and saves)."""
    cfg = load_cfg(args)
    result = drive(train_fn(cfg, args.base_checkpoint, resume=args.resume, overwrite=args.overwrite,
                             stop=stop_on_sigint()), name)
    print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; adapter: {result.export}; "
          f"resume with --resume; loss curve: {result.out_dir / 'loss_curve.png'}")
    return result


def cmd_train_lora(args) -> int:
    from neuromf.pipelines.lora import train_lora

    _train_stage2(args, train_lora, "train-lora")
    return 0


def cmd_train_conditional(args) -> int:
    from neuromf.pipelines.conditional import train_conditional

    result = _train_stage2(args, train_conditional, "train-conditional")
    print(f"generate with: neuromf generate --adapter {result.export} --mode conditional [--mask FILE]")
    return 0


def register(add: AddCommand) -> None:
    p = add("train-vae", cmd_train_vae, "train a MAISI-class VAE on patches of the scans of a data set")
    add_train_flags(p)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "maisi"])

    p = add("train-base", cmd_train_base, "stage 1: train the MeanFlow UNet on latents of healthy scans")
    add_train_flags(p)

    p = add("train-lora", cmd_train_lora, "stage 2: LoRA fine-tuning on FCD image + mask latents")
    add_train_flags(p)
    add_base_checkpoint_flag(p)

    p = add("train-conditional", cmd_train_conditional,
            "conditional mode: a ControlNet that turns a lesion mask into a FLAIR carrying it")
    add_train_flags(p)
    add_base_checkpoint_flag(p)
