"""The lesion check of single generated pairs, and the quick check of a trained adapter before it is offered.

`neuromf evaluate` judges a folder of pairs against the real lesions (`neuromf.eval.lesion_metrics`). Here the
same criteria judge one pair at a time, as it arrives in the napari Generate dock, against the real FCD lesions of
the data the adapter was trained on (preprocessed onto its model grid). That reference is read from the adapter
folder's `lesion_reference.json` when it ships one (the embedded adapters do: their training phantoms are generated
on first use, minutes on a CPU), else built from the adapter's training data and cached in `cache_dir`.

`quick_adapter_check` draws a few pairs from a trained joint adapter with its own sampler settings and puts each
mask through the check. The FLAIR of those pairs is the joint model's own, which shows a lesion only faintly (the
shipped configuration renders it with a conditional adapter), so the quick check judges the mask: every criterion
but the FLAIR contrast. An adapter is recommended when every pair drawn passes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuromf.eval.lesion_metrics import (
    CRITERIA,
    LesionReference,
    LesionStats,
    lesion_like,
    lesion_stats,
    reference_from_real,
)

REFERENCE_FILE = "lesion_reference.json"
QUICK_CHECK_PAIRS = 2
QUICK_CHECK_SEED = 1234  # not the Generate dock's default seed 0: the check sees pairs the user has not chosen
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


def adapter_reference(adapter: str | Path, cache_dir: Path | None = None, mode: str = "auto") -> LesionReference:
    """The reference an adapter's pairs are judged against: its folder's `lesion_reference.json`, else the cached
    or freshly built reference of its training data on its model grid (written into `cache_dir` when given)."""
    from neuromf.models.adapter_meta import adapter_meta, generation_mode, resolve_adapter_dir
    from neuromf.utils import atomic_write_json

    folder = resolve_adapter_dir(adapter, generation_mode(adapter, mode))
    if (folder / REFERENCE_FILE).is_file():
        return reference_from_dict(json.loads((folder / REFERENCE_FILE).read_text()))
    meta = adapter_meta(adapter, mode)
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


@dataclass
class AdapterCheck:
    """The quick check of a trained adapter: recommended or not, why, and each pair's verdict."""

    adapter: str
    recommended: bool
    reason: str
    pairs: list[dict[str, Any]] = field(default_factory=list)  # per pair: volume_cm3, lesion_like, failed
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterCheck:
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})


def quick_sampling(adapter: str | Path) -> tuple[str, int]:
    """(sampler, steps) a joint adapter needs for a mask: 32 Euler steps for x-prediction, else one MeanFlow step."""
    from neuromf.models.adapter_meta import adapter_meta

    return ("euler", 32) if adapter_meta(adapter, "joint").mask_prediction == "x" else ("meanflow", 1)


def quick_adapter_check(adapter: str | Path, n: int = QUICK_CHECK_PAIRS, seed: int = QUICK_CHECK_SEED,
                        device: str = "auto", cache_dir: Path | None = None,
                        on_step: Callable[[int, int], None] | None = None,
                        stop: threading.Event | None = None) -> AdapterCheck:
    """Draw `n` pairs from a joint adapter with its own sampling (`quick_sampling`) and put each mask through the
    lesion check (`MASK_CRITERIA`) against its training lesions. Recommended when every pair passes. `stop` set:
    `neuromf.meanflow.samplers.SamplingStopped` before the next network step."""
    from neuromf.pipelines.joint import generate_pairs

    ref = adapter_reference(adapter, cache_dir, "joint")
    method, steps = quick_sampling(adapter)
    rows = []
    for pair in generate_pairs(adapter, n=n, steps=steps, seed=seed, device=device, method=method,
                               on_step=on_step, stop=stop):
        spacing = tuple(float(s) for s in np.sqrt((np.asarray(pair.affine)[:3, :3] ** 2).sum(axis=0)))
        stats, verdict = check_pair(pair.image, pair.mask, spacing, ref, MASK_CRITERIA)
        rows.append({"volume_cm3": round(stats.volume_cm3, 2), "lesion_like": verdict.lesion_like,
                     "failed": verdict.failed, "verdict": verdict.describe()})
    failing = [row for row in rows if not row["lesion_like"]]
    if not failing:
        reason = f"all {len(rows)} pairs drawn pass the lesion check of their masks"
    else:
        reason = f"{len(failing)} of {len(rows)} pairs drawn fail the lesion check: " + "; ".join(
            f"pair {rows.index(row) + 1}: {', '.join(FAILURE_WORDS[name] for name in row['failed'])}"
            for row in failing)
    return AdapterCheck(str(adapter), not failing, reason, rows,
                        {"n": n, "seed": seed, "sampler": method, "steps": steps, "criteria": list(MASK_CRITERIA)})


__all__ = ["FAILURE_WORDS", "MASK_CRITERIA", "REFERENCE_FILE", "AdapterCheck", "PairVerdict", "adapter_reference",
           "build_reference", "check_pair", "pair_verdict", "quick_adapter_check", "quick_sampling",
           "reference_from_dict", "reference_to_dict"]
