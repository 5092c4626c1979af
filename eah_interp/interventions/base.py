"""`Intervention`: a frozen, validated, JSON-serialisable edit that names where it acts and on what.

Each method is one small frozen dataclass (one file per method) with

* ``point``: the edit point: one of the attention call's `eah_interp.dispatch.EDIT_POINTS`
  (``"scores_premask"``, ``"scores"``, ``"probs"``, ``"values"``, ``"output"``), or a decoder layer's
  residual stream (``"residual_input"``, ``"residual_output"``; `RESIDUAL_POINTS`),
* ``tail_rows(site)``: how many trailing query rows of a call it can change at most (1 for edits of
  the last row; the rows after the image for VAF and VAR; None: any row). The backend runs the other
  rows of a prompt with the model's fast attention and recomputes only those,
* ``layers_for(n_layers)``: the layers it edits in a model of that depth (``layers=None``: the
  method's own range, scaled to depth by `eah_interp.interventions.selectors.scaled_range`),
* ``applies(layer, q_len, k_len)``: whether it edits that call (layer and phase),
* ``edit(tensor, site) -> (edited tensor, number of entries changed)``: a pure function on tensors,
  testable without a model.

Backends only know edit points, never method names: `eah_interp.hf.intervene` turns each intervention
into one step of the model's attention dispatcher.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.selectors import Site, check_layers, phase_matches

#: Edit points on the residual stream: a decoder layer's input (before its attention) and its output.
RESIDUAL_POINTS = ("residual_input", "residual_output")

#: Registered intervention classes by name (`Intervention.from_dict` reads ``"method"``).
_METHODS: dict[str, type[Intervention]] = {}


@dataclass(frozen=True)
class Intervention:
    """Base class of every intervention (see the module docstring)."""

    point: ClassVar[str] = "probs"
    last_row_only: ClassVar[bool] = False
    #: The official range ``[start, stop)`` for a 32-layer model, or None (every layer).
    default_layers: ClassVar[tuple[int, int] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _METHODS[cls.__name__] = cls

    # ------------------------------------------------------------------ where
    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """The decoder layers this intervention edits in a model with ``n_layers`` layers."""
        from eah_interp.interventions.selectors import scaled_range

        layers = getattr(self, "layers", None)
        if layers is not None:
            return tuple(layers)
        if self.default_layers is None:
            return tuple(range(n_layers))
        return scaled_range(*self.default_layers, n_layers)

    def validate_for(self, n_layers: int, n_heads: int) -> None:
        """Raise if a layer or head does not exist in a model with these sizes."""
        check_layers(self.layers_for(n_layers), n_layers, type(self).__name__)

    def validate_model(self, n_layers: int, n_heads: int, n_kv_heads: int, hidden_size: int) -> None:
        """Raise if the intervention does not fit a model of these sizes (layers, heads, KV heads, hidden size)."""
        self.validate_for(n_layers, n_heads)

    def tail_rows(self, site: Site) -> int | None:
        """How many trailing query rows of the call this edit can change (None: any row)."""
        return 1 if self.last_row_only else None

    def applies(self, layer: int, q_len: int, k_len: int, n_layers: int) -> bool:
        """Whether this intervention edits the call (its layer and phase)."""
        return layer in self.layers_for(n_layers) and phase_matches(getattr(self, "phase", "both"), q_len, k_len)

    # ------------------------------------------------------------------ what
    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        """The edited tensor and the number of entries changed (see the edit point for the shape)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A sentence saying exactly what this intervention does."""
        raise NotImplementedError

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the method's name under ``"method"``."""
        d: dict[str, Any] = {"method": type(self).__name__}
        for f in dataclasses.fields(self):
            d[f.name] = _jsonable(getattr(self, f.name))
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Intervention:
        """The intervention a `to_dict` result describes (any registered method)."""
        d = dict(d)
        name = d.pop("method", None)
        if name not in _METHODS:
            raise ConfigError(f"Unknown intervention method {name!r}; known: {sorted(_METHODS)}.")
        cls = _METHODS[name]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown {name} fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @staticmethod
    def from_json(text: str) -> Intervention:
        return Intervention.from_dict(json.loads(text))

    def _layers_text(self) -> str:
        layers = getattr(self, "layers", None)
        if layers is not None:
            return f"layers {list(layers)}"
        if self.default_layers is None:
            return "every layer"
        start, stop = self.default_layers
        return f"layers {start}..{stop - 1} of a 32-layer model (scaled to depth)"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class InterventionRecord:
    """What one intervention did in one attention call.

    Attributes:
        intervention: the method's name (``type(intervention).__name__``).
        index: its position in the ``intervene`` list.
        layer: the decoder layer.
        point: the edit point.
        q_len, k_len: query rows and key positions of the call (for a residual edit: the layer's positions in
            this forward and the positions of the sequence so far).
        changed: how many entries (scores / probabilities / value or output or hidden-state entries) it changed.
        eah: for EAH, its `eah_interp.edit.EditRecord` (source heads, sink counts).
    """

    intervention: str
    index: int
    layer: int
    point: str
    q_len: int
    k_len: int
    changed: int
    eah: Any = None

    def __repr__(self) -> str:
        extra = f", source_head={self.eah.source_head.tolist()}" if self.eah is not None else ""
        return (
            f"InterventionRecord({self.intervention}#{self.index}, layer={self.layer}, {self.point}, "
            f"q={self.q_len}, k={self.k_len}, changed={self.changed}{extra})"
        )



def records_of(records: Iterable[InterventionRecord], which: int | str) -> list[InterventionRecord]:
    """The records of one intervention: its index in the ``intervene`` list, or its method name."""
    if isinstance(which, int):
        return [r for r in records if r.index == which]
    return [r for r in records if r.intervention == which]


class InterventionRecords(list):
    """The `InterventionRecord` list of one ``intervene`` call, read like `eah_interp.hf.InterventionRun`.

    ``run.records`` (itself), ``run.interventions`` and ``run.of(which)`` are what ``hf.intervene(...)``
    yields, so code reading records works whichever backend made them; it is still a plain list.
    """

    def __init__(self, interventions: Iterable[Any] = (), records: Iterable[InterventionRecord] = ()) -> None:
        super().__init__(records)
        self.interventions = tuple(interventions)

    @property
    def records(self) -> InterventionRecords:
        """The records themselves (as ``InterventionRun.records``)."""
        return self

    def of(self, which: int | str) -> list[InterventionRecord]:
        """The records of one intervention: its index in the list, or its method name."""
        return records_of(self, which)

def count(mask: Tensor) -> int:
    """Number of True entries of a boolean tensor, as an int."""
    return int(mask.sum())
