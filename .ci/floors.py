#!/usr/bin/env python3
"""pyproject.toml's dependency floors as a pip constraints file, or a check that an environment is at them.

    python .ci/floors.py                # print "name==floor" for every dependency and test extra
    python .ci/floors.py --check        # exit 1 unless every installed version equals its floor
    python .ci/floors.py --pytest       # run the README's test command; "no tests collected" is a failure

pyproject stays the single source of truth: each requirement ``name>=X`` (or ``name==X``) becomes
``name==X``; a requirement without a lower bound is an error (a floor nobody tests is not a floor).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = ("test",)  # the extras CI installs (pip install -e ".[test]")
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._\-]*)(?:\[[^\]]*\])?\s*(?P<op>>=|==)\s*(?P<version>[0-9][0-9A-Za-z.+!]*)\s*$"
)


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{distribution: floor}`` for every dependency and every extra in `EXTRAS`, in pyproject order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project.get("optional-dependencies", {}).get(extra, [])
    found: dict[str, str] = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(
                f"{pyproject.name}: {requirement!r} has no single lower bound; write it as 'name>=X' "
                "(X being the oldest version the floor environment passes with)."
            )
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        if found.get(name, match["version"]) != match["version"]:
            raise SystemExit(f"{pyproject.name}: {name} has two floors, {found[name]} and {match['version']}.")
        found[name] = match["version"]
    return found


def _release(version: str) -> tuple[str, ...]:
    """A version's release numbers without trailing zeros or a local label: "8" == "8.0.0", "2.6.0+cpu" == "2.6"."""
    parts = version.split("+")[0].split(".")
    while len(parts) > 1 and parts[-1] == "0":
        parts.pop()
    return tuple(parts)


def check(wanted: dict[str, str]) -> list[str]:
    """Lines ``name: installed X, floor Y`` for every distribution not installed at its floor."""
    wrong = []
    for name, floor in wanted.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "none"
        if _release(installed) != _release(floor):
            wrong.append(f"{name}: installed {installed}, floor {floor}")
    return wrong


def suite_status(pytest_code: int) -> int:
    """CI's exit status for a pytest exit code: 0 only if tests ran and passed (5, "no tests collected", is 1)."""
    if pytest_code == 5:
        print("pytest collected no tests: the suite did not run", file=sys.stderr)
        return 1
    return pytest_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the running environment against the floors")
    parser.add_argument("--pytest", action="store_true", help="run python -m pytest -q; no tests collected fails")
    args = parser.parse_args()
    if args.pytest:
        return suite_status(subprocess.call([sys.executable, "-m", "pytest", "-q"]))
    wanted = floors()
    if not args.check:
        print("\n".join(f"{name}=={version}" for name, version in wanted.items()))
        return 0
    wrong = check(wanted)
    for line in wrong:
        print(f"not at its floor: {line}", file=sys.stderr)
    if not wrong:
        print(f"all {len(wanted)} dependencies at their floors")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
