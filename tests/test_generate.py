"""Generation: per-sample seeds, conditions checked against the card, streaming store with resume, CLI."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import zarr
from checkpoints import CLASSES, TINY_UNET

from emserve.card import ModelCard
from emserve.classes import PRESENT, UNKNOWN
from emserve.data.lock import LOCK_NAME, store_lock, writer_tag
from emserve.data.store import EMStore
from emserve.diffusion import DEFAULT_LABEL_GUIDANCE
from emserve.pipelines import (
    FIELDS_ADDED_LATER,
    GeneratedStore,
    GenerationRequest,
    check_request,
    generate,
    generate_store,
    label_codes,
    label_source,
    sample_seed,
    split_channels,
)
from emserve.postprocess import Screening
from emserve.runtime.load import load_runtime
from training.ddpm import DDPMConfig, train_ddpm


@pytest.fixture(scope="module")
def checkpoints(toy_store, tmp_path_factory):
    """Tiny models of every mode, trained for two steps (enough to be non-trivial functions)."""
    out = {}
    for mode in ("pairs", "em-from-labels", "em", "labels"):
        run = tmp_path_factory.mktemp(mode)
        cfg = DDPMConfig(stores=[str(p) for p in toy_store], out=str(run), mode=mode,
                         classes=CLASSES, patch_size=16, batch_size=4, **TINY_UNET,
                         steps=2, lr=1e-2, checkpoint_every=2, preview_every=100)
        out[mode] = train_ddpm(cfg)
    return out


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, 5) == sample_seed(0, 5)
    assert len({sample_seed(s, i) for s in range(20) for i in range(20)}) == 400


def test_same_seed_gives_the_same_sample_whatever_the_batch_size(checkpoints):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    card = denoise.card
    one = GenerationRequest(samples=5, seed=7, steps=4, batch_size=5, dataset="toy_b", guidance=2.0)
    two = GenerationRequest(samples=5, seed=7, steps=4, batch_size=2, dataset="toy_b", guidance=2.0)
    a = np.concatenate([b.samples for b in generate(card, denoise, one)])
    b = np.concatenate([b.samples for b in generate(card, denoise, two)])
    np.testing.assert_allclose(a, b, atol=1e-5)
    other = np.concatenate([b.samples for b in generate(card, denoise, dataclasses.replace(one, seed=8))])
    assert not np.allclose(a, other)


def test_a_weight_per_condition_is_one_more_knob_and_equal_weights_are_the_single_scale(checkpoints):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    card = denoise.card
    assert list(card.conditions) == ["classes", "dataset"]

    def drawn(guidance) -> np.ndarray:
        request = GenerationRequest(samples=3, seed=4, steps=3, dataset="toy_a", present=("mito_mem",),
                                    guidance=guidance)
        return np.concatenate([b.samples for b in generate(card, denoise, request)])

    single = drawn(2.5)
    np.testing.assert_array_equal(drawn({"classes": 2.5, "dataset": 2.5}), single)  # the same request, written out
    np.testing.assert_array_equal(drawn({"classes": 1.0}), drawn(1.0))  # a condition not named weighs 1
    separate = drawn({"classes": 2.5, "dataset": 0.5})
    assert not np.allclose(separate, single, atol=1e-3)
    with pytest.raises(ValueError, match=r"guidance: 'label_map': not a condition of this model; allowed: classes, "
                                         r"dataset"):
        check_request(card, GenerationRequest(samples=1, guidance={"label_map": 3.0}))
    with pytest.raises(ValueError, match=r"guidance\['classes'\]: nan is not allowed"):
        GenerationRequest(samples=1, guidance={"classes": float("nan")})


def test_requests_the_model_cannot_serve_are_refused_with_what_it_accepts(checkpoints):
    card = ModelCard.load(checkpoints["pairs"])
    with pytest.raises(ValueError, match="dataset: 'elsewhere' is not known to this model; allowed: toy_a, toy_b"):
        check_request(card, GenerationRequest(samples=1, dataset="elsewhere"))
    with pytest.raises(ValueError, match="present: 'er_lum' is not one of the model's classes; allowed: mito_mem, "):
        check_request(card, GenerationRequest(samples=1, present=("er_lum",)))
    with pytest.raises(ValueError, match="sampler: 'euler'"):
        GenerationRequest(samples=1, sampler="euler")
    with pytest.raises(ValueError, match="cannot be both present and absent"):
        GenerationRequest(samples=1, present=("ld_lum",), absent=("ld_lum",))
    labels_card = ModelCard.load(checkpoints["em-from-labels"])
    denoise = load_runtime(checkpoints["em-from-labels"], "torch", device="cpu")
    with pytest.raises(ValueError, match="give some"):
        next(generate(labels_card, denoise, GenerationRequest(samples=1)))


def test_a_tick_that_raises_stops_generation_at_the_next_sampler_step(checkpoints):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    calls, ticks = [], []

    def counted(x, t, cond):
        calls.append(len(x))
        return denoise(x, t, cond)

    def tick():
        ticks.append(len(calls))
        if len(ticks) > 5:
            raise TimeoutError("deadline")

    request = GenerationRequest(samples=4, steps=4, batch_size=2, guidance=2.0)  # guided: one call of 2B per step
    with pytest.raises(TimeoutError):
        list(generate(denoise.card, counted, request, tick=tick))
    assert ticks == [0, 1, 2, 3, 4, 5] and calls == [4] * 5  # batch 1's four steps, then batch 2 stops at its second
    ticked = np.concatenate([b.samples for b in generate(denoise.card, denoise, request, tick=lambda: None)])
    np.testing.assert_array_equal(ticked, np.concatenate([b.samples for b in generate(denoise.card, denoise, request)]))


def test_interrupted_generation_resumes_without_redoing_batches(checkpoints, tmp_path):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    card = denoise.card
    request = GenerationRequest(samples=7, seed=3, steps=3, batch_size=3)

    def run(path, stop_after=None, resume=False):
        store = GeneratedStore(path, card, request, resume=resume)
        computed = []
        for batch in generate(card, denoise, request, skip=store.done()):
            raw, masks = split_channels(card, batch, request)
            store.write(batch, raw, label_codes(card, masks, None))
            computed.append(batch.index)
            if stop_after is not None and len(computed) == stop_after:
                return computed
        store.finish()
        return computed

    assert run(tmp_path / "whole.zarr") == [0, 1, 2]
    assert run(tmp_path / "cut.zarr", stop_after=1) == [0]
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path / "cut.zarr")
    assert run(tmp_path / "cut.zarr", resume=True) == [1, 2]
    whole, cut = EMStore(tmp_path / "whole.zarr"), EMStore(tmp_path / "cut.zarr")
    assert whole.crops == cut.crops == ("crop1", "crop2", "crop3")
    np.testing.assert_array_equal(whole.em_volume(whole.em_level())[...], cut.em_volume(cut.em_level())[...])
    crop = cut.read_crop("crop3", card.classes)
    assert crop.raw.shape == (1, 16, 16) and crop.labels.shape == (2, 1, 16, 16)
    attrs = cut.crop_group("crop3").attrs.asdict()
    assert attrs["seeds"] == [sample_seed(3, 6)] and attrs["samples"] == [6, 7]


def test_one_writer_per_store_and_a_dead_writers_lock_is_taken_over(checkpoints, tmp_path, dead_writer):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    request = GenerationRequest(samples=4, seed=3, steps=2, batch_size=2)
    out = tmp_path / "gen.zarr"
    generate_store(denoise.card, denoise, request, out)
    with store_lock(out), pytest.raises(FileExistsError, match=rf"out: {out} is being written by "
                                                               rf"{re.escape(writer_tag())} \(host~pid\)"):
        generate_store(denoise.card, denoise, request, out, resume=True)
    (out / LOCK_NAME).write_text("elsewhere~12")  # another host's: cannot be judged from here
    with pytest.raises(FileExistsError, match=rf"remove {out / LOCK_NAME} if that process is gone"):
        generate_store(denoise.card, denoise, request, out, resume=True)
    (out / LOCK_NAME).write_text(dead_writer)
    generate_store(denoise.card, denoise, request, out, resume=True)
    assert EMStore(out).crops == ("crop1", "crop2") and not (out / LOCK_NAME).exists()


def test_generated_stores_carry_the_voxel_size_of_the_dataset_they_stand_for(checkpoints, toy_store, tmp_path):
    card = ModelCard.load(checkpoints["pairs"])
    assert card.voxel_sizes == {"toy_a": [8.0, 8.0, 8.0], "toy_b": [8.0, 8.0, 8.0]}  # recorded by training
    card.voxel_sizes = {"toy_a": [8.0, 8.0, 8.0], "toy_b": [50.0, 4.0, 4.0]}
    card.datasets = ["toy_a", "toy_b"]
    for dataset, expected in (("toy_b", (50.0, 4.0, 4.0)), ("toy_a", (8.0, 8.0, 8.0)), (None, (1.0, 1.0, 1.0))):
        request = GenerationRequest(samples=2, dataset=dataset)
        store = GeneratedStore(tmp_path / f"{dataset}.zarr", card, request)
        batch = next(generate(card, lambda x, t, cond: x, dataclasses.replace(request, steps=1)))
        raw, masks = split_channels(card, batch, request)
        store.write(batch, raw, label_codes(card, masks, None))
        written = EMStore(tmp_path / f"{dataset}.zarr")
        assert written.em_level().voxel_size == expected  # two scales and none asked for: nominal 1 nm
        assert written.read_crop("crop1", card.classes).voxel_size == expected


def test_a_store_from_before_a_request_field_existed_resumes_only_as_what_it_was(checkpoints, tmp_path):
    """Stores record the request; fields added since (despeckle, spacing) are read as what runs had before them."""
    card = ModelCard.load(checkpoints["pairs"])
    request = GenerationRequest(samples=2, steps=3, spacing="trailing")
    GeneratedStore(tmp_path / "old.zarr", card, request)
    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    record = root.attrs["emserve"]
    for name in FIELDS_ADDED_LATER:
        del record["generated"]["request"][name]
    root.attrs["emserve"] = record
    GeneratedStore(tmp_path / "old.zarr", card, request, resume=True)
    with pytest.raises(ValueError, match="different model or request"):
        GeneratedStore(tmp_path / "old.zarr", card, dataclasses.replace(request, spacing="karras"), resume=True)


@pytest.mark.slow
def test_cli_generates_pairs_and_em_from_the_store_labels(checkpoints, toy_store, tmp_path):
    def emserve(*args):
        return subprocess.run([sys.executable, "-m", "emserve.cli", *args], capture_output=True, text=True,
                              timeout=300)

    result = emserve("generate", "pairs", str(checkpoints["pairs"]), str(tmp_path / "pairs.zarr"), "--samples", "4",
                     "--steps", "3", "--guidance", "3", "--present", "ld_lum", "--dataset", "toy_a")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pairs.png").exists() and "screening accepted" in result.stdout
    store = EMStore(tmp_path / "pairs.zarr")
    assert store.root.attrs["emserve"]["generated"]["request"]["present"] == ["ld_lum"]

    result = emserve("generate", "from-labels", str(checkpoints["em-from-labels"]), str(tmp_path / "fl.zarr"),
                     "--samples", "3", "--steps", "2", "--labels-from", str(toy_store[0]))
    assert result.returncode == 0, result.stderr
    rendered = EMStore(tmp_path / "fl.zarr")
    assert rendered.root.attrs["emserve"]["generated"]["request"]["guidance"] == DEFAULT_LABEL_GUIDANCE  # default
    crop = rendered.read_crop("crop1", ["mito_mem", "ld_lum"])
    source = EMStore(toy_store[0]).read_crop("crop1", ["mito_mem", "ld_lum"])
    # every generated sample's labels are a 16x16 window of the source crop's labels
    for i in range(3):
        window = crop.labels[:, i] == PRESENT
        found = any(np.array_equal(window, source.labels[:, z, a:a + 16, b:b + 16] == PRESENT)
                    for z in range(source.labels.shape[1]) for a in range(0, 49) for b in range(0, 49))
        assert found

    wrong = emserve("generate", "em", str(checkpoints["pairs"]), str(tmp_path / "x.zarr"))
    assert wrong.returncode == 2 and "is a 'pairs' model; it cannot generate 'em'" in wrong.stderr
    assert not (tmp_path / "x.zarr").exists()

    # bf16 is recorded with the model (fp32, the exported graph's own precision, is not: older stores resume)
    assert "precision" not in store.root.attrs["emserve"]["generated"]["model"]
    half = emserve("generate", "pairs", str(checkpoints["pairs"]), str(tmp_path / "bf16.zarr"), "--samples", "2",
                   "--steps", "2", "--backend", "torch", "--precision", "bf16")
    assert half.returncode == 0, half.stderr
    assert EMStore(tmp_path / "bf16.zarr").root.attrs["emserve"]["generated"]["model"]["precision"] == "bf16"
    wrong = emserve("generate", "pairs", str(checkpoints["pairs"]), str(tmp_path / "bf16.zarr"), "--samples", "2",
                    "--steps", "2", "--backend", "torch", "--resume")
    assert wrong.returncode == 2 and "different model or request" in wrong.stderr


@pytest.mark.slow
def test_cli_generates_em_alone_and_label_maps_alone(checkpoints, tmp_path):
    def emserve(*args):
        return subprocess.run([sys.executable, "-m", "emserve.cli", *args], capture_output=True, text=True,
                              timeout=300)

    result = emserve("generate", "em", str(checkpoints["em"]), str(tmp_path / "em.zarr"), "--samples", "3",
                     "--steps", "2")
    assert result.returncode == 0, result.stderr
    store = EMStore(tmp_path / "em.zarr")
    em = np.asarray(store.em_volume(store.em_level())[:])
    assert em.shape == (3, 16, 16) and em.std() > 0
    assert store.crops == ("crop1",) and store.crop_classes("crop1") == ()  # trained with classes, draws no labels

    result = emserve("generate", "labels", str(checkpoints["labels"]), str(tmp_path / "labels.zarr"), "--samples",
                     "3", "--steps", "2")
    assert result.returncode == 0, result.stderr
    store = EMStore(tmp_path / "labels.zarr")
    assert not np.asarray(store.em_volume(store.em_level())[:]).any()  # no EM drawn
    crop = store.read_crop("crop1", ["mito_mem", "ld_lum"])
    assert set(store.crop_classes("crop1")) == {"mito_mem", "ld_lum"} and crop.labels.shape == (2, 3, 16, 16)
    assert set(np.unique(crop.labels)) <= {0, PRESENT, UNKNOWN}


def test_rejected_samples_keep_their_em_and_lose_their_labels(checkpoints, tmp_path):
    denoise = load_runtime(checkpoints["pairs"], "torch", device="cpu")
    card = denoise.card
    request = GenerationRequest(samples=2, seed=1, steps=2, batch_size=2)
    store = GeneratedStore(tmp_path / "s.zarr", card, request)
    (batch,) = generate(card, denoise, request)
    raw, masks = split_channels(card, batch, request)
    masks[0] = False
    masks[0, 0, 4:8, 4:8] = True  # a lone 4x4 object: too small for min_size 17
    masks[1] = False
    screening = Screening(min_size=17)
    store.write(batch, raw, label_codes(card, masks, screening))
    crop = EMStore(tmp_path / "s.zarr").read_crop("crop1", card.classes)
    assert (crop.labels[:, 0] == UNKNOWN).all()
    assert (crop.labels[:, 1] == 0).all()  # nothing there, and nothing implausible: known absent
    assert (screening.accepted, screening.rejected) == (1, 1)
    assert crop.raw[0].std() > 0  # the EM of the rejected sample is kept


def test_label_maps_given_as_channels_keep_unannotated_pixels_unannotated(checkpoints):
    card = ModelCard.load(checkpoints["em-from-labels"])
    channels = np.array([1.0, -1.0, 0.0], np.float32).reshape(1, 1, 1, 3)
    assert label_codes(card, channels, None).ravel().tolist() == [PRESENT, 0, UNKNOWN]


def test_bad_sampling_settings_are_refused_before_anything_is_written(checkpoints, tmp_path):
    card = ModelCard.load(checkpoints["pairs"])
    with pytest.raises(ValueError, match=r"^steps: 5000 is not allowed; allowed: 1 to 1000$"):
        check_request(card, GenerationRequest(samples=1, steps=5000))
    with pytest.raises(ValueError, match=r"rescale: 2\.0 is not allowed; allowed: 0 to 1"):
        GenerationRequest(samples=1, rescale=2.0)
    with pytest.raises(ValueError, match="label_method: 'otsu'"):
        GenerationRequest(samples=1, label_method="otsu")
    with pytest.raises(ValueError, match="spacing: 'leading' is not allowed; choose one of trailing, karras"):
        GenerationRequest(samples=1, spacing="leading")
    with pytest.raises(ValueError, match="seed: -1 is not allowed; allowed: 0 to 9223372036854775807"):
        GenerationRequest(samples=1, seed=-1)
    with pytest.raises(ValueError, match="despeckle: 5000 is not allowed; allowed: 0 to 256"):
        check_request(card, GenerationRequest(samples=1, despeckle=5000))
    result = subprocess.run([sys.executable, "-m", "emserve.cli", "generate", "pairs", str(checkpoints["pairs"]),
                             str(tmp_path / "g.zarr"), "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "steps" in result.stderr
    assert not (tmp_path / "g.zarr").exists()


@pytest.mark.slow
def test_png_index_maps_drive_em_from_labels_in_order(checkpoints, tmp_path):
    from PIL import Image

    from emserve.classes import get_class

    maps = tmp_path / "maps"
    maps.mkdir()
    ids = np.zeros((2, 16, 16), np.uint8)
    ids[0, 2:9, 2:9] = get_class("mito_mem").id
    ids[1, 8:, :] = get_class("ld_lum").id
    for i, plane in enumerate(ids):
        Image.fromarray(plane).save(maps / f"map{i}.png")
    out = tmp_path / "g.zarr"
    result = subprocess.run([sys.executable, "-m", "emserve.cli", "generate", "from-labels",
                             str(checkpoints["em-from-labels"]), str(out), "--samples", "3", "--steps", "2",
                             "--labels-from", str(maps)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    store = EMStore(out)
    labels = np.concatenate([store.read_crop(c, ["mito_mem", "ld_lum"]).labels for c in store.crops], axis=1)
    assert labels.shape == (2, 3, 16, 16)
    for sample, plane in zip(labels.transpose(1, 0, 2, 3), ids[[0, 1, 0]], strict=True):  # maps repeat in order
        assert (sample[0] == PRESENT).tolist() == (plane == get_class("mito_mem").id).tolist()
        assert (sample[1] == PRESENT).tolist() == (plane == get_class("ld_lum").id).tolist()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(maps / "map2.png")
    bad = subprocess.run([sys.executable, "-m", "emserve.cli", "generate", "from-labels",
                          str(checkpoints["em-from-labels"]), str(tmp_path / "b.zarr"), "--labels-from",
                          str(maps / "map2.png")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "this model takes [N, 16, 16] index maps" in bad.stderr


@pytest.mark.slow
def test_a_local_dask_cluster_resumes_a_cut_run_into_the_store_one_process_writes(checkpoints, toy_store, tmp_path):
    """from-labels (the workers read the label maps themselves) cut after its first batch, then resumed with
    --scheduler local:2: the store equals an uninterrupted run's in one process, crop for crop."""
    denoise = load_runtime(checkpoints["em-from-labels"], "torch", device="cpu")
    card = denoise.card
    args = ["--samples", "7", "--batch-size", "2", "--steps", "2", "--seed", "5", "--labels-from", str(toy_store[0]),
            "--backend", "torch", "--device", "cpu"]
    request = GenerationRequest(samples=7, batch_size=2, steps=2, seed=5, guidance=DEFAULT_LABEL_GUIDANCE)
    labels = label_source(card, str(toy_store[0]), 5)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_store(card, denoise, request, tmp_path / "cut.zarr", labels, progress=stop)
    assert EMStore(tmp_path / "cut.zarr").crops == ("crop1",)
    for out, extra in (("cut.zarr", ["--resume", "--scheduler", "local:2"]), ("alone.zarr", [])):
        done = subprocess.run([sys.executable, "-m", "emserve.cli", "generate", "from-labels",
                               str(checkpoints["em-from-labels"]), str(tmp_path / out), *args, *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    cut, alone = EMStore(tmp_path / "cut.zarr"), EMStore(tmp_path / "alone.zarr")
    assert cut.crops == alone.crops == ("crop1", "crop2", "crop3", "crop4")
    assert cut.root.attrs["emserve"]["complete"] and cut.root.attrs["emserve"]["generated"] == \
        alone.root.attrs["emserve"]["generated"]
    np.testing.assert_array_equal(cut.em_volume(cut.em_level())[...], alone.em_volume(alone.em_level())[...])
    for name in cut.crops:
        np.testing.assert_array_equal(cut.read_crop(name, card.classes).labels,
                                      alone.read_crop(name, card.classes).labels)
        assert cut.crop_group(name).attrs["seeds"] == alone.crop_group(name).attrs["seeds"]
