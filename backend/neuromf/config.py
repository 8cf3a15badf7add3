"""YAML run configs validated into dataclasses: an unknown key or a wrong type is an error naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file with an unknown key, a wrong type or an invalid value."""


@dataclass
class DataConfig:
    data_dir: str = "embedded"  # "embedded" = sample_data/fcd_phantoms, else a BIDS tree or flat folder
    shape: list[int] = field(default_factory=lambda: [64, 64, 64])
    spacing: list[float] = field(default_factory=lambda: [3.0, 3.0, 3.0])
    clip_max: float = 2.0  # intensity bound after percentile scaling (99.5th -> 1); lesions are brighter than 1
    cache_dir: str | None = None  # default: $NEUROMF_CACHE or ~/.cache/neuromf/latents
    group: str | None = None  # participants.tsv group filter: "hc" for stage 1, "fcd" for stage 2
    split: str | None = "train"
    mask_strategy: str = "auto"  # "vae" (A, C=8) | "downsample" (B, C=5) | "sdf" (C=4+8) | "auto" (mask_test)
    downsample_mode: str = "nearest"  # strategy B: "nearest" | "area" | "max"
    sdf_scale_mm: float = 6.0  # "sdf": tanh(signed distance / scale)
    sdf_subgrid: int = 2  # "sdf": mask grid this many times finer than the latent grid (subgrid^3 channels)
    sdf_threshold_mm: float = -1.0  # "sdf" decoding boundary (measured best round trip: Dice 0.92 at 3 mm)
    mask_test: str | None = None  # mask_vae_test.json for mask_strategy "auto"
    flip: bool = True  # add left-right flipped copies (image and mask together)


@dataclass
class ModelConfig:
    preset: str = "small"  # MeanFlowUNet preset: tiny | small | base
    vae: str = "embedded"  # "embedded" or a local MAISI weight file
    vae_preset: str = "small"  # architecture of a local VAE file: maisi | small | tiny


@dataclass
class LossConfig:
    kind: str = "meanflow"  # "meanflow" | "flow_matching"
    p_img: float = 2.0
    p_mask: float = 2.0
    lambda_img: float = 1.0
    lambda_mask: float = 1.0
    adaptive_power: float = 1.0
    adaptive_c: float = 1.0e-3
    time_mean: float = -0.4
    time_std: float = 1.0
    ratio_r_neq_t: float = 0.25
    cheap_jvp: bool = True
    lesion_weight: float = 0.0  # stage 2: per-voxel weight 1 + w on latent voxels near the lesion
    lesion_dilate: int = 1  # latent voxels the lesion region is grown by


@dataclass
class LoraConfigSection:
    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    dropout: float = 0.0
    # joint mode: mask outputs get their input added (u = z + g), so one-step sampling needs no learned noise
    # pass-through for the new channels (zero-initialised, they kept ~70% of their noise)
    mask_passthrough: bool = True


@dataclass
class ConditionalConfig:
    # ControlNet mask embedding: [32] = 4^3 pixel-unshuffle + convs on the latent grid; [16, 32, 64] = MAISI-style
    # strided convs from the full-resolution mask (10x the CPU cost)
    embedding_channels: list[int] = field(default_factory=lambda: [32])
    include_healthy: bool = True  # healthy cases with empty masks: no lesion in, no hyperintensity out


@dataclass
class VAETrainingConfig:
    patch_size: int = 32
    kl_weight: float = 1.0e-6
    ssim_weight: float = 0.0


@dataclass
class TrainingConfig:
    max_epochs: int = 500
    max_steps: int | None = None  # overrides max_epochs when set
    batch_size: int = 8
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # "constant" | "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    device: str = "auto"
    bf16: bool = False  # autocast on CUDA outside the JVP
    checkpoint_every: int = 200
    preview_every: int = 0
    max_bad_steps: int = 20
    output_dir: str = "runs/run"
    num_threads: int | None = None


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    conditional: ConditionalConfig = field(default_factory=ConditionalConfig)
    vae_training: VAETrainingConfig = field(default_factory=VAETrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "loss.kind": {"meanflow", "flow_matching"},
    "data.mask_strategy": {"auto", "vae", "downsample", "sdf"},
    "data.downsample_mode": {"nearest", "area", "max"},
    "training.schedule": {"constant", "cosine"},
    "model.preset": {"tiny", "small", "base"},
    "model.vae_preset": {"tiny", "small", "maisi"},
}


def _float_or_same(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _check_value(key: str, value: Any, annotation: Any, source: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option, source)
            except ConfigError as err:
                errors.append(str(err))
        raise errors[0] if len(errors) == 1 else ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {type(value).__name__} ({value!r})")
        (item_type,) = typing.get_args(annotation)
        return [_check_value(f"{key}[{i}]", v, item_type, source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {type(value).__name__} ({value!r})")
        return value
    if annotation is float:
        if isinstance(value, str):
            value = _float_or_same(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {type(value).__name__} ({value!r})")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {type(value).__name__} ({value!r})")
        return value
    raise ConfigError(f"{source}: '{key}' has an unsupported type {annotation}")


def _build(cls: type, values: dict, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, f"{key}.", source)
        else:
            kwargs[name] = _check_value(key, value, hints[name], source)
            if key in _CHOICES and kwargs[name] not in _CHOICES[key]:
                raise ConfigError(f"{source}: '{key}' must be one of {sorted(_CHOICES[key])}, got {value!r}")
    return cls(**kwargs)


def config_from_dict(values: dict, source: str = "<config>") -> RunConfig:
    return _build(RunConfig, values or {}, "", source)


def resolve_config_path(path: str | Path) -> Path:
    """A file on disk, else a packaged config by name (`lora_fcd`, `configs/lora_fcd.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    available = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"{path}: config file not found (packaged configs: {available})")


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML config (or a packaged one by name) and apply dotted overrides like {"training.lr": 1e-4}."""
    resolved = resolve_config_path(path)
    try:
        values = yaml.safe_load(resolved.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{resolved}: not valid YAML ({err})") from err
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(values, source=str(resolved))


def save_config(config: RunConfig, path: Path) -> None:
    from neuromf.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
