"""Training the small MAISI-class VAE on random patches (the network is fully convolutional)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from threading import Event
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from neuromf.config import RunConfig
from neuromf.data.embedded import resolve_data_dir
from neuromf.eval.image_metrics import reconstruction_metrics, ssim_3d
from neuromf.eval.realism import fit_vae_texture
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
        return self.reconstruction_loss(x, recon, z_mu, z_sigma)

    def reconstruction_loss(self, x: torch.Tensor, recon: torch.Tensor, z_mu: torch.Tensor,
                            z_sigma: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted L1 + KL (+ SSIM) loss of one reconstruction and its unweighted parts."""
        l1 = F.l1_loss(recon, x)
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1).flatten(1).sum(1).mean()
        loss = l1 + self.kl_weight * kl
        parts = {"raw_l1": float(l1.detach()), "raw_kl": float(kl.detach())}
        if self.ssim_weight:
            ssim = 1 - ssim_3d(recon, x).mean()
            loss = loss + self.ssim_weight * ssim
            parts["raw_ssim_loss"] = float(ssim.detach())
        return loss, parts


class AutoencoderWithDiscriminator(nn.Module):
    """The autoencoder and a patch discriminator as one module, so the one training loop trains, averages and
    checkpoints (resumes) both.

    One forward gives what both players' losses need, with the gradients kept apart: the decoder's adversarial
    term sees the discriminator through detached weights (it cannot move them), the discriminator's term sees
    detached reconstructions (it cannot move the decoder). One backward of the sum then equals the usual
    alternating updates of a GAN step computed on the same batch.
    """

    def __init__(self, autoencoder: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.autoencoder, self.discriminator = autoencoder, discriminator

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        """The reconstruction, the posterior, and the discriminator's outputs (lists of features, logits last) on
        it for the decoder's loss, on it detached for the discriminator's, and on the real patches."""
        recon, z_mu, z_sigma = self.autoencoder(x)
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return {"recon": recon, "z_mu": z_mu, "z_sigma": z_sigma,
                "fake_for_decoder": functional_call(self.discriminator, frozen, (recon,)),
                "fake_for_discriminator": self.discriminator(recon.detach()),
                "real": self.discriminator(x)}


def build_discriminator(channels: int, layers: int) -> PatchDiscriminator:
    """MONAI's PatchDiscriminator (as in MAISI / the MONAI generative tutorials) with instance norm: batches of
    four patches are too small for batch norm, and instance norm keeps no running statistics outside the weights."""
    return PatchDiscriminator(spatial_dims=3, channels=channels, in_channels=1, out_channels=1,
                              num_layers_d=layers, norm="INSTANCE")


class AdversarialVAELoss(VAELoss):
    """`VAELoss` + adversarial_weight * the decoder's patch-adversarial loss (+ feature matching: L1 between the
    discriminator's inner features of real and decoded patches), plus the discriminator's own loss."""

    def __init__(self, patch_size: int, kl_weight: float, ssim_weight: float, adversarial_weight: float,
                 criterion: str = "least_squares", feature_matching_weight: float = 0.0) -> None:
        super().__init__(patch_size, kl_weight, ssim_weight)
        self.adversarial_weight, self.feature_matching_weight = adversarial_weight, feature_matching_weight
        # plain least squares: MONAI's default leaky-ReLU output (slope 0.05) let our discriminator sink below 0 for
        # real and decoded patches alike and stay there (measured: its loss stuck at 0.66, worse than chance's 0.25)
        self.adversarial = PatchAdversarialLoss(criterion=criterion, no_activation_leastsq=True)

    def __call__(self, model: nn.Module, volumes: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = random_patches(volumes, self.patch_size, generator) if self.patch_size else volumes
        out = model(x)
        loss, parts = self.reconstruction_loss(x, out["recon"], out["z_mu"], out["z_sigma"])
        fooling = self.adversarial(out["fake_for_decoder"][-1], target_is_real=True, for_discriminator=False)
        discriminator = 0.5 * (
            self.adversarial(out["fake_for_discriminator"][-1], target_is_real=False, for_discriminator=True)
            + self.adversarial(out["real"][-1], target_is_real=True, for_discriminator=True))
        matching = torch.stack([F.l1_loss(fake, real.detach()) for fake, real in
                                zip(out["fake_for_decoder"][:-1], out["real"][:-1])]).mean()
        loss = loss + self.adversarial_weight * fooling + self.feature_matching_weight * matching + discriminator
        parts.update({"raw_adversarial": float(fooling.detach()), "raw_feature_matching": float(matching.detach()),
                      "raw_discriminator": float(discriminator.detach())})
        return loss, parts


def freeze_encoder(autoencoder: nn.Module) -> None:
    """Only the decoder side (post_quant_conv + decoder) trains: the encoder and its posterior convolutions keep
    their weights bit for bit, so the latents of every scan, and the models trained on them, stay valid."""
    for name, p in autoencoder.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))


def load_volumes(cfg: RunConfig, split: str | None, progress: bool = True,
                 max_cases: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The preprocessed scans of a split (N, 1, H, W, D) and their case ids (VAE training data); only the first
    `max_cases` are read when given."""
    prep = preprocessing_of(cfg)
    cases = discover_cases(resolve_data_dir(cfg.data.data_dir), group=cfg.data.group, split=split)[:max_cases]
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
    if vt.decoder_only and not cfg.model.init_from:
        raise ValueError("vae_training.decoder_only needs a trained VAE to start from: set model.init_from")
    if vt.decoder_only:
        freeze_encoder(wrapper.autoencoder)
    model: nn.Module = wrapper.autoencoder
    loss_fn: VAELoss = VAELoss(vt.patch_size, vt.kl_weight, vt.ssim_weight)
    if vt.adversarial_weight or vt.feature_matching_weight:
        model = AutoencoderWithDiscriminator(wrapper.autoencoder,
                                             build_discriminator(vt.discriminator_channels, vt.discriminator_layers))
        loss_fn = AdversarialVAELoss(vt.patch_size, vt.kl_weight, vt.ssim_weight, vt.adversarial_weight,
                                     vt.adversarial_criterion, vt.feature_matching_weight)

    def export(trained: nn.Module, directory: Path) -> Path:
        trained.eval()
        if not vt.decoder_only:  # a frozen encoder gives the same latents: its scale factor stays as it was
            wrapper.fit_scale_factor(list(volumes))
        quality = reconstruction_metrics(wrapper, held_out) if len(held_out) else {}
        texture = fit_vae_texture(wrapper, volumes)
        trained.train()
        wrapper.set_num_splits_for(train_len, requested=1)
        wrapper.save(directory, extra={"preprocessing": prep.key(), "train_cases": train_ids,
                                       "test_cases": test_ids, "held_out_quality": quality,
                                       "init_from": cfg.model.init_from, "decoder_only": vt.decoder_only,
                                       **texture})
        return directory / "model.safetensors"

    task = TrainTask(model=model, loss_fn=loss_fn, export=export,
                     meta={"preset": preset, "preprocessing": prep.key(), "kind": "vae"})
    return (yield from train(task, volumes, cfg.training, out_dir, stop=stop, resume=resume))
