"""The documentation site builds with ``mkdocs build --strict``, offline, and the README links resolve."""

from __future__ import annotations

import ast
import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation site, built once for this module with ``mkdocs build --strict``."""
    tmp_path = tmp_path_factory.mktemp("docs")
    env = dict(os.environ)
    env["NO_MKDOCS_2_WARNING"] = "1"  # Material's end-of-life banner (not a build warning)
    # Any attempt to reach the network (plugins fetching inventories, fonts, ...) fails fast.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[var] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        "mkdocs build --strict failed (install the docs tools with pip install -e '.[test]'):\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return tmp_path / "site"


def test_mkdocs_build_strict(site: Path) -> None:
    """Every nav entry exists, every relative link and anchor resolves, every docstring renders."""
    assert (site / "index.html").is_file()
    assert (site / "api" / "index.html").is_file()


# ---------------------------------------------------------------------------- docstring examples
_EXAMPLE_TITLE = re.compile(r"^[ \t]*Examples?:[ \t]*$")


def _example_lines(docstring: str) -> list[str]:
    """The ``>>>`` / ``...`` lines of a docstring's ``Example:`` / ``Examples:`` sections (prompts kept)."""
    lines, found, inside = docstring.expandtabs().splitlines(), [], False
    for line in lines:
        if _EXAMPLE_TITLE.match(line):
            inside = True
        elif inside and line.strip() and not line.startswith(" "):  # the section ends at a dedent to 0
            inside = False
        elif inside and line.strip().startswith((">>>", "...")):
            found.append(line.strip())
    return found


def _documented_docstrings(module: str, members: bool) -> list[tuple[str, str]]:
    """``(object name, docstring)`` of a module and (with ``members``) its public functions, classes, methods."""
    base = ROOT / Path(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    tree = ast.parse(path.read_text())
    found = [(module, ast.get_docstring(tree) or "")]
    if members:
        for node in tree.body:
            if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ) and not node.name.startswith("_"):
                found.append((f"{module}.{node.name}", ast.get_docstring(node) or ""))
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                            not sub.name.startswith("_") or sub.name == "__init__"
                        ):
                            found.append((f"{module}.{node.name}.{sub.name}", ast.get_docstring(sub) or ""))
    return found


def _code_text(page: Path) -> str:
    """The text of every ``<pre>`` block of a built page, tags stripped and entities decoded."""
    blocks = re.findall(r"<pre[^>]*>(.*?)</pre>", page.read_text(), flags=re.S)
    return "\n".join(html.unescape(re.sub(r"<[^>]+>", "", b)) for b in blocks)


def test_docstring_examples_render_as_code_blocks(site: Path) -> None:
    """Every ``>>>`` line of a documented ``Example:`` section appears inside a code block of its API page.

    Without tools/griffe_examples.py griffe takes ``Example:`` for an admonition and renders its ``>>>``
    lines as nested block quotes run together into one paragraph.
    """
    checked, missing = 0, []
    for md in sorted((ROOT / "docs" / "api").glob("*.md")):
        text = md.read_text()
        directives = list(re.finditer(r"^::: (\S+)\n((?:[ \t]+.*\n)*)", text, flags=re.M))
        if not directives:
            continue
        page = site / "api" / ("index.html" if md.stem == "index" else f"{md.stem}/index.html")
        code = _code_text(page)
        code_lines = {line.strip() for line in code.splitlines()}
        for directive in directives:
            members = "members: false" not in directive.group(2)
            for name, docstring in _documented_docstrings(directive.group(1), members):
                for line in _example_lines(docstring):
                    checked += 1
                    if line not in code_lines:
                        missing.append(f"{md.name}: {name}: {line!r}")
    assert checked >= 10, (
        f"only {checked} example lines found in the documented docstrings: is the parser broken?"
    )
    assert not missing, "example lines not rendered inside a code block:\n" + "\n".join(missing)


def test_readme_documentation_links_exist() -> None:
    """The README's relative links into docs/ point at files that exist."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets, "README.md links no docs/ page"
    missing = sorted({t for t in targets if not (ROOT / t).is_file()})
    assert not missing, f"README.md links to missing files: {missing}"
