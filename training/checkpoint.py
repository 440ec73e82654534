"""Checkpoints: safetensors weights, optimizer state and RNG state, plus the JSON model card.

A checkpoint is a folder `step-<N>/` written under a temporary name and renamed into place, so a run killed at
any moment (even SIGKILL) leaves only whole checkpoints and loses at most one checkpoint interval. Nothing is
unpickled: tensors live in safetensors files, everything else is JSON. Weights are checked against the sha256 in
the card before use, so a truncated or tampered file is refused with a message saying which one.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from emserve.card import ModelCard, sha256_file
from emserve.data.writer import atomic_directory, remove_directory
from emserve.runtime.eager import EMA_FILE, MODEL_FILE

OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainingState:
    """Everything besides weights that an exact resume needs."""

    step: int
    # one entry per data-parallel rank: {"torch": torch.get_rng_state() (dropout inside the model), "drop": state
    # of the generator that drops conditions}; batches need none (training.batches: seeded by step)
    ranks: list[dict[str, Any]]
    losses: list[float]


def save_checkpoint(run_dir: Path, card: ModelCard, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: TrainingState, keep: int = 2) -> Path:
    """Write `run_dir/step-<N>` atomically and delete all but the newest `keep` checkpoints."""
    final = run_dir / f"step-{state.step:08d}"
    with atomic_directory(final, overwrite=True) as tmp:
        tmp.mkdir(parents=True)
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE))
        save_file(_contiguous(ema.state_dict()), str(tmp / EMA_FILE))
        tensors, groups = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({**state.__dict__, "param_groups": groups}))
        card.training["step"] = state.step
        card.weights = {name: sha256_file(tmp / name) for name in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE)}
        (tmp / "card.json").write_text(card.to_json())
    for old in checkpoints(run_dir)[:-keep]:
        remove_directory(old)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Whole checkpoints in `run_dir`, oldest first (temporary folders of an interrupted write are ignored)."""
    if not run_dir.exists():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def verify(path: Path) -> ModelCard:
    """The card of a checkpoint whose every file matches the sha256 its card lists; ValueError naming the first
    one that does not."""
    try:
        card = ModelCard.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"checkpoint: {path}/card.json cannot be read: {error}") from None
    for name, expected in card.weights.items():
        file = path / name
        if not file.exists() or sha256_file(file) != expected:
            raise ValueError(f"checkpoint: {file} is missing or corrupt (sha256 differs from {path}/card.json); "
                             f"resume from an earlier checkpoint or retrain")
    return card


def newest_verified(found: list[Path]) -> Path:
    """The newest of `found` (oldest first) that verifies, saying on stderr which newer ones were passed over
    (a kill cannot leave a partial checkpoint, but a failing disk or a copy can)."""
    for path in reversed(found):
        try:
            verify(path)
            return path
        except ValueError as error:
            print(f"{error}; falling back to the checkpoint before it", file=sys.stderr, flush=True)
    raise ValueError(f"checkpoint: none of {', '.join(p.name for p in found)} in {found[0].parent} verifies; "
                     f"retrain or restore one")


def load_checkpoint(path: Path) -> tuple[ModelCard, dict[str, torch.Tensor], dict[str, torch.Tensor],
                                         dict[str, Any], TrainingState]:
    """Card, model weights, EMA weights, optimizer state dict and training state of a checkpoint folder.

    Every file is checked against the card's sha256 first; a mismatch or unreadable file raises ValueError.
    """
    card = verify(path)
    try:
        model = load_file(str(path / MODEL_FILE))
        ema = load_file(str(path / EMA_FILE))
        tensors = load_file(str(path / OPTIMIZER_FILE))
        raw_state = json.loads((path / STATE_FILE).read_text())
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint: {path} cannot be read: {error}") from None
    optimizer = _unflatten_optimizer(tensors, raw_state.pop("param_groups"))
    return card, model, ema, optimizer, TrainingState(**raw_state)


def torch_rng_state() -> list[int]:
    return torch.get_rng_state().tolist()


def restore_torch_rng(state: list[int]) -> None:
    torch.set_rng_state(torch.tensor(state, dtype=torch.uint8))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Optimizer state as flat tensors ("<param>.<key>") for safetensors, param groups as JSON."""
    tensors = {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).contiguous()
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": groups}
