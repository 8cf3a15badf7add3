"""Adapter metadata: what a saved stage-2 adapter (joint LoRA or conditional ControlNet) needs to be used again.

Written as `neuromf_adapter.json` beside the weights, the way peft's config mixin writes `adapter_config.json`.
Every reader goes through `AdapterMeta.load`, so a missing file, bad JSON or a missing entry is one error that
names the file, and old sidecars (no `mode`, no sdf entries) load with the values they were trained with.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuromf.io.nifti import Preprocessing, sidecar_grid_problem
from neuromf.io.validate import entry_type_problem
from neuromf.utils import atomic_write_json, refuse_shipped
from neuromf.weights import EMBEDDED_NAMES, WeightFileError, embedded_model, read_json_sidecar, recorded_name

SIDECAR = "neuromf_adapter.json"
ADAPTER_DIR = "adapter"  # a training run's adapter folder: <output_dir>/adapter
CONTROLNET_WEIGHTS = "controlnet.safetensors"  # conditional adapters; joint ones hold peft's files
KINDS = {"joint": "neuromf_lora_adapter", "conditional": "neuromf_controlnet_adapter"}
Mode = Literal["joint", "conditional"]
OWN = "own"  # a generation setting left to the adapter's sidecar (`AdapterMeta.sampling_settings`)
SAMPLING_KEYS = {"sampler": str, "steps": int, "render": str}


@dataclass
class AdapterMeta:
    """The sidecar of a stage-2 adapter.

    Common entries name the frozen base model (path + weights hash), the VAE, the model grid (`preprocessing`,
    `latent_shape` = (C, h, w, d)) and the training config; joint-mode entries say how the mask channels are
    encoded (`strategy`, `mask_scale`, sdf settings); conditional-mode entries give the ControlNet architecture.
    """

    mode: Mode
    base_checkpoint: str
    base_sha256: str
    base_preset: str
    vae: str
    vae_preset: str
    vae_identity: str
    scale_factor: float
    preprocessing: dict[str, Any]
    latent_shape: list[int]
    channels: dict[str, int]  # {"image": 4, "mask": n_mask} (mask 0 in the conditional mode)
    config: dict[str, Any]
    data_dir: str = "embedded"
    train_cases: list[str] = field(default_factory=list)
    lesion_weight: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    # joint mode
    strategy: str | None = None  # "vae" | "downsample" | "sdf"
    downsample_mode: str | None = None
    mask_scale: float = 1.0
    sdf_scale_mm: float = 6.0
    sdf_subgrid: int = 2
    sdf_threshold_mm: float = -1.0
    mask_passthrough: bool = False
    mask_prediction: str = "velocity"  # "x": the mask outputs are clean-latent estimates (MeanFlowUNet.x_channels)
    mask_sigma_data: float | None = None  # x-prediction's skip (MeanFlowUNet.x_sigma_data); None: no skip
    mask_mean: float = 0.0  # the skip's centre: the training mask channels' mean
    site_condition: bool = False  # joint mode: the model takes a site channel (`neuromf.models.site`)
    lora_params: int | None = None
    # conditional mode
    controlnet: dict[str, Any] | None = None  # MeanFlowControlNet constructor arguments
    n_healthy: int | None = None
    # the guidance generation uses unless told otherwise (set from measurements): a conditional adapter's mask
    # guidance, a joint adapter's guidance against the empty mask's path
    guidance: float = 1.0
    # a conditional adapter's mask guidance for inpainting into a real scan, where it was measured apart from
    # `guidance` (the lesion there is generated in a real scan's context); None: `guidance`
    inpaint_guidance: float | None = None
    # a conditional adapter's mask guidance when it renders the FLAIR for a joint model's mask, measured apart from
    # `guidance` (joint masks are drawn, not the prior's training lesions); None: `guidance`
    render_guidance: float | None = None
    # how generation samples unless told otherwise (set where measured): {"sampler", "steps", "render": a
    # conditional adapter that renders a joint pair's FLAIR}; None: one MeanFlow step, no rendering
    sampling: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """The sidecar's `kind` entry for this mode (`KINDS`)."""
        return KINDS[self.mode]

    def guidance_scale(self, guidance: float | None = None) -> float:
        """The guidance to generate with: `guidance`, or this adapter's own (`guidance`) when None."""
        return self.guidance if guidance is None else guidance

    def inpaint_guidance_scale(self, guidance: float | None = None) -> float:
        """The mask guidance to inpaint with: `guidance`, else this adapter's `inpaint_guidance`, else its
        `guidance` (sidecars without `inpaint_guidance` inpaint as they generate)."""
        if guidance is not None:
            return guidance
        return self.guidance if self.inpaint_guidance is None else self.inpaint_guidance

    def render_guidance_scale(self, guidance: float | None = None) -> float:
        """The mask guidance to render a joint mask's FLAIR with: `guidance`, else this adapter's
        `render_guidance`, else its `guidance`."""
        if guidance is not None:
            return guidance
        return self.guidance if self.render_guidance is None else self.render_guidance

    def sampling_settings(self, sampler: str | None = None, steps: int | None = None,
                          render: str | Path | None = OWN) -> tuple[str, int, str | Path | None]:
        """(sampler, steps, render) to generate with: each one given, else this adapter's own (`sampling`), else
        one MeanFlow step without rendering. `render` OWN: the adapter's; None: no rendering."""
        own = self.sampling or {}
        return (sampler or own.get("sampler", "meanflow"), steps or int(own.get("steps", 1)),
                own.get("render") if render == OWN else render)

    @property
    def prep(self) -> Preprocessing:
        """The model grid and intensity scaling the adapter was trained on."""
        return Preprocessing.from_dict(self.preprocessing)

    @property
    def n_image(self) -> int:
        """Image latent channels (4)."""
        return int(self.channels["image"])

    @property
    def n_mask(self) -> int:
        """Mask latent channels added by the joint strategy (0 in the conditional mode)."""
        return int(self.channels["mask"])

    def vae_reference(self) -> dict[str, Any]:
        """The entries `neuromf.vae.vae_for` needs (the same keys as a base model's sidecar)."""
        return {"vae": self.vae, "vae_preset": self.vae_preset, "vae_identity": self.vae_identity,
                "scale_factor": self.scale_factor}

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON content: `kind` plus every field."""
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def save(self, directory: Path) -> Path:
        """Write `directory/neuromf_adapter.json` atomically (never into the shipped files); returns its path."""
        refuse_shipped(Path(directory) / SIDECAR)
        return atomic_write_json(Path(directory) / SIDECAR, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "<adapter sidecar>") -> AdapterMeta:
        """Validate a sidecar's content; unknown entries (from newer versions) are ignored."""
        if not isinstance(values, dict):
            raise WeightFileError(f"{source}: adapter sidecar is not a JSON object")
        values = dict(values)
        kind = values.pop("kind", None)
        by_kind = {k: m for m, k in KINDS.items()}
        if kind not in by_kind:
            raise WeightFileError(f"{source}: not a NeuroMF adapter sidecar (kind={kind!r}, expected one of "
                                  f"{sorted(by_kind)})")
        values.setdefault("mode", by_kind[kind])  # sidecars written before the conditional mode had no `mode`
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise WeightFileError(f"{source}: adapter sidecar lacks {', '.join(repr(m) for m in missing)}")
        problem = entry_type_problem(values, typing.get_type_hints(cls)) or sidecar_grid_problem(values)
        if problem is not None:
            raise WeightFileError(f"{source}: {problem}")
        spacing = (values.get("preprocessing") or {}).get("spacing")
        for key in ("base_checkpoint", "vae", "data_dir"):  # shipped names as today's (an older sidecar's)
            if key in values:
                values[key] = recorded_name(values[key], spacing)
        meta = cls(**{k: v for k, v in values.items() if k in names})
        if not isinstance(meta.channels, dict) or {"image", "mask"} - set(meta.channels):
            raise WeightFileError(f"{source}: adapter sidecar's 'channels' must hold 'image' and 'mask' counts")
        for name in ("guidance", "inpaint_guidance", "render_guidance"):
            scale = getattr(meta, name)
            if (scale is not None or name == "guidance") and (isinstance(scale, bool) or not isinstance(
                    scale, (int, float)) or not math.isfinite(scale) or scale < 0):
                raise WeightFileError(f"{source}: adapter sidecar's {name!r} must be a number >= 0, got {scale!r}")
        if meta.sampling is not None and (set(meta.sampling) - set(SAMPLING_KEYS) or any(
                not isinstance(v, SAMPLING_KEYS[k]) or isinstance(v, bool) for k, v in meta.sampling.items())):
            raise WeightFileError(f"{source}: adapter sidecar's 'sampling' must hold only sampler (text), steps (a "
                                  f"whole number) and render (an adapter), got {meta.sampling!r}")
        if meta.mode == "conditional" and not isinstance(meta.controlnet, dict):
            raise WeightFileError(f"{source}: conditional adapter sidecar lacks its 'controlnet' architecture")
        return meta

    @classmethod
    def load(cls, directory: Path | str) -> AdapterMeta:
        """Read `directory/neuromf_adapter.json`; errors name the file and the problem."""
        path = Path(directory) / SIDECAR
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a NeuroMF adapter (missing {SIDECAR})")
        return cls.from_dict(read_json_sidecar(path, "adapter sidecar"), source=str(path))


def base_reference(base_checkpoint: str | Path, base_meta: dict[str, Any]) -> dict[str, Any]:
    """The AdapterMeta entries that name the frozen base model and its VAE, from the base model's sidecar."""
    return {"base_checkpoint": str(base_checkpoint), "base_sha256": base_meta["weights_sha256"],
            "base_preset": base_meta["arch"]["preset"], "vae": base_meta["vae"], "vae_preset": base_meta["vae_preset"],
            "vae_identity": base_meta["vae_identity"], "scale_factor": base_meta["scale_factor"]}


def check_base_agrees(meta: AdapterMeta, base_meta: dict[str, Any], directory: Path | str) -> None:
    """ValueError when the adapter's grid or VAE entries disagree with its base model's sidecar: a tampered or
    mixed-up sidecar would otherwise decode latents of one grid under another's affine or scale."""
    mine, theirs = meta.prep, Preprocessing.from_dict(base_meta.get("preprocessing", {}))
    if (mine.shape, mine.spacing) != (theirs.shape, theirs.spacing):  # intensity settings may legitimately differ
        raise ValueError(f"{Path(directory) / SIDECAR}: the adapter's grid ({mine.shape} voxels of {mine.spacing} mm) "
                         f"disagrees with its base model's ({theirs.shape} of {theirs.spacing} mm, "
                         f"{meta.base_checkpoint})")
    if float(meta.scale_factor) != float(base_meta.get("scale_factor", meta.scale_factor)):
        raise ValueError(f"{Path(directory) / SIDECAR}: the adapter's VAE scale_factor {meta.scale_factor} disagrees "
                         f"with its base model's {base_meta.get('scale_factor')} ({meta.base_checkpoint})")


def data_reference(data_dir: str, root: Path) -> str:
    """"embedded" stays a name, so a shipped adapter does not carry the training machine's path."""
    return data_dir if data_dir in EMBEDDED_NAMES else str(root)


def is_conditional_adapter(directory: Path | str) -> bool:
    """True when `directory` holds ControlNet weights, i.e. is a conditional adapter."""
    return (Path(directory) / CONTROLNET_WEIGHTS).is_file()


def resolve_adapter_dir(spec: str | Path, mode: Mode = "joint") -> Path:
    """An adapter folder; "embedded" is the shipped 2 mm adapter of `mode`, "embedded-3mm" the 3 mm one."""
    return embedded_model(spec, mode) or Path(spec)


def generation_mode(adapter: str | Path, mode: str = "auto") -> Mode:
    """"joint" or "conditional" for an adapter; `auto` reads the folder (a shipped name alone means its joint
    adapter, the one that draws the lesion mask too; the deprecated "embedded-fine" keeps its old meaning, the
    2 mm conditional adapter)."""
    if mode not in ("auto", "joint", "conditional"):
        raise ValueError(f"mode must be auto, joint or conditional, got {mode!r}")
    if str(adapter) == "embedded-fine":
        return "conditional" if mode == "auto" else mode
    if str(adapter) in EMBEDDED_NAMES:
        return "joint" if mode == "auto" else mode
    found = "conditional" if is_conditional_adapter(adapter) else "joint"
    if mode != "auto" and mode != found:
        remedy = "train one with train-conditional" if mode == "conditional" else "use --mode conditional"
        raise ValueError(f"{adapter}: a {found} adapter cannot generate in {mode} mode ({remedy})")
    return found


def adapter_meta(spec: str | Path, mode: str = "auto") -> AdapterMeta:
    """The sidecar of a joint (LoRA) or conditional (ControlNet) adapter; a shipped name is its adapter of `mode`."""
    return AdapterMeta.load(resolve_adapter_dir(spec, generation_mode(spec, mode)))
