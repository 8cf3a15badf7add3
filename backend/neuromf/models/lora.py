"""LoRA for the MeanFlow UNet through peft, plus widening the first/last convolutions for joint image + mask.

Stage 2 keeps the healthy-brain model frozen, adapts only the attention q/k/v projections with low-rank updates
(W = W0 + alpha/r * B A, Eq. 34) and trains the widened input/output convolutions in full (peft modules_to_save).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from neuromf.models.adapter_meta import AdapterMeta
from neuromf.models.unet import MeanFlowUNet
from neuromf.weights import WeightFileError, load_state_dict

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v"]
# MONAI wraps each conv in a Convolution block: peft must target the inner nn.Conv3d
WIDENED_MODULES = ["conv_in.conv", "out.2.conv"]
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _wider_conv(old: nn.Conv3d, in_channels: int, out_channels: int) -> nn.Conv3d:
    new = nn.Conv3d(in_channels, out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    old.groups, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:old.out_channels, :old.in_channels] = old.weight
        if old.bias is not None:
            new.bias.zero_()
            new.bias[:old.out_channels] = old.bias
    return new


def widen_io_channels(model: MeanFlowUNet, in_channels: int, out_channels: int) -> MeanFlowUNet:
    """Grow conv_in and the output conv from 4 to `in/out_channels` (8 for strategy A, 5 for B).

    Base weights go into the first channels and the new ones start at zero, so at step 0 the image-channel
    velocity equals the base model's whatever the mask channels hold, and the mask velocity is zero.

    Args:
        model: the UNet, modified in place.
        in_channels, out_channels: the new channel counts (image + mask channels), not smaller than the current ones.
    Returns:
        `model`, now taking (B, in_channels, h, w, d) and returning (B, out_channels, h, w, d).
    """
    if in_channels < model.in_channels or out_channels < model.out_channels:
        raise ValueError(f"cannot narrow the model ({model.in_channels}->{in_channels}, "
                         f"{model.out_channels}->{out_channels})")
    model.conv_in.conv = _wider_conv(model.conv_in.conv, in_channels, model.conv_in.conv.out_channels)
    out_conv = model.out[2].conv
    model.out[2].conv = _wider_conv(out_conv, out_conv.in_channels, out_channels)
    model.in_channels, model.out_channels = in_channels, out_channels
    return model


def set_mask_outputs(model: MeanFlowUNet, n_mask: int, prediction: str, passthrough: bool,
                     sigma_data: float | None = None, mean: float = 0.0) -> MeanFlowUNet:
    """How the widened model's last `n_mask` outputs become velocities: x-prediction (u = (z - x^) / t, with the
    EDM skip when `sigma_data` is set), the input added (u = z + g) or the velocity itself.

    Args:
        model: the widened UNet, modified in place.
        n_mask: mask channels.
        prediction: "x" or "velocity".
        passthrough: with "velocity", add the input to the mask outputs.
        sigma_data, mean: with "x", the skip's data spread and centre (`neuromf.models.unet.x_preconditioning`);
            None: x^ is the network output itself.
    Returns:
        `model`.
    """
    if prediction not in ("x", "velocity"):
        raise ValueError(f"mask_prediction must be 'x' or 'velocity', got {prediction!r}")
    if sigma_data is not None and not sigma_data > 0:
        raise ValueError(f"mask_sigma_data must be > 0 (or None), got {sigma_data!r}")
    model.x_channels = n_mask if prediction == "x" else 0
    model.skip_channels = n_mask if prediction == "velocity" and passthrough else 0
    model.x_sigma_data = float(sigma_data) if prediction == "x" and sigma_data else 0.0
    model.x_mean = float(mean) if model.x_sigma_data else 0.0
    return model


def inject_lora(model: nn.Module, rank: int = 16, alpha: float = 16.0, target_modules: list[str] | None = None,
                modules_to_save: list[str] | None = None, dropout: float = 0.0) -> PeftModel:
    """Wrap `model` with peft LoRA on `target_modules` (default: attention q, k, v projections).

    The base weights are frozen; LoRA matrices and `modules_to_save` (the widened convs) train.

    Args:
        model: the (widened) UNet.
        rank, alpha: LoRA rank r and scale alpha (update alpha/r * B A).
        target_modules: module-name suffixes to adapt; each must match a module.
        modules_to_save: modules trained in full and saved with the adapter (`WIDENED_MODULES`).
        dropout: LoRA dropout.
    Returns:
        The peft model; its forward is the UNet's, (B, C, h, w, d), (B,), (B,) -> (B, C, h, w, d).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise ValueError(f"LoRA target {target!r} matches no module of {type(model).__name__} "
                             f"(attention projections are named to_q/to_k/to_v)")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    peft_model = get_peft_model(model, config)
    freeze_base_unfreeze_lora(peft_model)
    return peft_model


def freeze_base_unfreeze_lora(model: nn.Module) -> None:
    """requires_grad only on LoRA matrices and modules_to_save copies; everything else frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or ".modules_to_save." in name)


def train_only(model: nn.Module, targets: list[str]) -> None:
    """requires_grad only on the LoRA matrices of `targets` (module-name suffixes) and the modules_to_save copies
    (the widened convs): a fine-tuning of part of an adapter."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            owner = name.split(".lora_", 1)[0]
            param.requires_grad_(any(owner == t or owner.endswith(f".{t}") for t in targets))
        else:
            param.requires_grad_(".modules_to_save." in name)


def warm_start_lora(model: PeftModel, directory: Path) -> None:
    """Load a saved adapter's weights (LoRA matrices, widened convs) into `model`, a fresh injection of the same
    configuration; WeightFileError naming the folder when a weight is missing or has another shape."""
    from peft import set_peft_model_state_dict

    weights = Path(directory) / "adapter_model.safetensors"
    state = load_state_dict(weights, nested_key=None)
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as err:  # size mismatch
        raise WeightFileError(f"{directory}: adapter weights do not fit this run's LoRA injection ({err})") from err
    missing = [k for k in result.missing_keys if "lora_" in k or ".modules_to_save." in k]
    if missing or result.unexpected_keys:
        raise WeightFileError(f"{directory}: adapter weights do not fit this run's LoRA injection (missing "
                              f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


def count_trainable_params(model: nn.Module) -> tuple[int, int]:
    """Parameter counts of a model.

    Args:
        model: any module (a peft model counts its frozen base too).
    Returns:
        (trainable, total) numbers of scalar parameters.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def count_lora_params(model: nn.Module) -> int:
    """Number of scalar parameters in LoRA matrices (names containing `lora_`).

    Args:
        model: a peft-injected model.
    Returns:
        The count; compare with `expected_lora_params`.
    """
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def expected_lora_params(model: nn.Module, rank: int, target_modules: list[str] | None = None) -> int:
    """Eq. 35 generalised to layers of different widths: sum over targeted Linear(d_in, d_out) of r (d_in + d_out)."""
    targets = target_modules or DEFAULT_TARGET_MODULES
    return sum(rank * (m.in_features + m.out_features) for name, m in _projections(model)
               if any(name == t or name.endswith(f".{t}") for t in targets))


def _projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear projections by name, seen through peft's LoRA wrappers (which keep in/out_features)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features") and ".base_layer" not in name
            and "lora_" not in name]


def attention_layers(model: nn.Module) -> list[tuple[str, int]]:
    """(name, d_model) of every attention block with a q projection: L and d of Eq. 35."""
    return [(name[: -len(".to_q")], m.in_features) for name, m in _projections(model) if name.endswith("to_q")]


def save_adapter(model: PeftModel, directory: Path, meta: AdapterMeta,
                 extra: Callable[[Path], Any] | None = None) -> Path:
    """peft's own format (adapter_config.json + adapter_model.safetensors) plus our sidecar, swapped in atomically.

    Args:
        model: the peft-wrapped joint model.
        directory: the adapter folder; an existing one is replaced only once the new one is complete.
        meta: the sidecar to write beside peft's files.
        extra: writes further files into the folder being built (e.g. a site-conditioned adapter's mask prior).
    Returns:
        `directory`.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        meta.save(staging)
        if extra is not None:
            extra(staging)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_adapter_meta(directory: Path) -> AdapterMeta:
    """The sidecar of a LoRA adapter folder, once peft's own files are known to be there."""
    directory = Path(directory)
    for name in PEFT_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a NeuroMF LoRA adapter (missing {name})")
    return AdapterMeta.load(directory)


def load_adapter(base: MeanFlowUNet, directory: Path, merge: bool = False) -> nn.Module:
    """Widen `base` as the sidecar says, load the adapter with peft, optionally merge it for inference.

    Args:
        base: the stage-1 UNet named in the sidecar (modified in place).
        directory: the adapter folder.
        merge: fold the LoRA update into the weights and return a plain UNet.
    Returns:
        The joint model: (B, n_image + n_mask, h, w, d), (B,), (B,) -> (B, n_image + n_mask, h, w, d).
    Raises:
        ValueError: the base model has the wrong number of input channels.
        WeightFileError: the adapter does not load onto the base model.
    """
    meta = read_adapter_meta(directory)
    if base.in_channels != meta.n_image:
        raise ValueError(f"{directory}: adapter expects a base model with {meta.n_image} input channels, "
                         f"got {base.in_channels}")
    channels = meta.n_image + meta.n_mask
    widen_io_channels(base, channels + int(meta.site_condition), channels)
    set_mask_outputs(base, meta.n_mask, meta.mask_prediction, meta.mask_passthrough, meta.mask_sigma_data,
                     meta.mask_mean)
    load_state_dict(directory / "adapter_model.safetensors", nested_key=None)  # corrupt file: error naming it
    try:
        model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    except (RuntimeError, TypeError, KeyError, ValueError, OSError) as err:  # size mismatch, bad adapter_config
        raise WeightFileError(f"{directory}: LoRA adapter does not load onto its base model ({err})") from err
    if merge:
        return model.merge_and_unload()
    return model
