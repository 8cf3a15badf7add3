"""Image-mask consistency and downstream use of generated pairs, judged by a small MONAI lesion segmenter.

A 3D `monai.networks.nets.UNet` is trained FLAIR -> lesion mask on real FCD cases (model grid). Two questions:

- consistency (P7-T6): does a generated FLAIR show the lesion its generated mask claims? The segmenter, trained on
  real cases only, segments each generated FLAIR; Dice against the generated mask. Its Dice on held-out real test
  cases is the ceiling that figure can reach.
- downstream use (beyond the spec): does adding generated pairs to the real training cases help? The same
  segmenter trained on real train only vs real train + generated pairs, both scored on held-out real test cases.

Both are reported per seed and as mean +- sd over seeds; a difference within one sd is reported as a null result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuromf.eval.metrics import dice, load_generated, load_real_cases, run_header
from neuromf.io.nifti import Preprocessing

__all__ = ["consistency", "crop_patch", "describe", "evaluate_consistency", "segment", "train_segmenter"]

CHANNELS = (8, 16, 32, 64)
STRIDES = (2, 2, 2)
DIVISOR = int(np.prod(STRIDES))  # input sizes must be multiples of this
LR = 1e-2  # Adam, cosine-decayed to 0 over the steps
LESION_FRACTION = 0.5  # share of training patches centred on a lesion voxel
LR_AXIS = 0  # (H, W, D) on the RAS grid: H runs left -> right (neuromf.data.latents.LR_AXIS on (C, H, W, D))

_INIT_LOCK = threading.Lock()  # the weights come from torch's global RNG: one seeded initialisation at a time

# (rng, image, mask, lesion voxel coordinates, patch side) -> one (image, mask) training patch of patch^3 voxels
PatchDraw = Callable[[np.random.Generator, np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def build_segmenter() -> torch.nn.Module:
    """The small 3D UNet (1 -> 1 channel, ~150k weights). Batch norm, so that the network is fully convolutional at
    inference: a whole volume in one pass gives what patch-wise inference would."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=CHANNELS, strides=STRIDES,
                num_res_units=1, norm="batch")


def _pad_to(volume: np.ndarray, minimum: Sequence[int]) -> np.ndarray:
    """Zero-pad (at the end of each axis) to at least `minimum` voxels per axis."""
    pad = [(0, max(0, int(m) - s)) for s, m in zip(volume.shape, minimum)]
    return np.pad(volume, pad) if any(p[1] for p in pad) else volume


def _check_pairs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
    if len(images) == 0:
        raise ValueError("train_segmenter: no training volumes")
    if len(images) != len(masks):
        raise ValueError(f"train_segmenter: {len(images)} images but {len(masks)} masks")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if np.ndim(image) != 3 or np.shape(image) != np.shape(mask):
            raise ValueError(f"train_segmenter: pair {i} has image shape {np.shape(image)} and mask shape "
                             f"{np.shape(mask)}; expected two equal (H, W, D) volumes")


def crop_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, lesion: np.ndarray, patch: int,
               lesion_fraction: float = LESION_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """One (patch^3) crop of image and mask: centred on a random lesion voxel (`lesion`: their coordinates) with
    probability `lesion_fraction` (clipped to the volume), else placed uniformly."""
    if len(lesion) and rng.random() < lesion_fraction:
        centre = lesion[rng.integers(len(lesion))]
        start = [int(np.clip(c - patch // 2, 0, s - patch)) for c, s in zip(centre, image.shape)]
    else:
        start = [int(rng.integers(0, s - patch + 1)) for s in image.shape]
    window = tuple(slice(a, a + patch) for a in start)
    return image[window], mask[window]


def _draw_patch(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, lesion: np.ndarray,
                patch: int) -> tuple[np.ndarray, np.ndarray]:
    """One (patch^3) crop (`crop_patch`), mirrored left-right with probability 1/2."""
    img, msk = crop_patch(rng, image, mask, lesion, patch)
    if rng.random() < 0.5:
        img, msk = np.flip(img, LR_AXIS), np.flip(msk, LR_AXIS)
    return img, msk


def train_segmenter(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int = 0, steps: int = 300,
                    patch: int = 32, batch: int = 4, lr: float = LR, device: str = "cpu",
                    progress: bool | Callable[[Iterable[int]], Iterable[int]] = False,
                    draw: PatchDraw | None = None,
                    case_weights: Sequence[float] | None = None) -> torch.nn.Module:
    """Train the segmenter FLAIR -> lesion mask on (H, W, D) volumes of the model grid (FLAIR ~[0, 1.5], masks
    {0, 1}); returns it in eval mode. Lesion-biased random patches, left-right flips, `DiceCELoss(sigmoid=True)`
    (Dice over the whole batch, so patches without lesion do not make it undefined), Adam with a cosine decay to 0
    (on the 64^3 phantoms at 300 steps, lr 1e-3 still segmented nothing and a constant 1e-2 was unstable across
    seeds). Deterministic given `seed` on CPU: weights from a forked torch RNG, patches from
    `numpy.random.default_rng(seed)`. `draw` replaces the patch sampler (default: `_draw_patch`); `case_weights`
    (one per volume, normalised here) replaces uniform case sampling; `progress` may be a callable that wraps the
    step range (a caller's own progress bar)."""
    from monai.losses import DiceCELoss

    _check_pairs(images, masks)
    if patch % DIVISOR:
        raise ValueError(f"train_segmenter: patch {patch} must be a multiple of {DIVISOR}")
    vols = [_pad_to(np.asarray(im, dtype=np.float32), (patch,) * 3) for im in images]
    labs = [_pad_to((np.asarray(m) > 0.5).astype(np.float32), (patch,) * 3) for m in masks]
    lesions = [np.argwhere(m > 0.5) for m in labs]
    draw = draw or _draw_patch
    p = None
    if case_weights is not None:
        if len(case_weights) != len(vols) or min(case_weights) < 0 or sum(case_weights) <= 0:
            raise ValueError(f"train_segmenter: case_weights must be {len(vols)} non-negative numbers, not all 0")
        p = np.asarray(case_weights, dtype=np.float64) / float(np.sum(case_weights))
    rng = np.random.default_rng(seed)
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_segmenter().to(device)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, steps))
    model.train()
    iterator: Iterable[int] = range(steps)
    if callable(progress):
        iterator = progress(iterator)
    elif progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"segmenter (seed {seed})", unit="step", leave=False)
    for _ in iterator:
        picks = rng.integers(len(vols), size=batch) if p is None else rng.choice(len(vols), size=batch, p=p)
        drawn = [draw(rng, vols[i], labs[i], lesions[i], patch) for i in picks]
        x = torch.from_numpy(np.stack([d[0] for d in drawn])[:, None].copy()).to(device)
        y = torch.from_numpy(np.stack([d[1] for d in drawn])[:, None].copy()).to(device)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()
        schedule.step()
        if hasattr(iterator, "set_postfix"):
            iterator.set_postfix(loss=f"{loss.item():.3f}")  # type: ignore[union-attr]
    return model.eval()


@torch.no_grad()
def segment(model: torch.nn.Module, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Lesion mask (uint8, same shape) of one (H, W, D) volume in one pass: zero-padded to a multiple of the
    network's total stride, sigmoid > `threshold`, cropped back."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"segment: expected an (H, W, D) volume, got shape {image.shape}")
    target = [-(-s // DIVISOR) * DIVISOR for s in image.shape]
    padded = _pad_to(image, target)
    model.eval()
    device = next(model.parameters()).device
    logits = model(torch.from_numpy(padded.copy())[None, None].to(device))[0, 0].cpu()
    crop = tuple(slice(0, s) for s in image.shape)
    return (torch.sigmoid(logits) > threshold).numpy()[crop].astype(np.uint8)


def consistency(model: torch.nn.Module, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Dice of `segment(FLAIR)` against each pair's own mask: per sample and mean (both-empty counts 1.0, one
    empty 0.0, as `neuromf.eval.metrics.dice`). High when the FLAIR shows the lesion the mask claims."""
    rows = []
    for image, mask in pairs:
        predicted = segment(model, image)
        rows.append({"dice": dice(predicted, mask), "predicted_voxels": int(predicted.sum()),
                     "mask_voxels": int((np.asarray(mask) > 0.5).sum())})
    if not rows:
        raise ValueError("consistency: no pairs given")
    return {"per_sample": rows, "dice": [r["dice"] for r in rows],
            "mean": float(np.mean([r["dice"] for r in rows]))}


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None with fewer than two values) of per-seed figures."""
    values = [float(v) for v in values]
    if not values:
        return {"values": [], "mean": None, "sd": None, "n": 0}
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"values": values, "mean": float(np.mean(values)), "sd": sd, "n": len(values)}


def _downstream_verdict(difference: dict[str, Any]) -> tuple[str, bool | None]:
    """(verdict, null_result) from the per-seed differences (real + generated minus real only)."""
    mean, sd = difference["mean"], difference["sd"]
    if mean is None or sd is None:
        return "undetermined: needs >= 2 seeds for an sd", None
    if abs(mean) <= sd:
        return f"null result: difference {mean:+.3f} is within one sd ({sd:.3f}) over seeds", True
    return (f"generated pairs {'helped' if mean > 0 else 'hurt'}: difference {mean:+.3f} exceeds one sd "
            f"({sd:.3f}) over seeds", False)


def _real_by_split(data_dir: Path, prep: Preprocessing, notes: list[str]) -> dict[str, list[dict]]:
    """Real FCD cases on the model grid (`neuromf.eval.metrics.load_real_cases`), by split; both are needed."""
    real, found = load_real_cases(data_dir, prep)
    notes.extend(found)
    by_split = {split: [c for c in real if c["split"] == split] for split in ("train", "test")}
    for split, cases in by_split.items():
        if not cases:
            raise ValueError(f"{data_dir}: no usable {split}-split FCD cases; the segmenter needs real train cases "
                             "and held-out real test cases (participants.tsv column 'split')")
    return by_split


def _test_dice(model: torch.nn.Module, test: list[dict]) -> dict[str, float]:
    return {case["id"]: dice(segment(model, case["image"]), case["mask"]) for case in test}


def evaluate_consistency(generated_dir: Path, data_dir: Path | str, prep: Preprocessing,
                         seeds: Sequence[int] = (0, 1, 2), steps: int = 300, out_json: Path | None = None,
                         patch: int = 32, device: str = "cpu", progress: bool = False) -> dict[str, Any]:
    """Image-mask consistency and downstream use of the generated pairs in `generated_dir` (see module doc).

    Per seed: a segmenter trained on the real train FCD cases of `data_dir` ("embedded": 2 mm phantoms)
    gives the ceiling (mean Dice on held-out real test cases) and the consistency Dice on the generated pairs; a
    second one trained on real train + generated pairs gives the downstream Dice on the same test cases. Returns
    (and writes atomically to `out_json`) the per-seed rows and mean +- sd over seeds. ValueError naming the folder
    when it holds no pairs, the generated grid differs from `prep.shape`, or a split has no usable cases.
    """
    from neuromf.data.embedded import resolve_data_dir
    from neuromf.utils import atomic_write_json

    generated_dir, data_dir = Path(generated_dir), resolve_data_dir(data_dir)
    if not seeds:
        raise ValueError("evaluate_consistency: give at least one seed")
    generated = load_generated(generated_dir, prep)
    notes: list[str] = []
    real = _real_by_split(data_dir, prep, notes)
    train, test = real["train"], real["test"]
    train_images, train_masks = [c["image"] for c in train], [c["mask"] for c in train]
    aug_images = train_images + [g["image"] for g in generated]
    aug_masks = train_masks + [g["mask"] for g in generated]

    rows = []
    seconds = []
    for seed in seeds:
        started = time.perf_counter()
        real_only = train_segmenter(train_images, train_masks, seed=seed, steps=steps, patch=patch, device=device,
                                    progress=progress)
        seconds.append(time.perf_counter() - started)
        ceiling = _test_dice(real_only, test)
        cons = consistency(real_only, [(g["image"], g["mask"]) for g in generated])
        augmented = train_segmenter(aug_images, aug_masks, seed=seed, steps=steps, patch=patch, device=device,
                                    progress=progress)
        with_generated = _test_dice(augmented, test)
        ceiling_mean = float(np.mean(list(ceiling.values())))
        with_mean = float(np.mean(list(with_generated.values())))
        rows.append({
            "seed": int(seed),
            "ceiling_dice_test": ceiling_mean,
            "ceiling_dice_per_case": ceiling,
            "consistency_dice": cons["mean"],
            "consistency_per_sample": [{"id": g["id"], **r} for g, r in zip(generated, cons["per_sample"])],
            "downstream_real_only": ceiling_mean,
            "downstream_real_plus_generated": with_mean,
            "downstream_per_case_real_plus_generated": with_generated,
            "downstream_difference": with_mean - ceiling_mean,
        })
    difference = describe([r["downstream_difference"] for r in rows])
    verdict, null_result = _downstream_verdict(difference)
    result = {
        **run_header(generated_dir, data_dir, prep, len(generated), len(train), len(test)),
        "segmenter": {"net": "monai UNet", "channels": list(CHANNELS), "strides": list(STRIDES),
                      "num_res_units": 1, "norm": "batch", "loss": "DiceCELoss(sigmoid=True, batch=True)",
                      "steps": int(steps), "patch": int(patch), "batch": 4, "lr": LR, "lr_schedule": "cosine",
                      "lesion_patch_fraction": LESION_FRACTION, "seeds": [int(s) for s in seeds],
                      "seconds_per_training": describe(seconds)},
        "ceiling": {**describe([r["ceiling_dice_test"] for r in rows]),
                    "note": "segmenter trained on real train cases: mean Dice on held-out real test cases"},
        "consistency": {**describe([r["consistency_dice"] for r in rows]),
                        "note": "the same segmenter on the generated FLAIRs: Dice against the generated masks; "
                                "read it against the ceiling"},
        "downstream": {
            "real_only": describe([r["downstream_real_only"] for r in rows]),
            "real_plus_generated": describe([r["downstream_real_plus_generated"] for r in rows]),
            "difference": difference,
            "null_result": null_result,
            "verdict": verdict,
            "note": "held-out real test Dice of a segmenter trained on real train only vs real train + generated "
                    "pairs (same seed, steps and test cases); difference = with generated - real only",
        },
        "per_seed": rows,
        "notes": notes,
    }
    if out_json is not None:
        atomic_write_json(Path(out_json), result)
    return result
