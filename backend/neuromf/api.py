"""The public Python API for scripts and notebooks: the few entry points a headless session needs.

`import neuromf` re-exports these names (loaded on first use, so importing the package stays cheap). Training
entry points here run to the end and report through a callback; the generators they wrap
(`neuromf.pipelines.joint.train_joint`, ...) are what the CLI and the napari plugin drive step by step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from threading import Event
from typing import Any

from neuromf.config import RunConfig, load_config
from neuromf.io.nifti import Preprocessing
from neuromf.train.loop import TrainEvent, TrainResult, run_to_end


def mask_test(data: str | Path = "embedded", vae: str | Path = "embedded", vae_preset: str | None = None,
              shape: tuple[int, int, int] | None = None, spacing: tuple[float, float, float] | None = None,
              out: str | Path | None = None, device: str = "cpu",
              on_case: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The mask-VAE test on the FCD cases of `data`: mask round trips through the VAE and the downsampled ones.

    Args:
        data: BIDS tree, flat folder, "embedded" (2 mm phantoms) or "embedded-3mm".
        vae: "embedded" (2 mm) / "embedded-3mm" or a local MAISI weight file; `vae_preset` its architecture (read
            from its sidecar when there is one).
        shape, spacing: the model grid (voxels, mm); None: the grid the VAE was trained on (64^3 at 3 mm when its
            sidecar does not say).
        out: where to write the JSON result (its `decision` is what `mask_strategy: auto` reads).
        on_case: called with each case's row as it is measured (progress).

    Returns:
        The result dict: per-case Dice rows, `summary`, `decision` ("vae" | "downsample" | "sdf") and `reason`.
    """
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.eval.mask_test import mask_vae_test, model_grid, save_mask_test
    from neuromf.vae import MAISIVAEWrapper

    model = MAISIVAEWrapper.resolve(vae, preset=vae_preset, device=device)
    result = mask_vae_test(resolve_data_dir(data), model, model_grid(model, shape, spacing), on_case=on_case)
    if out is not None:
        save_mask_test(result, out)
    return result


def _config(config: str | Path | RunConfig, overrides: dict[str, Any] | None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides apply to a config file or name, not to a RunConfig object")
        return config
    return load_config(config, overrides)


def fine_tune(config: str | Path | RunConfig = "joint_3mm", base_checkpoint: str | Path = "embedded",
              mode: str = "joint", overrides: dict[str, Any] | None = None,
              on_event: Callable[[TrainEvent], None] | None = None, stop: Event | None = None,
              resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Stage 2 on FCD cases, run to the end: LoRA (`mode="joint"`) or the ControlNet (`mode="conditional"`).

    Args:
        config: a YAML file, a packaged config name ("joint_3mm", "joint_gpu", "conditional_3mm") or a RunConfig.
        base_checkpoint: the frozen stage-1 model: folder, model.safetensors, "embedded" (2 mm) or
            "embedded-3mm" (the one `joint_3mm` / `conditional_3mm` are made for).
        overrides: dotted keys, e.g. {"training.max_steps": 50, "training.output_dir": "runs/x"}.
        on_event: called with every TrainEvent (kind "step" | "epoch" | "checkpoint" | "preview" | "stopped" ...;
            `step`, `total_steps`, `loss`, `parts`): progress bars, logging, plots.
        stop: set it (from another thread) to stop after the current step; the run saves and can be resumed.
        resume / overwrite: continue the run in `training.output_dir`, or replace it.

    Returns:
        TrainResult: `step`, `stopped`, `out_dir`, `checkpoint`, `export` (the adapter folder).
    """
    cfg = _config(config, overrides)
    if mode == "joint":
        from neuromf.pipelines.joint import train_joint as trainer
    elif mode == "conditional":
        from neuromf.pipelines.conditional import train_conditional as trainer
    else:
        raise ValueError(f"mode must be 'joint' or 'conditional', got {mode!r}")
    events = trainer(cfg, base_checkpoint, resume=resume, overwrite=overwrite, stop=stop, progress=False)
    return run_to_end(events, on_event)


def generate_pairs(adapter: str | Path = "embedded", n: int = 4, out: str | Path | None = None, mode: str = "auto",
                   steps: int | None = None, seed: int = 0, device: str = "auto", masks: list | None = None,
                   method: str | None = None, render: str | Path | None = "own", guidance: float | None = None,
                   joint_guidance: float | None = None, sites: Any = None, texture: bool = True,
                   mask_draws: int | None = None) -> list:
    """Generated FLAIR + lesion mask pairs (`neuromf.generation.images.GeneratedPair`: image, mask, affine, meta).

    With the defaults: lesion pairs from the shipped 2 mm joint adapter in its own settings (Euler 32 steps, its
    joint guidance, FLAIRs rendered by the shipped 2 mm conditional adapter; minutes per pair on a CPU).

    Args:
        adapter: a stage-2 adapter folder, "embedded" (the shipped 2 mm adapters) or "embedded-3mm" (3 mm); `mode`
            "auto" reads the folder (a shipped name + "auto" is its joint adapter; mode="conditional" for the
            conditional one).
        masks: conditional mode only: lesion masks (H, W, D) on the model grid to generate FLAIRs for; without
            them, `n` masks are drawn from the adapter's prior of real lesions.
        out: also write them as `sample_XXX_{flair,mask}.nii.gz` + `sample_XXX.json`.
        steps, method: sampler steps and sampler, "meanflow" (k-step MeanFlow) or "euler"; None = the adapter's
            own (its sidecar's `sampling`), else 1 MeanFlow step.
        render: joint mode only: a conditional adapter that renders each pair's FLAIR again for its mask
            (two-stage synthesis, `generate --render`); "own" = the adapter's own (the shipped 2 mm joint
            adapter's: its conditional one), None = the joint model's own FLAIR.
        guidance: the conditional adapter's (or the renderer's) mask guidance scale; None = the adapter's own.
        joint_guidance: joint mode only: guidance against the empty mask's path (1 = none); None = the adapter's.
        sites: joint mode, site-conditioned adapters: lesion sites, (k, 3) voxel coordinates on the model grid,
            used in turn; None = drawn from the adapter's prior.
        texture: add the VAE's scanner texture (the voxel noise of real scans, fitted on the VAE's training
            scans; only VAEs with a fitted level, the shipped 2 mm one) to each FLAIR; False = the smooth decode.
        mask_draws: joint mode only: draws per pair at most; a mask that is empty or smaller than the smallest
            lesion the lesion check accepts is drawn again from fresh noise (None = 3; 1 = every first draw).

    Returns:
        The list of pairs (sample i depends only on (seed, i)).
    """
    from neuromf.generation.images import write_pairs
    from neuromf.models.adapter_meta import OWN, adapter_meta, generation_mode

    mode = generation_mode(adapter, mode)
    if mode == "conditional":
        from neuromf.generation.conditional import generate_conditional_pairs

        if render not in (None, OWN) or joint_guidance is not None or sites is not None or mask_draws is not None:
            raise ValueError("render, joint_guidance, sites and mask_draws are for a joint adapter (mode='joint')")
        method, steps, _ = adapter_meta(adapter, mode).sampling_settings(method, steps, None)
        pairs = list(generate_conditional_pairs(adapter, n, steps, seed, device, masks, method=method,
                                                guidance=guidance, texture=texture))
    else:
        if masks is not None:
            raise ValueError("masks need a conditional adapter (mode='conditional')")
        from neuromf.generation.joint import MASK_DRAWS
        from neuromf.generation.joint import generate_pairs as joint_pairs

        method, steps, render = adapter_meta(adapter, mode).sampling_settings(method, steps, render)
        pairs = list(joint_pairs(adapter, n, steps, seed, device, method, render, guidance, joint_guidance, sites,
                                 texture=texture, mask_draws=mask_draws or MASK_DRAWS))
    if out is not None:
        write_pairs(pairs, Path(out))
    return pairs


def inpaint_lesion(image: str | Path | Any, mask: str | Path | Any = None, adapter: str | Path = "embedded",
                   affine: Any = None, seed: int = 0, steps: int = 8, guidance: float | None = None,
                   margin_mm: float = 6.0, on_step: Callable[[int, int], None] | None = None,
                   stop: Event | None = None, **options: Any) -> Any:
    """A lesion inpainted into a healthy FLAIR (`neuromf.generation.inpaint.inpaint_lesion`): the conditional model
    generates the lesion's neighbourhood in the context of the scan's own latent; voxels farther than `margin_mm`
    from the lesion keep the input's values exactly.

    Args:
        image: the healthy FLAIR: a NIfTI path or a 3D numpy array (then `affine` is needed).
        mask: the lesion: a NIfTI path (any grid with a valid affine), an array on the scan's grid, or None to draw
            one in this scan's brain (from the adapter's prior of real lesions, or with `mask_source="joint"` a new
            shape from a joint adapter).
        adapter: a conditional adapter folder, "embedded" (2 mm, default) or "embedded-3mm".
        affine: (4, 4) voxel -> world affine of an image array.
        seed, steps, guidance: noise / prior seed, sampler steps, mask guidance (None = the adapter's own).
        margin_mm: the blend margin around the lesion; beyond it the input is kept exactly.
        on_step: on_step(i, n) after each of the n network calls (progress).
        stop: a threading.Event checked before each network call; when set, `InpaintCancelled` is raised.
        options: `method`, `composite`, `device`, `allow_existing_lesion`, `mask_affine`, `mask_source`
            ("prior" or "joint"), `joint` (the joint adapter, default "embedded"), `joint_steps`,
            `joint_guidance` (see the pipeline).

    Returns:
        `InpaintResult`: `.image` (input grid and dtype), `.mask` (uint8), `.affine`, `.info` (seed, steps,
        margin_mm, lesion_cm3, contrast, adapter, seconds, ...).
    """
    from neuromf.generation.inpaint import inpaint_lesion as run

    return run(image, mask, adapter, affine, seed, steps, guidance, margin_mm, on_step, stop, **options)


def evaluate(generated: str | Path, adapter: str | Path = "embedded", data: str | Path = "embedded",
             mode: str = "auto", out: str | Path | None = None) -> dict[str, Any]:
    """Lesion-likeness, best-match Dice with reference points and image metrics of a folder of generated pairs,
    judged against the real FCD cases of `data` on the adapter's model grid (what `neuromf evaluate` writes)."""
    from neuromf.eval.metrics import evaluate_generated
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(adapter, mode).prep
    return evaluate_generated(Path(generated), data, prep, None if out is None else Path(out))


def benchmark_downstream(out: str | Path, inpainted: str | Path | None = None, joint: str | Path | None = None,
                         conditional: str | Path | None = None, adapter: str | Path = "embedded",
                         data: str | Path = "embedded", seeds: tuple[int, ...] = (0, 1, 2, 3, 4),
                         steps: int | None = None, quick: bool = False, arms: list[str] | None = None,
                         synthetic_share: float | None = None, grid: Preprocessing | None = None,
                         lesion_like_only: bool = False, workers: int = 1, device: str = "cpu",
                         progress: bool = False, extra_real: str | Path | None = None,
                         scarce_fractions: tuple[float, ...] = (0.5,)) -> dict[str, Any]:
    """Downstream benchmark of synthetic pairs: a MONAI segmenter trained nnU-Net-style on real FCD cases (R),
    R + each folder of pairs, synthetic only and 50% of R + synthetic, scored on the same held-out real cases
    (`neuromf.eval.downstream`). Resumable in `out`; writes `downstream.json` and `downstream.png` there.

    Args:
        inpainted, joint, conditional: folders of `sample_XXX_{flair,mask}.nii.gz` pairs; a missing one skips its
            arms (noted in the result's `notes`).
        adapter: the adapter the pairs were generated with (its grid); `grid` overrides it. data: the real cases.
        steps: training steps per segmenter (default: the full-run budget; `quick`: a few-minute smoke preset).
        arms: only these arms, in this order (R always runs first); synthetic_share: share of patches drawn from
            synthetic pairs; lesion_like_only: keep only the pairs that pass the lesion-likeness check.
        workers: trainings run at once (threads; for machines with spare cores).
        extra_real: labelled real FCD cases outside `data`'s train and test sets (a BIDS folder): the ceiling arms
            `R+extra-real` and `50%R+extra-real` add them as the pairs are added (what perfect pairs could add).
        scarce_fractions: the shares of R of the scarce-labels arms (default 0.5: `50%R+synthetic`, `50%R`).

    Returns:
        The summary: per arm Dice, sensitivity and FP/scan over seeds with 95% CIs, paired differences with R,
        and the goals.
    """
    import dataclasses

    from neuromf.eval.downstream import QUICK, BenchmarkSettings, run_downstream_benchmark
    from neuromf.models.adapter_meta import adapter_meta

    settings = QUICK if quick else BenchmarkSettings()
    settings = dataclasses.replace(settings, steps=settings.steps if steps is None else int(steps),
                                   synthetic_share=synthetic_share)
    sources = {"inpainted": inpainted, "joint": joint, "conditional": conditional}
    prep = grid if grid is not None else adapter_meta(adapter, "auto").prep
    return run_downstream_benchmark(Path(out), data, prep, sources, seeds, settings, arms, device, progress,
                                    lesion_like_only, workers, extra_real=extra_real,
                                    scarce_fractions=scarce_fractions)


__all__ = ["benchmark_downstream", "evaluate", "fine_tune", "generate_pairs", "inpaint_lesion", "mask_test"]
