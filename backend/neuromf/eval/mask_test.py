"""P7-T1: can the image VAE carry a lesion mask? Round-trip Dice of strategy A vs strategy B, and the decision."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from statistics import mean, median
from typing import Any

import numpy as np
import torch

from neuromf.data.fcd_dataset import DOWNSAMPLE_MODES, downsample_mask, upsample_mask
from neuromf.data.latents import resolve_data_dir
from neuromf.eval.metrics import dice
from neuromf.io.bids import Case, discover_cases
from neuromf.io.nifti import Preprocessing, preprocess_pair
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper

DICE_THRESHOLD = 0.85  # the seed's decision criterion: strategy A when its mean Dice exceeds this
SIZE_BINS = ((0.0, 2.0, "<2 cm3"), (2.0, 5.0, "2-5 cm3"), (5.0, 10.0, "5-10 cm3"), (10.0, float("inf"), ">=10 cm3"))


def size_bin(volume_cm3: float) -> str:
    return next(label for lo, hi, label in SIZE_BINS if lo <= volume_cm3 < hi)


@torch.no_grad()
def vae_round_trip(mask: torch.Tensor, vae: MAISIVAEWrapper, threshold: float = 0.5) -> torch.Tensor:
    """(1, H, W, D) binary mask -> encode -> decode -> threshold (strategy A's inverse)."""
    return (vae.decode(vae.encode(mask[None].float()))[0].cpu() > threshold).float()


def reconstruct_mask(case: Case, vae: MAISIVAEWrapper, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """The strategy-A reconstruction of a case's mask on the model grid, with that grid's affine (for overlays)."""
    _, mask = preprocess_pair(case.image, case.mask, prep)
    return vae_round_trip(mask.data, vae)[0].numpy().astype(np.uint8), mask.affine


def _case_row(case: Case, vae: MAISIVAEWrapper, prep: Preprocessing, threshold: float) -> dict[str, Any]:
    _, mask = preprocess_pair(case.image, case.mask, prep)
    m = mask.data
    volume = float(m.sum()) * float(np.prod(prep.spacing)) / 1000.0
    round_trip_b = {mode: dice(upsample_mask(downsample_mask(m[None], mode), threshold)[0].numpy(), m.numpy())
                    for mode in DOWNSAMPLE_MODES}
    return {"id": case.case_id, "split": case.split, "lesion_cm3": round(volume, 3), "size_bin": size_bin(volume),
            "dice_vae": dice(vae_round_trip(m, vae, threshold).numpy(), m.numpy()), "dice_downsample": round_trip_b}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_bin = {}
    for _, _, label in SIZE_BINS:
        members = [r for r in rows if r["size_bin"] == label]
        if members:
            by_bin[label] = {"n": len(members), "mean_dice_vae": mean(r["dice_vae"] for r in members),
                             "mean_dice_downsample": {m: mean(r["dice_downsample"][m] for r in members)
                                                      for m in DOWNSAMPLE_MODES}}
    return {
        "n_cases": len(rows),
        "mean_dice_vae": mean(r["dice_vae"] for r in rows),
        "median_dice_vae": median(r["dice_vae"] for r in rows),
        "mean_dice_downsample": {m: mean(r["dice_downsample"][m] for r in rows) for m in DOWNSAMPLE_MODES},
        "median_dice_downsample": {m: median(r["dice_downsample"][m] for r in rows) for m in DOWNSAMPLE_MODES},
        "by_size_bin": by_bin,
    }


def mask_vae_test(data_dir: Path | str, vae: MAISIVAEWrapper, prep: Preprocessing, threshold: float = 0.5,
                  on_case: Callable[[dict[str, Any]], None] | None = None,
                  cases: list[Case] | None = None) -> dict[str, Any]:
    """Dice of encode -> decode -> threshold for every FCD case, strategy-B round trips, and the decision."""
    root = resolve_data_dir(data_dir)
    cases = cases if cases is not None else discover_cases(root, group="fcd")
    rows = []
    for case in cases:
        if case.mask is None:
            continue
        row = _case_row(case, vae, prep, threshold)
        if not row["lesion_cm3"]:
            row["problem"] = "empty mask"
        rows.append(row)
        if on_case is not None:
            on_case(row)
    rows = [r for r in rows if "problem" not in r] or rows
    if not rows:
        raise ValueError(f"{root}: no FCD cases with lesion masks to test")
    summary = summarise(rows)
    decision = "vae" if summary["mean_dice_vae"] > DICE_THRESHOLD else "downsample"
    return {"data_dir": str(root), "vae": vae.source, "vae_preset": vae.preset, "vae_identity": vae.identity,
            "preprocessing": prep.key(), "round_trip_threshold": threshold, "cases": rows, "summary": summary,
            "threshold": DICE_THRESHOLD, "decision": decision,
            "reason": f"mean strategy-A Dice {summary['mean_dice_vae']:.3f} "
                      f"{'>' if decision == 'vae' else '<='} {DICE_THRESHOLD}"}


def save_mask_test(result: dict[str, Any], path: Path | str) -> Path:
    return atomic_write_json(Path(path), result)


def read_decision(path: Path | str) -> str:
    """The strategy chosen by a saved mask test (for `data.mask_strategy: auto`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask test result not found; run `neuromf mask-test` first or set "
                                "data.mask_strategy to 'vae' or 'downsample'")
    decision = json.loads(path.read_text()).get("decision")
    if decision not in ("vae", "downsample"):
        raise ValueError(f"{path}: no valid 'decision' in the mask test result (got {decision!r})")
    return decision
