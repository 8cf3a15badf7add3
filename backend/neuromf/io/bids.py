"""Find (FLAIR, lesion mask) cases in a BIDS tree or a flat folder, and check them.

BIDS rules follow the Bonn FCD type II data set (OpenNeuro ds004199):

- image: ``sub-*/anat/*_FLAIR.nii[.gz]``; lesion ROI: ``sub-*/anat/*FLAIR_roi.nii[.gz]``, globbed per
  subject and never rebuilt from the image name, because the ROI's ``acq`` label can differ;
- controls have no ROI; ``participants.tsv`` ``group`` (fcd/hc, any case) and ``split`` are honoured;
- broken subjects never stop discovery: a lesion ROI without a FLAIR image, a FLAIR that is a 2D image
  (fewer than 3 axes, or a single slice), or a subject whose only FLAIR is a thick-slice 2D acquisition is
  skipped as an unusable problem row (``discover_cases(skipped=...)``, else a warning), so one bad file does
  not hide the rest of the data set. The thick-slice test is anisotropy read from the header (largest voxel
  side >= 2.5 mm and more than twice the next one, e.g. 0.45x0.45x4 mm), not absolute size: isotropic 3 mm
  phantoms are fine.

Flat folder: ``<stem>_FLAIR.nii[.gz]`` images with ``<stem>_*roi*.nii[.gz]`` or ``<stem>*mask*`` partners.
"""

from __future__ import annotations

import csv
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from neuromf.io.validate import affine_problem, binary_mask, image_problem, lesion_share_problem

GROUPS = ("fcd", "hc", "unknown")
SPLITS = ("train", "test", "unknown")
_GROUP_ALIASES = {
    "fcd": "fcd",
    "patient": "fcd",
    "patients": "fcd",
    "hc": "hc",
    "control": "hc",
    "controls": "hc",
}
_THICK_SLICE_MM = 2.5
_THICK_SLICE_RATIO = 2.0


@dataclass
class Case:
    """One FLAIR image with its lesion mask (None for controls) and where it came from."""

    case_id: str
    image: Path
    mask: Path | None
    group: str  # "fcd" | "hc" | "unknown"
    split: str  # "train" | "test" | "unknown"
    problems: list[str] = field(default_factory=list)  # warnings that do not make the case unusable


class DataError(ValueError):
    """Unusable input data; the message always names the file (or folder) and the problem."""


def _strip_nifti(name: str) -> str | None:
    """File name without .nii/.nii.gz, or None when it is not a NIfTI file."""
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_mask_name(name: str) -> bool:
    lower = name.lower()
    return "_roi" in lower or "mask" in lower


def _header_geometry(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, voxel sizes of the first three axes) from the header alone."""
    header = nib.load(path).header
    return tuple(int(s) for s in header.get_data_shape()), tuple(float(z) for z in header.get_zooms()[:3])


def is_2d_image(shape: tuple[int, ...]) -> bool:
    """True for an image that is not a volume: fewer than 3 axes, or a single slice along one of them."""
    return len(shape) < 3 or any(s <= 1 for s in shape[:3])


def is_thick_slice_2d(zooms: tuple[float, ...]) -> bool:
    """True for a 2D thick-slice acquisition: one voxel side >= 2.5 mm and over twice the next largest.

    A header with fewer than three voxel sizes is a 2D image, not a thick-slice volume (see ``is_2d_image``).
    """
    if len(zooms) < 3:
        return False
    sides = sorted(float(z) for z in zooms[:3])
    return sides[2] >= _THICK_SLICE_MM and sides[2] > _THICK_SLICE_RATIO * sides[1]


def _format_zooms(zooms: tuple[float, ...]) -> str:
    return "x".join(f"{z:.2f}" for z in zooms) + " mm"


def _thick_reason(zooms: str) -> str:
    return (f"thick-slice 2D FLAIR ({zooms} voxels), not a 3D acquisition: its slices are too thick to use as a "
            "volume; a 3D FLAIR of this subject is needed")


def _acq_label(name: str) -> str | None:
    match = re.search(r"_acq-([A-Za-z0-9]+)", name)
    return match.group(1) if match else None


def _split_2d(
    images: list[Path], problems: list[str]
) -> tuple[list[Path], list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Separate 3D images from thick-slice 2D ones and from 2D images (returned with a description).

    Unreadable headers stay with the 3D images: validation reports them as unusable.
    """
    volumetric, thick, flat = [], [], []
    for path in images:
        try:
            shape, zooms = _header_geometry(path)
        except Exception as exc:  # any reader failure is reported, not raised here
            problems.append(f"{path.name}: cannot read header ({exc})")
            volumetric.append(path)
            continue
        if is_2d_image(shape):
            flat.append((path, f"2D image (shape {'x'.join(map(str, shape)) or 'empty'}), not a 3D volume"))
        elif is_thick_slice_2d(zooms):
            thick.append((path, _format_zooms(zooms)))
        else:
            volumetric.append(path)
    return volumetric, thick, flat


def _skip(rows: list[dict], case_id: str, path: Path, reason: str, group: str = "unknown",
          split: str = "unknown") -> None:
    """Record a subject or file left out of discovery as an unusable ``case_report``-style problem row."""
    rows.append({"id": case_id, "group": group, "split": split, "shape": None, "spacing": None,
                 "lesion_cm3": None, "problems": [f"{path.name}: {reason}; skipped"], "usable": False,
                 "path": str(path)})


def _read_participants(root: Path) -> dict[str, dict[str, str]]:
    """participants.tsv as {participant_id: {column: value}}, ids normalised to 'sub-<label>'."""
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read participants table ({exc})") from exc
    table: dict[str, dict[str, str]] = {}
    line_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        pid = (row.get("participant_id") or "").strip()
        if not pid:
            continue
        pid = pid if pid.startswith("sub-") else f"sub-{pid}"
        values = {(k or "").strip().lower(): (v if isinstance(v, str) else "").strip() for k, v in row.items()}
        if pid in table and table[pid] != values:  # which one holds? neither is silently picked
            differ = sorted(k for k in set(values) | set(table[pid]) if values.get(k) != table[pid].get(k))
            raise DataError(f"{path}: {pid} has conflicting rows (lines {line_of[pid]} and {line}: "
                            f"{', '.join(differ)} differ); keep one row per participant")
        table[pid] = values
        line_of.setdefault(pid, line)
    return table


def _group_and_split(info: dict[str, str], has_mask: bool, problems: list[str]) -> tuple[str, str]:
    raw_group = info.get("group", "").lower()
    if raw_group in ("", "n/a"):
        group = "fcd" if has_mask else "unknown"  # no group given: a lesion ROI marks a patient
    else:
        group = _GROUP_ALIASES.get(raw_group, "unknown")
        if group == "unknown":
            problems.append(
                f"participants.tsv group {info.get('group')!r} not recognised (expected fcd or hc)"
            )
    raw_split = info.get("split", "").lower()
    split = raw_split if raw_split in ("train", "test") else "unknown"
    if group == "hc" and has_mask:
        problems.append("control (group hc) with a lesion ROI")
    if group == "fcd" and not has_mask:
        problems.append("FCD subject without a lesion ROI: usable as an image only")
    return group, split


def _is_link_loop(path: Path) -> bool:
    """A symbolic link that leads nowhere (a loop, or a missing target)."""
    if not path.is_symlink():
        return False
    try:
        path.resolve(strict=True)
    except (OSError, RuntimeError):
        return True
    return False


def _discover_bids(root: Path, rows: list[dict]) -> list[Case]:
    """Cases from a BIDS tree; broken subjects (an ROI without a FLAIR, only 2D or thick-slice 2D images) go to
    ``rows`` as problem rows."""
    participants = _read_participants(root)
    cases = []
    for subject in sorted(p for p in root.glob("sub-*") if p.is_dir() or _is_link_loop(p)):
        anat_dirs = [subject / "anat", *sorted(subject.glob("ses-*/anat"))]
        looping = [d for d in [subject, *anat_dirs] if _is_link_loop(d)]
        if looping:  # reported, never silently dropped
            _skip(rows, subject.name, looping[0], f"{looping[0].name} is a looping or broken symbolic link; "
                  f"{subject.name} cannot be read")
            continue
        images = sorted(p for d in anat_dirs for p in d.glob("*_FLAIR.nii*") if "_roi" not in p.name.lower())
        rois = sorted(p for d in anat_dirs for p in d.glob("*FLAIR_roi.nii*"))
        info = participants.get(subject.name, {})
        group = _GROUP_ALIASES.get(info.get("group", "").lower(), "fcd" if rois else "unknown")
        split = info.get("split", "").lower() if info.get("split", "").lower() in ("train", "test") else "unknown"
        if not images:
            if rois:
                _skip(rows, subject.name, rois[0], f"lesion ROI without a FLAIR image in {subject.name}", group,
                      split)
            continue
        problems: list[str] = []
        volumetric, thick, flat = _split_2d(images, problems)
        if not volumetric:
            if flat:
                _skip(rows, subject.name, flat[0][0], flat[0][1], group, split)
            else:
                _skip(rows, subject.name, thick[0][0], _thick_reason(thick[0][1]), group, split)
            continue
        for path, zooms in thick:
            problems.append(f"{path.name}: thick-slice 2D FLAIR ({zooms}) ignored")
        for path, what in flat:
            problems.append(f"{path.name}: {what}; ignored")
        image = volumetric[0]
        if len(volumetric) > 1:
            roi_acqs = {_acq_label(r.name) for r in rois}
            same_acq = [p for p in volumetric if _acq_label(p.name) in roi_acqs]
            image = (same_acq or volumetric)[0]
            problems.append(f"{len(volumetric)} 3D FLAIR images; using {image.name}")
        mask = None
        if rois:
            same_acq_roi = [r for r in rois if _acq_label(r.name) == _acq_label(image.name)]
            mask = (same_acq_roi or rois)[0]
            if len(rois) > 1:
                problems.append(f"{len(rois)} lesion ROIs; using {mask.name}")
        group, split = _group_and_split(participants.get(subject.name, {}), mask is not None, problems)
        cases.append(Case(subject.name, image, mask, group, split, problems))
    return cases


def _discover_flat(root: Path, rows: list[dict]) -> list[Case]:
    """Cases from a flat folder: <stem>_FLAIR images paired with <stem>...roi/mask files; masks without an
    image, 2D and thick-slice 2D images and dangling or looping links go to ``rows`` as problem rows."""
    images: dict[str, Path] = {}
    masks: list[Path] = []
    for path in sorted(root.iterdir()):
        base = _strip_nifti(path.name)
        if base is None or path.is_dir():
            continue
        if not path.is_file():  # a dangling or looping symbolic link (is_file() follows links)
            if path.is_symlink() and (_is_mask_name(path.name) or base.lower().endswith("_flair")):
                stem = base[: -len("_flair")] if base.lower().endswith("_flair") else base
                _skip(rows, stem, path, "broken or looping symbolic link")
            continue
        if _is_mask_name(path.name):
            masks.append(path)
        elif base.lower().endswith("_flair"):
            images[base[: -len("_flair")]] = path
    if not images and not masks:
        return []
    pairs: dict[str, list[Path]] = {stem: [] for stem in images}
    problems: dict[str, list[str]] = {stem: [] for stem in images}
    for mask in masks:
        matches = [stem for stem in images if mask.name.startswith(f"{stem}_")]
        if not matches:
            subject = mask.name.split("_")[0]
            matches = [
                stem for stem in images if subject.startswith("sub-") and stem.split("_")[0] == subject
            ]
            if len(matches) == 1:
                problems[matches[0]].append(
                    f"{mask.name}: paired by subject id (labels differ from the image)"
                )
            else:
                matches = []
        if not matches:
            _skip(rows, _strip_nifti(mask.name) or mask.name, mask,
                  "lesion mask without a matching FLAIR image (<stem>_FLAIR.nii[.gz])", "fcd")
            continue
        pairs[max(matches, key=len)].append(mask)  # longest stem: 'sub-1_acq-x' beats 'sub-1'

    cases = []
    for stem, image in images.items():
        notes = problems[stem]
        volumetric, thick, flat = _split_2d([image], notes)
        if flat:
            _skip(rows, stem, image, flat[0][1], "fcd" if pairs[stem] else "unknown")
            continue
        if thick:
            _skip(rows, stem, image, _thick_reason(thick[0][1]), "fcd" if pairs[stem] else "unknown")
            continue
        candidates = sorted(pairs[stem], key=lambda p: ("_roi" not in p.name.lower(), p.name))
        mask = candidates[0] if candidates else None
        if len(candidates) > 1:
            notes.append(f"{len(candidates)} mask files; using {mask.name}")
        cases.append(Case(stem, image, mask, "fcd" if mask else "unknown", "unknown", notes))
    return cases


def discover_cases(
    root: Path,
    group: str | None = None,
    split: str | None = None,
    require_mask: bool = False,
    skipped: list[dict] | None = None,
) -> list[Case]:
    """All usable-looking cases under ``root`` (BIDS tree or flat folder), sorted by id.

    ``group="fcd"`` returns FCD cases that have a mask; ``group="hc"`` the controls; ``split`` filters
    on participants.tsv's split. Raises DataError when nothing is found or the layout is broken.
    Broken subjects (a lesion ROI without a FLAIR, a 2D or thick-slice 2D image) are left out: appended to
    ``skipped`` as unusable ``case_report``-style rows when a list is given, otherwise reported as warnings.
    """
    root = Path(root)
    if group is not None and group.lower() not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS} or None, got {group!r}")
    if split is not None and split.lower() not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    is_bids = (root / "participants.tsv").is_file() or any(p.is_dir() for p in root.glob("sub-*"))
    rows: list[dict] = []
    try:
        cases = _discover_bids(root, rows) if is_bids else _discover_flat(root, rows)
    except OSError as exc:  # an unreadable folder (permissions, I/O error) inside the tree
        raise DataError(f"{getattr(exc, 'filename', None) or root}: cannot read ({exc.strerror or exc})") from exc
    if skipped is not None:
        skipped.extend(rows)
    else:
        for row in rows:
            warnings.warn(f"{row['path']}: {row['problems'][0].split(': ', 1)[1]}", stacklevel=2)
    if not cases:
        looked_for = (
            "sub-*/anat/*_FLAIR.nii[.gz] images (BIDS tree)"
            if is_bids
            else "*_FLAIR.nii[.gz] images with *_roi.nii[.gz] or *mask* partners (flat folder)"
        )
        extra = ""
        if rows:
            extra += f"; {len(rows)} skipped: " + "; ".join(r["problems"][0] for r in rows[:3])
            extra += "; ..." if len(rows) > 3 else ""
        raise DataError(f"{root}: no cases found: looked for {looked_for}{extra}")

    selected = cases
    if group is not None:
        selected = [c for c in selected if c.group == group.lower()]
        if group.lower() == "fcd":
            selected = [c for c in selected if c.mask is not None]
    if split is not None:
        selected = [c for c in selected if c.split == split.lower()]
    if require_mask:
        selected = [c for c in selected if c.mask is not None]
    if not selected:
        raise DataError(
            f"{root}: no cases match group={group!r} split={split!r} require_mask={require_mask} "
            f"({len(cases)} cases found before filtering)"
        )
    return sorted(selected, key=lambda c: c.case_id)


def _read_mask(path: Path) -> tuple[np.ndarray, str | None]:
    """Mask as uint8 {0,1} plus a note when it had to be binarised; DataError when it is not a mask."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # reader errors of any kind become one DataError
        raise DataError(f"{path}: cannot read mask ({exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: mask must be 3D, got shape {data.shape}")
    mask, note, problem = binary_mask(data)
    if problem is None:
        problem = lesion_share_problem(mask)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    return mask, None if note is None else f"{path.name}: {note}"


def load_mask_array(path: Path) -> np.ndarray:
    """Lesion mask as uint8 {0,1} (`neuromf.io.validate.binary_mask`).

    A two-valued mask {0, label > 0} (e.g. {0,255}) is binarised with a warning naming the file; negative labels
    (an inverted mask), more than two values, no background or a mask covering more than a quarter of the scan
    raise DataError naming the file.
    """
    mask, note = _read_mask(Path(path))
    if note:
        warnings.warn(note, stacklevel=2)
    return mask


def _image_data_problem(image: nib.spatialimages.SpatialImage, name: str) -> str | None:
    """Why the voxel data of a readable header cannot be used (truncated file, NaN or infinite values), or None.

    Reads the whole image: headers alone let a truncated or NaN-filled scan pass as usable.
    """
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # truncated gzip / short file: nibabel raises several types
        return f"{name}: cannot read image data, the file is truncated or corrupt ({exc})"
    if np.issubdtype(data.dtype, np.floating) or np.issubdtype(data.dtype, np.complexfloating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            return f"{name}: image contains {bad} NaN or infinite values"
    if np.issubdtype(data.dtype, np.floating):
        # e.g. an int16 image with a huge scl_slope: finite here, infinite once preprocessing casts to float32
        if data.size and float(np.max(np.abs(data))) > float(np.finfo(np.float32).max):
            return f"{name}: image values overflow float32 (max |value| {float(np.max(np.abs(data))):.3g}; " \
                   "check the header's scl_slope)"
    if (problem := image_problem(data)) is not None:
        return f"{name}: {problem}"
    return None


def validate_case(case: Case, atol: float = 1e-3) -> dict:
    """Check one case from its headers and its image and mask data.

    Returns {"shape", "spacing", "lesion_cm3", "problems", "usable"}. Unusable: unreadable, truncated or
    non-finite image, image not 3D, mask shape or affine (beyond ``atol``) different from the image's, mask
    with more than two values, empty mask. A binarised two-valued mask is only a warning.
    """
    problems = list(case.problems)
    report: dict = {"shape": None, "spacing": None, "lesion_cm3": None, "problems": problems, "usable": True}
    try:
        image = nib.load(case.image)
    except Exception as exc:
        problems.append(f"{case.image.name}: cannot read image ({exc})")
        report["usable"] = False
        return report
    shape = tuple(int(s) for s in image.shape)
    spacing = tuple(round(float(z), 4) for z in image.header.get_zooms()[:3])
    report["shape"], report["spacing"] = shape[:3], spacing
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        problems.append(f"{case.image.name}: image must be 3D, got shape {shape}")
        report["usable"] = False
    elif (geometry := affine_problem(image.affine)) is not None:
        problems.append(f"{case.image.name}: {geometry}")
        report["usable"] = False
    elif (data_problem := _image_data_problem(image, case.image.name)) is not None:
        problems.append(data_problem)
        report["usable"] = False
    if case.mask is None:
        return report

    try:
        mask_img = nib.load(case.mask)
    except Exception as exc:
        problems.append(f"{case.mask.name}: cannot read mask ({exc})")
        report["usable"] = False
        return report
    if tuple(mask_img.shape[:3]) != shape[:3]:
        problems.append(f"{case.mask.name}: mask shape {tuple(mask_img.shape)} != image shape {shape}")
        report["usable"] = False
        return report
    affine_gap = float(np.max(np.abs(np.asarray(mask_img.affine) - np.asarray(image.affine))))
    if affine_gap > atol:
        problems.append(
            f"{case.mask.name}: mask affine differs from the image's by up to {affine_gap:.4g} (atol {atol})"
        )
        report["usable"] = False
        return report
    try:
        mask, note = _read_mask(case.mask)
    except DataError as exc:
        problems.append(str(exc))
        report["usable"] = False
        return report
    if note:
        problems.append(note)
    n_lesion = int(np.count_nonzero(mask))
    report["lesion_cm3"] = n_lesion * float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    if n_lesion == 0:
        problems.append(f"{case.mask.name}: empty mask (no lesion voxels)")
        report["usable"] = False
    return report


def case_report(case: Case, atol: float = 1e-3) -> dict:
    """One row for ``format_case_table``: the case's id, group and split plus ``validate_case``."""
    return {"id": case.case_id, "group": case.group, "split": case.split, **validate_case(case, atol)}


def format_case_table(rows: list[dict]) -> str:
    """Fixed-width table: id, group, split, shape, spacing, lesion cm^3, problems.

    Rows are ``case_report`` dicts ("id" or "case_id" key); unusable rows are flagged in the problems.
    """
    header = ("id", "group", "split", "shape", "spacing (mm)", "lesion cm^3", "problems")
    lines = []
    for row in rows:
        shape, spacing, lesion = row.get("shape"), row.get("spacing"), row.get("lesion_cm3")
        problems = "; ".join(row.get("problems") or []) or "-"
        if row.get("usable") is False:
            problems = f"UNUSABLE: {problems}"
        lines.append(
            (
                str(row.get("id", row.get("case_id", "?"))),
                str(row.get("group", "unknown")),
                str(row.get("split", "unknown")),
                "x".join(str(s) for s in shape) if shape else "-",
                "x".join(f"{s:.2f}" for s in spacing) if spacing else "-",
                f"{lesion:.2f}" if lesion is not None else "-",
                problems,
            )
        )
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]

    rule = "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1])
    return "\n".join([render(header), rule, *(render(r) for r in lines)])
