"""EAH ("Enhancing Attention Heads", Zhang et al., arXiv 2411.09968): broadcast the attention map of the
head with the most vision sinks onto the other heads of a shallow layer.

`EAH.paper` is the method as the paper states it, `EAH.reference` the authors' code as docs/method.md
summarises it (second-hand). The edit itself is `eah_interp.edit.apply_eah_to_probs`; plain copies of a
prompt run map-free (`eah_interp.edit.map_free_eah`). Every choice is documented in docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from eah_interp.broadcast import REGION_CHOICES
from eah_interp.edit import EditRecord, apply_eah_to_probs, is_plain_copy, map_free_eah
from eah_interp.errors import ConfigError, HeadIndexError
from eah_interp.interventions.base import Intervention, MapFree, count
from eah_interp.interventions.selectors import Site, check_choice
from eah_interp.sinks import NORMALISE_CHOICES, OFFICIAL_THRESHOLD, normaliser_warning

SOURCE_CHOICES = ("auto", "fewest", "random")


@dataclass(frozen=True)
class EAH(Intervention):
    """Copy the attention map of the head with the most vision sinks onto the layer's heads.

    Args:
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
        drop_sinks: the "sink-free" control: remove the source map's sink columns and renormalise rows.
        seed: seed of ``source="random"``.
        name: a label (not compared).
        layers: 0-based decoder layers to edit (keyword-only; default ``(1,)``).
        phase: ``"prefill"`` (EAH: the prompt forward), ``"both"`` (decode steps too: one query row over
            the KV cache) or ``"decode"`` (keyword-only).
    """

    threshold: float = OFFICIAL_THRESHOLD
    normalise: str = "causal"
    region: str = "full"
    alpha: float = 1.0
    source: str | int = "auto"
    source_top_k: int = 1
    target_heads: tuple[int, ...] | None = None
    skip_if_head0: bool = False
    drop_sinks: bool = False
    seed: int = 0
    name: str = field(default="custom", compare=False)
    layers: tuple[int, ...] | None = field(default=(1,), kw_only=True)
    phase: str = field(default="prefill", kw_only=True)

    point: ClassVar[str] = "probs"

    def check(self) -> None:
        if self.layers is None:
            raise ConfigError("EAH.layers is None: name at least one decoder layer to edit (the paper: layers=(1,)).")
        if self.target_heads is not None:
            object.__setattr__(self, "target_heads", tuple(self.target_heads))
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ConfigError(f"EAH.threshold must be a number >= 0; got {self.threshold!r}.")
        check_choice("EAH.normalise", self.normalise, NORMALISE_CHOICES)
        check_choice("EAH.region", self.region, REGION_CHOICES)
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ConfigError(f"EAH.alpha must be in (0, 1]; got {self.alpha!r}.")
        if isinstance(self.source, bool) or not (
            self.source in SOURCE_CHOICES or (isinstance(self.source, int) and self.source >= 0)
        ):
            raise ConfigError(f"EAH.source must be one of {SOURCE_CHOICES} or a head index >= 0; got {self.source!r}.")
        if not isinstance(self.source_top_k, int) or self.source_top_k < 1:
            raise ConfigError(f"EAH.source_top_k must be an int >= 1; got {self.source_top_k!r}.")
        if self.source_top_k > 1 and self.source != "auto":
            raise ConfigError(
                f"source_top_k={self.source_top_k} averages the top sink heads, which only makes sense with "
                f"source='auto'; got source={self.source!r}."
            )
        if self.skip_if_head0 and self.source != "auto":
            raise ConfigError("skip_if_head0 (the official code's quirk) only applies to source='auto'.")
        if self.target_heads is not None:
            if not self.target_heads or any(not isinstance(t, int) or t < 0 for t in self.target_heads):
                raise ConfigError(f"EAH.target_heads must be non-empty head indices; got {self.target_heads!r}.")
            if len(set(self.target_heads)) != len(self.target_heads):
                raise ConfigError(f"EAH.target_heads has duplicates: {self.target_heads!r}.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def paper(cls, **overrides: Any) -> EAH:
        """The paper's method: layer 1 ("layer two"), true row count in ``d(j)``, official threshold."""
        base = dict(layers=(1,), normalise="causal", threshold=OFFICIAL_THRESHOLD)
        return cls(**{**base, "name": "paper" if not overrides else "paper+", **overrides})

    @classmethod
    def reference(cls, **overrides: Any) -> EAH:
        """The official code: layer 15, ``d(j) = (s + 1) + e - j`` on keys ``s + 1 .. e - 1``, threshold 0.0008,
        no broadcast from head 0.

        On a model with fewer than 16 layers the layer does not exist (`LayerIndexError` when applied):
        pass ``layers=...``.
        """
        base = dict(layers=(15,), normalise="official", threshold=OFFICIAL_THRESHOLD, skip_if_head0=True)
        return cls(**{**base, "name": "reference" if not overrides else "reference+", **overrides})

    # ------------------------------------------------------------------ a model
    def validate_for(
        self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        super().validate_for(n_layers, n_heads)
        heads = list(self.target_heads or ())
        if isinstance(self.source, int):
            heads.append(self.source)
        bad = [h for h in heads if h >= n_heads]
        if bad:
            raise HeadIndexError(f"EAH: head indices {bad} out of range: the layers have {n_heads} heads.")
        if self.source_top_k > n_heads:
            raise ConfigError(f"EAH.source_top_k={self.source_top_k} exceeds the number of heads ({n_heads}).")

    def warnings_for(self, adapter: Any) -> list[str]:
        message = normaliser_warning(adapter.family, adapter.bidirectional_image_attention, self.normalise)
        return [] if message is None else [message]

    # ------------------------------------------------------------------ the edit
    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        edited, changed, _ = self.edit_with_detail(tensor, site)
        return edited, changed

    def edit_with_detail(self, tensor: Tensor, site: Site) -> tuple[Tensor, int, EditRecord]:
        edited, record = apply_eah_to_probs(tensor, site.layout, self, site.layer)
        return edited, count(record.edited), record

    def map_free(self, site: Site) -> MapFree | None:
        if not (site.prefill and is_plain_copy(self)):
            return None

        def run(call: Any, layout: Any, statistics: bool) -> tuple[Tensor, int, EditRecord, Any]:
            out, record, sums = map_free_eah(
                call.query, call.key, call.value, call.mask, call.scaling, layout, self, call.layer,
                statistics=statistics,
            )
            return out, count(record.edited), record, sums

        return run

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
            f"[{self.name}] At layer(s) {list(self.layers or ())}, find vision sinks (score = column sum / {d} "
            f"> {self.threshold:g}), take {src} and copy {what} onto "
            + ("all heads" if self.target_heads is None else f"heads {list(self.target_heads)}")
            + (f" blended with alpha={self.alpha:g}" if self.alpha != 1 else "")
            + "."
        ]
        if self.drop_sinks:
            parts.append("The source map's sink columns are removed and rows renormalised (sink-free control).")
        if self.skip_if_head0:
            parts.append("No broadcast when the chosen head is head 0 (official-code quirk).")
        parts.append({"prefill": "Prompt (prefill) only.", "both": "Prompt and decode steps are edited.",
                      "decode": "Decode steps only."}[self.phase])
        return " ".join(parts)
