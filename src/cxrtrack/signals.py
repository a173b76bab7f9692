"""SIGTERM handled like Ctrl-C.

``timeout``, docker, Slurm and Kubernetes stop a process with SIGTERM, whose default action kills it
at once: the MLflow run would stay RUNNING for ever and the trackers would get no history and no
checkpoint. :func:`sigterm_as_interrupt` turns SIGTERM into :class:`Terminated`, a ``KeyboardInterrupt``, so every
path that handles Ctrl-C (the trainer stops, the trackers end the run KILLED, the best checkpoint is
kept) handles it too. The process then exits with 128 + the signal number (143), as shells report it.

Neither signal cuts a step in half: inside a :func:`critical` section (a training batch, the end of an epoch with
its checkpoint and tracker calls, any tracker call) the signal is held until the section ends, so a KILLED run
never holds an epoch in its history that its trackers did not get.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

_received: int | None = None  # the first signal handled in this process
_pending: int | None = None  # received inside a critical section, not delivered yet
_depth = 0  # nesting of critical sections (main thread)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal other than SIGINT."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _handler(signum, frame) -> None:
    global _received, _pending
    name = signal.Signals(signum).name
    if _pending is not None:  # asked twice while a step was finishing: stop now
        _pending = None
        raise _interrupt(signum)
    if _received is not None:  # already stopping, closing the run: a second Ctrl-C aborts that, SIGTERM does not
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received again; still closing the run.", name)
        return
    _received = signum
    if _depth > 0:  # inside a tracker call, a checkpoint write, an epoch's bookkeeping: finish it first
        _pending = signum
        return
    raise _interrupt(signum)


@contextmanager
def critical() -> Iterator[None]:
    """A block a handled signal never cuts in half (a tracker call, a checkpoint write, the end of an epoch): a
    signal that arrives inside is delivered when the outermost block ends. A second signal stops at once."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():  # handlers run in the main thread only
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise _interrupt(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and SIGINT ``KeyboardInterrupt``, except inside
    :func:`critical` sections, which finish first (main thread only: elsewhere Python cannot set handlers).
    The previous handlers are restored afterwards. The one handler of every entry point (``cli.run_main``), of
    the compare and of a tuning session: a block inside another changes nothing."""
    global _received, _pending, _depth
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _handler:
        yield
        return
    outer_state = _received, _pending, _depth
    _received, _pending, _depth = None, None, 0
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # what was handled in the block ends with it: a later run in this process (the tests run many) must not
        # report this block's signal as its own
        _received, _pending, _depth = outer_state


def received() -> int | None:
    """The signal number that stopped this process, if a handled signal did."""
    return _received


def exit_status(exc: BaseException | None = None) -> int:
    """The exit status of a run stopped by ``exc`` (or by the last handled signal): 128 + signal number."""
    signum = exc.signum if isinstance(exc, Terminated) else _received
    return 128 + (signum or signal.SIGINT)
