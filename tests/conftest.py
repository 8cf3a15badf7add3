"""Shared fixtures: tiny real models and small NIfTI files on disk. Everything runs on CPU in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small BIDS phantom tree (4 healthy + 4 FCD) on the 64^3 / 3 mm grid, generated once per session."""
    from neuromf.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "bids", n_healthy=4, n_fcd=4, seed=3)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` MAISI-class VAE saved in our format (real class, real file)."""
    from neuromf.vae import MAISIVAEWrapper

    torch.manual_seed(0)
    vae = MAISIVAEWrapper("tiny", scale_factor=1.0)
    return vae.save(tmp_path_factory.mktemp("vae") / "vae_tiny")
