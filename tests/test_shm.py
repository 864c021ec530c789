"""Small /dev/shm (Docker's 64 MB): DataLoader workers sized to it up front, a failure named with its fix."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import shm
from pipeline.data.items import ImageDataset, Item, build_transform
from pipeline.data.loaders import make_loader
from pipeline.errors import PipelineError
from pipeline.data.shm import SharingPlan, plan_sharing

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
BATCH = 128 * 3 * 32 * 32 * 4  # 1.5 MB: 128 float images of 32x32


@pytest.mark.parametrize("free, files, workers, expected", [
    (24 * 1024 * MB, 65536, 8, SharingPlan(8, "file_descriptor")),  # a host: everything fits
    (None, None, 4, SharingPlan(4, "file_descriptor")),  # no /dev/shm to measure (macOS): as asked
    (64 * MB, 65536, 0, SharingPlan(0, "file_descriptor")),  # no workers asked: nothing to decide
    (64 * MB, 65536, 16, 10),  # Docker's default: as many as fit (6 MB each), with the warning
    (4 * MB, 65536, 8, 0),  # not even one fits: the main process loads
    (24 * 1024 * MB, 256, 8, SharingPlan(8, "file_system")),  # few open files: named files, not descriptors
])
def test_the_sharing_decision_per_case(free, files, workers, expected):
    plan = plan_sharing(free, files, workers, BATCH, prefetch=4)
    if isinstance(expected, SharingPlan):
        assert plan == expected
        return
    assert plan.workers == expected and plan.strategy == "file_descriptor"
    assert plan.warning.startswith(f"/dev/shm has {free // MB} MB free, too little for {workers} DataLoader worker(s)")
    assert f"using {expected};" in plan.warning and "docker run --shm-size" in plan.warning


def test_loaders_get_the_workers_that_fit_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shm, "shm_free", lambda path=shm.SHM_PATH: 8 * MB)  # a tiny /dev/shm
    monkeypatch.setattr(shm, "_WARNED", set())
    items = [Item(str(i), tmp_path / f"{i}.png", 0) for i in range(4)]
    dataset = ImageDataset(items, build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False), 32)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        loaders = [make_loader(dataset, 128, False, 4, 0) for _ in range(3)]
    assert [dl.num_workers for dl in loaders] == [1, 1, 1]  # 8 MB holds one worker's 4 batches of 1.5 MB
    warnings = [r.getMessage() for r in caplog.records if "/dev/shm" in r.getMessage()]
    assert len(warnings) == 1 and "using 1;" in warnings[0] and "--shm-size" in warnings[0]


REAL_FAILURE = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                "  File \"worker.py\", line 375, in _worker_loop\nRuntimeError: unable to allocate shared memory(shm) "
                "for file </torch_18605_4123444081_0>: No space left on device (28)\n")


def test_a_worker_out_of_shared_memory_is_one_line_with_the_fix():
    with pytest.raises(PipelineError) as caught, shm.guard("; then the same command with --resume"):
        raise RuntimeError(REAL_FAILURE)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("DataLoader workers ran out of shared memory (/dev/shm: ")
    assert "docker run --shm-size" in line and "--num-workers 0" in line and line.endswith("with --resume")
    killed = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that "
                          "dataloader's workers are out of shared memory.")
    assert shm.is_shm_failure(killed)
    with pytest.raises(RuntimeError, match="a bug"), shm.guard():
        raise RuntimeError("a bug in a worker")  # anything else stays what it is


TRAIN_IN_SMALL_SHM = r'''
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from conftest import make_competition, write_raw
from pipeline.data import shm
from pipeline.cli.app import app

root = Path(sys.argv[1])
comp = make_competition("toy")
write_raw(root / "raw", comp, size=64)


def run(*args):
    try:
        app([str(a) for a in args])
    except SystemExit as exc:
        print(f"EXIT {exc.code}", file=sys.stderr, flush=True)


run("reorg", "toy", root / "raw", root / "work")
args = ("toy", root / "work", "--epochs", "1", "--device", "cpu", "--cache", "off", "--num-workers", "2",
        "--batch-size", "8", "--image-size", "64")
run("train", args[0], args[1], root / "sized", *args[2:])  # the plan: workers that fit, one warning
shm.shm_free = lambda path=shm.SHM_PATH: 10 * 2**30  # a probe that is wrong: the workers fail for real
run("train", args[0], args[1], root / "failed", *args[2:])
'''


def _can_mount_tmpfs() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces here to mount a small /dev/shm")
def test_train_in_a_real_small_shm_uses_fewer_workers_and_names_a_failure(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_IN_SMALL_SHM)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    inner = f"mount -t tmpfs -o size=256k tmpfs /dev/shm && exec {sys.executable} {script} {tmp_path} {ROOT / 'tests'}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", inner], capture_output=True, text=True, env=env, timeout=300)
    exits = [line for line in done.stderr.splitlines() if line.startswith("EXIT")]
    assert exits == ["EXIT 0", "EXIT 0", "EXIT 1"], done.stderr[-3000:]
    assert "/dev/shm has 0 MB free, too little for 2 DataLoader worker(s)" in done.stderr
    assert (tmp_path / "sized" / "done.json").is_file()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[-1].startswith("error: DataLoader workers ran out of shared memory"), done.stderr[-3000:]
    assert "--shm-size" in errors[-1] and "Traceback" not in done.stderr
