"""Progress of long work: in a log, one line at most every `interval` seconds and one at the end,
with done/total, rate, ETA and the caller's fields; on a terminal, a bar instead."""

from __future__ import annotations

import io

from pipeline.progress import Progress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_at_the_interval_and_at_the_end_with_rate_and_eta():
    clock, stream = Clock(), io.StringIO()
    progress = Progress("predict", 1000, "rows", interval=30, stream=stream, bar=False, clock=clock)
    clock.now += 10
    progress.advance(100, files="1/10")  # 10 s after the start: too early for a line
    assert stream.getvalue() == ""
    clock.now += 30
    progress.advance(300, files="4/10")  # 40 s, 400 rows: 10 rows/s, 600 left = 60 s
    assert stream.getvalue() == "[predict] 400/1,000 rows  10.0 rows/s  elapsed 0:40  ETA 1:00  files 4/10\n"
    clock.now += 5
    progress.advance(100)  # 5 s after the last line: none
    assert stream.getvalue().count("\n") == 1
    clock.now += 15
    progress.advance(500, files="10/10")
    progress.close()  # the last line whatever the interval
    assert stream.getvalue().splitlines()[-1] == (
        "[predict] 1,000/1,000 rows  16.7 rows/s  elapsed 1:00  ETA 0:00  files 10/10")


def test_an_unknown_total_has_no_eta_and_fields_are_formatted():
    clock, stream = Clock(), io.StringIO()
    with Progress("ingest", None, "units", interval=0, stream=stream, bar=False, clock=clock) as progress:
        clock.now += 2
        progress.advance(1, rows=12345, MB=1.5, skipped=0, note=None)
    first = stream.getvalue().splitlines()[0]
    assert first == "[ingest] 1 units  0.5 units/s  elapsed 0:02  rows 12,345  MB 1.5  skipped 0"


def test_a_terminal_gets_a_bar_and_a_final_line():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with Progress("export", 10, "rows", stream=stream) as progress:
        progress.advance(10, accepted=3)
    text = stream.getvalue()
    assert "export" in text and "10/10" in text and "\r" in text  # tqdm redraws in place
    assert text.rstrip().splitlines()[-1].startswith("[export] 10/10 rows")


def test_durations_read_as_clock_times():
    assert [format_seconds(value) for value in (0, 59.4, 61, 3600 + 62, float("inf"))] == \
        ["0:00", "0:59", "1:01", "1:01:02", "?"]
