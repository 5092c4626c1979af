"""One layer's attention computed a chunk of query rows at a time, with the sums sink statistics need.

The full ``[batch, heads, q, k]`` probabilities of a layer never exist: each chunk of ``chunk`` query
rows (and, under a causal mask, only the keys those rows can see) gets its logits, their exponentials
``U = exp(logits - row max)`` and one matmul ``U @ [V | 1 | image mask]``, which gives the chunk's
output rows, each row's softmax denominator and its mass on image keys at once. The chunk itself is
never normalised (the denominators divide the reduced quantities), and log-probabilities are clamped
at `LOG_FLOOR` before ``exp`` (subnormal results are ~70x slower on x86). The running sums:

* ``column_sums[b, h, j] = sum_{i real, i != j} P[b, h, i, j]`` (what `eah_interp.sinks.sink_scores`
  divides by ``d(j)``),
* ``image_mass[b, h]``: attention mass on image keys, summed over text rows after the first image token,
* ``entropy[b, h]``: row entropy, summed over real rows.

`eah_interp.stats.head_statistics_from_sums` turns them into the same statistics `head_statistics`
computes from a full map; `eah_interp.edit.apply_eah_to_attention` picks the EAH source head from the
column sums and computes the broadcast output without materialising the broadcast map. The maths is
that of the model family's eager attention (scaled ``Q K^T`` + additive mask, softmax in float32), for
decoders without logit soft-capping or attention sinks (the HF backend checks this before using it).
What it costs against SDPA is measured in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.layout import TokenLayout
from eah_interp.sinks import query_positions

#: Query rows per chunk: 32 keeps a chunk's logits in a core's L2 cache for LLaVA-sized prompts; of 16,
#: 24, 32, 48, 64 and 96 rows, 32-64 were fastest (within noise) at 600, 1,176 and 2,904 tokens
#: (SmolLM2-135M shapes, one thread; docs/benchmarks.md).
ATTENTION_CHUNK = 32

#: Logits minus their row's largest are clamped here before ``exp``: ``log`` of the smallest normal
#: float32 is -87.34, and ``exp`` producing subnormal numbers is ~70x slower on x86. An entry more than
#: 87 nats below its row's largest counts as ``exp(-87)`` times it (an error below 1.7e-38 per entry);
#: blocked entries are set to exactly 0 afterwards.
LOG_FLOOR = -87.0


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

    Each chunk costs two matmuls (``Q K^T``, ``U V``) and a few passes over its ``[heads, chunk, keys]``
    logits, in two buffers reused across chunks (so they stay in cache): subtract the row max, clamp at
    `LOG_FLOOR`, ``U = exp``. The chunk is never normalised: the row totals of ``U`` divide the reduced
    quantities instead (the row weights of the column sums, the output rows, the image mass), and the
    entropy is ``log(total) - sum_j U x / total``.

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
        ``(output [batch, q, heads, d] in the query dtype or None, AttentionSums)``; a query row that
        sees no key gets a zero output (as PyTorch's SDPA gives it).
    """
    b, h, q, d = query.shape
    k = key.shape[-2]
    offset = k - q  # absolute position of query row 0
    groups = h // key.shape[1]
    layout = layout.to(query.device)
    qpos = query_positions(q, k, query.device)
    real = layout.attention_mask[:, qpos].float()  # [b, q]
    sums = AttentionSums(column_sums=torch.zeros(b, h, k, dtype=torch.float32, device=query.device))
    if statistics:
        text_rows = text_rows_after_image(layout, q).float()
        sums.image_mass = torch.zeros(b, h, device=query.device)
        sums.entropy = torch.zeros(b, h, device=query.device)
        sums.n_text, sums.n_real = text_rows.sum(-1), real.sum(-1)
    # 3-d float32 views over batch * heads (GQA groups repeated), the scale folded into the queries,
    # the keys transposed once
    queries = torch.empty(b * h, q, d, device=query.device)
    torch.mul(query.reshape(b * h, q, d), scaling, out=queries)
    keys_t = torch.empty(b, h // groups, groups, d, k, device=query.device)
    keys_t.copy_(key.transpose(-1, -2)[:, :, None].expand_as(keys_t))
    keys_t = keys_t.view(b * h, d, k)
    # one matmul per chunk gives the output rows and, in extra columns, each row's total (a column of
    # ones) and, for the statistics, its mass on image keys (the image mask as a column)
    d_out = d if output else 0
    columns = d_out + 1 + int(statistics)
    values_plus = torch.empty(b, h // groups, groups, k, columns, device=query.device)
    if output:
        values_plus[..., :d] = value[:, :, None]
    values_plus[..., d_out] = 1.0
    if statistics:
        values_plus[..., d_out + 1] = layout.image_mask[:, None, None, :]
    values_plus = values_plus.view(b * h, k, columns)
    out = torch.empty(b, q, h, d, device=query.device) if output else None  # the layout HF returns
    column_sums = sums.column_sums.view(b * h, 1, k)
    weights = real[:, None, :].expand(b, h, q).reshape(b * h, q)  # real query rows
    logit_buffer = torch.empty(b * h * min(chunk, q) * k, device=query.device)
    exp_buffer = torch.empty_like(logit_buffer)
    lowest = torch.finfo(torch.float32).min
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=query.device).triu(1)
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        c = e - s
        visible = offset + e if mask is None else k  # causal: later keys are never seen by this chunk
        size = b * h * c * visible
        x = torch.bmm(queries[:, s:e], keys_t[..., :visible], out=logit_buffer[:size].view(b * h, c, visible))
        if mask is None:
            x[..., offset + s : visible].masked_fill_(above[:c, :c], lowest)
        elif mask.dtype == torch.bool:
            blocked = ~mask[:, :, s:e, :visible]
            x.view(b, h, c, visible).masked_fill_(blocked, lowest)
        else:
            chunk_mask = mask[:, :, s:e, :visible].float()
            x.view(b, h, c, visible).add_(chunk_mask).clamp_min_(lowest)
            blocked = chunk_mask < lowest / 2  # HF's additive masks hold finfo.min where blocked
        x.sub_(x.amax(-1, keepdim=True)).clamp_min_(LOG_FLOOR)
        u = torch.exp(x, out=exp_buffer[:size].view(b * h, c, visible))
        if mask is None:  # blocked entries: exactly 0
            u[..., offset + s : visible].masked_fill_(above[:c, :c], 0.0)
        else:
            u.view(b, h, c, visible).masked_fill_(blocked, 0.0)
        reduced = torch.bmm(u, values_plus[:, :visible])  # [b * h, c, columns]
        total = reduced[..., d_out]  # P = u / total; a row that sees no key: total 1, u = 0
        total.masked_fill_(total == 0, 1.0)
        w = weights[:, s:e] / total  # each real row's weight in the column sums
        column_sums[..., :visible] += torch.bmm(w[:, None], u)
        diagonal = u.diagonal(offset=offset + s, dim1=-2, dim2=-1)  # u[i, i] for the chunk's rows
        column_sums[:, 0, offset + s : offset + e] -= diagonal * w
        if statistics:
            image_mass = reduced[..., d_out + 1] / total  # [b * h, c]
            sums.image_mass += (image_mass.view(b, h, c) * text_rows[:, None, s:e]).sum(-1)
            # -sum_j P log P with P = u / total, log P = x - log(total); x is not needed after this
            entropy = weights[:, s:e] * total.log() - x.mul_(u).sum(-1) * w  # blocked: 0 * LOG_FLOOR
            sums.entropy += entropy.view(b, h, c).sum(-1)
        if out is not None:
            rows_out = reduced[..., :d].view(b, h, c, d).transpose(1, 2)
            torch.div(rows_out, total.view(b, h, c, 1).transpose(1, 2), out=out[:, s:e])
    return (None if out is None else out.to(query.dtype)), sums
