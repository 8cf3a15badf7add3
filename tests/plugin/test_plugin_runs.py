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


def test_time_left_follows_the_pace_between_the_first_and_the_latest_report():
    assert _jobs.time_left_at_pace((10.0, 4.0), (10.0, 4.0), 20.0, now=10.0) is None  # one report: no pace yet
    assert _jobs.time_left_at_pace((10.0, 4.0), (14.0, 8.0), 16.0, now=14.0) == pytest.approx(16.0)
    assert _jobs.time_left_at_pace((10.0, 4.0), (14.0, 8.0), 16.0, now=15.5) == pytest.approx(14.5)  # 1.5 s spent
    assert _jobs.time_left_at_pace((10.0, 4.0), (14.0, 8.0), 2.0, now=30.0) == 0.0  # late: never below zero


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_generation_time_left_counts_the_passes_still_to_come(monkeypatch):
    """Two rendered joint pairs of 4 steps, timed by a constructed clock: the joint pass samples both pairs at once
    (cost 2 x 2 per step), each pair then gets a FLAIR pass (cost 1 per step); the time left is this run's seconds
    per unit of cost since its first network step times the cost still to do, and a re-drawn mask adds a pass."""
    clock = FakeClock()
    monkeypatch.setattr(_generate_run, "time", clock)
    run = _generate_run.GenerateRun("joint", n=2, steps=4, mode="joint", render="cond", started=0.0)
    run.plan = _generate_run.PassPlan.of_run("joint", 2, 4, render=True, prior_lesion=True, costs=(2.0, 1.0, 0.0),
                                              batch=4)
    assert run.plan.pairs == [[4.0, 1.0], [1.0]]  # 24 units of cost in all: 16 joint, 4 + 4 FLAIR
    assert run.time_left_s() is None and run.progress_text().startswith("Loading the models")

    def step(i: int, at: float) -> None:
        clock.now = at
        run.on_step(i, 4)

    step(1, 10.0)  # the models loaded, then the first joint step: no pace yet
    assert run.loaded_s == 10.0 and run.time_left_s() is None and "after the next step" in run.progress_text()
    step(2, 14.0)  # 4 s per joint step of two pairs = 1 s per unit; 24 - 8 units left
    assert run.time_left_s() == pytest.approx(16.0)
    assert "pass 1 of 2" in run.progress_text() and f"about {_jobs.format_eta(16.0)} left" in run.progress_text()
    clock.now = 15.0
    assert run.time_left_s() == pytest.approx(15.0)
    for i, at in ((3, 18.0), (4, 22.0)):
        step(i, at)
    assert run.time_left_s() == pytest.approx(8.0)  # the two FLAIR passes at the joint pass's pace
    for i, at in ((1, 24.0), (2, 26.0), (3, 28.0), (4, 30.0)):  # the load rose: 2 s per FLAIR step, not 1
        step(i, at)
    assert run.last_step[1:] == (20.0, 4.0) and run.time_left_s() == pytest.approx(20.0 / 16.0 * 4.0)
    run.pairs, run.passes = 1, 0  # the first pair arrived
    step(1, 32.0)
    assert run.time_left_s() == pytest.approx(22.0 / 17.0 * 3.0) and "Pair 2 of 2" in run.progress_text()
    for i, at in ((2, 34.0), (3, 36.0), (4, 38.0)):
        step(i, at)
    assert run.time_left_s() == 0.0
    step(1, 40.0)  # one more pass for the second pair: its mask was too small and is drawn again (2 units a step)
    assert run.plan.pairs[1] == [2.0, 1.0] and "pass 2 of 2" in run.progress_text()
    done, left = run.last_step[1:]
    assert (done, left) == (20.0 + 8.0 + 1.0, 3.0)  # the pass that ran was the re-draw; the FLAIR pass is left
    assert run.time_left_s() == pytest.approx(30.0 / 25.0 * 3.0)


def test_a_finished_cpu_run_records_this_machines_pace():
    """A default pair whose network steps took 1.5x what the measured rates say (an idle machine) records a pace of
    1.5 for later estimates; a GPU run, a run on another grid than the rates' or one without its start load does
    not (its work is not in the rates' seconds, or not comparable)."""
    from neuromf.estimates import PaceClock, machine_pace

    def finished(adapter: str = "embedded", device: str = "auto", load: tuple[float, int] | None = (0.0, 2)):
        run = _generate_run.GenerateRun(adapter, n=1, steps=32, device=device, mode="joint", render="embedded")
        run.pace = PaceClock(load, first=(10.0, 0.7), last=(100.0, 60.7))  # 60 s of work in 90 s
        return run.record_pace()

    # "auto", the dock's default, is the CPU on a machine without a GPU (as in this test suite's CI)
    assert finished(device="cuda:0") is None and finished(load=None) is None
    assert finished("embedded-3mm") is None  # the 3 mm adapter: the rates were measured on the 2 mm grid
    assert machine_pace("generation") is None
    assert finished() == pytest.approx(1.5)
    assert machine_pace("generation") == (pytest.approx(1.5), 1)


def test_a_training_run_on_the_cpu_records_this_machines_pace(monkeypatch):
    """Step events 2 s apart for a config whose measured step takes 1 s at that batch size on an idle machine: a
    pace of 2 for later training estimates; the encoding before the first step does not count, and a run of a
    config without a rate records nothing."""
    from types import SimpleNamespace

    from neuromf.estimates import PaceClock, machine_pace, training_estimate, training_step_seconds

    clock = FakeClock()
    monkeypatch.setattr(_training_run, "time", clock)
    # the others' load while it ran: none (measured from /proc/stat it would follow this machine's other jobs)
    monkeypatch.setattr("neuromf.estimates.cpu_snapshot", lambda: None)
    monkeypatch.setattr("neuromf.estimates.runnable_now", lambda: 0.0)  # and no other thread runnable: quiet
    cfg = _training_run.build_lora_config("joint_2mm", {"data.mask_strategy": "downsample"})  # device "auto"
    per_step = training_step_seconds("joint_2mm", cfg.training.batch_size)

    def run_of(config: str | None) -> _training_run.TrainingRun:
        run = _training_run.TrainingRun(cfg, config=config, pace=PaceClock((0.0, 2)))
        clock.now = 0.0
        run.record(SimpleNamespace(kind="encoding", step=1, total_steps=1, loss=None))
        for step in range(1, 12):
            clock.now = 100.0 + 2.0 * per_step * step  # 100 s of loading and encoding first
            run.record(SimpleNamespace(kind="step", step=step, loss=1.0, parts={}))
        return run

    assert run_of(None).record_pace() is None and machine_pace("training") is None
    cfg.training.device = "cuda:7"  # a GPU run (here: one this machine lacks) records nothing either
    assert run_of("joint_2mm").record_pace() is None
    cfg.training.device = "auto"
    before = training_estimate("joint_2mm", 8, 100, cfg.training.batch_size, load=(0.0, 2))
    assert run_of("joint_2mm").record_pace() == pytest.approx(2.0)
    after = training_estimate("joint_2mm", 8, 100, cfg.training.batch_size, load=(0.0, 2))
    assert after.seconds == pytest.approx(2.0 * before.seconds) and "pace in its last 1 run" in after.basis


def test_a_mask_test_records_this_machines_pace_with_the_shipped_vae_only():
    """Cases 2x the shipped VAE's measured seconds apart (the first case's loading not counted): a pace of 2 for
    later mask-test estimates; a VAE file of the user's own has no rate and records nothing."""
    from neuromf.estimates import PaceClock, machine_pace, mask_test_estimate, measured_rates
    from neuromf.weights import EMBEDDED_MODELS

    per_case = measured_rates()["mask_test"][EMBEDDED_MODELS["vae"]["embedded"]]["per_case_s"]

    def cases_done() -> PaceClock:  # three cases, each 2x the measured time after the first
        pace = PaceClock((0.0, 2))
        pace.first, pace.last = (50.0, 1), (50.0 + 4 * per_case, 3)
        return pace

    own = _mask_test_run.MaskTestRun(None, vae_spec="/data/my_maisi.pt", pace=cases_done())
    assert own.record_pace() is None and machine_pace("mask_test") is None
    before = mask_test_estimate("vae_fine", 4, load=(0.0, 2))
    shipped = _mask_test_run.MaskTestRun(None, pace=cases_done())
    assert shipped.record_pace() == pytest.approx(2.0, rel=1e-3)
    assert mask_test_estimate("vae_fine", 4, load=(0.0, 2)).seconds == pytest.approx(2 * before.seconds, rel=1e-3)


def test_pass_plans_of_the_other_modes():
    joint = _generate_run.PassPlan.of_run("joint", 6, 8, render=False, prior_lesion=True, costs=(2.0, 1.0, 0.0),
                                          batch=4)
    assert joint.pairs == [[8.0], [], [], [], [4.0], []]  # batches of 4 pairs, then 2; no FLAIR pass
    assert joint.work(4, 1, 3, 8) == (8.0 * 8 + 4.0 * 3, 4.0 * 5)
    joint.start_pass(1, 1)  # a re-draw of the second pair's mask
    assert joint.pairs[1] == [2.0]
    prior = _generate_run.PassPlan.of_run("conditional", 2, 8, render=False, prior_lesion=True, costs=(2.0, 1.5, 0.0),
                                          batch=4)
    assert prior.pairs == [[1.5, 1.5], [1.5, 1.5]]  # the lesion-free brain, then the FLAIR
    given = _generate_run.PassPlan.of_run("inpaint", 1, 8, render=False, prior_lesion=False, costs=(2.0, 1.5, 0.0),
                                          batch=4)
    assert given.pairs == [[1.5]] and given.work(0, 1, 10, 16) == (15.0, 9.0)  # steps as the backend counts them
    # each pair's work after its last network step (decoding): counted once per pair, done when the pair arrives
    finishing = _generate_run.PassPlan.of_run("joint", 2, 4, render=True, prior_lesion=True, costs=(2.0, 1.0, 6.0),
                                              batch=4)
    assert finishing.work(0, 2, 4, 4) == (16.0 + 4.0, 2 * 6.0 + 4.0)  # the first pair's decoding, the second pair
    assert finishing.work(1, 1, 4, 4) == (16.0 + 4.0 + 6.0 + 4.0, 6.0)  # only the second pair's decoding is left


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
