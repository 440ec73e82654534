"""Blockwise segmentation: blocks give the whole volume's result, stopped runs continue, the pyramid's geometry,
and a real Dask LocalCluster (two worker processes, one killed with SIGKILL mid-run) ending as one process does."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr
from checkpoints import make_checkpoint
from test_segmentation import pointwise_runtime

from emserve.blockwise import DONE_FOLDER, block_grid, pyramid_count
from emserve.data.ngff import pyramid_factors, pyramid_levels
from emserve.data.store import EMStore
from emserve.data.writer import block_mean, block_vote, write_store
from emserve.runtime.load import RuntimeSpec, load_runtime
from emserve.segmentation import segment_array
from emserve.volumes import MASKS, OUT_CHUNK, PROBABILITIES, EMSource, OpenedOnWorker, segment_store
from training.export import export_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An exported segmentation network with random weights: unlike a pointwise one, its output at a voxel
    depends on the tile around it, so a block must run exactly the whole slice's tiles to match it."""
    folder = tmp_path_factory.mktemp("blockwise")
    return export_model(make_checkpoint(folder / "run", "segmentation"), folder / "models", exporter="legacy")


def arrays(out, group, classes, level="s0"):
    root = zarr.open_group(str(out), mode="r")
    return np.stack([root[f"{group}/{name}/{level}"][...] for name in classes])


@pytest.mark.parametrize("axis", ["z", "y"])
def test_blocks_cut_in_plane_give_the_whole_slices_result(tiny_model, tmp_path, axis):
    runtime = load_runtime(tiny_model, "onnx", threads=1)
    volume = np.random.default_rng(0).integers(0, 256, (3, 300, 560) if axis == "z" else (300, 3, 560), np.uint8)
    out = segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", axis=axis, tile=16, overlap=5,
                        block_size=256, keep_probabilities=True)
    whole = segment_array(runtime, volume, axis=axis, tile=16, overlap=5)
    assert len(block_grid(volume.shape, [1 if a == axis else 256 for a in "zyx"])) == 3 * 2 * 3  # blocks in-plane
    np.testing.assert_allclose(arrays(out, PROBABILITIES, runtime.card.classes) / 255, whole, atol=0.5 / 255 + 1e-6)
    clear = np.abs(whole - 0.5) > 1e-4  # batches differ from the whole slice's: float noise may flip a coin toss
    np.testing.assert_array_equal(arrays(out, MASKS, runtime.card.classes)[clear], (whole > 0.5)[clear])
    assert not (out / DONE_FOLDER).exists() and not (tmp_path / ".pred.zarr.partial").exists()


def test_a_stopped_run_continues_with_its_unfinished_blocks_and_ends_as_an_uninterrupted_one(tmp_path):
    volume = np.random.default_rng(1).integers(0, 256, (4, 300, 300), np.uint8)
    calls = []
    runtime = pointwise_runtime(calls=calls)

    def tick():
        if len(calls) >= 12:
            raise KeyboardInterrupt  # Ctrl-C after 12 network calls: blocks 1 and 2 of 16 done, the third begun

    with pytest.raises(KeyboardInterrupt):
        segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=64, overlap=16, block_size=256,
                      batch_size=4, tick=tick)
    assert not (tmp_path / "pred.zarr").exists()
    work = tmp_path / ".pred.zarr.partial"
    assert sorted(p.name for p in (work / DONE_FOLDER / "s0").iterdir()) == ["0-0-0", "0-0-256"]
    calls.clear()
    out = segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=64, overlap=16, block_size=256,
                        batch_size=4)
    # 6 x 6 tiles per slice (origins 0, 48, ..., 192, 236): the first block's 36 take 9 calls, the far edges' 6
    # take 2 each, the corner's 1 takes 1: 14 calls per slice, of which the two finished blocks' 11 not again
    assert len(calls) == 4 * 14 - 11
    fresh = segment_store(runtime, EMSource(volume), tmp_path / "fresh.zarr", tile=64, overlap=16, block_size=256,
                          batch_size=4)
    for level in ("s0", "s1"):
        np.testing.assert_array_equal(arrays(out, MASKS, runtime.card.classes, level),
                                      arrays(fresh, MASKS, runtime.card.classes, level))


def test_the_pyramid_keeps_voxel_size_and_offset_at_every_level_and_reduces_the_level_below(tmp_path):
    volume = np.random.default_rng(2).integers(0, 256, (5, 1100, 700), np.uint8)
    runtime = pointwise_runtime()
    source = EMSource(volume, voxel_size=(50.0, 4.0, 4.0), translation=(100.0, 8.0, 12.0))
    out = segment_store(runtime, source, tmp_path / "pred.zarr", tile=64, keep_probabilities=True)
    count = pyramid_count(volume.shape, source.voxel_size, OUT_CHUNK)
    assert count == 4  # 1100 -> 550 -> 275 -> 137 <= 256; sections 50 nm apart are never averaged before then
    levels = pyramid_levels(source.voxel_size, source.translation, count)
    root = zarr.open_group(str(out), mode="r")
    for group in (MASKS, PROBABILITIES):
        attrs = root[f"{group}/{runtime.card.classes[0]}"].attrs["multiscales"][0]["datasets"]
        assert [d["coordinateTransformations"] for d in attrs] == [[
            {"type": "scale", "scale": list(v.voxel_size)}, {"type": "translation", "translation": list(v.translation)}]
            for v in levels]
    factors = pyramid_factors(source.voxel_size, count)
    assert factors[-1] == (1, 8, 8)
    for level in range(1, count):
        step = tuple(a // b for a, b in zip(factors[level], factors[level - 1], strict=True))
        for name in runtime.card.classes:
            below_mask, below_prob = (root[f"{g}/{name}/s{level - 1}"][...] for g in (MASKS, PROBABILITIES))
            np.testing.assert_array_equal(root[f"{MASKS}/{name}/s{level}"][...], block_vote(below_mask, step))
            np.testing.assert_array_equal(root[f"{PROBABILITIES}/{name}/s{level}"][...], block_mean(below_prob, step))
    assert root[f"{MASKS}/{runtime.card.classes[0]}/s3"].shape == (5, 137, 87)


def test_an_unfinished_run_of_other_settings_is_refused_and_overwrite_discards_it(tmp_path):
    volume = np.random.default_rng(3).integers(0, 256, (3, 64, 64), np.uint8)
    calls = []
    runtime = pointwise_runtime(calls=calls)

    def stop():
        if calls:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=16, tick=stop)
    with pytest.raises(ValueError, match=r"output: .*\.pred\.zarr\.partial holds an unfinished run with other settings "
                                         r"\(tile: 16 -> 32\); rerun with those to continue it, or pass --overwrite"):
        segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=32, overlap=4)
    out = segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=32, overwrite=True)
    assert zarr.open_group(str(out), mode="r").attrs["emserve"]["segmented"]["tile"] == 32
    with pytest.raises(FileExistsError, match="already exists; choose another path or pass --overwrite"):
        segment_store(runtime, EMSource(volume), tmp_path / "pred.zarr", tile=32)
    with pytest.raises(ValueError, match="block_size: 300 must be a multiple of 256"):
        segment_store(runtime, EMSource(volume), tmp_path / "other.zarr", block_size=300)


@pytest.mark.slow
def test_a_local_dask_cluster_ends_as_one_process_does_even_when_a_worker_is_killed(tiny_model, tmp_path):
    from emserve.distributed import dask_client

    volume = np.random.default_rng(4).integers(0, 256, (16, 512, 512), np.uint8)
    store = write_store(tmp_path / "em.zarr", volume, (8.0, 8.0, 8.0), levels=1)
    source = EMStore(store)
    level = source.em_level()
    em = EMSource(source.em_volume(level), source.normalize, level.voxel_size, level.translation)
    options = {"tile": 32, "overlap": 8, "block_size": 256, "keep_probabilities": True, "source_name": str(store)}
    runtime = load_runtime(tiny_model, "onnx", threads=1)
    alone = segment_store(runtime, em, tmp_path / "alone.zarr", **options)

    on_workers = OpenedOnWorker(RuntimeSpec(str(tiny_model), "onnx", (("threads", 1),)), str(store))
    records = tmp_path / ".shared.zarr.partial" / DONE_FOLDER / "s0"
    with dask_client("local:2") as client:
        pids = client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()
        failure = []

        def run():
            try:
                segment_store(runtime, em, tmp_path / "shared.zarr", client=client, on_workers=on_workers, **options)
            except BaseException as error:
                failure.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 120
        while not (records.is_dir() and len(list(records.iterdir())) >= 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert records.is_dir() and len(list(records.iterdir())) < 64, "the run ended before the kill"
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        worker.join(timeout=300)
        assert not worker.is_alive() and not failure, failure
        assert victim not in client.run(os.getpid).values()  # the nanny started a new process in its place
    shared = tmp_path / "shared.zarr"
    for group in (MASKS, PROBABILITIES):
        for level in ("s0", "s1"):
            np.testing.assert_array_equal(arrays(shared, group, runtime.card.classes, level),
                                          arrays(alone, group, runtime.card.classes, level))


def test_a_worker_opens_the_model_and_the_source_once_for_all_its_blocks(tiny_model, tmp_path):
    store = write_store(tmp_path / "em.zarr", np.zeros((2, 32, 32), np.uint8), (8.0, 8.0, 8.0), levels=1)
    opened = OpenedOnWorker(RuntimeSpec(str(tiny_model), "onnx", (("threads", 1),)), str(store))
    (runtime, source), (again, same) = opened(), opened()
    assert runtime is again and source is same  # every block after the first finds them open
    other = OpenedOnWorker(RuntimeSpec(str(tiny_model), "onnx", (("threads", 2),)), str(store))()
    assert other[0] is not runtime  # other load options: another runtime
