"""Fixtures of the plugin tests: a temporary user folder, a few phantom cases, a tiny random base model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SUBJECTS = ("sub-00001", "sub-00002", "sub-00003")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Runs, generated pairs and the remembered widget state under tmp, and a fresh shared plugin state."""
    from napari_neuromf import _session

    monkeypatch.setenv("NEUROMF_HOME", str(tmp_path / "neuromf_home"))
    monkeypatch.setattr(_session, "STATE", _session.PluginState())


@pytest.fixture(scope="session")
def phantom_subset(tmp_path_factory) -> Path:
    """Three FCD phantom patients from sample_data (train split), as a small BIDS tree."""
    from neuromf.weights import sample_data_root

    src = sample_data_root() / "fcd_phantoms"
    dst = tmp_path_factory.mktemp("phantoms") / "bids"
    dst.mkdir()
    for subject in SUBJECTS:
        shutil.copytree(src / subject, dst / subject)
    rows = [line for line in (src / "participants.tsv").read_text().splitlines()
            if line.startswith("participant_id") or line.split("\t")[0] in SUBJECTS]
    (dst / "participants.tsv").write_text("\n".join(rows) + "\n")
    return dst


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random `tiny` MeanFlow UNet saved like a stage-1 model, with a random `tiny` VAE on a 32^3 grid
    (``tiny_base.parent / "vae_tiny"``)."""
    import torch

    from neuromf.io.nifti import Preprocessing
    from neuromf.models.flow_model import save_flow_model
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.vae import MAISIVAEWrapper

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    prep = Preprocessing(shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0))
    vae = MAISIVAEWrapper("tiny", scale_factor=1.0)
    vae_dir = vae.save(root / "vae_tiny", extra={"preprocessing": prep.key()})
    meta = {"vae": str(vae_dir), "vae_preset": "tiny", "vae_identity": vae.identity, "scale_factor": 1.0,
            "preprocessing": prep.key(), "latent_shape": [4, 8, 8, 8], "channels": {"image": 4, "mask": 0},
            "stage": 1}
    save_flow_model(MeanFlowUNet(4, preset="tiny"), root / "base_tiny", meta)
    return root / "base_tiny"
