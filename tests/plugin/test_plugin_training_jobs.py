"""LoRA dock jobs with a real napari viewer (Xvfb) and real training: Stop while the training cases are being
encoded, and training in several local processes under torchrun (2 CPU processes, gloo), with progress, Stop,
checkpoint and Resume, and a failing start. Tiny: a random `tiny` base UNet and VAE on a 32^3 / 6 mm grid."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from gui_helpers import notes, ready, tiny_lora_run, wait_idle

pytestmark = pytest.mark.gui

TWO_PROCESSES = "2 CPU processes (test)"


def _all_phantoms() -> Path:
    from neuromf.weights import sample_data_root

    return sample_data_root() / "fcd_phantoms"  # 17 FCD training cases: encoding takes a while


def _stop_at_first_encoded_case(widget) -> dict:
    """Press Stop as soon as the dock shows the first encoded case; records what was shown then."""
    seen: dict = {}

    def on_event(event) -> None:
        if getattr(event, "kind", None) == "encoding" and "clicked_at" not in seen:
            seen.update(clicked_at=event.step, total=event.total_steps, time=time.monotonic())
            widget.stop_button.click()
            seen["status"] = widget.job.status.text()
        if getattr(event, "kind", None) in ("step", "stopped", "done"):
            seen["trained"] = True

    widget.worker.yielded.connect(on_event)
    return seen


def test_stop_while_encoding_ends_the_start_after_the_current_case(make_napari_viewer, qtbot, tiny_base, tmp_path):
    """Stop during the encoding takes effect after the case being encoded, not after all of them: a new run's
    folder is removed (as after a failed start), a resumed run's checkpoint is left as it was and resumes."""
    from napari_neuromf import _training_run
    from napari_neuromf._lora_widget import LoRAWidget
    from neuromf.train.checkpoint import checkpoint_paths, read_checkpoint_meta

    widget = ready(qtbot, LoRAWidget(make_napari_viewer()))
    widget.config.setCurrentText("demo_lora")
    out, cache = tmp_path / "run", tmp_path / "cache"
    tiny_lora_run(widget, tiny_base, _all_phantoms(), out, max_steps=2)
    overrides = {"data.cache_dir": str(cache)}  # nothing cached: every case is encoded

    # a new run: Stop at the first case
    widget.start(overrides=overrides)
    seen = _stop_at_first_encoded_case(widget)
    wait_idle(qtbot, widget, 180)
    ended_s = time.monotonic() - seen["time"]
    assert widget.run.failure is None, widget.run.failure
    assert "trained" not in seen and widget.run.result is None
    done, total = widget.run.stopped_encoding
    assert total == seen["total"] > 10 and done <= seen["clicked_at"] + 2 < total
    assert "Stopping" in seen["status"]
    assert not out.exists()  # a failed start leaves nothing behind
    status = widget.job.status.text()
    assert "Stopped before training" in status and f"{done} of {total} encoded" in status and "Nothing" in status
    assert widget.start_button.isEnabled() and widget.run_mode.currentText() == _training_run.NEW_RUN
    print(f"stopped {ended_s:.1f} s after the click, {done - seen['clicked_at']} more case(s) encoded")

    # train two steps, then Resume with an emptied cache and Stop again at the first case
    widget.start(overrides=overrides)
    wait_idle(qtbot, widget, 300)
    assert widget.run.failure is None, widget.run.failure
    assert widget.run.result.step == 2 and checkpoint_paths(out)[0].is_file()
    before = sorted(p.name for p in out.iterdir())
    shutil.rmtree(cache)
    widget.max_steps.setValue(4)
    widget.run_mode.setCurrentText(_training_run.RESUME)
    widget.start(overrides=overrides)
    seen = _stop_at_first_encoded_case(widget)
    wait_idle(qtbot, widget, 180)
    assert widget.run.failure is None, widget.run.failure
    assert "trained" not in seen and widget.run.stopped_encoding[0] < widget.run.stopped_encoding[1]
    assert int(read_checkpoint_meta(out)["step"]) == 2 and sorted(p.name for p in out.iterdir()) == before
    assert "is as it was" in widget.job.status.text()
    assert widget.run_mode.currentText() == _training_run.RESUME

    widget.start(overrides=overrides)  # the run resumes where it was
    wait_idle(qtbot, widget, 300)
    assert widget.run.failure is None, widget.run.failure
    assert widget.run.result.step == 4 and not widget.run.result.stopped


def _two_process_widget(qtbot, viewer):
    from napari_neuromf import _environment
    from napari_neuromf._lora_widget import LoRAWidget

    widget = ready(qtbot, LoRAWidget(viewer))
    assert set(widget.device_plans) >= {"auto", "cpu"}  # this machine's list; "all GPUs (N)" needs 2+ GPUs
    # what "all GPUs (2)" runs on a machine with 2 GPUs, here as 2 CPU processes (gloo)
    widget.set_device_plans({**widget.device_plans, TWO_PROCESSES: _environment.DevicePlan(2, "cpu")})
    widget.config.setCurrentText("demo_lora")
    return widget


def test_several_processes_train_show_progress_stop_and_resume(make_napari_viewer, qtbot, tiny_base,
                                                               phantom_subset, tmp_path):
    """Device "N processes": torchrun starts 2 real ranks; the dock counts their steps with loss and ETA, Stop
    makes them save a checkpoint and the adapter at the same step, and Resume (here in one process) continues."""
    from napari_neuromf import _state, _training_run
    from napari_neuromf._lora_widget import DEVICE_TIP
    from neuromf.train.checkpoint import checkpoint_paths, read_checkpoint_meta

    assert "all GPUs (N)" in DEVICE_TIP and "torchrun" in DEVICE_TIP
    viewer = make_napari_viewer()
    widget = _two_process_widget(qtbot, viewer)
    out = tmp_path / "run"
    tiny_lora_run(widget, tiny_base, phantom_subset, out, max_steps=500, preview_every=2)
    widget.device.setCurrentText(TWO_PROCESSES)
    assert widget.settings()["training.device"] == "cpu"
    widget.start(overrides={"data.cache_dir": str(tmp_path / "cache")})
    assert isinstance(widget.run, _training_run.ProcessTrainingRun) and widget.run.nproc == 2
    qtbot.waitUntil(lambda: len(widget.loss_plot.points) >= 3 or not widget.busy, timeout=240_000)
    assert widget.run.failure is None, widget.run.failure
    process = widget.run.process
    assert process is not None and process.running and process.nproc == 2
    assert widget.progress_bar.maximum() == 500 and widget.progress_bar.value() >= 3
    assert "ETA" in widget.progress_bar.format() and "loss" in widget.job.status.text()
    assert [s for s, _ in widget.loss_plot.points] == [s for s, _ in widget.run.losses][:len(widget.loss_plot.points)]
    qtbot.waitUntil(lambda: "preview 0 FLAIR" in viewer.layers or not widget.busy, timeout=60_000)
    assert "preview 0 lesion" in viewer.layers  # rank 0's preview, handed over as a file

    widget.stop_button.click()
    wait_idle(qtbot, widget, 120)
    assert widget.run.failure is None, widget.run.failure
    result = widget.run.result
    assert result.stopped and 3 <= result.step < 500
    assert not process.running and not process.scratch.exists()
    assert checkpoint_paths(out)[0].is_file() and int(read_checkpoint_meta(out)["step"]) == result.step
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert widget.run_mode.currentText() == _training_run.RESUME
    assert f"Stopped at step {result.step}" in widget.job.status.text()
    assert _state.STATE.last_adapter == out / "adapter"

    stopped_at, before = result.step, list(widget.run.losses)
    widget.device.setCurrentText("cpu")  # a 2-process checkpoint resumes in one process
    widget.max_steps.setValue(stopped_at + 2)
    widget.start(overrides={"data.cache_dir": str(tmp_path / "cache")})
    wait_idle(qtbot, widget, 120)
    assert widget.run.failure is None, widget.run.failure
    assert widget.run.result.step == stopped_at + 2 and not widget.run.result.stopped
    assert [s for s, _ in widget.loss_plot.points] == [s for s, _ in before] + [stopped_at + 1, stopped_at + 2]


def test_a_failing_process_start_reports_the_error_and_the_output_tail(make_napari_viewer, qtbot, phantom_subset,
                                                                       tmp_path):
    widget = _two_process_widget(qtbot, make_napari_viewer())
    out = tmp_path / "run"
    tiny_lora_run(widget, tmp_path / "no_such_base", phantom_subset, out, max_steps=5)
    widget.device.setCurrentText(TWO_PROCESSES)
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 180)
    failure = widget.run.failure
    assert failure is not None and widget.run.result is None
    message = failure.message
    assert message.startswith("LoRA fine-tuning: ") and "no_such_base" in message
    assert "2 training processes" in message and "Last lines of the training processes' output" in message
    assert "[neuromf] rank" in message  # the tail: the failing rank names itself
    assert message in widget.job.status.text() and any("no_such_base" in m for m in seen())
    assert widget.progress_bar.format() == "failed" and widget.start_button.isEnabled()
    assert not out.exists() and not widget.run.process.running
