"""Stage 2, joint mode: LoRA fine-tuning on FCD image + mask latents (generation: `neuromf.generation.joint`).

Deprecated (kept for one release, with a DeprecationWarning): the generation names `generate_pairs`,
`write_generated_pairs`, `calibrate_joint_guidance`, `interpolate_scale`, `target_outside_scales`,
`log_ratio_gap` and `load_renderer`, now in `neuromf.generation.joint`.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Generator
from pathlib import Path
from threading import Event

import numpy as np
import torch

from neuromf.config import RunConfig
from neuromf.data.augment import AffineAugment
from neuromf.data.fcd_dataset import FCDDataset
from neuromf.data.latents import encoding_events
from neuromf.data.mask_codec import mask_channels
from neuromf.data.mask_prior import PRIOR
from neuromf.eval.mask_test import read_decision
from neuromf.meanflow.loss import MeanFlowLoss
from neuromf.models.adapter_meta import ADAPTER_DIR, AdapterMeta, base_reference, data_reference, resolve_adapter_dir
from neuromf.models.flow_model import read_model_meta
from neuromf.models.joint import JointModel, build_joint_model
from neuromf.models.lora import (
    count_lora_params,
    count_trainable_params,
    save_adapter,
)
from neuromf.models.site import SiteConditionedJoint
from neuromf.pipelines.conditional import (
    build_mask_prior,
    packed_lesion_loss,
    stage2_preprocessing,
)
from neuromf.train.distributed import device_for, main_first
from neuromf.train.loop import TrainEvent, TrainResult, TrainTask, fixed_draw_evaluator, train
from neuromf.train.run_dir import in_run_dir
from neuromf.utils import default_cache_dir, moved_names
from neuromf.vae import vae_for

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
                     evaluate=fixed_draw_evaluator(loss_fn, data, cfg.training.eval_samples),
                     meta={"kind": "lora", "strategy": strategy, "base_checkpoint": str(base_checkpoint)})
    return (yield from train(task, data, cfg.training, out_dir, stop=stop, resume=resume))


train_lora = train_joint  # the deprecated name (one release): the plugin and scripts still call it

__getattr__ = moved_names(__name__, {name: "neuromf.generation.joint" for name in (
    "calibrate_joint_guidance", "generate_pairs", "interpolate_scale", "load_renderer", "log_ratio_gap",
    "target_outside_scales", "write_generated_pairs")})


def release_memory() -> None:
    """Give cached GPU memory back after a run (the GUI calls this when training ends or stops). On a CPU there is
    nothing to give back early: the run's tensors go by reference counting, and a full `gc.collect()` would hold
    the GIL for about 0.4 s in a napari process."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
