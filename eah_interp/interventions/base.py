"""`Intervention`: a frozen, validated, JSON-serialisable edit that names where it acts and on what.

Each method is one small frozen dataclass (one file per method). The base class holds what every method
has and declares what a backend may ask of one:

* ``layers`` / ``phase`` (keyword-only fields, validated here once): the decoder layers it edits
  (``None``: the method's own range, `default_layers` scaled to depth by `scaled_range`) and the
  forwards (``"prefill"``: the prompt, ``"decode"``: steps over a KV cache, ``"both"``),
* ``point``: the edit point: one of the attention call's `eah_interp.dispatch.EDIT_POINTS`
  (``"scores_premask"``, ``"scores"``, ``"probs"``, ``"values"``, ``"output"``), or a decoder layer's
  residual stream (`RESIDUAL_POINTS`),
* capabilities: ``reads_hidden`` (it reads each edited layer's input hidden states: `hidden_flags`,
  handed back in ``site.key_flags``), `tail_rows` (how many trailing query rows it can change: the
  backend recomputes only those), `row_mask` (for value edits: the rows that read the edited values),
  `map_free` (a way to compute the edited layer without a probability map),
* ``edit(tensor, site) -> (edited tensor, entries changed)``: a pure function on tensors, testable
  without a model; `edit_with_detail` adds the method's own record (EAH's `EditRecord`).

Backends only know edit points, never method names: `eah_interp.interventions.compile` turns a list into
the attention dispatcher's steps and the residual edits, and every backend returns one `InterventionRun`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from jaxtyping import Bool
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.selectors import (
    PHASES,
    Site,
    as_layers,
    check_choice,
    check_layers,
    phase_matches,
    scaled_range,
)

if TYPE_CHECKING:
    from eah_interp.chunked import AttentionSums
    from eah_interp.dispatch import AttentionCall
    from eah_interp.edit import EditRecord
    from eah_interp.layout import TokenLayout
    from eah_interp.models.adapters import Adapter

#: Edit points on the residual stream: a decoder layer's input (before its attention) and its output.
RESIDUAL_POINTS = ("residual_input", "residual_output")

#: Intervention classes by name (`Intervention.from_dict` reads ``"method"``); every subclass is added.
_METHODS: dict[str, type[Intervention]] = {}

#: ``map_free(call, layout, statistics) -> (output, entries changed, detail, sums of the edited layer)``.
MapFree = Callable[["AttentionCall", "TokenLayout", bool], tuple[Tensor, int, Any, "AttentionSums"]]


@dataclass(frozen=True)
class Intervention:
    """Base class of every intervention (see the module docstring).

    Args:
        layers: decoder layers to edit (keyword-only); None: the method's own range, scaled to depth.
        phase: ``"both"``, ``"prefill"`` or ``"decode"`` (keyword-only).
    """

    layers: tuple[int, ...] | None = field(default=None, kw_only=True)
    phase: str = field(default="both", kw_only=True)

    point: ClassVar[str] = "probs"
    #: It reads each edited layer's input hidden states (`hidden_flags`; VAR's massive-activation sinks).
    reads_hidden: ClassVar[bool] = False
    #: It edits only the call's last query row (the default `tail_rows` is then 1).
    last_row_only: ClassVar[bool] = False
    #: The official range ``[start, stop)`` for a 32-layer model, or None (every layer).
    default_layers: ClassVar[tuple[int, int] | None] = None

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register:  # a shared base of several methods passes register=False
            _METHODS[cls.__name__] = cls

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "layers", as_layers(self.layers, name))
        check_choice(f"{name}.phase", self.phase, PHASES)
        self.check()

    def check(self) -> None:
        """Validate the method's own fields (raise `ConfigError`); ``layers`` and ``phase`` are checked already."""

    # ------------------------------------------------------------------ where
    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        """The decoder layers this intervention edits in a model with ``n_layers`` layers."""
        if self.layers is not None:
            return tuple(self.layers)
        if self.default_layers is None:
            return tuple(range(n_layers))
        return scaled_range(*self.default_layers, n_layers)

    def validate_for(
        self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        """Raise if the intervention does not fit a model of these sizes (`LayerIndexError` naming its depth)."""
        check_layers(self.layers_for(n_layers), n_layers, type(self).__name__)

    def applies(self, layer: int, q_len: int, k_len: int, n_layers: int) -> bool:
        """Whether this intervention edits the call (its layer and phase)."""
        return layer in self.layers_for(n_layers) and phase_matches(self.phase, q_len, k_len)

    # ------------------------------------------------------------------ capabilities
    def tail_rows(self, site: Site) -> int | None:
        """How many trailing query rows of the call this edit can change (None: any row)."""
        return 1 if self.last_row_only else None

    def row_mask(self, site: Site) -> Bool[Tensor, "batch q"] | None:
        """For a value edit: the query rows that read the edited values (None: every row)."""
        return None

    def hidden_flags(self, hidden: Tensor) -> Bool[Tensor, "batch seq"]:
        """With ``reads_hidden``: per-position flags from a layer's input hidden states ``[batch, seq, d]``
        (given to `edit` as ``site.key_flags``; positions generated later are never flagged)."""
        raise NotImplementedError(f"{type(self).__name__} does not read hidden states.")

    def map_free(self, site: Site) -> MapFree | None:
        """A way to compute the whole edited layer of this call without a probability map, or None."""
        return None

    def warnings_for(self, adapter: Adapter) -> list[str]:
        """What a user should know before applying this intervention to a model family (none by default)."""
        return []

    # ------------------------------------------------------------------ what
    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        """The edited tensor and the number of entries changed (see the edit point for the shape)."""
        raise NotImplementedError

    def edit_with_detail(self, tensor: Tensor, site: Site) -> tuple[Tensor, int, Any]:
        """`edit` and the method's own record of the call (None; EAH: its `EditRecord`)."""
        return (*self.edit(tensor, site), None)

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Intervention:
        """The intervention a `to_dict` result describes (any method; ``"method"`` may be left out on a subclass)."""
        d = dict(d)
        name = d.pop("method", None) or (cls.__name__ if cls is not Intervention else None)
        if name not in _METHODS:
            raise ConfigError(f"Unknown intervention method {name!r}; known: {sorted(_METHODS)}.")
        method = _METHODS[name]
        known = {f.name for f in dataclasses.fields(method)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown {name} fields {sorted(unknown)}; known: {sorted(known)}.")
        return method(**d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Intervention:
        return cls.from_dict(json.loads(text))

    def _layers_text(self) -> str:
        if self.layers is not None:
            return f"layers {list(self.layers)}"
        if self.default_layers is None:
            return "every layer"
        start, stop = self.default_layers
        return f"layers {start}..{stop - 1} of a 32-layer model (scaled to depth)"


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def count(mask: Tensor) -> int:
    """Number of True entries of a boolean tensor, as an int."""
    return int(mask.sum())


# ---------------------------------------------------------------------------- what a run did
@dataclass
class InterventionRecord:
    """What one intervention did in one call (an attention call, or a decoder layer's residual stream).

    Attributes:
        intervention: the method's name (``type(intervention).__name__``).
        index: its position in the ``intervene`` list.
        layer: the decoder layer.
        point: the edit point.
        q_len, k_len: query rows and key positions of the call (for a residual edit: the layer's positions in
            this forward and the positions of the sequence so far).
        changed: how many entries (scores / probabilities / value or output or hidden-state entries) it changed;
            for EAH, the batch rows whose map was broadcast.
        eah: for EAH, its `eah_interp.edit.EditRecord` (source heads, sink counts); else None.
    """

    intervention: str
    index: int
    layer: int
    point: str
    q_len: int
    k_len: int
    changed: int
    eah: EditRecord | None = None

    @property
    def phase(self) -> str:
        """``"prefill"`` (a prompt forward: as many query rows as keys) or ``"decode"``."""
        return "prefill" if self.q_len == self.k_len else "decode"

    @property
    def source_head(self) -> Tensor:
        """EAH's source head per batch row (``-1`` where nothing was broadcast); only EAH records have one."""
        if self.eah is None:
            raise AttributeError(f"A {self.intervention} record has no source head (only EAH records do).")
        return self.eah.source_head

    def __repr__(self) -> str:
        extra = f", source_head={self.eah.source_head.tolist()}" if self.eah is not None else ""
        return (
            f"InterventionRecord({self.intervention}#{self.index}, layer={self.layer}, {self.point}, "
            f"q={self.q_len}, k={self.k_len}, changed={self.changed}{extra})"
        )


@dataclass
class InterventionRun:
    """What one ``intervene`` did, whatever the backend: one `InterventionRecord` per edit made, in order.

    Attributes:
        interventions: the interventions, in list order.
        records: the records (filled while the model runs).
        n_layers: the model's depth (resolves ``layers=None`` in `summary`), once the backend knows it.
    """

    interventions: tuple[Intervention, ...]
    records: list[InterventionRecord] = field(default_factory=list)
    n_layers: int | None = None

    def of(self, which: int | str) -> list[InterventionRecord]:
        """The records of one intervention: its index in the list, or its method name."""
        if isinstance(which, int):
            return [r for r in self.records if r.index == which]
        return [r for r in self.records if r.intervention == which]

    def source_heads(self, layer: int | None = None) -> list[list[int]]:
        """EAH's source head per batch row of each EAH record (optionally of one layer), ``-1`` where none."""
        return [r.source_head.tolist() for r in self.records if r.eah is not None and layer in (None, r.layer)]

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready dict: per intervention, its resolved layers, edits and entries changed per phase
        and layer, and (EAH) how often each head was the source head in prompt forwards, per layer.

        Example:
            ``{"interventions": [{"index": 0, "method": "EAH", "layers": [1], "prefill": {"1": {"edits": 2,
            "changed": 4}}, "decode": {}, "source_heads": {"1": {"3": 4}}}]}``
        """
        out = []
        for index, item in enumerate(self.interventions):
            records = self.of(index)
            entry: dict[str, Any] = {
                "index": index,
                "method": type(item).__name__,
                "layers": None if self.n_layers is None else list(item.layers_for(self.n_layers)),
                "prefill": {},
                "decode": {},
            }
            heads: dict[str, Counter] = {}
            for r in records:
                cell = entry[r.phase].setdefault(str(r.layer), {"edits": 0, "changed": 0})
                cell["edits"] += 1
                cell["changed"] += int(r.changed)
                if r.eah is not None and r.phase == "prefill":
                    heads.setdefault(str(r.layer), Counter()).update(str(h) for h in r.source_head.tolist())
            if heads:
                entry["source_heads"] = {layer: dict(sorted(c.items())) for layer, c in heads.items()}
            out.append(entry)
        return {"interventions": out}
