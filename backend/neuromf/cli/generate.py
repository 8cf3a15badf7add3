"""`neuromf generate`: base-model volumes, joint image + mask pairs, or FLAIRs for given lesion masks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuromf.cli._common import COUNT, SCALE, SEED, STEPS, AddCommand, expected_time, number, say_once
from neuromf.config import SAMPLERS


def cmd_generate(args) -> int:
    """`neuromf generate`: volumes from a base model (--checkpoint), or image + mask pairs from an adapter.

    A joint adapter generates both from noise; a conditional one generates a FLAIR for each --mask file (mapped onto
    the model grid) or for masks drawn from its prior.
    """
    from neuromf.generation.images import write_generated_images

    if args.mode == "inpaint":
        args.steps, args.sampler = args.steps or 8, args.sampler or "meanflow"
        return _generate_inpainted(args)
    if args.margin_mm is not None or args.mask_source != "prior":
        raise SystemExit("generate: --margin-mm and --mask-source are for --mode inpaint")
    if args.checkpoint and args.adapter:
        raise SystemExit("generate: give one of --checkpoint (base model) or --adapter (joint / conditional adapter)")
    if args.render and args.no_render:
        raise SystemExit("generate: give --render or --no-render, not both")
    if not args.checkpoint:
        args.adapter = args.adapter or "embedded"  # the shipped 2 mm adapters: lesion pairs with their own settings
    from neuromf.utils import ensure_writable

    ensure_writable(Path(args.out))  # before loading and sampling, not at the first write
    from neuromf.models.adapter_meta import generation_mode

    requested = "joint" if args.render and args.mode == "auto" else args.mode  # --render renders joint masks
    mode = generation_mode(args.adapter, requested) if args.adapter else "base"
    if (args.mask or args.image) and mode != "conditional":
        raise SystemExit("generate: --mask/--image need a conditional adapter (--mode conditional)")
    if args.render and mode != "joint":
        raise SystemExit("generate: --render renders the masks of a joint adapter (--mode joint)")
    _fill_sampling(args, mode)
    if args.guidance is not None and not (mode == "conditional" or args.render):
        raise SystemExit("generate: --guidance scales a conditional adapter's mask (--mode conditional, or --render)")
    if args.site and mode != "joint":
        raise SystemExit("generate: --site places a site-conditioned joint adapter's lesions (--mode joint)")
    if args.joint_guidance is not None and mode != "joint":
        raise SystemExit("generate: --joint-guidance guides a joint adapter's masks (--mode joint)")
    if args.mask_draws is not None and mode != "joint":
        raise SystemExit("generate: --mask-draws re-draws a joint adapter's small masks (--mode joint)")
    expected = pace = None
    if mode != "base":
        from neuromf.generation.estimates import generation_run_estimate

        pairs = len(args.mask) if args.mask else args.n
        expected = expected_time(lambda: generation_run_estimate(args.adapter, mode, pairs, args.steps, args.render,
                                                                 args.guidance, prior_lesions=not args.mask),
                                 args.device)
        pace = RunPace.of(args, mode, pairs)
    from neuromf.train.run_dir import output_folder

    with output_folder(Path(args.out), _run_identity(args, mode), overwrite=args.overwrite) as record:
        if mode == "conditional":
            paths = _generate_conditional(args, expected, pace)
        elif mode == "joint":
            from neuromf.generation.joint import MASK_DRAWS, write_generated_pairs

            with step_bar("joint pairs", expected, pace) as on_step:
                paths = write_generated_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed,
                                              args.device, args.sampler, args.render, args.guidance,
                                              args.joint_guidance, args.site, on_step, texture=args.texture,
                                              mask_draws=args.mask_draws or MASK_DRAWS)
        else:
            paths = write_generated_images(args.checkpoint, Path(args.out), args.n, args.steps, args.seed,
                                           args.device, args.sampler)
        record(paths)
    if pace is not None:
        pace.finished()
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


@dataclass
class RunPace:
    """This machine's pace in a `generate` run, recorded as the Generate dock records its own
    (`neuromf.estimates.record_pace`): timed from the first network step to the last pair written, against the run's
    work in the rates' seconds over that span (`GenerationWork.after_first_step_s`). Only a run that made the
    passes planned records (a re-drawn mask is work the plan did not count), and none that shared the machine."""

    clock: Any  # neuromf.estimates.PaceClock
    work_s: float
    passes_planned: int
    passes: int = 0

    @classmethod
    def of(cls, args, mode: str, pairs: int) -> RunPace | None:
        """For a CPU run on the rates' grid with a rate; None otherwise."""
        from neuromf.estimates import PaceClock, current_load
        from neuromf.generation.estimates import generation_run_work, pace_recordable

        if not pace_recordable(args.adapter, mode, args.device):
            return None
        work = generation_run_work(args.adapter, mode, pairs, args.steps, args.render, args.guidance,
                                   prior_lesions=not args.mask)
        return None if work is None else cls(PaceClock(current_load()), work.after_first_step_s, work.passes)

    def step(self, i: int) -> None:
        """Network step `i` of a pass (1 starts one), between two network calls."""
        now = time.perf_counter()
        self.passes += i == 1
        if self.clock.first is None:
            self.clock.mark(now, 0.0)
        else:
            self.clock.sample_load(now)

    def finished(self) -> float | None:
        """The run's pairs are written: record its pace; the ratio recorded, or None."""
        if self.passes != self.passes_planned:
            return None
        self.clock.mark(time.perf_counter(), self.work_s)
        return self.clock.record("generation", 1.0)


def _fill_sampling(args, mode: str) -> None:
    """The sampler, steps and renderer left unset: the adapter's own (its sidecar's `sampling`: Euler 32 steps
    rendered by the conditional adapter for the shipped 2 mm joint one), else one MeanFlow step, no rendering."""
    if mode == "base":
        args.sampler, args.steps = args.sampler or "meanflow", args.steps or 1
        return
    from neuromf.models.adapter_meta import OWN, adapter_meta

    render = None if args.no_render or mode != "joint" else (args.render or OWN)
    args.sampler, args.steps, args.render = adapter_meta(args.adapter, mode).sampling_settings(
        args.sampler, args.steps, render)


def _run_identity(args, mode: str) -> dict:
    """What makes two `generate` calls the same run (the same files, re-written): model, mode and sampling settings;
    another seed, model or setting is another run, whose files must not mix with these in one folder."""
    from neuromf.weights import EMBEDDED_NAMES

    def where(spec: str | None) -> str | None:
        return spec if spec is None or spec in EMBEDDED_NAMES else str(Path(spec).resolve())

    return {"command": "generate", "mode": mode, "checkpoint": where(args.checkpoint), "adapter": where(args.adapter),
            "render": where(args.render), "seed": args.seed, "steps": args.steps, "sampler": args.sampler,
            "guidance": args.guidance, "joint_guidance": args.joint_guidance, "site": args.site,
            **({"mask_draws": args.mask_draws} if args.mask_draws else {}),
            "mask": [where(m) for m in args.mask or []], "image": where(args.image), "margin_mm": args.margin_mm,
            "texture": args.texture,
            **({"mask_source": "joint", "joint_adapter": where(args.joint_adapter), "joint_steps": args.joint_steps}
               if args.mask_source == "joint" else {})}


def _generate_conditional(args, expected: str | None = None, pace: RunPace | None = None) -> list[Path]:
    """FLAIRs for `--mask` files (on each mask's own model-grid window) or for masks drawn from the prior;
    `expected`: the run's expected time, said at its first network step; `pace` follows the steps."""
    from neuromf.generation.conditional import write_conditional_pairs
    from neuromf.io.nifti import preprocess_mask
    from neuromf.models.adapter_meta import adapter_meta

    masks = affines = None
    if args.mask:
        prep = adapter_meta(args.adapter, "conditional").prep
        volumes = [preprocess_mask(path, prep, args.image) for path in args.mask]
        masks, affines = [v.data[0].numpy() for v in volumes], [v.affine for v in volumes]
    with step_bar("conditional pairs", expected, pace) as on_step:
        return write_conditional_pairs(args.adapter, Path(args.out), args.n, args.steps, args.seed, args.device,
                                       masks, affines, args.sampler, args.guidance, on_step, texture=args.texture)


@contextlib.contextmanager
def step_bar(what: str, expected: str | None = None,
             pace: RunPace | None = None) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar of network steps for `on_step(i, n)`: it restarts at each sampling pass (a joint batch, a
    rendered FLAIR, a conditional placement pass), so a long 2 mm pass shows progress step by step. `expected`
    (the run's expected time) is said at the first network step: once the inputs are accepted and the models
    loaded, so that a refused input prints its error alone; `pace` (the run's `RunPace`) sees every step."""
    from tqdm import tqdm

    bar = tqdm(desc=f"{what}: network steps", unit="step", dynamic_ncols=True)
    passes = [0]
    say = say_once(expected)

    def on_step(i: int, n: int) -> None:
        say()
        if pace is not None:
            pace.step(i)
        if i == 1:
            passes[0] += 1
            bar.reset(total=n)
            bar.set_postfix_str(f"pass {passes[0]}")
        bar.update(i - bar.n)

    try:
        yield on_step
    finally:
        bar.close()


def _generate_inpainted(args) -> int:
    """`--mode inpaint`: a lesion (each --mask, or --n drawn from the prior) inpainted into the --image scan,
    written on the scan's own grid; every input is checked before anything is written."""
    from tqdm.auto import tqdm

    from neuromf.generation.conditional import load_conditional_model
    from neuromf.generation.inpaint import inpaint_lesion, write_inpainted
    from neuromf.utils import ensure_writable

    if not args.image:
        raise SystemExit("generate: --mode inpaint needs --image (the healthy FLAIR the lesion goes into)")
    joint = args.mask_source == "joint"
    if (args.checkpoint or args.render or args.site or args.mask_draws
            or (args.joint_guidance is not None and not joint)):
        raise SystemExit("generate: --mode inpaint takes --image, --mask, --adapter (conditional), --n, --seed, "
                         "--steps, --sampler, --guidance, --margin-mm and --mask-source (with joint: "
                         "--joint-adapter, --joint-steps, --joint-guidance)")
    if joint and args.mask:
        raise SystemExit("generate: --mask-source joint draws the masks; leave out --mask")
    ensure_writable(Path(args.out))
    adapter = args.adapter or "embedded"
    expected = None
    if not joint:  # (the joint model's mask passes have no rate of their own: no estimate then)
        from neuromf.generation.estimates import generation_run_estimate

        expected = expected_time(lambda: generation_run_estimate(adapter, "inpaint", len(args.mask or []) or args.n,
                                                                 args.steps, guidance=args.guidance), args.device)
    cond = load_conditional_model(adapter, args.device)
    source = {}
    if joint:
        from neuromf.models.joint import load_joint_model

        device = next(cond.model.parameters()).device
        source = {"mask_source": "joint", "joint": load_joint_model(args.joint_adapter, device),
                  "joint_steps": args.joint_steps, "joint_guidance": args.joint_guidance}
    masks = args.mask or [None] * args.n
    margin = 6.0 if args.margin_mm is None else args.margin_mm
    results = []
    bars: dict[str, tqdm] = {}  # opened at the first network call: a refused input prints its error alone

    say = say_once(expected)

    def on_step(i: int, n: int) -> None:
        say()  # once the inputs are accepted: a refused one prints its error alone
        if not bars:
            bars["lesions"] = tqdm(total=len(masks), desc="inpainting", unit="lesion", dynamic_ncols=True)
            bars["calls"] = tqdm(desc="network calls", unit="call", dynamic_ncols=True, leave=False)
        bars["calls"].total, bars["calls"].n = n, i
        bars["calls"].refresh()

    from neuromf.train.run_dir import output_folder

    with output_folder(Path(args.out), _run_identity(args, "inpaint"), overwrite=args.overwrite) as record:
        try:
            for i, mask in enumerate(masks):
                result = inpaint_lesion(args.image, mask, cond, seed=args.seed + i if mask is None else args.seed,
                                        steps=args.steps, guidance=args.guidance, margin_mm=margin,
                                        on_step=on_step, method=args.sampler, **source)
                # the run's seed, as every generated folder records it (one run = one seed); the lesion's own
                result.info.update(adapter=str(adapter), index=i, mask_file=None if mask is None else str(mask),
                                   seed=args.seed, lesion_seed=result.info["seed"])
                if joint:
                    result.info["joint_adapter"] = str(args.joint_adapter)
                results.append(result)
                bars["lesions"].update()
        finally:
            for bar in bars.values():
                bar.close()
        paths = [p for i, r in enumerate(results) for p in write_inpainted(r, Path(args.out), f"sample_{i:03d}")]
        record(paths)
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def register(add: AddCommand) -> None:
    """Add the `generate` subcommand through `add`."""
    p = add("generate", cmd_generate, "sample volumes (base model) or image+mask pairs (LoRA adapter)")
    p.add_argument("--checkpoint",
                   help="base model folder, model.safetensors, 'embedded' (2 mm) or 'embedded-3mm'")
    p.add_argument("--adapter", help="adapter folder: LoRA (joint image + mask) or ControlNet (conditional); "
                                     "'embedded' (the default without --checkpoint) for the shipped 2 mm adapter of "
                                     "the chosen mode (joint unless --mode conditional), 'embedded-3mm' for the "
                                     "3 mm one ('embedded-fine': deprecated name of the 2 mm set, conditional "
                                     "unless --mode joint)")
    p.add_argument("--mode", default="auto", choices=["auto", "joint", "conditional", "inpaint"],
                   help="joint: image + mask from noise; conditional: a FLAIR for each given or prior-drawn mask; "
                        "inpaint: a lesion put into the --image scan (each --mask, or --n drawn from the prior), the "
                        "scan kept exactly beyond --margin-mm (adapter: a conditional one, default embedded)")
    p.add_argument("--mask", nargs="+", metavar="FILE", help="conditional mode: lesion mask NIfTI file(s)")
    p.add_argument("--no-texture", dest="texture", action="store_false",
                   help="joint and conditional modes: leave out the scanner texture (the voxel noise of real scans, "
                        "fitted on the VAE's training scans) that is added to each FLAIR by default; the FLAIR is "
                        "then the decoder's smooth mean")
    p.add_argument("--image", metavar="FILE",
                   help="conditional mode: the FLAIR the masks belong to (centres the model grid on its brain)")
    p.add_argument("--render", metavar="ADAPTER",
                   help="joint mode: a conditional adapter (same base model) that renders the FLAIR for each joint "
                        "mask, from the same image noise (two-stage: mask from the joint model, FLAIR from the "
                        "ControlNet); default: the adapter's own (the shipped 2 mm joint adapter: 'embedded', its "
                        "conditional one)")
    p.add_argument("--no-render", action="store_true",
                   help="joint mode: keep the joint model's own FLAIR (no rendering, also for an adapter that has "
                        "a renderer of its own)")
    p.add_argument("--guidance", type=SCALE, default=None, metavar="S",
                   help="conditional mode and --render: mask guidance u_empty + S (u_mask - u_empty), the empty mask "
                        "as the unconditional branch (1 = none; > 1 renders the lesion more strongly, two model "
                        "calls per step); default: the adapter's own (its sidecar's 'guidance', 1 unless set; "
                        "inpaint mode: its 'inpaint_guidance', rendering joint masks: its 'render_guidance', where "
                        "set; for the shipped 2 mm adapter 1.3, and 1.2 rendering joint masks)")
    p.add_argument("--joint-guidance", type=SCALE, default=None, metavar="S",
                   help="joint mode (x-prediction adapters): the mask estimate guided against the empty mask's path "
                        "from the same noise, x_empty + S (x - x_empty) (1 = none; > 1 commits more strongly to a "
                        "lesion: for a training whose masks come out empty or as specks); default: the adapter's "
                        "own (its sidecar's 'guidance', 1 unless set)")
    p.add_argument("--mask-draws", type=number(1, 20, integer=True), default=None, metavar="K",
                   help="joint mode: draws per pair at most; a mask that is empty or smaller than the smallest lesion "
                        "the lesion check accepts is drawn again from fresh noise, and the last draw is kept "
                        "(1 = every pair's first draw; default 3); each pair's JSON records its draws")
    p.add_argument("--site", type=number(), nargs=3, action="append", metavar=("X", "Y", "Z"),
                   help="joint mode, site-conditioned adapters: put the lesion at this voxel of the model grid (the "
                        "written pairs' grid; repeat for several, used in turn); default: sites drawn from the "
                        "training lesions' sites")
    p.add_argument("--margin-mm", type=number(0.0, 100.0), default=None, metavar="MM",
                   help="inpaint mode: voxels farther than this from the lesion keep the scan's values exactly; "
                        "within it a feathered blend (default 6)")
    p.add_argument("--mask-source", default="prior", choices=["prior", "joint"],
                   help="inpaint mode without --mask: prior (a real training lesion re-placed in this brain) or joint "
                        "(a new shape drawn by --joint-adapter at a real lesion's depth and site in this brain)")
    p.add_argument("--joint-adapter", default="embedded", metavar="ADAPTER",
                   help="inpaint mode, --mask-source joint: the joint adapter that draws the masks (default the "
                        "shipped 2 mm one)")
    p.add_argument("--joint-steps", type=STEPS, default=32,
                   help="inpaint mode, --mask-source joint: Euler steps of the joint model (default 32)")
    p.add_argument("--n", type=COUNT, default=4)
    p.add_argument("--steps", type=STEPS, default=None,
                   help="sampling steps (default: the adapter's own, e.g. 32 for the shipped 2 mm joint adapter; "
                        "else 1 = one-step MeanFlow; 8 in the inpaint mode)")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="meanflow: k-step MeanFlow with the average velocity; euler: --steps Euler steps with the "
                        "instantaneous velocity (for joint x-prediction adapters); default: the adapter's own "
                        "(euler for the shipped 2 mm joint adapter), else meanflow")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/stage2/generated")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run in --out (only files NeuroMF wrote there are removed)")
