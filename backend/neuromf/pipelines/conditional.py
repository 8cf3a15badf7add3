"""Conditional mode, mask -> FLAIR: a ControlNet on the frozen MeanFlow UNet, trained on FCD + healthy cases.

Beyond the spec (which generates mask channels jointly): the lesion mask is a clean input, so generated lesions
are lesion-shaped by construction, and training only has to make the FLAIR show them. The loss covers the image
latents with a strong lesion weight; healthy cases enter with empty masks. Masks for generation come from the
user (a painted Labels layer, a case's mask, `--mask FILE`) or from the `MaskPrior` of the training lesions.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from threading import Event
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from neuromf.config import RunConfig
from neuromf.data.augment import AffineAugment
from neuromf.data.brain import brain_mask
from neuromf.data.fcd_dataset import FCDDataset, item_parts
from neuromf.data.latents import encoding_events
from neuromf.data.mask_codec import lesion_region, pixel_shuffle_3d
from neuromf.data.mask_prior import PRIOR, MaskPrior
from neuromf.generate import GeneratedPair, model_grid_affine, vae_for, write_pairs
from neuromf.io.nifti import Preprocessing
from neuromf.meanflow import sample
from neuromf.meanflow.loss import MeanFlowLoss, VelocityFn
from neuromf.models.adapter_meta import (
    ADAPTER_DIR,
    CONTROLNET_WEIGHTS,
    SIDECAR,
    AdapterMeta,
    adapter_meta,
    base_reference,
    check_base_agrees,
    data_reference,
    is_conditional_adapter,
    resolve_adapter_dir,
)
from neuromf.models.controlnet import ConditionedFlowModel, MeanFlowControlNet, controlnet_from_unet
from neuromf.models.flow_model import load_flow_model
from neuromf.train.distributed import device_for, main_first
from neuromf.train.loop import LossFn, TrainEvent, TrainResult, TrainTask, fixed_draw_evaluator, train
from neuromf.train.run_dir import in_run_dir
from neuromf.utils import atomic_write, default_cache_dir, resolve_device
from neuromf.vae import DOWNSAMPLE, MAISIVAEWrapper
from neuromf.weights import WeightFileError, shipped_file


def stage2_preprocessing(base_meta: dict[str, Any], cfg: RunConfig) -> Preprocessing:
    """The base model's grid (shape, spacing, percentiles: its latents' layout) with stage 2's own intensity bound
    `data.clip_max`: FCD lesions are brighter than the 99.5th percentile, and a base model trained on clipped
    healthy scans would otherwise clip every lesion it is fine-tuned on.

    Stage 2 always works on the base model's grid and VAE: `data.shape`, `data.spacing` or `model.vae` set to
    something else (not left at their defaults) are ignored with a warning that names them.
    """
    prep = dataclasses.replace(Preprocessing.from_dict(base_meta["preprocessing"]), clip_max=cfg.data.clip_max)
    defaults = RunConfig()
    ignored = []
    for key, asked, default, used in (
            ("data.shape", tuple(cfg.data.shape), tuple(defaults.data.shape), prep.shape),
            ("data.spacing", tuple(map(float, cfg.data.spacing)), tuple(defaults.data.spacing), prep.spacing),
            ("model.vae", cfg.model.vae, defaults.model.vae, base_meta.get("vae"))):
        if asked != default and asked != used and not (key == "model.vae" and _same_path(asked, used)):
            ignored.append(f"{key}={list(asked) if isinstance(asked, tuple) else asked} (the base model's: "
                           f"{list(used) if isinstance(used, tuple) else used})")
    if ignored:
        warnings.warn("stage 2 uses the base model's grid and VAE; ignored: " + "; ".join(ignored), stacklevel=2)
    return prep


def _same_path(a: str, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(str(b)).resolve()
    except (OSError, RuntimeError):
        return False


def packed_lesion_loss(loss: MeanFlowLoss, n_model_channels: int, conditional: bool,
                       dilate: int = 1) -> LossFn:
    """The stage-2 loss on packed batches (N, C + 64, h, w, d): model channels, then the full-resolution mask
    pixel-unshuffled (`FCDDataset.packed`). The mask gives the lesion region the loss weighs, and in the
    conditional mode it is also the ControlNet's input."""

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch[:, :n_model_channels]
        mask = pixel_shuffle_3d(batch[:, n_model_channels:], DOWNSAMPLE)
        return loss(model, x, generator, lesion=lesion_region(mask, dilate), cond=mask if conditional else None)

    return loss_fn


@in_run_dir
def train_conditional(cfg: RunConfig, base_checkpoint: str | Path = "embedded", resume: bool = False,
                      overwrite: bool = False, stop: Event | None = None,
                      progress: bool = True) -> Generator[TrainEvent, None, TrainResult]:
    """Train a ControlNet (the UNet stays frozen) on FCD + healthy image latents conditioned on their masks.

    Exports `<output_dir>/adapter`: the ControlNet weights, a mask prior of the training lesions and a sidecar.
    """
    out_dir = Path(cfg.training.output_dir)
    torch.manual_seed(cfg.training.seed)
    base, base_meta = load_flow_model(base_checkpoint, preset=cfg.model.preset)
    if base.in_channels != 4:
        raise ValueError(f"{base_checkpoint}: the conditional mode starts from an image-only (4-channel) model, "
                         f"got {base.in_channels} channels")
    controlnet = controlnet_from_unet(base, cfg.conditional.embedding_channels)
    if cfg.conditional.init_from:
        load_controlnet_weights(controlnet, resolve_adapter_dir(cfg.conditional.init_from, "conditional"))
    model = ConditionedFlowModel(base, controlnet)
    vae = vae_for(base_meta, device=device_for(cfg.training.device))  # encode (and preview) where it trains
    prep = stage2_preprocessing(base_meta, cfg)
    with main_first():  # several processes: rank 0 fills the latent cache, then the others read it
        dataset = conditional_dataset(cfg, vae, prep, progress, encode=False)
        yield from encoding_events(dataset.encode_cases())  # an "encoding" event per case
    images = dataset.image_latents()
    data = dataset.packed(images)
    prior = build_mask_prior(dataset)
    sidecar = AdapterMeta(
        mode="conditional", **base_reference(base_checkpoint, base_meta), preprocessing=prep.key(),
        latent_shape=list(images.shape[1:]), channels={"image": 4, "mask": 0}, config=cfg.to_dict(),
        data_dir=data_reference(cfg.data.data_dir, dataset.root), train_cases=[case_id for case_id, _ in dataset.items],
        lesion_weight=cfg.loss.lesion_weight, trainable_params=sum(p.numel() for p in controlnet.parameters()),
        total_params=sum(p.numel() for p in model.parameters()), controlnet=controlnet.arch,
        n_healthy=dataset.n_healthy)
    loss_fn = packed_lesion_loss(MeanFlowLoss.from_config(cfg.loss, 4, 0), 4, conditional=True,
                                 dilate=cfg.loss.lesion_dilate)
    preview_mask = torch.from_numpy(prior.sample(np.random.default_rng(cfg.training.seed))).float()[None, None]
    preview_noise = torch.randn((1, *images.shape[1:]), generator=torch.Generator().manual_seed(cfg.training.seed))

    def export(m: ConditionedFlowModel, directory: Path) -> Path:
        return save_conditional_adapter(m.controlnet, prior, directory / ADAPTER_DIR, sidecar)

    def preview(m: ConditionedFlowModel) -> list[tuple[np.ndarray, np.ndarray]]:
        device = next(m.parameters()).device
        z = sample(functools.partial(m, cond=preview_mask.to(device)), preview_noise.to(device), steps=1)
        image = vae.decode(z)[0, 0].clamp(0, prep.clip_max).cpu().numpy()
        return [(image, preview_mask[0, 0].numpy().astype(np.uint8))]

    task = TrainTask(model=model, loss_fn=loss_fn, export=export, preview=preview,
                     evaluate=fixed_draw_evaluator(loss_fn, _lesion_first(data)),
                     meta={"kind": "conditional", "base_checkpoint": str(base_checkpoint)})
    return (yield from train(task, data, cfg.training, out_dir, stop=stop, resume=resume))


def conditional_dataset(cfg: RunConfig, vae: MAISIVAEWrapper, prep: Preprocessing,
                        progress: bool = False, encode: bool = True) -> FCDDataset:
    """The conditional mode's training set: FCD cases with their masks (+ healthy cases with empty masks);
    `encode=False` leaves the encoding to `FCDDataset.encode_cases`."""
    return FCDDataset(cfg.data.data_dir, "downsample", vae=vae, prep=prep,
                      cache_dir=cfg.data.cache_dir or default_cache_dir(), flip=cfg.data.flip, split=cfg.data.split,
                      progress=progress, include_healthy=cfg.conditional.include_healthy, encode=encode,
                      augment=AffineAugment.from_config(cfg.data))


@torch.no_grad()
def build_mask_prior(dataset: FCDDataset) -> MaskPrior:
    """The prior of a training set: its lesions, each with the depth range measured in its own preprocessed FLAIR
    (as the lesion-likeness check measures real lesions), and the mean of those FLAIRs as reference brain."""
    # the cases as scanned: moved copies would only repeat each lesion (and cost a preprocessing each)
    with_lesion = [(item_id, t) for item_id, t in dataset.items if t["mask"].any() and not item_parts(item_id)[2]]
    masks = [t["mask"][0].numpy() for _, t in with_lesion]
    images = [dataset.image_volume(item_id)[0].numpy() for item_id, _ in with_lesion]
    return MaskPrior.from_cases(masks, images, dataset.prep.spacing)


def rebuild_mask_prior(adapter: str | Path) -> Path:
    """Re-make an adapter's mask prior from its own training data and settings (after the prior's code changed)."""
    from neuromf.config import config_from_dict

    directory = resolve_adapter_dir(adapter, "conditional")
    meta = adapter_meta(directory, "conditional")
    cfg = config_from_dict(meta.config, source=str(directory / SIDECAR))
    _, base_meta = load_flow_model(meta.base_checkpoint)
    vae, prep = vae_for(base_meta), meta.prep
    return build_mask_prior(conditional_dataset(cfg, vae, prep)).save(directory / PRIOR)


def _lesion_first(packed: torch.Tensor) -> torch.Tensor:
    """Samples with a lesion first, so the fixed evaluation draw measures the lesion part too."""
    has_lesion = packed[:, 4:].flatten(1).amax(1) > 0
    return torch.cat([packed[has_lesion], packed[~has_lesion]])


def save_conditional_adapter(controlnet: MeanFlowControlNet, prior: MaskPrior, directory: Path,
                             meta: AdapterMeta) -> Path:
    """ControlNet weights (safetensors) + mask prior + sidecar, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in controlnet.state_dict().items()}
    atomic_write(directory / CONTROLNET_WEIGHTS, lambda p: save_file(state, str(p)))
    prior.save(directory / PRIOR)
    meta.save(directory)
    return directory


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


def guided_velocity(model: ConditionedFlowModel, cond: torch.Tensor, guidance: float = 1.0) -> VelocityFn:
    """u(z, r, t | mask) with mask guidance: u_empty + s (u_mask - u_empty), u_empty = the same model given an empty
    mask (what it learned from the healthy cases), s = `guidance`.

    Classifier-free guidance with the empty mask as the unconditional branch: s > 1 extrapolates along what the mask
    changes, so a lesion the trained model renders too faintly (a small one on a coarse grid) comes out brighter,
    at the price of a second model call per step. s = 1 is the conditioned model itself (one call).
    """
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if guidance == 1.0:
        return functools.partial(model, cond=cond)
    empty = torch.zeros_like(cond)

    def velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u_empty = model(z, r, t, cond=empty)
        return u_empty + guidance * (model(z, r, t, cond=cond) - u_empty)

    return velocity


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


def load_controlnet_weights(controlnet: MeanFlowControlNet, directory: Path) -> MeanFlowControlNet:
    """Load an adapter folder's ControlNet weights into `controlnet` (same architecture); returns it."""
    weights = shipped_file(directory / CONTROLNET_WEIGHTS)  # a shipped ControlNet: its sha256 checked
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise ValueError(f"{directory / CONTROLNET_WEIGHTS}: not a readable safetensors file ({err})") from err
    missing, unexpected = controlnet.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory / CONTROLNET_WEIGHTS}: weights do not fit the ControlNet "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return controlnet


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
                               stop: Event | None = None) -> Iterator[GeneratedPair]:
    """FLAIRs for given masks on the model grid (each with its grid affine), or for `n` masks drawn from the
    adapter's prior (model-grid affine centred on the origin).

    A prior-drawn lesion is placed in the brain its noise generates: a first pass without a lesion (the ControlNet
    learned "no lesion in, no hyperintensity out" from the healthy cases) gives that brain, the lesion goes to a
    real lesion's depth in it, and a pass from the same noise generates the FLAIR carrying it. A large lesion can
    reshape the generated brain; when it then no longer sits at a real depth there, it is placed again in that
    brain (up to `PLACEMENT_ROUNDS` passes). Sample i uses noise seeded by (seed, i) and, from the prior, mask
    draws (seed, i): reproducible one by one.

    Args:
        adapter: a conditional adapter folder or "embedded" (the shipped demo).
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
        yield GeneratedPair(i, image, mask, affine,
                              {"index": i, "seed": seed, "steps": steps, "sampler": method, "guidance": guidance,
                               "adapter": source, "mode": "conditional",
                               "mask_source": origin, **placement})


def write_conditional_pairs(adapter: str | Path, out_dir: Path, n: int, steps: int = 1, seed: int = 0,
                            device: str = "auto", masks: list[np.ndarray] | None = None,
                            affines: list[np.ndarray] | None = None, method: str = "meanflow",
                            guidance: float | None = None,
                            on_step: Callable[[int, int], None] | None = None) -> list[Path]:
    """Conditional pairs written by `neuromf.generate.write_pairs`, as joint generation writes them.

    Args:
        adapter, n, steps, seed, device, masks, affines, method, guidance, on_step: as for
            `generate_conditional_pairs`.
        out_dir: output folder.
    Returns:
        The written paths: FLAIR, mask and JSON per pair.
    """
    return write_pairs(generate_conditional_pairs(adapter, n, steps, seed, device, masks, affines,
                                                  method=method, guidance=guidance, on_step=on_step), out_dir)


__all__ = ["ConditionalModel", "generate_conditional_pairs", "is_conditional_adapter",
           "load_conditional_model", "packed_lesion_loss", "train_conditional",
           "write_conditional_pairs"]
