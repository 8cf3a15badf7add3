"""Pictures people would rather look at than read: lesion montages (P7-T5) and sample montages, PNGs written
atomically with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from neuromf.eval.metrics import as_volume
from neuromf.utils import atomic_write_figure


def lesion_montage(image: np.ndarray, mask: np.ndarray, out_png: Path, title: str = "") -> Path:
    """Sagittal, coronal and axial slices through the lesion centroid, mask contour in red; PNG written atomically.

    Arrays are RAS voxel grids (H, W, D) or (1, H, W, D); an empty mask uses the volume centre. Slices are shown
    with anterior / superior up so a lesion can be judged by eye (P7-T5).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = as_volume(image).astype(np.float32)
    mask = as_volume(mask) > 0.5
    if image.shape != mask.shape:
        raise ValueError(f"lesion_montage: image shape {image.shape} differs from mask shape {mask.shape}")
    coords = np.argwhere(mask)
    centre = np.round(coords.mean(axis=0)).astype(int) if len(coords) else np.array(image.shape) // 2
    x, y, z = (int(c) for c in centre)
    views = [
        ("sagittal", image[x, :, :], mask[x, :, :], f"x={x}"),
        ("coronal", image[:, y, :], mask[:, y, :], f"y={y}"),
        ("axial", image[:, :, z], mask[:, :, z], f"z={z}"),
    ]
    vmax = float(np.percentile(image, 99.5)) if image.size else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=100)
    for ax, (name, img_slice, mask_slice, where) in zip(axes, views):
        ax.imshow(img_slice.T, cmap="gray", origin="lower", vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
        if mask_slice.any() and not mask_slice.all():
            ax.contour(mask_slice.T.astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"{name} ({where})", fontsize=9)
        ax.set_axis_off()
    return _save(fig, out_png, title)


def sample_montage(images: list[np.ndarray], out_png: Path, title: str = "") -> Path:
    """One row per volume: mid-sagittal, coronal and axial slices (a quick look at generated samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), dpi=90, squeeze=False)
    for row, volume in zip(axes, images):
        volume = as_volume(volume).astype(np.float32)
        x, y, z = (s // 2 for s in volume.shape)
        cuts = (("sagittal", volume[x]), ("coronal", volume[:, y]), ("axial", volume[:, :, z]))
        for ax, (name, cut) in zip(row, cuts):
            ax.imshow(cut.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    return _save(fig, out_png, title)


def site_map(real_positions: list[list[float]], generated: list[tuple[list[float], bool]], out_png: Path,
             title: str = "") -> Path:
    """Where the lesions lie: real and generated lesion centroids in brain-box coordinates (0..1 per axis),
    hemispheres folded (distance from the midline), seen from above (left-right vs posterior-anterior) and from
    the side (posterior-anterior vs inferior-superior). Real sites grey, lesion-like generated ones green, the
    rest red crosses: a generator whose lesions all sit in one place shows one cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def folded(points: list[list[float]]) -> np.ndarray:
        array = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return np.column_stack([np.abs(array[:, 0] - 0.5), array[:, 1], array[:, 2]])

    real = folded(real_positions)
    like = folded([p for p, ok in generated if ok])
    other = folded([p for p, ok in generated if not ok])
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    for ax, (i, j, xlabel, ylabel) in zip(axes, ((0, 1, "distance from midline", "posterior -> anterior"),
                                                  (1, 2, "posterior -> anterior", "inferior -> superior"))):
        ax.scatter(real[:, i], real[:, j], s=14, c="0.6", label=f"real ({len(real)})")
        ax.scatter(like[:, i], like[:, j], s=22, c="tab:green", label=f"generated, lesion-like ({len(like)})")
        ax.scatter(other[:, i], other[:, j], s=22, c="tab:red", marker="x", label=f"generated, other ({len(other)})")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_xlim(0, 0.5 if i == 0 else 1)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="lower right")
    return _save(fig, out_png, title, fontsize=9, palette=True)


def _save(fig: Any, out_png: Path, title: str = "", fontsize: int = 10, palette: bool = False) -> Path:
    """Title, tight layout, PNG written atomically (``palette``: a plot, as a palette PNG: `atomic_write_figure`),
    figure closed (also when the write fails)."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    try:
        atomic_write_figure(Path(out_png), fig, palette=palette)
    finally:
        plt.close(fig)
    return Path(out_png)
