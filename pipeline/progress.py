"""Progress of long stages, one mechanism for all: a bar in a terminal, plain lines elsewhere.

Every long loop (feature extraction, cache building, an epoch, validation,
out-of-fold and test prediction, a large reorg) wraps its iterable in
:func:`track`. In a terminal the stage is one bar on stderr, redrawn in place
with images/s and the ETA; when stderr is a file or a pipe (CI, ``nohup``,
``| tee``, a Kaggle kernel's log) a plain line with the same fields is written
every ``PIPELINE_PROGRESS_SECONDS`` (10 s by default) and once at the end of a
stage that printed one or lasted that long. ``--quiet`` turns it all off.

The module also remembers what the running stage has saved (:func:`stage`),
so Ctrl-C can say exactly that (:func:`interrupted_message`), and makes
SIGTERM and SIGHUP stop a command the way Ctrl-C does (:func:`raising`).

Torch-free and cheap to import: the CLI imports it at startup.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

DEFAULT_INTERVAL = 10.0  # seconds between plain lines without a terminal
REDRAW = 0.1  # seconds between redraws of a terminal bar
SETTINGS: dict[str, Any] = {"quiet": False, "interval": None, "tty": None}
NOTHING_SAVED = "interrupted"
_STAGES: list[Callable[[], str]] = []
_CAUGHT: list[str] = []  # the message of the stage Ctrl-C interrupted, taken before the stage unwinds


def configure(quiet: bool | None = None, interval: float | None = None, tty: bool | None = None) -> None:
    """Set what every later bar does: ``quiet`` hides them; ``interval`` and ``tty`` override the defaults."""
    for key, value in (("quiet", quiet), ("interval", interval), ("tty", tty)):
        if value is not None:
            SETTINGS[key] = value


def _interval() -> float:
    if SETTINGS["interval"] is not None:
        return float(SETTINGS["interval"])
    try:
        return float(os.environ.get("PIPELINE_PROGRESS_SECONDS", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL


def clock(seconds: float) -> str:
    """``seconds`` as m:ss or h:mm:ss."""
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "img",
                  fields: dict[str, Any] | None = None) -> str:
    """One progress line: stage, count, rate, elapsed time, ETA and extra fields (pure)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    count = f"{done}/{total} {unit}" if total else f"{done} {unit}"
    parts = [desc, count]
    if total:
        parts.insert(1, f"{min(100, 100 * done // max(total, 1)):3d}%")
    parts.append(f"{rate:.1f} {unit}/s" if rate < 100 else f"{rate:.0f} {unit}/s")
    parts.append(f"elapsed {clock(elapsed)}")
    if total and rate > 0:
        parts.append(f"ETA {clock(max(0, total - done) / rate)}")
    parts += [f"{k} {v() if callable(v) else v}" for k, v in (fields or {}).items()]
    return "  ".join(parts)


class Progress:
    """One stage's counter; renders a bar (terminal) or plain lines (elsewhere) on stderr."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "img", enabled: bool = True):
        self.desc, self.total, self.unit = desc, total, unit
        self.enabled = enabled and not SETTINGS["quiet"]
        self.tty = SETTINGS["tty"] if SETTINGS["tty"] is not None else _isatty(sys.stderr)
        self.interval = REDRAW if self.tty else _interval()
        self.fields: dict[str, Any] = {}
        self.done, self.start, self.printed, self.closed = 0, time.perf_counter(), 0, False
        self.last = self.start
        self._timer = None
        if self.enabled and not self.tty:  # a stage still on its first batch after one interval says so
            self._timer = threading.Timer(self.interval, self._started)
            self._timer.daemon = True
            self._timer.start()

    def _started(self) -> None:
        if not self.closed and not self.printed:
            self._emit(end=False)

    def set_postfix(self, **fields: Any) -> None:
        """Extra fields of the line; a callable is evaluated only when a line is drawn (no needless syncs)."""
        self.fields.update(fields)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._emit(end=False)
        if self.total is not None and self.done >= self.total:
            self.close()

    def close(self) -> None:
        """End the stage: clear the bar, or write the last plain line of a stage that printed or took long."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.enabled:
            return
        if self.tty:
            if self.printed:
                _write("\r\033[K")
        elif self.printed or time.perf_counter() - self.start >= self.interval:
            self._emit(end=True)

    def line(self) -> str:
        return progress_line(self.desc, self.done, self.total, time.perf_counter() - self.start, self.unit,
                             self.fields)

    def _emit(self, end: bool) -> None:
        self.printed += 1
        text = self.line()
        if self.tty:
            width = _columns()
            _write("\r" + text[: width - 1] + "\033[K")
        else:
            _write(text + (" (done)" if end else "") + "\n")


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 80


def _write(text: str) -> None:
    stream = sys.stderr  # looked up each time: test runners swap it
    stream.write(text)
    stream.flush()


def images_in(loader: Any) -> int | None:
    """How many samples one pass over ``loader`` yields on this process (None when unknown)."""
    if hasattr(loader, "n") and hasattr(loader, "world"):  # the index-batch loaders of pipeline/data/cache.py
        return -(-loader.n // loader.world)
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and sampler is not loader and hasattr(sampler, "__len__"):
        return len(sampler)
    if hasattr(loader, "__len__") and getattr(loader, "batch_size", None):
        return len(loader) * loader.batch_size
    return None


def _batch_size(batch: Any) -> int:
    """Samples in a (x, y, positions) batch: the positions' length; else 1."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3 and hasattr(batch[2], "__len__"):
        return len(batch[2])
    return 1


class track:  # noqa: N801 - used like a function: `for batch in track(loader, "predict")`
    """Iterate ``iterable`` while counting samples (``count(item)``, default: a batch's size).

    An item counts when the caller comes back for the next one, so the count
    is of work done, not of batches fetched. ``total`` defaults to
    :func:`images_in`; the bar is closed when the count reaches it, when the
    iterable ends, or on :meth:`close`. Without a terminal a stage prints a
    line after its first interval even while its first batch is in work.
    """

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, unit: str = "img",
                 count: Callable[[Any], int] = _batch_size, enabled: bool = True):
        self.iterable, self.count = iterable, count
        self.bar = Progress(desc, total if total is not None else images_in(iterable), unit, enabled)

    @property
    def active(self) -> bool:
        return self.bar.enabled

    def set_postfix(self, **fields: Any) -> None:
        self.bar.set_postfix(**fields)

    def close(self) -> None:
        self.bar.close()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                n = self.count(item)
                yield item
                self.bar.update(n)  # counted once the caller asks for the next: its work on this one is done
        finally:
            self.bar.close()


# ---------------------------------------------------------------- what Ctrl-C has to say


@contextlib.contextmanager
def stage(saved: str | Callable[[], str]) -> Iterator[None]:
    """While the block runs, Ctrl-C reports ``saved`` (a message, or a function giving it then)."""
    message = saved if callable(saved) else (lambda: saved)
    _STAGES.append(message)
    try:
        yield
    except KeyboardInterrupt:
        if not _CAUGHT:  # the innermost stage speaks; the outer ones unwind after it
            _CAUGHT.append(message())
        raise
    finally:
        _STAGES.pop()


def interrupted_message() -> str:
    """What the interrupted (or the innermost running) stage says it has saved, for the Ctrl-C message."""
    if _CAUGHT:
        return _CAUGHT[0]
    return _STAGES[-1]() if _STAGES else NOTHING_SAVED


def reset() -> None:
    """Forget the stages (a new command starts)."""
    _STAGES.clear()
    _CAUGHT.clear()


# ---------------------------------------------------------------- stop signals: SIGTERM and SIGHUP as Ctrl-C
# Kaggle kernels, cluster schedulers, `timeout`, `docker stop` and Kubernetes stop a job with SIGTERM; a closed
# terminal sends SIGHUP. While a command runs (raising()), either raises Stopped, a KeyboardInterrupt, so all
# that Ctrl-C does happens for them too: the write in progress finishes (deferred()) or its temporary file is
# removed, locks are released, undo removes what the command created, and the CLI says what was saved and how
# to resume, then exits with 128 + the signal's number (130 SIGINT, 143 SIGTERM, 129 SIGHUP). A signal the
# process was started with ignored (nohup, a background job) stays ignored. Only the first stop signal
# raises: more while the command unwinds (a scheduler repeating itself) do not cut its clean-up short.

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


# ---------------------------------------------------------------- per-epoch output


def log_scalars(board, row: dict) -> None:
    """One epoch's metrics.csv row as TensorBoard scalars (``board`` None: off)."""
    if board is not None:
        for key, value in row.items():
            if key != "epoch":
                board.add_scalar(key, value, row["epoch"])
        board.flush()


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter logging into ``log_dir`` (needs the tensorboard package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PipelineError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(log_dir))


def epoch_line(row: dict, metric: str, epochs: int) -> str:
    """The log line of one finished epoch."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    from pipeline.metrics import valid_key

    scored = () if metric == "log_loss" else (valid_key(metric),)  # valid_loss is the log loss
    averaged = (valid_key(metric, "ema"), valid_key(metric, "average"))
    for key in dict.fromkeys(("valid_loss", valid_key("accuracy"), *scored, *averaged)):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"lr {row['lr']:.3g}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
