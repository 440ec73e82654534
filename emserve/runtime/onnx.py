"""ONNX Runtime backend: the exported `1/model.onnx` of a model folder, on CUDA where present, else CPU.

    with OnnxRuntime("models/pairs") as runtime:
        batches = list(generate(runtime.card, runtime, request))

The graph file is checked against the sha256 in the card before a session is made, and the session's inputs
and output against the card, so a folder whose files do not belong together is refused at load, not mid-run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from emserve.card import ModelCard
from emserve.runtime.base import OUTPUT_NAME, Runtime, check_device, verified_file

ONNX_FILE = "1/model.onnx"
ONNX_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("onnx backend: onnxruntime is not installed; pip install 'emserve[cpu]' (or "
                          "'emserve[gpu]' on a CUDA machine, never both)") from None
    return onnxruntime


def providers(device: str = "auto") -> list[str]:
    """Execution providers for `device`: "auto" = CUDA first where this onnxruntime has it, then CPU."""
    check_device(device)
    available = _onnxruntime().get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise RuntimeError(f"device: cuda asked for, but this onnxruntime offers only {', '.join(available)} "
                           f"(install onnxruntime-gpu: pip install 'emserve[gpu]')")
    if device == "cpu":
        return [CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


class OnnxRuntime(Runtime):
    """An exported model folder run by ONNX Runtime.

    device: "auto" (CUDA if available, else CPU), "cuda" or "cpu"; `self.device` says which one the session
    really uses (onnxruntime-gpu falls back to CPU when CUDA cannot start). threads: intra-op threads (None: one
    per core this process may run on; ONNX Runtime's own default counts every core of the machine, so a process
    pinned to fewer (taskset, a Dask worker's share) would run more threads than it has cores). verify: check the
    sha256 of the graph against the card.
    """

    backend = "onnx"

    def __init__(self, model: str | Path, *, device: str = "auto", max_batch: int | None = None,
                 memory_budget: int | None = None, threads: int | None = None, verify: bool = True) -> None:
        folder = Path(model)
        card = ModelCard.load(folder)
        super().__init__(card, max_batch, memory_budget)
        path = verified_file(folder, ONNX_FILE, card) if verify else folder / ONNX_FILE
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads) if threads is not None else len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.device = "cuda" if self.session.get_providers()[0] == CUDA else "cpu"
        self.path = path
        self._check_graph()

    def _check_graph(self) -> None:
        graph = {i.name: ONNX_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        problems = []
        if graph != self.inputs:
            problems.append(f"graph inputs {graph}, the card's {self.inputs}")
        if outputs != [OUTPUT_NAME]:
            problems.append(f"graph outputs {outputs}, expected [{OUTPUT_NAME!r}]")
        if problems:
            raise ValueError(f"model: {self.path} does not match its card: " + "; ".join(problems))

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], inputs)[0]

    def close(self) -> None:
        self.session = None
