"""The checks of the verification report, as a registry: `CHECKS` holds each check's id, description,
criticality, the input it reads and the function that builds its row (written once, here).

A missing or unreadable input turns its row into FAIL (critical checks) or NOT RUN (informational ones) naming
the file; a check never raises. The checks are honest about what they measure (issue 9): the loss decrease is
judged on a fixed evaluation draw when training logged one, lesion-likeness only on the automatic figures of
`neuromf evaluate` (montages are for the eye, not instead of figures), best-match Dice beside reference points
from real masks, the Lp ablation as mean +- sd over seeds.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuromf.eval.figures import lesion_montage
from neuromf.eval.lesion_metrics import CRITERIA, LESION_LIKE_RATE_TARGET, NOISE_CORRELATION_MAX
from neuromf.eval.mask_test import DICE_THRESHOLD
from neuromf.eval.metrics import DICE_TARGET
from neuromf.models.adapter_meta import ADAPTER_DIR, SIDECAR, AdapterMeta
from neuromf.models.lora import PEFT_FILES

LORA_FRACTION_LIMIT = 0.01
CONSISTENCY_TARGET = 0.3  # issue 9: a segmenter trained on real cases finds the generated lesion
CONDITIONAL_RATE_TARGET = 0.9  # masks drawn from the prior are real lesions: the FLAIR under them must show them
# parts of the loss on the fixed evaluation draw that training may log (losses.csv), with their report names
EVAL_LOSS_PARTS = (("eval_raw", "total"), ("eval_raw_img", "image"), ("eval_raw_mask", "mask"),
                   ("eval_raw_lesion", "lesion voxels"))
CRITERION_NAMES = {"nonempty": "non-empty", "largest_share": "largest component >= 80%",
                   "volume": "volume in real range", "inside_brain": ">= 90% inside brain",
                   "depth": "depth in real range", "location": "near real lesion sites", "contrast": "FLAIR contrast"}


@dataclass
class Row:
    """One line of the P7 table."""

    test: str
    description: str
    critical: bool
    status: str
    figure: str
    source: str
    judged: str = ""  # what the row judged (which adapter, which pairs), so a report of mixed sources says so

    @property
    def passed(self) -> bool:
        """True for PASS rows (including PASS with a remark)."""
        return self.status.startswith("PASS")


@dataclass
class ReportContext:
    """Inputs of all checks, and what they leave for the sections below the table."""

    stage_dir: Path
    run_dir: Path
    report_dir: Path
    t2_t3: dict | None
    max_montages: int
    loss_rows: list[dict[str, float]] = field(default_factory=list)
    montages: list[tuple[str, str]] = field(default_factory=list)
    lesion_lines: list[str] = field(default_factory=list)
    conditional_montages: list[tuple[str, str]] = field(default_factory=list)
    conditional_lines: list[str] = field(default_factory=list)
    dice_lines: list[str] = field(default_factory=list)

    @property
    def metrics_json(self) -> Path:
        """`neuromf evaluate`'s output for the joint pairs."""
        return self.stage_dir / "metrics" / "metrics.json"

    @property
    def sidecar(self) -> Path:
        """The adapter sidecar of the checked training run."""
        return self.run_dir / ADAPTER_DIR / SIDECAR


@dataclass(frozen=True)
class Check:
    """One P7 check: its id, description and criticality, the input it reads, and the function that builds its row
    (an unreadable input makes the row FAIL when critical, NOT RUN otherwise)."""

    test: str
    description: str
    critical: bool
    source: Callable[[ReportContext], Path]
    build: Callable[[Check, ReportContext], Row]
    judged: Callable[[ReportContext], str] = lambda ctx: ""

    def row(self, source: Path | str, status: str | None = None, figure: str = "") -> Row:
        """A row of this check reading `source`; the status defaults to FAIL (critical) or NOT RUN."""
        default = "FAIL" if self.critical else "NOT RUN"
        return Row(self.test, self.description, self.critical, status or default, figure, str(source))

    def run(self, ctx: ReportContext) -> Row:
        """This check's row for `ctx`; any error reading its input becomes a FAIL / NOT RUN row naming it."""
        try:
            row = self.build(self, ctx)
        except Exception as err:  # any malformed input must still yield a report row
            row = self.row(self.source(ctx), figure=f"cannot read input: {type(err).__name__}: {err}")
        try:
            row.judged = self.judged(ctx)
        except Exception as err:  # an unreadable record only leaves the column unsaid
            row.judged = f"unknown ({type(err).__name__}: {err})"
        return row


def ks_p(value: float | None) -> str:
    """A p-value for a report line: two significant digits, "< 0.001" below that ("n/a" for None or NaN)."""
    if value is None or math.isnan(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.2g}"


def fmt(value: Any, digits: int = 3) -> str:
    """A figure for a report line: "n/a" for None, thousands separators for ints, `digits` decimals for floats."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def cell(text: str) -> str:
    """`text` made safe for one Markdown table cell (escaped pipes, no newlines)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _read_json(path: Path) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError("top level is not a JSON object")
    return data


def _missing(path: Path) -> str:
    return f"missing file {path}"


def adapter_label(path: str | Path) -> str:
    """An adapter folder as the report names it: `shipped <name>` for the package's own weights, else the path."""
    from neuromf.utils import sample_data_root

    path = Path(path)
    try:
        return f"shipped `{path.resolve().relative_to((sample_data_root() / 'models').resolve()).as_posix()}`"
    except (ValueError, OSError):
        return f"`{path}`"


def judged_mask_test(ctx: ReportContext) -> str:
    """P7-T1 judges the VAE on the mask test's cases."""
    path = ctx.stage_dir / "mask_vae_test.json"
    if not path.is_file():
        return ""
    data = _read_json(path)
    return f"the VAE `{data.get('vae')}` on {len(data.get('cases') or [])} lesions of `{data.get('data_dir')}`"


def judged_run(ctx: ReportContext) -> str:
    """P7-T2..T4 judge the adapter the checked training run trained (and what it continued, if anything)."""
    _, side = _sidecar(ctx.run_dir)
    init = ((side.config if side else {}).get("lora") or {}).get("init_from")
    start = f", continuing {init!r}" if init else ", a fresh LoRA"
    return f"the adapter this training run trained (`{ctx.run_dir / ADAPTER_DIR}`{start if side else ''})"


def pairs_generators(generated_dir: Path) -> list[str]:
    """The adapters the pairs in `generated_dir` record as their generator (`sample_*.json` "adapter"), sorted;
    records that are missing, unreadable or without the entry are left out."""
    found = set()
    for record in sorted(generated_dir.glob("sample_*.json")):
        try:
            adapter = json.loads(record.read_text()).get("adapter")
        except (ValueError, OSError, AttributeError):
            continue
        if isinstance(adapter, str):
            found.add(adapter)
    return sorted(found)


def judged_pairs(generated_dir: Path, ctx: ReportContext) -> str:
    """The lesion checks judge the pairs in `generated_dir`: which adapter made them, and whether that is the
    adapter the checked training run trained ("" without such a folder)."""
    if not generated_dir.is_dir():
        return ""
    generators = pairs_generators(generated_dir)
    if not generators:
        return f"the pairs in `{generated_dir}` (their generator is not recorded)"
    trained = (ctx.run_dir / ADAPTER_DIR).resolve()
    own = all(Path(g).resolve() == trained for g in generators)
    return (f"pairs generated by {', '.join(adapter_label(g) for g in generators)}"
            + ("" if own else ", not by the adapter this training run trained"))


def mask_strategy_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T1: the mask test's Dice figures and the strategy decision (`mask_vae_test.json`)."""
    path = ctx.stage_dir / "mask_vae_test.json"
    row = check.row(path)
    if not path.is_file():
        row.figure = _missing(path)
        return row
    data = _read_json(path)
    decision = data.get("decision")
    summary = data.get("summary") or {}
    threshold = data.get("threshold", DICE_THRESHOLD)
    row.figure = (f"{len(data.get('cases') or [])} lesions: mean Dice A = {fmt(summary.get('mean_dice_vae'))} "
                  f"(threshold {fmt(threshold, 2)}) -> decision: {decision}")
    if summary.get("mean_dice_sdf") is not None:
        best_b = max((summary.get("mean_dice_downsample") or {}).values(), default=None)
        row.figure += (f"; strategy B round trips: binary best {fmt(best_b)}, signed distance (sdf) "
                       f"{fmt(summary['mean_dice_sdf'])}")
    ceilings = summary.get("ceilings") or {}
    if ceilings:
        row.figure += (f"; ceilings: lesion contrast {fmt(ceilings.get('median_contrast_vae_round_trip'))} after "
                       f"the VAE round trip ({100 * ceilings.get('share_hyperintense_vae_round_trip', 0):.0f}% "
                       f"hyperintense), sdf round trips lesion-like "
                       f"{100 * ceilings.get('sdf_round_trip_lesion_like', 0):.0f}%")
    if decision in ("vae", "downsample", "sdf"):
        row.status = "PASS"
    else:
        row.figure += " (no valid decision in the file)"
    return row


def _sidecar(run_dir: Path) -> tuple[Path, AdapterMeta | None]:
    """The adapter sidecar's path and content (None when the file is missing; malformed: an error naming it)."""
    path = run_dir / ADAPTER_DIR / SIDECAR
    return path, (AdapterMeta.load(path.parent) if path.is_file() else None)


def lora_forward_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T2: a forward pass through the LoRA-injected joint model works (in process, or from the saved adapter)."""
    if ctx.t2_t3 is not None:
        ok = bool(ctx.t2_t3.get("forward_ok"))
        return check.row("in-process check (inject LoRA + forward on random input)", "PASS" if ok else "FAIL",
                         f"forward {'OK' if ok else 'failed'}, output shape {ctx.t2_t3.get('output_shape')}")
    path, side = _sidecar(ctx.run_dir)
    row = check.row(path)
    if side is None:
        row.figure = _missing(path)
        return row
    absent = [name for name in PEFT_FILES if not (path.parent / name).is_file()]
    row.figure = (f"adapter saved by a training run (strategy {side.strategy}, channels image "
                  f"{side.n_image} + mask {side.n_mask})")
    if absent:
        row.figure += f"; peft files missing: {', '.join(absent)}"
    else:
        row.status = "PASS"
    return row


def trainable_share_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T3: the trainable share of parameters stays under `LORA_FRACTION_LIMIT`."""
    if ctx.t2_t3 is not None:
        row = check.row("in-process check (count requires_grad parameters)")
        trainable, total = ctx.t2_t3.get("trainable"), ctx.t2_t3.get("total")
        fraction = ctx.t2_t3.get("fraction")
    else:
        path, side = _sidecar(ctx.run_dir)
        row = check.row(path)
        if side is None:
            row.figure = _missing(path)
            return row
        trainable, total = side.trainable_params, side.total_params
        fraction = None
    if fraction is None and trainable is not None and total:
        fraction = trainable / total
    if fraction is None:
        row.figure = "trainable/total parameter counts not available"
        return row
    row.figure = f"trainable {fmt(trainable)} / total {fmt(total)} = {100 * fraction:.3f}% (limit < 1%)"
    row.status = "PASS" if fraction < LORA_FRACTION_LIMIT else "FAIL"
    row.figure += _warm_start_remark(ctx.run_dir)
    return row


def _warm_start_remark(run_dir: Path) -> str:
    """For a run that continued a saved adapter (`lora.init_from`): what that adapter's own training trained, so
    the row's share is read as this run's, not the whole adapter's."""
    _, side = _sidecar(run_dir)
    init = ((side.config if side else {}).get("lora") or {}).get("init_from")
    if not init:
        return ""
    from neuromf.models.adapter_meta import adapter_meta

    source = adapter_meta(init, "joint")
    share = source.trainable_params / source.total_params if source.total_params else math.nan
    over = " (over the limit)" if share >= LORA_FRACTION_LIMIT else ""
    return (f"; this run continued the adapter {init!r} (lora.init_from, training only lora.train_only "
            f"{(side.config.get('lora') or {}).get('train_only')} and the widened convs); that adapter's own training "
            f"trained {fmt(source.trainable_params)} = {100 * share:.3f}%{over}")


def _read_losses(path: Path) -> tuple[list[dict[str, float]], list[str]]:
    """Numeric rows of losses.csv sorted by epoch (blank cells left out of a row), and the header's columns."""
    rows = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        for raw in reader:
            row = {}
            for key, value in raw.items():
                try:
                    row[key] = float(value)
                except (TypeError, ValueError):
                    continue
            if "epoch" in row and ("loss" in row or "eval_raw" in row):  # epoch 0: an evaluation before training
                rows.append(row)
        columns = list(reader.fieldnames or [])
    return sorted(rows, key=lambda r: r["epoch"]), columns


def loss_decrease_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T4: the training loss decreased, on the fixed evaluation draw when `losses.csv` logged one."""
    path = ctx.run_dir / "losses.csv"
    row = check.row(path)
    if not path.is_file():
        row.figure = _missing(path)
        return row
    rows, columns = _read_losses(path)
    ctx.loss_rows.extend(rows)
    if "eval_raw" in columns:
        return _fixed_draw_loss_row(row, rows)
    if len(rows) < 2:
        row.figure = f"{len(rows)} epoch(s) logged; need at least 2 to compare"
        return row
    first, last = rows[0], rows[-1]
    # the adaptive weight w = 1/(L + c) makes the optimised loss about 1 by construction: compare the
    # unweighted per-channel Lp ("raw") when it was logged
    key = "raw" if "raw" in first and "raw" in last else "loss"
    parts = "".join(f"; {k[4:]} {first[k]:.4g} -> {last[k]:.4g}" for k in ("raw_img", "raw_mask")
                    if k in first and k in last)
    row.figure = (f"{'unweighted Lp loss' if key == 'raw' else 'loss'} epoch {int(first['epoch'])} = "
                  f"{first[key]:.4g} -> epoch {int(last['epoch'])} = {last[key]:.4g}{parts} (random batches: "
                  "no fixed evaluation draw logged)")
    if math.isfinite(last[key]) and math.isfinite(first[key]) and last[key] < first[key]:
        row.status = "PASS"
    return row


def _fixed_draw_loss_row(row: Row, rows: list[dict[str, float]]) -> Row:
    """P7-T4 on the loss of a fixed evaluation draw (same cases, noise and times every epoch): PASS iff the total
    and every logged part (image, mask, lesion voxels) are lower at the last evaluated epoch than at the first (epoch
    0, before training, where the run logged it). Parts that were lower at an epoch in between are named."""
    evaluated = [r for r in rows if "eval_raw" in r]
    if len(evaluated) < 2:
        row.figure = f"{len(evaluated)} epoch(s) with a fixed-draw evaluation (eval_raw); need at least 2"
        return row
    first, last = evaluated[0], evaluated[-1]
    compared = [(key, name) for key, name in EVAL_LOSS_PARTS if key in first and key in last]
    changes = "; ".join(f"{name} {first[key]:.4g} -> {last[key]:.4g}" for key, name in compared)
    not_lower = [name for key, name in compared
                 if not (math.isfinite(first[key]) and math.isfinite(last[key]) and last[key] < first[key])]
    row.figure = (f"unweighted Lp on a fixed evaluation draw, epoch {int(first['epoch'])} -> "
                  f"{int(last['epoch'])}: {changes}")
    # a part that was lower at an epoch between: said, so that a rise after it is not hidden by the comparison
    lows = []
    for key, name in compared:
        low = min(((r[key], int(r["epoch"])) for r in evaluated[1:-1] if key in r and math.isfinite(r[key])),
                  default=None)
        if low is not None and low[0] < last[key]:
            lows.append(f"{name} {low[0]:.4g} at epoch {low[1]}")
    if lows:
        row.figure += f"; lowest in between: {', '.join(lows)}"
    if not_lower:
        row.figure += f"; not lower: {', '.join(not_lower)}"
    else:
        row.status = "PASS"
    return row


def joint_lesion_like_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T5: the share of lesion-like joint pairs, from `neuromf evaluate`'s figures."""
    return _lesion_like_row(check, ctx, ctx.stage_dir / "generated", ctx.metrics_json, LESION_LIKE_RATE_TARGET,
                            ctx.montages, ctx.lesion_lines)


def conditional_lesion_like_row(check: Check, ctx: ReportContext) -> Row:
    """The share of lesion-like conditional pairs (FLAIRs generated for prior-drawn masks)."""
    folder = ctx.stage_dir / "conditional"
    return _lesion_like_row(check, ctx, folder / "generated", folder / "metrics.json", CONDITIONAL_RATE_TARGET,
                            ctx.conditional_montages, ctx.conditional_lines, subfolder="conditional")


def _lesion_like_row(check: Check, ctx: ReportContext, generated_dir: Path, metrics_json: Path, target: float,
                     montages_out: list[tuple[str, str]], lines_out: list[str], subfolder: str = "") -> Row:
    """Montages of generated pairs and the verdict of their automatic lesion-likeness figures (rate >= target,
    and noise correlation < the limit where the generator recorded it)."""
    from neuromf.eval.metrics import find_generated_pairs, load_generated_pair, voxel_volume_cm3

    row = check.row(f"{generated_dir}; {metrics_json}")
    try:
        pairs = find_generated_pairs(generated_dir)
    except ValueError as err:
        row.figure = str(err)
        return row
    data, section, problem = _lesion_like_section(metrics_json, [sid for sid, _, _ in pairs])
    per_sample = {s["id"]: s for s in (section or {}).get("samples", [])}
    loaded = []
    for sid, flair, mask in pairs:
        image, binary, affine = load_generated_pair(flair, mask)
        loaded.append((sid, image, binary, int(binary.sum()) * voxel_volume_cm3(affine)))
    nonempty = [item for item in loaded if item[2].any()]
    chosen = {item[0] for item in (nonempty + [i for i in loaded if not i[2].any()])[:max(0, ctx.max_montages)]}
    for sid, image, binary, cm3 in loaded:
        if sid not in chosen:
            continue
        title = f"{sid}: lesion {cm3:.2f} cm³" if binary.any() else f"{sid}: empty mask"
        if sid in per_sample:
            title += _verdict_text(per_sample[sid])
        png = lesion_montage(image, binary, ctx.report_dir / "montages" / subfolder / f"{sid}.png", title=title)
        montages_out.append((sid, png.relative_to(ctx.report_dir).as_posix()))
    montages = f"{len(montages_out)} montage(s) below; {len(nonempty)}/{len(loaded)} masks non-empty"
    if problem:
        row.figure = f"{problem}; {montages}"
        return row

    samples = section["samples"]
    n = len(samples)
    n_like = sum(s.get("lesion_like") is True for s in samples)
    rate = n_like / n if n else 0.0
    rates = {c: sum(bool((s.get("criteria") or {}).get(c)) for s in samples) / n if n else 0.0 for c in CRITERIA}
    correlations = [abs(s["noise_correlation"]) for s in samples if s.get("noise_correlation") is not None]
    summary = section.get("summary") or {}
    figure = (f"{n_like}/{n} generated pairs lesion-like ({100 * rate:.0f}%, target >= "
              f"{100 * target:.0f}%); per criterion: "
              + ", ".join(f"{CRITERION_NAMES[c]} {100 * rates[c]:.0f}%" for c in CRITERIA)
              + f"; volume KS vs real {fmt(summary.get('volume_ks_statistic'), 2)}"
              + f"; contrast KS vs real {fmt(summary.get('contrast_ks_statistic'), 2)}"
              + f"; lesion sites' spread {fmt(summary.get('position_spread'), 2)} (lesion-like "
                f"{fmt(summary.get('position_spread_lesion_like'), 2)}; real "
                f"{fmt(summary.get('real_position_spread'), 2)})")
    failed = []
    if rate < target:
        weakest = sorted(CRITERIA, key=lambda c: rates[c])[:2]
        failed.append(f"only {100 * rate:.0f}% lesion-like (< {100 * target:.0f}%; weakest: "
                      + ", ".join(f"{CRITERION_NAMES[c]} {100 * rates[c]:.0f}%" for c in weakest) + ")")
    if correlations:
        worst = max(correlations)
        figure += f"; mask-latent noise correlation max abs(r) {worst:.3f} (target < {NOISE_CORRELATION_MAX})"
        if worst >= NOISE_CORRELATION_MAX:
            failed.append(f"noise correlation max abs(r) {worst:.3f} >= {NOISE_CORRELATION_MAX}")
    elif not subfolder:
        figure += "; noise correlation not recorded by the generator"
    redrawn = (section.get("mask_draws") or {}).get("redrawn")
    if redrawn:
        figure += f"; {redrawn}/{n} masks drawn again after an empty or too small first draw"
    control = data.get("empty_mask_control")
    if isinstance(control, dict) and control.get("n"):
        figure += (f"; empty-mask control ({control['n']} pairs, same noise, no lesion): contrast "
                   f"{fmt(control.get('median_contrast_empty_mask'), 3)} vs {fmt(control.get('median_contrast'), 3)} "
                   f"as generated, the mask adds median {fmt(control.get('median_gain'), 3)} "
                   f"(smallest {fmt(control.get('min_gain'), 3)})")
    row.figure = (f"FAILED: {'; '.join(failed)}. " if failed else "") + f"{figure}; {montages}"
    row.status = "FAIL" if failed else "PASS"
    lines_out.extend(_lesion_tables(section, samples, rates))
    return row


def _lesion_like_section(path: Path, sample_ids: list[str]) -> tuple[dict, dict | None, str | None]:
    """metrics.json (empty when missing), its ``lesion_like`` section, or a reason why P7-T5 has no automatic
    figures to judge."""
    if not path.is_file():
        return {}, None, f"no automatic figures: {_missing(path)} (run `neuromf evaluate`)"
    data = _read_json(path)
    section = data.get("lesion_like")
    if not isinstance(section, dict) or not isinstance(section.get("samples"), list):
        return data, None, f"no automatic figures: {path} has no lesion_like section (re-run `neuromf evaluate`)"
    if section.get("reference") is None:
        return data, None, f"no automatic figures: {path} has no real-lesion reference ({section.get('error', '')})"
    scored = sorted(s.get("id") for s in section["samples"])
    if scored != sorted(sample_ids):
        return data, None, (f"stale figures: {path} scores {len(scored)} sample(s), the generated folder holds "
                      f"{len(sample_ids)} different or more (re-run `neuromf evaluate`)")
    return data, section, None


def _verdict_text(sample: dict) -> str:
    if sample.get("lesion_like"):
        return " (lesion-like)"
    failed = [CRITERION_NAMES.get(c, c) for c in sample.get("failed") or []]
    return f" (fails: {', '.join(failed)})" if failed else ""


def _lesion_tables(section: dict, samples: list[dict], rates: dict[str, float]) -> list[str]:
    """Markdown for the P7-T5 section: pass rates beside the real lesions' and one line of figures per sample."""
    ref = section.get("reference") or {}
    real = (section.get("real_summary") or {}).get("rates") or {}
    low, high = ref.get("accepted_volume_cm3") or [None, None]
    lines = [
        f"Judged against {ref.get('n')} real lesions on the same grid: volume {fmt(low, 2)}-{fmt(high, 2)} cm³, "
        f"median depth {fmt(ref.get('min_depth_mm'), 1)}-{fmt(ref.get('max_depth_mm'), 1)} mm, contrast >= "
        f"{fmt(ref.get('accepted_min_contrast'), 3)} (real median {fmt(ref.get('median_contrast'), 3)}), "
        f"centroid within {fmt(ref.get('max_position_distance'), 3)} (brain-box-normalised) of a real lesion's. The "
        "real lesions define the volume, depth and location ranges, so they pass those three by construction.",
        "",
        "| Criterion | Generated pass rate | Real lesions pass rate |",
        "|---|---|---|",
    ]
    for c in CRITERIA:
        lines.append(f"| {CRITERION_NAMES[c]} | {100 * rates[c]:.0f}% | "
                     f"{'n/a' if real.get(c) is None else f'{100 * real[c]:.0f}%'} |")
    lines += ["", "| Sample | Volume cm³ | Components | Largest share | Inside brain | Median depth mm | "
              "Distance to real sites | Contrast | Noise r | Lesion-like |", "|---" * 10 + "|"]
    for s in samples:
        verdict = "yes" if s.get("lesion_like") else "no" + _verdict_text(s)
        lines.append(f"| {s.get('id')} | {fmt(s.get('volume_cm3'), 2)} | {fmt(s.get('n_components'))} | "
                     f"{fmt(s.get('largest_share'), 2)} | {fmt(s.get('inside_brain_share'), 2)} | "
                     f"{fmt(s.get('median_depth_mm'), 1)} | {fmt(s.get('location_distance'), 3)} | "
                     f"{fmt(s.get('contrast'), 3)} | "
                     f"{fmt(s.get('noise_correlation'), 3)} | {cell(verdict)} |")
    return lines


def best_match_dice_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T6: best-match Dice of generated masks against real train / test masks, beside reference points."""
    path = ctx.metrics_json
    row = check.row(path)
    if not path.is_file():
        row.figure = _missing(path)
        return row
    data = _read_json(path)
    scores = data.get("dice") or {}
    target = scores.get("target", DICE_TARGET)
    row.status = "INFO"
    row.figure = (f"mean best Dice train {fmt(scores.get('mean_best_train'))} / test "
                  f"{fmt(scores.get('mean_best_test'))} (spec target > {fmt(target, 1)})")
    ref = scores.get("reference")
    if isinstance(ref, dict):
        row.figure += (f"; reference points from real masks on this grid: held-out vs train "
                       f"{fmt(ref.get('real_test_vs_train'))}, leave-one-out within train "
                       f"{fmt(ref.get('train_leave_one_out'))}, perfect memoriser vs test "
                       f"{fmt(ref.get('memoriser_best_test'))} (vs train {fmt(ref.get('memoriser_best_train'))})")
        ctx.dice_lines.extend(_dice_table(scores, ref))
    else:
        row.figure += "; no reference points in the file (re-run `neuromf evaluate`)"
    if data.get("fraction_nonempty") is not None:
        row.figure += f"; {100 * data['fraction_nonempty']:.0f}% masks non-empty"
    contrast = data.get("lesion_contrast") or {}
    if contrast.get("generated_mean") is not None:
        row.figure += (f"; lesion contrast generated {fmt(contrast.get('generated_mean'), 2)} vs real "
                       f"{fmt(contrast.get('real_mean'), 2)}")
    return row


def _dice_table(scores: dict, ref: dict) -> list[str]:
    definitions = ref.get("definitions") or {}
    return [
        "| Masks scored | Mean best Dice vs train | Mean best Dice vs test | Definition |",
        "|---|---|---|---|",
        f"| generated | {fmt(scores.get('mean_best_train'))} | {fmt(scores.get('mean_best_test'))} | best Dice of "
        "each generated mask over the real masks of the split |",
        f"| real held-out | {fmt(ref.get('real_test_vs_train'))} | - | "
        f"{cell(definitions.get('real_test_vs_train', ''))} |",
        f"| real training, leave-one-out | {fmt(ref.get('train_leave_one_out'))} | - | "
        f"{cell(definitions.get('train_leave_one_out', ''))} |",
        f"| perfect memoriser | {fmt(ref.get('memoriser_best_train'))} | {fmt(ref.get('memoriser_best_test'))} "
        f"| {cell(definitions.get('memoriser', ''))} |",
    ]


def _per_seed(data: dict, arm: str, key: str) -> list[float] | None:
    """Per-seed values of `key` for one ablation arm, or None when the file has no per-seed lists.

    Accepted layouts: ``{arm: {key: [v, ...]}}``, ``{arm: {"seeds": [{key: v}, ...]}}`` and
    ``{"seeds": [{arm: {key: v}}, ...]}`` (a top-level ``seeds`` list of numbers marks the first layout).
    """
    block = data.get(arm) or {}
    if isinstance(block.get(key), list):
        values = block[key]
    elif isinstance(block.get("seeds"), list):
        values = [s.get(key) for s in block["seeds"] if isinstance(s, dict)]
    elif isinstance(data.get("seeds"), list) and all(isinstance(s, dict) for s in data["seeds"]):
        values = [(s.get(arm) or {}).get(key) for s in data["seeds"]]
    else:
        return None
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f} ± {sd:.3f}" if len(values) > 1 else f"{values[0]:.3f} (1 seed)"


def lp_ablation_row(check: Check, ctx: ReportContext) -> Row:
    """P7-T7: the per-channel Lp ablation, as mean +- sd over seeds per arm."""
    path = ctx.stage_dir / "ablation_lp.json"
    row = check.row(path)
    if not path.is_file():
        row.figure = f"not run ({_missing(path)})"
        return row
    data = _read_json(path)
    lp, l2 = data.get("per_channel_lp") or {}, data.get("uniform_l2") or {}
    better = data.get("better")
    row.status = "INFO"
    arms = f"per-channel Lp (p_img {lp.get('p_img')}, p_mask {lp.get('p_mask')})"
    if "seeds" in data or "seeds" in lp or "seeds" in l2:
        candidates = [data.get("metric"), "mean_dice_test", "mean_dice_train"]
        key = next((k for k in candidates if isinstance(k, str) and _per_seed(data, "per_channel_lp", k)
                    and _per_seed(data, "uniform_l2", k)), None)
        if key is None:
            row.figure = "per-seed ablation without per-seed values of a compared figure"
            return row
        a, b = _per_seed(data, "per_channel_lp", key) or [], _per_seed(data, "uniform_l2", key) or []
        row.figure = (f"{key}, mean ± sd over seeds (n = {len(a)} / {len(b)}): {arms} {_mean_sd(a)} vs uniform "
                      f"L2 {_mean_sd(b)}" + ("" if better is None else f" -> better: {better}"))
        spread = max(np.std(a, ddof=1) if len(a) > 1 else 0.0, np.std(b, ddof=1) if len(b) > 1 else 0.0)
        if abs(np.mean(a) - np.mean(b)) <= spread:
            row.figure += " (difference within one sd: null result)"
        elif better in ("uniform_l2", "tie"):
            row.figure += " (null result for per-channel Lp)"
        return row
    key = "mean_dice_test" if lp.get("mean_dice_test") is not None else "mean_dice_train"
    row.figure = (f"{key.split('_')[-1]} Dice: {arms} {fmt(lp.get(key))} vs uniform L2 {fmt(l2.get(key))} -> "
                  f"better: {better} (one seed)")
    if better in ("uniform_l2", "tie"):
        row.figure += " (null result for per-channel Lp)"
    return row


def consistency_row(check: Check, ctx: ReportContext) -> Row:
    """Image-mask consistency of the conditional pairs: a segmenter trained on real cases, run on generated FLAIRs,
    Dice against the masks they were generated for; its Dice on held-out real cases is the ceiling."""
    path = ctx.stage_dir / "conditional" / "consistency.json"
    row = check.row(path)
    if not path.is_file():
        row.figure = f"not run ({_missing(path)})"
        return row
    data = _read_json(path)

    def pm(d: dict) -> str:
        return "n/a" if d.get("mean") is None else _mean_sd(list(d.get("values") or [d["mean"]]))

    cons, ceiling, down = data["consistency"], data["ceiling"], data["downstream"]
    row.status = "PASS" if (cons.get("mean") or 0.0) > CONSISTENCY_TARGET else "FAIL"
    row.figure = (f"consistency Dice {pm(cons)} (target > {CONSISTENCY_TARGET}; ceiling on held-out real cases "
                  f"{pm(ceiling)}); downstream segmenter on held-out real cases: real only "
                  f"{pm(down['real_only'])} vs real + generated {pm(down['real_plus_generated'])} "
                  f"({down.get('verdict', '')})")
    return row


CHECKS: tuple[Check, ...] = (
    Check("P7-T1", "Mask VAE round-trip Dice (strategy A) and strategy choice", True,
          lambda c: c.stage_dir / "mask_vae_test.json", mask_strategy_row, judged_mask_test),
    Check("P7-T2", "LoRA injects and the model forward pass runs", True, lambda c: c.sidecar, lora_forward_row,
          judged_run),
    Check("P7-T3", "Only LoRA (and widened I/O) parameters train", True, lambda c: c.sidecar, trainable_share_row,
          judged_run),
    Check("P7-T4", "Training loss decreases on FCD data (fixed evaluation draw when logged)", True,
          lambda c: c.run_dir / "losses.csv", loss_decrease_row, judged_run),
    Check("P7-T5", f"Generated pairs are lesion-like (>= {100 * LESION_LIKE_RATE_TARGET:.0f}% pass all criteria, "
          f"noise correlation < {NOISE_CORRELATION_MAX}); montages below", True, lambda c: c.metrics_json,
          joint_lesion_like_row, lambda c: judged_pairs(c.stage_dir / "generated", c)),
    Check("P7-T6", f"Generated masks overlap real FCD masks (mean best Dice > {DICE_TARGET}), beside reference points",
          False,
          lambda c: c.metrics_json, best_match_dice_row, lambda c: judged_pairs(c.stage_dir / "generated", c)),
    Check("P7-T7", "Per-channel Lp (1.5/2.0) vs uniform L2", False, lambda c: c.stage_dir / "ablation_lp.json",
          lp_ablation_row),
    Check("C-1", f"Beyond the spec: conditional mode, FLAIRs for prior-drawn masks are lesion-like (>= "
          f"{100 * CONDITIONAL_RATE_TARGET:.0f}%); montages below", False,
          lambda c: c.stage_dir / "conditional" / "metrics.json", conditional_lesion_like_row,
          lambda c: judged_pairs(c.stage_dir / "conditional" / "generated", c)),
    Check("C-2", "Beyond the spec: conditional FLAIRs show their lesion to a segmenter trained on real cases "
          f"(consistency Dice > {CONSISTENCY_TARGET}); downstream use", False,
          lambda c: c.stage_dir / "conditional" / "consistency.json", consistency_row,
          lambda c: judged_pairs(c.stage_dir / "conditional" / "generated", c)),
)
