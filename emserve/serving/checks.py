"""Request checks: every refusal names the field, the value (cut short) and what is allowed.

emserve's own checks (pipelines, segmentation, uploads) raise ValueError; `client_errors` turns those into the
client's errors (400, or the status an UploadError carries), so a bad request never reaches the client as a 500.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BadInput, BentoMLException, InvalidArgument

from emserve.card import ModelCard
from emserve.serving.uploads import UploadError

FILE_NAME = 255  # characters of an upload's file name (a file system's limit for one name)


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


def check_file_name(field: str, name: str | None) -> None:
    """A file name is never used (formats are told by their first bytes); one past FILE_NAME characters or
    holding control characters (NUL, newline) is no file's name and is refused as the client's error."""
    if name is not None and (len(name) > FILE_NAME or any(c < " " or c == "\x7f" for c in name)):
        raise BadInput(f"{field}: the file name {show(name)} ({len(name)} characters) is not allowed; a file name "
                       f"of at most {FILE_NAME} characters without control characters (or none)")
