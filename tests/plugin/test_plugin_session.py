"""The plugin's Qt-free run objects, headless: run folders, progress counts, remembered state, cancelling."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from napari_neuromf import _session


def test_new_run_never_touches_an_existing_run(tmp_path):
    empty = tmp_path / "lora_first"
    assert _session.plan_run_folder(empty, _session.NEW_RUN)[:3] == (empty, False, False)
    empty.mkdir()
    (empty / "config.yaml").write_text("x: 1\n")
    folder, resume, overwrite, note = _session.plan_run_folder(empty, _session.NEW_RUN)
    assert folder != empty and folder.parent == tmp_path and folder.name.startswith("lora_")
    assert not resume and not overwrite and str(empty) in note and str(folder) in note
    assert _session.plan_run_folder(empty, _session.RESUME)[:3] == (empty, True, False)
    assert _session.plan_run_folder(empty, _session.OVERWRITE)[:3] == (empty, False, True)
    with pytest.raises(ValueError, match="run mode"):
        _session.plan_run_folder(empty, "sometimes")
    # two fresh folders in the same second do not collide
    taken = _session.fresh_run_folder(tmp_path)
    taken.mkdir()
    assert _session.fresh_run_folder(tmp_path) != taken


def test_progress_clock_counts_and_estimates():
    clock = _session.ProgressClock(total=4, started=0.0)
    assert clock.text("cases") == "0 / 4 cases" and clock.eta_s is None
    clock.tick()
    assert clock.text("cases").startswith("1 / 4 cases · ETA ")
    assert clock.eta_s == pytest.approx(clock.elapsed_s * 3, rel=0.01)
    clock.tick(3)
    assert clock.text("cases") == "4 / 4 cases"


def test_state_is_remembered_in_the_user_folder(tmp_path):
    path = tmp_path / "state.json"
    first = _session.PluginState()
    first.attach(path)
    first.remember(last_data_dir=tmp_path / "data", last_config="demo_lora")
    first.set_adapter(tmp_path / "run" / "adapter", tmp_path / "run")
    second = _session.PluginState()
    second.attach(path)
    assert second.last_data_dir == tmp_path / "data" and second.last_config == "demo_lora"
    assert second.last_adapter == tmp_path / "run" / "adapter" and second.last_run_dir == tmp_path / "run"
    assert second.default_adapter() == _session.EMBEDDED  # the remembered adapter no longer exists
    with pytest.raises(KeyError, match="remembered"):
        second.remember(favourite_colour="red")

    path.write_text("{not json")
    broken = _session.PluginState()
    broken.attach(path)  # a broken file is ignored: defaults are a convenience, never a reason to fail
    assert broken.last_data_dir is None
    broken.remember(last_config="lora_fcd")
    assert json.loads(path.read_text())["last_config"] == "lora_fcd"


def test_describe_error_speaks_in_the_widgets_terms(tmp_path):
    exists = FileExistsError(f"{tmp_path}: output folder already holds a run; pass --resume to continue it")
    text = _session.describe_error(exists, "LoRA fine-tuning", out_dir=tmp_path)
    assert str(tmp_path) in text and "'New run'" in text and "--" not in text
    missing = FileNotFoundError(f"{tmp_path}: nothing to resume (no checkpoint.safetensors)")
    text = _session.describe_error(missing, "LoRA fine-tuning", out_dir=tmp_path)
    assert "no run to resume" in text and "--" not in text


def test_save_run_writes_pairs_and_stops_when_cancelled(tmp_path):
    from napari_neuromf._layers import pair_layers

    pairs = []
    for i in range(3):
        (image, image_state, _), (mask, mask_state, _) = pair_layers(
            f"gen_{i:03d}", np.random.rand(4, 4, 4), np.ones((4, 4, 4)), np.eye(4), {"seed": i})
        pairs.append((f"gen_{i:03d}", (image, image_state), (mask, mask_state)))
    run = _session.SaveRun(tmp_path / "out", pairs, cancel=threading.Event())
    saved = []
    for prefix in run.drive():
        saved.append(prefix)
        run.cancel.set()  # Cancel after the first pair
    assert saved == ["gen_000"] and len(run.written) == 2
    assert json.loads((tmp_path / "out" / "gen_000.json").read_text())["seed"] == 0
    assert not (tmp_path / "out" / "gen_001_FLAIR.nii.gz").exists()
