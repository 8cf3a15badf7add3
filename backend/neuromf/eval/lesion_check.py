"""The lesion check of single generated pairs (the quick check of a trained adapter built on it draws its pairs:
`neuromf.generation.adapter_check`).

`neuromf evaluate` judges a folder of pairs against the real lesions (`neuromf.eval.lesion_metrics`). Here the
same criteria judge one pair at a time, as it arrives in the napari Generate dock, against the real FCD lesions of
the data the adapter was trained on (preprocessed onto its model grid). That reference is read from the adapter
folder's `lesion_reference.json` when it ships one (the embedded adapters do: their training phantoms are generated
on first use, minutes on a CPU), else built from the adapter's training data and cached in `cache_dir`.

A FLAIR that is the joint model's own shows a lesion only faintly (the shipped configuration renders it with a
conditional adapter): such pairs are judged by `MASK_CRITERIA`, every criterion but the FLAIR contrast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuromf.eval.lesion_metrics import (
    CRITERIA,
    LesionReference,
    LesionStats,
    lesion_like,
    lesion_stats,
    reference_from_real,
)

REFERENCE_FILE = "lesion_reference.json"
MASK_CRITERIA = tuple(c for c in CRITERIA if c != "contrast")
# what each failed criterion means for the lesion, in words for the dock
FAILURE_WORDS = {"nonempty": "empty mask", "largest_share": "scattered into pieces",
                 "volume": "a size no real lesion has", "inside_brain": "partly outside the brain",
                 "depth": "at a depth no real lesion has", "location": "far from every real lesion's site",
                 "contrast": "too faint in the FLAIR"}


def reference_to_dict(ref: LesionReference, source: str) -> dict[str, Any]:
    """A reference as the JSON `lesion_reference.json` holds (`source` says which lesions it was built from)."""
    return {"source": source, **ref.to_dict()}


def reference_from_dict(values: dict[str, Any]) -> LesionReference:
    """The reference a `reference_to_dict` JSON holds (derived bounds are recomputed, not read)."""
    names = LesionReference.__dataclass_fields__
    return LesionReference(**{key: value for key, value in values.items() if key in names})


def build_reference(data_dir: str | Path, prep: Any) -> tuple[LesionReference, str]:
    """The reference from every real FCD case of `data_dir` (train and test), preprocessed onto `prep`'s grid;
    with the text that says where it came from. ValueError when no case has a lesion there."""
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.eval.metrics import load_real_cases

    root = resolve_data_dir(data_dir)
    real, _ = load_real_cases(root, prep)
    stats = [lesion_stats(case["image"], case["mask"], prep.spacing) for case in real]
    name = str(data_dir) if not Path(str(data_dir)).is_absolute() else str(root)
    return reference_from_real(stats), f"{len(real)} real FCD lesions of {name} on the {prep.shape[0]} voxel grid"


def shipped_reference(folder: Path) -> LesionReference | None:
    """The reference an adapter folder ships (`lesion_reference.json`), or None when it has none."""
    path = Path(folder) / REFERENCE_FILE
    return reference_from_dict(json.loads(path.read_text())) if path.is_file() else None


def adapter_reference(adapter: str | Path, cache_dir: Path | None = None, mode: str = "auto") -> LesionReference:
    """The reference an adapter's pairs are judged against: its folder's `lesion_reference.json`, else the cached
    or freshly built reference of its training data on its model grid (written into `cache_dir` when given)."""
    from neuromf.models.adapter_meta import AdapterMeta, generation_mode, resolve_adapter_dir
    from neuromf.utils import atomic_write_json

    # an explicit mode names the shipped folder of every shipped name (embedded-3mm included)
    folder = resolve_adapter_dir(adapter, mode if mode != "auto" else generation_mode(adapter))
    shipped = shipped_reference(folder)
    if shipped is not None:
        return shipped
    meta = AdapterMeta.load(folder)
    key = hashlib.sha256(json.dumps([str(meta.data_dir), meta.prep.key()], sort_keys=True).encode()).hexdigest()
    cached = None if cache_dir is None else Path(cache_dir) / f"{key[:16]}.json"
    if cached is not None and cached.is_file():
        return reference_from_dict(json.loads(cached.read_text()))
    ref, source = build_reference(meta.data_dir, meta.prep)
    if cached is not None:
        atomic_write_json(cached, reference_to_dict(ref, source))
    return ref


@dataclass
class PairVerdict:
    """The lesion check of one pair: passed or not, and which criteria failed (keys of `CRITERIA`)."""

    lesion_like: bool
    failed: list[str]
    judged: list[str]

    def describe(self) -> str:
        """"passes the lesion check" or "fails the lesion check: empty mask; partly outside the brain"."""
        if self.lesion_like:
            return "passes the lesion check" if "contrast" in self.judged else "passes the lesion check (mask)"
        return "fails the lesion check: " + "; ".join(FAILURE_WORDS[name] for name in self.failed)


def pair_verdict(stats: LesionStats, ref: LesionReference, criteria: tuple[str, ...] = CRITERIA) -> PairVerdict:
    """`stats` judged by `criteria` (a subset of `CRITERIA`) against `ref`."""
    result = lesion_like(stats, ref)
    failed = [name for name in criteria if not result[name]]
    return PairVerdict(not failed, failed, list(criteria))


def check_pair(image: Any, mask: Any, spacing: tuple[float, float, float], ref: LesionReference,
               criteria: tuple[str, ...] = CRITERIA) -> tuple[LesionStats, PairVerdict]:
    """The figures and the verdict of one (FLAIR, mask) pair on a grid of voxel size `spacing` (mm)."""
    stats = lesion_stats(image, mask, spacing)
    return stats, pair_verdict(stats, ref, criteria)


__all__ = ["FAILURE_WORDS", "MASK_CRITERIA", "REFERENCE_FILE", "PairVerdict", "adapter_reference", "build_reference",
           "check_pair", "pair_verdict", "reference_from_dict", "reference_to_dict"]
