"""Segmentation: tiled inference with blending, the masked loss, training on real / generated data, the CLI."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import zarr
from checkpoints import CLASSES, TINY_UNET, make_checkpoint
from PIL import Image

from emserve.card import ModelCard
from emserve.classes import ABSENT, PRESENT, UNKNOWN
from emserve.data.store import EMStore
from emserve.data.writer import INFERENCE_GROUP, CropToWrite, write_store
from emserve.runtime.base import CallableRuntime
from emserve.runtime.load import load_runtime
from emserve.segmentation import masks_from_probabilities, probabilities, segment_array, segment_image, tile_count
from emserve.volumes import EMSource, segment_store
from training.export import export_model
from training.seg import SegBatchSource, SegConfig, seg_loss, train_seg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pointwise_card(exclusive=False):
    unet = {"in_channels": 1, "out_channels": 2 + exclusive, "multipliers": [1, 2], "timestep": False}
    return ModelCard(mode="segmentation", classes=CLASSES, patch_size=16, unet=unet, exclusive=exclusive)


def pointwise_runtime(exclusive=False, calls=None):
    """A 'network' whose output at a pixel depends on that pixel only, so tiling must not change anything."""
    card = pointwise_card(exclusive)

    def fn(x, t, cond):
        if calls is not None:
            calls.append(x.shape)
        channels = [4 * x, -3 * x + 0.5, np.sin(5 * x)]
        return np.concatenate(channels[: card.unet["out_channels"]], axis=1)

    return CallableRuntime(card, fn, backend="test")


@pytest.mark.parametrize("shape", [(16, 16), (37, 50), (7, 90), (100, 33)])
@pytest.mark.parametrize("exclusive", [False, True])
def test_tiles_blend_to_the_whole_image_result(shape, exclusive):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    runtime = pointwise_runtime(exclusive)
    probs = segment_image(runtime, image, tile=16, overlap=5, batch_size=3)
    x = image.astype(np.float32)[None, None] / 127.5 - 1
    whole = runtime.fn(x, None, {})[0]
    if exclusive:
        e = np.exp(whole - whole.max(0))
        expected = (e / e.sum(0))[1:]
    else:
        expected = 1 / (1 + np.exp(-whole))
    assert probs.shape == (2, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_a_volume_is_segmented_slice_by_slice_along_the_chosen_axis():
    volume = np.random.default_rng(1).integers(0, 256, (5, 20, 24), dtype=np.uint8)
    calls = []
    runtime = pointwise_runtime(calls=calls)
    along_y = segment_array(runtime, volume, axis="y", batch_size=64)
    assert along_y.shape == (2, 5, 20, 24)
    assert len(calls) == 20  # one call per y-slice (all its tiles in one batch)
    np.testing.assert_allclose(along_y, segment_array(runtime, volume, axis="z"), atol=1e-6)  # pointwise: same


def depth_runtime():
    """A 3-section 'network' whose outputs at a pixel are the section below minus the one above, and the centre."""
    unet = {"in_channels": 3, "out_channels": 2, "multipliers": [1, 2], "timestep": False}
    card = ModelCard(mode="segmentation", classes=CLASSES, patch_size=16, unet=unet, depth=3)
    return CallableRuntime(card, lambda x, t, cond: np.concatenate([x[:, :1] - x[:, 2:], x[:, 1:2]], axis=1),
                           backend="test")


@pytest.mark.parametrize("axis", ["z", "y"])
def test_a_depth_network_reads_each_slices_neighbours_mirrored_at_the_volumes_ends(axis, tmp_path):
    volume = np.random.default_rng(2).integers(0, 256, (5, 20, 24), dtype=np.uint8)
    runtime = depth_runtime()
    probs = segment_array(runtime, volume, axis=axis, tile=16, overlap=5)
    along = "zyx".index(axis)
    x = np.moveaxis(volume.astype(np.float32) / 127.5 - 1, along, 0)
    below, above = x[[1, *range(len(x) - 1)]], x[[*range(1, len(x)), len(x) - 2]]
    expected = np.moveaxis(1 / (1 + np.exp(-np.stack([below - above, x]))), 1, 1 + along)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    # a store is written one slice per block: the neighbours come from outside each block, as whole
    out = segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", axis=axis, tile=16, overlap=5)
    masks = np.stack([zarr.open_array(str(out / f"{INFERENCE_GROUP}/segmentation/{c}/s0"))[...] for c in CLASSES])
    np.testing.assert_array_equal(masks, masks_from_probabilities(runtime.card, probs))


def test_a_depth_network_refuses_a_single_section_by_name(tmp_path):
    runtime = depth_runtime()
    with pytest.raises(ValueError, match="depth: 3 adjacent sections need a volume of 2 sections at least along "
                                         r"the slicing axis; this one has 1 \(a 2D image: use a depth-1 network\)"):
        segment_array(runtime, np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="depth: 3 adjacent sections need"):
        segment_store(runtime, EMSource(np.zeros((1, 16, 16), np.uint8)), tmp_path / "pred.zarr")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match="depth: 4 is not allowed; allowed: an odd number of sections >= 1"):
        ModelCard(mode="segmentation", classes=CLASSES, patch_size=16, unet={}, depth=4)
    with pytest.raises(ValueError, match=r"depth: 3; allowed for a 'pairs' model: 1 \(only segmentation"):
        ModelCard(mode="pairs", classes=CLASSES, patch_size=16, unet={}, depth=3)


@pytest.mark.parametrize(("shape", "tile", "overlap", "axis"), [
    ((16, 16), 16, 4, "z"), ((37, 50), 16, 5, "z"), ((7, 90), 16, 15, "z"), ((3, 1, 1), 16, 0, "z"),
    ((5, 20, 24), 8, 3, "y"), ((5, 20, 24), 16, 1, "x"), ((40, 33), 2, 1, "z")])
def test_tiles_are_counted_from_the_shape_as_the_loops_run_them(shape, tile, overlap, axis):
    calls = []
    segment_array(pointwise_runtime(calls=calls), np.zeros(shape, np.uint8), axis=axis, tile=tile, overlap=overlap,
                  batch_size=1)
    assert tile_count(shape, tile, overlap, axis) == len(calls)


def test_the_tiles_of_huge_requests_are_counted_at_once():
    assert tile_count((10**7, 1, 1), 16, 4) == 10**7  # ten million one-voxel slices
    assert tile_count((4096, 4096), 1024, 1023) == 3073**2  # the largest tile at stride 1


def test_a_tick_that_raises_stops_segmentation_before_the_next_network_call(tmp_path):
    calls, ticks = [], []

    def tick():
        ticks.append(len(calls))
        if len(ticks) > 3:
            raise TimeoutError("deadline")

    with pytest.raises(TimeoutError):
        segment_array(pointwise_runtime(calls=calls), np.zeros((4, 40, 40), np.uint8), tile=16, batch_size=2, tick=tick)
    assert ticks == [0, 1, 2, 3] and len(calls) == 3
    ticks.clear()
    with pytest.raises(TimeoutError):
        segment_store(pointwise_runtime(), EMSource(np.zeros((4, 40, 40), np.uint8)), tmp_path / "pred.zarr",
                      tick=tick)
    assert [p.name for p in tmp_path.iterdir()] == [".pred.zarr.partial"]  # hidden; a rerun continues it


def test_bad_tiling_and_inputs_are_refused_naming_the_field():
    runtime = pointwise_runtime()
    with pytest.raises(ValueError, match="tile: 11 must be a positive multiple of 2"):
        segment_image(runtime, np.zeros((8, 8), np.uint8), tile=11)
    with pytest.raises(ValueError, match="overlap: 16 must be in"):
        segment_image(runtime, np.zeros((8, 8), np.uint8), overlap=16)
    with pytest.raises(ValueError, match="raw: dtype uint16 is not allowed"):
        segment_image(runtime, np.zeros((8, 8), np.uint16))
    with pytest.raises(ValueError, match=r"float EM must be in \[-1, 1\]"):
        segment_image(runtime, np.full((8, 8), 3.0, np.float32))
    with pytest.raises(ValueError, match="axis: 'w' is not allowed"):
        segment_array(runtime, np.zeros((2, 8, 8), np.uint8), axis="w")


def test_exclusive_masks_pick_one_class_or_background():
    card = pointwise_card(exclusive=True)
    probs = np.array([[0.6, 0.2, 0.3], [0.1, 0.3, 0.4]], np.float32)  # background: 0.3, 0.5, 0.3
    masks = masks_from_probabilities(card, probs)
    assert masks.tolist() == [[True, False, False], [False, False, True]]


def test_confident_logits_give_probabilities_0_and_1_without_overflow_warnings():
    """A trained network emits logits far below -88, where exp(-x) overflows float32; segmenting must stay quiet."""
    logits = np.array([[[[-1000.0, -90.0, 0.0, 3.0, 1000.0]]]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = probabilities(pointwise_card(), logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs[0, 0, 0], [0.0, 0.0, 0.5, 1 / (1 + np.exp(-3.0)), 1.0], atol=1e-7)


def test_unannotated_voxels_do_not_change_the_loss():
    rng = np.random.default_rng(2)
    labels = torch.from_numpy(rng.choice([ABSENT, PRESENT, UNKNOWN], size=(2, 2, 8, 8)).astype(np.uint8))
    labels[:, 0, :2] = PRESENT  # both losses have something annotated to work with
    for exclusive in (False, True):
        logits = torch.from_numpy(rng.normal(size=(2, 2 + exclusive, 8, 8)).astype(np.float32))
        unknown = (labels == UNKNOWN).any(1, keepdim=True) if exclusive else (labels == UNKNOWN)
        if exclusive:  # a voxel with a present class is determined whatever the others say
            unknown &= ~(labels == PRESENT).any(1, keepdim=True)
        changed = torch.where(unknown, logits + 10 * torch.randn_like(logits), logits)
        base = seg_loss(logits, labels, exclusive, 1.0)
        assert torch.isclose(base, seg_loss(changed, labels, exclusive, 1.0))
        annotated = torch.where(~unknown, 2 * logits, logits)
        assert not torch.isclose(base, seg_loss(annotated, labels, exclusive, 1.0))


def test_a_patch_weighing_twice_another_counts_like_two_copies_of_it():
    """seg_loss([a, b], weights [2, 1]) is the loss of [a, a, b] unweighted: a weight multiplies a patch's voxels
    in both the cross-entropy and the Dice sums."""
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.choice([ABSENT, PRESENT, UNKNOWN], size=(2, 2, 8, 8), p=[0.5, 0.3, 0.2])
                              .astype(np.uint8))
    for exclusive in (False, True):
        logits = torch.from_numpy(rng.normal(size=(2, 2 + exclusive, 8, 8)).astype(np.float32))
        weighted = seg_loss(logits, labels, exclusive, 1.0, torch.tensor([2.0, 1.0]))
        copies = seg_loss(logits[[0, 0, 1]], labels[[0, 0, 1]], exclusive, 1.0)
        assert torch.isclose(weighted, copies, rtol=1e-5)
        assert torch.isclose(seg_loss(logits, labels, exclusive, 1.0, torch.ones(2)), seg_loss(logits, labels,
                                                                                               exclusive, 1.0))
        assert not torch.isclose(weighted, seg_loss(logits, labels, exclusive, 1.0))


@pytest.fixture(scope="module")
def trained(toy_store, tmp_path_factory):
    """A tiny segmentation network trained on the toy stores (mito bright, lipid droplets dark)."""
    run = tmp_path_factory.mktemp("seg")
    cfg = SegConfig(stores=[str(toy_store[0])], out=str(run), classes=CLASSES, patch_size=32, batch_size=8, steps=80,
                    lr=3e-3, ema=0.9, checkpoint_every=40, preview_every=80, **TINY_UNET)
    return train_seg(cfg), run


def test_training_learns_the_toy_organelles_and_tiled_inference_finds_them(trained, toy_store):
    checkpoint, run = trained
    log = [float(line.split('"loss": ')[1].split(",")[0]) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1] < 0.6 * log[0]
    assert (run / "samples" / "step-00000080.png").exists()
    runtime = load_runtime(checkpoint, "torch", device="cpu")
    crop = EMStore(toy_store[1]).read_crop("crop1", CLASSES)  # the other dataset: darker, noisier
    masks = masks_from_probabilities(runtime.card, segment_array(runtime, crop.raw[:2], tile=32))
    truth = crop.labels[:, :2] == PRESENT
    dice = [2 * (m & t).sum() / (m.sum() + t.sum()) for m, t in zip(masks, truth, strict=True)]
    assert min(dice) > 0.7, dice


def test_fine_tuning_starts_from_the_checkpoints_weights_and_refuses_another_network(trained, toy_store, tmp_path):
    checkpoint, _ = trained
    start = load_runtime(checkpoint, "torch", device="cpu")
    common = dict(stores=[str(toy_store[0])], classes=CLASSES, patch_size=32, batch_size=4, steps=1,
                  checkpoint_every=1, preview_every=1, **TINY_UNET)
    frozen = train_seg(SegConfig(out=str(tmp_path / "tuned"), lr=0.0, init=str(checkpoint), **common))
    tuned = load_runtime(frozen, "torch", device="cpu")  # lr 0: still the starting weights after a step
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(tuned.segment(x), start.segment(x), atol=1e-6)
    card = ModelCard.load(frozen)
    assert card.training["init"] == {"checkpoint": str(checkpoint), "weights": start.card.weights}
    fresh = load_runtime(train_seg(SegConfig(out=str(tmp_path / "fresh"), lr=0.0, **common)), "torch", device="cpu")
    assert not np.allclose(fresh.segment(x), start.segment(x), atol=1e-3)
    with pytest.raises(ValueError, match=r"init: .* has unet=.*; this run needs"):
        train_seg(SegConfig(out=str(tmp_path / "wider"), init=str(checkpoint), **{**common, "width": 16}))


def test_generated_stores_train_alone_or_mixed(toy_store, tmp_path):
    common = dict(classes=CLASSES, patch_size=16, batch_size=4, steps=2, checkpoint_every=2, preview_every=2,
                  **TINY_UNET)
    alone = train_seg(SegConfig(stores=[], generated=[str(toy_store[1])], out=str(tmp_path / "gen"), **common))
    mixed = train_seg(SegConfig(stores=[str(toy_store[0])], generated=[str(toy_store[1])], generated_fraction=0.25,
                                out=str(tmp_path / "mix"), **common))
    assert ModelCard.load(alone).training["generated"] == [str(toy_store[1])]
    assert ModelCard.load(mixed).training["config"]["generated_fraction"] == 0.25
    with pytest.raises(ValueError, match="stores: give real stores, --generated stores, or both"):
        SegConfig(stores=[], out=str(tmp_path / "none"), classes=CLASSES)
    # a generated store whose every sample screening rejected: nothing to learn, refused before training
    rejected = write_store(tmp_path / "rejected.zarr", np.zeros((4, 16, 16), np.uint8), (8, 8, 8),
                           [CropToWrite("crop1", (0, 0, 0), {c: np.full((4, 16, 16), UNKNOWN, np.uint8)
                                                             for c in CLASSES})])
    with pytest.raises(ValueError, match=r"stores: \[.*rejected\.zarr'\] annotate none of the classes mito_mem, "
                                         r"ld_lum anywhere .*generate with --despeckle N"):
        train_seg(SegConfig(stores=[], generated=[str(rejected)], out=str(tmp_path / "rej"), **common))
    assert not (tmp_path / "rej").exists()


def test_rejected_generated_samples_take_no_batch_slots_and_generated_patches_carry_their_weight(toy_store, tmp_path):
    labels = np.zeros((6, 16, 16), np.uint8)
    labels[:, 4:9, 4:9] = 1
    labels[[1, 2, 4]] = UNKNOWN  # screening (or filtering) rejected samples 1, 2 and 4
    raw = np.repeat(np.arange(6, dtype=np.uint8)[:, None, None] * 40, 16, axis=1).repeat(16, axis=2)
    store = write_store(tmp_path / "gen.zarr", raw, (8, 8, 8), [CropToWrite("crop1", (0, 0, 0), {c: labels
                                                                                               for c in CLASSES})])
    source = SegBatchSource(SegConfig(stores=[str(toy_store[0])], generated=[str(store)], generated_fraction=0.5,
                                      generated_weight=0.25, out=str(tmp_path / "run"), classes=CLASSES,
                                      patch_size=16))
    batch, weight = source.sample(np.random.default_rng(0), 64)
    drawn = np.unique(batch.raw[32:].round(3))  # each generated sample has its own grey value
    expected = EMStore(store).normalize(np.array([0, 120, 200], np.uint8))  # samples 0, 3 and 5
    np.testing.assert_allclose(drawn, expected, atol=1e-3)
    np.testing.assert_array_equal(weight, [1.0] * 32 + [0.25] * 32)


def test_an_elastic_share_of_every_batch_is_deformed_copies_of_annotated_real_patches(toy_store, tmp_path):
    config = dict(stores=[str(toy_store[0])], out=str(tmp_path / "run"), classes=CLASSES, patch_size=16,
                  labelled_slices=2)  # 2 of 8 sections annotated: most real patches carry no label
    plain = SegBatchSource(SegConfig(**config)).sample(np.random.default_rng(0), 64)[0]
    batch, weight = SegBatchSource(SegConfig(**config, elastic=0.5)).sample(np.random.default_rng(0), 64)
    annotated = (batch.labels != UNKNOWN).any(axis=(1, 2, 3))
    assert annotated[32:].all() and not annotated[:32].all()  # deformed copies of annotated patches only
    assert (plain.labels != UNKNOWN).any(axis=(1, 2, 3)).mean() < 0.5
    truth = EMStore(toy_store[0]).read_crop("crop1", CLASSES).labels  # [K, Z, Y, X]
    windows = np.lib.stride_tricks.sliding_window_view(truth, (16, 16), axis=(2, 3))  # every rigid 16 x 16 cut

    def rigid(patch):  # the patch is a flip or rotation of a cut of the annotated volume
        turns = [np.rot90(q, k, axes=(1, 2)) for q in (patch, patch[..., ::-1]) for k in range(4)]
        return any((windows == t[:, None, None, None]).all(axis=(0, 4, 5)).any() for t in turns)

    assert all(rigid(p) for p, a in zip(batch.labels[:32], annotated[:32], strict=True) if a)
    assert not all(rigid(p) for p in batch.labels[32:])  # bent: shapes no rigid cut gives
    np.testing.assert_array_equal(weight, np.ones(64))  # real annotations, weighed as such
    with pytest.raises(ValueError, match=r"elastic: 0\.5 deforms annotated sections of real stores in the place "
                                         "generated pairs would take; allowed with real stores, without --generated "
                                         "and at depth 1 only"):
        SegConfig(**config, elastic=0.5, generated=[str(toy_store[1])])
    with pytest.raises(ValueError, match=r"elastic: must be in \[0, 1\], got 1.5"):
        SegConfig(**config, elastic=1.5)


@pytest.mark.slow
def test_segment_cli_writes_predictions_that_overlay_the_source(toy_store, tmp_path):
    checkpoint = make_checkpoint(tmp_path / "runs" / "seg", "segmentation")
    model = export_model(checkpoint, tmp_path / "models", exporter="legacy")
    out = tmp_path / "pred.zarr"
    cmd = [sys.executable, "-m", "emserve.cli", "segment", str(model), str(toy_store[0]), str(out), "--probabilities",
           "--tile", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    root = zarr.open_group(str(out), mode="r")
    store = EMStore(toy_store[0])
    level = store.em_level()
    expected = segment_array(load_runtime(model, "onnx"), store.normalize(store.em_volume(level)[...]), tile=32)
    for k, name in enumerate(CLASSES):
        group = root[f"{INFERENCE_GROUP}/segmentation/{name}"]
        scale, translation = group.attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert scale["scale"] == list(level.voxel_size) and translation["translation"] == list(level.translation)
        np.testing.assert_array_equal(group["s0"][...], expected[k] > 0.5)
        probs = root[f"{INFERENCE_GROUP}/probabilities/{name}/s0"][...]
        np.testing.assert_allclose(probs / 255, expected[k], atol=1 / 255)
    record = root.attrs["emserve"]["segmented"]["model"]
    assert record["files"] == ModelCard.load(model).files
    assert (record["backend"], record["precision"]) == ("onnx", "fp32")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    half = subprocess.run([*cmd[:-3], "--precision", "bf16", "--overwrite"], capture_output=True, text=True,
                          timeout=120)
    assert half.returncode == 2 and "precision: 'bf16' needs backend torchscript or torch" in half.stderr
    kept = zarr.open_group(str(out), mode="r")  # --overwrite was given, but the store is left as it was
    assert kept.attrs["emserve"]["segmented"]["model"]["precision"] == "fp32"

    plane = np.asarray(store.em_volume(level)[3])  # one slice as a PNG: read as 0..255, no contrast window
    Image.fromarray(plane).save(tmp_path / "slice.png")
    from_png = subprocess.run([sys.executable, "-m", "emserve.cli", "segment", str(model), str(tmp_path / "slice.png"),
                               str(tmp_path / "png.zarr"), "--tile", "32"], capture_output=True, text=True, timeout=120)
    assert from_png.returncode == 0, from_png.stderr
    masks = zarr.open_group(str(tmp_path / "png.zarr"), mode="r")[f"{INFERENCE_GROUP}/segmentation/{CLASSES[0]}/s0"]
    np.testing.assert_array_equal(masks[...], segment_array(load_runtime(model, "onnx"), plane[None], tile=32)[0] > 0.5)


def test_segmenting_a_store_into_itself_is_refused_even_with_overwrite(toy_store, tmp_path):
    store = EMStore(toy_store[0])
    before = store.em_volume(store.em_levels[0])[...]
    with pytest.raises(ValueError, match=f"output: {toy_store[0]} is the input {toy_store[0]}, inside it or around"):
        segment_store(pointwise_runtime(), EMSource(before), toy_store[0], overwrite=True,
                      source_name=str(toy_store[0]))
    np.testing.assert_array_equal(store.em_volume(store.em_levels[0])[...], before)


@pytest.fixture(scope="module")
def hidden_sections(tmp_path_factory):
    """Objects through every section, visible in the odd sections' EM only: the even sections' EM is noise, so
    only a network that reads a section's neighbours can find the objects there."""
    rng = np.random.default_rng(5)
    shape = (8, 64, 64)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    mito = np.zeros(shape, np.uint8)
    for _ in range(5):
        cy, cx, r = rng.integers(8, 56), rng.integers(8, 56), rng.integers(5, 9)
        mito[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 1
    raw = np.full(shape, 120.0)
    raw[1::2][mito[1::2] == 1] = 220
    raw = (raw + rng.normal(0, 8, shape)).clip(0, 255).astype(np.uint8)
    return write_store(tmp_path_factory.mktemp("hidden") / "hidden.zarr", raw, (8, 8, 8),
                       [CropToWrite("crop1", (0, 0, 0), {"mito_mem": mito})])


@pytest.mark.slow
def test_a_depth_3_network_finds_objects_its_section_does_not_show_and_exports_with_its_depth(hidden_sections,
                                                                                               tmp_path):
    dice = {}
    for depth in (1, 3):
        cfg = SegConfig(stores=[str(hidden_sections)], out=str(tmp_path / f"depth-{depth}"), classes=["mito_mem"],
                        patch_size=32, batch_size=8, steps=80, lr=3e-3, ema=0.9, checkpoint_every=80,
                        preview_every=80, depth=depth, **TINY_UNET)
        checkpoint = train_seg(cfg)
        runtime = load_runtime(checkpoint, "torch", device="cpu")
        crop = EMStore(hidden_sections).read_crop("crop1", ["mito_mem"])
        probs = segment_array(runtime, crop.raw, tile=32)
        masks, truth = probs[0, 0::2] > 0.5, crop.labels[0, 0::2] == PRESENT  # the sections that show nothing
        dice[depth] = 2 * (masks & truth).sum() / (masks.sum() + truth.sum())
    assert dice[3] > 0.7 and dice[1] < 0.4, dice
    card = ModelCard.load(checkpoint)
    assert card.depth == 3 and card.unet["in_channels"] == 3
    model = export_model(checkpoint, tmp_path / "models", exporter="legacy")
    assert ModelCard.load(model).depth == 3
    np.testing.assert_allclose(segment_array(load_runtime(model, "onnx"), crop.raw, tile=32), probs, atol=1e-4)


def test_depth_needs_real_volumes_and_a_resumed_or_fine_tuned_run_its_own_depth(trained, toy_store, tmp_path):
    common = dict(stores=[str(toy_store[0])], classes=CLASSES, patch_size=32, batch_size=4, steps=1,
                  checkpoint_every=1, preview_every=1, **TINY_UNET)
    with pytest.raises(ValueError, match="depth: 3 needs adjacent sections of one volume, and generated stores hold "
                                         "independent 2D samples; allowed with --generated: depth 1"):
        SegConfig(out=str(tmp_path / "gen"), generated=[str(toy_store[1])], depth=3, **common)
    with pytest.raises(ValueError, match=r"init: .* has depth=1; this run needs 3"):
        train_seg(SegConfig(out=str(tmp_path / "deeper"), init=str(trained[0]), depth=3, **common))
    train_seg(SegConfig(out=str(tmp_path / "run"), **common))
    with pytest.raises(ValueError, match=r"resume: .* was trained with depth=1, this run asks for 3"):
        train_seg(SegConfig(out=str(tmp_path / "run"), depth=3, **{**common, "steps": 2}), resume=True)


@pytest.mark.slow
def test_train_seg_cli_takes_a_depth_and_refuses_an_even_one_by_name(hidden_sections, tmp_path):
    cmd = [sys.executable, "-m", "emserve.cli", "train", "seg", str(hidden_sections), "--out", str(tmp_path / "run"),
           "--classes", "mito_mem", "--patch-size", "32", "--batch-size", "2", "--steps", "2", "--width", "8",
           "--multipliers", "1,2", "--blocks-per-level", "1"]
    even = subprocess.run([*cmd, "--depth", "2"], capture_output=True, text=True, timeout=120)
    assert even.returncode == 2
    assert "depth: 2 is not allowed; allowed: an odd number of sections >= 1 (1 = 2D)" in " ".join(even.stderr.split())
    assert not (tmp_path / "run").exists()
    done = subprocess.run([*cmd, "--depth", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ModelCard.load(next((tmp_path / "run").glob("step-*"))).depth == 3


@pytest.mark.slow
def test_segmentation_batches_drawn_by_worker_processes_are_those_drawn_in_process(toy_store, tmp_path):
    common = dict(stores=[str(toy_store[0])], generated=[str(toy_store[1])], classes=CLASSES, patch_size=16,
                  batch_size=4, steps=4, checkpoint_every=4, preview_every=4, **TINY_UNET)
    runs = [train_seg(SegConfig(out=str(tmp_path / str(n)), data_workers=n, **common)) for n in (0, 2)]
    here, workers = (json.loads((run / "state.json").read_text())["losses"] for run in runs)
    assert workers == here
