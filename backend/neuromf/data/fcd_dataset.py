"""FCD image + mask pairs as joint latents for stage 2 (Eq. 37-38).

Strategy A ("vae"): the mask goes through the same VAE as the image -> 4 + 4 = 8 channels.
Strategy B ("downsample"): the mask is reduced 4x per axis (nearest, area fraction or max) -> 4 + 1 = 5 channels,
mapped from [0, 1] to [-s, s] with s about the image latents' spread, so no channel dominates the loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from neuromf.data.latents import encode_case, make_cache, resolve_data_dir
from neuromf.io.bids import DataError, discover_cases
from neuromf.io.nifti import Preprocessing, preprocess_pair
from neuromf.utils import default_cache_dir
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper

STRATEGIES = ("vae", "downsample")
DOWNSAMPLE_MODES = ("nearest", "area", "max")


def mask_channels(strategy: str, latent_channels: int = 4) -> int:
    if strategy not in STRATEGIES:
        raise ValueError(f"mask_strategy must be one of {STRATEGIES}, got {strategy!r}")
    return latent_channels if strategy == "vae" else 1


def downsample_mask(mask: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """(B, 1, H, W, D) binary mask -> (B, 1, H/4, W/4, D/4) values in [0, 1]."""
    if mode == "nearest":
        return F.interpolate(mask, scale_factor=1 / DOWNSAMPLE, mode="nearest")
    if mode == "area":
        return F.avg_pool3d(mask, DOWNSAMPLE)
    if mode == "max":
        return F.max_pool3d(mask, DOWNSAMPLE)
    raise ValueError(f"downsample mode must be one of {DOWNSAMPLE_MODES}, got {mode!r}")


def upsample_mask(low: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Strategy B's inverse: trilinear 4x upsampling of a [0, 1] map, then threshold -> binary float mask."""
    return (F.interpolate(low, scale_factor=DOWNSAMPLE, mode="trilinear", align_corners=False) > threshold).float()


def encode_mask_channel(low: torch.Tensor, scale: float) -> torch.Tensor:
    return (2.0 * low - 1.0) * scale


def decode_mask_channel(channel: torch.Tensor, scale: float) -> torch.Tensor:
    return ((channel / scale + 1.0) / 2.0).clamp(0, 1)


class FCDDataset(Dataset):
    """Joint latents `z` (C, h, w, d), C = 8 ("vae") or 5 ("downsample"), of the FCD cases of a data set.

    Encoding goes through the latent cache, so each scan is encoded once per VAE and preprocessing. With
    `flip=True` every case also appears mirrored left-right (image and mask together). Cases with an empty
    mask are skipped with a warning.
    """

    def __init__(self, data_dir: Path | str, mask_strategy: str = "vae", vae: MAISIVAEWrapper | None = None,
                 prep: Preprocessing | None = None, cache_dir: Path | str | None = None,
                 downsample_mode: str = "nearest", flip: bool = False, split: str | None = "train",
                 return_volumes: bool = False, mask_scale: float | None = None, progress: bool = False) -> None:
        if mask_strategy not in STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {STRATEGIES} (or auto in a config), got {mask_strategy!r}")
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        self.root = resolve_data_dir(data_dir)
        self.mask_strategy, self.downsample_mode = mask_strategy, downsample_mode
        self.vae = vae if vae is not None else MAISIVAEWrapper.embedded()
        self.prep = prep or Preprocessing()
        self.return_volumes = return_volumes
        cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache = make_cache(cache_root, self.vae, self.prep)
        try:
            cases = discover_cases(self.root, group="fcd", split=split)
        except DataError as err:
            raise DataError(f"{self.root}: no FCD cases with lesion masks for training ({err})") from err
        self.cases = [c for c in cases if c.mask is not None]
        if not self.cases:
            raise DataError(f"{self.root}: no FCD cases with lesion masks (split={split!r})")
        self.items: list[tuple[str, dict[str, torch.Tensor]]] = []
        from tqdm.auto import tqdm

        for case in tqdm(self.cases, desc="encoding FCD cases", disable=not progress, unit="case"):
            for mirrored in ((False, True) if flip else (False,)):
                tensors = encode_case(case.image, case.mask, self.vae, self.prep, self.cache, flip=mirrored,
                                      encode_mask=mask_strategy == "vae")
                if not tensors["mask"].any():
                    warnings.warn(f"{case.mask}: empty lesion mask, case {case.case_id} skipped", stacklevel=2)
                    break
                self.items.append((case.case_id + ("_flip" if mirrored else ""), tensors))
        if not self.items:
            raise DataError(f"{self.root}: every FCD case has an empty mask")
        image_std = float(torch.stack([t["z_img"] for _, t in self.items]).std())
        self.mask_scale = float(mask_scale) if mask_scale is not None else image_std

    @property
    def channels(self) -> tuple[int, int]:
        """(image channels, mask channels)."""
        return self.vae.latent_channels, mask_channels(self.mask_strategy, self.vae.latent_channels)

    def __len__(self) -> int:
        return len(self.items)

    def joint_latent(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mask_strategy == "vae":
            return torch.cat([tensors["z_img"], tensors["z_mask"]])
        low = downsample_mask(tensors["mask"][None].float(), self.downsample_mode)[0]
        return torch.cat([tensors["z_img"], encode_mask_channel(low, self.mask_scale)])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | str]:
        case_id, tensors = self.items[idx]
        item: dict[str, torch.Tensor | str] = {"z": self.joint_latent(tensors), "case_id": case_id}
        if self.return_volumes:
            image, mask = preprocess_pair(self._case(case_id).image, self._case(case_id).mask, self.prep)
            flip = case_id.endswith("_flip")
            item["image"] = image.data.flip(1) if flip else image.data
            item["mask"] = tensors["mask"].float()
        return item

    def _case(self, case_id: str):
        return next(c for c in self.cases if c.case_id == case_id.removesuffix("_flip"))

    def latents(self) -> torch.Tensor:
        """All joint latents stacked (N, C, h, w, d): what the training loop consumes."""
        return torch.stack([self.joint_latent(t) for _, t in self.items])
