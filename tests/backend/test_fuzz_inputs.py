"""Seeded random corruptions of valid inputs fed to the CLI entry points (issue 28): whatever the corruption, a
command either succeeds or fails with one error line (exit 1 or 2), never a traceback or an "internal error",
and no file outside its output folder changes.

Corrupted: a tiny NIfTI (byte flips, truncation, header fields set through nibabel), an adapter and a model
sidecar (JSON entries replaced, removed or the text damaged), a run config (YAML lines mutated) and two manifests
(a latent cache's and a generated folder's ownership manifest, with entries pointing outside their folder).
The seed is fixed and the number of cases bounded: the whole module takes well under 30 s on one CPU core.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_bad_inputs import AFFINE, SHAPE, Env, brain, build_models, good_fcd, lesion, nii, run_cli, snapshot

SEED = 20_261_206
WEIRD_NUMBERS = [0, -1, -3.5, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30, 2**70]
WEIRD_JSON = [None, 0, -1, 1e308, "x", "", [], {}, True, [1, 2], {"a": 1}, "../../outside", float("nan")]
WEIRD_YAML = [".nan", ".inf", "-.inf", "-1", "0", "1e400", "[]", "{}", "~", "yes", "'x'", "9" * 30, "[1, [2]]",
              "!!python/object:os.system x", "&a [*a]", "{a: 1, a: 2}"]


def check_outcome(rc: int, output: str, command: str) -> None:
    """Success, or exactly one error line naming the command; never a traceback or an internal error."""
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    assert rc in (0, 1, 2), (rc, output)
    if rc == 2:
        errors = [line for line in output.splitlines() if re.match(rf"^neuromf {command}: error: ", line)]
        assert len(errors) == 1, output


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_vae_dir) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("models"), Path(tiny_vae_dir))


def run_outside_unchanged(tmp: Path, out: Path, cache: Path, argv: list[str], capfd) -> tuple[int, str]:
    """Run the CLI; assert that nothing under `tmp` outside `out` (and the latent cache) changed."""
    before = {k: v for k, v in snapshot(tmp, cache).items() if not k.startswith(str(out))}
    rc, output = run_cli(argv, capfd)
    after = {k: v for k, v in snapshot(tmp, cache).items() if not k.startswith(str(out))}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files outside the output folder changed: {changed}\n{output}"
    return rc, output


# --------------------------------------------------------------------------------------------- corruptions
def corrupt_nifti(path: Path, rng: np.random.Generator) -> str:
    """Damage a .nii.gz in place one of three ways; returns what was done (for the failure message)."""
    how = rng.choice(["flip", "truncate", "header"])
    if how == "flip":
        raw = bytearray(gzip.decompress(path.read_bytes()))
        region = 352 if rng.random() < 0.6 else len(raw)  # the header mostly: its fields steer everything else
        for _ in range(int(rng.integers(1, 8))):
            raw[int(rng.integers(0, region))] = int(rng.integers(0, 256))
        path.write_bytes(gzip.compress(bytes(raw)))
        return "flip"
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * rng.uniform(0.0, 0.95))])
        return "truncate"
    img = nib.load(str(path))
    data, header = np.asanyarray(img.dataobj), img.header.copy()
    field = rng.choice(["pixdim", "scl_slope", "scl_inter", "srow", "dim", "datatype"])
    value = WEIRD_NUMBERS[int(rng.integers(len(WEIRD_NUMBERS)))]
    try:
        if field == "pixdim":
            header["pixdim"][int(rng.integers(1, 4))] = value
            header.set_sform(None, code=0)
            header.set_qform(None, code=0)
        elif field in ("scl_slope", "scl_inter"):
            header[field] = value
        elif field == "srow":
            header[f"srow_{rng.choice(['x', 'y', 'z'])}"][int(rng.integers(0, 4))] = value
            header["sform_code"] = 2
        elif field == "dim":
            header["dim"][int(rng.integers(1, 4))] = int(rng.integers(0, 40))
        else:
            header["datatype"] = int(rng.choice([0, 1, 32, 128, 1792, 2304]))
        raw = header.binaryblock + b"\0" * 4 + np.ascontiguousarray(data).tobytes()
        path.write_bytes(gzip.compress(raw))
    except Exception:  # noqa: BLE001 - a field nibabel refuses to set: damage the bytes instead
        return corrupt_nifti(path, rng)
    return f"header {field}={value}"


def mutate_json(text: str, rng: np.random.Generator) -> str:
    """Replace or remove one entry of a JSON object, or damage the text."""
    if rng.random() < 0.2:
        cut = int(rng.integers(0, len(text)))
        return text[:cut] if rng.random() < 0.5 else text[:cut] + "\x00{" + text[cut:]
    data = json.loads(text)
    key = list(data)[int(rng.integers(len(data)))]
    if rng.random() < 0.25:
        del data[key]
    else:
        data[key] = WEIRD_JSON[int(rng.integers(len(WEIRD_JSON)))]
    return json.dumps(data)


def mutate_yaml(text: str, rng: np.random.Generator) -> str:
    """Change a value, drop, duplicate or re-indent a line, or cut the text."""
    lines = text.splitlines()
    i = int(rng.integers(len(lines)))
    how = rng.choice(["value", "value", "drop", "duplicate", "indent", "cut", "tab"])
    if how == "value" and ":" in lines[i]:
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {WEIRD_YAML[int(rng.integers(len(WEIRD_YAML)))]}"
    elif how == "drop":
        del lines[i]
    elif how == "duplicate":
        lines.insert(i, lines[i])
    elif how == "indent":
        lines[i] = " " * int(rng.integers(0, 5)) + lines[i].lstrip()
    elif how == "tab":
        lines[i] = "\t" + lines[i]
    else:
        return text[: int(rng.integers(0, len(text)))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the fuzz
def test_fuzz_nifti(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    rng = np.random.default_rng(SEED)
    for i in range(12):
        env = Env(tmp_path / f"case{i}", models)
        root = good_fcd(env.inp / "data")
        target = nii(root / "sub-02" / "anat" / "sub-02_FLAIR.nii.gz", brain())
        roi = nii(root / "sub-02" / "anat" / "sub-02_FLAIR_roi.nii.gz", lesion())
        corrupt_nifti(target if rng.random() < 0.6 else roi, rng)
        command = "check-data" if i % 3 else "mask-test"
        argv = ["check-data", str(root)] if command == "check-data" else [
            "mask-test", "--data", str(root), "--vae", str(models["vae"]), "--shape", *map(str, SHAPE),
            "--spacing", *[str(AFFINE[0, 0])] * 3, "--device", "cpu", "--out", str(env.out / "m.json")]
        rc, output = run_outside_unchanged(env.tmp, env.out, env.cache, argv, capfd)
        check_outcome(rc, output, command)


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_fuzz_sidecars(which: str, tmp_path: Path, models: dict[str, Path], capfd) -> None:
    rng = np.random.default_rng(SEED + (which == "base"))
    for i in range(5):
        env = Env(tmp_path / f"case{i}", models)
        folder = env.copy(which)
        sidecar = folder / ("neuromf_adapter.json" if which == "adapter" else "model.json")
        sidecar.write_text(mutate_json(sidecar.read_text(), rng))
        flag = "--adapter" if which == "adapter" else "--checkpoint"
        argv = ["generate", flag, str(folder), "--n", "1", "--device", "cpu", "--out", str(env.out / "g")]
        rc, output = run_outside_unchanged(env.tmp, env.out, env.cache, argv, capfd)
        check_outcome(rc, output, "generate")
        if rc == 0:  # whatever the sidecar said, what was written is finite and on the model's grid
            for path in (env.out / "g").glob("*_flair.nii.gz"):
                img = nib.load(str(path))
                assert np.isfinite(np.asanyarray(img.dataobj)).all() and img.shape == SHAPE, sidecar.read_text()


def test_fuzz_yaml(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    rng = np.random.default_rng(SEED + 2)
    for i in range(10):
        env = Env(tmp_path / f"case{i}", models)
        config = env.config()
        config.write_text(mutate_yaml(config.read_text(), rng))
        # a missing data folder: a config that survives validation fails right after it, quickly
        argv = ["train-lora", "--config", str(config), "--base_checkpoint", str(models["base"]), "--set",
                f"data.data_dir={env.inp / 'missing'}", "--output-dir", str(env.out / "run"), "--device", "cpu"]
        rc, output = run_outside_unchanged(env.tmp, env.out, env.cache, argv, capfd)
        check_outcome(rc, output, "train-lora")
        assert rc == 2, output  # the data folder is missing whatever the YAML says
        assert not (env.out / "run").exists(), "a refused start left its folder behind"


def test_fuzz_generated_folder_manifest(tmp_path: Path, models: dict[str, Path], capfd) -> None:
    """A damaged or hostile ownership manifest never makes --overwrite delete anything outside the folder."""
    rng = np.random.default_rng(SEED + 3)
    for i in range(4):
        env = Env(tmp_path / f"case{i}", models)
        env.inp.mkdir(parents=True)
        victim = env.inp / "victim.txt"
        victim.write_text("must survive\n")
        out = env.out / "g"
        argv = ["generate", "--checkpoint", str(models["base"]), "--n", "1", "--device", "cpu", "--out", str(out)]
        assert run_cli(argv, capfd)[0] == 0
        manifest = out / ".neuromf-owned.json"
        data = json.loads(manifest.read_text())
        data["files"] = data["files"] + ["../../in/victim.txt", str(victim), "../g/../../in/victim.txt"][: i % 3 + 1]
        manifest.write_text(mutate_json(json.dumps(data), rng) if i >= 2 else json.dumps(data))
        rc, output = run_outside_unchanged(env.tmp, out, env.cache,
                                           [*argv[:-2], "--seed", "3", "--out", str(out), "--overwrite"], capfd)
        check_outcome(rc, output, "generate")
        assert victim.read_text() == "must survive\n"


def test_fuzz_latent_cache_manifest(tmp_path: Path) -> None:
    """Latent-cache manifest entries that point outside the cache (.., absolute, links) or are malformed are
    rebuilt, never read or deleted."""
    import torch

    from neuromf.data.latent_cache import LatentCache

    rng = np.random.default_rng(SEED + 4)
    source = tmp_path / "scan.nii.gz"
    source.write_bytes(b"scan")
    outside = tmp_path / "outside.safetensors"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "link.safetensors").symlink_to(outside)
    hostile = ["../outside.safetensors", str(outside), "link/../../outside.safetensors", "..", "", "/",
               "sub/../../outside.safetensors"]
    for i in range(12):
        outside.write_bytes(b"not yours")
        cache = LatentCache(tmp_path / "cache", "vae", {"grid": 1})
        cache.get([source], "v", lambda: {"z": torch.zeros(2)})
        manifest = json.loads(cache.manifest_path.read_text())
        (entry,) = [k for k in manifest if k != "_"]
        manifest[entry]["key"] = "stale" if i % 2 else manifest[entry]["key"]
        manifest[entry]["file"] = hostile[i % len(hostile)]
        text = json.dumps(manifest)
        cache.manifest_path.write_text(mutate_json(text, rng) if i >= 8 else text)
        with pytest.warns(UserWarning, match="latent-cache entry") if i < 8 else _nothing():
            again = LatentCache(tmp_path / "cache", "vae", {"grid": 1})
            tensors = again.get([source], "v", lambda: {"z": torch.ones(2)})
        assert outside.read_bytes() == b"not yours"
        assert math.isclose(float(tensors["z"].sum()), 2.0)  # rebuilt, not read from outside
    shutil.rmtree(tmp_path / "cache")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
