"""Data discovery and checks on real (tiny) NIfTI files: ds004199 BIDS quirks, flat folders, bad masks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
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
    data = np.full(shape, 100, dtype=np.int16)
    data.flat[0] = 20  # not constant: a constant image has no brain and is refused
    return _write(path, data, zooms)


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


def test_thick_slice_only_subject_is_an_unusable_row_in_check_data(bids_tree: Path, capsys) -> None:
    """Issue 10: a subject whose only FLAIR is a thick-slice 2D acquisition was only a warning; check-data now
    lists it as an unusable row with the reason in plain words (and exits 1), like the other broken subjects."""
    from neuromf.cli import main

    skipped: list[dict] = []
    cases = discover_cases(bids_tree, skipped=skipped)
    assert [c.case_id for c in cases] == ["sub-00001", "sub-00002", "sub-00004"]
    (row,) = skipped
    assert (row["id"], row["group"], row["split"], row["usable"]) == ("sub-00003", "fcd", "train", False)
    assert row["problems"] == ["sub-00003_acq-tse2D_FLAIR.nii.gz: thick-slice 2D FLAIR (0.45x0.45x4.00 mm voxels), "
                               "not a 3D acquisition: its slices are too thick to use as a volume; a 3D FLAIR of "
                               "this subject is needed; skipped"]
    assert main(["check-data", str(bids_tree)]) == 1
    out, err = capsys.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("sub-00003"))
    assert "UNUSABLE: sub-00003_acq-tse2D_FLAIR.nii.gz: thick-slice 2D FLAIR" in line
    assert "4 cases (2 with lesion masks), 1 unusable" in out and "unusable: sub-00003" in err
    assert "warning" not in err  # a row, not a warning
    # the same rule in a flat folder
    flat = bids_tree.parent / "flat"
    _image(flat / "a_FLAIR.nii.gz")
    _image(flat / "b_FLAIR.nii.gz", zooms=(1.0, 5.0, 1.0))
    _mask(flat / "b_roi.nii.gz", zooms=(1.0, 5.0, 1.0))
    skipped = []
    assert [c.case_id for c in discover_cases(flat, skipped=skipped)] == ["a"]
    assert [(r["id"], r["group"]) for r in skipped] == [("b", "fcd")]
    assert "b_FLAIR.nii.gz: thick-slice 2D FLAIR (1.00x5.00x1.00 mm voxels)" in skipped[0]["problems"][0]


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
    rows = {r["id"]: r for r in skipped}
    assert sorted(rows) == ["sub-00003", "sub-00009"] and rows["sub-00009"]["usable"] is False
    assert re.search(r"sub-00009_acq-x_FLAIR_roi\.nii\.gz: lesion ROI without a FLAIR image",
                     rows["sub-00009"]["problems"][0])
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
    skipped = [r for r in skipped if r["id"] != "sub-00003"]  # thick-slice 2D: see test_thick_slice_...
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


# --------------------------------------------------------------------------------------------- the field's tools
def _pybids_flairs(root: Path) -> dict[str, set[str]]:
    """FLAIR image names per subject as pybids' BIDSLayout indexes them (validating names, like a BIDS app)."""
    import bids  # test extra (pybids)

    layout = bids.BIDSLayout(str(root), validate=True)
    found: dict[str, set[str]] = {}
    for f in layout.get(suffix="FLAIR", extension=[".nii", ".nii.gz"]):
        found.setdefault(f"sub-{f.entities['subject']}", set()).add(Path(f.path).name)
    return found


def _our_flairs(root: Path) -> dict[str, str]:
    """The FLAIR image our discovery uses (or reports as unusable) per subject."""
    skipped: list[dict] = []
    cases = _discover_quietly(root, skipped=skipped)
    chosen = {c.case_id: c.image.name for c in cases}
    for row in skipped:
        name = Path(row["path"]).name
        if "_roi" not in name.lower():  # an orphan ROI row names no FLAIR
            chosen[row["id"]] = name
    return chosen


def test_discovery_agrees_with_pybids(bids_tree: Path, phantom_dir: Path) -> None:
    """Issue 10: the same subjects and FLAIR files as pybids' BIDSLayout on every kind of BIDS tree the tests
    build: ds004199 quirks (acq labels, a thick-slice 2D subject), extra / 2D FLAIRs and an orphan ROI, the
    generated phantoms, and the shipped sample data."""
    from neuromf.weights import sample_data_root

    quirky = bids_tree.parent / "quirky"
    shutil.copytree(bids_tree, quirky)
    _image(quirky / "sub-00003" / "anat" / "sub-00003_acq-3D_FLAIR.nii.gz")
    _write(quirky / "sub-00005" / "anat" / "sub-00005_FLAIR.nii.gz", np.ones((8, 8), np.int16))
    _write(quirky / "sub-00001" / "anat" / "sub-00001_acq-x_FLAIR.nii.gz", np.ones((8, 8, 1), np.int16))
    _mask(quirky / "sub-00009" / "anat" / "sub-00009_acq-x_FLAIR_roi.nii.gz")
    for root in (bids_tree, quirky, phantom_dir, sample_data_root() / "fcd_phantoms"):
        theirs, ours = _pybids_flairs(root), _our_flairs(root)
        assert sorted(ours) == sorted(theirs), root
        for subject, image in ours.items():
            assert image in theirs[subject], (root, subject)
            if len(theirs[subject]) == 1:
                assert {image} == theirs[subject]
    assert _our_flairs(quirky)["sub-00003"] == "sub-00003_acq-3D_FLAIR.nii.gz"


def _validator() -> str:
    """The official schema-based BIDS validator (pip package bids-validator-deno), next to this Python or on PATH."""
    beside = Path(sys.executable).parent / "bids-validator-deno"
    found = str(beside) if beside.is_file() else shutil.which("bids-validator-deno")
    assert found, "bids-validator-deno is missing: install the test extras (pip install -e '.[test]')"
    return found


def _validate(root: Path) -> list[dict]:
    proc = subprocess.run([_validator(), str(root), "--format", "json"], capture_output=True, text=True,
                          timeout=600)
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)["issues"]["issues"]


def test_phantom_trees_pass_the_bids_validator(phantom_dir: Path) -> None:
    """Issue 10: the generated and the shipped phantom trees have no BIDS errors (the lesion ROIs, named as in
    ds004199, are declared in .bidsignore); the generated one names its Authors."""
    from neuromf.weights import sample_data_root

    for root in (phantom_dir, sample_data_root() / "fcd_phantoms"):
        issues = _validate(root)
        errors = sorted({f"{i['code']} {i.get('location', '')}" for i in issues if i["severity"] == "error"})
        assert not errors, (root, errors[:10])
        assert (root / ".bidsignore").is_file()
    codes = {i["code"] for i in _validate(phantom_dir)}
    assert "NO_AUTHORS" not in codes and "NOT_INCLUDED" not in codes
    # the check can fail: without the .bidsignore the ROIs are errors
    stripped = phantom_dir.parent / "no_bidsignore"
    shutil.copytree(phantom_dir, stripped)
    (stripped / ".bidsignore").unlink()
    not_included = [i for i in _validate(stripped) if i["severity"] == "error"]
    assert not_included and all(i["code"] == "NOT_INCLUDED" and "_FLAIR_roi" in i["location"] for i in not_included)
