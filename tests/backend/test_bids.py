"""Data discovery and checks on real (tiny) NIfTI files: ds004199 BIDS quirks, flat folders, bad masks."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neuromf.io.bids import (
    Case,
    DataError,
    case_report,
    discover_cases,
    format_case_table,
    is_2d_image,
    is_thick_slice_2d,
    load_mask_array,
    validate_case,
)

SHAPE = (8, 8, 8)


def _write(path: Path, data: np.ndarray, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _image(path: Path, zooms: tuple[float, float, float] = (1.0, 1.0, 1.0), shape=SHAPE) -> Path:
    return _write(path, np.full(shape, 100, dtype=np.int16), zooms)


def _mask(path: Path, values: tuple[int, ...] = (0, 1), zooms=(1.0, 1.0, 1.0), shape=SHAPE) -> Path:
    data = np.full(shape, values[0], dtype=np.uint8)
    for i, v in enumerate(values[1:]):
        data[2 + i, 2:4, 2:4] = v
    return _write(path, data, zooms)


@pytest.fixture()
def bids_tree(tmp_path: Path) -> Path:
    """ds004199-like tree: ROI acq label differs, a control, a 2D-only patient, an isotropic 3 mm patient."""
    root = tmp_path / "bids"
    anat = root / "sub-00001" / "anat"
    _image(anat / "sub-00001_acq-T2sel_FLAIR.nii.gz")
    _mask(anat / "sub-00001_acq-T2cor_FLAIR_roi.nii.gz")
    _image(root / "sub-00002" / "anat" / "sub-00002_acq-T2sel_FLAIR.nii.gz")  # control: no ROI
    anat = root / "sub-00003" / "anat"
    _image(anat / "sub-00003_acq-tse2D_FLAIR.nii.gz", zooms=(0.45, 0.45, 4.0))  # thick-slice 2D only
    _mask(anat / "sub-00003_acq-tse2D_FLAIR_roi.nii.gz", zooms=(0.45, 0.45, 4.0))
    anat = root / "sub-00004" / "anat"
    _image(anat / "sub-00004_acq-phantom_FLAIR.nii.gz", zooms=(3.0, 3.0, 3.0))  # isotropic 3 mm: keep
    _mask(anat / "sub-00004_acq-phantom_FLAIR_roi.nii.gz", zooms=(3.0, 3.0, 3.0))
    (root / "participants.tsv").write_text(
        "participant_id\tage\tgroup\tsplit\n"
        "sub-00001\t20\tFCD\ttest\n"
        "sub-00002\t31\tHC\ttrain\n"
        "sub-00003\t25\tfcd\ttrain\n"
        "sub-00004\tn/a\tfcd\ttrain\n"
    )
    (root / "README.md").write_text("# test data set\n")
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}\n')
    return root


def _discover_quietly(root: Path, **kwargs) -> list[Case]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return discover_cases(root, **kwargs)


def test_bids_quirks(bids_tree: Path) -> None:
    with pytest.warns(UserWarning, match=r"sub-00003_acq-tse2D_FLAIR\.nii\.gz.*thick-slice 2D"):
        cases = discover_cases(bids_tree)
    by_id = {c.case_id: c for c in cases}
    assert sorted(by_id) == ["sub-00001", "sub-00002", "sub-00004"]
    first = by_id["sub-00001"]
    assert first.image.name == "sub-00001_acq-T2sel_FLAIR.nii.gz"
    assert first.mask is not None and first.mask.name == "sub-00001_acq-T2cor_FLAIR_roi.nii.gz"
    assert (first.group, first.split) == ("fcd", "test")
    control = by_id["sub-00002"]
    assert (control.mask, control.group, control.split) == (None, "hc", "train")
    assert by_id["sub-00004"].mask is not None and not by_id["sub-00004"].problems
    assert all(validate_case(c)["usable"] for c in cases)


def test_bids_filters(bids_tree: Path) -> None:
    fcd = _discover_quietly(bids_tree, group="fcd")
    assert [c.case_id for c in fcd] == ["sub-00001", "sub-00004"] and all(c.mask for c in fcd)
    assert [c.case_id for c in _discover_quietly(bids_tree, group="hc")] == ["sub-00002"]
    assert [c.case_id for c in _discover_quietly(bids_tree, split="test")] == ["sub-00001"]
    assert len(_discover_quietly(bids_tree, require_mask=True)) == 2
    with pytest.raises(DataError, match="no cases match"):
        _discover_quietly(bids_tree, group="hc", split="test")


def test_bids_prefers_3d_flair_over_2d(bids_tree: Path) -> None:
    anat = bids_tree / "sub-00003" / "anat"
    _image(anat / "sub-00003_acq-3D_FLAIR.nii.gz")
    case = {c.case_id: c for c in discover_cases(bids_tree)}["sub-00003"]  # no warning: a 3D image exists
    assert case.image.name == "sub-00003_acq-3D_FLAIR.nii.gz"
    assert any("thick-slice 2D" in p for p in case.problems)


def test_bids_roi_without_image_is_a_problem_row(bids_tree: Path) -> None:
    """One orphan ROI skips its subject (a problem row, or a warning naming the file), not the whole tree."""
    _mask(bids_tree / "sub-00009" / "anat" / "sub-00009_acq-x_FLAIR_roi.nii.gz")
    skipped: list[dict] = []
    cases = _discover_quietly(bids_tree, skipped=skipped)
    assert [c.case_id for c in cases] == ["sub-00001", "sub-00002", "sub-00004"]
    assert [r["id"] for r in skipped] == ["sub-00009"] and skipped[0]["usable"] is False
    assert re.search(r"sub-00009_acq-x_FLAIR_roi\.nii\.gz: lesion ROI without a FLAIR image", skipped[0]["problems"][0])
    with pytest.warns(UserWarning, match=r"sub-00009_acq-x_FLAIR_roi\.nii\.gz.*without a FLAIR image"):
        assert len(discover_cases(bids_tree)) == 3
    assert "UNUSABLE" in format_case_table(skipped)


def test_2d_image_is_a_problem_row_not_a_crash(bids_tree: Path) -> None:
    """A 2D FLAIR (two axes, or a single slice) has no third voxel size: it is skipped, never an IndexError."""
    _write(bids_tree / "sub-00005" / "anat" / "sub-00005_FLAIR.nii.gz", np.ones((8, 8), np.int16))
    _write(bids_tree / "sub-00006" / "anat" / "sub-00006_FLAIR.nii.gz", np.ones((8, 8, 1), np.int16))
    _write(bids_tree / "sub-00001" / "anat" / "sub-00001_acq-x_FLAIR.nii.gz", np.ones((8, 8), np.int16))
    skipped: list[dict] = []
    cases = {c.case_id: c for c in _discover_quietly(bids_tree, skipped=skipped)}
    assert sorted(cases) == ["sub-00001", "sub-00002", "sub-00004"]
    assert [r["id"] for r in skipped] == ["sub-00005", "sub-00006"]
    assert all("2D image" in r["problems"][0] for r in skipped)
    assert "sub-00005_FLAIR.nii.gz" in skipped[0]["problems"][0]
    # a subject with a 3D FLAIR keeps it and notes the extra 2D file
    assert any("sub-00001_acq-x_FLAIR.nii.gz: 2D image" in p for p in cases["sub-00001"].problems)
    assert not is_thick_slice_2d((1.0, 1.0))
    assert is_2d_image((8, 8)) and is_2d_image((8, 1, 8)) and not is_2d_image((8, 8, 8))


def test_flat_2d_image_and_broken_link(tmp_path: Path) -> None:
    _image(tmp_path / "a_FLAIR.nii.gz")
    _write(tmp_path / "b_FLAIR.nii.gz", np.ones((8, 8), np.int16))
    (tmp_path / "c_FLAIR.nii.gz").symlink_to(tmp_path / "c_FLAIR.nii.gz")  # a link to itself: a loop
    skipped: list[dict] = []
    assert [c.case_id for c in discover_cases(tmp_path, skipped=skipped)] == ["a"]
    problems = {r["id"]: r["problems"][0] for r in skipped}
    assert "2D image" in problems["b"] and "looping symbolic link" in problems["c"]


def test_thick_slice_rule_uses_anisotropy() -> None:
    assert is_thick_slice_2d((0.45, 0.45, 4.0))
    assert is_thick_slice_2d((0.9, 3.5, 0.9))
    assert not is_thick_slice_2d((3.0, 3.0, 3.0))
    assert not is_thick_slice_2d((1.0, 1.0, 1.2))


def test_flat_folder_pairing(tmp_path: Path) -> None:
    _image(tmp_path / "a_FLAIR.nii.gz")
    _mask(tmp_path / "a_FLAIR_roi.nii.gz")
    _image(tmp_path / "b_FLAIR.nii")
    _mask(tmp_path / "b_lesion_mask.nii.gz")
    _image(tmp_path / "c_FLAIR.nii.gz")  # no partner
    _image(tmp_path / "sub-1_FLAIR.nii.gz")
    _image(tmp_path / "sub-10_FLAIR.nii.gz")
    _mask(tmp_path / "sub-10_roi.nii.gz")  # must not pair with sub-1
    (tmp_path / "notes.txt").write_text("ignored")
    cases = {c.case_id: c for c in discover_cases(tmp_path)}
    assert sorted(cases) == ["a", "b", "c", "sub-1", "sub-10"]
    assert cases["a"].mask.name == "a_FLAIR_roi.nii.gz" and cases["a"].group == "fcd"
    assert cases["b"].mask.name == "b_lesion_mask.nii.gz"
    assert cases["c"].mask is None and cases["c"].group == "unknown" and cases["c"].split == "unknown"
    assert cases["sub-1"].mask is None and cases["sub-10"].mask.name == "sub-10_roi.nii.gz"
    assert [c.case_id for c in discover_cases(tmp_path, group="fcd")] == ["a", "b", "sub-10"]


def test_flat_roi_without_image(tmp_path: Path) -> None:
    _image(tmp_path / "a_FLAIR.nii.gz")
    _mask(tmp_path / "z_FLAIR_roi.nii.gz")
    skipped: list[dict] = []
    assert [c.case_id for c in discover_cases(tmp_path, skipped=skipped)] == ["a"]
    assert re.search(r"z_FLAIR_roi\.nii\.gz: lesion mask without a matching FLAIR", skipped[0]["problems"][0])
    (tmp_path / "a_FLAIR.nii.gz").unlink()
    with pytest.raises(DataError, match=r"no cases found.*z_FLAIR_roi\.nii\.gz: lesion mask without"):
        discover_cases(tmp_path)


def test_missing_and_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        discover_cases(tmp_path / "nope")
    with pytest.raises(DataError, match=r"no cases found.*_FLAIR"):
        discover_cases(tmp_path)


def test_shape_and_affine_mismatch_are_unusable(tmp_path: Path) -> None:
    image = _image(tmp_path / "a_FLAIR.nii.gz")
    report = validate_case(
        Case("a", image, _mask(tmp_path / "a_roi.nii.gz", shape=(8, 8, 7)), "fcd", "train")
    )
    assert (
        not report["usable"] and "shape" in report["problems"][0] and "a_roi.nii.gz" in report["problems"][0]
    )
    shifted = _mask(tmp_path / "b_roi.nii.gz", zooms=(1.0, 1.0, 1.01))
    report = validate_case(Case("a", image, shifted, "fcd", "train"))
    assert not report["usable"] and "affine" in report["problems"][0]
    assert validate_case(Case("a", image, shifted, "fcd", "train"), atol=0.1)["usable"]


def test_three_valued_mask_is_an_error(tmp_path: Path) -> None:
    mask = _mask(tmp_path / "a_roi.nii.gz", values=(0, 1, 2))
    with pytest.raises(DataError, match=r"a_roi\.nii\.gz.*3 distinct values"):
        load_mask_array(mask)
    report = validate_case(Case("a", _image(tmp_path / "a_FLAIR.nii.gz"), mask, "fcd", "train"))
    assert not report["usable"] and "3 distinct values" in report["problems"][0]


def test_two_valued_mask_is_binarised_with_warning(tmp_path: Path) -> None:
    mask = _mask(tmp_path / "a_roi.nii.gz", values=(0, 255))
    with pytest.warns(UserWarning, match=r"a_roi\.nii\.gz.*binarised"):
        array = load_mask_array(mask)
    assert array.dtype == np.uint8 and set(np.unique(array)) == {0, 1} and array.sum() == 4
    report = validate_case(Case("a", _image(tmp_path / "a_FLAIR.nii.gz"), mask, "fcd", "train"))
    assert report["usable"] and "binarised" in report["problems"][0]
    assert report["lesion_cm3"] == pytest.approx(4 / 1000)


def test_truncated_and_non_finite_images_are_unusable(tmp_path: Path) -> None:
    """validate_case reads the voxel data: a readable header over truncated or NaN/Inf data is unusable."""
    full = _write(tmp_path / "a_FLAIR.nii", np.ones(SHAPE, np.float32))
    truncated = tmp_path / "b_FLAIR.nii"
    truncated.write_bytes(full.read_bytes()[:600])
    report = validate_case(Case("b", truncated, None, "hc", "train"))
    assert not report["usable"] and "b_FLAIR.nii: cannot read image data" in report["problems"][0]
    assert report["shape"] == SHAPE  # the header alone still reads
    for name, value in (("c", np.nan), ("d", np.inf)):
        data = np.ones(SHAPE, np.float32)
        data[1, 2, 3] = value
        report = validate_case(Case(name, _write(tmp_path / f"{name}_FLAIR.nii.gz", data), None, "hc", "train"))
        assert not report["usable"]
        assert f"{name}_FLAIR.nii.gz: image contains 1 NaN or infinite" in report["problems"][0]


def test_empty_mask_is_unusable(tmp_path: Path) -> None:
    mask = _mask(tmp_path / "a_roi.nii.gz", values=(0,))
    report = validate_case(Case("a", _image(tmp_path / "a_FLAIR.nii.gz"), mask, "fcd", "train"))
    assert not report["usable"] and "empty mask" in report["problems"][0] and report["lesion_cm3"] == 0


def test_case_table(bids_tree: Path) -> None:
    rows = [case_report(c) for c in _discover_quietly(bids_tree)]
    rows.append({"id": "broken", "group": "fcd", "split": "test", "problems": ["bad"], "usable": False})
    table = format_case_table(rows).splitlines()
    assert table[0].split()[:4] == ["id", "group", "split", "shape"]
    assert len(table) == 2 + len(rows)
    assert "8x8x8" in table[2] and "1.00x1.00x1.00" in table[2]
    assert table[2].index("fcd") == table[0].index("group")  # fixed-width columns
    assert table[-1].endswith("UNUSABLE: bad")
    assert "-" in table[3].split()  # control: no lesion volume
