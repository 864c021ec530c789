"""Kernels of a spec-file competition: the spec travels in the dataset and every kernel command names it."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.kernel import build as kernel
from pipeline.kernel.dataset import SPEC_FILE, run_spec
from tests.test_init import invoke, write_binary, write_c
from tests.test_kernel import fake_run, fake_wheel, load_script, make_spec, no_secrets  # noqa: F401  (fixtures)


def spec_of(tmp_path: Path, writer=write_binary, slug: str = "my-binary") -> tuple[Path, Path]:
    raw, spec = tmp_path / "raw", tmp_path / "specs" / "comp.toml"
    writer(raw)
    spec.parent.mkdir()
    result = invoke("init", raw, "--out", spec, "--slug", slug)
    assert result.exit_code == 0, result.output
    return raw, spec


def test_build_names_the_carried_spec_and_says_to_carry_it(tmp_path, no_secrets):
    _, spec = spec_of(tmp_path, write_c, "my-folders")  # layout folders: no labels file to find the data by
    result = invoke("kernel", "build", spec, "--out", tmp_path / "kern", "--user", "me", "--train")
    assert result.exit_code == 0, result.output
    assert f"--spec {spec}" in result.stdout
    meta = json.loads((tmp_path / "kern" / "kernel-metadata.json").read_text())
    assert meta["competition_sources"] == ["my-folders"] and kernel.validate_kernel_metadata(meta) == []
    script = (tmp_path / "kern" / "kernel.py").read_text()
    assert f"SPEC_FILE = {SPEC_FILE!r}" in script and "COMPETITION = 'my-folders'" in script
    assert "DATA_MARKER = 'sample_submission.csv'" in script


def test_dataset_carries_the_spec_given_or_the_one_the_run_was_trained_on(tmp_path, fake_wheel, no_secrets):
    _, spec = spec_of(tmp_path)
    result = invoke("kernel", "dataset", "--out", tmp_path / "ds", "--user", "me", "--spec", spec)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ds" / SPEC_FILE).read_bytes() == spec.read_bytes()
    run = fake_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"config": {"competition": str(spec.resolve())}}))
    assert run_spec(run) == spec.resolve()
    result = invoke("kernel", "dataset", "--out", tmp_path / "ds2", "--user", "me", "--run", run)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ds2" / SPEC_FILE).read_bytes() == spec.read_bytes()
    assert run_spec(fake_run(tmp_path / "slug-run")) is None  # a registered competition's run carries no spec
    broken = tmp_path / "broken.toml"
    broken.write_text('slug = "x"\n')
    refused = invoke("kernel", "dataset", "--out", tmp_path / "ds3", "--user", "me", "--spec", broken)
    assert refused.exit_code == 1 and "missing field(s)" in refused.stderr and not (tmp_path / "ds3").exists()


def test_the_kernel_script_names_the_datasets_spec_in_every_command(monkeypatch, tmp_path):
    text = kernel.kernel_script(make_spec(competition="my-binary", labels_file="labels.csv", train=True,
                                          spec_file=SPEC_FILE))
    inputs, working = tmp_path / "input", tmp_path / "working"
    ns = load_script(text, monkeypatch, inputs, working)
    dataset, data = inputs / "kaggle-pipeline", inputs / "my-binary"
    for folder, name in ((dataset, "kaggle_pipeline-0.1.0-py3-none-any.whl"), (dataset, SPEC_FILE),
                         (data, "labels.csv")):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    calls = []
    monkeypatch.setattr(ns["subprocess"], "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 0, "/x/pipeline/__init__.py", ""))
    ns["main"]()
    stages = [cmd[3:] for cmd in calls if cmd[1:3] == ["-m", "pipeline"]]
    assert [s[0] for s in stages] == ["reorg", "train", "predict", "check"]
    assert all(s[1] == str(dataset / SPEC_FILE) for s in stages)
    (dataset / SPEC_FILE).unlink()
    with pytest.raises(SystemExit) as stopped:  # a dataset without the spec stops the kernel, naming it
        ns["main"]()
    assert stopped.value.code == 1
