"""The joint model: the frozen stage-1 UNet widened to image + mask channels with a LoRA adapter (peft).

Built for training (`build_joint_model`), loaded from a saved adapter for generation (`load_joint_model`), and
checked (`check_adapter`: a forward pass works and the trainable share of parameters, P7-T2/T3).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuromf.config import RunConfig
from neuromf.data.mask_codec import decode_mask_channel, decode_sdf, tanh_threshold, upsample_mask
from neuromf.generate import vae_for
from neuromf.models.adapter_meta import AdapterMeta, resolve_adapter_dir
from neuromf.models.flow_model import load_flow_model
from neuromf.models.lora import (
    WIDENED_MODULES,
    count_lora_params,
    count_trainable_params,
    inject_lora,
    load_adapter,
    read_adapter_meta,
    set_mask_outputs,
    widen_io_channels,
)
from neuromf.utils import resolve_device
from neuromf.vae import MAISIVAEWrapper


@dataclass
class JointModel:
    """A frozen base model with a LoRA adapter, and everything needed to turn its latents into image + mask."""

    model: torch.nn.Module
    vae: MAISIVAEWrapper
    meta: AdapterMeta

    @property
    def strategy(self) -> str:
        """How the mask channels are encoded: "vae", "downsample" or "sdf"."""
        return self.meta.strategy

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode joint latents into image and mask.

        Args:
            z: (B, n_image + n_mask, h, w, d) joint latents (sampled at t = 0).
        Returns:
            (image, mask) on the CPU: image (B, 1, H, W, D) in [0, clip_max], mask (B, 1, H, W, D) float in {0, 1},
            with (H, W, D) = 4 (h, w, d), the model grid.
        """
        image = self.vae.decode(z[:, :self.meta.n_image]).clamp(0, self.meta.prep.clip_max)
        return image.cpu(), self.mask(z)

    def mask(self, z: torch.Tensor) -> torch.Tensor:
        """Decode only the mask of joint latents (B, n_image + n_mask, h, w, d): (B, 1, H, W, D) float in {0, 1}
        on the CPU (what `split` returns as its mask)."""
        meta, n_img = self.meta, self.meta.n_image
        if self.strategy == "vae":
            mask = (self.vae.decode(z[:, n_img:]) > 0.5).float()
        elif self.strategy == "sdf":
            mask = decode_sdf(z[:, n_img:] / meta.mask_scale, meta.sdf_subgrid,
                              tanh_threshold(meta.sdf_threshold_mm, meta.sdf_scale_mm))
        else:
            mask = upsample_mask(decode_mask_channel(z[:, n_img:], meta.mask_scale))
        return mask.cpu()


def build_joint_model(cfg: RunConfig, base_checkpoint: str | Path, n_mask: int,
                      mask_mean: float = 0.0) -> tuple[torch.nn.Module, dict]:
    """The model stage 2's joint mode trains: the base UNet widened by `n_mask` channels, with LoRA injected.

    Args:
        cfg: run config (`model.preset` must match the base model; `lora.*` sets the injection).
        base_checkpoint: the image-only (4-channel) stage-1 model ("embedded", a folder or a weights file).
        n_mask: mask channels the strategy adds (`mask_channels`).
        mask_mean: the training mask channels' mean, the centre of the x-prediction skip (`lora.mask_sigma_data`).
    Returns:
        (peft model over (B, 4 + n_mask, h, w, d) latents, the base model's sidecar dict).
    Raises:
        ValueError: the base model is not image-only.
    """
    base, base_meta = load_flow_model(base_checkpoint, preset=cfg.model.preset)
    if base.in_channels != 4:
        raise ValueError(f"{base_checkpoint}: base model has {base.in_channels} input channels; stage 2 starts from "
                         "an image-only (4-channel) stage-1 model")
    channels = base.in_channels + n_mask
    widen_io_channels(base, channels, channels)
    set_mask_outputs(base, n_mask, cfg.lora.mask_prediction, cfg.lora.mask_passthrough, cfg.lora.mask_sigma_data,
                     mask_mean)
    model = inject_lora(base, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                        modules_to_save=WIDENED_MODULES, dropout=cfg.lora.dropout)
    return model, base_meta


def load_joint_model(adapter: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> JointModel:
    """Base model named in the adapter sidecar + the adapter (merged for inference by default).

    Args:
        adapter: an adapter folder or "embedded" (the shipped joint demo).
        device: where the model and its VAE run.
        merge: merge LoRA into the weights (faster sampling).
    Returns:
        The `JointModel`, in eval mode.
    Raises:
        ValueError: the base model's weights are not the ones the adapter was trained on.
    """
    directory = resolve_adapter_dir(adapter, "joint")
    meta = read_adapter_meta(directory)
    base_spec = meta.base_checkpoint
    base, base_meta = load_flow_model(base_spec)
    if base_meta["weights_sha256"] != meta.base_sha256:
        raise ValueError(f"{directory}: adapter was trained on a different base model than {base_spec} "
                         "(weights hash differs)")
    model = load_adapter(base, directory, merge=merge).to(resolve_device(device)).eval()
    return JointModel(model, vae_for(meta.vae_reference(), device=resolve_device(device)), meta)


@torch.no_grad()
def check_adapter(adapter: str | Path) -> dict[str, Any]:
    """P7-T2/T3 on a saved adapter: a forward pass with LoRA succeeds, and the trainable share of parameters.

    Args:
        adapter: an adapter folder or "embedded".
    Returns:
        {"forward_ok", "output_shape", "trainable", "total", "fraction", "lora_params"}; the forward pass runs one
        random (1, C, h, w, d) latent of the sidecar's `latent_shape`.
    """
    directory = resolve_adapter_dir(adapter, "joint")
    meta = read_adapter_meta(directory)
    base, _ = load_flow_model(meta.base_checkpoint)
    channels = meta.n_image + meta.n_mask
    fresh = copy.deepcopy(base)
    model = load_adapter(base, directory, merge=False)
    z = torch.randn((1, *meta.latent_shape))
    out = model(z, torch.zeros(1), torch.ones(1))
    # trainable share as in training: rebuild the same injection on a fresh copy
    widen_io_channels(fresh, channels, channels)
    cfg = meta.config["lora"]
    trainable_model = inject_lora(fresh, cfg["rank"], cfg["alpha"], cfg["target_modules"], WIDENED_MODULES)
    trainable, total = count_trainable_params(trainable_model)
    return {"forward_ok": bool(torch.isfinite(out).all()) and tuple(out.shape) == tuple(z.shape),
            "output_shape": list(out.shape), "trainable": trainable, "total": total, "fraction": trainable / total,
            "lora_params": count_lora_params(trainable_model)}
