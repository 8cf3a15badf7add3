"""Joint generation: FLAIR + lesion mask pairs sampled together by a joint (LoRA) adapter, decoded by its mask
strategy, optionally with the FLAIR rendered for the mask by a conditional adapter (two-stage synthesis), and the
calibration of the joint guidance against the real lesions' sizes.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.config import CALIBRATION_SCALES
from neuromf.generation.conditional import ConditionalModel, load_conditional_model
from neuromf.generation.guidance import empty_path_guidance
from neuromf.generation.images import GeneratedPair, model_grid_affine, with_texture, write_pairs
from neuromf.meanflow.loss import VelocityFn
from neuromf.meanflow.samplers import sample_latents
from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir
from neuromf.models.joint import JointModel, load_joint_model
from neuromf.models.unet import X_PREDICTION_MIN_T
from neuromf.utils import resolve_device

MASK_DRAWS = 3  # joint masks drawn per pair at most before keeping one that is empty or smaller than any lesion


def derived_seed(*keys: int) -> int:
    """A seed for a re-draw, derived from the pair's keys (seed, index, draw): independent of every other draw."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def smallest_lesion_voxels(adapter: str | Path, spacing: tuple[float, ...]) -> float:
    """The smallest mask (in voxels) the lesion check accepts for this adapter's pairs: half the smallest real lesion,
    from the adapter folder's `lesion_reference.json`, on a grid of voxel size `spacing` (mm); 1 voxel (any non-empty
    mask) when the folder has none."""
    from neuromf.eval.lesion_check import shipped_reference

    reference = shipped_reference(resolve_adapter_dir(adapter, "joint"))
    if reference is None:
        return 1.0
    low, _ = reference.volume_range
    return max(1.0, low / (math.prod(spacing) / 1000.0))


def joint_velocity(joint: JointModel, noise: torch.Tensor, guidance: float = 1.0,
                   sites: torch.Tensor | None = None) -> VelocityFn:
    """u(z, r, t) for a batch started from `noise`, with the mask channels guided by `guidance`
    (`empty_path_guidance`; 1 = the model itself); a site-conditioned adapter needs the batch's `sites`
    ((B, 3) image-grid voxel coordinates, `JointModel.draw_sites`)."""
    model = joint.model
    if joint.meta.site_condition:
        if sites is None:
            raise ValueError("a site-conditioned joint adapter needs lesion sites (draw_sites)")
        model = functools.partial(joint.model, cond=sites.to(noise.device))
    if guidance == 1.0:
        return model
    if joint.meta.mask_prediction != "x":
        raise ValueError("joint guidance needs an x-prediction adapter (lora.mask_prediction: x)")
    return empty_path_guidance(model, joint.meta.n_image, joint.empty_mask_value, noise, guidance)


def sample_joint(joint: JointModel, n: int, steps: int, seed: int, device: torch.device, method: str = "euler",
                 guidance: float = 1.0, sites: Any = None, on_step: Callable[[int, int], None] | None = None,
                 stop: threading.Event | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Joint latents from fixed-seed noise (`meanflow.samplers.sample_latents`), guided by `guidance`: batches
    of (noise, latents at t = 0, the batch's sites or None), on the CPU. A site-conditioned adapter puts
    sample i's lesion at `sites[i % len(sites)]` ((k, 3) model-grid voxel coordinates) when given, else at a
    site drawn from its prior (`JointModel.draw_sites`). `on_step` / `stop`: progress and cancel per network step."""
    sites = joint.draw_sites(n, seed) if sites is None else joint.given_sites(sites, n)

    def velocity(noise: torch.Tensor, start: int) -> VelocityFn:
        batch_sites = None if sites is None else sites[start:start + len(noise)]
        return joint_velocity(joint, noise, guidance, batch_sites)

    # x-predicted mask channels: the last Euler step from where u = (z - x^) / t holds exactly, so the mask
    # latent is the model's estimate (equal steps below X_PREDICTION_MIN_T kept ~1% of the starting noise)
    last_t = X_PREDICTION_MIN_T if joint.meta.mask_prediction == "x" else 0.0
    start = 0
    for noise, z in sample_latents(joint.model, joint.meta.latent_shape, n, steps, seed, device, method,
                                   velocity=velocity, last_t=last_t, on_step=on_step, stop=stop):
        yield noise, z, None if sites is None else sites[start:start + len(noise)]
        start += len(noise)


def generate_pairs(adapter: str | Path = "embedded", n: int = 4, steps: int = 1, seed: int = 0,
                   device: str = "auto", method: str = "meanflow",
                   render: str | Path | None = None, guidance: float | None = None,
                   joint_guidance: float | None = None, sites: Any = None,
                   on_step: Callable[[int, int], None] | None = None,
                   stop: threading.Event | None = None, texture: bool = True,
                   mask_draws: int = MASK_DRAWS) -> Iterator[GeneratedPair]:
    """Joint FLAIR + lesion mask samples, decoded by the adapter's strategy; sample i depends only on (seed, i).

    With `render`, the pair's FLAIR is generated again for its mask by a conditional adapter (same base model and
    grid), from the same image noise: two-stage synthesis, the mask from the joint model and the FLAIR from the
    ControlNet, which learned to show a lesion under its mask (the joint image channels barely do).

    Args:
        adapter: a joint adapter folder, "embedded" (the shipped 2 mm one) or "embedded-3mm".
        n: number of pairs.
        steps: sampler steps (1 = one-step MeanFlow), for the joint model and the renderer.
        seed: noise seed.
        device: "auto", "cpu", "cuda" or "cuda:N".
        method: sampler, "meanflow" or "euler" (k-step or Euler sampling for an x-prediction adapter).
        render: optional conditional adapter folder (or "embedded" / "embedded-3mm") that renders the FLAIRs.
        guidance: the renderer's mask guidance scale (`neuromf.generation.guidance.guided_velocity`); None = the
            renderer's own (`AdapterMeta.guidance`).
        joint_guidance: the joint model's guidance against the empty mask's path
            (`neuromf.generation.guidance.empty_path_guidance`; 1 = none, > 1 commits more strongly to a lesion); None =
            the joint adapter's own (`AdapterMeta.guidance`).
        sites: a site-conditioned adapter's lesion sites, (k, 3) voxel coordinates on the model grid (the written
            pairs' grid), used in turn; None = drawn from the adapter's prior (`neuromf.models.site.draw_sites`).
        on_step: called with (i, steps) after each network step, of the joint pass (a batch of up to 4 pairs) and of
            each render pass (`neuromf.meanflow.sample`).
        stop: when set, `neuromf.meanflow.SamplingStopped` is raised before the next network step.
        texture: add the VAE's scanner texture to each FLAIR (`neuromf.generation.images.with_texture`); off =
            the decoder's mean, smoother than any scan.
        mask_draws: joint draws per pair at most: a mask that is empty or smaller than the smallest lesion the
            lesion check accepts (`smallest_lesion_voxels`) is drawn again from fresh noise (seed
            `derived_seed(seed, i, k)`, a new site unless `sites` were given); the last draw is kept whatever it is.
            1 = every pair's first draw (what the quick adapter check and the guidance calibration judge).
    Yields:
        `GeneratedPair`s: image (H, W, D) float32 in [0, clip_max], mask (H, W, D) uint8 {0, 1}, the model grid's
        (4, 4) affine, and meta (seed, steps, adapter, strategy, `joint_guidance`, `mask_draws` (the draws the
        pair took) and `draw_seed` after a re-draw, `mask_noise_correlation`: about 0 when the mask latent left its
        noise behind; `rendered_by` with `render`).
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
        guidance = renderer.meta.render_guidance_scale(guidance)
        rendering = {"rendered_by": str(resolve_adapter_dir(render, "conditional")), "guidance": guidance}
    prep = joint.meta.prep
    affine = model_grid_affine(prep.shape, prep.spacing)
    source = str(resolve_adapter_dir(adapter, "joint"))
    floor = smallest_lesion_voxels(adapter, prep.spacing) if mask_draws > 1 else 0.0
    index = 0
    n_img = joint.meta.n_image

    def decode(z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        # a rendered pair's FLAIR replaces the joint one: decode only the masks then
        return joint.split(z.to(dev)) if renderer is None else (None, joint.mask(z.to(dev)))

    for noise, z, batch_sites in sample_joint(joint, n, steps, seed, dev, method, joint_guidance, sites, on_step, stop):
        images, masks = decode(z)
        for i in range(z.shape[0]):
            pair_noise, pair_z, site = noise[i:i + 1], z[i:i + 1], None if batch_sites is None else batch_sites[i:i + 1]
            image, mask = None if images is None else images[i:i + 1], masks[i:i + 1]
            draws, draw_meta = 1, {}
            while draws < mask_draws and float(mask.sum()) < floor:
                draw_seed = derived_seed(seed, index, draws)
                given = None if sites is None else site.numpy()  # a drawn site is drawn again with the noise
                pair_noise, pair_z, site = next(iter(sample_joint(joint, 1, steps, draw_seed, dev, method,
                                                                  joint_guidance, given, on_step, stop)))
                image, mask = decode(pair_z)
                draws, draw_meta = draws + 1, {"draw_seed": draw_seed}
            # how much of its starting noise the mask latent kept (a working generator: about 0)
            corr = float(np.corrcoef(pair_z[0, n_img:].flatten(), pair_noise[0, n_img:].flatten())[0, 1])
            mask = mask[0, 0].numpy().astype(np.uint8)
            meta = {"index": index, "seed": seed, "steps": steps, "sampler": method, "adapter": source,
                    "mode": "joint", "strategy": joint.strategy, "joint_guidance": joint_guidance,
                    "mask_draws": draws, **draw_meta, "mask_noise_correlation": round(corr, 4),
                    **({} if site is None else {"site_voxel": [round(float(v), 1) for v in site[0]],
                                                "site_given": sites is not None}),
                    **rendering}
            if renderer is None:
                image = image[0, 0].numpy().astype(np.float32)
            else:
                image = renderer.generate(mask, pair_noise[0, :n_img], steps, method, guidance, on_step, stop)
            image, texture_meta = with_texture(image, joint.vae, seed, index, texture)
            yield GeneratedPair(index, image, mask, affine, {**meta, **texture_meta})
            index += 1


def calibrate_joint_guidance(adapter: str | Path = "embedded", scales: tuple[float, ...] = CALIBRATION_SCALES,
                             n: int = 8, steps: int = 32, seeds: int | tuple[int, ...] = (1000, 1001),
                             device: str = "auto", method: str = "euler", data: str | Path | None = None,
                             reference: str = "real") -> dict[str, Any]:
    """The joint guidance whose masks match the real lesions in size.

    Two trainings of one recipe can commit to a lesion with different strength (one drew lesions of real size, the other
    mostly empty masks and specks), and joint guidance (`neuromf.generation.guidance.empty_path_guidance`) sets that
    strength. For each scale, `n` masks per seed are sampled (masks only, no FLAIR) and the median volume of all of
    them, empty masks counting 0 cm^3, is compared with the median volume of the reference lesions; the scale with the
    nearest median on a log scale is chosen (volumes are judged by ratios: the criteria allow 0.5x the smallest to 2x
    the largest real lesion; a median of 0, mostly empty masks, is never chosen while another is not). The volume rises
    steeply with the scale (0.8 -> 8.6 cm^3 from 1.0 to 1.1 for one training): keep the grid fine. The median of 8 masks
    of one seed is noisy (one training: 4.0 cm^3 on the calibration seed, 4.8 and 7.4 on fresh ones at the same scale):
    pool seeds. A training can also over-commit (48 cm^3 at 1 for one trained on a GPU): the default grid goes below 1,
    and `outside_range` says when the target lies beyond the scales tried (extend them). The default seeds keep these
    draws apart from the usual evaluation seeds.

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
            per_seed.append([float(m.sum()) * voxel_cm3
                             for _, z, _ in sample_joint(joint, n, steps, seed, dev, method, scale)
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
                          on_step: Callable[[int, int], None] | None = None, texture: bool = True,
                          mask_draws: int = MASK_DRAWS) -> list[Path]:
    """Joint pairs written by `neuromf.generation.images.write_pairs`.

    Args:
        adapter, n, steps, seed, device, method, render, guidance, joint_guidance, sites, on_step, texture,
            mask_draws: as for `generate_pairs`.
        out_dir: output folder.
    Returns:
        The written paths: FLAIR, mask and JSON per pair.
    """
    return write_pairs(generate_pairs(adapter, n, steps, seed, device, method, render, guidance, joint_guidance,
                                      sites, on_step, texture=texture, mask_draws=mask_draws), out_dir)
