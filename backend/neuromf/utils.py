"""Small shared helpers: device choice, atomic writes, hashing, library versions, deprecated names that moved."""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: path helpers stay cheap in the napari plugin
    import torch


class DeviceError(ValueError):
    """A device that does not exist here (no CUDA, a GPU index beyond the count, an unknown name)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn "auto" into CUDA when present, else CPU; validate explicit names early (`DeviceError`)."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"device {device!r} is not a device name (auto, cpu, cuda, cuda:N)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


def atomic_write(path: Path, write: Callable[[Path], None], before_rename: Callable[[], None] | None = None) -> Path:
    """Write through a temporary file in the same folder, then rename it into place.

    A crash mid-write leaves the previous file intact instead of a truncated one. `before_rename` runs between
    the write and the rename (the checkpoint's fault injection kills the process there in tests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        umask = os.umask(0)
        os.umask(umask)
        # after the write: mkstemp makes 0600 files, and writers that recreate the file (safetensors) do too
        os.chmod(tmp_path, 0o666 & ~umask)
        if before_rename is not None:
            before_rename()
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_figure(path: Path, fig: Any, palette: bool = False) -> Path:
    """A matplotlib figure written as PNG through `atomic_write`. ``palette``: as a 256-colour palette PNG, for
    plots (lines, markers, text: about a third of the size, the same picture), never for pictures of scans, whose
    grey levels it would merge."""

    def write(tmp: Path) -> None:
        if not palette:
            fig.savefig(tmp, format="png")
            return
        import io

        from PIL import Image

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        buffer.seek(0)
        with Image.open(buffer) as image:
            image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG",
                                                                                      optimize=True)

    return atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically; Paths, numpy scalars and arrays are converted."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for what results hold: Paths as strings, tuples and numpy values as lists."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state_dict (names, shapes and values), independent of file format."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of torch, MONAI and peft, recorded with runs for reproducibility."""
    import monai
    import peft
    import torch

    return {"torch": torch.__version__, "monai": monai.__version__, "peft": peft.__version__}


def default_output_root() -> Path:
    """Per-user data directory for runs started from the GUI (never the current working directory)."""
    base = os.environ.get("NEUROMF_HOME")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "neuromf"


def default_cache_dir() -> Path:
    """Shared latent cache ($NEUROMF_CACHE or ~/.cache/neuromf/latents): entries are keyed by content, so every
    run, the CLI and the GUI can reuse each other's encodings safely."""
    env = os.environ.get("NEUROMF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "neuromf" / "latents"


def first_missing(path: Path | str) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what creating `path` would create), or None: what a
    failed command removes again, so it leaves no empty folders behind."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def sample_data_root() -> Path:
    """`sample_data/` of a source checkout, or the copy packaged into the wheel."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir.parents[1] / "sample_data", package_dir / "_sample_data"):
        if (candidate / "models").is_dir() or (candidate / "fcd_phantoms").is_dir():
            return candidate
    raise FileNotFoundError(
        f"embedded sample data not found next to {package_dir} (looked for ../../sample_data and _sample_data)"
    )


class ShippedFileError(PermissionError):
    """A command would write into the installation's shipped files (sample data, models, the package itself)."""


@functools.lru_cache(maxsize=1)
def shipped_roots() -> tuple[Path, ...]:
    """Folders whose files ship with NeuroMF: the sample data and models, and the installed packages."""
    import importlib.util

    roots = [Path(__file__).resolve().parent]
    try:
        roots.append(sample_data_root().resolve())
    except FileNotFoundError:
        pass
    spec = importlib.util.find_spec("napari_neuromf")  # located, not imported (it may import napari)
    if spec is not None and spec.origin:
        roots.append(Path(spec.origin).resolve().parent)
    return tuple(roots)


def refuse_shipped(path: Path | str, action: str = "write") -> None:
    """ShippedFileError when `path` (resolved: links, `..`) lies inside a shipped folder: shipped files are
    read-only to every command, whatever name or path they are reached by."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop: nothing can be written there anyway
        return
    for root in shipped_roots():
        if resolved == root or root in resolved.parents:
            raise ShippedFileError(f"{path}: inside the shipped files of NeuroMF ({root}); they are read-only to "
                                   f"every command, so this command will not {action} there (copy what you need "
                                   "and work on the copy)")


class OutputNotWritableError(PermissionError):
    """An output location that cannot be written; raised before any work starts, naming the location."""


def ensure_writable(path: Path | str, file: bool = False) -> Path:
    """Check that outputs can be written at `path` (a folder, or with `file=True` a file) before work starts.

    Refuses a location inside the shipped files (`neuromf.weights.refuse_shipped`). Creates nothing: the nearest
    existing folder is probed with a temporary file that is removed at once, so a
    read-only mount, a missing permission or a path through a regular file fails here with a message naming
    the location instead of as an OSError after minutes of computing. Returns `path`.
    """
    path = Path(path)
    refuse_shipped(path)
    target = path
    if file:
        if path.is_dir():
            raise OutputNotWritableError(f"{path}: output file is an existing folder")
        target = path.parent
    elif path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"{path}: output folder is an existing file")
    probe_dir = target
    while not probe_dir.exists():
        if probe_dir.is_symlink():
            raise OutputNotWritableError(f"{path}: cannot create output folder: {probe_dir} is a broken link")
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputNotWritableError(f"{path}: cannot create output folder: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".neuromf-write-test-", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "folder" if probe_dir == target else f"folder ({probe_dir}, where it would be created)"
        raise OutputNotWritableError(
            f"{path}: output {where} is not writable ({err.strerror or err})") from err
    return path


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for names that moved to other modules (kept for one release): `module.name` resolves
    to the object of `moved[name]` (the new module's name) with a DeprecationWarning that names the new place.

    Resolved on attribute access, so the old module does not import the new one: a name may move to a higher
    layer (docs/architecture.md) without the old module depending on it."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} is deprecated: use {moved[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
