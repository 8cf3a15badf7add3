"""The real-size configurations on one GPU, in one command (<= 8 minutes on an H100-class card; random weights).

Measured, in this order (each section is skipped, and says so, once `--budget-s` is spent):
- `vae`: the released-architecture MAISI VAE (`maisi` preset; fp16 norms on CUDA, as released) encoding and
  decoding one volume of the seed's size (`--volume`, default 128^3 = 1.5 mm over 192 mm);
- `train.base_gpu` and `train.lora_fcd`: one training step as `neuromf.train.loop` runs it (MeanFlow loss with
  the cheap JVP, backward, clipping, AdamW) in fp32 (TF32 on) and under bf16 autocast, at the seed's latent size
  (`--volume` / 4) and batch (`--batch`, default 8): median step time and peak memory. base_gpu: the `base` UNet
  on 4 image channels, all weights training; lora_fcd: the same UNet widened to 8 channels (strategy A) with
  LoRA rank 16 on to_q/to_k/to_v + the widened convs training;
- `sampling`: time per generated pair (image + mask latents of the lora_fcd model, then both VAE decodes) with
  the 1-step MeanFlow sampler and the 50-step Euler baseline.

    bash benchmarks/bench_gpu.sh                    # on a GPU machine: writes benchmarks/results/bench_gpu.json
    .venv/bin/python benchmarks/bench_gpu.py --smoke   # CPU, reduced sizes, well under a minute: checks the script

`--smoke` runs the same code at toy sizes on CPU (tiny VAE on 32^3, tiny UNet on 8^3 latents, batch 2); its
numbers are not the benchmark. Peak memory is torch.cuda.max_memory_allocated (reset before each configuration,
in this process); on CPU it is not measured (null).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import RESULTS_DIR, base_parser, environment, finish, ratio, setup_torch, synchronize  # noqa: E402

from neuromf.meanflow import ChannelLp, MeanFlowLoss, sample_euler, sample_meanflow  # noqa: E402
from neuromf.models.unet import MeanFlowUNet  # noqa: E402

SECTIONS = ("vae", "train", "sampling")


def parse_args(argv: list[str] | None = None):
    parser = base_parser("bench_gpu", __doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced sizes on CPU (implies --quick --device cpu)")
    parser.add_argument("--volume", type=int, help="volume edge in voxels (latent = volume / 4); default 128")
    parser.add_argument("--batch", type=int, help="training batch; default 8")
    parser.add_argument("--preset", help="UNet preset; default base")
    parser.add_argument("--vae-preset", dest="vae_preset", help="VAE preset; default maisi")
    parser.add_argument("--repeats", type=int, help="timed repeats per configuration; default 10")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default 3")
    parser.add_argument("--euler-steps", dest="euler_steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true", help="also time the fp32 step with torch.compile")
    parser.add_argument("--budget-s", dest="budget_s", type=float, default=420.0,
                        help="skip the remaining sections after this many seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.device = True, "cpu"
        if args.out == RESULTS_DIR / "bench_gpu.json":
            args.out = RESULTS_DIR / "bench_gpu_smoke.json"
    q = args.quick
    args.volume = args.volume or (32 if q else 128)
    args.batch = args.batch or (2 if q else 8)
    args.preset = args.preset or ("tiny" if q else "base")
    args.vae_preset = args.vae_preset or ("tiny" if q else "maisi")
    args.repeats = args.repeats or (2 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    if args.volume % 4:
        parser.error("--volume must be a multiple of 4")
    return args


def median_time(fn, repeats: int, warmup: int, device: torch.device) -> dict:
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {"median_s": round(samples[len(samples) // 2], 5), "min_s": round(samples[0], 5),
            "max_s": round(samples[-1], 5), "repeats": repeats}


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def bench_vae(args, device: torch.device) -> dict:
    from neuromf.vae import MAISIVAEWrapper

    reset_memory(device)
    torch.manual_seed(args.seed)
    vae = MAISIVAEWrapper(args.vae_preset, device=device)
    x = torch.rand((1, 1, args.volume, args.volume, args.volume), device=device)
    with torch.no_grad():
        encode = median_time(lambda: vae.encode(x), args.repeats, args.warmup, device)
        encode_peak = peak_mb(device)
        z = vae.encode(x)
        reset_memory(device)
        decode = median_time(lambda: vae.decode(z), args.repeats, args.warmup, device)
    out = {"preset": args.vae_preset, "norm_float16": vae.norm_float16, "volume": [args.volume] * 3,
           "latent": list(z.shape[1:]), "params": sum(p.numel() for p in vae.autoencoder.parameters()),
           "encode": {**encode, "peak_mb": encode_peak}, "decode": {**decode, "peak_mb": peak_mb(device)}}
    return out


def build_model(kind: str, args) -> torch.nn.Module:
    """base_gpu: the stage-1 UNet (4 channels); lora_fcd: widened to 8 channels + LoRA (configs/lora_fcd.yaml)."""
    torch.manual_seed(args.seed)
    model = MeanFlowUNet(4, preset=args.preset)
    if kind == "lora_fcd":
        from neuromf.config import load_config
        from neuromf.models.lora import WIDENED_MODULES, inject_lora, widen_io_channels

        lora = load_config("lora_fcd").lora
        widen_io_channels(model, 8, 8)
        model = inject_lora(model, rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules,
                            modules_to_save=WIDENED_MODULES, dropout=lora.dropout)
    return model


def step_fn(model: torch.nn.Module, channels: int, args, device: torch.device, precision: str, compiled: bool):
    """One training step as the loop runs it (autocast around the loss; the JVP stays fp32 inside)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = MeanFlowLoss(distance=ChannelLp.for_channels(4, channels - 4))
    latent = args.volume // 4
    data = torch.randn((args.batch, channels, latent, latent, latent), device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = loss_fn(forward, data, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def bench_train(args, device: torch.device, deadline: float) -> dict:
    out = {}
    for kind, channels in (("base_gpu", 4), ("lora_fcd", 8)):
        variants = [("fp32", False), ("bf16", False)] + ([("fp32_compiled", True)] if args.compile else [])
        entry = {}
        for name, compiled in variants:
            if time.perf_counter() > deadline:
                entry[name] = {"skipped": "time budget spent"}
                continue
            reset_memory(device)
            model = build_model(kind, args).to(device).train()
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            step = step_fn(model, channels, args, device, "bf16" if name == "bf16" else "fp32", compiled)
            timing = median_time(step, args.repeats, args.warmup, device)
            entry[name] = {**timing, "peak_mb": peak_mb(device), "trainable_params": trainable,
                           "total_params": sum(p.numel() for p in model.parameters())}
            del model, step
        if "median_s" in entry.get("fp32", {}) and "median_s" in entry.get("bf16", {}):
            entry["bf16_over_fp32_time"] = ratio(entry["bf16"]["median_s"], entry["fp32"]["median_s"])
        entry.update({"batch": args.batch, "latent": [channels] + [args.volume // 4] * 3, "preset": args.preset})
        out[kind] = entry
    return out


def bench_sampling(args, device: torch.device) -> dict:
    from neuromf.vae import MAISIVAEWrapper

    reset_memory(device)
    model = build_model("lora_fcd", args).to(device).eval()
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model  # as generation loads it
    vae = MAISIVAEWrapper(args.vae_preset, device=device)
    latent = args.volume // 4
    noise = torch.randn((1, 8, latent, latent, latent), device=device)

    def pair(sampler, steps: int):
        def run() -> None:
            with torch.no_grad():
                z = sampler(model, noise, steps)
                vae.decode(z[:, :4])  # image
                vae.decode(z[:, 4:])  # mask (strategy A: through the same VAE)
        return run

    repeats = max(2, args.repeats // 2)
    one = median_time(pair(sample_meanflow, 1), repeats, args.warmup, device)
    euler = median_time(pair(sample_euler, args.euler_steps), max(2, repeats // 2), 1, device)
    return {"per_pair_1step": one, f"per_pair_euler{args.euler_steps}": euler, "peak_mb": peak_mb(device),
            f"euler{args.euler_steps}_over_1step": ratio(euler["median_s"], one["median_s"])}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s
    device = setup_torch(args.threads, args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # training.tf32 default
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "weights": "random (timings and memory do not depend on weight values)",
              "method": {"time": "median of --repeats after --warmup untimed runs, synchronised on CUDA",
                         "memory": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, per "
                                   "configuration in this process; null on CPU"},
              "env": environment(device)}
    for section in SECTIONS:
        if time.perf_counter() > deadline:
            result[section] = {"skipped": "time budget spent"}
            continue
        if section == "vae":
            result["vae"] = bench_vae(args, device)
        elif section == "train":
            result["train"] = bench_train(args, device, deadline)
        else:
            result["sampling"] = bench_sampling(args, device)
    if device.type != "cuda":
        result["note"] = "not a GPU run: these figures do not stand for the GPU configurations"
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
