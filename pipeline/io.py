"""Small file helpers every stage shares: atomic writes, CSV reading, a lock.

An output is written to a temporary file beside its target and renamed over
it, so a crash (or a full disk) never leaves a half-written file, and the file
that was there before stays intact until the new one is complete.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError


def os_error_message(exc: OSError, path: Path, doing: str) -> str:
    """One line for an OSError, with what to do for the usual causes."""
    hint = {
        errno.ENOSPC: "free some disk space and run again",
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
        yield tmp_path
        with open(tmp_path, "rb+") as fh:  # flush to disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "write")) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


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

    Handles a UTF-8 byte-order mark; a missing, empty or unparsable file is a
    one-line error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} not found; check the path (is RAW_DIR the unzipped download?)")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", **kwargs)
    except pd.errors.EmptyDataError:
        raise PipelineError(f"{what} {path} is empty; download it again") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise PipelineError(f"{what} {path} is not a readable CSV ({first}); download it again") from None
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "read")) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    if frame.empty:
        raise PipelineError(f"{what} {path} has a header but no rows; download it again")
    return frame


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on ``path``; a second holder gets a clear error at once.

    The kernel releases the lock when its holder exits, killed or not, so a
    lock file a killed process left behind never blocks anyone: the next
    holder takes it over. A clean exit removes the file, and the folder when
    this lock created it and nothing else was written there.
    """
    path = Path(path)
    created = not path.parent.exists()
    while True:
        fh = _open_lock(path)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise PipelineError(f"{what} is busy: {holder} holds {path}; wait for it to finish") from None
        if _same_file(fh, path):
            break
        fh.close()  # the holder removed the file between our open and our lock: take the new one
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: a waiting opener sees a new inode and retries
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty: a run that wrote nothing leaves nothing


def _open_lock(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a+")
    except OSError as exc:
        raise PipelineError(os_error_message(exc, path, "create the lock file")) from exc


def _same_file(fh, path: Path) -> bool:
    try:
        return os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def read_json(path: Path, missing: str, unreadable: str) -> Any:
    """A JSON file, or one line saying it is missing (``missing``) or broken (``unreadable``: what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: {missing}") from None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise PipelineError(f"{path} is unreadable ({exc}); {unreadable}") from None
