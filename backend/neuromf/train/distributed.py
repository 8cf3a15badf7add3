"""Data-parallel training on torch.distributed: process-group setup from torchrun's environment, rank helpers,
the per-rank split of each global batch, DDP wrapping of the trainable parameters, and failure reporting.

One process per device, launched by `torchrun` (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
Without those variables (or with WORLD_SIZE=1) every helper here is a no-op and training runs in one process.

Conventions:
- `training.batch_size` is the GLOBAL batch: each step all ranks compute the same shuffled batch of indices
  (from the run seed and the epoch) and each takes its contiguous slice (`local_batch`), so steps per epoch, the
  learning-rate schedule and a checkpoint's step counter do not depend on the world size, and a checkpoint written
  at one world size resumes at another.
- Rank 0 owns every file (logs, TensorBoard, checkpoints, adapters, previews); the others only compute.
- Random draws (noise, times, patches) come from a per-rank seed (`rank_seed`); rank 0 keeps the run seed itself,
  so a one-process run is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 1800  # any collective (one training step) waiting longer than this fails instead of hanging
LONG_TIMEOUT_S = 6 * 3600  # the barrier behind which rank 0 encodes the latent cache
_long_group = None  # a gloo group with LONG_TIMEOUT_S, for barriers around slow one-rank work


class DistributedError(RuntimeError):
    """A failure in a multi-process run, naming the rank that saw it."""


def env_world_size() -> int:
    """Processes torchrun started (WORLD_SIZE), before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK): its GPU index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def rank_seed(seed: int, rank_: int | None = None, step: int = 0) -> int:
    """Seed of rank `rank_` (run seed for rank 0 at step 0); `step` re-derives distinct streams after a resume."""
    rank_ = rank() if rank_ is None else rank_
    if rank_ == 0 and step == 0:
        return seed
    return (seed * 1_000_003 + rank_ * 7_919 + step * 104_729) % (2**63 - 1)


def device_for(device: str | torch.device = "auto") -> torch.device:
    """The device of this rank: "auto"/"cuda" under torchrun mean cuda:LOCAL_RANK; "cpu" stays CPU."""
    from neuromf.utils import resolve_device

    if env_world_size() <= 1 or isinstance(device, torch.device):
        return resolve_device(device)
    if str(device) in ("auto", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    dev = resolve_device(device)
    if dev.type == "cuda":
        raise ValueError(f"training.device {device!r} names one GPU, but {env_world_size()} processes were launched: "
                         "use 'auto' or 'cuda' (each process takes cuda:LOCAL_RANK)")
    return dev


def init(device: str | torch.device = "auto", timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); idempotent.

    Returns True when this process is one of several. Timeouts make a lost rank an error, not a hang.
    """
    global _long_group
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={env_world_size()} but {', '.join(missing)} unset: launch with torchrun "
                               "(or neuromf ... --nproc N)")
    dev = device_for(device)
    backend = os.environ.get("NEUROMF_DIST_BACKEND") or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=float(timeout_s or os.environ.get("NEUROMF_DIST_TIMEOUT_S",
                                                                            DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
        _long_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=LONG_TIMEOUT_S))
    except Exception as err:
        raise DistributedError(f"rank {os.environ.get('RANK')}: could not join the process group "
                               f"({backend}, {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): "
                               f"{err}") from err
    return True


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    global _long_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _long_group = None


def barrier(long: bool = False) -> None:
    """Wait for every rank; `long` uses the slow-work group (hours of timeout, CPU-side, any backend)."""
    if is_distributed():
        dist.barrier(group=_long_group if long else None)


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills the latent cache), then the others run it (reading the cache).

    Joins the process group on first use, so pipelines can call it before the training loop starts.
    """
    init()
    if not is_main():
        barrier(long=True)
    yield  # an exception here skips the barrier below: the failing rank's exit breaks the others' wait
    if is_main():
        barrier(long=True)


def local_batch(indices: torch.Tensor, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of sample indices (a DistributedSampler-like split).

    A global batch smaller than the world size is repeated so every rank gets at least one sample.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world == 1:
        return indices
    if len(indices) < world:
        indices = indices.repeat(-(-world // len(indices)))[:world]
    return indices.tensor_split(world)[rank_]


def frozen_names(model: nn.Module) -> list[str]:
    """Parameters and buffers DDP must neither broadcast nor reduce: everything that does not train."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    return frozen + [name for name, _ in model.named_buffers()]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters only (LoRA + modules_to_save with peft).

    No `find_unused_parameters`: the loop runs exactly one forward with grad per step (the MeanFlow JVP runs on
    the unwrapped module under no_grad), and every trainable parameter takes part in it. Frozen weights and
    buffers are excluded from the start-up broadcast (every rank builds them from the same seed / files).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    # every buffer is in the ignore list: nothing to sync before each forward (no extra collective)
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def all_mean(values: Sequence[float], weight: float, device: torch.device) -> list[float]:
    """Weighted mean over ranks of a few scalars (each rank weighs its values by `weight`, its sample count)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor([*(float(v) * weight for v in values), float(weight)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t[:-1] / t[-1]).tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any (e.g. a stop request seen by one process)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def describe_failure(err: BaseException) -> str:
    """One line naming this rank and the cause; a broken collective usually means another rank failed first."""
    where = f"rank {rank()}/{world_size()}" if is_distributed() else f"rank {os.environ.get('RANK', '0')}"
    text = f"{type(err).__name__}: {err}".splitlines()[0][:500]
    if isinstance(err, dist.DistBackendError) or "Connection closed by peer" in text or "timed out" in text.lower():
        return f"{where}: lost contact with another rank ({text}); look for the first failing rank's message"
    return f"{where} failed: {text}"


def torchrun_prefix(nproc: int) -> list[str]:
    """The start of a torchrun command line for `nproc` processes on this machine (standalone rendezvous); the
    module or script to run follows."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}"]


def stop_on_signals() -> threading.Event:
    """An event that SIGINT and SIGTERM set. Under torchrun a Ctrl-C reaches each worker twice (from the terminal,
    then forwarded by torchrun, which also sends SIGTERM): every signal only asks for a stop, which the ranks agree
    on at the next step; rank 0 then saves (torchrun kills workers that take longer than 30 s)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def report_failure(err: BaseException) -> None:
    """Name the rank and cause on stderr and in the exception's notes (so torchrun's summary shows it too)."""
    if env_world_size() <= 1:
        return
    line = describe_failure(err)
    if line not in getattr(err, "__notes__", []):
        err.add_note(line)
        print(f"[neuromf] {line}", file=sys.stderr, flush=True)


__all__ = ["DistributedError", "all_mean", "any_rank", "barrier", "cleanup", "describe_failure", "device_for",
           "env_world_size", "init", "is_distributed", "is_main", "local_batch", "local_rank", "main_first",
           "rank", "rank_seed", "report_failure", "stop_on_signals", "torchrun_prefix", "world_size", "wrap_ddp"]
