"""Time per generated volume (UNet sampling + VAE decode): 1-, 2-, 4-step MeanFlow and 50-step Euler vs the floor.

The floor is one UNet forward plus one VAE decode, the least any 1-step sampler must do. Target (issue 2):
1-step MeanFlow end to end within 1.25x of the floor. All samplers use the same network; weights are random
(timing does not depend on them).

    python benchmarks/bench_sampling.py                  # CPU default: small UNet on 16^3, small VAE -> 64^3
    python benchmarks/bench_sampling.py --preset base --vae maisi --latent 32 --device cuda   # GPU config
    python benchmarks/bench_sampling.py --quick          # tiny sizes: checks the script runs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import base_parser, environment, finish, pick, ratio, setup_torch, target, time_interleaved  # noqa: E402

from neuromf.meanflow import sample_euler, sample_meanflow  # noqa: E402
from neuromf.models.unet import MeanFlowUNet  # noqa: E402
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper  # noqa: E402

TARGET_1STEP_OVER_FLOOR = 1.25


def main() -> dict:
    parser = base_parser("bench_sampling", __doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="UNet preset (default small; quick: tiny)")
    parser.add_argument("--vae", default=None, help="VAE preset (default small; quick: tiny)")
    parser.add_argument("--latent", type=int, default=None, help="latent edge length (default 16; quick: 8)")
    parser.add_argument("--batch", type=int, default=1, help="volumes per sampler call; times are per volume")
    parser.add_argument("--mf-steps", type=int, nargs="+", default=[1, 2, 4], help="MeanFlow step counts")
    parser.add_argument("--euler-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 7; quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; quick: 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup_torch(args.threads, args.device)
    env = environment(device)
    preset, vae_preset = pick(args, "preset", "small", "tiny"), pick(args, "vae", "small", "tiny")
    latent, repeats, warmup = pick(args, "latent", 16, 8), pick(args, "repeats", 7, 3), pick(args, "warmup", 2, 1)
    if 1 not in args.mf_steps:
        parser.error("--mf-steps must include 1 (the ratio to the floor is for 1-step sampling)")

    torch.manual_seed(args.seed)
    vae = MAISIVAEWrapper(vae_preset, device=device)
    model = MeanFlowUNet(vae.latent_channels, preset=preset).to(device).eval()
    shape = (args.batch, vae.latent_channels, latent, latent, latent)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    zeros, ones = torch.zeros(args.batch, device=device), torch.ones(args.batch, device=device)

    def floor() -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(model(noise, zeros, ones))

    def meanflow(steps: int):
        return lambda: vae.decode(sample_meanflow(model, noise, steps=steps))

    def euler() -> torch.Tensor:
        return vae.decode(sample_euler(model, noise, steps=args.euler_steps))

    fns = {"floor": floor, **{f"meanflow_{k}": meanflow(k) for k in args.mf_steps},
           f"euler_{args.euler_steps}": euler}
    timing = time_interleaved(fns, repeats=repeats, warmup=warmup, device=device)
    per_volume = {name: round(t["median_s"] / args.batch, 6) for name, t in timing.items()}
    one_step = ratio(per_volume["meanflow_1"], per_volume["floor"])
    euler_name = f"euler_{args.euler_steps}"
    result = {
        "benchmark": "sampling",
        "quick": args.quick,
        "config": {"unet_preset": preset, "vae_preset": vae_preset, "latent_shape": list(shape[1:]),
                   "volume_shape": [latent * DOWNSAMPLE] * 3, "batch": args.batch, "mf_steps": args.mf_steps,
                   "euler_steps": args.euler_steps, "repeats": repeats, "warmup_rounds": warmup,
                   "unet_params": sum(p.numel() for p in model.parameters()),
                   "vae_params": sum(p.numel() for p in vae.parameters())},
        "weights": "random-init UNet and VAE (timing does not depend on the weight values)",
        "method": "each configuration = sampler from fixed noise + VAE decode of the result, under no_grad; "
                  "repeats interleaved (all configurations once per repeat, order alternating), median reported; "
                  "floor = one UNet forward u(eps, r=0, t=1) + one decode; times per volume = median / batch",
        "per_volume_s": per_volume,
        "timing": timing,
        "ratios": {"meanflow_1_over_floor": one_step,
                   **{f"meanflow_{k}_over_floor": ratio(per_volume[f"meanflow_{k}"], per_volume["floor"])
                      for k in args.mf_steps if k != 1},
                   f"{euler_name}_over_floor": ratio(per_volume[euler_name], per_volume["floor"]),
                   f"{euler_name}_over_meanflow_1": ratio(per_volume[euler_name], per_volume["meanflow_1"])},
        "targets": {"meanflow_1_over_floor": target(one_step, TARGET_1STEP_OVER_FLOOR, "max")},
        "env": env,
    }
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
