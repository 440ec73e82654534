"""Label decodings of the default pairs model, compared on the same samples: screening acceptance as drawn and
pair consistency (the default segmenter reads the generated EM; Dice against the decoded labels, pooled over the
samples, per class, then the mean over classes defined in any decoding's labels or prediction)."""
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from emserve.classes import MEMBRANE_OF
from emserve.pipelines import GenerationRequest, generate
from emserve.postprocess import Screening, labels_from_channels
from emserve.runtime.load import load_runtime
from emserve.segmentation import masks_from_probabilities, segment_array


def eroded(masks, classes):
    """The paired decoding until 2026-12-07: the organelle (lumen | membrane) as drawn, its lumen eroded by one
    pixel and the rest membrane (a lumen under three pixels across becomes membrane)."""
    index = {n: k for k, n in enumerate(classes)}
    out = masks.copy()
    for s in range(len(masks)):
        for lumen, membrane in MEMBRANE_OF.items():
            if lumen in index and membrane in index:
                organelle = masks[s, index[lumen]] | masks[s, index[membrane]]
                inside = masks[s, index[lumen]] & ndimage.binary_erosion(organelle, border_value=1)
                out[s, index[lumen]], out[s, index[membrane]] = inside, organelle & ~inside
    return out


pairs, seg = load_runtime("models/phantom-pairs"), load_runtime("models/phantom-seg")
classes = pairs.card.label_classes
rows = {}
for dataset in sys.argv[2:]:
    request = GenerationRequest(samples=64, seed=0, dataset=dataset)
    samples = np.concatenate([b.samples for b in generate(pairs.card, pairs, request)])
    raw, channels = samples[:, 0], samples[:, 1:]
    probs = segment_array(seg, raw)  # [K, N, H, W]
    predicted = masks_from_probabilities(seg.card, probs)
    decodings = {m: labels_from_channels(channels, m, classes=classes) for m in ("threshold", "argmax", "paired")}
    decodings["eroded"] = eroded(decodings["argmax"], classes)
    for name, masks in decodings.items():
        screen = Screening()
        for sample in masks:
            screen.check(sample, classes)
        dice = {}
        for k, c in enumerate(seg.card.classes):
            truth, pred = masks[:, classes.index(c)], predicted[k]
            total = truth.sum() + pred.sum()
            dice[c] = None if total == 0 else float(2 * (truth & pred).sum() / total)
        defined = [v for v in dice.values() if v is not None]
        rows[f"{dataset}/{name}"] = {"screening": screen.summary(), "accepted": screen.accepted,
                                     "mean_dice": float(np.mean(defined)), "dice": dice}
        print(dataset, name, screen.accepted, "of", len(masks), f"consistency {np.mean(defined):.3f}", flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
