"""Progress bars for long work that read well in a terminal and in a log file.

In a terminal a bar redraws often. Written to a file (``make train > log``), every redraw is another
carriage-return record, and a 3000-step warm-up with a live loss would leave thousands; there the bar
redraws at most every ``LOG_INTERVAL_S`` seconds. Postfix updates (a live loss) never force a redraw,
so they follow the same pace.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Iterable | None = None, *, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (``disable`` when ``enabled`` is false) paced for where stderr goes."""
    terminal = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if terminal else LOG_INTERVAL_S)
    if not terminal:
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S * 4)
    return tqdm(iterable, desc=desc, disable=not enabled, **kwargs)
