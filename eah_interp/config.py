"""`EAHConfig`: what EAH edits, where, and how. A frozen dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from eah_interp.broadcast import REGION_CHOICES
from eah_interp.errors import ConfigError, HeadIndexError, LayerIndexError
from eah_interp.sinks import NORMALISE_CHOICES

SOURCE_CHOICES = ("auto", "fewest", "random")

#: The official code's threshold (its README documents 0.002).
OFFICIAL_THRESHOLD = 0.0008


@dataclass(frozen=True)
class EAHConfig:
    """Options of the EAH edit, validated at construction.

    Attributes:
        layers: 0-based decoder layers to edit (one or several).
        threshold: sink threshold ``tau``: image key ``j`` is a sink of head ``h`` if its sink score
            is strictly above it.
        normalise: ``d(j)`` of the sink score: ``"causal"`` (real query rows after ``j``),
            ``"official"`` (``(s + 1) + e - j`` on keys ``s + 1 .. e - 1``, the official code) or ``"rows"`` (all other real rows: for
            models with bidirectional image attention, Gemma 3 and PaliGemma).
        region: ``"full"`` (copy the whole map, EAH) or ``"image"`` (only image-key columns, rows
            keep their image mass).
        alpha: blend weight in ``(0, 1]``; 1 = plain copy (EAH).
        source: ``"auto"`` (the head with most sinks, EAH), ``"fewest"`` (the head with fewest sinks,
            a control), ``"random"`` (a seeded random head per row and layer, a control) or a fixed
            head index.
        source_top_k: with ``"auto"``, average the maps of the top-k sink heads (1 = EAH).
        target_heads: heads that receive the map (None = all heads of the layer).
        skip_if_head0: the official code's quirk: no broadcast when the chosen head is head 0.
        apply_to_decode: also edit decode steps (one query row over the KV cache); EAH edits the
            prompt (prefill) forward only.
        drop_sinks: the "sink-free" control: remove the source map's sink columns and renormalise rows.
        seed: seed of ``source="random"``.
    """

    layers: tuple[int, ...] = (1,)
    threshold: float = OFFICIAL_THRESHOLD
    normalise: str = "causal"
    region: str = "full"
    alpha: float = 1.0
    source: str | int = "auto"
    source_top_k: int = 1
    target_heads: tuple[int, ...] | None = None
    skip_if_head0: bool = False
    apply_to_decode: bool = False
    drop_sinks: bool = False
    seed: int = 0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if self.target_heads is not None:
            object.__setattr__(self, "target_heads", tuple(self.target_heads))
        self._validate()

    def _validate(self) -> None:
        if not self.layers:
            raise ConfigError("EAHConfig.layers is empty: name at least one decoder layer to edit.")
        for layer in self.layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ConfigError(f"EAHConfig.layers must be non-negative ints; got {self.layers!r}.")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"EAHConfig.layers has duplicates: {self.layers!r}.")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ConfigError(f"EAHConfig.threshold must be a number >= 0; got {self.threshold!r}.")
        if self.normalise not in NORMALISE_CHOICES:
            raise ConfigError(f"EAHConfig.normalise must be one of {NORMALISE_CHOICES}; got {self.normalise!r}.")
        if self.region not in REGION_CHOICES:
            raise ConfigError(f"EAHConfig.region must be one of {REGION_CHOICES}; got {self.region!r}.")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"EAHConfig.alpha must be in (0, 1]; got {self.alpha!r}.")
        if isinstance(self.source, bool) or not (
            self.source in SOURCE_CHOICES or (isinstance(self.source, int) and self.source >= 0)
        ):
            raise ConfigError(
                f"EAHConfig.source must be one of {SOURCE_CHOICES} or a head index >= 0; got {self.source!r}."
            )
        if not isinstance(self.source_top_k, int) or self.source_top_k < 1:
            raise ConfigError(f"EAHConfig.source_top_k must be an int >= 1; got {self.source_top_k!r}.")
        if self.source_top_k > 1 and self.source != "auto":
            raise ConfigError(
                f"source_top_k={self.source_top_k} averages the top sink heads, which only makes sense with "
                f"source='auto'; got source={self.source!r}."
            )
        if self.skip_if_head0 and self.source != "auto":
            raise ConfigError("skip_if_head0 (the official code's quirk) only applies to source='auto'.")
        if self.target_heads is not None:
            if not self.target_heads or any(not isinstance(t, int) or t < 0 for t in self.target_heads):
                raise ConfigError(f"EAHConfig.target_heads must be non-empty head indices; got {self.target_heads!r}.")
            if len(set(self.target_heads)) != len(self.target_heads):
                raise ConfigError(f"EAHConfig.target_heads has duplicates: {self.target_heads!r}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides: Any) -> EAHConfig:
        """The paper's method: layer 1 ("layer two"), true row count in ``d(j)``, official threshold."""
        base = dict(layers=(1,), normalise="causal", threshold=OFFICIAL_THRESHOLD, name="paper")
        return cls(**{**base, "name": "paper" if not overrides else "paper+", **overrides})

    @classmethod
    def reference(cls, **overrides: Any) -> EAHConfig:
        """The official code: layer 15, ``d(j) = (s + 1) + e - j`` on keys ``s + 1 .. e - 1``, threshold 0.0008, no broadcast from head 0.

        On a model with fewer than 16 layers, override ``layers``.
        """
        base = dict(
            layers=(15,), normalise="official", threshold=OFFICIAL_THRESHOLD, skip_if_head0=True, name="reference"
        )
        return cls(**{**base, "name": "reference" if not overrides else "reference+", **overrides})

    # ------------------------------------------------------------------ checks against a model
    def validate_for(self, n_layers: int, n_heads: int) -> None:
        """Raise if a layer or head index does not exist in a model with these sizes."""
        bad = [layer for layer in self.layers if layer >= n_layers]
        if bad:
            raise LayerIndexError(
                f"EAHConfig.layers {bad} out of range: the language model has {n_layers} decoder layers "
                f"(0..{n_layers - 1}). The reference preset names layer 15 (LLaVA-1.5-7B has 32); on a "
                "shallower model pass layers=... ."
            )
        heads = list(self.target_heads or ())
        if isinstance(self.source, int):
            heads.append(self.source)
        bad_heads = [h for h in heads if h >= n_heads]
        if bad_heads:
            raise HeadIndexError(f"Head indices {bad_heads} out of range: the layers have {n_heads} heads.")
        if self.source_top_k > n_heads:
            raise ConfigError(f"source_top_k={self.source_top_k} exceeds the number of heads ({n_heads}).")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["target_heads"] = None if self.target_heads is None else list(self.target_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EAHConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown EAHConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> EAHConfig:
        return cls.from_dict(json.loads(text))

    def describe(self) -> str:
        """A sentence saying exactly what this configuration does."""
        src = {
            "auto": "the head with the most vision sinks"
            + (f" (mean of the top {self.source_top_k})" if self.source_top_k > 1 else ""),
            "fewest": "the head with the fewest vision sinks (control)",
            "random": f"a random head (seed {self.seed}, control)",
        }.get(self.source, f"head {self.source}")  # type: ignore[arg-type]
        d = {"causal": "real query rows after j", "rows": "all other real query rows", "official": "(s + 1) + e - j on keys s + 1 .. e - 1 (official)"}[
            self.normalise
        ]
        what = "its whole attention map" if self.region == "full" else "its image-key attention (mass-preserving)"
        parts = [
            f"[{self.name}] At layer(s) {list(self.layers)}, find vision sinks (score = column sum / {d} "
            f"> {self.threshold:g}), take {src} and copy {what} onto "
            + ("all heads" if self.target_heads is None else f"heads {list(self.target_heads)}")
            + (f" blended with alpha={self.alpha:g}" if self.alpha != 1 else "")
            + "."
        ]
        if self.drop_sinks:
            parts.append("The source map's sink columns are removed and rows renormalised (sink-free control).")
        if self.skip_if_head0:
            parts.append("No broadcast when the chosen head is head 0 (official-code quirk).")
        parts.append("Prompt and decode steps are edited." if self.apply_to_decode else "Prompt (prefill) only.")
        return " ".join(parts)
