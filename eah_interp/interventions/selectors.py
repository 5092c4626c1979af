"""Where an intervention acts: layer ranges, query rows, key spans and phase, resolved against a `TokenLayout`.

Every selector is computed from the layout of the call (image and padding positions per row) and the
prompt length, never from hard-coded offsets. Positions are absolute key positions ``0 .. k - 1``;
query row ``i`` of a call with ``q`` rows sits at ``k - q + i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from eah_interp.errors import ConfigError, LayerIndexError, LayoutError
from eah_interp.layout import TokenLayout
from eah_interp.sinks import query_positions

#: Query-row selectors: every row, rows after the last image token, the call's last row (the next-token
#: row in a prefill, the new token at a decode step), or decode steps only.
ROWS = ("all", "after_image", "last", "decode")
#: Key spans: image tokens; the system prompt (real tokens before the first image token); the prompt's
#: text after the first image token ("question"); generated tokens; question + generated ("text");
#: every real key ("all").
SPANS = ("image", "system", "question", "generated", "text", "all")
#: Phases: the prompt forward, decode steps with a KV cache, or both.
PHASES = ("prefill", "decode", "both")

#: Depth of the model the official defaults were set for (LLaVA-1.5-7B: Vicuna-7B, 32 decoder layers).
REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class Site:
    """One attention call as an intervention sees it.

    Attributes:
        layer: the decoder layer.
        layout: the layout of the call's ``k`` key positions (generated positions appended as text).
        q_len, k_len: query rows and key positions of the call.
        prompt_len: positions of the prompt (keys at or after it are generated tokens).
    """

    layer: int
    layout: TokenLayout
    q_len: int
    k_len: int
    prompt_len: int

    @property
    def prefill(self) -> bool:
        return self.q_len == self.k_len


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a `ConfigError` naming the choices when ``value`` is not one of them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}; got {value!r}.")


def phase_matches(phase: str, q_len: int, k_len: int) -> bool:
    """Whether a call with ``q_len`` rows over ``k_len`` keys belongs to ``phase``."""
    prefill = q_len == k_len
    return phase == "both" or (phase == "prefill") == prefill


def scaled_range(start: int, stop: int, n_layers: int, reference: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """An official layer range ``[start, stop)`` set for a ``reference``-layer model, scaled to ``n_layers``.

    The rule: both ends scale with depth, ``floor(start * n / reference + 0.5)`` and ``floor(stop * n /
    reference + 0.5)``, keeping at least one layer. On a ``reference``-layer model the range is unchanged.

    Example:
        PAI's layers 2..31 of 32 become ``scaled_range(2, 32, 4) == (0, 1, 2, 3)`` on a 4-layer model;
        the middle-layer boost's 5..18 of 32 become ``(1, 2)``.
    """
    lo = math.floor(start * n_layers / reference + 0.5)
    hi = max(lo + 1, math.floor(stop * n_layers / reference + 0.5))
    return tuple(range(min(lo, n_layers - 1), min(hi, n_layers)))


def check_layers(layers: tuple[int, ...], n_layers: int, what: str) -> None:
    """Raise a `LayerIndexError` naming the model's depth when a layer does not exist."""
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise LayerIndexError(
            f"{what}: layers {bad} out of range: the language model has {n_layers} decoder layers "
            f"(0..{n_layers - 1}). Pass layers=... for this model, or layers=None for the method's own range "
            "scaled to its depth."
        )


def as_layers(layers: object, what: str) -> tuple[int, ...] | None:
    """Normalise a ``layers`` argument: None, an int, a ``range`` or an iterable of non-negative ints."""
    if layers is None:
        return None
    values = (layers,) if isinstance(layers, int) else tuple(layers)  # type: ignore[arg-type]
    if not values or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in values):
        raise ConfigError(f"{what}.layers must be None or non-negative layer indices; got {layers!r}.")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}.layers has duplicates: {values!r}.")
    return values


def key_span(span: str, site: Site) -> Bool[Tensor, "batch k"]:
    """``Bool[batch, k]``: the keys of each row in ``span`` (see `SPANS`), real positions only."""
    layout = site.layout
    real = layout.attention_mask
    pos = torch.arange(layout.seq_len, device=real.device)[None, :]
    start, _ = layout.image_extent()
    has_image = layout.image_mask.any(-1, keepdim=True)
    after_first_image = (pos >= start[:, None]) & has_image
    generated = pos >= site.prompt_len
    if span == "image":
        return layout.image_mask
    if span == "system":
        return real & ~after_first_image & ~layout.image_mask & has_image
    if span == "question":
        return real & after_first_image & ~layout.image_mask & ~generated
    if span == "generated":
        return real & generated
    if span == "text":
        return real & after_first_image & ~layout.image_mask
    if span == "all":
        return real
    raise ConfigError(f"Unknown key span {span!r}; choose from {SPANS}.")


#: A user position mask as an intervention stores it: one tuple of booleans per batch row (JSON-ready).
UserMask = tuple[tuple[bool, ...], ...]


def as_user_mask(value: object, what: str) -> str | UserMask:
    """A span name as is, or a ``Bool[batch, seq]`` mask (tensor or nested lists) as tuples of booleans."""
    if isinstance(value, str):
        return value
    try:
        mask = torch.as_tensor(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must be a span name or a Bool[batch, seq] mask; got {type(value).__name__}.") from err
    if mask.ndim != 2 or mask.numel() == 0 or not (mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all())):
        raise ConfigError(
            f"{what} must be a span name or a Bool[batch, seq] mask over the prompt's positions; got shape "
            f"{tuple(mask.shape)} and dtype {mask.dtype}."
        )
    return tuple(tuple(bool(x) for x in row) for row in mask.bool().tolist())


def span_text(spec: str | UserMask) -> str:
    """A span name, or ``"user-masked (n positions)"`` for a user mask (for ``describe``)."""
    return spec if isinstance(spec, str) else f"user-masked ({sum(map(sum, spec))} positions)"


def positions_of(spec: str | UserMask, site: Site) -> Bool[Tensor, "batch k"]:
    """``Bool[batch, k]``: the call's keys in a span (`key_span`) or in a user mask over the prompt's positions.

    A user mask covers the prompt (``[batch, prompt length]``); generated positions are never in it. At
    a decode step of a sliding-window layer the call's keys are the last ``k`` positions, and the mask is
    shifted accordingly.
    """
    if isinstance(spec, str):
        return key_span(spec, site)
    layout = site.layout
    mask = torch.tensor(spec, dtype=torch.bool, device=layout.attention_mask.device)
    batch, seq = mask.shape
    shift = seq - site.prompt_len  # > 0 only when a sliding window dropped the first keys
    if batch != layout.batch_size or shift < 0 or (site.prefill and seq != site.k_len):
        raise LayoutError(
            f"The user position mask has shape {(batch, seq)} but the prompt has {layout.batch_size} rows x "
            f"{site.prompt_len if site.prefill else 'its'} positions: build it for these inputs "
            "(e.g. from TokenLayout.from_input_ids(...).image_mask)."
        )
    columns = torch.arange(site.k_len, device=mask.device) + shift
    inside = columns < seq
    out = torch.zeros(batch, site.k_len, dtype=torch.bool, device=mask.device)
    out[:, inside] = mask[:, columns[inside]]
    return out & layout.attention_mask


def query_rows(rows: str, site: Site) -> Bool[Tensor, "batch q"]:
    """``Bool[batch, q]``: the query rows of each batch row selected by ``rows`` (see `ROWS`), real only."""
    layout = site.layout
    qpos = query_positions(site.q_len, site.k_len, layout.attention_mask.device)
    real = layout.attention_mask[:, qpos]
    if rows == "all":
        return real
    if rows == "last":
        last = torch.zeros_like(real)
        last[:, -1] = True
        return real & last
    if rows == "decode":
        return real & (not site.prefill)
    if rows == "after_image":
        _, end = layout.image_extent()
        return real & (qpos[None, :] >= end[:, None]) & layout.image_mask.any(-1, keepdim=True)
    raise ConfigError(f"Unknown query-row selector {rows!r}; choose from {ROWS}.")


def entries(rows: Bool[Tensor, "batch q"], keys: Bool[Tensor, "batch k"]) -> Bool[Tensor, "batch 1 q k"]:
    """The (row, key) entries selected by a row and a key selector, broadcast over heads."""
    return rows[:, None, :, None] & keys[:, None, None, :]


def visible(scores: Tensor) -> Tensor:
    """Entries of post-mask scores that the mask leaves visible (masked ones hold the dtype minimum)."""
    return scores > torch.finfo(scores.dtype).min / 2


def rows_after_image(site: Site) -> int:
    """How many trailing query rows of the call lie after the image in some batch row (all: no image)."""
    _, end = site.layout.image_extent()
    has = site.layout.image_mask.any(-1)
    if not bool(has.all()):
        return site.q_len
    first_row = int(end.min()) - (site.k_len - site.q_len)  # the earliest row after an image, over the batch
    return min(site.q_len, max(0, site.q_len - first_row))
