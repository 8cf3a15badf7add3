"""LoRA fine-tuning costs: adapter size, LoRA vs full fine-tune step, and the latent cache's effect on epoch time.

(a) Adapter on disk (peft `adapter_model.safetensors`, LoRA q/k/v + the widened first/last convs) vs the full
    model checkpoint (`model.safetensors` of the same widened model). Target (issue 4): at most 5%.
(b) One training step of the LoRA model vs full fine-tuning of the same widened model, same batch: time and
    peak memory (no target; LoRA should not cost more).
(c) One epoch of LoRA training (i) on latents already in memory ("pure"), (ii) reading them from the warm
    latent cache first ("cached", what `train_lora` does), (iii) encoding each batch with the VAE inside the
    step ("on the fly"), for the `small` VAE and the `maisi` preset (random weights; encode cost does not depend
    on them), on a temporary phantom data set. Target (issue 4): cached epoch at most 1.1x the pure epoch.

    python benchmarks/bench_lora.py            # CPU default: small UNet, 64^3 phantoms (16^3 latents)
    python benchmarks/bench_lora.py --quick    # tiny UNet, 32^3 phantoms, 1-2 volumes
    python benchmarks/bench_lora.py --device cuda --preset base --grid 128 --volumes 8 --maisi-volumes 8
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import (  # noqa: E402
    base_parser,
    environment,
    finish,
    memory_method,
    peak_memory,
    pick,
    ratio,
    setup_torch,
    summarize,
    target,
    time_interleaved,
)

from neuromf.config import load_config  # noqa: E402
from neuromf.data.fcd_dataset import FCDDataset, downsample_mask, encode_mask_channel, mask_channels  # noqa: E402
from neuromf.data.phantom import PhantomConfig, make_phantom_dataset  # noqa: E402
from neuromf.io.bids import discover_cases  # noqa: E402
from neuromf.io.nifti import Preprocessing, preprocess_pair  # noqa: E402
from neuromf.meanflow.loss import MeanFlowLoss  # noqa: E402
from neuromf.models.flow_model import save_flow_model  # noqa: E402
from neuromf.models.lora import (  # noqa: E402
    WIDENED_MODULES,
    count_lora_params,
    count_trainable_params,
    inject_lora,
    save_adapter,
    widen_io_channels,
)
from neuromf.models.unet import MeanFlowUNet  # noqa: E402
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper  # noqa: E402

TARGET_ADAPTER_FRACTION = 0.05
TARGET_CACHE_OVER_PURE = 1.1
CONFIG = "lora_fcd"  # rank, alpha, targets and loss settings of the real stage-2 config


# ------------------------------------------------------------------------------------------------ models
def widened_base(preset: str, n_mask: int, seed: int) -> MeanFlowUNet:
    torch.manual_seed(seed)
    model = MeanFlowUNet(4, preset=preset)
    return widen_io_channels(model, 4 + n_mask, 4 + n_mask)


def lora_model(base: MeanFlowUNet) -> torch.nn.Module:
    lc = load_config(CONFIG).lora
    return inject_lora(copy.deepcopy(base), rank=lc.rank, alpha=lc.alpha, target_modules=lc.target_modules,
                       modules_to_save=WIDENED_MODULES, dropout=lc.dropout)


def full_model(base: MeanFlowUNet) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_step(model: torch.nn.Module, n_mask: int, device: torch.device, seed: int):
    """step(batch): the training loop's step (loss, backward, clip, AdamW) on a latent batch."""
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = MeanFlowLoss.from_config(load_config(CONFIG).loss, 4, n_mask)
    generator = torch.Generator(device=device).manual_seed(seed)

    def step(batch: torch.Tensor) -> float:
        loss, _ = loss_fn(model, batch.to(device), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())

    return step


def random_batch(batch: int, channels: int, latent: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, channels, latent, latent, latent), generator=torch.Generator().manual_seed(seed))


def step_memory_run(mode: str, preset: str, n_mask: int, latent: int, batch: int, seed: int, steps: int,
                    device: str) -> dict:
    """Child-process body for (b): build the LoRA or fully trainable model, run `steps` steps (first = warm-up)."""
    base = widened_base(preset, n_mask, seed)
    model = lora_model(base) if mode == "lora" else full_model(base)
    del base
    trainable, total = count_trainable_params(model)
    step = make_step(model, n_mask, torch.device(device), seed)
    data = random_batch(batch, 4 + n_mask, latent, seed)
    for _ in range(steps):
        step(data)
    return {"steps": steps, "trainable_params": trainable, "total_params": total}


# -------------------------------------------------------------------------------------------------- (a)
def adapter_sizes(preset: str, n_mask: int, seed: int, tmp: Path) -> dict:
    base = widened_base(preset, n_mask, seed)
    full_dir = tmp / f"full_{preset}"
    save_flow_model(base, full_dir, {"note": "benchmark"})
    model = lora_model(base)
    adapter_dir = save_adapter(model, tmp / f"adapter_{preset}", {"kind": "neuromf_lora_adapter"})
    trainable, total = count_trainable_params(model)
    full_bytes = (full_dir / "model.safetensors").stat().st_size
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    adapter_dir_bytes = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    return {"full_checkpoint_bytes": full_bytes, "adapter_bytes": adapter_bytes,
            "adapter_folder_bytes": adapter_dir_bytes, "adapter_fraction": ratio(adapter_bytes, full_bytes),
            "adapter_folder_fraction": ratio(adapter_dir_bytes, full_bytes), "trainable_params": trainable,
            "total_params": total, "lora_params": count_lora_params(model)}


# -------------------------------------------------------------------------------------------------- (c)
def epoch_benchmark(vae_preset: str, n_volumes: int, args, preset: str, strategy: str, grid: int, spacing: float,
                    data_root: Path, tmp: Path, device: torch.device, repeats: int) -> dict:
    n_mask = mask_channels(strategy)
    latent = grid // DOWNSAMPLE
    torch.manual_seed(args.seed)
    vae = MAISIVAEWrapper(vae_preset, device=device)
    prep = Preprocessing(shape=(grid,) * 3, spacing=(spacing,) * 3)
    cache_dir = tmp / f"cache_{vae_preset}"
    cases = discover_cases(data_root, group="fcd", split=None)[:n_volumes]
    case_root = tmp / f"cases_{vae_preset}"  # a data folder holding exactly the benchmark's cases
    _link_subset(data_root, case_root, [c.case_id for c in cases])

    def dataset() -> FCDDataset:
        return FCDDataset(case_root, strategy, vae=vae, prep=prep, cache_dir=cache_dir, flip=False, split=None)

    start = time.perf_counter()
    ds = dataset()  # cold cache: preprocess + encode every case once
    build_s = time.perf_counter() - start
    latents = ds.latents()
    mask_scale = ds.mask_scale
    start = time.perf_counter()
    volumes = [preprocess_pair(c.image, c.mask, prep) for c in cases]
    preprocess_s = (time.perf_counter() - start) / len(cases)
    images = torch.stack([img.data for img, _ in volumes])
    masks = torch.stack([m.data for _, m in volumes])

    step = make_step(lora_model(widened_base(preset, n_mask, args.seed)), n_mask, device, args.seed)
    batch = min(args.batch_size, len(cases))
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(args.seed))
    batches = [order[i:i + batch] for i in range(0, len(cases), batch)]
    read_times: list[float] = []

    def encode(idx: torch.Tensor) -> torch.Tensor:
        z_img = vae.encode(images[idx].to(device))
        if strategy == "vae":
            z_mask = vae.encode(masks[idx].to(device))
        else:
            z_mask = encode_mask_channel(downsample_mask(masks[idx].to(device), args.downsample_mode), mask_scale)
        return torch.cat([z_img, z_mask], dim=1)

    def pure() -> None:
        for idx in batches:
            step(latents[idx])

    def cached() -> None:
        t0 = time.perf_counter()
        z = dataset().latents()  # warm cache: hash check + safetensors read per case
        read_times.append(time.perf_counter() - t0)
        for idx in batches:
            step(z[idx])

    def on_the_fly() -> None:
        for idx in batches:
            step(encode(idx))

    pure()  # warm-up of the training step; the cold cache build above warmed up the encoder
    dataset().latents()  # and the warm-cache read path
    read_times.clear()
    timing = time_interleaved({"pure": pure, "cached": cached, "on_the_fly": on_the_fly}, repeats=repeats,
                              warmup=0, device=device)
    median = {k: v["median_s"] for k, v in timing.items()}
    encodes_per_case = 2 if strategy == "vae" else 1
    return {
        "vae_preset": vae_preset, "volumes": len(cases), "volume_shape": [grid] * 3, "spacing_mm": spacing,
        "latent_shape": [4 + n_mask, latent, latent, latent], "batch": batch, "steps_per_epoch": len(batches),
        "vae_params": sum(p.numel() for p in vae.parameters()),
        "cache_build_s": round(build_s, 4),
        "encode_s_per_volume": round((median["on_the_fly"] - median["pure"]) / (len(cases) * encodes_per_case), 4),
        "preprocess_s_per_case": round(preprocess_s, 4),
        "cache_read_s": summarize(read_times),
        "epoch_s": {k: round(v, 6) for k, v in median.items()},
        "timing": timing,
        "ratios": {"cached_over_pure": ratio(median["cached"], median["pure"]),
                   "on_the_fly_over_pure": ratio(median["on_the_fly"], median["pure"]),
                   "on_the_fly_over_cached": ratio(median["on_the_fly"], median["cached"])},
    }


def _link_subset(src: Path, dst: Path, subjects: list[str]) -> None:
    """A BIDS folder with symlinks to `subjects` of `src` and their participants.tsv rows."""
    dst.mkdir(parents=True, exist_ok=True)
    for sid in subjects:
        (dst / sid).symlink_to(src / sid, target_is_directory=True)
    rows = [line for line in (src / "participants.tsv").read_text().splitlines()
            if line.startswith("participant_id") or line.split("\t")[0] in subjects]
    (dst / "participants.tsv").write_text("\n".join(rows) + "\n")


# ------------------------------------------------------------------------------------------------- main
def main() -> dict:
    parser = base_parser("bench_lora", __doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="UNet preset for (b) and (c) (default small; quick: tiny)")
    parser.add_argument("--size-presets", nargs="+", default=None,
                        help="UNet presets for (a) (default tiny small base; quick: tiny small)")
    parser.add_argument("--strategy", default="vae", choices=["vae", "downsample"],
                        help="mask strategy: vae = 8 channels (mask through the VAE), downsample = 5 channels")
    parser.add_argument("--downsample-mode", default="nearest", choices=["nearest", "area", "max"])
    parser.add_argument("--grid", type=int, default=None, help="phantom volume edge for (c) (default 64; quick: 32)")
    parser.add_argument("--batch", type=int, default=None, help="batch for (b) (default 4; quick: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch for the epochs of (c) (default 4; "
                                                                       "quick: 2)")
    parser.add_argument("--vaes", nargs="+", default=["small", "maisi"], help="VAE presets for (c)")
    parser.add_argument("--volumes", type=int, default=None, help="phantom volumes per epoch, small/tiny VAE "
                                                                  "(default 4; quick: 2)")
    parser.add_argument("--maisi-volumes", type=int, default=None, help="volumes per epoch for the maisi VAE "
                                                                        "(default 2; quick: 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of (b) steps (default 7; quick 3)")
    parser.add_argument("--epoch-repeats", type=int, default=None, help="timed epochs of (c) (default 3; quick 2)")
    parser.add_argument("--maisi-epoch-repeats", type=int, default=None,
                        help="timed epochs of (c) for the maisi VAE (default 3; quick: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps of (b) first (default 2; quick 1)")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps per memory process (default 3; "
                                                                       "quick 2)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["size", "step", "epoch"], help="parts to skip")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup_torch(args.threads, args.device)
    preset = pick(args, "preset", "small", "tiny")
    size_presets = pick(args, "size_presets", ["tiny", "small", "base"], ["tiny", "small"])
    grid = pick(args, "grid", 64, 32)
    args.batch_size = pick(args, "batch_size", 4, 2)
    batch, repeats, warmup = pick(args, "batch", 4, 2), pick(args, "repeats", 7, 3), pick(args, "warmup", 2, 1)
    memory_steps = pick(args, "memory_steps", 3, 2)
    n_mask = mask_channels(args.strategy)
    latent = grid // DOWNSAMPLE
    lc = load_config(CONFIG).lora
    env = environment(device)
    result: dict = {
        "benchmark": "lora",
        "quick": args.quick,
        "config": {"unet_preset": preset, "strategy": args.strategy, "channels": 4 + n_mask,
                   "lora": {"rank": lc.rank, "alpha": lc.alpha, "target_modules": lc.target_modules,
                            "modules_to_save": WIDENED_MODULES}, "loss_config": CONFIG},
        "weights": "random-init UNet and VAEs (sizes and timings do not depend on the weight values)",
        "method": {
            "size": "save_adapter (peft save_pretrained, safetensors) vs save_flow_model (model.safetensors) of the "
                    "same widened model; fraction = adapter_model.safetensors bytes / model.safetensors bytes",
            "step": "one training step (MeanFlowLoss cheap JVP + backward + clip + AdamW) of the LoRA model vs the "
                    "same widened model with every parameter trainable, same batch; steps interleaved, median",
            "memory": memory_method(device),
            "epoch": "pure = steps on latents already in memory; cached = build FCDDataset on the warm latent cache "
                     "(source hash check + safetensors read per case) then the same steps; on_the_fly = VAE encode "
                     "(image, and the mask for strategy vae) of each batch inside the step, from volumes "
                     "already preprocessed in memory (NIfTI reading/resampling excluded: preprocess_s_per_case "
                     "gives that extra cost). train_lora reads the cache once per run, so 'cached' re-reading it "
                     "every epoch is an upper bound on its per-epoch cost. Epochs interleaved, median; warm-up = "
                     "one pure epoch + one warm cache read, after the cold cache build which runs the encoder.",
        },
        "targets": {},
    }
    with tempfile.TemporaryDirectory(prefix="neuromf_bench_lora_") as tmp_name:
        tmp = Path(tmp_name)
        if "size" not in args.skip:
            sizes = {p: adapter_sizes(p, n_mask, args.seed, tmp) for p in size_presets}
            result["size"] = sizes
            for p, s in sizes.items():
                result["targets"][f"adapter_fraction_{p}"] = target(s["adapter_fraction"], TARGET_ADAPTER_FRACTION)

        if "step" not in args.skip:
            base = widened_base(preset, n_mask, args.seed)
            data = random_batch(batch, 4 + n_mask, latent, args.seed)
            steps = {"lora": make_step(lora_model(base), n_mask, device, args.seed),
                     "full": make_step(full_model(base), n_mask, device, args.seed)}
            timing = time_interleaved({k: (lambda s=s: s(data)) for k, s in steps.items()}, repeats=repeats,
                                      warmup=warmup, device=device)
            del steps, base
            part = {"latent_shape": [4 + n_mask, latent, latent, latent], "batch": batch,
                    "step_s": {k: round(v["median_s"], 6) for k, v in timing.items()}, "timing": timing}
            part["ratios"] = {"time_lora_over_full": ratio(timing["lora"]["median_s"], timing["full"]["median_s"])}
            if not args.no_memory:
                memory = {mode: peak_memory(step_memory_run, {"mode": mode, "preset": preset, "n_mask": n_mask,
                                                              "latent": latent, "batch": batch, "seed": args.seed,
                                                              "steps": memory_steps}, args.threads, device)
                          for mode in ("lora", "full")}
                part["memory"] = memory
                part["ratios"]["memory_lora_over_full"] = ratio(memory["lora"]["peak_above_baseline_mb"],
                                                                memory["full"]["peak_above_baseline_mb"])
                part["ratios"]["memory_lora_over_full_total_rss"] = ratio(memory["lora"]["peak_mb"],
                                                                          memory["full"]["peak_mb"])
            result["step"] = part

        if "epoch" not in args.skip:
            spacing = 3.0 * 64 / grid  # the embedded grid: 64^3 at 3 mm; other sizes cover the same field of view
            counts = {v: pick(args, "maisi_volumes", 2, 1) if v == "maisi" else pick(args, "volumes", 4, 2)
                      for v in args.vaes}
            data_root = make_phantom_dataset(tmp / "phantoms", n_healthy=0, n_fcd=max(counts.values()),
                                             seed=args.seed, test_fraction=0.0,
                                             cfg=PhantomConfig(shape=(grid,) * 3, spacing=(spacing,) * 3))
            epochs = {}
            for v in args.vaes:
                reps = (pick(args, "maisi_epoch_repeats", 3, 1) if v == "maisi"
                        else pick(args, "epoch_repeats", 3, 2))
                epochs[v] = epoch_benchmark(v, counts[v], args, preset, args.strategy, grid, spacing, data_root,
                                            tmp, device, reps)
                result["targets"][f"cached_over_pure_{v}"] = target(epochs[v]["ratios"]["cached_over_pure"],
                                                                    TARGET_CACHE_OVER_PURE)
            result["epoch"] = epochs
    result["env"] = env
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
