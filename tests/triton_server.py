"""Serve a Triton model repository of exported ONNX models from a real Triton Inference Server, for the tests.

The server is PyTriton's bundled tritonserver, which has the Python backend only (no onnxruntime backend): this
script plays the onnxruntime backend's part. For each `<repository>/<name>/config.pbtxt` + `1/model.onnx` (what
`emserve export` writes) it runs the graph with ONNX Runtime behind a Triton model declared as the config says:
the same name, max_batch_size (with dynamic batching when > 0), inputs, output, dims and reshapes. So the
served model metadata and the tensors clients send are those of a tritonserver running the real backend.

Run with the Python of a separate virtualenv holding nvidia-pytriton, numpy<2 and onnxruntime (PyTriton needs
numpy<2; the project uses numpy 2), with LD_LIBRARY_PATH set to that Python's library directory (else the model
process fails with "'_thread.RLock' object has no attribute '_recursion_count'"):

    python tests/triton_server.py REPOSITORY --http-port P --grpc-port Q --workspace DIR [--ready-file F]

Prints "ready" on stdout once every model is ready (and, with --ready-file, writes the model names to F, all at
once: tritonserver writes to the same stdout, so a caller that waits on the printed line can find it spliced into
one of the server's) and serves on 127.0.0.1 until SIGTERM (or SIGINT), then
stops the server and deletes the workspace. Imports nothing from emserve: it runs in the other environment.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tritonclient.grpc import model_config_pb2

DTYPES = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP64": np.float64}


def read_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def infer_function(session: ort.InferenceSession, config: model_config_pb2.ModelConfig):
    """ONNX Runtime behind the config: inputs reshaped as the config says (e.g. t [B, 1] -> [B])."""
    reshape = {i.name: tuple(i.reshape.shape) for i in config.input if i.HasField("reshape")}
    outputs = [o.name for o in config.output]
    batched = config.max_batch_size > 0

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: value.reshape((value.shape[:1] if batched else ()) + reshape[name]) if name in reshape else value
                 for name, value in inputs.items()}
        return dict(zip(outputs, session.run(outputs, feeds), strict=True))

    if batched:  # requests may be merged by the dynamic batcher: @batch stacks and splits them
        return batch(lambda **inputs: run(inputs))
    return lambda requests: [run(request.data) for request in requests]  # one whole batch per request


def bind(triton: Triton, folder: Path) -> str:
    config = read_config(folder)
    name = config.name or folder.name
    session = ort.InferenceSession(str(folder / "1" / (config.default_model_filename or "model.onnx")),
                                   providers=["CPUExecutionProvider"])
    batched = config.max_batch_size > 0
    model_config = ModelConfig(
        batching=batched, max_batch_size=config.max_batch_size or 1,
        batcher=DynamicBatcher(max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds))
    triton.bind(model_name=name, infer_func=infer_function(session, config),
                inputs=[Tensor(name=i.name, dtype=DTYPES[model_config_pb2.DataType.Name(i.data_type)],
                               shape=tuple(i.dims)) for i in config.input],
                outputs=[Tensor(name=o.name, dtype=DTYPES[model_config_pb2.DataType.Name(o.data_type)],
                                shape=tuple(o.dims)) for o in config.output],
                config=model_config, strict=True)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repository", type=Path, help="folders <name>/config.pbtxt + <name>/1/model.onnx")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--workspace", required=True, help="an empty or missing directory; removed at exit")
    parser.add_argument("--ready-file", type=Path, help="written (atomically) with the model names once ready")
    args = parser.parse_args()

    config = TritonConfig(http_address="127.0.0.1", http_port=args.http_port, grpc_address="127.0.0.1",
                          grpc_port=args.grpc_port, allow_metrics=False, exit_timeout_secs=5)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config, workspace=args.workspace) as triton:
        names = [bind(triton, folder) for folder in sorted(args.repository.iterdir())
                 if (folder / "config.pbtxt").is_file()]
        if not names:
            sys.exit(f"triton_server: no model folders (<name>/config.pbtxt) in {args.repository}")
        triton.run()
        print("ready", *names, flush=True)
        if args.ready_file:
            partial = args.ready_file.with_name(args.ready_file.name + ".partial")
            partial.write_text(" ".join(names))
            partial.rename(args.ready_file)
        while not stop.wait(1.0):
            if not triton.is_alive():
                sys.exit("triton_server: the server or a model process died")


if __name__ == "__main__":
    main()
