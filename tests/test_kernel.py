"""Offline kernels: metadata and script builders, the dataset folder, the refusals, push, a local dry run."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipeline.kernel import build as kernel

from pipeline.kernel import dataset as kernel_dataset
from pipeline.cli.app import app
from pipeline.competition import list_competitions
from pipeline.errors import PipelineError
from pipeline.kernel.build import KernelSpec
from tests.conftest import SHARED, requires_shared, tree_hash

runner = CliRunner()
DOG = "dog-breed-identification"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.mlillustrated_in1k.safetensors"
KEY = "0123456789abcdef0123456789abcdef"


def make_spec(**changes) -> KernelSpec:
    fields = {"competition": DOG, "labels_file": "labels.csv", "user": "me", "dataset": "me/kaggle-pipeline",
              "title": "Dogs offline"}
    return KernelSpec(**{**fields, **changes})


def fake_run(root: Path, members: tuple[str, ...] = ("holdout",)) -> Path:
    """A run's file layout with placeholder contents (predict is not called)."""
    for member in members:
        (root / member).mkdir(parents=True, exist_ok=True)
        for name in ("best.pt", "last.pt", "config.json", "done.json", "metrics.csv"):
            (root / member / name).write_text(f"{member}/{name}")
    (root / "config.json").write_text("{}")
    return root


@pytest.fixture
def fake_wheel(monkeypatch):
    """build_pipeline_wheel writes a small stand-in wheel instead of running pip."""
    def build(dest: Path) -> Path:
        path = Path(dest) / "kaggle_pipeline-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("pipeline/__init__.py", "")
        return path
    monkeypatch.setattr(kernel_dataset, "build_pipeline_wheel", build)


@pytest.fixture
def no_secrets(monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- kernel metadata


def test_kernel_metadata_has_every_field_the_issue_asks_for():
    meta = kernel.kernel_metadata(make_spec(gpu=True))
    assert meta == {
        "id": "me/dogs-offline", "title": "Dogs offline", "code_file": "kernel.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True, "enable_internet": False,
        "dataset_sources": ["me/kaggle-pipeline"], "competition_sources": [DOG],
    }
    assert kernel.validate_kernel_metadata(meta) == []


@pytest.mark.parametrize("title, slug", [("Dogs offline", "dogs-offline"), ("cifar-10 pipeline", "cifar-10-pipeline"),
                                         ("  My  Kernel!! v2 ", "my-kernel-v2")])
def test_slugify_follows_kaggles_title_to_slug_rule(title, slug):
    assert kernel.slugify(title) == slug


def test_validate_kernel_metadata_accepts_the_documented_example_shape():
    meta = {"id": "someone/my-awesome-kernel", "id_no": 12345, "title": "My Awesome Kernel",
            "code_file": "my-awesome-kernel.ipynb", "language": "python", "kernel_type": "notebook",
            "is_private": "false", "enable_gpu": "false", "enable_internet": "false",
            "dataset_sources": ["someone/my-awesome-dataset"], "competition_sources": [], "kernel_sources": [],
            "model_sources": []}
    assert kernel.validate_kernel_metadata(meta) == []


@pytest.mark.parametrize("change, problem", [
    ({"title": "Dogs"}, "5 to 50 characters"),
    ({"title": "D" * 51, "id": "me/" + "d" * 51}, "5 to 50 characters"),
    ({"id": "me/something-else"}, "does not match the title"),
    ({"id": "dogs-offline"}, "is not 'owner/slug'"),
    ({"id": "me/Dogs-Offline"}, "is not 'owner/slug'"),
    ({"language": "julia"}, "language 'julia' is not one of: python, r, rmarkdown"),
    ({"kernel_type": "app"}, "kernel_type 'app' is not one of: script, notebook"),
    ({"is_private": "yes"}, "is_private must be true or false"),
    ({"dataset_sources": ["kaggle-pipeline"]}, "dataset_sources 'kaggle-pipeline' is not 'owner/slug'"),
    ({"competition_sources": ["me/dogs"]}, "is not a competition slug"),
    ({"code_file": ""}, "code_file"),
    ({"enable_tpu": True}, "unknown field 'enable_tpu'"),
])
def test_validate_kernel_metadata_names_each_problem(change, problem):
    meta = {**kernel.kernel_metadata(make_spec()), **change}
    problems = kernel.validate_kernel_metadata(meta)
    assert any(problem in p for p in problems), problems


def test_validate_kernel_metadata_wants_an_id():
    meta = kernel.kernel_metadata(make_spec())
    del meta["id"]
    assert kernel.validate_kernel_metadata(meta) == ["id (owner/kernel-slug) is missing"]


def test_dataset_metadata_is_valid_and_its_validation_names_problems():
    meta = kernel_dataset.dataset_metadata("me/kaggle-pipeline", "kaggle-pipeline", "wheel and run")
    assert kernel_dataset.validate_dataset_metadata(meta) == []
    assert kernel_dataset.validate_dataset_metadata({**meta, "title": "short"}) == ["title 'short' must be 6 to 50 characters"]
    assert kernel_dataset.validate_dataset_metadata({**meta, "id": "me/ab"}) == ["id 'me/ab': the slug must be 3 to 50 characters"]
    assert "licenses must hold exactly one entry" in kernel_dataset.validate_dataset_metadata({**meta, "licenses": []})[0]


def test_user_comes_from_option_then_dataset_owner_then_environment(monkeypatch, no_secrets):
    monkeypatch.setenv("KAGGLE_USERNAME", "env-user")
    assert kernel.kaggle_user("opt-user", "owner/ds") == "opt-user"
    assert kernel.kaggle_user(None, "owner/ds") == "owner"
    assert kernel.kaggle_user(None, "ds") == "env-user"
    monkeypatch.delenv("KAGGLE_USERNAME")
    with pytest.raises(PipelineError, match="KAGGLE_USERNAME"):
        kernel.kaggle_user(None, None)


def test_dataset_ref_defaults_and_rejects_bad_slugs():
    assert kernel.dataset_ref(None, "me") == "me/kaggle-pipeline"
    assert kernel.dataset_ref("dogs-run", "me") == "me/dogs-run"
    assert kernel.dataset_ref("team/dogs-run", "me") == "team/dogs-run"
    with pytest.raises(PipelineError, match="USER/SLUG"):
        kernel.dataset_ref("me/Dogs Run", "me")


def test_kernel_spec_refuses_train_args_without_train_and_force():
    with pytest.raises(PipelineError, match="--train-args needs --train"):
        make_spec(train_args=("--epochs", "3"))
    with pytest.raises(PipelineError, match="leave --force out"):
        make_spec(predict_args=("--force",))


# ---------------------------------------------------------------- the kernel script


def test_train_args_point_weights_into_the_dataset():
    args, files = kernel.portable_train_args(["--epochs", "2", "--weights", "/w/lite0.safetensors", "--weights=b.pth"])
    assert args == ["--epochs", "2", "--weights", "{dataset}/weights/lite0.safetensors", "--weights={dataset}/weights/b.pth"]
    assert files == [Path("/w/lite0.safetensors"), Path("b.pth")]


@pytest.mark.parametrize("train, train_args, expected", [
    (False, (), ["--folds", "0"]),
    (True, (), []),
    (True, ("--folds", "3", "--epochs", "2"), ["--folds", "3"]),
    (True, ("--folds=4",), ["--folds", "4"]),
])
def test_reorg_args_fit_the_mode(train, train_args, expected):
    assert kernel.reorg_args(make_spec(train=train, train_args=train_args)) == expected


def test_kernel_script_carries_its_settings_as_literals_and_imports_only_the_stdlib(monkeypatch, tmp_path):
    spec = make_spec(train=True, train_args=("--epochs", "2", "--note", "it's \"quoted\""), predict_args=("--tta", "flip"))
    text = kernel.kernel_script(spec)
    tree = ast.parse(text)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"importlib", "os", "shutil", "subprocess", "sys", "time", "pathlib"}
    ns = load_script(text, monkeypatch, tmp_path / "input", tmp_path / "working")
    assert (ns["COMPETITION"], ns["DATASET"], ns["DATA_MARKER"], ns["TRAIN"]) == (DOG, "me/kaggle-pipeline", "labels.csv", True)
    assert ns["TRAIN_ARGS"] == ["--epochs", "2", "--note", "it's \"quoted\""]
    assert ns["PREDICT_ARGS"] == ["--tta", "flip"] and ns["REORG_ARGS"] == []
    assert (ns["INPUT"], ns["WORKING"]) == (tmp_path / "input", tmp_path / "working")


def test_kernel_script_defaults_to_kaggles_folders(monkeypatch):
    monkeypatch.delenv("KAGGLE_INPUT", raising=False)
    monkeypatch.delenv("KAGGLE_WORKING", raising=False)
    ns = {"__name__": "kernel_under_test"}
    exec(compile(kernel.kernel_script(make_spec()), "kernel.py", "exec"), ns)
    assert (ns["INPUT"], ns["WORKING"]) == (Path("/kaggle/input"), Path("/kaggle/working"))


def load_script(text: str, monkeypatch, input_dir: Path, working: Path) -> dict:
    """The kernel script's globals, its main() not run."""
    monkeypatch.setenv("KAGGLE_INPUT", str(input_dir))
    monkeypatch.setenv("KAGGLE_WORKING", str(working))
    ns = {"__name__": "kernel_under_test"}
    exec(compile(text, "kernel.py", "exec"), ns)
    return ns


def test_kernel_script_finds_folders_by_name_or_by_what_they_hold(monkeypatch, tmp_path):
    ns = load_script(kernel.kernel_script(make_spec()), monkeypatch, tmp_path / "input", tmp_path / "working")
    renamed = tmp_path / "input" / "datasets" / "me" / "kaggle-pipeline-v3"
    renamed.mkdir(parents=True)
    (renamed / "kaggle_pipeline-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "input" / DOG).mkdir()
    (tmp_path / "input" / DOG / "labels.csv").write_text("id,breed\n")
    assert ns["find_folder"]("kaggle-pipeline", ns["WHEEL_PATTERN"]) == renamed
    assert ns["find_folder"](DOG, "labels.csv") == tmp_path / "input" / DOG
    with pytest.raises(SystemExit):
        ns["find_folder"]("cifar-10", "trainLabels.csv")


def test_kernel_script_unpacks_a_run_that_was_uploaded_as_an_archive(monkeypatch, tmp_path):
    ns = load_script(kernel.kernel_script(make_spec()), monkeypatch, tmp_path / "input", tmp_path / "working")
    dataset = tmp_path / "input" / "kaggle-pipeline"
    fake_run(tmp_path / "src" / "run")
    dataset.mkdir(parents=True)
    shutil.make_archive(str(dataset / "run"), "zip", root_dir=tmp_path / "src", base_dir="run")
    run = ns["trained_run"](dataset)
    assert run == tmp_path / "working" / "run-unpacked" / "run" and (run / "holdout" / "best.pt").is_file()
    with pytest.raises(SystemExit):
        ns["trained_run"](tmp_path / "input")  # no run/ and no archive


# ---------------------------------------------------------------- the dataset


def test_run_files_take_what_predict_needs_and_never_last_pt(tmp_path):
    run = fake_run(tmp_path / "run", ("fold0", "fold1", "full"))
    (run / "cv.json").write_text("{}")
    (run / "oof.csv").write_text("id\n")
    files = kernel_dataset.run_files(run)
    member = ["best.pt", "config.json", "done.json", "metrics.csv"]
    assert files == [Path("config.json"), Path("cv.json"),
                     *[Path(m) / n for m in ("fold0", "fold1", "full") for n in member]]
    assert Path("fold0/last.pt") in kernel_dataset.run_files(run, with_last=True)
    holdout = kernel_dataset.run_files(fake_run(tmp_path / "holdout"))
    assert holdout == [Path("config.json"), *[Path("holdout") / n for n in member]]


def test_run_files_want_a_trained_model(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(PipelineError, match="holds no finished model"):
        kernel_dataset.run_files(tmp_path / "run")


def test_wheel_requirements_are_what_kaggles_image_lacks_pinned_to_this_machine():
    requires = ["torch>=2.1", "timm>=1.0", "Scikit_Learn>=1.3", "typer>=0.12", "rich>=13",
                'pytest>=8; extra == "test"', 'kaggle>=1.6; extra == "kaggle"']
    assert kernel_dataset.wheel_requirements(requires, {"typer": "0.29.2"}) == ["typer==0.29.2", "rich>=13"]


def test_download_wheels_calls_pip_download_with_an_argument_list(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(kernel_dataset.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    kernel_dataset.download_wheels(["typer==0.29.2"], tmp_path)
    assert calls == [[sys.executable, "-m", "pip", "download", "--only-binary=:all:", "-d", str(tmp_path),
                      "typer==0.29.2", "--quiet", "--disable-pip-version-check"]]


def test_a_failing_pip_is_one_line_naming_the_reason(monkeypatch, tmp_path):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for typer==0.29.2\n")
    monkeypatch.setattr(kernel_dataset.subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(PipelineError, match="pip could not download wheels of typer==0.29.2.*No matching distribution"):
        kernel_dataset.download_wheels(["typer==0.29.2"], tmp_path)


def test_dataset_with_wheels_asks_pip_for_the_missing_requirements(monkeypatch, tmp_path, fake_wheel):
    asked = []
    monkeypatch.setattr(kernel_dataset, "download_wheels", lambda reqs, dest: asked.append(reqs))
    plan = kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", None, wheels=True)
    kernel_dataset.write_dataset(plan, tmp_path / "ds", list_competitions())
    assert [sorted(reqs) for reqs in asked] == [[f"py7zr=={importlib.metadata.version('py7zr')}",
                                                 f"typer=={importlib.metadata.version('typer')}"]]


def test_dataset_folder_holds_metadata_wheel_and_best_checkpoints(tmp_path, fake_wheel, monkeypatch, no_secrets):
    run = fake_run(tmp_path / "run", ("fold0", "fold1"))
    (tmp_path / "lite0.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    result = invoke("kernel", "dataset", "--out", tmp_path / "ds", "--run", run, "--weights", tmp_path / "lite0.safetensors")
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(tmp_path / "ds")) for p in (tmp_path / "ds").rglob("*") if p.is_file())
    member = ["best.pt", "config.json", "done.json", "metrics.csv"]
    assert files == sorted(["dataset-metadata.json", "kaggle_pipeline-0.1.0-py3-none-any.whl", "run/config.json",
                            *[f"run/fold{k}/{n}" for k in (0, 1) for n in member], "weights/lite0.safetensors"])
    meta = json.loads((tmp_path / "ds" / "dataset-metadata.json").read_text())
    assert meta["id"] == "me/kaggle-pipeline" and kernel_dataset.validate_dataset_metadata(meta) == []
    again = invoke("kernel", "dataset", "--out", tmp_path / "ds", "--run", run)
    assert again.exit_code == 1 and "--force" in again.output
    assert invoke("kernel", "dataset", "--out", tmp_path / "ds", "--run", run, "--force").exit_code == 0
    assert not (tmp_path / "ds" / "weights").exists()  # replaced as a whole


def test_dataset_refuses_a_folder_it_did_not_write(tmp_path, fake_wheel):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    plan = kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", None)
    with pytest.raises(PipelineError, match="choose an empty --out"):
        kernel_dataset.write_dataset(plan, tmp_path / "ds", [], force=True)
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- never packaged


@pytest.mark.parametrize("name", ["kaggle.json", ".env", ".env.local", "prod.env"])
def test_credentials_are_refused_by_name(tmp_path, fake_wheel, name):
    secret = tmp_path / "conf" / name
    secret.parent.mkdir()
    secret.write_text("{}")
    plan = kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", None, weights=[secret])
    with pytest.raises(PipelineError, match=f"refusing to package .*{name}: credentials never leave"):
        kernel_dataset.write_dataset(plan, tmp_path / "ds", [])
    assert not (tmp_path / "ds").exists()


def test_competition_download_is_refused(toy, tmp_path, fake_wheel):
    comp, raw = toy
    plan = kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", None, weights=[raw / "train" / "1.png"])
    with pytest.raises(PipelineError, match=f"lies in the competition download {raw}"):
        kernel_dataset.write_dataset(plan, tmp_path / "ds", [comp])


def test_a_file_holding_the_kaggle_key_is_refused(tmp_path, monkeypatch, fake_wheel):
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    run = fake_run(tmp_path / "run")
    (run / "holdout" / "metrics.csv").write_text(f"epoch,note\n1,{KEY}\n")
    plan = kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", run)
    with pytest.raises(PipelineError, match=r"metrics.csv: it holds the value of \$KAGGLE_KEY"):
        kernel_dataset.write_dataset(plan, tmp_path / "ds", [])
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds*"))


def test_a_kernel_whose_options_hold_the_kaggle_key_is_not_written(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    with pytest.raises(PipelineError, match=r"refusing to write .*kernel.py: its options hold the value of \$KAGGLE_KEY"):
        kernel.write_kernel(make_spec(train=True, train_args=("--note", KEY)), tmp_path / "kern")
    assert not (tmp_path / "kern").exists()


def test_a_wheel_hiding_credentials_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    with zipfile.ZipFile(tmp_path / "x-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/settings.py", f"KEY = '{KEY}'\n" * 50)  # compressed: only a member scan sees it
    with pytest.raises(PipelineError, match="member x/settings.py holds the value"):
        kernel_dataset.check_folder(tmp_path, [])
    with zipfile.ZipFile(tmp_path / "x-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("x/kaggle.json", "{}")
    with pytest.raises(PipelineError, match="holds x/kaggle.json"):
        kernel_dataset.check_folder(tmp_path, [])


# ---------------------------------------------------------------- the CLI and push


@pytest.fixture
def built_kernel(tmp_path, no_secrets):
    out = tmp_path / "kern"
    result = invoke("kernel", "build", DOG, "--out", out, "--user", "me", "--title", "Dogs offline")
    assert result.exit_code == 0, result.output
    return out


def test_build_writes_a_valid_predict_only_kernel(built_kernel):
    meta = json.loads((built_kernel / "kernel-metadata.json").read_text())
    assert meta["id"] == "me/dogs-offline" and meta["dataset_sources"] == ["me/kaggle-pipeline"]
    assert kernel.validate_kernel_metadata(meta) == [] and meta["enable_internet"] is False
    script = (built_kernel / meta["code_file"]).read_text()
    assert "TRAIN = False" in script and "REORG_ARGS = ['--folds', '0']" in script
    again = invoke("kernel", "build", DOG, "--out", built_kernel, "--user", "me")
    assert again.exit_code == 1 and "--force" in again.output


def test_build_without_a_user_says_how_to_give_one(tmp_path, no_secrets):
    result = invoke("kernel", "build", DOG, "--out", tmp_path / "kern")
    assert result.exit_code == 1 and "KAGGLE_USERNAME" in result.output
    assert not (tmp_path / "kern").exists()


def test_build_with_training_carries_the_options(tmp_path, no_secrets):
    result = invoke("kernel", "build", DOG, "--out", tmp_path / "kern", "--dataset", "team/dogs-code", "--train", "--gpu",
                    "--train-args", "--epochs 3 --weights /w/lite0.safetensors --folds 5")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "kern" / "kernel-metadata.json").read_text())
    assert meta["id"] == f"team/{DOG}-pipeline" and meta["enable_gpu"] is True
    assert meta["dataset_sources"] == ["team/dogs-code"]
    script = (tmp_path / "kern" / "kernel.py").read_text()
    assert "TRAIN_ARGS = ['--epochs', '3', '--weights', '{dataset}/weights/lite0.safetensors', '--folds', '5']" in script
    assert "REORG_ARGS = ['--folds', '5']" in script and "--weights /w/lite0.safetensors" in result.output


def test_build_refuses_a_run_and_training_together(tmp_path, no_secrets):
    run = fake_run(tmp_path / "run")
    result = invoke("kernel", "build", DOG, "--out", tmp_path / "kern", "--user", "me", "--run", run, "--train")
    assert result.exit_code == 1 and "not both" in result.output


def mock_kaggle(monkeypatch) -> list[list[str]]:
    """Credentials in the environment; the kaggle client replaced at its boundary."""
    calls = []
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    monkeypatch.setattr("pipeline.download.kaggle.shutil.which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr("pipeline.download.kaggle.subprocess.run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "pushed\n", ""))
    return calls


def test_push_calls_kaggle_kernels_push(built_kernel, monkeypatch):
    calls = mock_kaggle(monkeypatch)
    result = invoke("kernel", "push", built_kernel)
    assert result.exit_code == 0, result.output
    assert calls == [["/usr/bin/kaggle", "kernels", "push", "-p", str(built_kernel)]]


def test_push_dataset_creates_or_versions(tmp_path, monkeypatch, fake_wheel):
    calls = mock_kaggle(monkeypatch)
    ds = tmp_path / "ds"
    kernel_dataset.write_dataset(kernel_dataset.plan_dataset("me/kaggle-pipeline", "kaggle-pipeline", fake_run(tmp_path / "run")), ds, [])
    assert invoke("kernel", "push-dataset", ds).exit_code == 0
    assert invoke("kernel", "push-dataset", ds, "--message", "new run").exit_code == 0
    assert calls == [["/usr/bin/kaggle", "datasets", "create", "-p", str(ds), "--dir-mode", "zip"],
                     ["/usr/bin/kaggle", "datasets", "version", "-p", str(ds), "-m", "new run", "--dir-mode", "zip"]]


def test_push_without_credentials_says_where_they_go(built_kernel, tmp_path, monkeypatch):
    empty = tmp_path / "home"
    empty.mkdir()
    monkeypatch.setenv("HOME", str(empty))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(empty))
    monkeypatch.setattr("pipeline.download.kaggle.subprocess.run", lambda *a, **kw: pytest.fail("kaggle must not run"))
    result = invoke("kernel", "push", built_kernel)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "kaggle.json" in lines[0] and lines[0].startswith("error: no Kaggle credentials")


def test_push_refuses_a_folder_holding_credentials(built_kernel, monkeypatch):
    calls = mock_kaggle(monkeypatch)
    (built_kernel / "kaggle.json").write_text('{"username": "me"}')
    result = invoke("kernel", "push", built_kernel)
    assert result.exit_code == 1 and "refusing to package" in result.output and calls == []


def test_push_checks_the_metadata_first(built_kernel, monkeypatch):
    calls = mock_kaggle(monkeypatch)
    (built_kernel / "kernel.py").unlink()
    result = invoke("kernel", "push", built_kernel)
    assert result.exit_code == 1 and "code_file 'kernel.py' is not in" in result.output and calls == []
    result = invoke("kernel", "push", built_kernel.parent)
    assert result.exit_code == 1 and "kernel-metadata.json not found" in result.output


# ---------------------------------------------------------------- a local dry run


def ok(*args) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def run_kernel_script(kernel_dir: Path, input_dir: Path, working: Path) -> subprocess.CompletedProcess:
    """The script as Kaggle would run it, with pip's index off and installing into a target folder."""
    env = {**os.environ, "KAGGLE_INPUT": str(input_dir), "KAGGLE_WORKING": str(working), "PIP_NO_INDEX": "1",
           "PIPELINE_KERNEL_PIP_TARGET": str(working / ".pip"),
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # any download fails
    return subprocess.run([sys.executable, str(kernel_dir / "kernel.py")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=kernel_dir)


@pytest.mark.slow
@requires_shared
def test_kernel_from_a_trained_dog_run_writes_a_checked_submission(tmp_path, no_secrets):
    start = time.perf_counter()
    raw = SHARED / "data" / DOG
    before = tree_hash(raw)
    work, run = tmp_path / "work", tmp_path / "run"
    ok("reorg", DOG, raw, work)
    ok("train", DOG, work, run, "--model", "timm:tf_efficientnet_lite0", "--weights", WEIGHTS, "--freeze-backbone",
       "--image-size", "64", "--epochs", "1", "--batch-size", "32", "--device", "cpu")
    ok("kernel", "build", DOG, "--out", tmp_path / "kern", "--run", run, "--dataset", "me/dogs-run")
    ok("kernel", "dataset", "--out", tmp_path / "ds", "--run", run, "--dataset", "me/dogs-run", "--title", "Dogs run")
    assert not list((tmp_path / "ds").rglob("last.pt"))

    done = run_kernel_script(tmp_path / "kern", fake_input(tmp_path, raw, tmp_path / "ds", "dogs-run"), tmp_path / "working")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pipeline ready: {tmp_path / 'working' / '.pip' / 'pipeline'}" in done.stdout  # the wheel, not the venv
    assert "valid (300 rows, 121 columns)" in done.stdout + done.stderr
    assert_dog_submission(tmp_path / "working" / "submission.csv", raw)
    assert tree_hash(raw) == before
    print(f"kernel dry run, predict-only: {time.perf_counter() - start:.1f}s")


@pytest.mark.slow
@requires_shared
def test_training_kernel_starts_from_weights_carried_in_the_dataset(tmp_path, no_secrets):
    start = time.perf_counter()
    raw = SHARED / "data" / DOG
    train_args = (f"--model timm:tf_efficientnet_lite0 --weights {WEIGHTS} --freeze-backbone --image-size 64 "
                  "--epochs 1 --steps-per-epoch 3 --batch-size 32 --device cpu")
    ok("kernel", "build", DOG, "--out", tmp_path / "kern", "--user", "me", "--train", "--train-args", train_args)
    ok("kernel", "dataset", "--out", tmp_path / "ds", "--user", "me", "--weights", WEIGHTS)
    inputs = fake_input(tmp_path, raw, tmp_path / "ds", "kaggle-pipeline-renamed")  # found by its wheel
    done = run_kernel_script(tmp_path / "kern", inputs, tmp_path / "working")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"--weights {inputs / 'kaggle-pipeline-renamed' / 'weights' / WEIGHTS.name}" in done.stdout
    assert (tmp_path / "working" / "run" / "holdout" / "best.pt").is_file()
    assert_dog_submission(tmp_path / "working" / "submission.csv", raw)
    print(f"kernel dry run, training: {time.perf_counter() - start:.1f}s")


def fake_input(tmp_path: Path, raw: Path, dataset: Path, dataset_folder: str) -> Path:
    """A folder laid out as /kaggle/input is: the competition's data and the attached dataset."""
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / DOG).symlink_to(raw)
    (inputs / dataset_folder).symlink_to(dataset)
    return inputs


def assert_dog_submission(path: Path, raw: Path) -> None:
    frame = pd.read_csv(path, dtype={"id": str})
    sample = pd.read_csv(raw / "sample_submission.csv", dtype={"id": str})
    assert frame.shape == (300, 121) and list(frame.columns) == list(sample.columns)
    assert frame["id"].tolist() == sample["id"].tolist()
    assert (abs(frame.iloc[:, 1:].to_numpy().sum(axis=1) - 1) < 1e-6).all()


def test_kernel_installs_only_what_the_image_lacks_and_never_reinstalls(monkeypatch, tmp_path):
    """Issue 13.10: Kaggle's torch/timm stay as they are; missing packages come from the dataset, offline."""
    ns = load_script(kernel.kernel_script(make_spec()), monkeypatch, tmp_path / "input", tmp_path / "working")
    dataset = tmp_path / "ds"
    dataset.mkdir()
    for name in ("kaggle_pipeline-0.1.0-py3-none-any.whl", "torch-2.0.0-py3-none-any.whl",
                 "typer-0.1.0-py3-none-any.whl", "not_installed_anywhere-1.0-py3-none-any.whl"):
        (dataset / name).write_bytes(b"")
    calls = []
    monkeypatch.setattr(ns["subprocess"], "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(
        cmd, 0, "/x/pipeline/__init__.py", ""))
    ns["install"](dataset)
    pip = calls[0]
    assert "--no-index" in pip and "--no-deps" in pip and "--force-reinstall" not in pip and "--upgrade" not in pip
    wheels = sorted(Path(a).name for a in pip if a.endswith(".whl"))
    assert wheels == ["kaggle_pipeline-0.1.0-py3-none-any.whl", "not_installed_anywhere-1.0-py3-none-any.whl"]
