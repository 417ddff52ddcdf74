"""Progress of long work (an ingest's units, an inference pass's rows, an epoch's steps): a tqdm bar
on a terminal, plain lines in a log (a Ray job's driver log, a file), at most one every `interval`
seconds and one at the end. Each shows done / total, the rate, the time left and the caller's own
fields (loss, skipped, acceptance so far).

No Ray here; jobs create one per long loop and call `advance` as work finishes.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

DEFAULT_INTERVAL_SECONDS = 30.0


def format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or no rate yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int):
            value = f"{value:,}"
        parts.append(f"{name} {value}")
    return "  ".join(parts)


class Progress:
    """`advance(n, **fields)` as work finishes; `close()` (or leaving the `with`) prints the last
    line. `total` may be None when unknown (no ETA then). A bar only when `stream` is a terminal
    and `bar` allows it; `clock` is for tests."""

    def __init__(self, label: str, total: int | None, unit: str = "rows",
                 interval: float = DEFAULT_INTERVAL_SECONDS, stream: TextIO | None = None,
                 bar: bool | None = None, clock=time.monotonic) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.interval = interval
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._bar = None
        output = stream or sys.stderr
        if bar is None:
            bar = bool(getattr(output, "isatty", lambda: False)())
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=output, dynamic_ncols=True,
                             mininterval=1.0, unit_scale=True)

    def rate(self) -> float:
        return self.done / max(self.clock() - self.started, 1e-9)

    def eta_seconds(self) -> float:
        if self.total is None:
            return float("nan")
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else float("inf")

    def line(self) -> str:
        total = f"/{self.total:,}" if self.total is not None else ""
        text = (f"[{self.label}] {self.done:,}{total} {self.unit}  {self.rate():,.1f} {self.unit}/s  "
                f"elapsed {format_seconds(self.clock() - self.started)}")
        if self.total is not None:
            text += f"  ETA {format_seconds(self.eta_seconds())}"
        extra = format_fields(self.fields)
        return f"{text}  {extra}" if extra else text

    def advance(self, count: int = 1, **fields: Any) -> None:
        self.done += count
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(count)
            if fields:
                self._bar.set_postfix_str(format_fields(self.fields), refresh=False)
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._print(self.line())

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._print(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
