"""Data discovery and checks on real (tiny) NIfTI files: ds004199 BIDS quirks, flat folders, bad masks."""

from __future__ import annotations

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


def test_bids_roi_without_image(bids_tree: Path) -> None:
    _mask(bids_tree / "sub-00009" / "anat" / "sub-00009_acq-x_FLAIR_roi.nii.gz")
    with pytest.raises(DataError, match=r"sub-00009_acq-x_FLAIR_roi\.nii\.gz.*without a FLAIR image"):
        _discover_quietly(bids_tree)


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
    with pytest.raises(DataError, match=r"z_FLAIR_roi\.nii\.gz.*without a matching FLAIR"):
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
