"""Where the mask prior puts lesions, by the phantom generator's own rules: placements of the shipped conditional
adapter's prior in the first N healthy training scans, counted by the zone their centroid falls in (in the
phantoms' template mm: cortex, within 10 mm of the midline, deep grey matter, cerebellum; the generator centres
every FCD lesion in the cortex), for centres drawn near a random real site (`MaskPrior.centre_draw`, since round
18) and drawn uniformly among the candidate centres (the rule before). The real lesions' centroids are counted the
same way (a centre on a zone's edge can put its centroid just across). Phantom data only: the zones are the
generator's. Usage: python scripts/prior_sites.py [OUT_JSON] [N_SCANS] [DRAWS_PER_SCAN]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from neuromf.data.brain import brain_box, brain_mask, lesion_position, position_spread
from neuromf.data.embedded import resolve_data_dir
from neuromf.data.mask_prior import MaskPrior
from neuromf.data.phantom import PhantomConfig, _load_template, grid_affine
from neuromf.generation.conditional import load_conditional_model
from neuromf.io.bids import discover_cases
from neuromf.io.nifti import preprocess_pair

ZONES = ("cortex", "midline", "deep_grey", "cerebellum")
MEAN_SCALE = 0.94  # the phantoms' mean scale about the template's brain centre (`phantom._warped_tissue`)


def zone_of(voxel: np.ndarray, affine: np.ndarray, centre: np.ndarray) -> str:
    """The generator's zone of a model-grid voxel (`phantom._lesion_centre_candidates`' rules, in template mm)."""
    x, y, z = centre + (affine[:3, :3] @ voxel + affine[:3, 3] - centre) / MEAN_SCALE
    if abs(x) < 33 and -40 < y < 25 and -15 < z < 22:
        return "deep_grey"
    if y < -30 and z < -8:
        return "cerebellum"
    return "midline" if abs(x) < 10 else "cortex"


def counts(zones: list[str]) -> dict[str, int]:
    return {name: zones.count(name) for name in ZONES}


def uniform_draw(prior: MaskPrior, centres: np.ndarray, brain: np.ndarray):
    return lambda rng: centres[rng.integers(len(centres))]


def main(out: Path, n_scans: int = 16, draws: int = 12) -> None:
    cond = load_conditional_model("embedded", "cpu")
    shape, spacing = tuple(cond.prep.shape), tuple(cond.prep.spacing)
    affine = grid_affine(PhantomConfig(shape=shape, spacing=spacing))
    centre = _load_template(spacing).brain_centre
    data = resolve_data_dir("embedded")
    real = []
    for case in discover_cases(data, group="fcd"):
        mask = np.asarray(nib.load(case.mask).dataobj) > 0
        if mask.shape == shape and mask.any():  # the embedded phantoms lie on the model grid
            real.append(zone_of(np.array(ndimage.center_of_mass(mask)), affine, centre))
    healthy = discover_cases(data, group="hc", split="train")[:n_scans]
    brains = [brain_mask(preprocess_pair(case.image, None, cond.prep)[0].data[0]) for case in healthy]
    result = {"real lesions": {"n": len(real), **counts(real)}, "real site spread": position_spread(cond.prior.sites),
              "site_neighbourhood": cond.prior.site_neighbourhood(cond.prior.brain),
              "site_radius": cond.prior.site_radius}
    near_site = MaskPrior.centre_draw
    for name, draw in (("near a random real site", near_site), ("uniform among candidates (before)", uniform_draw)):
        MaskPrior.centre_draw = draw
        zones, positions = [], []
        for b, brain in enumerate(brains):
            for k in range(draws):
                mask = cond.prior.sample(np.random.default_rng([b, k, 7]), brain=brain) > 0
                zones.append(zone_of(np.array(ndimage.center_of_mass(mask)), affine, centre))
                positions.append(lesion_position(mask, brain_box(brain)))
        result[name] = {"n": len(zones), **counts(zones), "site_spread": position_spread(np.array(positions))}
        print(name, result[name], flush=True)
    MaskPrior.centre_draw = near_site
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("prior_sites.json"),
         *(int(a) for a in sys.argv[2:4]))
