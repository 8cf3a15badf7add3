"""Stage 2, joint mode: LoRA fine-tuning on FCD image + mask latents, and generation of image + mask pairs."""

from __future__ import annotations

import functools
import gc
import math
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import torch

from neuromf.config import CALIBRATION_SCALES, RunConfig
from neuromf.data.augment import AffineAugment
from neuromf.data.fcd_dataset import FCDDataset
from neuromf.data.latents import encoding_events
from neuromf.data.mask_codec import mask_channels
from neuromf.data.mask_prior import PRIOR
from neuromf.eval.mask_test import read_decision
from neuromf.generate import GeneratedPair, model_grid_affine, vae_for, write_pairs
from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.models.adapter_meta import ADAPTER_DIR, AdapterMeta, base_reference, data_reference, resolve_adapter_dir
from neuromf.models.flow_model import read_model_meta
from neuromf.models.joint import JointModel, build_joint_model, load_joint_model
from neuromf.models.lora import (
    count_lora_params,
    count_trainable_params,
    save_adapter,
)
from neuromf.models.site import SiteConditionedJoint
from neuromf.pipelines.conditional import (
    ConditionalModel,
    build_mask_prior,
    load_conditional_model,
    packed_lesion_loss,
    stage2_preprocessing,
)
from neuromf.train.distributed import device_for, main_first
from neuromf.train.loop import TrainEvent, TrainResult, TrainTask, fixed_draw_evaluator, train
from neuromf.train.run_dir import in_run_dir
from neuromf.utils import default_cache_dir, resolve_device

DEFAULT_MASK_TEST = Path("runs/stage2/mask_vae_test.json")


def resolve_strategy(cfg: RunConfig) -> str:
    """`auto` reads the mask test's decision (`neuromf mask-test`); otherwise the configured strategy."""
    if cfg.data.mask_strategy != "auto":
        return cfg.data.mask_strategy
    return read_decision(cfg.data.mask_test or DEFAULT_MASK_TEST)


@in_run_dir
def train_joint(cfg: RunConfig, base_checkpoint: str | Path = "embedded", resume: bool = False,
                overwrite: bool = False, stop: Event | None = None,
                progress: bool = True) -> Generator[TrainEvent, None, TrainResult]:
    """Fine-tune LoRA + widened convs on the FCD latents with the per-channel Lp MeanFlow loss.

    The adapter (peft format + sidecar) is exported to `<output_dir>/adapter` at the end and on stop.
    """
    out_dir = Path(cfg.training.output_dir)  # prepared with config.yaml by @in_run_dir, removed on a failed start
    torch.manual_seed(cfg.training.seed)
    strategy = resolve_strategy(cfg)
    n_mask = mask_channels(strategy, subgrid=cfg.data.sdf_subgrid)
    base_meta = read_model_meta(base_checkpoint)
    vae = vae_for(base_meta, device=device_for(cfg.training.device))  # encode (and preview) where it trains
    prep = stage2_preprocessing(base_meta, cfg)
    cache_dir = cfg.data.cache_dir or default_cache_dir()
    with main_first():  # several processes: rank 0 fills the latent cache, then the others read it
        dataset = FCDDataset(cfg.data.data_dir, strategy, vae=vae, prep=prep, cache_dir=cache_dir,
                             downsample_mode=cfg.data.downsample_mode, flip=cfg.data.flip, split=cfg.data.split,
                             progress=progress, sdf_scale_mm=cfg.data.sdf_scale_mm, sdf_subgrid=cfg.data.sdf_subgrid,
                             encode=False, augment=AffineAugment.from_config(cfg.data))
        yield from encoding_events(dataset.encode_cases())  # an "encoding" event per case
    latents = dataset.latents()
    # a warm start keeps its adapter's skip centre, guidance and sampling (what its weights were made and measured
    # with); a fresh run: the skip's centre is the training masks' mean (about the empty mask)
    init = AdapterMeta.load(resolve_adapter_dir(cfg.lora.init_from, "joint")) if cfg.lora.init_from else None
    mask_mean = init.mask_mean if init else float(latents[:, -n_mask:].mean())
    model, base_meta = build_joint_model(cfg, base_checkpoint, n_mask, mask_mean)
    trainable, total = count_trainable_params(model)
    site = cfg.lora.site_condition
    prior = build_mask_prior(dataset) if site else None  # the sites generation draws from
    sidecar = AdapterMeta(
        mode="joint", **base_reference(base_checkpoint, base_meta), preprocessing=prep.key(),
        latent_shape=list(latents.shape[1:]), channels={"image": 4, "mask": n_mask}, config=cfg.to_dict(),
        data_dir=data_reference(cfg.data.data_dir, dataset.root), train_cases=[case_id for case_id, _ in dataset.items],
        lesion_weight=cfg.loss.lesion_weight, trainable_params=trainable, total_params=total,
        strategy=strategy, downsample_mode=cfg.data.downsample_mode, mask_scale=dataset.mask_scale,
        sdf_scale_mm=cfg.data.sdf_scale_mm, sdf_subgrid=cfg.data.sdf_subgrid,
        sdf_threshold_mm=cfg.data.sdf_threshold_mm, mask_passthrough=cfg.lora.mask_passthrough,
        mask_prediction=cfg.lora.mask_prediction, mask_sigma_data=cfg.lora.mask_sigma_data, mask_mean=mask_mean,
        lora_params=count_lora_params(model), site_condition=site,
        **({"guidance": init.guidance, "sampling": init.sampling} if init else {}))
    joint = JointModel(model, vae, sidecar)
    preview_noise = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(cfg.training.seed))
    preview_site = dataset.items[0][1]["mask"].float()[None]  # the first training lesion's place

    def export(m: torch.nn.Module, directory: Path) -> Path:
        if not site:
            return save_adapter(m, directory / ADAPTER_DIR, sidecar)
        return save_adapter(m.model, directory / ADAPTER_DIR, sidecar, extra=lambda d: prior.save(d / PRIOR))

    def preview(m: torch.nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
        from neuromf.meanflow import sample_meanflow

        device = next(m.parameters()).device
        velocity = functools.partial(m, cond=preview_site.to(device)) if site else m
        image, mask = joint.split(sample_meanflow(velocity, preview_noise.to(device), steps=1))
        return [(image[0, 0].numpy(), mask[0, 0].numpy().astype(np.uint8))]

    loss_fn = packed_lesion_loss(MeanFlowLoss.from_config(cfg.loss, 4, n_mask), 4 + n_mask, conditional=site,
                                 dilate=cfg.loss.lesion_dilate)
    data = dataset.packed(latents)
    if site:
        model = SiteConditionedJoint(model)
    task = TrainTask(model=model, loss_fn=loss_fn, export=export, preview=preview,
                     evaluate=fixed_draw_evaluator(loss_fn, data),
                     meta={"kind": "lora", "strategy": strategy, "base_checkpoint": str(base_checkpoint)})
    return (yield from train(task, data, cfg.training, out_dir, stop=stop, resume=resume))



train_lora = train_joint  # the deprecated name (one release): the plugin and scripts still call it

def generate_pairs(adapter: str | Path = "embedded", n: int = 4, steps: int = 1, seed: int = 0,
                   device: str = "auto", method: str = "meanflow",
                   render: str | Path | None = None, guidance: float | None = None,
                   joint_guidance: float | None = None, sites: Any = None,
                   on_step: Callable[[int, int], None] | None = None,
                   stop: threading.Event | None = None) -> Iterator[GeneratedPair]:
    """Joint FLAIR + lesion mask samples, decoded by the adapter's strategy; sample i depends only on (seed, i).

    With `render`, the pair's FLAIR is generated again for its mask by a conditional adapter (same base model and
    grid), from the same image noise: two-stage synthesis, the mask from the joint model and the FLAIR from the
    ControlNet, which learned to show a lesion under its mask (the joint image channels barely do).

    Args:
        adapter: a joint adapter folder or "embedded" (the shipped demo).
        n: number of pairs.
        steps: sampler steps (1 = one-step MeanFlow), for the joint model and the renderer.
        seed: noise seed.
        device: "auto", "cpu", "cuda" or "cuda:N".
        method: sampler, "meanflow" or "euler" (k-step or Euler sampling for an x-prediction adapter).
        render: optional conditional adapter folder (or "embedded" / "embedded-3mm") that renders the FLAIRs.
        guidance: the renderer's mask guidance scale (`neuromf.pipelines.conditional.guided_velocity`); None = the
            renderer's own (`AdapterMeta.guidance`).
        joint_guidance: the joint model's guidance against the empty mask's path
            (`neuromf.models.joint.empty_path_guidance`; 1 = none, > 1 commits more strongly to a lesion); None =
            the joint adapter's own (`AdapterMeta.guidance`).
        sites: a site-conditioned adapter's lesion sites, (k, 3) voxel coordinates on the model grid (the written
            pairs' grid), used in turn; None = drawn from the adapter's prior (`neuromf.models.site.draw_sites`).
        on_step: called with (i, steps) after each network step, of the joint pass (a batch of up to 4 pairs) and of
            each render pass (`neuromf.meanflow.sample`).
        stop: when set, `neuromf.meanflow.SamplingStopped` is raised before the next network step.
    Yields:
        `GeneratedPair`s: image (H, W, D) float32 in [0, clip_max], mask (H, W, D) uint8 {0, 1}, the model grid's
        (4, 4) affine, and meta (seed, steps, adapter, strategy, `joint_guidance`, `mask_noise_correlation`: about 0
        when the mask latent left its noise behind; `rendered_by` with `render`).
    Raises:
        ValueError: `render` is not a conditional adapter on the joint adapter's base model and grid; joint guidance
            other than 1 for an adapter without x-prediction.
    """
    dev = resolve_device(device)
    joint = load_joint_model(adapter, dev)
    joint_guidance = joint.meta.guidance_scale(joint_guidance)
    renderer = load_renderer(render, joint.meta, dev) if render is not None else None
    rendering = {}  # what each rendered pair records
    if renderer is not None:
        guidance = renderer.meta.guidance_scale(guidance)
        rendering = {"rendered_by": str(resolve_adapter_dir(render, "conditional")), "guidance": guidance}
    prep = joint.meta.prep
    affine = model_grid_affine(prep.shape, prep.spacing)
    source = str(resolve_adapter_dir(adapter, "joint"))
    index = 0
    n_img = joint.meta.n_image
    for noise, z, batch_sites in joint.sample(n, steps, seed, dev, method, joint_guidance, sites, on_step, stop):
        # a rendered pair's FLAIR replaces the joint one: decode only the masks then
        images, masks = joint.split(z.to(dev)) if renderer is None else (None, joint.mask(z.to(dev)))
        for i in range(z.shape[0]):
            # how much of its starting noise the mask latent kept (a working generator: about 0)
            corr = float(np.corrcoef(z[i, n_img:].flatten().numpy(), noise[i, n_img:].flatten().numpy())[0, 1])
            mask = masks[i, 0].numpy().astype(np.uint8)
            meta = {"index": index, "seed": seed, "steps": steps, "sampler": method, "adapter": source,
                    "mode": "joint", "strategy": joint.strategy, "joint_guidance": joint_guidance,
                    "mask_noise_correlation": round(corr, 4),
                    **({} if batch_sites is None else {"site_voxel": [round(float(v), 1) for v in batch_sites[i]],
                                                       "site_given": sites is not None}),
                    **rendering}
            if renderer is None:
                image = images[i, 0].numpy().astype(np.float32)
            else:
                image = renderer.generate(mask, noise[i, :n_img], steps, method, guidance, on_step, stop)
            yield GeneratedPair(index, image, mask, affine, meta)
            index += 1


def calibrate_joint_guidance(adapter: str | Path = "embedded", scales: tuple[float, ...] = CALIBRATION_SCALES,
                             n: int = 8, steps: int = 32, seeds: int | tuple[int, ...] = (1000, 1001),
                             device: str = "auto", method: str = "euler", data: str | Path | None = None,
                             reference: str = "real") -> dict[str, Any]:
    """The joint guidance whose masks match the real lesions in size.

    Two trainings of one recipe can commit to a lesion with different strength (one drew lesions of real size, the
    other mostly empty masks and specks), and joint guidance (`neuromf.models.joint.empty_path_guidance`) sets that
    strength. For each scale, `n` masks per seed are sampled (masks only, no FLAIR) and the median volume of all of
    them, empty masks counting 0 cm^3, is compared with the median volume of the reference lesions; the scale with
    the nearest median on a log scale is chosen (volumes are judged by ratios: the criteria allow 0.5x the smallest
    to 2x the largest real lesion; a median of 0, mostly empty masks, is never chosen while another is not). The
    volume rises steeply with the scale (0.8 -> 8.6 cm^3 from 1.0 to 1.1 for one training): keep the grid fine.
    The median of 8 masks of one seed is noisy (one training: 4.0 cm^3 on the calibration seed, 4.8 and 7.4 on
    fresh ones at the same scale): pool seeds. A training can also over-commit (48 cm^3 at 1 for one trained on a
    GPU): the default grid goes below 1, and `outside_range` says when the target lies beyond the scales tried
    (extend them). The default seeds keep these draws apart from the usual evaluation seeds.

    Args:
        adapter: a joint x-prediction adapter folder or "embedded" / "embedded-3mm".
        scales: the guidance scales tried.
        n, steps, device, method: as for `generate_pairs`; `n` masks per seed.
        seeds: one seed or several, pooled.
        data: the FCD data the adapter was trained on; None = its sidecar's `data_dir`.
        reference: "real": every real lesion of `data` (what `evaluate` compares with); "train": only the
            adapter's training lesions.
    Returns:
        {"adapter", "target_cm3": median reference lesion volume, "rows": [{"guidance", "median_cm3", "empty",
        "seed_medians_cm3", "ks_statistic", "ks_pvalue" (non-empty masks vs the reference lesions), "volumes_cm3"}],
        "chosen": the scale to pass as `--joint-guidance` (or store as the sidecar's `guidance`), "outside_range":
        whether even the end of the grid nearest the target stays on the far side of it}.
    Raises:
        ValueError: no scales or seeds, an unknown reference, or guidance other than 1 for an adapter without
        x-prediction.
    """
    from scipy.stats import ks_2samp

    from neuromf.data.embedded import resolve_data_dir
    from neuromf.eval.metrics import load_real_cases, voxel_volume_cm3

    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    if not scales or not seeds:
        raise ValueError("calibrate_joint_guidance: give at least one guidance scale and one seed")
    if reference not in ("real", "train"):
        raise ValueError(f"calibrate_joint_guidance: reference must be 'real' or 'train', got {reference!r}")
    dev = resolve_device(device)
    joint = load_joint_model(adapter, dev)
    prep = joint.meta.prep
    real, _ = load_real_cases(resolve_data_dir(data or joint.meta.data_dir), prep)
    trained = set(joint.meta.train_cases) if reference == "train" else set()
    volumes = [float(r["mask"].sum()) * r["voxel_cm3"] for r in real if r["id"] in trained or not trained]
    if not volumes:
        raise ValueError(f"{adapter}: none of the adapter's training cases were found in {data or joint.meta.data_dir}")
    target = float(np.median(volumes))
    voxel_cm3 = voxel_volume_cm3(model_grid_affine(prep.shape, prep.spacing))
    rows = []
    for scale in scales:
        per_seed = []
        for seed in seeds:
            per_seed.append([float(m.sum()) * voxel_cm3 for _, z, _ in joint.sample(n, steps, seed, dev, method, scale)
                             for m in joint.mask(z.to(dev))])
        drawn = [v for vols in per_seed for v in vols]
        nonempty = [v for v in drawn if v > 0]
        ks = ks_2samp(nonempty, volumes) if nonempty else None
        rows.append({"guidance": float(scale), "median_cm3": float(np.median(drawn)),
                     "empty": sum(v == 0 for v in drawn), "seed_medians_cm3": [float(np.median(v)) for v in per_seed],
                     "ks_statistic": None if ks is None else float(ks.statistic),
                     "ks_pvalue": None if ks is None else float(ks.pvalue), "volumes_cm3": drawn})
    chosen = min(rows, key=lambda row: log_ratio_gap(row["median_cm3"], target))["guidance"]
    return {"adapter": str(resolve_adapter_dir(adapter, "joint")), "n": n, "steps": steps, "seeds": list(seeds),
            "sampler": method, "reference": reference, "target_cm3": target, "rows": rows, "chosen": chosen,
            "interpolated": interpolate_scale(rows, target), "outside_range": target_outside_scales(rows, target)}


def interpolate_scale(rows: list[dict[str, Any]], target: float) -> float | None:
    """The scale between two neighbouring grid scales whose median volumes bracket `target`, interpolated linearly
    in log volume (the volume grows about exponentially with the scale); None when no neighbours bracket it or a
    median is 0."""
    ordered = sorted(rows, key=lambda row: row["guidance"])
    for low, high in zip(ordered, ordered[1:]):
        a, b = low["median_cm3"], high["median_cm3"]
        if a > 0 and b > a and a <= target <= b:
            share = math.log(target / a) / math.log(b / a)
            return round(low["guidance"] + share * (high["guidance"] - low["guidance"]), 3)
    return None


def target_outside_scales(rows: list[dict[str, Any]], target: float) -> bool:
    """Whether the calibration's grid misses the target: the smallest scale's masks are already larger than the
    target, or the largest scale's still smaller (the volume grows with the scale)."""
    ordered = sorted(rows, key=lambda row: row["guidance"])
    return ordered[0]["median_cm3"] > target or ordered[-1]["median_cm3"] < target


def log_ratio_gap(value: float, target: float) -> float:
    """|log(value / target)|; infinite for a value of 0 (how far a median volume is from the target, by ratio)."""
    return abs(math.log(value / target)) if value > 0 else math.inf


def load_renderer(render: str | Path, joint_meta: AdapterMeta, device: torch.device) -> ConditionalModel:
    """The conditional adapter that renders joint masks, checked to share the joint adapter's base model and grid
    (a FLAIR rendered on another grid or from another base would not belong to the mask)."""
    renderer = load_conditional_model(render, device)
    if renderer.meta.base_sha256 != joint_meta.base_sha256:
        raise ValueError(f"{render}: the conditional adapter was trained on another base model "
                         f"({renderer.meta.base_checkpoint}) than the joint adapter ({joint_meta.base_checkpoint})")
    if (renderer.prep.shape, renderer.prep.spacing) != (joint_meta.prep.shape, joint_meta.prep.spacing):
        raise ValueError(f"{render}: the conditional adapter's grid {renderer.prep.shape} at "
                         f"{renderer.prep.spacing} mm is not the joint adapter's {joint_meta.prep.shape} at "
                         f"{joint_meta.prep.spacing} mm")
    return renderer


def write_generated_pairs(adapter: str | Path, out_dir: Path, n: int, steps: int = 1, seed: int = 0,
                          device: str = "auto", method: str = "meanflow",
                          render: str | Path | None = None, guidance: float | None = None,
                          joint_guidance: float | None = None, sites: Any = None,
                          on_step: Callable[[int, int], None] | None = None) -> list[Path]:
    """Joint pairs written by `neuromf.generate.write_pairs`.

    Args:
        adapter, n, steps, seed, device, method, render, guidance, joint_guidance, sites, on_step: as for
            `generate_pairs`.
        out_dir: output folder.
    Returns:
        The written paths: FLAIR, mask and JSON per pair.
    """
    return write_pairs(generate_pairs(adapter, n, steps, seed, device, method, render, guidance, joint_guidance,
                                      sites, on_step), out_dir)


def release_memory() -> None:
    """Give cached GPU memory back after a run (the GUI calls this when training ends or stops). On a CPU there is
    nothing to give back early: the run's tensors go by reference counting, and a full `gc.collect()` would hold
    the GIL for about 0.4 s in a napari process."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
