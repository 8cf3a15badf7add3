"""Conditional generation, mask -> FLAIR: a loaded conditional adapter (ControlNet on the frozen MeanFlow UNet)
and the FLAIRs it generates for given masks or for masks drawn from its prior of the training lesions.

Masks come from the user (a painted Labels layer, a case's mask, `--mask FILE`) or from the adapter's `MaskPrior`;
a prior-drawn lesion is placed in the brain its noise generates (`generate_conditional_pairs`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import torch

from neuromf.data.brain import brain_mask
from neuromf.data.mask_prior import PRIOR, MaskPrior
from neuromf.generation.guidance import guided_velocity
from neuromf.generation.images import GeneratedPair, model_grid_affine, with_texture, write_pairs
from neuromf.io.nifti import Preprocessing
from neuromf.meanflow import sample
from neuromf.models.adapter_meta import (
    CONTROLNET_WEIGHTS,
    SIDECAR,
    AdapterMeta,
    adapter_meta,
    check_base_agrees,
    resolve_adapter_dir,
)
from neuromf.models.controlnet import ConditionedFlowModel, MeanFlowControlNet, load_controlnet_weights
from neuromf.models.flow_model import load_flow_model
from neuromf.utils import resolve_device
from neuromf.vae import MAISIVAEWrapper, vae_for
from neuromf.weights import WeightFileError


@dataclass
class ConditionalModel:
    """A loaded conditional adapter: the conditioned model, its VAE, mask prior and sidecar."""

    model: ConditionedFlowModel
    vae: MAISIVAEWrapper
    prior: MaskPrior
    meta: AdapterMeta

    @property
    def prep(self) -> Preprocessing:
        """The model grid and intensity scaling of the adapter (from its sidecar)."""
        return self.meta.prep

    @torch.no_grad()
    def generate(self, mask: np.ndarray, noise: torch.Tensor, steps: int = 1, method: str = "meanflow",
                 guidance: float | None = None, on_step: Callable[[int, int], None] | None = None,
                 stop: Event | None = None) -> np.ndarray:
        """The FLAIR the conditioned model generates from `noise` for `mask`.

        Args:
            mask: (H, W, D) lesion mask on the model grid (nonzero = lesion).
            noise: (4, h, w, d) Gaussian noise, h = H / 4 (one sample, no batch axis).
            steps: sampler steps (1 = one-step MeanFlow).
            method: "meanflow" or "euler" (`neuromf.meanflow.sample`).
            guidance: mask guidance scale s (`guided_velocity`); 1 = the conditioned model as trained; None = the
                adapter's own (`AdapterMeta.guidance`, 1 unless its measurements set another).
            on_step, stop: per network step progress and cancel (`neuromf.meanflow.sample`).
        Returns:
            (H, W, D) float32 FLAIR in [0, clip_max].
        Raises:
            ValueError: `mask` is not on the model grid.
        """
        prep = self.prep
        if tuple(mask.shape) != prep.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} is not the model grid {prep.shape}: map it onto the "
                             "grid first (neuromf.io.nifti.preprocess_mask)")
        device = next(self.model.parameters()).device
        cond = torch.as_tensor(np.asarray(mask) > 0, dtype=torch.float32, device=device)[None, None]
        velocity = guided_velocity(self.model, cond, self.meta.guidance_scale(guidance))
        z = sample(velocity, noise[None].to(device), steps=steps, method=method, on_step=on_step, stop=stop)
        return self.vae.decode(z)[0, 0].clamp(0, prep.clip_max).cpu().numpy().astype(np.float32)


def load_conditional_model(adapter: str | Path, device: str | torch.device = "cpu") -> ConditionalModel:
    """Base model named in the sidecar + the ControlNet + the mask prior."""
    directory = resolve_adapter_dir(adapter, "conditional")
    for name in (CONTROLNET_WEIGHTS, PRIOR, SIDECAR):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: not a NeuroMF conditional adapter (missing {name})")
    meta = adapter_meta(directory, "conditional")
    base, base_meta = load_flow_model(meta.base_checkpoint)
    if base_meta["weights_sha256"] != meta.base_sha256:
        raise ValueError(f"{directory}: adapter was trained on a different base model than "
                         f"{meta.base_checkpoint} (weights hash differs)")
    check_base_agrees(meta, base_meta, directory)
    arch = meta.controlnet
    try:
        controlnet = MeanFlowControlNet(arch["in_channels"], arch["preset"], arch["cond_channels"],
                                        arch["embedding_channels"])
    except (KeyError, TypeError, ValueError) as err:  # a damaged sidecar's 'controlnet' entry
        raise WeightFileError(f"{directory / SIDECAR}: invalid 'controlnet' architecture ({err!r})") from err
    load_controlnet_weights(controlnet, directory)
    dev = resolve_device(device)
    model = ConditionedFlowModel(base, controlnet).to(dev).eval()
    return ConditionalModel(model, vae_for(meta.vae_reference(), device=dev), MaskPrior.load(directory / PRIOR), meta)


PLACEMENT_ROUNDS = 3


def _place_and_generate(cond: ConditionalModel, noise: torch.Tensor, steps: int, rng: np.random.Generator,
                        method: str = "meanflow", guidance: float | None = None,
                        on_step: Callable[[int, int], None] | None = None,
                        stop: Event | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """A prior lesion placed in the brain generated from `noise`, and the FLAIR generated for it."""
    brain = brain_mask(cond.generate(np.zeros(cond.prep.shape, dtype=np.uint8), noise, steps, method,
                                     on_step=on_step, stop=stop))
    rounds = 0
    while True:
        rounds += 1
        try:
            mask, placed_in = cond.prior.sample(rng, brain=brain), "generated brain"
        except ValueError:  # no voxel of that brain at a real lesion's depth (an untrained model's blur)
            mask, placed_in = cond.prior.sample(rng), "reference brain"
        image = cond.generate(mask, noise, steps, method, guidance, on_step, stop)
        brain = brain_mask(image)
        if placed_in == "reference brain" or rounds == PLACEMENT_ROUNDS or cond.prior.fits(mask, brain):
            break
    return mask, image, {"placed_in": placed_in, "placement_rounds": rounds}


def pair_noise(latent_shape: list[int] | tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """The starting noise of pair `index` of a draw with `seed` (each pair reproducible on its own)."""
    return torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(seed * 100_003 + index))


def empty_mask_control(adapter: str | Path, generated_dir: Path, device: str = "auto") -> dict[str, Any]:
    """Is the hyperintensity under a generated lesion caused by the mask, or by where the lesion was put?

    For each conditional pair of `generated_dir` (its `sample_XXX.json` names seed, index and steps), the FLAIR is
    generated again from the same noise with an empty mask; the FLAIR contrast (mask / 2-voxel ring) of the pair's
    mask region is measured in both. A mask-driven lesion shows as a gain; a lesion placed in tissue that is bright
    anyway (grey matter) shows none. Pairs without a conditional sidecar are skipped.
    """
    import json

    from neuromf.eval.lesion_metrics import lesion_stats, median_or_none
    from neuromf.eval.metrics import find_generated_pairs, load_generated_pair, voxel_spacing

    cond = load_conditional_model(adapter, device)
    rows = []
    for sample_id, flair, mask_path in find_generated_pairs(Path(generated_dir)):
        sidecar = Path(generated_dir) / f"{sample_id}.json"
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if meta.get("mode") != "conditional" or "seed" not in meta or "index" not in meta:
            continue
        image, mask, affine = load_generated_pair(flair, mask_path)
        noise = pair_noise(cond.meta.latent_shape, int(meta["seed"]), int(meta["index"]))
        control = cond.generate(np.zeros(mask.shape, dtype=np.uint8), noise, int(meta.get("steps", 1)),
                                meta.get("sampler", "meanflow"))  # an empty mask: guidance changes nothing
        spacing = voxel_spacing(affine)
        with_mask = lesion_stats(image, mask, spacing).contrast
        empty = lesion_stats(control, mask, spacing).contrast
        rows.append({"id": sample_id, "contrast": with_mask, "contrast_empty_mask": empty,
                     "gain": None if with_mask is None or empty is None else with_mask - empty})
    gains = [r["gain"] for r in rows if r["gain"] is not None]
    return {"n": len(rows), "median_contrast": median_or_none([r["contrast"] for r in rows]),
            "median_contrast_empty_mask": median_or_none([r["contrast_empty_mask"] for r in rows]),
            "median_gain": median_or_none(gains), "min_gain": min(gains) if gains else None, "samples": rows,
            "definition": "FLAIR contrast in each pair's mask region, as generated and from the same noise with "
                          "an empty mask; gain = the difference"}


def generate_conditional_pairs(adapter: str | Path = "embedded", n: int = 4, steps: int = 1, seed: int = 0,
                               device: str = "auto", masks: list[np.ndarray] | None = None,
                               affines: list[np.ndarray] | None = None,
                               on_pair: Callable[[int], None] | None = None,
                               method: str = "meanflow", guidance: float | None = None,
                               on_step: Callable[[int, int], None] | None = None,
                               stop: Event | None = None, texture: bool = True) -> Iterator[GeneratedPair]:
    """FLAIRs for given masks on the model grid (each with its grid affine), or for `n` masks drawn from the
    adapter's prior (model-grid affine centred on the origin).

    A prior-drawn lesion is placed in the brain its noise generates: a first pass without a lesion (the ControlNet
    learned "no lesion in, no hyperintensity out" from the healthy cases) gives that brain, the lesion goes to a
    real lesion's depth in it, and a pass from the same noise generates the FLAIR carrying it. A large lesion can
    reshape the generated brain; when it then no longer sits at a real depth there, it is placed again in that
    brain (up to `PLACEMENT_ROUNDS` passes). Sample i uses noise seeded by (seed, i) and, from the prior, mask
    draws (seed, i): reproducible one by one.

    Args:
        adapter: a conditional adapter folder, "embedded" (the shipped 2 mm one) or "embedded-3mm".
        n: number of prior-drawn masks; ignored when `masks` is given.
        steps: sampler steps (1 = one-step MeanFlow).
        seed: noise and mask-draw seed.
        device: "auto", "cpu", "cuda" or "cuda:N".
        masks: (H, W, D) masks already on the model grid (`neuromf.io.nifti.preprocess_mask`), nonzero = lesion.
        affines: (4, 4) voxel -> world affine per given mask (as `preprocess_mask` gives it); default: model grid's.
        on_pair: called with i once pair i is generated, before it is yielded (progress).
        method: sampler, "meanflow" or "euler" (`neuromf.meanflow.sample`).
        guidance: mask guidance scale (`guided_velocity`; 1 = none; None = the adapter's `AdapterMeta.guidance`).
        on_step: called with (i, steps) after each network step of every sampling pass (a prior-drawn lesion takes
            two passes or more: the lesion-free brain, then the FLAIR for the placed lesion).
        stop: when set, `neuromf.meanflow.SamplingStopped` is raised before the next network step.
        texture: add the VAE's scanner texture to each FLAIR (`neuromf.generation.images.with_texture`); off =
            the decoder's mean, smoother than any scan.
    Yields:
        `GeneratedPair`s: image (H, W, D) float32 in [0, clip_max], mask (H, W, D) uint8 {0, 1}, (4, 4) affine, and
        meta (seed, steps, sampler, guidance, adapter, `mask_source` "given" or "prior", placement for prior
        masks).
    """
    cond = load_conditional_model(adapter, device)
    guidance = cond.meta.guidance_scale(guidance)
    prep = cond.prep
    default_affine = model_grid_affine(prep.shape, prep.spacing)
    source = str(resolve_adapter_dir(adapter, "conditional"))
    count = len(masks) if masks is not None else n
    for i in range(count):
        noise = pair_noise(cond.meta.latent_shape, seed, i)
        placement = {}
        if masks is not None:
            mask, origin = (np.asarray(masks[i]) > 0).astype(np.uint8), "given"
            image = cond.generate(mask, noise, steps, method, guidance, on_step, stop)
        else:
            origin = "prior"
            mask, image, placement = _place_and_generate(cond, noise, steps, np.random.default_rng([seed, i]),
                                                          method, guidance, on_step, stop)
        if on_pair is not None:
            on_pair(i)
        affine = affines[i] if affines is not None else default_affine
        image, texture_meta = with_texture(image, cond.vae, seed, i, texture)
        yield GeneratedPair(i, image, mask, affine,
                              {"index": i, "seed": seed, "steps": steps, "sampler": method, "guidance": guidance,
                               "adapter": source, "mode": "conditional",
                               "mask_source": origin, **placement, **texture_meta})


def write_conditional_pairs(adapter: str | Path, out_dir: Path, n: int, steps: int = 1, seed: int = 0,
                            device: str = "auto", masks: list[np.ndarray] | None = None,
                            affines: list[np.ndarray] | None = None, method: str = "meanflow",
                            guidance: float | None = None,
                            on_step: Callable[[int, int], None] | None = None, texture: bool = True) -> list[Path]:
    """Conditional pairs written by `neuromf.generation.images.write_pairs`, as joint generation writes them.

    Args:
        adapter, n, steps, seed, device, masks, affines, method, guidance, on_step, texture: as for
            `generate_conditional_pairs`.
        out_dir: output folder.
    Returns:
        The written paths: FLAIR, mask and JSON per pair.
    """
    return write_pairs(generate_conditional_pairs(adapter, n, steps, seed, device, masks, affines,
                                                  method=method, guidance=guidance, on_step=on_step,
                                                  texture=texture), out_dir)
