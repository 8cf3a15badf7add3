"""What the widgets need to know about the backend and the machine before they offer defaults: devices,
packaged training configs, the shipped phantom data; found once per process, in a worker."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class DevicePlan:
    """What a Device choice of the LoRA widget runs: ``nproc`` processes (1: in napari's process, in a thread;
    more: local processes under torchrun, data-parallel) on ``device`` (the config's ``training.device``)."""

    nproc: int
    device: str


def device_plans(gpus: int) -> dict[str, DevicePlan]:
    """The LoRA widget's Device choices for a machine with ``gpus`` GPUs: ``auto``, ``cpu``, each ``cuda:N``, and
    ``all GPUs (N)`` (one torchrun process per GPU) when there are several."""
    plans = {"auto": DevicePlan(1, "auto"), "cpu": DevicePlan(1, "cpu")}
    plans.update({f"cuda:{i}": DevicePlan(1, f"cuda:{i}") for i in range(gpus)})
    if gpus > 1:
        plans[f"all GPUs ({gpus})"] = DevicePlan(gpus, "auto")  # under torchrun "auto" = cuda:LOCAL_RANK
    return plans


@dataclass(frozen=True)
class Environment:
    """What the widgets need from the backend before they can offer defaults (found once, in a worker)."""

    devices: tuple[str, ...]  # "auto", each "cuda:N", "cpu"
    has_cuda: bool
    lora_configs: tuple[str, ...]  # packaged LoRA configs, the one sized for this machine first
    phantom_root: str  # the shipped phantom data set ("" when this install has none)
    gpus: int = 0

    @property
    def device_plans(self) -> dict[str, DevicePlan]:
        return device_plans(self.gpus)


_environment: Environment | None = None
_environment_lock = threading.Lock()


def environment() -> Environment:
    """Import the backend (torch, MONAI: seconds) and look at the machine; cached for the process.

    Widgets call this from a worker thread so that napari stays responsive while the imports run.
    """
    global _environment
    with _environment_lock:
        if _environment is None:
            import importlib

            import torch

            from neuromf.config import packaged_configs

            # every backend module a job needs, imported now rather than inside the job's worker: importing
            # holds the GIL for long stretches (extension modules, MONAI, peft), which would freeze the GUI then
            for module in ("neuromf.io.bids", "neuromf.eval.mask_test", "neuromf.pipelines.joint",
                           "neuromf.pipelines.conditional", "neuromf.generation.joint",
                           "neuromf.generation.conditional"):
                importlib.import_module(module)

            has_cuda = torch.cuda.is_available()
            names = packaged_configs("joint")
            # joint_gpu's 2,500 steps are for a GPU; joint_3mm is sized for a CPU
            sized = ("joint_gpu", "joint_3mm", "joint_2mm") if has_cuda else ("joint_3mm", "joint_2mm", "joint_gpu")
            preferred = [n for n in sized if n in names]
            try:
                from neuromf.weights import sample_data_root

                phantoms = str(sample_data_root() / "fcd_phantoms")
            except FileNotFoundError:
                phantoms = ""
            _environment = Environment(
                devices=("auto", *(f"cuda:{i}" for i in range(torch.cuda.device_count())), "cpu"),
                has_cuda=has_cuda, lora_configs=(*preferred, *(n for n in names if n not in preferred)),
                phantom_root=phantoms, gpus=torch.cuda.device_count() if has_cuda else 0)
        return _environment


def environment_ready() -> bool:
    return _environment is not None
