"""Shared helpers of the benchmark scripts: interleaved timing, peak memory in a fresh process, JSON output.

Rules every script follows (see README.md): both sides of a ratio are measured in the same run, interleaved
repeat by repeat so drifting machine load hits them alike; warm-up iterations come before timing; the reported
time is the median of the repeats; peak memory of a configuration is measured in its own spawned process.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

CPU_MEMORY_METHOD = (
    "each configuration runs in its own freshly spawned process (multiprocessing 'spawn'); peak_mb is that "
    "process's peak resident set size (VmHWM in /proc/self/status; ru_maxrss where /proc is missing) after "
    "warm-up + measured steps; baseline_mb is its resident set size after imports, before the model is built; "
    "peak_above_baseline_mb = peak_mb - baseline_mb (weights + gradients + optimizer state + activations + "
    "allocator slack) is what the memory ratios use. tracemalloc does not see torch allocations and "
    "getrusage deltas in one process only ever grow, so neither is used.")
CUDA_MEMORY_METHOD = (
    "each configuration runs in its own freshly spawned process; peak_mb = torch.cuda.max_memory_allocated "
    "after warm-up + measured steps, baseline_mb = torch.cuda.memory_allocated before the model is built; "
    "the memory ratios use peak_above_baseline_mb = peak_mb - baseline_mb.")


# ------------------------------------------------------------------------------------------------ arguments
def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few repeats: checks the script works (well under a minute on CPU); "
                             "its numbers are not the benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON output file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def pick(args: argparse.Namespace, name: str, full: Any, quick: Any) -> Any:
    """An option's value: what the user passed, else the quick or full default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return quick if args.quick else full


def setup_torch(threads: int, device: str = "auto") -> Any:
    import torch

    from neuromf.utils import resolve_device

    torch.set_num_threads(max(1, int(threads)))
    try:
        return resolve_device(device)
    except RuntimeError as err:
        raise SystemExit(f"--device {device}: {err}") from None


def synchronize(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- timing
def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": len(samples), "samples_s": [round(s, 6) for s in samples]}


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: Any = "cpu",
                     warmup_only: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Median wall time of each callable; repeat r runs every configuration once (order reversed on odd r).

    `warmup` untimed rounds first (all configurations, or only those in `warmup_only`).
    """
    for _ in range(warmup):
        for name, fn in fns.items():
            if warmup_only is None or name in warmup_only:
                fn()
        synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # the process's CPU time too: with --threads 1 on a shared machine it is the work done, where the wall time
    # mostly measures the other jobs (see README: "Run on a quiet machine")
    return {name: {**summarize(values), "cpu_median_s": statistics.median(cpu[name]),
                   "cpu_samples_s": [round(s, 6) for s in cpu[name]]} for name, values in samples.items()}


# --------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_field_mb(field: str) -> float:
    """A /proc/self/status memory field in MB; where there is no /proc, the peak RSS from getrusage."""
    kb = _status_kb(field)
    if kb is not None:
        return kb / 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def rss_mb() -> float:
    return _rss_field_mb("VmRSS")


def peak_rss_mb() -> float:
    return _rss_field_mb("VmHWM")


def _child_peak(fn: Callable[..., Any], kwargs: dict[str, Any], threads: int, device: str) -> dict[str, Any]:
    """Runs in the spawned process: baseline, then `fn(**kwargs)` (setup + warm-up + steps), then the peak."""
    import torch

    dev = setup_torch(threads, device)
    if dev.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = rss_mb()
    extra = fn(device=str(dev), **kwargs) or {}
    if dev.type == "cuda":
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mb()
    return {"peak_mb": round(peak, 2), "baseline_mb": round(baseline, 2),
            "peak_above_baseline_mb": round(peak - baseline, 2), **extra}


def peak_memory(fn: Callable[..., Any], kwargs: dict[str, Any], threads: int, device: Any) -> dict[str, Any]:
    """Peak memory of `fn(device=..., **kwargs)` run in a fresh spawned process (fn must be module-level)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_child_peak, fn, kwargs, threads, str(device)).result()


def memory_method(device: Any) -> str:
    return CUDA_MEMORY_METHOD if getattr(device, "type", str(device)) == "cuda" else CPU_MEMORY_METHOD


# ----------------------------------------------------------------------------------------------- reporting
def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 4) if denominator else float("nan")


def target(value: float, limit: float, kind: str = "max") -> dict[str, Any]:
    """{'value', 'max' | 'min', 'pass'} for a ratio with an upper (`max`) or lower (`min`) bound."""
    ok = value <= limit if kind == "max" else value >= limit
    return {"value": value, kind: limit, "pass": bool(ok)}


def environment(device: Any) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
    }
    try:
        import monai
        import peft

        env["monai"], env["peft"] = monai.__version__, peft.__version__
    except ImportError:
        pass
    if getattr(device, "type", str(device)) == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_model"] = _cpu_model()
    if hasattr(os, "getloadavg"):
        env["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                                           capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, text=True,
                               capture_output=True, check=True).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        pass
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def compact_json(obj: Any) -> str:
    """JSON with one-space indents, every list of plain numbers or strings and every object of such values on one
    line: the results stay readable and small (the repository's tracked files have a size budget)."""
    import re

    text = json.dumps(obj, indent=1, default=_json_default)
    flat = r"-?[0-9.eE+-]+|null|true|false|\"[^\"\n]*\""
    one_line_list = rf"\[\s*((?:(?:{flat}),\s*)*(?:{flat}))\s*\]"
    text = re.sub(one_line_list, _one_line, text)
    # an object of plain values (numbers, strings, one-line lists) on one line too
    member = rf"\"[^\"\n]*\": (?:{flat}|\[[^\[\]{{}}\n]*\])"
    one_line_object = rf"\{{\s*((?:{member},\s*)*{member})\s*\}}"
    return re.sub(one_line_object, _one_line, text)


def _one_line(match: Any) -> str:
    """A matched JSON list or object on one line; left as it is where the match is not JSON on its own (a string
    holding an escaped quote can fool the patterns)."""
    try:
        return json.dumps(json.loads(match.group(0)))
    except json.JSONDecodeError:
        return match.group(0)


def finish(result: dict[str, Any], out: Path, started: float) -> dict[str, Any]:
    """Add run time and end load, write `out`, print the JSON."""
    result.setdefault("env", {})
    result["env"]["wall_s"] = round(time.perf_counter() - started, 2)
    if hasattr(os, "getloadavg"):
        result["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    load = result["env"].get("loadavg_start")
    if load and load[0] > (os.cpu_count() or 1):
        result["env"]["warning"] = (
            f"the machine was busy (1-min load {load[0]} on {os.cpu_count()} CPUs): timings are not representative; "
            "with more torch threads than free cores OpenMP waits can slow steps down by 10-100x")
    targets = result.get("targets", {})
    if targets:
        result["pass"] = all(t["pass"] for t in targets.values())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = compact_json(result)
    out.write_text(text + "\n")
    print(text)
    print(f"written: {out}", file=sys.stderr)
    return result

def warmed_napari_viewer() -> tuple[Any, Callable[[float], None]]:
    """A shown napari viewer whose own first use in the process is paid (an image, a labels and a text points layer
    added, drawn and cleared: layer modules, the font atlas, the first draw), and `spin(ms)`, which runs the Qt
    event loop for `ms` milliseconds."""
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()

    def spin(ms: float) -> None:
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.005)

    viewer.add_image(np.zeros((8, 8, 8), np.float32))  # napari's own first use: not what is measured
    viewer.add_labels(np.zeros((8, 8, 8), np.uint8))
    viewer.add_points([[4, 4, 4]], text={"string": ["RLAP"]}, size=1)
    spin(500)
    viewer.layers.clear()
    spin(200)
    return viewer, spin


def gui_thread_ticks() -> tuple[list[float], Any]:
    """A started 10 ms QTimer and the list it appends the GUI thread's CPU time (`time.thread_time`) to at each
    tick: the gaps are the GUI-thread work between two ticks, which other jobs on the machine do not stretch."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.thread_time()))
    timer.start()
    return ticks, timer


def generate_dock_with_pair(viewer: Any, spin: Callable[[float], None]) -> tuple[Any, Any]:
    """A ready Generate dock on `viewer` and the shipped joint sample pair as a `GeneratedPair`, for timing a pair's
    arrival (`dock._on_pair(pair)`)."""
    from napari_neuromf import _generate_run, _sample_data
    from napari_neuromf._generate_widget import GenerateWidget
    from napari_neuromf._layers import load_nifti
    from neuromf.generation.images import GeneratedPair

    widget = GenerateWidget(viewer)
    while not getattr(widget, "ready", False):
        spin(100)
    prefix = _sample_data.PAIRS["joint"]
    image, affine, _ = load_nifti(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR.nii.gz")
    mask, _, _ = load_nifti(_sample_data.SAMPLES_DIR / f"{prefix}_FLAIR_roi.nii.gz")
    pair = GeneratedPair(0, image, mask, affine, json.loads((_sample_data.SAMPLES_DIR / f"{prefix}.json").read_text()))
    widget.run = _generate_run.GenerateRun("embedded")
    return widget, pair


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
