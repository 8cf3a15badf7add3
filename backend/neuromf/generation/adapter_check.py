"""The quick check of a trained joint adapter before the napari Generate dock offers it.

A short or failed training often draws empty masks or lesions outside the brain. `quick_adapter_check` draws a few
pairs with the adapter's own sampler settings and puts each mask through the lesion check
(`neuromf.eval.lesion_check`, `MASK_CRITERIA`: the joint model's own FLAIR shows a lesion only faintly) against the
real lesions it was trained on. An adapter is recommended when every pair drawn passes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuromf.eval.lesion_check import FAILURE_WORDS, MASK_CRITERIA, adapter_reference, check_pair

QUICK_CHECK_PAIRS = 2
QUICK_CHECK_SEED = 1234  # not the Generate dock's default seed 0: the check sees pairs the user has not chosen


@dataclass
class AdapterCheck:
    """The quick check of a trained adapter: recommended or not, why, and each pair's verdict."""

    adapter: str
    recommended: bool
    reason: str
    pairs: list[dict[str, Any]] = field(default_factory=list)  # per pair: volume_cm3, lesion_like, failed
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON-ready values (napari remembers it across sessions)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AdapterCheck:
        """A check from `to_dict`'s values (unknown keys ignored)."""
        return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})

    def summary(self, most: int = 2) -> str:
        """The verdict in one short line: ``"makes lesions (2 of 2 pairs pass)"`` or ``"2 of 2 pairs fail: empty
        mask"``: the failed criteria in the lesion check's order, each once, the first `most` named (an empty mask
        fails the other criteria too: only its emptiness is named); `reason` says which pair failed which."""
        if self.recommended:
            return f"makes lesions ({len(self.pairs)} of {len(self.pairs)} pairs pass)"
        failing = [row for row in self.pairs if not row.get("lesion_like")]
        failed = {name for row in failing
                  for name in (["nonempty"] if "nonempty" in row.get("failed", []) else row.get("failed", []))}
        words = [FAILURE_WORDS[name] for name in MASK_CRITERIA if name in failed]
        words += sorted(name for name in failed if name not in FAILURE_WORDS)
        named = ", ".join(words[:most]) + (f" and {len(words) - most} more" if len(words) > most else "")
        return f"{len(failing)} of {len(self.pairs)} pairs fail" + (f": {named}" if named else "")


def quick_sampling(adapter: str | Path) -> tuple[str, int]:
    """(sampler, steps) a joint adapter needs for a mask: 32 Euler steps for x-prediction, else one MeanFlow step."""
    from neuromf.models.adapter_meta import adapter_meta

    return ("euler", 32) if adapter_meta(adapter, "joint").mask_prediction == "x" else ("meanflow", 1)


def quick_adapter_check(adapter: str | Path, n: int = QUICK_CHECK_PAIRS, seed: int = QUICK_CHECK_SEED,
                        device: str = "auto", cache_dir: Path | None = None,
                        on_step: Callable[[int, int], None] | None = None,
                        stop: threading.Event | None = None) -> AdapterCheck:
    """Draw `n` pairs from a joint adapter with its own sampling (`quick_sampling`) and put each mask through the
    lesion check (`MASK_CRITERIA`) against its training lesions. Recommended when every pair passes at its first draw
    (no re-draw of small masks: the check judges what the adapter draws, not what re-drawing hides). `stop` set:
    `neuromf.meanflow.samplers.SamplingStopped` before the next network step."""
    from neuromf.generation.joint import generate_pairs  # torch and the models: on use

    ref = adapter_reference(adapter, cache_dir, "joint")
    method, steps = quick_sampling(adapter)
    rows = []
    for pair in generate_pairs(adapter, n=n, steps=steps, seed=seed, device=device, method=method,
                               on_step=on_step, stop=stop, mask_draws=1):
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


__all__ = ["QUICK_CHECK_PAIRS", "QUICK_CHECK_SEED", "AdapterCheck", "quick_adapter_check", "quick_sampling"]
