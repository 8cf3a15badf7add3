"""Time per joint FLAIR + mask pair: the few-step joint model alone vs the two-network path, same adapters, one run.

Each configuration makes one pair from fixed noise under `no_grad`, models loaded once beforehand (loading is not
timed): the joint adapter's `JointModel.sample` (site drawn from its prior, as `generate` does) and then either its
own decode (image and mask) or the conditional adapter's render of the FLAIR for the mask (`generate --render`):

- `floor`: one joint network call `u(eps, 0, 1)` + decode: the least a one-step joint generator can do;
- `joint_meanflow_1`, `joint_meanflow_2`: 1 / 2 MeanFlow steps of the joint model, guidance 1 (1 / 2 network
  calls) + decode;
- `two_network_euler`: what passes the lesion check today: Euler `--euler-steps` steps with the adapter's joint
  guidance (two calls per step), then the conditional adapter renders the FLAIR with Euler as many steps (mask
  guidance: two calls per step when it is not 1) + decode.

Targets (issue 27): two-network / best few-step >= 30x; few-step pair <= 1.3x the floor. Weights: the shipped
2 mm adapters (timings do not depend on weight values; building the path needs real adapters).

    python benchmarks/bench_joint_pair.py --threads 1          # shipped embedded joint_fine + cond_fine
    python benchmarks/bench_joint_pair.py --quick              # Euler 4 for the two-network path
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import base_parser, environment, finish, pick, ratio, setup_torch, target, time_interleaved  # noqa: E402

from neuromf.generation.joint import joint_velocity, load_renderer, sample_joint  # noqa: E402
from neuromf.meanflow import sample  # noqa: E402
from neuromf.models.joint import load_joint_model  # noqa: E402

TARGET_SPEEDUP = 30.0
TARGET_FLOOR = 1.3


def main() -> dict:
    parser = base_parser("bench_joint_pair", __doc__.splitlines()[0])
    parser.add_argument("--adapter", default="embedded", help="joint adapter")
    parser.add_argument("--render", default="embedded", help="conditional adapter of the two-network path")
    parser.add_argument("--euler-steps", type=int, default=None, help="two-network path's steps (default 32; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs per configuration (default 3; quick 2)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup_torch(args.threads, args.device)
    env = environment(device)
    euler_steps, repeats = pick(args, "euler_steps", 32, 4), pick(args, "repeats", 3, 2)

    joint = load_joint_model(args.adapter, device)
    renderer = load_renderer(args.render, joint.meta, device)
    n_img, guidance = joint.meta.n_image, joint.meta.guidance_scale(None)
    sites = joint.draw_sites(1, args.seed)
    noise = torch.randn((1, *joint.meta.latent_shape), generator=torch.Generator().manual_seed(args.seed))

    def decode(z: torch.Tensor) -> None:
        joint.split(z.to(device))

    def floor() -> None:
        with torch.no_grad():
            velocity = joint_velocity(joint, noise, 1.0, sites)
            eps = noise.to(device)
            decode(eps - velocity(eps, torch.zeros(1, device=device), torch.ones(1, device=device)))

    def joint_steps(steps: int):
        def run() -> None:
            with torch.no_grad():
                velocity = joint_velocity(joint, noise, 1.0, sites)
                decode(sample(velocity, noise.to(device), steps=steps, method="meanflow"))
        return run

    def two_network() -> None:
        for _, z, _ in sample_joint(joint, 1, euler_steps, args.seed, device, "euler", guidance):
            mask = joint.mask(z.to(device))[0, 0].numpy()
            renderer.generate(mask, noise[0, :n_img], euler_steps, "euler")

    configs = {"floor": floor, "joint_meanflow_1": joint_steps(1), "joint_meanflow_2": joint_steps(2),
               "two_network_euler": two_network}
    # the two-network pair takes minutes on a CPU: warm up only the cheap ones
    timing = time_interleaved(configs, repeats=repeats, warmup=1, device=device,
                              warmup_only={"floor", "joint_meanflow_1", "joint_meanflow_2"})
    median = {k: t["median_s"] for k, t in timing.items()}
    ratios = {"two_network_over_joint_meanflow_1": ratio(median["two_network_euler"], median["joint_meanflow_1"]),
              "two_network_over_joint_meanflow_2": ratio(median["two_network_euler"], median["joint_meanflow_2"]),
              "joint_meanflow_1_over_floor": ratio(median["joint_meanflow_1"], median["floor"]),
              "joint_meanflow_2_over_floor": ratio(median["joint_meanflow_2"], median["floor"])}
    targets = {"speedup_2_step": target(ratios["two_network_over_joint_meanflow_2"], TARGET_SPEEDUP, "min"),
               "floor_2_step": target(ratios["joint_meanflow_2_over_floor"], TARGET_FLOOR, "max")}
    result = {
        "benchmark": "joint_pair",
        "quick": args.quick,
        "config": {"adapter": args.adapter, "render": args.render, "latent_shape": list(joint.meta.latent_shape),
                   "grid": list(joint.meta.prep.shape), "euler_steps": euler_steps, "joint_guidance": guidance,
                   "render_guidance": renderer.meta.guidance_scale(None), "repeats": repeats, "pairs_per_call": 1},
        "weights": "the shipped adapters named in config (timings do not depend on weight values)",
        "method": {"time": "one pair per call from fixed noise under no_grad, models loaded beforehand; calls "
                           "interleaved across configurations (order alternating), median; one warm-up call of "
                           "the few-step configurations only"},
        "per_pair_s": {k: round(m, 4) for k, m in median.items()},
        "timing": timing,
        "ratios": ratios,
        "targets": targets,
        "env": env,
    }
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
