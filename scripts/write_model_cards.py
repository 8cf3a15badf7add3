"""Write the cards (README.md) of the embedded models from their sidecars and training runs.

Usage (after scripts/pretrain_embedded.sh): python scripts/write_model_cards.py --runs runs/embedded
Measures what the cards quote: held-out PSNR/SSIM of the VAE (from its sidecar, computed at export), 1-step
samples of the base model vs the healthy training phantoms, file sizes and training wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from neuromf.config import load_config
from neuromf.data.embedded import resolve_data_dir
from neuromf.eval.figures import sample_montage
from neuromf.generation.images import generate_images
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import Preprocessing, preprocess_image
from neuromf.utils import atomic_write_text
from neuromf.weights import embedded_model_dir

BRAIN_THRESHOLD = 0.1
TARGET_SSIM, TARGET_PSNR_DB = 0.90, 28.0  # issue 3's quality target for vae_small


def _run_meta(run: Path) -> dict:
    meta = json.loads((run / "checkpoint.json").read_text())
    return {"step": meta["step"], "wall_time_s": meta.get("extra", {}).get("wall_time_s"),
            "versions": meta.get("versions", {})}


def _wall(r: dict, note: str) -> str:
    measured = f"Wall time on the 2-core CPU machine: {r['wall_time_s'] / 60:.0f} min." if r["wall_time_s"] else ""
    return f"{measured} {note}".strip()


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _brain(volume: np.ndarray) -> tuple[float, int]:
    brain = volume > BRAIN_THRESHOLD
    return float(volume[brain].mean()), int(brain.sum())


def vae_card(run: Path, wall_note: str) -> str:
    directory = embedded_model_dir("vae_small")
    meta = json.loads((directory / "model.json").read_text())
    q = meta["held_out_quality"]
    r = _run_meta(run)
    cfg = load_config(run / "config.yaml")
    vt, tr = cfg.vae_training, cfg.training
    ssim_term = f" + {vt.ssim_weight:g} (1 - SSIM)" if vt.ssim_weight else ""
    loss = f"L1{ssim_term} + {vt.kl_weight:g} KL"
    verdict = "met" if q["ssim"] >= TARGET_SSIM and q["psnr_db"] >= TARGET_PSNR_DB else "not met"
    return f"""# vae_small: embedded MAISI-class VAE

`monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi` (the released MAISI class) in the
`small` preset: channels {meta['architecture']['num_channels']}, res blocks {meta['architecture']['num_res_blocks']},
{meta['architecture']['latent_channels']} latent channels, 4x downsampling per axis, no attention. Trained by this
project on the synthetic phantoms in `sample_data/fcd_phantoms` (train split, all groups) - not on real MRI.
Use the released MAISI weights (`--vae PATH --vae-preset maisi`) for real scans.

- Files: `model.safetensors` ({_size_mb(directory / 'model.safetensors'):.1f} MB), `model.json` (preset, latent
  scale factor {meta['scale_factor']:.4f} = 1/std of the training latents, preprocessing), `loss_curve.png`.
- Command: `neuromf train-vae --config vae_small` (packaged `backend/neuromf/configs/vae_small.yaml`:
  {vt.patch_size}^3 patches, batch {tr.batch_size}, AdamW lr {tr.lr:g} {tr.schedule}, {loss}, EMA {tr.ema_decay:g}),
  {r['step']} steps. {_wall(r, wall_note)}
- Measured quality on the {q['n']} held-out (test split) phantoms, 64^3 at 3 mm, encode (posterior mean) -> decode:
  **SSIM {q['ssim']:.3f}, PSNR {q['psnr_db']:.1f} dB** (MONAI SSIMMetric / PSNRMetric, data range 1).
  The issue's target is SSIM >= {TARGET_SSIM:.2f} and PSNR >= {TARGET_PSNR_DB:.0f} dB: **{verdict}**.
- Library versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.
"""


def base_card(run: Path, wall_note: str, n: int = 4) -> str:
    directory = embedded_model_dir("base_small")
    meta = json.loads((directory / "model.json").read_text())
    prep = Preprocessing.from_dict(meta["preprocessing"])
    cases = discover_cases(resolve_data_dir("embedded-3mm"), group="hc", split="train")
    real = [_brain(preprocess_image(c.image, prep).data[0].numpy()) for c in cases]
    images = [v.image for v in generate_images("embedded-3mm", n=n, steps=1, seed=0, device="cpu")]
    gen = [_brain(v) for v in images]
    sample_montage(images, directory / "samples_1step.png", title="embedded base_small: 1-step samples (seed 0)")
    r = _run_meta(run)
    ri, rv = np.mean([x[0] for x in real]), np.mean([x[1] for x in real])
    gi, gv = np.mean([x[0] for x in gen]), np.mean([x[1] for x in gen])
    return f"""# base_small: embedded stage-1 MeanFlow UNet

`neuromf.models.unet.MeanFlowUNet` (MONAI DiffusionModelUNet + (t - r) embedding), `small` preset
({meta['arch']['channels']} channels, attention at the lowest level), trained from scratch with the MeanFlow loss
on 16^3 x 4 latents of the {len(meta['train_cases'])} healthy training phantoms and their left-right mirrors,
encoded by `vae_small`. Synthetic data only.

- Files: `model.safetensors` ({_size_mb(directory / 'model.safetensors'):.1f} MB, EMA weights), `model.json`
  (architecture, VAE identity + scale factor, preprocessing, latent shape), `loss_curve.png`, `samples_1step.png`.
- Command: `neuromf train-base --config base_small` (packaged `base_small.yaml`: batch 8, AdamW lr 3e-4 cosine,
  warm-up 100, EMA 0.995, logit-normal (r, t) with 25% r != t, adaptive weight p = 1, c = 1e-3), {r['step']}
  steps. {_wall(r, wall_note)}
- 1-step samples (seed 0, n = {n}) vs the healthy training phantoms on the model grid (brain = voxels > 0.1):
  mean brain intensity **{gi:.3f} vs {ri:.3f}** ({100 * (gi / ri - 1):+.1f}%), brain volume **{gv:.0f} vs
  {rv:.0f} voxels** ({100 * (gv / rv - 1):+.1f}%). The test suite asserts both within 10%.

![loss curve](loss_curve.png)

![1-step samples](samples_1step.png)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/embedded"))
    parser.add_argument("--vae-wall", default="", help="extra wall-time note for the VAE card")
    parser.add_argument("--base-wall", default="", help="extra wall-time note for the base card")
    args = parser.parse_args()
    atomic_write_text(embedded_model_dir("vae_small") / "README.md", vae_card(args.runs / "vae_small", args.vae_wall))
    atomic_write_text(embedded_model_dir("base_small") / "README.md",
                      base_card(args.runs / "base_small", args.base_wall))
    print("cards written")


if __name__ == "__main__":
    main()
