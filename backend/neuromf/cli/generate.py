"""`neuromf generate`: base-model volumes, joint image + mask pairs, or FLAIRs for given lesion masks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from neuromf.cli._common import AddCommand
from neuromf.config import SAMPLERS


def cmd_generate(args) -> int:
    """`neuromf generate`: volumes from a base model (--checkpoint), or image + mask pairs from an adapter.

    A joint adapter generates both from noise; a conditional one generates a FLAIR for each --mask file (mapped onto
    the model grid) or for masks drawn from its prior.
    """
    from neuromf.generate import write_generated_images

    if bool(args.checkpoint) == bool(args.adapter):
        raise SystemExit("generate: give exactly one of --checkpoint (base model) or --adapter (LoRA joint model)")
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out))  # before loading and sampling, not at the first write
    from neuromf.models.adapter_meta import generation_mode

    requested = "joint" if args.render and args.mode == "auto" else args.mode  # --render renders joint masks
    mode = generation_mode(args.adapter, requested) if args.adapter else "base"
    if (args.mask or args.image) and mode != "conditional":
        raise SystemExit("generate: --mask/--image need a conditional adapter (--mode conditional)")
    if args.render and mode != "joint":
        raise SystemExit("generate: --render renders the masks of a joint adapter (--mode joint)")
    if args.guidance is not None and not (mode == "conditional" or args.render):
        raise SystemExit("generate: --guidance scales a conditional adapter's mask (--mode conditional, or --render)")
    if args.site and mode != "joint":
        raise SystemExit("generate: --site places a site-conditioned joint adapter's lesions (--mode joint)")
    if args.joint_guidance is not None and mode != "joint":
        raise SystemExit("generate: --joint-guidance guides a joint adapter's masks (--mode joint)")
    if mode == "conditional":
        paths = _generate_conditional(args)
    elif mode == "joint":
        from neuromf.pipelines.lora import write_generated_pairs

        with step_bar("joint pairs") as on_step:
            paths = write_generated_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed, args.device,
                                          args.sampler, args.render, args.guidance, args.joint_guidance, args.site,
                                          on_step)
    else:
        paths = write_generated_images(args.checkpoint, Path(args.out), args.n, args.steps, args.seed, args.device,
                                       args.sampler)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def _generate_conditional(args) -> list[Path]:
    """FLAIRs for `--mask` files (on each mask's own model-grid window) or for masks drawn from the prior."""
    from neuromf.io.nifti import preprocess_mask
    from neuromf.models.adapter_meta import adapter_meta
    from neuromf.pipelines.conditional import write_conditional_pairs

    masks = affines = None
    if args.mask:
        prep = adapter_meta(args.adapter, "conditional").prep
        volumes = [preprocess_mask(path, prep, args.image) for path in args.mask]
        masks, affines = [v.data[0].numpy() for v in volumes], [v.affine for v in volumes]
    with step_bar("conditional pairs") as on_step:
        return write_conditional_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed, args.device,
                                       masks, affines, args.sampler, args.guidance, on_step)


@contextlib.contextmanager
def step_bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar of network steps for `on_step(i, n)`: it restarts at each sampling pass (a joint batch, a
    rendered FLAIR, a conditional placement pass), so a long 2 mm pass shows progress step by step."""
    from tqdm import tqdm

    bar = tqdm(desc=f"{what}: network steps", unit="step", dynamic_ncols=True)
    passes = [0]

    def on_step(i: int, n: int) -> None:
        if i == 1:
            passes[0] += 1
            bar.reset(total=n)
            bar.set_postfix_str(f"pass {passes[0]}")
        bar.update(i - bar.n)

    try:
        yield on_step
    finally:
        bar.close()


def register(add: AddCommand) -> None:
    """Add the `generate` subcommand through `add`."""
    p = add("generate", cmd_generate, "sample volumes (base model) or image+mask pairs (LoRA adapter)")
    p.add_argument("--checkpoint",
                   help="base model folder, model.safetensors, 'embedded' (3 mm) or 'embedded-fine' (2 mm)")
    p.add_argument("--adapter", help="adapter folder: LoRA (joint image + mask) or ControlNet (conditional); "
                                     "'embedded' for the shipped 3 mm demo of the chosen mode, 'embedded-fine' for "
                                     "the shipped 2 mm one (conditional unless --mode joint)")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional"],
                   help="joint: image + mask from noise; conditional: a FLAIR for each given or prior-drawn mask")
    p.add_argument("--mask", nargs="+", metavar="FILE", help="conditional mode: lesion mask NIfTI file(s)")
    p.add_argument("--image", metavar="FILE",
                   help="conditional mode: the FLAIR the masks belong to (centres the model grid on its brain)")
    p.add_argument("--render", metavar="ADAPTER",
                   help="joint mode: a conditional adapter (same base model) that renders the FLAIR for each joint "
                        "mask, from the same image noise (two-stage: mask from the joint model, FLAIR from the "
                        "ControlNet)")
    p.add_argument("--guidance", type=float, default=None, metavar="S",
                   help="conditional mode and --render: mask guidance u_empty + S (u_mask - u_empty), the empty mask "
                        "as the unconditional branch (1 = none; > 1 renders the lesion more strongly, two model "
                        "calls per step); default: the adapter's own (its sidecar's 'guidance', 1 unless set)")
    p.add_argument("--joint-guidance", type=float, default=None, metavar="S",
                   help="joint mode (x-prediction adapters): the mask estimate guided against the empty mask's path "
                        "from the same noise, x_empty + S (x - x_empty) (1 = none; > 1 commits more strongly to a "
                        "lesion: for a training whose masks come out empty or as specks); default: the adapter's "
                        "own (its sidecar's 'guidance', 1 unless set)")
    p.add_argument("--site", type=float, nargs=3, action="append", metavar=("X", "Y", "Z"),
                   help="joint mode, site-conditioned adapters: put the lesion at this voxel of the model grid (the "
                        "written pairs' grid; repeat for several, used in turn); default: sites drawn from the "
                        "training lesions' sites")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1 = one-step MeanFlow)")
    p.add_argument("--sampler", default="meanflow", choices=SAMPLERS,
                   help="meanflow: k-step MeanFlow with the average velocity; euler: --steps Euler steps with the "
                        "instantaneous velocity (flow-matching baseline; for joint x-prediction adapters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="experiments/stage2_fcd/generated")
