"""Admission in front of BentoML (API key, body size, queue, task caps), and each admitted request's deadline
with the 504 that answers a request stopped by it."""

from __future__ import annotations

import asyncio
import functools
import hmac
import math
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import bentoml
from bentoml.exceptions import BadInput
from python_multipart.multipart import parse_options_header
from starlette.responses import JSONResponse

from emserve.checks import show
from emserve.serving.bentoml_compat import (
    FORM_OVERHEAD,
    check_json_fields,
    expire_results,
    result_database,
    submitted,
)
from emserve.serving.settings import API_KEY_ENV, TIMEOUT, Limits

RETRY_AFTER = 5  # seconds a client refused for a full queue is told to wait (Retry-After)
ARRIVED = "emserve_arrived"  # the request state Guard records the arrival time under (time.monotonic())


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
                 task_ttl: int, task_inputs: Mapping[str, Any]) -> None:
        self.app, self.api_key, self.limits = app, api_key, limits
        self.task_routes, self.task_ttl = tuple(task_routes), task_ttl
        self.task_inputs = dict(task_inputs)  # submit route -> the task's input model (its fields)
        self.in_flight = self.tasks = 0  # one event loop per worker: no lock needed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        submit = path.startswith(self.task_routes) and path.endswith(("/submit", "/retry"))
        refusal = self.refusal(path, scope["method"], headers)
        if refusal is None and scope["method"] == "POST" and path in self.task_inputs:
            refusal, receive = await self.task_fields(path, headers, receive)
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

    async def task_fields(self, path: str, headers: dict[str, str],
                          receive: Any) -> tuple[tuple[int, str, None] | None, Any]:
        """A task's submission names only fields of the task, as every other endpoint's body must: BentoML
        answers a submit at once and reads its fields only when the task runs, so a misspelt field would show
        only in the failed task's result. The body (within its size limit, checked before) is read here and
        handed on whole."""
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: BentoML sees the same
                return None, receive
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if parse_options_header(headers.get("content-type", ""))[0] == b"application/json":
            try:
                check_json_fields(body, self.task_inputs[path])
            except BadInput as error:
                return (HTTPStatus.BAD_REQUEST, str(error), None), replay
        return None, replay

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


# ---- deadlines -------------------------------------------------------------------------------------------------

class TimeUp(Exception):
    """A request ran past EMSERVE_TIMEOUT: raised by its deadline between sampler steps or tiles, it stops the
    work and frees the thread for the requests waiting (BentoML's own timeout answers the client but leaves the
    thread computing)."""


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
