"""Helpers shared by the test modules (import them from here, not from conftest: each test folder has its own
conftest, and `from conftest import ...` would pick whichever was imported first)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

TEST_SHAPE = (32, 32, 32)
TEST_SPACING = (6.0, 6.0, 6.0)
TEST_LATENT = (8, 8, 8)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def coarse_prep():
    from neuromf.io.nifti import Preprocessing

    return Preprocessing(shape=TEST_SHAPE, spacing=TEST_SPACING)


def tiny_config(tmp: Path, data_dir: Path, vae_dir: Path, **overrides):
    """A RunConfig for the tiny UNet + tiny VAE on a phantom tree: a few steps, CPU."""
    from neuromf.config import load_config

    values = {"data.data_dir": str(data_dir), "data.split": None, "data.shape": list(TEST_SHAPE),
              "data.spacing": list(TEST_SPACING), "data.flip": False, "data.cache_dir": str(tmp / "cache"),
              "model.preset": "tiny", "model.vae": str(vae_dir), "model.vae_preset": "tiny",
              "training.max_steps": 3, "training.batch_size": 4, "training.device": "cpu",
              "training.checkpoint_every": 0, "training.output_dir": str(tmp / "run")}
    values.update(overrides)
    return load_config("base_tiny", values)


# rates of a made-up machine for the time-estimate tests (neuromf.estimates): the arithmetic, not any machine's speed
TEST_RATES = {
    "env": {part: {"cpu_count": 2, "cpu_model": "Test CPU", "torch_threads": 1, "loadavg_start": [3.0, 2.0, 1.0]}
            for part in ("mask_test", "training", "generation")},
    "mask_test": {"vae_fine": {"load_s": 2.0, "per_case_s": 20.0, "grid": [96, 96, 96]},
                  "vae_small": {"load_s": 1.0, "per_case_s": 10.0, "grid": [64, 64, 64]}},
    "training": {"joint_2mm": {"load_s": 10.0, "per_case_encoding_s": 6.0, "per_step_s": 8.0, "batch_size": 8},
                 "joint_3mm": {"load_s": 5.0, "per_case_encoding_s": 3.0, "per_step_s": 4.0, "batch_size": 8}},
    "generation": {"load_s": 5.0, "joint_per_step_s": 4.0, "render_per_step_s": 2.0, "grid": [96, 96, 96]},
}


def adapter_copy(source: Path, target: Path, **entries) -> Path:
    """A copy of an adapter folder with `entries` set in its sidecar: sidecar-driven defaults are tested on the
    copy, never on a fixture other tests share."""
    shutil.copytree(source, target)
    sidecar = target / "neuromf_adapter.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), **entries}))
    return target
