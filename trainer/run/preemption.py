"""Stopping cleanly on a signal: `StopRequest` records SIGTERM/SIGINT so the loop checkpoints and exits, and
`shielded` starts a loader with those signals blocked so that its workers survive a signal meant for the trainer.

A stop request may reach only some ranks; trainer/run/loop.py agrees on it across ranks every step, and
trainer/run/evaluation.py at every evaluation batch (an evaluation in progress is abandoned, so that the checkpoint is
written within a container's stop grace period).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class StopRequest:
    """SIGTERM/SIGINT handler that only records the request; the loop saves a checkpoint and exits cleanly.

    Repeated SIGTERMs are ignored (a launcher forwarding the signal to a group that already got it would otherwise
    kill the save); a second SIGINT restores the default handler so that Ctrl-C twice still ends a stuck process.
    Forked loader workers inherit this handler, so a signal to the whole process group does not kill them under the
    main process either.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.signum is None:
            self.signum = signum
            log.warning(
                "received %s: saving a checkpoint after this step, then exiting", signal.Signals(signum).name
            )

    @property
    def requested(self) -> bool:
        return self.signum is not None


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_END = object()


def shielded(batches: Iterable[T]) -> Iterator[T]:
    """Iterate a loader whose start (the first batch) runs with SIGTERM/SIGINT blocked.

    Loaders start their worker processes or threads on the first batch, and those inherit the blocked mask. A signal
    sent to the whole process group (preemption, Ctrl-C) then reaches only the trainer, which checkpoints: PyTorch's
    DataLoader workers would otherwise die on a SIGTERM that does not come from their parent, and the main process
    would raise "worker killed" at an arbitrary point, e.g. in the middle of the very checkpoint the signal asked for.
    A signal arriving meanwhile stays pending and is handled as soon as the loader has started.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        # A DataLoader starts its workers here, a generator-based loader at the first next().
        it = iter(batches)
        first = next(it, _END)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if first is _END:
        return
    yield first  # type: ignore[misc]
    yield from it
