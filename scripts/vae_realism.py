"""Realism of VAE round trips on the held-out (test split) scans: sharpness ratio, SSIM and two two-sample tests
(`neuromf.eval.realism`) for an OLD and a NEW VAE side by side, as JSON, and a picture original | old | new.

    python scripts/vae_realism.py [--old embedded] --new runs/vae_fine_sharp [--cases N] \
        [--out benchmarks/results/vae_realism.json] [--picture docs/vae_sharpness.png]

`--new` may be a saved VAE (a folder with model.safetensors) or a training run folder: then the EMA weights of its
resumable checkpoint are loaded on top of `--old` (to follow a run while it trains).

`--new-tile N` decodes the new side in overlapping tiles of N latent voxels a side (`MAISIVAEWrapper.decode`).

`--texture` also judges each decoder's decodes with scanner texture added (`neuromf.data.texture`) at the level
in its sidecar (`texture_sigma`), or, when it has none, fitted here on the first 16 training scans (never on the
held-out ones).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from neuromf.config import load_config
from neuromf.eval.realism import (
    TEXTURE_FIT_CASES,
    cnn_two_sample_test,
    fit_vae_texture,
    realism_report,
    textured,
)
from neuromf.pipelines.vae import load_volumes
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper

TARGETS = {"sharpness_ratio": (">=", 0.85), "ssim": (">=", 0.93), "cnn_balanced_accuracy": ("<=", 0.65)}


def load_vae(spec: str, base: str) -> MAISIVAEWrapper:
    """A saved VAE, or `base` with the EMA weights of the training checkpoint in run folder `spec`."""
    path = Path(spec)
    if (path / "checkpoint.safetensors").is_file() and not (path / "model.safetensors").is_file():
        vae = MAISIVAEWrapper.resolve(base)
        state = vae.autoencoder.state_dict()
        with safe_open(str(path / "checkpoint.safetensors"), framework="pt") as fh:
            for key in fh.keys():
                name = key[len("ema/"):].removeprefix("autoencoder.")
                if key.startswith("ema/") and name in state:
                    state[name] = fh.get_tensor(key)
        vae.autoencoder.load_state_dict(state)
        return vae
    return MAISIVAEWrapper.resolve(spec)


@torch.no_grad()
def round_trip(vae: MAISIVAEWrapper, volumes: torch.Tensor) -> torch.Tensor:
    """encode (posterior mean) -> decode, clamped to the data range [0, 1], one volume at a time."""
    return torch.cat([vae.decode(vae.encode(v[None].float())).clamp(0, 1) for v in volumes])


def verdicts(report: dict) -> dict[str, bool]:
    """Which of the three targets a report meets."""
    values = {"sharpness_ratio": report["sharpness_ratio"], "ssim": report["ssim"],
              "cnn_balanced_accuracy": report["cnn_two_sample"]["balanced_accuracy"]}
    return {k: (values[k] >= t if op == ">=" else values[k] <= t) for k, (op, t) in TARGETS.items()}


def print_report(name: str, report: dict) -> None:
    """One line per judged decoder."""
    print(f"{name}: sharpness ratio {report['sharpness_ratio']:.3f}  SSIM {report['ssim']:.4f}  "
          f"CNN bal. acc. {report['cnn_two_sample']['balanced_accuracy']:.3f}  "
          f"features bal. acc. {report['feature_two_sample']['balanced_accuracy']:.3f}", flush=True)


def picture(originals: torch.Tensor, decodes: dict[str, torch.Tensor], path: Path, case_ids: list[str]) -> None:
    """Axial mid-slices of a few cases (rows): original | each decode, with a 2x zoom of the cortex below each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {"original": originals, **decodes}
    fig, axes = plt.subplots(2 * len(case_ids), len(columns), figsize=(3.2 * len(columns), 6.4 * len(case_ids)),
                             dpi=110)
    for row, case in enumerate(case_ids):
        z = originals.shape[-1] // 2
        for col, (name, volumes) in enumerate(columns.items()):
            image = volumes[row, 0, :, :, z].numpy().T
            full, zoom = axes[2 * row, col], axes[2 * row + 1, col]
            full.imshow(image, cmap="gray", origin="lower", vmin=0, vmax=1)
            full.add_patch(plt.Rectangle((24, 56), 32, 32, fill=False, color="yellow", linewidth=0.8))
            full.set_title(f"{name} ({case}, z={z})", fontsize=9)
            zoom.imshow(image[56:88, 24:56], cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
            zoom.set_title(f"{name}: zoom", fontsize=9)
            full.set_axis_off()
            zoom.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="embedded", help="the VAE to compare against (default: shipped)")
    parser.add_argument("--new", help="a saved VAE folder, or a training run folder (checkpoint EMA)")
    parser.add_argument("--only", choices=["old", "new"], help="measure one side and merge it into an existing --out "
                        "(the two sides can then run at different times on a busy machine)")
    parser.add_argument("--config", default="vae_fine_sharp", help="whose data section gives the held-out scans")
    parser.add_argument("--cases", type=int, default=None, help="only the first N held-out cases (quick checks)")
    parser.add_argument("--cnn-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vae_realism.json"))
    parser.add_argument("--picture", type=Path, default=None)
    parser.add_argument("--texture", action="store_true", help="also judge decodes with scanner texture added")
    parser.add_argument("--new-tile", type=int, default=None, metavar="N",
                        help="the new side decodes in overlapping tiles of N latent voxels a side (`--new embedded "
                             "--new-tile 16`: the shipped decoder, tiled, against itself whole)")
    args = parser.parse_args(argv)

    def side(label: str, spec: str) -> MAISIVAEWrapper:
        vae = load_vae(spec, args.old)
        vae.decode_tile = args.new_tile if label == "new" else None
        return vae

    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = load_config(args.config)
    originals, case_ids = load_volumes(cfg, "test", progress=False)
    originals, case_ids = originals[:args.cases], case_ids[:args.cases]
    result = {"held_out_cases": case_ids, "grid": {"shape": cfg.data.shape, "spacing": cfg.data.spacing},
              "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()}, "seed": args.seed}
    if args.only and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if previous.get("held_out_cases") != case_ids or previous.get("seed") != args.seed:
            raise SystemExit(f"{args.out}: measured on other cases or another seed; not merging")
        result = {**previous, **result}
    decodes = {}
    training = None
    for label, spec in (("old", args.old), ("new", args.new)):
        if (args.only and label != args.only) or spec is None:
            continue
        vae = side(label, spec)
        decodes[label] = round_trip(vae, originals)
        arms = [(label, decodes[label], {})]
        if args.texture:
            if vae.texture_sigma is None and training is None:
                training = load_volumes(cfg, "train", progress=False, max_cases=TEXTURE_FIT_CASES)[0]
            fit = ({"texture_sigma": vae.texture_sigma, "texture_fit": "from the VAE's sidecar"}
                   if vae.texture_sigma is not None else fit_vae_texture(vae, training))
            decodes[f"{label}_textured"] = textured(decodes[label], fit["texture_sigma"], seed=args.seed)
            arms.append((f"{label}_textured", decodes[f"{label}_textured"], fit))
        for name, decoded, extra in arms:
            report = realism_report(originals, decoded, seed=args.seed, cnn_steps=args.cnn_steps)
            tiles = {"decode_tile": vae.decode_tile} if vae.decode_tile else {}
            result[name] = {"vae": spec, **tiles, **extra, **report, "meets": verdicts(report)}
            print_report(name, report)
    # what the judges give when both sides are real: two disjoint halves of the originals
    half = len(originals) // 2
    if half >= 2 and args.only != "new":
        result["real_vs_real"] = {"cnn_two_sample": cnn_two_sample_test(
            originals[:half], originals[half:2 * half], seed=args.seed, steps=args.cnn_steps)}
    result[f"wall_s_{args.only or 'both'}"] = round(time.perf_counter() - started, 1)
    result["versions"] = {"torch": torch.__version__, "numpy": np.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)")
    if args.picture and (args.new or args.texture):
        shown = (0, len(originals) - 1)
        columns = {f"{label} decode": (decodes[label][list(shown)] if label in decodes else
                                       round_trip(side(label, spec), originals[list(shown)]))
                   for label, spec in (("old", args.old), ("new", args.new)) if spec}
        columns.update({f"{label.replace('_', ' + ')}": decodes[label][list(shown)] for label in decodes
                        if label.endswith("_textured")})
        picture(originals[list(shown)], columns, args.picture, case_ids=[case_ids[i] for i in shown])
        print(f"wrote {args.picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
