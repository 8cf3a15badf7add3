"""FCD image + mask pairs as joint latents for stage 2 (Eq. 37-38), and as image latents + clean masks for the
conditional mode.

Strategy A ("vae"): the mask goes through the same VAE as the image -> 4 + 4 = 8 channels.
Strategy B ("downsample"): the mask is reduced 4x per axis (nearest, area fraction or max) -> 4 + 1 = 5 channels,
mapped from [0, 1] to [-s, s] with s about the image latents' spread, so no channel dominates the loss.
"sdf": tanh of the signed distance on a 2x finer grid, pixel-shuffled -> 4 + 8 channels, also scaled by s.
The representations live in `neuromf.data.mask_codec`.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Generator
from pathlib import Path

import torch
from torch.utils.data import Dataset

from neuromf.data.augment import AffineAugment, apply_moves
from neuromf.data.embedded import resolve_data_dir
from neuromf.data.latents import LR_AXIS, EncodingClock, EncodingProgress, encode_case, make_cache
from neuromf.data.mask_codec import (  # noqa: F401  (re-exported: the strategies' public home used to be here)
    DOWNSAMPLE_MODES,
    STRATEGIES,
    decode_mask_channel,
    downsample_mask,
    encode_mask_channel,
    encode_sdf,
    mask_channels,
    pixel_unshuffle_3d,
    upsample_mask,
)
from neuromf.events import run_to_end
from neuromf.io.bids import DataError, discover_cases
from neuromf.io.nifti import Preprocessing, preprocess_image, preprocess_pair
from neuromf.utils import default_cache_dir
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper


class FCDDataset(Dataset):
    """Joint latents `z` (C, h, w, d), C = 8 ("vae"), 5 ("downsample") or 12 ("sdf"), of the FCD cases of a data set.

    Encoding goes through the latent cache, so each scan is encoded once per VAE and preprocessing. With
    `flip=True` every case also appears mirrored left-right (image and mask together), and with `augment` each
    (mirrored) case also appears `augment.copies` times moved by a small random affine (item ids end in
    `_flip` and `_aff<k>`; see `item_parts`); a moved copy whose lesion vanished is left out. Cases with an empty
    mask are skipped with a warning, unless `include_healthy` (the conditional mode), which also adds the
    healthy cases of the split with empty masks so the model learns that no lesion means no hyperintensity.

    With `encode=False` the constructor only finds the cases; `encode_cases()` then encodes them one at a time,
    yielding progress (the training pipelines report it as events before their first step).
    """

    def __init__(self, data_dir: Path | str, mask_strategy: str = "vae", vae: MAISIVAEWrapper | None = None,
                 prep: Preprocessing | None = None, cache_dir: Path | str | None = None,
                 downsample_mode: str = "nearest", flip: bool = False, split: str | None = "train",
                 return_volumes: bool = False, mask_scale: float | None = None, progress: bool = False,
                 sdf_scale_mm: float = 6.0, sdf_subgrid: int = 2, include_healthy: bool = False,
                 encode: bool = True, augment: AffineAugment | None = None) -> None:
        if mask_strategy not in STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {STRATEGIES} (or auto in a config), got {mask_strategy!r}")
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        self.root = resolve_data_dir(data_dir)
        self.mask_strategy, self.downsample_mode = mask_strategy, downsample_mode
        self.sdf_scale_mm, self.sdf_subgrid = float(sdf_scale_mm), int(sdf_subgrid)
        self.vae = vae if vae is not None else MAISIVAEWrapper.embedded()
        self.prep = prep or Preprocessing()
        self.return_volumes = return_volumes
        self.augment = augment or AffineAugment()
        cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache = make_cache(cache_root, self.vae, self.prep)
        try:
            cases = discover_cases(self.root, group="fcd", split=split)
        except DataError as err:
            raise DataError(f"{self.root}: no FCD cases with lesion masks for training ({err})") from err
        self.cases = [c for c in cases if c.mask is not None]
        if not self.cases:
            raise DataError(f"{self.root}: no FCD cases with lesion masks (split={split!r})")
        healthy = []
        if include_healthy:
            with contextlib.suppress(DataError):  # no healthy cases: train on the FCD cases alone
                healthy = [c for c in discover_cases(self.root, group="hc", split=split) if c.mask is None]
        self.items: list[tuple[str, dict[str, torch.Tensor]]] = []
        self.n_healthy = len(healthy) * (2 if flip else 1) * (1 + self.augment.copies)
        self.mask_scale: float = 0.0  # set by encode_cases: as given, else about the image latents' spread
        self._to_encode, self._flip, self._progress, self._mask_scale = self.cases + healthy, flip, progress, mask_scale
        if encode:
            run_to_end(self.encode_cases())

    def encode_cases(self) -> Generator[EncodingProgress, None, FCDDataset]:
        """Encode the cases through the latent cache, yielding progress after each; returns the dataset.

        Raises DataError when every FCD case has an empty mask.
        """
        from tqdm.auto import tqdm

        cases, self._to_encode = self._to_encode, []
        clock = EncodingClock(len(cases))
        for case in tqdm(cases, desc="encoding cases", disable=not self._progress, unit="case"):
            preprocessed = functools.cache(functools.partial(preprocess_pair, case.image, case.mask, self.prep))
            for name, mirrored, copy in self._variants(case.case_id):
                moves = self._moves(case.case_id, mirrored, copy)
                tensors = encode_case(case.image, case.mask, self.vae, self.prep, self.cache, flip=mirrored,
                                      encode_mask=self.mask_strategy == "vae", moves=moves, preprocessed=preprocessed)
                if case.mask is None:
                    tensors = {**tensors, "mask": torch.zeros((1, *self.prep.shape), dtype=torch.uint8)}
                elif not tensors["mask"].any():
                    if copy:  # a small lesion moved off the grid's voxel centres: this copy only
                        continue
                    warnings.warn(f"{case.mask}: empty lesion mask, case {case.case_id} skipped", stacklevel=2)
                    break
                self.items.append((name, tensors))
            yield clock.tick(case.case_id)
        if not self.items:
            raise DataError(f"{self.root}: every FCD case has an empty mask")
        image_std = float(torch.stack([t["z_img"] for _, t in self.items]).std())
        self.mask_scale = float(self._mask_scale) if self._mask_scale is not None else image_std
        return self

    def _variants(self, case_id: str) -> list[tuple[str, bool, int]]:
        """(item id, mirrored, copy) of every item a case gives: original first, copy 0 = unmoved."""
        return [(item_id(case_id, mirrored, copy), mirrored, copy)
                for mirrored in ((False, True) if self._flip else (False,))
                for copy in range(self.augment.copies + 1)]

    def _moves(self, case_id: str, mirrored: bool, copy: int) -> dict[str, list[float]] | None:
        """The affine move of an item (None for copy 0), drawn for the case as mirrored: encoding and
        `image_volume` must move an item alike."""
        return self.augment.moves(item_id(case_id, mirrored), copy) if copy else None

    @property
    def channels(self) -> tuple[int, int]:
        """(image channels, mask channels)."""
        return self.vae.latent_channels, mask_channels(self.mask_strategy, self.vae.latent_channels,
                                                       self.sdf_subgrid)

    def __len__(self) -> int:
        return len(self.items)

    def joint_latent(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(C, h, w, d): image latents followed by the strategy's mask channels."""
        if self.mask_strategy == "vae":
            return torch.cat([tensors["z_img"], tensors["z_mask"]])
        mask = tensors["mask"][None].float()
        if self.mask_strategy == "sdf":
            return torch.cat([tensors["z_img"],
                              encode_sdf(mask, self.prep.spacing, self.sdf_scale_mm, self.sdf_subgrid)[0]
                              * self.mask_scale])
        low = downsample_mask(mask, self.downsample_mode)[0]
        return torch.cat([tensors["z_img"], encode_mask_channel(low, self.mask_scale)])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor | str]:
        case_id, tensors = self.items[idx]
        item: dict[str, torch.Tensor | str] = {"z": self.joint_latent(tensors), "case_id": case_id}
        if self.return_volumes:
            item["image"] = self.image_volume(case_id)
            item["mask"] = tensors["mask"].float()
        return item

    def image_volume(self, item_id: str) -> torch.Tensor:
        """(1, H, W, D) preprocessed FLAIR of an item on the model grid, mirrored and moved like the item."""
        case_id, mirrored, copy = item_parts(item_id)
        image = preprocess_image(next(c for c in self.cases if c.case_id == case_id).image, self.prep).data
        image = image.flip(LR_AXIS) if mirrored else image
        moves = self._moves(case_id, mirrored, copy)
        return image if moves is None else apply_moves(image, None, moves, self.prep.spacing)[0]

    def latents(self) -> torch.Tensor:
        """All joint latents stacked (N, C, h, w, d)."""
        return torch.stack([self.joint_latent(t) for _, t in self.items])

    def image_latents(self) -> torch.Tensor:
        """Image latents only (N, 4, h, w, d), for the conditional mode."""
        return torch.stack([t["z_img"] for _, t in self.items])

    def masks(self) -> torch.Tensor:
        """Binary masks on the model grid (N, 1, H, W, D), float."""
        return torch.stack([t["mask"].float() for _, t in self.items])

    def packed(self, latents: torch.Tensor) -> torch.Tensor:
        """`latents` (N, C, h, w, d) with each full-resolution mask appended as 4^3 pixel-unshuffled channels:
        (N, C + 64, h, w, d). One tensor is what the training loop batches; the loss unpacks the mask for the
        lesion weighting and the conditional mode's ControlNet."""
        return torch.cat([latents, pixel_unshuffle_3d(self.masks(), DOWNSAMPLE)], dim=1)


def item_id(case_id: str, mirrored: bool = False, copy: int = 0) -> str:
    """An `FCDDataset` item's id: the case id, `_flip` when mirrored, `_aff<copy>` for a moved copy."""
    return case_id + ("_flip" if mirrored else "") + (f"_aff{copy}" if copy else "")


def item_parts(item_id: str) -> tuple[str, bool, int]:
    """(case id, mirrored, augmented copy; 0 = unmoved) of an `FCDDataset` item id: `item_id` read back."""
    base, marker, copy = item_id.rpartition("_aff")
    if not (marker and copy.isdigit()):
        base, copy = item_id, "0"
    return base.removesuffix("_flip"), base.endswith("_flip"), int(copy)
