"""Every value a user writes is checked where it enters, by the one check of its setting.

A spec file's [recipe] and [recipes.NAME], a stored run config read back, a
kernel's --train-args: each wrong kind, choice or minimum is one line naming
the file (or option), the table and the field.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.config import TrainConfig, load_resolved
from pipeline.download.specfile import find_specs, load_spec, spec_fields, toml_value
from pipeline.errors import PipelineError
from pipeline.kernel.build import check_train_args
from tests.conftest import make_competition


def spec_text(recipe: str, extra: str = "") -> str:
    comp = make_competition("toy-spec")
    top = [f"{name} = {toml_value(getattr(comp, name))}" for name in spec_fields()
           if getattr(comp, name) not in (None, "")]
    return "\n".join(top) + f'\n[recipe]\nmodel = "fastnet_s"\n{recipe}\n{extra}\n'


@pytest.mark.parametrize("line, words", [
    ('epochs = "ten"', "epochs must be a whole number, got 'ten'"),
    ("epochs = 1.5", "epochs must be a whole number, got 1.5"),
    ("epochs = true", "epochs must be a whole number, got True"),
    ("batch_size = true", "batch_size must be a whole number or a string in quotes, got True"),
    ('lr = "0.1"', "lr must be a number, got '0.1'"),
    ("pretrained = 1", "pretrained must be true or false, got 1"),
    ("batch_size = 0", "batch_size must be >= 1, got 0"),
    ('optimizer = "lion"', "optimizer 'lion' is not one of: sgd, adam, adamw"),
])
def test_a_bad_recipe_value_is_one_line_naming_file_table_and_field(tmp_path, line, words):
    path = tmp_path / "c.toml"
    path.write_text(spec_text(line))
    with pytest.raises(PipelineError) as refused:
        load_spec(path)
    assert str(refused.value) == f"{path}: [recipe]: {words}"
    named = tmp_path / "n.toml"
    named.write_text(spec_text("epochs = 2", f"[recipes.quick]\n{line}"))
    with pytest.raises(PipelineError, match=rf"^{named}: \[recipes\.quick\]: "):
        load_spec(named)


def test_competitions_lists_a_spec_with_a_bad_value_and_its_reason(tmp_path):
    (tmp_path / "good.toml").write_text(spec_text("epochs = 2"))
    (tmp_path / "bad.toml").write_text(spec_text('epochs = "ten"').replace('"toy-spec"', '"toy-bad"', 1))
    found = {f.path.name: f for f in find_specs([tmp_path])}
    assert found["good.toml"].competition.recipe["epochs"] == 2
    assert found["bad.toml"].competition is None
    assert found["bad.toml"].problem.endswith("[recipe]: epochs must be a whole number, got 'ten'")
    result = CliRunner().invoke(app, ["competitions", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'bad.toml'}: spec file not loaded: " in result.stdout


def test_a_stored_run_config_with_a_bad_value_is_refused_naming_file_and_field(tmp_path):
    good = TrainConfig(competition="c", model="m").to_json()
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": good}))
    assert load_resolved(path)[0].epochs == 10
    for field, value, words in (("epochs", 1.5, "config.epochs must be a whole number, got 1.5"),
                                ("steps_per_epoch", True, "config.steps_per_epoch must be a whole number, got True"),
                                ("batch_size", True, "config.batch_size must be a whole number or a string"),
                                ("schedule", "wavy", "config.schedule 'wavy' is not one of")):
        path.write_text(json.dumps({"config": {**good, field: value}}))
        with pytest.raises(PipelineError, match=rf"^{path} is not a valid run config \({words}"):
            load_resolved(path)


def test_kernel_train_args_are_checked_when_the_kernel_is_built():
    check_train_args(["--epochs", "5", "--lr=0.05", "--pretrained", "--recipe", "quick"])
    for args, words in ((["--epochs", "ten"], "--train-args --epochs must be a whole number, got 'ten'"),
                        (["--epochs=1.5"], "--train-args --epochs must be a whole number, got '1.5'"),
                        (["--batch-size", "0"], "--train-args --batch-size must be >= 1, got 0")):
        with pytest.raises(PipelineError, match=f"^{words}$"):
            check_train_args(args)
