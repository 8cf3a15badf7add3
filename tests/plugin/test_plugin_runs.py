"""The plugin's Qt-free modules, headless, one test or more each: _state, _jobs, _environment, _training_run,
_mask_test_run, _generate_run."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from napari_neuromf import _environment, _generate_run, _jobs, _mask_test_run, _state, _training_run


def test_new_run_never_touches_an_existing_run(tmp_path):
    empty = tmp_path / "lora_first"
    assert _training_run.plan_run_folder(empty, _training_run.NEW_RUN)[:3] == (empty, False, False)
    empty.mkdir()
    (empty / "config.yaml").write_text("x: 1\n")
    folder, resume, overwrite, note = _training_run.plan_run_folder(empty, _training_run.NEW_RUN)
    assert folder != empty and folder.parent == tmp_path and folder.name.startswith("lora_")
    assert not resume and not overwrite and str(empty) in note and str(folder) in note
    assert _training_run.plan_run_folder(empty, _training_run.RESUME)[:3] == (empty, True, False)
    assert _training_run.plan_run_folder(empty, _training_run.OVERWRITE)[:3] == (empty, False, True)
    with pytest.raises(ValueError, match="run mode"):
        _training_run.plan_run_folder(empty, "sometimes")
    # two fresh folders in the same second do not collide
    taken = _training_run.fresh_run_folder(tmp_path)
    taken.mkdir()
    assert _training_run.fresh_run_folder(tmp_path) != taken


def test_progress_clock_counts_and_estimates():
    clock = _jobs.ProgressClock(total=4, started=0.0)
    assert clock.text("cases") == "0 / 4 cases" and clock.eta_s is None
    clock.tick()
    assert clock.text("cases").startswith("1 / 4 cases · ETA ")
    assert clock.eta_s == pytest.approx(clock.elapsed_s * 3, rel=0.01)
    clock.tick(3)
    assert clock.text("cases") == "4 / 4 cases"


def test_state_is_remembered_in_the_user_folder(tmp_path):
    path = tmp_path / "state.json"
    first = _state.PluginState()
    first.attach(path)
    first.remember(last_data_dir=tmp_path / "data", last_config="demo_lora")
    first.set_adapter(tmp_path / "run" / "adapter", tmp_path / "run")
    second = _state.PluginState()
    second.attach(path)
    assert second.last_data_dir == tmp_path / "data" and second.last_config == "demo_lora"
    assert second.last_adapter == tmp_path / "run" / "adapter" and second.last_run_dir == tmp_path / "run"
    assert second.default_adapter() == _state.EMBEDDED  # the remembered adapter no longer exists
    with pytest.raises(KeyError, match="remembered"):
        second.remember(favourite_colour="red")

    path.write_text("{not json")
    broken = _state.PluginState()
    broken.attach(path)  # a broken file is ignored: defaults are a convenience, never a reason to fail
    assert broken.last_data_dir is None
    broken.remember(last_config="joint_gpu")
    assert json.loads(path.read_text())["last_config"] == "joint_gpu"


def test_describe_error_speaks_in_the_widgets_terms(tmp_path):
    exists = FileExistsError(f"{tmp_path}: output folder already holds a run; pass --resume to continue it")
    text = _jobs.describe_error(exists, "LoRA fine-tuning", out_dir=tmp_path)
    assert str(tmp_path) in text and "'New run'" in text and "--" not in text
    missing = FileNotFoundError(f"{tmp_path}: nothing to resume (no checkpoint.safetensors)")
    text = _jobs.describe_error(missing, "LoRA fine-tuning", out_dir=tmp_path)
    assert "no run to resume" in text and "--" not in text


def test_save_run_writes_pairs_and_stops_when_cancelled(tmp_path):
    from napari_neuromf._layers import pair_layers

    pairs = []
    for i in range(3):
        (image, image_state, _), (mask, mask_state, _) = pair_layers(
            f"gen_{i:03d}", np.random.rand(4, 4, 4), np.ones((4, 4, 4)), np.eye(4), {"seed": i})
        pairs.append((f"gen_{i:03d}", (image, image_state), (mask, mask_state)))
    run = _generate_run.SaveRun(tmp_path / "out", pairs, cancel=threading.Event())
    saved = []
    for prefix in run.drive():
        saved.append(prefix)
        run.cancel.set()  # Cancel after the first pair
    assert saved == ["gen_000"] and len(run.written) == 2
    assert json.loads((tmp_path / "out" / "gen_000.json").read_text())["seed"] == 0
    assert not (tmp_path / "out" / "gen_001_FLAIR.nii.gz").exists()


def test_stop_flag_calls_its_hooks_once_set():
    flag, calls = _jobs.StopFlag(), []
    flag.when_set(lambda: calls.append("early"))
    assert calls == []
    flag.set()
    flag.when_set(lambda: calls.append("late"))  # registered after the stop: called at once
    assert flag.is_set() and calls == ["early", "late"]


def test_device_plans_offer_all_gpus_only_with_several():
    assert list(_environment.device_plans(0)) == ["auto", "cpu"]
    plans = _environment.device_plans(2)
    assert list(plans) == ["auto", "cpu", "cuda:0", "cuda:1", "all GPUs (2)"]
    assert plans["all GPUs (2)"] == _environment.DevicePlan(2, "auto") and plans["cuda:1"].nproc == 1


def test_loss_history_reads_a_run_folder_and_tolerates_a_broken_one(tmp_path):
    (tmp_path / "losses.csv").write_text("step,loss\n1,2.5\n2,\n3,1.25\n")
    assert _training_run.loss_history(tmp_path) == [(1, 2.5), (3, 1.25)]
    (tmp_path / "losses.csv").write_text("step,loss,raw\n1,1.0,21.0\n2,0.9998,8.9\n")  # the raw loss is plotted
    assert _training_run.loss_history(tmp_path) == [(1, 21.0), (2, 8.9)]
    (tmp_path / "losses.csv").write_text("when,value\n1,2\n")
    assert _training_run.loss_history(tmp_path) == [] and _training_run.loss_history(tmp_path / "none") == []


def test_layer_pair_is_written_as_a_case_without_touching_the_layers(tmp_path, phantom_subset):
    from napari_neuromf._layers import pair_layers

    (image, image_state, _), (mask, mask_state, _) = pair_layers(
        "my scan!", np.random.default_rng(0).random((6, 5, 4)).astype(np.float32),
        np.pad(np.ones((2, 2, 2)), 2)[:6, :5, :4], np.diag([2.0, 2.0, 2.0, 1.0]), {})
    pair = _mask_test_run.LayerPair((image, image_state), (mask * 3, mask_state))
    assert pair.name == "my_scan_FLAIR"
    case = pair.write_case(tmp_path)
    import nibabel as nib

    written = nib.load(case.mask)
    assert set(np.unique(np.asarray(written.dataobj))) == {0, 1}  # binary, whatever the label value
    assert np.allclose(written.affine, nib.load(case.image).affine)
    assert [c.case_id for c in _mask_test_run.fcd_cases(phantom_subset, limit=2)] == ["sub-00001", "sub-00002"]


def test_generated_prefixes_follow_the_layer_order():
    class Layer:
        def __init__(self, pair, generated=True):
            self.metadata = {"neuromf": {"generated": generated, "pair": pair}}

    layers = [Layer("gen_002"), Layer("gen_002"), Layer("gen_000"), Layer("case", generated=False)]
    assert _generate_run.generated_prefixes(layers) == ["gen_002", "gen_000"]


def test_training_run_plots_the_raw_loss_not_the_adaptive_objective():
    from neuromf.train.loop import TrainEvent

    run = _training_run.TrainingRun(cfg=None)
    run.record(TrainEvent("step", 1, 0, 10, loss=1.0, parts={"raw": 21.0, "raw_img": 20.0}))
    run.record(TrainEvent("step", 2, 0, 10, loss=0.9998, parts={"raw": 8.9}))
    run.record(TrainEvent("epoch", 2, 1, 10, loss=0.9999, parts={"raw": 15.0}))  # epochs are not step points
    assert run.losses == [(1, 21.0), (2, 8.9)]
