"""Generation and saving runs of the Generate widget, Qt-free: layers and points brought onto an adapter's
model grid, cautions about a given lesion, the run that yields one pair at a time, and the run that writes
the chosen pairs as NIfTI."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_neuromf._jobs import (
    Caution,
    Failure,
    describe_error,
    format_eta,
    release_memory,
    time_left_at_pace,
)
from napari_neuromf._state import EMBEDDED, user_folder


def lesion_on_model_grid(data: Any, layer_meta: dict, adapter: str) -> tuple[Any, Any]:
    """A Labels layer (painted, or a case's mask) as a binary mask on a conditional adapter's model grid, and
    that grid's affine in the layer's world (scanner) coordinates, so the generated FLAIR overlays the layer."""
    import numpy as np

    from napari_neuromf._layers import nifti_from_layer
    from neuromf.io.nifti import mask_to_model_grid
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(adapter, "conditional").prep
    image = nifti_from_layer(np.asarray(data) > 0, layer_meta)
    volume = mask_to_model_grid(np.asarray(image.dataobj), image.affine, prep,
                                source=f"layer {layer_meta.get('name', 'lesion')!r}")
    return volume.data[0].numpy().astype(np.uint8), volume.affine


def sites_on_model_grid(points_world: Any, adapter: str) -> Any:
    """Points in world mm (napari's world, where generated pairs lie on the joint adapter's model grid) as voxel
    coordinates of that grid, the lesion sites `generate_pairs(sites=)` takes."""
    import numpy as np

    from napari_neuromf._layers import world_placement
    from neuromf.generation.images import model_grid_affine
    from neuromf.models.adapter_meta import adapter_meta

    prep = adapter_meta(adapter, "joint").prep
    scale, translate = world_placement(model_grid_affine(prep.shape, prep.spacing))
    points = np.asarray(points_world, dtype=np.float64).reshape(-1, 3)
    return (points - np.asarray(translate)) / np.asarray(scale)


def step_costs(adapter: str, mode: str, render: str | None, guidance: float | None) -> tuple[float, float, float]:
    """Seconds of one network step of a joint pass (one pair), of a FLAIR pass (its network calls included) and of
    a pair's finishing (`FINISH_CALLS`), as measured on the rates' machine (`neuromf.estimates`): only their ratios
    matter to the time left, which follows the run's own pace; (1, calls, FINISH_CALLS) without a measured rate."""
    from neuromf.estimates import FINISH_CALLS, measured_rates
    from neuromf.generation.estimates import flair_calls_per_step

    calls = flair_calls_per_step(adapter, mode, render or "", guidance)
    rate = measured_rates().get("generation") or {}
    joint, flair = rate.get("joint_per_step_s"), rate.get("render_per_step_s")
    if not (joint and flair):
        return 1.0, float(calls), FINISH_CALLS
    return float(joint), float(flair) * calls, float(flair) * FINISH_CALLS


@dataclass
class PassPlan:
    """The sampling passes of a generation run, pair by pair, each as the cost of one of its network steps, so the
    time left can follow the run's own pace across passes of different cost: a joint pass samples up to ``batch``
    pairs at once (the first pair of a batch carries it), a rendered joint pair then gets its FLAIR
    pass, a conditional pair with a lesion drawn from the prior two passes (the lesion-free brain, then the FLAIR).
    A pass the backend adds while it runs (a re-drawn joint mask, a lesion placed again) joins the plan when it
    starts: ``extra`` is its cost, put before the pair's last pass when ``extra_first`` (a re-drawn mask comes
    before the pair's FLAIR pass). ``finish``: the work of each pair after its last network step, in the same
    units as a whole pass (a step's cost times its steps)."""

    pairs: list[list[float]]
    steps: int
    extra: float
    extra_first: bool = False
    finish: float = 0.0

    @classmethod
    def of_run(cls, mode: str, n: int, steps: int, render: bool, prior_lesion: bool,
               costs: tuple[float, float, float], batch: int,
               batch_factor: Callable[[int], float] | None = None) -> PassPlan:
        """The plan of `GenerateRun` settings; ``costs``: (joint step of one pair, FLAIR step, a pair's finishing),
        `step_costs`; ``batch``: pairs per joint pass (`neuromf.meanflow.samplers.SAMPLE_BATCH`);
        ``batch_factor``: a joint pass of that many pairs in single-pair passes
        (`neuromf.estimates.joint_batch_factor`; default: as many as its pairs)."""
        joint, flair, finish = costs
        factor = batch_factor or float
        if mode == "joint":
            pairs = [([joint * factor(min(batch, n - k))] if k % batch == 0 else []) + ([flair] if render else [])
                     for k in range(n)]
            return cls(pairs, steps, joint, extra_first=render, finish=finish)
        passes = 2 if mode == "conditional" and prior_lesion else 1
        return cls([[flair] * passes for _ in range(n)], steps, flair, finish=finish)

    def passes_of(self, pair: int) -> int:
        return len(self.pairs[pair]) if pair < len(self.pairs) else 0

    def start_pass(self, pair: int, number: int) -> None:
        """Pass ``number`` (from 1) of ``pair`` starts: a pass beyond the planned ones joins the plan."""
        while len(self.pairs) <= pair:
            self.pairs.append([])
        planned = self.pairs[pair]
        if number > len(planned):
            planned.insert(len(planned) - 1 if self.extra_first and planned else len(planned), self.extra)

    def work(self, pair: int, number: int, step: int, steps: int) -> tuple[float, float]:
        """(work done, work left) in step costs after ``step`` of the ``steps`` of pass ``number`` of ``pair``
        (the passes still to come: `self.steps` each)."""
        before = (sum(sum(costs) for costs in self.pairs[:pair]) + sum(self.pairs[pair][:number - 1])) * self.steps
        after = (sum(self.pairs[pair][number:]) + sum(sum(costs) for costs in self.pairs[pair + 1:])) * self.steps
        current = self.pairs[pair][number - 1]
        finishing = self.finish * pair, self.finish * (len(self.pairs) - pair)  # the pairs done; this one and the rest
        return before + finishing[0] + current * step, current * (steps - step) + after + finishing[1]


def check_estimate(adapter: str | Path) -> Any:
    """How long an adapter's quick lesion check should take (a ``neuromf.estimates.Estimate``); None without a
    rate or for an unreadable adapter (the check itself reports that)."""
    from neuromf.estimates import generation_estimate
    from neuromf.generation.adapter_check import QUICK_CHECK_PAIRS, quick_sampling
    from neuromf.generation.estimates import adapter_grid

    try:
        _, steps = quick_sampling(adapter)
    except Exception:  # an unreadable adapter: the check itself reports it
        return None
    return generation_estimate(QUICK_CHECK_PAIRS, steps, "joint", render=False,
                               grid=adapter_grid(str(adapter), "joint"))


def lesion_cautions(mask: Any, adapter: str) -> list[str]:
    """Why a lesion on a conditional adapter's model grid looks implausible next to the lesions it was trained
    on: a volume far outside theirs, or a lesion mostly outside the brain of the training scans."""
    import numpy as np

    from neuromf.data.mask_prior import PRIOR, MaskPrior
    from neuromf.models.adapter_meta import resolve_adapter_dir

    prior = MaskPrior.load(resolve_adapter_dir(adapter, "conditional") / PRIOR)
    lesion = np.asarray(mask) > 0
    voxel_cm3 = float(np.prod(prior.spacing)) / 1000.0
    volume = float(lesion.sum()) * voxel_cm3
    trained = [float(np.count_nonzero(known)) * voxel_cm3 for known in prior.lesions]
    cautions = []
    if trained and not min(trained) / 2 <= volume <= max(trained) * 2:
        cautions.append(f"the lesion is {volume:.1f} cm³ on the model grid, far from the training lesions "
                        f"({min(trained):.1f}-{max(trained):.1f} cm³): the FLAIR may not look like an FCD")
    if prior.brain.shape == lesion.shape and lesion.any():
        outside = 1.0 - float((lesion & prior.brain).sum()) / float(lesion.sum())
        if outside > 0.5:
            cautions.append(f"{outside:.0%} of the lesion lies outside the brain of the training scans")
    return cautions


@dataclass
class GenerateRun:
    adapter: str = EMBEDDED
    n: int = 4
    steps: int = 1
    seed: int = 0
    device: str = "auto"
    # "joint" (image + mask from noise) | "conditional" (a new FLAIR for a lesion) | "inpaint" (the lesion put
    # into the open scan `scan`, which keeps its own voxels beyond `margin_mm`)
    mode: str = "joint"
    lesion: tuple[Any, dict] | None = None  # conditional / inpaint: (Labels data, layer state); None = the prior
    scan: tuple[Any, dict] | None = None  # inpaint: (Image data, layer state) of the scan painted on
    margin_mm: float = 6.0
    method: str = "meanflow"  # the sampler: "meanflow" or "euler" (`neuromf.meanflow.sample`)
    render: str | None = None  # joint: a conditional adapter that renders the FLAIR for each joint mask
    guidance: float | None = None  # conditional adapter (conditional mode or render): mask guidance; None = its own
    joint_guidance: float | None = None  # joint adapter: guidance against the empty mask's path; None = its own
    # joint, site-conditioned adapter: lesion sites as (k, 3) world mm points on the model grid; None = drawn
    sites_world: Any = None
    pairs: int = 0
    cautions: list[str] = field(default_factory=list)  # why the given lesion looks implausible
    view_note: str = ""  # why scans were hidden when this run's pairs arrived (`_viewing.show_alone`)
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    # progress inside a pair, written by the worker and read by the widget's timer: (step, steps) of the current
    # sampling pass and how many passes this pair took so far; None while the models load
    step: tuple[int, int] | None = None
    passes: int = 0
    started: float = field(default_factory=time.perf_counter)
    loaded_s: float | None = None  # seconds the models took to load (until the first network step)
    estimate: Any = None  # `neuromf.estimates.Estimate` of the whole run, shown while the models load
    plan: PassPlan | None = None  # the run's passes, made at its first network step
    # `neuromf.estimates.PaceClock`: the load at the start, (clock, work done) at the first and latest network step
    pace: Any = None
    last_step: tuple[float, float, float] | None = None  # (clock, work done, work left) at the latest network step

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    @property
    def first_step(self) -> tuple[float, float] | None:
        """(clock, work done) at the first network step."""
        return None if self.pace is None else self.pace.first

    def pass_plan(self) -> PassPlan:
        """This run's `PassPlan` (worker thread: reads the adapters' sidecars and the measured rates)."""
        from neuromf.estimates import joint_batch_factor
        from neuromf.meanflow.samplers import SAMPLE_BATCH

        costs = step_costs(self.adapter, self.mode, self.render, self.guidance)
        return PassPlan.of_run(self.mode, self.n, self.steps, bool(self.render), self.lesion is None, costs,
                               SAMPLE_BATCH, joint_batch_factor)

    def on_step(self, i: int, n: int) -> None:
        """The backend's per network step hook (worker thread): plain attribute writes, read by the GUI timer."""
        now = time.perf_counter()
        if self.loaded_s is None:
            self.loaded_s = now - self.started
        if self.plan is None:
            self.plan = self.pass_plan()
        if i == 1 or not self.passes:
            self.passes += 1
            self.plan.start_pass(self.pairs, self.passes)
        done, left = self.plan.work(self.pairs, max(1, self.passes), i, n)
        if self.pace is None:
            from neuromf.estimates import PaceClock

            self.pace = PaceClock()
        self.pace.mark(now, done)
        self.last_step = (now, done, left)
        self.step = (i, n)

    def time_left_s(self, now: float | None = None) -> float | None:
        """Seconds left of the whole run at its own pace since its first network step (None before a second)."""
        if self.first_step is None or self.last_step is None:
            return None
        clock, done, left = self.last_step
        return time_left_at_pace(self.first_step, (clock, done), left, time.perf_counter() if now is None else now)

    def progress_text(self) -> str:
        """What the widget shows while a pair is being made: the loading phase with the estimate made before the
        start, then the network steps with the time left at this run's pace."""
        if self.step is None:
            expected = f"; the whole run: {self.estimate.describe()}" if self.estimate is not None else ""
            return f"Loading the models ({format_eta(time.perf_counter() - self.started)} so far){expected} ..."
        i, n = self.step
        planned = max(self.passes, self.plan.passes_of(self.pairs) if self.plan is not None else 0)
        left = self.time_left_s()
        pace = "time left: after the next step" if left is None else \
            f"about {format_eta(left)} left at this run's pace"
        return (f"Pair {self.pairs + 1} of {self.n}: network step {i} / {n} (pass {self.passes} of {planned}) · "
                f"{pace} · models loaded in {format_eta(self.loaded_s)}")

    def record_pace(self) -> float | None:
        """Record how this finished run's network steps kept to the measured rates (`neuromf.estimates`), so later
        estimates on this machine follow its pace; only a CPU run on the rates' grid, whose plan counts work in the
        rates' seconds. Returns the ratio recorded, or None."""
        from neuromf.generation.estimates import pace_recordable

        if self.pace is None or not pace_recordable(self.adapter, self.mode, self.device):
            return None
        return self.pace.record("generation", 1.0)  # the plan's work is in the rates' seconds

    def _lesion_judge(self) -> tuple[Any, tuple[str, ...]]:
        """`lesion_judge` of this run; a caution when there is no reference."""
        try:
            return lesion_judge(self.adapter, self.mode, bool(self.render))
        except Exception as err:  # no verdict is better than a wrong one; the figures still come
            self.cautions.append(f"Lesion check: no reference lesions for {self.adapter} ({err})")
            return None, ()

    def _inpaint(self) -> Any:
        """The lesion painted in `lesion` (or drawn from the adapter's prior) put into the scan `scan`, on the
        scan's own grid (`neuromf.api.inpaint_lesion`): a GeneratedPair-like result for the layers."""
        import numpy as np

        from neuromf.api import inpaint_lesion
        from neuromf.generation.images import GeneratedPair

        data, state = self.scan
        options: dict[str, Any] = {}
        mask = None
        if self.lesion is not None:
            mask = (np.asarray(self.lesion[0]) > 0).astype(np.uint8)
            if mask.shape != np.shape(data):  # painted on another grid: the pipeline maps it by its affine
                options["mask_affine"] = layer_affine(self.lesion[1])
        result = inpaint_lesion(np.asarray(data), mask, self.adapter, layer_affine(state), seed=self.seed,
                                steps=self.steps, guidance=self.guidance, margin_mm=self.margin_mm,
                                on_step=self.on_step, stop=self.cancel, method=self.method, device=self.device,
                                **options)
        info = {**result.info, "mode": "inpaint", "scan": state.get("name"), "seed": self.seed,
                "steps": self.steps, "sampler": self.method}
        return GeneratedPair(0, result.image, result.mask, result.affine, info)

    def drive(self) -> Generator[Any, None, int]:
        """Worker body: one generated pair per yield (then a Failure if anything went wrong). A cancel stops the
        sampler before its next network step; the pairs yielded so far stay."""
        from neuromf.estimates import PaceClock, current_load
        from neuromf.generation.inpaint import InpaintCancelled
        from neuromf.meanflow.samplers import SamplingStopped  # in the worker: torch is imported there

        pairs = None
        self.pace = PaceClock(current_load())
        try:
            if self.mode == "inpaint":
                pairs = [self._inpaint()]
            elif self.mode == "conditional":
                from neuromf.generation.conditional import generate_conditional_pairs

                masks = affines = None
                if self.lesion is not None:
                    mask, affine = lesion_on_model_grid(*self.lesion, self.adapter)
                    masks, affines = [mask] * self.n, [affine] * self.n
                    for message in lesion_cautions(mask, self.adapter):
                        self.cautions.append(f"Generation: {message}")
                        yield Caution(self.cautions[-1])
                pairs = generate_conditional_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed,
                                                   device=self.device, masks=masks, affines=affines,
                                                   method=self.method, guidance=self.guidance,
                                                   on_step=self.on_step, stop=self.cancel)
            else:
                from neuromf.generation.joint import generate_pairs

                sites = None if self.sites_world is None else sites_on_model_grid(self.sites_world, self.adapter)
                pairs = generate_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed, device=self.device,
                                       method=self.method, render=self.render, guidance=self.guidance,
                                       joint_guidance=self.joint_guidance, sites=sites, on_step=self.on_step,
                                       stop=self.cancel)
            judge = self._lesion_judge()
            for pair in pairs:
                if self.cancel.is_set():
                    break
                pair.meta = {**(pair.meta or {}), "lesion": lesion_figures(pair.image, pair.mask, pair.affine,
                                                                           *judge)}
                self.pairs += 1
                self.passes, self.step = 0, None if self.loaded_s is None else (0, 1)
                yield pair
            if not self.cancel.is_set():
                self.record_pace()
        except (SamplingStopped, InpaintCancelled):  # the user cancelled inside a pair: the pairs so far stay
            pass
        except Exception as err:
            what = "Generation"
            if isinstance(err, FileNotFoundError) and self.adapter == EMBEDDED:
                self.failure = Failure(f"{what}: no embedded demo adapter is shipped in this install ({err}). "
                                       "Train one in the LoRA fine-tuning widget (it becomes the default here) or "
                                       "choose an adapter folder.", err)
            else:
                self.failure = Failure(describe_error(err, what, self.device), err)
            yield self.failure
        finally:
            if pairs is not None and hasattr(pairs, "close"):
                pairs.close()
            release_memory()
        return self.pairs


@dataclass
class AdapterCheckRun(GenerateRun):
    """The quick lesion check of a trained joint adapter (`neuromf.generation.adapter_check.quick_adapter_check`):
    a few pairs drawn with its own sampler settings, each mask through the lesion check. Progress and cancel as
    for a generation; yields the `AdapterCheck` (or a Failure)."""

    n: int = 2
    check: Any = None

    def drive(self) -> Generator[Any, None, int]:
        """Worker body: the check (or a Failure); a cancel stops it before the next network step."""
        from neuromf.generation.adapter_check import quick_adapter_check
        from neuromf.meanflow.samplers import SamplingStopped

        try:
            self.check = quick_adapter_check(self.adapter, n=self.n, device=self.device,
                                             cache_dir=user_folder() / "lesion_references", on_step=self.on_step,
                                             stop=self.cancel)
            self.pairs = self.n
            yield self.check
        except SamplingStopped:
            pass
        except Exception as err:
            self.failure = Failure(describe_error(err, f"Lesion check of {self.adapter}", self.device), err)
            yield self.failure
        finally:
            release_memory()
        return self.pairs


def layer_affine(state: dict) -> Any:
    """The (4, 4) RAS affine of a layer this plugin made (its canonical NIfTI affine), else from its scale and
    translate (an axis-aligned grid in world mm)."""
    import numpy as np

    record = (state.get("metadata") or {}).get("nifti") or {}
    if record.get("canonical_affine") is not None:
        return np.asarray(record["canonical_affine"], dtype=np.float64)
    affine = np.diag([*map(float, state.get("scale") or (1.0, 1.0, 1.0)), 1.0])
    affine[:3, 3] = [float(v) for v in (state.get("translate") or (0.0, 0.0, 0.0))]
    return affine


def lesion_judge(adapter: str, mode: str, rendered: bool) -> tuple[Any, tuple[str, ...]]:
    """(reference, criteria) of the lesion check of a pair: the real lesions the adapter that drew the lesion was
    trained on (`neuromf.eval.lesion_check.adapter_reference`, cached in the user folder); without a renderer the
    joint model's own FLAIR shows the lesion only faintly, so only the mask is judged."""
    from neuromf.eval.lesion_check import MASK_CRITERIA, adapter_reference
    from neuromf.eval.lesion_metrics import CRITERIA

    ref = adapter_reference(adapter, user_folder() / "lesion_references", "joint" if mode == "joint" else
                            "conditional")
    return ref, CRITERIA if (mode != "joint" or rendered) else MASK_CRITERIA


def figures_of_layers(image: Any, mask: Any, affine: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Worker body: the lesion figures and verdict of a generated pair opened without them (a pre-made sample,
    a pair saved by an older version), from its provenance (``checkpoint``, ``mode``, ``rendered_by``)."""
    try:
        judge = lesion_judge(str(info.get("checkpoint") or EMBEDDED), str(info.get("mode") or "joint"),
                             bool(info.get("rendered_by")))
    except Exception:  # an adapter that is not here: the figures without a verdict
        judge = (None, ())
    return lesion_figures(image, mask, affine, *judge)


def lesion_figures(image: Any, mask: Any, affine: Any, reference: Any = None,
                   criteria: tuple[str, ...] = ()) -> dict[str, Any]:
    """The generated lesion in plain figures: volume (cm³), FLAIR contrast (mean under the mask / mean in a ring
    around it), the share inside the brain (``neuromf.eval.lesion_metrics.lesion_stats``) and, with a
    ``reference``, the lesion check's verdict on ``criteria`` (``neuromf.eval.lesion_check``)."""
    import numpy as np

    from neuromf.eval.lesion_check import pair_verdict
    from neuromf.eval.lesion_metrics import lesion_stats

    spacing = tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))
    stats = lesion_stats(image, mask, spacing)
    figures = {"volume_cm3": round(stats.volume_cm3, 2), "contrast": None if stats.contrast is None
               else round(stats.contrast, 3), "inside_brain": None if stats.inside_brain_share is None
               else round(stats.inside_brain_share, 3), "components": stats.n_components, "check": None}
    if reference is not None and criteria:
        verdict = pair_verdict(stats, reference, criteria)
        figures["check"] = {"lesion_like": verdict.lesion_like, "failed": verdict.failed,
                            "criteria": verdict.judged, "verdict": verdict.describe()}
    return figures


def describe_lesion(figures: dict[str, Any]) -> str:
    """``"lesion 1.8 cm³, contrast 1.24, 97% inside the brain; passes the lesion check"`` (or that the mask is
    empty)."""
    check = (figures or {}).get("check")
    verdict = f"; {check['verdict']}" if check else ""
    if not figures or not figures.get("volume_cm3"):
        return f"no lesion (empty mask){verdict}"
    text = f"lesion {figures['volume_cm3']:.2f} cm³"
    if figures.get("contrast") is not None:
        text += f", contrast {figures['contrast']:.2f}"
    if figures.get("inside_brain") is not None:
        text += f", {figures['inside_brain']:.0%} inside the brain"
    return text + verdict


def pair_summary(figures: dict[str, Any] | None) -> str:
    """One line per pair in the dock's list: ``"1.80 cm³ · contrast 1.24 · lesion-like"`` (or why it is not)."""
    if not figures:
        return "no figures"
    parts = [f"{figures['volume_cm3']:.2f} cm³" if figures.get("volume_cm3") else "empty mask"]
    if figures.get("contrast") is not None:
        parts.append(f"contrast {figures['contrast']:.2f}")
    check = figures.get("check")
    if check:
        parts.append("lesion-like" if check["lesion_like"] else "not lesion-like: " + ", ".join(check["failed"]))
    return " · ".join(parts)


def generated_pairs(layers: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The generated pairs present in the viewer, in layer order: name (``gen_003``) -> its provenance (the
    layers' ``metadata["neuromf"]``, with the lesion figures and the check's verdict)."""
    found: dict[str, dict[str, Any]] = {}
    for layer in layers:
        info = (getattr(layer, "metadata", None) or {}).get("neuromf") or {}
        if info.get("generated") and info.get("pair") not in found:
            found[info["pair"]] = info
    return found


def generated_prefixes(layers: Iterable[Any]) -> list[str]:
    """Names (``gen_003``) of generated pairs present in the viewer, in layer order."""
    return list(generated_pairs(layers))


@dataclass
class SaveRun:
    """Write generated pairs as ``<prefix>_FLAIR.nii.gz`` + ``<prefix>_FLAIR_roi.nii.gz`` + ``<prefix>.json``.

    ``pairs`` holds (prefix, image (data, state), lesion (data, state)) snapshots taken on the GUI thread.
    """

    folder: Path
    pairs: list[tuple[str, tuple[Any, dict], tuple[Any, dict]]]
    written: list[Path] = field(default_factory=list)
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def drive(self) -> Generator[Any, None, list[Path]]:
        """Worker body: yields each saved prefix; a cancel takes effect between pairs."""
        from napari_neuromf._layers import write_layer

        for prefix, (image, image_state), (lesion, lesion_state) in self.pairs:
            if self.cancel.is_set():
                break
            try:
                paths = [write_layer(self.folder / f"{prefix}_FLAIR.nii.gz", image, image_state),
                         write_layer(self.folder / f"{prefix}_FLAIR_roi.nii.gz", lesion, lesion_state)]
                info = (image_state.get("metadata") or {}).get("neuromf", {})
                provenance = self.folder / f"{prefix}.json"
                tmp = provenance.with_name(f".{provenance.name}.tmp")
                tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
                os.replace(tmp, provenance)
            except (OSError, ValueError) as err:
                self.failure = Failure(f"Save pairs: cannot write {prefix} into {self.folder}: {err}", err)
                yield self.failure
                break
            self.written += paths
            yield prefix
        return self.written
