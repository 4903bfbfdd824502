"""Progress of long loops (cache, epochs, evaluation): a bar on a terminal, plain lines in a log.

Without a terminal (nohup, CI, a file) a bar would print nothing useful, so a line goes to stderr
at most every `every_s` seconds and at the end: `desc: done/total (percent), elapsed`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    every_s: float = 10.0,
    stream: TextIO | None = None,
) -> Iterable[T]:
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, file=stream)
    if total is None:
        total = len(iterable) if hasattr(iterable, "__len__") else None  # type: ignore[arg-type]
    return _lines(iterable, desc, total, every_s, stream)


def _lines(
    iterable: Iterable[T], desc: str, total: int | None, every_s: float, stream: TextIO
) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0

    def say() -> None:
        share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
        print(f"{desc}: {done}{share}, {time.monotonic() - start:.0f} s", file=stream, flush=True)

    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            say()
            last = now
    say()
