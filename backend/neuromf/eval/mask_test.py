"""P7-T1: can the image VAE carry a lesion mask? Round-trip Dice of strategy A vs strategy B, and the decision.

Also the ceilings of lesion synthesis, measured on the real cases before any generator is trained: the FLAIR
contrast of each lesion against a 2-voxel ring after preprocessing and after a VAE round trip of the image (a
generator cannot show a lesion its inputs no longer show), and whether the "sdf" mask representation's perfect
round trip still looks like a lesion (`neuromf.eval.lesion_metrics`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from statistics import mean, median
from typing import Any

import numpy as np
import torch

from neuromf.data.embedded import resolve_data_dir
from neuromf.data.latent_cache import LatentCache
from neuromf.data.latents import encode_case
from neuromf.data.mask_codec import (
    DOWNSAMPLE_MODES,
    decode_sdf,
    downsample_mask,
    encode_sdf,
    tanh_threshold,
    upsample_mask,
)
from neuromf.eval.lesion_metrics import lesion_like, lesion_stats, reference_from_real
from neuromf.eval.metrics import dice
from neuromf.io.bids import Case, DataError, discover_cases, validate_case
from neuromf.io.nifti import Preprocessing, preprocess_pair
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper

DICE_THRESHOLD = 0.85  # the seed's decision criterion: strategy A when its mean Dice exceeds this
SDF_SCALE_MM, SDF_SUBGRID, SDF_THRESHOLD_MM = 6.0, 2, -1.0  # the "sdf" representation's defaults (configs)
CEILING_CONTRAST, CEILING_HYPERINTENSE = 1.2, 0.9  # acceptance: median contrast and share hyperintense
SIZE_BINS = ((0.0, 2.0, "<2 cm3"), (2.0, 5.0, "2-5 cm3"), (5.0, 10.0, "5-10 cm3"), (10.0, float("inf"), ">=10 cm3"))


def size_bin(volume_cm3: float) -> str:
    """The `SIZE_BINS` label of a lesion volume in cm3."""
    return next(label for lo, hi, label in SIZE_BINS if lo <= volume_cm3 < hi)


@torch.no_grad()
def vae_round_trip(mask: torch.Tensor, vae: MAISIVAEWrapper, threshold: float = 0.5) -> torch.Tensor:
    """(1, H, W, D) binary mask -> encode -> decode -> threshold (strategy A's inverse)."""
    return (vae.decode(vae.encode(mask[None].float()))[0].cpu() > threshold).float()


def reconstruct_mask(case: Case, vae: MAISIVAEWrapper, prep: Preprocessing, strategy: str = "vae",
                     downsample_mode: str = "nearest", threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A case's mask on the model grid after the round trip of one mask encoding (``strategy``: "vae" = through
    the image VAE, "downsample" = shrunk to the latent grid by ``downsample_mode`` and grown back, "sdf" = as a
    signed distance map), with that grid's affine (for overlays): the mask as the generator learns it."""
    _, mask = preprocess_pair(case.image, case.mask, prep)
    if strategy == "vae":
        out = vae_round_trip(mask.data, vae, threshold)[0]
    elif strategy == "downsample":
        out = upsample_mask(downsample_mask(mask.data[None], downsample_mode), threshold)[0, 0]
    elif strategy == "sdf":
        out = sdf_round_trip(mask.data, prep.spacing)[0]
    else:
        raise ValueError(f"reconstruct_mask: strategy must be 'vae', 'downsample' or 'sdf', got {strategy!r}")
    return out.numpy().astype(np.uint8), mask.affine


def recommended_encoding(result: dict[str, Any]) -> tuple[str, str]:
    """(strategy, downsample mode) a mask test's result recommends: its decision, and for "downsample" the mode
    that round-trips best (the mode is unused by the other strategies)."""
    modes = result["summary"]["mean_dice_downsample"]
    return result["decision"], max(modes, key=modes.get)


def sdf_round_trip(mask: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """(1, H, W, D) binary mask -> "sdf" channels -> decoded mask: the representation's perfect round trip."""
    channels = encode_sdf(mask[None].float(), spacing, SDF_SCALE_MM, SDF_SUBGRID)
    return decode_sdf(channels, SDF_SUBGRID, tanh_threshold(SDF_THRESHOLD_MM, SDF_SCALE_MM))[0]


def _case_row(case: Case, vae: MAISIVAEWrapper, prep: Preprocessing, threshold: float,
              cache: LatentCache | None = None) -> dict[str, Any]:
    preprocessed = functools.cache(functools.partial(preprocess_pair, case.image, case.mask, prep))
    image, mask = preprocessed()
    m = mask.data
    volume = float(m.sum()) * float(np.prod(prep.spacing)) / 1000.0
    round_trip_b = {mode: dice(upsample_mask(downsample_mask(m[None], mode), threshold)[0].numpy(), m.numpy())
                    for mode in DOWNSAMPLE_MODES}
    sdf = sdf_round_trip(m, prep.spacing)
    with torch.no_grad():
        # through the latent cache when given: the same entry a training run on this grid reads, so a mask test
        # before training spares it the encoding of every unmirrored case
        z_img = (encode_case(case.image, case.mask, vae, prep, cache, preprocessed=preprocessed)["z_img"][None]
                 if cache is not None else vae.encode(image.data[None]))
        image_rt = vae.decode(z_img)[0].cpu().clamp(0, prep.clip_max)
    stats = lesion_stats(image.data.numpy(), m.numpy(), prep.spacing)
    return {"id": case.case_id, "split": case.split, "lesion_cm3": round(volume, 3), "size_bin": size_bin(volume),
            "dice_vae": dice(vae_round_trip(m, vae, threshold).numpy(), m.numpy()), "dice_downsample": round_trip_b,
            "dice_sdf": dice(sdf.numpy(), m.numpy()),
            "contrast_preprocessed": stats.contrast,
            "contrast_vae_round_trip": lesion_stats(image_rt.numpy(), m.numpy(), prep.spacing).contrast,
            # kept for the lesion-likeness of the sdf round trip (dropped before saving)
            "_stats": stats, "_sdf_stats": lesion_stats(image.data.numpy(), sdf.numpy(), prep.spacing)}


def ceilings(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What any generator is bounded by: lesion contrast after preprocessing and a VAE round trip, and the share
    of real lesions whose "sdf" round trip passes every lesion-likeness criterion (reference: the real lesions)."""
    ref = reference_from_real([r["_stats"] for r in rows])
    hyper = ref.min_contrast  # "clearly hyperintense": 1 + half of the real lesions' median excess

    def share(key: str) -> float:
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.mean([v >= hyper for v in values])) if values else 0.0

    median_pre = median(r["contrast_preprocessed"] for r in rows if r["contrast_preprocessed"] is not None)
    median_vae = median(r["contrast_vae_round_trip"] for r in rows if r["contrast_vae_round_trip"] is not None)
    sdf_like = float(np.mean([lesion_like(r["_sdf_stats"], ref)["all"] for r in rows]))
    return {
        "hyperintense_threshold": hyper,
        "median_contrast_preprocessed": median_pre, "median_contrast_vae_round_trip": median_vae,
        "share_hyperintense_preprocessed": share("contrast_preprocessed"),
        "share_hyperintense_vae_round_trip": share("contrast_vae_round_trip"),
        "sdf_round_trip_lesion_like": sdf_like,
        "meets_acceptance": bool(median_vae >= CEILING_CONTRAST and share("contrast_vae_round_trip")
                                 >= CEILING_HYPERINTENSE and sdf_like >= CEILING_HYPERINTENSE),
        "acceptance": f"median contrast after the VAE round trip >= {CEILING_CONTRAST}, >= "
                      f"{CEILING_HYPERINTENSE:.0%} of lesions hyperintense, >= {CEILING_HYPERINTENSE:.0%} of sdf "
                      "round trips lesion-like",
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean / median Dice per representation over all cases, and per lesion-size bin."""
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
        "mean_dice_sdf": mean(r["dice_sdf"] for r in rows),
        "min_dice_sdf": min(r["dice_sdf"] for r in rows),
        "by_size_bin": by_bin,
    }


def model_grid(vae: MAISIVAEWrapper, shape: Any = None, spacing: Any = None) -> Preprocessing:
    """The grid to test on: `shape` / `spacing` where given, else the grid the VAE was trained on (its sidecar's
    `preprocessing`), else 64^3 voxels of 3 mm."""
    trained = (getattr(vae, "metadata", None) or {}).get("preprocessing") or {}
    return Preprocessing(shape=tuple(shape or trained.get("shape") or (64, 64, 64)),
                         spacing=tuple(spacing or trained.get("spacing") or (3.0, 3.0, 3.0)))


def mask_vae_test(data_dir: Path | str, vae: MAISIVAEWrapper, prep: Preprocessing, threshold: float = 0.5,
                  on_case: Callable[[dict[str, Any]], None] | None = None,
                  cases: list[Case] | None = None, cache: LatentCache | None = None) -> dict[str, Any]:
    """Dice of encode -> decode -> threshold for every FCD case, strategy-B round trips, and the decision.

    With `cache` (`neuromf.data.latents.make_cache` for this VAE and grid) the images' latents are read from and
    stored in it, as a training run on the same grid stores them.

    Unusable cases (unreadable, NaN, mismatched or empty masks, `validate_case`) and masks that are empty on
    the model grid are skipped, listed under "skipped"; a decision from no usable case is a DataError.
    """
    root = resolve_data_dir(data_dir)
    cases = cases if cases is not None else discover_cases(root, group="fcd")
    rows, skipped = [], []
    for case in cases:
        if case.mask is None:
            continue
        report = validate_case(case)
        if not report["usable"]:
            skipped.append({"id": case.case_id, "problems": [p for p in report["problems"] if p]})
            continue
        row = _case_row(case, vae, prep, threshold, cache)
        if not row["lesion_cm3"]:
            skipped.append({"id": case.case_id, "problems": [f"{case.mask.name}: empty mask on the model grid "
                                                             "(the lesion lies outside the cropped window)"]})
            continue
        rows.append(row)
        if on_case is not None:
            on_case({k: v for k, v in row.items() if not k.startswith("_")})
    if not rows:
        reasons = "; ".join(f"{r['id']}: {r['problems'][-1]}" for r in skipped[:3]) or "no case has a lesion mask"
        raise DataError(f"{root}: no usable FCD case with a lesion mask to test ({len(skipped)} skipped: {reasons})")
    summary = summarise(rows)
    summary["ceilings"] = ceilings(rows)
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    # the seed's rule: A when its Dice > 0.85; otherwise strategy B, in its best-round-tripping representation
    best_b = max(summary["mean_dice_downsample"].values())
    if summary["mean_dice_vae"] > DICE_THRESHOLD:
        decision, why = "vae", f"mean strategy-A Dice {summary['mean_dice_vae']:.3f} > {DICE_THRESHOLD}"
    elif summary["mean_dice_sdf"] > best_b:
        decision, why = "sdf", (f"mean strategy-A Dice {summary['mean_dice_vae']:.3f} <= {DICE_THRESHOLD}; strategy B "
                                f"as a signed distance round-trips at {summary['mean_dice_sdf']:.3f} vs "
                                f"{best_b:.3f} binary")
    else:
        decision, why = "downsample", f"mean strategy-A Dice {summary['mean_dice_vae']:.3f} <= {DICE_THRESHOLD}"
    return {"data_dir": str(root), "vae": vae.source, "vae_preset": vae.preset, "vae_identity": vae.identity,
            "preprocessing": prep.key(), "round_trip_threshold": threshold, "cases": rows, "summary": summary,
            "threshold": DICE_THRESHOLD, "decision": decision, "skipped": skipped, "reason": why}


def save_mask_test(result: dict[str, Any], path: Path | str) -> Path:
    """Write the mask test's result JSON atomically (`read_decision` reads it back)."""
    return atomic_write_json(Path(path), result)


def read_decision(path: Path | str) -> str:
    """The strategy chosen by a saved mask test (for `data.mask_strategy: auto`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask test result not found; run `neuromf mask-test` first or set "
                                "data.mask_strategy to 'vae' or 'downsample'")
    decision = json.loads(path.read_text()).get("decision")
    if decision not in ("vae", "downsample", "sdf"):
        raise ValueError(f"{path}: no valid 'decision' in the mask test result (got {decision!r})")
    return decision
