"""Where an intervention acts: layer ranges, query rows, key spans and phase, resolved against a `TokenLayout`.

Every selector is computed from the layout of the call (image and padding positions per row) and the
prompt length, never from hard-coded offsets. Positions are absolute key positions ``0 .. k - 1``;
query row ``i`` of a call with ``q`` rows sits at ``k - q + i``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Bool
from torch import Tensor

from eah_interp.errors import ConfigError, LayerIndexError, LayoutError
from eah_interp.layout import GROUPS, TokenLayout
from eah_interp.sinks import query_positions

#: Query-row selectors: every row, rows after the last image token, the call's last row (the next-token
#: row in a prefill, the new token at a decode step), or decode steps only.
ROWS = ("all", "after_image", "last", "decode")
#: Key spans: the layout's position groups (`eah_interp.layout.GROUPS`: "system", "image", "question",
#: "last", "generated", "text", "all", exactly as `TokenLayout.group_mask` defines them, so an intervention,
#: a patch and a statistic mean the same positions by one name), plus "after_image": every real non-image
#: position after the first image token (question + last + generated: AD-HH's "text after the image").
#: Wherever a span names positions (`Knockout`, `ValueEdit`, `ResidualEdit`), a user ``Bool[batch, seq]``
#: mask of the prompt's positions works too.
SPANS = (*GROUPS, "after_image")
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
        key_flags: for an intervention that reads hidden states (``reads_hidden``): ``Bool[batch, k]``, its
            `Intervention.hidden_flags` of the call's keys (found in the prompt; generated keys False).
    """

    layer: int
    layout: TokenLayout
    q_len: int
    k_len: int
    prompt_len: int
    key_flags: Tensor | None = None

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


def chosen_layers(layers: str | Iterable[int] | None, n_layers: int, what: str = "record_attention") -> tuple[int, ...]:
    """``"all"`` / None (every layer) or layer indices, checked against the model's depth (`check_layers`)."""
    chosen = tuple(range(n_layers)) if layers is None or layers == "all" else tuple(dict.fromkeys(int(x) for x in layers))
    check_layers(chosen, n_layers, what)
    return chosen


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


def as_group(value: object, what: str) -> str | tuple[tuple[bool, ...], ...]:
    """Normalise a position-group argument: a name of `SPANS`, or a mask as a tuple of bool rows.

    A mask (a ``Bool[batch, seq]`` tensor or nested lists of bools) is stored as nested tuples, so the
    intervention stays hashable, comparable and JSON-serialisable.
    """
    if isinstance(value, str):
        check_choice(what, value, SPANS)
        return value
    if isinstance(value, Tensor):
        if value.ndim != 2 or value.dtype != torch.bool:
            raise ConfigError(f"{what}: a mask must be a Bool[batch, seq] tensor; got {value.dtype} {tuple(value.shape)}.")
        value = value.tolist()
    try:
        rows = tuple(tuple(row) for row in value)  # type: ignore[union-attr]
    except TypeError:
        rows = ()
    if not rows or any(not isinstance(x, bool) for row in rows for x in row):
        raise ConfigError(f"{what} must be one of {SPANS} or a Bool[batch, seq] mask; got {value!r}.")
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise ConfigError(f"{what}: a mask needs rows of one non-zero length; got lengths {[len(r) for r in rows]}.")
    return rows


def group_keys(group: str | tuple[tuple[bool, ...], ...] | Tensor, site: Site) -> Bool[Tensor, "batch k"]:
    """``Bool[batch, k]``: the keys of a named group (`SPANS`) or of a user mask, for one call.

    A mask covers the prompt (``seq`` = the prompt's length, or the call's ``k``); on a decode step
    the generated keys are appended as unselected, and rows are repeated when the call expands them
    (beams). It is checked against the call's layout (`TokenLayout.group_mask`).

    Raises:
        LayoutError: the mask does not fit the call.
    """
    layout = site.layout
    if isinstance(group, str):
        return key_span(group, site)
    mask = torch.as_tensor(group, dtype=torch.bool, device=layout.attention_mask.device)
    batch, width = mask.shape
    if batch != layout.batch_size and layout.batch_size % batch == 0:
        mask = mask.repeat_interleave(layout.batch_size // batch, 0)
    if width < layout.seq_len and width == min(site.prompt_len, layout.seq_len):
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], layout.seq_len - width)], dim=1)
    if tuple(mask.shape) != (layout.batch_size, layout.seq_len):
        raise LayoutError(
            f"A user position mask of shape {(batch, width)} does not fit this call ({layout.batch_size} rows x "
            f"{layout.seq_len} keys, prompt of {site.prompt_len}): pass a mask of the prompt's shape (batch, seq)."
        )
    return layout.group_mask(mask)


def key_span(span: str, site: Site) -> Bool[Tensor, "batch k"]:
    """``Bool[batch, k]``: the keys of each row in ``span`` (see `SPANS`), real positions only.

    The layout's groups (`TokenLayout.group_mask`) with the call's prompt length, so that keys at or
    after it (decode steps) are "generated"; "after_image" is question + last + generated.
    """
    check_choice("key span", span, SPANS)
    layout = dataclasses.replace(site.layout, prompt_len=min(site.prompt_len, site.layout.seq_len))
    if span != "after_image":
        return layout.group_mask(span)
    pos = torch.arange(layout.seq_len, device=layout.attention_mask.device)[None, :]
    start, _ = layout.image_extent()
    after_first_image = (pos >= start[:, None]) & layout.image_mask.any(-1, keepdim=True)
    return layout.attention_mask & after_first_image & ~layout.image_mask


#: A user position mask as an intervention stores it: one tuple of booleans per batch row (JSON-ready).
UserMask = tuple[tuple[bool, ...], ...]


def span_text(spec: str | UserMask) -> str:
    """A group name, or ``"user-masked (n positions)"`` for a user mask (for ``describe``)."""
    return spec if isinstance(spec, str) else f"user-masked ({sum(map(sum, spec))} positions)"


def query_rows(rows: str | tuple[tuple[bool, ...], ...] | Tensor, site: Site) -> Bool[Tensor, "batch q"]:
    """``Bool[batch, q]``: the query rows of each batch row selected by ``rows``, real only.

    ``rows`` is a selector of `ROWS` (``"last"``: the call's last row), or else a position group of
    `SPANS` or a user mask (`group_keys`): the rows at those positions.
    """
    layout = site.layout
    qpos = query_positions(site.q_len, site.k_len, layout.attention_mask.device)
    real = layout.attention_mask[:, qpos]
    if not isinstance(rows, str) or (rows not in ROWS and rows in SPANS):
        return real & group_keys(rows, site)[:, qpos]
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
