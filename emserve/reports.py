"""Evaluation reports on disk: JSON as it is, and the per-class segmentation scores as a CSV table."""

from __future__ import annotations

import json
from pathlib import Path

SCORE_COLUMNS = ("dice", "iou", "precision", "recall")


def scores_csv(report: dict) -> str:
    """A segmentation report's per-class scores and their mean as CSV; an undefined score is an empty cell."""
    lines = [",".join(("class", *SCORE_COLUMNS, "annotated", "present"))]
    for row in [*report["classes"], {"name": "mean", **report["mean"], "annotated": "", "present": ""}]:
        lines.append(",".join([row["name"], *("" if row[m] is None else f"{row[m]:.6f}" for m in SCORE_COLUMNS),
                               str(row["annotated"]), str(row["present"])]))
    return "\n".join(lines) + "\n"


def write_json(path: Path, report: dict) -> None:
    """Write a report as indented JSON, atomically."""
    write_text(path, json.dumps(report, indent=2))


def write_text(path: Path, text: str) -> None:
    """Write a report atomically (temp file + rename): a reader never sees half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
