"""Per-epoch loss log: CSV (appended across resumes), optional TensorBoard, and a loss-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path

from neuromf.utils import atomic_write, atomic_write_figure


class EpochLog:
    """`enabled=False` (ranks other than 0 in a multi-process run) writes nothing."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = out_dir / "losses.csv"
        self.png = out_dir / "loss_curve.png"
        self.enabled = enabled
        self.writer = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                self.writer = None

    def rows(self) -> list[dict[str, float]]:
        """The logged epochs (losses.csv) as dicts of floats."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as fh:
            return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(fh)]

    def append(self, row: dict[str, float], keep_until_step: int | None = None) -> None:
        """Log one epoch's row (rank 0 only); after a resume, rows past `keep_until_step` are dropped."""
        if not self.enabled:
            return
        rows = self.rows()
        if keep_until_step is not None:  # after a resume, drop epochs logged past the checkpoint
            rows = [r for r in rows if r["step"] <= keep_until_step]
        rows.append(row)
        fields = list(dict.fromkeys(k for r in rows for k in r))

        def write(p: Path) -> None:
            with open(p, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.path, write)
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.writer.add_scalar(f"epoch/{key}", value, int(row["step"]))
            self.writer.flush()

    def plot(self) -> Path | None:
        """Redraw loss_curve.png from the log; None when nothing is logged."""
        rows = self.rows() if self.enabled else []
        if not rows:
            return None
        return plot_loss_curve(rows, self.png)

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(rows: list[dict[str, float]], png: Path) -> Path:
    """Loss curve PNG (log scale, one line per logged loss part; the fixed evaluation draw's parts dashed in their
    part's colour, from epoch 0), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    parts = [k for k in rows[-1] if k.startswith("raw") or k == "loss"]
    fixed = [k for k in rows[-1] if k.startswith("eval_")]
    fig, ax = plt.subplots(figsize=(7.5 if fixed else 6, 3.5), dpi=100)
    colours = {}
    for key in parts:
        (line,) = ax.plot(epochs, [r.get(key, float("nan")) for r in rows], label=key)
        colours[key] = line.get_color()
    # the fixed evaluation draw (what the report's loss check compares; epoch 0: before training): dashed, in its
    # part's colour
    for key in fixed:
        ax.plot(epochs, [r.get(key, float("nan")) for r in rows], "--", color=colours.get(key[5:]),
                label=f"{key[5:]} (fixed draw)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if fixed:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(png, fig, palette=True)
    plt.close(fig)
    return png
