"""Real processes killed with SIGKILL, and two reorgs racing for one WORK_DIR.

Each case runs `python -m pipeline ...` (or the same CLI behind a small wrapper
that stops at one exact point so the kill lands there), kills it, runs the
same command again and compares the result with a clean run's: the tree of
WORK_DIR hashed file by file, the submission row by row. The data is the
digits demo (1,497 labelled and 300 test images), written in-process once.
Training killed mid-epoch and resumed is covered in test_faults.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from competitions.digits import write_digits
from pipeline.workdir import LOCK_FILE
from tests.conftest import tree_hash

pytestmark = pytest.mark.slow

PY = sys.executable

# Runs the CLI, but first makes one call stop (writing PAUSE_MARKER) until
# PAUSE_RELEASE exists: PAUSE_AT is place:N (the Nth link of a reorg tree),
# replace:NAME (the first rename onto a file or folder called NAME) or
# open:N (the Nth image opened by PIL).
PAUSER = r'''
import os, sys, threading, time
from pathlib import Path

kind, _, arg = os.environ["PAUSE_AT"].partition(":")
marker, release = Path(os.environ["PAUSE_MARKER"]), Path(os.environ["PAUSE_RELEASE"])
calls, lock = [0], threading.Lock()


def reached(hit):
    with lock:
        calls[0] += 1
        first = hit(calls[0]) and not marker.exists()
        if first:
            marker.write_text(str(os.getpid()))
    if first:
        deadline = time.time() + 60
        while not release.exists() and time.time() < deadline:
            time.sleep(0.01)


def wrap(owner, name, hit):
    real = getattr(owner, name)

    def stand_in(*args, **kwargs):
        reached(lambda n: hit(n, args))
        return real(*args, **kwargs)

    setattr(owner, name, stand_in)


if kind == "place":
    import pipeline.download.reorg
    wrap(pipeline.download.reorg, "_place", lambda n, args: n == int(arg))
elif kind == "replace":
    wrap(os, "replace", lambda n, args: Path(args[1]).name == arg)
elif kind == "open":
    import PIL.Image
    wrap(PIL.Image, "open", lambda n, args: n == int(arg))

from pipeline.cli.app import run

sys.argv = ["pipeline", *sys.argv[1:]]
run()
'''


def pipeline(*args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([PY, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr
    return done


class Paused:
    """A CLI process stopped at PAUSE_AT; ``kill()`` it there or ``release()`` it."""

    def __init__(self, tmp: Path, pause_at: str, *args):
        script = tmp / "pauser.py"
        script.write_text(PAUSER)
        self.marker, self.release_file = tmp / f"paused-{time.monotonic_ns()}", tmp / f"go-{time.monotonic_ns()}"
        env = {**os.environ, "PAUSE_AT": pause_at, "PAUSE_MARKER": str(self.marker),
               "PAUSE_RELEASE": str(self.release_file)}
        self.proc = start([PY, str(script), *map(str, args)], env=env)
        wait_until(self.marker.exists, self.proc)

    def kill(self) -> None:
        kill(self.proc)

    def release(self) -> subprocess.CompletedProcess:
        self.release_file.touch()
        out, err = self.proc.communicate(timeout=300)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    # Its own session: cleanup can reach any worker it forked, and nothing else.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process and anything it forked (DataLoader workers hold its pipes), then reap it."""
    assert proc.poll() is None, "the process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group is the process and its workers
    except ProcessLookupError:
        pass
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def wait_until(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended first (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def work_hash(work: Path) -> str:
    """tree_hash of WORK_DIR without its lock file (which holds the last holder's pid)."""
    (work / LOCK_FILE).unlink(missing_ok=True)
    return tree_hash(work)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("digits") / "raw"
    write_digits(raw)
    return raw


@pytest.fixture(scope="module")
def clean(digits, tmp_path_factory):
    """clean(*options): the hash of a WORK_DIR that one uninterrupted reorg built."""
    from pipeline.competition import get_competition
    from pipeline.download.reorg import reorg

    root, hashes = tmp_path_factory.mktemp("clean"), {}

    def build(*options: str) -> str:
        if options not in hashes:
            work = root / f"work{len(hashes)}"
            seed = int(options[options.index("--seed") + 1]) if "--seed" in options else 0
            reorg(get_competition("digits"), digits, work, seed=seed)
            hashes[options] = work_hash(work)
        return hashes[options]

    return build


# ---------------------------------------------------------------- reorg


def test_sigkill_mid_reorg_then_the_same_command_builds_the_clean_tree(digits, clean, tmp_path):
    work = tmp_path / "work"
    proc = start([PY, "-m", "pipeline", "reorg", "digits", str(digits), str(work)])
    first_class = work / ".staging" / "train_valid" / "0"

    def linking() -> bool:
        try:
            return any(os.scandir(first_class))
        except OSError:  # not made yet
            return False

    wait_until(linking, proc)
    kill(proc)
    assert not (work / "reorg.json").exists()
    assert "written" in pipeline("reorg", "digits", digits, work).stdout
    assert work_hash(work) == clean()


@pytest.mark.parametrize("pause_at, before, options", [
    ("place:1500", None, ()),  # half the links made
    ("replace:valid", (), ("--seed", "1")),  # a rebuild: new train/ in place, old valid/ not yet moved
    ("replace:reorg.json", None, ()),  # tree complete, the marker still a temporary file
], ids=["mid-links", "mid-swap-of-a-rebuild", "writing-reorg.json"])
def test_sigkill_at_each_step_of_reorg(digits, clean, tmp_path, pause_at, before, options):
    work = tmp_path / "work"
    if before is not None:
        pipeline("reorg", "digits", digits, work, *before)
    Paused(tmp_path, pause_at, "reorg", "digits", digits, work, *options).kill()
    assert not (work / "reorg.json").exists()  # the half-done tree never claims to be complete
    if pause_at == "replace:reorg.json":
        assert list(work.glob(".reorg.json.*.tmp"))
    rerun = pipeline("reorg", "digits", digits, work, *options)
    assert "written" in rerun.stdout
    assert work_hash(work) == clean(*options)  # no .staging, .trash or temporary file either


def test_a_second_reorg_while_one_runs_fails_clearly(digits, clean, tmp_path):
    work = tmp_path / "work"
    first = Paused(tmp_path, "place:100", "reorg", "digits", digits, work)
    second = pipeline("reorg", "digits", digits, work, check=False)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        f"error: WORK_DIR {work} is busy: pid {first.proc.pid} holds {work}/{LOCK_FILE}; wait for it to finish"]
    assert first.release().returncode == 0
    assert work_hash(work) == clean()


def test_two_reorgs_started_together_never_mix(digits, clean, tmp_path):
    work = tmp_path / "work"
    procs = [start([PY, "-m", "pipeline", "reorg", "digits", str(digits), str(work)]) for _ in range(2)]
    results = [(p.communicate(timeout=300)[1], p.returncode) for p in procs]
    codes = sorted(code for _, code in results)
    assert codes in ([0, 0], [0, 1]), results
    if codes == [0, 1]:  # they overlapped: the loser says why, in one line
        (err,) = [err for err, code in results if code == 1]
        assert err.startswith(f"error: WORK_DIR {work} is busy: pid ") and err.count("\n") == 1
    assert work_hash(work) == clean()


# ---------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def digits_run(digits, tmp_path_factory):
    """(work, run): a reorganised digits download and a model trained a few steps."""
    root = tmp_path_factory.mktemp("digits-run")
    pipeline("reorg", "digits", digits, root / "work", "--folds", "0")
    pipeline("train", "digits", root / "work", root / "run", "--epochs", "1", "--steps-per-epoch", "3",
             "--device", "cpu")
    return root / "work", root / "run"


def temps_of(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{path.name}.*.tmp"))


def test_sigkill_mid_predict_leaves_no_submission(digits_run, tmp_path):
    work, run = digits_run
    sub = tmp_path / "subs" / "digits.csv"
    Paused(tmp_path, "open:150", "predict", "digits", work, run, sub).kill()  # half the test set decoded
    assert not sub.exists() and not temps_of(sub)
    pipeline("predict", "digits", work, run, sub)
    assert len(pd.read_csv(sub)) == 300


def test_sigkill_while_writing_the_submission_leaves_only_a_temp_that_the_next_write_removes(digits_run, tmp_path):
    work, run = digits_run
    sub = tmp_path / "subs" / "digits.csv"
    sub.parent.mkdir()
    sub.write_text("id,label\n1,7\n")  # an earlier submission
    old = sub.read_bytes()
    Paused(tmp_path, "replace:digits.csv", "predict", "digits", work, run, sub, "--force", "--tta", "flip").kill()
    assert sub.read_bytes() == old  # the earlier submission is untouched
    (stale,) = temps_of(sub)  # the complete new file, never renamed into place
    pipeline("predict", "digits", work, run, sub, "--force", "--tta", "flip")
    assert not stale.exists() and not temps_of(sub)
    frame = pd.read_csv(sub, dtype=str)
    assert len(frame) == 300 and frame["id"].tolist() == [str(i) for i in range(1, 301)]


# ---------------------------------------------------------------- --debug


def test_debug_flag_shows_the_traceback(tmp_path):
    args = ["reorg", "digits", tmp_path / "no-download", tmp_path / "work"]
    plain = pipeline(*args, check=False)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.splitlines() == [
        f"error: RAW_DIR {tmp_path}/no-download is not a folder; unzip the Kaggle download there first"]
    debug = pipeline("--debug", *args, check=False)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.rstrip().endswith(f"PipelineError: RAW_DIR {tmp_path}/no-download is not a folder; "
                                          "unzip the Kaggle download there first")
