"""Interventions: frozen, validated, JSON-serialisable edits that name where they act and on what.

EAH is one of them (`EAH.paper()`, `EAH.reference()`). ``intervene(model, [EAH.paper(), PAI()])`` of any
backend (`eah_interp.hf`, `eah_interp.nnsight`, `eah_interp.transformer_lens`) applies several in one run,
in list order within each edit point (see `eah_interp.dispatch.run_steps` for the order of the points
inside an attention call; `ResidualEdit` acts on a decoder layer's input before them and its output after
them), and returns one `InterventionRun` recording what each did. The list is compiled for a model by
`eah_interp.interventions.compile.Plan`. A new method is one subclass of `Intervention` (see its
docstring). Sources and defaults of every method: docs/methods.md.
"""

from eah_interp.interventions.adhh import ADHH
from eah_interp.interventions.base import Intervention, InterventionRecord, InterventionRun
from eah_interp.interventions.eah import EAH
from eah_interp.interventions.head_scale import HeadScale
from eah_interp.interventions.knockout import Knockout
from eah_interp.interventions.middle import MiddleLayerBoost
from eah_interp.interventions.pai import PAI
from eah_interp.interventions.residual import ResidualEdit
from eah_interp.interventions.selectors import PHASES, ROWS, SPANS, Site, scaled_range
from eah_interp.interventions.spec import format_spec, parse, presets, register_preset
from eah_interp.interventions.synthetic import SyntheticMap
from eah_interp.interventions.vaf import VAF
from eah_interp.interventions.values import ValueEdit
from eah_interp.interventions.var import VAR

__all__ = [
    "ADHH",
    "EAH",
    "PHASES",
    "ROWS",
    "SPANS",
    "HeadScale",
    "Intervention",
    "InterventionRecord",
    "InterventionRun",
    "Knockout",
    "MiddleLayerBoost",
    "PAI",
    "ResidualEdit",
    "Site",
    "SyntheticMap",
    "VAF",
    "VAR",
    "ValueEdit",
    "format_spec",
    "parse",
    "presets",
    "register_preset",
    "scaled_range",
]
