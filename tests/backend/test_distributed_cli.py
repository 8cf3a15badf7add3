"""`neuromf train-lora` / `train-joint --nproc 2` end to end: the CLI under torchrun (gloo on CPU, 2 processes,
1 thread each) trains through the latent cache, rank 0 alone writes and reports, and the adapter generates.

Kept apart from test_distributed.py (the rank-level numerics) so the suite's two workers share the slow subprocess
runs (`make test` distributes whole files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()
TIMEOUT_S = 120  # a whole launch; a hang fails the test instead of the suite


def test_cli_train_lora_on_two_processes_writes_a_working_adapter(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir):
    """`neuromf train-lora --nproc 2` (torchrun, gloo): rank 0 encodes the cache while rank 1 waits, rank 0 alone
    writes and reports, and the adapter loads and generates."""
    from testkit import tiny_config

    from neuromf.config import save_config
    from neuromf.eval.mask_test import save_mask_test
    from neuromf.generation.joint import generate_pairs

    mask_test = save_mask_test({"decision": "downsample"}, tmp_path / "mask_vae_test.json")
    cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{
        "data.mask_strategy": "auto", "data.mask_test": str(mask_test), "data.group": None,
        "lora.rank": 4, "lora.alpha": 4.0, "training.max_steps": 2, "training.warmup_steps": 0,
        "training.num_threads": 1, "training.dist_timeout_s": 60})
    save_config(cfg, tmp_path / "lora.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[2] / "backend"))
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "neuromf", "train-lora", "--config", str(tmp_path / "lora.yaml"),
                           "--base_checkpoint", str(tiny_base_dir), "--nproc", "2"], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("finished at step 2") == 1  # rank 0 alone reports
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["extra"]["world_size"] == 2 and meta["step"] == 2
    pair = next(generate_pairs(tmp_path / "run" / "adapter", n=1, device="cpu"))
    assert pair.image.shape == pair.mask.shape and np.isfinite(pair.image).all()


# slow (~55 s): the same CLI path as the tiny test above, on the shipped 3 mm data and models (`make test-slow`)
@pytest.mark.slow
def test_train_joint_on_two_processes_on_the_embedded_data_and_models(tmp_path):
    """The end-to-end case as a user runs it: `train-joint --nproc 2` on the embedded 3 mm phantoms with the
    shipped VAE and base model (joint_3mm, 2 steps), an adapter that loads and generates a pair on the model grid.
    Without the mirrored copies (`data.flip=false`): rank 0 encodes half as many cases, the path is the same."""
    from neuromf.generation.joint import generate_pairs

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[2] / "backend"),
               NEUROMF_CACHE=str(tmp_path / "cache"))
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "neuromf", "train-joint", "--config", "joint_3mm",
                           "--base_checkpoint", "embedded-3mm", "--output-dir", str(out), "--nproc", "2",
                           "--set", "data.mask_strategy=sdf", "--set", "data.flip=false",
                           "--set", "training.max_steps=2",
                           "--set", "training.batch_size=4", "--set", "training.warmup_steps=0",
                           "--set", "training.num_threads=1", "--set", "training.dist_timeout_s=120"],
                          env=env, capture_output=True, text=True, timeout=3 * TIMEOUT_S)  # ~1 min here
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["extra"]["world_size"] == 2 and meta["step"] == 2
    pair = next(generate_pairs(out / "adapter", n=1, device="cpu"))
    assert pair.image.shape == pair.mask.shape == (64, 64, 64) and np.isfinite(pair.image).all()
