"""`pipeline tune` against a real Optuna SQLite study: killed mid-study and resumed, and its recipe file trained.

Real `python -m pipeline` processes on the toy download (a spec file, 3 folds,
one epoch per fold), so SIGKILL lands where a crash would.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.runs import Run
from tests.test_parallel import cli, finished, spec_work  # noqa: F401  (spec_work: the fixture)

optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed (pip install .[optuna])")

TRAIN = ("--epochs", "1", "--batch-size", "8", "--device", "cpu", "--num-workers", "0")


def trials_by_state(study_dir: Path) -> dict[str, list[int]]:
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{study_dir / 'study.db'}")
    states: dict[str, list[int]] = {}
    for t in study.trials:
        states.setdefault(t.state.name, []).append(t.number)
    return states


def stamps(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow  # three tune processes (3 trials of 3 folds) and the recipe's 3-fold run: minutes on a loaded machine
def test_a_killed_study_resumes_without_repeating_a_trial_and_its_recipe_trains(spec_work, tmp_path):
    spec, work = spec_work
    study = tmp_path / "study"
    first = cli("tune", spec, work, study, "--trials", "2", *TRAIN)
    deadline = time.time() + 300
    while not (study / "trial-001").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-2000:]
    first.send_signal(signal.SIGKILL)  # during trial 1: trial 0 is finished
    first.communicate()
    assert trials_by_state(study) == {"COMPLETE": [0], "RUNNING": [1]}
    kept = stamps(study / "trial-000")
    out, err = finished(cli("tune", spec, work, study, "--trials", "2", *TRAIN))
    assert "1 of 2 trials finished; running 1 more" in err
    states = trials_by_state(study)
    assert sorted(states.get("COMPLETE", []) + states.get("PRUNED", [])) == [0, 2]  # trial 0 not run again
    assert states["RUNNING"] == [1]  # the killed one (marked failed once its heartbeat is stale)
    assert stamps(study / "trial-000") == kept  # its run folder untouched
    again, err = finished(cli("tune", spec, work, study, "--trials", "2", *TRAIN))
    assert "2 of 2 trials finished" in err and "running" not in err  # a finished study trains nothing
    # the best trial's settings as a recipe file that trains to the same CV
    recipe = study / "best.toml"
    best = optuna.load_study(study_name="tune", storage=f"sqlite:///{study / 'study.db'}").best_trial
    assert f"best: trial {best.number} CV accuracy {best.value:.4f}" in out and f"{recipe}: written" in out
    text = recipe.read_text()
    for name, value in best.params.items():
        assert f"{name} = {json.dumps(value)}" in text
    command = next(line for line in out.splitlines() if f"--recipe {recipe} --folds K" in line)
    assert all(f"{flag} {value}" in command for flag, value in zip(TRAIN[::2], TRAIN[1::2]))  # the trial's options
    run = Run(tmp_path / "from-recipe")
    finished(cli("train", spec, work, run.dir, "--recipe", recipe, "--folds", "3", *TRAIN))
    doc = json.loads(run.config_path.read_text())
    assert doc["recipe"] == str(recipe) and doc["sources"]["lr"] == f"recipe {recipe}"
    assert doc["config"]["lr"] == best.params["lr"]
    assert run.read_cv()["cv"] == pytest.approx(best.value)  # the same settings and seeds: the same CV
    trial_cv = Run(best.user_attrs["run_dir"]).read_cv()
    assert run.read_cv()["folds"][0]["accuracy"] == pytest.approx(trial_cv["folds"][0]["accuracy"])


def test_default_space_follows_head_and_optimizer_and_a_space_file_narrows_it(tmp_path):
    from pipeline.config import TrainConfig
    from pipeline.train.tune import default_space, read_space

    sgd = [d.name for d in default_space(TrainConfig(model="fastnet"))]
    assert sgd == ["lr", "momentum", "weight_decay", "label_smoothing"]
    adamw = default_space(TrainConfig(model="fastnet", optimizer="adamw", head="mlp"))
    assert [d.name for d in adamw] == ["lr", "weight_decay", "label_smoothing", "head_hidden", "drop_rate"]
    assert (adamw[0].low, adamw[0].high, adamw[0].log) == (1e-4, 1e-2, True)
    logreg = TrainConfig(model="fastnet", head="logreg", freeze_backbone=True)
    assert default_space(logreg) == []  # its C is chosen by an inner CV
    space = tmp_path / "space.toml"
    space.write_text('lr = {low = 0.05, high = 0.5, log = true}\noptimizer = ["sgd", "adamw"]\n')
    narrowed = read_space(space)
    assert [(d.name, d.low, d.high, d.log, d.choices) for d in narrowed] == [
        ("lr", 0.05, 0.5, True, ()), ("optimizer", None, None, False, ("sgd", "adamw"))]
    space.write_text("lr = {low = 0.5, high = 0.05}\n")
    with pytest.raises(PipelineError, match="lr must be a list of choices or"):
        read_space(space)
    space.write_text("folds = [3, 5]\n")
    with pytest.raises(PipelineError, match="folds is not a setting tune can search"):
        read_space(space)


def test_a_recipe_file_is_read_checked_and_named_as_the_source(tmp_path):
    import competitions  # noqa: F401
    from pipeline.competition import get_competition
    from pipeline.config import recipe_text, resolve_config

    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text({"lr": 0.07, "optimizer": "adamw", "nesterov": True}, "tuned"))
    resolved = resolve_config(get_competition("digits"), tmp_path, tmp_path / "run", str(recipe), {"lr": 0.2})
    assert (resolved.config.optimizer, resolved.config.nesterov, resolved.config.lr) == ("adamw", True, 0.2)
    assert resolved.sources["optimizer"] == f"recipe {recipe}" and resolved.sources["lr"] == "flag"
    recipe.write_text("lr = 0.1\nwork_dir = 'x'\n")
    with pytest.raises(PipelineError, match=f"recipe file {recipe}: recipe setting.*work_dir unknown"):
        resolve_config(get_competition("digits"), tmp_path, tmp_path / "run", str(recipe), {})
    with pytest.raises(PipelineError, match="recipe file .*missing.toml not found"):
        resolve_config(get_competition("digits"), tmp_path, tmp_path / "run", str(tmp_path / "missing.toml"), {})
