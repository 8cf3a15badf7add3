"""NeuroMF: MeanFlow latent synthesis of 3D FLAIR MRI with FCD lesion masks (headless backend, no Qt).

The names below are the public API for scripts and notebooks (docs/python_api.md); they load on first use,
so `import neuromf` does not import torch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # data in and out
    "discover_cases": "neuromf.io.bids",
    "read_nifti": "neuromf.io.nifti",
    "save_nifti": "neuromf.io.nifti",
    "preprocess_pair": "neuromf.io.nifti",
    "Preprocessing": "neuromf.io.nifti",
    "load_config": "neuromf.config",
    "RunConfig": "neuromf.config",
    # the pipeline
    "mask_test": "neuromf.api",
    "fine_tune": "neuromf.api",
    "generate_pairs": "neuromf.api",  # not "generate": that is the deprecated submodule neuromf.generate
    "evaluate": "neuromf.api",
    "benchmark_downstream": "neuromf.api",
    "inpaint_lesion": "neuromf.api",
    "InpaintResult": "neuromf.generation.inpaint",
    "InpaintCancelled": "neuromf.generation.inpaint",
    "write_pairs": "neuromf.generation.images",
    "GeneratedPair": "neuromf.generation.images",
    "AdapterMeta": "neuromf.models.adapter_meta",
    "TrainEvent": "neuromf.train.loop",
    "TrainResult": "neuromf.train.loop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'neuromf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
