"""VAE encode / decode / tiled decode with MAISI's convolution splitting (4 chunks) vs none, on the small preset.

MAISI splits every convolution's input into chunks along one axis to bound the released VAE's GPU memory on large
volumes. The small (embedded) preset decodes 96^3 volumes, where that memory does not matter; this measures what
the splitting costs in time, to choose the preset's split count. Weights are random (timing does not depend on
them); both split counts run interleaved in one run, and their outputs are compared (splitting must not change
them).

    python benchmarks/bench_vae_splits.py              # small preset, 96^3 volumes (24^3 latents), tiles of 16
    python benchmarks/bench_vae_splits.py --quick      # tiny preset, 32^3: checks the script runs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from benchlib import base_parser, environment, finish, pick, ratio, setup_torch, time_interleaved  # noqa: E402

from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper  # noqa: E402

SPLIT_COUNTS = (4, 1)  # MAISI's default and none


def main() -> dict:
    parser = base_parser("bench_vae_splits", __doc__.splitlines()[0])
    parser.add_argument("--vae", default=None, help="VAE preset (default small; quick: tiny)")
    parser.add_argument("--size", type=int, default=None, help="volume edge in voxels (default 96; quick: 32)")
    parser.add_argument("--tile", type=int, default=None, help="tiled decode: latent voxels per tile (default 16; "
                                                               "quick: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; quick: 1)")
    args = parser.parse_args()
    started = time.perf_counter()
    device = setup_torch(args.threads, args.device)
    env = environment(device)
    preset, size = pick(args, "vae", "small", "tiny"), pick(args, "size", 96, 32)
    tile, repeats, warmup = pick(args, "tile", 16, 4), pick(args, "repeats", 5, 2), pick(args, "warmup", 1, 1)

    torch.manual_seed(args.seed)
    vae = MAISIVAEWrapper(preset, device=device)
    x = torch.rand(1, 1, size, size, size, device=device)
    z = torch.randn(1, vae.latent_channels, *(size // DOWNSAMPLE,) * 3, device=device)
    latent_len = size // DOWNSAMPLE

    def with_splits(n: int, op):
        def run():
            # `encode`/`decode` choose the preset's split count; pin it for this run instead
            chosen = vae.set_num_splits_for
            vae.set_num_splits_for = lambda length, requested=None: chosen(length, n)
            try:
                return op()
            finally:
                vae.set_num_splits_for = chosen
        return run

    ops = {"encode": lambda: vae.encode(x), "decode": lambda: vae.decode(z),
           f"decode_tile{tile}": lambda: vae.decode(z, tile=tile)}
    fns = {f"{name}_splits{n}": with_splits(n, op) for name, op in ops.items() for n in SPLIT_COUNTS}
    outputs = {name: fn() for name, fn in fns.items()}
    max_abs_diff = {name: float((outputs[f"{name}_splits{SPLIT_COUNTS[0]}"]
                                 - outputs[f"{name}_splits{SPLIT_COUNTS[1]}"]).abs().max()) for name in ops}
    timing = time_interleaved(fns, repeats, warmup, device)
    split, unsplit = SPLIT_COUNTS
    ratios = {f"{name}_splits{split}_over_splits{unsplit}": ratio(timing[f"{name}_splits{split}"]["median_s"],
                                                                  timing[f"{name}_splits{unsplit}"]["median_s"])
              for name in ops}
    result = {
        "config": {"vae_preset": preset, "volume": [size] * 3, "latent": [latent_len] * 3, "tile": tile,
                   "split_counts": list(SPLIT_COUNTS), "repeats": repeats, "warmup": warmup,
                   "threads": args.threads},
        "method": {"timing": "wall time, median of interleaved repeats (benchlib.time_interleaved); "
                             "CPU time beside it", "weights": "random"},
        "max_abs_output_difference": max_abs_diff,
        "timing": timing,
        "ratios": ratios,
        "env": env,
    }
    return finish(result, args.out, started)


if __name__ == "__main__":
    main()
