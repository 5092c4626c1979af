"""`ValueEdit`: scale or mean-ablate the value vectors of chosen key positions (the value-cache edit point).

The edit acts inside the attention call, on the values ``V`` of shape ``[batch, kv_heads, k, d]`` right
before ``P @ V`` (after the softmax and the probability edits). The probabilities are untouched: every
query row that attends to an edited key reads the edited value instead.

KV cache: HF attention modules store the new keys and values in the cache (``cache.update``) *before*
they call the attention function, so the cache always holds the model's own values; the edit is applied
afresh to the values each call sees (on a decode step, the whole cache). With ``phase="both"`` every
call, prompt and decode steps, reads the edited values of the selected keys: the same as editing the
cache. With ``phase="prefill"`` decode steps read the unedited cached values.

Heads are key/value heads: in a grouped-query model (GQA, ``kv_heads < heads``) KV head ``g`` is shared
by the query heads ``g * r .. g * r + r - 1`` with ``r = heads // kv_heads`` (transformers' ``repeat_kv``
order), so editing KV head ``g`` changes what all ``r`` of them read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eah_interp.errors import ConfigError, HeadIndexError
from eah_interp.interventions.base import Intervention
from eah_interp.interventions.selectors import (
    ROWS,
    Site,
    UserMask,
    as_group,
    check_choice,
    group_keys,
    query_rows,
    span_text,
)

#: How a selected value vector is changed: multiplied by ``scale``, or replaced by the mean of the
#: selected keys' value vectors (per batch row and KV head; mean ablation).
MODES = ("scale", "mean")


def edit_values(
    value: Float[Tensor, "batch kv k d"],
    keys: Bool[Tensor, "batch k"],
    heads: Bool[Tensor, " kv"],
    mode: str,
    scale: float,
) -> tuple[Float[Tensor, "batch kv k d"], Bool[Tensor, "batch kv k"]]:
    """The edited values and the (row, KV head, key) vectors changed.

    ``mode="scale"``: ``V[b, g, j] * scale``; ``mode="mean"``: ``mean_{j' selected} V[b, g, j']`` for each
    selected key ``j`` of row ``b`` and KV head ``g``.
    """
    selected = keys[:, None, :] & heads[None, :, None]
    if mode == "scale":
        new = value * scale
    else:
        weights = keys[:, None, :, None].to(value.dtype)
        mean = (value * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp_min(1)
        new = mean.expand_as(value)
    return torch.where(selected[..., None], new, value), selected


@dataclass(frozen=True)
class ValueEdit(Intervention):
    """Scale (``scale=0``: zero) or mean-ablate the value vectors of chosen keys in chosen KV heads.

    Args:
        keys: the keys whose values are edited: a position group (`SPANS`: the layout's groups, e.g. ``"image"``,
            ``"system"``, ``"question"``, ``"last"``, plus ``"after_image"``) or a ``Bool[batch, prompt length]`` mask of prompt
            positions (a tensor or nested lists; stored as tuples of booleans).
        scale: the multiplier in ``mode="scale"`` (0 = the keys contribute nothing to the output).
        mode: ``"scale"`` or ``"mean"`` (replace each selected value by the mean of the selected ones).
        heads: key/value heads to edit (None: all). In GQA models KV head ``g`` serves query heads
            ``g * r .. g * r + r - 1``, ``r = heads // kv_heads``.
        rows: the query rows that read the edited values (`ROWS`: ``"all"``, ``"after_image"``, ``"last"``,
            ``"decode"``); the other rows read the model's own values.
        layers: decoder layers (None: every layer).
        phase: ``"both"``, ``"prefill"`` or ``"decode"`` (see the module docstring for the KV cache).
    """

    keys: str | UserMask = "image"
    scale: float = 0.0
    mode: str = "scale"
    heads: tuple[int, ...] | None = None
    rows: str = "all"

    point: ClassVar[str] = "values"

    def check(self) -> None:
        object.__setattr__(self, "keys", as_group(self.keys, "ValueEdit.keys"))
        check_choice("ValueEdit.mode", self.mode, MODES)
        check_choice("ValueEdit.rows", self.rows, ROWS)
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigError(f"ValueEdit.scale must be a number; got {self.scale!r}.")
        if self.mode == "scale" and self.scale == 1:
            raise ConfigError("ValueEdit(scale=1) changes nothing: pass scale=0 to zero the values, or mode='mean'.")
        if self.heads is not None:
            heads = tuple(int(h) for h in self.heads)
            if not heads or any(h < 0 for h in heads) or len(set(heads)) != len(heads):
                raise ConfigError(f"ValueEdit.heads must be None or distinct KV-head indices >= 0; got {self.heads!r}.")
            object.__setattr__(self, "heads", heads)

    def validate_for(
        self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        super().validate_for(n_layers, n_heads)
        kv = n_heads if n_kv_heads is None else n_kv_heads
        bad = [h for h in self.heads or () if h >= kv]
        if bad:
            raise HeadIndexError(
                f"ValueEdit: KV heads {bad} out of range: the layers have {kv} key/value heads (0..{kv - 1}); "
                "ValueEdit.heads are key/value heads, not query heads."
            )

    def tail_rows(self, site: Site) -> int | None:
        return 1 if self.rows in ("last", "decode") else None

    def row_mask(self, site: Site) -> Bool[Tensor, "batch q"] | None:
        """The query rows that read the edited values (None: every row)."""
        return None if self.rows == "all" else query_rows(self.rows, site)

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        kv = tensor.shape[1]
        if any(h >= kv for h in self.heads or ()):
            raise HeadIndexError(f"ValueEdit.heads {list(self.heads or ())} out of range: this call has {kv} KV heads.")
        heads = torch.zeros(kv, dtype=torch.bool, device=tensor.device)
        heads[list(self.heads) if self.heads is not None else slice(None)] = True
        keys = group_keys(self.keys, site).to(tensor.device)
        edited, selected = edit_values(tensor, keys, heads, self.mode, float(self.scale))
        return edited, int(selected.sum()) * tensor.shape[-1]

    def describe(self) -> str:
        what = f"multiply by {self.scale:g}" if self.mode == "scale" else "replace by their mean"
        heads = "every KV head" if self.heads is None else f"KV heads {list(self.heads)}"
        layers = "every layer" if self.layers is None else f"layers {list(self.layers)}"
        return (
            f"ValueEdit: at {layers}, {what} the value vectors of {span_text(self.keys)} keys in {heads}, as read by "
            f"{self.rows} query rows ({self.phase} forwards; the KV cache keeps the model's own values)."
        )
