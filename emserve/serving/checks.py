"""The service's side of request checks: fields an endpoint does not take, upload file names, and client errors.

emserve's own checks (`emserve.checks`, pipelines, segmentation, uploads) raise ValueError naming the field;
`client_errors` turns those into the client's errors (400, or the status an UploadError carries), so a bad request
never reaches the client as a 500.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BadInput, BentoMLException, InvalidArgument

from emserve.checks import show
from emserve.serving.uploads import UploadError

FILE_NAME = 255  # characters of an upload's file name (a file system's limit for one name)


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


def check_file_name(field: str, name: str | None) -> None:
    """A file name is never used (formats are told by their first bytes); one past FILE_NAME characters or
    holding control characters (NUL, newline) is no file's name and is refused as the client's error."""
    if name is not None and (len(name) > FILE_NAME or any(c < " " or c == "\x7f" for c in name)):
        raise BadInput(f"{field}: the file name {show(name)} ({len(name)} characters) is not allowed; a file name "
                       f"of at most {FILE_NAME} characters without control characters (or none)")
