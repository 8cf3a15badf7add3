"""Shared fixtures: tiny real models and small NIfTI files on disk. Everything runs on CPU in seconds."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import TEST_SHAPE, TEST_SPACING, tiny_config

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Files whose few tests run long (subprocess launches, real trainings; 50-115 s each on the 2-core machine), handed
# to the xdist workers first, longest first: xdist's own order (most tests first) handed them out last, so the suite
# ended with one worker running a long file while the other idled. `make test` turns xdist's order off
# (--no-loadscope-reorder); the other files keep it (most tests first).
LONG_FILES = ("test_kill_resume.py", "test_distributed.py", "test_fine_default.py", "test_distributed_cli.py",
              "test_plugin_training_jobs.py", "test_embedded.py", "test_train.py", "test_launch.py",
              "test_pipeline.py")


def pytest_collection_modifyitems(config, items):
    files = Counter(item.nodeid.split("::")[0] for item in items)

    def rank(item) -> tuple[int, int]:
        file = item.nodeid.split("::")[0]
        name = Path(file).name
        return (LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES), -files[file])

    items.sort(key=rank)  # stable: a file's tests stay together and in their order


@pytest.fixture(autouse=True)
def _own_user_folder(tmp_path, monkeypatch):
    """No test reads or writes the user's own data folder: a command-line run records this machine's pace
    (`machine_pace.json`) and later estimates read it."""
    monkeypatch.setenv("NEUROMF_HOME", str(tmp_path / "neuromf_home"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small BIDS phantom tree (4 healthy + 4 FCD) on a coarse 32^3 / 6 mm grid (8x cheaper than the embedded
    64^3 / 3 mm one, same code paths), generated once per session."""
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset

    cfg = PhantomConfig(shape=TEST_SHAPE, spacing=TEST_SPACING)
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "bids", n_healthy=4, n_fcd=4, seed=3, cfg=cfg)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` MAISI-class VAE saved in our format (real class, real file)."""
    from neuromf.vae import MAISIVAEWrapper

    torch.manual_seed(0)
    vae = MAISIVAEWrapper("tiny", scale_factor=1.0)
    return vae.save(tmp_path_factory.mktemp("vae") / "vae_tiny")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, phantom_dir, tiny_vae_dir) -> Path:
    """A stage-1 tiny MeanFlow model trained for a few steps on the healthy phantoms (the real pipeline)."""
    from neuromf.pipelines.stage1 import train_base
    from neuromf.train import run_to_end

    tmp = tmp_path_factory.mktemp("base")
    cfg = tiny_config(tmp, phantom_dir, tiny_vae_dir, **{"data.group": "hc"})
    result = run_to_end(train_base(cfg, progress=False))
    return result.out_dir


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory, phantom_dir, tiny_vae_dir, tiny_base_dir):
    """A tiny conditional (ControlNet) adapter trained for two steps on the phantoms (its `.export` folder), shared
    by the conditional-mode and inpainting tests."""
    from neuromf.pipelines.conditional import train_conditional
    from neuromf.train import run_to_end

    tmp = tmp_path_factory.mktemp("cond")
    cfg = tiny_config(tmp, phantom_dir, tiny_vae_dir, **{"loss.lesion_weight": 50.0, "training.max_steps": 2,
                                                         "conditional.embedding_channels": [8]})
    return run_to_end(train_conditional(cfg, tiny_base_dir, progress=False))


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
