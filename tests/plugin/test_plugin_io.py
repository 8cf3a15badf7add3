"""napari plugin I/O: manifest, NIfTI reader/writer round trips, bad files as notifications, sample data.

Reader/writer tests run without a viewer; the rest use napari's `make_napari_viewer` (run under Xvfb).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from gui_helpers import data_layers, notes
from napari.layers import Image, Labels

from napari_neuromf._layers import is_mask_name, layer_tuple, read_layer
from napari_neuromf._reader import napari_get_reader
from napari_neuromf._writer import write_image, write_labels

AFFINES = {
    "ras": np.array([[1.0, 0, 0, -10], [0, 1.2, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]]),
    "lps": np.array([[-0.9, 0, 0, 90], [0, -0.9, 0, 120], [0, 0, 1.5, -60], [0, 0, 0, 1]]),
    "pil": np.array([[0, 0, -2.0, 30], [-1.0, 0, 0, 40], [0, -1.5, 0, 50], [0, 0, 0, 1]]),
}


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _volume(dtype=np.int16, shape=(6, 7, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 900, shape).astype(dtype)


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_reader_writer_round_trip_is_exact(tmp_path, orientation):
    affine = AFFINES[orientation]
    image = _save(tmp_path / f"{orientation}_FLAIR.nii.gz", _volume(), affine)
    mask_data = (_volume(np.uint8, seed=1) > 800).astype(np.uint8)
    mask = _save(tmp_path / f"{orientation}_FLAIR_roi.nii.gz", mask_data, affine)

    reader = napari_get_reader(str(image))
    assert reader is not None and napari_get_reader(str(tmp_path / "x.tif")) is None
    (img_data, img_meta, img_kind), (msk_data, msk_meta, msk_kind) = reader([str(image), str(mask)])
    assert img_kind == "image" and msk_kind == "labels"
    assert np.issubdtype(msk_data.dtype, np.integer)
    # image and mask overlay: same shape, scale and translate; canonical (RAS) voxel sizes as scale
    assert img_data.shape == msk_data.shape
    assert img_meta["scale"] == msk_meta["scale"] and img_meta["translate"] == msk_meta["translate"]
    zooms = sorted(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).round(4))
    assert sorted(np.round(img_meta["scale"], 4)) == zooms
    assert nib.aff2axcodes(img_meta["metadata"]["nifti"]["canonical_affine"]) == ("R", "A", "S")
    assert img_meta["metadata"]["nifti"]["path"] == str(image)

    out_img = write_image(str(tmp_path / "out" / "image"), img_data, img_meta)
    out_msk = write_labels(str(tmp_path / "out" / "mask.nii.gz"), msk_data, msk_meta)
    assert out_img == [str(tmp_path / "out" / "image.nii.gz")]
    for original, written in ((image, out_img[0]), (mask, out_msk[0])):
        a, b = nib.load(str(original)), nib.load(written)
        assert np.array_equal(a.affine, b.affine)
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        assert a.get_data_dtype() == b.get_data_dtype()
        assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(affine)


def test_mask_detection_by_name_and_values(tmp_path):
    assert all(is_mask_name(n) for n in ("a_roi.nii.gz", "brainmask.nii", "x_seg.nii.gz", "Labels.nii"))
    assert not is_mask_name("sub-1_FLAIR.nii.gz")
    binary = _save(tmp_path / "plain.nii.gz", (_volume() > 450).astype(np.int16), np.eye(4))
    assert read_layer(binary)[2] == "labels"  # integer data with two values
    fractional = _save(tmp_path / "prob_mask.nii.gz", np.random.default_rng(0).random((4, 4, 4)), np.eye(4))
    assert read_layer(fractional)[2] == "image"  # a probability map is not a Labels layer
    # a skull-stripped scan named "masked", stored as integers like most clinical scans: many values, an image
    scan = np.random.default_rng(1).integers(0, 3000, (24, 24, 24)).astype(np.int16)
    assert read_layer(_save(tmp_path / "sub-1_FLAIR_brain_masked.nii.gz", scan, np.eye(4)))[2] == "image"
    labels = np.random.default_rng(2).integers(0, 40, (24, 24, 24)).astype(np.int16)  # a 40-label segmentation
    assert read_layer(_save(tmp_path / "sub-1_aseg.nii.gz", labels, np.eye(4)))[2] == "labels"


def test_in_memory_layers_written_without_source_file(tmp_path):
    """A generated volume (no file behind it) keeps its grid: the writer uses the stored model-grid affine."""
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-94.5, -94.5, -94.5)
    data, meta, kind = layer_tuple((_volume(np.uint8) > 450).astype(np.uint8), affine, "gen lesion", "labels")
    written = write_labels(str(tmp_path / "gen.nii.gz"), data, meta)
    back = nib.load(written[0])
    assert kind == "labels" and np.array_equal(back.affine, affine)
    assert np.array_equal(np.asanyarray(back.dataobj), data)


@pytest.mark.gui
def test_bad_files_give_notifications_not_exceptions(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    corrupt = tmp_path / "corrupt_FLAIR.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    four_d = _save(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 4, 3), np.float32), np.eye(4))
    truncated = tmp_path / "truncated.nii"
    _save(truncated, _volume(), np.eye(4))
    truncated.write_bytes(truncated.read_bytes()[:600])

    for path, expected in ((corrupt, "not a readable NIfTI"), (four_d, "expected a 3D volume"),
                           (truncated, "not a readable NIfTI")):
        seen = notes()
        viewer.open(str(path), plugin="napari-neuromf")  # must not raise
        messages = seen()
        assert any(path.name in m and expected in m for m in messages), messages
    assert len(viewer.layers) == 0

    # a good file still opens through the same reader, as Image + Labels
    image = _save(tmp_path / "ok_FLAIR.nii.gz", _volume(), AFFINES["lps"])
    _save(tmp_path / "ok_FLAIR_roi.nii.gz", (_volume(seed=2) > 800).astype(np.uint8), AFFINES["lps"])
    viewer.open([str(image), str(tmp_path / "ok_FLAIR_roi.nii.gz")], plugin="napari-neuromf")
    assert [type(layer) for layer in data_layers(viewer)] == [Image, Labels]


@pytest.mark.gui
def test_mismatched_pair_gives_notification(make_napari_viewer, qtbot, tmp_path):
    from napari_neuromf._data_widget import FCDDataWidget
    from neuromf.io.bids import Case

    viewer = make_napari_viewer()
    widget = FCDDataWidget(viewer)
    image = _save(tmp_path / "a_FLAIR.nii.gz", _volume(), np.eye(4))
    wrong_shape = _save(tmp_path / "a_FLAIR_roi.nii.gz", np.zeros((5, 5, 5), np.uint8), np.eye(4))
    seen = notes()
    widget.load_case(Case("a", image, wrong_shape, "fcd", "train"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert [layer.name for layer in data_layers(viewer)] == ["a FLAIR"]  # the image loads, the bad mask does not
    assert any("a_FLAIR_roi.nii.gz" in m and "shape" in m for m in seen())

    shifted = _save(tmp_path / "b_FLAIR_roi.nii.gz", np.zeros((6, 7, 8), np.uint8), np.diag([2.0, 1, 1, 1]))
    seen = notes()
    widget.load_case(Case("b", image, shifted, "fcd", "train"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    assert any("b_FLAIR_roi.nii.gz" in m and "affine" in m for m in seen())

    # registering open layers whose grids differ is refused with a notification
    drawn = viewer.add_labels(np.zeros((6, 7, 8), np.uint8), name="drawn", scale=(2, 2, 2))
    widget.image_layer.value = viewer.layers["a FLAIR"]
    widget.labels_layer.value = drawn
    seen = notes()
    assert widget.register_open_layers() is None
    assert any("grids differ" in m for m in seen())


@pytest.mark.gui
def test_sample_data_and_widgets_from_manifest(make_napari_viewer):
    """All four widgets open through the manifest; File > Open Sample lists both samples; the phantom loads."""
    from npe2 import PluginManager

    viewer = make_napari_viewer()
    manifest = PluginManager.instance().get_manifest("napari-neuromf")
    assert {s.display_name for s in manifest.contributions.sample_data} == {
        "FCD phantom case", "Generated pair", "Generated FLAIR for a lesion (conditional)"}
    names = [w.display_name for w in manifest.contributions.widgets]
    assert names == ["FCD data", "Mask-VAE test", "LoRA fine-tuning", "Generate"]
    for name in names:
        dock, widget = viewer.window.add_plugin_dock_widget("napari-neuromf", name)
        assert widget is not None

    viewer.open_sample("napari-neuromf", "fcd_phantom_case")
    image, lesion = data_layers(viewer)
    assert isinstance(image, Image) and isinstance(lesion, Labels)
    assert image.data.shape == lesion.data.shape
    assert tuple(image.scale) == tuple(lesion.scale) and tuple(image.translate) == tuple(lesion.translate)
    assert lesion.data.max() == 1 and lesion.opacity == pytest.approx(0.5)


# the generated-pair samples (pre-made files, no freeze): tests/plugin/test_plugin_samples.py
