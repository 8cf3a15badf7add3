"""Affine augmentation of stage-2 pairs (`neuromf.data.augment`, `data.augment_*`): deterministic moves within
their ranges, image and mask moved together, and the FCD dataset's moved copies, cached once."""

from __future__ import annotations

import pytest
import torch
from testkit import TEST_LATENT, coarse_prep

from neuromf.config import DataConfig
from neuromf.data.augment import AffineAugment, apply_moves
from neuromf.data.fcd_dataset import FCDDataset, item_parts
from neuromf.vae import MAISIVAEWrapper

NO_MOVE = {"rotate_deg": [0.0] * 3, "scale": [1.0] * 3, "shift_mm": [0.0] * 3}


def test_moves_are_deterministic_within_range_and_named_by_their_parameters():
    aug = AffineAugment(copies=4, rotate_deg=5, scale=0.1, shift_mm=3, seed=7)
    moves = [aug.moves(f"sub-{i}", k) for i in range(5) for k in range(1, 5)]
    assert moves[0] == AffineAugment(copies=4, rotate_deg=5, scale=0.1, shift_mm=3, seed=7).moves("sub-0", 1)
    assert len({AffineAugment.variant(m) for m in moves}) == len(moves)  # every copy its own cache entry
    for m in moves:
        assert all(abs(a) <= 5 for a in m["rotate_deg"]) and all(abs(s) <= 3 for s in m["shift_mm"])
        assert 0.9 <= m["scale"][0] <= 1.1 and len(set(m["scale"])) == 1  # isotropic
    assert AffineAugment(seed=8).moves("sub-0", 1) != AffineAugment(seed=7).moves("sub-0", 1)
    # a changed range gives other parameters, hence another cache name: no stale latent is reused
    assert AffineAugment.variant(AffineAugment(rotate_deg=4).moves("a", 1)) != AffineAugment.variant(
        AffineAugment(rotate_deg=5).moves("a", 1))


def test_ranges_are_checked():
    with pytest.raises(ValueError, match="copies"):
        AffineAugment(copies=-1)
    with pytest.raises(ValueError, match="rotate_deg"):
        AffineAugment(rotate_deg=90)
    with pytest.raises(ValueError, match="augment_scale"):
        DataConfig(augment_scale=0.5)


def test_from_config_reads_the_data_section():
    cfg = DataConfig(augment_copies=3, augment_rotate_deg=2.0, augment_scale=0.01, augment_shift_mm=1.5)
    assert AffineAugment.from_config(cfg) == AffineAugment(3, 2.0, 0.01, 1.5)
    assert AffineAugment.from_config(DataConfig()).copies == 0  # off unless asked for


def _blob() -> tuple[torch.Tensor, torch.Tensor]:
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    mask = (((grid - torch.tensor([12.0, 10.0, 14.0])[:, None, None, None]) ** 2).sum(0) <= 9).float()[None]
    image = 0.5 + 0.5 * mask + 0.01 * grid[0:1]  # a bright lesion on a gentle ramp
    return image, mask


def test_no_move_is_the_identity():
    image, mask = _blob()
    moved_image, moved_mask = apply_moves(image, mask, NO_MOVE, (2.0, 2.0, 2.0))
    torch.testing.assert_close(moved_image, image, atol=1e-5, rtol=0)
    assert torch.equal(moved_mask, mask)


def test_a_shift_moves_image_and_mask_together_by_the_same_millimetres():
    image, mask = _blob()
    shift = {**NO_MOVE, "shift_mm": [0.0, 4.0, 0.0]}  # 2 voxels of 2 mm along the second axis
    moved_image, moved_mask = apply_moves(image, mask, shift, (2.0, 2.0, 2.0))
    voxels = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))

    def centroid(volume: torch.Tensor) -> torch.Tensor:
        return (voxels * volume).flatten(1).sum(1) / volume.sum()

    step = centroid(moved_mask) - centroid(mask)
    assert abs(abs(step[1]) - 2) < 1e-4 and step[0].abs() < 1e-4 and step[2].abs() < 1e-4
    # the bright lesion went where the mask went
    assert float(moved_image[moved_mask > 0].mean()) > float(moved_image[moved_mask == 0].mean()) + 0.4
    torch.testing.assert_close(centroid((moved_image - 0.75).clamp(min=0)) - centroid((image - 0.75).clamp(min=0)),
                               step, atol=0.05, rtol=0)


def test_rotation_keeps_the_lesion_volume_and_no_image_value_outside_the_input_range():
    image, mask = _blob()
    moves = AffineAugment(rotate_deg=10, scale=0.05).moves("case", 1)
    moved_image, moved_mask = apply_moves(image, mask, moves, (2.0, 2.0, 2.0))
    assert set(moved_mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(moved_mask.sum()) - float(mask.sum())) / float(mask.sum()) < 0.3
    assert float(moved_image.max()) <= float(image.max()) + 1e-5 and float(moved_image.min()) >= 0.0


def test_item_parts():
    assert item_parts("sub-01") == ("sub-01", False, 0)
    assert item_parts("sub-01_flip") == ("sub-01", True, 0)
    assert item_parts("sub-01_flip_aff3") == ("sub-01", True, 3)
    assert item_parts("sub-01_aff12") == ("sub-01", False, 12)
    assert item_parts("sub-aff_x") == ("sub-aff_x", False, 0)  # "_aff" inside a case id is not a copy


def test_dataset_adds_moved_copies_encoded_once(phantom_dir, tiny_vae_dir, tmp_path):
    vae = MAISIVAEWrapper.from_file(tiny_vae_dir)
    aug = AffineAugment(copies=2)
    ds = FCDDataset(phantom_dir, "sdf", vae=vae, prep=coarse_prep(), cache_dir=tmp_path / "cache", flip=True,
                    split=None, augment=aug)
    n_cases = len(ds.cases)
    ids = [item_id for item_id, _ in ds.items]
    assert n_cases < len(ids) <= n_cases * 2 * 3  # a moved copy whose lesion vanished on this coarse grid is left out
    assert sum(item_parts(i)[2] == 0 for i in ids) == 2 * n_cases  # every original and its mirror image
    assert ds.latents().shape[1:] == (12, *TEST_LATENT)
    items = dict(ds.items)
    moved = next(i for i in ids if item_parts(i)[2])
    case_id, mirrored, _ = item_parts(moved)
    original = items[case_id + ("_flip" if mirrored else "")]
    assert not torch.equal(items[moved]["mask"], original["mask"]) and items[moved]["mask"].any()
    assert not torch.equal(items[moved]["z_img"], original["z_img"])
    # the item's FLAIR is moved like its mask: brighter under the moved mask than under the unmoved one
    image, mask = ds.image_volume(moved)[0], items[moved]["mask"][0].bool()
    only_moved, only_original = mask & ~original["mask"][0].bool(), original["mask"][0].bool() & ~mask
    if only_moved.any() and only_original.any():
        assert float(image[only_moved].mean()) > float(image[only_original].mean())
    assert ds.cache.stats()["misses"] == 2 * n_cases * 3  # every variant encoded once (a lost copy too)
    again = FCDDataset(phantom_dir, "sdf", vae=vae, prep=coarse_prep(), cache_dir=tmp_path / "cache", flip=True,
                       split=None, augment=aug)
    assert again.cache.stats()["misses"] == 0 and [i for i, _ in again.items] == ids
