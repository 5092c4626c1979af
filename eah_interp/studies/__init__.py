"""Studies: scripted experiments on a model that regenerate one section of ``docs/results.md``.

Each study is a module of this package with a ``main(out: Path, *, quick: bool = False, **options) -> Path``
function that writes its report (``report.md``, tables, figures, JSON) into ``out`` incrementally (a rerun
resumes) and returns the report's path. ``eah-interp study NAME --out DIR`` runs one.

* ``methods``: EAH among its peers (PAI, VAR, VAF, middle-layer boost, AD-HH, head scaling) on the organism.
* ``explain``: why the broadcast changes the organism's answers (source head, visual evidence, where the
  change travels, controls), with a discovery and a replication split.
* ``sinks``: the organism's heads against the sink null models, and EAH's sinks vs massive-activation sinks.

They ship in the wheel with the organism they run on, so an installed copy regenerates ``docs/results``
with one command; they are experiments on the public API, not API (their helpers may change).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

STUDIES: dict[str, str] = {
    "methods": "eah_interp.studies.methods",
    "explain": "eah_interp.studies.explain",
    "sinks": "eah_interp.studies.sinks",
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
