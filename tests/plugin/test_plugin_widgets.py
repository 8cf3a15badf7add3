"""The four dock widgets with a real napari viewer (run under Xvfb): data, mask-VAE test, LoRA training, generate.

Everything is tiny: three phantom cases, a random `tiny` VAE, a random `tiny` base UNet on a 32^3 / 6 mm grid.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.gui

SUBJECTS = ("sub-00001", "sub-00002", "sub-00003")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Default output folders under tmp, and a fresh shared plugin state for every test."""
    from napari_neuromf import _session

    monkeypatch.setenv("NEUROMF_HOME", str(tmp_path / "neuromf_home"))
    monkeypatch.setattr(_session, "STATE", _session.PluginState())
    import napari_neuromf._widgets as widgets

    monkeypatch.setattr(widgets, "STATE", _session.STATE)


@pytest.fixture(scope="module")
def phantom_subset(tmp_path_factory) -> Path:
    """Three FCD phantom patients from sample_data (train split), as a small BIDS tree."""
    from neuromf.weights import sample_data_root

    src = sample_data_root() / "fcd_phantoms"
    dst = tmp_path_factory.mktemp("phantoms") / "bids"
    dst.mkdir()
    for subject in SUBJECTS:
        shutil.copytree(src / subject, dst / subject)
    rows = [line for line in (src / "participants.tsv").read_text().splitlines()
            if line.startswith("participant_id") or line.split("\t")[0] in SUBJECTS]
    (dst / "participants.tsv").write_text("\n".join(rows) + "\n")
    return dst


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random `tiny` MeanFlow UNet saved like a stage-1 model, with a random `tiny` VAE on a 32^3 grid."""
    import torch

    from neuromf.io.nifti import Preprocessing
    from neuromf.models.flow_model import save_flow_model
    from neuromf.models.unet import MeanFlowUNet
    from neuromf.vae import MAISIVAEWrapper

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    prep = Preprocessing(shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0))
    vae = MAISIVAEWrapper("tiny", scale_factor=1.0)
    vae_dir = vae.save(root / "vae_tiny", extra={"preprocessing": prep.key()})
    meta = {"vae": str(vae_dir), "vae_preset": "tiny", "vae_identity": vae.identity, "scale_factor": 1.0,
            "preprocessing": prep.key(), "latent_shape": [4, 8, 8, 8], "channels": {"image": 4, "mask": 0},
            "stage": 1}
    save_flow_model(MeanFlowUNet(4, preset="tiny"), root / "base_tiny", meta)
    return root / "base_tiny"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_base, phantom_subset, tmp_path_factory) -> Path:
    """A 3-step LoRA adapter trained headless (the Generate widget's input)."""
    from neuromf.config import load_config
    from neuromf.pipelines.lora import train_lora
    from neuromf.train import run_to_end

    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_config("demo_lora", {"model.preset": "tiny", "data.data_dir": str(phantom_subset),
                                     "data.mask_strategy": "downsample", "data.flip": False, "lora.rank": 2,
                                     "training.max_steps": 3, "training.batch_size": 2, "training.device": "cpu",
                                     "training.checkpoint_every": 0, "training.output_dir": str(out)})
    result = run_to_end(train_lora(cfg, tiny_base, progress=False))
    return Path(result.export)


def _notes():
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)
    return lambda: [str(n.message) for n in notification_manager.records[start:]]


def _wait(qtbot, widget, timeout_s: float = 60) -> None:
    """Until the widget's worker has finished and its handlers ran (``busy`` is cleared by the last one)."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout_s * 1000))


def _assert_overlay(image, labels) -> None:
    assert image._type_string == "image" and labels._type_string == "labels"
    assert image.data.shape == labels.data.shape
    assert np.allclose(image.scale, labels.scale) and np.allclose(image.translate, labels.translate)
    assert np.issubdtype(labels.data.dtype, np.integer)


def test_data_widget_scans_loads_and_registers(make_napari_viewer, qtbot, phantom_subset, tmp_path):
    from napari_neuromf._widgets import FCDDataWidget

    viewer = make_napari_viewer()
    widget = FCDDataWidget(viewer)
    widget.folder.setText(str(phantom_subset))
    widget.scan()
    _wait(qtbot, widget)
    assert widget.table.rowCount() == 3
    assert [widget.table.item(r, 0).text() for r in range(3)] == list(SUBJECTS)
    assert widget.table.item(0, 3).text() == "64x64x64" and float(widget.table.item(0, 5).text()) > 0

    widget.table.selectRow(1)
    image, lesion = widget.load_selected()
    assert image.name == "sub-00002 FLAIR" and lesion.name == "sub-00002 lesion"
    _assert_overlay(image, lesion)
    assert lesion.opacity == pytest.approx(0.5) and lesion.data.max() == 1
    widget.contour.setChecked(True)
    assert lesion.contour == 1

    # the open pair goes back to disk as a flat-folder case and shows up in the table
    widget.image_layer.setCurrentText(image.name)
    widget.labels_layer.setCurrentText(lesion.name)
    widget.case_id.setText("reg_001")
    widget.register_folder.setText(str(tmp_path / "mine"))
    paths = widget.register_open_layers()
    _wait(qtbot, widget)
    assert [p.name for p in paths] == ["reg_001_FLAIR.nii.gz", "reg_001_FLAIR_roi.nii.gz"]
    original = nib.load(str(phantom_subset / "sub-00002" / "anat" / "sub-00002_acq-phantom_FLAIR_roi.nii.gz"))
    assert np.array_equal(nib.load(str(paths[1])).affine, original.affine)
    assert widget.table.rowCount() == 1 and widget.table.item(0, 0).text() == "reg_001"


def test_data_widget_bad_folder_notifies(make_napari_viewer, tmp_path):
    from napari_neuromf._widgets import FCDDataWidget

    widget = FCDDataWidget(make_napari_viewer())
    widget.folder.setText(str(tmp_path / "missing"))
    notes = _notes()
    widget.scan()
    assert any("missing" in m and "does not exist" in m for m in notes())


def test_mask_test_widget_fills_table_and_shows_reconstruction(make_napari_viewer, qtbot, phantom_subset,
                                                                tiny_base, tmp_path):
    from napari_neuromf import _session
    from napari_neuromf._widgets import MaskTestWidget

    viewer = make_napari_viewer()
    widget = MaskTestWidget(viewer)
    widget.vae_source.setCurrentIndex(1)
    widget.vae_file.setText(str(tiny_base.parent / "vae_tiny"))
    widget.vae_preset.setCurrentText("tiny")
    widget.folder.setText(str(phantom_subset))
    widget.max_cases.setValue(2)
    widget.output.setText(str(tmp_path / "mask_test.json"))
    widget.start()
    _wait(qtbot, widget, 120)
    assert widget.table.rowCount() == 2
    assert [widget.table.item(r, 0).text() for r in range(2)] == list(SUBJECTS[:2])
    assert 0.0 <= float(widget.table.item(0, 3).text()) <= 1.0
    assert "Recommendation: strategy" in widget.recommendation.text()
    assert (tmp_path / "mask_test.json").is_file()
    assert _session.STATE.last_mask_test == tmp_path / "mask_test.json"

    widget.table.selectRow(0)
    widget.show_reconstruction()
    _wait(qtbot, widget, 60)
    recon = viewer.layers["sub-00001 lesion (VAE)"]
    assert recon._type_string == "labels" and recon.data.shape == (32, 32, 32)
    assert np.allclose(recon.scale, (6.0, 6.0, 6.0))
    _assert_overlay(viewer.layers["sub-00001 FLAIR"], viewer.layers["sub-00001 lesion"])


def test_lora_widget_trains_stops_and_resumes(make_napari_viewer, qtbot, tiny_base, phantom_subset, tmp_path):
    from napari_neuromf import _session
    from napari_neuromf._widgets import GenerateWidget, LoRAWidget
    from neuromf.train.checkpoint import checkpoint_paths

    viewer = make_napari_viewer()
    widget = LoRAWidget(viewer)
    assert widget.base.text() == "embedded" and widget.device.itemText(0) == "auto"
    assert str(tmp_path / "neuromf_home") in widget.output.text()  # default output under the user data dir
    widget.config.setCurrentText("demo_lora")
    widget.base.setText(str(tiny_base))
    widget.data.setText(str(phantom_subset))
    widget.strategy.setCurrentText("downsample")
    widget.rank.setValue(2)
    widget.batch_size.setValue(2)
    widget.max_steps.setValue(500)
    widget.preview_every.setValue(2)
    widget.device.setCurrentText("cpu")
    out = tmp_path / "run"
    widget.output.setText(str(out))

    follower = GenerateWidget(viewer)  # open before training: its adapter follows the newest trained one
    widget.start_button.click()
    qtbot.waitUntil(lambda: len(widget.run.losses) >= 3 or not widget.busy, timeout=120_000)
    assert widget.run.failure is None, widget.run.failure
    # the dock redraws at most every REFRESH_S seconds, each time with every step recorded so far
    qtbot.waitUntil(lambda: len(widget.loss_line.get_xdata()) >= 3 or not widget.busy, timeout=60_000)
    assert len(widget.loss_line.get_xdata()) >= 3  # one plot point per step event
    assert list(widget.loss_line.get_xdata()) == [s for s, _ in widget.run.losses][:len(widget.loss_line.get_xdata())]
    assert widget.progress_bar.maximum() == 500 and widget.progress_bar.value() >= 3
    assert "ETA" in widget.progress_bar.format()
    _assert_overlay(viewer.layers["preview 0 FLAIR"], viewer.layers["preview 0 lesion"])

    clicked = time.perf_counter()
    widget.stop_button.click()
    _wait(qtbot, widget, 60)
    assert time.perf_counter() - clicked < 30
    result = widget.run.result
    assert result.stopped and 3 <= result.step < 500
    assert checkpoint_paths(out)[0].is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert _session.STATE.last_adapter == out / "adapter"
    assert follower.adapter.text() == str(out / "adapter")
    assert widget.start_button.isEnabled() and not widget.stop_button.isEnabled()

    stopped_at = result.step
    widget.max_steps.setValue(stopped_at + 2)
    widget.resume_button.click()
    _wait(qtbot, widget, 90)
    assert widget.run.failure is None, widget.run.failure
    assert widget.run.result.step == stopped_at + 2 and not widget.run.result.stopped
    assert [s for s, _ in widget.run.losses] == [stopped_at + 1, stopped_at + 2]

    # starting again into the same folder is refused with the remedy, not an exception
    notes = _notes()
    widget.start_button.click()
    _wait(qtbot, widget, 60)
    assert any("Resume" in m and str(out) in m for m in notes())


def test_lora_widget_bad_settings_notify(make_napari_viewer, tmp_path):
    from napari_neuromf._widgets import LoRAWidget

    widget = LoRAWidget(make_napari_viewer())
    widget.targets.setText("")
    notes = _notes()
    assert widget.start() is None
    assert any("target module" in m for m in notes())
    widget.targets.setText("to_q")
    widget.strategy.setCurrentText("auto")  # no mask test result: neither the config's file nor this session's
    notes = _notes()
    assert widget.start(overrides={"data.mask_test": str(tmp_path / "missing.json")}) is None
    assert any("Mask-VAE test" in m and "missing.json" in m for m in notes())
    widget.strategy.setCurrentText("vae")
    widget.rank.setValue(4)
    notes = _notes()
    assert widget.start(overrides={"lora.dropout": "lots"}) is None  # config validation names the key
    assert any("lora.dropout" in m for m in notes())
    assert not widget.busy


def test_lora_widget_out_of_memory_gives_remedy(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    """A CUDA OOM inside the training generator becomes a notification with the remedy; buttons come back."""
    import torch

    import neuromf.pipelines.lora as pipeline
    from neuromf.train import TrainEvent

    def train_lora(cfg, base_checkpoint="embedded", resume=False, overwrite=False, stop=None, progress=False):
        yield TrainEvent("step", 1, 0, 10, loss=1.0, eta_s=5.0)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    released = []
    monkeypatch.setattr(pipeline, "train_lora", train_lora)
    monkeypatch.setattr(pipeline, "release_memory", lambda: released.append(True))
    from napari_neuromf._widgets import LoRAWidget

    widget = LoRAWidget(make_napari_viewer())
    widget.strategy.setCurrentText("downsample")
    widget.batch_size.setValue(6)
    widget.output.setText(str(tmp_path / "oom"))
    notes = _notes()
    widget.start()
    _wait(qtbot, widget, 30)
    message = next(m for m in notes() if "out of memory" in m)
    assert "batch size (now 6)" in message and "Resume" in message
    assert released and widget.start_button.isEnabled() and len(widget.loss_line.get_xdata()) == 1


def test_generate_widget_adds_pairs_and_saves(make_napari_viewer, qtbot, tiny_adapter, tmp_path):
    from napari_neuromf import _session
    from napari_neuromf._widgets import GenerateWidget

    _session.STATE.last_adapter = tiny_adapter
    viewer = make_napari_viewer()
    widget = GenerateWidget(viewer)
    assert widget.adapter.text() == str(tiny_adapter)  # defaults to the last trained adapter
    widget.n.setValue(2)
    widget.seed.setValue(7)
    widget.device.setCurrentText("cpu")
    notes = _notes()
    widget.start()
    _wait(qtbot, widget, 60)
    assert not [m for m in notes() if "Generation" in m]
    assert [layer.name for layer in viewer.layers] == ["gen_000 FLAIR", "gen_000 lesion", "gen_001 FLAIR",
                                                       "gen_001 lesion"]
    for i in range(2):
        image, lesion = viewer.layers[f"gen_{i:03d} FLAIR"], viewer.layers[f"gen_{i:03d} lesion"]
        _assert_overlay(image, lesion)
        info = image.metadata["neuromf"]
        assert info["seed"] == 7 and info["sample_index"] == i and str(tiny_adapter) in str(info["checkpoint"])

    widget.out_dir.setText(str(tmp_path / "pairs"))
    written = widget.save_pairs()
    assert sorted(p.name for p in written) == ["gen_000_FLAIR.nii.gz", "gen_000_FLAIR_roi.nii.gz",
                                               "gen_001_FLAIR.nii.gz", "gen_001_FLAIR_roi.nii.gz"]
    a, b = nib.load(str(written[0])), nib.load(str(written[1]))
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape == (32, 32, 32)
    assert np.allclose(np.abs(np.diag(a.affine)[:3]), 6.0)

    # a second click numbers the new pairs after the existing ones
    widget.start()
    _wait(qtbot, widget, 60)
    assert "gen_003 lesion" in viewer.layers


def test_generate_widget_missing_adapter_notifies(make_napari_viewer, qtbot, tmp_path):
    from napari_neuromf._widgets import GenerateWidget

    widget = GenerateWidget(make_napari_viewer())
    widget.adapter.setText(str(tmp_path / "nope"))
    notes = _notes()
    assert widget.start() is None
    assert any("nope" in m and "does not exist" in m for m in notes())
    widget.adapter.setText("embedded")
    notes = _notes()
    widget.start()
    _wait(qtbot, widget, 60)
    from neuromf.weights import sample_data_root

    if not (sample_data_root() / "models" / "lora_demo").is_dir():
        assert any("embedded" in m for m in notes())


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


def test_generate_widget_paints_a_lesion_and_generates_a_flair_for_it(make_napari_viewer, qtbot, phantom_subset,
                                                                      tiny_conditional_adapter):
    """The paint-a-lesion workflow: a Labels layer drawn over an opened FLAIR becomes the lesion of a generated
    FLAIR, which comes back on the model grid, overlaid in the same world coordinates as the painted layer."""
    from napari_neuromf._layers import read_layer
    from napari_neuromf._widgets import PRIOR_LESION, GenerateWidget

    viewer = make_napari_viewer()
    flair_path = next((phantom_subset / SUBJECTS[0] / "anat").glob("*_FLAIR.nii.gz"))
    data, state, _ = read_layer(flair_path)
    flair = viewer.add_image(data, **{k: v for k, v in state.items() if k in ("name", "scale", "translate",
                                                                               "metadata")})
    painted = viewer.add_labels(np.zeros(flair.data.shape, dtype=np.uint8), name="painted lesion",
                                scale=flair.scale, translate=flair.translate)
    widget = GenerateWidget(viewer)
    widget.adapter.setText(str(tiny_conditional_adapter))
    widget.mode.setCurrentText("conditional")
    assert widget.lesion.isEnabled() and widget.lesion.findText("painted lesion") >= 0
    widget.lesion.setCurrentText("painted lesion")
    notes = _notes()
    assert widget.start() is None  # nothing painted yet
    assert any("painted lesion" in m and "empty" in m for m in notes())

    # paint a ball of about 2 cm in the middle of the brain with the layer's own brush API
    centre = np.array(flair.data.shape) // 2
    painted.paint(tuple(centre), new_label=1)  # one dab of the default brush
    painted.brush_size = 8
    painted.paint(tuple(centre), new_label=1)
    assert painted.data.any()
    widget.n.setValue(1)
    widget.device.setCurrentText("cpu")
    notes = _notes()
    widget.start()
    _wait(qtbot, widget, 120)
    assert not [m for m in notes() if "Generation" in m], notes()
    image, lesion = viewer.layers["gen_000 FLAIR"], viewer.layers["gen_000 lesion"]
    _assert_overlay(image, lesion)
    assert image.data.shape == (32, 32, 32) and lesion.data.any()
    # the generated lesion sits where it was painted (world coordinates, mm)
    painted_mm = np.argwhere(painted.data).mean(0) * painted.scale + painted.translate
    generated_mm = np.argwhere(lesion.data).mean(0) * lesion.scale + lesion.translate
    assert np.linalg.norm(painted_mm - generated_mm) < 2 * float(np.max(lesion.scale))
    assert image.metadata["neuromf"]["mode"] == "conditional"

    widget.lesion.setCurrentText(PRIOR_LESION)  # no layer: a lesion drawn from the training lesions
    widget.start()
    _wait(qtbot, widget, 120)
    assert viewer.layers["gen_001 lesion"].data.any()
