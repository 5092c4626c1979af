"""One layer's attention computed a chunk of query rows at a time, with the sums sink statistics need.

The full ``[batch, heads, q, k]`` probabilities of a layer never exist: each chunk of ``chunk`` query
rows (and, under a causal mask, only the keys those rows can see) gets its logits, softmax, its share
of the output ``P @ V`` and its contributions to the running sums:

* ``column_sums[b, h, j] = sum_{i real, i != j} P[b, h, i, j]`` (what `eah_interp.sinks.sink_scores`
  divides by ``d(j)``),
* ``image_mass[b, h]``: attention mass on image keys, summed over text rows after the first image token,
* ``entropy[b, h]``: row entropy, summed over real rows.

`eah_interp.stats.head_statistics_from_sums` turns them into the same statistics `head_statistics`
computes from a full map; `eah_interp.edit.apply_eah_to_attention` picks the EAH source head from the
column sums and computes the broadcast output without materialising the broadcast map. The maths is
that of the model family's eager attention (scaled ``Q K^T`` + additive mask, softmax in float32), for
decoders without logit soft-capping or attention sinks (the HF backend checks this before using it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.layout import TokenLayout
from eah_interp.sinks import query_positions

#: Query rows per chunk: 128-256 were fastest on a 2-core CPU at 2,904 tokens (docs/benchmarks.md).
ATTENTION_CHUNK = 128


@dataclass
class AttentionSums:
    """Running sums of one layer's attention (float32).

    Attributes:
        column_sums: ``[batch, heads, k]`` over real query rows, diagonal removed.
        image_mass: ``[batch, heads]`` image-key mass summed over text rows after the first image token
            (None unless statistics were asked for).
        entropy: ``[batch, heads]`` row entropy (nats) summed over real query rows (None likewise).
        n_text: ``[batch]`` number of those text rows; n_real: ``[batch]`` number of real query rows.
    """

    column_sums: Float[Tensor, "batch heads k"]
    image_mass: Float[Tensor, "batch heads"] | None = None
    entropy: Float[Tensor, "batch heads"] | None = None
    n_text: Float[Tensor, " batch"] | None = None
    n_real: Float[Tensor, " batch"] | None = None


def text_rows_after_image(layout: TokenLayout, q_len: int) -> torch.Tensor:
    """``Bool[batch, q]``: real, non-image query rows at or after the row's first image token."""
    qpos = query_positions(q_len, layout.seq_len, layout.image_mask.device)
    start, _ = layout.image_extent()
    return (
        layout.attention_mask[:, qpos]
        & ~layout.image_mask[:, qpos]
        & (qpos[None, :] >= start[:, None])
        & layout.image_mask.any(-1, keepdim=True)
    )


def chunked_attention(
    query: Float[Tensor, "batch heads q d"],
    key: Float[Tensor, "batch kv_heads k d"],
    value: Float[Tensor, "batch kv_heads k d"],
    mask: Tensor | None,
    scaling: float,
    layout: TokenLayout,
    *,
    output: bool = True,
    statistics: bool = True,
    chunk: int = ATTENTION_CHUNK,
) -> tuple[Float[Tensor, "batch q heads d"] | None, AttentionSums]:
    """Attention of one layer, ``chunk`` query rows at a time.

    Args:
        query, key, value: the layer's projections after rotary embedding (GQA: ``kv_heads`` divides
            ``heads``; each query head uses its group's keys and values).
        mask: what the model built for its attention implementation: ``None`` (causal, no padding), a
            boolean ``[batch, 1, q, k]`` (True = attend) or an additive float ``[batch, 1, q, k]``.
        scaling: the logit scale (``module.scaling``).
        layout: layout of the ``k`` key positions.
        output: compute the attention output ``P @ V``.
        statistics: accumulate ``image_mass`` and ``entropy`` too (column sums always).
        chunk: query rows per chunk.

    Returns:
        ``(output [batch, q, heads, d] in the query dtype or None, AttentionSums)``.
    """
    b, h, q, d = query.shape
    k = key.shape[-2]
    offset = k - q  # absolute position of query row 0
    groups = h // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    values = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    layout = layout.to(query.device)
    qpos = query_positions(q, k, query.device)
    real = layout.attention_mask[:, qpos].float()  # [b, q]
    sums = AttentionSums(column_sums=torch.zeros(b, h, k, dtype=torch.float32, device=query.device))
    if statistics:
        text_rows = text_rows_after_image(layout, q).float()
        image_cols = layout.image_mask.float()[:, None, :, None]  # [b, 1, k, 1]
        sums.image_mass = torch.zeros(b, h, device=query.device)
        sums.entropy = torch.zeros(b, h, device=query.device)
        sums.n_text, sums.n_real = text_rows.sum(-1), real.sum(-1)
    out = torch.empty(b, h, q, d, dtype=query.dtype, device=query.device) if output else None
    lowest = torch.finfo(torch.float32).min
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        visible = offset + e if mask is None else k  # causal: later keys are never seen by this chunk
        logits = torch.matmul(query[:, :, s:e].float(), keys[:, :, :visible].float().transpose(-1, -2)).mul_(scaling)
        if mask is None:
            above = torch.ones(e - s, e - s, dtype=torch.bool, device=query.device).triu(1)
            logits[..., offset + s : visible].masked_fill_(above, lowest)
        elif mask.dtype == torch.bool:
            logits.masked_fill_(~mask[:, :, s:e, :visible], lowest)
        else:
            logits.add_(mask[:, :, s:e, :visible].float()).clamp_min_(lowest)
        log_p = logits.sub_(torch.logsumexp(logits, -1, keepdim=True))  # in place: log-probabilities
        p = log_p.exp()
        weights = real[:, None, s:e]  # [b, 1, c]
        sums.column_sums[..., :visible] += torch.matmul(weights[:, :, None, :], p).squeeze(-2)
        rows = torch.arange(s, e, device=query.device)
        sums.column_sums.index_add_(2, offset + rows, -(p[:, :, rows - s, offset + rows] * weights))
        if statistics:
            mass = torch.matmul(p, image_cols[:, :, :visible]).squeeze(-1)  # [b, h, c]
            sums.image_mass += (mass * text_rows[:, None, s:e]).sum(-1)
            entropy = -(p * log_p.clamp_min(-1e30)).sum(-1)
            sums.entropy += (entropy * weights).sum(-1)
        if output:
            out[:, :, s:e] = torch.matmul(p.to(values.dtype), values[:, :, :visible])
        del logits, log_p, p
    return (out.transpose(1, 2).contiguous() if output else None), sums
