"""Stage 1: a MeanFlow UNet trained from scratch on image latents of healthy brains (C = 4)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from threading import Event

import torch

from neuromf.config import RunConfig
from neuromf.data.embedded import resolve_data_dir
from neuromf.data.latents import encode_images_stepwise, encoding_events, make_cache
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import Preprocessing
from neuromf.meanflow import MeanFlowLoss
from neuromf.models.flow_model import load_flow_model, save_flow_model
from neuromf.models.unet import MeanFlowUNet
from neuromf.train.distributed import main_first
from neuromf.train.loop import TrainEvent, TrainResult, TrainTask, train
from neuromf.train.run_dir import in_run_dir
from neuromf.utils import default_cache_dir
from neuromf.vae import MAISIVAEWrapper


def preprocessing_of(cfg: RunConfig) -> Preprocessing:
    """The model grid and intensity bound a run's `data:` section describes."""
    return Preprocessing(shape=tuple(cfg.data.shape), spacing=tuple(cfg.data.spacing), clip_max=cfg.data.clip_max)


def load_vae(cfg: RunConfig, device: str | torch.device = "cpu") -> MAISIVAEWrapper:
    """The run's VAE (`model.vae`: "embedded" or a local file; its sidecar names the preset)."""
    return MAISIVAEWrapper.resolve(cfg.model.vae, preset=cfg.model.vae_preset, device=device)


def vae_meta(cfg: RunConfig, vae: MAISIVAEWrapper, prep: Preprocessing) -> dict:
    """The entries a saved model needs to find and check its VAE again (identity, scale, grid)."""
    return {"vae": cfg.model.vae, "vae_preset": vae.preset, "vae_identity": vae.identity,
            "scale_factor": vae.scale_factor, "preprocessing": prep.key()}


@in_run_dir
def train_base(cfg: RunConfig, resume: bool = False, overwrite: bool = False, stop: Event | None = None,
               progress: bool = True) -> Generator[TrainEvent, None, TrainResult]:
    """Encode the healthy scans once (latent cache; an "encoding" event per scan), then run the training loop."""
    out_dir = Path(cfg.training.output_dir)  # prepared with config.yaml by @in_run_dir, removed on a failed start
    torch.manual_seed(cfg.training.seed)
    prep = preprocessing_of(cfg)
    vae = load_vae(cfg)
    root = resolve_data_dir(cfg.data.data_dir)
    cases = discover_cases(root, group=cfg.data.group, split=cfg.data.split)
    cache = make_cache(Path(cfg.data.cache_dir or default_cache_dir()), vae, prep)
    with main_first():  # several processes: rank 0 fills the latent cache, then the others read it
        latents = yield from encoding_events(encode_images_stepwise([c.image for c in cases], vae, prep, cache,
                                                                    flip=cfg.data.flip, progress=progress))
    model = MeanFlowUNet(in_channels=latents.shape[1], preset=cfg.model.preset)
    if cfg.model.init_from:
        model.load_state_dict(warm_start(cfg.model.init_from, model).state_dict())
    loss = MeanFlowLoss.from_config(cfg.loss)
    meta = {**vae_meta(cfg, vae, prep), "latent_shape": list(latents.shape[1:]), "init_from": cfg.model.init_from,
            "channels": {"image": latents.shape[1], "mask": 0}, "stage": 1,
            "train_cases": [c.case_id for c in cases]}
    task = TrainTask(model=model, loss_fn=loss, meta=meta,
                     export=lambda m, d: save_flow_model(m, d, meta))
    return (yield from train(task, latents, cfg.training, out_dir, stop=stop, resume=resume))


def warm_start(spec: str | Path, model: MeanFlowUNet) -> MeanFlowUNet:
    """The saved flow model `spec`, checked to have `model`'s architecture (so its weights can initialise it)."""
    source, _ = load_flow_model(spec)
    if source.arch != model.arch:
        raise ValueError(f"{spec}: model.init_from has a different architecture than the run's UNet "
                         f"({source.arch} vs {model.arch})")
    return source
