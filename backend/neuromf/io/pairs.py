"""The file layout of generated pairs: `sample_XXX_flair.nii.gz` + `sample_XXX_mask.nii.gz` in one folder.

Every writer of pairs (generate's modes) uses these names and every reader (evaluate, consistency, export,
benchmark-downstream) finds them here, below the packages that read them.
"""

from __future__ import annotations

import re
from pathlib import Path

_PAIR_RE = re.compile(r"^(sample_.+)_(flair|mask)\.nii(\.gz)?$")


def find_generated_pairs(generated_dir: Path) -> list[tuple[str, Path, Path]]:
    """(sample id, flair path, mask path) for every `sample_XXX_flair/mask.nii[.gz]` pair, sorted by id.

    ValueError naming the folder when it is missing, holds no pairs, or a sample lacks one of its two files.
    """
    generated_dir = Path(generated_dir)
    if not generated_dir.is_dir():
        raise ValueError(f"{generated_dir}: generated-samples folder does not exist")
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(generated_dir.iterdir()):
        match = _PAIR_RE.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group(1), {})[match.group(2)] = path
    if not found:
        raise ValueError(
            f"{generated_dir}: no generated pairs found (expected sample_XXX_flair.nii.gz + sample_XXX_mask.nii.gz)"
        )
    incomplete = [f"{sid} (missing {'mask' if 'flair' in parts else 'flair'})"
                  for sid, parts in found.items() if len(parts) != 2]
    if incomplete:
        raise ValueError(f"{generated_dir}: incomplete generated pairs: {', '.join(incomplete)}")
    return [(sid, parts["flair"], parts["mask"]) for sid, parts in sorted(found.items())]


__all__ = ["find_generated_pairs"]
