"""Attention-pattern broadcast: copy a source head's map onto the other heads of a layer (EAH)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eah_interp.errors import ConfigError, HeadIndexError, LayoutError
from eah_interp.layout import TokenLayout

Region = Literal["full", "image"]
REGION_CHOICES = ("full", "image")


def _as_source_heads(source_heads: int | Tensor, batch: int, device: torch.device) -> Int[Tensor, "batch k"]:
    if isinstance(source_heads, int):
        return torch.full((batch, 1), source_heads, dtype=torch.long, device=device)
    heads = torch.as_tensor(source_heads, dtype=torch.long, device=device)
    if heads.ndim == 0:
        heads = heads.expand(batch)
    if heads.ndim == 1:
        heads = heads[:, None]
    if heads.shape[0] != batch:
        raise LayoutError(f"source_heads has {heads.shape[0]} rows; the attention has {batch}.")
    return heads


def source_map(
    attn: Float[Tensor, "batch heads q k"], source_heads: int | Int[Tensor, " batch"] | Int[Tensor, "batch k"]
) -> tuple[Float[Tensor, "batch q k"], Bool[Tensor, " batch"]]:
    """The map to broadcast: the source head's map, or the mean of several source heads' maps.

    Args:
        attn: probabilities ``[batch, heads, q, k]``.
        source_heads: one head for all rows, one per row ``[batch]``, or several per row ``[batch, k]``
            (their maps are averaged); ``-1`` entries are ignored.

    Returns:
        ``(maps [batch, q, k], has_source [batch])``; rows without any source head get zeros and False.
    """
    b, h = attn.shape[:2]
    heads = _as_source_heads(source_heads, b, attn.device)
    if bool((heads >= h).any()) or bool((heads < -1).any()):
        raise HeadIndexError(f"Source head index out of range for a layer with {h} heads: {heads.tolist()}.")
    valid = heads >= 0
    index = heads.clamp_min(0)
    gathered = attn[torch.arange(b, device=attn.device)[:, None], index]  # [b, k, q, klen]
    weights = valid.to(attn.dtype)
    n = weights.sum(-1).clamp_min(1)
    maps = (gathered * weights[:, :, None, None]).sum(1) / n[:, None, None]
    return maps, valid.any(-1)


def drop_columns(
    maps: Float[Tensor, "batch q k"], columns: Bool[Tensor, "batch k"]
) -> Float[Tensor, "batch q k"]:
    """Zero the given key columns and renormalise each row to sum to its original total.

    The "sink-free" control: the source head's map with its sink columns removed. A row whose
    whole mass sat in the removed columns is left unchanged.
    """
    kept = maps.masked_fill(columns[:, None, :].to(maps.device), 0)
    total, kept_total = maps.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    ok = kept_total > 0
    return torch.where(ok, kept * (total / kept_total.where(ok, torch.ones_like(kept_total))), maps)


def broadcast_heads(
    attn: Float[Tensor, "batch heads q k"],
    source_heads: int | Int[Tensor, " batch"] | Int[Tensor, "batch k"],
    *,
    region: Region = "full",
    layout: TokenLayout | None = None,
    alpha: float = 1.0,
    target_heads: Sequence[int] | None = None,
    source: Float[Tensor, "batch q k"] | None = None,
) -> Float[Tensor, "batch heads q k"]:
    """Broadcast a source map onto the target heads: ``P[b, h] <- (1 - alpha) P[b, h] + alpha P[b, h*]``.

    Args:
        attn: probabilities ``[batch, heads, q, k]`` (not modified).
        source_heads: see `source_map`; rows whose source is ``-1`` are returned unchanged.
        region: ``"full"`` replaces the whole map (EAH); ``"image"`` replaces only the image-key
            columns, rescaled so that each query row keeps its own image-attention mass (rows stay
            stochastic; where the source row has no image mass the row is unchanged). Needs ``layout``.
        layout: token layout (required for ``region="image"``).
        alpha: blend weight in ``(0, 1]``; 1 is EAH's plain copy. Blending keeps rows stochastic.
        target_heads: heads to overwrite (default: all heads of the layer).
        source: a precomputed source map ``[batch, q, k]`` (e.g. from `drop_columns`); overrides the
            maps of ``source_heads`` (which then only mark which rows are edited).

    Returns:
        The edited probabilities, same shape and dtype as ``attn``.
    """
    if region not in REGION_CHOICES:
        raise ConfigError(f"region must be one of {REGION_CHOICES}; got {region!r}.")
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha must be in (0, 1]; got {alpha}.")
    b, h, q, k = attn.shape
    maps, has_source = source_map(attn, source_heads)
    if source is not None:
        maps = source.to(attn.dtype)
    targets = torch.zeros(h, dtype=torch.bool, device=attn.device)
    if target_heads is None:
        targets[:] = True
    else:
        bad = [t for t in target_heads if not 0 <= t < h]
        if bad:
            raise HeadIndexError(f"target_heads {bad} out of range for a layer with {h} heads.")
        targets[list(target_heads)] = True
    new = maps[:, None].expand(b, h, q, k)
    if region == "image":
        if layout is None:
            raise ConfigError('region="image" needs the token layout (which key columns are image tokens).')
        image_cols = layout.image_mask.to(attn.device)[:, None, None, :]
        own_mass = (attn * image_cols).sum(-1, keepdim=True)
        src_mass = (new * image_cols).sum(-1, keepdim=True)
        ok = src_mass > 0
        scaled = new * (own_mass / src_mass.where(ok, torch.ones_like(src_mass)))
        new = torch.where(image_cols & ok, scaled, attn)
    if alpha != 1.0:
        new = (1.0 - alpha) * attn + alpha * new
    edit = has_source[:, None, None, None] & targets[None, :, None, None]
    return torch.where(edit, new.to(attn.dtype), attn)
