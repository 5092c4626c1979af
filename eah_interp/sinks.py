"""Vision sinks: image tokens that draw attention from many query rows.

All functions take post-softmax attention probabilities ``attn: Float[batch, heads, q, k]`` of one
layer. Query row ``i`` sits at absolute position ``k - q + i`` (prefill: ``q == k``; a decode step
with a KV cache: ``q == 1``), and `TokenLayout` describes the ``k`` key positions.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eah_interp.errors import ConfigError, LayoutError
from eah_interp.layout import TokenLayout

Normalise = Literal["causal", "official", "rows"]
NORMALISE_CHOICES = ("causal", "official", "rows")

def normaliser_warning(family: str, bidirectional_image_attention: bool, normalise: str) -> str | None:
    """Why ``normalise`` misleads on a model family, or None: ``"causal"`` divides by later rows only, but
    image tokens that attend to each other bidirectionally are also attended to by earlier rows."""
    if not (bidirectional_image_attention and normalise == "causal"):
        return None
    return (
        f"{family}: image tokens attend to each other bidirectionally, so earlier rows also attend to an image "
        "token and normalise='causal' (later rows only) inflates sink scores of late image tokens. Use "
        "normalise='rows'."
    )


#: EAH's sink threshold in the official code (its README documents 0.002); `HeadStats` and `EAH` default to it.
OFFICIAL_THRESHOLD = 0.0008

#: Query rows summed per chunk when column sums are accumulated (bounds the float32 working copy).
QUERY_CHUNK = 512


def _check(attn: Tensor, layout: TokenLayout) -> None:
    if attn.ndim != 4:
        raise LayoutError(f"Attention probabilities must be [batch, heads, q, k]; got shape {tuple(attn.shape)}.")
    b, _, q, k = attn.shape
    if layout.batch_size != b or layout.seq_len != k:
        raise LayoutError(
            f"The layout covers {layout.batch_size} rows x {layout.seq_len} positions but the attention has "
            f"{b} rows x {k} key positions. Build the layout from the same input_ids (or extend it for decode steps)."
        )
    if q > k:
        raise LayoutError(f"Attention has more query rows ({q}) than key positions ({k}).")


def query_positions(q_len: int, k_len: int, device: torch.device | None = None) -> Int[Tensor, " q"]:
    """Absolute positions of the query rows: the last ``q_len`` of ``k_len`` positions."""
    return torch.arange(k_len - q_len, k_len, device=device)


def column_sums(attn: Float[Tensor, "batch heads q k"], layout: TokenLayout) -> Float[Tensor, "batch heads k"]:
    """Column sums ``sum_{q != j} P[b, h, q, j]`` over real (non-padding) query rows, diagonal removed.

    Accumulated in float32, ``QUERY_CHUNK`` query rows at a time.
    """
    _check(attn, layout)
    b, h, q, k = attn.shape
    qpos = query_positions(q, k, attn.device)
    real_rows = layout.attention_mask.to(attn.device)[:, qpos]  # [b, q]
    sums = torch.zeros(b, h, k, dtype=torch.float32, device=attn.device)
    for start in range(0, q, QUERY_CHUNK):
        chunk = attn[:, :, start : start + QUERY_CHUNK].float()
        weights = real_rows[:, None, start : start + QUERY_CHUNK, None].float()
        sums += (chunk * weights).sum(-2)
    diagonal = attn[:, :, torch.arange(q, device=attn.device), qpos].float() * real_rows[:, None].float()
    sums.index_add_(2, qpos, -diagonal)
    return sums


def sink_denominator(
    layout: TokenLayout, q_len: int, normalise: Normalise = "causal"
) -> Float[Tensor, "batch k"]:
    """The normaliser ``d(j)`` of the sink score, per row and key position.

    ``"causal"``: the number of real query rows strictly after ``j`` (``q_len - 1 - j`` in an unpadded
    prefill). ``"official"``: the official code's window and divisor, placed on the row's image extent
    ``[s, e)`` (first image position, last + 1; positions counted from the row's first real token): keys
    ``s + 1 .. e - 1`` are scored with ``d(j) = (s + 1) + e - j`` (``e`` at ``s + 1`` down to ``s + 2``
    at ``e - 1``) and the first image token ``s`` is never scored (``d = 0``). That is the official
    ``atten_process_cal`` (itsqyh/Shallow-Focus-Deep-Fixes@092c454, ``modeling_llama_eah.py:82-86``:
    keys ``[36, 611)``, divisor ``torch.arange(611, 36, -1)`` = ``647 - j``) with its hard-coded start
    and end read as ``s + 1`` and ``e`` of LLaVA-1.5's image span ``[35, 611)``.
    ``"rows"``: the number of real query rows other than ``j``, before or after it: the right count for
    models whose image tokens attend to each other bidirectionally (Gemma 3, PaliGemma), where earlier
    rows also attend to ``j``.
    """
    if normalise not in NORMALISE_CHOICES:
        raise ConfigError(f"normalise must be one of {NORMALISE_CHOICES}; got {normalise!r}.")
    k = layout.seq_len
    device = layout.attention_mask.device
    pos = torch.arange(k, device=device)
    if normalise in ("causal", "rows"):
        qpos = query_positions(q_len, k, device)
        real_query = torch.zeros(layout.batch_size, k, device=device)
        real_query[:, qpos] = layout.attention_mask[:, qpos].float()
        if normalise == "rows":
            return real_query.sum(-1, keepdim=True) - real_query
        return real_query.sum(-1, keepdim=True) - real_query.cumsum(-1)
    start, end = layout.image_extent()
    first = layout.first_real_position()
    denom = (start + 1 + end - first)[:, None].float() - pos[None, :].float()
    return torch.where(pos[None, :] > start[:, None], denom, torch.zeros_like(denom))  # key s: never scored


def sink_scores(
    attn: Float[Tensor, "batch heads q k"], layout: TokenLayout, normalise: Normalise = "causal"
) -> Float[Tensor, "batch heads k"]:
    """Sink score ``c[b, h, j] = sum_{q != j} P[b, h, q, j] / d(j)`` of every image key ``j``.

    Column sums run over all real query rows (system, image and text rows), the diagonal removed;
    ``d(j)`` is `sink_denominator`. Non-image keys (and keys with ``d(j) <= 0``) score 0.

    Args:
        attn: post-softmax probabilities of one layer, ``[batch, heads, q, k]``.
        layout: the layout of the ``k`` key positions.
        normalise: ``"causal"`` (true row count), ``"official"`` (the official code's window and
            divisor, `sink_denominator`) or ``"rows"``.

    Returns:
        ``Float[batch, heads, k]`` in float32.
    """
    return sink_scores_from_column_sums(column_sums(attn, layout), layout, attn.shape[-2], normalise)


def sink_scores_from_column_sums(
    sums: Float[Tensor, "batch heads k"], layout: TokenLayout, q_len: int, normalise: Normalise = "causal"
) -> Float[Tensor, "batch heads k"]:
    """`sink_scores` from precomputed `column_sums` (e.g. accumulated chunk by chunk in `eah_interp.chunked`)."""
    denom = sink_denominator(layout, q_len, normalise).to(sums.device)
    valid = layout.image_mask.to(sums.device) & (denom > 0)
    scores = sums / denom.clamp_min(1e-12)[:, None, :]
    return torch.where(valid[:, None, :], scores, torch.zeros_like(scores))


def detect_sinks(
    attn: Float[Tensor, "batch heads q k"],
    layout: TokenLayout,
    threshold: float = 0.0008,
    normalise: Normalise = "causal",
) -> Bool[Tensor, "batch heads k"]:
    """Vision sinks: image keys whose sink score is strictly above ``threshold``.

    Returns:
        ``Bool[batch, heads, k]``, True at sink positions (always False at non-image keys).
    """
    if threshold < 0:
        raise ConfigError(f"threshold must be >= 0; got {threshold}.")
    scores = sink_scores(attn, layout, normalise)
    return (scores > threshold) & layout.image_mask.to(attn.device)[:, None, :]


def sink_counts_from_scores(
    scores: Float[Tensor, "batch heads k"], layout: TokenLayout, threshold: float
) -> Int[Tensor, "batch heads"]:
    """Number of sinks per head, from precomputed sink scores."""
    return ((scores > threshold) & layout.image_mask.to(scores.device)[:, None, :]).sum(-1)


def sink_density(
    attn: Float[Tensor, "batch heads q k"],
    layout: TokenLayout,
    threshold: float = 0.0008,
    normalise: Normalise = "causal",
) -> Float[Tensor, "batch heads"]:
    """Fraction of a row's image tokens that are sinks, per head (0 for rows without image tokens)."""
    counts = detect_sinks(attn, layout, threshold, normalise).sum(-1).float()
    n_image = layout.n_image_tokens.to(attn.device).clamp_min(1).float()
    return counts / n_image[:, None]


def select_source_heads(counts: Int[Tensor, "batch heads"], top_k: int = 1) -> Int[Tensor, "batch top_k"]:
    """Heads with the most sinks, per row: ``argmax_h |S[b, h]|``, lowest head index on ties.

    Args:
        counts: sink count per row and head.
        top_k: how many heads to return (the EAH source is the first).

    Returns:
        ``Long[batch, top_k]``; ``-1`` marks a slot with no sink head (a row where no head has a sink
        is all ``-1``: nothing is broadcast there).
    """
    if not 1 <= top_k <= counts.shape[-1]:
        raise ConfigError(f"top_k must be in [1, {counts.shape[-1]}] (the number of heads); got {top_k}.")
    values, heads = torch.sort(counts, dim=-1, descending=True, stable=True)
    values, heads = values[:, :top_k], heads[:, :top_k]
    return torch.where(values > 0, heads, torch.full_like(heads, -1))


def select_fewest_sink_heads(counts: Int[Tensor, "batch heads"]) -> Int[Tensor, "batch 1"]:
    """Head with the fewest sinks per row (lowest index on ties): a control for EAH's choice."""
    return torch.sort(counts, dim=-1, stable=True).indices[:, :1]


# ---------------------------------------------------------------------------- massive-activation sinks (VAR)
#: VAR's threshold on the RMS-normalised hidden state in the sink dimensions (Kang et al., ICLR 2025).
MASSIVE_TAU = 20.0


def rms_normalised(hidden: Float[Tensor, "batch seq dim"], eps: float = 1e-6) -> Float[Tensor, "batch seq dim"]:
    """``h / sqrt(mean(h^2) + eps)`` per token, in float32 (RMSNorm without its weight)."""
    hidden = hidden.float()
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)


def massive_activation_sinks(
    hidden: Float[Tensor, "batch seq dim"], dims: tuple[int, ...] | list[int], tau: float = MASSIVE_TAU
) -> Bool[Tensor, "batch seq"]:
    """Sink tokens by massive activations (VAR's definition): ``max_{d in dims} |rms(h)[d]| > tau``.

    A second sink definition next to EAH's column-mass one (`detect_sinks`): it reads a layer's input
    hidden states, not its attention, and marks text tokens (e.g. BOS) as well as image tokens.

    Args:
        hidden: a decoder layer's input hidden states ``[batch, seq, dim]``.
        dims: the model's sink dimensions (model-specific; see `massive_dims` to find them).
        tau: the threshold (VAR: 20).

    Returns:
        ``Bool[batch, seq]``, True at sink tokens.
    """
    if not dims:
        raise ConfigError("massive_activation_sinks needs the model's sink dimensions (dims=...); see massive_dims.")
    bad = [d for d in dims if not 0 <= d < hidden.shape[-1]]
    if bad:
        raise ConfigError(f"Sink dimensions {bad} out of range for hidden size {hidden.shape[-1]}.")
    values = rms_normalised(hidden).abs()[..., list(dims)]
    return values.max(-1).values > tau


def massive_dims(hidden: Float[Tensor, "batch seq dim"], top: int = 2) -> tuple[int, ...]:
    """The ``top`` hidden dimensions with the largest RMS-normalised magnitude over all tokens.

    A way to find a model's sink dimensions for `massive_activation_sinks`: massive activations sit in
    a few fixed dimensions, so the largest single entries point at them.
    """
    peak = rms_normalised(hidden).abs().flatten(0, 1).max(0).values
    return tuple(int(d) for d in peak.topk(top).indices.tolist())


def sink_agreement(
    column_sinks: Bool[Tensor, "batch heads k"], massive: Bool[Tensor, "batch k"], image_mask: Bool[Tensor, "batch k"]
) -> dict[str, Float[Tensor, " batch"]]:
    """How far EAH's sinks and the massive-activation sinks agree on the image tokens of each row.

    Args:
        column_sinks: EAH's vision sinks per head (`detect_sinks`).
        massive: massive-activation sinks (`massive_activation_sinks`) of the same positions.
        image_mask: ``Bool[batch, k]`` image positions.

    Returns:
        Per row (float): ``eah`` image tokens that are a sink in at least one head; ``massive`` image
        tokens with a massive activation; ``both``; ``jaccard`` = both / either (NaN when neither has one).
    """
    image = image_mask.to(massive.device)
    eah = column_sinks.any(1) & image
    mas = massive & image
    both, either = (eah & mas).sum(-1).float(), (eah | mas).sum(-1).float()
    return {
        "eah": eah.sum(-1).float(),
        "massive": mas.sum(-1).float(),
        "both": both,
        "jaccard": torch.where(either > 0, both / either.clamp_min(1), torch.nan),
    }


# ---------------------------------------------------------------------------- null-model diagnostics
#: The null patterns of `null_scores`: ``"uniform"`` (each row spreads its attention evenly over the real
#: keys it can see, itself included) and ``"previous"`` (each row puts all of it on the previous real token).
NULL_PATTERNS = ("uniform", "previous")

#: Thresholds of `density_curve` by default: 41 points log-spaced from 1e-4 to 1.
DEFAULT_THRESHOLDS = tuple(float(10 ** (-4 + i / 10)) for i in range(41))

#: `explained_by_null` flags a head whose density is at least ``(1 - NULL_TOLERANCE)`` times a null's.
NULL_TOLERANCE = 0.1


def _thresholds(thresholds: float | tuple[float, ...] | list[float] | Tensor, device: torch.device) -> Tensor:
    values = torch.as_tensor(thresholds, dtype=torch.float32, device=device).reshape(-1)
    if values.numel() == 0 or bool((values < 0).any()):
        raise ConfigError(f"thresholds must be one or more numbers >= 0; got {thresholds!r}.")
    return values


def null_column_sums(layout: TokenLayout, kind: str, q_len: int | None = None) -> Float[Tensor, "batch k"]:
    """`column_sums` of a null attention pattern built for ``layout``, computed in closed form.

    The patterns are causal and skip padding: a real query row ``i`` (one of the last ``q_len``
    positions) sees the real keys ``j <= i``. ``"uniform"`` gives each of them ``1 / r(i)`` (``r(i)``:
    real positions up to ``i``), so column ``j`` sums ``1 / r(i)`` over the query rows after it;
    ``"previous"`` gives all of row ``i`` to the previous real position (the first real token attends
    itself), so column ``j`` sums 1 if the next real position after ``j`` is a query row, else 0.

    Args:
        layout: the layout of the ``k`` key positions.
        kind: ``"uniform"`` or ``"previous"`` (`NULL_PATTERNS`).
        q_len: query rows (the last ``q_len`` positions; default: all, a prefill).

    Returns:
        ``Float[batch, k]`` in float32 (diagonal removed, as in `column_sums`).
    """
    if kind not in NULL_PATTERNS:
        raise ConfigError(f"Unknown null pattern {kind!r}; choose from {NULL_PATTERNS}.")
    k = layout.seq_len
    q_len = k if q_len is None else q_len
    if not 1 <= q_len <= k:
        raise LayoutError(f"q_len must be in [1, {k}] (the layout's positions); got {q_len}.")
    real = layout.attention_mask.bool()
    is_query = torch.zeros_like(real)
    is_query[:, k - q_len :] = True
    query = real & is_query
    if kind == "uniform":
        seen = real.float().cumsum(-1)  # r(i): real keys a row sees, itself included
        weight = torch.where(query, 1.0 / seen.clamp_min(1), torch.zeros_like(seen))
        after = weight.flip(-1).cumsum(-1).flip(-1) - weight  # sum over rows strictly after j
        return torch.where(real, after, torch.zeros_like(after))
    previous = _previous_real(layout).to(real.device)  # row i attends previous[i]
    attends = query & (previous >= 0)
    sums = torch.zeros(real.shape, dtype=torch.float32, device=real.device)
    return sums.scatter_add_(-1, previous.clamp_min(0), attends.float())


def null_scores(
    layout: TokenLayout, q_len: int | None = None, normalise: Normalise = "causal"
) -> dict[str, Float[Tensor, "batch k"]]:
    """Sink scores a pure uniform and a pure previous-token pattern would get, under ``normalise``.

    The reference a head's scores are read against: under ``"causal"`` the previous-token pattern
    scores ``1 / d(j)`` at every image token (one row's worth of attention over the rows after it), so
    at any threshold below ``1 / (rows after the image)`` a local pattern makes every image token a
    "sink". Non-image keys score 0, as in `sink_scores`.

    Returns:
        ``{"uniform": Float[batch, k], "previous": Float[batch, k]}`` in float32.
    """
    k = layout.seq_len
    q_len = k if q_len is None else q_len
    return {
        kind: sink_scores_from_column_sums(null_column_sums(layout, kind, q_len)[:, None], layout, q_len, normalise)[:, 0]
        for kind in NULL_PATTERNS
    }


def density_curve_from_scores(
    scores: Float[Tensor, "batch heads k"], layout: TokenLayout, thresholds: float | tuple[float, ...] | Tensor
) -> Float[Tensor, "thresholds batch heads"]:
    """Sink density at each threshold, from precomputed sink scores (`sink_scores`)."""
    t = _thresholds(thresholds, scores.device)
    image = layout.image_mask.to(scores.device)
    above = (scores[None] > t[:, None, None, None]) & image[None, :, None, :]
    n_image = layout.n_image_tokens.to(scores.device).clamp_min(1).float()
    return above.sum(-1).float() / n_image[None, :, None]


def density_curve(
    attn: Float[Tensor, "batch heads q k"],
    layout: TokenLayout,
    thresholds: float | tuple[float, ...] | Tensor = DEFAULT_THRESHOLDS,
    normalise: Normalise = "causal",
) -> Float[Tensor, "thresholds batch heads"]:
    """Sink density (`sink_density`) of every head as a function of the threshold.

    A head with real sinks keeps a low, flat density over a wide range of thresholds; a local pattern
    (previous-token, uniform) climbs to 1 as the threshold falls, following its null (`null_densities`).

    Args:
        attn: post-softmax probabilities of one layer, ``[batch, heads, q, k]``.
        layout: the layout of the ``k`` key positions.
        thresholds: the thresholds (default `DEFAULT_THRESHOLDS`, 1e-4 to 1).
        normalise: the sink-score normaliser.

    Returns:
        ``Float[thresholds, batch, heads]``.
    """
    return density_curve_from_scores(sink_scores(attn, layout, normalise), layout, thresholds)


def null_densities(
    layout: TokenLayout,
    thresholds: float | tuple[float, ...] | Tensor = DEFAULT_THRESHOLDS,
    q_len: int | None = None,
    normalise: Normalise = "causal",
) -> dict[str, Float[Tensor, "thresholds batch"]]:
    """The sink density a pure uniform and a pure previous-token pattern get at each threshold.

    Args:
        layout: the layout of the ``k`` key positions.
        thresholds: one threshold or several.
        q_len: query rows (default: all, a prefill).
        normalise: the sink-score normaliser (``"causal"``, ``"official"``, ``"rows"``).

    Returns:
        ``{"uniform": ..., "previous": ...}``, each ``Float[thresholds, batch]`` (``Float[batch]`` when
        ``thresholds`` is one number).
    """
    scalar = isinstance(thresholds, (int, float))
    out = {}
    for kind, scores in null_scores(layout, q_len, normalise).items():
        curve = density_curve_from_scores(scores[:, None], layout, thresholds)[:, :, 0]
        out[kind] = curve[0] if scalar else curve
    return out


def explained_by_null(
    density: Float[Tensor, "*any"], null_density: Float[Tensor, "*any"], tolerance: float = NULL_TOLERANCE
) -> Bool[Tensor, "*any"]:
    """Heads whose "sinks" a null pattern explains: as many sinks as the null gets, or nearly.

    A head is flagged where ``density > 0``, ``null_density > 0`` and
    ``density >= (1 - tolerance) * null_density`` (broadcasting, e.g. ``[batch, heads]`` against
    ``[batch, 1]``): at this threshold and normaliser a pure local pattern already marks that many image
    tokens, so the count says nothing about sinks. A head with a few real sinks among many image tokens
    stays below a dense null; where the null's density is 0 nothing is flagged.

    Args:
        density: sink densities (`sink_density`).
        null_density: a null's density for the same rows (`null_densities`).
        tolerance: relative slack (default `NULL_TOLERANCE`).

    Returns:
        Bool, the broadcast shape of the inputs.
    """
    if not 0 <= tolerance < 1:
        raise ConfigError(f"tolerance must be in [0, 1); got {tolerance}.")
    null_density = null_density.to(density.device)
    return (density > 0) & (null_density > 0) & (density >= (1 - tolerance) * null_density)


def plot_density_curve(
    thresholds: float | tuple[float, ...] | Tensor,
    curves: Float[Tensor, "thresholds heads"],
    nulls: dict[str, Float[Tensor, " thresholds"]] | None = None,
    *,
    threshold: float | None = None,
    heads: list[int] | None = None,
    ax=None,
    title: str | None = None,
):
    """Sink density against the threshold (log axis), one line per head, the nulls dashed.

    Args:
        thresholds: the x values (those given to `density_curve`).
        curves: densities, e.g. ``density_curve(...).mean(1)`` (mean over the batch): ``[thresholds, heads]``.
        nulls: e.g. ``{k: v.mean(-1) for k, v in null_densities(...).items()}``, each ``[thresholds]``.
        threshold: the threshold in use (a vertical line).
        heads: which heads to draw (default: all).
        ax: a matplotlib Axes to draw into (default: a new figure).
        title: the title.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    t = _thresholds(thresholds, torch.device("cpu")).numpy()
    curves = curves.detach().float().cpu()
    if curves.ndim != 2 or curves.shape[0] != len(t):
        raise LayoutError(f"curves must be [thresholds={len(t)}, heads]; got shape {tuple(curves.shape)}.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.6))
    else:
        fig = ax.figure
    for head in heads if heads is not None else range(curves.shape[1]):
        ax.plot(t, curves[:, head].numpy(), label=f"head {head}", lw=1.2)
    styles = {"previous": ("black", "--"), "uniform": ("grey", ":")}
    for kind, values in (nulls or {}).items():
        color, ls = styles.get(kind, ("black", "-."))
        ax.plot(t, values.detach().float().cpu().numpy(), color=color, ls=ls, lw=2, label=f"{kind}-token null" if kind == "previous" else f"{kind} null")
    if threshold is not None:
        ax.axvline(threshold, color="red", lw=0.8, alpha=0.7, label=f"threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("sink threshold")
    ax.set_ylabel("sink density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- how local a head is
def _previous_real(layout: TokenLayout) -> Int[Tensor, "batch k"]:
    """For every position, the previous real (non-padding) position of its row; -1 where there is none."""
    real = layout.attention_mask.bool()
    pos = torch.arange(real.shape[-1], device=real.device).expand_as(real)
    last_real = torch.where(real, pos, torch.full_like(pos, -1)).cummax(-1).values  # last real position <= j
    previous = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=-1)
    return torch.where(real, previous, torch.full_like(previous, -1))


def _query_rows(attn: Tensor, layout: TokenLayout, rows: str | Tensor) -> tuple[Tensor, Tensor]:
    """The query rows of group ``rows`` (``[b, q]`` bool) and their absolute positions (``[q]``)."""
    _check(attn, layout)
    _, _, q, k = attn.shape
    qpos = query_positions(q, k, attn.device)
    mask = layout.group_mask(rows).to(attn.device) & layout.attention_mask.bool().to(attn.device)
    return mask[:, qpos], qpos


def previous_token_share(
    attn: Float[Tensor, "batch heads q k"], layout: TokenLayout, rows: str | Bool[Tensor, "batch k"] = "image"
) -> Float[Tensor, "batch heads"]:
    """How local a head is: the mean share of a row's attention on the previous real token, per head.

    Over the query rows of the position group ``rows`` (`TokenLayout.group_mask`; default the image rows,
    the rows EAH's sink scores are about) that have a previous real token (padding skipped; the first
    real token has none and is left out): ``mean_i P[b, h, i, prev(i)]``. A pure previous-token head
    scores 1, a head spreading its attention evenly over ``r`` keys about ``1 / r``. This is the first
    thing to check before reading a dense "sink" head as a sink head: under the causal normaliser a
    previous-token pattern makes every image token a "sink" at small thresholds (`null_densities`).

    Args:
        attn: post-softmax probabilities of one layer, ``[batch, heads, q, k]`` (prefill, or the last
            ``q`` positions of ``k``).
        layout: the layout of the ``k`` key positions.
        rows: a position group name or a ``Bool[batch, k]`` mask of the rows to average over.

    Returns:
        ``Float[batch, heads]`` in float32; NaN for a row of the batch with no such query row.

    Example:
        >>> layout = TokenLayout.from_spans([(1, 5)], seq_len=6)  # image tokens at positions 1-4
        >>> attn = torch.eye(6).roll(-1, dims=1).tril()[None, None]  # row i -> i-1 (row 0 -> itself below)
        >>> attn[0, 0, 0, 0] = 1.0
        >>> previous_token_share(attn, layout)
        tensor([[1.]])
    """
    query, qpos = _query_rows(attn, layout, rows)
    previous = _previous_real(layout.to(attn.device))[:, qpos]  # [b, q]
    use = query & (previous >= 0)
    index = previous.clamp_min(0)[:, None, :, None].expand(-1, attn.shape[1], -1, 1)  # [b, h, q, 1]
    on_previous = attn.gather(-1, index)[..., 0].float()  # [b, h, q]: one value per row, then float32
    weights = use[:, None, :].float()
    count = weights.sum(-1)
    return torch.where(count > 0, (on_previous * weights).sum(-1) / count.clamp_min(1), torch.nan)


def null_pattern_distance(
    attn: Float[Tensor, "batch heads q k"], layout: TokenLayout, kind: str,
    rows: str | Bool[Tensor, "batch k"] = "image",
) -> Float[Tensor, "batch heads"]:
    """How far a head's attention rows are from a null pattern: mean total-variation distance, per head.

    The null patterns are those of `null_column_sums` (`NULL_PATTERNS`): ``"previous"`` (all of a row on
    the previous real token: the distance is ``1 - previous_token_share``) and ``"uniform"`` (a row spread
    evenly over the real keys it sees, itself included). Per query row of the group ``rows`` (with a
    previous real token), ``TV(P_i, N_i) = 0.5 * sum_j |P[i, j] - N[i, j]|``, averaged over the rows.
    0 means the head *is* the null pattern; 1 means it shares no mass with it. Unlike the sink density
    (`explained_by_null`), which saturates at 1 for every local or broad head at small thresholds, this
    tells a previous-token head (near 0 from ``"previous"``, far from ``"uniform"``) from a broad one.

    Returns:
        ``Float[batch, heads]`` in float32; NaN for a batch row without such query rows.
    """
    if kind not in NULL_PATTERNS:
        raise ConfigError(f"Unknown null pattern {kind!r}; choose from {NULL_PATTERNS}.")
    if kind == "previous":
        return 1.0 - previous_token_share(attn, layout, rows)
    query, qpos = _query_rows(attn, layout, rows)
    real = layout.attention_mask.bool().to(attn.device)
    previous = _previous_real(layout.to(attn.device))[:, qpos]
    use = query & (previous >= 0)
    k = attn.shape[-1]
    sees = real[:, None, :] & (torch.arange(k, device=attn.device)[None, None, :] <= qpos[None, :, None])  # [b, q, k]
    null = sees.float() / sees.float().sum(-1, keepdim=True).clamp_min(1)
    tv = 0.5 * (attn.float() - null[:, None]).abs().sum(-1)  # [b, h, q]
    weights = use[:, None, :].float()
    count = weights.sum(-1)
    return torch.where(count > 0, (tv * weights).sum(-1) / count.clamp_min(1), torch.nan)


def curve_distance(
    curve: Float[Tensor, "thresholds ..."], null_curve: Float[Tensor, "thresholds ..."]
) -> Float[Tensor, " *rest"]:
    """Mean absolute difference of two density-vs-threshold curves (`density_curve`, `null_densities`).

    Over the thresholds given (log-spaced `DEFAULT_THRESHOLDS`: a mean over log-threshold), broadcasting
    the other dimensions (e.g. ``[T, batch, heads]`` against ``[T, batch, 1]``). 0: the head's sink counts
    follow the null's at every threshold; a head with a few real sinks keeps density where the null has
    none (or none where the null has many) and scores high.
    """
    if curve.shape[0] != null_curve.shape[0]:
        raise LayoutError(f"the curves have {curve.shape[0]} and {null_curve.shape[0]} thresholds: compute both on one grid.")
    return (curve.float() - null_curve.float().to(curve.device)).abs().mean(0)
