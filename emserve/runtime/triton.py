"""Triton backend: a model served by a Triton Inference Server, called over HTTP or gRPC with tritonclient.

    card = ModelCard.load("models/pairs")
    with TritonRuntime("127.0.0.1:8001", "pairs", card, protocol="grpc") as runtime:
        batches = list(generate(card, runtime, request))

    runtime = from_url("grpc://127.0.0.1:8001/pairs", card="models/pairs")   # the same, from a URL

Triton keeps the graph; the card stays with the client (`models/<name>/card.json`, Triton ignores it). At
construction the runtime checks, once and within `connect_timeout`, that the server answers, that the model is
ready and that its metadata (input and output names, datatypes, shapes) is what the card describes, in either
layout emserve.runtime.triton_config writes: max_batch_size 0 (the graph's shapes) or > 0 (t and dataset sent as
[B, 1]; calls split to the server's max_batch_size). Each call is checked against the card (Runtime) before
anything is sent; each inference is bounded by `timeout`. The runtime may be called from several threads at once
(the service does): each thread gets its own HTTP client.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from emserve.card import ModelCard
from emserve.checks import check_choice
from emserve.runtime.base import OUTPUT_NAME, Runtime
from emserve.runtime.triton_config import served_io

PROTOCOLS = ("http", "grpc")


def _tritonclient(protocol: str) -> tuple[Any, type[Exception]]:
    """(tritonclient.http or .grpc, InferenceServerException); tritonclient is an optional dependency."""
    try:
        from tritonclient.utils import InferenceServerException

        if protocol == "http":
            import tritonclient.http as client
        else:
            import tritonclient.grpc as client
    except ImportError:
        raise ImportError("triton backend: tritonclient is not installed; pip install 'emserve[triton]'"
                          ) from None
    return client, InferenceServerException


class TritonRuntime(Runtime):
    """A model on a Triton server. url: "host:port" (the HTTP port, 8000 by default, for protocol "http"; the
    gRPC port, 8001, for "grpc"). Timeouts in seconds. max_batch: samples per call (None: the server's limit)."""

    backend = "triton"

    def __init__(self, url: str, model_name: str, card: ModelCard, protocol: str = "http", *,
                 model_version: str = "", max_batch: int | None = None, memory_budget: int | None = None,
                 timeout: float = 60.0, connect_timeout: float = 10.0) -> None:
        check_choice("protocol", protocol, PROTOCOLS)
        super().__init__(card, max_batch, memory_budget)
        self.url, self.model_name, self.model_version, self.protocol = url, model_name, model_version, protocol
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.where = f"model {model_name!r} on the Triton server at {url} ({protocol})"
        self._tc, self._error = _tritonclient(protocol)
        self._clients: list[Any] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        try:
            self._check_model()
        except BaseException:
            self.close()
            raise

    @property
    def _client(self) -> Any:
        """This thread's tritonclient client. The HTTP client runs on gevent and fails when used from a thread other
        than the one that made it ("Cannot switch to a different thread"), as in a server's worker threads, so each
        thread gets its own; the gRPC client is thread-safe and shared."""
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self.protocol == "grpc" and self._clients:
                    client = self._clients[0]
                else:
                    client = (self._tc.InferenceServerClient(self.url, connection_timeout=self.connect_timeout,
                                                             network_timeout=self.timeout)
                              if self.protocol == "http" else self._tc.InferenceServerClient(self.url))
                    self._clients.append(client)
            self._local.client = client
        return client

    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A health, metadata or config call within connect_timeout; an unreachable server is a ConnectionError."""
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.connect_timeout
            if method.startswith("get_"):
                kwargs["as_json"] = True  # dicts, as the HTTP client returns (int64 fields come as strings)
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except (self._error, OSError) as error:
            raise ConnectionError(f"triton: cannot reach the server at {self.url} over {self.protocol} "
                                  f"(waited at most {self.connect_timeout:g} s): {error}") from None

    def _check_model(self) -> None:
        """The model is ready and serves what the card says; learn its batching (the t and dataset layout)."""
        if not self._ask("is_server_live"):
            raise ConnectionError(f"triton: the server at {self.url} answers but is not live")
        if not self._ask("is_model_ready", self.model_name, self.model_version):
            raise RuntimeError(f"triton: {self.where} is not ready (unknown, still loading or failed to load)")
        metadata = self._ask("get_model_metadata", self.model_name, self.model_version)
        inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["inputs"]}
        outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in metadata["outputs"]}
        config = self._ask("get_model_config", self.model_name, self.model_version)
        server_batch = int(config.get("config", config).get("max_batch_size", 0))  # gRPC nests it in "config"
        want_inputs, want_output, self._reshaped = served_io(self.card, server_batch)
        problems = []
        if set(inputs) != set(want_inputs):
            problems.append(f"inputs are {sorted(inputs)}; the card's are {sorted(want_inputs)}")
        problems += [f"input {name!r} is {_show(inputs[name])}; the card says {_show(want)}"
                     for name, want in want_inputs.items() if name in inputs and inputs[name] != want]
        if OUTPUT_NAME not in outputs:
            problems.append(f"outputs are {sorted(outputs)}; the card's is {OUTPUT_NAME!r}")
        elif outputs[OUTPUT_NAME] != want_output:
            problems.append(f"output {OUTPUT_NAME!r} is {_show(outputs[OUTPUT_NAME])}; the card says "
                            f"{_show(want_output)}")
        if problems:
            raise ValueError(f"triton: {self.where} does not match the model card: " + "; ".join(problems))
        self._datatypes = {name: datatype for name, (datatype, _) in want_inputs.items()}
        if server_batch:
            self.max_batch = min(self.max_batch or server_batch, server_batch)

    def _run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        tensors = []
        for name, value in inputs.items():
            value = value[:, None] if name in self._reshaped else value  # [B] -> [B, 1] (config dims [1])
            tensor = self._tc.InferInput(name, list(value.shape), self._datatypes[name])
            tensor.set_data_from_numpy(np.ascontiguousarray(value))
            tensors.append(tensor)
        kwargs = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        try:
            result = self._client.infer(self.model_name, tensors, model_version=self.model_version,
                                        outputs=[self._tc.InferRequestedOutput(OUTPUT_NAME)], **kwargs)
        except (self._error, OSError) as error:
            raise RuntimeError(f"triton: inference failed for {self.where}: {error}") from None
        return result.as_numpy(OUTPUT_NAME)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def from_url(url: str, *, card: ModelCard | str | Path, max_batch: int | None = None,
             memory_budget: int | None = None, timeout: float = 60.0, connect_timeout: float = 10.0,
             device: str = "auto") -> TritonRuntime:
    """A TritonRuntime for "http://host:port/model[/version]" or "grpc://host:port/model[/version]" (the
    signature of a load_runtime loader). card: a ModelCard, or a model folder / card.json path. device is
    ignored: the server places the model."""
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    model, _, version = path.partition("/")
    if scheme not in PROTOCOLS or not host or not model or "/" in version:
        raise ValueError(f"model: {url!r} is not a Triton model URL; expected http://host:port/model[/version] "
                         f"or grpc://host:port/model[/version]")
    card = card if isinstance(card, ModelCard) else ModelCard.load(card)
    return TritonRuntime(host, model, card, scheme, model_version=version, max_batch=max_batch,
                         memory_budget=memory_budget, timeout=timeout, connect_timeout=connect_timeout)


def _show(spec: tuple[str, list[int]]) -> str:
    return f"{spec[0]} {spec[1]}"
