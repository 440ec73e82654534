"""`emserve experiment`: every arm over several seeds, scored on held-out crops never trained on, with intervals
and paired differences; a rerun resumes, not retrains."""

import json
import subprocess
import sys

import numpy as np
import pytest
from checkpoints import CLASSES

from emserve.classes import UNKNOWN
from emserve.data.patches import elastic_coordinates, load_crops, warp
from emserve.data.store import EMStore
from training.experiment import ARMS, ExperimentConfig, baseline_of
from training.experiment.generated import deform, few_label_maps, label_source, split_in_proportion
from training.experiment.report import markdown_report

pytestmark = pytest.mark.slow  # real servers, exports or training runs: `make test` runs it, `make check` not

SMOKE = ["--patch-size", "16", "--width", "8", "--multipliers", "1,2", "--batch-size", "4", "--seg-steps", "6",
         "--ddpm-steps", "6", "--samples", "8", "--sample-steps", "3", "--despeckle", "5", "--from-labels-steps", "6"]


def run_cli(args):
    return subprocess.run([sys.executable, "-m", "emserve.cli", *args], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})


@pytest.fixture(scope="module")
def experiment(toy_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "exp"
    cmd = ["experiment", *map(str, toy_store), "--out", str(out), "--holdout", "toy_b/crop1", "--classes",
           ",".join(CLASSES), "--seeds", "0,1", *SMOKE]
    done = run_cli(cmd)
    assert done.returncode == 0, done.stderr
    return out, cmd, json.loads((out / "report.json").read_text())


def test_every_arm_is_scored_for_every_seed_on_held_out_crops_only(experiment):
    out, _, report = experiment
    assert report["held_out"] == ["toy_b/crop1"]
    assert report["training_crops"] == {"toy_a": ["crop1"], "toy_b": []}
    assert list(report["arms"]) == list(ARMS) and list(report["runs"]) == ["0", "1"]
    cards = list(out.glob("seed-*/*/step-*/card.json"))  # every network the experiment trained
    # per seed: each arm, two pretraining runs, the full, few and from-labels DDPMs
    assert len({c.parents[1] for c in cards}) == 2 * (len(ARMS) + 2 + 3)
    for card in cards:
        config = json.loads(card.read_text())["training"]["config"]
        assert config["crops"] is not None and "crop1" not in config["crops"].get("toy_b", []), card
        assert config["seed"] == int(card.parts[-4].removeprefix("seed-"))
    for seed, run in report["runs"].items():
        for arm, scores in run["arms"].items():
            assert [c["name"] for c in scores["classes"]] == CLASSES and scores["crops"] == ["toy_b/crop1"]
            counts = np.array(scores["tile_counts"])  # 64 x 64 in columns of 16 x 16 (the patch size)
            assert counts.shape == (16, len(CLASSES), 3)
            for k, row in enumerate(scores["classes"]):
                tp, fp, fn = counts[:, k].sum(0)
                assert row["dice"] == (2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None), (seed, arm)
        for name in ("full", "few"):
            assert run["realism"][name]["generated"] == 8
            assert (out / f"seed-{seed}" / f"generated-{name}.png").exists()
        assert run["class_balance"]["class"] in CLASSES


def test_arms_carry_intervals_and_each_generated_arm_its_paired_difference(experiment):
    _, _, report = experiment
    for arm, row in report["arms"].items():
        assert row["seeds"] == 2
        assert row["mean_dice"] == pytest.approx(np.mean(row["per_seed"]))
        assert row["ci95"][0] <= row["mean_dice"] <= row["ci95"][1], arm
    compared = [(c["arm"], c["baseline"]) for c in report["comparisons"]]
    # also against what gives the same without the generative model: more compute, deformed real pairs
    controls = [*((f"{r}+denoiser", f"{r}+longer") for r in ("real", "few")), ("few+augmented", "few+elastic")]
    assert [c for c in compared if c not in controls] == [(a, baseline_of(a)) for a in ARMS
                                                          if a not in ("real", "few")]
    assert all(c in compared for c in controls)
    for c in report["comparisons"]:
        assert set(c) == {"arm", "baseline", "mean_dice_diff", "ci95", "seeds", "per_seed", "verdict"}
        assert c["seeds"] == 2
        arm, base = report["arms"][c["arm"]], report["arms"][c["baseline"]]
        assert c["mean_dice_diff"] == pytest.approx(arm["mean_dice"] - base["mean_dice"])
        assert c["per_seed"] == pytest.approx(np.subtract(arm["per_seed"], base["per_seed"]))
        assert c["ci95"][0] <= c["mean_dice_diff"] <= c["ci95"][1]
    markdown = (experiment[0] / "report.md").read_text()
    assert all(f"| {c['arm']} | {c['baseline']} | {c['mean_dice_diff']:+.3f} |" in markdown
               for c in report["comparisons"])


def test_the_report_states_the_settings_of_the_arms_it_ran_and_of_no_others(experiment):
    _, _, report = experiment
    budget = lambda text: next(line for line in text.splitlines() if line.startswith("Budget:"))  # noqa: E731
    every = budget(markdown_report(report))
    methods = ("pretrained", "weighted", "filtered", "denoiser", "longer", "depth", "elastic", "rendered")
    assert all(f"{m} arms:" in every for m in methods) and "8 generated pairs per DDPM" in every
    depth_only = {**report, "arms": {a: report["arms"][a] for a in ("few", "few+depth")},
                  "comparisons": [c for c in report["comparisons"] if c["arm"] == "few+depth"]}
    line = budget(markdown_report(depth_only))
    assert "depth arms: their baseline's data, the network reading 3 adjacent sections" in line
    assert "few = 2 labelled slices per crop" in line
    assert not any(word in line for word in (*methods[:-3], "rendered", "elastic", "DDPM", "generated"))


def test_pretrained_arms_start_from_generated_pretraining_with_the_same_total_budget(experiment):
    out, _, _ = experiment
    for regime, arm in (("full", "real-pretrained"), ("few", "few-pretrained")):
        pretrain = json.loads(next((out / "seed-0" / f"pretrain-{regime}").glob("step-*/card.json")).read_text())
        tuned = json.loads(next((out / "seed-0" / f"seg-{arm}").glob("step-*/card.json")).read_text())
        assert pretrain["training"]["config"]["stores"] == []
        assert pretrain["training"]["generated"] == [str(out / "seed-0" / f"generated-{regime}.zarr")]
        assert pretrain["training"]["config"]["steps"] + tuned["training"]["config"]["steps"] == 6
        assert tuned["training"]["init"]["weights"] == pretrain["weights"]
        assert tuned["training"]["generated"] == []


def test_denoiser_arms_start_from_their_regimes_ddpm_and_longer_arms_spend_the_same_compute(experiment):
    out, _, _ = experiment
    for regime, arm in (("full", "real-denoiser"), ("few", "few-denoiser")):
        tuned = json.loads(next((out / "seed-0" / f"seg-{arm}").glob("step-*/card.json")).read_text())
        ddpm = sorted((out / "seed-0" / f"ddpm-{regime}").glob("step-*/card.json"))[-1]  # the last checkpoint
        assert tuned["training"]["init"] == {"checkpoint": str(ddpm.parent),
                                             "weights": json.loads(ddpm.read_text())["weights"]}
        assert tuned["training"]["config"]["steps"] == 6 and tuned["training"]["generated"] == []
        assert tuned["training"]["config"]["labelled_slices"] == (2 if regime == "few" else 0)
        longer_run = out / "seed-0" / f"seg-{arm.replace('denoiser', 'longer')}"
        longer = json.loads((longer_run / "step-00000012/card.json").read_text())  # segmentation + DDPM budgets
        assert "init" not in longer["training"] and longer["training"]["generated"] == []
        baseline = out / "seed-0" / f"seg-{'few' if regime == 'few' else 'real'}" / "step-00000006"
        losses = [json.loads((run / "state.json").read_text())["losses"] for run in (baseline,
                                                                                     longer_run / "step-00000012")]
        assert len(losses[1]) == 12 and losses[1][:6] == losses[0]  # the baseline's run, continued


def test_depth_arms_train_their_baselines_data_reading_three_sections(experiment):
    out, _, report = experiment
    for arm, slices in (("real-depth", 0), ("few-depth", 2)):
        card = json.loads(next((out / "seed-0" / f"seg-{arm}").glob("step-*/card.json")).read_text())
        assert card["depth"] == 3 and card["unet"]["in_channels"] == 3
        assert card["training"]["config"]["labelled_slices"] == slices and card["training"]["generated"] == []
        assert "init" not in card["training"] and card["training"]["config"]["steps"] == 6
    assert {(c["arm"], c["baseline"]) for c in report["comparisons"]} >= {("real+depth", "real"), ("few+depth", "few")}


def test_elastic_arms_deform_their_baselines_real_pairs_as_often_as_augmented_arms_mix_in_drawn_ones(experiment):
    out, _, _ = experiment
    for arm, slices in (("real-elastic", 0), ("few-elastic", 2)):
        config = json.loads(next((out / "seed-0" / f"seg-{arm}").glob("step-*/card.json")).read_text())["training"]
        assert config["config"]["elastic"] == 0.5  # the experiment's mix: the share augmented arms draw
        assert config["config"]["labelled_slices"] == slices and config["generated"] == []
        assert "init" not in config and config["config"]["steps"] == 6


def test_filtered_stores_drop_only_pairs_the_baseline_disagrees_with(experiment):
    out, _, report = experiment
    for regime in ("full", "few"):
        record = report["runs"]["0"]["filtered"][regime]
        source = EMStore(out / "seed-0" / f"generated-{regime}.zarr")
        kept = EMStore(out / "seed-0" / f"filtered-{regime}.zarr")
        before = np.concatenate([source.read_crop(c, CLASSES).labels for c in source.crops], axis=1)
        after = np.concatenate([kept.read_crop(c, CLASSES).labels for c in kept.crops], axis=1)
        screened = (before != UNKNOWN).any(axis=(0, 2, 3))
        left = (after != UNKNOWN).any(axis=(0, 2, 3))
        assert record["screened_pairs"] == screened.sum() and record["kept"] == left.sum()
        assert not (left & ~screened).any()  # nothing screening rejected comes back
        np.testing.assert_array_equal(after[:, left], before[:, left])  # kept pairs are unchanged
        assert record["segmenter"].endswith(
            f"seg-{'few' if regime == 'few' else 'real'}/step-00000006")


def test_a_rerun_resumes_and_trains_and_scores_nothing(experiment):
    out, cmd, report = experiment
    checkpoints = sorted(p.stat().st_mtime_ns for p in out.glob("seed-*/*/step-*"))
    scored = {p: p.stat().st_mtime_ns for p in out.glob("seed-*/scores/*.json")}  # each network scored once
    assert len(scored) == len(report["runs"]) * len(ARMS)
    again = run_cli(cmd)
    assert again.returncode == 0, again.stderr
    assert sorted(p.stat().st_mtime_ns for p in out.glob("seed-*/*/step-*")) == checkpoints
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed-*/scores/*.json")} == scored
    assert json.loads((out / "report.json").read_text())["arms"] == report["arms"]


def test_a_rerun_with_other_options_is_refused_naming_them(experiment):
    out, cmd, _ = experiment
    changed = [*cmd[:cmd.index("--samples")], "--samples", "9", *cmd[cmd.index("--samples") + 2:]]
    refused = run_cli([*changed, "--generated-weight", "0.5"])
    assert refused.returncode == 2
    assert f"out: {out} was run with samples=8 (now 9), generated_weight=0.25 (now 0.5); a rerun may only add seeds " \
           "or arms" in " ".join(refused.stderr.split())
    record = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps({k: v for k, v in record.items() if k != "label_method"}))
    assert run_cli(cmd).returncode == 0  # an option added later counts as used at its default
    assert run_cli([*cmd, "--label-method", "paired"]).returncode == 2


def test_seeds_scored_in_an_earlier_report_are_taken_from_it_and_only_new_seeds_and_arms_train(experiment, tmp_path):
    """A seed's networks are gone with the machine that trained them; its scores in a committed report are not."""
    out, cmd, report = experiment
    elsewhere = tmp_path / "exp"
    later = [*cmd[:cmd.index("--out") + 1], str(elsewhere), *cmd[cmd.index("--out") + 2:]]
    later = [*later[:later.index("--seeds") + 1], "1,2", *later[later.index("--seeds") + 2:], "--arms", "few"]
    done = run_cli([*later, "--results-from", str(out / "report.json")])
    assert done.returncode == 0, done.stderr
    runs = json.loads((elsewhere / "report.json").read_text())["runs"]
    assert sorted(p.name for p in elsewhere.glob("seed-*")) == ["seed-2"]  # seed 1 trained nothing here
    assert runs["1"]["arms"] == {"few": report["runs"]["1"]["arms"]["few"]}
    assert runs["1"]["realism"] == runs["1"]["filtered"] == runs["1"]["class_balance"] == {}  # of arms not taken
    assert list(runs["2"]["arms"]) == ["few"]

    third = tmp_path / "third"  # an arm added to a seed scored elsewhere trains that arm only
    added = [*later[:later.index("--out") + 1], str(third), *later[later.index("--out") + 2:-1], "few,few+weighted"]
    added[added.index("--seeds") + 1] = "2"
    done = run_cli([*added, "--results-from", str(elsewhere / "report.json")])
    assert done.returncode == 0, done.stderr
    grown = json.loads((third / "report.json").read_text())
    assert sorted(p.name for p in (third / "seed-2").glob("seg-*")) == ["seg-few-weighted"]
    assert grown["runs"]["2"]["arms"]["few"] == runs["2"]["arms"]["few"]
    assert [c["arm"] for c in grown["comparisons"]] == ["few+weighted"]

    elsewhere.rename(tmp_path / "done")  # a fresh folder, so only the earlier report's options can differ
    other = run_cli([*later, "--samples", "9", "--results-from", str(out / "report.json")])
    assert other.returncode == 2
    assert f"results_from: {out / 'report.json'} is another experiment: samples=8 (now 9)" in " ".join(
        other.stderr.split())


def test_rendered_arms_draw_only_labelled_slices_of_training_crops(experiment, toy_store):
    out, _, report = experiment
    cfg = ExperimentConfig(stores=[str(p) for p in toy_store], out=str(out), holdout=["toy_b/crop1"],
                           classes=list(CLASSES), patch_size=16, few_slices=2)
    maps = few_label_maps(cfg, report["training_crops"])["toy_a"]
    rendered = EMStore(out / "seed-0" / "rendered-toy_a.zarr")  # real labels of the labelled slices, new EM
    drawn = np.concatenate([rendered.read_crop(c, CLASSES).labels.transpose(1, 0, 2, 3) for c in rendered.crops])
    assert len(drawn) == 8 and all(any(np.array_equal(d, m) for m in maps) for d in drawn)
    augmented = EMStore(out / "seed-0" / "augmented-toy_a.zarr")  # the same maps, deformed: new shapes
    shapes = np.concatenate([augmented.read_crop(c, CLASSES).labels.transpose(1, 0, 2, 3) for c in augmented.crops])
    assert len(shapes) == 8 and not all(any(np.array_equal(d, m) for m in maps) for d in shapes)


def test_few_labelled_slices_keep_raw_everywhere_and_labels_on_evenly_spaced_planes(toy_store):
    store = EMStore(toy_store[0])
    full = load_crops([store], CLASSES)[0]
    few = load_crops([store], CLASSES, labelled_slices=3)[0]
    annotated = [z for z in range(few.labels.shape[1]) if (few.labels[:, z] != UNKNOWN).any()]
    assert annotated == [0, 4, 7]  # 8 planes: linspace(0, 7, 3) rounded
    np.testing.assert_array_equal(few.labels[:, annotated], full.labels[:, annotated])
    np.testing.assert_array_equal(few.raw, full.raw)


def test_rendered_label_maps_come_from_labelled_planes_of_training_crops_only(toy_store, tmp_path):
    cfg = ExperimentConfig(stores=[str(p) for p in toy_store], out=str(tmp_path), holdout=["toy_b/crop1"],
                           classes=list(CLASSES), patch_size=8, few_slices=3)
    maps = few_label_maps(cfg, {"toy_a": ["crop1"], "toy_b": []})
    assert list(maps) == ["toy_a"]  # toy_b's only crop is held out
    few = load_crops([EMStore(toy_store[0])], CLASSES, labelled_slices=3)[0]
    planes = [few.labels[:, z] for z in (0, 4, 7)]  # the labelled planes (see the test above), 64x64 each
    expected = [p[:, a:a + 8, b:b + 8] for p in planes for a in range(0, 64, 8) for b in range(0, 64, 8)]
    assert sorted(m.tobytes() for m in maps["toy_a"]) == sorted(t.tobytes() for t in expected)


def test_label_maps_keep_their_dataset_when_the_first_store_is_held_out(toy_store, tmp_path):
    cfg = ExperimentConfig(stores=[str(p) for p in toy_store], out=str(tmp_path), holdout=["toy_a/crop1"],
                           classes=list(CLASSES), patch_size=8, few_slices=3)
    maps = few_label_maps(cfg, {"toy_a": [], "toy_b": ["crop1"]})
    assert list(maps) == ["toy_b"]
    few = load_crops([EMStore(toy_store[1])], CLASSES, labelled_slices=3)[0]
    expected = [few.labels[:, z, a:a + 8, b:b + 8] for z in (0, 4, 7) for a in range(0, 64, 8) for b in range(0, 64, 8)]
    assert sorted(m.tobytes() for m in maps["toy_b"]) == sorted(t.tobytes() for t in expected)


def test_deformed_label_maps_keep_their_codes_and_move_boundaries_by_a_few_pixels():
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 15**2).astype(np.uint8)
    labels = np.stack([disc, np.where(xx < 8, 255, 1 - disc).astype(np.uint8)])
    out = deform(labels, np.random.default_rng(0))
    assert out.shape == labels.shape and set(np.unique(out)) <= set(np.unique(labels))
    assert not any(np.array_equal(out, np.rot90(v, k, axes=(-2, -1))) for k in range(4)
                   for v in (labels, labels[..., ::-1]))  # more than a flip or rotation
    assert abs(int(out[0].sum()) - int(disc.sum())) < 0.25 * disc.sum()  # bent, not torn or blown up
    still = elastic_coordinates(64, np.random.default_rng(0), amplitude=0.0)  # no displacement: the map itself
    np.testing.assert_array_equal(warp(labels, still, order=0), labels)


def test_a_deformed_sample_does_not_depend_on_the_batch_it_is_drawn_in():
    maps = np.random.default_rng(1).integers(0, 2, size=(5, 2, 16, 16)).astype(np.uint8)
    source = label_source(maps, seed=3, deformed=True)
    whole = source(0, 7)
    np.testing.assert_array_equal(np.concatenate([source(0, 2), source(2, 5), source(5, 7)]), whole)
    assert not np.array_equal(whole[0], whole[5])  # the same map drawn again (7 > 5) is deformed anew


def test_rendered_samples_are_shared_among_datasets_in_proportion_and_add_up():
    assert split_in_proportion(256, [10, 10, 10]) == [86, 85, 85]
    assert split_in_proportion(8, [1000, 1]) == [8, 0]  # a dataset with a sliver of the maps may get none
    assert split_in_proportion(7, [3, 1]) == [5, 2]


def test_arms_that_need_what_the_options_leave_out_are_refused_by_name(toy_store, tmp_path):
    base = {"stores": [str(p) for p in toy_store], "out": str(tmp_path), "holdout": ["toy_b/crop1"],
            "classes": list(CLASSES)}
    with pytest.raises(ValueError, match=r"arms: \['few\+augmented'\] need an EM-from-labels DDPM; set "
                                         r"from_labels_steps"):
        ExperimentConfig(**base, arms=["few+augmented"])
    with pytest.raises(ValueError, match=r"arms: \['few\+magic'\] are not arms; allowed: real, generated"):
        ExperimentConfig(**base, arms=["few+magic"])
    with pytest.raises(ValueError, match=r"seeds: \[1, 1\]; give distinct"):
        ExperimentConfig(**base, seeds=[1, 1])
    chosen = ExperimentConfig(**base, arms=["few+filtered", "generated"]).chosen_arms
    assert chosen == ["real", "generated", "few", "few+filtered"]  # baselines added, table order
    assert "few+rendered" not in ExperimentConfig(**base).chosen_arms  # no from-labels DDPM: no rendered arms
