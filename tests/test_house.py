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
        "print(eah_interp.hf.eah.__name__, eah_interp.nnsight.__name__, eah_interp.lens.__name__, eah_interp.patching.__name__)\n"
        "print(sorted({'hf', 'nnsight', 'lens', 'patching'} & set(dir(eah_interp))))\n"
    )
    assert out.split("\n")[:2] == [
        "eah eah_interp.nnsight eah_interp.lens eah_interp.patching",
        "['hf', 'lens', 'nnsight', 'patching']",
    ]


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        eah_interp.nope  # noqa: B018


def test_models_do_not_import_the_backends():
    """models/ is below the backends: no module-level import of hf / nnsight / lens / patching in it."""
    backends = {"eah_interp.hf", "eah_interp.nnsight", "eah_interp.lens", "eah_interp.patching"}
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


def test_introspection_lives_in_models_and_hf_reexports_it():
    from eah_interp import hf
    from eah_interp.models import introspect

    for name in ("text_config", "attention_modules", "model_shape"):
        assert getattr(hf, name) is getattr(introspect, name)
        assert name not in {n.name for n in ast.parse((PACKAGE / "hf.py").read_text()).body if isinstance(n, ast.FunctionDef)}


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
