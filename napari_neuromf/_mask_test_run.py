"""The mask-VAE Dice test run from the GUI, Qt-free: on a data folder or on an open (image, labels) layer
pair, one row per case, and one case's mask after the recommended encoding's round trip for the overlay."""

from __future__ import annotations

import queue
import re
import tempfile
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_neuromf import _state
from napari_neuromf._jobs import Cancelled, Failure, describe_error
from napari_neuromf._state import EMBEDDED


def preprocessing_for(vae: Any) -> Any:
    """The grid the VAE was trained on (its sidecar), else the default model grid."""
    from neuromf.io.nifti import Preprocessing

    prep = (getattr(vae, "metadata", None) or {}).get("preprocessing")
    if isinstance(prep, dict):
        return Preprocessing.from_dict(prep)
    return Preprocessing()


def fcd_cases(folder: Path, limit: int = 0) -> list:
    """The FCD cases with a lesion mask in ``folder`` (the first ``limit``; 0 = all). Raises DataError."""
    from neuromf.io.bids import discover_cases

    cases = [c for c in discover_cases(Path(folder), group="fcd") if c.mask is not None]
    return cases[:limit] if limit else cases


@dataclass
class LayerPair:
    """An open FLAIR Image + lesion Labels layer, snapshotted on the GUI thread as (data, layer state) each."""

    image: tuple[Any, dict]
    labels: tuple[Any, dict]

    @property
    def name(self) -> str:
        """The image layer's name, usable as a case and file name."""
        return re.sub(r"[^A-Za-z0-9_-]+", "_", str(self.image[1].get("name") or "layer")).strip("_") or "layer"

    @property
    def description(self) -> str:
        return f"open layers {self.image[1].get('name')!r} + {self.labels[1].get('name')!r}"

    def write_case(self, folder: Path) -> Any:
        """The pair as a flat-folder case (FLAIR + binary mask NIfTI) in ``folder``, a scratch folder of this
        run: the layers' own files are never touched. Returns the ``neuromf.io.bids.Case``."""
        import numpy as np

        from napari_neuromf._layers import write_layer
        from neuromf.io.bids import Case

        image = write_layer(folder / f"{self.name}_FLAIR.nii.gz", *self.image)
        mask = write_layer(folder / f"{self.name}_FLAIR_roi.nii.gz",
                           (np.asarray(self.labels[0]) > 0).astype(np.uint8), self.labels[1])
        return Case(self.name, image, mask, "fcd", "unknown")


@dataclass
class MaskTestRun:
    """The mask-VAE Dice test (strategy A vs B) on some FCD cases; rows arrive one case at a time.

    ``drive`` yields the list of cases first (so the widget can show the total), then one row per case. With
    ``layers`` it tests that open layer pair instead of ``data_dir``: written into a scratch folder of its own
    (kept while the run object lives, for the reconstruction overlay), and the result is not saved.
    """

    data_dir: Path | None
    max_cases: int = 0
    vae_spec: str = EMBEDDED
    vae_preset: str | None = None  # None: the VAE file's sidecar says
    threshold: float = 0.5
    output: Path | None = None
    layers: LayerPair | None = None
    cases: list = field(default_factory=list)  # neuromf.io.bids.Case with masks
    rows: list[dict] = field(default_factory=list)
    result: dict | None = None
    failure: Failure | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    _scratch: Any = field(default=None, repr=False)  # TemporaryDirectory of the layer pair: removed with the run
    # `neuromf.estimates.PaceClock`: the load at the start, (clock, cases done) at the first and latest case
    pace: Any = None

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def _fail(self, err: BaseException) -> Failure:
        message = describe_error(err, "Mask-VAE test")
        if self._scratch is not None:  # say which layers, not which scratch folder
            message = message.replace(str(self.data_dir), f"the {self.layers.description}")
        self.failure = Failure(message, err)
        return self.failure

    def _find_cases(self) -> list:
        if self.layers is None:
            return fcd_cases(self.data_dir, self.max_cases)
        self._scratch = tempfile.TemporaryDirectory(prefix="neuromf_mask_test_")
        self.data_dir = Path(self._scratch.name)
        return [self.layers.write_case(self.data_dir)]

    def record_pace(self) -> float | None:
        """Record how this finished test's cases (after the first: loading and warm-up) kept to the shipped VAE's
        measured rate (`neuromf.estimates.record_pace`), so later estimates on this machine follow its pace; only
        the shipped VAE has a rate (the GUI runs it on the CPU). Returns the ratio recorded, or None."""
        from neuromf.estimates import measured_rates
        from neuromf.weights import EMBEDDED_MODELS

        rate = (measured_rates().get("mask_test") or {}).get(EMBEDDED_MODELS["vae"][EMBEDDED])
        if self.vae_spec != EMBEDDED or not rate or self.pace is None:
            return None
        return self.pace.record("mask_test", rate["per_case_s"])

    def drive(self) -> Generator[Any, None, dict | None]:
        """Worker body: yields the case list, then each case's row as soon as it is computed; returns the result
        (None when cancelled or failed)."""
        try:
            self.cases = self._find_cases()
        except Exception as err:
            yield self._fail(err)
            return None
        yield list(self.cases)
        from neuromf.eval.mask_test import mask_vae_test, save_mask_test

        rows: queue.Queue = queue.Queue()
        done = object()
        outcome: dict[str, Any] = {}

        def on_case(row: dict) -> None:
            cases_done.append(row)
            pace.mark(time.perf_counter(), len(cases_done))
            rows.put(row)
            if self.cancel.is_set():  # the only way into mask_vae_test's loop: stop it after this case
                raise Cancelled

        def work() -> None:
            try:
                vae = _state.STATE.vae(self.vae_spec, self.vae_preset)
                result = mask_vae_test(self.data_dir, vae, preprocessing_for(vae), threshold=self.threshold,
                                       on_case=on_case, cases=self.cases)
                if self.layers is not None:
                    result["data_dir"] = self.layers.description
                elif self.output is not None:
                    save_mask_test(result, self.output)
                outcome["result"] = result
                self.record_pace()
            except Exception as err:  # handed to the GUI thread as a Failure
                outcome["error"] = err
            finally:
                rows.put(done)

        from neuromf.estimates import PaceClock, current_load

        pace = self.pace = PaceClock(current_load())
        cases_done: list[dict] = []
        thread = threading.Thread(target=work, name="neuromf-mask-test", daemon=True)
        thread.start()
        while (row := rows.get()) is not done:
            yield row
        thread.join()
        error = outcome.get("error")
        if isinstance(error, Cancelled):
            return None
        if error is not None:
            yield self._fail(error)
            return None
        self.result = outcome["result"]
        return self.result


ENCODING_NAMES = {"vae": "VAE", "downsample": "shrunk ({mode})", "sdf": "distance map"}


def encoding_label(strategy: str, downsample_mode: str) -> str:
    """Short name of a mask encoding's round trip for a layer name: "VAE", "shrunk (max)", "distance map"."""
    return ENCODING_NAMES[strategy].format(mode=downsample_mode)


def reconstruct(case: Any, vae_spec: str, vae_preset: str | None, strategy: str = "vae",
                downsample_mode: str = "nearest", threshold: float = 0.5) -> Any:
    """Worker body for one case's mask after the round trip of ``strategy`` (the recommended mask encoding):
    (mask, affine) or a Failure."""
    try:
        from neuromf.eval.mask_test import reconstruct_mask

        vae = _state.STATE.vae(vae_spec, vae_preset)
        return reconstruct_mask(case, vae, preprocessing_for(vae), strategy, downsample_mode, threshold)
    except Exception as err:
        return Failure(describe_error(err, f"Mask reconstruction of {case.case_id}"), err)
