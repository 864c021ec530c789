"""Small file helpers every stage shares: atomic writes, CSV reading, a lock, undo on failure.

An output is written to a temporary file beside its target and renamed over
it, so a crash (or a full disk) never leaves a half-written file, and the file
that was there before stays intact until the new one is complete. The file
gets the mode any new file gets under the umask (0644 under umask 022), not
the 0600 of a temporary file. :func:`undo_on_failure` removes what a failed
or refused command created.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd


def os_error_message(exc: OSError, path: Path, doing: str) -> str:
    """One line for an OSError, with what to do for the usual causes."""
    hint = {
        errno.ENOSPC: "free some disk space and run again",
        errno.EDQUOT: "free some disk space (the disk quota is full) and run again",
        errno.EFBIG: "free some disk space or raise the file-size limit (ulimit -f) and run again",
        errno.EACCES: "check the folder's permissions",
        errno.EPERM: "check the folder's permissions",
        errno.EROFS: "the file system is read-only; choose another folder",
    }.get(exc.errno, "check the path and run again")
    return f"cannot {doing} {path}: {exc.strerror or exc}; {hint}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        pass
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temporary files of ``path`` left by writers that no longer run.

    A writer killed between creating its temporary file and the rename (SIGKILL,
    power loss) leaves ``.NAME.<pid>-<random>.tmp`` beside the target. Such a file
    is never read, and the next write of the same target removes it once its
    pid is gone; files of live writers are left alone.
    """
    prefix = f".{path.name}."
    removed = []
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:  # tidying never blocks a write
        for entry in entries:
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The temporary file is ``.NAME.<pid>-<random>.tmp``, so that a later write can
    tell the leftovers of a killed process from a live one's (see
    :func:`remove_stale_temps`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "write")) from exc
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~current_umask())  # what open() would give a new file, not mkstemp's 0600
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - any writer (torch, numpy, PIL) may word a full disk its own way
        cause = write_failure(exc, tmp_path)
        if cause is None:
            raise
        raise PipelineError(os_error_message(cause, path, "write")) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NEARLY_FULL = 1 << 20  # bytes: less than this left after a failed write means the write filled the disk


def write_failure(exc: BaseException, tmp: Path) -> OSError | None:
    """The OSError behind a failed write of ``tmp`` (a file, or a folder being filled), or None when the
    failure is not the file system's.

    Writers word a full disk or a file-size limit their own way: ``open``
    raises ``OSError(ENOSPC)``, ``torch.save`` a ``RuntimeError`` ("unexpected
    pos ..."), others wrap it. The answer comes from the exception chain, else
    from the evidence on disk: the partial file at the process's file-size
    limit (``ulimit -f``), or its file system (nearly) out of space.
    """
    if isinstance(exc, OSError):
        return exc
    chained = disk_error(exc)
    if chained is not None:
        return chained
    try:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if tmp.is_file() and limit != resource.RLIM_INFINITY and tmp.stat().st_size >= limit:
            return OSError(errno.EFBIG, "File too large")
        fs = os.statvfs(tmp if tmp.is_dir() else tmp.parent)
        free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize
    except OSError:
        return None
    if free < _NEARLY_FULL:
        return OSError(errno.ENOSPC, "No space left on device")
    return None


def disk_error(exc: BaseException) -> OSError | None:
    """The full-disk or file-size-limit OSError in ``exc``'s chain of causes, if any.

    SQLite (an Optuna study, an MLflow database) says SQLITE_FULL as an
    OperationalError "database or disk is full", not an OSError: it counts too.
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            return seen
        if type(seen).__name__ == "OperationalError" and "database or disk is full" in str(seen):
            return OSError(errno.ENOSPC, "No space left on device (database or disk is full)")
        seen = seen.__cause__ or seen.__context__
    return None


def allocate(path: Path, size: int) -> None:
    """Reserve ``size`` bytes for ``path`` now, so a memory map written later cannot hit a full disk.

    Writing a memory-mapped page the disk has no room for kills the process
    with SIGBUS; reserved up front, a full disk is an ordinary ``OSError``.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: write as before
            raise
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (threads may be writing)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_csv(path: Path, frame: pd.DataFrame, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)


def atomic_save(path: Path, save: Callable[[Path], None]) -> None:
    """Run ``save(tmp)`` and move the result to ``path`` (torch.save and friends)."""
    with atomic_path(path) as tmp:
        save(tmp)


def read_csv(path: Path, what: str, **kwargs: Any) -> pd.DataFrame:
    """Read a CSV of strings exactly as written (ids like '007' stay '007').

    Reads CSVs as spreadsheets save them: UTF-8 with or without a byte-order
    mark, UTF-16 (Excel's "Unicode text", told by its BOM), CRLF line ends,
    trailing blank rows or rows of only commas (dropped), spaces around column
    names (stripped). A missing, empty or unparsable file is a one-line error
    naming it.
    """
    import pandas as pd  # lazily: commands that read no CSV start faster

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} not found; check the path (is RAW_DIR the unzipped download?)")
    try:
        encoding = csv_encoding(path)
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding, **kwargs)
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{what} {path} is empty; download it again") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise PipelineError(f"{what} {path} is not a readable CSV ({first}); download it again") from None
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "read")) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    blank = frame.apply(lambda col: col.str.strip() == "").all(axis=1)
    frame = frame[~blank].reset_index(drop=True) if blank.any() else frame  # ",,," rows a spreadsheet leaves
    if frame.empty:
        raise PipelineError(f"{what} {path} has a header but no rows; download it again")
    return frame


def csv_encoding(path: Path) -> str:
    """The encoding a CSV's byte-order mark names: utf-16 (either byte order), else utf-8-sig (BOM or none)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """Hold an advisory lock on ``path``; a second holder gets a clear error at once, or after ``wait``
    seconds of waiting for it (short locks, e.g. around a run's shared files).

    The kernel releases the lock when its holder exits, killed or not, so a
    leftover lock file never blocks anyone; a holder that exits normally (even
    with an error) removes the file, and the folders this lock created when
    nothing else was written there, so no command leaves them behind.
    """
    path = Path(path)
    created = [p for p in path.parents if not p.exists()]  # deepest first
    try:
        fh = _open_lock(path, what, wait)
        with fh:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            try:
                yield
            finally:
                with contextlib.suppress(OSError):  # removed while still locked: a waiting opener re-checks it
                    os.unlink(path)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        for folder in created:
            try:
                folder.rmdir()  # only when empty: a command that wrote nothing leaves nothing
            except OSError:
                break


def _open_lock(path: Path, what: str, wait: float = 0.0):
    """The locked file object of ``path``; retried when a releasing holder removed the file meanwhile,
    and while another holds it, for up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    for attempt in itertools.count():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")
        except OSError as exc:
            raise PipelineError(os_error_message(exc, path, "create the lock file")) from exc
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fh)
            fh.close()
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise PipelineError(f"{what} is busy: {holder} holds {path}; wait for it to finish") from None
        if _same_file(fh, path):
            return fh
        fh.close()  # we locked a file its last holder had just removed: lock the current one
        if attempt > 100 and time.monotonic() >= deadline:
            raise PipelineError(f"{what} is busy: {path} keeps changing; wait for the other process to finish")


def _holder(fh) -> str:
    """'pid N' as the holder wrote it; it writes just after locking, so an empty file is read again a moment later."""
    for _ in range(20):
        fh.seek(0)
        holder = fh.read().strip()
        if holder:
            return holder
        time.sleep(0.005)
    return "another process"


def _same_file(fh, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def made_folder(path: Path) -> Iterator[Path]:
    """Create ``path`` (and its parents) for the block; when the block fails, remove it again if this call
    made it and nothing is left in it: a refused command leaves no empty folder behind, and never touches
    a folder that was there before."""
    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "create")) from exc
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


@contextlib.contextmanager
def undo_on_failure(root: Path, keep: Callable[[Path], bool] = lambda path: False) -> Iterator[None]:
    """When the block fails (an error, a refusal, Ctrl-C), remove what it created under ``root``.

    Paths that existed before are never touched; a created path for which
    ``keep(path)`` is true stays (e.g. a member that saved an epoch), and so
    do the folders above it.
    """
    root = Path(root)
    before = _listing(root)
    try:
        yield
    except BaseException:
        created = sorted(_listing(root) - before, key=lambda p: len(p.parts), reverse=True)
        for path in created:  # deepest first: files, then the folders they were in
            if keep(path):
                continue
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        raise


def _listing(root: Path) -> set[Path]:
    """``root`` and everything under it (a run folder is small)."""
    if not root.exists():
        return set()
    return {root, *root.rglob("*")}


def read_json(path: Path, missing: str, unreadable: str) -> Any:
    """A JSON file, or one line saying it is missing (``missing``) or broken (``unreadable``: what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: {missing}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise PipelineError(f"{path} is unreadable ({exc}); {unreadable}") from None
