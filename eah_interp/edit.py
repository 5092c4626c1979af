"""`apply_eah_to_probs`: the one function every backend calls to edit a layer's attention probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eah_interp.broadcast import broadcast_heads, drop_columns, source_map
from eah_interp.config import EAHConfig
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    select_fewest_sink_heads,
    select_source_heads,
    sink_counts_from_scores,
    sink_scores,
)


@dataclass
class EditRecord:
    """What one call of `apply_eah_to_probs` saw and did.

    Attributes:
        layer: the decoder layer.
        q_len, k_len: query rows and key positions of the call (``q_len == k_len`` in a prefill).
        sink_counts: ``Long[batch, heads]`` number of vision sinks per head.
        source_heads: ``Long[batch, top_k]`` heads whose map was broadcast (``-1``: none).
        edited: ``Bool[batch]`` rows whose probabilities were changed.
    """

    layer: int
    q_len: int
    k_len: int
    sink_counts: Int[Tensor, "batch heads"]
    source_heads: Int[Tensor, "batch top_k"]
    edited: Bool[Tensor, " batch"]

    @property
    def source_head(self) -> Int[Tensor, " batch"]:
        """The (first) source head per row, ``-1`` where nothing was broadcast."""
        return torch.where(self.edited, self.source_heads[:, 0], torch.full_like(self.source_heads[:, 0], -1))

    def __repr__(self) -> str:
        return (
            f"EditRecord(layer={self.layer}, q={self.q_len}, k={self.k_len}, "
            f"source_head={self.source_head.tolist()}, max_sinks={self.sink_counts.max(-1).values.tolist()})"
        )


def is_prefill(q_len: int, k_len: int) -> bool:
    """A call is a prompt (prefill) forward when every key position is also a query row."""
    return q_len == k_len


def should_edit(config: EAHConfig, layer: int, q_len: int, k_len: int) -> bool:
    """Whether EAH edits this call: an edited layer, and a prefill unless ``apply_to_decode``."""
    return layer in config.layers and (config.apply_to_decode or is_prefill(q_len, k_len))


def apply_eah_to_probs(
    probs: Float[Tensor, "batch heads q k"], layout: TokenLayout, config: EAHConfig, layer: int
) -> tuple[Float[Tensor, "batch heads q k"], EditRecord]:
    """Apply EAH to one layer's post-softmax probabilities.

    Sink scores are computed per row (`sink_scores` with ``config.normalise``), sinks counted with
    ``config.threshold``, the source head chosen per ``config.source`` and its map broadcast per
    ``config.region`` / ``alpha`` / ``target_heads``. The caller decides whether the call should be
    edited at all (see `should_edit`).

    Args:
        probs: ``[batch, heads, q, k]`` probabilities (any float dtype; statistics run in float32).
        layout: layout of the ``k`` key positions.
        config: the edit.
        layer: which layer these probabilities belong to (recorded; seeds ``source="random"``).

    Returns:
        ``(edited probabilities of the same shape and dtype, EditRecord)``.
    """
    b, h, q, k = probs.shape
    layout = layout.to(probs.device)
    scores = sink_scores(probs, layout, config.normalise)
    counts = sink_counts_from_scores(scores, layout, config.threshold)
    if config.source == "auto":
        heads = select_source_heads(counts, config.source_top_k)
        if config.skip_if_head0:
            heads = torch.where(heads[:, :1] == 0, torch.full_like(heads, -1), heads)
    elif config.source == "fewest":
        heads = select_fewest_sink_heads(counts)
    elif config.source == "random":
        generator = torch.Generator().manual_seed(config.seed * 100_003 + layer)
        heads = torch.randint(0, h, (b, 1), generator=generator).to(probs.device)
    else:
        heads = torch.full((b, 1), int(config.source), dtype=torch.long, device=probs.device)
    edited_rows = (heads >= 0).any(-1)
    source = None
    if config.drop_sinks:
        maps, _ = source_map(probs, heads)
        sink_cols = (scores > config.threshold) & layout.image_mask[:, None, :]
        first = heads[:, 0].clamp_min(0)
        source = drop_columns(maps, sink_cols[torch.arange(b, device=probs.device), first])
    edited = broadcast_heads(
        probs,
        heads,
        region=config.region,  # type: ignore[arg-type]
        layout=layout,
        alpha=config.alpha,
        target_heads=config.target_heads,
        source=source,
    )
    record = EditRecord(layer=layer, q_len=q, k_len=k, sink_counts=counts, source_heads=heads, edited=edited_rows)
    return edited, record
