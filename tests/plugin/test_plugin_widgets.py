"""The four dock widgets with a real napari viewer (run under Xvfb): data, mask-VAE test, LoRA training, generate.

Everything is tiny: three phantom cases, a random `tiny` VAE, a random `tiny` base UNet on a 32^3 / 6 mm grid.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from gui_helpers import assert_overlay, case_files, data_layers, notes, ready, tiny_lora_run, wait_idle

pytestmark = pytest.mark.gui

SUBJECTS = ("sub-00001", "sub-00002", "sub-00003")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, phantom_subset, tmp_path_factory) -> Path:
    """A 3-step LoRA adapter trained headless (the Generate widget's input)."""
    from neuromf.config import load_config
    from neuromf.pipelines.joint import train_joint as train_lora
    from neuromf.train import run_to_end

    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config("joint_3mm", {"model.preset": "tiny", "data.data_dir": str(phantom_subset),
                                     "data.mask_strategy": "downsample", "data.flip": False, "lora.rank": 2,
                                     "training.max_steps": 3, "training.batch_size": 2, "training.device": "cpu",
                                     "training.checkpoint_every": 0, "training.output_dir": str(out)})
    result = run_to_end(train_lora(cfg, tiny_base, progress=False))
    return Path(result.export)


@pytest.fixture(scope="module")
def tiny_site_adapter(tiny_base, phantom_subset, tmp_path_factory) -> Path:
    """A 2-step site-conditioned joint adapter (sdf masks, x-prediction), trained headless."""
    from neuromf.config import load_config
    from neuromf.pipelines.joint import train_joint as train_lora
    from neuromf.train import run_to_end

    out = tmp_path_factory.mktemp("lora_site") / "run"
    cfg = load_config("joint_3mm", {"model.preset": "tiny", "data.data_dir": str(phantom_subset),
                                     "data.mask_strategy": "sdf", "data.flip": False, "lora.rank": 2,
                                     "lora.mask_prediction": "x", "lora.site_condition": True,
                                     "training.max_steps": 2, "training.batch_size": 2, "training.device": "cpu",
                                     "training.checkpoint_every": 0, "training.output_dir": str(out)})
    return Path(run_to_end(train_lora(cfg, tiny_base, progress=False)).export)


def _session_state():
    from napari_neuromf import _state

    return _state.STATE


def test_data_widget_scans_loads_and_registers(make_napari_viewer, qtbot, phantom_subset, tmp_path):
    from napari_neuromf._data_widget import FCDDataWidget

    viewer = make_napari_viewer()
    widget = ready(qtbot, FCDDataWidget(viewer))
    widget.folder.setText(str(phantom_subset))
    widget.scan()
    wait_idle(qtbot, widget)
    assert widget.table.rowCount() == 3
    assert [widget.table.item(r, 0).text() for r in range(3)] == list(SUBJECTS)
    assert widget.table.item(0, 3).text() == "64³" and float(widget.table.item(0, 5).text()) > 0
    assert widget.job.bar.value() == 3 and "3 / 3" in widget.job.bar.format()

    widget.table.selectRow(1)
    widget.load_selected()
    wait_idle(qtbot, widget)
    image, lesion = viewer.layers["sub-00002 FLAIR"], viewer.layers["sub-00002 lesion"]
    assert_overlay(image, lesion)
    assert lesion.opacity == pytest.approx(0.5) and lesion.data.max() == 1
    widget.contour.setChecked(True)
    assert lesion.contour == 1

    # the open pair goes back to disk as a flat-folder case and shows up in the table
    widget.image_layer.value = image
    widget.labels_layer.value = lesion
    widget.case_id.setText("reg_001")
    widget.register_folder.setText(str(tmp_path / "mine"))
    widget.register_open_layers()
    wait_idle(qtbot, widget)
    paths = sorted((tmp_path / "mine").glob("*.nii.gz"))
    assert [p.name for p in paths] == ["reg_001_FLAIR.nii.gz", "reg_001_FLAIR_roi.nii.gz"]
    original = nib.load(str(phantom_subset / "sub-00002" / "anat" / "sub-00002_acq-phantom_FLAIR_roi.nii.gz"))
    assert np.array_equal(nib.load(str(paths[1])).affine, original.affine)
    assert widget.table.rowCount() == 1 and widget.table.item(0, 0).text() == "reg_001"
    assert _session_state().last_data_dir == tmp_path / "mine"  # remembered for the next session


def test_data_widget_bad_folder_notifies(make_napari_viewer, qtbot, tmp_path):
    from napari_neuromf._data_widget import FCDDataWidget

    widget = FCDDataWidget(make_napari_viewer())
    widget.folder.setText(str(tmp_path / "missing"))
    seen = notes()
    widget.scan()
    wait_idle(qtbot, widget)
    assert any("missing" in m and "does not exist" in m for m in seen())
    assert "missing" in widget.job.status.text() and "does not exist" in widget.job.status.text()


def test_mask_test_widget_fills_table_and_shows_reconstruction(make_napari_viewer, qtbot, phantom_subset,
                                                                tiny_base, tmp_path):
    from napari.layers import Labels

    from napari_neuromf._mask_test_widget import MaskTestWidget

    viewer = make_napari_viewer()
    widget = ready(qtbot, MaskTestWidget(viewer))
    widget.vae_source.setCurrentIndex(1)
    widget.vae_file.setText(str(tiny_base.parent / "vae_tiny"))
    # the default size is the one the VAE folder's sidecar names (tiny here), not a guess that would be refused
    assert widget.vae_spec() == (str(tiny_base.parent / "vae_tiny"), None)
    widget.folder.setText(str(phantom_subset))
    widget.max_cases.setValue(2)
    widget.output.setText(str(tmp_path / "mask_test.json"))
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert widget.table.rowCount() == 2
    assert [widget.table.item(r, 0).text() for r in range(2)] == list(SUBJECTS[:2])
    assert 0.0 <= float(widget.table.item(0, 3).text()) <= 1.0
    assert "Recommendation:" in widget.recommendation.text()
    assert widget.job.bar.value() == 2 and "2 / 2 cases" in widget.job.bar.format()
    assert (tmp_path / "mask_test.json").is_file()
    assert _session_state().last_mask_test == tmp_path / "mask_test.json"

    # the overlay shows the mask as the recommended encoding carries it (not the rejected one's round trip)
    from napari_neuromf._mask_test_run import encoding_label, preprocessing_for
    from neuromf.eval.mask_test import recommended_encoding, reconstruct_mask
    from neuromf.vae import MAISIVAEWrapper

    strategy, mode = recommended_encoding(widget.run.result)
    assert strategy == widget.run.result["decision"]
    widget.table.selectRow(0)
    widget.show_reconstruction()
    wait_idle(qtbot, widget, 60)
    recon = viewer.layers[f"sub-00001 lesion ({encoding_label(strategy, mode)})"]
    assert isinstance(recon, Labels) and recon.data.shape == (32, 32, 32)
    assert np.allclose(recon.scale, (6.0, 6.0, 6.0))
    vae = MAISIVAEWrapper.resolve(str(tiny_base.parent / "vae_tiny"))
    case = next(c for c in widget.run.cases if c.case_id == "sub-00001")
    expected, _ = reconstruct_mask(case, vae, preprocessing_for(vae), strategy, mode)
    assert np.array_equal(np.asarray(recon.data), expected) and expected.any()
    assert recon.metadata["neuromf"]["encoding"] == encoding_label(strategy, mode)
    assert "recommended encoding" in widget.job.status.text()
    assert_overlay(viewer.layers["sub-00001 FLAIR"], viewer.layers["sub-00001 lesion"])


def test_mask_test_cancel_keeps_done_rows_and_saves_nothing(make_napari_viewer, qtbot, phantom_subset, tiny_base,
                                                            tmp_path):
    """Cancel inside the widget: the test stops after the current case; no result file, no recommendation."""
    from napari_neuromf._mask_test_widget import MaskTestWidget

    widget = ready(qtbot, MaskTestWidget(make_napari_viewer()))
    widget.vae_source.setCurrentIndex(1)
    widget.vae_file.setText(str(tiny_base.parent / "vae_tiny"))
    widget.vae_preset.setCurrentText("tiny")
    widget.folder.setText(str(phantom_subset))
    widget.output.setText(str(tmp_path / "cancelled.json"))
    widget.start()
    qtbot.waitUntil(lambda: widget.table.rowCount() >= 1 or not widget.busy, timeout=120_000)
    widget.job.cancel_button.click()
    wait_idle(qtbot, widget, 120)
    assert widget.run.cancelled and widget.run.result is None
    assert 1 <= widget.table.rowCount() < 3
    assert "Cancelled after" in widget.job.status.text()
    assert not (tmp_path / "cancelled.json").exists() and _session_state().last_mask_test is None


def test_lora_widget_trains_stops_and_resumes(make_napari_viewer, qtbot, tiny_base, phantom_subset, tmp_path):
    from napari_neuromf import _state, _training_run
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._lora_widget import LoRAWidget
    from neuromf.train.checkpoint import checkpoint_paths

    viewer = make_napari_viewer()
    widget = ready(qtbot, LoRAWidget(viewer))
    assert widget.device.itemText(0) == "auto"
    import torch

    if not torch.cuda.is_available():  # a CPU machine gets the CPU-sized config first, on its 3 mm base and data
        assert widget.config.currentText() == "joint_3mm"
        assert widget.base.text() == widget.data.text() == "embedded-3mm"
    widget.config.setCurrentText("joint_2mm")  # the 2 mm recipe: the 2 mm base and data (the default names)
    assert widget.base.text() == widget.data.text() == "embedded"
    # the default output is a fresh timestamped run folder under the user data dir
    assert str(tmp_path / "neuromf_home" / "runs" / "lora_") in widget.output.text()
    assert widget.run_mode.currentText() == _training_run.NEW_RUN
    widget.config.setCurrentText("joint_3mm")
    out = tmp_path / "run"
    tiny_lora_run(widget, tiny_base, phantom_subset, out, max_steps=500, preview_every=2)

    follower = GenerateWidget(viewer)  # open before training: the trained adapter is offered, never switched to
    widget.start_button.click()
    qtbot.waitUntil(lambda: len(widget.run.losses) >= 3 or not widget.busy, timeout=120_000)
    assert widget.run.failure is None, widget.run.failure
    # the dock redraws at most every REFRESH_S seconds, each time with every step recorded so far
    plotted = lambda: [s for s, _ in widget.loss_plot.points]  # noqa: E731
    qtbot.waitUntil(lambda: len(plotted()) >= 3 or not widget.busy, timeout=60_000)
    assert len(plotted()) >= 3  # one plot point per step event
    assert plotted() == [s for s, _ in widget.run.losses][:len(plotted())]
    assert widget.progress_bar.maximum() == 500 and widget.progress_bar.value() >= 3
    assert "ETA" in widget.progress_bar.format()
    assert_overlay(viewer.layers["preview 0 FLAIR"], viewer.layers["preview 0 lesion"])

    clicked = time.perf_counter()
    widget.stop_button.click()
    wait_idle(qtbot, widget, 60)
    assert time.perf_counter() - clicked < 30
    result = widget.run.result
    assert result.stopped and 3 <= result.step < 500
    assert checkpoint_paths(out)[0].is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert _state.STATE.last_adapter == out / "adapter"
    assert follower.adapter.text() == "embedded" and "not checked yet" in follower.offer.text()
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()
    assert widget.run_mode.currentText() == _training_run.RESUME  # the next Start continues the stopped run
    assert "Stopped at step" in widget.job.status.text() and str(out / "adapter") in widget.job.status.text()

    stopped_at, before = result.step, list(widget.run.losses)
    widget.max_steps.setValue(stopped_at + 2)
    widget.start_button.click()
    wait_idle(qtbot, widget, 90)
    assert widget.run.failure is None, widget.run.failure
    assert widget.run.result.step == stopped_at + 2 and not widget.run.result.stopped
    assert [s for s, _ in widget.run.losses] == [stopped_at + 1, stopped_at + 2]
    # the plot keeps the history from before Stop
    assert plotted() == [s for s, _ in before] + [stopped_at + 1, stopped_at + 2]
    assert widget.run_mode.currentText() == _training_run.NEW_RUN

    # a new run never mixes into the finished one: it gets a fresh timestamped folder next to it
    widget.max_steps.setValue(1)
    widget.start_button.click()
    wait_idle(qtbot, widget, 90)
    assert widget.run.failure is None, widget.run.failure
    fresh = Path(widget.output.text())
    assert fresh != out and fresh.parent == out.parent and fresh.name.startswith("run_")
    assert (fresh / "adapter" / "adapter_config.json").is_file()


def test_lora_widget_run_modes_explain_themselves(make_napari_viewer, qtbot, tmp_path):
    """Resume with nothing to resume, and a folder of other files: the widget says so in full, in its own words,
    and a failed start leaves nothing behind."""
    from napari_neuromf import _training_run
    from napari_neuromf._lora_widget import LoRAWidget

    widget = ready(qtbot, LoRAWidget(make_napari_viewer()))
    widget.strategy.setCurrentText("downsample")
    widget.device.setCurrentText("cpu")
    empty = tmp_path / "never_trained"
    widget.output.setText(str(empty))
    widget.run_mode.setCurrentText(_training_run.RESUME)
    widget.start()
    wait_idle(qtbot, widget, 120)
    status = widget.job.status.text()
    assert "no run to resume" in status and str(empty) in status and "New run" in status
    assert "--" not in status  # no CLI flags in the widget
    assert not empty.exists()

    plain = tmp_path / "holiday_photos"
    plain.mkdir()
    (plain / "beach.jpg").write_bytes(b"jpg")
    widget.output.setText(str(plain))
    widget.run_mode.setCurrentText(_training_run.OVERWRITE)
    widget.start()
    wait_idle(qtbot, widget, 120)
    status = widget.job.status.text()
    assert str(plain) in status and "'New run'" in status and "--" not in status
    assert (plain / "beach.jpg").is_file()


def test_lora_widget_bad_settings_notify(make_napari_viewer, qtbot, tmp_path):
    from napari_neuromf._lora_widget import LoRAWidget

    widget = ready(qtbot, LoRAWidget(make_napari_viewer()))
    widget.targets.setText("")
    seen = notes()
    assert widget.start() is None
    assert any("adapted layer" in m for m in seen())
    widget.targets.setText("to_q")
    widget.strategy.setCurrentText("auto")  # no mask test result: neither the config's file nor a remembered one
    seen = notes()
    assert widget.start(overrides={"data.mask_test": str(tmp_path / "missing.json")}) is None
    assert any("Mask-VAE test" in m and "missing.json" in m for m in seen())
    assert "missing.json" in widget.job.status.text()  # the full message, in the widget too
    widget.strategy.setCurrentText("vae")
    widget.rank.setValue(4)
    seen = notes()
    assert widget.start(overrides={"lora.dropout": "lots"}) is None  # config validation names the key
    assert any("lora.dropout" in m for m in seen())
    assert not widget.busy


def test_lora_widget_out_of_memory_gives_remedy(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """A CUDA OOM inside the training generator becomes a notification with the remedy; buttons come back."""
    import torch

    import neuromf.pipelines.joint as pipeline
    from neuromf.train import TrainEvent

    def train_joint(cfg, base_checkpoint="embedded", resume=False, overwrite=False, stop=None, progress=False):
        yield TrainEvent("step", 1, 0, 10, loss=1.0, eta_s=5.0)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    released = []
    monkeypatch.setattr(pipeline, "train_joint", train_joint)
    monkeypatch.setattr(pipeline, "release_memory", lambda: released.append(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # out of memory happens on a GPU: give it back
    from napari_neuromf._lora_widget import LoRAWidget

    widget = ready(qtbot, LoRAWidget(make_napari_viewer()))
    widget.strategy.setCurrentText("downsample")
    widget.batch_size.setValue(6)
    widget.output.setText(str(tmp_path / "oom"))
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 30)
    message = next(m for m in seen() if "out of memory" in m)
    assert "batch size (now 6)" in message and "Resume" in message
    assert message in widget.job.status.text()
    assert released and widget.start_button.isEnabled() and len(widget.loss_plot.points) == 1


def test_generate_widget_adds_pairs_and_saves_the_selected(make_napari_viewer, qtbot, tiny_adapter, tmp_path):
    from qtpy.QtCore import Qt

    from napari_neuromf._generate_widget import GenerateWidget
    from neuromf.eval.lesion_check import MASK_CRITERIA, adapter_reference, pair_verdict
    from neuromf.eval.lesion_metrics import lesion_stats

    reference = adapter_reference(tiny_adapter)
    _session_state().last_adapter = tiny_adapter
    viewer = make_napari_viewer()
    widget = ready(qtbot, GenerateWidget(viewer))
    # the defaults are the 2 mm configuration that makes lesion pairs; the last trained adapter is only offered
    assert (widget.adapter.text(), widget.render.text()) == ("embedded", "embedded")
    assert (widget.sampler.currentText(), widget.steps.value(), widget.n.value()) == ("euler", 32, 1)
    assert not widget.advanced.isVisible() and "not checked yet" in widget.offer.text()
    assert not widget.use_latest.isEnabled()
    use_tiny(widget, tiny_adapter)
    widget.n.setValue(3)
    widget.seed.setValue(7)
    widget.device.setCurrentText("cpu")
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 60)
    assert not [m for m in seen() if "Generation" in m]
    assert [layer.name for layer in data_layers(viewer)] == [f"gen_00{i} {kind}" for i in range(3)
                                                       for kind in ("FLAIR", "lesion")]
    assert widget.job.bar.value() == 3 and "Generated 3 of 3 pairs" in widget.job.status.text()
    for i in range(3):
        image, lesion = viewer.layers[f"gen_{i:03d} FLAIR"], viewer.layers[f"gen_{i:03d} lesion"]
        assert_overlay(image, lesion)
        info = image.metadata["neuromf"]
        assert info["seed"] == 7 and info["sample_index"] == i and str(tiny_adapter) in str(info["checkpoint"])
        assert info["sampler"] == "meanflow" and info["steps"] == 1
        figures = info["lesion"]  # the lesion in figures, for every pair (a tiny model's mask may be empty)
        assert figures["volume_cm3"] == pytest.approx(float(np.count_nonzero(lesion.data)) * 6.0**3 / 1000, abs=0.01)
        # and the lesion check's verdict against the adapter's training lesions: the mask's criteria (no renderer)
        stats = lesion_stats(np.asarray(image.data), np.asarray(lesion.data), (6.0, 6.0, 6.0))
        expected = pair_verdict(stats, reference, MASK_CRITERIA)
        assert figures["check"] == {"lesion_like": expected.lesion_like, "failed": expected.failed,
                                    "criteria": list(MASK_CRITERIA), "verdict": expected.describe()}
        shown = widget.pairs.item(i)
        assert shown.data(Qt.UserRole) == f"gen_{i:03d}" and expected.describe() in shown.toolTip()
        assert ("not lesion-like" in shown.text()) == (not expected.lesion_like)
    assert any((tmp_path / "neuromf_home" / "lesion_references").glob("*.json"))  # built once, then cached

    # only the selected pairs are written
    assert [widget.pairs.item(i).data(Qt.UserRole) for i in range(widget.pairs.count())] == ["gen_000", "gen_001",
                                                                                              "gen_002"]
    widget.out_dir.setText(str(tmp_path / "pairs"))
    seen = notes()
    assert widget.save_pairs() is None and any("select" in m for m in seen())
    widget.pairs.item(0).setSelected(True)
    widget.pairs.item(2).setSelected(True)
    widget.save_pairs()
    wait_idle(qtbot, widget, 60)
    written = sorted(p.name for p in (tmp_path / "pairs").glob("*.nii.gz"))
    assert written == ["gen_000_FLAIR.nii.gz", "gen_000_FLAIR_roi.nii.gz", "gen_002_FLAIR.nii.gz",
                       "gen_002_FLAIR_roi.nii.gz"]
    assert "Saved 2 pairs" in widget.job.status.text() and (tmp_path / "pairs" / "gen_002.json").is_file()
    a, b = nib.load(str(tmp_path / "pairs" / written[0])), nib.load(str(tmp_path / "pairs" / written[1]))
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape == (32, 32, 32)
    assert np.allclose(np.abs(np.diag(a.affine)[:3]), 6.0)
    widget.save_all.setChecked(True)
    widget.out_dir.setText(str(tmp_path / "all"))
    widget.save_pairs()
    wait_idle(qtbot, widget, 60)
    assert len(list((tmp_path / "all").glob("*.nii.gz"))) == 6

    # Cancel right after the start stops the run before it has made 50 pairs (what a cancel keeps, within one
    # network step, is tested headless: test_generation_cancel_stops_within_one_network_step...)
    widget.n.setValue(50)
    widget.start()
    widget.job.cancel_button.click()
    wait_idle(qtbot, widget, 60)
    assert widget.run.cancelled and widget.run.pairs < 50 and widget.run.failure is None
    assert "cancelled" in widget.job.status.text()
    widget.n.setValue(1)  # a new click numbers its pairs after the existing ones
    existing = [widget.pairs.item(i).data(Qt.UserRole) for i in range(widget.pairs.count())]
    widget.start()
    wait_idle(qtbot, widget, 60)
    assert existing == [f"gen_{i:03d}" for i in range(len(existing))]
    assert f"gen_{len(existing):03d} FLAIR" in viewer.layers

    # the Euler sampler reaches the generator, which records it on the pair (the layers' provenance)
    widget.n.setValue(1)
    widget.steps.setValue(2)
    widget.sampler.setCurrentText("euler")
    before = set(viewer.layers)
    widget.start()
    wait_idle(qtbot, widget, 60)
    euler = [layer for layer in viewer.layers if layer not in before and layer.name.endswith("FLAIR")]
    assert len(euler) == 1
    info = euler[0].metadata["neuromf"]
    assert info["sampler"] == "euler" and info["steps"] == 2 and info["seed"] == 7 and info["sample_index"] == 0


def test_generate_widget_missing_adapter_notifies(make_napari_viewer, qtbot, tmp_path):
    from napari_neuromf._generate_widget import GenerateWidget

    widget = ready(qtbot, GenerateWidget(make_napari_viewer()))
    widget.adapter.setText(str(tmp_path / "nope"))
    seen = notes()
    assert widget.start() is None
    assert any("nope" in m and "does not exist" in m for m in seen())
    widget.adapter.setText("embedded-3mm")
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 60)
    from neuromf.weights import sample_data_root

    if not (sample_data_root() / "models" / "lora_demo").is_dir():
        assert any("embedded" in m for m in seen())


@pytest.fixture(scope="module")
def tiny_conditional_adapter(tiny_base, phantom_subset, tmp_path_factory) -> Path:
    """A 2-step conditional (ControlNet) adapter trained headless on the phantom subset."""
    from neuromf.config import load_config
    from neuromf.pipelines.conditional import train_conditional
    from neuromf.train import run_to_end

    out = tmp_path_factory.mktemp("cond") / "run"
    cfg = load_config("demo_cond", {"model.preset": "tiny", "data.data_dir": str(phantom_subset),
                                     "data.flip": False, "conditional.embedding_channels": [8],
                                     "training.max_steps": 2, "training.batch_size": 2, "training.device": "cpu",
                                     "training.checkpoint_every": 0, "training.output_dir": str(out)})
    return Path(run_to_end(train_conditional(cfg, tiny_base, progress=False)).export)


def use_tiny(widget, adapter) -> None:
    """A tiny test adapter with the fast settings (one MeanFlow step, its own FLAIR): the 2 mm defaults would render
    with the shipped conditional adapter, which sits on another base model."""
    widget.adapter.setText(str(adapter))
    widget.render.setText("")
    widget.sampler.setCurrentText("meanflow")
    widget.steps.setValue(1)


def test_last_trained_adapter_is_offered_only_after_its_quick_lesion_check(make_napari_viewer, qtbot, tiny_adapter):
    """A 3-step adapter draws no lesion-like masks: its quick check says why it is not recommended, 'Use it' stays
    off and the shipped adapter stays the default; a passing check (remembered across sessions) offers it."""
    from napari_neuromf import _state
    from napari_neuromf._generate_widget import DEFAULT_ADAPTER, GenerateWidget
    from neuromf.eval.lesion_check import FAILURE_WORDS, MASK_CRITERIA

    _session_state().attach(_state.user_folder() / "napari_state.json")
    _session_state().last_adapter = tiny_adapter
    widget = ready(qtbot, GenerateWidget(make_napari_viewer()))
    widget.device.setCurrentText("cpu")
    assert widget.offer_row.isVisibleTo(widget) and "not checked yet" in widget.offer.text()
    assert widget.offer.text().startswith(tiny_adapter.parent.name if tiny_adapter.name == "adapter"
                                          else tiny_adapter.name)  # which adapter, by its run's name
    seen = notes()
    widget._use_latest()  # not checked: refused
    assert widget.adapter.text() == DEFAULT_ADAPTER and any("Check it" in m for m in seen())
    widget.start_check()
    assert widget.busy and widget.job.cancel_button.isEnabled()
    wait_idle(qtbot, widget, 120)
    check = widget.run.check
    assert check is not None and widget.run.failure is None
    assert check.settings["criteria"] == list(MASK_CRITERIA) and len(check.pairs) == 2
    assert not check.recommended, check.pairs  # a 3-step adapter on random weights makes no lesion-like masks
    failed = [name for row in check.pairs for name in row["failed"]]
    assert failed and all(FAILURE_WORDS[name] in check.reason for name in failed)
    # one short line: which adapter, not recommended, each failed criterion once; the pairs' details in the tooltip
    assert widget.offer.text().endswith(f"not recommended, {check.summary()}") and len(widget.offer.text()) < 120
    failing = sum(not row["lesion_like"] for row in check.pairs)
    assert check.summary().startswith(f"{failing} of 2 pairs fail: ") and check.reason in widget.offer.toolTip()
    first = next(name for name in MASK_CRITERIA if name in failed)  # named first, whatever else failed
    assert check.summary().split(": ", 1)[1].startswith(FAILURE_WORDS[first])
    assert not widget.use_latest.isEnabled() and widget.adapter.text() == DEFAULT_ADAPTER
    assert "not recommended" in widget.job.status.text() and widget.check_latest.isEnabled()  # can check again

    # remembered for these weights across sessions
    again = _state.PluginState()
    again.attach(_state.user_folder() / "napari_state.json")
    assert again.adapter_check(tiny_adapter)["reason"] == check.reason
    # a check that passed (as recorded by a run) enables the offer; 'Use it' then selects the adapter
    _session_state().remember_check(tiny_adapter, {**check.to_dict(), "recommended": True, "reason": "all pass"})
    widget._new_adapter(tiny_adapter)
    assert widget.use_latest.isEnabled() and widget.offer.text().endswith("makes lesions (2 of 2 pairs pass)")
    widget.use_latest.click()
    assert widget.adapter.text() == str(tiny_adapter) and widget.offer.text().endswith(": selected (its quick check "
                                                                                       "passed)")


def generate_one_pair(qtbot, widget, viewer) -> tuple:
    """One pair on the CPU with the widget's settings: no error notification, FLAIR and lesion overlaid."""
    widget.n.setValue(1)
    widget.device.setCurrentText("cpu")
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert not [m for m in seen() if "Generation" in m], seen()
    image, lesion = viewer.layers["gen_000 FLAIR"], viewer.layers["gen_000 lesion"]
    assert_overlay(image, lesion)
    return image, lesion


def test_generate_widget_paints_a_lesion_and_generates_a_flair_for_it(make_napari_viewer, qtbot, phantom_subset,
                                                                      tiny_conditional_adapter):
    """The paint-a-lesion workflow: a Labels layer drawn over an opened FLAIR becomes the lesion of a generated
    FLAIR, which comes back on the model grid, overlaid in the same world coordinates as the painted layer."""
    from napari_neuromf._generate_widget import PRIOR_LESION, GenerateWidget, chosen_guidance
    from napari_neuromf._layers import read_layer

    viewer = make_napari_viewer()
    flair_path = next((phantom_subset / SUBJECTS[0] / "anat").glob("*_FLAIR.nii.gz"))
    data, state, _ = read_layer(flair_path)
    flair = viewer.add_image(data, **{k: v for k, v in state.items() if k in ("name", "scale", "translate",
                                                                               "metadata")})
    painted = viewer.add_labels(np.zeros(flair.data.shape, dtype=np.uint8), name="painted lesion",
                                scale=flair.scale, translate=flair.translate)
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_conditional_adapter)
    widget.mode.setCurrentText("conditional")
    assert widget.lesion.enabled and painted in widget.lesion.choices
    widget.lesion.value = painted
    seen = notes()
    assert widget.start() is None  # nothing painted yet
    assert any("painted lesion" in m and "empty" in m for m in seen())

    # paint a ball of about 2 cm in the middle of the brain with the layer's own brush API
    centre = np.array(flair.data.shape) // 2
    painted.paint(tuple(centre), new_label=1)  # one dab of the default brush
    painted.brush_size = 8
    painted.paint(tuple(centre), new_label=1)
    assert painted.data.any()
    image, lesion = generate_one_pair(qtbot, widget, viewer)
    assert image.data.shape == (32, 32, 32) and lesion.data.any()
    # the generated lesion sits where it was painted (world coordinates, mm)
    painted_mm = np.argwhere(painted.data).mean(0) * painted.scale + painted.translate
    generated_mm = np.argwhere(lesion.data).mean(0) * lesion.scale + lesion.translate
    assert np.linalg.norm(painted_mm - generated_mm) < 2 * float(np.max(lesion.scale))
    assert image.metadata["neuromf"]["mode"] == "conditional"
    assert chosen_guidance(widget.guidance) is None and image.metadata["neuromf"]["guidance"] == 1.0  # its own

    widget.lesion.value = PRIOR_LESION  # no layer: a lesion drawn from the training lesions
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert viewer.layers["gen_001 lesion"].data.any()


def test_generate_widget_renders_joint_masks_with_a_conditional_adapter(make_napari_viewer, qtbot, tiny_adapter,
                                                                         tiny_conditional_adapter, tmp_path):
    """Joint mode's "Render with": the joint adapter draws the mask, the conditional adapter renders its FLAIR
    (recorded on the layers); a folder that does not exist is refused with a notification, before any work. Joint
    guidance applies to joint adapters only, and one without x-prediction refuses it with a notification."""
    from napari_neuromf._generate_widget import GenerateWidget

    viewer = make_napari_viewer()
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_adapter)
    assert widget.render.isEnabled() and not widget.guidance.isEnabled()  # guidance needs a conditional adapter
    assert widget.joint_guidance.isEnabled()
    widget.mode.setCurrentText("conditional")
    assert not widget.render.isEnabled() and widget.guidance.isEnabled()  # only joint masks are rendered
    assert not widget.joint_guidance.isEnabled()
    widget.mode.setCurrentText("joint")
    widget.render.setText(str(tmp_path / "nowhere"))
    seen = notes()
    assert widget.start() is None and widget.run is None
    assert any("nowhere" in m and "does not exist" in m for m in seen())
    widget.render.setText(str(tiny_conditional_adapter))
    assert widget.guidance.isEnabled()
    widget.guidance.setValue(1.5)
    image, lesion = generate_one_pair(qtbot, widget, viewer)
    info = image.metadata["neuromf"]
    assert info["mode"] == "joint" and Path(info["rendered_by"]) == tiny_conditional_adapter.resolve()
    assert info["guidance"] == 1.5 and info["joint_guidance"] == 1.0  # the joint adapter's own
    widget.joint_guidance.setValue(1.5)  # this tiny adapter predicts velocities: nothing to guide
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert any("x-prediction" in m for m in seen()) and "gen_001 lesion" not in viewer.layers


def test_generate_widget_shows_the_time_left_at_the_runs_own_pace(make_napari_viewer, qtbot, monkeypatch,
                                                                  tiny_adapter, tiny_conditional_adapter):
    """Two rendered joint pairs: once network steps ran, the dock's status and bar say the time left at this run's
    pace; the run waits in the second pair's FLAIR pass until the dock has shown it. At the end the plan of passes
    the time left counted on matches the passes the backend ran, and only the last pair's decoding was left after
    its last network step."""
    import threading

    from napari_neuromf._generate_run import GenerateRun
    from napari_neuromf._generate_widget import GenerateWidget
    from neuromf.estimates import joint_batch_factor

    shown, passes, report = threading.Event(), [], GenerateRun.on_step

    def on_step(run, i, n):
        report(run, i, n)
        passes.extend([run.pairs] if i == 1 else [])
        if run.pairs == 1 and i == 3:
            shown.wait(60)  # the worker waits here until the test has read the dock

    monkeypatch.setattr(GenerateRun, "on_step", on_step)
    viewer = make_napari_viewer()
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_adapter)
    widget.render.setText(str(tiny_conditional_adapter))
    widget.sampler.setCurrentText("euler")
    widget.steps.setValue(4)
    widget.n.setValue(2)
    widget.device.setCurrentText("cpu")
    widget.start()
    try:
        qtbot.waitUntil(lambda: "Pair 2 of 2: network step 3 / 4" in widget.job.status.text(), timeout=120_000)
        status, bar = widget.job.status.text(), widget.job.bar.format()
    finally:
        shown.set()
    wait_idle(qtbot, widget, 120)
    assert "left at this run's pace" in status and " ETA " in bar and "pair 2 / 2" in bar
    assert widget.run.failure is None and "gen_001 FLAIR" in viewer.layers
    plan = widget.run.plan
    assert [len(planned) for planned in plan.pairs] == [passes.count(0), passes.count(1)]
    # one joint pass for both pairs (`extra`: a joint step of one pair), at the measured share of a batch
    assert plan.pairs[0][0] == pytest.approx(joint_batch_factor(2) * plan.extra) and joint_batch_factor(2) < 2
    assert widget.run.last_step[2] == pytest.approx(plan.finish)  # after the last step: the last pair's decoding


def test_a_pair_arriving_over_a_scan_on_another_grid_is_shown_alone(make_napari_viewer, qtbot, phantom_subset,
                                                                    tiny_adapter):
    """A scan is open (its own grid, somewhere in the scanner's world); a generated pair arrives on the model's
    grid: the scan is hidden, not removed, the dock's status line says so and how to show it again, and the view
    is fitted to the pair. A second pair on the same grid hides nothing more and leaves the view alone."""
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._layers import read_layer
    from napari_neuromf._viewing import same_grid

    viewer = make_napari_viewer()
    data, state, _ = read_layer(next((phantom_subset / SUBJECTS[0] / "anat").glob("*_FLAIR.nii.gz")))
    translate = np.asarray(state["translate"]) + (60.0, -40.0, 0.0)  # another field of view than the model's
    scan = viewer.add_image(data, name="scan FLAIR", scale=state["scale"], translate=translate,
                            metadata=state["metadata"])
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_adapter)
    image, lesion = generate_one_pair(qtbot, widget, viewer)
    assert "scan FLAIR" in viewer.layers and not scan.visible and image.visible and lesion.visible
    assert same_grid(image, lesion) and not same_grid(scan, image)
    status = widget.job.status.text()
    assert "hidden, not removed: scan FLAIR" in status and "eye in the layer list" in status
    pair_centre = np.asarray(image.extent.world).mean(axis=0)
    assert np.allclose(viewer.scene.camera.center[-2:], pair_centre[list(viewer.dims.displayed)], atol=1e-3)
    fitted_zoom = viewer.scene.camera.zoom
    viewer.scene.camera.zoom = fitted_zoom * 2  # the user zooms in on the pair: the next pair keeps that view
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert "gen_001 FLAIR" in viewer.layers and viewer.layers["gen_000 FLAIR"].visible
    assert viewer.scene.camera.zoom == pytest.approx(fitted_zoom * 2) and "hidden" not in widget.job.status.text()


def test_generate_widget_puts_joint_lesions_at_the_points_of_a_points_layer(make_napari_viewer, qtbot,
                                                                              tiny_site_adapter):
    """Lesion sites for a site-conditioned joint adapter: drawn from its prior by default; a Points layer placed on
    a generated pair gives them instead (its world mm mapped to the model grid); an empty one is refused."""
    from napari_neuromf._generate_widget import DRAWN_SITES, GenerateWidget

    viewer = make_napari_viewer()
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_site_adapter)
    widget.sampler.setCurrentText("euler")
    widget.steps.setValue(2)
    assert widget.site.enabled and widget.site.value == DRAWN_SITES
    image, _ = generate_one_pair(qtbot, widget, viewer)
    drawn = image.metadata["neuromf"]
    assert not drawn["site_given"] and len(drawn["site_voxel"]) == 3
    voxel = np.array([5.0, 7.0, 9.0])
    points = viewer.add_points(voxel * np.asarray(image.scale) + np.asarray(image.translate), name="sites")
    widget.site.value = points
    for name in ("gen_000 FLAIR", "gen_000 lesion"):
        viewer.layers.remove(name)
    image, _ = generate_one_pair(qtbot, widget, viewer)
    assert image.metadata["neuromf"]["site_given"]
    np.testing.assert_allclose(image.metadata["neuromf"]["site_voxel"], voxel, atol=0.05)
    points.data = np.zeros((0, 3))
    seen = notes()
    assert widget.start() is None
    assert any("no points" in m for m in seen())
    widget.mode.setCurrentText("conditional")
    assert not widget.site.enabled


def test_generate_widget_cautions_about_an_implausible_painted_lesion(make_napari_viewer, qtbot, phantom_subset,
                                                                     tiny_conditional_adapter):
    """A lesion painted outside the brain still gets its FLAIR, with a caution in the widget and a warning."""
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._layers import read_layer

    viewer = make_napari_viewer()
    data, state, _ = read_layer(next((phantom_subset / SUBJECTS[0] / "anat").glob("*_FLAIR.nii.gz")))
    flair = viewer.add_image(data, **{k: state[k] for k in ("name", "scale", "translate", "metadata")})
    corner = np.zeros(flair.data.shape, dtype=np.uint8)
    corner[:8, :8, :8] = 1  # a 2.4 cm cube in the corner of the field of view: air, not brain
    painted = viewer.add_labels(corner, name="in the air", scale=flair.scale, translate=flair.translate)
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_conditional_adapter)
    widget.mode.setCurrentText("conditional")
    widget.lesion.value = painted
    widget.n.setValue(1)
    widget.device.setCurrentText("cpu")
    seen = notes()
    widget.start()
    wait_idle(qtbot, widget, 120)
    assert "gen_000 FLAIR" in viewer.layers and widget.run.failure is None
    assert any("outside the brain" in c for c in widget.run.cautions), widget.run.cautions
    assert "outside the brain" in widget.job.status.text() and any("outside the brain" in m for m in seen())


def test_generation_cancel_stops_within_one_network_step_and_keeps_the_pairs_done(tiny_conditional_adapter):
    """Headless GenerateRun: progress per network step (the loading phase first), and a cancel in the middle of
    the second pair stops before the next step; the first pair stays, and nothing is reported as a failure."""
    from napari_neuromf._generate_run import GenerateRun

    run = GenerateRun(str(tiny_conditional_adapter), n=3, steps=6, device="cpu", mode="conditional", method="euler")
    assert run.progress_text().startswith("Loading the models")
    seen, report = [], run.on_step

    def on_step(i, n):
        report(i, n)
        seen.append((run.pairs, i, n))
        if run.pairs == 1 and i == 2:
            run.cancel.set()  # Cancel pressed during the second pair's second network step

    run.on_step = on_step
    pairs = [item for item in run.drive()]
    assert len(pairs) == 1 and run.pairs == 1 and run.failure is None and run.cancelled
    assert seen[:6] == [(0, i, 6) for i in range(1, 7)] and seen[-1] == (1, 2, 6)  # no step after the cancel
    assert run.loaded_s is not None and "network step 2 / 6" in run.progress_text()


def test_generate_widget_inpaints_the_painted_lesion_into_the_scan_painted_on(make_napari_viewer, qtbot,
                                                                              phantom_subset, tiny_conditional_adapter,
                                                                              tmp_path):
    """Paint a lesion on an open FLAIR, choose inpaint: the new FLAIR is THAT scan (its grid, its voxels beyond the
    margin) with the lesion put in, and the lesion layer lies where it was painted; the guidance left at
    "adapter's" is the adapter's own inpainting guidance (its sidecar's `inpaint_guidance`)."""
    from testkit import adapter_copy

    from napari_neuromf._generate_widget import GenerateWidget, chosen_guidance
    from napari_neuromf._layers import read_layer

    viewer = make_napari_viewer()
    data, state, _ = read_layer(next((phantom_subset / SUBJECTS[1] / "anat").glob("*_FLAIR.nii.gz")))
    flair = viewer.add_image(data, **{k: state[k] for k in ("name", "scale", "translate", "metadata")})
    painted = viewer.add_labels(np.zeros(flair.data.shape, dtype=np.uint8), name="painted lesion",
                                scale=flair.scale, translate=flair.translate)
    centre = np.array(flair.data.shape) // 2
    painted.brush_size = 6
    painted.paint(tuple(centre), new_label=1)
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, adapter_copy(tiny_conditional_adapter, tmp_path / "adapter", inpaint_guidance=1.5))
    widget.mode.setCurrentText("inpaint")
    assert (widget.sampler.currentText(), widget.steps.value()) == ("meanflow", 8)  # the inpaint defaults
    assert chosen_guidance(widget.guidance) is None  # "adapter's"
    widget.steps.setValue(2)
    assert widget.scan.enabled and widget.lesion.enabled and not widget.site.enabled
    widget.scan.value, widget.lesion.value = flair, painted
    image, lesion = generate_one_pair(qtbot, widget, viewer)
    assert image.data.shape == flair.data.shape  # the scan's own grid, not the model grid
    assert np.allclose(image.scale, flair.scale) and np.allclose(image.translate, flair.translate)
    info = image.metadata["neuromf"]
    assert info["mode"] == "inpaint" and info["scan"] == flair.name
    assert (info["guidance"], info["network_calls"]) == (1.5, 4)  # 2 steps, guided: 2 network calls each
    assert np.array_equal(lesion.data > 0, painted.data > 0)
    far = np.ones(flair.data.shape, dtype=bool)  # farther than the margin (6 mm) from the painted lesion
    lo, hi = np.maximum(centre - 12, 0), centre + 12
    far[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    np.testing.assert_allclose(np.asarray(image.data)[far], np.asarray(flair.data, dtype=np.float32)[far])
    assert not np.allclose(np.asarray(image.data)[~far], np.asarray(flair.data, dtype=np.float32)[~far])


def test_generated_pair_side_by_side_with_a_real_case_shares_the_slice(make_napari_viewer, qtbot, phantom_subset,
                                                                       tiny_adapter):
    """'Side by side': the real case comes onto the pair's grid as training sees it (left), the pair on the right,
    in a second viewer's grid mode; one slice position shows the same axial level of both."""
    from napari_neuromf._compare import model_grid_of
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._helpers import add_layer
    from napari_neuromf._layers import case_layers
    from neuromf.io.nifti import preprocess_pair

    viewer = make_napari_viewer()
    widget = ready(qtbot, GenerateWidget(viewer))
    use_tiny(widget, tiny_adapter)
    image, lesion = generate_one_pair(qtbot, widget, viewer)
    image_path, mask_path = case_files(phantom_subset)
    for layer_tuple in case_layers(image_path, mask_path, "sub-00001")[0]:
        add_layer(viewer, layer_tuple)
    assert list(widget.real_case.choices) == [viewer.layers["sub-00001 FLAIR"]]  # no generated FLAIR offered
    widget.real_case.value = viewer.layers["sub-00001 FLAIR"]
    widget.new_viewer = lambda **kwargs: make_napari_viewer(show=True, **kwargs)  # shown: its letters are drawn
    worker = widget.compare()
    qtbot.waitUntil(lambda: widget.compare_viewer is not None, timeout=60_000)
    assert worker is not None
    other = widget.compare_viewer
    names = [layer.name for layer in other.layers]
    assert names == ["sub-00001 FLAIR (model grid)", "sub-00001 lesion (model grid)", "orientation letters (real)",
                     "gen_000 FLAIR", "gen_000 lesion", "orientation letters (generated)"]
    assert other.canvas.grid.enabled and other.canvas.grid.actual_shape(other.layers) == (1, 2)
    assert [other.canvas.grid.position(i, other.layers) for i in range(6)] == [(0, 0)] * 3 + [(0, 1)] * 3
    real, real_lesion, real_letters, gen, gen_lesion, gen_letters = other.layers
    assert other.layers.selection.active is gen  # the letters are a view aid: not what a click should act on
    # the real case exactly as training sees it, on the pair's grid and world placement
    prep = model_grid_of(image.metadata["neuromf"], {"shape": image.data.shape, "scale": image.scale})
    expected_image, expected_mask = preprocess_pair(image_path, mask_path, prep)
    assert np.allclose(real.data, expected_image.data[0].numpy(), atol=1e-5)
    assert np.array_equal(real_lesion.data, expected_mask.data[0].numpy().astype(np.uint8)) and real_lesion.data.any()
    for layer in (real, real_lesion, gen_lesion):
        assert np.allclose(layer.scale, gen.scale) and np.allclose(layer.translate, gen.translate)
    assert np.array_equal(gen.data, image.data) and tuple(real.contrast_limits) == tuple(gen.contrast_limits)
    # the view opens on the real lesion's axial slice; any slice position is one level for both volumes
    lesion_slice = np.argwhere(real_lesion.data).mean(axis=0)[2]
    assert abs(gen.world_to_data(other.dims.point)[2] - lesion_slice) <= 0.5

    def shown(k: int) -> bool:
        return all(np.array_equal(np.asarray(layer._slice.image.view), np.asarray(layer.data[:, :, k]).T)
                   for layer in (real, gen))

    for k in (3, image.data.shape[2] - 4):
        other.dims.set_point(2, float(gen.data_to_world((0, 0, k))[2]))
        qtbot.waitUntil(lambda k=k: shown(k), timeout=5000)
        assert not np.array_equal(real.data[:, :, k], real.data[:, :, int(lesion_slice)])  # a different slice
    # one orientation caption for both views (shown once its glyphs are loaded, a few turns after the viewer opened)
    qtbot.waitUntil(lambda: "radiological" in other.canvas.overlays.text.text, timeout=5000)
    # each view its own letters, on the slice shown, R on screen left of L and A above P (radiological), inside
    # its own half of the canvas
    other.reset_view()
    qtbot.wait(50)
    for letters, half in ((real_letters, 0), (gen_letters, 1)):
        assert letters.visible and np.allclose(np.asarray(letters.data)[:, 2], other.dims.point[2])
        node = other.window._qt_viewer.canvas.layer_to_visual[letters].node
        points = np.asarray(letters.data)[:, list(other.dims.displayed)][:, ::-1]  # (horizontal, vertical)
        at = dict(zip(letters.features["letter"], node.get_transform("visual", "canvas").map(points)[:, :2],
                      strict=True))
        assert at["R"][0] < at["L"][0] and at["A"][1] < at["P"][1]
        width = other.canvas.size[1]
        assert all(half * width / 2 <= x <= (half + 1) * width / 2 for x, _ in at.values())


def test_time_estimates_show_before_jobs_start(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Generate, LoRA and the mask test say how long a job should take before it starts, from the measured rates
    (neuromf.estimates; here a made-up machine's, `$NEUROMF_RATES`), and follow the form: twice the pairs, about
    twice the generation time; inpainting, one lesion at two network calls per guided step."""
    import json

    from testkit import TEST_RATES

    from neuromf.estimates import RATES_ENV

    (tmp_path / "rates.json").write_text(json.dumps(TEST_RATES))
    monkeypatch.setenv(RATES_ENV, str(tmp_path / "rates.json"))
    monkeypatch.setattr("neuromf.estimates.current_load", lambda: (5.0, 2))  # a busier machine than the rates'
    from napari_neuromf._generate_widget import DEFAULT_ADAPTER, GenerateWidget
    from napari_neuromf._lora_widget import LoRAWidget
    from napari_neuromf._mask_test_widget import MaskTestWidget
    from napari_neuromf._training_run import build_lora_config
    from neuromf import estimates
    from neuromf.estimates import (
        FINISH_CALLS,
        generation_estimate,
        mask_test_estimate,
        measured_rates,
        training_estimate,
    )
    from neuromf.pipelines.estimates import training_cases
    from neuromf.weights import EMBEDDED_MODELS

    assert measured_rates() == TEST_RATES
    viewer = make_napari_viewer()
    generate = ready(qtbot, GenerateWidget(viewer))
    # the shipped renderer's own mask guidance for joint masks (1.2): two network calls per FLAIR step
    one = generation_estimate(1, 32, "joint", render=True, grid=(96, 96, 96), flair_calls=2)
    qtbot.waitUntil(lambda: generate.estimate.text() == f"Expected time: {one.describe()}", timeout=5000)
    assert DEFAULT_ADAPTER == generate.adapter.text() and "joint + FLAIR passes" in one.basis
    assert "on an idle machine, ×3.0 at load 5.0 on 2 cores now" in generate.estimate.text()  # the load is said
    generate.n.setValue(2)
    two = generation_estimate(2, 32, "joint", render=True, grid=(96, 96, 96), flair_calls=2)
    qtbot.waitUntil(lambda: generate.estimate.text() == f"Expected time: {two.describe()}", timeout=5000)
    rate = measured_rates()["generation"]
    load = rate["load_s"] * 3 / 2  # the models' loading (and one pair's finishing) at load 5 (measured at 3)
    finishing = FINISH_CALLS * rate["render_per_step_s"] * 3 / 2  # the second pair's decoding and figures
    assert two.seconds - load - finishing == pytest.approx(2 * (one.seconds - load))
    generate.mode.setCurrentText("inpaint")  # one lesion; the shipped adapter inpaints at its guidance 1.3
    inpaint = generation_estimate(1, 8, "inpaint", grid=(96, 96, 96), flair_calls=2)
    qtbot.waitUntil(lambda: generate.estimate.text() == f"Expected time: {inpaint.describe()}", timeout=5000)
    # a finished run found this machine 1.4x slower than the rates' one: the next estimate says so and follows it
    estimates.record_pace("generation", 60.0, 84.0, (0.0, 2))
    generate.steps.setValue(16)
    paced = generation_estimate(1, 16, "inpaint", grid=(96, 96, 96), flair_calls=2)
    qtbot.waitUntil(lambda: generate.estimate.text() == f"Expected time: {paced.describe()}", timeout=5000)
    assert "×1.40, this machine's pace in its last 1 run" in generate.estimate.text()

    lora = ready(qtbot, LoRAWidget(viewer))
    lora.config.setCurrentText("joint_3mm")
    assert lora.strategy.currentText() == "auto"  # no mask test yet: the estimate does not need one
    cfg = build_lora_config("joint_3mm", {**lora.settings(), "data.mask_strategy": "downsample"})
    expected = training_estimate("joint_3mm", training_cases(cfg), cfg.training.max_steps, cfg.training.batch_size)
    qtbot.waitUntil(lambda: lora.estimate.text() == f"Expected time: {expected.describe()}", timeout=5000)
    assert f"encoding {training_cases(cfg)} cases" in expected.basis

    mask_test = ready(qtbot, MaskTestWidget(viewer))
    per_case = mask_test_estimate(EMBEDDED_MODELS["vae"]["embedded"], 1)
    assert per_case.describe() in mask_test.run_button.toolTip() and "a few seconds" not in \
        mask_test.run_button.toolTip()


def test_a_generated_pair_opened_without_figures_gets_them_and_the_verdict(make_napari_viewer, qtbot):
    """The pre-made sample pair carries no lesion figures: the Generate dock works them out in a worker, with the
    lesion check's verdict against the shipped adapter's training lesions, into the layers and its list."""
    from qtpy.QtCore import Qt

    from napari_neuromf import _sample_data
    from napari_neuromf._generate_run import lesion_figures, lesion_judge
    from napari_neuromf._generate_widget import GenerateWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-neuromf", "generated_pair")
    prefix = _sample_data.PAIRS["joint"]
    image, lesion = viewer.layers[f"{prefix} FLAIR"], viewer.layers[f"{prefix} lesion"]
    assert "lesion" not in image.metadata["neuromf"]
    widget = ready(qtbot, GenerateWidget(viewer))
    qtbot.waitUntil(lambda: "lesion" in image.metadata["neuromf"], timeout=60_000)
    figures = image.metadata["neuromf"]["lesion"]
    judge = lesion_judge("embedded-fine", "joint", True)
    expected = lesion_figures(np.asarray(image.data), np.asarray(lesion.data),
                              image.metadata["nifti"]["canonical_affine"], *judge)
    assert figures == expected and lesion.metadata["neuromf"]["lesion"] == expected
    assert figures["check"]["criteria"][-1] == "contrast"  # rendered by the conditional model: the FLAIR is judged
    qtbot.waitUntil(lambda: widget.pairs.count() == 1 and "cm³" in widget.pairs.item(0).text(), timeout=5000)
    assert widget.pairs.item(0).data(Qt.UserRole) == prefix


def test_a_layer_picker_lets_go_of_the_viewer_once_its_widget_is_deleted(make_napari_viewer, qtbot):
    """A dock's layer picker follows the viewer's layers; once its widget is deleted (the dock closed, the viewer
    open) the next layer change disconnects it instead of raising."""
    from napari.layers import Image

    from napari_neuromf._helpers import layer_choice

    viewer = make_napari_viewer()
    combo = layer_choice(viewer, Image, "a picker")
    viewer.add_image(np.zeros((4, 4), np.float32), name="first")
    assert [layer.name for layer in combo.choices] == ["first"]
    connected = len(viewer.layers.events.inserted.callbacks)
    combo.native.deleteLater()
    qtbot.wait(50)
    viewer.add_image(np.zeros((4, 4), np.float32), name="second")
    assert len(viewer.layers.events.inserted.callbacks) == connected - 1


def test_the_generate_dock_lets_go_of_the_viewer_once_it_is_deleted(make_napari_viewer, qtbot):
    """The Generate dock follows the viewer's layers (its pair list); once the dock is deleted (closed, the viewer
    open) the next layer change disconnects it instead of raising, without a callback on its own destruction."""
    from napari_neuromf._generate_widget import GenerateWidget

    viewer = make_napari_viewer()
    widget = GenerateWidget(viewer)

    def the_docks() -> list:  # the viewer's layer-list callbacks that are the dock's own methods
        return [callback[1] for event in (viewer.layers.events.inserted, viewer.layers.events.removed)
                for callback in event.callbacks if isinstance(callback, tuple) and callback[1] == "_refresh_pairs"]

    assert the_docks() == ["_refresh_pairs", "_refresh_pairs"]
    widget.deleteLater()
    qtbot.wait(50)
    viewer.add_image(np.zeros((4, 4), np.float32), name="after the dock")
    assert the_docks() == []
