"""Stop signals: SIGTERM and SIGHUP end a command the way Ctrl-C does.

Kaggle kernels, cluster schedulers, ``timeout``, ``docker stop`` and
Kubernetes stop a job with SIGTERM; a closed terminal sends SIGHUP. While a
command runs (:func:`raising`), either raises :class:`Stopped`, a
``KeyboardInterrupt``, so everything Ctrl-C does happens for them too: the
write in progress finishes (:func:`deferred`) or its temporary file is
removed, locks are released, undo removes what the command created, and the
CLI says what was saved and how to resume, then exits with 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).

A signal the process was started with ignored (``nohup``, a background job)
stays ignored. Only the first stop signal raises: more of them while the
command unwinds (a scheduler that repeats itself) do not cut its clean-up short.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_STOPPING: list[int] = []  # the stop signal received while :func:`raising` is active, once raised
_ACTIVE: list[bool] = []


class Stopped(KeyboardInterrupt):
    """A stop signal, raised where the program was: unwinds like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(exc: BaseException) -> int:
    """The conventional exit status of a command stopped by ``exc``: 128 + the signal number."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def stopped_by(exc: BaseException) -> str:
    """The words that start the stop message: empty for Ctrl-C, else the signal that came."""
    signum = int(getattr(exc, "signum", signal.SIGINT))
    return "" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}: "


def _ours() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum: int, frame) -> None:
    if _STOPPING:  # already unwinding: let the clean-up finish
        return
    _STOPPING.append(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def raising() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise :class:`Stopped` (SIGINT raises KeyboardInterrupt)."""
    if not _ours():
        yield
        return
    _STOPPING.clear()
    _ACTIVE.append(True)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _ACTIVE.pop()
        _STOPPING.clear()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold stop signals back until the block ends, then raise the first: the block's files are all or none."""
    if not _ours():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored by the process (nohup): stays ignored
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught and not _STOPPING:
        if _ACTIVE:
            _STOPPING.append(caught[0])
        raise Stopped(caught[0])
