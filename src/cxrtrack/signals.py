"""SIGTERM handled like Ctrl-C.

``timeout``, docker, Slurm and Kubernetes stop a process with SIGTERM, whose default action kills it
at once: the MLflow run would stay RUNNING for ever and the trackers would get no history and no
checkpoint. :func:`sigterm_as_interrupt` turns SIGTERM into :class:`Terminated`, a ``KeyboardInterrupt``, so every
path that handles Ctrl-C (the trainer stops, the trackers end the run KILLED, the best checkpoint is
kept) handles it too. The process then exits with 128 + the signal number (143), as shells report it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_received: int | None = None


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal other than SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame) -> None:
    global _received
    if _received is not None:  # already stopping: let the clean-up finish (a second SIGKILL cannot be caught anyway)
        log.warning("%s received again; still closing the run.", signal.Signals(signum).name)
        return
    _received = signum
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (main thread only: elsewhere Python cannot set
    handlers). The previous handler is restored afterwards."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def received() -> int | None:
    """The signal number that stopped this process, if a handled signal did."""
    return _received


def exit_status(exc: BaseException | None = None) -> int:
    """The exit status of a run stopped by ``exc`` (or by the last handled signal): 128 + signal number."""
    signum = exc.signum if isinstance(exc, Terminated) else _received
    return 128 + (signum or signal.SIGINT)
