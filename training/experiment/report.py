"""The experiment's report: every arm's mean Dice over seeds with its 95 % interval, each generated-data arm's
paired difference to its baseline with its interval and what that interval says, and the seeds' details."""

from __future__ import annotations

import numpy as np

from emserve.diffusion import DEFAULT_LABEL_GUIDANCE
from emserve.evaluation.metrics import format_score
from emserve.evaluation.statistics import dice_interval, paired_difference, verdict
from training.experiment.config import (
    BASELINE,
    PRETRAIN_SHARE,
    SAMPLING,
    baseline_of,
    control_of,
    pairs_ddpms,
    recorded_defaults,
)
from training.transfer import FOLD_TIME


def summarize(runs: dict[str, dict], arms: list[str]) -> dict:
    """{"arms": {arm: mean Dice, interval, per-seed and per-class Dice}, "comparisons": [paired differences]}
    from every seed's scores (runs: seed -> SeedRun.run's result)."""
    seeds = list(runs)
    counts = {arm: np.array([runs[s]["arms"][arm]["tile_counts"] for s in seeds]) for arm in arms}
    summary = {}
    for arm in arms:
        per_seed = [runs[s]["arms"][arm] for s in seeds]
        classes = [{"name": row["name"], "dice": _mean([r["classes"][k]["dice"] for r in per_seed])}
                   for k, row in enumerate(per_seed[0]["classes"])]
        summary[arm] = {**dice_interval(counts[arm]), "per_seed": [r["mean"]["dice"] for r in per_seed],
                        "classes": classes}
    comparisons = []
    for arm in arms:
        if arm in BASELINE.values():
            continue
        for baseline in (baseline_of(arm), control_of(arm)):
            if baseline in arms:
                diff = paired_difference(counts[arm], counts[baseline])
                comparisons.append({"arm": arm, "baseline": baseline, **diff,
                                    "verdict": verdict(diff["ci95"], diff["per_seed"])})
    return {"arms": summary, "comparisons": comparisons}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci[0] < 0 or ci[1] < 0 else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def budget(cfg: dict, arms: list[str]) -> str:
    """The budgets and settings of the arms that were run (and of none that were not), in one paragraph."""
    methods = {arm.partition("+")[2] for arm in arms if "+" in arm}
    samples = "generated" in arms or methods & set(SAMPLING)
    cfg = recorded_defaults() | cfg  # a report written before an option existed ran with its default
    parts = {
        "pretrained": f"pretrained arms: {PRETRAIN_SHARE:.0%} of the segmentation steps on generated pairs, the "
                      f"rest on real ones",
        "weighted": f"weighted arms: generated patches weigh {cfg['generated_weight']}",
        "filtered": f"filtered arms: kept if the baseline network agrees with the pair at least as well as with the "
                    f"lower {cfg['filter_quantile']:.0%} of real training patches (none kept: the arm trains as its "
                    f"baseline)",
        "denoiser": f"denoiser arms: the whole budget on real pairs, starting from the regime's pairs DDPM folded "
                    f"into a segmenter at {FOLD_TIME:.0%} of its schedule (denoising pretraining, no generated data)",
        "longer": "longer arms: their baseline's data for the segmentation and DDPM budgets together (the compute "
                  "of the denoiser arms)",
        "depth": f"depth arms: their baseline's data, the network reading {cfg['depth']} adjacent sections (2.5D, no "
                 f"generative model)",
        "elastic": f"elastic arms: their baseline's data, {cfg['mix']} of every batch elastically deformed copies "
                   f"of annotated patches (EM and labels bent alike, as the augmented arm bends its label maps; no "
                   f"generative model)",
        "rendered": f"rendered arms: an EM-from-labels DDPM of {cfg['from_labels_steps']} steps, trained on the "
                    f"few-label data and on unlabelled EM of whole volumes (held-out crops' EM included, never their "
                    f"labels: the one generator that sees held-out EM), draws the labelled slices' label maps "
                    f"(augmented: deformed first) as {cfg['samples']} EM images ({cfg['sampler']}, "
                    f"{cfg['sample_steps']} {cfg['spacing']}-spaced steps, label guidance {DEFAULT_LABEL_GUIDANCE})",
    }
    text = [f"segmentation {cfg['seg_steps']} steps, batch {cfg['batch_size']}, patch {cfg['patch_size']}, UNet "
            f"width {cfg['width']} x {tuple(cfg['multipliers'])}"]
    if pairs_ddpms(arms) or "longer" in methods:
        text.append(f"pairs DDPM {cfg['ddpm_steps']} steps")
    if samples:
        text.append(f"{cfg['samples']} generated pairs per DDPM ({cfg['sampler']}, {cfg['sample_steps']} "
                    f"{cfg['spacing']}-spaced steps, label objects under {cfg['despeckle']} pixels dropped, "
                    f"{cfg['label_method']} decoding)")
    if methods & {"generated", "filtered", "weighted", "rendered", "augmented"}:
        text.append(f"generated share of each mixed batch {cfg['mix']}")
    methods |= {"rendered"} if "augmented" in methods else set()
    text += [parts[m] for m in parts if m in methods]
    if "few" in arms:
        text.append(f"few = {cfg['few_slices']} labelled slices per crop")
    return f"Budget: {'; '.join(text)}; real data at voxel size {cfg['voxel_size'] or 'finest'} nm."


def markdown_report(report: dict) -> str:
    """The report people read: what was run, scores with intervals, the differences in words, then details."""
    cfg, arms, seeds = report["config"], report["arms"], list(report["runs"])
    lines = ["# Does the generative model help segmentation?", "",
             f"Stores: {', '.join(cfg['stores'])}. Held out (scored, never trained on): "
             f"{', '.join(report['held_out'])}. Seeds: {', '.join(seeds)} (each seed trains every DDPM and network "
             f"of the experiment anew).", "",
             f"Command: `{cfg['command'] or 'emserve experiment (library call)'}`", "",
             budget(cfg, list(arms)), "",
             "## Segmentation on the held-out crops", "",
             f"Mean Dice over classes, averaged over seeds; 95 % interval from a bootstrap over seeds and held-out "
             f"columns ({report['count_tile']} x {report['count_tile']} pixels through every section).", "",
             "| arm | mean Dice | 95 % interval | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---" * (3 + len(seeds)) + "|"]
    for arm, row in arms.items():
        lines.append(f"| {arm} | {row['mean_dice']:.3f} | {_interval(row['ci95'])} | "
                     + " | ".join(format_score(v) for v in row["per_seed"]) + " |")
    if report["comparisons"]:
        lines += ["", "## Does the generative model help?", "",
                  "Each arm that adds generated data, the DDPM's weights, training steps, depth context or elastic "
                  "deformation against its "
                  "baseline (real annotations only, same seeds): the paired difference in mean Dice, resampled with "
                  "the same seeds and blocks for both.", "",
                  "| arm | baseline | difference | 95 % interval | per seed | reading |", "|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            per_seed = " / ".join(f"{d:+.3f}" for d in c["per_seed"])
            lines.append(f"| {c['arm']} | {c['baseline']} | {c['mean_dice_diff']:+.3f} | {_interval(c['ci95'])} | "
                         f"{per_seed} | {c['verdict']} |")
        lines += ["", _in_words(report["comparisons"])]
    lines += ["", "Dice per class, mean over seeds (- : undefined, the class is absent there and never predicted):",
              "", "| class | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    first = next(iter(arms.values()))
    for k, row in enumerate(first["classes"]):
        lines.append(f"| {row['name']} | " + " | ".join(format_score(a["classes"][k]["dice"]) for a in arms.values())
                     + " |")
    lines += _seed_details(report["runs"])
    return "\n".join(lines) + "\n"


def _in_words(comparisons: list[dict]) -> str:
    said = {"better": "Better than what they are compared with (interval above zero, every seed gains)",
            "worse": "Worse than what they are compared with (interval below zero, every seed loses)",
            "not distinguishable from zero": "Not distinguishable from what they are compared with at this "
                                             "number of seeds"}
    parts = []
    for reading, words in said.items():
        arms = [c["arm"] if c["baseline"] == baseline_of(c["arm"]) else f"{c['arm']} over {c['baseline']}"
                for c in comparisons if c["verdict"] == reading]
        if arms:
            parts.append(f"{words}: {', '.join(arms)}.")
    if comparisons and comparisons[0]["seeds"] < 3:
        parts.append(f"Only {comparisons[0]['seeds']} seed(s): too few for a claim either way (3 at least).")
    return " ".join(parts)


def _seed_details(runs: dict[str, dict]) -> list[str]:
    lines = []
    filtered = [(s, regime, f) for s, run in runs.items() for regime, f in run["filtered"].items()]
    if filtered:
        lines += ["", "## Filtering by agreement", "", "| seed | regime | threshold (mean Dice) | kept of screened |",
                  "|---|---|---|---|"]
        lines += [f"| {s} | {regime} | {f['threshold']:.3f} | {f['kept']} of {f['screened_pairs']} |"
                  for s, regime, f in filtered]
    realism = [(s, name, r) for s, run in runs.items() for name, r in run["realism"].items()]
    if realism:
        lines += ["", "## Realism of the generated EM", "",
                  "Features: emserve's fixed filter bank; the floor is real vs real (two independent draws).", "",
                  "| seed | DDPM trained on | FD | FD real vs real | KID | KID real vs real |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {name} labels | {r['fd']:.3f} | {r['fd_real_vs_real']:.3f} | {r['kid']:.4f} | "
                  f"{r['kid_real_vs_real']:.4f} |" for s, name, r in realism]
    balance = [(s, run["class_balance"]) for s, run in runs.items() if run["class_balance"]]
    if balance:
        lines += ["", "## Class-presence guidance", "",
                  "Share of the full-label DDPM's samples holding the rarest training class (an object of at least "
                  "the smallest tenth of real sizes), unguided and guided to contain it, beside real patches.", "",
                  "| seed | class | min pixels | unguided | guided | real |", "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {b['class']} | {b['min_object_pixels']} | {format_score(b['unguided'])} | "
                  f"{format_score(b['guided'])} | {format_score(b['real'])} |" for s, b in balance]
    first = next(iter(runs))
    pictures = [f"![{name}](seed-{first}/{name}.png)" for name in ("generated-full", "generated-few")
                if name.split("-")[1] in runs[first]["realism"]]
    if pictures:
        lines += ["", "## Pictures", "", f"Generated pairs of seed {first} (EM beside labels): " + " ".join(pictures)]
    return lines

