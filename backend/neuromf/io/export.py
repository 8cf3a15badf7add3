"""Generated or inpainted (FLAIR, lesion mask) pairs as the data sets segmenters read: an nnU-Net v2 raw dataset or a
BIDS derivative, each pair with its provenance.

The pairs are the folders `neuromf generate` writes (`sample_XXX_flair.nii.gz`, `sample_XXX_mask.nii.gz`,
`sample_XXX.json`). Images are copied byte for byte; labels are written as uint8 {0, 1} on the image's own affine
(nnU-Net requires image and label geometry to match). The data set is assembled in a temporary folder beside the
target and renamed into place, so an interrupted export leaves no half-written data set.

nnU-Net v2 (`<out>/Dataset<ID>_<Name>/`): `imagesTr/<case>_0000.nii.gz`, `labelsTr/<case>.nii.gz`, `dataset.json`
(`channel_names` {"0": "FLAIR"}, `labels` {"background": 0, "lesion": 1}, `numTraining`, `file_ending`) and
`provenance.json` (case -> source pair and its generation sidecar; nnU-Net ignores it).
BIDS derivative (`<out>/`): `dataset_description.json` (DatasetType "derivative", GeneratedBy),
`sub-<label>/anat/sub-<label>_desc-<mode>_FLAIR.nii.gz` + `.json` sidecar (provenance) and
`sub-<label>/anat/sub-<label>_desc-lesion_mask.nii.gz`, `participants.tsv` (+ .json) and a README; the naming
passes bids-validator (3.0) with no error.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from neuromf.io.nifti import save_nifti
from neuromf.io.pairs import find_generated_pairs
from neuromf.utils import json_default

FORMATS = ("nnunet", "bids")
AFFINE_TOLERANCE_MM = 1e-3
NNUNET_LABELS = {"background": 0, "lesion": 1}


class ExportError(ValueError):
    """Pairs that cannot be exported, or an output folder that may not be written; names the path."""


@dataclass
class ExportPair:
    """One pair to export: its files, the provenance sidecar's content and the folder it came from."""

    sample_id: str
    flair: Path
    mask: Path
    meta: dict[str, Any]
    source_dir: Path


def collect_pairs(pair_dirs: list[Path]) -> list[ExportPair]:
    """Every pair of each folder in order, each checked: label binary after thresholding, image and mask on the same
    grid (shape and affine), non-empty lesion."""
    pairs = []
    for directory in pair_dirs:
        try:
            found = find_generated_pairs(Path(directory))
        except ValueError as err:
            raise ExportError(str(err)) from err
        for sample_id, flair, mask in found:
            image, label = nib.load(str(flair)), nib.load(str(mask))
            if image.shape[:3] != label.shape[:3]:
                raise ExportError(f"{mask}: shape {label.shape} differs from its FLAIR's {image.shape}")
            gap = float(np.max(np.abs(image.affine - label.affine)))
            if gap > AFFINE_TOLERANCE_MM:
                raise ExportError(f"{mask}: affine differs from its FLAIR's by up to {gap:.3g} mm")
            sidecar = Path(directory) / f"{sample_id}.json"
            meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            pairs.append(ExportPair(sample_id, flair, mask, meta, Path(directory)))
    if not pairs:
        raise ExportError("no pairs to export")
    return pairs


def _label(pair: ExportPair) -> tuple[np.ndarray, np.ndarray]:
    """The mask as uint8 {0, 1} and the FLAIR's affine (what the label is written on)."""
    mask = np.asanyarray(nib.load(str(pair.mask)).dataobj)
    mask = mask.reshape(mask.shape[:3]) > 0.5
    if not mask.any():
        raise ExportError(f"{pair.mask}: the lesion mask is empty")
    return mask.astype(np.uint8), nib.load(str(pair.flair)).affine


def _provenance(pair: ExportPair) -> dict[str, Any]:
    return {"source_flair": str(pair.flair.resolve()), "source_mask": str(pair.mask.resolve()),
            "generation": pair.meta}


def export_nnunet(pairs: list[ExportPair], root: Path, name: str, dataset_id: int) -> None:
    """An nnU-Net v2 raw dataset in `root` (the Dataset<ID>_<Name> folder itself)."""
    cases = {}
    for k, pair in enumerate(pairs):
        case = f"{name}_{k:04d}"
        shutil.copyfile(pair.flair, root / "imagesTr" / f"{case}_0000.nii.gz")
        label, affine = _label(pair)
        save_nifti(label, affine, root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
        cases[case] = _provenance(pair)
    dataset = {"channel_names": {"0": "FLAIR"}, "labels": NNUNET_LABELS, "numTraining": len(pairs),
               "file_ending": ".nii.gz", "name": name,
               "description": f"Dataset{dataset_id:03d}: synthetic FCD FLAIR + lesion pairs written by NeuroMF "
                              "(generated or inpainted); provenance.json names each case's source"}
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    (root / "provenance.json").write_text(json.dumps(cases, indent=2, default=json_default) + "\n")


def _bids_label(k: int) -> str:
    return f"synth{k:04d}"


def export_bids(pairs: list[ExportPair], root: Path, name: str) -> None:
    """A BIDS derivative data set in `root`: one subject per pair."""
    description = {"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                   "Authors": ["NeuroMF (synthetic data)"],
                   "GeneratedBy": [{"Name": "NeuroMF", "Version": _version(),
                                    "Description": "synthetic FCD FLAIR + lesion mask pairs (generated or lesions "
                                                   "inpainted into healthy scans)"}]}
    (root / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    (root / "README").write_text(f"{name}: synthetic FCD FLAIR images with lesion masks written by NeuroMF "
                                 "(`neuromf export-dataset`). Each FLAIR's JSON sidecar holds its provenance "
                                 "(source pair, generation settings). Synthetic data, not patient data.\n")
    columns = {"source_pair": {"Description": "the generated pair this subject was exported from (folder/id)"},
               "mode": {"Description": "how the pair was made: conditional, joint or inpaint"}}
    (root / "participants.json").write_text(json.dumps(columns, indent=2) + "\n")
    rows = ["participant_id\tsource_pair\tmode"]
    for k, pair in enumerate(pairs):
        subject = _bids_label(k)
        anat = root / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True)
        mode = re.sub(r"[^a-zA-Z0-9]", "", str(pair.meta.get("mode", "generated"))) or "generated"
        stem = f"sub-{subject}_desc-{mode}_FLAIR"
        shutil.copyfile(pair.flair, anat / f"{stem}.nii.gz")
        label, affine = _label(pair)
        save_nifti(label, affine, anat / f"sub-{subject}_desc-lesion_mask.nii.gz", dtype=np.uint8)
        # SkullStripped is required of derivative anatomical images; the export strips nothing: a head keeps what
        # the model or the source scan had
        sidecar = {"Description": f"NeuroMF {mode} FLAIR", "SkullStripped": False, "NeuroMF": _provenance(pair)}
        source = pair.meta.get("source_image")
        if source and not str(source).startswith("<"):
            sidecar["Sources"] = [f"file:{source}"]
        (anat / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, default=json_default) + "\n")
        rows.append(f"sub-{subject}\t{pair.source_dir.name}/{pair.sample_id}\t{mode}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("neuromf")
    except Exception:  # not installed as a distribution (a source checkout on PYTHONPATH)
        return "unknown"


def dataset_folder(out: Path, fmt: str, name: str, dataset_id: int) -> Path:
    """Where `export_dataset` writes: `<out>/Dataset<ID>_<Name>` for nnU-Net (out = nnUNet_raw), `out` for BIDS."""
    if fmt == "nnunet":
        if not 1 <= dataset_id <= 999:
            raise ExportError(f"nnU-Net dataset ids run from 1 to 999, got {dataset_id}")
        return Path(out) / f"Dataset{dataset_id:03d}_{name}"
    return Path(out)


def export_dataset(pair_dirs: list[Path | str], fmt: str, out: Path | str, name: str = "FCDSynth",
                   dataset_id: int = 501, overwrite: bool = False) -> Path:
    """Write the pairs of `pair_dirs` as an nnU-Net v2 raw dataset or a BIDS derivative (module docstring).

    Args:
        pair_dirs: folders written by `neuromf generate` (any mode, inpaint included).
        fmt: "nnunet" or "bids".
        out: nnU-Net: the nnUNet_raw folder the Dataset<ID>_<Name> folder goes into; BIDS: the data set's folder.
        name: data set name (letters and digits: also the nnU-Net case prefix).
        dataset_id: nnU-Net dataset id (1..999).
        overwrite: replace a non-empty target folder (refused otherwise).
    Returns:
        The data set's folder.
    Raises:
        ExportError: no pairs, a broken pair, a bad name or id, a non-empty target without `overwrite`.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not re.fullmatch(r"[A-Za-z0-9]+", name):
        raise ExportError(f"dataset name {name!r}: use letters and digits only")
    target = dataset_folder(Path(out), fmt, name, dataset_id)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ExportError(f"{target}: output folder is not empty (pass --overwrite to replace it)")
    pairs = collect_pairs([Path(d) for d in pair_dirs])
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if fmt == "nnunet":
            (scratch / "imagesTr").mkdir()
            (scratch / "labelsTr").mkdir()
            export_nnunet(pairs, scratch, name, dataset_id)
        else:
            export_bids(pairs, scratch, name)
        scratch.chmod(0o755)
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
