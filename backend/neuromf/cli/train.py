"""Training subcommands: train-vae, train-base (stage 1), train-lora (stage 2 joint), train-conditional.

Each runs in one process, or in several under `torchrun --nproc_per_node N -m neuromf train-...` (multi-node:
torchrun's rendezvous flags); `--nproc N` launches torchrun for one machine. Rank 0 prepares the output folder,
shows progress and writes every file; the other ranks only compute (see `neuromf.train.distributed`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from neuromf.cli._common import (
    AddCommand,
    add_base_checkpoint_flag,
    add_train_flags,
    drive,
    expected_time,
    load_cfg,
    stop_on_sigint,
)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line that reruns `neuromf <argv>` (without --nproc) in `nproc` local processes."""
    from neuromf.train.distributed import torchrun_prefix

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return [*torchrun_prefix(nproc), "-m", "neuromf", *rest]


def _relaunch(args) -> int | None:
    """With --nproc N > 1 outside torchrun: run the same command under torchrun and return its exit status."""
    if not args.nproc or args.nproc <= 1 or "LOCAL_RANK" in os.environ:
        return None
    argv = sys.argv[1:]
    if args.command not in argv:
        raise ValueError("--nproc works from the command line only; call torchrun --nproc_per_node N -m neuromf ...")
    command = torchrun_command(args.nproc, argv)
    print("launching: " + " ".join(command[2:]), file=sys.stderr)
    return subprocess.call(command)


def _run(args, train_fn: Callable, name: str, *positional: Any, **keywords: Any) -> Any:
    """Drive a training generator: progress bar and Ctrl-C (stop and save) on rank 0, plain iteration elsewhere."""
    from neuromf.train import distributed as dist
    from neuromf.train import run_to_end

    cfg = load_cfg(args)
    try:
        dist.init(cfg.training.device, cfg.training.dist_timeout_s)
        main = dist.is_main()
        stop = stop_on_sigint() if dist.env_world_size() <= 1 else dist.stop_on_signals()
        expected, pace = _timing(args, cfg) if main and dist.env_world_size() <= 1 else (None, None)
        events = train_fn(cfg, *positional, resume=args.resume, overwrite=args.overwrite, stop=stop,
                          progress=main, **keywords)
        if not main:
            return run_to_end(events)
        result = drive(events, name, pace and pace[0], expected)
        if pace is not None and not result.stopped:
            pace[0].record("training", pace[1])
        return result
    except Exception as err:
        dist.report_failure(err)
        raise
    finally:
        dist.cleanup()


def _timing(args, cfg) -> tuple[str | None, tuple[Any, float] | None]:
    """A one-process CPU run of a packaged config with a measured rate: its expected time (a fresh run; `drive` says
    it at the run's first event, once its config and data are accepted), and a `PaceClock` with the rate's seconds
    per step, so the finished run records this machine's pace for later estimates (`neuromf.estimates`); Nones
    otherwise."""
    from neuromf.estimates import PaceClock, current_load, runs_on_cpu, training_step_seconds
    from neuromf.pipelines.estimates import training_run_estimate

    if not runs_on_cpu(cfg.training.device):
        return None, None
    expected = None if args.resume else expected_time(lambda: training_run_estimate(args.config, cfg),
                                                      cfg.training.device)
    per_step = training_step_seconds(args.config, cfg.training.batch_size)
    return expected, None if per_step is None else (PaceClock(current_load()), per_step)


def cmd_train_vae(args) -> int:
    """`neuromf train-vae`: a MAISI-class VAE on patches of a data set's scans."""
    from neuromf.pipelines.vae import train_vae

    if (code := _relaunch(args)) is not None:
        return code
    result = _run(args, train_vae, "train-vae", preset=args.preset)
    if _is_main():
        print(f"VAE saved to {result.export or result.checkpoint}")
    return 0


def cmd_train_base(args) -> int:
    """`neuromf train-base`: stage 1, the MeanFlow UNet on latents of healthy scans."""
    from neuromf.pipelines.stage1 import train_base

    if (code := _relaunch(args)) is not None:
        return code
    result = _run(args, train_base, "train-base")
    if _is_main():
        print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; model: {result.export}; "
              f"checkpoint: {result.checkpoint}; loss curve: {result.out_dir / 'loss_curve.png'}")
    return 0


def _train_stage2(args, train_fn: Callable, name: str) -> Any:
    """Drive a stage-2 training generator from the command line (progress bar, Ctrl-C stops and saves)."""
    result = _run(args, train_fn, name, args.base_checkpoint)
    if _is_main():
        print(f"{'stopped' if result.stopped else 'finished'} at step {result.step}; adapter: {result.export}; "
              f"resume with --resume; loss curve: {result.out_dir / 'loss_curve.png'}")
    return result


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def cmd_train_joint(args) -> int:
    """`neuromf train-joint` (deprecated alias `train-lora`): stage 2, joint mode (LoRA + widened convs on image +
    mask latents)."""
    from neuromf.pipelines.joint import train_joint

    if args.command == "train-lora" and _is_main():
        print("neuromf: `train-lora` is deprecated, use `train-joint`", file=sys.stderr)
    if (code := _relaunch(args)) is not None:
        return code
    _train_stage2(args, train_joint, args.command)
    return 0


def cmd_train_conditional(args) -> int:
    """`neuromf train-conditional`: stage 2, conditional mode (a ControlNet: mask -> FLAIR)."""
    from neuromf.pipelines.conditional import train_conditional

    if (code := _relaunch(args)) is not None:
        return code
    result = _train_stage2(args, train_conditional, "train-conditional")
    if _is_main():
        print(f"generate with: neuromf generate --adapter {result.export} --mode conditional [--mask FILE]")
    return 0


def _add_nproc_flag(p) -> None:
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine (one per GPU; gloo on CPU) by relaunching under "
                        "torchrun; for several machines call torchrun yourself (see docs/cli.md)")


def register(add: AddCommand) -> None:
    """Add the training subcommands to the parser."""
    p = add("train-vae", cmd_train_vae, "train a MAISI-class VAE on patches of the scans of a data set")
    add_train_flags(p)
    _add_nproc_flag(p)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "maisi"])

    p = add("train-base", cmd_train_base, "stage 1: train the MeanFlow UNet on latents of healthy scans")
    add_train_flags(p)
    _add_nproc_flag(p)

    for name, what in (("train-joint", "stage 2, joint mode: LoRA fine-tuning on FCD image + mask latents"),
                       ("train-lora", "deprecated name of train-joint")):
        p = add(name, cmd_train_joint, what)
        add_train_flags(p)
        _add_nproc_flag(p)
        add_base_checkpoint_flag(p)

    p = add("train-conditional", cmd_train_conditional,
            "conditional mode: a ControlNet that turns a lesion mask into a FLAIR carrying it")
    add_train_flags(p)
    _add_nproc_flag(p)
    add_base_checkpoint_flag(p)
