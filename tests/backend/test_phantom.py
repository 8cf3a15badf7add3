"""Phantom generator: determinism, lesion volume and placement, FLAIR contrast, BIDS output."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from neuromf.data.phantom import (
    PhantomConfig,
    generate_subject,
    generate_subject_with_tissue,
    lesion_volume_cm3,
    make_phantom_dataset,
    stored_flair,
    subject_rng,
)
from neuromf.io.bids import discover_cases, validate_case

MIRROR_MARGIN = 1.10  # lesion mean FLAIR >= 110% of the mirrored region in the other hemisphere
N_HEALTHY, N_FCD, SEED = 2, 4, 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_dataset(tmp_path_factory.mktemp("phantoms") / "ds", N_HEALTHY, N_FCD, seed=SEED)


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "dataset_description.json"  # that one names the output folder
    }


def _subjects(root: Path) -> list[dict[str, str]]:
    with open(root / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_same_seed_gives_identical_files(dataset: Path, tmp_path: Path) -> None:
    again = make_phantom_dataset(tmp_path / "again", N_HEALTHY, N_FCD, seed=SEED)
    assert _file_hashes(again) == _file_hashes(dataset)
    other = make_phantom_dataset(tmp_path / "other", N_HEALTHY, N_FCD, seed=SEED + 1)
    assert _file_hashes(other) != _file_hashes(dataset)


@pytest.mark.parametrize("case_id,group,index", [("sub-00002", "fcd", 1), ("sub-00006", "hc", 1)])
def test_a_subject_is_drawn_again_alone_from_its_group_and_index(dataset: Path, case_id: str, group: str,
                                                                 index: int) -> None:
    """`subject_rng` is the data set's own seeding: one patient or control drawn alone equals its stored file."""
    flair, mask, _ = generate_subject(subject_rng(SEED, group, index), PhantomConfig(), with_lesion=(group == "fcd"))
    stored = nib.load(dataset / case_id / "anat" / f"{case_id}_acq-phantom_FLAIR.nii.gz")
    np.testing.assert_array_equal(np.asarray(stored.dataobj), stored_flair(flair))
    assert (mask is not None and mask.sum() > 0) == (group == "fcd")
    other, _, _ = generate_subject(subject_rng(SEED, group, index + 1), PhantomConfig(), with_lesion=(group == "fcd"))
    assert not np.array_equal(stored_flair(other), stored_flair(flair))


def test_bids_layout_and_participants(dataset: Path) -> None:
    rows = _subjects(dataset)
    assert [r["participant_id"] for r in rows] == [f"sub-{i:05d}" for i in range(1, N_HEALTHY + N_FCD + 1)]
    assert sorted(r["group"] for r in rows) == ["fcd"] * N_FCD + ["hc"] * N_HEALTHY
    for group, n in (("fcd", N_FCD), ("hc", N_HEALTHY)):
        assert sum(r["split"] == "test" for r in rows if r["group"] == group) == round(0.25 * n)
    for row in rows:
        anat = dataset / row["participant_id"] / "anat"
        flair = nib.load(anat / f"{row['participant_id']}_acq-phantom_FLAIR.nii.gz")
        assert flair.get_data_dtype() == np.int16 and flair.shape == (64, 64, 64)
        assert np.allclose(flair.affine[:3, :3], np.diag([3.0, 3.0, 3.0]))  # RAS, 3 mm
        rois = list(anat.glob("*_roi.nii.gz"))
        assert len(rois) == (1 if row["group"] == "fcd" else 0)
        if rois:
            assert nib.load(rois[0]).get_data_dtype() == np.uint8
            assert np.allclose(nib.load(rois[0]).affine, flair.affine)
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["BIDSVersion"]
    assert f"--seed {SEED}" in description["GeneratedBy"][0]["Description"]


def test_written_dataset_is_discovered_and_usable(dataset: Path) -> None:
    cases = discover_cases(dataset)
    assert len(cases) == N_HEALTHY + N_FCD
    reports = [validate_case(c) for c in cases]
    assert all(r["usable"] and not r["problems"] for r in reports), reports
    assert len(discover_cases(dataset, group="fcd")) == N_FCD


def test_lesion_brighter_than_mirrored_region(dataset: Path) -> None:
    for roi_path in sorted(dataset.glob("sub-*/anat/*_roi.nii.gz")):
        flair = np.asarray(nib.load(str(roi_path).replace("_roi", "")).dataobj, dtype=np.float32)
        mask = np.asarray(nib.load(roi_path).dataobj) > 0
        mirrored = mask[::-1]  # x axis flipped about the midline (the grid is centred on it)
        assert not np.any(mask & mirrored)
        ratio = flair[mask].mean() / flair[mirrored].mean()
        assert ratio >= MIRROR_MARGIN, f"{roi_path.name}: lesion/mirror FLAIR ratio {ratio:.3f}"


@pytest.mark.parametrize("seed", range(6))
def test_lesion_volume_placement_and_contrast(seed: int) -> None:
    cfg = PhantomConfig()
    flair, mask, affine, tissue = generate_subject_with_tissue(np.random.default_rng(seed), cfg, True)
    assert flair.dtype == np.float32 and mask.dtype == np.uint8 and flair.shape == cfg.shape
    assert set(np.unique(mask)) == {0, 1}
    volume = lesion_volume_cm3(mask, cfg.spacing)
    assert cfg.lesion_volume_cm3[0] <= volume <= cfg.lesion_volume_cm3[1]
    assert np.all(flair[mask > 0] > 0) and np.all(tissue.sum(axis=0)[mask > 0] > 0.5)  # inside the brain
    assert flair[mask > 0].mean() >= MIRROR_MARGIN * flair[mask[::-1] > 0].mean()
    gm, wm, csf = tissue
    healthy = mask == 0
    gm_level = np.median(flair[(gm > 0.7) & healthy])
    wm_level = np.median(flair[(wm > 0.9) & healthy])
    csf_level = np.median(flair[csf > 0.8])
    assert gm_level > wm_level > 1.5 * csf_level  # FLAIR: GM brighter than WM, CSF dark
    assert 0.4 < wm_level < 0.75


def test_lesion_volume_range_is_honoured() -> None:
    cfg = PhantomConfig(lesion_volume_cm3=(2.0, 3.0))
    for seed in range(4):
        _, mask, _ = generate_subject(np.random.default_rng(seed), cfg, True)
        assert 2.0 <= lesion_volume_cm3(mask, cfg.spacing) <= 3.0


def test_healthy_subject_whole_brain_inside_grid() -> None:
    cfg = PhantomConfig()
    volumes = []
    for seed in range(3):
        flair, mask, affine = generate_subject(np.random.default_rng(seed), cfg, False)
        assert mask is None
        brain = flair > 0
        for axis in range(3):  # no brain on any face of the grid
            assert not np.take(brain, 0, axis=axis).any() and not np.take(brain, -1, axis=axis).any()
        volumes.append(brain.sum() * 27 / 1000)
        assert abs((affine @ [31.5, 0, 0, 1])[0]) < 1e-6  # grid centred on the midline x = 0
    assert all(1100 < v < 1900 for v in volumes), volumes  # cm^3, incl. CSF; adult brains ~1200-1700
    assert len({round(v, 1) for v in volumes}) == 3  # subjects differ


@pytest.mark.parametrize("seed", range(3))
def test_lesion_strength_scales_only_the_hyperintensity(seed: int) -> None:
    """Same subject, same lesion: the strength moves the lesion's FLAIR excess linearly and nothing far from it."""
    subjects = {s: generate_subject(np.random.default_rng(seed), PhantomConfig(lesion_strength=s), True)
                for s in (0.0, 0.4, 1.0)}
    masks = [mask for _, mask, _ in subjects.values()]
    assert all(np.array_equal(masks[0], m) for m in masks[1:])
    lesion = masks[0] > 0
    far = ndimage.distance_transform_edt(~lesion) > 8  # beyond the lesion's fading edge and its transmantle tail
    flair = {s: f for s, (f, _, _) in subjects.items()}
    assert np.array_equal(flair[0.0][far], flair[1.0][far])
    excess = {s: f[lesion].mean() / flair[0.0][lesion].mean() - 1.0 for s, f in flair.items()}
    assert excess[1.0] > 0.15  # the embedded phantoms' hyperintensity over the thickened, blurred cortex alone
    assert excess[0.4] == pytest.approx(0.4 * excess[1.0], rel=0.05)  # linear but for the Rician noise


def test_refuses_to_mix_with_stale_subjects(dataset: Path, tmp_path: Path) -> None:
    target = make_phantom_dataset(tmp_path / "ds", 1, 2, seed=0)
    with pytest.raises(FileExistsError, match="sub-00003"):
        make_phantom_dataset(target, 0, 2, seed=0)
    make_phantom_dataset(target, 1, 2, seed=0)  # regenerating the same layout in place is fine


def test_cli_writes_subtle_lesions_and_says_how(tmp_path: Path) -> None:
    from neuromf.cli import main

    out = tmp_path / "subtle"
    assert main(["make-phantoms", "--out", str(out), "--n-healthy", "0", "--n-fcd", "2", "--seed", "3",
                 "--lesion-strength", "0.4", "--lesion-volume", "2", "3"]) == 0
    description = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]["Description"]
    assert '"lesion_strength": 0.4' in description and '"lesion_volume_cm3": [2.0, 3.0]' in description
    for index, roi in enumerate(sorted(out.glob("sub-*/anat/*_roi.nii.gz"))):
        mask = np.asarray(nib.load(roi).dataobj) > 0
        assert 2.0 <= lesion_volume_cm3(mask, (3.0, 3.0, 3.0)) <= 3.0
        flair = np.asarray(nib.load(str(roi).replace("_roi", "")).dataobj, dtype=np.float32)
        # the same subject at full strength: the same lesion, brighter
        full, full_mask, _ = generate_subject(subject_rng(3, "fcd", index), PhantomConfig(lesion_volume_cm3=(2.0, 3.0)),
                                              True)
        assert np.array_equal(full_mask > 0, mask)
        assert flair[mask].mean() < 0.97 * stored_flair(full)[mask].mean()
