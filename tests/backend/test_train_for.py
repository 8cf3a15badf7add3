"""scripts/train_for.py: a stage-2 run sized to a wall-clock budget from a measured step rate, stopped and saved at
its deadline."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml
from testkit import tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_for():
    spec = importlib.util.spec_from_file_location("train_for", ROOT / "scripts" / "train_for.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config_file(tmp: Path, phantom_dir: Path, tiny_vae_dir: Path) -> Path:
    cfg = tiny_config(tmp, phantom_dir, tiny_vae_dir, **{
        "data.mask_strategy": "sdf", "data.group": None, "lora.rank": 4, "lora.alpha": 4.0,
        "training.lr": 5e-3, "training.warmup_steps": 1, "training.schedule": "cosine"})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _run(train_for, config: Path, base: Path, out: Path, deadline: float, *extra: str) -> dict:
    code = train_for.main(["--pipeline", "lora", "--config", str(config), "--base", str(base),
                           "--deadline", str(deadline), "--calibrate-steps", "4", "--save-margin-s", "0",
                           "--set", f"training.output_dir={out}", *extra])
    assert code == 0
    return json.loads((out / "train_for.json").read_text())


def test_plans_steps_from_the_measured_rate_and_finishes(train_for, tmp_path, phantom_dir, tiny_vae_dir,
                                                        tiny_base_dir):
    config = _config_file(tmp_path, phantom_dir, tiny_vae_dir)
    record = _run(train_for, config, tiny_base_dir, tmp_path / "run", time.time() + 600, "--safety", "0.002")
    assert record["steps_per_s"] > 0 and 0 < record["seconds_left"] < 600
    assert record["planned_steps"] == max(4, int(record["steps_per_s"] * record["seconds_left"] * 0.002))
    assert record["reached_step"] == record["planned_steps"] and not record["stopped_at_deadline"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == record["planned_steps"]  # the cosine schedule spans the planned run
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_deadline_already_passed_stops_at_once_and_saves_the_adapter(train_for, tmp_path, phantom_dir,
                                                                       tiny_vae_dir, tiny_base_dir):
    config = _config_file(tmp_path, phantom_dir, tiny_vae_dir)
    record = _run(train_for, config, tiny_base_dir, tmp_path / "run", time.time())
    assert record["planned_steps"] == 4  # never fewer than the calibration's steps
    assert record["stopped_at_deadline"] and record["reached_step"] < 4
    assert (tmp_path / "run" / "adapter" / "neuromf_adapter.json").is_file()
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()  # resumable like any stopped run


def test_max_steps_caps_a_plan_that_would_run_longer(train_for, tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir):
    config = _config_file(tmp_path, phantom_dir, tiny_vae_dir)
    record = _run(train_for, config, tiny_base_dir, tmp_path / "run", time.time() + 600, "--max-steps", "5")
    assert record["planned_steps"] == 5 and record["reached_step"] == 5 and not record["stopped_at_deadline"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["max_steps"] == 5
