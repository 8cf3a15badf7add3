"""Scanner texture on decoded FLAIRs: the voxel-level noise a VAE latent does not hold, added back at its own level.

A decoder returns the mean of its likelihood p(x | z). Real FLAIRs carry Rician noise that no 4x-downsampled latent
can encode, so a mean decode is smoother than any scan (on the shipped 2 mm data it keeps about half the original's
mean |Laplacian|). Drawing one sample of that likelihood instead (Rician noise of the level measured on the training
scans, inside the brain only, as in skull-stripped scans) gives decodes the scans' own texture. The level is one
number per VAE, fitted on its training split (`neuromf.eval.realism.fit_texture_sigma`) and stored in the VAE's
sidecar as `texture_sigma`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from neuromf.data.brain import as_volume, brain_mask

# the 6-neighbour Laplacian of white noise of std s has std sqrt(42) s (centre 6^2 + six 1^2 + ... = 42)
LAPLACIAN_NOISE_GAIN = math.sqrt(42.0)
TEXTURE_SIGMA_MAX = 0.5  # intensities are ~[0, 1.5]: anything larger is not a texture but a corrupted sidecar


def noise_level(image: np.ndarray, mask: np.ndarray) -> float:
    """Robust noise std of `image` inside `mask`: median absolute deviation of its Laplacian / sqrt(42).

    The Laplacian of smooth anatomy is near zero almost everywhere, so its MAD is set by the voxel-level noise;
    edges inflate it a little (a decode's own level is then not zero, and `fit_texture_sigma` calibrates the rest).
    """
    lap = ndimage.laplace(as_volume(image).astype(np.float64))[mask]
    mad = float(np.median(np.abs(lap - np.median(lap))))
    return 1.4826 * mad / LAPLACIAN_NOISE_GAIN


def add_texture(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, D) with Rician noise of std `sigma` inside its brain, the background left as it is.

    Rician, as in magnitude MR images: |image + n1 + i n2|, so dark voxels brighten slightly and nothing turns
    negative. Returns a new float32 array; the input is not modified.
    """
    if not (math.isfinite(sigma) and 0.0 <= sigma <= TEXTURE_SIGMA_MAX):
        raise ValueError(f"texture sigma {sigma!r} must be a finite number in [0, {TEXTURE_SIGMA_MAX}]")
    volume = as_volume(image).astype(np.float32)
    if sigma == 0.0:
        return volume.copy()
    brain = brain_mask(volume)
    noise = rng.standard_normal((2, *volume.shape)).astype(np.float32) * np.float32(sigma)
    textured = np.sqrt((volume + noise[0]) ** 2 + noise[1] ** 2)
    return np.where(brain, textured, volume).astype(np.float32)
