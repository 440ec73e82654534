"""Writing the phantom datasets as CellMap-layout zarr stores (and a montage PNG each)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from emserve.classes import UNKNOWN

from .crops import choose_crops
from .labels import ID, PHANTOM_CLASSES
from .montage import write_montage
from .presets import preset_for
from .volume import DEFAULT_SHAPE, make_phantom

# The class one crop leaves unannotated (no array at all), so readers must tell "unannotated" from "absent";
# the first of these present in that crop is dropped.
UNANNOTATED_CANDIDATES: tuple[str, ...] = ("er_mem", "ves_mem", "mito_mem", "pm")

DEFAULT_CROP_SHAPE = (32, 128, 128)


def write_phantoms(
    out_dir: str | os.PathLike,
    seed: int = 0,
    datasets: int = 3,
    crops_per_dataset: int = 3,
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    crop_shape: Sequence[int] = DEFAULT_CROP_SHAPE,
    levels: int = 2,
    montage: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Write `datasets` phantom stores `<out_dir>/<name>.zarr` (CellMap layout) and a PNG montage for each.

    Returns the store paths. With more than one crop per dataset, the last crop of the second dataset (or of the
    only one) leaves one class unannotated (no array): it reads back as UNKNOWN, and its voxels are UNKNOWN (255)
    in that crop's `all` ids. Crops are numbered across datasets (crop1, crop2, ...) as in CellMap.
    """
    from emserve.data.writer import CropToWrite, provenance, write_store

    if datasets < 1 or crops_per_dataset < 1:
        raise ValueError(f"datasets / crops_per_dataset: need at least 1 each, got {datasets} / {crops_per_dataset}")
    shape, crop_shape = tuple(int(s) for s in shape), tuple(int(c) for c in crop_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape: {list(shape)} must be three positive sizes Z,Y,X")
    if len(crop_shape) != 3 or any(c < 1 or c > s for c, s in zip(crop_shape, shape, strict=False)):
        raise ValueError(f"crop_shape: {crop_shape} must be three sizes between 1 and the EM shape {shape}")
    out = Path(out_dir)
    names = [preset_for(i, seed).name for i in range(datasets)]
    if not overwrite:
        for name in names:
            if (out / f"{name}.zarr").exists():
                raise FileExistsError(f"output: {out / f'{name}.zarr'} already exists; choose another folder or "
                                      f"pass --overwrite")
    partial_index = min(1, datasets - 1) if crops_per_dataset > 1 else None
    paths, crop_number = [], 0
    for index in range(datasets):
        volume = make_phantom(index, seed, shape)
        offsets = choose_crops(volume.ids, crop_shape, crops_per_dataset, np.random.default_rng([seed, index, 30]))
        crops = []
        for k, offset in enumerate(offsets):
            crop_number += 1
            box = tuple(slice(o, o + c) for o, c in zip(offset, crop_shape, strict=True))
            ids = volume.ids[box].copy()
            classes = list(PHANTOM_CLASSES)
            unannotated: list[str] = []
            if index == partial_index and k == len(offsets) - 1:
                present = [c for c in UNANNOTATED_CANDIDATES if (ids == ID[c]).any()]
                drop = (present or list(UNANNOTATED_CANDIDATES))[0]
                classes.remove(drop)
                unannotated.append(drop)
                ids[ids == ID[drop]] = UNKNOWN
            labels = {c: (ids == ID[c]).astype(np.uint8) for c in classes}
            attrs = {"phantom": {"dataset": volume.name, "offset_voxels": list(offset), "annotated": classes,
                                 "unannotated": unannotated,
                                 "note": ("classes listed under 'unannotated' have no array here: unknown, not "
                                          "absent; their voxels are 255 in 'all' (the other arrays are exact)")
                                 if unannotated else "all phantom classes annotated; 'all' holds exact ids"}}
            crops.append(CropToWrite(f"crop{crop_number}", offset, labels, ids=ids, attrs=attrs))
        attrs = {
            **provenance(generator="phantom", seed=seed, dataset=volume.name, dataset_index=index,
                         shape=list(shape), crop_shape=list(crop_shape), classes=list(PHANTOM_CLASSES),
                         content=asdict(volume.preset.content)),
            "phantom": {"description": volume.preset.description, "imaging": asdict(volume.preset.imaging),
                        "objects": volume.stats["objects"], "fractions": volume.stats["fractions"]},
        }
        path = write_store(out / f"{volume.name}.zarr", volume.raw, volume.voxel_size, crops,
                           translation=volume.translation, levels=levels, attrs=attrs, overwrite=overwrite)
        paths.append(path)
        if montage:  # show the fully annotated crop with the most classes
            full = [c for c in crops if not c.attrs["phantom"]["unannotated"]] or crops
            best = max(full, key=lambda c: len(np.unique(c.ids)))
            write_montage(out / f"{volume.name}.png", volume, best.offset, crop_shape, best.ids)
    return paths
