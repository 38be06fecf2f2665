"""Progress bars that suit both a terminal and a job's log file (training steps, evaluation batches)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

# A progress bar into a file or pipe (a job's log) is redrawn with a carriage return each time: thousands of bars on
# one line. Redrawn at most this often there; every 0.1 s (tqdm's default) on a terminal.
NON_TTY_BAR_INTERVAL_S = 60.0


def progress_bar(enabled: bool, *, file: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar (rank 0 shows it, the others pass enabled=False); on a non-terminal stream it updates rarely."""
    stream = sys.stderr if file is None else file
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(
        file=stream,
        disable=not enabled,
        dynamic_ncols=tty,
        mininterval=0.1 if tty else NON_TTY_BAR_INTERVAL_S,
        maxinterval=10.0 if tty else NON_TTY_BAR_INTERVAL_S,  # tqdm's monitor thread would redraw every 10 s
        **kwargs,
    )


def logs_lines(bar: Any) -> bool:
    """Whether logged steps should also go out as log lines: the bar is off, or it draws into a file or pipe (a
    batch job's log), where a bar redrawn once a minute would be all that shows. A terminal keeps its bar alone."""
    return bool(bar.disable) or not bar_refreshes(bar)


def bar_refreshes(bar: Any) -> bool:
    """Whether a postfix change should redraw `bar` now: on a terminal only (elsewhere the interval decides)."""
    fp = getattr(bar, "fp", None)
    return bool(getattr(fp, "isatty", lambda: False)())
