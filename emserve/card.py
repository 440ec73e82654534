"""The model card: the JSON that travels with every checkpoint and export and says what the weights mean.

Channels, class list, conditioning inputs and their null values, schedule and objective are facts about the
weights; runtimes read them from here instead of guessing, and refuse a request that does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emserve.checks import check_depth
from emserve.classes import check_class_names

MODES = ("em", "labels", "pairs", "em-from-labels", "segmentation")
RAW = "raw"
BACKGROUND = "background"  # the extra output channel of exclusive segmentation networks
CARD_NAME = "card.json"


@dataclass
class ModelCard:
    """What a model is. `channels` are the denoised (or, for segmentation, output) channels by name."""

    mode: str
    classes: list[str]
    patch_size: int
    unet: dict[str, Any]
    schedule: str = "sigmoid"
    timesteps: int = 1000
    objective: str = "v"
    datasets: list[str] = field(default_factory=list)  # dataset condition ids are indices into this list
    # Dataset name -> the voxel size (nm, z-y-x) its EM was learnt at: what generated samples of it stand for.
    voxel_sizes: dict[str, list[float]] = field(default_factory=dict)
    class_condition: bool = False  # class-presence vector over `classes`: +1 present, -1 absent, 0 unknown
    # Segmentation only: one class per voxel (softmax over background + classes) instead of a sigmoid per class.
    exclusive: bool = False
    # Sections per sample along the slicing axis: a segmentation network with depth context (2.5D) reads `depth`
    # adjacent sections as its input channels and labels the middle one. 1: a 2D model (every generative mode).
    depth: int = 1
    training: dict[str, Any] = field(default_factory=dict)  # data, command, step, seed, time
    weights: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    # Exported models only (empty in checkpoints): files of the export folder (relative path -> sha256), and
    # what the export recorded (graph inputs and output, exporter, parity errors, source checkpoint).
    files: dict[str, str] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not a model mode; allowed: {', '.join(MODES)}")
        self.classes = list(check_class_names(self.classes)) if self.mode != "em" or self.classes else []
        if self.exclusive and self.mode != "segmentation":
            raise ValueError(f"exclusive: only segmentation networks can be exclusive, not a {self.mode!r} model")
        check_depth(self.depth)
        if self.depth > 1 and self.mode != "segmentation":
            raise ValueError(f"depth: {self.depth}; allowed for a {self.mode!r} model: 1 (only segmentation networks "
                             "read adjacent sections)")

    @property
    def channels(self) -> list[str]:
        if self.mode in ("em", "em-from-labels"):
            return [RAW]
        if self.mode == "pairs":
            return [RAW, *self.classes]
        if self.exclusive:
            return [BACKGROUND, *self.classes]
        return list(self.classes)  # labels; segmentation outputs

    @property
    def label_classes(self) -> list[str]:
        """The classes whose labels a generated sample carries: none for an em model, even one trained with a
        class list (its classes describe the training data, they neither condition it nor come out of it)."""
        return [] if self.mode == "em" else list(self.classes)

    @property
    def label_map_condition(self) -> bool:
        return self.mode == "em-from-labels"

    @property
    def conditions(self) -> dict[str, dict[str, Any]]:
        """Conditioning inputs with their shapes and null values, as a runtime must feed them."""
        out: dict[str, dict[str, Any]] = {}
        if self.class_condition:
            out["classes"] = {"shape": ["B", len(self.classes)], "dtype": "float32", "null": 0.0,
                              "values": "+1 present, -1 absent, 0 unknown"}
        if self.datasets:
            out["dataset"] = {"shape": ["B"], "dtype": "int64", "null": -1, "values": self.datasets}
        if self.label_map_condition:
            out["label_map"] = {"shape": ["B", len(self.classes), "H", "W"], "dtype": "float32", "null": 0.0,
                                "values": "+1 present, -1 absent, 0 not given"}
        return out

    def null_conditions(self, batch: int, height: int, width: int) -> dict[str, np.ndarray]:
        """Every conditioning input at its null value ("no condition") for a batch of height x width samples: the
        unconditional half of classifier-free guidance, and what training drops conditions to."""
        dims = {"B": batch, "H": height, "W": width}
        return {name: np.full([dims.get(d, d) for d in spec["shape"]], spec["null"], spec["dtype"])
                for name, spec in self.conditions.items()}

    def dataset_id(self, name: str | None) -> int:
        """The condition id of a dataset name (-1, the null, for None)."""
        if name is None:
            return -1
        if name not in self.datasets:
            allowed = ", ".join(self.datasets) or "none (this model has no dataset condition)"
            raise ValueError(f"dataset: {name!r} is not known to this model; allowed: {allowed}")
        return self.datasets.index(name)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "channels": self.channels, "conditions": self.conditions}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        data = json.loads(text)
        for derived in ("channels", "conditions"):
            data.pop(derived, None)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_NAME
        if not path.exists():
            raise FileNotFoundError(f"model: {path} does not exist; expected a model card ({CARD_NAME})")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"model: {path} is not a valid model card: {error}") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
