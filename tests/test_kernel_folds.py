"""Kernels per fold (issue 24.2): one training kernel per fold, their outputs gathered into one run.

The fast tests build fold kernels and gather fold outputs written through the
run layout (config.json as a `--fold K` process writes it, members with their
plan's digest of the validation images). The slow one runs the chain for real:
two fold kernels' scripts run as Kaggle would run them (the wheel installed
offline from the dataset), their outputs gathered here, and the CV and the
submission compared with the same folds trained in one RUN_DIR.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.config import resolve_config
from pipeline.data.items import fold_split, load_reorg, training_fingerprint
from pipeline.errors import PipelineError
from pipeline.kernel import build as kernel
from pipeline.kernel.gather import gather
from pipeline.runs import Run
from pipeline.train.parallel import write_run_config
from pipeline.train.plan import ids_digest
from tests.conftest import make_competition, write_raw
from tests.test_kernel import load_script, make_spec
from tests.test_parallel import SPEC, comparable

runner = CliRunner()


def ok(*args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture
def no_secrets(monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- building fold kernels


@pytest.mark.parametrize("folds", [("--folds", "3"), ("--folds=3",)])
def test_a_fold_kernel_reorganises_every_fold_and_trains_only_its_own(monkeypatch, tmp_path, folds):
    spec = make_spec(train=True, fold=1, train_args=("--epochs", "2", *folds, "--lr", "0.1"))
    ns = load_script(kernel.kernel_script(spec), monkeypatch, tmp_path / "input", tmp_path / "working")
    assert ns["REORG_ARGS"] == ["--folds", "3"] and ns["FOLD"] == 1
    assert ns["TRAIN_ARGS"] == ["--epochs", "2", "--fold", "1", "--lr", "0.1"]
    plain = load_script(kernel.kernel_script(make_spec(train=True, train_args=folds)), monkeypatch,
                        tmp_path / "input", tmp_path / "working")
    assert plain["FOLD"] is None and plain["TRAIN_ARGS"] == list(folds)  # a whole-run kernel is unchanged


@pytest.mark.parametrize("changes, problem", [
    ({"train": True, "train_args": ("--epochs", "2")}, "needs the run's fold count in --train-args"),
    ({"train": True, "train_args": ("--folds", "1")}, "needs the run's fold count"),
    ({"train": True, "train_args": ("--folds", "3", "--fold", "0")}, "leave --fold/--full out of --train-args"),
    ({"train": True, "train_args": ("--folds", "3", "--full")}, "leave --fold/--full out"),
    ({"train": True, "train_args": ("--folds", "3"), "fold": 3}, "--fold 3 is not a fold of --folds 3: give 0 to 2"),
    ({"train": False}, "--fold K needs --train"),
])
def test_a_fold_kernel_is_refused_unless_it_names_one_fold_of_the_runs_folds(changes, problem):
    with pytest.raises(PipelineError) as error:
        make_spec(**{"fold": 0, **changes})
    assert problem in str(error.value)


def test_build_writes_one_kernel_per_fold_with_its_own_id(tmp_path, no_secrets):
    ids = []
    for k in (0, 1):
        out = ok("kernel", "build", "digits", "--out", tmp_path / f"kern{k}", "--user", "me", "--train", "--fold", k,
                 "--train-args", "--folds 2 --epochs 1")
        meta = json.loads((tmp_path / f"kern{k}" / "kernel-metadata.json").read_text())
        ids.append(meta["id"])
        assert meta["title"] == f"digits pipeline fold {k}" and kernel.validate_kernel_metadata(meta) == []
        assert f"pipeline kernel gather digits WORK_DIR RUN_DIR --kernel me/digits-pipeline-fold-{k}" in out
        assert f"TRAIN_ARGS = ['--fold', '{k}', '--epochs', '1']" in (tmp_path / f"kern{k}" / "kernel.py").read_text()
    assert ids == ["me/digits-pipeline-fold-0", "me/digits-pipeline-fold-1"]


# ---------------------------------------------------------------- gathering, the checks


def fold_output(root: Path, comp, work: Path, folds: list[int], *, lr: float = 0.3, valid_of: int | None = None,
                finished: bool = True) -> Path:
    """A fold kernel's output folder: run/config.json as a `--fold K` process writes it, and each fold's
    member (its config with the plan's digest of fold ``valid_of``'s images, else its own; placeholder
    weights; done.json when ``finished``)."""
    info = load_reorg(work, comp.slug)
    data = {"classes": info["classes"], "competition": comp.slug, "fingerprint": training_fingerprint(work, info)}
    run = Run(root / "run")
    for k in folds:
        resolved = resolve_config(comp, work, run.dir, None, {"fold": k, "lr": lr, "epochs": 1})
        write_run_config(resolved, data)
        member = run.member(f"fold{k}")
        member.dir.mkdir(parents=True)
        _, valid = fold_split(work, info, k if valid_of is None else valid_of)
        member.write_config(resolved.config.to_json(), {}, {"valid_ids": ids_digest(valid), "n_valid": len(valid)})
        member.best_path.write_bytes(f"weights of fold {k}".encode())
        member.metrics_path.write_text("epoch,seconds\n1,0.5\n")
        if finished:
            member.mark_done({"epochs": 1})
    return root


@pytest.fixture
def toy_folds(toy, tmp_path):
    """(competition, work folder): the toy download in 3 folds."""
    from pipeline.download.reorg import reorg

    comp, raw = toy
    reorg(comp, raw, tmp_path / "work", folds=3, seed=0)
    return comp, tmp_path / "work"


def test_gathered_folds_make_a_run_here_that_names_the_folds_still_missing(toy_folds, tmp_path):
    comp, work = toy_folds
    first = fold_output(tmp_path / "out0", comp, work, [0])
    second = fold_output(tmp_path / "out1" / "nested", comp, work, [1])  # found below the folder given
    run = Run(tmp_path / "gathered")
    done = gather(comp, comp.slug, work, run.dir, [first, tmp_path / "out1"], device="cpu")
    assert (done.members, done.missing, done.cv) == (["fold0", "fold1"], ["fold2"], None)
    for k, out in ((0, first), (1, second)):
        for name in ("best.pt", "config.json", "done.json", "metrics.csv"):
            assert (run.dir / f"fold{k}" / name).read_bytes() == (out / "run" / f"fold{k}" / name).read_bytes()
    doc = json.loads(run.config_path.read_text())
    cfg = doc["config"]
    assert (cfg["work_dir"], cfg["run_dir"], cfg["competition"]) == (str(work), str(run.dir), comp.slug)
    assert (cfg["fold"], cfg["folds"], cfg["device"], cfg["lr"]) == (None, 3, "cpu", 0.3)
    assert doc["gathered"] == {"fold0": str(first), "fold1": str(tmp_path / "out1")}
    assert json.loads(run.done_path.read_text()) == {"members": ["fold0", "fold1"], "missing": ["fold2"]}
    assert not run.cv_path.exists() and not list(run.dir.rglob(".lock")) and not list(run.dir.rglob("*.tmp"))
    # the same fold again: refused unless --force, which replaces it
    third = fold_output(tmp_path / "out2", comp, work, [2])
    with pytest.raises(PipelineError, match="fold0 already holds a trained fold; pass --force"):
        gather(comp, comp.slug, work, run.dir, [third, first])
    assert not run.member("fold2").dir.exists()  # refused before anything was copied
    (first / "run" / "fold0" / "best.pt").write_bytes(b"retrained")
    gather(comp, comp.slug, work, run.dir, [first], force=True)
    assert (run.dir / "fold0" / "best.pt").read_bytes() == b"retrained"
    assert json.loads(run.config_path.read_text())["gathered"] == doc["gathered"]  # fold1's origin kept
    assert run.member("fold1").is_finished


@pytest.mark.parametrize("bad, problem", [
    ({"lr": 0.1}, "was trained with lr=0.1, the other folds with 0.3: the folds of one run share their settings"),
    ({"valid_of": 2}, "validated on other images than fold 1 of"),
    ({"finished": False}, "fold1 did not finish"),
])
def test_a_fold_that_would_not_belong_to_the_run_is_refused_and_nothing_is_copied(toy_folds, tmp_path, bad, problem):
    comp, work = toy_folds
    good = fold_output(tmp_path / "out0", comp, work, [0])
    odd = fold_output(tmp_path / "out1", comp, work, [1], **bad)
    with pytest.raises(PipelineError) as error:
        gather(comp, comp.slug, work, tmp_path / "gathered", [good, odd])
    assert problem in str(error.value)
    assert not (tmp_path / "gathered").exists()


def test_the_same_fold_twice_or_another_download_is_refused(toy_folds, tmp_path):
    comp, work = toy_folds
    a, b = (fold_output(tmp_path / name, comp, work, [0]) for name in ("a", "b"))
    with pytest.raises(PipelineError, match=f"fold0 is in both {a} and {b}; give each fold once"):
        gather(comp, comp.slug, work, tmp_path / "gathered", [a, b])
    config = a / "run" / "config.json"
    doc = json.loads(config.read_text())
    config.write_text(json.dumps({**doc, "data": {**doc["data"], "fingerprint": "0" * 16}}))
    with pytest.raises(PipelineError, match="was trained on other training data than"):
        gather(comp, comp.slug, work, tmp_path / "gathered", [a])
    with pytest.raises(PipelineError, match="holds no run with a fold"):
        gather(comp, comp.slug, work, tmp_path / "gathered", [tmp_path / "work"])


# ---------------------------------------------------------------- the chain, for real

TRAIN_ARGS = "--folds 2 --epochs 1 --steps-per-epoch 2 --batch-size 8 --device cpu --num-workers 0"


def start_kernel(kernel_dir: Path, input_dir: Path, working: Path) -> subprocess.Popen:
    """The kernel script as Kaggle runs it, offline: pip has no index and installs into a target folder."""
    env = {**os.environ, "KAGGLE_INPUT": str(input_dir), "KAGGLE_WORKING": str(working), "PIP_NO_INDEX": "1",
           "PIPELINE_KERNEL_PIP_TARGET": str(working / ".pip"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # any download fails
    return subprocess.Popen([sys.executable, str(kernel_dir / "kernel.py")], env=env, cwd=kernel_dir, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


# Slow: a wheel build, two kernels (each installs the wheel and imports torch three times: probe, reorg, train)
# and the same folds trained here; 62 s at load 3 on two cores, most of it the kernels' process starts.
@pytest.mark.slow
def test_fold_kernels_gathered_give_the_cv_and_submission_of_the_folds_trained_here(tmp_path, no_secrets,
                                                                                     monkeypatch):
    raw = write_raw(tmp_path / "raw", make_competition("toy"))
    spec = tmp_path / "toy.toml"
    spec.write_text(SPEC)
    for k in (0, 1):
        ok("kernel", "build", spec, "--out", tmp_path / f"kern{k}", "--user", "me", "--train", "--fold", k,
           "--train-args", TRAIN_ARGS)
    ok("kernel", "dataset", "--out", tmp_path / "ds", "--user", "me", "--spec", spec)
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "toyspec").symlink_to(raw)
    (inputs / "kaggle-pipeline").symlink_to(tmp_path / "ds")
    kernels = [start_kernel(tmp_path / f"kern{k}", inputs, tmp_path / f"working{k}") for k in (0, 1)]
    # meanwhile, here: the same download reorganised and both folds trained in one RUN_DIR (in this process)
    work, local, gathered = tmp_path / "work", tmp_path / "local", tmp_path / "gathered"
    ok("reorg", spec, raw, work, "--folds", "2")
    ok("train", spec, work, local, *TRAIN_ARGS.split())
    for k, proc in enumerate(kernels):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert f"pipeline ready: {tmp_path / f'working{k}' / '.pip' / 'pipeline'}" in out  # the dataset's wheel
        assert f"train {spec.name}" not in out and f"--fold {k} --epochs 1" in out  # the dataset's spec, fold k only
        assert not (tmp_path / f"working{k}" / "work").exists()  # the output: the run's fold, no data links
        assert sorted(p.name for p in (tmp_path / f"working{k}" / "run").iterdir() if p.is_dir()) == [f"fold{k}"]

    # fold 0 as a downloaded folder, fold 1 through the kaggle client (its download replaced by a copy)
    calls = []

    def kernels_output(args):
        calls.append(args)
        shutil.copytree(tmp_path / "working1", Path(args[args.index("-p") + 1]), dirs_exist_ok=True)
        return ""
    monkeypatch.setattr("pipeline.kernel.gather.run_kaggle", kernels_output)
    monkeypatch.setattr("pipeline.kernel.gather.credentials_present", lambda: True)
    out = ok("kernel", "gather", spec, work, gathered, tmp_path / "working0", "--kernel", "me/toyspec-pipeline-fold-1",
             "--device", "cpu")
    assert calls and calls[0][:3] == ["kernels", "output", "me/toyspec-pipeline-fold-1"]
    assert f"{gathered}: gathered fold0, fold1" in out and "CV accuracy" in out
    assert not list(tmp_path.glob(".gather-*"))  # the download folder is gone

    want, got = Run(local).read_cv(), Run(gathered).read_cv()
    assert comparable(got) == comparable(want) and set(got["weights"]) == {"fold0", "fold1"}
    assert f"CV accuracy {got['cv']:.4f}" in ok("cv", gathered)  # the gathered run's config works here
    ok("predict", spec, work, local, tmp_path / "local.csv")
    ok("predict", spec, work, gathered, tmp_path / "gathered.csv")

    assert len(pd.read_csv(tmp_path / "local.csv", dtype=str)) == 10  # the toy's test images
    assert (tmp_path / "gathered.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
