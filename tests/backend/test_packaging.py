"""The wheel ships what the source tree has: one napari manifest, the sample data under `neuromf/_sample_data`.

Hatchling's own file selection (`WheelBuilder.recurse_included_files`, the list `build` writes into the zip, with
`force-include` applied) is checked instead of zipping 57 MB of weights, which takes ~10 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "napari_neuromf" / "napari.yaml"

wheel = pytest.importorskip("hatchling.builders.wheel", reason="hatchling is in the test extras")


@pytest.fixture(scope="module")
def wheel_files() -> dict[str, Path]:
    """Path inside the wheel -> source file, as hatchling selects them for `pip wheel` / `python -m build`."""
    builder = wheel.WheelBuilder(str(ROOT))
    files: dict[str, Path] = {}
    for included in builder.recurse_included_files():
        assert included.distribution_path not in files, f"two sources for {included.distribution_path}"
        files[included.distribution_path] = Path(included.path)
    return files


def test_the_wheel_ships_the_source_manifest(wheel_files):
    assert MANIFEST.is_file() and not MANIFEST.is_symlink()
    assert not (ROOT / "napari.yaml").exists(), "a second manifest at the root would drift from the shipped one"
    manifests = {k: v for k, v in wheel_files.items() if k.endswith("napari.yaml")}
    assert list(manifests) == ["napari_neuromf/napari.yaml"]
    assert manifests["napari_neuromf/napari.yaml"].read_bytes() == MANIFEST.read_bytes()
    entry_points = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."napari.manifest"]')[1]
    assert entry_points.split("[")[0].strip() == 'napari-neuromf = "napari_neuromf:napari.yaml"'


def test_the_wheel_ships_the_sample_data_and_weights_registry(wheel_files):
    shipped = {k for k in wheel_files if k.startswith("neuromf/_sample_data/")}
    tracked = {"neuromf/_sample_data/" + p.relative_to(ROOT / "sample_data").as_posix()
               for p in (ROOT / "sample_data").rglob("*") if p.is_file()}
    assert shipped == tracked
    assert "neuromf/_sample_data/fcd_phantoms/participants.tsv" in shipped
