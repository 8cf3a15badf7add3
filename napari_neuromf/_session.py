"""What the dock widgets run, Qt-free: run objects that drive the backend and hold the state of a run.

The widgets only wire these to Qt and napari: a napari thread worker iterates one of the ``*.drive()``
generators (backend calls only, never layers), and the widget's yielded/returned handlers update layers and
plots from the GUI thread. Errors become a ``Failure`` item with a message that names the problem and the
remedy, so nothing escapes into Qt.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"


@dataclass
class Failure:
    """A failed run: ``message`` is ready for a notification."""

    message: str
    error: BaseException | None = None


@dataclass
class PluginState:
    """Shared between widgets: the last trained adapter and the last mask-test result (defaults for others)."""

    last_adapter: Path | None = None
    last_run_dir: Path | None = None
    last_mask_test: Path | None = None
    _vae: tuple[tuple, Any] | None = None
    _adapter_listeners: list = field(default_factory=list)  # weak references to callables(Path)

    def set_adapter(self, adapter: Path, run_dir: Path | None = None) -> None:
        """Record a newly trained adapter and tell the widgets that default to it."""
        self.last_adapter, self.last_run_dir = Path(adapter), run_dir
        alive = []
        for ref in self._adapter_listeners:
            callback = ref()
            if callback is None:
                continue
            try:
                callback(self.last_adapter)
            except RuntimeError:  # the widget behind it was deleted by Qt
                continue
            alive.append(ref)
        self._adapter_listeners = alive

    def on_adapter(self, callback: Any) -> None:
        """Call ``callback(path)`` on each new adapter; bound methods are held weakly."""
        self._adapter_listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__")
                                       else weakref.ref(callback))

    def vae(self, spec: str, preset: str = "maisi") -> Any:
        """The VAE for ``spec`` ("embedded" or a local MAISI file), loaded once and kept for the next call."""
        from neuromf.vae import MAISIVAEWrapper

        path = Path(spec)
        key = (str(spec), preset, path.stat().st_mtime if spec != EMBEDDED and path.exists() else None)
        if self._vae is None or self._vae[0] != key:
            self._vae = None  # release the previous one before loading the next
            self._vae = (key, MAISIVAEWrapper.resolve(spec, preset=preset))
        return self._vae[1]

    def default_adapter(self) -> str:
        return str(self.last_adapter) if self.last_adapter else EMBEDDED


STATE = PluginState()


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def format_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def is_oom(err: BaseException) -> bool:
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return "out of memory" in str(err).lower()


def describe_error(err: BaseException, what: str, device: str | None = None, batch_size: int | None = None,
                   out_dir: Path | str | None = None) -> str:
    """A notification text for ``err``: what failed, why, and what to do about it."""
    if is_oom(err):
        hints = [f"lower the batch size (now {batch_size})" if batch_size else "lower the batch size",
                 "lower the LoRA rank", "pick another GPU or 'cpu' under Device"]
        resume = f"; then press Resume to continue from the last checkpoint in {out_dir}" if out_dir else ""
        return (f"{what}: CUDA out of memory on {device or 'the GPU'}. Remedy: {', '.join(hints)}{resume}. "
                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})")
    if isinstance(err, FileExistsError):
        return f"{what}: {err}. Press Resume to continue that run, or choose another output folder."
    if isinstance(err, FileNotFoundError) and EMBEDDED in str(err):
        return (f"{what}: {err}. The embedded default is not shipped in this install: choose a local file "
                "or folder instead.")
    text = str(err) or type(err).__name__
    return f"{what}: {text}" if isinstance(err, ValueError | FileNotFoundError | OSError | KeyError) else \
        f"{what}: {type(err).__name__}: {text}"


# ------------------------------------------------------------------------------------------ LoRA training
def model_preset_of(base_checkpoint: str) -> str | None:
    """The UNet preset recorded in a base checkpoint's sidecar (None when it cannot be read)."""
    try:
        from neuromf.models.flow_model import read_model_meta

        return read_model_meta(base_checkpoint)["arch"]["preset"]
    except Exception:  # the training run reports a missing/broken checkpoint with its own message
        return None


def build_lora_config(config: str, settings: dict[str, Any]) -> Any:
    """``load_config(config, overrides)`` from the widget's settings (dotted keys), with GUI-friendly defaults:

    the UNet preset follows the base checkpoint, and ``mask_strategy: auto`` uses the last mask test run in
    this session when the config's own result file is not there.
    """
    from neuromf.config import load_config

    overrides = dict(settings)
    base = overrides.pop("base_checkpoint", EMBEDDED)
    preset = model_preset_of(base)
    if preset:
        overrides.setdefault("model.preset", preset)
    cfg = load_config(config, overrides)
    if cfg.data.mask_strategy == "auto":
        configured = Path(cfg.data.mask_test) if cfg.data.mask_test else None
        if (configured is None or not configured.is_file()) and STATE.last_mask_test is not None:
            cfg.data.mask_test = str(STATE.last_mask_test)
        elif configured is None or not configured.is_file():
            raise FileNotFoundError(
                f"strategy 'auto' needs a mask-VAE test result ({configured} not found): run the Mask-VAE test "
                "widget first, or choose strategy 'vae' or 'downsample'")
    return cfg


@dataclass
class TrainingRun:
    """One LoRA fine-tuning run started from the GUI: config, stop flag, loss history, result."""

    cfg: Any  # neuromf.config.RunConfig
    base_checkpoint: str = EMBEDDED
    resume: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    losses: list[tuple[int, float]] = field(default_factory=list)
    last_event: Any = None
    result: Any = None  # neuromf.train.TrainResult
    failure: Failure | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.training.output_dir)

    def record(self, event: Any) -> None:
        """Called from the GUI thread for every yielded event: one loss point per step event."""
        self.last_event = event
        if event.kind == "step" and event.loss is not None:
            self.losses.append((int(event.step), float(event.loss)))

    def drive(self) -> Generator[Any, None, Any]:
        """Worker body: the backend's training generator, errors turned into a Failure, memory released."""
        events = None
        try:
            from neuromf.pipelines.lora import train_lora

            events = train_lora(self.cfg, self.base_checkpoint, resume=self.resume, stop=self.stop, progress=False)
            while True:
                try:
                    event = next(events)
                except StopIteration as done:
                    self.result = done.value
                    break
                yield event
        except Exception as err:  # reported as a notification by the widget, never raised into Qt
            self.failure = Failure(describe_error(err, "LoRA fine-tuning", self.cfg.training.device,
                                                  self.cfg.training.batch_size, self.out_dir), err)
            yield self.failure
        finally:
            if events is not None:
                events.close()
            del events
            release_memory()
        return self.result


def release_memory() -> None:
    try:
        from neuromf.pipelines.lora import release_memory as backend_release
    except ImportError:
        import gc

        gc.collect()
        return
    backend_release()


# --------------------------------------------------------------------------------------------- mask test
def preprocessing_for(vae: Any) -> Any:
    """The grid the VAE was trained on (its sidecar), else the default model grid."""
    from neuromf.io.nifti import Preprocessing

    prep = (getattr(vae, "metadata", None) or {}).get("preprocessing")
    if isinstance(prep, dict):
        return Preprocessing.from_dict(prep)
    return Preprocessing()


@dataclass
class MaskTestRun:
    """The mask-VAE Dice test (strategy A vs B) on some FCD cases; rows arrive one case at a time."""

    data_dir: Path
    cases: list  # neuromf.io.bids.Case with masks
    vae_spec: str = EMBEDDED
    vae_preset: str = "maisi"
    threshold: float = 0.5
    output: Path | None = None
    rows: list[dict] = field(default_factory=list)
    result: dict | None = None
    failure: Failure | None = None

    def drive(self) -> Generator[Any, None, dict | None]:
        """Worker body: yields each case's row as soon as it is computed, returns the full result."""
        from neuromf.eval.mask_test import mask_vae_test, save_mask_test

        rows: queue.Queue = queue.Queue()
        done = object()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                vae = STATE.vae(self.vae_spec, self.vae_preset)
                prep = preprocessing_for(vae)
                result = mask_vae_test(self.data_dir, vae, prep, threshold=self.threshold, on_case=rows.put,
                                       cases=self.cases)
                if self.output is not None:
                    save_mask_test(result, self.output)
                outcome["result"] = result
            except Exception as err:  # handed to the GUI thread as a Failure
                outcome["error"] = err
            finally:
                rows.put(done)

        thread = threading.Thread(target=work, name="neuromf-mask-test", daemon=True)
        thread.start()
        while (row := rows.get()) is not done:
            yield row
        thread.join()
        if "error" in outcome:
            self.failure = Failure(describe_error(outcome["error"], "Mask-VAE test"), outcome["error"])
            yield self.failure
            return None
        self.result = outcome["result"]
        if self.output is not None:
            STATE.last_mask_test = Path(self.output)
        return self.result


def reconstruct(case: Any, vae_spec: str, vae_preset: str) -> Any:
    """Worker body for one case's strategy-A mask reconstruction: (mask, affine) or a Failure."""
    try:
        from neuromf.eval.mask_test import reconstruct_mask

        vae = STATE.vae(vae_spec, vae_preset)
        return reconstruct_mask(case, vae, preprocessing_for(vae))
    except Exception as err:
        return Failure(describe_error(err, f"Mask reconstruction of {case.case_id}"), err)


# --------------------------------------------------------------------------------------------- generation
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


@dataclass
class GenerateRun:
    adapter: str = EMBEDDED
    n: int = 4
    steps: int = 1
    seed: int = 0
    device: str = "auto"
    mode: str = "joint"  # "joint" (image + mask from noise) | "conditional" (a FLAIR for a lesion)
    lesion: tuple[Any, dict] | None = None  # conditional: (Labels data, layer state); None = the mask prior
    pairs: int = 0
    failure: Failure | None = None

    def drive(self) -> Generator[Any, None, int]:
        """Worker body: one generated pair per yield (then a Failure if anything went wrong)."""
        try:
            if self.mode == "conditional":
                from neuromf.pipelines.conditional import generate_conditional_pairs

                masks = affines = None
                if self.lesion is not None:
                    mask, affine = lesion_on_model_grid(*self.lesion, self.adapter)
                    masks, affines = [mask] * self.n, [affine] * self.n
                pairs = generate_conditional_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed,
                                                   device=self.device, masks=masks, affines=affines)
            else:
                from neuromf.pipelines.lora import generate_pairs

                pairs = generate_pairs(self.adapter, n=self.n, steps=self.steps, seed=self.seed, device=self.device)
            for pair in pairs:
                self.pairs += 1
                yield pair
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
            release_memory()
        return self.pairs


def generated_prefixes(layers: Iterable[Any]) -> list[str]:
    """Names (``gen_003``) of generated pairs present in the viewer, in layer order."""
    seen: list[str] = []
    for layer in layers:
        info = (getattr(layer, "metadata", None) or {}).get("neuromf") or {}
        if info.get("generated") and info.get("pair") not in seen:
            seen.append(info["pair"])
    return seen
