"""The finer (2 mm) embedded default: generated phantoms by name, shipped models by name, and warm starts."""

from __future__ import annotations

import pytest
import torch
from testkit import TEST_SHAPE, TEST_SPACING, tiny_config

from neuromf.data import embedded
from neuromf.data.embedded import GeneratedPhantoms, generated_phantoms, resolve_data_dir
from neuromf.io.bids import discover_cases
from neuromf.train import run_to_end
from neuromf.weights import embedded_model

SMALL = GeneratedPhantoms(n_healthy=1, n_fcd=2, seed=5, shape=TEST_SHAPE, spacing=TEST_SPACING)


def test_generated_phantoms_are_made_once_and_keyed_by_their_settings(tmp_path):
    first = generated_phantoms(SMALL, tmp_path, progress=False)
    cases = discover_cases(first)
    assert len(cases) == 3 and sum(c.mask is not None for c in cases) == 2
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")}
    assert generated_phantoms(SMALL, tmp_path, progress=False) == first  # reused, not regenerated
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*.nii.gz")} == stamps
    other = generated_phantoms(GeneratedPhantoms(1, 2, seed=6, shape=TEST_SHAPE, spacing=TEST_SPACING), tmp_path,
                               progress=False)
    assert other != first and other.parent == first.parent
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".generating-")]  # scratch folders removed


def test_an_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from neuromf.data import phantom

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(phantom, "make_phantom_dataset", fail)
    with pytest.raises(KeyboardInterrupt):
        generated_phantoms(SMALL, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_embedded_fine_data_resolves_to_the_generated_set(tmp_path, monkeypatch):
    real = embedded.FINE_PHANTOMS
    # the real set: as many cases as ds004199 (85 FCD + 85 healthy), at <= 2 mm
    assert real.n_fcd >= 85 and real.n_healthy >= 85 and max(real.spacing) <= 2.0
    monkeypatch.setenv("NEUROMF_DATA", str(tmp_path))
    monkeypatch.setattr(embedded, "FINE_PHANTOMS", SMALL)  # same code path, 3 coarse cases instead of 170
    root = resolve_data_dir("embedded-fine")
    assert root.parent == tmp_path and len(discover_cases(root)) == 3


def test_shipped_model_names():
    assert embedded_model("embedded", "vae").name == "vae_small"
    assert embedded_model("embedded", "conditional").name == "cond_demo"
    assert embedded_model("some/folder", "vae") is None
    with pytest.raises(FileNotFoundError, match="no shipped joint model is called 'embedded-fine'"):
        embedded_model("embedded-fine", "joint")


# ------------------------------------------------------------------------------------------------ warm starts
def test_train_base_starts_from_init_from_weights(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir):
    from neuromf.models.flow_model import load_flow_model
    from neuromf.pipelines.stage1 import train_base

    source, _ = load_flow_model(tiny_base_dir)
    cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{"data.group": "hc", "model.init_from": str(tiny_base_dir),
                                                                "training.lr": 1e-12, "training.ema_decay": 0.0,
                                                                "training.max_steps": 1})
    run_to_end(train_base(cfg, progress=False))
    trained, meta = load_flow_model(tmp_path / "run")
    assert meta["init_from"] == str(tiny_base_dir)
    for (name, a), b in zip(source.state_dict().items(), trained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name  # lr ~0: the run's weights are the warm start's

    cold = tiny_config(tmp_path / "cold", phantom_dir, tiny_vae_dir, **{"data.group": "hc", "training.lr": 1e-12,
                                                                        "training.ema_decay": 0.0,
                                                                        "training.max_steps": 1})
    run_to_end(train_base(cold, progress=False))
    fresh, _ = load_flow_model(tmp_path / "cold" / "run")
    assert any(not torch.allclose(a, b) for a, b in zip(source.state_dict().values(), fresh.state_dict().values()))


def test_warm_start_from_another_architecture_is_refused(tiny_base_dir):
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.pipelines.stage1 import warm_start

    with pytest.raises(ValueError, match="model.init_from has a different architecture"):
        warm_start(tiny_base_dir, MeanFlowUNet(in_channels=8, preset="tiny"))
