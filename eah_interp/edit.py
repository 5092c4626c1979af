"""`apply_eah_to_probs`: EAH's edit of one layer's attention probabilities (`EAH.edit` calls it), and its
map-free form for plain copies of a prompt (`map_free_eah`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eah_interp.broadcast import broadcast_heads, drop_columns, source_map
from eah_interp.chunked import AttentionSums, chunked_attention
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    select_fewest_sink_heads,
    select_source_heads,
    sink_counts_from_scores,
    sink_scores,
    sink_scores_from_column_sums,
)

if TYPE_CHECKING:
    from eah_interp.interventions.eah import EAH


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


def choose_source_heads(counts: Int[Tensor, "batch heads"], config: EAH, layer: int) -> Int[Tensor, "batch top_k"]:
    """The source head(s) per row under ``config.source`` (``-1``: nothing to broadcast in that row).

    ``"auto"``: the most sinks (``source_top_k`` heads; none from head 0 with ``skip_if_head0``);
    ``"fewest"``: the fewest sinks; ``"random"``: seeded by ``config.seed`` and ``layer``; an int: that head.
    """
    b, h = counts.shape
    if config.source == "auto":
        heads = select_source_heads(counts, config.source_top_k)
        if config.skip_if_head0:
            heads = torch.where(heads[:, :1] == 0, torch.full_like(heads, -1), heads)
        return heads
    if config.source == "fewest":
        return select_fewest_sink_heads(counts)
    if config.source == "random":
        generator = torch.Generator().manual_seed(config.seed * 100_003 + layer)
        return torch.randint(0, h, (b, 1), generator=generator).to(counts.device)
    return torch.full((b, 1), int(config.source), dtype=torch.long, device=counts.device)


def apply_eah_to_probs(
    probs: Float[Tensor, "batch heads q k"], layout: TokenLayout, config: EAH, layer: int
) -> tuple[Float[Tensor, "batch heads q k"], EditRecord]:
    """Apply EAH to one layer's post-softmax probabilities.

    Sink scores are computed per row (`sink_scores` with ``config.normalise``), sinks counted with
    ``config.threshold``, the source head chosen per ``config.source`` and its map broadcast per
    ``config.region`` / ``alpha`` / ``target_heads``. The caller decides whether the call should be
    edited at all (`EAH.applies`: its layers and phase).

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
    heads = choose_source_heads(counts, config, layer)
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


def is_plain_copy(config: EAH) -> bool:
    """Whether the edit gives every head the source head's whole map (the paper's EAH), so that
    `map_free_eah` can compute it without a probability map."""
    one_source = config.source != "auto" or config.source_top_k == 1
    return config.region == "full" and config.alpha == 1.0 and config.target_heads is None and not config.drop_sinks and one_source


def edited_sums(sums: AttentionSums, source_heads: Int[Tensor, " batch"]) -> AttentionSums:
    """The running sums of a layer after a plain-copy broadcast: every head of row ``b`` carries the
    sums of head ``source_heads[b]`` (rows with ``-1`` keep their own).

    Args:
        sums: `AttentionSums` of the unedited layer (``[batch, heads, ...]``).
        source_heads: ``Long[batch]`` source head per row, ``-1`` where nothing was broadcast.

    Returns:
        The `AttentionSums` of the edited layer (what `head_statistics` of the edited map would sum).
    """
    b, h, _ = sums.column_sums.shape
    own = torch.arange(h, device=source_heads.device)[None, :].expand(b, h)
    index = torch.where(source_heads[:, None] >= 0, source_heads[:, None].expand(b, h), own)
    rows = torch.arange(b, device=index.device)[:, None]

    def take(x: Tensor | None) -> Tensor | None:
        return None if x is None else x[rows, index]

    return AttentionSums(
        column_sums=sums.column_sums[rows, index],
        image_mass=take(sums.image_mass),
        entropy=take(sums.entropy),
        n_text=sums.n_text,
        n_real=sums.n_real,
    )


def map_free_eah(
    query: Float[Tensor, "batch heads q d"],
    key: Float[Tensor, "batch kv_heads q d"],
    value: Float[Tensor, "batch kv_heads q d"],
    mask: Tensor | None,
    scaling: float,
    layout: TokenLayout,
    config: EAH,
    layer: int,
    *,
    statistics: bool = False,
) -> tuple[Float[Tensor, "batch q heads d"], EditRecord, AttentionSums]:
    """EAH on one prompt layer from its projections, never materialising a ``[batch, heads, q, q]`` map.

    A chunked pass (`eah_interp.chunked.chunked_attention`) accumulates the column sums, hence the sink
    scores and the source head per row (as `apply_eah_to_probs` would choose it). Every head then
    attends with the source head's map: head ``h`` outputs ``P_src @ V_g(h)``, computed per KV group
    ``g`` as one SDPA call with the source head's query and key. Only for `is_plain_copy` configs and
    prompt forwards (``q == k``). The returned sums are those `head_statistics` would accumulate over
    the broadcast map (`edited_sums`), so a recording stacked on EAH sees what the edited layer computes.

    Args:
        query, key, value: the layer's projections after rotary embedding.
        mask: the model's mask for SDPA: None (causal, no padding), boolean or additive ``[batch, 1, q, q]``.
        scaling: the logit scale.
        layout, config, layer: as in `apply_eah_to_probs`.
        statistics: also accumulate image mass and entropy (what `HeadStats` needs), not only column sums.

    Returns:
        ``(attention output [batch, q, heads, d], EditRecord, AttentionSums of the edited layer)``.
    """
    if not is_plain_copy(config):
        raise ValueError("map_free_eah only computes plain-copy edits (see is_plain_copy).")
    b, h, q, _ = query.shape
    if key.shape[-2] != q:
        raise ValueError("map_free_eah is for prompt forwards (as many keys as queries).")
    layout = layout.to(query.device)
    # The sums only choose the source head and feed statistics (discrete / recorded, never differentiated):
    # detached, so that a forward with gradients (attribution patching) runs through this path.
    _, sums = chunked_attention(
        query.detach(), key.detach(), value.detach(), mask, scaling, layout, output=False, statistics=statistics
    )
    scores = sink_scores_from_column_sums(sums.column_sums, layout, q, config.normalise)
    counts = sink_counts_from_scores(scores, layout, config.threshold)
    heads = choose_source_heads(counts, config, layer)
    n_kv = key.shape[1]
    groups = h // n_kv
    outputs = []
    for row in range(b):
        source = int(heads[row, 0])
        row_mask = None if mask is None else mask[row : row + 1]
        if source < 0:  # nothing to broadcast in this row: plain attention
            q_row, k_row = query[row : row + 1], key[row : row + 1].repeat_interleave(groups, 1)
            v_row = value[row : row + 1].repeat_interleave(groups, 1)
        else:  # the source head's query and key for every KV group, each group's own values
            q_row = query[row : row + 1, source : source + 1].expand(1, n_kv, q, -1)
            k_row = key[row : row + 1, source // groups : source // groups + 1].expand(1, n_kv, q, -1)
            v_row = value[row : row + 1]
        out = F.scaled_dot_product_attention(
            q_row, k_row, v_row, attn_mask=row_mask, is_causal=mask is None and q > 1, scale=scaling
        )
        outputs.append(out if source < 0 else out.repeat_interleave(groups, 1))
    record = EditRecord(layer=layer, q_len=q, k_len=q, sink_counts=counts, source_heads=heads, edited=(heads >= 0).any(-1))
    return torch.cat(outputs).transpose(1, 2).contiguous(), record, edited_sums(sums, heads[:, 0])
