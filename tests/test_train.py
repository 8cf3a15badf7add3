"""The training loop: learning a toy latent distribution, stop flag, checkpoints, resume, NaN guard."""

from __future__ import annotations

from pathlib import Path
from threading import Event

import pytest
import torch

from neuromf.config import TrainingConfig
from neuromf.meanflow import MeanFlowLoss, sample_meanflow
from neuromf.models.unet import MeanFlowUNet
from neuromf.train import NonFiniteLossError, TrainTask, run_to_end, train
from neuromf.train import checkpoint as ckpt_module
from neuromf.train.checkpoint import checkpoint_paths, read_checkpoint_meta


def two_blobs(n: int, seed: int = 0) -> torch.Tensor:
    """Toy latents: each sample is +1 or -1 everywhere (two Gaussian blobs, tiny spread)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return signs.view(n, 1, 1, 1, 1) * torch.ones(n, 4, 4, 4, 4) + 0.05 * torch.randn(n, 4, 4, 4, 4, generator=g)


def cfg(tmp: Path, **kw) -> TrainingConfig:
    base = dict(max_steps=20, batch_size=8, lr=2e-3, warmup_steps=5, ema_decay=0.9, seed=1, device="cpu",
                checkpoint_every=5, output_dir=str(tmp))
    base.update(kw)
    return TrainingConfig(**base)


def task() -> TrainTask:
    torch.manual_seed(0)
    return TrainTask(model=MeanFlowUNet(4, preset="tiny"), loss_fn=MeanFlowLoss())


def test_toy_distribution_is_learned(tmp_path):
    data = two_blobs(64)
    t = task()
    events = []
    result = run_to_end(train(t, data, cfg(tmp_path, max_steps=200, checkpoint_every=0), tmp_path), events.append)
    losses = [e.parts["raw"] for e in events if e.kind == "step"]
    assert result.step == 200 and not result.stopped
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    # 1-step samples land near one of the two modes: much closer than the noise they started from
    noise = torch.randn(16, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    t.model.eval()
    x = sample_meanflow(t.model, noise, steps=1)

    def dist(v):
        return torch.minimum((v - 1).pow(2).mean(dim=(1, 2, 3, 4)), (v + 1).pow(2).mean(dim=(1, 2, 3, 4)))

    assert dist(x).mean() < 0.3 * dist(noise).mean()
    assert (tmp_path / "losses.csv").is_file() and (tmp_path / "loss_curve.png").stat().st_size > 1000


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data = two_blobs(24)
    full_events = []
    run_to_end(train(task(), data, cfg(tmp_path / "full", max_steps=12), tmp_path / "full"), full_events.append)
    full = {e.step: e.loss for e in full_events if e.kind == "step"}

    stop = Event()
    first = []

    def stop_at_7(event):
        first.append(event)
        if event.kind == "step" and event.step == 7:
            stop.set()

    result = run_to_end(train(task(), data, cfg(tmp_path / "split", max_steps=12), tmp_path / "split", stop=stop),
                        stop_at_7)
    assert result.stopped and result.step == 7 and first[-1].kind == "stopped"
    assert read_checkpoint_meta(tmp_path / "split")["step"] == 7
    resumed = []
    result = run_to_end(train(task(), data, cfg(tmp_path / "split", max_steps=12), tmp_path / "split", resume=True),
                        resumed.append)
    steps = {e.step: e.loss for e in resumed if e.kind == "step"}
    assert min(steps) == 8 and result.step == 12
    for step in range(8, 13):
        assert steps[step] == pytest.approx(full[step], rel=1e-5, abs=1e-7)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    data = two_blobs(8)
    run_to_end(train(task(), data, cfg(tmp_path, max_steps=5, checkpoint_every=0), tmp_path))
    weights, sidecar = checkpoint_paths(tmp_path)
    before = weights.read_bytes()

    def torn_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module, "save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        run_to_end(train(task(), data, cfg(tmp_path, max_steps=10, checkpoint_every=0), tmp_path, resume=True))
    assert weights.read_bytes() == before
    assert read_checkpoint_meta(tmp_path)["step"] == 5
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    calls = {"n": 0}
    inner = MeanFlowLoss()

    def flaky(model, batch, gen):
        calls["n"] += 1
        loss, parts = inner(model, batch, gen)
        return (loss * float("nan"), parts) if calls["n"] in (2, 3) else (loss, parts)

    t = TrainTask(model=MeanFlowUNet(4, preset="tiny"), loss_fn=flaky)
    events = []
    result = run_to_end(train(t, two_blobs(8), cfg(tmp_path, max_steps=6, checkpoint_every=0), tmp_path), events.append)
    assert [e.step for e in events if e.kind == "skipped"] == [2, 3]
    assert result.skipped_steps == 2 and result.step == 6
    assert all(torch.isfinite(p).all() for p in t.model.parameters())

    def always_nan(model, batch, gen):
        loss, parts = inner(model, batch, gen)
        return loss * float("nan"), parts

    t = TrainTask(model=MeanFlowUNet(4, preset="tiny"), loss_fn=always_nan)
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        run_to_end(train(t, two_blobs(8), cfg(tmp_path / "b", max_steps=10, max_bad_steps=3), tmp_path / "b"))
