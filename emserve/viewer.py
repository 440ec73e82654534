"""Look at stores in neuroglancer: EM, ground truth, predictions and probabilities as layers, placed in nm.

neuroglancer's Python package serves the arrays from this process: a layer's volume is read chunk by chunk as the
viewer asks for it (zarr reads on demand), so a large store is never loaded whole. The server binds to 127.0.0.1
only; open the printed link on this machine, or through an SSH tunnel from another.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emserve.classes import PRESENT
from emserve.data.ngff import ScaleLevel, parse_multiscales
from emserve.data.sources import EM_GROUP
from emserve.data.store import EMStore, is_store
from emserve.data.writer import INFERENCE_GROUP
from emserve.pictures import save_png

SCREEN = (1000, 750)  # width, height in pixels of the view the first state fits
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")  # for headless screenshots
PREDICTIONS = {"segmentation": "segmentation", "probabilities": "image"}  # inference group -> layer kind


def neuroglancer() -> Any:
    try:
        import neuroglancer as ng
    except ImportError:
        raise ImportError("view: needs neuroglancer; pip install 'emserve[view]'") from None
    return ng


def placed(ng: Any, data: Any, level: ScaleLevel, kind: str) -> Any:
    """A LocalVolume of `data` (z-y-x) at `level`'s voxel size and offset, in nm."""
    space = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=list(level.voxel_size))
    offset = [round(t / v) for t, v in zip(level.translation, level.voxel_size, strict=True)]
    return ng.LocalVolume(data, dimensions=space, voxel_offset=offset, volume_type=kind)


def store_layers(path: str) -> list[tuple[str, Any, bool]]:
    """(name, layer, shown at first) of everything a store holds: its EM (finest level), each ground-truth crop as one
    segmentation (segment id = position of the class in the crop's class list + 1), and the masks (segmentation)
    and probabilities (image, hidden at first) of `emserve segment`."""
    ng = neuroglancer()
    if not is_store(path):
        raise ValueError(f"stores: {path} is not a zarr or n5 store")
    store, layers = EMStore(path), []
    name, root = store.name, store.root  # root: None for N5 (EM only; emserve writes no predictions there)
    if root is None or EM_GROUP in root:  # prediction stores hold no EM
        level = store.em_level()
        layers.append((f"{name} em", ng.ImageLayer(source=placed(ng, store.em_volume(level), level, "image")), True))
    for crop in store.crops:
        classes = store.crop_classes(crop)
        labelled = store.read_crop(crop, classes)
        ids = np.zeros(labelled.labels.shape[1:], np.uint32)
        for k in reversed(range(len(classes))):  # the first class listed wins where classes overlap
            ids[labelled.labels[k] == PRESENT] = k + 1
        crop_level = ScaleLevel("s0", labelled.voxel_size, labelled.translation)
        layers.append((f"{name} {crop}", ng.SegmentationLayer(source=placed(ng, ids, crop_level, "segmentation")),
                       True))
    if root is not None and INFERENCE_GROUP in root:
        for group, kind in PREDICTIONS.items():
            if f"{INFERENCE_GROUP}/{group}" not in root:
                continue
            predicted = root[f"{INFERENCE_GROUP}/{group}"]
            for cls in sorted(predicted.group_keys()):
                node = predicted[cls]
                first = parse_multiscales(node.attrs.asdict(), f"{path}/{INFERENCE_GROUP}/{group}/{cls}")[0]
                source = placed(ng, node[first.path], first, kind)
                layer = ng.SegmentationLayer(source=source) if kind == "segmentation" else ng.ImageLayer(source=source)
                layers.append((f"{name} {group} {cls}", layer, kind == "segmentation"))
    return layers


def viewer_state(paths: Sequence[str], screen: tuple[int, int] = SCREEN) -> Any:
    """The neuroglancer state showing every store in `paths`, in nm, z-y-x: the middle section of the first
    layer, whole, on a view of `screen` (width, height) pixels."""
    ng = neuroglancer()
    state = ng.ViewerState()
    state.dimensions = ng.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=[1, 1, 1])
    for path in paths:
        for name, layer, shown in store_layers(str(path)):
            state.layers.append(name=name, layer=layer, visible=shown)
    state.display_dimensions = ["x", "y", "z"]  # the xy panel shows a section (neuroglancer's default: the first
    state.layout = "xy"                          # two dimensions, z and y, a reslice)
    state.show_default_annotations = False  # each layer's bounding box: clutter over the section
    state.show_axis_lines = False
    if len(state.layers):
        volume = state.layers[0].layer.source[0].url
        space = volume.info()
        scales = [scale * 1e9 for scale, _ in space["coordinateSpace"].values()]  # m -> nm
        box = [(offset * scale, (offset + size) * scale)
               for offset, size, scale in zip(space["voxelOffset"], space["shape"], scales, strict=True)]
        state.position = [(low + high) / 2 for low, high in box]
        (y0, y1), (x0, x1) = box[1:]
        state.cross_section_scale = max((x1 - x0) / screen[0], (y1 - y0) / screen[1])  # nm per screen pixel
    return state


def serve(paths: Sequence[str | Path], port: int = 0, screen: tuple[int, int] = SCREEN) -> Any:
    """A running neuroglancer viewer (on 127.0.0.1:`port`, 0 for a free one) showing `paths`."""
    ng = neuroglancer()
    ng.set_server_bind_address("127.0.0.1", port)
    viewer = ng.Viewer()
    viewer.set_state(viewer_state([str(p) for p in paths], screen))
    return viewer


def parse_size(text: str | None) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels, each 64 to 4096; None: SCREEN."""
    if text is None:
        return SCREEN
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and all(64 <= int(n) <= 4096 for n in (width, height))):
        raise ValueError(f"size: {text!r} is not allowed; give WIDTHxHEIGHT in pixels, each 64 to 4096 (e.g. 1000x750)")
    return int(width), int(height)


def screenshot(viewer: Any, out: Path, screen: tuple[int, int]) -> None:
    """Save the viewer's picture at `screen` (width, height) pixels as PNG, taken by a headless Chrome or Chromium that
    selenium drives (neuroglancer renders with WebGL: there is no picture without a browser). The picture is
    taken once every visible layer's chunks have loaded."""
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if browser is None:
        raise RuntimeError(f"screenshot: needs one of {', '.join(BROWSERS)} on PATH (e.g. apt install chromium)")
    try:
        from neuroglancer.webdriver import Webdriver
    except ImportError:
        raise ImportError("screenshot: needs selenium; pip install 'emserve[view]'") from None
    with Webdriver(viewer, headless=True, browser="chrome", browser_binary_path=browser, docker=True,
                   print_logs=False):
        shot = viewer.screenshot(size=list(screen))
    save_png(np.asarray(Image.open(io.BytesIO(shot.screenshot.image)).convert("RGB")), out)
