"""Figures for generated (FLAIR, lesion mask) pairs against real FCD cases (spec P7-T6, `neuromf evaluate`).

Everything is measured on the model grid: real cases go through the same preprocessing as training data, so
a generated mask and a real mask are voxel-aligned arrays of the same shape. Reported:

- best Dice of each generated mask against the real *training* masks and against the held-out *test* masks
  (both, so that memorisation shows as train >> test; P7-T6 target mean > 0.3, informational);
- fraction of non-empty generated masks;
- lesion-volume distributions (cm^3) of generated and real masks with a two-sample KS statistic;
- lesion contrast: mean FLAIR inside the mask / mean FLAIR in a 2-voxel shell around it (brain voxels only);
- lesion-likeness (P7-T5, `neuromf.eval.lesion_metrics`): per-pair figures and criteria against the real lesions,
  pass rates, and the mask latent's correlation with its starting noise when the generator recorded it;
- reference points for the best-match Dice, computed from real masks only (see `dice_reference_points`);
- diversity: mean pairwise MS-SSIM of the generated images (MONAI), scales and kernel fitted to the grid.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import stats

from neuromf.eval.lesion_metrics import (
    BRAIN_THRESHOLD,
    CRITERIA,
    EDGE_SPILL,
    EDGE_TISSUE,
    LESION_LIKE_RATE_TARGET,
    NOISE_CORRELATION_MAX,
    SHELL_VOXELS,
    LesionReference,
    LesionStats,
    as_volume,
    lesion_contrast,
    lesion_edge_profile,
    lesion_like,
    lesion_stats,
    median_or_none,
    reference_from_real,
    summarise_edges,
    summarise_lesion_like,
)
from neuromf.io.nifti import Preprocessing
from neuromf.io.pairs import find_generated_pairs

__all__ = ["BRAIN_THRESHOLD", "DICE_TARGET", "SHELL_VOXELS", "as_volume", "dice", "dice_reference_points",
           "evaluate_generated", "find_generated_pairs", "lesion_contrast", "load_generated_pair",
           "mean_pairwise_ms_ssim", "ms_ssim", "ms_ssim_settings", "read_noise_correlation", "read_pair_numbers",
           "run_header", "voxel_spacing", "voxel_volume_cm3"]

DICE_TARGET = 0.3
NOISE_KEY = "mask_noise_correlation"
DRAWS_KEY = "mask_draws"
# Wang et al. (2003) MS-SSIM scale weights; truncated and renormalised when the grid allows fewer scales.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def dice(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Dice overlap of two binary arrays (> 0.5 is foreground); both empty -> 1.0, one empty -> 0.0."""
    a = _as_bool(a)
    b = _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"dice: shapes differ ({a.shape} vs {b.shape})")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(a, b).sum() / total)


def _as_bool(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(bool) if x.dtype == bool else x > 0.5


def load_generated_pair(flair: Path, mask: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, mask bool, affine) of one generated pair; ValueError when shapes or affines differ."""
    arrays = []
    for path in (flair, mask):
        try:
            img = nib.load(str(path))
            arrays.append((img, np.asarray(img.dataobj)))
        except Exception as err:  # zero-byte, truncated, not NIfTI: nibabel raises many types
            raise ValueError(f"{path}: generated file is not a readable NIfTI (empty, truncated or corrupt: "
                             f"{type(err).__name__}); generate it again") from err
    (img, image_data), (msk, mask_data) = arrays
    if np.iscomplexobj(image_data) or not np.all(np.isfinite(image_data)):
        raise ValueError(f"{flair}: generated image holds NaN, infinite or complex values")
    image = as_volume(np.asarray(image_data, dtype=np.float32))
    binary = as_volume(np.asarray(mask_data)) > 0.5
    if image.shape != binary.shape:
        raise ValueError(f"{mask}: mask shape {binary.shape} differs from {flair.name} shape {image.shape}")
    if not np.allclose(img.affine, msk.affine, atol=1e-3):
        raise ValueError(f"{mask}: affine differs from {flair.name}")
    return image, binary, np.asarray(img.affine, dtype=np.float64)


def voxel_volume_cm3(affine: np.ndarray) -> float:
    """Volume of one voxel in cm^3 from the affine's 3x3 part (mm^3 / 1000)."""
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each grid axis: the column norms of the affine's 3x3 part."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return float(norms[0]), float(norms[1]), float(norms[2])


def read_pair_numbers(generated_dir: Path, sample_id: str,
                      keys: tuple[str, ...]) -> tuple[dict[str, float | None], list[str]]:
    """Numbers the generator recorded in `sample_XXX.json` next to the pair (e.g. `mask_noise_correlation`,
    `mask_draws`), read once, and a note for each that is unusable.

    A key is None when the file is absent or does not hold it (a generator that does not record it), and None with
    a note when the file is unreadable or the value is not a finite number.
    """
    values: dict[str, float | None] = dict.fromkeys(keys)
    path = Path(generated_dir) / f"{sample_id}.json"
    if not path.is_file():
        return values, []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return values, [f"{path}: unreadable ({err}); {', '.join(keys)} not reported"]
    notes = []
    for key in keys:
        value = data.get(key) if isinstance(data, dict) else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            notes.append(f"{path}: {key} is not a finite number ({value!r}); not reported")
        else:
            values[key] = float(value)
    return values, notes


def read_noise_correlation(generated_dir: Path, sample_id: str) -> tuple[float | None, str | None]:
    """The generator's `mask_noise_correlation` (`read_pair_numbers`), and a note if unusable."""
    values, notes = read_pair_numbers(generated_dir, sample_id, (NOISE_KEY,))
    return values[NOISE_KEY], notes[0] if notes else None


def _index_sets(masks: list[np.ndarray]) -> list[np.ndarray]:
    return [np.flatnonzero(_as_bool(m)) for m in masks]


def _best_dice(query: np.ndarray, refs: list[np.ndarray]) -> float:
    """Best Dice of one mask (as flat voxel indices) over reference masks; lesions are small, so index sets are
    far cheaper than whole-grid boolean operations."""
    best = 0.0
    for ref in refs:
        total = query.size + ref.size
        score = 1.0 if total == 0 else 2.0 * np.intersect1d(query, ref, assume_unique=True).size / total
        best = max(best, score)
    return best


def dice_reference_points(train_masks: list[np.ndarray], test_masks: list[np.ndarray]) -> dict[str, Any]:
    """Reference points for the best-match Dice (P7-T6), from real masks on the model grid only.

    - ``real_test_vs_train``: mean over held-out (test) masks of the best Dice against the training masks: what
      realistic *new* lesions score against the training set.
    - ``train_leave_one_out``: mean over training masks of the best Dice against the *other* training masks.
    - perfect memoriser: a generator whose samples are exactly the training masks (each once, on the model grid,
      with no loss from the mask representation). ``memoriser_best_train`` is 1.0 by construction and
      ``memoriser_best_test`` is the mean over training masks of the best Dice against the test masks, i.e. the
      spec's test figure reached by copying. A generated figure near these values says little; one far above
      ``real_test_vs_train`` on train says memorisation.
    """
    train, test = _index_sets(train_masks), _index_sets(test_masks)
    test_vs_train = [_best_dice(t, train) for t in test] if train else []
    loo = [_best_dice(t, train[:i] + train[i + 1:]) for i, t in enumerate(train)] if len(train) > 1 else []
    memoriser_test = [_best_dice(t, test) for t in train] if test else []
    return {
        "real_test_vs_train": _mean_or_none(test_vs_train),
        "train_leave_one_out": _mean_or_none(loo),
        "memoriser_best_train": 1.0 if train else None,
        "memoriser_best_test": _mean_or_none(memoriser_test),
        "n_train": len(train),
        "n_test": len(test),
        "definitions": {
            "real_test_vs_train": "mean over real held-out masks of the best Dice against the real training masks",
            "train_leave_one_out": "mean over real training masks of the best Dice against the other training masks",
            "memoriser": "samples = the real training masks themselves (each once, model grid, no mask-"
                         "representation loss); best_train = 1 by construction, best_test = mean over training "
                         "masks of the best Dice against the held-out masks",
        },
    }


def _lesion_like_section(generated: list[dict], real: list[dict], spacing: tuple[float, float, float],
                         generated_dir: Path, notes: list[str]) -> dict[str, Any]:
    """metrics.json's ``lesion_like``: generated pairs scored against the real lesions (issue 9 criteria)."""
    real_stats = [lesion_stats(r["image"], r["mask"], spacing) for r in real]
    gen_stats = [lesion_stats(g["image"], g["mask"], voxel_spacing(g["affine"])) for g in generated]
    correlations, draws = [], []
    for g in generated:
        values, unusable = read_pair_numbers(generated_dir, g["id"], (NOISE_KEY, DRAWS_KEY))
        correlations.append(values[NOISE_KEY])
        draws.append(values[DRAWS_KEY])
        notes.extend(unusable)
    try:
        ref: LesionReference | None = reference_from_real(real_stats)
    except ValueError as err:
        ref = None
        notes.append(f"lesion_like: {err}")

    def rows(items: list[dict], all_stats: list[LesionStats]) -> list[dict]:
        out = []
        for item, st in zip(items, all_stats):
            crit = lesion_like(st, ref) if ref is not None else None
            out.append({"id": item["id"], **({"split": item["split"]} if "split" in item else {}), **st.to_dict(),
                        "location_distance": None if ref is None else ref.position_distance(st),
                        "criteria": crit, "lesion_like": None if crit is None else crit["all"],
                        "failed": None if crit is None else [c for c in CRITERIA if not crit[c]]})
        return out

    samples = rows(generated, gen_stats)
    for row, value in zip(samples, correlations):
        row["noise_correlation"] = value
    known = [abs(v) for v in correlations if v is not None]
    noise = {
        "n": len(known),
        "mean_abs": float(np.mean(known)) if known else None,
        "max_abs": float(np.max(known)) if known else None,
        "threshold": NOISE_CORRELATION_MAX,
        "meets_threshold": (max(known) < NOISE_CORRELATION_MAX) if known else None,
        "definition": f"Pearson correlation of each generated mask latent with the noise it started from, read "
                      f"from sample_XXX.json ({NOISE_KEY}) when the generator wrote it; passes when every "
                      f"sample's |r| < {NOISE_CORRELATION_MAX}",
    }
    summary = summarise_lesion_like(gen_stats, ref) if ref is not None else None
    rate = None if summary is None else summary["rate"]
    meets = None if rate is None else bool(rate >= LESION_LIKE_RATE_TARGET and noise["meets_threshold"] is not False)
    return {
        "criteria": {
            "nonempty": "the mask has at least one voxel",
            "largest_share": "largest 26-connected component >= 80% of the mask",
            "volume": "volume within [0.5 x smallest, 2 x largest] real lesion",
            "inside_brain": ">= 90% of the mask inside the brain (FLAIR > 0.05, largest component, holes filled)",
            "depth": "median depth below the brain surface within the real lesions' range",
            "location": "centroid (normalised to the brain's bounding box) no farther from the nearest real "
                        "lesion's than the largest leave-one-out nearest-neighbour distance among the real lesions",
            "contrast": f"mean FLAIR in mask / in a {SHELL_VOXELS}-voxel ring of brain >= 1 + 0.5 x (median real "
                        "contrast - 1)",
        },
        "reference": None if ref is None else {**ref.to_dict(), "source": "all real FCD cases (train + test) "
                                                "preprocessed onto the model grid"},
        "summary": summary,
        "rate": rate,
        "target_rate": LESION_LIKE_RATE_TARGET,
        "noise_correlation": noise,
        "mask_draws": {"redrawn": sum(d is not None and d > 1 for d in draws),
                       "recorded": sum(d is not None for d in draws), "max": max((d for d in draws if d), default=None),
                       "definition": f"pairs whose joint mask was drawn again because the first came out empty or "
                                     f"smaller than any accepted lesion ({DRAWS_KEY} > 1 in sample_XXX.json)"},
        "meets_acceptance": meets,
        "acceptance": f">= {LESION_LIKE_RATE_TARGET:.0%} of generated pairs pass all criteria and, when recorded, "
                      f"every mask latent's |noise correlation| < {NOISE_CORRELATION_MAX}",
        "samples": samples,
        "real_summary": summarise_lesion_like(real_stats, ref) if ref is not None else None,
        "real_cases": rows(real, real_stats),
    }




def ms_ssim_settings(shape: tuple[int, ...]) -> dict[str, Any]:
    """Kernel size and scale weights of MS-SSIM that fit a grid (MS-SSIM halves the image per scale).

    Grids of 176+ voxels per side take MONAI's defaults (kernel 11, 5 scales). Smaller ones use kernel 3 and
    the most scales (<= 5) whose coarsest image still has >= 4 kernel widths and that pass MONAI's own size
    check; 64^3 -> 3 scales (64, 32, 16), 32^3 -> 2, 16^3 -> 1.
    """
    side = int(min(shape))
    if side // (len(MS_SSIM_WEIGHTS) - 1) ** 2 > 10:
        return {"kernel_size": 11, "kernel_sigma": 1.5, "weights": list(MS_SSIM_WEIGHTS)}
    kernel = 3
    scales = 1
    for n in range(2, len(MS_SSIM_WEIGHTS) + 1):
        if side // 2 ** (n - 1) >= 4 * kernel and side // max(1, n - 1) ** 2 > kernel - 1:
            scales = n
    weights = np.asarray(MS_SSIM_WEIGHTS[:scales], dtype=np.float64)
    weights = weights / weights.sum()
    return {"kernel_size": kernel, "kernel_sigma": 1.0, "weights": [round(float(w), 6) for w in weights]}


def ms_ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """MS-SSIM of two 3D volumes with settings from `ms_ssim_settings` (1.0 for identical images)."""
    x = torch.as_tensor(as_volume(a), dtype=torch.float32)[None, None]
    y = torch.as_tensor(as_volume(b), dtype=torch.float32)[None, None]
    return _ms_ssim_batch(x, y, data_range)[0]


def _ms_ssim_batch(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> list[float]:
    from monai.metrics import MultiScaleSSIMMetric

    cfg = ms_ssim_settings(tuple(x.shape[2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=data_range, kernel_size=cfg["kernel_size"],
                                  kernel_sigma=cfg["kernel_sigma"], weights=cfg["weights"])
    with torch.no_grad():
        values = metric(x, y)
    return [float(v) for v in values.reshape(-1)]


def mean_pairwise_ms_ssim(images: list[np.ndarray], chunk: int = 8) -> dict[str, Any]:
    """Mean MS-SSIM over all pairs of generated images: high (-> 1) means the samples look alike."""
    settings = ms_ssim_settings(images[0].shape) if images else {}
    pairs = list(combinations(range(len(images)), 2))
    values: list[float] = []
    for start in range(0, len(pairs), chunk):
        batch = pairs[start:start + chunk]
        x = torch.stack([torch.as_tensor(images[i], dtype=torch.float32) for i, _ in batch])[:, None]
        y = torch.stack([torch.as_tensor(images[j], dtype=torch.float32) for _, j in batch])[:, None]
        values.extend(_ms_ssim_batch(x, y))
    return {"mean_pairwise_ms_ssim": float(np.mean(values)) if values else None, "n_pairs": len(values),
            **settings}


def _describe(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {"n": int(arr.size), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "min": float(arr.min()), "max": float(arr.max())}


def _mean_or_none(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


PROVENANCE_KEYS = ("adapter", "checkpoint", "mode", "seed", "steps", "sampler", "guidance", "joint_guidance",
                   "strategy")


def check_one_run(generated_dir: Path, files: list[Path]) -> None:
    """ValueError when a folder of generated pairs mixes runs: files its ownership manifest does not list (a
    folder written by `generate`), or `sample_XXX.json` records of different models or sampling settings."""
    from neuromf.io.owned import read_manifest

    manifest = read_manifest(generated_dir)
    if manifest is not None:
        listed = set(manifest["files"])
        strangers = [p.name for p in files if p.name not in listed]
        if strangers:
            raise ValueError(f"{generated_dir}: {strangers[0]} (and {len(strangers) - 1} more) were not written by the "
                             "run that owns this folder: a mixed folder; generate again into an empty folder")
    runs: dict[tuple, str] = {}
    for record in sorted(Path(generated_dir).glob("sample_*.json")):
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue  # a damaged record: read_noise_correlation reports it
        if not isinstance(meta, dict) or "seed" not in meta or "adapter" not in meta:
            continue  # no provenance to compare (an incomplete record)
        runs.setdefault(tuple(str(meta.get(k)) for k in PROVENANCE_KEYS), record.name)
    if len(runs) > 1:
        (first, a), (second, b) = list(runs.items())[:2]
        differ = [k for k, x, y in zip(PROVENANCE_KEYS, first, second) if x != y]
        raise ValueError(f"{generated_dir}: pairs of two runs in one folder ({a} and {b} differ in "
                         f"{', '.join(differ)}); evaluate one run's folder")


def load_generated(generated_dir: Path, prep: Preprocessing) -> list[dict]:
    """Every generated pair of a folder (`id`, `flair`, `mask_path`, `image`, `mask`, `affine`, `voxel_cm3`),
    checked to lie on the model grid of `prep`."""
    generated = []
    pairs = find_generated_pairs(generated_dir)
    check_one_run(generated_dir, [p for _, flair, mask in pairs for p in (flair, mask)])
    for sid, flair, mask_path in pairs:
        image, mask, affine = load_generated_pair(flair, mask_path)
        if image.shape != tuple(prep.shape):
            raise ValueError(f"{generated_dir}: {flair.name} has shape {image.shape}, but the model grid is "
                             f"{tuple(prep.shape)}; evaluate with the preprocessing the model was trained on")
        generated.append({"id": sid, "flair": flair, "mask_path": mask_path, "image": image, "mask": mask,
                          "affine": affine, "voxel_cm3": voxel_volume_cm3(affine)})
    return generated


def run_header(generated_dir: Path | str, data_dir: Path | str, prep: Preprocessing, n_generated: int,
               n_real_train: int, n_real_test: int) -> dict[str, Any]:
    """The keys every comparison of generated pairs with real cases opens its JSON with: what was compared, on
    which grid, how many of each."""
    return {"generated_dir": str(generated_dir), "data_dir": str(data_dir),
            "preprocessing": {"shape": list(prep.shape), "spacing": list(prep.spacing)},
            "n_generated": n_generated, "n_real_train": n_real_train, "n_real_test": n_real_test}


def load_real_cases(data_dir: Path, prep: Preprocessing, progress: bool = False) -> tuple[list[dict], list[str]]:
    """Preprocessed real FCD cases with their split; all FCD cases count as train when no split is given."""
    from neuromf.io.bids import DataError, discover_cases

    notes: list[str] = []
    by_split: dict[str, list] = {}
    for split in ("train", "test"):
        try:
            by_split[split] = discover_cases(data_dir, group="fcd", split=split)
        except DataError:
            by_split[split] = []
    if not by_split["train"] and not by_split["test"]:
        by_split["train"] = discover_cases(data_dir, group="fcd")  # raises DataError naming the folder
        notes.append("no train/test split in participants.tsv: all FCD cases are used as 'train'")
    if not by_split["test"]:
        notes.append("no held-out test FCD cases: test Dice not reported")
    cases = [(split, case) for split in ("train", "test") for case in by_split[split]]
    if progress:
        from tqdm import tqdm

        cases = tqdm(cases, desc="real FCD cases", unit="case")
    real = []
    for split, case in cases:
        image, mask = _preprocess_real(case.image, case.mask, prep)
        if not mask.any():
            notes.append(f"{case.case_id}: lesion mask is empty on the model grid; case skipped")
            continue
        real.append({"id": case.case_id, "split": split, "image": image, "mask": mask,
                     "voxel_cm3": voxel_volume_cm3(np.diag([*prep.spacing, 1.0]))})
    return real, notes


def _preprocess_real(image: Path, mask: Path, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Real image and mask on the model grid as numpy arrays (H, W, D)."""
    from neuromf.io.nifti import preprocess_pair

    img, msk = preprocess_pair(image, mask, prep)
    return img.data[0].numpy(), msk.data[0].numpy() > 0.5


def evaluate_generated(generated_dir: Path, data_dir: Path, prep: Preprocessing, out_json: Path | None = None,
                       progress: bool = False) -> dict:
    """Compare generated pairs in `generated_dir` with the real FCD cases of `data_dir` on the model grid.

    Returns (and writes atomically to `out_json` when given) a dict with keys ``dice`` (its ``reference``: see
    `dice_reference_points`), ``fraction_nonempty``, ``lesion_volume_cm3``, ``lesion_contrast``,
    ``lesion_like`` (P7-T5 figures, criteria, rates and reference ranges), ``diversity``, ``samples`` (one row
    per generated pair) and ``real_cases``. ValueError naming the folder when no pairs or an incomplete pair is
    found, or when the generated grid differs from `prep.shape`.
    """
    from neuromf.data.embedded import resolve_data_dir

    generated_dir, data_dir = Path(generated_dir), resolve_data_dir(data_dir)
    generated = load_generated(generated_dir, prep)
    real, notes = load_real_cases(data_dir, prep, progress)
    train = [r for r in real if r["split"] == "train"]
    test = [r for r in real if r["split"] == "test"]
    train_sets, test_sets = _index_sets([r["mask"] for r in train]), _index_sets([r["mask"] for r in test])

    def best(mask: np.ndarray, refs: list[dict], sets: list[np.ndarray]) -> tuple[float | None, str | None]:
        if not refs:
            return None, None
        query = np.flatnonzero(mask)
        scores = [(_best_dice(query, [s]), r["id"]) for s, r in zip(sets, refs)]
        return max(scores, key=lambda s: s[0])

    rows = []
    iterator = generated
    if progress:
        from tqdm import tqdm

        iterator = tqdm(generated, desc="generated pairs", unit="pair")
    for g in iterator:
        voxels = int(g["mask"].sum())
        dice_train, match_train = best(g["mask"], train, train_sets)
        dice_test, match_test = best(g["mask"], test, test_sets)
        rows.append({
            "id": g["id"], "flair": str(g["flair"]), "mask": str(g["mask_path"]),
            "lesion_voxels": voxels, "lesion_cm3": voxels * g["voxel_cm3"], "nonempty": voxels > 0,
            "best_dice_train": dice_train, "best_match_train": match_train,
            "best_dice_test": dice_test, "best_match_test": match_test,
            "lesion_contrast": lesion_contrast(g["image"], g["mask"]),
        })
    real_rows = [{"id": r["id"], "split": r["split"], "lesion_cm3": int(r["mask"].sum()) * r["voxel_cm3"],
                  "lesion_contrast": lesion_contrast(r["image"], r["mask"])} for r in real]

    gen_volumes = [r["lesion_cm3"] for r in rows if r["nonempty"]]
    real_volumes = [r["lesion_cm3"] for r in real_rows]
    ks_stat = ks_p = None
    if gen_volumes and real_volumes:
        ks = stats.ks_2samp(gen_volumes, real_volumes)
        ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
    train_scores = [r["best_dice_train"] for r in rows]
    test_scores = [r["best_dice_test"] for r in rows]
    mean_train, mean_test = _mean_or_none(train_scores), _mean_or_none(test_scores)
    lesion_like_section = _lesion_like_section(generated, real, prep.spacing, generated_dir, notes)
    edges = {"generated": summarise_edges([lesion_edge_profile(g["image"], g["mask"]) for g in generated]),
             "real": summarise_edges([lesion_edge_profile(r["image"], r["mask"]) for r in real])}

    result = {
        **run_header(generated_dir, data_dir, prep, len(rows), len(train), len(test)),
        "fraction_nonempty": float(np.mean([r["nonempty"] for r in rows])),
        "dice": {
            "mean_best_train": mean_train,
            "median_best_train": median_or_none(train_scores),
            "mean_best_test": mean_test,
            "median_best_test": median_or_none(test_scores),
            "target": DICE_TARGET,
            "meets_target_train": None if mean_train is None else mean_train > DICE_TARGET,
            "meets_target_test": None if mean_test is None else mean_test > DICE_TARGET,
            "status": "INFORMATIONAL",
            "note": "best Dice of each generated mask over real masks; train >> test suggests memorisation. Read "
                    "it against `reference`: real held-out masks, leave-one-out and a perfect memoriser on the "
                    "same grid",
            "reference": dice_reference_points([r["mask"] for r in train], [r["mask"] for r in test]),
        },
        "lesion_volume_cm3": {
            "generated": _describe(gen_volumes),
            "real": _describe(real_volumes),
            "real_train": _describe([r["lesion_cm3"] for r in real_rows if r["split"] == "train"]),
            "real_test": _describe([r["lesion_cm3"] for r in real_rows if r["split"] == "test"]),
            "ks_statistic": ks_stat,
            "ks_pvalue": ks_p,
            "note": "model-grid voxel counts x voxel volume; generated: non-empty masks only",
        },
        "lesion_contrast": {
            "generated_mean": _mean_or_none([r["lesion_contrast"] for r in rows]),
            "real_mean": _mean_or_none([r["lesion_contrast"] for r in real_rows]),
            "n_generated": sum(r["lesion_contrast"] is not None for r in rows),
            "n_real": sum(r["lesion_contrast"] is not None for r in real_rows),
            "definition": f"mean FLAIR in mask / mean FLAIR in a {SHELL_VOXELS}-voxel dilation shell minus the "
                          f"mask, brain voxels > {BRAIN_THRESHOLD} only",
        },
        "lesion_edge": {
            **edges,
            "definition": f"mean FLAIR at each whole-voxel distance from the mask boundary (<= 0 inside, 1.. "
                          f"outside) over the tissue {EDGE_TISSUE[0]}-{EDGE_TISSUE[1]} voxels out; spill: the excess "
                          f"of distances {EDGE_SPILL[0]}-{EDGE_SPILL[1]} (brightness that runs past the mask)",
        },
        "lesion_like": lesion_like_section,
        "diversity": mean_pairwise_ms_ssim([g["image"] for g in generated]),
        "samples": rows,
        "real_cases": real_rows,
        "notes": notes,
    }
    if out_json is not None:
        from neuromf.utils import atomic_write_json

        atomic_write_json(Path(out_json), result)
    return result
