"""YAML run configs validated into dataclasses.

An unknown key, a wrong type, a value outside its choices (`Literal` fields) or outside its range (`bounded` fields,
checked in each section's `__post_init__`) is a `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
SAMPLERS = ("meanflow", "euler")  # `neuromf.meanflow.sample` methods: CLI, API and napari offer these (torch-free)
# `calibrate-guidance`: joint guidance scales tried (below 1 for a training that over-commits, above for one
# that under-commits; the masks' volume rises steeply with the scale)
CALIBRATION_SCALES = (0.8, 0.9, 1.0, 1.05, 1.1, 1.2)


class ConfigError(ValueError):
    """A config file with an unknown key, a wrong type or an invalid value."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a number (or of each item of a list of numbers); None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself not allowed (e.g. a learning rate > 0)
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def __str__(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(part for part in (lo, hi) if part)


def bounded(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> Any:
    """A dataclass field whose value (None excepted) must lie in a range."""
    meta = {"range": Range(low, high, low_open, high_open)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Checks the ranges of its `bounded` fields after construction (so defaults, YAML and code are all checked)."""

    section = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("range")
            value = getattr(self, f.name)
            if allowed is None or value is None:
                continue
            for item in value if isinstance(value, list) else [value]:
                if item not in allowed:
                    raise ConfigError(f"'{self.section}.{f.name}' must be {allowed}, got {value!r}")


@dataclass
class DataConfig(_Section):
    """`data:` where the scans are, the model grid they are resampled to, and how masks become latent channels."""
    section = "data"
    # "embedded" = the 2 mm phantoms, "embedded-3mm" = sample_data/fcd_phantoms, else a BIDS tree or flat folder; a
    # config that names none gets the 3 mm set, the one the grid defaults below belong to
    data_dir: str = "embedded-3mm"
    shape: list[int] = bounded([64, 64, 64], 8, 1024)
    spacing: list[float] = bounded([3.0, 3.0, 3.0], 0.1, 20.0)  # mm: MRI voxels (and the tests' coarse grids)
    clip_max: float = bounded(2.0, 1)  # bound after percentile scaling (99.5th -> 1): lesions are brighter
    cache_dir: str | None = None  # default: $NEUROMF_CACHE or ~/.cache/neuromf/latents
    group: Literal["hc", "fcd"] | None = None  # participants.tsv group filter: "hc" for stage 1, "fcd" for stage 2
    split: Literal["train", "test"] | None = "train"
    mask_strategy: Literal["auto", "vae", "downsample", "sdf"] = "auto"  # A C=8 | B C=5 | C=4+8 | mask_test
    downsample_mode: Literal["nearest", "area", "max"] = "nearest"  # strategy B
    sdf_scale_mm: float = bounded(6.0, 0, low_open=True)  # "sdf": tanh(signed distance / scale)
    sdf_subgrid: int = bounded(2, 1, 4)  # "sdf": grid this much finer than the latent one
    sdf_threshold_mm: float = -1.0  # "sdf" decoding boundary (measured best round trip: Dice 0.92 at 3 mm)
    mask_test: str | None = None  # mask_vae_test.json for mask_strategy "auto"
    flip: bool = True  # add left-right flipped copies (image and mask together)
    # stage 2: this many copies of each (mirrored) case moved by a small random affine before encoding (0: none);
    # each copy is encoded once and cached. Ranges: rotation per axis, isotropic scale 1 +- augment_scale, shift
    augment_copies: int = bounded(0, 0, 64)
    augment_rotate_deg: float = bounded(6.0, 0, 45)
    augment_scale: float = bounded(0.06, 0, 0.5, high_open=True)
    augment_shift_mm: float = bounded(6.0, 0)


@dataclass
class ModelConfig(_Section):
    """`model:` the MeanFlow UNet preset and the VAE whose latents it models."""
    section = "model"
    preset: Literal["tiny", "small", "base"] = "small"  # MeanFlowUNet preset: tiny | small | base
    vae: str = "embedded-3mm"  # "embedded" (2 mm), "embedded-3mm" (as the grid defaults) or a local MAISI file
    vae_preset: Literal["maisi", "small", "tiny"] | None = None  # a local VAE file's architecture; None: its sidecar
    # warm start of `train-base` / `train-vae`: a saved UNet / VAE ("embedded", folder or file) of the same
    # architecture whose weights initialise the run's; both are convolutional, so a model trained on a coarser grid
    # is a good start on a finer one (how the `fine` default was made)
    init_from: str | None = None


@dataclass
class LossConfig(_Section):
    """`loss:` the MeanFlow loss: per-channel Lp exponents and weights, adaptive weighting, (r, t) sampling."""
    section = "loss"
    kind: Literal["meanflow", "flow_matching"] = "meanflow"
    p_img: float = bounded(2.0, 0, low_open=True)
    p_mask: float = bounded(2.0, 0, low_open=True)
    lambda_img: float = bounded(1.0, 0)
    lambda_mask: float = bounded(1.0, 0)
    adaptive_power: float = bounded(1.0, 0)
    adaptive_c: float = bounded(1.0e-3, 0, low_open=True)
    # joint mode: false leaves the mask channels' loss out of the adaptive weight (it still weighs the image
    # channels): the weight pulls a rare outcome, a lesion, toward the frequent one, "no lesion"
    adaptive_mask: bool = True
    time_mean: float = -0.4
    time_std: float = bounded(1.0, 0, low_open=True)
    ratio_r_neq_t: float = bounded(0.25, 0, 1)
    cheap_jvp: bool = True
    # du/dt of the MeanFlow target: forward-mode AD, or a central difference along (v, 0, 1) by two no-grad forwards
    # (the same target within ~2e-3; less memory, no forward-mode AD; benchmarks/bench_train_step.py measures the time)
    jvp: Literal["exact", "finite_difference"] = "exact"
    lesion_weight: float = bounded(0.0, 0)  # stage 2: per-voxel weight 1 + w on latent voxels near the lesion
    lesion_dilate: int = bounded(1, 0)  # latent voxels the lesion region is grown by


@dataclass
class LoraConfigSection(_Section):
    """`lora:` stage 2's joint mode: LoRA rank, alpha, targeted modules and dropout (peft)."""
    section = "lora"
    rank: int = bounded(16, 1, 4096)
    alpha: float = bounded(16.0, 0, low_open=True)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    dropout: float = bounded(0.0, 0, 1, high_open=True)
    # joint mode: mask outputs get their input added (u = z + g), so one-step sampling needs no learned noise
    # pass-through for the new channels (zero-initialised, they kept ~70% of their noise)
    mask_passthrough: bool = True
    # joint mode: "x" makes the mask outputs a clean-latent estimate (u = (z - x^) / t, see MeanFlowUNet.x_channels;
    # overrides mask_passthrough), for k-step / Euler sampling; "velocity" predicts u directly
    mask_prediction: Literal["velocity", "x"] = "velocity"
    # with "x": x^ = mean + c_skip (z - (1 - t) mean) + c_out F (EDM preconditioning with this data spread), so the
    # estimate at small t is the input itself; None: x^ = F, which the LoRA'd UNet must learn to copy (it shrank
    # lesions it was shown almost noise-free)
    mask_sigma_data: float | None = bounded(None, 0, low_open=True)
    # joint mode: one more clean input channel tells the model where the lesion goes (`neuromf.models.site`); the
    # sites generation draws come from the training lesions' (the adapter's mask prior)
    site_condition: bool = False
    # warm start: a joint adapter ("embedded" or a folder) whose weights (LoRA matrices, widened convs) this run
    # starts from; its rank, targets, mask settings, site conditioning and base model must be this run's
    init_from: str | None = None
    # the LoRA targets (module-name suffixes, a subset of target_modules) whose matrices train; None: all of them.
    # The widened input/output convs always train. With init_from: a short fine-tuning of part of an adapter
    train_only: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.target_modules or not all(name.strip() for name in self.target_modules):
            raise ConfigError(f"'lora.target_modules' must name at least one module (e.g. [to_q, to_k, to_v]), got "
                              f"{self.target_modules!r}")
        if self.train_only is not None and (not self.train_only or set(self.train_only) - set(self.target_modules)):
            raise ConfigError(f"'lora.train_only' must name some of lora.target_modules {self.target_modules!r}, got "
                              f"{self.train_only!r}")


@dataclass
class ConditionalConfig(_Section):
    """`conditional:` stage 2's conditional mode: the ControlNet's mask embedding and the healthy cases."""
    section = "conditional"
    # ControlNet mask embedding: [32] = 4^3 pixel-unshuffle + convs on the latent grid; [16, 32, 64] = MAISI-style
    # strided convs from the full-resolution mask (10x the CPU cost)
    embedding_channels: list[int] = bounded([32], 1, 4096)
    include_healthy: bool = True  # healthy cases with empty masks: no lesion in, no hyperintensity out
    # warm start: a conditional adapter ("embedded" or folder) whose ControlNet weights initialise this one
    init_from: str | None = None


@dataclass
class VAETrainingConfig(_Section):
    """`vae_training:` training a small VAE (`neuromf train-vae`), from scratch or from `model.init_from`."""
    section = "vae_training"
    patch_size: int = bounded(32, 8, 1024)
    kl_weight: float = bounded(1.0e-6, 0)
    ssim_weight: float = bounded(0.0, 0)
    # sharpening a trained VAE (`model.init_from`): train the decoder only, so its latent space (and every latent
    # model trained on it) stays valid, against a patch discriminator as MAISI / latent-diffusion autoencoders do
    decoder_only: bool = False
    adversarial_weight: float = bounded(0.0, 0)  # > 0 adds MONAI's PatchDiscriminator + PatchAdversarialLoss
    adversarial_criterion: Literal["least_squares", "hinge"] = "least_squares"
    feature_matching_weight: float = bounded(0.0, 0)  # L1 between the discriminator's features of real and decoded
    discriminator_channels: int = bounded(32, 1)
    discriminator_layers: int = bounded(3, 1)


@dataclass
class TrainingConfig(_Section):
    """`training:` the optimisation schedule, checkpoints, device and output folder of a run."""
    section = "training"
    max_epochs: int = bounded(500, 1, 1_000_000)
    max_steps: int | None = bounded(None, 1, 1_000_000_000)  # overrides max_epochs when set
    batch_size: int = bounded(8, 1, 65_536)
    lr: float = bounded(1.0e-4, 0, 10.0, low_open=True)
    weight_decay: float = bounded(0.0, 0)
    warmup_steps: int = bounded(100, 0, 1_000_000_000)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = bounded(0.1, 0, 1)
    grad_clip: float = bounded(1.0, 0, low_open=True)
    ema_decay: float = bounded(0.999, 0, 1, high_open=True)
    seed: int = bounded(0, 0, 2**63 - 1)
    device: str = "auto"
    bf16: bool = False  # old spelling of precision: bf16 (kept so saved run configs still load)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast for the UNet forward; the JVP stays fp32
    tf32: bool = True  # TF32 matmuls/convolutions on CUDA (fp32 runs)
    compile: bool = False  # torch.compile the training forward (CUDA; the JVP runs uncompiled)
    dist_timeout_s: int = bounded(1800, 10)  # multi-process runs: a rank waiting longer than this fails the job
    checkpoint_every: int = bounded(200, 0, 1_000_000_000)  # 0: only at the end and on stop
    preview_every: int = bounded(0, 0, 1_000_000_000)
    max_bad_steps: int = bounded(20, 1, 1_000_000)
    # samples in the fixed evaluation draw logged each epoch (eval_*); None: 8, or every sample when fewer
    eval_samples: int | None = bounded(None, 1, 1_000_000)
    output_dir: str = "runs/run"
    num_threads: int | None = bounded(None, 1, 4096)


@dataclass
class RunConfig:
    """A whole run's configuration, one dataclass per YAML section.

    Built by `load_config` / `config_from_dict`, which name the key of a wrong type, an unknown key or a value out of
    range; saved beside each run as `config.yaml`.
    """
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    conditional: ConditionalConfig = field(default_factory=ConditionalConfig)
    vae_training: VAETrainingConfig = field(default_factory=VAETrainingConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every section (what `save_config` writes and adapter sidecars store)."""
        return dataclasses.asdict(self)


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
        errors: list[ConfigError] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{source}: '{key}' must be one of {sorted(choices)}, got {value!r}")
        return value
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
        if abs(value) > 2**63 - 1:  # beyond any count or seed torch can hold
            raise ConfigError(f"{source}: '{key}' is out of range, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            value = _float_or_same(value)  # YAML 1.1 reads "3e-4" (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {type(value).__name__} ({value!r})")
        if not math.isfinite(value):  # .inf / .nan in YAML, or a huge integer
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
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
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a range check in __post_init__: add the file it came from
        raise ConfigError(f"{source}: {err}") from None


def config_from_dict(values: dict, source: str = "<config>") -> RunConfig:
    """A RunConfig from nested dicts (a parsed YAML, a sidecar's `config`); errors name `source` and the key."""
    return _build(RunConfig, values or {}, "", source)


# the packaged configs' deprecated names (kept for one release) -> their names by mode and grid
CONFIG_ALIASES = {"demo_lora": "joint_3mm", "joint_fine": "joint_2mm", "lora_fcd": "joint_gpu",
                  "demo_cond": "conditional_3mm", "cond_fine": "conditional_2mm"}


def packaged_configs(mode: str | None = None) -> list[str]:
    """Names of the packaged configs, sorted; with `mode` ("joint", "conditional", "base", "vae") only that
    mode's (named `<mode>_<grid>`, e.g. `joint_3mm`)."""
    names = sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))
    return [n for n in names if mode is None or n.startswith(f"{mode}_")]


def resolve_config_path(path: str | Path) -> Path:
    """A file on disk, else a packaged config by name (`joint_gpu`, `configs/joint_gpu.yaml`); a deprecated name
    (`CONFIG_ALIASES`) resolves to its new one with a FutureWarning."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.stem if path.suffix == ".yaml" else path.name
    if name in CONFIG_ALIASES:
        warnings.warn(f"config name {name!r} is deprecated, use {CONFIG_ALIASES[name]!r}", FutureWarning,
                      stacklevel=2)
        path = Path(CONFIG_ALIASES[name])
    packaged = PACKAGED_CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if packaged.is_file():
        return packaged
    available = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(f"{path}: config file not found (packaged configs: {available})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with the same key twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first}, again on line "
                                f"{key_node.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, duplicate keys refused; errors are ConfigErrors naming the file (and line)."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason})") from err
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        detail = f"{problem}{where}" if problem else " ".join(str(err).split())
        raise ConfigError(f"{path}: not valid YAML ({detail})") from err
    except RecursionError as err:  # deeply nested flow collections
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from err


def apply_overrides(values: dict, overrides: dict, source: str) -> dict:
    """Set dotted keys ({"training.lr": 1e-4}) in a parsed config; an empty section (`training:`) becomes {}."""
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        if not leaf or not all(parents):
            raise ConfigError(f"--set {dotted}: not a dotted config key (e.g. training.lr)")
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{source}: cannot set '{dotted}': '{'.'.join(parents[:depth + 1])}' is "
                                  f"{node[part]!r}, not a section")
            node = node[part]
        node[leaf] = value
    return values


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a YAML config (or a packaged one by name) and apply dotted overrides like {"training.lr": 1e-4}."""
    resolved = resolve_config_path(path)
    values = read_yaml(resolved)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{resolved}: 'top level' must be a mapping of sections, got {type(values).__name__} "
                          f"({values!r:.60})")
    apply_overrides(values, overrides or {}, str(resolved))
    return config_from_dict(values, source=str(resolved))


def save_config(config: RunConfig, path: Path) -> None:
    """Write `config` as YAML to `path`, atomically; `load_config` reads it back."""
    from neuromf.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
