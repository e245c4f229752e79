"""Progress bars: a tqdm bar on a terminal, nothing when not on one (or when quiet)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def progress_bar(total: int, label: str, unit: str, quiet: bool = False) -> tuple[Callable[..., None], Callable[[], None]]:
    """``(step, close)``: ``step(*_)`` advances the bar by one (any arguments are ignored)."""
    if quiet or not sys.stderr.isatty():
        return (lambda *_: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr)
    return (lambda *_: bar.update(1)), bar.close
