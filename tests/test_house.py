"""The package's house rules: backends reachable as attributes, imports that run one way, probes that refuse empty ids."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eah_interp
from eah_interp.metrics.probes import yes_no_logit_diff

PACKAGE = Path(eah_interp.__file__).parent


def _fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_backends_are_attributes_of_the_package():
    """``import eah_interp; eah_interp.hf.eah(...)`` as the docstrings write it (was AttributeError)."""
    out = _fresh(
        "import sys, eah_interp\n"
        "assert 'eah_interp.hf' not in sys.modules  # lazy: importing the package does not load the backends\n"
        "print(eah_interp.hf.eah.__name__, eah_interp.nnsight.__name__, eah_interp.transformer_lens.__name__, eah_interp.patching.__name__)\n"
        "print(sorted({'hf', 'nnsight', 'transformer_lens', 'patching'} & set(dir(eah_interp))))\n"
    )
    assert out.split("\n")[:2] == [
        "eah eah_interp.nnsight eah_interp.transformer_lens eah_interp.patching",
        "['hf', 'nnsight', 'patching', 'transformer_lens']",
    ]


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        eah_interp.nope  # noqa: B018


def test_models_do_not_import_the_backends():
    """models/ is below the backends: no module-level import of hf / nnsight / transformer_lens / patching in it."""
    backends = {"eah_interp.hf", "eah_interp.nnsight", "eah_interp.transformer_lens", "eah_interp.patching"}
    offenders = []
    for path in (PACKAGE / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: check_model imports hf inside its body, on purpose
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                if names & backends:
                    offenders.append(f"{path.name}: from {node.module} import ...")
            elif isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name in backends]
    assert offenders == []
    out = _fresh(f"import sys, eah_interp.models\nprint(sorted(m for m in sys.modules if m in {sorted(backends)!r}))")
    assert out.strip() == "[]"


def test_backends_export_only_their_own_names():
    """``__all__`` of each backend lists what it defines (no re-exports "for existing callers"), and the model
    introspection they share lives in ``eah_interp.models``, defined in no backend."""
    import importlib

    for backend in ("hf", "nnsight", "transformer_lens"):
        module = importlib.import_module(f"eah_interp.{backend}")
        tree = ast.parse((PACKAGE / f"{backend}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)} | {
            t.id for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)
        }
        assert set(module.__all__) <= defined, (backend, sorted(set(module.__all__) - defined))
        assert not {"text_config", "attention_modules", "model_shape", "decoder_layers"} & defined, backend


# ---------------------------------------------------------------------------------------------- layers
#: The floors of the package, lowest first: a module imports only from its own floor or below. A module
#: named by its first dotted part (``models`` covers ``models.adapters``); the package ``__init__`` is exempt.
FLOORS = (
    ("core", ("errors", "compat", "cache", "native", "layout", "sinks", "broadcast", "chunked", "head_stats",
              "scenes", "metrics", "data", "resumable")),
    ("interventions, dispatch, models", ("edit", "interventions", "dispatch", "models")),
    ("backends and their sites", ("hf", "nnsight", "transformer_lens", "sites")),
    ("analysis and experiments", ("patching", "attribution", "logit_lens", "probing", "experiments", "evaluation",
                                  "distributed")),
    ("CLI and integrations", ("cli", "integrations")),
)
#: Imports inside a function that reach up, on purpose: ``check_model`` runs the HF backend on a new model.
UPWARD_ALLOWED = {("eah_interp.models.validate", "eah_interp.hf")}


def test_the_studies_sit_outside_the_package():
    """The studies are repository scripts beside benchmarks/ (not in the wheel): nothing in eah_interp imports them."""
    import re

    assert not (PACKAGE / "studies").exists() and (PACKAGE.parent / "studies" / "__main__.py").exists()
    importers = [p.name for p in PACKAGE.rglob("*.py") if re.search(r"^\s*(from|import) studies\b", p.read_text(), re.M)]
    assert importers == []


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("eah_interp", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """``(imported eah_interp module, at module level)`` for each runtime import (``TYPE_CHECKING`` blocks skipped)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    top = {id(n) for node in tree.body for n in ast.walk(node)
           if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.ImportFrom):
            if not (node.module or "").startswith("eah_interp"):
                continue
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            names = [a.name for a in node.names if a.name.startswith("eah_interp")]
        out += [(name, id(node) in top) for name in names if name in modules]
    return out


def _floor(module: str) -> int:
    part = module.split(".")[1]
    for index, (_, names) in enumerate(FLOORS):
        if part in names:
            return index
    raise AssertionError(f"{module} is on no floor: add it to tests/test_house.py FLOORS")


def test_no_module_imports_from_a_floor_above_it():
    """core <- interventions / dispatch / models <- backends <- analysis and experiments <- CLI."""
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "eah_interp":
            continue
        for target, _ in _imports(path, modules):
            if target != "eah_interp" and _floor(target) > _floor(name) and (name, target) not in UPWARD_ALLOWED:
                upward.append(f"{name} ({FLOORS[_floor(name)][0]}) imports {target} ({FLOORS[_floor(target)][0]})")
    assert upward == []


def test_no_import_cycle_at_module_level():
    modules = _modules()
    graph = {name: {t for t, top in _imports(path, modules) if top and t != name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(name):], name]))
        if name in done:
            return
        for target in sorted(graph.get(name, ())):
            if not (target == "eah_interp" or name.startswith(target + ".")):  # a package imports its own parts
                visit(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# ---------------------------------------------------------------------------------------------- trap 7
def test_yes_no_logit_diff_refuses_empty_ids():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="yes_ids is empty"):
        yes_no_logit_diff(logits, [], [1])
    with pytest.raises(ValueError, match="no_ids is empty"):
        yes_no_logit_diff(logits, [0], [])


def test_yes_no_logit_diff_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"no_ids \[10\] are outside the vocabulary \(0..9\)"):
        yes_no_logit_diff(torch.randn(2, 10), [0], [1, 10])


def test_yes_no_logit_diff_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    # p(yes) = 0.5 + 0.125, p(no) = 0.25
    assert yes_no_logit_diff(logits, [0, 2], [1]).item() == pytest.approx(float(torch.log(torch.tensor(0.625 / 0.25))))
