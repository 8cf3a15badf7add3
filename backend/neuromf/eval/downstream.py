"""Downstream benchmark: do generated (FLAIR, lesion mask) pairs help a lesion segmenter trained on real FCD cases?

A small MONAI UNet (`neuromf.eval.segmenter.build_segmenter`) is trained the nnU-Net way within a fixed budget:
random patches, a third of them centred on a lesion voxel, Dice + cross-entropy, mirroring on every axis, a small
intensity scale/shift and, now and then, a small rotation/scaling; then sliding-window inference
(`monai.inferers.sliding_window_inference`, Gaussian-weighted) on the held-out real test cases. Each arm trains on
its own mix and is scored on the same test cases:

- ``R``: the real training cases only;
- ``R+<source>``: R plus one folder of pairs (inpainted, joint, conditional) and ``R+synthetic``: R plus all of them;
- ``R+<mask source> masks``: R plus the pairs whose provenance says where their masks came from ("prior": the
  conditional prior re-places training lesions; "joint": new shapes drawn by the joint model), when that set is not
  already an arm;
- ``synthetic-only``, ``50%R+synthetic`` (a different random half of R per seed) and its control ``50%R`` (the same
  half, no synthetic pair): what the pairs add where labelled cases are scarce (other shares of R on request:
  ``25%R+synthetic`` and ``25%R``, ...);
- ``R+extra-real`` and ``50%R+extra-real``, when labelled real cases outside R and the test set are given: those
  cases added exactly as the synthetic pairs are (same share of patches). Not a goal but the ceiling: what perfect
  pairs could add to this segmenter, budget and data.

Per arm and seed: voxel Dice (mean over test cases), lesion-wise sensitivity and false-positive components per scan
(`lesion_detection`). Arms are compared with R paired over seeds (`paired_difference`: mean difference and a 95%
t-interval). Each (arm, seed) result is written atomically as it finishes; a re-run skips the finished ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage, stats

from neuromf.eval.metrics import dice, load_generated, load_real_cases
from neuromf.eval.segmenter import crop_patch, train_segmenter
from neuromf.io.nifti import Preprocessing

__all__ = ["Arm", "BenchmarkSettings", "QUICK", "SOURCES", "format_table", "keep_lesion_like", "lesion_detection",
           "mask_source", "paired_difference", "plan_arms", "real_subset", "run_downstream_benchmark",
           "segment_sliding", "summarise"]

SOURCES = ("inpainted", "joint", "conditional")
EXTRA_REAL = "extra-real"  # the pool source of labelled real cases outside R and the test set (the ceiling arms)
REAL = "R"
HALF_REAL = "50%R"  # the scarce-labels control: each seed's random half of R, no synthetic pair
CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-connected lesion components
GOAL_DICE_GAIN = 0.05
GOAL_SYNTHETIC_ONLY = 0.8


@dataclass(frozen=True)
class BenchmarkSettings:
    """The segmenter's fixed budget and augmentation (the defaults are the measured full-run budget)."""

    steps: int = 300
    patch: int = 48
    batch: int = 2
    lr: float = 1e-2
    lesion_fraction: float = 1 / 3  # nnU-Net's foreground oversampling
    intensity_scale: float = 0.1  # image x U(1 - s, 1 + s)
    intensity_shift: float = 0.05  # image + U(-s, s) (images are ~[0, 1.5])
    affine_probability: float = 0.2
    rotate_degrees: float = 10.0
    scale_range: float = 0.1
    overlap: float = 0.25  # sliding-window inference
    threshold: float = 0.5
    synthetic_share: float | None = None  # share of patches drawn from synthetic pairs; None = uniform over cases


QUICK = BenchmarkSettings(steps=30, patch=32, batch=2)


@dataclass
class Arm:
    """One training mix: a share of the real training cases plus a set of synthetic pairs (keys into the pool)."""

    name: str
    real_fraction: float
    synthetic: list[str] = field(default_factory=list)
    description: str = ""


def mask_source(meta: dict[str, Any]) -> str | None:
    """Where a pair's mask came from, read from its provenance JSON: the generator's `mask_source` ("prior",
    "given", "joint", ...) or, for the joint mode, "joint"; None when the JSON does not say."""
    if isinstance(meta.get("mask_source"), str):
        return str(meta["mask_source"])
    return "joint" if meta.get("mode") == "joint" else None


def _read_meta(folder: Path, sample_id: str) -> dict[str, Any]:
    path = folder / f"{sample_id}.json"
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    return meta if isinstance(meta, dict) else {}


def load_sources(folders: dict[str, Path | str | None], prep: Preprocessing,
                 notes: list[str]) -> dict[str, dict[str, Any]]:
    """The synthetic pool: `{f"{source}/{sample id}": pair}` for every folder that exists and holds pairs on the
    grid of `prep` (pair: image, mask, source, mask_source). A folder not given or not usable is noted and skipped;
    pairs on another grid raise (a wrong folder is a user error, not a missing source)."""
    pool: dict[str, dict[str, Any]] = {}
    for source, folder in folders.items():
        if folder is None:
            notes.append(f"{source}: no folder given; its arms are skipped")
            continue
        folder = Path(folder)
        if not folder.is_dir():
            notes.append(f"{source}: {folder} does not exist; its arms are skipped")
            continue
        try:
            pairs = load_generated(folder, prep)
        except ValueError as err:
            if "no generated pairs found" not in str(err):
                raise
            notes.append(f"{source}: {folder} holds no pairs; its arms are skipped")
            continue
        for pair in pairs:
            pool[f"{source}/{pair['id']}"] = {"image": pair["image"], "mask": pair["mask"].astype(np.uint8),
                                              "source": source,
                                              "mask_source": mask_source(_read_meta(folder, pair["id"]))}
    return pool


def keep_lesion_like(pool: dict[str, dict[str, Any]], real_train: list[dict], prep: Preprocessing,
                     notes: list[str]) -> dict[str, dict[str, Any]]:
    """The pairs of `pool` that pass every lesion-likeness criterion against the real training lesions."""
    from neuromf.eval.lesion_metrics import lesion_like, lesion_stats, reference_from_real

    ref = reference_from_real([lesion_stats(c["image"], c["mask"], prep.spacing) for c in real_train])
    kept = {k: p for k, p in pool.items() if lesion_like(lesion_stats(p["image"], p["mask"], prep.spacing), ref)["all"]}
    notes.append(f"lesion-like filter: {len(kept)} of {len(pool)} synthetic pairs kept")
    return kept


def load_extra_real(data_dir: Path, prep: Preprocessing, out_dir: Path, known: list[dict],
                    notes: list[str]) -> dict[str, dict[str, Any]]:
    """The labelled real FCD cases of `data_dir` (every split) as pool entries of source `EXTRA_REAL`; a case
    identical to one of `known` (R or the test set) raises: the ceiling must come from cases the segmenter and the
    test have not seen."""
    def digest(image: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()

    cases, found = _real_cases_cached(data_dir, prep, out_dir)
    seen = {digest(c["image"]): c["id"] for c in known}
    pool = {}
    for case in cases:
        own = seen.get(digest(case["image"]))
        if own is not None:
            raise ValueError(f"{data_dir}: extra real case {case['id']} is the benchmark's own case {own} "
                             "(give cases outside its train and test sets)")
        pool[f"{EXTRA_REAL}/{case['id']}"] = {"image": case["image"], "mask": case["mask"].astype(np.uint8),
                                             "source": EXTRA_REAL, "mask_source": "real"}
    notes.extend(n for n in found if "test Dice" not in n and "used as 'train'" not in n)
    notes.append(f"extra real: {len(pool)} labelled cases from {data_dir} (the ceiling arms)")
    return pool


def scarce_label(fraction: float) -> str:
    """The name of a scarce-labels arm's real part: 0.5 -> ``50%R``, 0.25 -> ``25%R``."""
    return f"{fraction * 100:g}%R"


def plan_arms(pool: dict[str, dict[str, Any]], scarce_fractions: Sequence[float] = (0.5,)) -> list[Arm]:
    """The arms (see the module doc) for a pool of synthetic pairs and extra real cases; ``scarce_fractions``: the
    shares of R of the scarce-labels arms (``50%R+synthetic`` and its control ``50%R`` for 0.5). An arm whose pair
    set equals an earlier arm's is left out (one pool source: ``R+synthetic`` is ``R+<source>``)."""
    arms = [Arm(REAL, 1.0, [], "real training cases only")]
    keys = sorted(k for k in pool if pool[k]["source"] != EXTRA_REAL)
    extra = sorted(k for k in pool if pool[k]["source"] == EXTRA_REAL)
    seen: set[tuple[float, tuple[str, ...]]] = {(1.0, ())}

    def add(name: str, fraction: float, members: list[str], description: str, control: bool = False) -> None:
        key = (fraction, tuple(members))
        if (members or control) and key not in seen:
            seen.add(key)
            arms.append(Arm(name, fraction, members, description))

    def part(fraction: float) -> str:
        return "half" if fraction == 0.5 else scarce_label(fraction)[:-1]

    for source in SOURCES:
        add(f"R+{source}", 1.0, [k for k in keys if pool[k]["source"] == source], f"R + the {source} pairs")
    add("R+synthetic", 1.0, keys, "R + all synthetic pairs")
    for origin in sorted({str(pool[k]["mask_source"]) for k in keys if pool[k]["mask_source"] is not None}):
        add(f"R+{origin} masks", 1.0, [k for k in keys if pool[k]["mask_source"] == origin],
            f"R + the synthetic pairs whose masks came from: {origin}")
    add("synthetic-only", 0.0, keys, "all synthetic pairs, no real case")
    for f in scarce_fractions:
        add(f"{scarce_label(f)}+synthetic", f, keys, f"a random {part(f)} of R (drawn per seed) + all synthetic pairs")
    add("R+extra-real", 1.0, extra, "R + labelled real cases outside R and the test set (the ceiling)")
    for f in scarce_fractions:
        add(f"{scarce_label(f)}+extra-real", f, extra,
            f"the same random {part(f)} of R + the extra real cases (the ceiling)")
    if keys or extra:
        for f in scarce_fractions:
            add(scarce_label(f), f, [], f"the same random {part(f)} of R as {scarce_label(f)}+synthetic, no "
                                        "synthetic pair (its control)", control=True)
    return arms


def lesion_detection(predicted: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lesion-wise detection on one scan: 26-connected components; a true lesion counts as detected when any
    predicted voxel overlaps it, a predicted component that overlaps no true lesion is a false positive."""
    predicted = np.asarray(predicted) > 0.5
    truth = np.asarray(truth) > 0.5
    true_labels, n_true = ndimage.label(truth, CONNECTIVITY)
    pred_labels, n_pred = ndimage.label(predicted, CONNECTIVITY)
    detected = len(np.setdiff1d(np.unique(true_labels[predicted]), [0]))
    overlapping = np.setdiff1d(np.unique(pred_labels[truth]), [0])
    return {"lesions": int(n_true), "detected": int(detected), "predicted_components": int(n_pred),
            "false_positives": int(n_pred - len(overlapping)),
            # the size the segmenter gives the lesions it found, false positives left out
            "lesion_voxels": int(truth.sum()), "found_voxels": int(np.isin(pred_labels, overlapping).sum())}


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd and the two-sided t confidence interval of the mean (None bounds with < 2 values)."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci_low": None, "ci_high": None, "values": []}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci_low": None, "ci_high": None, "values": x.tolist()}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "values": x.tolist()}


def paired_difference(arm: dict[int, float], reference: dict[int, float], level: float = 0.95) -> dict[str, Any]:
    """`arm - reference` paired over the seeds both have (dicts seed -> value): mean, sd and a t-interval; the
    interval excludes 0 when both bounds share a sign."""
    seeds = sorted(set(arm) & set(reference))
    out = t_interval([arm[s] - reference[s] for s in seeds], level)
    out["seeds"] = seeds
    low, high = out["ci_low"], out["ci_high"]
    out["excludes_zero"] = None if low is None else bool(low > 0 or high < 0)
    return out


def _affine_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
                  settings: BenchmarkSettings) -> tuple[np.ndarray, np.ndarray]:
    """A small random rotation (about each axis) and isotropic scaling about the patch centre."""
    angles = np.deg2rad(rng.uniform(-settings.rotate_degrees, settings.rotate_degrees, 3))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        rot = np.eye(3)
        rot[a, a] = rot[b, b] = math.cos(angle)
        rot[a, b], rot[b, a] = -math.sin(angle), math.sin(angle)
        matrix = matrix @ rot
    matrix = matrix / rng.uniform(1 - settings.scale_range, 1 + settings.scale_range)
    centre = (np.asarray(image.shape) - 1) / 2
    offset = centre - matrix @ centre
    image = ndimage.affine_transform(image, matrix, offset, order=1, mode="nearest")
    mask = ndimage.affine_transform(mask, matrix, offset, order=0, mode="constant")
    return image, mask


def nnunet_draw(settings: BenchmarkSettings) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """The patch sampler for `train_segmenter`: lesion-centred with probability `lesion_fraction` (else uniform),
    then mirroring on each axis (p 1/2), the affine now and then, and an intensity scale and shift."""

    def draw(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, lesion: np.ndarray,
             patch: int) -> tuple[np.ndarray, np.ndarray]:
        img, msk = crop_patch(rng, image, mask, lesion, patch, settings.lesion_fraction)
        for axis in range(3):
            if rng.random() < 0.5:
                img, msk = np.flip(img, axis), np.flip(msk, axis)
        if rng.random() < settings.affine_probability:
            img, msk = _affine_patch(rng, np.ascontiguousarray(img), np.ascontiguousarray(msk), settings)
        scale = rng.uniform(1 - settings.intensity_scale, 1 + settings.intensity_scale)
        shift = rng.uniform(-settings.intensity_shift, settings.intensity_shift)
        return (img * scale + shift).astype(np.float32), msk

    return draw


@torch.no_grad()
def segment_sliding(model: torch.nn.Module, image: np.ndarray, settings: BenchmarkSettings) -> np.ndarray:
    """Lesion mask (uint8) of one (H, W, D) volume by Gaussian-weighted sliding-window inference over patch^3
    windows (the training patch size), sigmoid > threshold."""
    from monai.inferers import sliding_window_inference

    model.eval()
    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    roi = tuple(min(settings.patch, s) for s in image.shape)
    logits = sliding_window_inference(x, roi, 4, model, overlap=settings.overlap, mode="gaussian")
    return (torch.sigmoid(logits[0, 0]) > settings.threshold).cpu().numpy().astype(np.uint8)


def real_subset(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the real training cases an arm uses: all, none, or a seeded random share (at least one).
    `scripts/scarce_label_data.py` makes a data folder of one seed's share, to train a generator on those cases."""
    if fraction >= 1:
        return list(range(n))
    if fraction <= 0:
        return []
    k = max(1, int(round(n * fraction)))
    return sorted(np.random.default_rng([seed, 1]).choice(n, size=k, replace=False).tolist())


def _fingerprint(settings: BenchmarkSettings, arm: Arm, train_ids: list[str], test_ids: list[str],
                 preprocessing: dict[str, Any]) -> str:
    used = asdict(settings)
    if not (arm.synthetic and arm.real_fraction > 0):  # the share weighs real against synthetic: unused here
        used.pop("synthetic_share")
    text = json.dumps({"settings": used, "arm": asdict(arm), "train": train_ids, "test": test_ids,
                       "grid": preprocessing}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_arm_seed(arm: Arm, seed: int, real_train: list[dict], test: list[dict], pool: dict[str, dict[str, Any]],
                 settings: BenchmarkSettings, device: str = "cpu",
                 step_progress: Callable[[Iterable[int]], Iterable[int]] | None = None) -> dict[str, Any]:
    """Train one segmenter for (arm, seed) and score it on the test cases: per-case Dice and detection, their
    means, sensitivity (detected / all test lesions) and false positives per scan."""
    chosen = real_subset(len(real_train), arm.real_fraction, seed)
    images = [real_train[i]["image"] for i in chosen] + [pool[k]["image"] for k in arm.synthetic]
    masks = [real_train[i]["mask"].astype(np.uint8) for i in chosen] + [pool[k]["mask"] for k in arm.synthetic]
    weights = None
    if settings.synthetic_share is not None and chosen and arm.synthetic:
        share = settings.synthetic_share
        weights = [(1 - share) / len(chosen)] * len(chosen) + [share / len(arm.synthetic)] * len(arm.synthetic)
    started, started_cpu = time.perf_counter(), time.thread_time()
    model = train_segmenter(images, masks, seed=seed, steps=settings.steps, patch=settings.patch,
                            batch=settings.batch, lr=settings.lr, device=device, progress=step_progress or False,
                            draw=nnunet_draw(settings), case_weights=weights)
    trained, trained_cpu = time.perf_counter(), time.thread_time()
    cases = []
    for case in test:
        predicted = segment_sliding(model, case["image"], settings)
        cases.append({"id": case["id"], "dice": dice(predicted, case["mask"]),
                      **lesion_detection(predicted, case["mask"])})
    lesions = sum(c["lesions"] for c in cases)
    return {
        "arm": arm.name, "seed": int(seed),
        "dice": float(np.mean([c["dice"] for c in cases])),
        "sensitivity": sum(c["detected"] for c in cases) / lesions if lesions else None,
        "fp_per_scan": float(np.mean([c["false_positives"] for c in cases])),
        # median over cases of found / true lesion voxels: > 1 the segmenter paints the lesions it finds wider than
        # they are (what a soft synthetic edge would teach), < 1 narrower
        "volume_ratio": float(np.median([c["found_voxels"] / c["lesion_voxels"] for c in cases if c["lesion_voxels"]]
                                        or [np.nan])),
        "n_real": len(chosen), "n_synthetic": len(arm.synthetic),
        "real_ids": [real_train[i]["id"] for i in chosen],
        "train_seconds": trained - started, "test_seconds": time.perf_counter() - trained,
        "train_cpu_seconds": trained_cpu - started_cpu, "test_cpu_seconds": time.thread_time() - trained_cpu,
        "per_case": cases,
    }


def _metric_by_seed(runs: dict[int, dict[str, Any]], metric: str) -> dict[int, float]:
    """{seed: value} of one metric, leaving out seeds without it (None, NaN, or a run stored before it existed)."""
    values = {s: r.get(metric) for s, r in runs.items()}
    return {s: float(v) for s, v in values.items() if v is not None and not math.isnan(v)}


def summarise(rows: list[dict[str, Any]], arms: list[Arm]) -> dict[str, Any]:
    """Per arm: each metric over seeds (mean, sd, 95% t-interval) and its paired difference with R."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[int(row["seed"])] = row
    reference = by_arm.get(REAL, {})
    controls = {a.real_fraction: a.name for a in arms if 0 < a.real_fraction < 1 and not a.synthetic}
    out: dict[str, Any] = {}
    for arm in arms:
        runs = by_arm.get(arm.name, {})
        entry: dict[str, Any] = {"description": arm.description, "n_synthetic": len(arm.synthetic),
                                 "real_fraction": arm.real_fraction, "seeds": sorted(runs)}
        for metric in ("dice", "sensitivity", "fp_per_scan", "volume_ratio"):
            values = _metric_by_seed(runs, metric)
            if metric == "volume_ratio" and not values:  # runs stored before the volumes were recorded
                continue
            entry[metric] = t_interval([values[s] for s in sorted(values)])
            if arm.name != REAL:
                entry[f"{metric}_minus_R"] = paired_difference(values, _metric_by_seed(reference, metric))
            control = controls.get(arm.real_fraction) if arm.synthetic else None  # e.g. 50%R+synthetic - 50%R
            if control in by_arm:
                entry[f"{metric}_minus_{control}"] = paired_difference(values, _metric_by_seed(by_arm[control], metric))
        out[arm.name] = entry
    return out


def judge_goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of the arms in `summary`, each with its figures and met / missed / None (fewer than 2 seeds); a
    goal whose arm was not asked for is left out, not listed as undetermined."""
    goals = []
    real = summary.get(REAL, {}).get("dice", {}).get("mean")
    for name, entry in summary.items():
        if not name.startswith("R+") or name.endswith(EXTRA_REAL):
            continue
        gain, sens = entry["dice_minus_R"], entry["sensitivity_minus_R"]
        met = None
        if gain["mean"] is not None and gain["ci_low"] is not None:
            met = bool(gain["mean"] >= GOAL_DICE_GAIN and gain["excludes_zero"] and gain["ci_low"] > 0
                       and (sens["mean"] is None or sens["mean"] >= 0))
        goals.append({"goal": f"{name} beats R by >= {GOAL_DICE_GAIN} Dice, 95% CI excluding 0, sensitivity not "
                              "lower", "arm": name, "dice_gain": gain["mean"],
                      "dice_gain_ci": [gain["ci_low"], gain["ci_high"]], "sensitivity_change": sens["mean"],
                      "met": met})
    for name, test, text in (
            ("synthetic-only", lambda d: d >= GOAL_SYNTHETIC_ONLY * real, f">= {GOAL_SYNTHETIC_ONLY} x R Dice"),
            ("50%R+synthetic", lambda d: d >= real, ">= R Dice")):
        if name not in summary:
            continue
        dice_mean = summary.get(name, {}).get("dice", {}).get("mean")
        met = None if dice_mean is None or real is None else bool(test(dice_mean))
        goals.append({"goal": f"{name} {text}", "arm": name, "dice": dice_mean, "R_dice": real,
                      "ratio_to_R": None if dice_mean is None or not real else dice_mean / real, "met": met})
        added = summary.get(name, {}).get(f"dice_minus_{HALF_REAL}")
        if added is not None:  # not a goal: what the pairs add to the same half of R
            goals[-1]["dice_gain_over_half_R"] = added["mean"]
            goals[-1]["dice_gain_over_half_R_ci"] = [added["ci_low"], added["ci_high"]]
    return goals


def _interval_bar(ax: Any, x: int, entry: dict[str, Any], color: str) -> None:
    """Seeds as grey dots, the mean with its 95% interval as an error bar (just the mean with one seed)."""
    ax.scatter([x] * len(entry["values"]), entry["values"], s=10, color="grey", alpha=0.6, zorder=2)
    low = entry["ci_low"] if entry["ci_low"] is not None else entry["mean"]
    high = entry["ci_high"] if entry["ci_high"] is not None else entry["mean"]
    ax.errorbar([x], [entry["mean"]], yerr=[[entry["mean"] - low], [high - entry["mean"]]], fmt="o", color=color,
                capsize=4, zorder=3)


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry or entry["mean"] is None:
        return "-"
    text = f"{entry['mean']:.3f}"
    return text if entry["ci_low"] is None else f"{text} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"


def format_table(result: dict[str, Any]) -> str:
    """The summary as a Markdown table (mean [95% CI] over seeds) followed by the goals, met or missed."""
    lines = ["| arm | pairs (real + synthetic) | seeds | Dice | sensitivity | FP / scan | Dice - R | sensitivity - R |",
             "|---|---|---|---|---|---|---|---|"]
    n_real = result["n_real_train"]
    for name, arm in result["arms"].items():
        pairs = f"{round(n_real * arm['real_fraction'])} + {arm['n_synthetic']}"
        lines.append(f"| {name} | {pairs} | {len(arm['seeds'])} | {_ci(arm['dice'])} | {_ci(arm['sensitivity'])} | "
                     f"{_ci(arm['fp_per_scan'])} | {_ci(arm.get('dice_minus_R'))} | "
                     f"{_ci(arm.get('sensitivity_minus_R'))} |")
    lines.append("")
    for goal in result["goals"]:
        verdict = {True: "met", False: "**MISSED**", None: "not determined (fewer than 2 seeds)"}[goal["met"]]
        added = ""
        if goal.get("dice_gain_over_half_R") is not None:
            low, high = goal["dice_gain_over_half_R_ci"]
            added = f" (the pairs add {goal['dice_gain_over_half_R']:+.3f} Dice to the same half of R" + (
                ")" if low is None else f", 95% CI [{low:+.3f}, {high:+.3f}])")
        lines.append(f"- {goal['goal']}: {verdict}{added}")
    for name, arm in result["arms"].items():  # what is not a goal: the ceiling, other scarce shares
        fraction = arm["real_fraction"]
        if name == f"R+{EXTRA_REAL}":
            control, against = REAL, "R"
        elif 0 < fraction < 1 and arm["n_synthetic"] and name != f"{HALF_REAL}+synthetic":  # that one is goal 3
            control = scarce_label(fraction)
            against = "the same half of R" if fraction == 0.5 else f"the same {control[:-1]} of R"
        else:
            continue
        added = arm.get(f"dice_minus_{control}")
        if added and added["mean"] is not None:
            ceiling = name.endswith(EXTRA_REAL)
            what = f"{arm['n_synthetic']} extra real cases" if ceiling else "the pairs"
            lines.append(f"- {'ceiling' if ceiling else 'scarce labels'} (not a goal): {what} add {_ci(added)} "
                         f"Dice to {against}")
    return "\n".join(lines)


def plot_benchmark(summary: dict[str, Any], out_png: Path, title: str = "") -> Path:
    """Per arm: test Dice, lesion-wise sensitivity and false-positive components per scan (mean and 95% CI over
    seeds, seeds as dots; R's mean dashed), and Dice - R paired by seed with the +0.05 goal dotted. Colours: R
    blue, arms with synthetic pairs orange, real-only arms (scarce controls, the extra-real ceiling) green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuromf.eval.figures import _save

    names = [n for n, e in summary.items() if e["dice"]["n"]]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4), dpi=100)
    panels = (("dice", "voxel Dice (held-out real)"), ("sensitivity", "lesion-wise sensitivity"),
              ("fp_per_scan", "false-positive components / scan"), ("dice_minus_R", "Dice - R (paired by seed)"))
    for ax, (metric, label) in zip(axes, panels):
        for i, name in enumerate(names):
            entry = summary[name].get(metric)
            if entry is not None and entry["mean"] is not None:
                real_only = name.endswith(EXTRA_REAL) or not summary[name]["n_synthetic"]
                _interval_bar(ax, i, entry, "C0" if name == REAL else "C2" if real_only else "C1")
        if metric == "dice_minus_R":
            ax.axhline(0.0, color="C0", ls="--", lw=0.8)
            ax.axhline(GOAL_DICE_GAIN, color="green", ls=":", lw=1.0)
        else:
            ref = summary.get(REAL, {}).get(metric, {}).get("mean")
            if ref is not None:
                ax.axhline(ref, color="C0", ls="--", lw=0.8)
            if metric == "fp_per_scan":
                ax.set_ylim(bottom=0)
            else:
                ax.set_ylim(0, 1)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
    return _save(fig, out_png, title, palette=True)


def _result_path(out_dir: Path, arm: Arm, seed: int) -> Path:
    safe = arm.name.replace("%", "pct").replace("+", "_plus_").replace(" ", "_").replace("/", "_")
    return out_dir / "runs" / f"{safe}__seed{seed}.json"


def _real_cases_cached(data_dir: Path, prep: Preprocessing, out_dir: Path) -> tuple[list[dict], list[str]]:
    """`load_real_cases`, kept in `out_dir` as an .npz keyed by the data folder, its participants.tsv and the grid:
    parallel or resumed runs then skip the preprocessing (minutes on a busy CPU)."""
    from neuromf.utils import atomic_write

    table = data_dir / "participants.tsv"
    stamp = table.stat().st_mtime_ns if table.is_file() else 0
    text = json.dumps({"data": str(data_dir.resolve()), "stamp": stamp, "grid": prep.key()}, sort_keys=True,
                      default=str)
    path = out_dir / f"real_cases_{hashlib.sha256(text.encode()).hexdigest()[:12]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            notes = [str(n) for n in stored["notes"]]
            return [{"id": str(i), "split": str(sp), "image": im, "mask": m.astype(bool)} for i, sp, im, m in
                    zip(stored["ids"], stored["splits"], stored["images"], stored["masks"])], notes
    real, notes = load_real_cases(data_dir, prep)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, ids=np.array([c["id"] for c in real]), splits=np.array([c["split"] for c in real]),
                     images=np.stack([c["image"] for c in real]).astype(np.float32),
                     masks=np.stack([c["mask"] for c in real]).astype(np.uint8), notes=np.array(notes, dtype=str))

    if real:
        atomic_write(path, write)
    return real, notes


def run_downstream_benchmark(out_dir: Path | str, data_dir: Path | str, prep: Preprocessing,
                             sources: dict[str, Path | str | None], seeds: Sequence[int] = (0, 1, 2, 3, 4),
                             settings: BenchmarkSettings = BenchmarkSettings(), arms: Sequence[str] | None = None,
                             device: str = "cpu", progress: bool = False, lesion_like_only: bool = False,
                             workers: int = 1, on_note: Callable[[str], None] | None = None,
                             extra_real: Path | str | None = None,
                             scarce_fractions: Sequence[float] = (0.5,)) -> dict[str, Any]:
    """Run every (arm, seed) not yet finished in `out_dir`, then write `downstream.json` and `downstream.png`.

    Args:
        out_dir: results folder; `runs/<arm>__seed<s>.json` per finished (arm, seed), written atomically, reused
            by a re-run when its settings, arm and cases are the same (a stale one is recomputed).
        data_dir: real FCD cases with a train/test split ("embedded" = 2 mm, "embedded-3mm" or a BIDS folder).
        prep: the model grid the pairs were generated on.
        sources: {"inpainted" | "joint" | "conditional": folder or None}; a missing one skips its arms.
        arms: only these arm names, run in this order after R (R is always run: the reference).
        lesion_like_only: keep only the synthetic pairs that pass the project's lesion-likeness check against the
            real training lesions (`neuromf.eval.lesion_metrics.lesion_like`): the quality-filter lever.
        workers: trainings run at once (threads sharing the loaded cases; each result stays the one its seed
            gives alone).
        on_note: called with each note (skipped arms, ...) as it is found.
        extra_real: labelled real FCD cases outside R and the test set (a BIDS folder, every split used): the
            ceiling arms ``R+extra-real`` and ``50%R+extra-real`` add them as the synthetic pairs are added.
        scarce_fractions: the shares of R of the scarce-labels arms (0.5: ``50%R+synthetic``, its control ``50%R``
            and ``50%R+extra-real``; 0.25 adds ``25%R+synthetic``, ``25%R``, ...).
    Returns:
        The summary dict written to `downstream.json`.
    """
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.utils import atomic_write_json

    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown pair sources {sorted(unknown)}; expected {list(SOURCES)}")
    if not seeds:
        raise ValueError("run_downstream_benchmark: give at least one seed")
    if settings.steps < 1:
        raise ValueError(f"run_downstream_benchmark: steps must be >= 1, got {settings.steps}")
    scarce_fractions = tuple(float(f) for f in scarce_fractions)
    if not scarce_fractions or not all(0 < f < 1 for f in scarce_fractions) \
            or len({scarce_label(f) for f in scarce_fractions}) < len(scarce_fractions):
        raise ValueError(f"run_downstream_benchmark: scarce_fractions must be distinct shares in (0, 1), got "
                         f"{list(scarce_fractions)}")
    if settings.synthetic_share is not None and not 0 <= settings.synthetic_share <= 1:
        raise ValueError(f"run_downstream_benchmark: synthetic_share must lie in [0, 1], got "
                         f"{settings.synthetic_share}")
    out_dir, data_dir = Path(out_dir), resolve_data_dir(data_dir)
    extra_dir = None if extra_real is None else resolve_data_dir(extra_real)  # a wrong folder fails before any work
    notes: list[str] = []
    pool = load_sources({s: sources.get(s) for s in SOURCES}, prep, notes)
    real, found = _real_cases_cached(data_dir, prep, out_dir)
    notes.extend(found)
    real_train = [c for c in real if c["split"] == "train"]
    test = [c for c in real if c["split"] == "test"]
    if not real_train or not test:
        raise ValueError(f"{data_dir}: the benchmark needs real FCD train and held-out test cases "
                         "(participants.tsv column 'split')")
    if lesion_like_only and pool:
        pool = keep_lesion_like(pool, real_train, prep, notes)
    if extra_dir is not None:
        pool |= load_extra_real(extra_dir, prep, out_dir, real, notes)
    planned = plan_arms(pool, scarce_fractions)
    if arms is not None:
        wanted = set(arms) | {REAL}
        missing = wanted - {a.name for a in planned}
        for name in sorted(missing):
            notes.append(f"arm {name!r} is not available with the given sources; skipped")
        order = {name: i for i, name in enumerate([REAL, *arms])}
        planned = sorted((a for a in planned if a.name in wanted), key=lambda a: order[a.name])
    if not pool:
        notes.append("no synthetic pairs: only R is run")
    for note in notes:
        if on_note:
            on_note(note)

    grid = {"shape": list(prep.shape), "spacing": list(prep.spacing)}
    train_ids, test_ids = [c["id"] for c in real_train], [c["id"] for c in test]
    # arm-major, in the order of `arms`: an interrupted run has its first arms complete over all seeds
    jobs = [(arm, int(seed)) for arm in planned for seed in seeds]
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="arms x seeds", unit="run")
    def finish(job: tuple[Arm, int]) -> dict[str, Any]:
        arm, seed = job
        path = _result_path(out_dir, arm, seed)
        key = _fingerprint(settings, arm, train_ids, test_ids, grid)
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("fingerprint") == key:
                    return stored
            except ValueError:
                pass
        step_bar = None
        if progress:
            from tqdm.auto import tqdm

            def step_bar(steps: Iterable[int]) -> Iterable[int]:
                return tqdm(steps, desc=f"{arm.name} seed {seed}", unit="step", leave=False)
        row = run_arm_seed(arm, seed, real_train, test, pool, settings, device, step_bar)
        row["fingerprint"] = key
        atomic_write_json(path, row)
        return row

    # threads, not processes: the cases are shared, and torch releases the GIL in its kernels
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as executor:
        for row in executor.map(finish, jobs):
            rows.append(row)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    summary = summarise(rows, planned)
    synthetic = [p for p in pool.values() if p["source"] != EXTRA_REAL]
    seconds = [r["train_seconds"] + r["test_seconds"] for r in rows]
    cpu = [r["train_cpu_seconds"] + r["test_cpu_seconds"] for r in rows if "train_cpu_seconds" in r]
    result = {
        "data_dir": str(data_dir), "grid": grid,
        "sources": {s: None if sources.get(s) is None else str(sources[s]) for s in SOURCES},
        "n_real_train": len(real_train), "n_real_test": len(test),
        "n_synthetic": {s: sum(p["source"] == s for p in pool.values()) for s in SOURCES},
        "extra_real": None if extra_real is None else str(extra_real),
        "n_extra_real": sum(p["source"] == EXTRA_REAL for p in pool.values()),
        "mask_sources": {str(k): sum(str(p["mask_source"]) == str(k) for p in synthetic)
                         for k in sorted({str(p["mask_source"]) for p in synthetic})},
        "seeds": [int(s) for s in seeds], "settings": asdict(settings),
        "segmenter": "monai UNet channels (8, 16, 32, 64), strides (2, 2, 2), 1 residual unit, batch norm; "
                     "DiceCELoss(sigmoid=True, batch=True); Adam, cosine decay to 0",
        "definitions": {
            "dice": "voxel Dice per held-out real test case (sigmoid > threshold), mean over cases",
            "sensitivity": "26-connected true lesion components with any predicted voxel / all test lesions",
            "fp_per_scan": "predicted 26-connected components overlapping no true lesion, mean per test scan",
            "ci": "95% t-interval of the mean over seeds; *_minus_R: paired by seed (arm - R)",
            "seed": "the segmenter's initialisation and patch sampling, and the real part of the scarce-labels "
                    "arms (50%R+synthetic and 50%R draw the same half)",
        },
        "lesion_like_only": lesion_like_only,
        "arms": summary, "goals": judge_goals(summary),
        "seconds": {"total_of_runs": float(np.sum(seconds)) if seconds else 0.0,
                    "per_run": t_interval(seconds) if seconds else None,
                    "cpu_total_of_runs": float(np.sum(cpu)) if cpu else None,
                    "cpu_per_run": t_interval(cpu) if cpu else None,
                    "note": "wall and CPU seconds (the training's own thread, so --workers does not inflate them; "
                            "with torch threads > 1 the CPU figure misses the other threads) of training + test "
                            "inference per (arm, seed); loading the cases is not included"},
        "notes": notes,
    }
    atomic_write_json(out_dir / "downstream.json", result)
    plot_benchmark(summary, out_dir / "downstream.png",
                   title=f"downstream: {len(real_train)} real train, {len(test)} real test cases, "
                         f"seeds {', '.join(map(str, seeds))}, {settings.steps} steps per segmenter; "
                         "mean and 95% t-interval over seeds")
    return result
