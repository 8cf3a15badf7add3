"""Config validation: unknown keys, types, choices (Literal fields) and ranges name the key and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from neuromf.config import PACKAGED_CONFIGS, ConfigError, RunConfig, config_from_dict, load_config


def test_config_validation_names_key():
    with pytest.raises(ConfigError, match="unknown key 'training.lrr'"):
        config_from_dict({"training": {"lrr": 1}})
    with pytest.raises(ConfigError, match="'training.batch_size' must be an integer"):
        config_from_dict({"training": {"batch_size": 2.5}})
    with pytest.raises(ConfigError, match="'data.flip' must be true or false"):
        config_from_dict({"data": {"flip": "yes"}})
    with pytest.raises(ConfigError, match="'data.mask_strategy' must be one of"):
        config_from_dict({"data": {"mask_strategy": "magic"}})
    with pytest.raises(ConfigError, match="'lora.target_modules' must be a list"):
        config_from_dict({"lora": {"target_modules": "to_q"}})
    cfg = config_from_dict({"training": {"lr": 1}, "data": {"cache_dir": None}})
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    # YAML 1.1 (PyYAML) reads 3e-4 without a dot as a string; a number is still meant
    assert config_from_dict(yaml.safe_load("training: {lr: 3e-4}")).training.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="'training.lr' must be a number, got str"):
        config_from_dict({"training": {"lr": "fast"}})


def test_seed_config_keys_and_packaged_lookup():
    cfg = load_config("configs/lora_fcd.yaml")  # the seed's path works from the repository root
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules) == (16, 16.0, ["to_q", "to_k", "to_v"])
    assert (cfg.loss.p_img, cfg.loss.p_mask, cfg.training.max_epochs, cfg.training.lr) == (1.5, 2.0, 500, 5e-5)
    assert cfg.data.mask_strategy in ("auto", "vae", "downsample")
    assert load_config("demo_lora", {"training.lr": 0.5}).training.lr == 0.5
    with pytest.raises(FileNotFoundError, match="packaged configs"):
        load_config("nope.yaml")



RANGE_RULES = [  # (section, key, a value outside the range, the message's range, a value inside it)
    ("training", "batch_size", 0, ">= 1 and <= 65536", 1),
    ("training", "lr", -1.0, "> 0 and <= 10", 1e-3),
    ("training", "lr", 0.0, "> 0 and <= 10", 10.0),
    ("training", "max_epochs", 0, ">= 1 and <= 1e\\+06", 1),
    ("training", "max_steps", 10**9 + 1, ">= 1 and <= 1e\\+09", 1),
    ("training", "warmup_steps", -1, ">= 0 and <= 1e\\+09", 0),
    ("training", "min_lr_ratio", 1.5, ">= 0 and <= 1", 1.0),
    ("training", "grad_clip", 0.0, "> 0", 0.5),
    ("training", "ema_decay", 1.0, ">= 0 and < 1", 0.0),
    ("training", "weight_decay", -0.1, ">= 0", 0.0),
    ("training", "checkpoint_every", -5, ">= 0 and <= 1e\\+09", 0),
    ("training", "preview_every", -1, ">= 0 and <= 1e\\+09", 0),
    ("training", "max_bad_steps", 0, ">= 1 and <= 1e\\+06", 1),
    ("training", "eval_samples", 0, ">= 1 and <= 1e\\+06", 24),
    ("training", "num_threads", 0, ">= 1 and <= 4096", 2),
    ("training", "seed", -1, ">= 0 and <= 9\\.22337e\\+18", 0),
    ("training", "dist_timeout_s", 5, ">= 10", 10),
    ("lora", "rank", 0, ">= 1 and <= 4096", 1),
    ("lora", "alpha", 0.0, "> 0", 1.0),
    ("lora", "dropout", 1.0, ">= 0 and < 1", 0.5),
    ("lora", "mask_sigma_data", 0.0, "> 0", 0.5),
    ("loss", "p_img", 0.0, "> 0", 0.5),
    ("loss", "p_mask", -2.0, "> 0", 2.0),
    ("loss", "lambda_img", -1.0, ">= 0", 0.0),
    ("loss", "lambda_mask", -1.0, ">= 0", 0.0),
    ("loss", "adaptive_power", -1.0, ">= 0", 0.0),
    ("loss", "adaptive_c", 0.0, "> 0", 1e-6),
    ("loss", "time_std", 0.0, "> 0", 0.1),
    ("loss", "ratio_r_neq_t", 1.5, ">= 0 and <= 1", 1.0),
    ("loss", "lesion_weight", -1.0, ">= 0", 0.0),
    ("loss", "lesion_dilate", -1, ">= 0", 0),
    ("data", "shape", [64, 4, 64], ">= 8 and <= 1024", [8, 8, 8]),
    ("data", "spacing", [3.0, 0.0, 3.0], ">= 0.1 and <= 20", [0.1, 20.0, 0.5]),
    ("data", "clip_max", 0.5, ">= 1", 1.0),
    ("data", "sdf_scale_mm", 0.0, "> 0", 1.0),
    ("data", "sdf_subgrid", 8, ">= 1 and <= 4", 4),
    ("data", "augment_copies", 65, ">= 0 and <= 64", 64),
    ("data", "augment_rotate_deg", -1.0, ">= 0 and <= 45", 45.0),
    ("data", "augment_scale", 0.5, ">= 0 and < 0.5", 0.0),
    ("data", "augment_shift_mm", -1.0, ">= 0", 0.0),
    ("conditional", "embedding_channels", [32, 0], ">= 1 and <= 4096", [1]),
    ("vae_training", "patch_size", 4, ">= 8 and <= 1024", 8),
    ("vae_training", "kl_weight", -1e-6, ">= 0", 0.0),
    ("vae_training", "ssim_weight", -0.5, ">= 0", 0.0),
    ("vae_training", "adversarial_weight", -0.1, ">= 0", 0.0),
    ("vae_training", "feature_matching_weight", -1.0, ">= 0", 0.0),
    ("vae_training", "discriminator_channels", 0, ">= 1", 1),
    ("vae_training", "discriminator_layers", 0, ">= 1", 1),
]


@pytest.mark.parametrize("section,key,bad,allowed,good", RANGE_RULES, ids=lambda v: str(v))
def test_out_of_range_values_are_rejected_naming_key_and_range(section, key, bad, allowed, good):
    with pytest.raises(ConfigError, match=f"'{section}.{key}' must be {allowed}, got"):
        config_from_dict({section: {key: bad}})
    assert getattr(getattr(config_from_dict({section: {key: good}}), section), key) == good  # the boundary is allowed


def test_every_bounded_field_has_a_range_rule():
    """A new `bounded` field without a rule above would go untested."""
    cfg = RunConfig()
    bounded = {(section.name, f.name) for section in dataclasses.fields(cfg)
               for f in dataclasses.fields(getattr(cfg, section.name)) if "range" in f.metadata}
    assert bounded == {(section, key) for section, key, *_ in RANGE_RULES}


@pytest.mark.parametrize("key,bad", [("data.group", "patients"), ("data.split", "validation"),
                                     ("model.preset", "huge"), ("model.vae_preset", "big"),
                                     ("loss.kind", "ddpm"), ("training.schedule", "linear"),
                                     ("data.downsample_mode", "mean")])
def test_choices_are_rejected_with_the_allowed_list(key, bad):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=f"'{key}' must be one of \\["):
        config_from_dict({section: {name: bad}})


def test_range_error_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=f"{path}: 'training.batch_size' must be >= 1"):
        load_config(path)
    with pytest.raises(ConfigError, match="'lora.rank' must be >= 1"):
        load_config("demo_lora", {"lora.rank": 0})


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
def test_packaged_configs_are_valid(name):
    assert isinstance(load_config(name), RunConfig)
