"""The CLI through Typer's CliRunner: the chain, and one-line errors with exit 1."""
from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_competitions_lists_the_three_builtins():
    result = invoke("competitions")
    assert result.exit_code == 0
    for slug, metric in (("cifar-10", "accuracy"), ("dog-breed-identification", "log_loss"), ("digits", "accuracy")):
        assert any(line.startswith(slug) and metric in line for line in result.stdout.splitlines())


def test_unknown_competition_is_one_line_and_exit_1(tmp_path):
    result = invoke("reorg", "cifar-100", tmp_path, tmp_path / "w")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown competition 'cifar-100'; known: cifar-10, digits, dog-breed-identification"
    ]


def test_the_whole_chain(toy_probs, tmp_path):
    comp, raw = toy_probs
    work, run, sub = tmp_path / "work", tmp_path / "run", tmp_path / "sub.csv"
    assert invoke("reorg", comp.slug, raw, work, "--folds", "3").exit_code == 0
    result = invoke("train", comp.slug, work, run, "--epochs", "3", "--batch-size", "8", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "kept epoch" in result.stdout and "log_loss" in result.stdout
    result = invoke("predict", comp.slug, work, run, sub, "--tta", "flip")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(sub, dtype={"id": str})
    assert list(frame.columns) == ["id", "cat", "dog", "frog"] and len(frame) == 10
    assert (frame[["cat", "dog", "frog"]].sum(axis=1) - 1).abs().max() < 1e-6
    assert invoke("check", comp.slug, sub, "--work-dir", work).exit_code == 0
    again = invoke("predict", comp.slug, work, run, sub)
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr


def test_check_reports_every_problem(toy, tmp_path):
    comp, raw = toy
    sample = pd.read_csv(raw / comp.sample_submission, dtype=str)
    bad = sample.iloc[1:].assign(label="unicorn")
    bad.to_csv(tmp_path / "bad.csv", index=False)
    invoke("reorg", comp.slug, raw, tmp_path / "work")
    result = invoke("check", comp.slug, tmp_path / "bad.csv", "--work-dir", tmp_path / "work")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert any("id 't000' of the sample submission is missing" in line for line in lines)
    assert any("'unicorn' is not a class name" in line for line in lines)


@pytest.mark.parametrize("args, message", [
    (("train", "toy", "{tmp}/nowork", "{tmp}/run"), "reorg.json not found"),
    (("predict", "toy", "{tmp}/nowork", "{tmp}/run", "{tmp}/s.csv"), "reorg.json not found"),
    (("train", "toy", "{tmp}/nowork", "{tmp}/run", "--optimizer", "lion"), "--optimizer 'lion' is not one of: sgd, adam, adamw"),
])
def test_usage_errors_are_one_line(toy, tmp_path, args, message):
    result = invoke(*(a.format(tmp=tmp_path) for a in args))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_submissions_are_indexed_and_never_rewritten(toy, tmp_path):
    comp, raw = toy
    work, run, subs = tmp_path / "work", tmp_path / "run", tmp_path / "submissions"
    invoke("reorg", comp.slug, raw, work)
    assert invoke("train", comp.slug, work, run, "--epochs", "2", "--batch-size", "8", "--device", "cpu").exit_code == 0
    assert invoke("predict", comp.slug, work, run, subs / "a.csv").exit_code == 0
    first = (subs / "index.csv").read_bytes()
    assert invoke("predict", comp.slug, work, run, subs / "b.csv", "--tta", "flip").exit_code == 0
    assert (subs / "index.csv").read_bytes().startswith(first)
    index = pd.read_csv(subs / "index.csv")
    assert index["file"].tolist() == ["a.csv", "b.csv"] and index["tta"].tolist() == ["none", "flip"]
    assert (index["model"] == "fastnet_s").all() and index["cv_score"].between(0, 1).all()
