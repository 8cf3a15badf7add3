"""The shipped names: `embedded` is the 2 mm set (the one whose joint pairs carry lesions) on every path, the
3 mm set stays reachable as `embedded-3mm`, `embedded-fine` is a deprecated alias, and sidecars written before
the change still name what they were trained with. Also the `demo` command sequence on each grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuromf.cli import build_parser
from neuromf.cli import main as cli
from neuromf.cli._common import parse_overrides
from neuromf.config import load_config
from neuromf.models.adapter_meta import SIDECAR, AdapterMeta, adapter_meta, resolve_adapter_dir
from neuromf.weights import embedded_model_dir


def _record(monkeypatch, module: str, name: str) -> list[dict]:
    """Replace `module.name` (a generation entry point) by a recorder of its arguments: these tests check what
    the CLI and the API resolve their defaults to; the generation itself is tested on the shipped models in
    test_fine_default.py."""
    import importlib

    calls: list[dict] = []

    def record(*args, **kwargs):
        calls.append({"args": args, "kwargs": kwargs})
        return []

    monkeypatch.setattr(importlib.import_module(module), name, record)
    return calls


def test_generate_without_options_uses_the_2mm_adapters_in_their_own_settings(monkeypatch, tmp_path):
    calls = _record(monkeypatch, "neuromf.generation.joint", "write_generated_pairs")
    assert cli(["generate", "--out", str(tmp_path / "a")]) == 0
    adapter, _, n, steps, _, _, sampler, render, guidance, joint_guidance = calls[-1]["args"][:10]
    assert (adapter, n, steps, sampler, render, guidance, joint_guidance) == ("embedded", 4, 32, "euler", "embedded",
                                                                              None, None)
    assert resolve_adapter_dir(adapter, "joint").name == "joint_fine"
    assert resolve_adapter_dir(render, "conditional").name == "cond_fine"
    assert adapter_meta(adapter).guidance == 1.08  # the joint guidance the sidecar gives (real-sized lesions)
    assert calls[-1]["kwargs"]["mask_draws"] == 3  # empty or too small masks are drawn again
    # explicit settings win; the 3 mm set keeps its old defaults (one MeanFlow step, no rendering)
    assert cli(["generate", "--steps", "8", "--no-render", "--out", str(tmp_path / "b")]) == 0
    assert calls[-1]["args"][3] == 8 and calls[-1]["args"][6:8] == ("euler", None)
    assert cli(["generate", "--adapter", "embedded-3mm", "--out", str(tmp_path / "c")]) == 0
    adapter, steps, sampler, render = (calls[-1]["args"][i] for i in (0, 3, 6, 7))
    assert (steps, sampler, render) == (1, "meanflow", None)
    assert resolve_adapter_dir(adapter, "joint").name == "lora_demo"


def test_api_generate_pairs_defaults_resolve_to_the_2mm_adapters(monkeypatch):
    import neuromf

    calls = _record(monkeypatch, "neuromf.generation.joint", "generate_pairs")
    assert neuromf.generate_pairs(n=1) == []
    adapter, n, steps, _, _, method, render = calls[-1]["args"][:7]
    assert (adapter, n, steps, method, render) == ("embedded", 1, 32, "euler", "embedded")
    neuromf.generate_pairs("embedded-3mm", n=1)
    assert calls[-1]["args"][2] == 1 and calls[-1]["args"][5:7] == ("meanflow", None)
    neuromf.generate_pairs(n=1, render=None, method="meanflow", steps=2)
    assert calls[-1]["args"][2] == 2 and calls[-1]["args"][5:7] == ("meanflow", None)


def test_mask_test_defaults_follow_the_vae_grid():
    from neuromf.eval.mask_test import model_grid
    from neuromf.vae import MAISIVAEWrapper

    args = build_parser().parse_args(["mask-test"])
    assert (args.data, args.vae, args.shape, args.spacing) == ("embedded", "embedded", None, None)
    fine, coarse = MAISIVAEWrapper.resolve("embedded"), MAISIVAEWrapper.resolve("embedded-3mm")
    assert (model_grid(fine).shape, model_grid(fine).spacing) == ((96, 96, 96), (2.0, 2.0, 2.0))
    assert (model_grid(coarse).shape, model_grid(coarse).spacing) == ((64, 64, 64), (3.0, 3.0, 3.0))
    assert model_grid(fine, [32, 32, 32], [6, 6, 6]).shape == (32, 32, 32)


def test_packaged_configs_name_the_set_of_their_grid():
    assert load_config("joint_2mm").data.data_dir == "embedded"
    assert load_config("conditional_2mm").conditional.init_from == "embedded-3mm"  # warm-started from 3 mm
    for name in ("joint_3mm", "conditional_3mm", "base_small", "vae_small", "base_tiny"):
        assert load_config(name).data.data_dir == "embedded-3mm", name


def test_sidecars_written_before_the_rename_keep_naming_their_models(tmp_path):
    """A 3 mm adapter trained when "embedded" meant the 3 mm set still loads on the 3 mm base, VAE and data;
    a 2 mm one that said "embedded-fine" on the 2 mm ones."""
    from neuromf.models.flow_model import read_model_meta

    for folder, old, new in (("lora_demo", "embedded", "embedded-3mm"), ("joint_fine", "embedded-fine", "embedded")):
        values = json.loads((embedded_model_dir(folder) / SIDECAR).read_text())
        values.update(base_checkpoint=old, vae=old, data_dir=old)
        meta = AdapterMeta.from_dict(values)
        assert (meta.base_checkpoint, meta.vae, meta.data_dir) == (new, new, new)
    base = tmp_path / "base_3mm"
    base.mkdir()
    (base / "model.safetensors").symlink_to(embedded_model_dir("base_small") / "model.safetensors")
    sidecar = json.loads((embedded_model_dir("base_small") / "model.json").read_text())
    (base / "model.json").write_text(json.dumps(dict(sidecar, vae="embedded")))
    assert read_model_meta(base)["vae"] == "embedded-3mm"


def test_the_deprecated_name_warns_and_keeps_its_meaning():
    from neuromf.models.adapter_meta import generation_mode

    assert generation_mode("embedded") == generation_mode("embedded-3mm") == "joint"
    with pytest.warns(FutureWarning, match="'embedded-fine' is deprecated, use 'embedded'"):
        assert resolve_adapter_dir("embedded-fine", "joint") == resolve_adapter_dir("embedded", "joint")
    assert generation_mode("embedded-fine") == "conditional"  # alone it meant the 2 mm conditional adapter


def _demo_commands(argv: list[str], fail_at: str | None = None) -> tuple[int, list[list[str]]]:
    ran: list[list[str]] = []

    def run(sub: list[str]) -> int:
        ran.append(sub)
        return 3 if sub[0] == fail_at else 0

    args = build_parser().parse_args(["demo", *argv])
    args.run_subcommand = run
    return args.func(args), ran


def _values(commands: list[list[str]], flag: str) -> set[str]:
    return {argv[i + 1] for argv in commands for i, a in enumerate(argv) if a == flag}


def test_demo_runs_the_2mm_path_and_keeps_the_3mm_one(tmp_path, capsys, monkeypatch):
    from neuromf.cli import demo
    from neuromf.data.embedded import GeneratedPhantoms

    monkeypatch.setenv("NEUROMF_DATA", str(tmp_path / "data"))
    new_cases = GeneratedPhantoms(n_healthy=0, n_fcd=2, seed=1, shape=(32, 32, 32), spacing=(6.0, 6.0, 6.0))
    monkeypatch.setattr(demo, "DEMO_PHANTOMS", new_cases)  # the same code path, 2 coarse cases instead of 16
    code, ran = _demo_commands(["--out", str(tmp_path), "--runs", str(tmp_path)])
    assert code == 0 and [c[0] for c in ran] == ["mask-test", "train-joint", "generate", "evaluate", "verify"]
    assert _values(ran, "--vae") == _values(ran, "--base_checkpoint") == {"embedded"}
    new_data = Path(ran[0][ran[0].index("--data") + 1])  # a small LoRA learns on (and mask-tested on) new cases...
    assert new_data.parent == tmp_path / "data" and (new_data / "participants.tsv").is_file()
    assert ran[3][ran[3].index("--data") + 1] == "embedded"  # ...shipped pairs judged against the real lesions
    train, generate, evaluate = ran[1], ran[2], ran[3]
    overrides = parse_overrides([train[i + 1] for i, a in enumerate(train) if a == "--set"])
    cfg = load_config(train[train.index("--config") + 1], overrides)
    assert (cfg.lora.init_from, cfg.lora.target_modules, cfg.training.max_steps, cfg.data.data_dir, cfg.data.flip,
            cfg.training.lr, cfg.training.eval_samples) == (None, ["to_q", "to_k", "to_v"], 18, str(new_data), False,
                                                            3e-4, 24)
    # the lesion checks judge the shipped adapter's pairs, in its own settings; verify judges the learning leg's run
    assert generate[generate.index("--adapter") + 1] == evaluate[evaluate.index("--adapter") + 1] == "embedded"
    assert not {"--sampler", "--steps", "--render"} & set(generate)
    assert ran[4][ran[4].index("--run") + 1] == train[train.index("--output-dir") + 1]
    assert "retrains no shipped model" in capsys.readouterr().out
    code, ran = _demo_commands(["--grid", "3mm", "--out", str(tmp_path), "--runs", str(tmp_path)])
    assert code == 0 and {"ablate-lp", "train-conditional", "consistency"} <= {c[0] for c in ran}
    assert _values(ran, "--data") == _values(ran, "--vae") == _values(ran, "--base_checkpoint") == {"embedded-3mm"}
    code, ran = _demo_commands(["--out", str(tmp_path), "--runs", str(tmp_path)], fail_at="generate")
    assert code == 3 and ran[-1][0] == "generate"  # a failing step ends the demo with its exit code
    with pytest.raises(SystemExit, match="--steps"):
        _demo_commands(["--grid", "3mm", "--steps", "4"])


def test_shipped_sidecars_name_their_own_set():
    for folder, name in (("lora_demo", "embedded-3mm"), ("cond_demo", "embedded-3mm"), ("joint_fine", "embedded"),
                         ("cond_fine", "embedded")):
        meta = json.loads((embedded_model_dir(folder) / SIDECAR).read_text())
        assert meta["base_checkpoint"] == meta["vae"] == meta["data_dir"] == name, folder
