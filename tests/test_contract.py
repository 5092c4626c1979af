"""The README's two commands are the contract: `.ci/run` must run exactly them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_has_a_setup_and_a_test_command():
    setup, test = readme_commands()
    assert setup.startswith("python3 -m venv .venv") and setup.endswith("eah-interp demo")
    assert test == ". .venv/bin/activate && python -m pytest -q"


def test_ci_runs_the_readme_install_steps_and_exactly_the_test_command():
    setup, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    steps = [s.strip() for s in setup.split("&&")]
    installs = [s for s in steps if s.startswith("pip install")]
    assert len(installs) == 3
    for step in installs:
        assert any(line.replace(" -q", "").strip() == step for line in ci), f".ci/run lacks the README step {step!r}"
    assert ci[-1].strip() == test
