"""Inpainting mode: a lesion put into a real healthy scan, the rest of the scan kept exactly.

    inpaint_lesion(image, mask=None, adapter="embedded", affine=None, seed=0, steps=8, guidance=None,
                   margin_mm=6.0, on_step=None, stop=None, method="meanflow", composite="residual",
                   device="cpu", allow_existing_lesion=False, mask_source="prior", joint=None) -> InpaintResult

`image` / `mask`: a NIfTI path or a numpy array (arrays need `affine`, the (4, 4) voxel -> world matrix; a mask
array may also share the image's grid and affine). Without a mask, one is drawn at a real lesion's depth and site in
this scan's brain: from the adapter's prior of real lesions (`mask_source="prior"`: a training lesion re-placed), or
by a joint adapter (`mask_source="joint"`: a new shape the joint model draws, see `draw_joint_mask`).
`on_step(i, n)` is called after each of the n network calls (the joint model's steps first, when it draws the
mask); `stop` (a threading.Event) is checked before each one and raises `InpaintCancelled`.
`InpaintResult`: `.image` (the input's grid and dtype), `.mask` (uint8, input grid), `.affine` (the input's),
`.info` (seed, steps, margin_mm, lesion volume cm^3, contrast, adapter, seconds, ...).

Method (latent inpainting with the conditional model, RePaint-style along the straight flow path): the scan is
mapped onto the model grid with its own percentile normalisation and encoded by the VAE (x). Sampling starts from
noise eps and, after every step to time t, the latent voxels away from the lesion's dilated footprint are reset
to the scan's own path (1 - t) x + t eps, so the ControlNet (given the lesion mask) generates only the lesion's
neighbourhood, in the context of the real brain around it. The decoded change (generated minus the VAE's
reconstruction of the scan: `composite="residual"`, which keeps the scan's own texture; or the generated
intensities themselves, `"replace"`) is mapped back to scanner units with the scan's normalisation, resampled onto
the scan's own grid, and blended in with a weight that is 1 up to half the margin from the lesion and falls
smoothly to 0 at `margin_mm`: every voxel farther than `margin_mm` from the lesion keeps its stored value exactly.
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from neuromf.data.brain import brain_mask, depth_map
from neuromf.eval.lesion_metrics import lesion_contrast
from neuromf.generation.conditional import ConditionalModel, load_conditional_model
from neuromf.generation.guidance import guided_velocity
from neuromf.generation.joint import MASK_DRAWS, derived_seed, sample_joint
from neuromf.io.nifti import VolumeError, image_window, read_nifti, save_nifti
from neuromf.meanflow.samplers import SamplingStopped
from neuromf.models.adapter_meta import resolve_adapter_dir
from neuromf.models.joint import JointModel, load_joint_model
from neuromf.utils import atomic_write, atomic_write_json
from neuromf.vae import DOWNSAMPLE

MIN_INSIDE_BRAIN = 0.5  # a painted cortical lesion may touch CSF; a mask mostly outside the brain is a mistake
AFFINE_TOLERANCE_MM = 1e-3  # as `preprocess_pair`: a mask array on the image's grid must carry the same affine
COMPOSITES = ("residual", "replace")
MASK_SOURCES = ("prior", "joint")


class InpaintCancelled(RuntimeError):
    """Raised when the `stop` event of `inpaint_lesion` is set: the inpainting was abandoned before a network
    call; nothing was returned or written."""


@dataclass
class Scan:
    """A scan as stored: its values in its own dtype (exactly, for the voxels inpainting keeps), affine, header."""

    data: np.ndarray
    affine: np.ndarray
    source: str
    header: nib.Nifti1Header | None = None


@dataclass
class InpaintResult:
    """A scan with an inpainted lesion, on the input's grid: the input's own values outside the margin."""

    image: np.ndarray  # the input's shape and dtype
    mask: np.ndarray  # uint8 {0, 1}, the input's grid
    affine: np.ndarray  # (4, 4), the input's
    info: dict[str, Any] = field(default_factory=dict)
    header: nib.Nifti1Header | None = None  # the input file's header (dtype, qform/sform codes) when it was a file


def load_scan(image: str | Path | np.ndarray, affine: np.ndarray | None = None) -> Scan:
    """A FLAIR path or array as a `Scan`: a file's stored values (no scaling applied when its header has none, so
    kept voxels stay byte-identical on writing), or an array with its `affine`."""
    if isinstance(image, (str, Path)):
        read_nifti(image)  # the project's errors for missing, unreadable, non-3D or non-finite scans
        img = nib.load(str(image))
        slope, inter = img.dataobj.slope, img.dataobj.inter
        data = np.asanyarray(img.dataobj)
        if not (slope == 1 and inter == 0):  # scaled storage: keep the float values (exact in value, not bytes)
            data = data.astype(np.float32)
        data = data.reshape(data.shape[:3])
        header = img.header.copy()
        header.set_data_dtype(data.dtype)
        return Scan(data, img.affine.astype(np.float64), str(image), header)
    if affine is None:
        raise ValueError("inpaint: an image array needs its (4, 4) voxel -> world `affine`")
    data = np.asarray(image)
    if data.ndim != 3 or not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise VolumeError(f"<image array>: expected a finite 3D numeric volume, got shape {data.shape} "
                          f"({data.dtype})")
    return Scan(data, _affine(affine, "<image array>"), "<image array>")


def _affine(affine: Any, source: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{source}: not a valid (4, 4) voxel -> world affine")
    return affine


NOT_LESION_MASKS = ("brain", "skull", "head")  # masks that often sit beside a healthy FLAIR: brain extraction


def existing_lesion_masks(path: str | Path) -> list[Path]:
    """Lesion masks stored beside a FLAIR file (the same subject's `*_roi`, `*lesion*` or `*mask*` siblings): a scan
    that has one is a patient's, not the healthy scan a lesion is put into (even when that mask is the one to
    inpaint: its lesion is there already). Brain and head masks (`*brain*mask*`, `*skull*`, `*head*`) are not."""
    path = Path(path)
    subject = path.name.split(".nii")[0].split("_")[0]
    found = []
    for sibling in sorted(path.parent.glob(f"{subject}*.nii*")):
        rest = sibling.name.lower()[len(subject):]  # the subject's own name may hold "mask"
        if sibling == path or any(word in rest for word in NOT_LESION_MASKS):
            continue
        if "_roi" in rest or "lesion" in rest or "mask" in rest:
            found.append(sibling)
    return found


def resample_nearest(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                     target_affine: np.ndarray) -> np.ndarray:
    """A label volume moved onto another voxel grid by nearest neighbour through both affines (world coordinates),
    computed only over the target voxels its nonzero part can reach; zero elsewhere."""
    data = np.asarray(data)
    out = np.zeros(tuple(shape), dtype=data.dtype)
    nonzero = np.argwhere(data != 0)
    if not len(nonzero):
        return out
    to_target = np.linalg.inv(target_affine) @ affine
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    lo, hi = nonzero.min(0) - 0.5, nonzero.max(0) + 0.5
    box = lo + corners * (hi - lo)
    mapped = box @ to_target[:3, :3].T + to_target[:3, 3]
    start = np.clip(np.floor(mapped.min(0)).astype(int) - 1, 0, shape)
    stop = np.clip(np.ceil(mapped.max(0)).astype(int) + 2, 0, shape)
    if np.any(stop <= start):
        return out
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(start, stop)], indexing="ij"), -1)
    from_target = np.linalg.inv(to_target)
    source = grid.reshape(-1, 3) @ from_target[:3, :3].T + from_target[:3, 3]
    values = ndimage.map_coordinates(data, source.T, order=0, mode="constant", cval=0)
    out[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = values.reshape(grid.shape[:3])
    return out


def _mask_on_scan(mask: str | Path | np.ndarray, affine: np.ndarray | None, scan: Scan) -> tuple[np.ndarray, str]:
    """A user's lesion mask on the scan's grid (nearest resampling when it comes on another grid); an array without
    its own `affine` must be on the scan's grid."""
    if isinstance(mask, (str, Path)):
        from neuromf.io.bids import load_mask_array

        source = str(mask)
        _, mask_affine = read_nifti(mask, role="mask")
        data = load_mask_array(Path(mask))
    else:
        source = "<mask array>"
        data = np.asarray(mask)
        if data.ndim != 3:
            raise VolumeError(f"{source}: expected a 3D mask, got shape {data.shape}")
        if affine is None and data.shape != scan.data.shape:
            raise VolumeError(f"{source}: mask shape {data.shape} differs from the scan's {scan.data.shape} and no "
                              "mask affine was given")
        mask_affine = scan.affine if affine is None else _affine(affine, source)
    binary = (np.asarray(data) > 0.5).astype(np.uint8)
    if not binary.any():
        raise VolumeError(f"{source}: the lesion mask is empty")
    same_grid = binary.shape == scan.data.shape and np.max(np.abs(mask_affine - scan.affine)) <= AFFINE_TOLERANCE_MM
    if same_grid:
        return binary, source
    on_scan = resample_nearest(binary, mask_affine, scan.data.shape, scan.affine)
    kept = on_scan.sum() * abs(np.linalg.det(scan.affine[:3, :3]))
    given = binary.sum() * abs(np.linalg.det(mask_affine[:3, :3]))
    if kept < 0.5 * given:
        raise VolumeError(f"{source}: the mask's grid and affine do not overlap the scan {scan.source} (only "
                          f"{kept / 1000:.3g} of {given / 1000:.3g} cm^3 of the lesion fall inside it): not a mask "
                          "of this scan")
    return on_scan, source


def lesion_footprint(mask: torch.Tensor, dilate: int) -> torch.Tensor:
    """The latent voxels a (1, 1, H, W, D) mask touches (4x max-pooled), grown by `dilate` latent voxels: the
    region the model generates; the rest of the latent follows the scan."""
    footprint = F.max_pool3d(mask, DOWNSAMPLE)
    if dilate > 0:
        footprint = F.max_pool3d(footprint, 2 * dilate + 1, stride=1, padding=dilate)
    return footprint


def feather_weights(distance_mm: np.ndarray, margin_mm: float) -> np.ndarray:
    """Blend weight from the distance (mm) to the lesion: 1 up to half the margin, a cosine ramp to 0 at the
    margin, 0 beyond (those voxels keep the scan's values)."""
    inner = margin_mm / 2
    ramp = np.clip((distance_mm - inner) / max(margin_mm - inner, 1e-6), 0.0, 1.0)
    return np.where(distance_mm <= margin_mm, 0.5 * (1 + np.cos(np.pi * ramp)), 0.0)


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _network_calls(cond: ConditionalModel, on_step: Callable[[int, int], None] | None, stop: Event | None,
                   total: int) -> Any:
    """The conditioned model with a cancel check before and a progress call after each network call."""
    count = 0

    def model(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        nonlocal count
        if stop is not None and stop.is_set():
            raise InpaintCancelled(f"inpainting cancelled after {count} of {total} network calls")
        out = cond_model(z, r, t, cond=cond)
        count += 1
        if on_step is not None:
            on_step(count, total)
        return out

    cond_model = cond.model
    return model


@torch.no_grad()
def inpaint_latent(cond: ConditionalModel, x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, steps: int,
                   method: str, guidance: float, dilate: int, velocity_model: Any = None) -> torch.Tensor:
    """Latent inpainting: sample with the conditioned model for `mask`, resetting the latent voxels outside the
    lesion's footprint to the scan's straight path (1 - t) x + t eps after every step (RePaint along the flow).

    Args:
        cond: the conditional model.
        x: (1, 4, h, w, d) scaled latent of the scan.
        mask: (1, 1, H, W, D) lesion mask on the model grid.
        noise: (1, 4, h, w, d) eps, the state at t = 1 everywhere.
        steps: sampler steps from t = 1 to 0.
        method: "meanflow" (u(z, r=t_next, t)) or "euler" (u(z, t, t)).
        guidance: mask guidance scale (`guided_velocity`).
        dilate: latent voxels the footprint grows by (`lesion_footprint`).
        velocity_model: the model to call (default `cond.model`; `_network_calls` wraps it for progress).
    Returns:
        (1, 4, h, w, d) latent at t = 0: generated in the footprint, the scan's own outside it.
    """
    if method not in ("meanflow", "euler"):
        raise ValueError(f"unknown sampler {method!r}; choose 'meanflow' or 'euler'")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    velocity = guided_velocity(velocity_model or cond.model, mask, guidance)
    generate = lesion_footprint(mask, dilate)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    z = noise
    for t, t_next in zip(times[:-1], times[1:]):
        tt = torch.full((1,), t, device=z.device)
        rr = torch.full((1,), t_next if method == "meanflow" else t, device=z.device)
        z = z - (t - t_next) * velocity(z, rr, tt)
        z = generate * z + (1 - generate) * ((1 - t_next) * x + t_next * noise)
    return z


def draw_joint_mask(joint: JointModel, brain: np.ndarray, seed: int, steps: int = 32, guidance: float | None = None,
                    on_step: Callable[[int, int], None] | None = None,
                    stop: Event | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """A lesion mask drawn by a joint adapter (Euler, masks only) for the brain it goes into, on the model grid.

    A site-conditioned adapter is given a site where its prior would centre a lesion in *this* brain (real depth, near
    a real site: `MaskPrior.draw_centre`), so the new shape grows where a lesion belongs in the scan rather than in
    the brain the joint model imagines; an adapter without sites draws where it learned to. A mask that comes out
    empty or mostly outside the brain is drawn again from fresh noise (at most `MASK_DRAWS` draws).

    Args:
        joint: the loaded joint adapter (its grid must be the conditional adapter's).
        brain: (H, W, D) bool brain of the scan on the model grid.
        seed: noise and site seed; draw k > 0 uses the seeds derived from (seed, k).
        steps: Euler steps of the joint model (x-prediction adapters: 32 is the shipped 2 mm card's setting).
        guidance: joint guidance against the empty mask's path; None = the adapter's own.
        on_step, stop: per network step progress and cancel (`InpaintCancelled`).
    Returns:
        ((H, W, D) uint8 mask, {"joint_steps", "joint_guidance", "joint_seed", "joint_draws", "site_voxel"}).
    Raises:
        VolumeError: no site at the real lesions' depth in this brain, or every draw empty / outside the brain.
    """
    guidance = joint.meta.guidance_scale(guidance)
    device = next(joint.model.parameters()).device
    for draw in range(MASK_DRAWS):
        draw_seed = seed if draw == 0 else derived_seed(seed, draw)
        sites = None
        if joint.prior is not None:
            centres = joint.prior.candidate_centres(brain, depth_map(brain, joint.prior.spacing))
            if not len(centres):
                raise VolumeError("the scan's brain has no voxel at the real lesions' depth and sites for the joint "
                                  "model's lesion")
            sites = joint.prior.draw_centre(np.random.default_rng([draw_seed, 1]), centres, brain)[None]
        try:
            _, z, _ = next(iter(sample_joint(joint, 1, steps, draw_seed, device, "euler", guidance, sites, on_step,
                                             stop)))
        except SamplingStopped as err:
            raise InpaintCancelled(f"inpainting cancelled while the joint model drew the mask ({err})") from err
        mask = joint.mask(z.to(device))[0, 0].numpy().astype(np.uint8)
        if mask.any() and float((mask.astype(bool) & brain).sum()) >= MIN_INSIDE_BRAIN * float(mask.sum()):
            return mask, {"joint_steps": steps, "joint_guidance": guidance, "joint_seed": draw_seed,
                          "joint_draws": draw + 1, "site_voxel": None if sites is None else [int(v) for v in sites[0]]}
    raise VolumeError(f"the joint model drew no lesion inside this brain in {MASK_DRAWS} draws (seed {seed})")


def network_calls_per_run(steps: int, guidance: float) -> int:
    """Network calls of one inpainting: one per step, two with mask guidance (s != 1)."""
    return steps * (1 if guidance == 1.0 else 2)


def inpaint_lesion(image: str | Path | np.ndarray, mask: str | Path | np.ndarray | None = None,
                   adapter: str | Path | ConditionalModel = "embedded", affine: np.ndarray | None = None,
                   seed: int = 0, steps: int = 8, guidance: float | None = None, margin_mm: float = 6.0,
                   on_step: Callable[[int, int], None] | None = None, stop: Event | None = None,
                   method: str = "meanflow", composite: str = "residual", device: str = "cpu",
                   allow_existing_lesion: bool = False, mask_affine: np.ndarray | None = None,
                   mask_source: str = "prior", joint: str | Path | JointModel | None = None, joint_steps: int = 32,
                   joint_guidance: float | None = None) -> InpaintResult:
    """A lesion inpainted into a healthy FLAIR with the conditional model; voxels farther than `margin_mm` from the
    lesion keep the input's values exactly (see the module docstring for the method).

    Args:
        image: the healthy FLAIR: a NIfTI path, or a 3D array with `affine`.
        mask: the lesion: a NIfTI path (any grid with a valid affine; resampled nearest onto the scan's), a 3D array
            on the scan's grid (or on another grid given by `mask_affine`); None = drawn (`mask_source`) at a real
            lesion's depth and site in this scan's brain.
        adapter: a conditional adapter folder, "embedded" (2 mm, default) or "embedded-3mm", or a loaded one.
        affine: (4, 4) voxel -> world affine of an image array.
        seed: noise (and prior draw) seed.
        steps: sampler steps; `method` "meanflow" or "euler".
        guidance: mask guidance scale; None = the adapter's own for inpainting (`AdapterMeta.inpaint_guidance_scale`:
            its sidecar's `inpaint_guidance`, else its `guidance`).
        margin_mm: voxels farther than this from the lesion are the input's exactly; inside, a feathered blend.
        on_step: called as on_step(i, n) after network call i of n (progress).
        stop: checked before each network call; when set, `InpaintCancelled` is raised.
        composite: "residual" (the scan + the generated change) or "replace" (the generated intensities).
        device: "cpu", "cuda", "auto".
        allow_existing_lesion: inpaint even when a lesion mask is stored beside the scan file.
        mask_affine: (4, 4) affine of a mask array on another grid than the scan's.
        mask_source: without `mask`: "prior" (a real training lesion re-placed by the adapter's prior) or "joint"
            (a new shape drawn by the `joint` adapter, `draw_joint_mask`).
        joint: the joint adapter for `mask_source="joint"`: a folder, "embedded" (default, 2 mm) or a loaded one on
            the conditional adapter's grid.
        joint_steps, joint_guidance: the joint model's Euler steps and guidance (None = its own).
    Returns:
        `InpaintResult` on the input's grid.
    Raises:
        VolumeError: unreadable scan or mask, empty mask, a mask that misses the scan, lies outside its brain or
            beyond the model's field of view, a scan with a stored lesion mask.
        InpaintCancelled: `stop` was set.
    """
    started = time.perf_counter()
    if composite not in COMPOSITES:
        raise ValueError(f"composite must be one of {COMPOSITES}, got {composite!r}")
    if not margin_mm > 0:
        raise ValueError(f"margin_mm must be > 0, got {margin_mm}")
    if mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source must be one of {MASK_SOURCES}, got {mask_source!r}")
    if mask is not None and mask_source != "prior":
        raise ValueError("inpaint: give either a mask or mask_source='joint', not both")
    scan = load_scan(image, affine)
    if isinstance(image, (str, Path)) and not allow_existing_lesion:
        stored = existing_lesion_masks(image)
        if stored:
            raise VolumeError(f"{image}: this scan already has a lesion mask ({stored[0].name}); inpainting puts a "
                              "lesion into a healthy scan")
    cond = adapter if isinstance(adapter, ConditionalModel) else load_conditional_model(adapter, device)
    prep = cond.prep
    grid, grid_affine, _ = image_window(scan.data, scan.affine, prep)
    lo, hi = prep.bounds(grid)
    model_image = ((grid - lo) / (hi - lo)).clamp(0.0, prep.clip_max)
    brain = brain_mask(model_image[0].numpy())

    drawn: dict[str, Any] = {}
    if mask is None:
        if mask_source == "joint":
            mask_model, drawn = _joint_mask(joint, cond, brain, seed, joint_steps, joint_guidance, on_step, stop)
        else:
            mask_model = cond.prior.sample(np.random.default_rng([seed, 0]), brain=brain).astype(np.uint8)
        mask_scan = resample_nearest(mask_model, grid_affine, scan.data.shape, scan.affine)
        if not mask_scan.any():
            raise VolumeError(f"{scan.source}: the {mask_source} lesion falls between the scan's voxels")
    else:
        mask_scan, mask_source = _mask_on_scan(mask, mask_affine, scan)
        mask_model = resample_nearest(mask_scan, scan.affine, prep.shape, grid_affine)
        kept = mask_model.sum() * np.prod(prep.spacing)
        given = mask_scan.sum() * abs(np.linalg.det(scan.affine[:3, :3]))
        if kept < 0.5 * given:
            raise VolumeError(f"{mask_source}: the lesion lies outside the model's field of view ({prep.shape} voxels "
                              f"of {prep.spacing[0]:g} mm around the brain of {scan.source})")
    inside = float((mask_model.astype(bool) & brain).sum()) / float(mask_model.sum())
    if inside < MIN_INSIDE_BRAIN:
        raise VolumeError(f"{mask_source}: the lesion lies outside the brain of {scan.source} (only {inside:.0%} of "
                          f"it inside; at least {MIN_INSIDE_BRAIN:.0%} needed)")

    guidance = cond.meta.inpaint_guidance_scale(guidance)
    total = network_calls_per_run(steps, guidance)
    dev = next(cond.model.parameters()).device
    x = cond.vae.encode(model_image[None].to(dev))
    noise = torch.randn(tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed))[None].to(dev)
    cond_mask = torch.as_tensor(mask_model, dtype=torch.float32, device=dev)[None, None]
    latent_mm = DOWNSAMPLE * min(prep.spacing)
    z = inpaint_latent(cond, x, cond_mask, noise, steps, method, guidance, dilate=math.ceil(margin_mm / latent_mm),
                       velocity_model=_network_calls(cond, on_step, stop, total))
    # whole-latent decodes: the decoder's GroupNorm takes its statistics from the whole volume, and a decode of
    # the lesion's box alone changed the generated lesion by ~30% of its contrast (measured)
    generated = cond.vae.decode(z)[0, 0].clamp(0, prep.clip_max).cpu().numpy().astype(np.float64)
    if composite == "residual":
        generated -= cond.vae.decode(x)[0, 0].clamp(0, prep.clip_max).cpu().numpy()

    out = _blend(scan, mask_scan, generated, grid_affine, lo, hi, margin_mm, composite,
                 upper=lo + prep.clip_max * (hi - lo))
    spacing = _spacing(scan.affine)
    normalised = (np.asarray(out, dtype=np.float64) - lo) / (hi - lo)
    contrast = lesion_contrast(normalised, mask_scan)
    before = lesion_contrast((scan.data.astype(np.float64) - lo) / (hi - lo), mask_scan)
    info = {"mode": "inpaint", "source_image": scan.source, "mask_source": mask_source, "seed": seed,
            "steps": steps, "sampler": method, "guidance": guidance, "margin_mm": margin_mm, "composite": composite,
            "adapter": "<loaded conditional model>" if isinstance(adapter, ConditionalModel) else
            str(resolve_adapter_dir(adapter, "conditional")),
            "network_calls": total, "lesion_cm3": float(mask_scan.sum()) * float(np.prod(spacing)) / 1000.0,
            "contrast": contrast, "contrast_before": before,
            "contrast_definition": "mean FLAIR in the mask / mean in its 2-voxel ring of tissue, input grid",
            "intensity_bounds": [lo, hi], **drawn, "seconds": time.perf_counter() - started}
    return InpaintResult(out, mask_scan.astype(np.uint8), scan.affine.copy(), info, scan.header)


def _joint_mask(joint: str | Path | JointModel | None, cond: ConditionalModel, brain: np.ndarray, seed: int,
                steps: int, guidance: float | None, on_step: Callable[[int, int], None] | None,
                stop: Event | None) -> tuple[np.ndarray, dict[str, Any]]:
    """`draw_joint_mask` with the joint adapter loaded (default "embedded") and checked to share the
    conditional adapter's grid; the info names the joint adapter."""
    spec = "embedded" if joint is None else joint
    model = spec if isinstance(spec, JointModel) else load_joint_model(spec, next(cond.model.parameters()).device)
    grid, wanted = (model.meta.prep.shape, model.meta.prep.spacing), (cond.prep.shape, cond.prep.spacing)
    if tuple(map(tuple, grid)) != tuple(map(tuple, wanted)):
        raise ValueError(f"{spec}: the joint adapter's grid {grid[0]} at {grid[1]} mm is not the conditional "
                         f"adapter's {wanted[0]} at {wanted[1]} mm")
    mask, info = draw_joint_mask(model, brain, seed, steps, guidance, on_step, stop)
    name = "<loaded joint model>" if isinstance(spec, JointModel) else str(resolve_adapter_dir(spec, "joint"))
    return mask, {"joint_adapter": name, **info}


def _blend(scan: Scan, mask_scan: np.ndarray, generated: np.ndarray, grid_affine: np.ndarray, lo: float, hi: float,
           margin_mm: float, composite: str, upper: float) -> np.ndarray:
    """The scan with the generated model-grid values (normalised; a change for "residual") blended in within
    `margin_mm` of the lesion, kept within [the scan's minimum, max(its maximum, `upper`)]; every other voxel is
    copied unchanged."""
    spacing = _spacing(scan.affine)
    distance = ndimage.distance_transform_edt(mask_scan == 0, sampling=spacing)
    region = np.argwhere(distance <= margin_mm)
    to_model = np.linalg.inv(grid_affine) @ scan.affine
    coords = region @ to_model[:3, :3].T + to_model[:3, 3]
    on_grid = np.all((coords >= 0) & (coords <= np.array(generated.shape) - 1), axis=1)
    values = ndimage.map_coordinates(generated, coords.T, order=1, mode="nearest") * (hi - lo)
    weight = feather_weights(distance[tuple(region.T)], margin_mm) * on_grid
    original = scan.data[tuple(region.T)].astype(np.float64)
    if composite == "residual":
        blended = original + weight * values
    else:
        blended = (1 - weight) * original + weight * (values + lo)
    # within the scan's own range: a negative change on dark tissue went below the background once, which moved
    # the percentile normalisation of the whole output (its brain mask then covered the whole grid)
    blended = np.clip(blended, float(scan.data.min()), max(float(scan.data.max()), upper))
    out = scan.data.copy()
    changed = weight > 0
    out[tuple(region[changed].T)] = _cast(blended[changed], scan.data.dtype)
    return out


def write_inpainted(result: InpaintResult, out_dir: Path, stem: str) -> list[Path]:
    """`<stem>_flair.nii.gz` (the input's header: same dtype, affine and codes, so kept voxels are byte-identical),
    `<stem>_mask.nii.gz` (uint8, same affine) and `<stem>.json` (provenance), each written atomically."""
    base = Path(out_dir) / stem
    flair = Path(f"{base}_flair.nii.gz")
    if result.header is not None:
        img = nib.Nifti1Image(result.image, result.affine, header=result.header)
        payload = gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)
        atomic_write(flair, lambda p: p.write_bytes(payload))
    else:
        save_nifti(result.image, result.affine, flair)
    return [flair, save_nifti(result.mask, result.affine, f"{base}_mask.nii.gz", dtype=np.uint8),
            atomic_write_json(Path(f"{base}.json"), result.info)]


__all__ = ["InpaintCancelled", "InpaintResult", "draw_joint_mask", "existing_lesion_masks", "inpaint_lesion",
           "inpaint_latent",
           "load_scan", "resample_nearest", "write_inpainted"]
