"""Lesion-likeness figures (`neuromf.eval.lesion_metrics`): hand-computed values, real phantom lesions pass the
criteria, and masks that are not lesions (noise, outside the brain, no hyperintensity, two blobs) fail them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuromf.data.brain import position_spread
from neuromf.eval.lesion_metrics import (
    CRITERIA,
    LesionReference,
    LesionStats,
    brain_mask,
    depth_map,
    edge_spill,
    lesion_contrast,
    lesion_edge_profile,
    lesion_like,
    lesion_stats,
    noise_correlation,
    reference_from_real,
    signed_boundary_distance,
    summarise_edges,
    summarise_lesion_like,
)
from neuromf.io.nifti import Preprocessing

PHANTOMS = Path(__file__).resolve().parents[2] / "sample_data" / "fcd_phantoms"


def _box_brain(shape=(30, 30, 30), lo=5, hi=25, value=0.5) -> np.ndarray:
    image = np.zeros(shape, np.float32)
    image[lo:hi, lo:hi, lo:hi] = value
    return image


def _stats(volume: float = 5.0, share: float = 1.0, inside: float = 1.0, depth: float = 10.0,
           contrast: float | None = 1.3) -> LesionStats:
    return LesionStats(volume, 100, 1, share, inside, depth, contrast, False)


REF = LesionReference(min_volume_cm3=2.0, max_volume_cm3=10.0, min_depth_mm=5.0, max_depth_mm=15.0,
                      median_contrast=1.4, volumes_cm3=[2.0, 5.0, 10.0], contrasts=[1.3, 1.4, 1.5], n=3)


# ---------------------------------------------------------------- hand computations on small arrays


def test_brain_mask_largest_component_and_filled_holes():
    image = _box_brain()
    image[12:16, 12:16, 12:16] = 0.0  # dark "ventricle" inside: filled
    image[0, 0, 0] = 0.9  # a bright speck in the background: dropped
    image[1:3, 28, 28] = 0.04  # below threshold: background
    brain = brain_mask(image)
    assert brain.sum() == 20 ** 3
    assert brain[13, 13, 13] and not brain[0, 0, 0]
    # 1.5 is a valid FLAIR value after the new normalisation (lesions are no longer clipped at 1)
    image[10, 10, 10] = 1.5
    assert brain_mask(image).sum() == 20 ** 3
    assert not brain_mask(np.zeros((4, 4, 4))).any()


def test_lesion_stats_cube_volume_depth_and_components():
    image = _box_brain()  # brain = voxels 5..24 on each axis; 4 and 25 are the first outside
    mask = np.zeros(image.shape, bool)
    mask[6:9, 6:9, 6:9] = True
    s = lesion_stats(image, mask, (2.0, 2.0, 2.0))
    assert s.n_voxels == 27 and s.volume_cm3 == pytest.approx(27 * 8 / 1000)
    assert (s.n_components, s.largest_share, s.inside_brain_share) == (1, 1.0, 1.0)
    # depth of voxel (i, j, k) = (min(i, j, k) - 4) voxels: 19 voxels at 2, 7 at 3, 1 at 4 -> median 2 voxels
    assert s.median_depth_mm == pytest.approx(4.0)
    assert not s.empty
    assert s.contrast is None or s.contrast == pytest.approx(1.0)  # flat image: no hyperintensity

    # anisotropic spacing: the depth follows the nearest surface in millimetres, not in voxels
    depth = depth_map(brain_mask(image), (1.0, 2.0, 3.0))
    assert depth[5, 12, 12] == pytest.approx(1.0)  # 1 voxel from the x face at 1 mm
    assert depth[12, 12, 6] == pytest.approx(6.0)  # 2 voxels from the z face at 3 mm (x: 8 mm, y: 16 mm)
    assert depth[0, 0, 0] == 0.0
    # a brain touching the grid edge has its surface there
    edge = depth_map(np.ones((5, 5, 5), bool), (1.0, 1.0, 1.0))
    assert edge[0, 2, 2] == pytest.approx(1.0) and edge[2, 2, 2] == pytest.approx(3.0)

    # corner-touching voxels are one component with 26-connectivity
    corner = np.zeros(image.shape, bool)
    corner[10, 10, 10] = corner[11, 11, 11] = True
    assert lesion_stats(image, corner, (1.0, 1.0, 1.0)).n_components == 1

    # half a cube outside the brain
    half = np.zeros(image.shape, bool)
    half[3:7, 10:12, 10:12] = True  # x = 3, 4 outside; 5, 6 inside
    assert lesion_stats(image, half, (1.0, 1.0, 1.0)).inside_brain_share == pytest.approx(0.5)

    empty = lesion_stats(image, np.zeros(image.shape), (2.0, 2.0, 2.0))
    assert empty.empty and empty.volume_cm3 == 0.0 and empty.contrast is None
    with pytest.raises(ValueError, match="differs"):
        lesion_stats(image, np.zeros((3, 3, 3)), (1.0, 1.0, 1.0))


def test_lesion_contrast_ring_is_tissue_of_the_brain():
    image = _box_brain(value=0.5)
    mask = np.zeros(image.shape, bool)
    mask[10:13, 10:13, 10:13] = True
    image[mask] = 0.8
    assert lesion_contrast(image, mask) == pytest.approx(1.6)
    # dark CSF in the ring is not tissue: it must not inflate the ratio
    image[13:15, 10:13, 10:13] = 0.0
    assert lesion_contrast(image, mask, brain=brain_mask(image)) == pytest.approx(1.6)
    # a ring voxel outside `brain` is ignored even when bright
    image[8, 10:13, 10:13] = 2.0
    brain = brain_mask(image)
    brain[8] = False
    assert lesion_contrast(image, mask, brain=brain) == pytest.approx(1.6)
    assert lesion_contrast(image, np.zeros(image.shape)) is None
    # a mask surrounded by background only has no ring
    far = np.zeros(image.shape, bool)
    far[0:2, 0:2, 0:2] = True
    assert lesion_contrast(image, far) is None


def test_reference_and_criteria_thresholds():
    real = [_stats(volume=2.0, depth=5.0, contrast=1.2), _stats(volume=10.0, depth=15.0, contrast=1.6),
            _stats(volume=5.0, depth=8.0, contrast=1.4), LesionStats(0.0, 0, 0, None, None, None, None, True)]
    ref = reference_from_real(real)
    assert (ref.min_volume_cm3, ref.max_volume_cm3, ref.n) == (2.0, 10.0, 3)  # the empty one is ignored
    assert (ref.min_depth_mm, ref.max_depth_mm) == (5.0, 15.0)
    assert ref.median_contrast == pytest.approx(1.4) and ref.min_contrast == pytest.approx(1.2)
    assert ref.volume_range == (1.0, 20.0)
    assert ref.to_dict()["accepted_volume_cm3"] == [1.0, 20.0]
    with pytest.raises(ValueError, match="no non-empty"):
        reference_from_real([LesionStats(0.0, 0, 0, None, None, None, None, True)])

    good = lesion_like(_stats(volume=1.0, share=0.8, inside=0.9, depth=5.0, contrast=1.2), ref)  # all at the edge
    assert good == {**{c: True for c in CRITERIA}, "all": True}
    cases = {
        "volume": _stats(volume=0.99), "largest_share": _stats(share=0.79), "inside_brain": _stats(inside=0.89),
        "depth": _stats(depth=15.1), "contrast": _stats(contrast=1.19),
    }
    for criterion, stats in cases.items():
        verdict = lesion_like(stats, ref)
        assert not verdict[criterion] and not verdict["all"], criterion
        assert all(verdict[c] for c in CRITERIA if c != criterion), criterion
    assert not lesion_like(_stats(volume=20.1), ref)["volume"]
    assert not lesion_like(_stats(contrast=None), ref)["contrast"]
    empty = lesion_like(LesionStats(0.0, 0, 0, None, None, None, None, True), ref)
    assert not any(empty.values())


def test_summarise_rates_ks_and_medians():
    stats = [_stats(volume=2.0), _stats(volume=5.0), _stats(volume=10.0, share=0.5),
             LesionStats(0.0, 0, 0, None, None, None, None, True)]
    summary = summarise_lesion_like(stats, REF)
    assert summary["n"] == 4 and summary["n_lesion_like"] == 2 and summary["rate"] == 0.5
    assert summary["rates"]["nonempty"] == 0.75 and summary["rates"]["largest_share"] == 0.5
    assert summary["volume_ks_statistic"] == pytest.approx(0.0)  # same volumes as the reference
    assert summary["medians"]["volume_cm3"] == 5.0 and summary["medians"]["largest_share"] == 1.0
    far = summarise_lesion_like([_stats(volume=100.0)], REF)
    assert far["volume_ks_statistic"] == pytest.approx(1.0) and far["rate"] == 0.0
    none = summarise_lesion_like([], REF)
    assert none["rate"] is None and none["volume_ks_statistic"] is None and none["contrast_ks_statistic"] is None


def test_summary_flags_lesions_brighter_than_any_real_one():
    """The criteria bound the contrast from below only; the contrast KS statistic and the share above the brightest
    real lesion (1.5 here) show an over-bright generator."""
    like_real = summarise_lesion_like([_stats(contrast=c) for c in (1.3, 1.4, 1.5)], REF)
    assert like_real["contrast_ks_statistic"] == pytest.approx(0.0) and like_real["share_brighter_than_real"] == 0.0
    bright = summarise_lesion_like([_stats(contrast=c) for c in (1.45, 1.6, 1.7, 1.8)], REF)
    assert bright["rate"] == 1.0  # every one passes the criteria ...
    assert bright["share_brighter_than_real"] == 0.75  # ... but three of four are brighter than any real lesion
    assert bright["contrast_ks_statistic"] == pytest.approx(0.75)


def test_noise_correlation():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((4, 16, 16, 16))
    other = rng.standard_normal(noise.shape)
    assert noise_correlation(noise, noise) == pytest.approx(1.0)
    # the shipped adapter's failure mode: u = 0.30 eps + 1.05 keeps a perfect linear dependence on the noise
    assert noise_correlation(noise - (0.3 * noise + 1.05), noise) == pytest.approx(1.0)
    mixed = 0.6 * noise + 0.8 * other  # r = 0.6 / sqrt(0.36 + 0.64) up to sampling error
    assert noise_correlation(mixed, noise) == pytest.approx(np.corrcoef(mixed.ravel(), noise.ravel())[0, 1])
    assert noise_correlation(mixed, noise) == pytest.approx(0.6, abs=0.02)
    assert abs(noise_correlation(other, noise)) < 0.05
    assert noise_correlation(torch.from_numpy(-noise), torch.from_numpy(noise)) == pytest.approx(-1.0)
    assert np.isnan(noise_correlation(np.ones(8), np.arange(8.0)))
    with pytest.raises(ValueError, match="sizes differ"):
        noise_correlation(np.zeros(3), np.zeros(4))


# ---------------------------------------------------------------- real phantom lesions vs non-lesions


@pytest.fixture(scope="module")
def real():
    """The embedded phantom FCD cases on the model grid: (id, split, image, mask, stats)."""
    from neuromf.io.bids import discover_cases
    from neuromf.io.nifti import preprocess_pair

    prep = Preprocessing()
    cases = []
    for split in ("train", "test"):
        for case in discover_cases(PHANTOMS, group="fcd", split=split):
            image, mask = preprocess_pair(case.image, case.mask, prep)
            img, msk = image.data[0].numpy(), mask.data[0].numpy() > 0.5
            cases.append((case.case_id, split, img, msk, lesion_stats(img, msk, prep.spacing)))
    assert len(cases) >= 5
    return {"cases": cases, "spacing": prep.spacing, "ref": reference_from_real([c[4] for c in cases])}


def test_real_phantom_lesions_are_lesion_like(real):
    ref = real["ref"]
    summary = summarise_lesion_like([c[4] for c in real["cases"]], ref)
    failing = {c[0]: lesion_like(c[4], ref) for c in real["cases"] if not lesion_like(c[4], ref)["all"]}
    assert summary["rate"] >= 0.9, failing
    assert ref.median_contrast > 1.05  # phantom lesions are FLAIR-hyperintense
    assert summary["medians"]["n_components"] == 1 and summary["medians"]["inside_brain_share"] > 0.99
    # held-out lesions judged against a reference built from the training lesions only (not circular)
    train_ref = reference_from_real([c[4] for c in real["cases"] if c[1] == "train"])
    test_stats = [c[4] for c in real["cases"] if c[1] == "test"]
    assert test_stats and summarise_lesion_like(test_stats, train_ref)["rate"] >= 0.8


def test_non_lesions_fail(real):
    ref, spacing = real["ref"], real["spacing"]
    case_id, _, image, mask, _ = max(real["cases"], key=lambda c: c[4].volume_cm3)
    brain = brain_mask(image)
    rng = np.random.default_rng(0)

    # thresholded noise of a typical lesion's voxel count: scattered specks, everywhere in the grid
    noise = rng.random(image.shape) > 1.0 - mask.sum() / image.size
    s = lesion_stats(image, noise, spacing)
    verdict = lesion_like(s, ref)
    assert s.n_components > 50 and not verdict["largest_share"] and not verdict["inside_brain"]
    assert not verdict["all"]

    # the real lesion moved into an empty corner of the grid: outside the brain
    box = np.argwhere(mask)
    lo, hi = box.min(axis=0), box.max(axis=0) + 1
    moved = np.zeros_like(mask)
    moved[tuple(slice(0, h - low) for low, h in zip(lo, hi))] = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    assert not (moved & brain).any(), "the grid corner must be background for this test"
    verdict = lesion_like(lesion_stats(image, moved, spacing), ref)
    assert verdict["largest_share"] and verdict["volume"]
    assert not verdict["inside_brain"] and not verdict["all"]

    # the same lesion where the FLAIR is flat: lesion and its surroundings set to the ring's mean
    flat = image.copy()
    around = np.zeros_like(mask)
    around[tuple(slice(max(0, a - 4), b + 4) for a, b in zip(lo, hi))] = True
    around &= flat > 0.05
    flat[around] = float(flat[around & ~mask].mean())
    s = lesion_stats(flat, mask, spacing)
    verdict = lesion_like(s, ref)
    assert s.contrast == pytest.approx(1.0)
    assert not verdict["contrast"] and not verdict["all"]
    assert all(verdict[c] for c in CRITERIA if c != "contrast"), (case_id, verdict)

    # two distant blobs of half a lesion each: the largest is 50% of the mask
    half = max(1, int(round((mask.sum() / 2) ** (1 / 3))))
    centre = np.round(np.argwhere(brain).mean(axis=0)).astype(int)
    blobs = np.zeros_like(mask)
    for offset in (-8, 8):
        c = centre + np.array([offset, 0, 0])
        blobs[c[0]:c[0] + half, c[1]:c[1] + half, c[2]:c[2] + half] = True
    assert (blobs & brain).sum() == blobs.sum()
    s = lesion_stats(image, blobs, spacing)
    assert s.n_components == 2 and s.largest_share == pytest.approx(0.5)
    assert not lesion_like(s, ref)["largest_share"]


def test_location_criterion_uses_brain_normalised_centroids_and_the_real_spread():
    """Real lesions at three sites in the left half of a box brain, 0.18 apart (normalised); a lesion at one of the
    sites in a brain of another size and place on the grid passes, and so does its mirror image in the right half;
    one far from every site (the 'cerebellum') fails, and each real lesion passes against a reference that holds
    it."""
    spacing = (1.0, 1.0, 1.0)

    def pair(lo: int, hi: int, centre_fraction: tuple[float, float, float]):
        image = _box_brain((48, 48, 48), lo, hi, 0.5)
        centre = [int(round(lo + f * (hi - 1 - lo))) for f in centre_fraction]
        mask = np.zeros(image.shape, bool)
        mask[tuple(slice(c - 1, c + 2) for c in centre)] = True
        image[mask] = 0.8
        return image, mask

    sites = [(0.3, 0.5, 0.6), (0.3, 0.8, 0.6), (0.4, 0.65, 0.6)]
    real = [lesion_stats(*pair(5, 35, site), spacing) for site in sites]
    ref = reference_from_real(real)
    assert ref.max_position_distance == pytest.approx(0.18, abs=0.04)
    assert all(lesion_like(s, ref)["location"] for s in real)
    moved = lesion_stats(*pair(10, 46, sites[1]), spacing)  # a bigger brain elsewhere on the grid: same site
    assert moved.position == pytest.approx(list(sites[1]), abs=0.04)
    assert lesion_like(moved, ref)["location"] and ref.position_distance(moved) < 0.05
    far = lesion_stats(*pair(5, 35, (0.5, 0.1, 0.1)), spacing)  # posterior-inferior, no real lesion near
    verdict = lesion_like(far, ref)
    assert not verdict["location"] and not verdict["all"] and verdict["depth"] is not None
    assert ref.position_distance(far) > ref.max_position_distance
    mirrored = lesion_stats(*pair(5, 35, (0.7, 0.5, 0.6)), spacing)  # site 1 in the other hemisphere
    assert ref.position_distance(mirrored) == pytest.approx(0.0, abs=0.04) and lesion_like(mirrored, ref)["location"]
    single = reference_from_real(real[:1])  # no spread to judge by: the criterion cannot fail
    assert single.max_position_distance is None and lesion_like(far, single)["location"]


def test_position_spread_shows_sites_collapsed_onto_one_place():
    """Varied real sites vs generated lesions all at (nearly) one site: every lesion passes the location criterion,
    but the summary's spread is a fraction of the real one; a site and its mirror image count as one place."""
    spacing = (1.0, 1.0, 1.0)

    def at(site: tuple[float, float, float]) -> LesionStats:
        image = _box_brain((40, 40, 40), 4, 36, 0.5)
        centre = [int(round(4 + f * 31)) for f in site]
        mask = np.zeros(image.shape, bool)
        mask[tuple(slice(c - 1, c + 2) for c in centre)] = True
        image[mask] = 0.8
        return lesion_stats(image, mask, spacing)

    real_sites = [(0.2, 0.2, 0.5), (0.3, 0.8, 0.6), (0.25, 0.5, 0.8), (0.3, 0.3, 0.3), (0.2, 0.7, 0.4)]
    ref = reference_from_real([at(s) for s in real_sites])
    collapsed = [at((0.3, 0.8, 0.6)), at((0.7, 0.8, 0.6)), at((0.32, 0.78, 0.6)), at((0.68, 0.8, 0.62))]
    summary = summarise_lesion_like(collapsed, ref)
    assert summary["rates"]["location"] == 1.0
    assert summary["real_position_spread"] > 0.3 and summary["position_spread"] < 0.1
    assert summary["position_spread_lesion_like"] == pytest.approx(summary["position_spread"])  # all pass here
    assert position_spread(np.array([[0.3, 0.5, 0.5], [0.7, 0.5, 0.5]])) == pytest.approx(0.0)  # mirror images
    assert position_spread(np.zeros((1, 3))) is None
    assert summarise_lesion_like(collapsed[:1], ref)["position_spread"] is None


def test_site_spread_in_both_hemispheres_leaves_a_lesions_own_mirror_out():
    """Two lesions at mirror-image sites are one place when the sites count in both hemispheres; a lesion's own
    mirror image never counts as its neighbour; the result is the brute-force leave-one-out maximum."""
    from neuromf.data.brain import mirrored_sites, site_spread

    sites = np.array([[0.2, 0.5, 0.5], [0.8, 0.5, 0.5], [0.3, 0.9, 0.5]])
    assert site_spread(sites) == pytest.approx(0.6)  # one hemisphere: the second site is 0.6 from the first
    both = site_spread(sites, mirrored=True)
    expected = max(min(np.linalg.norm(sites[i] - other) for j, other in enumerate(mirrored_sites(sites))
                       if j % len(sites) != i) for i in range(len(sites)))
    assert both == pytest.approx(expected) and both == pytest.approx(np.hypot(0.1, 0.4))
    lone = np.array([[0.1, 0.5, 0.5], [0.4, 0.5, 0.5]])
    assert site_spread(lone, mirrored=True) == pytest.approx(0.3)  # not 0.0 / 0.2 to its own mirror at 0.9 / 0.6
    assert site_spread(sites[:1], mirrored=True) is None


def test_site_map_draws_real_and_generated_sites(tmp_path):
    from PIL import Image

    from neuromf.eval.figures import site_map

    real = [[0.2, 0.8, 0.6], [0.7, 0.3, 0.5], [0.4, 0.5, 0.7]]
    png = site_map(real, [([0.25, 0.8, 0.6], True), ([0.5, 0.1, 0.2], False)], tmp_path / "sites.png", title="t")
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    green = (pixels[..., 1] > 120) & (pixels[..., 0] < 100) & (pixels[..., 2] < 100)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert green.sum() > 20 and red.sum() > 20  # both kinds of generated site are drawn, in both views
    empty = site_map(real, [], tmp_path / "none.png")
    assert empty.is_file()


def test_plots_are_written_as_palette_pngs_that_look_the_same(tmp_path):
    """`atomic_write_figure(..., palette=True)` (plots: loss curves, site maps, the downstream figure): a palette PNG,
    smaller than the full-colour one, with the same pixels up to antialiasing shades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from neuromf.utils import atomic_write_figure

    fig, ax = plt.subplots(figsize=(5, 3))
    steps = np.arange(200)
    for k in range(4):
        ax.plot(steps, np.exp(-steps / (30 + 20 * k)) + 0.02 * np.sin(steps / (3 + k)), label=f"part {k}")
    ax.set_yscale("log")
    ax.legend()
    full = atomic_write_figure(tmp_path / "full.png", fig)
    small = atomic_write_figure(tmp_path / "palette.png", fig, palette=True)
    plt.close(fig)
    with Image.open(full) as a, Image.open(small) as b:
        assert b.mode == "P" and a.size == b.size
        diff = np.abs(np.asarray(a.convert("RGB")).astype(int) - np.asarray(b.convert("RGB")).astype(int))
    assert small.stat().st_size < 0.8 * full.stat().st_size
    assert diff.mean() < 1.0 and np.percentile(diff, 99.9) < 40  # a few antialiasing shades merged


def test_signed_boundary_distance_counts_whole_voxels_from_the_mask_boundary():
    mask = np.zeros((11, 11, 11), bool)
    mask[3:8, 3:8, 3:8] = True
    distance = signed_boundary_distance(mask)
    assert distance[3, 5, 5] == 0 and distance[4, 5, 5] == -1 and distance[5, 5, 5] == -2  # boundary, deeper
    assert distance[2, 5, 5] == 1 and distance[0, 5, 5] == 3  # face neighbours outside
    assert distance[2, 2, 5] == 2  # a diagonal neighbour: sqrt(2) rounded up


def test_edge_profile_tells_a_sharp_lesion_edge_from_one_that_spills_past_its_mask():
    """A lesion of 1.3 x its surroundings that ends at its mask: level 1.3 inside, 1 outside, no spill; the same
    lesion blurred (its brightness running past the mask, as a decoded lesion's does): the first voxels outside
    stay bright, and the spill says by how much."""
    image = _box_brain(shape=(40, 40, 40), lo=2, hi=38, value=0.5)
    mask = np.zeros(image.shape, bool)
    mask[15:25, 15:25, 15:25] = True
    sharp = image.copy()
    sharp[mask] = 0.65
    profile = lesion_edge_profile(sharp, mask)
    assert profile[-2] == pytest.approx(1.3) and profile[0] == pytest.approx(1.3)
    assert profile[1] == pytest.approx(1.0) and profile[3] == pytest.approx(1.0)
    assert edge_spill(profile) == pytest.approx(0.0)
    from scipy import ndimage

    soft = image + ndimage.gaussian_filter(np.where(mask, 0.15, 0.0).astype(np.float32), 1.5)
    blurred = lesion_edge_profile(soft, mask)
    assert blurred[1] > 1.05 and blurred[1] > blurred[2] > blurred[3]  # brightness falls off past the mask
    assert blurred[0] < blurred[-2]  # and the mask's own boundary is dimmer than its core
    # the spill equals the hand arithmetic of the two first outside distances
    assert edge_spill(blurred) == pytest.approx((blurred[1] + blurred[2]) / 2 - 1)
    assert edge_spill(blurred) > 0.03
    assert lesion_edge_profile(sharp, np.zeros_like(mask)) is None and edge_spill(None) is None
    summary = summarise_edges([profile, blurred, None])
    assert summary["n"] == 2 and summary["median_level"]["1"] == pytest.approx((1.0 + blurred[1]) / 2)
    assert summary["median_spill"] == pytest.approx(edge_spill(blurred) / 2)
