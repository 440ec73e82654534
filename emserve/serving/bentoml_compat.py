"""Where emserve leans on BentoML 1.4's internals, in one place: the request parsers (serde) replaced by stricter
ones, and BentoML's task result database (expiry, cancellation).

Each shim says what BentoML does and why emserve does otherwise; a BentoML upgrade is checked here first
(tests/test_service.py runs them all against a real `bentoml serve`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import bentoml
from _bentoml_impl import serde
from _bentoml_impl.tasks.result import Sqlite3Store
from bentoml.exceptions import BadInput, BentoMLException
from pydantic_core import from_json
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from emserve.checks import show
from emserve.serving.checks import check_fields, check_file_name
from emserve.serving.settings import TASK_TTL

FORM_OVERHEAD = 1 << 20  # bytes a multipart body may carry beyond its upload (other fields, part headers)
FORM_PARTS = 32  # text fields, and files, in one form (an endpoint takes at most 11 fields and 1 file)
FORM_TEXT = 4096  # characters of one text field: all 48 CellMap class names as a JSON list take 465. It also keeps
#                   numbers below Python's 4300-digit int parsing limit, past which BentoML's json.loads would fail

Sqlite3Store.RESULT_RETENTION = TASK_TTL  # BentoML's own clean-up (24 h) deletes no result Guard would keep


# ---- request parsing -------------------------------------------------------------------------------------------

class FilesOnlyJSON(serde.JSONSerde):
    """JSON bodies of known fields, except for endpoints that take files: BentoML would fetch a URL sent in a
    file's place."""

    async def parse_request(self, request: Request, cls: Any) -> Any:
        if getattr(cls, "multipart_fields", None):
            raise BadInput(f"{', '.join(sorted(cls.multipart_fields))}: send the file as multipart/form-data; "
                           f"this service fetches no URL and reads no path a client names")
        check_json_fields(await request.body(), cls)
        return await super().parse_request(request, cls)


def check_json_fields(body: bytes, cls: Any) -> None:
    """BadInput naming the fields of a JSON object body that `cls` does not take; a body that is not a JSON
    object is left to BentoML's parse, which answers 400 saying why."""
    try:
        fields = from_json(body or b"{}")  # pydantic's parser: numbers as BentoML reads them
    except ValueError:
        return
    if isinstance(fields, dict):
        check_fields(fields, cls)


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


serde.ALL_SERDE.update({"application/json": FilesOnlyJSON, "multipart/form-data": FilesOnlyMultipart,
                        "application/x-www-form-urlencoded": FilesOnlyMultipart})


# ---- BentoML's task result database ------------------------------------------------------------------------------

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


def submitted(ctx: bentoml.Context) -> bool:
    """Whether this call runs as a submitted task (in the background, until done or cancelled by its client)."""
    return getattr(ctx.request.state, "task_id", None) is not None
