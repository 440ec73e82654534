"""Segmentation by a pairs DDPM: label maps drawn for given EM, their mean and spread, through the store and CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr
from checkpoints import CLASSES, make_checkpoint

from emserve.evaluation.evaluate import evaluate_segmentation, held_out_crops
from emserve.pipelines import LabelSampling, sample_labels
from emserve.runtime.load import load_runtime
from emserve.segmentation import TilePredictor, segment_array
from emserve.volumes import MASKS, PROBABILITIES, UNCERTAINTY, EMSource, segment_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLING = LabelSampling(samples=3, steps=2, seed=7)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return load_runtime(make_checkpoint(tmp_path_factory.mktemp("pairs"), "pairs"), "torch", device="cpu")


def test_a_tiles_draws_depend_on_where_it_lies_not_on_its_batch(pairs):
    tiles = np.random.default_rng(0).uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    origins = [(0, 0, 0), (0, 0, 16), (1, 0, 0)]
    mean, spread = sample_labels(pairs.card, pairs, tiles, origins, SAMPLING)
    assert mean.shape == spread.shape == (3, len(CLASSES), 16, 16)
    alone = sample_labels(pairs.card, pairs, tiles[1:2], origins[1:2], SAMPLING)
    np.testing.assert_allclose(alone[0][0], mean[1], atol=1e-6)  # the same draws, batched or not
    assert not np.array_equal(sample_labels(pairs.card, pairs, tiles[1:2], [(5, 0, 16)], SAMPLING)[0][0], mean[1])
    draws = np.unique(mean * SAMPLING.samples)  # a share of 3 binary draws: 0, 1, 2 or 3 of them
    assert set(np.round(draws, 4)) <= {0.0, 1.0, 2.0, 3.0}
    np.testing.assert_allclose(spread, np.sqrt(mean * (1 - mean)), atol=1e-6)  # the spread of binary draws


def test_only_pairs_models_segment_by_sampling(pairs, tmp_path):
    with pytest.raises(ValueError, match="model: a 'em-from-labels' model does not segment"):
        TilePredictor(load_runtime(make_checkpoint(tmp_path / "fl", "em-from-labels", label_channels=len(CLASSES)),
                                  "torch", device="cpu"))
    with pytest.raises(ValueError, match="sampling: only a pairs DDPM segments by sampling"):
        TilePredictor(load_runtime(make_checkpoint(tmp_path / "seg", "segmentation"), "torch", device="cpu"),
                      SAMPLING)
    with pytest.raises(ValueError, match="samples: 0 is not allowed"):
        LabelSampling(samples=0)


def test_a_pairs_model_writes_masks_probabilities_and_uncertainty_as_its_draws_say(pairs, tmp_path):
    volume = np.random.default_rng(1).integers(0, 256, (2, 40, 24), np.uint8)
    out = segment_store(pairs, EMSource(volume, voxel_size=(8.0, 4.0, 4.0)), tmp_path / "pred.zarr", tile=16,
                        keep_probabilities=True, sampling=SAMPLING)
    values = segment_array(pairs, volume, tile=16, sampling=SAMPLING)
    k = len(CLASSES)
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["emserve"]["segmented"]["sampling"]["samples"] == 3
    for c, name in enumerate(CLASSES):
        np.testing.assert_array_equal(root[f"{MASKS}/{name}/s0"][...], values[c] > 0.5)
        np.testing.assert_allclose(root[f"{PROBABILITIES}/{name}/s0"][...] / 255, values[c], atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(root[f"{UNCERTAINTY}/{name}/s0"][...] / 255, 2 * values[k + c],
                                   atol=0.5 / 255 + 1e-6)
        assert list(root[f"{UNCERTAINTY}/{name}"].array_keys()) == list(root[f"{MASKS}/{name}"].array_keys())


@pytest.mark.slow
def test_evaluate_seg_scores_a_pairs_model_with_calibration_and_error_detection(toy_store, tmp_path):
    """The CLI passes the draws' settings through: its report is the one evaluate_segmentation gives in-process."""
    model = make_checkpoint(tmp_path / "run", "pairs")
    done = subprocess.run([sys.executable, "-m", "emserve.cli", "evaluate", "seg", str(model), str(toy_store[0]),
                           "--tile", "16", "--samples", "2", "--steps", "2", "--seed", "3", "--backend", "torch",
                           "--device", "cpu", "--json", str(tmp_path / "scores.json")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "scores.json").read_text())
    runtime = load_runtime(model, "torch", device="cpu")
    expected = evaluate_segmentation(runtime, held_out_crops([str(toy_store[0])], CLASSES), tile=16,
                                     sampling=LabelSampling(samples=2, steps=2, seed=3))
    assert report["uncertainty"] == expected["uncertainty"] == "spread of sampled label maps"
    assert report["mean"] == pytest.approx(expected["mean"])
    assert report["calibration_error"]["pooled"] == pytest.approx(expected["calibration_error"]["pooled"])
    assert report["calibration_error"]["classes"] == pytest.approx(expected["calibration_error"]["classes"])
    assert report["error_auroc"] == pytest.approx(expected["error_auroc"])
    assert report["seconds_per_mvoxel"] > 0
