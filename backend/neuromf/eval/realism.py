"""How real decoded (or generated) FLAIRs look next to real ones: sharpness, SSIM and two-sample tests.

A VAE can score a high SSIM and still be told from real scans at a glance: it smooths the fine texture. These
figures measure that directly on volumes of one grid (N, 1, H, W, D), intensities ~[0, 1]:

- `sharpness`: mean |Laplacian| / median intensity inside the brain (the contrast-free amount of fine detail);
  `sharpness_ratio` divides a decoded volume's by its original's.
- `cnn_two_sample_test`: a small 3D CNN trained to tell patches of one set from patches of the other, cross-validated
  by case (a case's patches never sit on both sides of a split); balanced accuracy 0.5 = indistinguishable.
- `feature_two_sample_test`: the cheaper judge, a logistic regression on seven intensity/texture features per
  volume, cross-validated the same way.
- `fit_texture_sigma`: the level of scanner texture (`neuromf.data.texture`) that gives decodes the originals'
  sharpness, fitted on training scans and stored in the VAE's sidecar.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from neuromf.data.brain import as_volume, brain_mask
from neuromf.data.texture import TEXTURE_SIGMA_MAX, add_texture
from neuromf.eval.image_metrics import ssim_3d

FEATURE_NAMES = ("median", "iqr_over_median", "laplacian_over_median", "gradient_over_median",
                 "highpass_std_over_median", "skewness", "kurtosis")


def brain_interior(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """The project's `brain_mask` less its one-voxel rim: the Laplacian's 6-neighbour stencil then lies inside the
    brain, so the step from brain to background (the same in any decode) does not swamp the texture."""
    return ndimage.binary_erosion(brain_mask(image))


def sharpness(image: np.ndarray | torch.Tensor, mask: np.ndarray) -> float:
    """Mean |Laplacian| / median intensity of `image` over `mask` (scale-free: a brighter scan is not sharper)."""
    volume = as_volume(image).astype(np.float64)
    median = float(np.median(volume[mask]))
    return float(np.abs(ndimage.laplace(volume))[mask].mean() / max(median, 1e-8))


def sharpness_ratio(decoded: np.ndarray | torch.Tensor, original: np.ndarray | torch.Tensor) -> float:
    """sharpness(decoded) / sharpness(original), both inside the original's brain interior; 1 = as sharp."""
    mask = brain_interior(original)
    return sharpness(decoded, mask) / max(sharpness(original, mask), 1e-12)


def volume_features(image: np.ndarray | torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """The seven `FEATURE_NAMES` of one volume inside `mask`: intensity level and spread, and three texture
    measures (Laplacian, gradient, high-pass residual), each relative to the median intensity."""
    volume = as_volume(image).astype(np.float64)
    values = volume[mask]
    median = max(float(np.median(values)), 1e-8)
    q25, q75 = np.percentile(values, [25, 75])
    gradient = np.sqrt(sum(g**2 for g in np.gradient(volume)))
    highpass = volume - ndimage.gaussian_filter(volume, 1.0)
    centred = (values - values.mean()) / max(values.std(), 1e-8)
    return np.array([median, (q75 - q25) / median, np.abs(ndimage.laplace(volume))[mask].mean() / median,
                     gradient[mask].mean() / median, highpass[mask].std() / median, (centred**3).mean(),
                     (centred**4).mean()])


def case_folds(n_cases: int, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint groups of case indices (shuffled with `seed`) covering all cases: the test cases of each fold."""
    if n_cases < 2:
        raise ValueError(f"a cross-validated two-sample test needs at least 2 cases, got {n_cases}")
    order = np.random.default_rng(seed).permutation(n_cases)
    return [fold for fold in np.array_split(order, min(k, n_cases)) if len(fold)]


def balanced_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean of the per-class recalls (0.5 for a judge that cannot tell the classes apart, even when unbalanced)."""
    return float(np.mean([np.mean(predicted[labels == c] == c) for c in (0, 1)]))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, weight_decay: float = 1e-2) -> nn.Linear:
    """L2-regularised logistic regression on standardised features (full-batch L-BFGS, deterministic)."""
    model = nn.Linear(x.shape[1], 1, dtype=x.dtype)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def feature_two_sample_test(real: torch.Tensor, other: torch.Tensor, k: int = 5, seed: int = 0) -> dict:
    """Balanced accuracy of a logistic regression on `volume_features` telling `real` (label 0) from `other`
    (label 1) volumes, k-fold by case (case i of both sets is one case: the same brain mask for both)."""
    if len(real) != len(other):
        raise ValueError(f"paired sets expected (one decoded volume per real one), got {len(real)} and {len(other)}")
    masks = [brain_interior(r) for r in real]
    feats = {name: torch.tensor(np.stack([volume_features(v, m) for v, m in zip(vols, masks)]))
             for name, vols in (("real", real), ("other", other))}
    predicted, labels = [], []
    for test in case_folds(len(real), k, seed):
        train = np.setdiff1d(np.arange(len(real)), test)
        x_train = torch.cat([feats["real"][train], feats["other"][train]])
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-8)
        y_train = torch.cat([torch.zeros(len(train)), torch.ones(len(train))]).double()
        model = _fit_logistic((x_train - mean) / std, y_train)
        with torch.no_grad():
            x_test = torch.cat([feats["real"][test], feats["other"][test]])
            predicted.append((model((x_test - mean) / std)[:, 0] > 0).long().numpy())
        labels.append(np.r_[np.zeros(len(test)), np.ones(len(test))].astype(int))
    return {"balanced_accuracy": balanced_accuracy(np.concatenate(predicted), np.concatenate(labels)),
            "folds": min(k, len(real)), "cases": len(real), "features": list(FEATURE_NAMES)}


def brain_patches(volume: torch.Tensor, mask: np.ndarray, n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """`n` cubic patches (n, 1, size, size, size) of a (1, H, W, D) volume centred on random voxels of `mask`
    (centres kept `size // 2` from the grid's edges)."""
    half = size // 2
    spatial = volume.shape[1:]
    inner = np.zeros_like(mask)
    inner[half:spatial[0] - size + half + 1, half:spatial[1] - size + half + 1,
          half:spatial[2] - size + half + 1] = True
    centres = np.argwhere(mask & inner)
    if not len(centres):
        raise ValueError(f"no brain voxel lies at least {half} voxels from the grid's edges (grid {tuple(spatial)})")
    picks = centres[rng.integers(0, len(centres), n)] - half
    return torch.stack([volume[:, a:a + size, b:b + size, c:c + size] for a, b, c in picks])


class PatchJudge(nn.Module):
    """A small 3D CNN (three strided conv blocks, global average pool, linear) scoring a patch as real (< 0) or
    not (> 0). Small on purpose: a few thousand patches train it in seconds on a CPU."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in (channels, 2 * channels, 4 * channels):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.SiLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) logits of (B, 1, s, s, s) patches: > 0 means `other`, < 0 means real."""
        return self.head(self.features(x).mean(dim=(2, 3, 4)))[:, 0]


def _train_judge(patches: torch.Tensor, labels: torch.Tensor, steps: int, batch_size: int,
                 generator: torch.Generator) -> PatchJudge:
    judge = PatchJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(patches), (batch_size,), generator=generator)
        batch = patches[idx]
        flips = torch.rand(3, generator=generator) < 0.5  # mirrored patches: texture, not orientation, decides
        batch = batch.flip([2 + axis for axis in range(3) if flips[axis]]) if flips.any() else batch
        loss = F.binary_cross_entropy_with_logits(judge(batch), labels[idx].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return judge.eval()


def cnn_two_sample_test(real: torch.Tensor, other: torch.Tensor, k: int = 5, patch_size: int = 16,
                        patches_per_volume: int = 32, steps: int = 300, batch_size: int = 64, seed: int = 0,
                        masks: list[np.ndarray] | None = None) -> dict:
    """Balanced accuracy of `PatchJudge` telling patches of `real` (label 0) from patches of `other` (label 1).

    Case i of both sets is one case: its patches (drawn independently in each volume, centres inside the real
    volume's brain interior unless `masks` are given) all go to the same side of each of the k case folds.
    Seeded: the same inputs give the same figure.
    """
    if len(real) != len(other):
        raise ValueError(f"paired sets expected (one decoded volume per real one), got {len(real)} and {len(other)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    masks = masks if masks is not None else [brain_interior(r) for r in real]
    per_case = [torch.cat([brain_patches(vols[i].float(), masks[i], patches_per_volume, patch_size, rng)
                           for vols in (real, other)]) for i in range(len(real))]
    case_labels = torch.cat([torch.zeros(patches_per_volume), torch.ones(patches_per_volume)]).long()
    predicted, labels = [], []
    for test in case_folds(len(real), k, seed):
        train = np.setdiff1d(np.arange(len(real)), test)
        judge = _train_judge(torch.cat([per_case[i] for i in train]), case_labels.repeat(len(train)), steps,
                             batch_size, generator)
        with torch.no_grad():
            predicted.append(torch.cat([(judge(per_case[i]) > 0).long() for i in test]).numpy())
        labels.append(case_labels.repeat(len(test)).numpy())
    return {"balanced_accuracy": balanced_accuracy(np.concatenate(predicted), np.concatenate(labels)),
            "folds": min(k, len(real)), "cases": len(real), "patch_size": patch_size,
            "patches_per_volume": patches_per_volume, "steps": steps}


def realism_report(originals: torch.Tensor, decoded: torch.Tensor, seed: int = 0, k: int = 5,
                   cnn_steps: int = 300) -> dict:
    """Sharpness ratio (mean and per case), SSIM, and both two-sample tests of decoded vs original volumes
    (N, 1, H, W, D), case i of each being the same scan."""
    if originals.shape != decoded.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and decodes {tuple(decoded.shape)} differ in shape")
    masks = [brain_interior(v) for v in originals]
    ratios = [sharpness(d, m) / max(sharpness(o, m), 1e-12) for o, d, m in zip(originals, decoded, masks)]
    sharp_orig = [sharpness(o, m) for o, m in zip(originals, masks)]
    ssim = ssim_3d(decoded.float(), originals.float())
    return {
        "cases": len(originals),
        "sharpness_ratio": float(np.mean(ratios)),
        "sharpness_ratio_per_case": [round(r, 4) for r in ratios],
        "sharpness_original": float(np.mean(sharp_orig)),
        "ssim": float(ssim.mean()),
        "cnn_two_sample": cnn_two_sample_test(originals, decoded, k=k, seed=seed, steps=cnn_steps, masks=masks),
        "feature_two_sample": feature_two_sample_test(originals, decoded, k=k, seed=seed),
    }


def textured(decoded: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """`add_texture` on each volume of (N, 1, H, W, D), volume i drawn from (seed, i): the same draw every call."""
    return torch.stack([torch.from_numpy(add_texture(v.numpy(), sigma, np.random.default_rng([seed, i])))[None]
                        for i, v in enumerate(decoded)])


def fit_texture_sigma(originals: torch.Tensor, decoded: torch.Tensor, target: float = 1.0, seed: int = 0,
                      iterations: int = 14) -> dict:
    """The texture sigma at which the mean sharpness ratio of textured decodes to their originals is `target`
    (bisection: the ratio grows with sigma). Fit it on training scans; judge it on held-out ones."""
    masks = [brain_interior(v) for v in originals]
    reference = [sharpness(o, m) for o, m in zip(originals, masks)]

    def mean_ratio(sigma: float) -> float:
        volumes = textured(decoded, sigma, seed)
        return float(np.mean([sharpness(v, m) / max(r, 1e-12) for v, m, r in zip(volumes, masks, reference)]))

    low, high = 0.0, TEXTURE_SIGMA_MAX / 4
    untextured = mean_ratio(0.0)
    if untextured >= target:
        return {"sigma": 0.0, "sharpness_ratio_untextured": untextured, "sharpness_ratio": untextured,
                "cases": len(originals)}
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_ratio(middle) < target else (low, middle)
    sigma = (low + high) / 2
    return {"sigma": sigma, "sharpness_ratio_untextured": untextured, "sharpness_ratio": mean_ratio(sigma),
            "cases": len(originals)}


TEXTURE_FIT_CASES = 16  # enough for one scalar; a round trip of a 2 mm scan costs seconds on a CPU


@torch.no_grad()
def fit_vae_texture(vae, volumes: torch.Tensor, max_cases: int = TEXTURE_FIT_CASES, seed: int = 0) -> dict:
    """`fit_texture_sigma` on the round trips (posterior mean, clamped to [0, 1]) of the first `max_cases` of
    `volumes` (N, 1, H, W, D): the `texture_sigma` (and how it was fitted) for a VAE's sidecar."""
    originals = volumes[:max_cases].float()
    decoded = torch.cat([vae.decode(vae.encode(v[None])).clamp(0, 1).cpu() for v in originals])
    fit = fit_texture_sigma(originals.cpu(), decoded, seed=seed)
    return {"texture_sigma": round(fit["sigma"], 6),
            "texture_fit": {"cases": fit["cases"], "target": "mean sharpness ratio 1.0 on these training scans",
                            "sharpness_ratio_untextured": round(fit["sharpness_ratio_untextured"], 4),
                            "sharpness_ratio_textured": round(fit["sharpness_ratio"], 4)}}
