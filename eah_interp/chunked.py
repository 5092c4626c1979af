"""One layer's attention computed a chunk of query rows at a time, with the sums sink statistics need.

The full ``[batch, heads, q, k]`` probabilities of a layer never exist: each chunk of ``chunk`` query
rows (and, under a causal mask, only the keys those rows can see) gets its logits (one matmul), their
rows (`attention_rows`: ``U = exp(logits - row max)``, the row totals, the entropy sums and the column
sums; on CPU one sweep per row in C, `eah_interp.native`) and one matmul ``U @ [V | image mask]`` for
the output rows and the mass on image keys. The chunk itself is never normalised (the row totals
divide the reduced quantities), and log-probabilities are clamped at `LOG_FLOOR` before ``exp``
(subnormal results are ~70x slower on x86). The running sums:

* ``column_sums[b, h, j] = sum_{i real, i != j} P[b, h, i, j]`` (what `eah_interp.sinks.sink_scores`
  divides by ``d(j)``),
* ``image_mass[b, h]``: attention mass on image keys, summed over text rows after the first image token,
* ``entropy[b, h]``: row entropy, summed over real rows.

`eah_interp.head_stats.head_statistics_from_sums` turns them into the same statistics `head_statistics`
computes from a full map; `eah_interp.edit.map_free_eah` picks the EAH source head from the
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

from eah_interp import native
from eah_interp.layout import TokenLayout
from eah_interp.sinks import query_positions

#: Query rows per chunk. Of 32, 64, 96, 128, 192, 256 and 384 rows, 96 was fastest at 600, 1,176 and
#: 2,904 tokens and at batch 2 and 4 (64-128 within ~5 %; SmolLM2-135M shapes, one thread, native
#: kernel; docs/benchmarks.md): larger matmuls and fewer Python steps, while each row's passes stay in L1.
ATTENTION_CHUNK = 96

#: Logits minus their row's largest are clamped here before ``exp``: ``log`` of the smallest normal
#: float32 is -87.34, and ``exp`` producing subnormal numbers is ~70x slower on x86. An entry more than
#: 87 nats below its row's largest counts as ``exp(-87)`` times it (an error below 1.7e-38 per entry);
#: blocked entries are set to exactly 0 afterwards.
LOG_FLOOR = -87.0

#: What masked logits hold (HF's additive masks use it too); anything below half of it counts as masked.
LOWEST = torch.finfo(torch.float32).min


def attention_rows(
    logits: Float[Tensor, "n rows cols"],
    exps: Float[Tensor, "n rows cols"],
    weights: Float[Tensor, "n rows"],
    column_sums: Float[Tensor, "n k"],
    diagonal_start: int,
    log_floor: float = LOG_FLOOR,
    masked_from: int = 0,
) -> tuple[Float[Tensor, "n rows"], Float[Tensor, "n rows"]]:
    """The softmax rows of a chunk of logits and their sums, in PyTorch (any device).

    The computation `eah_interp.native.attention_rows` does in one sweep per row on CPU; this is the
    reference it is tested against and what runs where it does not. With ``m`` the row max and
    ``y = max(x - m, log_floor)``: ``exps = exp(y)`` (exactly 0 where ``x`` is masked, i.e. below
    ``LOWEST / 2``), and ``weight / total * exps`` is added to ``column_sums`` except at each row's own
    key (``diagonal_start + row``).

    Args:
        logits: the chunk's scaled, masked logits; overwritten (used as scratch).
        exps: written with the unnormalised probabilities.
        weights: each row's weight in the column sums (0 for padding rows).
        column_sums: ``[n, k]``, ``k >= cols``; accumulated into its first ``cols`` columns.
        diagonal_start: the key index of row 0.
        log_floor: the clamp of ``x - m`` (see `LOG_FLOOR`).
        masked_from: no masked entry lies left of this column (a causal chunk: its diagonal block), so
            only the columns from here on are searched for masked entries.

    Returns:
        ``(totals, ylogu)``: each row's ``sum exps`` (the softmax denominator) and ``sum exps * y``
        (the row's entropy is ``log(total) - ylogu / total``).
    """
    n, rows, cols = logits.shape
    masked = logits[..., masked_from:] <= LOWEST / 2
    logits.sub_(logits.amax(-1, keepdim=True)).clamp_min_(log_floor)
    torch.exp(logits, out=exps)
    exps[..., masked_from:].masked_fill_(masked, 0.0)
    totals = exps.sum(-1)
    w = torch.where(totals > 0, weights / totals, 0.0)
    column_sums[:, :cols] += torch.bmm(w[:, None], exps)[:, 0]
    own = torch.arange(rows, device=logits.device) + diagonal_start  # each row's own key
    inside = (own >= 0) & (own < cols)
    diagonal = exps[:, inside, own[inside]]  # [n, rows inside]
    column_sums[:, own[inside]] -= diagonal * w[:, inside]
    return totals, logits.mul_(exps).sum(-1)


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

    Each chunk costs two matmuls (``Q K^T``; ``U @ [V | image mask]`` when the output or the statistics
    are asked for) and `attention_rows` over its ``[heads, chunk, keys]`` logits (the native kernel on
    CPU when it is available), in two buffers reused across chunks. The chunk is never normalised: the
    row totals of ``U`` divide the reduced quantities instead (the row weights of the column sums, the
    output rows, the image mass), and the entropy is ``log(total) - sum_j U y / total``. The query
    heads of a KV head are stacked as rows of one matrix, so GQA keys and values are never repeated.

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
    device = query.device
    layout = layout.to(device)
    qpos = query_positions(q, k, device)
    real = layout.attention_mask[:, qpos].float()  # [b, q]
    sums = AttentionSums(column_sums=torch.zeros(b, h, k, dtype=torch.float32, device=device))
    if statistics:
        text_rows = text_rows_after_image(layout, q).float()
        sums.image_mass = torch.zeros(b, h, device=device)
        sums.entropy = torch.zeros(b, h, device=device)
        sums.n_text, sums.n_real = text_rows.sum(-1), real.sum(-1)
    # Each KV head's query heads are stacked as rows of one matrix: a chunk's logits are
    # [b * kv, groups * c, visible], which in memory is [b * h, c, visible] (HF orders the query heads
    # KV head by KV head), so the GQA keys and values are never repeated. The keys are transposed and
    # scaled once; the values get the image mask as an extra column (the image mass).
    kv = key.shape[1]
    keys_t = torch.empty(b * kv, d, k, device=device)
    torch.mul(key.transpose(-1, -2).reshape(b * kv, d, k), scaling, out=keys_t)
    d_out = d if output else 0
    columns = d_out + int(statistics)
    values_plus = torch.empty(b, kv, k, columns, device=device)
    if output:
        values_plus[..., :d] = value
    if statistics:
        values_plus[..., d_out] = layout.image_mask[:, None, :]
    values_plus = values_plus.view(b * kv, k, columns)
    out = torch.empty(b, h, q, d, device=device) if output else None
    column_sums = sums.column_sums.view(b * h, k)
    weights = real[:, None, :].expand(b, h, q).reshape(b * h, q)  # real query rows
    logit_buffer = torch.empty(b * h * min(chunk, q) * k, device=device)
    exp_buffer = torch.empty_like(logit_buffer)
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=device).triu(1)
    rows = native.attention_rows if device.type == "cpu" and native.available() else attention_rows
    for s in range(0, q, chunk):
        e = min(q, s + chunk)
        c = e - s
        visible = offset + e if mask is None else k  # causal: later keys are never seen by this chunk
        size = b * h * c * visible
        stacked = query[:, :, s:e].reshape(b * kv, groups * c, d).float()
        x = torch.bmm(stacked, keys_t[..., :visible], out=logit_buffer[:size].view(b * kv, groups * c, visible))
        x = x.view(b * h, c, visible)
        if mask is None:
            x[..., offset + s : visible].masked_fill_(above[:c, :c], LOWEST)
        elif mask.dtype == torch.bool:
            x.view(b, h, c, visible).masked_fill_(~mask[:, :, s:e, :visible], LOWEST)
        else:  # HF's additive masks hold finfo.min where blocked
            x.view(b, h, c, visible).add_(mask[:, :, s:e, :visible].float()).clamp_min_(LOWEST)
        u = exp_buffer[:size].view(b * h, c, visible)
        masked_from = offset + s if mask is None else 0  # causal: only the diagonal block is masked
        total, ylogu = rows(x, u, weights[:, s:e], column_sums, offset + s, LOG_FLOOR, masked_from)
        total = total.masked_fill_(total == 0, 1.0)  # P = u / total; a row that sees no key: u = 0
        if columns:
            reduced = torch.bmm(u.view(b * kv, groups * c, visible), values_plus[:, :visible])
            reduced = reduced.view(b * h, c, columns)
        if statistics:
            image_mass = reduced[..., d_out] / total  # [b * h, c]
            sums.image_mass += (image_mass.view(b, h, c) * text_rows[:, None, s:e]).sum(-1)
            entropy = weights[:, s:e] * (total.log() - ylogu / total)  # -sum_j P log P
            sums.entropy += entropy.view(b, h, c).sum(-1)
        if out is not None:
            torch.div(reduced[..., :d].view(b, h, c, d), total.view(b, h, c, 1), out=out[:, :, s:e])
    if out is not None:  # [b, q, h, d], as HF's attention functions return it (the copy SDPA's path makes too)
        out = out.transpose(1, 2).contiguous()
    return (None if out is None else out.to(query.dtype)), sums
