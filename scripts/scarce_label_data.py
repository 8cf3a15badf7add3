"""A data folder for the clean scarce-label test: the FCD training cases one seed of the downstream benchmark's
scarce arms draws (`real_subset`, e.g. 4 of 64 at --fraction 0.0625), a few healthy training cases and every test
case of a data set, as links, with its own participants.tsv. Train a generator on it (`neuromf train-conditional
--set data.data_dir=FOLDER ...`) and run `neuromf benchmark-downstream --data FOLDER`: the segmenter and the
generator then see the same labelled lesions (docs/downstream.md, "A generator trained on the same 4 cases").

Usage: python scripts/scarce_label_data.py OUT [--data embedded] [--fraction 0.0625] [--seed 0] [--healthy 8]
Nothing is copied and the source folder is not changed; OUT must not exist yet.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from neuromf.data.embedded import resolve_data_dir
from neuromf.eval.downstream import real_subset


def make_scarce_label_data(out: Path, data: str = "embedded", fraction: float = 0.0625, seed: int = 0,
                           healthy: int = 8) -> list[str]:
    """Write the folder; returns the ids of the FCD training cases kept."""
    source = resolve_data_dir(data)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; give a new folder")
    with open(source / "participants.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    fcd_train = [r for r in rows if r["group"] == "fcd" and r["split"] == "train"]
    kept_fcd = {fcd_train[i]["participant_id"] for i in real_subset(len(fcd_train), fraction, seed)}
    healthy_train = [r for r in rows if r["group"] == "hc" and r["split"] == "train"]
    kept_healthy = {r["participant_id"] for r in healthy_train[:healthy]}
    kept = [r for r in rows if r["participant_id"] in kept_fcd | kept_healthy or r["split"] == "test"]
    out.mkdir(parents=True)
    for name in ("dataset_description.json", "participants.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    with open(out / "participants.tsv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    for row in kept:
        (out / row["participant_id"]).symlink_to((source / row["participant_id"]).resolve(), target_is_directory=True)
    return sorted(kept_fcd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", default="embedded", help="the full data set ('embedded' or a BIDS folder)")
    parser.add_argument("--fraction", type=float, default=0.0625, help="share of the FCD training cases")
    parser.add_argument("--seed", type=int, default=0, help="the benchmark seed whose draw is kept")
    parser.add_argument("--healthy", type=int, default=8, help="healthy training cases kept (empty masks)")
    args = parser.parse_args()
    print("FCD training cases:", " ".join(make_scarce_label_data(**vars(args))))
