"""The joint model: the frozen stage-1 UNet widened to image + mask channels with a LoRA adapter (peft).

Built for training (`build_joint_model`), loaded from a saved adapter for generation (`load_joint_model`), and
checked (`check_adapter`: a forward pass works and the trainable share of parameters). Sampling it lives in
`neuromf.generation.joint` (`sample_joint`, `joint_velocity`).

Deprecated (kept for one release, with a DeprecationWarning): `empty_path_guidance`, now
`neuromf.generation.guidance.empty_path_guidance`; `JointModel.velocity` / `JointModel.sample`, now
`neuromf.generation.joint.joint_velocity` / `sample_joint`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.config import RunConfig
from neuromf.data.mask_codec import decode_mask_channel, decode_sdf, tanh_threshold, upsample_mask
from neuromf.data.mask_prior import PRIOR, MaskPrior
from neuromf.models.adapter_meta import AdapterMeta, check_base_agrees, resolve_adapter_dir
from neuromf.models.flow_model import load_flow_model
from neuromf.models.lora import (
    WIDENED_MODULES,
    count_lora_params,
    count_trainable_params,
    inject_lora,
    load_adapter,
    read_adapter_meta,
    set_mask_outputs,
    train_only,
    warm_start_lora,
    widen_io_channels,
)
from neuromf.models.site import SiteConditionedJoint, draw_sites
from neuromf.utils import moved_names, resolve_device
from neuromf.vae import MAISIVAEWrapper, vae_for


@dataclass
class JointModel:
    """A frozen base model with a LoRA adapter, and everything needed to turn its latents into image + mask."""

    model: torch.nn.Module
    vae: MAISIVAEWrapper
    meta: AdapterMeta
    # a site-conditioned adapter's sites (`neuromf.models.site`): the training lesions' mask prior
    prior: MaskPrior | None = None

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

    @property
    def empty_mask_value(self) -> float:
        """The mask channels' latent value for an empty mask (tanh of a far signed distance, or 2 * 0 - 1, times
        `mask_scale`): where the empty mask's straight path starts
        (`neuromf.generation.guidance.empty_path_guidance`)."""
        if self.strategy == "vae":
            raise ValueError("a vae-encoded mask has no constant empty value: joint guidance needs the sdf or "
                             "downsample strategy")
        return -self.meta.mask_scale

    def velocity(self, *args: Any, **kwargs: Any) -> Any:
        """Deprecated (kept for one release): `neuromf.generation.joint.joint_velocity(joint, ...)`."""
        return _moved_to_generation("velocity", "joint_velocity")(self, *args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Any:
        """Deprecated (kept for one release): `neuromf.generation.joint.sample_joint(joint, ...)`."""
        return _moved_to_generation("sample", "sample_joint")(self, *args, **kwargs)

    def given_sites(self, sites: Any, n: int) -> torch.Tensor:
        """(n, 3) float sites from user coordinates (k, 3) on the model grid, repeated in turn; ValueError unless the
        adapter is site-conditioned and every site lies on the grid."""
        if not self.meta.site_condition:
            raise ValueError("lesion sites need a site-conditioned joint adapter (lora.site_condition)")
        array = np.asarray(sites, dtype=np.float32).reshape(-1, 3)
        shape = np.asarray(self.meta.prep.shape)
        if not len(array) or not np.isfinite(array).all() or (array < 0).any() or (array > shape - 1).any():
            raise ValueError(f"lesion sites must be voxel coordinates (x, y, z) on the model grid of shape "
                             f"{tuple(int(v) for v in shape)}, each within 0..size - 1; got {array.tolist()}")
        return torch.from_numpy(array[np.arange(n) % len(array)])

    def draw_sites(self, n: int, seed: int) -> torch.Tensor | None:
        """(n, 3) lesion sites for a site-conditioned adapter (site i depends only on (seed, i)); None otherwise."""
        return draw_sites(self.prior, n, seed) if self.prior is not None else None

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


def _moved_to_generation(method: str, function: str) -> Any:
    """The generation function a deprecated `JointModel` method became, with a DeprecationWarning (resolved on use:
    models do not import generation)."""
    warnings.warn(f"JointModel.{method} is deprecated: use neuromf.generation.joint.{function}(joint, ...)",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module("neuromf.generation.joint"), function)


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
    widen_io_channels(base, channels + int(cfg.lora.site_condition), channels)
    set_mask_outputs(base, n_mask, cfg.lora.mask_prediction, cfg.lora.mask_passthrough, cfg.lora.mask_sigma_data,
                     mask_mean)
    model = inject_lora(base, rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                        modules_to_save=WIDENED_MODULES, dropout=cfg.lora.dropout)
    if cfg.lora.init_from:
        directory = resolve_adapter_dir(cfg.lora.init_from, "joint")
        check_warm_start(read_adapter_meta(directory), cfg, base_meta, n_mask, directory)
        warm_start_lora(model, directory)
    if cfg.lora.train_only:
        train_only(model, cfg.lora.train_only)
    return model, base_meta


# the `lora:` entries a warm start's adapter must share with the run (the weights' layout and what they mean)
WARM_START_KEYS = ("rank", "alpha", "target_modules", "mask_prediction", "mask_passthrough", "mask_sigma_data",
                   "site_condition")


def check_warm_start(meta: AdapterMeta, cfg: RunConfig, base_meta: dict, n_mask: int, directory: Path) -> None:
    """ValueError naming the entry when the adapter `lora.init_from` names was not made like this run's model:
    another base model, mask layout or LoRA injection."""
    if meta.mode != "joint":
        raise ValueError(f"{directory}: lora.init_from needs a joint adapter, this one is {meta.mode}")
    if meta.base_sha256 != base_meta["weights_sha256"]:
        raise ValueError(f"{directory}: lora.init_from's adapter was trained on another base model "
                         f"({meta.base_checkpoint}) than this run's")
    if meta.n_mask != n_mask:
        raise ValueError(f"{directory}: lora.init_from's adapter has {meta.n_mask} mask channels, this run {n_mask} "
                         f"(data.mask_strategy / data.sdf_subgrid)")
    theirs, ours = meta.config.get("lora", {}), dataclasses.asdict(cfg.lora)
    differ = [f"lora.{k}: {theirs.get(k)!r} vs {ours[k]!r}" for k in WARM_START_KEYS if theirs.get(k) != ours[k]]
    if differ:
        raise ValueError(f"{directory}: lora.init_from's adapter was injected otherwise than this run (adapter vs "
                         f"run: {'; '.join(differ)})")


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
    check_base_agrees(meta, base_meta, directory)
    model = load_adapter(base, directory, merge=merge).to(resolve_device(device)).eval()
    prior = None
    if meta.site_condition:
        model, prior = SiteConditionedJoint(model, meta.n_image), MaskPrior.load(directory / PRIOR)
    return JointModel(model, vae_for(meta.vae_reference(), device=resolve_device(device)), meta, prior)


@torch.no_grad()
def check_adapter(adapter: str | Path) -> dict[str, Any]:
    """The adapter check on a saved adapter: a forward pass with LoRA succeeds, and the trainable share of parameters.

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
    if meta.site_condition:
        out = SiteConditionedJoint(model, meta.n_image)(z, torch.zeros(1), torch.ones(1), cond=draw_sites(
            MaskPrior.load(directory / PRIOR), 1, 0))
    else:
        out = model(z, torch.zeros(1), torch.ones(1))
    # trainable share as in training: rebuild the same injection on a fresh copy
    widen_io_channels(fresh, channels + int(meta.site_condition), channels)
    cfg = meta.config["lora"]
    trainable_model = inject_lora(fresh, cfg["rank"], cfg["alpha"], cfg["target_modules"], WIDENED_MODULES)
    if cfg.get("train_only"):  # a run that trained part of a warm-started adapter
        train_only(trainable_model, cfg["train_only"])
    trainable, total = count_trainable_params(trainable_model)
    return {"forward_ok": bool(torch.isfinite(out).all()) and tuple(out.shape) == tuple(z.shape),
            "output_shape": list(out.shape), "trainable": trainable, "total": total, "fraction": trainable / total,
            "lora_params": count_lora_params(trainable_model)}


__getattr__ = moved_names(__name__, {"empty_path_guidance": "neuromf.generation.guidance"})
