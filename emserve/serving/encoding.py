"""Results encoded to bytes in memory: .npz, zipped zarr stores and PNG previews. Zip members carry a fixed
timestamp, so the same request and seed give the same bytes."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: results do not depend on the clock


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load with allow_pickle=False) whose bytes depend only on the arrays."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", ZIP_TIME), member.getvalue(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def zip_folder(folder: Path) -> bytes:
    """A zarr store folder as a zip with the store's keys at its root (what zarr.storage.ZipStore reads)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), ZIP_TIME)
            archive.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def png_bytes(rgb: np.ndarray, metadata: Mapping[str, Any]) -> bytes:
    """A PNG of an RGB picture with the result's metadata as JSON in its `emserve` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("emserve", json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
