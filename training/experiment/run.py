"""Run (or resume) an experiment: for every seed, the DDPMs its arms need, their generated data, every arm's
segmentation network, and the scores on the held-out crops; then the report over all seeds.

Each seed's work lives in `<out>/seed-<s>/`, one folder per network and one store per generated set, each skipped
when already there, so an interrupted experiment resumes by running the same command (and adding a seed to
`seeds` adds only that seed's runs).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from emserve.card import ModelCard
from emserve.classes import PRESENT
from emserve.data.store import EMStore
from emserve.data.writer import atomic_directory
from emserve.evaluation.evaluate import evaluate_presence, evaluate_realism, evaluate_segmentation, held_out_crops
from emserve.reports import write_json
from emserve.runtime.load import load_runtime
from training import checkpoint as ckpt
from training.ddpm import DDPMConfig, train_ddpm
from training.experiment.config import (
    BASELINE,
    PRETRAIN_SHARE,
    ExperimentConfig,
    pairs_ddpms,
    recorded_defaults,
    regime_of,
)
from training.experiment.generated import (
    few_label_maps,
    filter_record,
    filter_store,
    generate_pairs,
    real_agreement,
    render,
)
from training.experiment.report import markdown_report, summarize
from training.seg import SegConfig, train_seg


def training_crops(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """{dataset: crops to train on}: every crop that is not held out."""
    held = set(cfg.holdout)
    out = {}
    for path in cfg.stores:
        store = EMStore(path)
        out[store.name] = [c for c in store.crops if c not in held and f"{store.name}/{c}" not in held]
    if not any(out.values()):
        raise ValueError(f"holdout: {cfg.holdout} leaves no crops to train on")
    return out


def count_tile(cfg: ExperimentConfig) -> int:
    """Side of the held-out columns the intervals resample: one training patch."""
    return cfg.patch_size


FREE_ON_RERUN = ("seeds", "arms", "command", "results_from")  # a rerun may add seeds and arms; every other option
# shapes the runs


def options(cfg: ExperimentConfig) -> dict:
    """The options that shape the runs, as they read back from JSON."""
    return {k: v for k, v in json.loads(json.dumps(asdict(cfg), default=list)).items() if k not in FREE_ON_RERUN}


def changed_options(cfg: ExperimentConfig, recorded: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The options of `cfg` that differ from those `recorded` (an option added to emserve after the record was
    written was used at its default), as 'name=old (now new)'."""
    before = recorded_defaults() | recorded
    return [f"{k}={before.get(k)!r} (now {v!r})" for k, v in options(cfg).items()
            if k not in ignore and before.get(k) != v]


def check_same_experiment(cfg: ExperimentConfig, out: Path) -> None:
    """Record the options in `out/experiment.json` on the first run; refuse a rerun that changes one, since the
    networks and stores already there were made with the old value and would be reused as they are."""
    record = out / "experiment.json"
    if not record.exists():
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(options(cfg), indent=2))
        tmp.rename(record)
        return
    changed = changed_options(cfg, json.loads(record.read_text()))
    if changed:
        raise ValueError(f"out: {out} was run with {', '.join(changed)}; a rerun may only add seeds or arms: choose "
                         f"another --out for other options")


def earlier_runs(cfg: ExperimentConfig, held: list) -> dict[str, dict]:
    """{seed: its scores} of the seeds that `cfg.results_from` (an earlier report.json of the same experiment)
    scored, kept to the arms asked for now: a seed's networks go with the machine that trained them, its scores stay
    in the report, so an experiment longer than one machine's day continues seed by seed and arm by arm. Refused
    when the report's experiment differs in anything but seeds, arms and folder."""
    if not cfg.results_from:
        return {}
    report = json.loads(Path(cfg.results_from).read_text())
    changed = changed_options(cfg, report["config"], ignore=("out",))
    held_out = [f"{c.dataset}/{c.name}" for c in held]
    if report["held_out"] != held_out:
        changed.append(f"held-out crops {report['held_out']} (now {held_out})")
    if changed:
        raise ValueError(f"results_from: {cfg.results_from} is another experiment: {', '.join(changed)}")
    arms, ddpms = cfg.chosen_arms, pairs_ddpms(cfg.chosen_arms)
    return {seed: {"arms": {arm: run["arms"][arm] for arm in arms if arm in run["arms"]},
                   "filtered": {r: kept for r, kept in run["filtered"].items() if f"{BASELINE[r]}+filtered" in arms},
                   "realism": {r: scores for r, scores in run["realism"].items() if r in ddpms},
                   "class_balance": run["class_balance"] if "full" in ddpms else {}}
            for seed, run in report["runs"].items()}


def run_experiment(cfg: ExperimentConfig) -> Path:
    """Run (or resume) every seed and arm, and write report.md and report.json into cfg.out; return the report."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    check_same_experiment(cfg, out)
    crops = training_crops(cfg)
    held = held_out_crops(cfg.stores, cfg.classes, cfg.holdout, cfg.voxel_size)
    maps = few_label_maps(cfg, crops) if cfg.from_labels_steps else {}
    if cfg.from_labels_steps and not maps:  # found out before hours of training, not after
        raise ValueError(f"from_labels_steps: the training crops {crops} have no annotated tile of classes "
                         f"{cfg.classes} on their {cfg.few_slices} labelled slices, so nothing to draw")
    earlier = earlier_runs(cfg, held)
    runs = {}
    for seed in map(str, cfg.seeds):
        kept = earlier.get(seed, {"arms": {}})
        missing = [arm for arm in cfg.chosen_arms if arm not in kept["arms"]]
        run = merge_runs(kept, SeedRun(cfg, int(seed), crops, maps, missing).run(held)) if missing else kept
        runs[seed] = {**run, "arms": {arm: run["arms"][arm] for arm in cfg.chosen_arms}}  # in table order
    report = {"config": asdict(cfg) | {"arms": cfg.chosen_arms}, "held_out": [f"{c.dataset}/{c.name}" for c in held],
              "training_crops": crops, "count_tile": count_tile(cfg), **summarize(runs, cfg.chosen_arms), "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=list))
    path = out / "report.md"
    path.write_text(markdown_report(report))
    return path


def merge_runs(earlier: dict, new: dict) -> dict:
    """One seed's record from an earlier report's arms and the arms trained now (what both have, the new one's)."""
    merged = {key: {**earlier.get(key, {}), **value} for key, value in new.items() if key != "class_balance"}
    return merged | {"class_balance": new["class_balance"] or earlier.get("class_balance", {})}


class SeedRun:
    """One seed's networks and data, trained, generated and scored in the order the arms need them.

    `arms`: those to train and score (the experiment's, less those an earlier report scored). An arm that
    continues or filters by its baseline's network (`+longer`, `+filtered`) trains that network here too when an
    earlier report holds only its scores."""

    def __init__(self, cfg: ExperimentConfig, seed: int, crops: dict[str, list[str]], maps: dict,
                 arms: list[str]):
        self.cfg, self.seed, self.crops, self.maps = cfg, seed, crops, maps
        self.dir = Path(cfg.out) / f"seed-{seed}"
        self.arms = arms
        self.shared = {"classes": cfg.classes, "patch_size": cfg.patch_size, "width": cfg.width,
                       "multipliers": tuple(cfg.multipliers), "blocks_per_level": cfg.blocks_per_level,
                       "batch_size": cfg.batch_size, "lr": cfg.lr, "class_groups": cfg.class_groups, "seed": seed,
                       "voxel_size": cfg.voxel_size, "crops": crops, "command": cfg.command}
        self.real = {"full": {"stores": cfg.stores}, "few": {"stores": cfg.stores, "labelled_slices": cfg.few_slices}}
        self.checkpoints: dict[str, Path] = {}

    def ddpm(self, name: str) -> Path:
        """The last checkpoint of the pairs DDPM `name` ("full" / "few") or of "from-labels", trained if needed."""
        if name not in self.checkpoints:
            mode, steps = ("em-from-labels", self.cfg.from_labels_steps) if name == "from-labels" else (
                "pairs", self.cfg.ddpm_steps)
            slices = 0 if name == "full" else self.cfg.few_slices
            config = DDPMConfig(stores=self.cfg.stores, out=str(self.dir / f"ddpm-{name}"), mode=mode, steps=steps,
                                labelled_slices=slices, checkpoint_every=max(steps // 4, 1), preview_every=steps,
                                **self.shared)
            self.checkpoints[name] = train_ddpm(config, resume=True)
        return self.checkpoints[name]

    def generated(self, regime: str) -> Path:
        return generate_pairs(self.cfg, self.ddpm(regime), self.dir / f"generated-{regime}.zarr", self.seed)

    def seg(self, arm: str, steps: int, data: dict, folder: str | None = None, resumes: Path | None = None) -> Path:
        """Train (or resume) the network of `arm`; `resumes` is another run's last checkpoint that this one
        continues (copied in whole when the folder has none of its own)."""
        out = self.dir / (folder or f"seg-{arm.replace('+', '-')}")
        if resumes is not None and not ckpt.checkpoints(out):
            with atomic_directory(out / resumes.name) as tmp:
                shutil.copytree(resumes, tmp)
        config = SegConfig(out=str(out), steps=steps, checkpoint_every=max(steps // 4, 1), preview_every=steps,
                           **{**self.shared, **data})
        return train_seg(config, resume=True)

    def arm_data(self, arm: str) -> tuple[dict, int]:
        """(training data options, steps) of an arm; trains what it depends on first. A longer arm is its
        baseline's run continued (same seed, data and constant learning rate), so it trains only the extra
        steps: see `network`."""
        cfg, steps = self.cfg, self.cfg.seg_steps
        if arm in BASELINE.values():
            return self.real[regime_of(arm)], steps
        if arm == "generated":
            return {"stores": [], "generated": [str(self.generated("full"))]}, steps
        regime, method = regime_of(arm), arm.split("+")[1]
        real, mixed = self.real[regime], {"generated_fraction": cfg.mix}
        if method == "pretrained":
            first = round(steps * PRETRAIN_SHARE)
            start = self.seg(arm, first, {"stores": [], "generated": [str(self.generated(regime))]},
                             folder=f"pretrain-{regime}")
            return {**real, "init": str(start)}, steps - first
        if method == "filtered":  # nothing kept: nothing to mix in, the arm trains as its baseline does
            store = self.filtered(regime)
            return ({**real, "generated": [str(store)], **mixed} if filter_record(store)["kept"] else real), steps
        if method == "weighted":
            return {**real, "generated": [str(self.generated(regime))], "generated_weight": cfg.generated_weight,
                    **mixed}, steps
        if method == "denoiser":
            return {**real, "init": str(self.ddpm(regime))}, steps
        if method == "longer":
            return real, steps + cfg.ddpm_steps
        if method == "depth":
            return {**real, "depth": cfg.depth}, steps
        if method == "elastic":
            return {**real, "elastic": cfg.mix}, steps
        if method in ("rendered", "augmented"):
            stores = render(cfg, self.ddpm("from-labels"), self.maps, self.dir, self.seed, method == "augmented")
            return {**real, "generated": [str(p) for p in stores], **mixed}, steps
        return {**real, "generated": [str(self.generated(regime))], **mixed}, steps

    def network(self, arm: str) -> Path:
        """The last checkpoint of an arm's segmentation network, trained (or resumed) if needed."""
        data, steps = self.arm_data(arm)
        if arm.endswith("+longer"):
            regime = regime_of(arm)
            baseline = self.seg(BASELINE[regime], self.cfg.seg_steps, self.real[regime])
            return self.seg(arm, steps, data, resumes=baseline)
        return self.seg(arm, steps, data)

    def scores(self, arm: str, checkpoint: Path, held: list) -> dict:
        """The arm's scores on the held-out crops, kept in `scores/<arm>.json` beside the networks: a rerun (one
        that adds arms or seeds) scores only networks it has not scored, and the record names the weights it
        scored, so a retrained network is scored anew."""
        record = self.dir / "scores" / f"{arm.replace('+', '-')}.json"
        key = {"checkpoint": str(checkpoint), "weights": ModelCard.load(checkpoint).weights,
               "held_out": [f"{c.dataset}/{c.name}" for c in held], "count_tile": count_tile(self.cfg)}
        if record.exists():
            kept = json.loads(record.read_text())
            if kept["key"] == key:
                return kept["scores"]
        with load_runtime(checkpoint, "torch") as runtime:
            scores = evaluate_segmentation(runtime, held, count_tile=count_tile(self.cfg))
        write_json(record, {"key": key, "scores": scores})
        return scores

    def filtered(self, regime: str) -> Path:
        """The regime's generated pairs that its baseline network agrees with (threshold from training patches)."""
        baseline = self.seg(BASELINE[regime], self.cfg.seg_steps, self.real[regime])
        store = self.dir / f"filtered-{regime}.zarr"
        if not store.exists():
            with load_runtime(baseline, "torch") as segmenter:
                real = real_agreement(self.cfg, segmenter, self.crops, self.real[regime].get("labelled_slices", 0))
            filter_store(self.generated(regime), store, baseline, real, self.cfg.filter_quantile, self.cfg.classes)
        return store

    def run(self, held: list) -> dict:
        """Train and score every arm; the realism of each pairs DDPM's EM; class-presence guidance."""
        scores, filtered = {}, {}
        for arm in self.arms:
            scores[arm] = self.scores(arm, self.network(arm), held)
        for regime in ("full", "few"):
            store = self.dir / f"filtered-{regime}.zarr"
            if store.exists():
                filtered[regime] = filter_record(store)
        realism = {name: evaluate_realism(str(self.generated(name)), self.cfg.stores, samples=self.cfg.samples,
                                          seed=self.seed, picture=self.dir / f"quiz-{name}.png",
                                          voxel_size=self.cfg.voxel_size)
                   for name in ("full", "few") if name in self.checkpoints}
        balance = self.class_balance() if "full" in self.checkpoints else {}
        return {"arms": scores, "filtered": filtered, "realism": realism, "class_balance": balance}

    def class_balance(self) -> dict:
        """Share of the full DDPM's samples holding the rarest training class (an object of real size), unguided
        vs guided to contain it, beside the share of real training patches that hold it."""
        checkpoint = self.ddpm("full")
        rare = rarest_class(self.cfg, self.crops)
        training = [f"{dataset}/{crop}" for dataset, names in self.crops.items() for crop in names]
        found = {}
        for name, present in (("unguided", ()), ("guided", (rare,))):
            # unscreened: the question is what the model draws, not what survives screening
            store = generate_pairs(self.cfg, checkpoint, self.dir / f"balance-{name}.zarr", self.seed, present,
                                   screen=False)
            found[name] = evaluate_presence(str(store), self.cfg.stores, [rare], crops=training,
                                            voxel_size=self.cfg.voxel_size)["classes"][0]
        return {"class": rare, "model_classes": ModelCard.load(checkpoint).classes,
                "min_object_pixels": found["guided"]["min_object_pixels"], "real": found["guided"]["real"],
                "unguided": found["unguided"]["generated"], "guided": found["guided"]["generated"]}


def rarest_class(cfg: ExperimentConfig, crops: dict[str, list[str]]) -> str:
    """The class present in the fewest training slices (ties: the fewest voxels)."""
    counts = {name: [0, 0] for name in cfg.classes}
    for path in cfg.stores:
        store = EMStore(path)
        for crop in crops.get(store.name, []):
            present = store.read_crop(crop, cfg.classes, cfg.voxel_size).labels == PRESENT
            for k, name in enumerate(cfg.classes):
                counts[name][0] += int(present[k].any(axis=(1, 2)).sum())
                counts[name][1] += int(present[k].sum())
    found = {n: c for n, c in counts.items() if c[1]}
    return min(found or counts, key=lambda n: tuple(counts[n]))
