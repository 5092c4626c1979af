"""One attention dispatcher per model: the steps of every active context, run in one documented order.

While any eah-interp context is active on a model, its language model has exactly one attention
function registered with transformers' `AttentionInterface` (and a mask function under the same name,
`AttentionMaskInterface`: SDPA's own for an SDPA model, so layers nothing edits keep SDPA's fast causal
path). The first context entered installs it (`push`), the last to exit restores the model's own
implementation (`pop`). Per attention call the dispatcher asks every active context, outermost first,
for its `AttentionStep`s and `run_steps` runs them:

score edits (before the mask, then after it) → softmax → probability edits → recordings (they read
the edited probabilities) → value edits → ``P @ V`` → per-head output edits.

It picks the cheapest path the steps allow: the model's own attention when only output and value
edits are active (with the edited values: one call per set of query rows reading the same values); map-free running sums (`eah_interp.chunked`) for recordings alone or with one plain-copy EAH;
the model's own attention for a prompt's rows plus an eager recomputation of its last rows when the
edits only touch those (the last row, the text after the image); otherwise the eager path. The user
contexts (`eah`, `record_attention`, `intervene`) live in `eah_interp.hf`.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp import compat
from eah_interp.chunked import AttentionSums, chunked_attention
from eah_interp.errors import AttentionImplementationError, UnsupportedModelError
from eah_interp.layout import TokenLayout

_names = itertools.count()
_names_lock = threading.Lock()

#: Attention implementations whose layers can run next to an eager-mask edited layer.
COMPATIBLE = ("eager", "sdpa")


# ---------------------------------------------------------------------------- the family's eager attention
def additive_mask(
    attention_mask: Tensor | None, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device | None = None
) -> Float[Tensor, "batch 1 q k"] | None:
    """The additive (eager) form of whatever mask the model built for its own implementation.

    Args:
        attention_mask: ``None`` (SDPA's "causal, no padding" shortcut), a boolean mask (True = attend)
            or an additive float mask ``[batch, 1, q, k]``.
        q_len, k_len: query rows and key positions of the call (query row ``i`` sits at ``k - q + i``).
        dtype: the query dtype.
        device: where to build the causal mask when ``attention_mask`` is None (the query's device).

    Returns:
        An additive mask (0 = attend, dtype minimum = masked), or ``None`` when every key is visible
        (a single query row without padding).
    """
    if attention_mask is None:
        if q_len == 1:
            return None
        qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= qpos
        attention_mask = allowed[None, None]
    if attention_mask.dtype == torch.bool:
        zeros = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return zeros.masked_fill(~attention_mask, torch.finfo(dtype).min)
    return attention_mask


def eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs):
    """The model family's eager attention, whatever mask format the model built (see `additive_mask`).

    Returns ``(output [batch, q, heads, d], probabilities [batch, heads, q, k])``. The eager path of a
    chosen layer, and the function `eah_interp.nnsight` points a layer's attention call at in a trace.
    """
    mask = additive_mask(attention_mask, query.shape[-2], key.shape[-2], query.dtype, query.device)
    family = compat.family_eager_attention(module)
    return family(module, query, key, value, mask, **kwargs)


# ---------------------------------------------------------------------------- one attention call, its edits
#: Where an edit acts inside one attention call, in the order the dispatcher runs them: scores before
#: the mask is added, scores after it, probabilities after the softmax, recordings (they read the
#: probabilities the layer really uses), the values ``[batch, kv_heads, k, d]`` (the whole KV cache at a
#: decode step; the cache itself keeps the model's own values), then the per-head outputs (``P @ V``,
#: before ``o_proj``).
EDIT_POINTS = ("scores_premask", "scores", "probs", "record", "values", "output")


@dataclass
class AttentionCall:
    """One call of a language-model attention layer, as the edits of the active contexts see it.

    Attributes:
        module: the attention module (``module.layer_idx == layer``).
        layer: the decoder layer.
        query: ``[batch, heads, q, d]`` after rotary embedding.
        key, value: ``[batch, kv_heads, k, d]`` (the whole KV cache on a decode step).
        mask: the mask the model built for its implementation (None, boolean or additive ``[batch, 1, q, k]``).
        kwargs: the remaining keyword arguments of the attention function (``scaling``, ``dropout``, ...).
    """

    module: nn.Module
    layer: int
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    kwargs: dict[str, Any]

    @property
    def q_len(self) -> int:
        return self.query.shape[-2]

    @property
    def k_len(self) -> int:
        return self.key.shape[-2]

    @property
    def prefill(self) -> bool:
        """A prompt forward: every key position is also a query row."""
        return self.q_len == self.k_len

    @property
    def scaling(self) -> float:
        return self.kwargs.get("scaling", self.module.scaling)


@dataclass
class AttentionStep:
    """One edit (or recording) an active context asks for in one attention call.

    Attributes:
        point: one of `EDIT_POINTS`.
        fn: ``fn(tensor, layout, call)``: scores ``[batch, heads, q, k]`` at the score points,
            probabilities at ``"probs"`` / ``"record"``, the values ``[batch, kv_heads, k, d]`` at
            ``"values"``, the output ``[batch, q, heads, d]`` at ``"output"``. Returns the edited tensor
            (None: unchanged; a recording returns None).
        layout: the context's layout fitted to this call.
        sums: for a recording: ``sums(AttentionSums, layout, call)``, the same recording from running
            sums, so the dispatcher can take a map-free path; None if it needs the map.
        map_free: for a probability edit: ``map_free(call, layout, statistics) -> (output, sums of the
            edited layer)`` computing the whole edited layer without a map, or None.
        tail: the edit only ever changes (or reads) the call's last ``tail`` query rows (then a prompt's
            other rows keep the model's own attention and only those rows are recomputed); None: any row.
        rows: for a value edit: ``rows(layout, call) -> Bool[batch, q]``, the query rows that read the
            edited values (the others read the unedited ones); None: every row.
    """

    point: str
    fn: Callable[[Tensor, TokenLayout, AttentionCall], Tensor | None]
    layout: TokenLayout
    sums: Callable[[AttentionSums, TokenLayout, AttentionCall], None] | None = None
    map_free: Callable[[AttentionCall, TokenLayout, bool], tuple[Tensor, AttentionSums]] | None = None
    tail: int | None = None
    rows: Callable[[TokenLayout, AttentionCall], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.point not in EDIT_POINTS:
            raise ValueError(f"Unknown edit point {self.point!r}; choose from {EDIT_POINTS}.")


def _same_layout(a: TokenLayout, b: TokenLayout) -> bool:
    return a is b or (torch.equal(a.image_mask, b.image_mask) and torch.equal(a.attention_mask, b.attention_mask))


def _not_plain_reason(module: nn.Module, kwargs: dict[str, Any]) -> str:
    """What the call computes beyond softmax of scaled ``Q K^T`` + mask (what `eah_interp.chunked` reproduces
    exactly), or ``""`` when nothing."""
    extras = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None]
    if module.training and kwargs.get("dropout", 0.0):
        extras.append("dropout (the module is in training mode)")
    return ", ".join(extras)


def _scores(call: AttentionCall, steps: list[AttentionStep]) -> Tensor:
    """``softmax(edit_post(edit_pre(Q K^T * scale) + mask))`` with the score edits in order, as the
    family's eager attention computes it (softmax in float32, cast to the query dtype)."""
    reason = _not_plain_reason(call.module, call.kwargs)
    if reason:
        raise UnsupportedModelError(
            f"Layer {call.layer}: a score edit needs attention that is softmax(Q K^T * scale + mask), but this "
            f"call also uses {reason}. Edit the probabilities instead, or use model.eval()."
        )
    groups = call.query.shape[1] // call.key.shape[1]
    keys = call.key.repeat_interleave(groups, dim=1) if groups > 1 else call.key
    scores = torch.matmul(call.query, keys.transpose(-1, -2)) * call.scaling
    for step in steps:
        if step.point == "scores_premask":
            scores = _apply(step, scores, call)
    mask = additive_mask(call.mask, call.q_len, call.k_len, scores.dtype, scores.device)
    if mask is not None:
        scores = scores + mask[..., : call.k_len]
    for step in steps:
        if step.point == "scores":
            scores = _apply(step, scores, call)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(call.query.dtype)


def _apply(step: AttentionStep, tensor: Tensor, call: AttentionCall) -> Tensor:
    edited = step.fn(tensor, step.layout, call)
    return tensor if edited is None else edited


def _times_values(probs: Tensor, value: Tensor) -> Tensor:
    """``P @ V`` with GQA values repeated: ``[batch, q, heads, d]``."""
    values = value.repeat_interleave(probs.shape[1] // value.shape[1], dim=1)
    return torch.matmul(probs.to(values.dtype), values).transpose(1, 2).contiguous()


def run_steps(
    call: AttentionCall, steps: list[AttentionStep], fallback: Callable | None = None
) -> tuple[Tensor, Tensor | None]:
    """One attention call with the edits of every active context, in the documented order.

    Score edits (before the mask, then after it; each group in stack order) → softmax → probability
    edits (in order) → recordings (they see the edited probabilities) → value edits (in order; each
    query row reads the values edited by the steps whose ``rows`` select it) → ``P @ V`` → output edits.
    Without a map where nothing needs it: output and value edits alone take the model's own attention
    (``fallback``, with the edited values); recordings alone accumulate running sums
    (`eah_interp.chunked`); one plain-copy EAH (optionally with recordings) runs map-free (`eah_interp.edit.map_free_eah`); edits of a prompt's last
    rows alone (the last row, the text after the image) recompute only those rows, the others keep ``fallback``.

    Args:
        call: the attention call.
        steps: the active contexts' steps, outermost context first.
        fallback: the model's own attention function (e.g. SDPA), for the rows and calls nothing edits.

    Returns:
        ``(output [batch, q, heads, d], probabilities [batch, heads, q, k] or None)``.
    """
    outputs = [s for s in steps if s.point == "output"]
    inner = [s for s in steps if s.point != "output"]
    result = None
    if not inner and fallback is not None:
        result = fallback(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    elif fallback is not None and all(s.point == "values" for s in inner):
        # output and value edits alone: the model's own attention, once per set of edited values
        result = _with_values(call, inner, lambda values: fallback(
            call.module, call.query, call.key, values, call.mask, **call.kwargs)[0]), None
    if result is None and inner:
        result = _map_free(call, inner)
    if result is None and inner:
        result = _tail_rows(call, inner, fallback)
    if result is None:
        result = _eager(call, inner)
    out, probs = result
    for step in outputs:
        out = _apply(step, out, call)
    return out, probs


def _eager(call: AttentionCall, steps: list[AttentionStep]) -> tuple[Tensor, Tensor]:
    """The eager path: the full probability map, edited and read by the steps, then ``P @ V``."""
    by_point = {point: [s for s in steps if s.point == point] for point in EDIT_POINTS}
    changed = bool(by_point["scores_premask"] or by_point["scores"])
    if changed:
        probs = _scores(call, steps)
        out = None
    else:
        out, probs = eager_attention(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    for step in by_point["probs"]:
        edited = step.fn(probs, step.layout, call)
        if edited is not None:
            probs, changed = edited, True
    for step in by_point["record"]:
        step.fn(probs, step.layout, call)
    if by_point["values"]:
        out = _with_values(call, by_point["values"], lambda values: _times_values(probs, values))
    elif changed or out is None:
        out = _times_values(probs, call.value)
    return out, probs


def _with_values(
    call: AttentionCall, steps: list[AttentionStep], attend: Callable[[Tensor], Tensor]
) -> Float[Tensor, "batch q heads d"]:
    """``attend(values)`` with the value edits: each query row gets the output computed from the values
    edited by the steps (in order) whose ``rows`` select it. One ``attend`` per distinct set of steps
    among the rows (one when every step edits every row); each step's ``fn`` runs once per distinct
    prefix of that set (once when the steps select the same rows)."""
    b, q = call.query.shape[0], call.q_len
    device = call.query.device
    masks = [
        torch.ones(b, q, dtype=torch.bool, device=device) if s.rows is None else s.rows(s.layout, call).to(device)
        for s in steps
    ]
    signature = torch.stack(masks, -1)  # [b, q, steps]
    edited: dict[tuple[bool, ...], Tensor] = {(): call.value}
    out = None
    for combo in torch.unique(signature.reshape(-1, len(steps)), dim=0).tolist():
        prefix: tuple[bool, ...] = ()
        for step, on in zip(steps, combo, strict=True):
            previous, prefix = edited[prefix], (*prefix, bool(on))
            if prefix not in edited:
                edited[prefix] = _apply(step, previous, call) if on else previous
        result = attend(edited[prefix])
        if out is None:
            out = result
        else:
            chosen = (signature == torch.tensor(combo, dtype=torch.bool, device=device)).all(-1)
            out = torch.where(chosen[:, :, None, None], result, out)
    return out  # type: ignore[return-value]


def _tail_rows(
    call: AttentionCall, steps: list[AttentionStep], fallback: Callable | None
) -> tuple[Tensor, None] | None:
    """A prompt whose edits touch only its last rows (the last row, the text after the image):
    ``fallback`` for all rows, then those rows recomputed on their own with the edits (a
    ``[batch, heads, tail, k]`` map instead of ``[.., q, k]``)."""
    if fallback is None or call.q_len == 1 or any(s.tail is None for s in steps):
        return None
    tail = max(int(s.tail) for s in steps)  # type: ignore[arg-type]
    if tail >= call.q_len or _not_plain_reason(call.module, call.kwargs):
        return None
    out, _ = fallback(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)
    if tail == 0:
        return out, None
    mask = None if call.mask is None else call.mask[..., -tail:, :]
    rows = dataclasses.replace(call, query=call.query[:, :, -tail:], mask=mask)
    edited, _ = _eager(rows, steps)
    out = out.clone()
    out[:, -tail:] = edited.to(out.dtype)
    return out, None


def _map_free(call: AttentionCall, steps: list[AttentionStep]) -> tuple[Tensor, None] | None:
    """The layer without a ``[batch, heads, q, k]`` map, when the steps allow it (else None)."""
    if _not_plain_reason(call.module, call.kwargs):
        return None
    records = [s for s in steps if s.point == "record"]
    edits = [s for s in steps if s.point != "record"]
    if any(s.sums is None for s in records) or not all(_same_layout(s.layout, steps[0].layout) for s in steps):
        return None
    layout = steps[0].layout
    if not edits:
        out, sums = chunked_attention(
            call.query, call.key, call.value, call.mask, call.scaling, layout, output=True, statistics=True
        )
    elif len(edits) == 1 and edits[0].map_free is not None:
        out, sums = edits[0].map_free(call, layout, bool(records))
    else:
        return None
    for step in records:
        step.sums(sums, step.layout, call)  # type: ignore[misc]
    return out, None


# ---------------------------------------------------------------------------- one dispatcher per model
class _Dispatcher:
    """The one attention function registered for a language model while any context is active.

    Installed by the first context entered on the model (its text config), removed by the last one to
    exit; it holds the ordered stack of active contexts and, per attention call, runs the steps they
    ask for (`run_steps`). Layers no context wants run the implementation the model had before.
    """

    def __init__(self, config: Any, previous: str) -> None:
        self.config = config
        self.previous = previous
        self.previous_fn: Callable | None = None if previous == "eager" else compat.attention_functions()[previous]
        with _names_lock:
            self.name = f"eah_interp.dispatch.{next(_names)}"
        self.stack: list[Context] = []
        self.paused = 0  # > 0 inside `paused(model)`: every layer runs the model's own attention

    def install(self) -> None:
        # Layers that keep SDPA get SDPA's own mask (None for a causal prompt without padding, so SDPA
        # takes its fast causal path); the edited layers convert it (`additive_mask`).
        compat.register_attention(self.name, self.attention, compat.mask_function(self.previous))
        compat.set_attn_implementation_internal(self.config, self.name)

    def uninstall(self) -> None:
        compat.set_attn_implementation_internal(self.config, self.previous)
        compat.unregister_attention(self.name)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        own = self.previous_fn or compat.family_eager_attention(module)
        if not self.paused and isinstance(layer, int) and getattr(module, "config", None) is self.config:
            call = AttentionCall(module, layer, query, key, value, attention_mask, kwargs)
            steps = [step for context in tuple(self.stack) for step in context.steps(call)]
            if steps:
                return run_steps(call, steps, own)
        return own(module, query, key, value, attention_mask, **kwargs)


class Context(Protocol):
    """What the dispatcher needs of a context: the language model's config and its steps per call."""

    config: Any

    def steps(self, call: AttentionCall) -> list[AttentionStep]: ...


#: Active dispatchers by ``id`` of the language model's config (each holds its config, so ids stay unique).
_DISPATCHERS: dict[int, _Dispatcher] = {}
_dispatch_lock = threading.Lock()


def push(context: Context) -> None:
    """Put a context on its model's stack, installing the model's dispatcher if it is the first."""
    with _dispatch_lock:
        dispatcher = _DISPATCHERS.get(id(context.config))
        if dispatcher is None:
            previous = compat.attn_implementation(context.config) or "eager"
            if str(previous).startswith("eah_interp."):
                raise AttentionImplementationError(
                    f"The language model's attn_implementation is {previous!r}, an eah-interp dispatcher that is "
                    "not active (the model was copied inside a context?). Reset it with "
                    "model.set_attn_implementation('sdpa')."
                )
            if previous not in COMPATIBLE:
                raise AttentionImplementationError(
                    f"The language model uses attn_implementation={previous!r}, which cannot expose attention "
                    "probabilities. Load the model with attn_implementation='sdpa' or 'eager' "
                    "(model.set_attn_implementation('sdpa')) to use eah-interp."
                )
            dispatcher = _Dispatcher(context.config, previous)
            dispatcher.install()
            _DISPATCHERS[id(context.config)] = dispatcher
        dispatcher.stack.append(context)


def pop(context: Context) -> None:
    """Take a context off its model's stack; the last one out removes the dispatcher."""
    with _dispatch_lock:
        dispatcher = _DISPATCHERS.get(id(context.config))
        if dispatcher is None or context not in dispatcher.stack:
            return
        dispatcher.stack.remove(context)
        if not dispatcher.stack:
            dispatcher.uninstall()
            del _DISPATCHERS[id(context.config)]


def dispatcher_for(config: Any) -> _Dispatcher | None:
    """The active dispatcher of a language model's config, or None."""
    return _DISPATCHERS.get(id(config))
