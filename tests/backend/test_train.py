"""The training loop: learning a toy latent distribution, stop flag, checkpoints, resume, NaN guard."""

from __future__ import annotations

import statistics
from pathlib import Path
from threading import Event

import pytest
import torch

from neuromf.config import TrainingConfig
from neuromf.meanflow import MeanFlowLoss, sample_meanflow
from neuromf.meanflow.loss import interpolate
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


def flow_matching_error(model: MeanFlowUNet, data: torch.Tensor) -> float:
    """Instantaneous-velocity error on a fixed batch (fixed noise and t, r = t): a deterministic measure of what
    the model has learned, free of the heavy tail of the training loss's JVP term."""
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(data.shape, generator=g)
    t = torch.rand(data.shape[0], generator=g) * 0.98 + 0.01
    z, v = interpolate(data, noise, t)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        error = (model(z, t, t) - v).pow(2).flatten(1).mean(1).mul(data.shape[1]).mean()
    model.train(was_training)
    return float(error)


def mode_distance(v: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared distance to the nearer of the two modes (+1 / -1 everywhere)."""
    return torch.minimum((v - 1).pow(2).mean(dim=(1, 2, 3, 4)), (v + 1).pow(2).mean(dim=(1, 2, 3, 4)))


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy 2-core machine two threads that wait for each
    other at every op made this test 10x slower (past 900 s at load 30); one thread also fixes the float
    trajectory whatever OMP_NUM_THREADS says."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# 200 training steps: 82 s in a suite on a loaded machine; the hang guard is raised for busier ones (nothing here is
# timed)
@pytest.mark.timeout(900)
# the second draw is slow (~22 s): `make test-slow` runs it
@pytest.mark.parametrize(("init_seed", "train_seed"), [(0, 1), pytest.param(1, 2, marks=pytest.mark.slow)])
def test_toy_distribution_is_learned(tmp_path, init_seed, train_seed, one_thread):
    """What training must achieve, on two seeds: not one trajectory's raw loss.

    The raw MeanFlow loss is heavy-tailed: for pairs with r != t the target carries (t - r) du/dt, and du/dt of
    a half-trained net on two narrow modes is occasionally huge (single steps reach 100-3000 against a median
    of ~2). The adaptive weight 1/(L + c) keeps those steps' gradients bounded, so training does not diverge,
    but whether a spike falls into a given 20-step window depends on the exact float trajectory (thread count,
    CPU): the former "mean of the last 20 < half the first 20" failed on about half of all seeds. Checked here
    instead: a deterministic held-out velocity error and 1-step sample quality (both functions of the final
    weights only), and that the typical loss falls at all (medians; the ratio seen was 0.32-0.65).
    """
    data = two_blobs(64)
    torch.manual_seed(init_seed)
    t = TrainTask(model=MeanFlowUNet(4, preset="tiny"), loss_fn=MeanFlowLoss())
    before = flow_matching_error(t.model, data)
    events = []
    config = cfg(tmp_path, max_steps=200, checkpoint_every=0, seed=train_seed)
    result = run_to_end(train(t, data, config, tmp_path), events.append)
    losses = [e.parts["raw"] for e in events if e.kind == "step"]
    assert result.step == 200 and not result.stopped and len(losses) == 200
    # the velocity field is learned: 0.23-0.31 of the untrained error over 17 seeds (1 and 2 threads)
    assert flow_matching_error(t.model, data) < 0.45 * before
    # the typical training loss falls (medians ignore the rare JVP spikes): seen 0.32-0.65 of the first steps'; the
    # window medians still follow one trajectory, so only the direction is asserted, with that much margin
    assert statistics.median(losses[-50:]) < statistics.median(losses[:20])
    # 1-step samples land near one of the two modes: much closer than the noise they started from (seen <= 0.30)
    noise = torch.randn(32, 4, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    t.model.eval()
    with torch.no_grad():
        x = sample_meanflow(t.model, noise, steps=1)
    assert mode_distance(x).mean() < 0.5 * mode_distance(noise).mean()
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


def test_fixed_draw_evaluator_sizes():
    """The fixed evaluation draw: by default up to 8 evenly spaced samples in one batch (the draw earlier runs
    logged); a larger `n` cycles through every sample with new noise and times, averaged over `chunk`-sized
    batches, and is the same draw at every call."""
    from neuromf.train.loop import fixed_draw_evaluator

    torch.manual_seed(0)
    model, loss = MeanFlowUNet(4, preset="tiny").eval(), MeanFlowLoss(adaptive_power=0.0)
    data = two_blobs(3)

    def by_hand(index: list[int], chunk: int) -> float:
        g = torch.Generator().manual_seed(20_251_126)
        with torch.no_grad():
            parts = [(len(index[i:i + chunk]), loss(model, data[index[i:i + chunk]], g)[1]["raw"])
                     for i in range(0, len(index), chunk)]
        return sum(n * raw for n, raw in parts) / len(index)

    default = fixed_draw_evaluator(loss, data)(model)["raw"]
    assert default == pytest.approx(by_hand([0, 1, 2], 8), rel=1e-6)
    larger = fixed_draw_evaluator(loss, data, n=7, chunk=2)
    first = larger(model)["raw"]
    assert first == pytest.approx(by_hand([0, 1, 2, 0, 1, 2, 0], 2), rel=1e-6)
    assert larger(model)["raw"] == first  # a fixed draw: the same noise and times at every call
    assert first != pytest.approx(default, rel=1e-3)  # the repeats carry new noise and times
    assert fixed_draw_evaluator(loss, two_blobs(12), n=4)(model).keys() == {"raw", "raw_img"}


def test_fixed_draw_logged_before_training_once(tmp_path):
    """With an evaluation hook the log starts with epoch 0: the fixed draw's loss before the first step (what a loss
    decrease is judged against), written once, also when the run is stopped and resumed."""
    import csv

    from neuromf.train.loop import fixed_draw_evaluator

    data = two_blobs(8)

    def evaluated_task() -> TrainTask:
        t = task()
        t.loss_fn = MeanFlowLoss(adaptive_power=0.0)
        t.evaluate = fixed_draw_evaluator(t.loss_fn, data, n=4)
        return t

    untrained = evaluated_task()
    before = untrained.evaluate(untrained.model)["raw"]
    stop = Event()
    settings = cfg(tmp_path, max_steps=4, batch_size=4, checkpoint_every=0)
    run_to_end(train(evaluated_task(), data, settings, tmp_path, stop=stop),
               lambda e: stop.set() if e.kind == "step" and e.step == 2 else None)
    run_to_end(train(evaluated_task(), data, settings, tmp_path, resume=True))
    with open(tmp_path / "losses.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["epoch"]) for r in rows] == [0, 1, 2]
    assert rows[0]["loss"] == "" and float(rows[0]["eval_raw"]) == pytest.approx(before, rel=1e-6)
    assert all(r["loss"] and r["eval_raw"] for r in rows[1:])
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000  # drawn with the fixed draw's dashed lines
