"""Conditional mode, mask -> FLAIR: training a ControlNet on the frozen MeanFlow UNet, on FCD + healthy cases.

Beyond the spec (which generates mask channels jointly): the lesion mask is a clean input, so generated lesions
are lesion-shaped by construction, and training only has to make the FLAIR show them. The loss covers the image
latents with a strong lesion weight; healthy cases enter with empty masks. Generation with a trained adapter lives
in `neuromf.generation.conditional`.

Deprecated (kept for one release, with a DeprecationWarning): the generation names `ConditionalModel`,
`load_conditional_model`, `generate_conditional_pairs`, `write_conditional_pairs`, `pair_noise`,
`empty_mask_control`, `PLACEMENT_ROUNDS` (now `neuromf.generation.conditional`) and `guided_velocity`
(`neuromf.generation.guidance`). `load_controlnet_weights` moved to `neuromf.models.controlnet`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Generator
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from neuromf.config import RunConfig
from neuromf.data.augment import AffineAugment
from neuromf.data.fcd_dataset import FCDDataset, item_parts
from neuromf.data.latents import encoding_events
from neuromf.data.mask_codec import lesion_region, pixel_shuffle_3d
from neuromf.data.mask_prior import PRIOR, MaskPrior
from neuromf.io.nifti import Preprocessing
from neuromf.meanflow import sample
from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.models.adapter_meta import (
    ADAPTER_DIR,
    CONTROLNET_WEIGHTS,
    SIDECAR,
    AdapterMeta,
    adapter_meta,
    base_reference,
    data_reference,
    is_conditional_adapter,
    resolve_adapter_dir,
)
from neuromf.models.controlnet import (
    ConditionedFlowModel,
    MeanFlowControlNet,
    controlnet_from_unet,
    load_controlnet_weights,
)
from neuromf.models.flow_model import load_flow_model
from neuromf.train.distributed import device_for, main_first
from neuromf.train.loop import LossFn, TrainEvent, TrainResult, TrainTask, fixed_draw_evaluator, train
from neuromf.train.run_dir import in_run_dir
from neuromf.utils import atomic_write, default_cache_dir, moved_names
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper, vae_for


def stage2_preprocessing(base_meta: dict[str, Any], cfg: RunConfig) -> Preprocessing:
    """The base model's grid (shape, spacing, percentiles: its latents' layout) with stage 2's own intensity bound
    `data.clip_max`: FCD lesions are brighter than the 99.5th percentile, and a base model trained on clipped
    healthy scans would otherwise clip every lesion it is fine-tuned on.

    Stage 2 always works on the base model's grid and VAE: `data.shape`, `data.spacing` or `model.vae` set to
    something else (not left at their defaults) are ignored with a warning that names them.
    """
    prep = dataclasses.replace(Preprocessing.from_dict(base_meta["preprocessing"]), clip_max=cfg.data.clip_max)
    defaults = RunConfig()
    ignored = []
    for key, asked, default, used in (
            ("data.shape", tuple(cfg.data.shape), tuple(defaults.data.shape), prep.shape),
            ("data.spacing", tuple(map(float, cfg.data.spacing)), tuple(defaults.data.spacing), prep.spacing),
            ("model.vae", cfg.model.vae, defaults.model.vae, base_meta.get("vae"))):
        if asked != default and asked != used and not (key == "model.vae" and _same_path(asked, used)):
            ignored.append(f"{key}={list(asked) if isinstance(asked, tuple) else asked} (the base model's: "
                           f"{list(used) if isinstance(used, tuple) else used})")
    if ignored:
        warnings.warn("stage 2 uses the base model's grid and VAE; ignored: " + "; ".join(ignored), stacklevel=2)
    return prep


def _same_path(a: str, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(str(b)).resolve()
    except (OSError, RuntimeError):
        return False


def packed_lesion_loss(loss: MeanFlowLoss, n_model_channels: int, conditional: bool,
                       dilate: int = 1) -> LossFn:
    """The stage-2 loss on packed batches (N, C + 64, h, w, d): model channels, then the full-resolution mask
    pixel-unshuffled (`FCDDataset.packed`). The mask gives the lesion region the loss weighs, and in the
    conditional mode it is also the ControlNet's input."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch[:, :n_model_channels]
        mask = pixel_shuffle_3d(batch[:, n_model_channels:], DOWNSAMPLE)
        return loss(model, x, generator, lesion=lesion_region(mask, dilate), cond=mask if conditional else None)

    return loss_fn


@in_run_dir
def train_conditional(cfg: RunConfig, base_checkpoint: str | Path = "embedded", resume: bool = False,
                      overwrite: bool = False, stop: Event | None = None,
                      progress: bool = True) -> Generator[TrainEvent, None, TrainResult]:
    """Train a ControlNet (the UNet stays frozen) on FCD + healthy image latents conditioned on their masks.

    Exports `<output_dir>/adapter`: the ControlNet weights, a mask prior of the training lesions and a sidecar.
    """
    out_dir = Path(cfg.training.output_dir)
    torch.manual_seed(cfg.training.seed)
    base, base_meta = load_flow_model(base_checkpoint, preset=cfg.model.preset)
    if base.in_channels != 4:
        raise ValueError(f"{base_checkpoint}: the conditional mode starts from an image-only (4-channel) model, "
                         f"got {base.in_channels} channels")
    controlnet = controlnet_from_unet(base, cfg.conditional.embedding_channels)
    if cfg.conditional.init_from:
        load_controlnet_weights(controlnet, resolve_adapter_dir(cfg.conditional.init_from, "conditional"))
    model = ConditionedFlowModel(base, controlnet)
    vae = vae_for(base_meta, device=device_for(cfg.training.device))  # encode (and preview) where it trains
    prep = stage2_preprocessing(base_meta, cfg)
    with main_first():  # several processes: rank 0 fills the latent cache, then the others read it
        dataset = conditional_dataset(cfg, vae, prep, progress, encode=False)
        yield from encoding_events(dataset.encode_cases())  # an "encoding" event per case
    images = dataset.image_latents()
    data = dataset.packed(images)
    prior = build_mask_prior(dataset)
    sidecar = AdapterMeta(
        mode="conditional", **base_reference(base_checkpoint, base_meta), preprocessing=prep.key(),
        latent_shape=list(images.shape[1:]), channels={"image": 4, "mask": 0}, config=cfg.to_dict(),
        data_dir=data_reference(cfg.data.data_dir, dataset.root), train_cases=[case_id for case_id, _ in dataset.items],
        lesion_weight=cfg.loss.lesion_weight, trainable_params=sum(p.numel() for p in controlnet.parameters()),
        total_params=sum(p.numel() for p in model.parameters()), controlnet=controlnet.arch,
        n_healthy=dataset.n_healthy)
    loss_fn = packed_lesion_loss(MeanFlowLoss.from_config(cfg.loss, 4, 0), 4, conditional=True,
                                 dilate=cfg.loss.lesion_dilate)
    preview_mask = torch.from_numpy(prior.sample(np.random.default_rng(cfg.training.seed))).float()[None, None]
    preview_noise = torch.randn((1, *images.shape[1:]), generator=torch.Generator().manual_seed(cfg.training.seed))

    def export(m: ConditionedFlowModel, directory: Path) -> Path:
        return save_conditional_adapter(m.controlnet, prior, directory / ADAPTER_DIR, sidecar)

    def preview(m: ConditionedFlowModel) -> list[tuple[np.ndarray, np.ndarray]]:
        device = next(m.parameters()).device
        z = sample(functools.partial(m, cond=preview_mask.to(device)), preview_noise.to(device), steps=1)
        image = vae.decode(z)[0, 0].clamp(0, prep.clip_max).cpu().numpy()
        return [(image, preview_mask[0, 0].numpy().astype(np.uint8))]

    task = TrainTask(model=model, loss_fn=loss_fn, export=export, preview=preview,
                     evaluate=fixed_draw_evaluator(loss_fn, _lesion_first(data), cfg.training.eval_samples),
                     meta={"kind": "conditional", "base_checkpoint": str(base_checkpoint)})
    return (yield from train(task, data, cfg.training, out_dir, stop=stop, resume=resume))


def conditional_dataset(cfg: RunConfig, vae: MAISIVAEWrapper, prep: Preprocessing,
                        progress: bool = False, encode: bool = True) -> FCDDataset:
    """The conditional mode's training set: FCD cases with their masks (+ healthy cases with empty masks);
    `encode=False` leaves the encoding to `FCDDataset.encode_cases`."""
    return FCDDataset(cfg.data.data_dir, "downsample", vae=vae, prep=prep,
                      cache_dir=cfg.data.cache_dir or default_cache_dir(), flip=cfg.data.flip, split=cfg.data.split,
                      progress=progress, include_healthy=cfg.conditional.include_healthy, encode=encode,
                      augment=AffineAugment.from_config(cfg.data))


@torch.no_grad()
def build_mask_prior(dataset: FCDDataset) -> MaskPrior:
    """The prior of a training set: its lesions, each with the depth range measured in its own preprocessed FLAIR
    (as the lesion-likeness check measures real lesions), and the mean of those FLAIRs as reference brain."""
    # the cases as scanned: moved copies would only repeat each lesion (and cost a preprocessing each)
    with_lesion = [(item_id, t) for item_id, t in dataset.items if t["mask"].any() and not item_parts(item_id)[2]]
    masks = [t["mask"][0].numpy() for _, t in with_lesion]
    images = [dataset.image_volume(item_id)[0].numpy() for item_id, _ in with_lesion]
    return MaskPrior.from_cases(masks, images, dataset.prep.spacing)


def rebuild_mask_prior(adapter: str | Path) -> Path:
    """Re-make an adapter's mask prior from its own training data and settings (after the prior's code changed)."""
    from neuromf.config import config_from_dict

    directory = resolve_adapter_dir(adapter, "conditional")
    meta = adapter_meta(directory, "conditional")
    cfg = config_from_dict(meta.config, source=str(directory / SIDECAR))
    _, base_meta = load_flow_model(meta.base_checkpoint)
    vae, prep = vae_for(base_meta), meta.prep
    return build_mask_prior(conditional_dataset(cfg, vae, prep)).save(directory / PRIOR)


def _lesion_first(packed: torch.Tensor) -> torch.Tensor:
    """Samples with a lesion first, so the fixed evaluation draw measures the lesion part too."""
    has_lesion = packed[:, 4:].flatten(1).amax(1) > 0
    return torch.cat([packed[has_lesion], packed[~has_lesion]])


def save_conditional_adapter(controlnet: MeanFlowControlNet, prior: MaskPrior, directory: Path,
                             meta: AdapterMeta) -> Path:
    """ControlNet weights (safetensors) + mask prior + sidecar, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in controlnet.state_dict().items()}
    atomic_write(directory / CONTROLNET_WEIGHTS, lambda p: save_file(state, str(p)))
    prior.save(directory / PRIOR)
    meta.save(directory)
    return directory


_MOVED = {name: "neuromf.generation.conditional" for name in (
    "ConditionalModel", "PLACEMENT_ROUNDS", "empty_mask_control", "generate_conditional_pairs",
    "load_conditional_model", "pair_noise", "write_conditional_pairs")}
__getattr__ = moved_names(__name__, {**_MOVED, "guided_velocity": "neuromf.generation.guidance"})

__all__ = ["build_mask_prior", "conditional_dataset", "is_conditional_adapter", "packed_lesion_loss",
           "rebuild_mask_prior", "save_conditional_adapter", "stage2_preprocessing", "train_conditional"]
