"""The default models shipped in models/: small, recorded, and exported by the current code.

They are what `bentoml serve` answers with from a fresh clone and what the Docker image carries, so the plan's
promises about them are checked here: each folder is a few MB, models/README.md holds the exact command its card
says trained it, and the TorchScript graph runs attention on PyTorch's fused kernel (graphs exported before
2026-12-03's attention layout fell back to the unfused math kernel, ~4x slower per attention on CPU).
"""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from emserve.card import ModelCard

MODELS = Path(__file__).resolve().parent.parent / "models"
FOLDERS = sorted(p.parent for p in MODELS.glob("*/card.json"))
FEW_MB = 8 * 2**20


def test_the_three_defaults_are_shipped():
    assert {f.name: ModelCard.load(f).mode for f in FOLDERS} == {
        "phantom-pairs": "pairs", "phantom-from-labels": "em-from-labels", "phantom-seg": "segmentation"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_each_default_model_is_a_few_megabytes(folder):
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= FEW_MB, f"{folder.name}: {size / 2**20:.1f} MB"


def readme_commands() -> list[list[str]]:
    """Every `emserve train` command in models/README.md's code blocks, as argv (continuations joined, comments
    and leading environment assignments such as OMP_NUM_THREADS=1 dropped); prose is not parsed."""
    blocks = re.findall(r"```bash\n(.*?)```", (MODELS / "README.md").read_text(), flags=re.S)
    argvs = [shlex.split(line, comments=True) for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [list(itertools.dropwhile(lambda arg: "=" in arg and not arg.startswith("-"), argv)) for argv in argvs]
    return [argv for argv in commands if argv[:2] == ["emserve", "train"]]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_models_readme_records_the_command_that_trained_each_model(folder):
    recorded = ModelCard.load(folder).training["config"]["command"]
    assert shlex.split(recorded) in readme_commands(), f"{folder.name}: models/README.md lacks `{recorded}`"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
@pytest.mark.slow
def test_the_shipped_torchscript_graph_runs_attention_on_the_fused_kernel(folder):
    torch = pytest.importorskip("torch")
    from emserve.runtime.torchscript import TorchScriptRuntime

    runtime = TorchScriptRuntime(folder, device="cpu")
    card = runtime.card
    size = {"B": 1, "H": 32, "W": 32}
    cond = {name: np.full([size.get(d, d) for d in spec["shape"]], spec["null"], spec["dtype"])
            for name, spec in card.conditions.items()}
    x = np.zeros((1, card.unet["in_channels"], 32, 32), np.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        runtime(x, None if card.mode == "segmentation" else np.array([500]), cond)
    ops = {event.key for event in profile.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
