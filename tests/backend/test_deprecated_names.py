"""One name per concept: the joint / conditional names by mode and grid, and the old names kept for one release
as deprecated aliases that resolve to the same things."""

from __future__ import annotations

import importlib
import warnings

import pytest

from neuromf.config import CONFIG_ALIASES, PACKAGED_CONFIGS, load_config, packaged_configs, resolve_config_path


def test_packaged_configs_are_named_by_mode_and_grid():
    assert packaged_configs("joint") == ["joint_2mm", "joint_3mm", "joint_gpu"]
    assert packaged_configs("conditional") == ["conditional_2mm", "conditional_3mm"]
    assert not set(CONFIG_ALIASES) & set(packaged_configs()), "an old name still has its own file"


@pytest.mark.parametrize("old", sorted(CONFIG_ALIASES))
def test_old_config_names_resolve_to_the_new_ones_with_a_warning(old):
    with pytest.warns(FutureWarning, match=f"'{old}' is deprecated, use '{CONFIG_ALIASES[old]}'"):
        assert resolve_config_path(old) == PACKAGED_CONFIGS / f"{CONFIG_ALIASES[old]}.yaml"
    with pytest.warns(FutureWarning):
        assert resolve_config_path(f"configs/{old}.yaml") == PACKAGED_CONFIGS / f"{CONFIG_ALIASES[old]}.yaml"
    with pytest.warns(FutureWarning):
        by_old_name = load_config(old).to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert load_config(CONFIG_ALIASES[old]).to_dict() == by_old_name


def test_old_module_and_function_names_are_the_new_objects():
    joint = importlib.import_module("neuromf.pipelines.joint")
    assert importlib.import_module("neuromf.pipelines.lora") is joint  # the same module object: monkeypatching works
    assert joint.train_lora is joint.train_joint
    from neuromf.train.launch import Spec, launch_joint, launch_lora, pipeline_function

    assert launch_lora is launch_joint
    assert pipeline_function(Spec.pipeline) is joint.train_joint
    with pytest.raises(ValueError, match="not a training pipeline"):
        pipeline_function("os:system")


def test_cli_train_lora_is_train_joint_with_a_notice(capsys, tmp_path):
    from neuromf.cli import build_parser, main

    parser = build_parser()
    new, old = (parser.parse_args([name, "--config", "joint_3mm"]) for name in ("train-joint", "train-lora"))
    assert new.func is old.func and vars(new).keys() == vars(old).keys()
    # a config that fails validation stops the run before any work, after the notice
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rate: 1}\n")
    assert main(["train-lora", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "neuromf: `train-lora` is deprecated, use `train-joint`"
    assert err[1].startswith("neuromf train-lora: error:") and "learning_rate" in err[1]


MOVED_TO_GENERATION = [
    ("neuromf.pipelines.joint", "generate_pairs", "neuromf.generation.joint"),
    ("neuromf.pipelines.joint", "write_generated_pairs", "neuromf.generation.joint"),
    ("neuromf.pipelines.joint", "calibrate_joint_guidance", "neuromf.generation.joint"),
    ("neuromf.pipelines.joint", "load_renderer", "neuromf.generation.joint"),
    ("neuromf.pipelines.conditional", "generate_conditional_pairs", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "write_conditional_pairs", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "load_conditional_model", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "ConditionalModel", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "empty_mask_control", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "pair_noise", "neuromf.generation.conditional"),
    ("neuromf.pipelines.conditional", "guided_velocity", "neuromf.generation.guidance"),
    ("neuromf.models.joint", "empty_path_guidance", "neuromf.generation.guidance"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED_TO_GENERATION)
def test_generation_names_moved_to_neuromf_generation_keep_their_old_place_with_a_warning(old, name, new):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} is deprecated: use {new}.{name}"):
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_generation_modules_moved_whole_are_the_new_module_objects():
    from neuromf.generation import images, inpaint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # warned once, on the first import in this process
        assert importlib.import_module("neuromf.generate") is images  # monkeypatching either name works
        assert importlib.import_module("neuromf.pipelines.inpaint") is inpaint
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names and the training names that stayed warn about nothing
        from neuromf.generation.joint import generate_pairs  # noqa: F401
        from neuromf.pipelines.conditional import load_controlnet_weights, train_conditional  # noqa: F401
        from neuromf.pipelines.joint import release_memory, train_joint  # noqa: F401
