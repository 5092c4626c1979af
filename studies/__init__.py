"""Studies: scripted experiments on the organism that regenerate one section of ``docs/results.md``.

Each study is a module of this package with a ``main(out: Path, *, quick: bool = False, **options) -> Path``
function that writes its report (``report.md``, tables, figures, JSON) into ``out`` incrementally (a rerun
resumes) and returns the report's path. ``python -m studies NAME --out DIR`` runs one, from a checkout.

* ``methods``: EAH among its peers (PAI, VAR, VAF, middle-layer boost, AD-HH, head scaling) on the organism.
* ``explain``: why the broadcast changes the organism's answers (source head, visual evidence, where the
  change travels, controls), with a discovery and a replication split.
* ``sinks``: the organism's heads against the sink null models, and EAH's sinks vs massive-activation sinks.

They live in the repository beside ``benchmarks/``, not in the wheel: like the benchmarks they regenerate the
project's own documented numbers (into ``docs/``), and they are experiments on eah-interp's public API, not
part of it (their helpers may change). Nothing in ``eah_interp`` imports them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

STUDIES: dict[str, str] = {
    "methods": "studies.methods",
    "explain": "studies.explain",
    "sinks": "studies.sinks",
}


def run_study(name: str, out: Path, *, quick: bool = False, **options: Any) -> Path:
    """Run the study ``name`` into the folder ``out``.

    Args:
        name: a key of ``STUDIES``.
        out: output folder (created; a rerun resumes from what is there).
        quick: a small, fast version (for tests and smoke runs), not the numbers in the docs.
        **options: passed to the study's ``main``.

    Returns:
        The path of the written ``report.md``.
    """
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; choose one of {sorted(STUDIES)}.")
    module = importlib.import_module(STUDIES[name])
    return module.main(Path(out), quick=quick, **options)
