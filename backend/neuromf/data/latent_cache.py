"""On-disk cache of encoded volumes: each scan is encoded once per (file content, VAE, preprocessing, variant).

One safetensors file per entry plus `manifest.json`. A changed source file, VAE or preprocessing changes the
key, so the entry is re-encoded and the stale file removed; an unreadable or non-finite entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neuromf.io.owned import ManifestError, inside
from neuromf.utils import atomic_write, atomic_write_json, file_sha256


class LatentCache:
    """Encoded tensors on disk under `root`, keyed by source-file content, VAE identity, preprocessing and variant.

    `hits`, `misses` and `rebuilt` count what `get` did (see `stats`).
    """
    def __init__(self, root: Path | str, vae_identity: str, preprocessing: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.vae_identity = vae_identity
        self.preprocessing = preprocessing
        self.manifest_path = self.root / "manifest.json"
        self.manifest: dict[str, dict] = self._read_manifest()
        self.hits = self.misses = self.rebuilt = 0
        self._hash_memo: dict[tuple[str, float, int], str] = {}

    def _read_manifest(self) -> dict[str, dict]:
        if not self.manifest_path.is_file():
            return {}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (ValueError, OSError):  # a torn manifest only costs re-encoding
            return {}
        return manifest if isinstance(manifest, dict) else {}

    def _entry_file(self, record: object) -> Path | None:
        """The cached file a manifest record names, resolved inside the cache; None (with a warning) for a record
        that is malformed or whose `file` leads outside the cache: such an entry is rebuilt, never read or removed."""
        if not isinstance(record, dict) or not isinstance(record.get("file"), str):
            return None
        try:
            return inside(self.root, record["file"], "latent-cache entry")
        except ManifestError as err:
            warnings.warn(f"{self.manifest_path}: {err}", stacklevel=3)
            return None

    def _source_hash(self, path: Path) -> str:
        stat = path.stat()
        memo_key = (str(path.resolve()), stat.st_mtime, stat.st_size)
        if memo_key not in self._hash_memo:
            self._hash_memo[memo_key] = file_sha256(path)
        return self._hash_memo[memo_key]

    def key(self, sources: list[Path], variant: str) -> str:
        """sha256 of the sources' contents, the VAE, the preprocessing and `variant`: changes when any of them does."""
        payload = json.dumps({"sources": [self._source_hash(Path(s)) for s in sources], "vae": self.vae_identity,
                              "preprocessing": self.preprocessing, "variant": variant}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def get(self, sources: list[Path], variant: str,
            compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Cached tensors for (sources, variant), computing and storing them on a miss."""
        entry_id = "|".join(str(Path(s).resolve()) for s in sources) + f"|{variant}"
        key = self.key(sources, variant)
        record = self.manifest.get(entry_id)
        cached = self._entry_file(record)
        if cached is not None and record.get("key") == key:
            tensors = self._load(cached)
            if tensors is not None:
                self.hits += 1
                return tensors
            self.rebuilt += 1
        else:
            self.misses += 1
            if cached is not None and cached.is_file():  # stale entry for the same source: remove it
                cached.unlink(missing_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in compute().items()}
        filename = f"{key[:32]}.safetensors"
        atomic_write(self.root / filename, lambda p: save_file(tensors, str(p)))
        self.manifest = self._read_manifest() | {entry_id: {"key": key, "file": filename, "variant": variant,
                                                            "sources": [str(s) for s in sources]}}
        atomic_write_json(self.manifest_path, self.manifest)
        return tensors

    @staticmethod
    def _load(path: Path) -> dict[str, torch.Tensor] | None:
        try:
            tensors = load_file(str(path))
        except Exception:  # missing, truncated or corrupt file: rebuild
            return None
        if not tensors or not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            return None
        return tensors

    def stats(self) -> dict[str, int]:
        """{'hits', 'misses', 'rebuilt'} counts since this cache object was made."""
        return {"hits": self.hits, "misses": self.misses, "rebuilt": self.rebuilt}
