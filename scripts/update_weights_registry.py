"""Rewrite sample_data/models/registry.json (sha256 + size of every shipped weight file) after a retrain.

Run from the repository root after replacing a shipped weight file
(e.g. `sample_data/models/vae_fine/model.safetensors`):

    python scripts/update_weights_registry.py

A weight file byte-identical to another shipped one is deleted and listed as "same_as" it (one stored copy; the
loader resolves it). `git add -A sample_data/models` then commits the new files, the registry and any removal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neuromf.weights import update_registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("sample_data/models"), help="the shipped models folder")
    args = parser.parse_args(argv)
    files = update_registry(args.models)
    for relative, entry in files.items():
        print(f"{relative}: " + (f"same as {entry['same_as']}" if "same_as" in entry
                                 else f"{entry['bytes']} bytes, sha256 {entry['sha256'][:16]}..."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
