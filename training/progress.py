"""Progress of long loops (cache, evaluation) on a terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar on a terminal; nothing when the output is a log file (nohup runs
    log one JSON line per epoch instead)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, dynamic_ncols=True)
