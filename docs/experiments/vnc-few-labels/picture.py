"""seed-0/few-vs-denoiser.png: a held-out VNC section (crop2, its second slice): EM, the true labels, `few`'s
masks and `few+denoiser`'s (seed 0). Run from the repository root: python docs/experiments/vnc-few-labels/picture.py
"""
from emserve.classes import PRESENT
from emserve.evaluation.evaluate import held_out_crops
from emserve.pictures import grid, pair_tile, save_png
from emserve.runtime.load import load_runtime
from emserve.segmentation import masks_from_probabilities, segment_array

classes = ["mito", "pm", "syn"]
crop = held_out_crops(["data/vnc.zarr"], classes, ["crop2"], voxel_size=(50, 9.2, 9.2))[0]
raw = crop.raw[1]  # float in [-1, 1]
tiles = [pair_tile(raw, None, classes), pair_tile(None, crop.labels[:, 1] == PRESENT, classes)]
for arm in ("few", "few-denoiser"):
    with load_runtime(f"runs/exp-vnc/seed-0/seg-{arm}/step-00001000", "torch") as runtime:
        tiles.append(pair_tile(None, masks_from_probabilities(runtime.card, segment_array(runtime, raw)), classes))
print(save_png(grid(tiles, columns=4), "docs/experiments/vnc-few-labels/seed-0/few-vs-denoiser.png"))
