"""Preprocessing onto the model grid: orientation, world coordinates, bad volumes, atomic saving."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from testkit import write_nifti

from neuromf.io.nifti import Preprocessing, VolumeError, preprocess_pair, read_nifti, save_nifti


def blob_volume(shape=(40, 48, 36), centre=(22, 20, 18), radius=9.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return np.where(dist < radius, 100.0 + grid[0], 0.0).astype(np.float32)  # intensity ramps left -> right


def test_any_orientation_lands_on_the_same_ras_grid(tmp_path):
    data = blob_volume()
    ras = write_nifti(tmp_path / "ras.nii.gz", data, np.diag([2.0, 2.0, 2.0, 1.0]))
    lps_affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps_affine[:3, 3] = [2.0 * (data.shape[0] - 1), 2.0 * (data.shape[1] - 1), 0]
    lps = write_nifti(tmp_path / "lps.nii.gz", data[::-1, ::-1].copy(), lps_affine)  # same anatomy, stored LPS
    prep = Preprocessing(shape=(32, 32, 32), spacing=(3.0, 3.0, 3.0))
    a, _ = preprocess_pair(ras, None, prep)
    b, _ = preprocess_pair(lps, None, prep)
    assert a.data.shape == (1, 32, 32, 32)
    # the 99.5th percentile maps to 1 and brighter voxels are kept, not clipped (lesions live there)
    assert float(a.data.min()) >= 0 and float(np.percentile(a.data.numpy(), 99.5)) == pytest.approx(1.0, abs=1e-4)
    assert 1.0 < float(a.data.max()) <= prep.clip_max
    torch.testing.assert_close(a.data, b.data, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)
    assert np.allclose(np.abs(np.diag(a.affine)[:3]), 3.0) and np.all(np.diag(a.affine)[:3] > 0)  # RAS, 3 mm
    # the brain is centred: its centre of mass sits near the middle of the grid
    com = np.argwhere(a.data[0].numpy() > 0.1).mean(axis=0)
    assert np.all(np.abs(com - 15.5) < 1.5)
    # intensity ramps towards +x (right) in scanner space for both files
    profile = a.data[0].numpy()[:, 16, 16]
    inside = profile > 0.1
    assert np.all(np.diff(profile[inside]) >= -1e-3)


def test_mask_follows_image_window_and_world_coordinates(tmp_path):
    data = blob_volume()
    mask = np.zeros_like(data, dtype=np.uint8)
    mask[26:30, 18:22, 16:20] = 1
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    img = write_nifti(tmp_path / "s_FLAIR.nii.gz", data, affine)
    roi = write_nifti(tmp_path / "s_roi.nii.gz", mask, affine)
    prep = Preprocessing(shape=(32, 32, 32), spacing=(2.0, 2.0, 2.0))
    image, m = preprocess_pair(img, roi, prep)
    assert set(torch.unique(m.data).tolist()) == {0.0, 1.0}
    assert float(m.data.sum()) == mask.sum()
    # the mask's centre maps to the same world point through the model-grid affine
    centre_vox = np.argwhere(m.data[0].numpy() > 0).mean(axis=0)
    world = m.affine @ np.append(centre_vox, 1.0)
    expected = affine @ np.append(np.argwhere(mask > 0).mean(axis=0), 1.0)
    np.testing.assert_allclose(world[:3], expected[:3], atol=1e-6)


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.nii.gz", "does not exist"),
    (lambda p: write_nifti(p / "flat.nii.gz", np.ones((8, 8), np.float32)), "expected a 3D volume, got 2D"),
    (lambda p: write_nifti(p / "four.nii.gz", np.ones((8, 8, 8, 3), np.float32)), "got 4D"),
    (lambda p: write_nifti(p / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32)), "NaN"),
])
def test_bad_volumes_name_file_and_problem(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(VolumeError, match=match) as info:
        read_nifti(path)
    assert path.name in str(info.value)


def test_corrupt_file_and_grid_not_divisible_by_four(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="corrupt.nii.gz: not a readable NIfTI"):
        read_nifti(bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        Preprocessing(shape=(30, 32, 32))


def test_save_nifti_is_atomic_and_round_trips(tmp_path):
    data = np.random.rand(8, 8, 8).astype(np.float32)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    path = save_nifti(data, affine, tmp_path / "x.nii.gz")
    back = nib.load(str(path))
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(back.affine, affine)
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_atomic_outputs_get_the_umask_permissions_even_when_the_writer_recreates_the_file(tmp_path):
    """mkstemp makes 0600 files and safetensors' save_file recreates its file 0600: outputs (adapters, shipped
    weights, NIfTI pairs) must still be readable as any file the user writes (umask)."""
    import os
    import stat

    from safetensors.torch import save_file

    from neuromf.utils import atomic_write, atomic_write_text

    umask = os.umask(0o022)
    try:
        weights = atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"x": torch.zeros(2)}, str(p)))
        text = atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(umask)
    for path in (weights, text):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "w.safetensors"]  # no temporaries left
