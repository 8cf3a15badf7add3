"""`neuromf export-dataset`: pairs written as an nnU-Net v2 raw dataset and as a BIDS derivative, read back with the
formats' own conventions (nnU-Net's file naming and dataset.json; pybids for BIDS); a non-empty target is refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from neuromf.cli import main as cli


@pytest.fixture(scope="module")
def pair_dirs(phantom_dir, tmp_path_factory):
    """Two folders of pairs as `neuromf generate` writes them (real phantom FLAIRs and lesion masks, one pair with
    a conditional, one with an inpaint provenance sidecar)."""
    from neuromf.generation.images import GeneratedPair, write_pairs
    from neuromf.io.bids import discover_cases

    cases = [c for c in discover_cases(phantom_dir, group="fcd") if c.mask is not None][:3]
    dirs = []
    for k, group in enumerate((cases[:2], cases[2:])):
        out = tmp_path_factory.mktemp(f"pairs{k}")
        pairs = []
        for i, case in enumerate(group):
            img = nib.load(case.image)
            mask = (np.asarray(nib.load(case.mask).dataobj) > 0).astype(np.uint8) * 3  # a label other than 1
            pairs.append(GeneratedPair(i, np.asarray(img.dataobj, dtype=np.float32), mask, img.affine,
                                       {"mode": ["conditional", "inpaint"][k], "seed": i,
                                        "source_image": str(case.image)}))
        write_pairs(pairs, out)
        dirs.append(out)
    return dirs


def test_nnunet_export_follows_the_raw_dataset_conventions(pair_dirs, tmp_path, capsys):
    raw = tmp_path / "nnUNet_raw"
    args = ["export-dataset", "--pairs", str(pair_dirs[0]), "--pairs", str(pair_dirs[1]), "--format", "nnunet",
            "--out", str(raw), "--dataset-id", "7", "--name", "FCDSynth"]
    assert cli(args) == 0
    root = raw / "Dataset007_FCDSynth"
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "FLAIR"} and dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["file_ending"] == ".nii.gz"
    images = sorted((root / "imagesTr").iterdir())
    labels = sorted((root / "labelsTr").iterdir())
    assert dataset["numTraining"] == len(labels) == len(images) == 3
    cases = [re.fullmatch(r"(.+)_(\d{4})\.nii\.gz", p.name) for p in images]
    assert all(m and m.group(2) == "0000" for m in cases)  # one channel, 4-digit channel index
    assert [m.group(1) + ".nii.gz" for m in cases] == [p.name for p in labels]
    provenance = json.loads((root / "provenance.json").read_text())
    for image_path, label_path in zip(images, labels):
        image, label = nib.load(image_path), nib.load(label_path)
        assert image.shape == label.shape and np.array_equal(image.affine, label.affine)
        values = np.unique(np.asanyarray(label.dataobj))
        assert label.get_data_dtype() == np.uint8 and set(values.tolist()) == {0, 1}
        source = provenance[label_path.name.removesuffix(".nii.gz")]
        assert image_path.read_bytes() == open(source["source_flair"], "rb").read()  # images copied exactly
    assert provenance["FCDSynth_0002"]["generation"]["mode"] == "inpaint"

    capsys.readouterr()
    assert cli(args) == 2  # a non-empty dataset folder is not overwritten silently
    err = capsys.readouterr().err
    assert "Dataset007_FCDSynth: output folder is not empty" in err and len(err.strip().splitlines()) == 1
    assert cli(["export-dataset", "--pairs", str(pair_dirs[0]), "--format", "nnunet", "--out", str(raw),
                "--dataset-id", "7", "--overwrite"]) == 0
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2


def test_bids_export_is_a_derivative_pybids_reads(pair_dirs, tmp_path, capsys):
    from bids import BIDSLayout

    out = tmp_path / "derivative"
    (out / "stale.txt").parent.mkdir()
    (out / "stale.txt").write_text("x")
    args = ["export-dataset", "--pairs", str(pair_dirs[0]), "--pairs", str(pair_dirs[1]), "--format", "bids",
            "--out", str(out), "--name", "FCDSynth"]
    assert cli(args) == 2 and (out / "stale.txt").exists()  # refused, untouched
    assert cli(args + ["--overwrite"]) == 0 and not (out / "stale.txt").exists()
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "NeuroMF"

    layout = BIDSLayout(out, validate=False, is_derivative=True)
    assert len(layout.get_subjects()) == 3
    flairs = layout.get(suffix="FLAIR", extension=".nii.gz")
    masks = layout.get(suffix="mask", desc="lesion", extension=".nii.gz")
    assert len(flairs) == len(masks) == 3
    assert sorted(f.entities["desc"] for f in flairs) == ["conditional", "conditional", "inpaint"]
    for flair in flairs:
        mask = layout.get(subject=flair.entities["subject"], suffix="mask", extension=".nii.gz")[0]
        assert np.array_equal(nib.load(flair.path).affine, nib.load(mask.path).affine)
        assert set(np.unique(np.asanyarray(nib.load(mask.path).dataobj)).tolist()) == {0, 1}
        sidecar = flair.get_metadata()  # the JSON sidecar beside the image, as pybids associates it
        assert sidecar["NeuroMF"]["generation"]["seed"] in (0, 1) and sidecar["Sources"][0].startswith("file:")

    validator = shutil.which("bids-validator-deno")
    if validator:  # the BIDS project's own validator (installed with the dev requirements): no error
        report = subprocess.run([validator, "--json", str(out)], capture_output=True, text=True, timeout=120)
        issues = json.loads(report.stdout)["issues"]["issues"]
        assert [i["code"] for i in issues if i["severity"] == "error"] == []
