"""Three orthogonal views, latent-encoding progress in the LoRA dock, the mask test on open layers, and whole tab
titles when the four docks are tabbed (real napari viewer, under Xvfb)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
from gui_helpers import case_files, ready, tiny_lora_run, wait_idle

pytestmark = pytest.mark.gui

TITLES = ("FCD data", "Mask-VAE test", "LoRA fine-tuning", "Generate")  # napari.yaml display names


def _open_case(qtbot, widget, folder: Path):
    widget.folder.setText(str(folder))
    widget.scan()
    wait_idle(qtbot, widget)
    widget.table.selectRow(0)
    widget.load_selected()
    wait_idle(qtbot, widget)
    return widget.viewer.layers["sub-00001 FLAIR"], widget.viewer.layers["sub-00001 lesion"]


def test_three_orthogonal_views_share_the_point_and_follow_the_layers(make_napari_viewer, qtbot, phantom_subset):
    from napari.qt import QtViewer

    from napari_neuromf._data_widget import FCDDataWidget
    from napari_neuromf._ortho_views import CORONAL, SAGITTAL
    from napari_neuromf._viewing import NEUROLOGICAL

    viewer = make_napari_viewer()
    widget = ready(qtbot, FCDDataWidget(viewer))
    image, lesion = _open_case(qtbot, widget, phantom_subset)
    widget.three_views.setChecked(True)
    ortho = widget.ortho
    assert ortho is not None and ortho.dock is not None and ortho.dock.widget() is ortho
    assert "Orthogonal views" in viewer.window.dock_widgets
    coronal, sagittal = ortho.models[CORONAL], ortho.models[SAGITTAL]
    views = {"axial": viewer, "coronal": coronal, "sagittal": sagittal}
    # each view slices along a different RAS axis (S, A, R) and shows the other two
    sliced = {name: tuple(v.dims.not_displayed) for name, v in views.items()}
    assert sliced == {"axial": (2,), "coronal": (1,), "sagittal": (0,)}
    assert {name: tuple(v.dims.displayed) for name, v in views.items()} == {
        "axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
    # radiological: the patient's right on the screen's left (axial, coronal); superior up; sagittal anterior left
    assert tuple(map(str, coronal.scene.camera.orientation2d)) == ("up", "left")
    assert tuple(map(str, sagittal.scene.camera.orientation2d)) == ("up", "left")
    assert "Coronal · radiological" in coronal.canvas.overlays.text.text
    assert "Sagittal" in sagittal.canvas.overlays.text.text and sagittal.canvas.overlays.text.visible
    # the same layers, on the same data arrays
    for model in (coronal, sagittal):
        assert [layer.name for layer in model.layers] == [layer.name for layer in viewer.layers]
        assert model.layers["sub-00001 FLAIR"].data is image.data
    # one current point: the lesion's axial slice in the main view, moved by a slider in any view
    assert np.allclose(coronal.dims.point, viewer.dims.point) and np.allclose(sagittal.dims.point, viewer.dims.point)
    lo, hi = viewer.dims.range[1].start, viewer.dims.range[1].stop
    coronal.dims.set_point(1, lo + 0.25 * (hi - lo))  # the coronal slider (A) moves the crossing point
    assert viewer.dims.point[1] == pytest.approx(coronal.dims.point[1])
    assert sagittal.dims.point[1] == pytest.approx(coronal.dims.point[1])
    viewer.dims.set_point(2, viewer.dims.range[2].start)
    assert coronal.dims.point[2] == pytest.approx(viewer.dims.point[2]) == sagittal.dims.point[2]
    # display properties follow the main view
    image.contrast_limits = (0.0, 0.5)
    assert coronal.layers["sub-00001 FLAIR"].contrast_limits == sagittal.layers["sub-00001 FLAIR"].contrast_limits \
        == [0.0, 0.5]
    widget.convention.setCurrentText(NEUROLOGICAL.capitalize())
    assert tuple(map(str, coronal.scene.camera.orientation2d)) == ("up", "right")
    assert tuple(map(str, viewer.scene.camera.orientation2d)) == ("up", "right")

    # a layer added afterwards (a painted lesion, a generated pair) appears in every view; removed, it goes
    painted = viewer.add_labels(np.zeros(image.data.shape, dtype=np.uint8), name="painted", scale=image.scale,
                                translate=image.translate)
    assert all(model.layers[-1].name == "painted" and model.layers[-1].data is painted.data
               for model in (coronal, sagittal))
    viewer.layers.remove(painted)
    assert all("painted" not in model.layers for model in (coronal, sagittal))

    # turning it off removes the dock and both extra canvases
    widget.three_views.setChecked(False)
    assert widget.ortho is None and "Orthogonal views" not in viewer.window.dock_widgets
    assert len(coronal.layers) == len(sagittal.layers) == 0
    viewer.add_image(np.zeros((4, 4, 4)), name="after")  # nothing mirrors any more, nothing fails
    del ortho, coronal, sagittal, views
    qtbot.wait(50)
    gc.collect()
    assert len(QtViewer._instances) == 1  # only the main viewer's

    # closing the dock with its own button is the same as turning the option off
    widget.three_views.setChecked(True)
    assert len(widget.ortho.models[CORONAL].layers) == len(viewer.layers)
    viewer.window.remove_dock_widget(widget.ortho.dock)
    assert widget.ortho is None and not widget.three_views.isChecked()


def test_lora_dock_counts_the_cases_encoded_before_training(make_napari_viewer, qtbot, tiny_base, phantom_subset,
                                                            tmp_path):
    from napari_neuromf._lora_widget import LoRAWidget

    widget = ready(qtbot, LoRAWidget(make_napari_viewer()))
    widget.config.setCurrentText("joint_3mm")
    tiny_lora_run(widget, tiny_base, phantom_subset, tmp_path / "run", max_steps=2)
    widget.start_button.click()
    shown: list[tuple[str | None, str, str]] = []  # what the dock shows after each event
    widget.worker.yielded.connect(lambda event: shown.append((getattr(event, "kind", None),
                                                              widget.progress_bar.text(), widget.job.status.text())))
    wait_idle(qtbot, widget, 180)
    assert widget.run.failure is None, widget.run.failure
    encoding = [(text, status) for kind, text, status in shown if kind == "encoding"]
    assert [text.split("  ·  ")[0] for text, _ in encoding] == [f"Encoding latents: {i} / 3 cases" for i in (1, 2, 3)]
    assert all("ETA" in text for text, _ in encoding)
    assert "Encoding the training cases into latents: 1/3" in encoding[0][1]
    assert "All 3 training cases encoded" in encoding[-1][1]
    kinds = [kind for kind, _, _ in shown]
    first_step = kinds.index("step")
    assert first_step > max(i for i, kind in enumerate(kinds) if kind == "encoding")  # encoding, then training
    assert shown[first_step][1].startswith("1 / 2 steps") and "ETA" in shown[first_step][1]
    assert widget.run.result.step == 2


def test_mask_test_on_open_layers_matches_the_backend(make_napari_viewer, qtbot, phantom_subset, tiny_base, tmp_path):
    """The layer mode writes nothing into the data folder or the result file, and its Dice values are the ones the
    backend computes for the same scan and mask."""
    from napari_neuromf import _mask_test_run, _state
    from napari_neuromf._helpers import add_layer
    from napari_neuromf._layers import case_layers
    from napari_neuromf._mask_test_widget import LAYERS, MaskTestWidget
    from neuromf.data.mask_codec import downsample_mask, upsample_mask
    from neuromf.eval.mask_test import vae_round_trip
    from neuromf.eval.metrics import dice
    from neuromf.io.nifti import preprocess_pair
    from neuromf.vae import MAISIVAEWrapper

    viewer = make_napari_viewer()
    image_path, mask_path = case_files(phantom_subset)
    for layer_tuple in case_layers(image_path, mask_path, "sub-00001")[0]:
        add_layer(viewer, layer_tuple)
    before = {p: p.stat().st_mtime_ns for p in phantom_subset.rglob("*")}
    widget = ready(qtbot, MaskTestWidget(viewer))
    vae_dir = tiny_base.parent / "vae_tiny"
    widget.vae_source.setCurrentIndex(1)
    widget.vae_file.setText(str(vae_dir))
    widget.output.setText(str(tmp_path / "not_written.json"))
    widget.source.setCurrentText(LAYERS)
    assert not widget.folder.isEnabled() and not widget.output.isEnabled() and widget.image_layer.native.isEnabled()
    widget.image_layer.value = viewer.layers["sub-00001 FLAIR"]
    widget.labels_layer.value = viewer.layers["sub-00001 lesion"]

    widget.start()
    assert widget.busy and widget.job.cancel_button.isEnabled()  # in a worker, with Cancel
    wait_idle(qtbot, widget, 120)
    assert widget.run.failure is None, widget.run.failure
    assert widget.table.rowCount() == 1 and len(widget.run.rows) == 1
    assert widget.job.bar.text().startswith("1 / 1 cases")

    vae = MAISIVAEWrapper.resolve(str(vae_dir))
    _, mask = preprocess_pair(image_path, mask_path, _mask_test_run.preprocessing_for(vae))
    m = mask.data
    expected_vae = dice(vae_round_trip(m, vae, 0.5).numpy(), m.numpy())
    expected_max = dice(upsample_mask(downsample_mask(m[None], "max"), 0.5)[0].numpy(), m.numpy())
    row = widget.run.rows[0]
    assert row["dice_vae"] == pytest.approx(expected_vae, abs=1e-6)
    assert row["dice_downsample"]["max"] == pytest.approx(expected_max, abs=1e-6) and expected_max > 0.1
    assert widget.table.item(0, 2).text() == f"{expected_vae:.2f}"
    assert widget.table.item(0, 6).text() == f"{expected_max:.2f}"
    assert "This lesion" in widget.recommendation.text()
    # nothing written into the user's data or the result file, nothing remembered for strategy 'auto'
    assert {p: p.stat().st_mtime_ns for p in phantom_subset.rglob("*")} == before
    assert not (tmp_path / "not_written.json").exists() and _state.STATE.last_mask_test is None

    # the round-tripped mask overlays the open layers
    widget.table.selectRow(0)
    widget.show_reconstruction()
    wait_idle(qtbot, widget, 60)
    from napari_neuromf._mask_test_run import encoding_label
    from neuromf.eval.mask_test import recommended_encoding

    label = encoding_label(*recommended_encoding(widget.run.result))
    recon = viewer.layers[f"{widget.run.rows[0]['id']} lesion ({label})"]
    assert recon.data.shape == tuple(m.shape[1:])

    # an empty lesion is reported in the widget's words, naming the layers (not the scratch folder)
    empty = viewer.add_labels(np.zeros_like(widget.labels_layer.value.data), name="empty",
                              scale=widget.labels_layer.value.scale, translate=widget.labels_layer.value.translate)
    widget.labels_layer.value = empty
    widget.start()
    wait_idle(qtbot, widget, 120)
    status = widget.job.status.text()
    assert widget.run.failure is not None and "'sub-00001 FLAIR' + 'empty'" in status, status
    assert "neuromf_mask_test_" not in status and widget.job.bar.text() == "failed"

    # a labels layer on another grid is refused before anything runs
    viewer.add_labels(np.zeros((5, 5, 5), dtype=np.uint8), name="elsewhere")
    widget.labels_layer.value = viewer.layers["elsewhere"]
    assert widget.start() is None and "not one case" in widget.job.status.text()


def test_tabbed_docks_show_their_whole_titles(make_napari_viewer, qtbot):
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QTabBar

    viewer = make_napari_viewer(show=True)
    docks = {}
    for title in TITLES:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-neuromf", title, tabify=True)
        docks[title] = (dock, ready(qtbot, widget))
    window = docks[TITLES[0]][0].window()
    window.resize(1600, 1000)

    def bar_with_our_tabs():
        for bar in window.findChildren(QTabBar, options=Qt.FindDirectChildrenOnly):
            if set(TITLES) <= {bar.tabText(i) for i in range(bar.count())}:
                return bar
        return None

    qtbot.waitUntil(lambda: bar_with_our_tabs() is not None, timeout=5000)
    qtbot.wait(100)  # the resize reaches the dock area
    bar = bar_with_our_tabs()
    assert bar.elideMode() == Qt.ElideNone and bar.usesScrollButtons()
    metrics = bar.fontMetrics()
    for i in range(bar.count()):
        text = bar.tabText(i)
        assert text in TITLES and docks[text][0].windowTitle() == text
        assert bar.tabRect(i).width() >= metrics.horizontalAdvance(text), (text, bar.tabRect(i).width())
