"""benchmarks/bench_gpu.sh --smoke: the one-command GPU benchmark runs end to end at reduced size on CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# slow (~21 s): the GPU benchmark script end to end in its CPU smoke mode (`make test-slow`)
@pytest.mark.slow
def test_bench_gpu_smoke_writes_every_section(tmp_path):
    out = tmp_path / "bench_gpu_smoke.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "backend"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "bench_gpu.sh"), "--smoke", "--threads", "1",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"config", "method", "env", "vae", "train", "sampling"} <= set(result)
    assert result["config"]["smoke"] and result["env"]["device"] == "cpu"
    for phase in ("encode", "decode"):
        assert result["vae"][phase]["median_s"] > 0 and "peak_mb" in result["vae"][phase]
    for kind in ("base_gpu", "lora_fcd"):
        entry = result["train"][kind]
        for precision in ("fp32", "bf16"):
            assert entry[precision]["median_s"] > 0 and "peak_mb" in entry[precision]
        assert entry["bf16_over_fp32_time"] > 0
    lora = result["train"]["lora_fcd"]["fp32"]
    assert lora["trainable_params"] < lora["total_params"]
    assert result["sampling"]["per_pair_1step"]["median_s"] > 0
    assert result["sampling"]["per_pair_euler50"]["median_s"] > 0 and "euler50_over_1step" in result["sampling"]
