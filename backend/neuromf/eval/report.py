"""Phase 7 verification report (`neuromf verify`): P7-T1..T7 as PASS / FAIL / INFO rows, montages, loss curve.

Each row names the file its figure came from. A missing or unreadable input turns its row into FAIL (critical
tests) or NOT RUN (informational ones) naming the file; it never raises, so a partial pipeline still yields a
report that says what is missing. Only an unwritable report path raises.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from neuromf.eval.metrics import as_volume
from neuromf.utils import atomic_write, atomic_write_text

LORA_FRACTION_LIMIT = 0.01
MASK_DICE_THRESHOLD = 0.85


@dataclass
class Row:
    """One line of the P7 table."""

    test: str
    description: str
    critical: bool
    status: str
    figure: str
    source: str

    @property
    def passed(self) -> bool:
        return self.status.startswith("PASS")


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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    try:
        atomic_write(out_png, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return out_png


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
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_write(Path(out_png), lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return Path(out_png)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _read_json(path: Path) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("top level is not a JSON object")
    return data


def _missing(path: Path) -> str:
    return f"missing file {path}"


def _t1(stage_dir: Path) -> Row:
    path = stage_dir / "mask_vae_test.json"
    row = Row("P7-T1", "Mask VAE round-trip Dice (strategy A) and strategy choice", True, "FAIL", "", str(path))
    if not path.is_file():
        row.figure = _missing(path)
        return row
    data = _read_json(path)
    decision = data.get("decision")
    summary = data.get("summary") or {}
    threshold = data.get("threshold", MASK_DICE_THRESHOLD)
    mean_a = summary.get("mean_dice_vae")
    row.figure = f"mean Dice A = {_fmt(mean_a)} (threshold {_fmt(threshold, 2)}) -> decision: {decision}"
    if decision in ("vae", "downsample"):
        row.status = "PASS"
    else:
        row.figure += " (no valid decision in the file)"
    return row


def _sidecar(run_dir: Path) -> tuple[Path, dict | None]:
    """The adapter sidecar's path and content (None when the file is missing)."""
    path = run_dir / "adapter" / "neuromf_adapter.json"
    return path, (_read_json(path) if path.is_file() else None)


def _t2(run_dir: Path, t2_t3: dict | None) -> Row:
    row = Row("P7-T2", "LoRA injects and the model forward pass runs", True, "FAIL", "", "")
    if t2_t3 is not None:
        row.source = "in-process check (inject LoRA + forward on random input)"
        ok = bool(t2_t3.get("forward_ok"))
        row.status = "PASS" if ok else "FAIL"
        row.figure = f"forward {'OK' if ok else 'failed'}, output shape {t2_t3.get('output_shape')}"
        return row
    path, side = _sidecar(run_dir)
    row.source = str(path)
    if side is None:
        row.figure = _missing(path)
        return row
    peft_files = [run_dir / "adapter" / n for n in ("adapter_config.json", "adapter_model.safetensors")]
    absent = [p.name for p in peft_files if not p.is_file()]
    channels = side.get("channels") or {}
    row.figure = (f"adapter saved by a training run (strategy {side.get('strategy')}, channels image "
                  f"{channels.get('image')} + mask {channels.get('mask')})")
    if absent:
        row.figure += f"; peft files missing: {', '.join(absent)}"
    else:
        row.status = "PASS"
    return row


def _t3(run_dir: Path, t2_t3: dict | None) -> Row:
    row = Row("P7-T3", "Only LoRA (and widened I/O) parameters train", True, "FAIL", "", "")
    if t2_t3 is not None:
        row.source = "in-process check (count requires_grad parameters)"
        trainable, total = t2_t3.get("trainable"), t2_t3.get("total")
        fraction = t2_t3.get("fraction")
    else:
        path, side = _sidecar(run_dir)
        row.source = str(path)
        if side is None:
            row.figure = _missing(path)
            return row
        trainable, total = side.get("trainable_params"), side.get("total_params")
        fraction = None
    if fraction is None and trainable is not None and total:
        fraction = trainable / total
    if fraction is None:
        row.figure = "trainable/total parameter counts not available"
        return row
    row.figure = f"trainable {_fmt(trainable)} / total {_fmt(total)} = {100 * fraction:.3f}% (limit < 1%)"
    row.status = "PASS" if fraction < LORA_FRACTION_LIMIT else "FAIL"
    return row


def _read_losses(path: Path) -> list[dict[str, float]]:
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "epoch" in row and "loss" in row:
                rows.append(row)
    return sorted(rows, key=lambda r: r["epoch"])


def _t4(run_dir: Path) -> tuple[Row, list[dict[str, float]]]:
    path = run_dir / "losses.csv"
    row = Row("P7-T4", "Training loss decreases on FCD data", True, "FAIL", "", str(path))
    if not path.is_file():
        row.figure = _missing(path)
        return row, []
    rows = _read_losses(path)
    if len(rows) < 2:
        row.figure = f"{len(rows)} epoch(s) logged; need at least 2 to compare"
        return row, rows
    first, last = rows[0], rows[-1]
    # the adaptive weight w = 1/(L + c) makes the optimised loss about 1 by construction: compare the
    # unweighted per-channel Lp ("raw") when it was logged
    key = "raw" if "raw" in first and "raw" in last else "loss"
    parts = "".join(f"; {k[4:]} {first[k]:.4g} -> {last[k]:.4g}" for k in ("raw_img", "raw_mask")
                    if k in first and k in last)
    row.figure = (f"{'unweighted Lp loss' if key == 'raw' else 'loss'} epoch {int(first['epoch'])} = "
                  f"{first[key]:.4g} -> epoch {int(last['epoch'])} = {last[key]:.4g}{parts}")
    if math.isfinite(last[key]) and math.isfinite(first[key]) and last[key] < first[key]:
        row.status = "PASS"
    return row, rows


def _t5(stage_dir: Path, report_dir: Path, max_montages: int) -> tuple[Row, list[tuple[str, str]]]:
    from neuromf.eval.metrics import find_generated_pairs, load_generated_pair, voxel_volume_cm3

    generated_dir = stage_dir / "generated"
    row = Row("P7-T5", "Generated FLAIR images show lesion-like features", True, "FAIL", "", str(generated_dir))
    try:
        pairs = find_generated_pairs(generated_dir)
    except ValueError as err:
        row.figure = str(err)
        return row, []
    loaded = []
    for sid, flair, mask in pairs:
        image, binary, affine = load_generated_pair(flair, mask)
        loaded.append((sid, image, binary, int(binary.sum()) * voxel_volume_cm3(affine)))
    nonempty = [item for item in loaded if item[2].any()]
    chosen_ids = {item[0] for item in (nonempty + [i for i in loaded if not i[2].any()])[:max(0, max_montages)]}
    montages = []
    for sid, image, binary, cm3 in loaded:
        if sid not in chosen_ids:
            continue
        title = f"{sid}: lesion {cm3:.2f} cm³" if binary.any() else f"{sid}: empty mask"
        png = lesion_montage(image, binary, report_dir / "montages" / f"{sid}.png", title=title)
        montages.append((sid, png.relative_to(report_dir).as_posix()))
    row.figure = (f"{len(montages)} montage(s) below; {len(nonempty)}/{len(loaded)} generated masks non-empty")
    if montages and nonempty:
        # a program cannot judge "lesion-like": the montages are ready, a person decides (see them below)
        row.status = "REVIEW (visual inspection)"
    return row, montages


def _t6(stage_dir: Path) -> Row:
    path = stage_dir / "metrics" / "metrics.json"
    row = Row("P7-T6", "Generated masks overlap real FCD masks (mean best Dice > 0.3)", False, "NOT RUN", "",
              str(path))
    if not path.is_file():
        row.figure = _missing(path)
        return row
    data = _read_json(path)
    scores = data.get("dice") or {}
    target = scores.get("target", 0.3)
    row.status = "INFO"
    row.figure = (f"mean best Dice train {_fmt(scores.get('mean_best_train'))} / test "
                  f"{_fmt(scores.get('mean_best_test'))} (target > {_fmt(target, 1)})")
    if data.get("fraction_nonempty") is not None:
        row.figure += f"; {100 * data['fraction_nonempty']:.0f}% masks non-empty"
    contrast = data.get("lesion_contrast") or {}
    if contrast.get("generated_mean") is not None:
        row.figure += (f"; lesion contrast generated {_fmt(contrast.get('generated_mean'), 2)} vs real "
                       f"{_fmt(contrast.get('real_mean'), 2)}")
    return row


def _t7(stage_dir: Path) -> Row:
    path = stage_dir / "ablation_lp.json"
    row = Row("P7-T7", "Per-channel Lp (1.5/2.0) vs uniform L2 on mask Dice", False, "NOT RUN", "", str(path))
    if not path.is_file():
        row.figure = f"not run ({_missing(path)})"
        return row
    data = _read_json(path)
    lp, l2 = data.get("per_channel_lp") or {}, data.get("uniform_l2") or {}
    key = "mean_dice_test" if lp.get("mean_dice_test") is not None else "mean_dice_train"
    split = key.split("_")[-1]
    better = data.get("better")
    row.status = "INFO"
    row.figure = (f"{split} Dice: per-channel Lp (p_img {lp.get('p_img')}, p_mask {lp.get('p_mask')}) "
                  f"{_fmt(lp.get(key))} vs uniform L2 {_fmt(l2.get(key))} -> better: {better}")
    if better in ("uniform_l2", "tie"):
        row.figure += " (null result for per-channel Lp)"
    return row


def _safe(test: str, description: str, critical: bool, build: Any, source: Path) -> Any:
    """Run one row builder; an unreadable input becomes a FAIL / NOT RUN row naming the error."""
    try:
        return build()
    except Exception as err:  # any malformed input must still yield a report row
        status = "FAIL" if critical else "NOT RUN"
        return Row(test, description, critical, status, f"cannot read input: {type(err).__name__}: {err}",
                   str(source))


def _loss_curve(run_dir: Path, report_dir: Path, rows: list[dict[str, float]]) -> str | None:
    """Copy run_dir/loss_curve.png next to the report (or draw it from losses.csv); relative link or None."""
    src, dst = run_dir / "loss_curve.png", report_dir / "loss_curve.png"
    try:
        if src.is_file():
            atomic_write(dst, lambda p: shutil.copyfile(src, p))
        elif len(rows) >= 1:
            from neuromf.train.logging import plot_loss_curve

            plot_loss_curve(rows, dst)
        else:
            return None
    except Exception:  # a missing figure must not stop the report
        return None
    return dst.name


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_verification_report(stage_dir: Path, run_dir: Path, report_path: Path, t2_t3: dict | None = None,
                              max_montages: int = 8) -> Path:
    """Write the Phase 7 verification report (markdown) with montages and loss curve next to it.

    Inputs: stage_dir/{mask_vae_test.json, generated/, metrics/metrics.json, ablation_lp.json} and
    run_dir/{losses.csv, loss_curve.png, adapter/neuromf_adapter.json}; `t2_t3` is an in-process LoRA check
    ({"forward_ok", "output_shape", "trainable", "total", "fraction"}) that overrides the sidecar counts.
    "Phase 7 PASSED" iff P7-T1..T4 pass and a reader accepts the P7-T5 montages (status REVIEW).
    """
    stage_dir, run_dir, report_path = Path(stage_dir), Path(run_dir), Path(report_path)
    report_dir = report_path.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    sidecar = run_dir / "adapter" / "neuromf_adapter.json"

    loss_rows: list[dict[str, float]] = []
    montages: list[tuple[str, str]] = []

    def t4() -> Row:
        row, rows = _t4(run_dir)
        loss_rows.extend(rows)
        return row

    def t5() -> Row:
        row, written = _t5(stage_dir, report_dir, max_montages)
        montages.extend(written)
        return row

    rows = [
        _safe("P7-T1", "Mask VAE round-trip Dice (strategy A) and strategy choice", True, lambda: _t1(stage_dir),
              stage_dir / "mask_vae_test.json"),
        _safe("P7-T2", "LoRA injects and the model forward pass runs", True, lambda: _t2(run_dir, t2_t3), sidecar),
        _safe("P7-T3", "Only LoRA (and widened I/O) parameters train", True, lambda: _t3(run_dir, t2_t3), sidecar),
        _safe("P7-T4", "Training loss decreases on FCD data", True, t4, run_dir / "losses.csv"),
        _safe("P7-T5", "Generated FLAIR images show lesion-like features", True, t5, stage_dir / "generated"),
        _safe("P7-T6", "Generated masks overlap real FCD masks (mean best Dice > 0.3)", False,
              lambda: _t6(stage_dir), stage_dir / "metrics" / "metrics.json"),
        _safe("P7-T7", "Per-channel Lp (1.5/2.0) vs uniform L2 on mask Dice", False, lambda: _t7(stage_dir),
              stage_dir / "ablation_lp.json"),
    ]
    curve = _loss_curve(run_dir, report_dir, loss_rows)

    failing = [r.test for r in rows if r.critical and not r.passed and not r.status.startswith("REVIEW")]
    review = [r.test for r in rows if r.status.startswith("REVIEW")]
    if failing:
        verdict = f"**Phase 7 NOT PASSED**: {', '.join(failing)} not PASS"
    elif review:
        verdict = (f"**Phase 7: automatic checks PASS; {', '.join(review)} awaits visual inspection** of the montages "
                   "below (Phase 7 passes when a reader judges the generated lesions lesion-like)")
    else:
        verdict = "**Phase 7 PASSED** (P7-T1..T5 all PASS)"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Phase 7 verification report",
        "",
        f"Written {now}. Stage folder `{stage_dir}`, training run `{run_dir}`.",
        "",
        verdict,
        "",
        "| Test | Description | Critical | Status | Figure | Source |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.test} | {_cell(r.description)} | {'yes' if r.critical else 'no'} | {r.status} | "
                     f"{_cell(r.figure)} | `{_cell(r.source)}` |")
    lines += ["", "## Training loss (P7-T4)", ""]
    lines.append(f"![loss curve]({curve})" if curve else f"No loss curve: {run_dir / 'loss_curve.png'} not found.")
    lines += ["", "## Generated samples (P7-T5)", ""]
    if montages:
        lines.append("Three orthogonal slices through each generated lesion's centroid; red: mask contour.")
        for sid, rel in montages:
            lines += ["", f"### {sid}", "", f"![{sid}]({rel})"]
    else:
        lines.append("No montages written (see P7-T5).")
    lines.append("")
    return atomic_write_text(report_path, "\n".join(lines))
