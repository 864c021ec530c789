"""A full disk or a file-size limit: every writer says so in one line and keeps the previous file.

The writers run in a child process under a file-size limit (``ulimit -f``) with
SIGXFSZ ignored, so a write past the limit fails with EFBIG the way a full disk
fails with ENOSPC (torch.save words both as a RuntimeError "unexpected pos").
Where user namespaces allow it, a real 2 MB tmpfs is filled too.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.io import atomic_path, disk_error, write_failure

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 256 * 1024  # bytes a file may grow to in the child

# Each case writes something larger than LIMIT where a smaller file of the same name already is; the child
# reports, per case, the error line (or "ok"/"raw: ...") and whether the old file is unchanged.
WRITERS = r'''
import json, resource, signal, sys, zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.checkpoint import save_checkpoint
from pipeline.data.cache import image_cache, stored_tensors
from pipeline.data.items import Item
from pipeline.io import atomic_save, atomic_write_csv, atomic_write_json
from pipeline.predict.submission_index import record_submission
from pipeline.download.archives import unpack_all
from pipeline.errors import PipelineError

out, limit = Path(sys.argv[1]), int(sys.argv[2])
outside = out.parent / "outside"  # the inputs, on another file system than ``out`` in the tmpfs case
images = []
for i in range(2 * limit // (32 * 32 * 3) + 1):  # an image cache twice the limit
    path = outside / "img" / f"{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    images.append(Item(str(i), path, 0))
zpath = outside / "raw" / "big.zip"
zpath.parent.mkdir()
with zipfile.ZipFile(zpath, "w") as zf:
    zf.writestr("big.bin", np.random.default_rng(0).bytes(2 * limit))
(out / "index.csv").write_text("time,competition\n2026,old\n")


cases = {
    "checkpoint": lambda p: save_checkpoint(p, {"model": {"w": torch.randn(4 * limit // 4)}}),
    "csv": lambda p: atomic_write_csv(p, pd.DataFrame({"x": np.arange(limit // 2)})),
    "json": lambda p: atomic_write_json(p, {"x": "y" * 2 * limit}),
    "png": lambda p: atomic_save(p, lambda tmp: Image.fromarray(
        np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(tmp, format="PNG")),
    "image_cache": lambda p: image_cache(out / "work", images, 32, workers=1),
    "feature_bank": lambda p: stored_tensors(out / "work" / "cache" / "features-k.pt",  # the feature cache's writer
                                            lambda: {"eval": torch.randn(len(images), 1024)}),
    "index": lambda p: record_submission(p, competition="c" * 2 * limit, file="s.csv", run_dir="r", model="m",
                                         cv_score=None, members=1, tta="none"),
    "unpack": lambda p: unpack_all(outside / "raw", out / "unpacked"),
}
targets = {"image_cache": None, "feature_bank": None, "index": out / "index.csv", "unpack": None}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
report = {}
import time
for name, write in cases.items():
    t0 = time.time()
    target = targets.get(name, out / f"{name}.old")
    if name not in targets:
        target.write_bytes(b"previous")
    before = target.read_bytes() if target is not None else None
    try:
        write(target)
        outcome = "ok"
    except PipelineError as exc:
        outcome = str(exc)
    except Exception as exc:
        outcome = f"raw: {type(exc).__name__}: {exc}"
    report[name] = {"outcome": outcome, "kept": target is None or target.read_bytes() == before,
                    "seconds": round(time.time() - t0, 2)}
report["files"] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
print(json.dumps(report))
'''


def run_writers(tmp_path: Path, limit: int = LIMIT) -> dict:
    script, out = tmp_path / "writers.py", tmp_path / "out"
    script.write_text(WRITERS)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(out), str(limit)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_writer_reports_a_file_size_limit_in_one_line_and_keeps_the_old_file(tmp_path):
    report = run_writers(tmp_path)
    for name in ("checkpoint", "csv", "json", "png", "image_cache", "feature_bank", "index", "unpack"):
        outcome = report[name]["outcome"]
        assert outcome.startswith("cannot "), (name, outcome)  # not "raw: RuntimeError ..."
        assert "File too large" in outcome and "free some disk space" in outcome, (name, outcome)
        assert "\n" not in outcome
        assert report[name]["kept"], name  # the previous file is intact
    assert "checkpoint.old" in report["checkpoint"]["outcome"]
    leftovers = [f for f in report["files"] if f.endswith((".tmp", ".part")) or "/.unpacking-" in f]
    assert leftovers == []  # no temporary file stays behind
    assert not any(f.startswith("work/cache/images-") or f.startswith("work/cache/features-") for f in report["files"])


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                          capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces here to mount a small tmpfs")
def test_a_full_file_system_is_the_same_one_line(tmp_path):
    """The writers on a real 2 MB tmpfs (mounted in a user namespace over the test's folder), no file-size limit."""
    out = tmp_path / "small"
    out.mkdir()
    script = tmp_path / "writers.py"
    script.write_text(WRITERS.replace("resource.setrlimit(", "0 and resource.setrlimit("))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    inner = f"mount -t tmpfs -o size=2m tmpfs {out} && exec {sys.executable} {script} {out} {2 * 1024 * 1024}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", inner], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("checkpoint", "csv", "json", "image_cache", "feature_bank", "unpack"):
        outcome = report[name]["outcome"]
        assert outcome.startswith("cannot ") and "free some disk space and run again" in outcome, (name, outcome)
        assert report[name]["kept"], name


def test_a_write_failure_is_the_disks_only_when_the_disk_says_so(tmp_path, monkeypatch):
    tmp = tmp_path / "x.tmp"
    tmp.write_bytes(b"partial")
    assert write_failure(RuntimeError("a bug in the writer"), tmp) is None  # plenty of space, no limit
    chained = RuntimeError("unexpected pos 704 vs 598")
    chained.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert write_failure(chained, tmp).errno == errno.ENOSPC

    class Full:
        f_bavail = f_bfree = 0
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full)
    assert write_failure(RuntimeError("unexpected pos 704 vs 598"), tmp).errno == errno.ENOSPC
    with pytest.raises(PipelineError, match=r"cannot write .*target\.pt: No space left on device; free some disk"):
        with atomic_path(tmp_path / "target.pt"):
            raise RuntimeError("unexpected pos 704 vs 598")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="a bug"), atomic_path(tmp_path / "target.pt"):
        raise RuntimeError("a bug")  # a real bug stays a bug
    assert list(tmp_path.iterdir()) == [tmp]


def test_a_full_sqlite_store_is_the_disks_line_too(capsys):
    """An Optuna or MLflow SQLite store reports a full disk as sqlite3.OperationalError, wrapped by SQLAlchemy."""
    import sqlite3

    from pipeline.cli.common import handle_errors

    def optimize():
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full") from exc

    with pytest.raises(Exception) as stop:
        handle_errors(optimize)()
    assert stop.value.exit_code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: cannot write ") and "database or disk is full" in line, line
    assert "free some disk space" in line and "internal error" not in line
    assert disk_error(RuntimeError("unrelated")) is None


TRAIN_UNDER_LIMIT = r'''
import resource, signal, sys
sys.path.insert(0, sys.argv[3])
from conftest import make_competition, write_raw
from pipeline.cli.app import app

comp = make_competition("toy")
root = __import__("pathlib").Path(sys.argv[1])
write_raw(root / "raw", comp)
try:
    app(["reorg", "toy", str(root / "raw"), str(root / "work")])
except SystemExit:
    pass
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
app(["train", "toy", str(root / "work"), str(root / "run"), "--epochs", "1", "--device", "cpu", "--model", "resnet18"])
'''


def test_train_under_a_file_size_limit_ends_with_the_disk_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_UNDER_LIMIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(1024 * 1024), str(ROOT / "tests")],
                          capture_output=True, text=True, env=env, timeout=180)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-2000:]
    assert last.startswith("error: cannot write ") and "free some disk space" in last, last
    assert "internal error" not in done.stderr and "RuntimeError" not in done.stderr
    assert not list((tmp_path / "run").rglob("*.tmp")) if (tmp_path / "run").exists() else True
