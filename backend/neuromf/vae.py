"""MAISI VAE wrapper: MONAI's AutoencoderKlMaisi with presets, safe loading, scaled latents and CPU-safe settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiConvolution
from safetensors.torch import save_file
from torch import nn

from neuromf.utils import atomic_write, atomic_write_json, resolve_device, state_dict_sha256
from neuromf.weights import (
    WeightFileError,
    check_keys,
    embedded_model,
    embedded_model_dir,
    load_state_dict,
    read_json_sidecar,
)

DOWNSAMPLE = 4  # the MAISI encoder halves each axis twice


@dataclass(frozen=True)
class VAEPreset:
    """Architecture of a MAISI autoencoder: channels and res blocks per level, latent channels, conv splitting."""
    num_channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    norm_num_groups: int
    latent_channels: int = 4
    num_splits: int = 4
    dim_split: int = 1


VAE_PRESETS: dict[str, VAEPreset] = {
    # the released MAISI architecture (NV-Generate-CT / -MR autoencoder): 20,944,897 parameters
    "maisi": VAEPreset(num_channels=(64, 128, 256), num_res_blocks=(2, 2, 2), norm_num_groups=32),
    # same class, narrower: the embedded default, fast enough to train and run on 2 CPU cores. Unsplit: splitting
    # bounds the released VAE's GPU memory on large volumes; on these sizes it only costs time (on a CPU: encode
    # 1.4x, decode 1.3x, a tiled decode 2.0x; benchmarks/bench_vae_splits.py)
    "small": VAEPreset(num_channels=(16, 32, 64), num_res_blocks=(1, 1, 1), norm_num_groups=8, num_splits=1),
    # for unit tests only
    "tiny": VAEPreset(num_channels=(8, 8, 16), num_res_blocks=(1, 1, 1), norm_num_groups=4),
}


def build_maisi_autoencoder(preset: str, norm_float16: bool = False) -> AutoencoderKlMaisi:
    """MONAI's `AutoencoderKlMaisi` (1 channel in/out, 4x downsampling per axis) with a preset's architecture."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of {sorted(VAE_PRESETS)}")
    p = VAE_PRESETS[preset]
    return AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        latent_channels=p.latent_channels,
        num_channels=p.num_channels,
        num_res_blocks=p.num_res_blocks,
        attention_levels=(False,) * len(p.num_channels),
        norm_num_groups=p.norm_num_groups,
        norm_eps=1e-6,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_checkpointing=False,
        use_convtranspose=False,
        num_splits=p.num_splits,
        dim_split=p.dim_split,
        norm_float16=norm_float16,
    )


def choose_num_splits(spatial_len: int, requested: int, kernel_size: int = 3) -> int:
    """Largest split count <= requested that divides the latent axis into chunks larger than the kernel.

    MAISI splits every convolution's input along one axis; at the latent resolution each chunk must still
    be longer than the 3-voxel overlap, and an uneven split silently drops voxels.
    """
    latent_len = spatial_len // DOWNSAMPLE
    for n in range(max(requested, 1), 1, -1):
        if latent_len % n == 0 and latent_len // n > kernel_size:
            return n
    return 1


class MAISIVAEWrapper(nn.Module):
    """Encode (B,1,H,W,D) volumes in [0,1] to scaled latents (B,4,H/4,W/4,D/4) and decode them back.

    `scale_factor` (1/std of training latents) makes latents roughly unit-variance for the flow model; it is not
    part of MAISI's weight file, so it is stored in our sidecar. So is `texture_sigma` (None when not fitted): the
    level of scanner texture that generation adds to decodes (`neuromf.data.texture`).
    """

    def __init__(self, preset: str = "small", scale_factor: float = 1.0, device: str | torch.device = "cpu",
                 norm_float16: bool | None = None) -> None:
        super().__init__()
        self.device_ = resolve_device(device)
        # fp16 group norm needs autocast, which only makes sense on CUDA; on CPU it breaks the forward pass
        self.norm_float16 = bool(norm_float16) if norm_float16 is not None else (
            self.device_.type == "cuda" and preset == "maisi")
        self.preset = preset
        self.autoencoder = build_maisi_autoencoder(preset, norm_float16=self.norm_float16).to(self.device_)
        self.scale_factor = float(scale_factor)
        self.texture_sigma: float | None = None
        self.decode_tile: int | None = None  # latent voxels per tile side of `decode`; None: the whole latent at once
        self.source = "random-init"
        self.autoencoder.eval()

    @property
    def latent_channels(self) -> int:
        """Channels C of the latents (4 for every preset)."""
        return VAE_PRESETS[self.preset].latent_channels

    @property
    def identity(self) -> str:
        """Content hash of weights + preset + scale factor: the latent-cache key for this VAE."""
        if getattr(self, "_identity", None) is None:
            weights = state_dict_sha256(self.autoencoder.state_dict())
            self._identity = f"{self.preset}:{self.scale_factor:.6g}:{weights[:16]}"
        return self._identity

    # ---- loading / saving -------------------------------------------------------------------------------
    def load_weights(self, path: Path | str) -> MAISIVAEWrapper:
        """Load a weight file into the autoencoder (keys checked, errors name the file); returns self."""
        state = load_state_dict(path)
        check_keys(path, self.autoencoder, state)
        self.autoencoder.load_state_dict(state)
        self.source = str(path)
        self._identity = None
        return self

    @classmethod
    def from_file(cls, path: Path | str, preset: str | None = None, scale_factor: float | None = None,
                  device: str | torch.device = "cpu") -> MAISIVAEWrapper:
        """Load a local MAISI weight file (plain or `unet_state_dict`-nested) or one of our saved VAEs.

        Our saved VAEs carry a JSON sidecar (`model.json`) with preset and scale factor; for bare MAISI files pass
        them in (`preset` defaults to maisi). A `preset` that disagrees with the sidecar's is refused with both
        named, rather than one of them silently winning.
        """
        path = Path(path)
        weight_file = path / "model.safetensors" if path.is_dir() else path
        sidecar = weight_file.with_suffix(".json")
        meta = read_json_sidecar(sidecar, "VAE sidecar") if sidecar.is_file() else {}
        saved = meta.get("preset")
        if saved is not None and saved not in VAE_PRESETS:
            raise WeightFileError(f"{sidecar}: unknown VAE preset {saved!r} in the sidecar; expected one of "
                                  f"{sorted(VAE_PRESETS)}")
        if saved is not None and preset is not None and saved != preset:
            raise WeightFileError(
                f"{weight_file}: VAE preset mismatch: its sidecar {sidecar.name} says {saved!r} but {preset!r} was "
                f"asked for (--vae-preset / model.vae_preset); ask for {saved!r}, or pick a VAE of the {preset!r} "
                "architecture")
        factor = scale_factor if scale_factor is not None else float(meta.get("scale_factor", 1.0))
        vae = cls(preset=saved or preset or "maisi", scale_factor=factor, device=device)
        vae.load_weights(weight_file)
        vae.metadata = meta
        vae.texture_sigma = _texture_sigma(meta, sidecar)
        vae.decode_tile = _decode_tile(meta, sidecar)
        return vae

    @classmethod
    def embedded(cls, device: str | torch.device = "cpu") -> MAISIVAEWrapper:
        """The small VAE trained on the phantom data set (sample_data/models/vae_small)."""
        return cls.from_file(embedded_model_dir("vae_small"), preset="small", device=device)

    @classmethod
    def resolve(cls, spec: str | Path, preset: str | None = None,
                device: str | torch.device = "cpu") -> MAISIVAEWrapper:
        """`embedded` / `embedded-3mm` (the shipped 2 mm / 3 mm VAE) or a local path (see `from_file` for `preset`)."""
        shipped = embedded_model(spec, "vae")
        if shipped is not None:
            return cls.from_file(shipped, preset="small", device=device)
        return cls.from_file(spec, preset=preset, device=device)

    def save(self, directory: Path, extra: dict | None = None) -> Path:
        """`model.safetensors` + `model.json` (preset, scale factor, architecture, the decode tile when set, `extra`)
        in `directory`. The tile goes along so that a VAE trained from a tiled one (`model.init_from`, e.g. a sharper
        decoder for `vae_fine`) decodes as it was measured, not whole."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.autoencoder.state_dict().items()}
        atomic_write(directory / "model.safetensors", lambda p: save_file(state, str(p)))
        meta = {"kind": "maisi_vae", "preset": self.preset, "scale_factor": self.scale_factor,
                "architecture": asdict(VAE_PRESETS[self.preset]),
                **({"decode_tile": self.decode_tile} if self.decode_tile is not None else {}), **(extra or {})}
        atomic_write_json(directory / "model.json", meta)
        return directory

    # ---- encode / decode ---------------------------------------------------------------------------------
    def _check_volume(self, x: torch.Tensor, channels: int, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: expected a 5D tensor (B,{channels},H,W,D), got {got}")
        if x.shape[1] != channels:
            raise ValueError(f"{name}: expected {channels} channel(s), got {x.shape[1]}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name}: contains NaN or inf values")

    def set_num_splits_for(self, spatial_len: int, requested: int | None = None) -> None:
        """Split count for inputs of this length; `requested` overrides the preset's (1 = no splitting)."""
        n = choose_num_splits(spatial_len, VAE_PRESETS[self.preset].num_splits if requested is None else requested)
        for module in self.autoencoder.modules():
            if isinstance(module, MaisiConvolution):
                module.num_splits = n

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.norm_float16)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """Scaled latents; the posterior mean unless `sample=True` (MAISI's stage-2 inputs are sampled)."""
        self._check_volume(x, 1, "VAE input")
        bad = [s for s in x.shape[2:] if s % DOWNSAMPLE]
        if bad:
            raise ValueError(f"VAE input: spatial size {tuple(x.shape[2:])} must be divisible by {DOWNSAMPLE}")
        self.set_num_splits_for(x.shape[2 + VAE_PRESETS[self.preset].dim_split])
        with self._autocast():
            z_mu, z_sigma = self.autoencoder.encode(x.to(self.device_))
            z = self.autoencoder.sampling(z_mu, z_sigma) if sample else z_mu
        return z.float() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """Volumes from scaled latents: (B, C, h, w, d) -> (B, 1, 4h, 4w, 4d) float32 on the VAE's device.

        Latents are divided by `scale_factor` first, undoing `encode`'s scaling. `tile` (default: `decode_tile`)
        decodes overlapping cubes of that many latent voxels a side, blended with Gaussian weights (MONAI's
        sliding-window inference, as MAISI decodes): a decoder trained on patches normalises its group norms over
        a patch's voxels, and a whole volume, mostly background, gives it other statistics.
        """
        self._check_volume(z, self.latent_channels, "VAE latent")
        tile = self.decode_tile if tile is None else tile
        if tile is not None and any(n > tile for n in z.shape[2:]):
            from monai.inferers import sliding_window_inference

            return sliding_window_inference(z, (tile,) * (z.ndim - 2), 1, self._decode_whole, overlap=0.5,
                                            mode="gaussian")
        return self._decode_whole(z)

    def _decode_whole(self, z: torch.Tensor) -> torch.Tensor:
        self.set_num_splits_for(z.shape[2 + VAE_PRESETS[self.preset].dim_split] * DOWNSAMPLE)
        with self._autocast():
            x = self.autoencoder.decode(z.to(self.device_) / self.scale_factor)
        return x.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Round trip `decode(encode(x))`: (B, 1, H, W, D) -> (B, 1, H, W, D)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def fit_scale_factor(self, volumes: list[torch.Tensor]) -> float:
        """Set scale_factor = 1/std of the unscaled posterior-mean latents of `volumes` (each (1,H,W,D))."""
        self.scale_factor = 1.0
        latents = torch.cat([self.encode(v[None].float()).flatten() for v in volumes])
        self.scale_factor = float(1.0 / latents.std().clamp_min(1e-8))
        self._identity = None
        return self.scale_factor


def _texture_sigma(meta: dict, sidecar: Path) -> float | None:
    """The sidecar's `texture_sigma` (None when absent), refused unless a number in [0, 0.5]."""
    value = meta.get("texture_sigma")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 0.5:
        raise WeightFileError(f"{sidecar}: texture_sigma must be a number in [0, 0.5], got {value!r}")
    return float(value)


def _decode_tile(meta: dict, sidecar: Path) -> int | None:
    """The sidecar's `decode_tile` (None when absent: whole-volume decodes), refused unless a whole number >= 4."""
    value = meta.get("decode_tile")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 4:
        raise WeightFileError(f"{sidecar}: decode_tile must be a whole number of latent voxels >= 4, got {value!r}")
    return value


def vae_for(meta: dict, device: str | torch.device = "cpu") -> MAISIVAEWrapper:
    """The VAE a model was trained with, with the scale factor stored in the model's sidecar."""
    vae = MAISIVAEWrapper.resolve(meta["vae"], preset=meta.get("vae_preset", "maisi"), device=device)
    vae.scale_factor = float(meta["scale_factor"])
    vae._identity = None
    if vae.identity.split(":")[-1] != str(meta.get("vae_identity", "")).split(":")[-1]:
        raise ValueError(f"the VAE {meta['vae']!r} is not the one the model was trained with "
                         f"(identity {vae.identity} vs {meta.get('vae_identity')})")
    return vae
