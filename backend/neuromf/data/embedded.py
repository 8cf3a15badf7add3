"""The embedded data sets: `embedded` (2 mm phantoms, generated on first use from a fixed seed, so nothing large is
committed and every machine gets the same volumes) and `embedded-3mm` (the committed 3 mm phantoms); `embedded-fine`
is the 2 mm set's deprecated name."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from neuromf.weights import sample_data_root, warn_deprecated_name


@dataclass(frozen=True)
class GeneratedPhantoms:
    """A phantom data set defined by its generator settings; the folder name carries their hash."""

    n_healthy: int
    n_fcd: int
    seed: int = 0
    shape: tuple[int, int, int] = (96, 96, 96)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)

    def key(self) -> str:
        """A short hash of the settings: a changed generator setting gets its own folder, never a stale one."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# as many cases as OpenNeuro ds004199 (85 FCD + 85 healthy), at the <= 2 mm grid the lesion-synthesis work needs
FINE_PHANTOMS = GeneratedPhantoms(n_healthy=85, n_fcd=85)


def data_home() -> Path:
    """Where generated data sets live ($NEUROMF_DATA or ~/.cache/neuromf/data)."""
    env = os.environ.get("NEUROMF_DATA")
    return Path(env) if env else Path.home() / ".cache" / "neuromf" / "data"


def generated_phantoms(spec: GeneratedPhantoms, root: Path | None = None, progress: bool = True) -> Path:
    """The folder of `spec`'s phantoms, generated once (into a temporary folder, then renamed: a killed generation
    leaves nothing that looks complete)."""
    from neuromf.data.phantom import PhantomConfig, make_phantom_dataset

    root = Path(root or data_home())
    target = root / f"fcd_phantoms_{spec.shape[0]}_{spec.spacing[0]:g}mm_{spec.key()}"
    if (target / "participants.tsv").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".generating-", dir=root))
    try:
        cfg = PhantomConfig(shape=spec.shape, spacing=spec.spacing)
        make_phantom_dataset(scratch, spec.n_healthy, spec.n_fcd, spec.seed, cfg, progress=progress)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "participants.tsv").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_data_dir(data_dir: str | Path) -> Path:
    """`embedded` -> the generated 2 mm phantoms (`embedded-fine`: its deprecated name); `embedded-3mm` -> the
    committed 3 mm ones; anything else must exist."""
    warn_deprecated_name(data_dir)
    if str(data_dir) == "embedded-3mm":
        return sample_data_root() / "fcd_phantoms"
    if str(data_dir) in ("embedded", "embedded-fine"):
        return generated_phantoms(FINE_PHANTOMS)
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: data folder does not exist")
    return path
