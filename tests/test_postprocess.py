import numpy as np

from emserve.postprocess import Screening, labels_from_channels

CLASSES = ["mito_mem", "mito_lum", "ld_lum"]


def ring(size=32, centre=(16, 16), r_in=5, r_out=7):
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(yy - centre[0], xx - centre[1])
    return (d >= r_in) & (d < r_out), d < r_in


def test_threshold_allows_overlap_and_argmax_is_exclusive():
    channels = np.full((3, 4, 4), -1.0)
    channels[0, :2] = 0.5
    channels[1, :2] = 0.8
    channels[2, 3] = -0.2  # below threshold everywhere: background
    overlap = labels_from_channels(channels, "threshold")
    assert overlap[0, :2].all() and overlap[1, :2].all()
    exclusive = labels_from_channels(channels, "argmax")
    assert exclusive.sum(0).max() == 1
    assert exclusive[1, :2].all() and not exclusive[0].any()
    assert not exclusive[:, 2:].any()


def test_screening_accepts_an_enclosed_lumen_and_rejects_broken_ones():
    membrane, lumen = ring()
    screening = Screening()
    good = np.stack([membrane, lumen, np.zeros_like(lumen)])
    assert screening.check(good, CLASSES) == []

    broken = membrane.copy()
    broken[:, 16:] = False  # half the membrane gone
    assert screening.check(np.stack([broken, lumen, np.zeros_like(lumen)]), CLASSES) == [
        "mito_lum: lumen not enclosed by mito_mem"]

    naked = np.stack([np.zeros_like(lumen), lumen, np.zeros_like(lumen)])
    assert screening.check(naked, CLASSES) == ["mito_lum: lumen without membrane"]
    assert (screening.accepted, screening.rejected) == (1, 2)
    assert "accepted 1 of 3" in screening.summary()


def test_a_lumen_cut_by_the_patch_border_is_plausible():
    membrane, lumen = ring(centre=(2, 16))
    assert Screening().check(np.stack([membrane, lumen, np.zeros_like(lumen)]), CLASSES) == []


def test_min_size_rejects_specks():
    masks = np.zeros((3, 16, 16), bool)
    masks[2, 3, 3] = True
    assert Screening(min_size=4).check(masks, CLASSES) == ["ld_lum: object smaller than 4 px"]
    assert Screening(min_size=0).check(masks, CLASSES) == []


def test_despeckling_drops_small_objects_so_a_plausible_map_passes_screening():
    membrane, lumen = ring()
    channels = np.where(np.stack([membrane, lumen, np.zeros_like(lumen)]), 1.0, -1.0)
    channels[1, 0:2, 25:27] = 1.0  # a 2x2 mito_lum speck with no membrane: the map is rejected for it
    channels[2, 28:30, 2:4] = 1.0  # a 2x2 ld_lum speck
    channels[0, 31, 10:13] = 1.0  # a 3-pixel mito_mem sliver
    channels = np.stack([channels, channels])  # a batch of two: despeckling works per sample and class
    kept = labels_from_channels(channels, "threshold")
    assert Screening().check(kept[0], CLASSES) == ["mito_lum: lumen without membrane"]
    cleaned = labels_from_channels(channels, "threshold", despeckle=5)
    assert not cleaned[:, 2].any() and not cleaned[:, 0, 31].any()
    assert np.array_equal(cleaned[:, 0], np.stack([membrane, membrane]))  # the ring (96 px) stays whole
    assert np.array_equal(cleaned[:, 1], np.stack([lumen, lumen]))
    assert Screening().check(cleaned[0], CLASSES) == []
    exclusive = labels_from_channels(channels, "argmax", despeckle=5)
    assert not exclusive[:, 2].any() and exclusive[:, 1].sum() == 2 * lumen.sum()


def test_paired_decoding_encloses_every_lumen_in_its_membrane_keeping_the_lumen_as_drawn():
    membrane, lumen = ring()
    rng = np.random.default_rng(0)
    channels = np.where(np.stack([membrane, lumen, np.zeros_like(lumen)]), 1.0, -1.0) + rng.normal(0, 0.1, (3, 32, 32))
    channels[0, :, 16:] = -1.0  # half the membrane not drawn: threshold or argmax decoding is rejected for it
    channels[1, 28:31, 2:12] = 1.0  # a lumen drawn without membrane, touching the patch's edge nowhere
    channels[2, 20:26, 24:30] = 1.0  # a lipid droplet lumen: no ld_mem channel, so left as drawn
    channels[2, 29, 12] = 2.0  # a lipid droplet pixel beside the naked lumen: its ring takes it
    argmax = labels_from_channels(channels, "argmax")
    assert Screening().check(argmax, CLASSES) != []
    paired = labels_from_channels(channels, "paired", classes=CLASSES)
    assert Screening().check(paired, CLASSES) == []
    np.testing.assert_array_equal(paired[1], argmax[1])  # every lumen as drawn
    assert paired.sum(0).max() == 1  # still one class per pixel
    assert not (argmax[0] & ~paired[0]).any()  # the membrane as drawn is kept
    np.testing.assert_array_equal(paired[0, 8:25, :11], argmax[0, 8:25, :11])  # where the membrane was drawn: as drawn
    assert paired[0, 16, 21] and not argmax[0, 16, 21]  # where it was not: the pixel outside the lumen became membrane
    assert not paired[0, 16, 22]  # and only that ring, one pixel wide
    assert paired[0, 27, 2:12].all() and paired[0, 28:31, 12].all()  # the naked lumen gained its ring
    assert not paired[2, 29, 12] and argmax[2, 29, 12]  # taken from the class that held it
    np.testing.assert_array_equal(paired[2, 20:26, 24:30], argmax[2, 20:26, 24:30])


def test_auto_decodes_atomic_classes_paired_and_overlapping_group_classes_by_threshold():
    from emserve.postprocess import resolve_label_method

    assert resolve_label_method("auto", CLASSES) == "paired"
    assert resolve_label_method("auto", ["mito", "pm"]) == "threshold"  # mito (a group) overlaps its members
    assert resolve_label_method("auto", []) == "threshold"
    assert resolve_label_method("argmax", CLASSES) == "argmax"
    channels = np.full((2, 4, 4), -1.0)
    channels[:, :2] = 0.5  # mito and pm both drawn: threshold keeps the overlap, as group classes need
    assert labels_from_channels(channels, "auto", classes=["mito", "pm"])[:, :2].all()
