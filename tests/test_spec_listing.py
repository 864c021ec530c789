"""`pipeline competitions [DIR...]`: the registered competitions and the spec files of the given folders."""
from __future__ import annotations

from pathlib import Path

from pipeline.download.specfile import find_specs
from tests.test_init import invoke, write_binary, write_c


def specs_in(tmp_path: Path) -> Path:
    """A folder with two good specs (init's), a broken one, one of another tool and a non-TOML file."""
    folder = tmp_path / "specs"
    folder.mkdir()
    write_binary(tmp_path / "bin")
    write_c(tmp_path / "folders")
    assert invoke("init", tmp_path / "bin", "--out", folder / "bin.toml", "--slug", "my-binary").exit_code == 0
    assert invoke("init", tmp_path / "folders", "--out", folder / "c.toml", "--slug", "my-folders").exit_code == 0
    (folder / "broken.toml").write_text('slug = "half"\nmetric = "auc"\n[recipe]\n')
    (folder / "bad-syntax.toml").write_text('slug = "x\n')
    (folder / "pyproject.toml").write_text('[project]\nname = "x"\n')  # not a spec: skipped
    (folder / "notes.txt").write_text("slug = 1")
    return folder


def test_find_specs_loads_good_files_and_names_the_problem_of_the_others(tmp_path):
    folder = specs_in(tmp_path)
    found = {f.path.name: f for f in find_specs([folder])}
    assert sorted(found) == ["bad-syntax.toml", "bin.toml", "broken.toml", "c.toml"]
    assert (found["bin.toml"].competition.slug, found["bin.toml"].competition.metric) == ("my-binary", "roc_auc")
    assert found["c.toml"].competition.layout == "folders"
    assert found["bin.toml"].competition.spec_file == str((folder / "bin.toml").resolve())
    assert "missing field(s)" in found["broken.toml"].problem and found["broken.toml"].competition is None
    assert "not valid TOML" in found["bad-syntax.toml"].problem


def test_competitions_lists_registered_ones_and_spec_files(tmp_path):
    folder = specs_in(tmp_path)
    result = invoke("competitions", folder)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    registered = [line for line in lines if "registered:" in line]
    assert {line.split()[0] for line in registered} >= {"cifar-10", "dog-breed-identification", "digits"}
    (binary,) = [line for line in lines if line.startswith("my-binary ")]
    assert "roc_auc" in binary and "probability of positive" in binary and f"spec file {folder / 'bin.toml'}" in binary
    (broken,) = [line for line in lines if "broken.toml" in line]
    assert "spec file not loaded" in broken and "missing field(s)" in broken
    assert not any("pyproject" in line or "notes.txt" in line for line in lines)
    assert "4 spec file(s)" in lines[-1]


def test_competitions_searches_the_current_folder_by_default(tmp_path, monkeypatch):
    folder = specs_in(tmp_path)
    monkeypatch.chdir(folder)
    result = invoke("competitions")
    assert result.exit_code == 0, result.output
    assert any(line.startswith("my-folders ") and "spec file c.toml" in line for line in result.stdout.splitlines())
    missing = invoke("competitions", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "is not a folder" in missing.stderr
