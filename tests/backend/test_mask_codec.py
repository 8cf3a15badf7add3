"""Mask representations (signed distance, pixel shuffles), the lesion-weighted loss, the normalisation that keeps
lesions bright, and the mask prior: checked numerically on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuromf.data.brain import brain_mask, depth_map
from neuromf.data.mask_codec import (
    decode_sdf,
    encode_sdf,
    lesion_region,
    mask_channels,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
    signed_distance_mm,
    tanh_threshold,
)
from neuromf.data.mask_prior import MaskPrior
from neuromf.eval.metrics import dice
from neuromf.io.nifti import Preprocessing
from neuromf.meanflow.loss import ChannelLp, MeanFlowLoss


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return (np.linalg.norm(grid - np.asarray(centre), axis=-1) <= radius).astype(np.float32)


def test_pixel_shuffles_are_inverse_and_keep_blocks_together():
    x = torch.arange(2 * 1 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8, 8)
    packed = pixel_unshuffle_3d(x, 4)
    assert packed.shape == (2, 64, 2, 2, 2)
    assert torch.equal(pixel_shuffle_3d(packed, 4), x)
    # channel values at latent voxel (0, 0, 0) are exactly the first 4^3 block of the image grid
    assert torch.equal(packed[0, :, 0, 0, 0].sort().values, x[0, 0, :4, :4, :4].flatten().sort().values)


def test_signed_distance_sign_and_scale():
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[3:6, 3:6, 3:6] = True
    phi = signed_distance_mm(mask, (2.0, 2.0, 2.0))
    assert phi[4, 4, 4] > 0 and phi[0, 0, 0] < 0
    # centre voxel: 2 voxels (4 mm) to the nearest outside voxel, minus half a voxel (the face)
    assert phi[4, 4, 4] == pytest.approx(4.0 - 1.0)
    # a face neighbour outside: 1 voxel (2 mm) away, minus half a voxel
    assert phi[2, 4, 4] == pytest.approx(-(2.0 - 1.0))
    assert (signed_distance_mm(np.zeros((4, 4, 4), bool), (1.0, 1.0, 1.0)) < -100).all()


@pytest.mark.parametrize("radius", [3.0, 5.0, 8.0])
def test_sdf_round_trip_keeps_small_lesions(radius):
    """A lesion a few latent voxels wide survives the 4x coarser grid (binary downsampling lost a third)."""
    mask = torch.from_numpy(ball((32, 32, 32), (15.3, 16.0, 14.6), radius))[None, None]
    channels = encode_sdf(mask, (3.0, 3.0, 3.0), scale_mm=6.0, subgrid=2)
    assert channels.shape == (1, mask_channels("sdf", subgrid=2), 8, 8, 8)
    assert channels.abs().max() <= 1.0  # bounded: no 15-20 sd tail for the sampler to reach
    decoded = decode_sdf(channels, subgrid=2, threshold=tanh_threshold(-1.0, 6.0))
    assert decoded.shape == mask.shape
    assert dice(decoded.numpy(), mask.numpy()) > 0.75


def test_sdf_of_an_empty_mask_decodes_empty():
    channels = encode_sdf(torch.zeros(1, 1, 16, 16, 16), (3.0, 3.0, 3.0))
    assert channels.max() < -0.99
    assert decode_sdf(channels).sum() == 0


def test_lesion_region_covers_the_lesion_and_its_neighbours():
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[0, 0, 17, 17, 17] = 1
    region = lesion_region(mask, dilate=1)
    assert region.shape == (1, 1, 8, 8, 8)
    assert region[0, 0, 4, 4, 4] == 1 and region[0, 0, 3, 5, 4] == 1
    assert region.sum() == 27
    assert lesion_region(mask, dilate=0).sum() == 1


def test_voxel_weighted_lp_by_hand():
    delta = torch.zeros(1, 2, 2, 1, 1)
    delta[0, 0, 0] = 2.0  # image channel, voxel 0
    delta[0, 1, 1] = 1.0  # mask channel, voxel 1
    weight = torch.tensor([1.0, 5.0]).view(1, 1, 2, 1, 1)
    lp = ChannelLp.for_channels(1, 1, p_img=2.0, p_mask=1.0)
    img, msk = lp.per_group(delta, weight)
    assert float(img) == pytest.approx((4.0 * 1.0 + 0.0) / 2)
    assert float(msk) == pytest.approx((0.0 + 1.0 * 5.0) / 2)
    region = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1)
    assert float(lp.region_mean(delta, region)) == pytest.approx(0.0)
    assert float(lp.region_mean(delta, 1 - region)) == pytest.approx(4.0)


def test_lesion_weight_changes_the_loss_not_the_reported_parts():
    x = torch.randn(2, 4, 4, 4, 4)
    lesion = torch.zeros(2, 1, 4, 4, 4)
    lesion[:, :, 1:3, 1:3, 1:3] = 1

    def model(z, r, t):
        return 0.5 * z

    losses = {}
    for w in (0.0, 50.0):
        loss = MeanFlowLoss(lesion_weight=w, adaptive_power=0.0)
        value, parts = loss(model, x, torch.Generator().manual_seed(0), lesion=lesion)
        losses[w] = (float(value), parts)
    assert losses[0.0][1]["raw"] == pytest.approx(losses[50.0][1]["raw"])
    assert losses[0.0][1]["raw_lesion"] == pytest.approx(losses[50.0][1]["raw_lesion"])
    assert losses[50.0][0] > 5 * losses[0.0][0]


def test_normalisation_keeps_the_brightest_tissue():
    data = torch.linspace(0, 1, 1000).reshape(10, 10, 10)
    data[0, 0, :5] = 1.3  # a lesion brighter than the 99.5th percentile
    scaled = Preprocessing().scale(data)
    assert scaled.max() > 1.2
    assert Preprocessing(clip_max=1.0).scale(data).max() == pytest.approx(1.0)
    # sidecars written before clip_max existed were made with the old clip
    old = Preprocessing.from_dict({"shape": [64, 64, 64], "spacing": [3, 3, 3], "lower_percentile": 0.0,
                                   "upper_percentile": 99.5})
    assert old.clip_max == 1.0 and old.shape == (64, 64, 64)
    with pytest.raises(ValueError, match="clip_max"):
        Preprocessing(clip_max=0.5)


def test_mask_prior_places_real_lesions_inside_the_brain(tmp_path):
    shape = (32, 32, 32)
    brain_image = ball(shape, (16, 16, 16), 12) * 0.6
    lesions = [ball(shape, (8, 16, 16), 2.0), ball(shape, (16, 24, 16), 3.0)]
    prior = MaskPrior.from_cases(lesions, [brain_image, brain_image], (3.0, 3.0, 3.0))
    volumes = {int(m.sum()) for m in lesions}
    rng = np.random.default_rng(0)
    drawn = [prior.sample(rng) for _ in range(20)]
    for mask in drawn:
        assert int(mask.sum()) in volumes
        assert (mask.astype(bool) & prior.brain).sum() >= 0.95 * mask.sum()
    assert len({tuple(np.argwhere(m).mean(0).round()) for m in drawn}) > 5  # re-placed, not copied
    # depth as the lesion-likeness check measures it: each real lesion in its own brain, each new one in its brain
    depth = depth_map(prior.brain, prior.spacing)
    real = [float(np.median(depth_map(brain_mask(brain_image), prior.spacing)[m > 0])) for m in lesions]
    low, high = prior.depth_range  # the real lesions' range, widened to at least 4 voxels (one depth is valid data)
    assert low <= min(real) and high >= max(real)
    assert high - low == pytest.approx(max(max(real) - min(real), 4 * 3.0))
    assert all(prior.depth_range[0] <= np.median(depth[m > 0]) <= prior.depth_range[1] for m in drawn)
    # centres stay within the real lesions' inferior-superior range (no cerebellar FCD from cerebral lesions)
    low, high = prior.height_range
    assert all(low - 0.5 <= np.argwhere(m).mean(0)[2] <= high + 0.5 for m in drawn)
    loaded = MaskPrior.load(prior.save(tmp_path / "prior.safetensors"))
    assert loaded.depth_range == pytest.approx(prior.depth_range)
    assert loaded.site_radius == pytest.approx(prior.site_radius) and np.allclose(loaded.sites, prior.sites)
    assert np.array_equal(loaded.sample(np.random.default_rng(3)), prior.sample(np.random.default_rng(3)))
    with pytest.raises(ValueError, match="not a readable"):
        MaskPrior.load(tmp_path / "prior.safetensors.missing")
    with pytest.raises(ValueError, match="one FLAIR per mask"):
        MaskPrior.from_cases(lesions, [brain_image], (3.0, 3.0, 3.0))


def test_mask_prior_places_lesions_in_the_brain_it_is_given():
    """Generation passes the brain of the FLAIR the lesion goes into: lesions follow that brain, not the mean one."""
    shape = (32, 32, 32)
    reference = ball(shape, (16, 16, 16), 11) * 0.6
    lesions = [ball(shape, (7, 16, 16), 2.0), ball(shape, (16, 25, 16), 2.5)]
    prior = MaskPrior.from_cases(lesions, [reference, reference], (3.0, 3.0, 3.0))
    shifted = ball(shape, (16, 16, 19), 12) > 0  # a bigger brain, higher on the grid
    depth = depth_map(shifted, prior.spacing)
    rng = np.random.default_rng(1)
    for _ in range(15):
        mask = prior.sample(rng, brain=shifted) > 0
        assert (mask & shifted).sum() >= 0.95 * mask.sum()
        assert prior.depth_range[0] <= np.median(depth[mask]) <= prior.depth_range[1]
        assert prior.fits(mask, shifted)
        assert not prior.fits(mask, np.zeros(shape, bool)) and not prior.fits(np.zeros(shape, bool), shifted)
    with pytest.raises(ValueError, match="not the prior's grid"):
        prior.sample(rng, brain=np.ones((8, 8, 8), bool))


def test_mask_prior_keeps_lesions_near_real_lesion_sites():
    """Real lesions only on the left side of the brain: every drawn lesion lands near one of their sites (the
    location criterion of the lesion-likeness check), none on the right, although depth alone would allow it."""
    from neuromf.data.brain import brain_box, lesion_position, nearest_site_distances

    shape = (40, 40, 40)
    image = ball(shape, (20, 20, 20), 16) * 0.6
    lesions = [ball(shape, (8, 20, 20), 2.0), ball(shape, (12, 16, 22), 2.0), ball(shape, (10, 26, 18), 2.0)]
    prior = MaskPrior.from_cases(lesions, [image] * 3, (3.0, 3.0, 3.0))
    assert prior.sites.shape == (3, 3) and 0 < prior.site_radius < 0.3
    rng = np.random.default_rng(0)
    brain = brain_mask(image)
    for _ in range(15):
        mask = prior.sample(rng) > 0
        position = np.asarray([lesion_position(mask, brain_box(brain))])
        assert nearest_site_distances(position, prior.sites)[0] <= prior.site_radius
        assert np.argwhere(mask).mean(0)[0] < 20  # left half
        assert prior.fits(mask, brain)
    mirrored = np.flip(lesions[0], axis=0).copy()  # the same lesion at the right-hand site: depth fine, site not
    assert not prior.fits(mirrored, brain)


def test_mask_prior_draws_centres_near_real_sites_not_in_the_gaps_between_them():
    """Real sites in two tight clusters at opposite sides of a brain and one site alone between them: the lone site
    sets the site radius (the largest distance to a nearest neighbour), so most of the brain's shell lies within
    reach of a site, as deep grey matter lies within reach of medial and insular FCD sites. Drawn centres still
    follow the real sites' density: each within the typical nearest-neighbour distance of a real site, the
    clusters drawn in proportion to their sites, none in the empty stretches."""
    from neuromf.data.brain import brain_box, lesion_position, nearest_site_distances, normalised_positions

    shape = (40, 40, 40)
    image = ball(shape, (20, 20, 20), 16) * 0.6
    left = [(8, 20, 20), (8, 22, 20), (9, 20, 22), (8, 18, 19)]
    right = [(32, 20, 20), (32, 22, 21), (31, 19, 20), (32, 18, 22)]
    lesions = [ball(shape, c, 2.0) for c in [*left, *right, (20, 20, 8)]]
    prior = MaskPrior.from_cases(lesions, [image] * len(lesions), (3.0, 3.0, 3.0))
    brain = brain_mask(image)
    box = brain_box(brain)
    reach = prior.site_neighbourhood(brain)
    assert reach < 0.5 * prior.site_radius
    centres = prior.candidate_centres(brain, depth_map(brain, prior.spacing))
    far = nearest_site_distances(normalised_positions(centres, box), prior.sites) > reach
    assert far.mean() > 0.5  # a uniform draw among the candidates would mostly land far from every real site
    rng = np.random.default_rng(0)
    drawn = np.array([prior.draw_centre(rng, centres, brain) for _ in range(300)])
    assert (nearest_site_distances(normalised_positions(drawn, box), prior.sites) <= reach + 1e-9).all()
    assert 0.3 < (drawn[:, 0] < 14).mean() < 0.6 and 0.3 < (drawn[:, 0] > 26).mean() < 0.6  # 4 of 9 sites each
    for _ in range(10):
        mask = prior.sample(rng, brain=brain) > 0
        position = np.asarray([lesion_position(mask, box)])
        assert nearest_site_distances(position, prior.sites)[0] <= reach + 1.0 / 32  # a voxel of the box's slack
