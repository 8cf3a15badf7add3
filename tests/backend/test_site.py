"""Site conditioning of the joint mode: the site blob, the wrapper that feeds it to the model, drawn sites."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuromf.data.brain import brain_box, depth_map, lesion_position, nearest_site_distances
from neuromf.data.mask_prior import MaskPrior
from neuromf.models.lora import widen_io_channels
from neuromf.models.site import SiteConditionedJoint, draw_sites, lesion_centres, site_map
from neuromf.models.unet import build_unet


def test_lesion_centres_are_centroids_and_nan_when_empty():
    masks = torch.zeros(2, 1, 12, 12, 12)
    masks[0, 0, 2:5, 6:8, 9] = 1  # centroid (3, 6.5, 9)
    centres = lesion_centres(masks)
    np.testing.assert_allclose(centres[0].numpy(), [3.0, 6.5, 9.0], atol=1e-5)
    assert torch.isnan(centres[1]).all()


def test_site_map_peaks_at_the_latent_voxel_holding_the_site():
    # image voxel 4k + 1.5 is the centre of latent voxel k (4^3 image voxels per latent voxel)
    centres = torch.tensor([[4 * 2 + 1.5, 4 * 5 + 1.5, 4 * 0 + 1.5], [float("nan")] * 3])
    blob = site_map(centres, (8, 8, 8), sigma=1.0)
    assert blob.shape == (2, 1, 8, 8, 8)
    assert blob[0, 0, 2, 5, 0] == pytest.approx(1.0)
    assert tuple(np.unravel_index(int(blob[0, 0].argmax()), (8, 8, 8))) == (2, 5, 0)
    assert blob[0, 0, 3, 5, 0] == pytest.approx(np.exp(-0.5), rel=1e-5)  # one latent voxel away: one sigma
    assert float(blob[1].abs().max()) == 0.0  # no lesion, no site


def test_site_conditioned_joint_feeds_the_site_between_image_and_mask_channels():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    n_mask = 2
    widen_io_channels(unet, 4 + 1 + n_mask, 4 + n_mask)
    with torch.no_grad():
        unet.out[2].conv.weight.normal_(0, 0.1)  # a fresh UNet's output conv is zero: let something through
    model = SiteConditionedJoint(unet, n_image=4).eval()
    z, r, t = torch.randn(1, 4 + n_mask, 8, 8, 8), torch.zeros(1), torch.ones(1)
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[0, 0, 10:14, 20:24, 5:9] = 1
    with torch.no_grad():
        # a fresh widening: the site's input column is zero, so the site changes nothing yet
        base = model(z, r, t, cond=mask)
        assert torch.equal(base, model(z, r, t, cond=torch.tensor([[1.0, 1.0, 1.0]])))
        unet.conv_in.conv.weight[:, 4].normal_()  # the site column, once trained
        from_mask = model(z, r, t, cond=mask)
        # a mask and its centroid's coordinates are the same site
        torch.testing.assert_close(from_mask, model(z, r, t, cond=lesion_centres(mask)))
        assert not torch.allclose(from_mask, model(z, r, t, cond=torch.tensor([[25.0, 5.0, 25.0]])))
        unet.conv_in.conv.weight[:, 5:].zero_()  # the mask channels still come last: they no longer matter
        assert torch.equal(model(z, r, t, cond=mask), model(torch.cat([z[:, :4], 0 * z[:, 4:]], 1), r, t, cond=mask))


def test_draw_sites_are_reproducible_and_where_the_prior_places_lesions():
    shape, spacing = (40, 40, 40), (2.0, 2.0, 2.0)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    image = (np.linalg.norm(grid - 19.5, axis=-1) < 16).astype(np.float32)
    masks = []
    for centre in ((12, 14, 20), (27, 24, 18), (20, 10, 26)):
        masks.append((np.linalg.norm(grid - np.asarray(centre), axis=-1) < 3).astype(np.uint8))
    prior = MaskPrior.from_cases(masks, [image] * len(masks), spacing)
    sites = draw_sites(prior, 6, seed=3)
    assert sites.shape == (6, 3)
    torch.testing.assert_close(sites[:4], draw_sites(prior, 4, seed=3))  # site i depends on (seed, i) only
    assert not torch.equal(sites, draw_sites(prior, 6, seed=4))
    brain = prior.brain
    depth = depth_map(brain, spacing)
    lo, hi = prior.depth_range
    box = brain_box(brain)
    for site in sites.numpy().astype(int):
        assert brain[tuple(site)] and lo <= depth[tuple(site)] <= hi
        point = np.zeros(shape, dtype=bool)
        point[tuple(site)] = True
        assert nearest_site_distances(np.asarray([lesion_position(point, box)]), prior.sites)[0] <= prior.site_radius
