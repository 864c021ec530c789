"""`pipeline tune`: an Optuna study whose objective is the CV score of the competition's metric.

Each trial is an ordinary run folder (STUDY_DIR/trial-NNN) trained fold by
fold with the settings the sampler proposes on top of the base settings
(competition < --recipe < the options given, which stay fixed); after each
fold the running mean of the fold scores is reported, so a trial worse than
the median of earlier trials at the same fold is pruned. The CV is the one
the last fold assembles (oof.csv, cv.json). The study lives in
STUDY_DIR/study.db (SQLite): it resumes after Ctrl-C or a crash without
repeating a finished trial, and several processes may run it at once. At the
end the best trial's settings become STUDY_DIR/best.toml, a recipe file for
``pipeline train --recipe``.

The default search space follows the head and optimizer of the base settings
(:func:`default_space`); ``--space FILE`` (TOML) replaces it with the settings
and ranges it names: ``lr = {low = 0.01, high = 1.0, log = true}``,
``optimizer = ["sgd", "adamw"]``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import Resolved, TrainConfig, absolute, cli_fields, flag_of, recipe_text, resolve_config
from pipeline.errors import PipelineError
from pipeline.io import atomic_write_text
from pipeline.runs import Run

log = logging.getLogger("pipeline")

STUDY_FILE, BEST_FILE, TRIAL_DIR = "study.db", "best.toml", "trial-{:03d}"
_NOT_RECIPE = ("folds", "fold", "full")  # the member choice: the recipe trains whatever the user asks


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a float or int range (log-scaled or not), or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def sample(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, (), False) or k == "name"}


def default_space(cfg: TrainConfig) -> list[Dimension]:
    """What is worth searching for the base settings' head and optimizer.

    SGD: lr 0.01-1 (log), momentum 0.8-0.95, weight decay 1e-5-1e-2 (log);
    Adam/AdamW: lr 1e-4-1e-2 (log), weight decay 1e-6-0.1 (log); every
    SGD-trained head: label smoothing 0-0.2; an mlp head: its width 64-1024
    (log) and dropout 0-0.5; fine-tuning (--unfreeze-after): the backbone's lr
    scale 0.01-1 (log). A logreg head has nothing to search (its C is chosen
    by an inner CV) unless it is fine-tuned afterwards.
    """
    space: list[Dimension] = []
    trained = cfg.head != "logreg" or cfg.unfreeze_after
    if trained and cfg.optimizer == "sgd":
        space += [Dimension("lr", 0.01, 1.0, log=True), Dimension("momentum", 0.8, 0.95),
                  Dimension("weight_decay", 1e-5, 1e-2, log=True)]
    elif trained:
        space += [Dimension("lr", 1e-4, 1e-2, log=True), Dimension("weight_decay", 1e-6, 0.1, log=True)]
    if trained:
        space.append(Dimension("label_smoothing", 0.0, 0.2))
    if cfg.head == "mlp":
        space += [Dimension("head_hidden", 64, 1024, log=True), Dimension("drop_rate", 0.0, 0.5)]
    if cfg.unfreeze_after:
        space.append(Dimension("backbone_lr_scale", 0.01, 1.0, log=True))
    return space


def search_space(base: Resolved, path: Path | None) -> list[Dimension]:
    """--space FILE, else the default space less the settings given as options (those stay fixed)."""
    given = {k for k, source in base.sources.items() if source == "flag"}
    if path is None:
        space = [d for d in default_space(base.config) if d.name not in given]
        if not space:
            raise PipelineError("nothing to search for these settings (a logreg head fits its own C); "
                                "give --space FILE")
        return space
    space = read_space(path)
    clash = [d.name for d in space if d.name in given]
    if clash:
        raise PipelineError(f"{', '.join(clash)} is given as an option and searched by {path}; drop one of them")
    return space


def read_space(path: Path) -> list[Dimension]:
    """A --space file: ``name = {low, high, log}`` or ``name = [choices]`` per searched setting."""
    import tomllib

    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"search space file {path} not found; check the path") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"search space file {path} is not readable TOML ({exc}); fix it") from None
    fields = {f.name: f for f in cli_fields()}
    space = []
    for name, spec in table.items():
        if name not in fields or name in _NOT_RECIPE:
            raise PipelineError(f"{path}: {name} is not a setting tune can search; "
                                f"valid: {', '.join(n for n in fields if n not in _NOT_RECIPE)}")
        if isinstance(spec, list) and spec:
            space.append(Dimension(name, choices=tuple(spec)))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log"} \
                and spec["low"] < spec["high"]:
            space.append(Dimension(name, spec["low"], spec["high"], log=bool(spec.get("log", False))))
        else:
            raise PipelineError(f"{path}: {name} must be a list of choices or {{low = A, high = B[, log = true]}} "
                                "with A < B")
    return space


def tune(base: Resolved, study_dir: Path, trials: int, space: list[Dimension], n_folds: int) -> dict:
    """Run the study until ``trials`` trials are finished (complete or pruned); the best as a recipe file."""
    import optuna

    study_dir = absolute(study_dir)  # the trials' folders and best.toml are named from anywhere
    study_dir.mkdir(parents=True, exist_ok=True)
    study = _study(base, study_dir, space)
    done = _finished(study)
    log.info("study %s: %d of %d trials finished%s", study_dir / STUDY_FILE, done, trials,
             f"; running {trials - done} more" if done < trials else "")
    if done < trials:
        stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,
                                                              optuna.trial.TrialState.PRUNED))
        study.optimize(lambda t: _objective(t, base, study_dir, space, n_folds), n_trials=trials - done,
                       callbacks=[stop], catch=())
    return _write_best(study, base, study_dir)


def _study(base: Resolved, study_dir: Path, space: list[Dimension]):
    import optuna

    from pipeline.competition import get_competition

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(study_dir / STUDY_FILE).resolve()}",
                                         heartbeat_interval=30, grace_period=120)  # a killed trial becomes FAIL
    direction = "maximize" if get_competition(base.config.competition).higher_is_better else "minimize"
    study = optuna.create_study(storage=storage, study_name="tune", direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=base.config.seed, n_startup_trials=4),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    fixed = {"base": _base_settings(base), "space": [d.to_json() for d in space], "direction": direction}
    known = study.user_attrs.get("settings")
    if known is None:
        study.set_user_attr("settings", fixed)
    elif known != json.loads(json.dumps(fixed)):
        raise PipelineError(f"{study_dir / STUDY_FILE} holds a study of other settings or another search space; "
                            "resume it with the same command, or choose a new STUDY_DIR")
    if len(study.trials) > 0:  # each process its own sampler stream: several may run the study at once
        study.sampler = optuna.samplers.TPESampler(seed=base.config.seed + len(study.trials), n_startup_trials=4)
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def _objective(trial, base: Resolved, study_dir: Path, space: list[Dimension], n_folds: int) -> float:
    """Train the trial's run fold by fold, reporting the running mean of the fold scores; its CV."""
    import optuna

    from pipeline.train.stage import train

    params = {d.name: d.sample(trial) for d in space}
    run_dir = study_dir / TRIAL_DIR.format(trial.number)
    resolved = _trial_config(base, run_dir, params)
    trial.set_user_attr("run_dir", str(run_dir))
    scores = []
    for k in range(n_folds):
        result = train(replace(resolved, config=replace(resolved.config, folds=0, fold=k)))[0]
        scores.append((result.kept or {}).get("metric"))
        if scores[-1] is None:
            raise PipelineError(f"{run_dir}: fold {k} has no validation score; tune needs validation folds")
        trial.report(sum(scores) / len(scores), step=k)
        if k < n_folds - 1 and trial.should_prune():
            log.info("trial %d pruned after fold %d: mean fold score %.4f", trial.number, k, sum(scores) / len(scores))
            raise optuna.TrialPruned()
    cv = Run(run_dir).read_cv()
    log.info("trial %d: CV %.4f with %s", trial.number, cv["cv"], params)
    return float(cv["cv"])


def _trial_config(base: Resolved, run_dir: Path, params: dict) -> Resolved:
    """The base settings with the trial's values, each marked with the source "tune"."""
    values = {**base.config.to_json(), **params, "run_dir": str(run_dir.resolve())}
    cfg = TrainConfig.from_json(values)
    return Resolved(cfg, {**base.sources, **{k: "tune" for k in params}}, base.notes, base.recipe)


def _base_settings(base: Resolved) -> dict:
    """What the recipe file keeps of the base: every setting given by a layer above the defaults."""
    names = {f.name for f in cli_fields()} - set(_NOT_RECIPE)
    cfg = base.config.to_json()
    return {k: cfg[k] for k, source in base.sources.items() if k in names and source != "default"}


def _write_best(study, base: Resolved, study_dir: Path) -> dict:
    """STUDY_DIR/best.toml: the base settings and the best trial's values (None when no trial completed)."""
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    summary = {"trials": len(study.trials), "complete": len(complete),
               "pruned": sum(t.state == TrialState.PRUNED for t in study.trials), "best": None}
    if not complete:
        return summary
    best = study.best_trial
    settings = {**_base_settings(base), **best.params}
    path = study_dir / BEST_FILE
    flags = given_options(base)
    comment = (f"pipeline tune: the best of {len(complete)} complete trials in {study_dir / STUDY_FILE}\n"
               f"trial {best.number} ({best.user_attrs.get('run_dir')}): CV {best.value:.6g}, the best of the trials "
               "on the same folds: optimistic\n"
               "train adapts a recipe's batch and epochs to the data, never an option's: to train exactly the trial,\n"
               f"pipeline train COMPETITION WORK_DIR RUN_DIR --recipe {path} --folds K {flags}".rstrip())
    atomic_write_text(path, recipe_text(settings, comment))
    summary["best"] = {"trial": best.number, "cv": best.value, "params": best.params,
                       "run_dir": best.user_attrs.get("run_dir"), "recipe": str(path), "options": flags}
    return summary


def given_options(base: Resolved) -> str:
    """The options given to tune, as train takes them (its trials ran with them unadapted)."""
    fields = {f.name: f for f in cli_fields()}
    cfg, parts = base.config.to_json(), []
    for name, source in base.sources.items():
        if source != "flag" or name not in fields:
            continue
        value, flag = cfg[name], flag_of(fields[name])
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def base_config(comp, work_dir: Path, study_dir: Path, recipe: str | None, flags: dict) -> Resolved:
    """The settings every trial shares: competition < --recipe < the options given (every fold of folds.csv)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if {"folds", "fold", "full"} & set(given):
        raise PipelineError("tune trains every fold of folds.csv: drop --folds/--fold/--full")
    return resolve_config(comp, work_dir, study_dir, recipe, given)
