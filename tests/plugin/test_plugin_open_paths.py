"""Every way a volume reaches the viewer shows it axial, radiological, with R/L A/P letters and a caption that
follows the displayed orientation: File > Open and drag and drop (both through napari's open path and this
plugin's reader), File > Open Sample, the FCD data widget; a left-posterior-superior (LPS) file, and a fresh open
after every layer was removed."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from gui_helpers import data_layers, in_running_gui, notes, ready

SHAPE = (24, 28, 12)


def _lps_case(folder):
    """An LPS-stored FLAIR whose bright blob lies in the patient's RIGHT hemisphere, and its lesion mask.

    Stored LPS: array axis 0 runs toward the patient's Left, axis 1 toward Posterior (affine diag(-2, -2, 2)).
    Returns (image path, mask path, the blob's RAS world position from the file's own affine)."""
    affine = np.diag([-2.0, -2.0, 2.0, 1.0])
    affine[:3, 3] = (24.0, 28.0, -12.0)
    data = np.full(SHAPE, 100.0, dtype=np.float32)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[3:6, 6:9, 4:7] = 1  # low i = patient right (x decreases with i), low j = anterior
    data[mask > 0] = 400.0
    image_path, mask_path = folder / "lps_FLAIR.nii.gz", folder / "lps_FLAIR_roi.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), image_path)
    nib.save(nib.Nifti1Image(mask, affine), mask_path)
    blob = nib.affines.apply_affine(affine, np.argwhere(mask > 0).mean(axis=0))
    return image_path, mask_path, blob


def _letters(viewer):
    from napari_neuromf._viewing import is_view_aid

    found = [layer for layer in viewer.layers if is_view_aid(layer)]
    if not found or not found[0].visible:  # made hidden, shown a turn later
        return {}
    return dict(zip(found[0].features["letter"], np.asarray(found[0].data), strict=True))


def _assert_axial_radiological(viewer, qtbot):
    """Axial, A up, patient R on screen left, caption saying so, letters on the right sides of the volume (placed
    in the next turn of the event loop after an opening)."""
    from napari_neuromf._viewing import AXIAL_ORDER, RADIOLOGICAL, current_convention, is_view_aid

    qtbot.waitUntil(lambda: set(_letters(viewer)) == {"R", "L", "A", "P"}, timeout=10_000)
    assert tuple(viewer.dims.order) == AXIAL_ORDER and tuple(viewer.dims.displayed) == (1, 0)
    assert tuple(map(str, viewer.scene.camera.orientation2d)) == ("up", "left")  # A up; larger R toward screen left
    assert current_convention(viewer) == RADIOLOGICAL
    caption = viewer.canvas.overlays.text
    assert caption.visible and "radiological" in caption.text and "screen left = patient Right (R)" in caption.text
    letters = _letters(viewer)
    assert set(letters) == {"R", "L", "A", "P"}
    assert letters["R"][0] > letters["L"][0] and letters["A"][1] > letters["P"][1]
    assert all(point[2] == viewer.dims.point[2] for point in letters.values())  # on the slice shown
    # the layer controls are a data layer's (napari selects each new layer: the letters came last)
    active = viewer.layers.selection.active
    assert active is not None and not is_view_aid(active), active


def _assert_caption_gone(viewer):
    assert not viewer.canvas.overlays.text.visible and viewer.canvas.overlays.text.text == ""


@pytest.fixture
def viewer(make_napari_viewer, monkeypatch):
    """A viewer, with napari's reader preferences emptied for the test and restored after it."""
    from napari.settings import get_settings

    monkeypatch.setattr(get_settings().plugins, "extension2reader", {})
    return make_napari_viewer()


def test_any_use_of_the_plugin_makes_it_the_nifti_reader_unless_the_user_chose(viewer, monkeypatch):
    from napari.settings import get_settings

    from napari_neuromf._viewing import view_guard

    plugins = get_settings().plugins
    view_guard(viewer)  # what the reader, the samples and every widget do
    assert plugins.extension2reader == {"*.nii": "napari-neuromf", "*.nii.gz": "napari-neuromf"}
    monkeypatch.setattr(plugins, "extension2reader", {"*.nii.gz": "someone-else"})
    from napari_neuromf import _viewing

    monkeypatch.setattr(_viewing, "_guards", type(_viewing._guards)())
    view_guard(viewer)
    assert plugins.extension2reader == {"*.nii.gz": "someone-else", "*.nii": "napari-neuromf"}


def test_file_open_and_drop_show_an_lps_file_axial_radiological(viewer, qtbot, tmp_path):
    from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
    from qtpy.QtGui import QDropEvent

    from napari_neuromf._viewing import prefer_this_reader

    image_path, mask_path, blob = _lps_case(tmp_path)
    prefer_this_reader()  # as after any use of the plugin; a fresh napari asks once which reader to use
    viewer.window._qt_viewer._qt_open([str(image_path)], stack=False)  # what File > Open calls
    image = viewer.layers["lps_FLAIR"]
    _assert_axial_radiological(viewer, qtbot)
    # the displayed world axes against the file's affine: the blob's world position is its RAS position, and it
    # lies on the side of the R letter, i.e. on the screen's left in radiological convention
    found = image.data_to_world(np.argwhere(np.asarray(image.data) > 300).mean(axis=0))
    assert np.allclose(found, blob, atol=1e-3)
    centre = (np.asarray(image.extent.world[0]) + np.asarray(image.extent.world[1])) / 2
    assert (blob[0] - centre[0]) > 0 and (_letters(viewer)["R"][0] - centre[0]) > 0

    mime = QMimeData()  # drag and drop of the mask onto the canvas: the same reader
    mime.setUrls([QUrl.fromLocalFile(str(mask_path))])
    drop = QDropEvent(QPointF(10, 10), Qt.CopyAction, mime, Qt.LeftButton, Qt.NoModifier)
    viewer.window._qt_viewer.dropEvent(drop)
    lesion = viewer.layers["lps_FLAIR_roi"]
    assert lesion.data[tuple(np.round(lesion.world_to_data(blob)).astype(int))] == 1
    _assert_axial_radiological(viewer, qtbot)
    viewer.dims.set_point(2, 40.0)
    assert _letters(viewer)["R"][2] == viewer.dims.point[2]  # the letters follow the slider

    viewer.dims.order = (0, 1, 2)  # the user turns to a sagittal slice: no caption, no letters claim otherwise
    _assert_caption_gone(viewer)
    assert not [layer for layer in viewer.layers if layer.name == "orientation letters"][0].visible

    viewer.layers.select_all()
    viewer.layers.remove_selected()  # everything removed, still sagittal: then another file is opened
    qtbot.waitUntil(lambda: len(viewer.layers) == 0, timeout=5000)
    _assert_caption_gone(viewer)
    nib.save(nib.Nifti1Image(np.ones((10, 12, 14), np.float32), np.eye(4)), tmp_path / "ras.nii.gz")
    viewer.window._qt_viewer._qt_open([str(tmp_path / "ras.nii.gz")], stack=False)
    _assert_axial_radiological(viewer, qtbot)

    viewer.layers.remove("ras")  # only the volume removed: the letters and the caption go with it
    _assert_caption_gone(viewer)
    qtbot.waitUntil(lambda: len(viewer.layers) == 0, timeout=5000)


def _record_insertions(viewer) -> tuple[list, list]:
    """(insertions as (ticks of a 10 ms timer so far, layer name, visible when inserted), the tick counter's
    timer): two insertions with the same tick count came in one stretch of the GUI thread."""
    from qtpy.QtCore import QTimer

    ticks, insertions = [0], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.__setitem__(0, ticks[0] + 1))
    timer.start()
    viewer.layers.events.inserted.connect(
        lambda event: insertions.append((ticks[0], event.value.name, event.value.visible)))
    return insertions, timer


def _opened(viewer) -> bool:
    """Every layer of the openings under way is in, and the letters are shown."""
    from napari_neuromf._opening import adding
    from napari_neuromf._viewing import is_view_aid

    return not adding(viewer) and any(is_view_aid(layer) and layer.visible for layer in viewer.layers)


def test_file_open_in_the_running_app_reads_in_a_worker_and_adds_a_layer_per_turn(viewer, qtbot, tmp_path):
    """In napari's running app (its event loop running), File > Open or a drop of a FLAIR, a broken file and the
    mask returns at once: the files are read in a worker, a notification names the broken one, and the layers
    arrive in the order asked for, each in a turn of the event loop of its own, hidden and shown a turn later;
    the view ends axial radiological, on the lesion."""
    from napari_neuromf._viewing import is_view_aid, prefer_this_reader

    image_path, mask_path, blob = _lps_case(tmp_path)
    broken = tmp_path / "broken_FLAIR.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    prefer_this_reader()
    seen = notes()
    insertions, timer = _record_insertions(viewer)
    editing_when_inserted, letters_shown_while_adding = {}, []

    def inserted(event) -> None:
        from napari_neuromf._opening import EDITING_OVERLAYS, adding

        layer = event.value
        if is_view_aid(layer):  # the letters' first showing: only once the opening's layers are all in
            layer.events.visible.connect(
                lambda _: layer.visible and letters_shown_while_adding.append(adding(viewer)))
        overlays = getattr(layer, "_overlays", {})
        editing_when_inserted[layer.name] = [overlays[name].visible for name in EDITING_OVERLAYS if name in overlays]

    viewer.layers.events.inserted.connect(inserted)
    paths = [str(image_path), str(broken), str(mask_path)]

    def file_open() -> int:
        viewer.window._qt_viewer._qt_open(paths, stack=False)  # what File > Open and a drop call
        return len(viewer.layers)

    returned = in_running_gui(file_open, lambda: _opened(viewer))
    timer.stop()
    assert returned == [0]  # nothing added in the call itself: the layers came in later turns
    assert [layer.name for layer in data_layers(viewer)] == ["lps_FLAIR", "lps_FLAIR_roi"]
    assert all(layer.visible for layer in data_layers(viewer)) and is_view_aid(viewer.layers[-1])
    added = {name: (tick, visible) for tick, name, visible in insertions}
    assert not added["lps_FLAIR"][1] and not added["lps_FLAIR_roi"][1]  # hidden at first
    assert added["lps_FLAIR_roi"][0] > added["lps_FLAIR"][0]  # not in the FLAIR's stretch
    assert any("broken_FLAIR.nii.gz" in message for message in seen()), seen()
    assert viewer.layers["lps_FLAIR"].source.path == str(image_path)  # as napari records a reader's layers
    assert viewer.layers["lps_FLAIR"].source.reader_plugin == "napari-neuromf"
    _assert_axial_radiological(viewer, qtbot)
    lesion = viewer.layers["lps_FLAIR_roi"]
    assert lesion.data[tuple(np.round(lesion.world_to_data(blob)).astype(int))] == 1
    assert np.asarray(lesion.data)[:, :, int(round(lesion.world_to_data(viewer.dims.point)[2]))].any()
    # the lesion's editing overlays (polygon tool, brush outline) came a turn after it: held when it went in, then
    # let in, and napari built their visuals (painting on the lesion works)
    assert editing_when_inserted["lps_FLAIR_roi"] == [False, False]
    _assert_editing_overlays_built(viewer, lesion)
    # shown only after the last layer, in a turn of its own
    assert letters_shown_while_adding and not any(letters_shown_while_adding)
    assert viewer.canvas.overlays.text.box is False  # no caption box to rebuild at each layer change


def _assert_editing_overlays_built(viewer, lesion) -> None:
    from napari_neuromf._opening import EDITING_OVERLAYS

    held = [lesion._overlays[name] for name in EDITING_OVERLAYS]
    assert all(overlay.visible for overlay in held)
    built = viewer.window._qt_viewer.canvas._layer_overlay_to_visual[lesion]  # napari's own record of them
    assert all(overlay in built for overlay in held)


def test_file_open_reads_at_once_while_long_jobs_hold_every_thread_of_the_pool(viewer, qtbot, tmp_path):
    """Long jobs (a generation, a training, a mask test) run in napari workers, which share Qt's global thread pool:
    as many threads as cores, 2 on the target machine. With that many jobs running, File > Open's reading worker
    would wait in the pool's queue until a job ended (minutes); NeuroMF's workers get a thread of their own."""
    import threading

    from napari.qt.threading import create_worker
    from qtpy.QtCore import QThreadPool

    from napari_neuromf._jobs import start_worker
    from napari_neuromf._viewing import prefer_this_reader

    image_path, _, _ = _lps_case(tmp_path)
    release = threading.Event()
    pool = QThreadPool.globalInstance()
    jobs = [start_worker(create_worker(release.wait, 60)) for _ in range(pool.maxThreadCount())]
    try:
        qtbot.waitUntil(lambda: all(job.is_running for job in jobs), timeout=10_000)
        prefer_this_reader()
        in_running_gui(lambda: viewer.window._qt_viewer._qt_open([str(image_path)], stack=False),
                       lambda: _opened(viewer), timeout_s=20)
        assert [layer.name for layer in data_layers(viewer)] == ["lps_FLAIR"]
        assert not release.is_set() and all(job.is_running for job in jobs)  # read while every job still ran
    finally:
        release.set()
        qtbot.waitUntil(lambda: not any(job.is_running for job in jobs), timeout=10_000)


def test_an_unexpected_error_while_reading_is_one_notification_not_an_exception(viewer, qtbot, tmp_path,
                                                                                monkeypatch):
    """A File > Open whose reading fails unexpectedly (not a bad file: those are named by the reader): one error
    notification naming the files, nothing added, and nothing raised into napari's event loop (superqt re-raises
    a worker's errors there unless its error handler is given at creation; pytest-qt fails the test if so)."""
    from napari_neuromf import _reader
    from napari_neuromf._opening import adding
    from napari_neuromf._viewing import prefer_this_reader

    image_path, _, _ = _lps_case(tmp_path)

    def broken_read(paths):
        raise MemoryError("no memory left for the volume")

    monkeypatch.setattr(_reader, "read_files", broken_read)
    prefer_this_reader()
    seen = notes()
    in_running_gui(lambda: viewer.window._qt_viewer._qt_open([str(image_path)], stack=False),
                   lambda: not adding(viewer))
    qtbot.wait(100)
    errors = [message for message in seen() if "unexpected error" in message]
    assert len(errors) == 1 and "lps_FLAIR.nii.gz" in errors[0] and "MemoryError" in errors[0], seen()
    assert data_layers(viewer) == []


def test_a_labels_layer_a_dock_adds_at_once_keeps_its_editing_overlays(viewer):
    """Outside an opening (a dock's preview or reload, added in one go), nothing is held back."""
    from napari_neuromf._helpers import add_layer

    lesion = add_layer(viewer, (np.zeros(SHAPE, np.uint8), {"name": "lesion"}, "labels"))
    _assert_editing_overlays_built(viewer, lesion)


def test_a_script_in_the_running_app_gets_its_layers_at_once(viewer, qtbot, tmp_path):
    """`viewer.open` from code running inside the event loop (a notebook cell, napari's console) is not napari's
    GUI opening a file: it returns the layers, as napari's reader contract has it."""
    image_path, mask_path, _ = _lps_case(tmp_path)
    returned = in_running_gui(lambda: [layer.name for layer in viewer.open([str(image_path), str(mask_path)],
                                                                            plugin="napari-neuromf")],
                              lambda: True)
    assert returned == [["lps_FLAIR", "lps_FLAIR_roi"]]
    assert all(layer.visible for layer in data_layers(viewer))
    _assert_axial_radiological(viewer, qtbot)


def test_a_sample_in_the_running_app_comes_a_layer_per_turn(viewer, qtbot):
    """File > Open Sample in the running app: napari gets the FLAIR only, hidden (a sample must return a layer);
    showing it and the lesion follow in later turns, the lesion above the FLAIR, the view on the lesion."""
    from napari._qt._qplugins._qnpe2 import _add_sample  # what the menu item calls

    insertions, timer = _record_insertions(viewer)

    def open_sample() -> list:
        _add_sample(viewer.window._qt_viewer, "napari-neuromf", "generated_pair")
        return [(layer.name, layer.visible) for layer in viewer.layers]

    returned = in_running_gui(open_sample, lambda: _opened(viewer))
    timer.stop()
    assert returned == [[("gen_000 FLAIR", False)]]
    assert [layer.name for layer in data_layers(viewer)] == ["gen_000 FLAIR", "gen_000 lesion"]
    assert all(layer.visible for layer in data_layers(viewer))
    added = {name: tick for tick, name, _ in insertions}
    assert added["gen_000 lesion"] > added["gen_000 FLAIR"]
    _assert_axial_radiological(viewer, qtbot)
    lesion = viewer.layers["gen_000 lesion"]
    assert np.asarray(lesion.data)[:, :, int(round(lesion.world_to_data(viewer.dims.point)[2]))].any()


def _menu_sample_layer(viewer, key: str):
    """File > Open Sample > NeuroMF > ``key`` as the menu calls it; the layer napari added in its call, and whether it
    held any voxel or a file's record then."""
    from napari._qt._qplugins._qnpe2 import _add_sample

    _add_sample(viewer.window._qt_viewer, "napari-neuromf", key)
    layer = viewer.layers[0]
    return layer, bool(np.asarray(layer.data).any()), "nifti" in layer.metadata


def test_a_sample_is_read_after_napaaris_call_into_the_layer_napari_added(viewer, qtbot):
    """napari's File > Open Sample call adds the sample's first layer as zeros on the recorded grid (hidden): no file
    is read, nor nibabel imported, in the call. That same layer then gets the FLAIR's voxels, contrast and
    metadata, as the sample gives them outside the GUI, and shows; napari's record of its sample source stays."""
    from napari_neuromf import _sample_data

    (added, had_voxels, had_record), = in_running_gui(lambda: _menu_sample_layer(viewer, "generated_pair"),
                                                      lambda: _opened(viewer))
    assert not had_voxels and not had_record
    flair = viewer.layers["gen_000 FLAIR"]
    assert flair is added and flair.visible and viewer.layers.index(flair) == 0
    (data, kwargs, kind), _lesion = _sample_data.generated_pair()  # outside the GUI: the layers, read at once
    assert kind == "image" and flair.data.dtype == data.dtype
    np.testing.assert_array_equal(flair.data, data)
    assert tuple(flair.contrast_limits) == tuple(flair.contrast_limits_range) == kwargs["contrast_limits"]
    assert tuple(flair.scale) == kwargs["scale"] and tuple(flair.translate) == kwargs["translate"]
    assert flair.metadata["neuromf"] == kwargs["metadata"]["neuromf"] and flair.metadata["neuromf"]["seed"] == 0
    assert flair.metadata["nifti"]["canonical_shape"] == kwargs["metadata"]["nifti"]["canonical_shape"]
    assert (flair.source.reader_plugin, flair.source.sample) == (None, ("napari-neuromf", "generated_pair"))
    _assert_axial_radiological(viewer, qtbot)


def test_a_sample_whose_recorded_grid_is_stale_is_shown_as_read(viewer, qtbot, monkeypatch, tmp_path):
    """A grid record that no longer matches the files (samples remade without `record_sample_grids`): the
    placeholder is replaced, in its place, by the layer as read."""
    import json

    from napari_neuromf import _sample_data

    grids = json.loads(_sample_data.GRIDS_FILE.read_text())
    grids["generated_pair"]["shape"] = [90, 96, 96]
    monkeypatch.setattr(_sample_data, "GRIDS_FILE", tmp_path / "grids.json")
    _sample_data.GRIDS_FILE.write_text(json.dumps(grids))
    (added, _, _), = in_running_gui(lambda: _menu_sample_layer(viewer, "generated_pair"), lambda: _opened(viewer))
    assert added.data.shape == (90, 96, 96) and added not in viewer.layers
    assert [layer.name for layer in data_layers(viewer)] == ["gen_000 FLAIR", "gen_000 lesion"]
    assert all(layer.data.shape == (96, 96, 96) and layer.visible for layer in data_layers(viewer))
    assert np.asarray(viewer.layers["gen_000 FLAIR"].data).any()
    _assert_axial_radiological(viewer, qtbot)


def test_a_sample_that_cannot_be_read_leaves_no_layer_and_says_why(viewer, qtbot, monkeypatch, tmp_path):
    """The files of a sample gone after napari added its placeholder: the placeholder goes, and one error
    notification says what is missing and how to make it."""
    from napari_neuromf import _sample_data
    from napari_neuromf._opening import adding

    monkeypatch.setattr(_sample_data, "SAMPLES_DIR", tmp_path)  # the grid record stays: napari adds the placeholder
    shown = notes()
    (added, _, _), = in_running_gui(lambda: _menu_sample_layer(viewer, "generated_pair"),
                                    lambda: not adding(viewer) and not viewer.layers)
    assert added.name == "gen_000 FLAIR"
    errors = [message for message in shown() if "pre-made joint pair is missing" in message]
    assert len(errors) == 1 and "python -m napari_neuromf._make_samples" in errors[0], shown()


def test_a_sample_whose_first_layer_the_user_removed_brings_no_more_layers(viewer, qtbot):
    """The user removes (or clears) the sample's layer napari just added, before its other layers came: the
    sample stops there; its lesion does not appear in the emptied viewer."""
    from napari_neuromf._opening import adding

    def open_then_remove() -> str:
        layer, _, _ = _menu_sample_layer(viewer, "generated_pair")
        viewer.layers.remove(layer)
        return layer.name

    assert in_running_gui(open_then_remove, lambda: not adding(viewer)) == ["gen_000 FLAIR"]
    qtbot.wait(300)
    assert data_layers(viewer) == []


def test_a_first_sample_turns_axial_and_loads_the_caption_glyphs_after_napaaris_insertion(viewer, qtbot):
    """A viewer's first opening (the slowest of a session): the first volume, which napari inserts hidden, is turned
    axial at its opening's next step, before it shows, not inside napari's insertion; the caption shows only once
    all its glyphs and the letters' are in the canvas font (loaded a few per turn), so its first draw rasterizes
    none of them."""
    from napari._qt._qplugins._qnpe2 import _add_sample

    from napari_neuromf._canvas_text import VISPY_LAYOUT_GLYPHS, canvas_font
    from napari_neuromf._viewing import AXIAL_ORDER, VIEW_TEXT

    font = canvas_font(viewer)
    needed = set(VIEW_TEXT + VISPY_LAYOUT_GLYPHS) - {"\n"}
    seen: dict = {}
    caption = viewer.canvas.overlays.text
    caption.events.visible.connect(lambda visible: seen.setdefault("missing when the caption showed",
                                                                   needed - set(font._glyphs)) if visible else None)

    def open_sample() -> tuple:
        _add_sample(viewer.window._qt_viewer, "napari-neuromf", "fcd_phantom_case")
        flair = viewer.layers[0]
        flair.events.visible.connect(lambda _: seen.setdefault("order when shown", tuple(viewer.dims.order)))
        return tuple(viewer.dims.order), len(needed - set(font._glyphs))

    returned = in_running_gui(open_sample, lambda: _opened(viewer) and caption.visible)
    order_after_insertion, missing_after_insertion = returned[0]
    assert order_after_insertion != AXIAL_ORDER  # napari's insertion left the view as napari made it
    assert missing_after_insertion > 10  # glyphs still to load after napari's insertion (a fresh viewer's font)
    assert seen["order when shown"] == AXIAL_ORDER
    assert seen["missing when the caption showed"] == set()
    _assert_axial_radiological(viewer, qtbot)


def _sliders_shown(viewer) -> list[int]:
    return [axis for axis, widget in enumerate(viewer.window._qt_viewer.dims.slider_widgets) if not widget.isHidden()]


def test_a_viewer_emptied_of_its_volumes_is_ready_for_the_next(viewer, qtbot):
    """After every layer is removed, the viewer turns axial with three dims (its slice slider shown, no caption) a
    turn later, so napari's insertion of the next sample's first layer neither changes the dims' count (napari
    builds a slider per axis then) nor shows a slider (the canvas would be resized and redrawn in the same call);
    the sample still ends axial radiological with its letters. A 2D image added to the emptied viewer gets napari's
    own view (axes in order, the camera's default orientation), not a flipped one."""
    from napari._qt._qplugins._qnpe2 import _add_sample
    from napari.components.camera import Camera

    from napari_neuromf._viewing import AXIAL_ORDER

    viewer.layers.clear()  # never showed a volume of ours: napari's empty 2D viewer is left alone
    qtbot.wait(100)
    assert viewer.dims.ndim == 2

    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    _assert_axial_radiological(viewer, qtbot)
    viewer.layers.clear()
    qtbot.waitUntil(lambda: viewer.dims.ndim == 3, timeout=5000)
    assert tuple(viewer.dims.order) == AXIAL_ORDER and _sliders_shown(viewer) == [2]  # the superior axis's
    _assert_caption_gone(viewer)

    dims_changes = []
    viewer.dims.events.ndim.connect(lambda event: dims_changes.append(event.value))
    in_running_gui(lambda: _add_sample(viewer.window._qt_viewer, "napari-neuromf", "generated_pair"),
                   lambda: _opened(viewer))
    assert dims_changes == []
    _assert_axial_radiological(viewer, qtbot)
    assert _sliders_shown(viewer) == [2] and viewer.dims.nsteps[2] > 3  # now over the pair's slices

    viewer.layers.clear()
    qtbot.waitUntil(lambda: viewer.dims.ndim == 3, timeout=5000)
    viewer.add_image(np.zeros((20, 30), np.float32), name="photo")
    assert viewer.dims.ndim == 2 and tuple(viewer.dims.order) == (0, 1)
    assert tuple(viewer.scene.camera.orientation) == tuple(Camera().orientation)
    _assert_caption_gone(viewer)


def test_a_viewer_closed_right_after_it_was_emptied_is_left_alone(make_napari_viewer, qtbot):
    """The turn that readies an emptied viewer comes after ``Viewer.close`` (which removes the layers, then the
    window): it does nothing to the closed viewer."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    qtbot.waitUntil(lambda: len(_letters(viewer)) == 4, timeout=10_000)
    viewer.close()
    qtbot.wait(200)
    assert viewer.dims.ndim == 2 and len(viewer.layers) == 0


def test_a_viewer_closed_while_a_sample_opens_in_turns_gets_nothing_more(make_napari_viewer, qtbot):
    """File > Open Sample in the running app, then the window closed before the sample's later layers came: the
    opening stops (napari's closed dims raised when a layer was added), no error, nothing left queued."""
    from napari._qt._qplugins._qnpe2 import _add_sample
    from qtpy.QtCore import QTimer

    from napari_neuromf._opening import adding

    viewer = make_napari_viewer(show=True)
    done: list = []

    def open_then_close() -> bool:
        QTimer.singleShot(0, viewer.close)  # right after the menu's call, before the opening's next step
        _add_sample(viewer.window._qt_viewer, "napari-neuromf", "fcd_phantom_case")
        done.append(adding(viewer))
        return True

    in_running_gui(open_then_close, lambda: bool(done))
    assert done == [True]  # the sample's other steps were queued when the window closed
    # the files are read in a worker (a loaded machine may take a while); its arrival finds the window closed
    qtbot.waitUntil(lambda: not adding(viewer), timeout=20_000)
    qtbot.wait(200)  # the turn a further step would have taken
    assert not adding(viewer) and len(viewer.layers) == 0


def test_a_window_closed_during_file_open_gets_no_layers_and_no_error(make_napari_viewer, qtbot, tmp_path):
    """File > Open, and the window closed while napari's own progress bar for the opening lets events in (inside
    napari's call, before NeuroMF's reader runs): the reader finds no viewer to open into and returns napari's null
    layer, so napari adds nothing to the closed viewer (it raised in napari's closed dims widget)."""
    from qtpy.QtCore import QTimer

    from napari_neuromf._viewing import prefer_this_reader

    viewer = make_napari_viewer(show=True)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 24, 24), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    prefer_this_reader()
    done: list = []

    def open_then_close() -> bool:
        QTimer.singleShot(0, viewer.close)  # runs at the first event napari's progress bar lets in
        viewer.window._qt_viewer._qt_open([str(path)], stack=False)
        done.append(True)
        return True

    in_running_gui(open_then_close, lambda: bool(done))
    qtbot.wait(300)
    assert done == [True] and len(viewer.layers) == 0


def test_letters_the_guard_hid_come_back_but_letters_a_user_hid_stay_hidden(viewer, qtbot):
    """A sagittal turn hides the letters and the axial view brings them back; letters hidden by the user (the
    layer's eye) stay hidden through zooms, slices, a sagittal turn and back, and a further opening."""
    from napari_neuromf._viewing import MARKERS_NAME, RADIOLOGICAL, show_axial

    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    _assert_axial_radiological(viewer, qtbot)
    letters = viewer.layers[MARKERS_NAME]
    viewer.dims.order = (0, 1, 2)
    qtbot.waitUntil(lambda: not letters.visible, timeout=5000)
    show_axial(viewer, RADIOLOGICAL)
    qtbot.waitUntil(lambda: letters.visible, timeout=5000)

    letters.visible = False  # the user clicks the letters' eye
    viewer.camera.zoom *= 1.5
    viewer.dims.set_point(2, viewer.dims.point[2] + 4)
    viewer.dims.order = (0, 1, 2)
    show_axial(viewer, RADIOLOGICAL)
    viewer.open_sample("napari-neuromf", "generated_pair")
    qtbot.wait(400)
    assert MARKERS_NAME in viewer.layers and not viewer.layers[MARKERS_NAME].visible
    assert viewer.canvas.overlays.text.visible  # the caption is not the user's to hide this way


def test_open_sample_shows_the_lesion_axial_radiological(viewer, qtbot):
    viewer.dims.order = (0, 1, 2)  # a viewer left sagittal before
    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    _assert_axial_radiological(viewer, qtbot)
    lesion = next(layer for layer in viewer.layers if layer.name.endswith("lesion"))
    slice_index = int(round(lesion.world_to_data(viewer.dims.point)[2]))
    assert np.asarray(lesion.data)[:, :, slice_index].any()  # the slice shown crosses the lesion


def test_a_sample_pair_opened_over_a_scan_on_another_grid_is_shown_alone(viewer, qtbot):
    """File > Open Sample of a generated pair over a scan on another grid (the 3 mm phantom case; the pair is on the
    2 mm model grid): the scan is hidden, not removed, a note says so, the view is fitted to the pair at its
    lesion's slice. A second sample on the pair's grid hides nothing more."""
    from napari_neuromf._viewing import is_ras_volume, same_grid, view_guard

    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    _assert_axial_radiological(viewer, qtbot)
    scans = [layer for layer in viewer.layers if is_ras_volume(layer)]
    viewer.open_sample("napari-neuromf", "generated_pair")
    image = next(layer for layer in viewer.layers if layer.name.endswith("FLAIR") and layer not in scans)
    lesion = next(layer for layer in viewer.layers if layer.name.endswith("lesion") and layer not in scans)
    qtbot.waitUntil(lambda: not any(layer.visible for layer in scans), timeout=10_000)
    assert all(layer in viewer.layers for layer in scans) and image.visible and lesion.visible
    assert not same_grid(scans[0], image)
    note = view_guard(viewer).alone_note
    assert image.name.split()[0] in note and f"hidden, not removed: {scans[0].name}" in note
    slice_index = int(round(lesion.world_to_data(viewer.dims.point)[2]))
    assert np.asarray(lesion.data)[:, :, slice_index].any()  # at the pair's lesion
    pair_centre = np.asarray(image.extent.world).mean(axis=0)
    assert np.allclose(viewer.scene.camera.center[-2:], pair_centre[list(viewer.dims.displayed)], atol=1e-3)
    view_guard(viewer).alone_note = None
    viewer.open_sample("napari-neuromf", "conditional_pair")  # the model's grid too: nothing more to hide
    qtbot.waitUntil(lambda: set(_letters(viewer)) == {"R", "L", "A", "P"}, timeout=10_000)
    qtbot.wait(200)
    assert image.visible and view_guard(viewer).alone_note is None


def test_a_pair_shown_alone_before_the_scans_turn_keeps_its_view_and_the_users_zoom(viewer, qtbot):
    """A pair shown alone (as the Generate dock shows its pairs) before the event loop had its turn after the scan
    opened just before it (a loaded machine; CI met it): the scan's pending fit must neither undo the pair's view
    nor a zoom the user made since."""
    from napari_neuromf._viewing import LETTERS_DELAY_MS, is_ras_volume, show_alone

    viewer.open_sample("napari-neuromf", "fcd_phantom_case")  # no turn of the event loop: its fit still pending
    scans = [layer for layer in viewer.layers if is_ras_volume(layer)]
    viewer.open_sample("napari-neuromf", "generated_pair")
    pair = [layer for layer in viewer.layers if is_ras_volume(layer) and layer not in scans]
    assert show_alone(viewer, pair) == [layer.name for layer in scans if layer.name in viewer.layers]
    pair_centre = np.asarray(pair[0].extent.world).mean(axis=0)[list(viewer.dims.displayed)]
    zoom = viewer.scene.camera.zoom * 2  # the user zooms in on the pair
    viewer.scene.camera.zoom = zoom
    qtbot.waitUntil(lambda: set(_letters(viewer)) == {"R", "L", "A", "P"}, timeout=10_000)
    qtbot.wait(4 * LETTERS_DELAY_MS)
    assert viewer.scene.camera.zoom == pytest.approx(zoom)
    assert np.allclose(viewer.scene.camera.center[-2:], pair_centre, atol=1e-3)
    assert not any(layer.visible for layer in scans) and all(layer.visible for layer in pair)


def test_rechoosing_radiological_restores_it(viewer, qtbot, phantom_subset):
    from napari_neuromf._data_widget import FCDDataWidget
    from napari_neuromf._viewing import NEUROLOGICAL, ORIENTATIONS

    widget = ready(qtbot, FCDDataWidget(viewer))
    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    viewer.scene.camera.orientation = ORIENTATIONS[NEUROLOGICAL]  # flipped by hand (napari's own buttons)
    assert "neurological" in viewer.canvas.overlays.text.text  # the caption follows what is displayed
    assert widget.convention.currentText() == "Radiological"
    widget.convention.activated.emit(widget.convention.currentIndex())  # the user picks Radiological again
    _assert_axial_radiological(viewer, qtbot)


def _letters_on_screen(viewer):
    """Canvas pixel positions (x, y) of the letters, through vispy's own transform of the letters' visual."""
    from napari_neuromf._viewing import is_view_aid

    markers = next(layer for layer in viewer.layers if is_view_aid(layer))
    node = viewer.window._qt_viewer.canvas.layer_to_visual[markers].node
    points = np.asarray(markers.data)[:, list(viewer.dims.displayed)][:, ::-1]  # (x, y) = (horizontal, vertical)
    pixels = node.get_transform("visual", "canvas").map(points)[:, :2]
    return dict(zip(markers.features["letter"], pixels, strict=True))


def _letters_inside_canvas(viewer, half_letter: float = 8.0) -> bool:
    """Every letter (16 px text, centred on its point) wholly inside the canvas."""
    height, width = viewer.canvas.size
    return all(half_letter <= x <= width - half_letter and half_letter <= y <= height - half_letter
               for x, y in _letters_on_screen(viewer).values())


def test_letters_stay_inside_the_canvas_when_a_dock_narrows_it_and_under_zoom(make_napari_viewer, qtbot, tmp_path):
    """Open a volume wider (R-L) than deep, then dock a wide widget: the canvas narrows, the view (still the one
    fitted at the opening) is fitted again and the R/L letters stay on screen; after the user zooms in, the view is
    theirs (not refitted) and the letters move to the visible canvas's edges, still R on the left."""
    from qtpy.QtWidgets import QWidget

    from napari_neuromf._viewing import MARKER_MARGIN_PX, prefer_this_reader

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1200, 900)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((96, 80, 40), dtype=np.float32),
                             np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "wide.nii.gz")
    prefer_this_reader()
    viewer.window._qt_viewer._qt_open([str(tmp_path / "wide.nii.gz")], stack=False)
    _assert_axial_radiological(viewer, qtbot)
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    width, zoom = viewer.canvas.size[1], viewer.scene.camera.zoom

    dock = QWidget()
    dock.setMinimumWidth(int(width * 0.6))
    viewer.window.add_dock_widget(dock, area="right", name="a wide dock")
    qtbot.waitUntil(lambda: viewer.canvas.size[1] < 0.6 * width, timeout=5000)
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    assert viewer.scene.camera.zoom < zoom  # fitted again: the whole image is on the narrower canvas
    on_screen = _letters_on_screen(viewer)
    assert on_screen["R"][0] < on_screen["L"][0] and on_screen["A"][1] < on_screen["P"][1]  # radiological, A up

    viewer.scene.camera.zoom *= 4  # the user zooms in: the image now overflows the canvas on every side
    narrow = viewer.canvas.size
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    on_screen = _letters_on_screen(viewer)
    assert on_screen["R"][0] == pytest.approx(MARKER_MARGIN_PX, abs=1.0)  # at the visible edge, not the image's
    assert on_screen["L"][0] == pytest.approx(narrow[1] - MARKER_MARGIN_PX, abs=1.0)
    viewer.scene.camera.center = (0.0, *(np.asarray(viewer.scene.camera.center[1:]) + 30.0))  # and pans
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    zoomed = viewer.scene.camera.zoom
    viewer.window.remove_dock_widget(dock)  # the canvas widens again: the user's zoom stays
    qtbot.waitUntil(lambda: viewer.canvas.size[1] > narrow[1], timeout=5000)
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    assert viewer.scene.camera.zoom == pytest.approx(zoomed)


def test_only_the_letters_are_drawn_not_their_points(make_napari_viewer, qtbot, tmp_path):
    """The letters' Points layer draws its text only: no marker (a grey ring beside the L, where the glyph does not
    cover its point) on the rendered canvas around any letter."""
    from napari_neuromf._viewing import prefer_this_reader

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(900, 800)
    volume = np.zeros((60, 60, 30), dtype=np.float32)
    volume[20:40, 20:40, 10:20] = 1.0  # a bright block in the middle; black where the letters sit
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "block.nii.gz")
    prefer_this_reader()
    viewer.window._qt_viewer._qt_open([str(tmp_path / "block.nii.gz")], stack=False)
    _assert_axial_radiological(viewer, qtbot)
    qtbot.waitUntil(lambda: _letters_inside_canvas(viewer), timeout=5000)
    qtbot.wait(300)  # a draw after the letters were shown
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    scale = shot.shape[1] / viewer.canvas.size[1]
    grey = (np.abs(shot[..., 0] - shot[..., 2]) < 15) & (shot[..., 0] > 40)  # not black, not yellow text
    yellow = (shot[..., 0] > 150) & (shot[..., 1] > 150) & (shot[..., 2] < 100)
    for letter, (x, y) in _letters_on_screen(viewer).items():
        rows = slice(int((y - 14) * scale), int((y + 14) * scale))
        cols = slice(int((x - 14) * scale), int((x + 14) * scale))
        assert yellow[rows, cols].sum() > 10, f"letter {letter} not drawn where its point is"
        assert grey[rows, cols].sum() == 0, f"a marker drawn beside the letter {letter}"


EXIT_SCRIPT = """
import sys, time
from pathlib import Path
import napari
from napari_neuromf._opening import open_in_turns

viewer = napari.Viewer(show=False)
marker = Path(sys.argv[1])

def read():
    time.sleep(1.0)
    marker.write_text("read")
    return [], []

open_in_turns(viewer, read, "a slow file")
print("exiting", flush=True)
"""


def _run_exiting(script: str, marker, tmp_path):
    """Run ``script`` (given ``marker``'s path) in a fresh Python that exits while its worker runs; it must exit
    cleanly, without a worker emitting into deleted Qt objects."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, str(marker)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NEUROMF_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exiting" in done.stdout and "has been deleted" not in done.stderr


def test_python_exiting_while_a_file_is_read_waits_for_the_worker_instead_of_aborting(tmp_path):
    """napari closed (the script ends) while a NeuroMF worker still runs: Python's exit waits for it; before, the
    worker emitted into Qt objects PyQt had already deleted and the process aborted (exit code 134)."""
    marker = tmp_path / "read.txt"
    _run_exiting(EXIT_SCRIPT, marker, tmp_path)
    assert marker.read_text() == "read"  # the worker ran to its end


STOP_SCRIPT = """
import sys, threading, time
from pathlib import Path
import napari
from napari.qt.threading import create_worker
from napari_neuromf._jobs import start_worker

viewer = napari.Viewer(show=False)
marker, stop = Path(sys.argv[1]), threading.Event()

def long_job():  # a generation between two network steps: it looks at its stop flag, not at the worker
    for _ in range(1200):
        if stop.wait(0.05):
            marker.write_text("stopped")
            return 0
    marker.write_text("ran to its end")
    return 1

start_worker(create_worker(long_job), stop)
time.sleep(0.3)
print("exiting", flush=True)
"""


def test_python_exiting_during_a_long_job_sets_its_stop_flag_and_waits_for_it(tmp_path):
    """A job that would run a minute more (napari closed mid-generation): Python's exit sets the job's own stop
    flag, so it ends at its next step, and the process exits cleanly well inside the exit's wait."""
    import time

    marker = tmp_path / "job.txt"
    started = time.monotonic()
    _run_exiting(STOP_SCRIPT, marker, tmp_path)
    assert marker.read_text() == "stopped" and time.monotonic() - started < 55
