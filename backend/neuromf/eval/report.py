"""Phase 7 verification report (`neuromf verify`): the rows of `neuromf.eval.checks.CHECKS` as a markdown table
(PASS / FAIL / INFO / NOT RUN, each naming the file its figure came from), then the loss curve, the lesion
tables and montages, and the Dice reference points. A partial pipeline still yields a report that says what is
missing; only an unwritable report path raises.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

from neuromf.eval.checks import CHECKS, ReportContext, Row, cell
from neuromf.utils import atomic_write, atomic_write_text


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


def _judged_note(rows: list[Row]) -> list[str]:
    """A paragraph above the table when the checks did not all judge the adapter the training run trained."""
    others = [r for r in rows if r.judged and "not by the adapter this training run trained" in r.judged]
    if not others:
        return []
    by_run = ", ".join(r.test for r in rows if r.judged.startswith("the adapter this training run trained"))
    return [f"Not every check judged the same adapter: {by_run or 'no check'} judged the adapter this training run "
            f"trained; {', '.join(r.test for r in others)} judged pairs of another adapter (column Judged).", ""]


def write_verification_report(stage_dir: Path, run_dir: Path, report_path: Path, t2_t3: dict | None = None,
                              max_montages: int = 8) -> Path:
    """Write the Phase 7 verification report (markdown) with figures, montages and loss curve next to it.

    Inputs: stage_dir/{mask_vae_test.json, generated/, metrics/metrics.json, ablation_lp.json} and
    run_dir/{losses.csv, loss_curve.png, adapter/neuromf_adapter.json}; `t2_t3` is an in-process LoRA check
    ({"forward_ok", "output_shape", "trainable", "total", "fraction"}) that overrides the sidecar counts.
    "Phase 7 PASSED" iff every critical check (P7-T1..T5) passes.
    """
    stage_dir, run_dir, report_path = Path(stage_dir), Path(run_dir), Path(report_path)
    report_dir = report_path.parent
    report_dir.mkdir(parents=True, exist_ok=True)
    ctx = ReportContext(stage_dir, run_dir, report_dir, t2_t3, max_montages)
    rows = [check.run(ctx) for check in CHECKS]
    curve = _loss_curve(run_dir, report_dir, ctx.loss_rows)

    failing = [r.test for r in rows if r.critical and not r.passed]
    critical = [r.test for r in rows if r.critical]
    if failing:
        verdict = f"**Phase 7 NOT PASSED**: {', '.join(failing)} not PASS"
    else:
        verdict = f"**Phase 7 PASSED** ({critical[0]}..{critical[-1]} all PASS)"
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Phase 7 verification report",
        "",
        f"Written {now}. Stage folder `{stage_dir}`, training run `{run_dir}`.",
        "",
        verdict,
        "",
        *_judged_note(rows),
        "| Test | Description | Critical | Status | Figure | Source | Judged |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.test} | {cell(r.description)} | {'yes' if r.critical else 'no'} | {r.status} | "
                     f"{cell(r.figure)} | `{cell(r.source)}` | {cell(r.judged) or '-'} |")
    lines += ["", "## Training loss (P7-T4)", ""]
    lines.append(f"![loss curve]({curve})" if curve else f"No loss curve: {run_dir / 'loss_curve.png'} not found.")
    lines += ["", "## Generated samples (P7-T5)", ""]
    lines += ctx.lesion_lines or ["No lesion-likeness figures (see P7-T5)."]
    lines.append("")
    if ctx.montages:
        lines.append("Three orthogonal slices through each generated lesion's centroid; red: mask contour.")
        for sid, rel in ctx.montages:
            lines += ["", f"### {sid}", "", f"![{sid}]({rel})"]
    else:
        lines.append("No montages written (see P7-T5).")
    if ctx.conditional_montages or ctx.conditional_lines:
        lines += ["", "## Conditional mode: a FLAIR for each lesion mask (C-1, beyond the spec)", ""]
        lines += ctx.conditional_lines
        for sid, rel in ctx.conditional_montages:
            lines += ["", f"### conditional {sid}", "", f"![conditional {sid}]({rel})"]
    lines += ["", "## Best-match Dice and its reference points (P7-T6)", ""]
    lines += ctx.dice_lines or ["No reference points (see P7-T6)."]
    lines.append("")
    return atomic_write_text(report_path, "\n".join(lines))
