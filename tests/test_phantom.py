"""The digital chest phantom: determinism, geometry, anatomy, HU values, partial volume, scaling with spacing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.phantom import (
    PHANTOM_LABELS,
    ChestPhantomOptions,
    _anatomy,
    chest_phantom,
    chest_phantom_volume,
)

L = PHANTOM_LABELS
SHAPE = (8, 256, 256)  # 360 mm field of view at 1.41 mm pixels, 10 mm of z around the hila
SMALL = (8, 128, 128)
FOV = 360.0


def _spacing(shape: tuple[int, int, int]) -> tuple[float, float, float]:
    return (FOV / shape[2], FOV / shape[1], 1.25)


@pytest.fixture(scope="module")
def phantom0() -> tuple[np.ndarray, np.ndarray]:
    return chest_phantom(SHAPE, _spacing(SHAPE), seed=0, return_labels=True)


@pytest.fixture(scope="module")
def phantom1() -> tuple[np.ndarray, np.ndarray]:
    return chest_phantom(SHAPE, _spacing(SHAPE), seed=1, return_labels=True)


def test_same_seed_is_bit_identical():
    a = chest_phantom(SMALL, _spacing(SMALL), seed=3, return_labels=True)
    _anatomy.cache_clear()  # rebuild the anatomy from the seed, not from the cache
    b = chest_phantom(SMALL, _spacing(SMALL), seed=3, return_labels=True)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[1].tobytes() == b[1].tobytes()


def test_different_seeds_give_different_anatomy(phantom0, phantom1):
    (hu0, lab0), (hu1, lab1) = phantom0, phantom1
    assert np.abs(hu0 - hu1).mean() > 20.0
    body0, body1 = (lab0 != L["air"]).sum(), (lab1 != L["air"]).sum()
    assert abs(body0 - body1) / body0 > 0.01  # body size differs
    v0, v1 = lab0 == L["vessel"], lab1 == L["vessel"]
    assert (v0 & v1).sum() < 0.5 * min(v0.sum(), v1.sum())  # vessel trees differ
    a0, a1 = _anatomy(0, ChestPhantomOptions()), _anatomy(1, ChestPhantomOptions())
    assert len(a0.vessels) != len(a1.vessels) or not np.allclose(a0.vessels.b, a1.vessels.b)


def test_shape_dtype_and_range(phantom0):
    hu, lab = phantom0
    assert hu.shape == SHAPE and hu.dtype == np.float32
    assert lab.shape == SHAPE and lab.dtype == np.uint8
    assert hu.min() >= -1024.0 and hu.max() <= 3071.0 and np.isfinite(hu).all()
    assert set(np.unique(lab)) <= set(L.values())
    odd = chest_phantom((3, 41, 67), (2.0, 3.0, 2.5), seed=2)  # any shape, anisotropic spacing
    assert odd.shape == (3, 41, 67) and odd.dtype == np.float32
    assert isinstance(chest_phantom((1, 8, 8), seed=0), np.ndarray)


def test_noise_free_air_and_no_noise_in_fat(phantom0):
    hu, lab = phantom0
    assert np.all(hu[:, :3, :] == -1000.0)  # air outside the body is exactly −1000
    fat = ndimage.binary_erosion(lab == L["fat"], iterations=2)
    assert np.mean(hu[fat] == -100.0) > 0.9  # homogeneous tissues are flat: no noise added


def test_hu_of_tissues(phantom0, phantom1):
    for hu, lab in (phantom0, phantom1):
        assert abs(hu[lab == L["lung"]].mean() - (-850.0)) < 60.0
        assert -130.0 < np.median(hu[lab == L["fat"]]) < -70.0
        assert 20.0 < np.median(hu[lab == L["soft_tissue"]]) < 80.0
        bone = hu[lab == L["bone"]]
        assert bone.mean() > 200.0 and bone.max() > 700.0
        assert hu[lab == L["air"]].mean() < -990.0


def test_labels_consistent_with_hu(phantom0):
    hu, lab = phantom0
    expected = {"air": (-1001, -990), "lung": (-910, -790), "vessel": (-700, 60), "airway": (-1001, -600),
                "nodule": (-650, 70), "bone": (200, 1100), "soft_tissue": (0, 100), "fat": (-120, -80),
                "heart": (0, 80), "aorta": (0, 80), "great_vessel": (0, 80), "liver": (30, 80),
                "cartilage": (40, 140)}
    seen = 0
    for name, (lo, hi) in expected.items():
        m = lab == L[name]
        if m.sum() >= 30:
            seen += 1
            assert lo <= hu[m].mean() <= hi, (name, hu[m].mean())
    assert seen >= 9


def test_anatomy_present(phantom0):
    hu, lab = phantom0
    mid = lab[SHAPE[0] // 2]
    frac = (mid == L["lung"]).sum() / (mid != L["air"]).sum()
    assert 0.2 <= frac <= 0.6
    for name in ("lung", "vessel", "airway", "bone", "fat", "soft_tissue", "aorta"):
        assert (lab == L[name]).any(), name
    # both lungs: lung voxels left and right of the midline
    lung = lab == L["lung"]
    assert lung[..., : SHAPE[2] // 2 - 10].sum() > 1000 and lung[..., SHAPE[2] // 2 + 10 :].sum() > 1000


def test_vessels_and_nodules_lie_inside_the_lungs(phantom0, phantom1):
    for hu, lab in (phantom0, phantom1):
        lung = lab == L["lung"]
        inside = np.stack([ndimage.binary_fill_holes(s) for s in lung])  # lung with its holes
        vessel = lab == L["vessel"]
        assert vessel.sum() > 200
        assert (vessel & inside).sum() / vessel.sum() > 0.6
        x = (np.arange(SHAPE[2]) - (SHAPE[2] - 1) / 2) * FOV / SHAPE[2]
        outside = vessel & ~inside  # only at the hila, where the trees leave the mediastinum
        assert np.abs(np.broadcast_to(x, SHAPE)[outside]).max(initial=0.0) < 90.0
        nodule = lab == L["nodule"]
        assert nodule.any()
        ring = ndimage.binary_dilation(nodule, iterations=2) & ~nodule
        around = lab[ring]
        lungish = np.isin(around, [L["lung"], L["vessel"], L["airway"], L["airway_wall"]])
        assert lungish.mean() > 0.9


def test_vessel_and_airway_trees_end_inside_the_lungs():
    anat = _anatomy(0, ChestPhantomOptions())
    assert len(anat.vessels) > 2000
    assert np.all(anat.lung_sdf_points(anat.vessels.b) < 0.0)  # every branch ends in lung tissue
    radii = anat.vessels.ra
    assert radii.max() > 4.0 and radii.min() < 0.6  # tapering from the hila to sub-millimetre branches
    branches = anat.airways.b[len(anat.airways_main):]
    assert len(branches) >= 10 and np.all(anat.lung_sdf_points(branches) < 0.0)


def test_other_levels_show_heart_liver_and_apex():
    hu, lab = chest_phantom(SMALL, _spacing(SMALL), seed=0, options=ChestPhantomOptions(z_center_mm=-60.0),
                            return_labels=True)
    assert (lab == L["heart"]).sum() > 200 and (lab == L["liver"]).sum() > 100
    hu, lab = chest_phantom(SMALL, _spacing(SMALL), seed=0, options=ChestPhantomOptions(z_center_mm=120.0),
                            return_labels=True)
    low = chest_phantom(SMALL, _spacing(SMALL), seed=0, return_labels=True)[1]
    assert 0 < (lab == L["lung"]).sum() < 0.6 * (low == L["lung"]).sum()  # lungs narrow towards the apex
    hu, lab = chest_phantom(SMALL, _spacing(SMALL), seed=0, options=ChestPhantomOptions(z_center_mm=-200.0),
                            return_labels=True)
    assert not (lab == L["lung"]).any()  # below the diaphragm


def test_anatomy_scales_with_spacing():
    fine = chest_phantom(SHAPE, _spacing(SHAPE), seed=4)
    coarse = chest_phantom(SMALL, _spacing(SMALL), seed=4)
    down = fine.reshape(SHAPE[0], SMALL[1], 2, SMALL[2], 2).mean(axis=(2, 4))
    r = np.corrcoef(down.ravel(), coarse.ravel())[0, 1]
    assert r > 0.95
    assert np.abs(down - coarse).mean() < 25.0


def test_edges_are_antialiased():
    hu, lab = chest_phantom(SMALL, _spacing(SMALL), seed=0, return_labels=True)
    hard, hlab = chest_phantom(SMALL, _spacing(SMALL), seed=0, options=ChestPhantomOptions(antialias=False),
                               return_labels=True)
    # the lung ↔ chest-wall boundary (no vessels, nodules or airways nearby)
    lung = hlab == L["lung"]
    wall = np.isin(hlab, [L["fat"], L["soft_tissue"], L["bone"], L["cartilage"]])
    band = ndimage.binary_dilation(lung, iterations=1) & ndimage.binary_dilation(wall, iterations=1)
    band &= ~ndimage.binary_dilation(np.isin(hlab, [L["vessel"], L["nodule"], L["airway"], L["airway_wall"],
                                                     L["great_vessel"], L["aorta"], L["heart"]]), iterations=2)
    assert band.sum() > 200
    mid = lambda v: ((v > -650) & (v < -250))[band].mean()  # noqa: E731
    assert mid(hu) > 0.1  # partial-volume values between lung and soft tissue
    assert mid(hard) < 0.02
    # hard edges take only the pure tissue values (plus the lung texture): no intermediate HU at the skin
    skin = ndimage.binary_dilation(hlab == L["air"]) & (hlab != L["air"])
    assert np.all(np.isin(hard[skin], [40.0, -100.0]))
    assert np.mean((hu[skin] > -990) & (hu[skin] < 30)) > 0.3


def test_contrast_option_enhances_blood():
    base, lab = chest_phantom(SMALL, _spacing(SMALL), seed=0, return_labels=True)
    enh, lab2 = chest_phantom(SMALL, _spacing(SMALL), seed=0, options=ChestPhantomOptions(contrast=True),
                              return_labels=True)
    aorta = ndimage.binary_erosion(lab == L["aorta"])
    assert abs(base[aorta].mean() - 40.0) < 10.0
    assert abs(enh[aorta].mean() - 250.0) < 20.0


@pytest.mark.parametrize("weights, lo, hi", [((1, 0, 0), 0.0, 70.0), ((0, 0, 1), -620.0, -280.0)])
def test_nodule_types(weights, lo, hi):
    opts = ChestPhantomOptions(nodule_count=4, nodule_type_weights=weights, nodule_diameter_mm=(8.0, 20.0))
    hu, lab = chest_phantom(SMALL, _spacing(SMALL), seed=5, options=opts, return_labels=True)
    core = ndimage.binary_erosion(lab == L["nodule"])
    assert core.sum() > 5
    assert lo < np.median(hu[core]) < hi


def test_options_are_validated():
    with pytest.raises(ValueError):
        ChestPhantomOptions(nodule_diameter_mm=(10.0, 5.0))
    with pytest.raises(ValueError):
        ChestPhantomOptions(nodule_type_weights=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        chest_phantom((8, 0, 16))
    with pytest.raises(ValueError):
        chest_phantom((2, 16, 16), spacing_mm=(1.0, -1.0, 1.0))


def test_volume_geometry():
    vol = chest_phantom_volume((4, 64, 96), seed=7)
    assert isinstance(vol, CTVolume)
    assert vol.hu.shape == (4, 64, 96) and vol.hu.dtype == np.float32
    s = FOV / 96
    assert vol.spacing == pytest.approx((s, s, 1.25))  # 360 mm field of view, 1.25 mm slices
    centre = [vol.origin[i] + (n - 1) / 2 * vol.spacing[i] for i, n in enumerate((96, 64, 4))]
    assert centre == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    assert vol.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert vol.source == "chest phantom seed 7"
    np.testing.assert_array_equal(vol.hu, chest_phantom((4, 64, 96), vol.spacing, seed=7))
    vol2 = chest_phantom_volume((2, 32, 32), spacing_mm=(1.0, 1.0, 2.0), options=ChestPhantomOptions(z_center_mm=50))
    assert vol2.spacing == (1.0, 1.0, 2.0)
    assert vol2.origin == pytest.approx((-15.5, -15.5, 49.0))
