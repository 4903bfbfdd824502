"""Long loops say how far they are in a log file too, not only on a terminal."""

from __future__ import annotations

import io

from training.progress import progress


def test_without_a_terminal_progress_is_plain_lines_and_a_last_one():
    log = io.StringIO()  # not a TTY, as a nohup log or CI
    assert list(progress(range(5), "evaluate (none)", every_s=0.0, stream=log)) == list(range(5))
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("evaluate (none): 1/5 (20%)")
    assert lines[-1].startswith("evaluate (none): 5/5 (100%)") and len(lines) == 6


def test_lines_are_spaced_in_time():
    log = io.StringIO()
    list(progress(iter(range(1000)), "cache", every_s=3600.0, stream=log))
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[-1]]  # only the last
    assert log.getvalue().startswith("cache: 1000,")
