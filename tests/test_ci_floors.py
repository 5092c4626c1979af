"""`.ci/floors.py`: pyproject's floors become the floor environment's constraints; CI fails when it should."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _floors_module():
    spec = importlib.util.spec_from_file_location("ci_floors", ROOT / ".ci" / "floors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


floors = _floors_module()


def _pyproject(tmp_path: Path, deps: list[str], test: list[str]) -> Path:
    path = tmp_path / "pyproject.toml"
    quote = lambda items: ", ".join(f'"{x}"' for x in items)  # noqa: E731
    path.write_text(
        f'[project]\nname = "x"\ndependencies = [{quote(deps)}]\n'
        f"[project.optional-dependencies]\ntest = [{quote(test)}]\ndocs = [\"never-read>=9\"]\n"
    )
    return path


def test_every_lower_bound_becomes_an_exact_pin(tmp_path):
    path = _pyproject(tmp_path, ["torch>=2.6.0", "Transformer_Lens >= 4.2.0", "exact==0.1.0"], ["mkdocstrings[python]>=1.0.7"])
    assert floors.floors(path) == {
        "torch": "2.6.0",
        "transformer-lens": "4.2.0",
        "exact": "0.1.0",
        "mkdocstrings": "1.0.7",
    }


@pytest.mark.parametrize("requirement", ["torch", "torch<3", "torch>=2.6,<3", "torch~=2.6"])
def test_a_requirement_without_one_lower_bound_is_refused(tmp_path, requirement):
    with pytest.raises(SystemExit, match="no single lower bound"):
        floors.floors(_pyproject(tmp_path, [requirement], []))


def test_two_different_floors_for_one_package_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="two floors"):
        floors.floors(_pyproject(tmp_path, ["ruff>=0.13.0"], ["ruff>=0.5"]))


def test_the_repository_pyproject_has_a_floor_for_every_dependency():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = floors.floors()
    assert len(found) == len(project["dependencies"]) + len(project["optional-dependencies"]["test"])
    assert found["transformers"] == "5.21.0" and found["torch"] == "2.6.0"


@pytest.mark.parametrize(
    ("installed", "floor", "same"),
    [("8.0.0", "8", True), ("2.6.0+cpu", "2.6.0", True), ("2.6.1", "2.6.0", False), ("2.13.0", "2.1.3", False)],
)
def test_installed_versions_compare_by_release(installed, floor, same):
    assert (floors._release(installed) == floors._release(floor)) is same


def test_check_names_each_dependency_not_at_its_floor():
    wrong = floors.check({"pytest": "0.0.1", "no-such-distribution-here": "1.0"})
    assert any(line.startswith("pytest: installed ") and line.endswith("floor 0.0.1") for line in wrong)
    assert "no-such-distribution-here: installed none, floor 1.0" in wrong


@pytest.mark.parametrize(("pytest_code", "ci_code"), [(0, 0), (1, 1), (2, 2), (5, 1)])
def test_no_tests_collected_fails_the_floor_run(pytest_code, ci_code):
    assert floors.suite_status(pytest_code) == ci_code


def test_ci_runs_the_floor_environment_and_it_runs_the_suite():
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ".ci/floor-env" in [line.strip() for line in run]
    env = [line.strip() for line in (ROOT / ".ci" / "floor-env").read_text().splitlines()]
    assert "set -euo pipefail" in env
    assert "python .ci/floors.py > .venv-floors/constraints.txt" in env
    assert 'pip install -q -c .venv-floors/constraints.txt -e ".[test]"' in env
    assert env.index("python .ci/floors.py --check") < env.index("python .ci/floors.py --pytest")
