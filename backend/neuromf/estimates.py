"""How long a job will take before it starts, from rates measured on a named machine.

`measured_rates.json` (next to this module, written by `benchmarks/measure_rates.py`; `$NEUROMF_RATES` names a
file measured on your own machine instead) holds seconds per unit of
work: per mask-test case for each shipped VAE, per encoded training case and per training step for each packaged
CPU config, per network step of each generation pass with the shipped 2 mm adapters, and the machine they were
measured on (CPU, torch threads, load average). An estimate multiplies them out and says which machine it comes
from; a rate measured on another grid is scaled by the number of voxels (said so in the basis), and a job with no
rate at all gets no estimate rather than a guess.

Load: a CPU job shares the cores with whatever else runs. Each runnable thread gets an equal share, so a job of
one busy thread takes `slowdown(load, cores)` = max(1, (load + 1) / cores) times its time on an idle machine, with
`load` the other runnable threads (the 1-minute load average). The rates are CPU seconds of the measuring process
(`clock: "process_cpu"` in their machine record): with one torch thread, the time on an idle machine whatever the
load was while they were measured. An estimate is that idle time times the slowdown of the load now
(`current_load`); the estimate says both. Rates timed by the wall clock (`clock: "wall"`: several torch threads, as
the widgets run them, measured on an idle machine; the shipped mask-test and training rates) are brought back to an
idle machine by the slowdown of the load they were measured at. It is a model of fair sharing, not a
forecast: the load can change while the job runs (the widgets then show the time left from the job's own pace),
niced jobs take less than their share, and a job of several torch threads gains less than the thread count on a
busy machine.

Pace: a machine can run the same work slower or faster than the rates' machine (another CPU, more torch threads).
A finished job records how long its work took here against what the rates said at the load it shared the machine
with (`record_pace`, in `machine_pace.json` of the user data folder; that load the mean of the other threads
runnable at its progress marks, `PaceClock.shared_load`), and later estimates of that kind of job are multiplied by
the median of this machine's last runs (`machine_pace`), saying so.

The load now (`current_load`) is the 1-minute load average, which lags: a job that ended half a minute ago still
counts. On Linux the threads runnable at this instant cap it (`runnable_now`), each counted by its share of a core
beside ours (a thread niced to 19 counts 0.015), so an estimate made right after a job is not lengthened by that
job, nor one made beside a niced background job by threads that yield the cores.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from neuromf.utils import atomic_write_json, default_output_root

RATES_FILE = Path(__file__).with_name("measured_rates.json")
RATES_ENV = "NEUROMF_RATES"  # a rates file of your own machine (`benchmarks/measure_rates.py --out FILE`)
PACE_FILE_NAME = "machine_pace.json"  # in the user data folder (`neuromf.utils.default_output_root`)
PACE_RUNS = 5  # the pace is the median of this machine's last runs of a kind
PACE_MIN_S = 10.0  # work the rates put under this many seconds is too short to time (loading and noise dominate)
PACE_LIMITS = (0.25, 4.0)  # a pace outside is clipped: one odd run (a laptop asleep) must not rule the estimates
# a pace is learnt from quiet runs only (fewer other runnable threads on average): beside another 2-thread torch job
# a 2-thread job took 3.1x its idle time where fair sharing says 1.5x (docs/user_guide_walk.md), so a busy run's
# ratio says more about the sharing than about this machine's speed, and the load now is scaled for separately
PACE_QUIET_LOAD = 0.5
PACE_SAMPLE_S = 1.0  # a job's runnable threads are sampled at its progress marks at most this often


@dataclass
class Estimate:
    """Seconds a job should take at the machine's load now, where the figure comes from (the rates' machine, any
    scaling), and what it would take on an idle machine with the load that makes the difference."""

    seconds: float
    basis: str
    idle_seconds: float | None = None  # the same job on an idle machine (None: not scaled for load)
    load: str = ""  # "load 3.0 on 2 cores now" when the load lengthens the estimate

    def describe(self) -> str:
        """``"about 4 min (about 2 min on an idle machine, ×2.0 at load 3.0 on 2 cores now; measured on ...)"``."""
        if self.idle_seconds is None or not self.load:
            return f"about {format_duration(self.seconds)} ({self.basis})"
        return (f"about {format_duration(self.seconds)} (about {format_duration(self.idle_seconds)} on an idle "
                f"machine, {self.load}; {self.basis})")


def current_load() -> tuple[float, int]:
    """(load, CPU count) of this machine now: the 1-minute load average, or on Linux the threads runnable at this
    instant besides the caller when they are fewer (the average still counts a job that ended less than a minute
    ago); (0.0, 1) where the OS gives no load average."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return 0.0, 1
    runnable = runnable_now()
    return (load if runnable is None else min(load, runnable)), os.cpu_count() or 1


def runnable_now(loadavg: Path = Path("/proc/loadavg"), proc: Path = Path("/proc")) -> float | None:
    """Threads of other processes runnable at this instant, each counted by its share of a core beside one of this
    process's (the scheduler's weight for its nice value against ours: a thread niced to 19 beside one at 0 gets
    ~1.5 % of a core and counts 0.015), from Linux's `/proc/*/task/*/stat`; where those cannot be read,
    `/proc/loadavg`'s fourth field "runnable/total" less the caller; None elsewhere."""
    weighted = _runnable_weighted(proc)
    if weighted is not None:
        return weighted
    try:
        return max(0.0, float(loadavg.read_text().split()[3].split("/")[0]) - 1.0)
    except (OSError, IndexError, ValueError):
        return None


NICE_WEIGHT_STEP = 1.25  # Linux CFS: each nice level is ~10 % of CPU, a weight ratio of ~1.25 (sched_prio_to_weight)


def _runnable_weighted(proc: Path) -> float | None:
    """Other processes' runnable threads (state R) by CPU weight relative to this process's; None without
    `/proc/<pid>/task/<tid>/stat` (not Linux, or a hidden /proc)."""
    own = str(os.getpid())
    try:
        own_nice = os.nice(0) if proc == Path("/proc") else 0
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return None
    found, total = False, 0.0
    for pid in pids:
        if pid == own:
            continue
        try:
            tasks = os.listdir(proc / pid / "task")
        except OSError:  # the process ended meanwhile
            continue
        for task in tasks:
            try:
                fields = (proc / pid / "task" / task / "stat").read_text()
                rest = fields[fields.rindex(")") + 2:].split()
                state, nice = rest[0], int(rest[16])
            except (OSError, ValueError, IndexError):
                continue
            found = True
            if state == "R":
                total += NICE_WEIGHT_STEP ** (own_nice - nice)
    return total if found else None


@dataclass(frozen=True)
class CpuSnapshot:
    """The clock, the CPU seconds the whole machine has been busy and those of this process (every thread), at one
    moment: two of them give the load the other processes put on the machine in between (`load_since`)."""

    clock: float
    busy_s: float
    own_s: float


def cpu_snapshot(stat: Path = Path("/proc/stat")) -> CpuSnapshot | None:
    """A `CpuSnapshot` now; None where the OS has no `/proc/stat` (not Linux)."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + ticks[4]
    except (OSError, IndexError, ValueError):
        return None
    return CpuSnapshot(time.perf_counter(), (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time())


def load_since(start: CpuSnapshot | None, fallback: tuple[float, int],
               end: CpuSnapshot | None = None) -> tuple[float, int]:
    """(busy cores of the other processes on average from `start` to `end` (default: now), CPU count): the load
    a job that ran in between shared the machine with, its own threads left out; `fallback` (e.g. `current_load`
    at its start) where no snapshot can be taken."""
    end = end or (cpu_snapshot() if start is not None else None)
    if start is None or end is None or end.clock <= start.clock:
        return fallback
    others = (end.busy_s - start.busy_s) - (end.own_s - start.own_s)
    return max(0.0, others / (end.clock - start.clock)), os.cpu_count() or 1


@dataclass
class PaceClock:
    """What `record_pace` needs of a job, gathered while it runs: the load at its start (`load`, e.g.
    `current_load()`), then (clock, work done) at its first and latest progress (`mark`: the loading before the
    first mark does not count), a `CpuSnapshot` at the first, and the other threads runnable at each later mark
    (`runnable_now`: between two steps, when the job's own threads are idle), for the load it shared the machine
    with (`shared_load`)."""

    load: tuple[float, int] | None = None
    first: tuple[float, float] | None = None
    last: tuple[float, float] | None = None
    cpu_at_first: CpuSnapshot | None = None
    runnable: list[float] = field(default_factory=list)
    sampled_at: float | None = None  # clock of the latest runnable sample (at most one per `PACE_SAMPLE_S`)

    def mark(self, clock: float, work_done: float) -> None:
        """The job reached `work_done` (any unit, counted from its start) at `clock` (`time.perf_counter`)."""
        self.last = (clock, float(work_done))
        if self.first is None:
            self.first, self.cpu_at_first = self.last, cpu_snapshot()
            return
        self.sample_load(clock)

    def sample_load(self, clock: float) -> None:
        """The other threads runnable now (`runnable_now`), for `shared_load`: at a mark, or between two steps of a
        job that knows its work done only at its end (a `generate` run)."""
        if self.first is None:
            return
        if self.sampled_at is not None and clock - self.sampled_at < PACE_SAMPLE_S:
            return  # reading every thread's /proc entry costs ~10 ms: not at every step of a fast (GPU) job
        self.sampled_at = clock
        sampled = runnable_now()
        if sampled is not None:
            self.runnable.append(sampled)

    def shared_load(self) -> tuple[float, int]:
        """(load, cores) the job shared the machine with between its first and latest mark: the mean of the
        runnable threads sampled at the marks, as `current_load` counts them before a job; without samples, the
        other processes' busy cores (`load_since`). The busy cores alone undercount processes that wanted the
        cores but did not get them: a walk beside a test run measured 0.68 of them (a quiet machine, by that
        measure) and took 2.75x the rates' time."""
        if self.runnable:
            return float(np.mean(self.runnable)), os.cpu_count() or 1
        return load_since(self.cpu_at_first, self.load or current_load())

    def record(self, part: str, seconds_per_unit: float) -> float | None:
        """`record_pace` of the work between the first and the latest mark, one unit of work taking
        `seconds_per_unit` on the rates' idle machine; None before a start load and a mark, and for a job that
        shared the machine (`PACE_QUIET_LOAD`)."""
        if self.load is None or self.first is None or self.last is None:
            return None
        shared = self.shared_load()
        if shared[0] >= PACE_QUIET_LOAD:
            return None
        (start, first), (end, last) = self.first, self.last
        busy = load_since(self.cpu_at_first, (float("nan"), 1))[0] if self.cpu_at_first is not None else None
        return record_pace(part, (last - first) * seconds_per_unit, end - start, shared,
                           others_busy=busy if busy is not None and np.isfinite(busy) else None)


def slowdown(load: float, cores: int) -> float:
    """How many times longer a job of one busy thread takes than on an idle machine while `load` other runnable
    threads share `cores` cores: each runnable thread gets an equal share, so (load + 1) / cores once every core is
    busy, 1 before."""
    return max(1.0, (float(load) + 1.0) / max(1, int(cores)))


def _under_load(seconds: float, basis: str, rates: dict[str, Any], part: str,
                load: tuple[float, int] | None) -> Estimate:
    """`seconds` of work measured under the load recorded for `part`, as an Estimate at `load` (default: now), at
    this machine's recorded pace for `part` (`machine_pace`)."""
    env = (rates.get("env") or {}).get(part) or {}
    measured_load = (env.get("loadavg_start") or [None])[0]
    wall_clock = env.get("clock") != "process_cpu"  # CPU seconds are an idle core's time already
    measured = slowdown(measured_load, env.get("cpu_count") or 1) if wall_clock and measured_load is not None \
        else 1.0
    load_now, cores = current_load() if load is None else load
    factor = slowdown(load_now, cores)
    idle = seconds / measured
    pace = machine_pace(part)
    if pace is not None:
        idle *= pace[0]
        basis += f"; ×{pace[0]:.2f}, this machine's pace in its last {pace[1]} run{'s' if pace[1] != 1 else ''}"
    note = f"×{factor:.1f} at load {load_now:.1f} on {cores} core{'s' if cores != 1 else ''} now" if factor > 1 else ""
    threads = torch_threads()
    if note and threads > 1 and load_now + threads > cores:
        # fair sharing models a one-thread job: several threads on too few cores wait on each other at every step
        # (the default pair beside a second 2-thread job: 171-188 s with 2 threads, 111-117 s with 1, 2 min said)
        note += (f"; with {threads} torch threads beside other jobs it can take up to {OVERSUBSCRIBED:.1f}x longer"
                 f" (OMP_NUM_THREADS=1 avoids it)")
    return Estimate(idle * factor, basis, idle, note)


OVERSUBSCRIBED = 1.6  # measured: 2 torch threads vs 1 beside a second 2-thread job on 2 cores (docs/user_guide_walk.md)


def torch_threads() -> int:
    """The torch threads a job of this process would use; 1 when torch is not imported yet (the widgets estimate
    on the GUI thread only once the backend is loaded; the command line imports torch before its jobs)."""
    torch = sys.modules.get("torch")
    try:
        return int(torch.get_num_threads()) if torch is not None else 1
    except Exception:
        return 1


def pace_file() -> Path:
    """Where this machine's paces are kept: ``machine_pace.json`` in the user data folder."""
    return default_output_root() / PACE_FILE_NAME


def _pace_runs(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The recorded runs by kind; empty when the file is missing or unreadable (a pace is a hint, never an error)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {part: [run for run in runs if isinstance(run, dict)] for part, runs in data.items()
            if isinstance(runs, list)}


def machine_pace(part: str, path: Path | None = None) -> tuple[float, int] | None:
    """(median of time taken / time the rates said, number of runs) over this machine's last runs of `part`
    ("generation", "training", "mask_test"), clipped to `PACE_LIMITS`; None before any run was recorded."""
    ratios = []
    for run in _pace_runs(path or pace_file()).get(part, [])[-PACE_RUNS:]:
        try:
            ratio = float(run["ratio"])
        except (KeyError, TypeError, ValueError):
            continue
        if np.isfinite(ratio) and ratio > 0:
            ratios.append(ratio)
    if not ratios:
        return None
    return float(np.clip(np.median(ratios), *PACE_LIMITS)), len(ratios)


def record_pace(part: str, rates_idle_s: float, taken_s: float, load: tuple[float, int],
                path: Path | None = None, others_busy: float | None = None) -> float | None:
    """Record that work the rates put at `rates_idle_s` seconds on an idle machine took `taken_s` seconds here
    while `load` ((load, cores): the other threads runnable while it ran, `PaceClock.shared_load`) shared the
    cores; `others_busy` (kept beside it for the record): the cores the other processes actually used meanwhile
    (`load_since`). Returns the ratio recorded, None when the work was too short to time (`PACE_MIN_S`), a figure
    is not finite, or the file cannot be written. The ratio is against the rates alone (not an earlier pace), so a
    pace does not feed on itself."""
    expected = float(rates_idle_s) * slowdown(*load)
    if not (np.isfinite(expected) and np.isfinite(taken_s)) or rates_idle_s < PACE_MIN_S or taken_s <= 0:
        return None
    path = path or pace_file()
    runs = _pace_runs(path)
    ratio = round(float(taken_s) / expected, 4)
    runs[part] = [*runs.get(part, [])[-(PACE_RUNS - 1):],
                  {"ratio": ratio, "expected_s": round(expected, 1), "taken_s": round(float(taken_s), 1),
                   "load": round(float(load[0]), 2), "cores": int(load[1]),
                   **({} if others_busy is None else {"others_busy": round(float(others_busy), 2)}),
                   "when": time.strftime("%Y-%m-%dT%H:%M:%S")}]
    try:
        atomic_write_json(path, runs)
    except OSError:  # a read-only home: the estimates simply stay at the rates
        return None
    return ratio


def format_rate(seconds: float) -> str:
    """Seconds per unit of work, to two significant figures: ``"0.31 s"``, ``"4.0 s"``, ``"16 s"`` (a rate under a
    second rounded to whole seconds read "× 0 s")."""
    return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"4 min"``, ``"1 h 20 min"`` (rounded: an estimate, not a stopwatch)."""
    if seconds < 90:
        return f"{max(1, round(seconds / 5) * 5 if seconds > 10 else round(seconds))} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@lru_cache(maxsize=4)
def _read(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def rates_file() -> Path:
    """The rates the estimates use: `$NEUROMF_RATES` when set, else the shipped `measured_rates.json`."""
    return Path(os.environ.get(RATES_ENV) or RATES_FILE)


def measured_rates(path: Path | None = None) -> dict[str, Any]:
    """The measured rates (an empty dict when the file is missing or unreadable: no estimates then)."""
    try:
        return _read(str(path or rates_file()))
    except (OSError, ValueError):
        return {}


def machine(rates: dict[str, Any], part: str) -> str:
    """Where one part's rates were measured: ``"measured in CPU seconds on a 2-core AMD EPYC, 1 torch thread"``
    (a wall-clock file: ``"measured on a 2-core AMD EPYC, 1 torch thread, load 7.2"``)."""
    env = (rates.get("env") or {}).get(part) or {}
    load = env.get("loadavg_start") or [None]
    threads = env.get("torch_threads")
    bits = [f"{env.get('cpu_count', '?')}-core {env.get('cpu_model') or 'CPU'}"]
    if threads:
        bits.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    if env.get("clock") == "process_cpu":
        return "measured in CPU seconds on a " + ", ".join(bits)
    if load[0] is not None:
        bits.append(f"load {load[0]:.1f}")
    return "measured on a " + ", ".join(bits)


def _voxels(shape: Any) -> float:
    return float(np.prod([int(n) for n in shape]))


def _scaled(seconds: float, measured_grid: Any, grid: Any | None) -> tuple[float, str]:
    """A rate moved to another grid by its voxel count, and the words that say so ("" when not scaled)."""
    if grid is None or _voxels(grid) == _voxels(measured_grid):
        return seconds, ""
    return seconds * _voxels(grid) / _voxels(measured_grid), f", scaled from the {int(measured_grid[0])}³ grid"


def mask_test_estimate(vae_folder: str, cases: int, grid: Any | None = None, rates: dict[str, Any] | None = None,
                       load: tuple[float, int] | None = None) -> Estimate | None:
    """The mask-VAE test of `cases` cases with a shipped VAE (its folder name, e.g. "vae_fine") at `load` ((load
    average, cores); default: now); None without a rate for that VAE (a MAISI file of another size)."""
    rates = measured_rates() if rates is None else rates
    rate = (rates.get("mask_test") or {}).get(vae_folder)
    if not rate:
        return None
    per_case, note = _scaled(rate["per_case_s"], rate["grid"], grid)
    return _under_load(rate["load_s"] + cases * per_case,
                       f"{cases} cases × {format_rate(per_case)}, {machine(rates, 'mask_test')}{note}", rates,
                       "mask_test", load)


def training_step_seconds(config: str, batch_size: int, rates: dict[str, Any] | None = None) -> float | None:
    """Seconds of one training step of a packaged config at `batch_size` on the rates' idle machine (the measured
    step scaled by the batch); None without a rate for `config`."""
    rates = measured_rates() if rates is None else rates
    rate = (rates.get("training") or {}).get(config)
    if not rate:
        return None
    return float(rate["per_step_s"]) * batch_size / rate["batch_size"]


def training_estimate(config: str, cases: int, steps: int, batch_size: int, encode: bool = True,
                      rates: dict[str, Any] | None = None, load: tuple[float, int] | None = None) -> Estimate | None:
    """Joint (LoRA) training with a packaged config: loading, encoding `cases` training cases (first run only:
    latents are cached after, `encode=False`) and `steps` steps at `batch_size` (the step time scales with the
    batch), at `load` (default: now). None without a rate for `config`."""
    rates = measured_rates() if rates is None else rates
    rate = (rates.get("training") or {}).get(config)
    per_step = training_step_seconds(config, batch_size, rates)
    if not rate or per_step is None:
        return None
    # a config trains on its base model's grid: its rate holds for it, whatever grid is asked
    per_case, note = rate["per_case_encoding_s"], ""
    encoding = cases * per_case if encode else 0.0
    parts = [f"encoding {cases} cases × {format_rate(per_case)}" if encode else "cases already encoded",
             f"{steps} steps × {format_rate(per_step)}"]
    return _under_load((rate["load_s"] or 0.0) + encoding + steps * per_step,
                       f"{', '.join(parts)}; {machine(rates, 'training')}{note}", rates, "training", load)


# a pair's work after its last network step (decoding its FLAIR with the VAE, in tiles, the scanner texture, its
# lesion figures), in network calls of the FLAIR pass: 9.26-9.33 measured with the 2 mm models
# (benchmarks/measure_pair_finish.py, benchmarks/results/pair_finish.json; 5.7-7.8 with whole-volume decodes)
FINISH_CALLS = 9.3


@dataclass
class GenerationWork:
    """A generation run's seconds on the rates' idle machine, by part: `load_s`, everything outside the network
    steps of a one-pair run as the rates measured it (loading the models, the pair's finishing); `steps_s`, every
    network step; `finish_s`, one pair's work after its last step (`FINISH_CALLS`); `passes`, the sampling
    passes planned (a run that re-draws a mask makes more); `basis`, where the figures come from."""

    pairs: int
    load_s: float
    steps_s: float
    finish_s: float
    passes: int
    basis: str

    @property
    def total_s(self) -> float:
        """The whole run: the rates' one-pair run holds one finishing, each further pair adds one."""
        return self.load_s + self.steps_s + max(0, self.pairs - 1) * self.finish_s

    @property
    def after_first_step_s(self) -> float:
        """From the run's first network step to its end (every pair's finishing included): what a run timed
        from its first step did."""
        return self.steps_s + self.pairs * self.finish_s


def generation_work(pairs: int, steps: int, mode: str = "joint", render: bool = True, grid: Any | None = None,
                    rates: dict[str, Any] | None = None, flair_calls: int = 1,
                    flair_passes: int = 1) -> GenerationWork | None:
    """`pairs` pairs of `steps` network steps per pass: the joint pass (joint mode) and the FLAIR pass (rendered
    joint pairs, conditional and inpaint modes; `flair_passes` of them: 2 for a conditional pair whose lesion is
    drawn from the prior, placed on a lesion-free brain first), each at the measured per-step time of the shipped
    2 mm adapters (the joint pass at its own guidance, a batch of pairs by `joint_batch_factor`; the FLAIR pass
    measured at one network call per step, times `flair_calls`: 2 under mask guidance, as the shipped conditional
    adapter's own), plus loading and each pair's finishing. None without a generation rate."""
    rates = measured_rates() if rates is None else rates
    rate = rates.get("generation")
    if not rate:
        return None
    joint, note = _scaled(rate["joint_per_step_s"], rate["grid"], grid)
    flair_call, _ = _scaled(rate["render_per_step_s"], rate["grid"], grid)
    flair = flair_call * flair_calls * (flair_passes if mode != "joint" else 1)
    per_pair = steps * (flair if mode != "joint" or render else 0.0)
    batch = int(rate.get("joint_batch") or 1)  # the joint pass draws up to this many pairs at once
    joint_passes = sum(joint_batch_factor(min(batch, pairs - k), rates) for k in range(0, pairs, batch))
    joint_work = steps * joint * joint_passes if mode == "joint" else 0.0
    if mode == "joint":
        passes = "joint + FLAIR passes" if render else "joint pass"
    else:
        passes = "FLAIR pass" if flair_passes == 1 else f"{flair_passes} passes (the lesion placed first)"
    passes += " without mask guidance" if flair_calls == 1 else \
        f" with {flair_calls} network calls per FLAIR step (mask guidance)"
    planned = -(-pairs // batch) + (pairs if render else 0) if mode == "joint" else pairs * flair_passes
    return GenerationWork(pairs, float(rate["load_s"]), pairs * per_pair + joint_work, FINISH_CALLS * flair_call,
                          planned, f"{pairs} × {steps} steps, {passes}, {machine(rates, 'generation')}{note}")


def generation_estimate(pairs: int, steps: int, mode: str = "joint", render: bool = True, grid: Any | None = None,
                        rates: dict[str, Any] | None = None, flair_calls: int = 1,
                        load: tuple[float, int] | None = None, flair_passes: int = 1) -> Estimate | None:
    """`generation_work` of such a run at `load` (default: now) and this machine's recorded pace; None without a
    generation rate."""
    rates = measured_rates() if rates is None else rates
    work = generation_work(pairs, steps, mode, render, grid, rates, flair_calls, flair_passes)
    return None if work is None else _under_load(work.total_s, work.basis, rates, "generation", load)


def joint_batch_factor(pairs: int, rates: dict[str, Any] | None = None) -> float:
    """The time of one joint pass that draws `pairs` pairs at once, in single-pair passes: the measured ratio at the
    rates' batch (`joint_batch` pairs took `joint_batch_ratio` times one pair's pass: 1.62 for 4 on the rates'
    machine), linear from one pair to it; `pairs` itself (no saving) where the rates did not measure it."""
    rate = (measured_rates() if rates is None else rates).get("generation") or {}
    batch, ratio = rate.get("joint_batch"), rate.get("joint_batch_ratio")
    if pairs <= 1 or not batch or not ratio or int(batch) <= 1:
        return float(max(0, pairs))
    return 1.0 + (float(ratio) - 1.0) * (pairs - 1) / (int(batch) - 1)


def runs_on_cpu(device: str) -> bool:
    """Whether a job given `device` ("auto", "cpu", "cuda:N") runs on the CPU here: "auto" without a GPU does; a
    device this machine does not have counts as not (its job fails before it runs). The rates are CPU ones."""
    from neuromf.utils import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except Exception:
        return False


__all__ = ["FINISH_CALLS", "NICE_WEIGHT_STEP", "OVERSUBSCRIBED", "PACE_FILE_NAME", "PACE_QUIET_LOAD", "RATES_ENV",
           "RATES_FILE", "CpuSnapshot", "Estimate", "GenerationWork", "PaceClock", "cpu_snapshot", "current_load",
           "format_duration", "format_rate", "generation_estimate", "generation_work", "joint_batch_factor",
           "load_since", "machine", "machine_pace", "mask_test_estimate", "measured_rates", "pace_file", "rates_file",
           "record_pace", "runnable_now", "runs_on_cpu", "slowdown", "torch_threads", "training_estimate",
           "training_step_seconds"]
