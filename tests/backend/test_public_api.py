"""The public API: `import neuromf` stays light, its names resolve, and the example script (the one docs/python_api.md
shows) runs end to end on the tiny preset."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import yaml
from testkit import tiny_config

import neuromf
from neuromf.config import save_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "headless_pipeline.py"


def test_import_is_light_and_every_export_resolves():
    code = "import sys, neuromf; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    for name in neuromf.__all__:
        assert getattr(neuromf, name) is not None, name
        assert (getattr(neuromf, name).__doc__ or "").strip(), f"neuromf.{name} has no docstring"


def test_python_api_page_shows_the_example_script_as_it_is():
    readme = (ROOT / "docs" / "python_api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text() in blocks


def test_example_script_runs_on_the_tiny_preset(tmp_path, phantom_dir, tiny_vae_dir, tiny_base_dir, capsys):
    cfg = tiny_config(tmp_path, phantom_dir, tiny_vae_dir, **{"data.group": None, "loss.p_img": 1.5})
    config = tmp_path / "tiny_lora.yaml"
    save_config(cfg, config)
    argv = ["--config", str(config), "--base", str(tiny_base_dir), "--steps", "3", "--n", "2",
            "--out", str(tmp_path / "out")]
    module = runpy.run_path(str(EXAMPLE))
    assert module["main"](argv) == 0
    printed = capsys.readouterr().out
    assert "mask test decision:" in printed and "lesion-like:" in printed
    out = tmp_path / "out"
    assert (out / "run" / "adapter" / "neuromf_adapter.json").is_file()
    assert sorted(p.name for p in (out / "generated").glob("*_flair.nii.gz")) == [
        "sample_000_flair.nii.gz", "sample_001_flair.nii.gz"]
    assert "lesion_like" in yaml.safe_load((out / "metrics.json").read_text())
