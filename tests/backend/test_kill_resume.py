"""Fault injection with real processes (issue 10): `neuromf train-lora` / `train-base` SIGKILLed at random points
and inside a checkpoint write, then `--resume`d; a killed run must lose at most `checkpoint_every` steps, leave
a loss log without gaps or duplicates, no temp files and no stale lock, and end with the weights of a run that
was never interrupted. Kills are triggered by what the run has written (its checkpoint sidecar), never by a
fixed delay; the kill inside a checkpoint write uses the writer's test hook (NEUROMF_FAULT_CHECKPOINT), which
makes the process SIGKILL itself between writing a temp file and renaming it.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from testkit import TEST_SHAPE, TEST_SPACING

from neuromf.cli import main as cli
from neuromf.config import load_config
from neuromf.train import run_to_end
from neuromf.train.checkpoint import FAULT_ENV, META_KEY, checkpoint_paths, read_checkpoint_meta
from neuromf.train.run_dir import LOCK_NAME

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

CHECKPOINT_EVERY = 2
HANG_GUARD_S = 300  # only stops a hung test; no assertion depends on time


# --------------------------------------------------------------------------------------------- helpers
def write_config(path: Path, phantom_dir: Path, vae_dir: Path, cache: Path, out: Path, **training) -> Path:
    values = {
        "data": {"data_dir": str(phantom_dir), "split": None, "group": None, "flip": False,
                 "shape": list(TEST_SHAPE), "spacing": list(TEST_SPACING), "cache_dir": str(cache),
                 "mask_strategy": "downsample", "downsample_mode": "area"},
        "model": {"preset": "tiny", "vae": str(vae_dir), "vae_preset": "tiny"},
        "lora": {"rank": 4, "alpha": 4.0},
        "training": {"max_steps": 10, "batch_size": 4, "warmup_steps": 1, "lr": 5e-3, "device": "cpu",
                     "checkpoint_every": CHECKPOINT_EVERY, "output_dir": str(out), **training},
    }
    path.write_text(yaml.safe_dump(values))
    return path


def launch(argv: list[str], cwd: Path, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "neuromf", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=HANG_GUARD_S)
    return proc.returncode, out


def wait_for(proc: subprocess.Popen, what: str, ready) -> None:
    """Poll until `ready()` holds; fails (with the process output) if the process ends first."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"hung waiting for {what}")
        time.sleep(0.01)


def sidecar_step(out: Path) -> int:
    """Step of the checkpoint sidecar on disk, -1 while there is none (or it is being replaced)."""
    try:
        return int(json.loads(checkpoint_paths(out)[1].read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def logged_steps(out: Path, before_training: bool = False) -> list[int]:
    """Steps of the logged epochs; with `before_training`, also the fixed draw's evaluation before the first step
    (step 0, no training loss), which trainings with an evaluation draw log."""
    path = out / "losses.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [int(float(row["step"])) for row in csv.DictReader(fh) if before_training or row.get("loss")]


def losses(out: Path) -> dict[int, float]:
    with open(out / "losses.csv", newline="") as fh:
        return {int(float(r["step"])): float(r["loss"]) for r in csv.DictReader(fh) if r.get("loss")}


def sigkill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL


def leftovers(out: Path) -> list[str]:
    """Temp files, staging folders and lock files a run folder must not keep once a run has ended (its ownership
    manifest, `neuromf.io.owned.MANIFEST`, is meant to stay)."""
    from neuromf.io.owned import MANIFEST

    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if p.relative_to(out) != Path(MANIFEST))


def assert_same_tensors(a: Path, b: Path, prefix: str = "") -> None:
    left, right = load_file(str(a)), load_file(str(b))
    keys = sorted(k for k in left if k.startswith(prefix))
    assert keys and keys == sorted(k for k in right if k.startswith(prefix))
    for key in keys:
        torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6, msg=key)


def reference_run(train, config: Path, out: Path, *args):
    """The same config run in-process without interruption (one thread, as the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(str(config), {"training.output_dir": str(out)})
        return run_to_end(train(cfg, *args, progress=False))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill_cache")


# --------------------------------------------------------------------------------------------- kill + resume
def test_train_joint_killed_at_random_points_resumes_to_the_uninterrupted_result(
        tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir, cache):
    from neuromf.pipelines.joint import train_joint

    # a fixed seed picks the checkpoint and the delay before the kill, so a failure can be rerun; set
    # NEUROMF_KILL_SEED to try other points (where the kill lands still varies with the machine's speed)
    seed = int(os.environ.get("NEUROMF_KILL_SEED", "0"))
    rng = random.Random(seed)
    note = f"(NEUROMF_KILL_SEED={seed})"
    out = tmp_path / "run"
    config = write_config(tmp_path / "lora.yaml", phantom_dir, tiny_vae_dir, cache, out)
    reference = reference_run(train_joint, config, tmp_path / "reference", str(tiny_base_dir))
    argv = ["train-joint", "--config", str(config), "--base_checkpoint", str(tiny_base_dir)]

    # 1. SIGKILL from outside, at a random point after a random checkpoint
    proc = launch(argv, tmp_path)
    target = rng.choice([2, 4])
    wait_for(proc, f"checkpoint {target}", lambda: sidecar_step(out) >= target)
    time.sleep(rng.uniform(0.0, 0.2))  # lands anywhere in the next steps, well before the 10th (not an assertion)
    sigkill(proc)
    saved = read_checkpoint_meta(out)["step"]
    reached = max(logged_steps(out))
    assert saved >= target and 0 <= reached - saved <= CHECKPOINT_EVERY, note
    before = losses(out)

    # 2. --resume, killed by the writer itself between renaming the new weights and the new sidecar
    torn_at = saved + CHECKPOINT_EVERY
    rc, output = finish(launch([*argv, "--resume"], tmp_path, fault=f"weights-renamed@{torn_at}"))
    assert rc == -signal.SIGKILL, f"{note}\n{output}"
    assert sidecar_step(out) == saved and read_checkpoint_meta(out)["step"] == torn_at, note  # a torn pair on disk
    assert all(losses(out)[s] == before[s] for s in range(1, saved + 1))  # the log up to the checkpoint is kept

    # 3. --resume to the end
    rc, output = finish(launch([*argv, "--resume"], tmp_path))
    assert rc == 0 and "finished at step 10" in output, f"{note}\n{output}"
    assert logged_steps(out, before_training=True) == list(range(0, 11)), note  # no gaps, no duplicates
    assert read_checkpoint_meta(out)["step"] == 10 == sidecar_step(out)
    weights, sidecar = checkpoint_paths(out)
    assert json.loads(sidecar.read_text()) == read_checkpoint_meta(out)  # the stale sidecar was rewritten
    assert leftovers(out) == [], note
    # the final weights and the whole loss log are those of the run that was never interrupted
    assert_same_tensors(weights, reference.checkpoint, "model/")
    assert_same_tensors(weights, reference.checkpoint, "ema/")
    assert_same_tensors(out / "adapter" / "adapter_model.safetensors",
                        reference.export / "adapter_model.safetensors")
    expected = losses(reference.out_dir)
    for step, value in losses(out).items():
        assert value == pytest.approx(expected[step], rel=1e-4), (step, note)


def test_train_base_killed_inside_a_checkpoint_write_resumes(tmp_path, phantom_dir, tiny_vae_dir, cache, capfd):
    from neuromf.models.flow_model import load_flow_model
    from neuromf.pipelines.stage1 import train_base

    out = tmp_path / "run"
    config = write_config(tmp_path / "base.yaml", phantom_dir, tiny_vae_dir, cache, out, max_steps=6)
    # the tiny config trains on the healthy phantoms
    text = yaml.safe_load(config.read_text())
    text["data"]["group"] = "hc"
    config.write_text(yaml.safe_dump(text))
    reference = reference_run(train_base, config, tmp_path / "reference")
    argv = ["train-base", "--config", str(config)]

    # killed with the step-4 weights in a temp file, not yet renamed: the step-2 checkpoint must stay whole
    rc, output = finish(launch(argv, tmp_path, fault="weights-written@4"))
    assert rc == -signal.SIGKILL, output
    weights, _ = checkpoint_paths(out)
    assert [p.name.startswith(f".{weights.name}.") for p in out.glob(".*.tmp")] == [True]
    assert read_checkpoint_meta(out)["step"] == 2 == sidecar_step(out)
    assert (out / LOCK_NAME).is_file()  # the killed process's lock file is left, but its lock is gone:

    # the plain command is refused (the folder holds a run), --resume continues it
    assert cli(argv) == 2
    assert "--resume" in capfd.readouterr().err
    rc, output = finish(launch([*argv, "--resume"], tmp_path))
    assert rc == 0 and "finished at step 6" in output, output
    assert logged_steps(out) == list(range(1, 7)) and leftovers(out) == []
    assert_same_tensors(weights, reference.checkpoint, "model/")
    model, meta = load_flow_model(out)
    assert meta["latent_shape"] and model is not None
    assert_same_tensors(out / "model.safetensors", reference.out_dir / "model.safetensors")


# --------------------------------------------------------------------------------------------- the lock
def test_a_second_training_into_the_same_folder_is_refused_and_a_killed_lock_does_not_stick(
        tmp_path, phantom_dir, tiny_vae_dir, cache, capfd):
    out = tmp_path / "run"
    config = write_config(tmp_path / "base.yaml", phantom_dir, tiny_vae_dir, cache, out, max_steps=100_000,
                          checkpoint_every=0)
    text = yaml.safe_load(config.read_text())
    text["data"]["group"] = "hc"
    config.write_text(yaml.safe_dump(text))
    argv = ["train-base", "--config", str(config)]
    first = launch(argv, tmp_path)
    try:
        wait_for(first, "the first run's lock and first step",
                 lambda: f"pid {first.pid}" in _read(out / LOCK_NAME) and logged_steps(out))
        state = listing(out)
        for extra in ([], ["--overwrite"], ["--resume"]):
            rc = cli([*argv, *extra])
            err = capfd.readouterr().err
            assert rc == 2 and "another training is running in this output folder" in err, (extra, err)
            assert f"pid {first.pid}" in err and str(out) in err and "Traceback" not in err
            assert listing(out) == state and first.poll() is None  # untouched
    finally:
        if first.poll() is None:
            sigkill(first)
    # killed before its first checkpoint: its lock is gone with it, and --resume starts it again from step 0
    assert not checkpoint_paths(out)[0].exists() and (out / "config.yaml").is_file()
    with pytest.warns(UserWarning, match="saved no checkpoint before it stopped; starting it again from step 0"):
        rc = cli([*argv, "--resume", "--set", "training.max_steps=2"])
    captured = capfd.readouterr()
    assert rc == 0 and "finished at step 2" in captured.out, captured.err
    assert logged_steps(out) == [1, 2] and leftovers(out) == []


def listing(out: Path) -> list[str]:
    """The folder's entries, without the temp files the running training's atomic log writes come and go with."""
    return sorted(p.name for p in out.iterdir() if not p.name.endswith(".tmp"))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_run_lock_in_process(tmp_path):
    from neuromf.train.run_dir import RunInUseError, RunLock

    first = RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(RunInUseError, match=f"another training is running.*pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # flock: a second open file is refused, in the same process too
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    second = RunLock(tmp_path).acquire()
    assert second.held
    second.release()
    # a lock file left by a killed holder blocks nothing
    (tmp_path / LOCK_NAME).write_text("pid 1 on elsewhere")
    third = RunLock(tmp_path).acquire()
    assert f"pid {os.getpid()}" in (tmp_path / LOCK_NAME).read_text()
    third.release()


# --------------------------------------------------------------------------------------------- failed runs
def test_a_run_that_aborts_on_non_finite_losses_leaves_no_trap(tmp_path, phantom_dir, tiny_vae_dir, cache,
                                                              monkeypatch):
    from neuromf.pipelines import stage1
    from neuromf.pipelines.stage1 import train_base
    from neuromf.train.loop import NonFiniteLossError

    def cfg(out: Path, lr: float | None = None, **training):
        values = {"training.warmup_steps": 0, "training.max_bad_steps": 2, "training.max_steps": 4,
                  "training.checkpoint_every": 0, "training.output_dir": str(out),
                  **{f"training.{k}": v for k, v in training.items()}}
        config = write_config(tmp_path / "base.yaml", phantom_dir, tiny_vae_dir, cache, out)
        loaded = load_config(str(config), {"data.group": "hc", **values})
        if lr is not None:  # a learning rate configs refuse (> 10): set past validation to make the loop diverge
            loaded.training.lr = lr
        return loaded

    # lr 1e30: step 1 is fine, its update blows the weights up, steps 2-3 are non-finite: abort. No checkpoint
    # was saved, so the start is undone and the same command is not refused ("already holds a run")
    out = tmp_path / "a" / "run"
    for _ in range(2):
        events = []
        with pytest.raises(NonFiniteLossError, match="non-finite"):
            run_to_end(train_base(cfg(out, lr=1e30), progress=False), events.append)
        assert [e.kind for e in events if e.kind in ("step", "skipped")] == ["step", "skipped", "skipped"]
        assert not (tmp_path / "a").exists()

    # the loss turns NaN after the step-2 checkpoint: the folder is kept, the same command is refused with a
    # pointer to --resume, and --resume continues from step 2 once the cause is gone
    real_from_config, calls = stage1.MeanFlowLoss.from_config, {"n": 0, "fail": True}

    def failing_after_two_steps(*args, **kwargs):
        loss_fn = real_from_config(*args, **kwargs)

        def loss(model, batch, generator):
            value, parts = loss_fn(model, batch, generator)
            calls["n"] += 1
            return (value * float("nan") if calls["fail"] and calls["n"] > 2 else value), parts

        return loss

    monkeypatch.setattr(stage1.MeanFlowLoss, "from_config", failing_after_two_steps)
    out = tmp_path / "b"
    with pytest.raises(NonFiniteLossError):
        run_to_end(train_base(cfg(out, checkpoint_every=2), progress=False))
    assert read_checkpoint_meta(out)["step"] == 2 and (out / "config.yaml").is_file()
    assert logged_steps(out) == [1, 2]
    with pytest.raises(FileExistsError, match="--resume"):
        run_to_end(train_base(cfg(out, checkpoint_every=2), progress=False))
    calls["fail"] = False
    events = []
    result = run_to_end(train_base(cfg(out, checkpoint_every=2), resume=True, progress=False), events.append)
    assert result.step == 4 and min(e.step for e in events if e.kind == "step") == 3
    assert logged_steps(out) == [1, 2, 3, 4] and leftovers(out) == []
    meta = json.loads(checkpoint_paths(out)[1].read_text())
    assert meta["step"] == 4 and json.loads(load_meta(checkpoint_paths(out)[0]))["step"] == 4


def load_meta(weights: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        return fh.metadata()[META_KEY]


def test_stale_temporaries_are_cleared_on_resume_only(tmp_path):
    from neuromf.train.run_dir import remove_stale_temporaries

    (tmp_path / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / ".events.x.tmp").write_bytes(b"partial")
    (tmp_path / ".adapter.k2j4").mkdir()
    (tmp_path / ".adapter.k2j4" / "adapter_model.safetensors").write_bytes(b"w")
    (tmp_path / ".adapter.old").mkdir()
    keep = [tmp_path / ".git", tmp_path / "notes.tmp", tmp_path / "checkpoint.json"]
    keep[0].mkdir()
    keep[1].write_text("a user's file")
    keep[2].write_text("{}")
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.rglob("*")) == [".git", "checkpoint.json", "notes.tmp", "tensorboard"]


def test_the_weights_file_alone_is_a_checkpoint_and_old_checkpoints_still_load(tmp_path):
    """The sidecar rides in the weights' safetensors metadata (one rename switches checkpoints); a checkpoint
    written before that reads its sidecar as before, and a damaged weights file is named, not a traceback."""
    from safetensors.torch import save_file

    from neuromf.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from neuromf.train.ema import EMA

    def parts(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        return model, EMA(model, 0.9), optimizer, torch.Generator().manual_seed(seed)

    model, ema, optimizer, generator = parts(0)
    save_checkpoint(tmp_path, model, ema, optimizer, generator, TrainState(step=3), {"kind": "test"})
    weights, sidecar = checkpoint_paths(tmp_path)
    written = json.loads(sidecar.read_text())
    sidecar.unlink()
    assert read_checkpoint_meta(tmp_path) == written
    other = parts(1)
    assert load_checkpoint(tmp_path, *other).step == 3
    torch.testing.assert_close(other[0].weight, model.weight)
    assert json.loads(sidecar.read_text()) == written  # rewritten from the weights file
    assert not list(tmp_path.glob(".*"))
    # a checkpoint from before: no sidecar inside the weights, the step in both must agree
    save_file(load_file(str(weights)), str(weights), metadata={"step": "3"})
    assert read_checkpoint_meta(tmp_path)["step"] == 3
    sidecar.write_text(json.dumps({**written, "step": 2}))
    with pytest.raises(ValueError, match=r"weights \(step 3\) and sidecar \(step 2\) disagree"):
        read_checkpoint_meta(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"checkpoint\.safetensors: checkpoint weights are not a readable"):
        read_checkpoint_meta(tmp_path)
