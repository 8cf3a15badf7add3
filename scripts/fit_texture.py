"""Fit a saved VAE's scanner-texture level (`texture_sigma`) on its training scans and write it into its sidecar.

    python scripts/fit_texture.py --vae sample_data/models/vae_fine [--config vae_fine] [--cases 16] [--write]
                                  [--held-out] [--decode-tile N]

`neuromf train-vae` does this itself when it exports; this script fits VAEs saved before it did, or after their
decode changed (a sidecar's `decode_tile`, or `--decode-tile N` to set it: the fit uses the VAE's own decode).
`--held-out` also measures PSNR/SSIM on the config's test split again (`held_out_quality`, as the export does) with
that decode. Without `--write` it only prints. The sidecar (`model.json`) is rewritten atomically; the weights are
not touched, so the VAE's identity (and every model trained on its latents) stays valid.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuromf.config import load_config
from neuromf.eval.image_metrics import reconstruction_metrics
from neuromf.eval.realism import TEXTURE_FIT_CASES, fit_vae_texture
from neuromf.pipelines.vae import load_volumes
from neuromf.utils import atomic_write_json
from neuromf.vae import MAISIVAEWrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True, help="a saved VAE folder (model.safetensors + model.json)")
    parser.add_argument("--config", default="vae_fine", help="whose data section gives the training scans")
    parser.add_argument("--cases", type=int, default=TEXTURE_FIT_CASES)
    parser.add_argument("--write", action="store_true", help="write the fit into the VAE's model.json")
    parser.add_argument("--held-out", action="store_true", help="measure held_out_quality on the test split again")
    parser.add_argument("--decode-tile", type=int, default=None, metavar="N",
                        help="decode in tiles of N latent voxels a side (>= 4) from now on: fit and measure so, and "
                             "write it into the sidecar as its decode_tile")
    args = parser.parse_args(argv)
    if args.decode_tile is not None and args.decode_tile < 4:
        parser.error(f"--decode-tile must be >= 4 latent voxels, got {args.decode_tile}")
    vae = MAISIVAEWrapper.from_file(args.vae)
    if args.decode_tile is not None:
        vae.decode_tile = args.decode_tile
    cfg = load_config(args.config)
    meta = json.loads((args.vae / "model.json").read_text())
    train_ids = set(meta.get("train_cases") or [])
    volumes, ids = load_volumes(cfg, "train", progress=True, max_cases=args.cases)
    if train_ids and not set(ids) <= train_ids:
        raise SystemExit(f"{args.vae}: the config's training scans are not the ones this VAE was trained on")
    fit = fit_vae_texture(vae, volumes, max_cases=args.cases)
    if args.decode_tile is not None:
        fit["decode_tile"] = args.decode_tile
    if args.held_out:
        held_out, test_ids = load_volumes(cfg, "test", progress=True)
        if set(test_ids) != set(meta.get("test_cases") or test_ids):
            raise SystemExit(f"{args.vae}: the config's test scans are not the ones this VAE was measured on")
        fit["held_out_quality"] = {**reconstruction_metrics(vae, held_out), "decode_tile": vae.decode_tile}
    print(json.dumps(fit, indent=1))
    if args.write:
        atomic_write_json(args.vae / "model.json", {**meta, **fit})
        print(f"wrote {args.vae / 'model.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
