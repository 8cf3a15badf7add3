"""Training the small MAISI-class VAE on random patches (the network is fully convolutional)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from threading import Event

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from neuromf.config import RunConfig
from neuromf.data.embedded import resolve_data_dir
from neuromf.eval.image_metrics import reconstruction_metrics, ssim_3d
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import preprocess_image
from neuromf.pipelines.stage1 import preprocessing_of
from neuromf.train.loop import TrainEvent, TrainResult, TrainTask, train
from neuromf.train.run_dir import in_run_dir
from neuromf.vae import MAISIVAEWrapper


def random_patches(volumes: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random cubic patch per volume, positions multiples of 4 so the latent grid stays aligned."""
    spatial = volumes.shape[2:]
    patches = []
    for volume in volumes:
        starts = [int(torch.randint(0, (s - size) // 4 + 1, (1,), generator=generator,
                                    device=generator.device)) * 4 for s in spatial]
        patches.append(volume[:, starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size])
    return torch.stack(patches)


class VAELoss:
    """L1 reconstruction + KL of the posterior to N(0, I) (+ optional 1 - SSIM)."""

    def __init__(self, patch_size: int, kl_weight: float, ssim_weight: float = 0.0) -> None:
        self.patch_size, self.kl_weight, self.ssim_weight = patch_size, kl_weight, ssim_weight

    def __call__(self, autoencoder: nn.Module, volumes: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = random_patches(volumes, self.patch_size, generator) if self.patch_size else volumes
        recon, z_mu, z_sigma = autoencoder(x)
        l1 = F.l1_loss(recon, x)
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1).flatten(1).sum(1).mean()
        loss = l1 + self.kl_weight * kl
        parts = {"raw_l1": float(l1.detach()), "raw_kl": float(kl.detach())}
        if self.ssim_weight:
            ssim = 1 - ssim_3d(recon, x).mean()
            loss = loss + self.ssim_weight * ssim
            parts["raw_ssim_loss"] = float(ssim.detach())
        return loss, parts


def load_volumes(cfg: RunConfig, split: str | None, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """The preprocessed scans of a split (N, 1, H, W, D) and their case ids (VAE training data)."""
    prep = preprocessing_of(cfg)
    cases = discover_cases(resolve_data_dir(cfg.data.data_dir), group=cfg.data.group, split=split)
    vols = [preprocess_image(c.image, prep).data for c in tqdm(cases, desc="loading", disable=not progress)]
    return torch.stack(vols), [c.case_id for c in cases]


@in_run_dir
def train_vae(cfg: RunConfig, preset: str = "small", resume: bool = False, overwrite: bool = False,
              stop: Event | None = None, progress: bool = True) -> Generator[TrainEvent, None, TrainResult]:
    """Train on the config's split, then fit the latent scale factor and report PSNR/SSIM on the test split."""
    out_dir = Path(cfg.training.output_dir)  # prepared with config.yaml by @in_run_dir, removed on a failed start
    torch.manual_seed(cfg.training.seed)
    volumes, train_ids = load_volumes(cfg, cfg.data.split, progress)
    held_out, test_ids = load_volumes(cfg, "test", progress) if cfg.data.split == "train" else (volumes[:0], [])
    # warm start (model.init_from): a VAE trained on another grid is a good start on this one (the `fine` default)
    wrapper = (MAISIVAEWrapper.resolve(cfg.model.init_from, preset=preset) if cfg.model.init_from
               else MAISIVAEWrapper(preset=preset))
    train_len = cfg.vae_training.patch_size or cfg.data.shape[0]
    # splitting convolutions only saves memory; on small patches it costs ~20% of the step time
    wrapper.set_num_splits_for(train_len, requested=1)
    prep = preprocessing_of(cfg)
    vt = cfg.vae_training

    def export(autoencoder: nn.Module, directory: Path) -> Path:
        autoencoder.eval()
        wrapper.fit_scale_factor(list(volumes))
        quality = reconstruction_metrics(wrapper, held_out) if len(held_out) else {}
        autoencoder.train()
        wrapper.set_num_splits_for(train_len, requested=1)
        wrapper.save(directory, extra={"preprocessing": prep.key(), "train_cases": train_ids,
                                       "test_cases": test_ids, "held_out_quality": quality,
                                       "init_from": cfg.model.init_from})
        return directory / "model.safetensors"

    task = TrainTask(model=wrapper.autoencoder, loss_fn=VAELoss(vt.patch_size, vt.kl_weight, vt.ssim_weight),
                     meta={"preset": preset, "preprocessing": prep.key(), "kind": "vae"}, export=export)
    return (yield from train(task, volumes, cfg.training, out_dir, stop=stop, resume=resume))
