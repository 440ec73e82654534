import numpy as np
import pytest
from scipy import ndimage

from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.patches import (
    PatchSampler,
    RawPatchSampler,
    class_presence,
    label_channels,
    load_crops,
    neighbour_sections,
)
from emserve.data.store import EMStore
from emserve.data.writer import CropToWrite, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """EM whose intensity is determined by the labels (mito bright, ld dark), so any misalignment between raw
    and labels after augmentation shows; ld is rare; crop2 leaves ld unannotated."""
    rng = np.random.default_rng(0)
    shape = (8, 48, 48)
    mito = np.zeros(shape, np.uint8)
    mito[:, 5:20, 8:30] = PRESENT
    mito[:, 30:40, 3:9] = PRESENT  # asymmetric, so flips and rotations are visible
    ld = np.zeros(shape, np.uint8)
    ld[:, 40:43, 40:43] = PRESENT
    raw = np.full(shape, 128, np.uint8)
    raw[mito == PRESENT] = 250
    raw[ld == PRESENT] = 5
    volume = np.concatenate([raw, rng.integers(0, 255, size=(8, 48, 48), dtype=np.uint8)])
    crops = [
        CropToWrite("crop1", (0, 0, 0), {"mito": mito, "ld": ld}),
        CropToWrite("crop2", (0, 0, 0), {"mito": mito}),
    ]
    path = tmp_path_factory.mktemp("p") / "toy.zarr"
    write_store(path, volume, (8, 8, 8), crops, levels=1)
    return EMStore(path)


def test_augmented_raw_and_labels_stay_aligned(store):
    crops = load_crops([store], ["mito", "ld"], crops={"toy": ["crop1"]})
    sampler = PatchSampler(crops, 16, augment=True)
    batch = sampler.sample(np.random.default_rng(1), 64)
    raw, labels = batch.raw[:, 0], batch.labels
    bright, dark = raw > 0.9, raw < -0.9
    assert np.array_equal(bright, labels[:, 0] == PRESENT)
    assert np.array_equal(dark, labels[:, 1] == PRESENT)
    # augmentation really happened: some patch differs from every unaugmented cut at the same position
    plain = PatchSampler(crops, 16, augment=False).sample(np.random.default_rng(1), 64)
    assert not np.array_equal(plain.labels, batch.labels)


def test_elastic_deformation_bends_raw_and_labels_alike_into_new_shapes(store):
    crops = load_crops([store], ["mito", "ld"], crops={"toy": ["crop1"]})
    batch = PatchSampler(crops, 32, elastic=True).sample(np.random.default_rng(1), 64)
    raw, mito = batch.raw[:, 0], batch.labels[:, 0]
    assert set(np.unique(batch.labels)) <= {ABSENT, PRESENT}  # nearest neighbour: codes stay codes
    assert np.all(mito[raw > 0.9] == PRESENT)  # interpolated EM this bright is mitochondrion all around
    assert np.all(raw[mito == PRESENT] > 0.2)  # a labelled pixel's nearest EM pixel weighs at least a quarter

    def rectangles(masks):  # the toy's mitochondria are rectangles, and flips and rotations keep them so
        regions = [(m[box], box) for m in masks for box in ndimage.find_objects(ndimage.label(m)[0])]
        return all(region.all() for region, _ in regions)

    assert rectangles(PatchSampler(crops, 32).sample(np.random.default_rng(1), 64).labels[:, 0] == PRESENT)
    assert not rectangles(mito == PRESENT)  # bent: regions that fill no longer their bounding box
    again = PatchSampler(crops, 32, elastic=True).sample(np.random.default_rng(1), 64)
    assert again.labels.tobytes() == batch.labels.tobytes()  # the bend comes from the batch's random stream
    with pytest.raises(ValueError, match="elastic: deforming is augmentation; allowed with augment=True only"):
        PatchSampler(crops, 32, augment=False, elastic=True)


def test_class_balanced_sampling_raises_the_rare_class_frequency(store):
    crops = load_crops([store], ["mito", "ld"], crops={"toy": ["crop1"]})
    rng = np.random.default_rng(2)
    uniform = PatchSampler(crops, 16, balance=0.0, class_groups=[["ld"]]).sample(rng, 400)
    balanced = PatchSampler(crops, 16, balance=1.0, class_groups=[["ld"]]).sample(rng, 400)
    freq = lambda b: (b.labels[:, 1] == PRESENT).any(axis=(1, 2)).mean()  # noqa: E731
    assert freq(balanced) == 1.0
    assert freq(uniform) < 0.3


def test_unannotated_class_is_unknown_not_absent(store):
    (crop,) = load_crops([store], ["mito", "ld"], crops={"toy": ["crop2"]})
    assert (crop.labels[1] == UNKNOWN).all()
    batch = PatchSampler([crop], 16).sample(np.random.default_rng(3), 4)
    channels = label_channels(batch.labels)
    assert (channels[:, 1] == 0).all() and not batch.annotated[:, 1].any()
    assert set(np.unique(channels[:, 0])) <= {-1.0, 1.0}
    presence = class_presence(batch.labels)
    assert (presence[:, 1] == 0).all()


def test_class_presence_is_tri_state():
    labels = np.full((3, 1, 4, 4), ABSENT, np.uint8)
    labels[0, 0, 1, 1] = PRESENT
    labels[2, 0, 0, 0] = UNKNOWN
    assert class_presence(labels)[:, 0].tolist() == [1.0, -1.0, 0.0]


def test_tiles_cover_every_voxel_of_every_plane(store):
    crops = load_crops([store], ["mito"], crops={"toy": ["crop1"]})
    sampler = PatchSampler(crops, 20, augment=False)
    covered = np.zeros(crops[0].raw.shape, bool)
    for _, plane, a, b in sampler.tiles(stride=16):
        covered[plane, a:a + 20, b:b + 20] = True
    assert covered.all()
    corners = sampler.tiles()
    batch = sampler.cut(corners[:3])
    assert np.array_equal(batch.raw[0, 0], crops[0].raw[0, :20, :20])


@pytest.mark.parametrize("depth", [1, 3, 5, 9])
@pytest.mark.parametrize("planes", [2, 3, 4, 8])
def test_neighbour_sections_mirror_at_the_ends_as_numpy_reflect_padding(depth, planes):
    padded = np.pad(np.arange(planes), depth // 2, mode="reflect")
    for index in range(planes):
        assert neighbour_sections(index, depth, planes) == padded[index:index + depth].tolist()


def test_depth_patches_stack_the_neighbouring_sections_around_the_labelled_one(store):
    crops = load_crops([store], ["mito", "ld"], crops={"toy": ["crop1"]})
    sampler = PatchSampler(crops, 16, augment=False, depth=3)
    corners = [(0, 0, 5, 7), (0, 4, 0, 0), (0, 7, 30, 2)]  # the first and last planes mirror their neighbour
    batch = sampler.cut(corners)
    assert batch.raw.shape == (3, 3, 16, 16) and batch.labels.shape == (3, 2, 16, 16)
    raw, labels = crops[0].raw, crops[0].labels
    for (_, plane, a, b), stack, lab in zip(corners, batch.raw, batch.labels, strict=True):
        below, above = (1 if plane == 0 else plane - 1), (6 if plane == 7 else plane + 1)
        for channel, section in enumerate((below, plane, above)):
            np.testing.assert_array_equal(stack[channel], raw[section, a:a + 16, b:b + 16])
        np.testing.assert_array_equal(lab, labels[:, plane, a:a + 16, b:b + 16])  # the centre's labels only
    augmented = PatchSampler(crops, 16, depth=3).sample(np.random.default_rng(0), 8)
    assert augmented.raw.shape == (8, 3, 16, 16)


def test_bad_depths_are_refused_by_name(store):
    crops = load_crops([store], ["mito"], crops={"toy": ["crop1"]})
    for depth in (0, 2, -3, 2.0, True):
        with pytest.raises(ValueError, match=rf"depth: {depth!r} is not allowed; allowed: an odd number"):
            PatchSampler(crops, 16, depth=depth)
    with pytest.raises(ValueError, match="depth: 3 adjacent sections need a volume of 2 sections at least"):
        neighbour_sections(0, 3, 1)
    assert neighbour_sections(0, 1, 1) == [0]


def test_patch_larger_than_the_crop_is_refused_with_the_limit(store):
    crops = load_crops([store], ["mito"], crops={"toy": ["crop1"]})
    with pytest.raises(ValueError, match=r"patch_size: 64 .*<= 48"):
        PatchSampler(crops, 64)
    with pytest.raises(ValueError, match="axis: 'w'"):
        PatchSampler(crops, 16, axis="w")


def test_raw_patches_cover_unlabelled_regions_and_are_normalized(store):
    sampler = RawPatchSampler([store], 16, axis="y")
    raw, dataset = sampler.sample(np.random.default_rng(4), 32)
    assert raw.shape == (32, 1, 16, 16) and raw.dtype == np.float32
    assert raw.min() >= -1 and raw.max() <= 1
    assert (dataset == 0).all()
    # along y the 16 z planes are reachable; half of them lie outside the labelled crop (noise there)
    assert raw.std() > 0.2
