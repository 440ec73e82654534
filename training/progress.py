"""Training progress: a live bar with loss, steps/s and time left on a terminal, plain lines in logs."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    """Tracks speed and the share of time spent making batches (data loading must never be the bottleneck)."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, every: int = 50):
        self.total, self.start, self.enabled, self.every = total, start, enabled, every
        self.t0 = time.perf_counter()
        self.step, self.loss, self.data_time = start, float("nan"), 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = RichProgress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, status="")
            self.bar.start()

    def rates(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        done = self.step - self.start
        per_s = done / elapsed
        return {"steps_per_s": per_s, "data_share": self.data_time / elapsed,
                "eta_s": (self.total - self.step) / per_s if per_s else float("inf")}

    def update(self, step: int, loss: float, data_time: float) -> None:
        self.step, self.data_time = step, data_time
        self.loss = loss if self.loss != self.loss else 0.9 * self.loss + 0.1 * loss  # smoothed
        if not self.enabled:
            return
        r = self.rates()
        status = f"loss {self.loss:.4f}  {r['steps_per_s']:.2f} it/s  data {100 * r['data_share']:.0f}%"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=status)
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {status}  eta {r['eta_s'] / 60:.1f} min", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
