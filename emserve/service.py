"""The BentoML service: check a request, run it through emserve.pipelines / emserve.segmentation, return a file.

    bentoml serve emserve.service:EMServe --host 127.0.0.1 --port 3000      # models from ./models

Thin on purpose (BentoDiffusion style): the models load once in `__init__`; each endpoint is a typed method
that checks its fields, calls the functions the CLI calls and encodes the result with emserve.uploads. Every
exported model folder under the models directory is served under its folder name; an endpoint takes the first
model of its mode unless the request names one. Every result records the model (name, mode, backend, sha256 of
its weights and files), the per-sample seeds and all parameters.

Environment (read when the service module is imported, i.e. when the server starts):

    EMSERVE_MODELS          folder of exported models (default: models/ beside the emserve package, else ./models)
    EMSERVE_TRITON_URL      http://host:port or grpc://host:port: run the graphs on that Triton server instead
    EMSERVE_API_KEY         when set, every request but the probes and metrics needs `Authorization: Bearer <key>`
                            or `X-API-Key: <key>`; set but empty, it stops the server
    EMSERVE_THREADS         requests computed at once per worker (default 2); EMSERVE_ORT_THREADS: intra-op
                            threads per ONNX Runtime session (default: one per core)
    EMSERVE_MEMORY_BUDGET   most memory one model call may take, e.g. 4GiB (the default): bigger batches are split
                            into calls that fit, with the same results (emserve.runtime.memory)
    EMSERVE_TIMEOUT         seconds a synchronous request may take from its arrival (default 600): past them it
                            stops at its next sampler step or tile and answers 504
    EMSERVE_TASK_TTL        seconds a task's result is kept after the task ends (default 86400)
    EMSERVE_MAX_*           request limits, the queue and tasks, see Limits
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from _bentoml_impl import serde
from _bentoml_impl.tasks.result import Sqlite3Store
from bentoml.exceptions import BadInput, BentoMLException, InvalidArgument, NotFound
from bentoml.validators import ContentType
from pydantic_core import from_json
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from emserve import __version__
from emserve.card import CARD_NAME, ModelCard
from emserve.data.patches import check_axis
from emserve.diffusion import (
    DEFAULT_LABEL_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    SAMPLERS,
    SPACINGS,
)
from emserve.pictures import grid, pair_tile, raw_to_uint8
from emserve.pipelines import (
    GeneratedBatch,
    GeneratedStore,
    GenerationRequest,
    check_request,
    generate,
    label_codes,
    split_channels,
)
from emserve.postprocess import DEFAULT_LABEL_METHOD, LABEL_METHODS, Screening
from emserve.runtime.base import Runtime
from emserve.runtime.load import load_runtime
from emserve.runtime.memory import DEFAULT_MEMORY_BUDGET, parse_bytes
from emserve.segmentation import (
    check_threshold,
    masks_from_probabilities,
    raw_to_network,
    segment_array,
    segment_store,
    tile_count,
    tiling,
)
from emserve.uploads import UploadError, UploadLimits, decode, label_maps, npz_bytes, png_bytes, read_upload, zip_folder

MODELS_ENV, TRITON_ENV, API_KEY_ENV = "EMSERVE_MODELS", "EMSERVE_TRITON_URL", "EMSERVE_API_KEY"
MEMORY_ENV = "EMSERVE_MEMORY_BUDGET"
FORMATS = ("npz", "zarr.zip", "png")
SUFFIX = {"npz": ".npz", "zarr.zip": ".zarr.zip", "png": ".png"}
SHOWN = 16  # samples or slices in a PNG preview
BATCH_SIZE = 8  # samples per backend call; a request's samples do not depend on it
FORM_OVERHEAD = 1 << 20  # bytes a multipart body may carry beyond its upload (other fields, part headers)
FORM_PARTS = 32  # text fields, and files, in one form (an endpoint takes at most 11 fields and 1 file)
FORM_TEXT = 4096  # characters of one text field: all 48 CellMap class names as a JSON list take 465. It also keeps
#                   numbers below Python's 4300-digit int parsing limit, past which BentoML's json.loads would fail
FILE_NAME = 255  # characters of an upload's file name (a file system's limit for one name)
RETRY_AFTER = 5  # seconds a client refused for a full queue is told to wait (Retry-After)
TIMEOUT_GRACE = 10  # seconds BentoML's own timeout waits past EMSERVE_TIMEOUT (see EMServe)
ARRIVED = "emserve_arrived"  # the request state Guard records the arrival time under (time.monotonic())
Result = Annotated[Path, ContentType("application/octet-stream")]
TaskResult = Annotated[bytes, ContentType("application/octet-stream")]


def env_int(name: str, default: int) -> int:
    """A positive integer setting from the environment; a bad value stops the server with the variable named."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}: {value} must be at least 1")
    return value


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how many requests the server holds; each field is overridden by
    EMSERVE_MAX_<FIELD> (e.g. EMSERVE_MAX_SAMPLES). Work is bounded as well as input: tiles and samples x steps
    count what a request will run, so a small upload cannot ask for minutes of computing."""

    samples: int = 32  # samples per synchronous request
    task_samples: int = 1024  # samples per generate_pairs_task
    steps: int = 250  # sampler steps
    guidance: int = 20  # guidance scale in [0, guidance]
    upload_bytes: int = 64 << 20  # bytes of one uploaded file
    json_bytes: int = 64 << 10  # bytes of a JSON (or urlencoded) body: all 48 class names as present and absent
    #                             take under 1 KiB
    voxels: int = 1 << 24  # voxels of one uploaded array (and of a zipped upload's arrays, unzipped)
    tile: int = 1024  # segmentation tile edge
    tiles: int = 1 << 16  # network tiles per segment request (per-call overhead: tiny tiles at stride 1)
    tile_voxels: int = 1 << 26  # tiles x tile^2 per segment request (compute: large tiles overlapping much); the
    #                             largest upload at the default overlap (a quarter tile) takes less than 2x its voxels
    sample_steps: int = 2048  # samples x sampler steps per synchronous generation request (tasks take more)
    queue: int = 32  # requests in the server at once, computing or waiting for a thread; more are answered 503
    tasks: int = 1  # submitted tasks running at once (each holds one of EMSERVE_THREADS until it ends)
    task_results: int = 64  # task results stored (until EMSERVE_TASK_TTL after their task ended) or being made

    @classmethod
    def from_env(cls) -> Limits:
        return cls(**{f.name: env_int(f"EMSERVE_MAX_{f.name.upper()}", f.default) for f in fields(cls)})

    @property
    def upload(self) -> UploadLimits:
        return UploadLimits(self.upload_bytes, self.voxels)


LIMITS = Limits.from_env()
TIMEOUT = env_int("EMSERVE_TIMEOUT", 600)
TASK_TTL = env_int("EMSERVE_TASK_TTL", 24 * 3600)
Sqlite3Store.RESULT_RETENTION = TASK_TTL  # BentoML's own clean-up (24 h) deletes no result Guard would keep
MEMORY_BUDGET = parse_bytes(os.environ.get(MEMORY_ENV, DEFAULT_MEMORY_BUDGET), MEMORY_ENV)  # bad: no server


# ---- request checks: every refusal names the field, the value and what is allowed ---------------------------

def show(value: Any) -> str:
    """A value for an error message, cut short: clients can send anything, and messages are echoed back."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_range(field: str, value: float, low: float, high: float, setting: str = "") -> None:
    """Comparisons only: NaN compares false, and a client's int of hundreds of digits compares exactly, where
    converting it to a float (math.isfinite) would raise OverflowError."""
    if not low <= value <= high:
        where = f" (the upper bound is {setting})" if setting else ""
        raise InvalidArgument(f"{field}: {show(value)} is not allowed; allowed: {low} to {high}{where}")


def check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"{field}: {show(value)} is not allowed; choose one of {', '.join(allowed)}")


def check_classes(field: str, names: Sequence[str], card: ModelCard) -> tuple[str, ...]:
    for name in names:
        if name not in card.classes:
            raise InvalidArgument(f"{field}: {show(name)} is not one of the model's classes; allowed: "
                                  f"{', '.join(card.classes)}")
    return tuple(names)


def check_fields(given: Iterable[str], cls: Any) -> None:
    """Refuse the fields an endpoint does not take: pydantic drops them, so a misspelt `sampels` would run with
    the default samples, silently."""
    unknown = [name for name in given if name not in cls.model_fields]
    if unknown:
        names = ", ".join(show(name) for name in unknown[:5])
        if len(unknown) > 5:
            names += f" and {len(unknown) - 5} more"
        raise BadInput(f"{names}: not a field of this endpoint; allowed: {', '.join(cls.model_fields) or 'none'}")


@contextlib.contextmanager
def client_errors(field: str = "") -> Iterator[None]:
    """emserve's own checks raise ValueError with a message naming the field: those are the client's errors (400;
    UploadError carries its status, 413 for sizes). `field` prefixes messages that name an inner argument (the
    segmentation functions call the uploaded image "raw")."""
    try:
        yield
    except UploadError as error:
        raise BentoMLException(str(error), error_code=HTTPStatus(error.status)) from None
    except ValueError as error:
        message = str(error)
        raise InvalidArgument(f"{field}: {message}" if field and not message.startswith(field) else message) from None


# ---- the models ----------------------------------------------------------------------------------------------

def models_dir() -> Path:
    """EMSERVE_MODELS, else models/ of the source tree (an editable install, a bento), else ./models."""
    if MODELS_ENV in os.environ:
        return Path(os.environ[MODELS_ENV])
    beside = Path(__file__).resolve().parent.parent / "models"
    return beside if beside.is_dir() else Path("models")


def load_models(root: Path, triton_url: str | None, ort_threads: int | None,
                memory_budget: int | None = None) -> dict[str, Runtime]:
    """Every model folder (one holding card.json) under `root`, by folder name, as a Runtime: ONNX Runtime on
    the folder, or the same-named model on a Triton server; each splits calls to fit `memory_budget` bytes.
    A folder that does not load stops the server."""
    if not root.is_dir():
        raise FileNotFoundError(f"{MODELS_ENV}: {root} is not a folder; point it at a folder of exported models "
                                f"(`emserve export ... models`)")
    runtimes: dict[str, Runtime] = {}
    for folder in sorted(p for p in root.iterdir() if (p / CARD_NAME).is_file()):
        if triton_url:
            runtimes[folder.name] = load_runtime(f"{triton_url.rstrip('/')}/{folder.name}", "triton", card=folder,
                                                 memory_budget=memory_budget)
        else:
            runtimes[folder.name] = load_runtime(folder, "onnx", threads=ort_threads, memory_budget=memory_budget)
    if not runtimes:
        raise FileNotFoundError(f"{MODELS_ENV}: {root} holds no model folder (<name>/{CARD_NAME}); export one "
                                f"with `emserve export CHECKPOINT {root}`")
    return runtimes


def describe(name: str, runtime: Runtime) -> dict[str, Any]:
    """What a client needs to know of a served model, and what identifies its weights."""
    card = runtime.card
    return {"name": name, "mode": card.mode, "backend": runtime.backend, "classes": card.classes,
            "datasets": card.datasets, "patch_size": card.patch_size, "class_condition": card.class_condition,
            "weights": card.weights, "files": card.files}


# ---- security in front of BentoML ------------------------------------------------------------------------------

class Guard:
    """ASGI middleware: the optional API key, the body size limits, the queue and the task caps, checked on the
    headers before BentoML reads the body. Probes and metrics stay open so that orchestrators and scrapers need no
    key (nor wait in the queue); everything else, the schema and the Swagger UI included, needs it
    (docs/SERVICE.md says why). A multipart body may carry an upload; any other (JSON, urlencoded) only fields,
    so it has its own, smaller limit.

    The queue: at most `limits.queue` requests are in the server at once, computing or waiting for one of
    BentoML's threads (a running task holds its place until it ends); the next is answered 503 with Retry-After
    at once, rather than waiting behind work it cannot outlast. BentoML's own `traffic.max_concurrency` answers
    429 without Retry-After or a reason. Each admitted request's arrival time goes into its state, for its
    deadline.

    Tasks: BentoML runs a submitted task inside its submit (or retry) request, after the answer is sent, so the
    task ends when that request leaves Guard. At most `limits.tasks` run at once (the next submit is answered 503
    with Retry-After), and at most `limits.task_results` results are stored or being made (429, Retry-After: when
    the oldest expires). Results expire `task_ttl` seconds after their task ends: before each request to a task
    route Guard deletes those from BentoML's result table (expire_results), so an expired result answers 404."""

    OPEN = ("/healthz", "/livez", "/readyz", "/metrics")

    def __init__(self, app: Any, api_key: str | None, limits: Limits, task_routes: Sequence[str],
                 task_ttl: int) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits
        self.task_routes, self.task_ttl = tuple(task_routes), task_ttl
        self.in_flight = self.tasks = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        submit = path.startswith(self.task_routes) and path.endswith(("/submit", "/retry"))
        refusal = self.refusal(path, scope["method"], headers)
        if refusal is None:
            stored = 0, 0.0
            if path.startswith(self.task_routes) and (database := result_database()) is not None:
                stored = await asyncio.to_thread(expire_results, database, self.task_ttl)
            refusal = self.admission(path, submit, *stored)  # no await from here until the counts go up
        if refusal is not None:
            status, message, retry = refusal
            await JSONResponse({"error": message}, status_code=status,
                               headers=None if retry is None else {"Retry-After": str(retry)})(scope, receive, send)
            return
        if path in self.OPEN:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVED] = time.monotonic()
        self.in_flight += 1
        self.tasks += submit
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.tasks -= submit

    def refusal(self, path: str, method: str, headers: dict[str, str]) -> tuple[int, str, None] | None:
        """The key and the body's size."""
        if self.api_key and path not in self.OPEN:
            scheme, _, token = headers.get("authorization", "").strip().partition(" ")
            given = headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else "")  # any case
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return 401, f"authorization: missing or wrong API key; send `Authorization: Bearer <key>` or " \
                            f"`X-API-Key: <key>` (the server's {API_KEY_ENV})", None
        if method in ("POST", "PUT"):
            length = headers.get("content-length")
            if length is None:
                return 411, "content-length: missing; send the body with a Content-Length header (no chunked " \
                            "uploads)", None
            form = parse_options_header(headers.get("content-type", ""))[0] == b"multipart/form-data"
            limit = self.limits.upload_bytes + FORM_OVERHEAD if form else self.limits.json_bytes
            if not length.isdigit() or int(length) > limit:
                setting = f"EMSERVE_MAX_UPLOAD_BYTES plus {FORM_OVERHEAD} for the form" if form else \
                    "EMSERVE_MAX_JSON_BYTES, for a body that is not a multipart form"
                return 413, f"content-length: {show(length)} bytes; at most {limit} are allowed ({setting})", None
        return None

    def admission(self, path: str, submit: bool, stored: int, expires_in: float) -> tuple[int, str, int] | None:
        """The queue, and for a task's submission the running tasks and the results `stored`, the oldest of
        which expires in `expires_in` seconds."""
        if path not in self.OPEN and self.in_flight >= self.limits.queue:
            return HTTPStatus.SERVICE_UNAVAILABLE, f"queue: {self.in_flight} requests are in the server, at most " \
                                                   f"{self.limits.queue} are allowed (EMSERVE_MAX_QUEUE); retry " \
                                                   f"after {RETRY_AFTER} s", RETRY_AFTER
        if submit and self.tasks >= self.limits.tasks:
            return HTTPStatus.SERVICE_UNAVAILABLE, f"tasks: {self.tasks} running, at most {self.limits.tasks} are " \
                                                   f"allowed at once (EMSERVE_MAX_TASKS); retry after " \
                                                   f"{RETRY_AFTER} s", RETRY_AFTER
        if submit and stored + self.tasks >= self.limits.task_results:
            retry = max(1, math.ceil(expires_in))
            return HTTPStatus.TOO_MANY_REQUESTS, f"tasks: {stored} results stored and {self.tasks} being made, at " \
                                                 f"most {self.limits.task_results} are allowed " \
                                                 f"(EMSERVE_MAX_TASK_RESULTS); each is kept {self.task_ttl} s after " \
                                                 f"its task ends (EMSERVE_TASK_TTL): retry after {retry} s", retry
        return None


def result_database() -> str | None:
    """BentoML's task result database in this worker, None when it is kept in memory (nothing to expire)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    database = BentoMLContainer.result_store_file.get()
    return None if database == ":memory:" else database


def expire_results(database: str, ttl: int) -> tuple[int, float]:
    """Delete the results of tasks that ended more than `ttl` seconds ago from BentoML's result table (BentoML
    1.4.39 keeps them 24 h, and deletes old ones only when another task ends); the number of results left and the
    seconds until the oldest of them expires. Times are BentoML's UTC timestamps, compared by sqlite."""
    with contextlib.closing(sqlite3.connect(database, timeout=5)) as connection:
        with connection:
            connection.execute("DELETE FROM result WHERE completed_at IS NOT NULL AND "
                               "julianday(completed_at) <= julianday('now') - ? / 86400.0", (ttl,))
        count, oldest = connection.execute("SELECT COUNT(*), MIN(julianday(completed_at)) - julianday('now') "
                                           "FROM result WHERE completed_at IS NOT NULL").fetchone()
    return count, ttl + (oldest or 0.0) * 86400


class FilesOnlyJSON(serde.JSONSerde):
    """JSON bodies of known fields, except for endpoints that take files: BentoML would fetch a URL sent in a
    file's place."""

    async def parse_request(self, request: Request, cls: Any) -> Any:
        if getattr(cls, "multipart_fields", None):
            raise BadInput(f"{', '.join(sorted(cls.multipart_fields))}: send the file as multipart/form-data; "
                           f"this service fetches no URL and reads no path a client names")
        try:
            body = from_json(await request.body() or b"{}")  # pydantic's parser: numbers as the parent reads them
        except ValueError:
            body = None  # not JSON: the parent's parse answers 400 saying why
        if isinstance(body, dict):
            check_fields(body, cls)
        return await super().parse_request(request, cls)


class FilesOnlyMultipart(serde.MultipartSerde):
    """Forms within FORM_PARTS and FORM_TEXT, of known fields given once, whose file fields hold files: BentoML
    would fetch a URL given as text in a file field. A file's name is checked, then dropped: BentoML would make
    it part of the name of the temporary file it stores the upload in."""

    async def parse_request(self, request: Request, cls: Any) -> Any:
        form = await self.form(request)  # starlette keeps the parsed form: the parent parses it once
        check_fields(form.keys(), cls)
        for name in form:
            if len(form.getlist(name)) > 1:
                raise BadInput(f"{name}: given {len(form.getlist(name))} times; give each field once")
        for name, value in form.multi_items():
            if name not in cls.multipart_fields:
                if not isinstance(value, str) or len(value) > FORM_TEXT:
                    what = "a file" if isinstance(value, UploadFile) else f"{len(value)} characters"
                    raise BadInput(f"{name}: {what}; a text field of at most {FORM_TEXT} characters is allowed")
            elif not isinstance(value, UploadFile):
                raise BadInput(f"{name}: got the text {show(value)}; upload a file (a form part with a file "
                               f"name): this service fetches no URL and reads no path a client names")
            else:
                check_file_name(name, value.filename)
                value.filename = None
        return await super().parse_request(request, cls)

    @staticmethod
    async def form(request: Request) -> FormData:
        """The form parsed within FORM_PARTS; a malformed one is the client's error (starlette raises an
        HTTPException, which BentoML would answer with 500)."""
        content_type = request.headers.get("content-type", "")
        media_type, options = parse_options_header(content_type)
        if media_type == b"multipart/form-data" and b"boundary" not in options:
            raise BadInput(f"content-type: {show(content_type)} has no boundary; send multipart/form-data; "
                           f"boundary=<the boundary the body uses> (HTTP clients add it when they encode a form)")
        try:
            return await request.form(max_files=FORM_PARTS, max_fields=FORM_PARTS)
        except HTTPException as error:
            raise BadInput(f"multipart body: {error.detail} At most {FORM_PARTS} text fields and {FORM_PARTS} "
                           f"files are allowed, each part's headers (its file name) within 4 KiB") from None


def check_file_name(field: str, name: str | None) -> None:
    """A file name is never used (formats are told by their first bytes); one past FILE_NAME characters or
    holding control characters (NUL, newline) is no file's name and is refused as the client's error."""
    if name is not None and (len(name) > FILE_NAME or any(c < " " or c == "\x7f" for c in name)):
        raise BadInput(f"{field}: the file name {show(name)} ({len(name)} characters) is not allowed; a file name "
                       f"of at most {FILE_NAME} characters without control characters (or none)")


serde.ALL_SERDE.update({"application/json": FilesOnlyJSON, "multipart/form-data": FilesOnlyMultipart,
                        "application/x-www-form-urlencoded": FilesOnlyMultipart})


# ---- long tasks ----------------------------------------------------------------------------------------------

def cancel_check(ctx: bentoml.Context) -> Callable[[int, int], None]:
    """A progress callback for generate() that stops a task its client cancelled.

    `PUT /<task>/cancel` marks the task "canceled" in BentoML's task database (and answers 400 on `bentoml
    serve`, which cannot stop a running thread); the task reads its status there between batches and stops.
    """
    task_id = getattr(ctx.request.state, "task_id", None)
    database = result_database()

    def check(done: int, total: int) -> None:
        if task_id is None or database is None:
            return
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)) as connection:
            row = connection.execute("SELECT status FROM result WHERE task_id = ?", (task_id,)).fetchone()
        if row is not None and row[0] == "canceled":
            raise BentoMLException(f"task {task_id}: canceled by the client after {done} of {total} samples",
                                   error_code=HTTPStatus.CONFLICT)

    return check


# ---- deadlines -------------------------------------------------------------------------------------------------

class TimeUp(Exception):
    """A request ran past EMSERVE_TIMEOUT: raised by its deadline between sampler steps or tiles, it stops the
    work and frees the thread for the requests waiting (BentoML's own timeout answers the client but leaves the
    thread computing)."""


def submitted(ctx: bentoml.Context) -> bool:
    """Whether this call runs as a submitted task (in the background, until done or cancelled by its client)."""
    return getattr(ctx.request.state, "task_id", None) is not None


def deadline(ctx: bentoml.Context) -> Callable[[], None] | None:
    """The tick that stops a request TIMEOUT seconds after Guard admitted it (time spent waiting for a thread
    counts, as it does for the client); None for a submitted task, which has no deadline."""
    if submitted(ctx):
        return None
    end = getattr(ctx.request.state, ARRIVED, time.monotonic()) + TIMEOUT

    def tick() -> None:
        if time.monotonic() > end:
            raise TimeUp(f"timeout: the request took longer than {TIMEOUT} s from its arrival (EMSERVE_TIMEOUT) and "
                         f"was stopped; ask for less work (fewer samples or steps, a smaller image, a larger tile or "
                         f"a smaller overlap), submit a task, or retry when the server is less busy")

    return tick


def answers_timeout(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """The endpoint, answering 504 with TimeUp's message. Raised as an error, a 504 would reach the client as
    BentoML's "An unexpected error has occurred" (it hides the message of every 5xx), so the answer is returned
    as a response, with the status BentoML takes from the request's context."""

    @functools.wraps(endpoint)
    def run(self: Any, *args: Any, ctx: bentoml.Context, **kwargs: Any) -> Any:
        try:
            return endpoint(self, *args, ctx=ctx, **kwargs)
        except TimeUp as error:
            ctx.response.status_code = HTTPStatus.GATEWAY_TIMEOUT
            return JSONResponse({"error": str(error)}, status_code=HTTPStatus.GATEWAY_TIMEOUT)

    return run


# ---- the service ---------------------------------------------------------------------------------------------

@bentoml.service(name="emserve", workers=1, threads=env_int("EMSERVE_THREADS", 2),
                 traffic={"timeout": TIMEOUT + TIMEOUT_GRACE})
class EMServe:
    """generate_pairs, generate_pairs_task, generate_from_labels and segment over the exported models.

    BentoML's traffic timeout is a backstop for work outside the sampler and tiling loops (decoding, encoding):
    it waits TIMEOUT_GRACE seconds longer, so that a request stopped by its deadline answers with its own message.
    """

    def __init__(self) -> None:
        self.limits = LIMITS
        self.root = models_dir()
        self.runtimes = load_models(self.root, os.environ.get(TRITON_ENV) or None,
                                    env_int("EMSERVE_ORT_THREADS", 0) or None, MEMORY_BUDGET)

    @bentoml.api
    def models(self) -> list[dict[str, Any]]:
        """The served models: name, mode, classes, datasets, patch size, sha256 of weights and files."""
        return [describe(name, runtime) for name, runtime in self.runtimes.items()]

    @bentoml.api
    @answers_timeout
    def generate_pairs(self, ctx: bentoml.Context, samples: int = 4, seed: int = 0, sampler: str = DEFAULT_SAMPLER,
                       steps: int = DEFAULT_STEPS, spacing: str = DEFAULT_SPACING, guidance: float = 1.0,
                       rescale: float = 0.0, present: list[str] | None = None, absent: list[str] | None = None,
                       dataset: str | None = None, model: str | None = None, label_method: str = DEFAULT_LABEL_METHOD,
                       despeckle: int = 0, screen: bool = False, output: str = "npz") -> Result:
        """EM + label pairs from a "pairs" model. `present` / `absent` steer class presence and `dataset` the
        domain (both need guidance > 1 to matter); `despeckle` drops label objects smaller than that many pixels
        (before screening, with `screen`); `output` is npz (em uint8 [N,H,W], labels uint8 [N,K,H,W]
        1/0/255, classes, seeds, metadata), zarr.zip (a CellMap-layout store) or png (a preview)."""
        settings = {k: v for k, v in locals().items() if k not in ("self", "ctx")}
        return self._pairs(ctx, settings, self.limits.samples, "EMSERVE_MAX_SAMPLES", None)

    @bentoml.task
    @answers_timeout
    def generate_pairs_task(self, ctx: bentoml.Context, samples: int = 64, seed: int = 0,
                            sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                            spacing: str = DEFAULT_SPACING, guidance: float = 1.0, rescale: float = 0.0,
                            present: list[str] | None = None, absent: list[str] | None = None,
                            dataset: str | None = None, model: str | None = None,
                            label_method: str = DEFAULT_LABEL_METHOD, despeckle: int = 0, screen: bool = False,
                            output: str = "npz") -> TaskResult:
        """generate_pairs for big batches, as a task: submit, poll the status, get the result; a cancelled task
        stops at its next batch. Returns bytes, not a file: BentoML stores a task's response by replaying it,
        which fails for file responses with current starlette (KeyError 'method')."""
        settings = {k: v for k, v in locals().items() if k not in ("self", "ctx")}
        path = self._pairs(ctx, settings, self.limits.task_samples, "EMSERVE_MAX_TASK_SAMPLES", cancel_check(ctx))
        return path.read_bytes()

    @bentoml.api
    @answers_timeout
    def generate_from_labels(self, ctx: bentoml.Context, labels: Path, classes: list[str] | None = None,
                             seed: int = 0, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                             spacing: str = DEFAULT_SPACING, guidance: float = DEFAULT_LABEL_GUIDANCE,
                             rescale: float = 0.0, dataset: str | None = None, model: str | None = None,
                             output: str = "npz") -> Result:
        """EM for uploaded label maps, one sample per map, from an "em-from-labels" model (guided by default,
        DEFAULT_LABEL_GUIDANCE: the EM follows its label maps more closely than unguided). `labels`: .npy, .npz,
        zipped zarr or PNG holding index maps [N,H,W] (CellMap ids, or values 1..C naming `classes`) or masks
        [N,C,H,W] (0/1/255, or float +1/-1/0) whose channels `classes` names; H = W = the model's patch size."""
        name, runtime = self.pick("em-from-labels", model)
        check_choice("output", output, FORMATS)
        decoded = self.upload(labels, "labels", ("npy", "npz", "zarr", "png"), "labels")
        with client_errors("labels"):
            maps = label_maps(runtime.card, decoded, classes, "labels", self.limits.samples)
        request = self.request(runtime.card, samples=len(maps), seed=seed, sampler=sampler, steps=steps,
                               spacing=spacing, guidance=guidance, rescale=rescale, dataset=dataset)
        upload = decoded.array
        record = {"labels_upload": {"kind": decoded.kind, "shape": list(upload.shape), "dtype": str(upload.dtype),
                                    "classes": list(classes or decoded.classes or [])}}
        return self.generated(ctx, name, runtime, request, maps, output, None, "generate_from_labels", record)

    @bentoml.api
    @answers_timeout
    def segment(self, ctx: bentoml.Context, image: Path, axis: str = "z", tile: int | None = None,
                overlap: int | None = None, threshold: float = 0.5, probabilities: bool = False,
                model: str | None = None, output: str = "npz") -> Result:
        """Per-class masks of an uploaded EM image [Y,X] or volume [Z,Y,X] (.npy, TIFF, zipped zarr, PNG; uint8, or
        float in [-1, 1]) from a "segmentation" model, tile by tile (slice by slice along `axis`). npz: masks
        uint8 [K,...], classes, metadata, and with `probabilities` float16 [K,...]."""
        name, runtime = self.pick("segmentation", model)
        card = runtime.card
        check_choice("output", output, FORMATS)
        raw = self.upload(image, "image", ("npy", "tiff", "zarr", "png"), "em").array
        if raw.ndim not in (2, 3) or 0 in raw.shape:
            raise InvalidArgument(f"image: shape {raw.shape}; give an image [Y, X] or a volume [Z, Y, X]")
        if tile is not None:
            check_range("tile", tile, 1, self.limits.tile, "EMSERVE_MAX_TILE")
        if overlap is not None:  # a loose bound here: tiling's exact one (below the tile) echoes the value whole
            check_range("overlap", overlap, 0, self.limits.tile, "EMSERVE_MAX_TILE")
        with client_errors():
            tile, overlap = tiling(card, tile, overlap)
            check_threshold(threshold)
            check_axis(axis)
        axis = axis if raw.ndim == 3 else "z"  # an image is segmented as it is
        self.check_tiles(raw.shape, axis, tile, overlap)
        settings = {"axis": axis, "tile": tile, "overlap": overlap, "threshold": threshold,
                    "probabilities": probabilities, "output": output, "image": {"shape": list(raw.shape),
                                                                                  "dtype": str(raw.dtype)}}
        record = self.record(name, runtime, "segment", settings, [])
        if output == "zarr.zip":
            folder = Path(ctx.temp_dir) / "segmentation.zarr"
            with client_errors("image"):
                segment_store(runtime, raw if raw.ndim == 3 else raw[None], folder, axis=axis, tile=tile,
                              overlap=overlap, threshold=threshold, keep_probabilities=probabilities, source="upload",
                              tick=deadline(ctx))
            return self.result(ctx, "segmentation", output, self.zipped(folder, record))
        with client_errors("image"):
            probs = segment_array(runtime, raw, axis=axis, tile=tile, overlap=overlap, tick=deadline(ctx))
        masks = masks_from_probabilities(card, probs, threshold)
        if output == "png":
            return self.result(ctx, "segmentation", output, png_bytes(segmentation_picture(card, raw, masks), record))
        arrays = {"masks": masks.astype(np.uint8), "classes": np.array(card.classes), "metadata": metadata(record)}
        if probabilities:
            arrays["probabilities"] = probs.astype(np.float16)
        return self.result(ctx, "segmentation", output, npz_bytes(arrays))

    # ---- the steps the endpoints share ------------------------------------------------------------------------

    def pick(self, mode: str, name: str | None) -> tuple[str, Runtime]:
        """The model the request names (a served folder name, nothing else), or the first served of `mode`."""
        of_mode = [n for n, runtime in self.runtimes.items() if runtime.card.mode == mode]
        if name is None:
            if not of_mode:
                raise NotFound(f"model: no {mode!r} model is served; export one into {self.root} ({MODELS_ENV}); "
                               f"served: {', '.join(f'{n} ({r.card.mode})' for n, r in self.runtimes.items())}")
            return of_mode[0], self.runtimes[of_mode[0]]
        if name not in of_mode:
            what = f"a {self.runtimes[name].card.mode!r} model" if name in self.runtimes else "not a served model"
            raise InvalidArgument(f"model: {show(name)} is {what}; this endpoint takes {mode!r} models: "
                                  f"{', '.join(of_mode) or 'none served'}")
        return name, self.runtimes[name]

    def upload(self, path: Path, field: str, kinds: Sequence[str], purpose: str) -> Any:
        """Decode a file BentoML stored for this request (in its own temporary folder) from memory."""
        with client_errors():
            return decode(read_upload(path, field, self.limits.upload), field, self.limits.upload, kinds, purpose)

    def request(self, card: ModelCard, *, samples: int, seed: int, sampler: str, steps: int, spacing: str,
                guidance: float, rescale: float, dataset: str | None, present: Sequence[str] = (),
                absent: Sequence[str] = (), label_method: str = DEFAULT_LABEL_METHOD,
                despeckle: int = 0) -> GenerationRequest:
        """A GenerationRequest within the limits and accepted by the model (checked before anything runs)."""
        check_range("seed", seed, 0, 2**63 - 1)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("spacing", spacing, SPACINGS)
        check_choice("label_method", label_method, LABEL_METHODS)
        check_range("despeckle", despeckle, 0, card.patch_size**2)
        check_range("steps", steps, 1, min(self.limits.steps, card.timesteps), "EMSERVE_MAX_STEPS")
        check_range("guidance", guidance, 0, self.limits.guidance, "EMSERVE_MAX_GUIDANCE")
        check_range("rescale", rescale, 0, 1)
        with client_errors():  # present/absent overlap, a dataset or condition the model does not know
            request = GenerationRequest(samples=samples, seed=seed, sampler=sampler, steps=steps, spacing=spacing,
                                        guidance=guidance, rescale=rescale,
                                        present=check_classes("present", present, card),
                                        absent=check_classes("absent", absent, card), dataset=dataset,
                                        batch_size=BATCH_SIZE, label_method=label_method, despeckle=despeckle)
            check_request(card, request)
        return request

    def check_work(self, request: GenerationRequest, field: str) -> None:
        """Samples x steps within EMSERVE_MAX_SAMPLE_STEPS: each is bounded alone, but both at their maxima would
        hold a thread for many minutes. Submitted tasks are exempt: they run in the background until cancelled."""
        work = request.samples * request.steps
        if work > self.limits.sample_steps:
            raise InvalidArgument(f"{field} x steps: {request.samples} x {request.steps} = {work}; at most "
                                  f"{self.limits.sample_steps} per request (EMSERVE_MAX_SAMPLE_STEPS): ask for fewer "
                                  f"{field} or steps{', or submit a task' if field == 'samples' else ''}")

    def check_tiles(self, shape: Sequence[int], axis: str, tile: int, overlap: int) -> None:
        """The tiles a segment request would run, counted from the image's shape before any runs: a small tile at
        a large overlap, or a volume of many tiny slices, asks for far more work than its upload's size says."""
        tiles = tile_count(shape, tile, overlap, axis)
        voxels = tiles * tile * tile
        if tiles > self.limits.tiles or voxels > self.limits.tile_voxels:
            raise InvalidArgument(
                f"tile/overlap: an image of shape {tuple(shape)} in tiles of {tile} overlapping by {overlap} takes "
                f"{tiles} tiles, {voxels} voxels through the network; at most {self.limits.tiles} tiles "
                f"(EMSERVE_MAX_TILES) and {self.limits.tile_voxels} voxels (EMSERVE_MAX_TILE_VOXELS) are allowed: "
                f"use a smaller overlap, another tile size or a smaller image")

    def _pairs(self, ctx: bentoml.Context, settings: dict[str, Any], limit: int, setting: str,
               progress: Callable[[int, int], None] | None) -> Path:
        name, runtime = self.pick("pairs", settings["model"])
        check_choice("output", settings["output"], FORMATS)
        check_range("samples", settings["samples"], 1, limit, setting)
        request = self.request(runtime.card, samples=settings["samples"], seed=settings["seed"],
                               sampler=settings["sampler"], steps=settings["steps"], spacing=settings["spacing"],
                               guidance=settings["guidance"], rescale=settings["rescale"], dataset=settings["dataset"],
                               present=settings["present"] or (), absent=settings["absent"] or (),
                               label_method=settings["label_method"], despeckle=settings["despeckle"])
        screening = Screening() if settings["screen"] else None
        return self.generated(ctx, name, runtime, request, None, settings["output"], screening, "generate_pairs",
                              {"screen": settings["screen"]}, progress)

    def generated(self, ctx: bentoml.Context, name: str, runtime: Runtime, request: GenerationRequest,
                  maps: np.ndarray | None, output: str, screening: Screening | None, endpoint: str,
                  extra: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> Path:
        """Generate the request and encode it as `output`, with the model, seeds and parameters recorded."""
        card = runtime.card
        if not submitted(ctx):
            self.check_work(request, "samples" if maps is None else "labels")
        source = None if maps is None else (lambda start, stop: maps[start:stop])
        with client_errors():
            batches = list(generate(card, runtime, request, source, progress=progress, tick=deadline(ctx)))
        parts = [split_channels(card, batch, request) for batch in batches]
        codes = [label_codes(card, labels, screening) for _, labels in parts]
        seeds = [seed for batch in batches for seed in batch.seeds]
        settings = {**asdict(request), "output": output, **extra}
        record = self.record(name, runtime, endpoint, settings, seeds)
        if screening is not None:
            record["screening"] = screening.summary()
        if output == "zarr.zip":
            return self.result(ctx, endpoint, output, self.generated_store(ctx, card, request, batches, parts, codes,
                                                                           record))
        raw = raw_to_uint8(np.concatenate([r for r, _ in parts]))
        if output == "png":
            tiles = [pair_tile(r, m > 0, card.classes) for (rs, ms) in parts for r, m in zip(rs, ms, strict=True)]
            return self.result(ctx, endpoint, output, png_bytes(grid(tiles[:SHOWN], min(4, len(tiles))), record))
        arrays = {"em": raw, "labels": np.concatenate(codes), "classes": np.array(card.classes),
                  "seeds": np.array(seeds, np.int64), "metadata": metadata(record)}
        return self.result(ctx, endpoint, output, npz_bytes(arrays))

    def generated_store(self, ctx: bentoml.Context, card: ModelCard, request: GenerationRequest,
                        batches: list[GeneratedBatch], parts: list[tuple[np.ndarray | None, np.ndarray]],
                        codes: list[np.ndarray], record: dict[str, Any]) -> bytes:
        """The batches as the CLI writes them (a CellMap-layout store, one crop per batch), zipped."""
        folder = Path(ctx.temp_dir) / "generated.zarr"
        store = GeneratedStore(folder, card, request)
        for batch, (raw, _), code in zip(batches, parts, codes, strict=True):
            store.write(batch, raw, code)
        store.finish()
        return self.zipped(folder, record)

    @staticmethod
    def zipped(folder: Path, record: dict[str, Any]) -> bytes:
        import zarr

        zarr.open_group(str(folder), mode="r+").attrs.update({"service": json.loads(json.dumps(record))})
        return zip_folder(folder)

    @staticmethod
    def record(name: str, runtime: Runtime, endpoint: str, settings: dict[str, Any], seeds: list[int]
               ) -> dict[str, Any]:
        return {"endpoint": endpoint, "emserve": __version__, "model": describe(name, runtime),
                "parameters": settings, "seeds": seeds}

    @staticmethod
    def result(ctx: bentoml.Context, stem: str, output: str, data: bytes) -> Path:
        """The result as a file in the request's own temporary folder, which BentoML sends and then deletes."""
        path = Path(ctx.temp_dir) / f"{stem}{SUFFIX[output]}"
        path.write_bytes(data)
        return path


def metadata(record: dict[str, Any]) -> np.ndarray:
    """The record as a 0-d string array: np.load(..., allow_pickle=False)["metadata"].item() gives the JSON."""
    return np.array(json.dumps(record, sort_keys=True))


def segmentation_picture(card: ModelCard, raw: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """EM beside coloured masks, for an image or up to SHOWN evenly spaced slices of a volume (along z)."""
    network = raw_to_network(raw)
    if raw.ndim == 2:
        return grid([pair_tile(network, masks, card.classes)], 1)
    picked = np.unique(np.linspace(0, raw.shape[0] - 1, min(SHOWN, raw.shape[0])).astype(int))
    tiles = [pair_tile(network[z], masks[:, z], card.classes) for z in picked]
    return grid(tiles, min(4, len(tiles)))


def api_key() -> str | None:
    """EMSERVE_API_KEY, or None when it is unset. Set but empty or blank, it stops the server rather than turning
    authentication off; surrounding whitespace too, since HTTP strips it from the header that would carry it."""
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"{API_KEY_ENV}: set but empty; set a key, or unset the variable to serve without "
                         f"authentication")
    if key is not None and key != key.strip():
        raise ValueError(f"{API_KEY_ENV}: the key begins or ends with whitespace, which no HTTP header carries; "
                         f"remove it")
    return key


EMServe.add_asgi_middleware(Guard, api_key=api_key(), limits=LIMITS, task_ttl=TASK_TTL,
                            task_routes=[f"{api.route}/" for api in EMServe.apis.values() if api.is_task])
