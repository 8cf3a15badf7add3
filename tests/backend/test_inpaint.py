"""Inpainting a lesion into a real healthy scan (tiny conditional adapter, phantom scans on disk): the scan is kept
exactly beyond the margin, the lesion region changes, the input grid comes back, bad inputs are refused with
nothing written, progress counts network calls and a stop ends the run within one call."""

from __future__ import annotations

import json
import threading

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from testkit import adapter_copy, write_nifti

from neuromf.cli import main as cli
from neuromf.generation.inpaint import existing_lesion_masks


@pytest.fixture(scope="module")
def scans(phantom_dir):
    """A healthy phantom scan and a real phantom lesion mask on the same grid."""
    from neuromf.io.bids import discover_cases

    healthy = discover_cases(phantom_dir, group="hc")[0].image
    lesion = next(c for c in discover_cases(phantom_dir, group="fcd") if c.mask is not None).mask
    return healthy, lesion


@pytest.fixture(scope="module")
def cond(conditional_run):
    from neuromf.generation.conditional import load_conditional_model

    return load_conditional_model(conditional_run.export)


def _distance_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_edt(mask == 0, sampling=np.linalg.norm(affine[:3, :3], axis=0))


def test_inpainting_keeps_the_scan_beyond_the_margin_and_changes_the_lesion(conditional_run, scans, tmp_path):
    healthy, lesion = scans
    before = healthy.read_bytes()
    out = tmp_path / "out"
    assert cli(["generate", "--mode", "inpaint", "--adapter", str(conditional_run.export), "--image", str(healthy),
                "--mask", str(lesion), "--steps", "2", "--margin-mm", "12", "--out", str(out),
                "--device", "cpu"]) == 0
    source, flair, mask = nib.load(healthy), nib.load(out / "sample_000_flair.nii.gz"), \
        nib.load(out / "sample_000_mask.nii.gz")
    assert flair.shape == source.shape and mask.shape == source.shape
    assert np.array_equal(flair.affine, source.affine) and np.array_equal(mask.affine, source.affine)
    assert flair.get_data_dtype() == source.get_data_dtype()
    a, b = np.asanyarray(source.dataobj), np.asanyarray(flair.dataobj)
    m = np.asanyarray(mask.dataobj)
    assert np.array_equal(m > 0, np.asanyarray(nib.load(lesion).dataobj) > 0.5)
    far = _distance_mm(m, source.affine) > 12.0
    assert far.sum() > 0.9 * m.size and np.array_equal(a[far], b[far])  # stored values, bit for bit
    changed = a != b
    assert changed[m > 0].any() and changed[~far].sum() >= m.sum()  # the lesion's neighbourhood is generated
    info = json.loads((out / "sample_000.json").read_text())
    assert info["mode"] == "inpaint" and info["margin_mm"] == 12.0 and info["lesion_cm3"] > 0
    assert info["network_calls"] == 2 and info["guidance"] == 1.0  # a sidecar without inpaint_guidance: unguided
    assert info["source_image"] == str(healthy)
    assert healthy.read_bytes() == before  # the input is never modified


def test_prior_lesions_of_one_run_form_one_folder(conditional_run, scans, tmp_path):
    """`--n 2` without a mask: two prior lesions, each from its own seed, recorded as one run (the run's seed and
    the lesion's), so `evaluate` and `benchmark-downstream` accept the folder."""
    from neuromf.eval.metrics import check_one_run

    out = tmp_path / "prior"
    assert cli(["generate", "--mode", "inpaint", "--adapter", str(conditional_run.export), "--image", str(scans[0]),
                "--n", "2", "--seed", "7", "--steps", "1", "--out", str(out), "--device", "cpu"]) == 0
    records = [json.loads((out / f"sample_{i:03d}.json").read_text()) for i in range(2)]
    assert [(r["seed"], r["lesion_seed"], r["mask_source"]) for r in records] == [(7, 7, "prior"), (7, 8, "prior")]
    check_one_run(out, sorted(out.glob("sample_*")))  # raises on a mixed folder


def test_the_adapters_inpaint_guidance_is_the_default_and_an_explicit_guidance_overrides_it(conditional_run, scans,
                                                                                            tmp_path):
    """A sidecar's `inpaint_guidance` is the mask guidance inpainting samples with when none is given; --guidance
    overrides it; a sidecar without it inpaints at its `guidance`, as before the field existed (the plain adapter's
    CLI run above: guidance 1, one network call per step)."""
    from neuromf.models.adapter_meta import AdapterMeta

    healthy, lesion = scans
    plain = conditional_run.export
    tuned = adapter_copy(plain, tmp_path / "tuned", inpaint_guidance=1.5)
    older = adapter_copy(plain, tmp_path / "older", guidance=1.25)
    assert AdapterMeta.load(plain).inpaint_guidance_scale() == 1.0
    assert AdapterMeta.load(older).inpaint_guidance_scale() == 1.25 == AdapterMeta.load(older).guidance_scale()
    assert AdapterMeta.load(tuned).guidance_scale() == 1.0  # conditional generation keeps the adapter's guidance

    def inpaint(*options: str) -> dict:
        out = tmp_path / f"out_{len(list(tmp_path.glob('out_*')))}"
        assert cli(["generate", "--mode", "inpaint", "--adapter", str(tuned), "--image", str(healthy), "--mask",
                    str(lesion), "--steps", "1", "--out", str(out), "--device", "cpu", *options]) == 0
        return json.loads((out / "sample_000.json").read_text())

    by_field = inpaint()
    assert (by_field["guidance"], by_field["network_calls"]) == (1.5, 2)  # sampled guided: two calls per step
    overridden = inpaint("--guidance", "1")
    assert (overridden["guidance"], overridden["network_calls"]) == (1.0, 1)


def test_array_input_progress_cancel_and_a_mask_on_another_grid(cond, scans):
    from neuromf import InpaintCancelled, inpaint_lesion

    healthy, lesion = scans
    img = nib.load(healthy)
    image, affine = np.asarray(img.dataobj, dtype=np.float32), img.affine
    mask = np.asarray(nib.load(lesion).dataobj) > 0.5
    fine = np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2).astype(np.uint8)  # a 2x finer grid, same place
    fine_affine = affine @ np.array([[0.5, 0, 0, -0.25], [0, 0.5, 0, -0.25], [0, 0, 0.5, -0.25], [0, 0, 0, 1]])
    calls = []
    result = inpaint_lesion(image, fine, cond, affine=affine, steps=3, guidance=2.0, margin_mm=12.0,
                            on_step=lambda i, n: calls.append((i, n)), mask_affine=fine_affine)
    assert calls == [(i, 6) for i in range(1, 7)] and result.info["network_calls"] == 6  # guidance: 2 per step
    assert np.array_equal(result.mask, mask.astype(np.uint8)) and np.array_equal(result.affine, affine)
    assert result.image.shape == image.shape and result.image.dtype == image.dtype
    assert result.image.min() >= image.min()  # never below the scan's own background
    far = _distance_mm(result.mask, affine) > 12.0
    assert np.array_equal(result.image[far], image[far])

    stop, seen = threading.Event(), []

    def cancel_after_first(i: int, n: int) -> None:
        seen.append(i)
        stop.set()

    with pytest.raises(InpaintCancelled):
        inpaint_lesion(image, mask, cond, affine=affine, steps=4, on_step=cancel_after_first, stop=stop)
    assert seen == [1]  # the stop is honoured before the next network call


def _refused(args: list[str], out, capsys) -> str:
    assert cli(args + ["--out", str(out), "--device", "cpu", "--steps", "1"]) == 2
    assert not out.exists()  # nothing written
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_are_refused_with_nothing_written(conditional_run, scans, phantom_dir, tmp_path, capsys):
    from neuromf.io.bids import discover_cases

    healthy, lesion = scans
    img = nib.load(healthy)
    base = ["generate", "--mode", "inpaint", "--adapter", str(conditional_run.export), "--image", str(healthy)]
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(img.shape, np.uint8), img.affine)
    assert "empty.nii.gz: the lesion mask is empty" in _refused(base + ["--mask", str(empty)], tmp_path / "a", capsys)

    corner = np.zeros(img.shape, np.uint8)
    corner[:2, :2, :2] = 1  # background, far from the head
    outside = write_nifti(tmp_path / "outside.nii.gz", corner, img.affine)
    err = _refused(base + ["--mask", str(outside)], tmp_path / "b", capsys)
    assert "outside.nii.gz" in err and "outside the brain" in err

    elsewhere = img.affine.copy()
    elsewhere[:3, 3] += 1000.0  # a mask of another scan's space: no overlap
    shifted = write_nifti(tmp_path / "shifted.nii.gz", np.asarray(nib.load(lesion).dataobj), elsewhere)
    err = _refused(base + ["--mask", str(shifted)], tmp_path / "c", capsys)
    assert "shifted.nii.gz" in err and "do not overlap" in err

    patient = next(c for c in discover_cases(phantom_dir, group="fcd") if c.mask is not None)
    err = _refused(["generate", "--mode", "inpaint", "--adapter", str(conditional_run.export), "--image",
                    str(patient.image), "--mask", str(lesion)], tmp_path / "d", capsys)
    assert str(patient.image) in err and "already has a lesion mask" in err


def test_existing_lesion_masks_skips_brain_masks(tmp_path):
    """A healthy scan beside its brain-extraction mask is not a patient's; a subject name holding "mask" does not
    make every sibling a mask; a lesion stored beside the scan is found."""
    def touch(name):
        (tmp_path / name).write_bytes(b"")
        return tmp_path / name

    scan = touch("sub-01_FLAIR.nii.gz")
    touch("sub-01_desc-brain_mask.nii.gz")
    touch("sub-01_T1w.nii.gz")
    touch("sub-02_FLAIR_roi.nii.gz")  # another subject's
    assert existing_lesion_masks(scan) == []
    roi = touch("sub-01_FLAIR_roi.nii.gz")
    assert existing_lesion_masks(scan) == [roi]
    flat = touch("floatmask_FLAIR.nii.gz")
    touch("floatmask_T2w.nii.gz")
    assert existing_lesion_masks(flat) == []
    lesion = touch("floatmask_lesion.nii.gz")
    assert existing_lesion_masks(flat) == [lesion]
