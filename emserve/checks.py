"""Checks of a request's values, shared by the CLI, the pipelines and the service: each refusal is a ValueError
that names the field, the value (cut short) and what is allowed. The service turns them into 400s
(`emserve.serving.checks.client_errors`), the CLI into usage errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def show(value: Any) -> str:
    """A value for an error message, cut short: clients can send anything, and messages are echoed back."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_range(field: str, value: float, low: float, high: float, setting: str = "") -> None:
    """Comparisons only: NaN compares false, and a client's int of hundreds of digits compares exactly, where
    converting it to a float (math.isfinite) would raise OverflowError. `setting` names what sets `high`."""
    if not low <= value <= high:
        where = f" (the upper bound is {setting})" if setting else ""
        raise ValueError(f"{field}: {show(value)} is not allowed; allowed: {low} to {high}{where}")


def check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}: {show(value)} is not allowed; choose one of {', '.join(allowed)}")


def check_depth(depth: int) -> int:
    """Sections per sample (a model's depth context): an odd number >= 1, so one section is the centre."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 or depth % 2 == 0:
        raise ValueError(f"depth: {show(depth)} is not allowed; allowed: an odd number of sections >= 1 (1 = 2D)")
    return depth
