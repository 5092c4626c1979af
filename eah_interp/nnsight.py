"""nnsight 0.8 backend: interventions and attention recording inside a trace.

Everything here is called **inside** ``with nn_model.trace(...)`` (or a traced ``generate``), where
``nn_model = nnsight.NNsight(hf_model)``. The functions are ordinary nnsight reads and writes, so they
stack with whatever else the trace does (ablate a head at ``o_proj``'s input, save a residual, ...).
The verbs are those of `eah_interp.hf`: `intervene` (any list of `eah_interp.interventions`, compiled by
`eah_interp.interventions.compile.Plan`; `eah` is ``intervene(nn_model, [config])``) and
`record_attention`, with the same arguments and results (`InterventionRun`, `Recording`).

How an attention call is reached (``.source``)
----------------------------------------------
HF attention modules pick their attention function at run time::

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(...)   # op attention_interface_0
    attn_output, attn_weights = attention_interface(self, query_states, ...)     # op attention_interface_1

`intervene` **assigns** the output of the binding op (``self_attn.source.attention_interface_0.output``):
that layer, in this trace only, calls a function running the dispatcher's steps
(`eah_interp.dispatch.run_steps`, as the HF backend does). To read probabilities, `eager_attention_probs`
points the binding at `eah_interp.dispatch.eager_attention`, which runs the model family's own
``eager_attention_forward``; the probabilities are then the output of the eager function's dropout call,
right before ``@ V``::

    self_attn.source.attention_interface_1            # the call, now to `eager_attention`
        .source.family_1                              # its call of the family's eager function
        .source.nn_functional_dropout_0.output        # post-softmax (post-dropout) probabilities

Writing that ``.output`` changes ``P @ V`` and thus the layer output. Labels are resolved at run time
from the ``.source`` listings (an error lists the available names). Nothing outside the trace is
changed: no config, no registry, no other layer (every other layer keeps SDPA), so there is nothing to
restore and an exception cannot leave the model modified.

nnsight caches a drilled-into call for the rest of the run: in a traced ``generate`` the chosen layer
keeps calling the swapped-in function at every decode step (numerically equal to SDPA up to float
rounding); edits apply at the forwards their ``phase`` names, in the forwards `intervene` is called for.

Example:
    >>> import nnsight, torch
    >>> from eah_interp import EAH
    >>> from eah_interp import nnsight as eah_nn
    >>> nn_model = nnsight.NNsight(hf_model)
    >>> with torch.no_grad(), nn_model.trace(**inputs):
    ...     run = eah_nn.eah(nn_model, EAH.paper())       # the layout from the trace's input_ids
    ...     logits = nn_model.output.logits.save()
    >>> run.records[0].source_head  # the head broadcast per row
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp import compat, dispatch
from eah_interp.dispatch import eager_attention
from eah_interp.errors import (
    AttentionImplementationError,
    EAHError,
    LayerIndexError,
    LayoutError,
    UnsupportedModelError,
)
from eah_interp.head_stats import HeadStats, Recording
from eah_interp.interventions.base import Intervention, InterventionRun
from eah_interp.interventions.compile import Plan
from eah_interp.interventions.eah import EAH
from eah_interp.interventions.selectors import chosen_layers
from eah_interp.layout import TokenLayout
from eah_interp.models.adapters import token_layout
from eah_interp.models.introspect import attention_modules, decoder_layers, model_shape, text_config

__all__ = [
    "TraceOrderError",
    "attention_probs",
    "eager_attention_probs",
    "eah",
    "hf_model",
    "intervene",
    "record_attention",
    "self_attn",
    "trace_layout",
]


# ---------------------------------------------------------------------------- forward order
class TraceOrderError(EAHError, compat.out_of_order_error()):  # type: ignore[misc]
    """An `eah_interp.nnsight` call asked for a layer the forward had already run past in this trace.

    Raised only where nnsight itself calls the request an error (outside generation-step loops: a
    ``tracer.iter[:]`` loop that outran the generation still ends quietly with nnsight's own error). It
    is also nnsight's ``OutOfOrderError``, for code that catches that.
    """


#: What each trace body (nnsight worker) asked of this module so far: ``[(call, layers), ...]``.
_CALLS: weakref.WeakKeyDictionary[Any, list[tuple[str, list[int]]]] = weakref.WeakKeyDictionary()


def _log_call(what: str, layers: Iterable[int]) -> None:
    """Note a call of this trace body (for `TraceOrderError` messages)."""
    worker = compat.current_worker()
    if worker is not None:
        try:
            _CALLS.setdefault(worker, []).append((what, sorted({int(x) for x in layers})))
        except TypeError:  # a worker that cannot be weakly referenced: messages name fewer calls
            pass


@contextmanager
def _in_forward_order(what: str, layer: int) -> Iterator[None]:
    """Turn nnsight's out-of-order error for ``layer`` into a `TraceOrderError` naming the call and the order."""
    try:
        yield
    except compat.out_of_order_error() as error:
        worker = compat.current_worker()
        if isinstance(error, TraceOrderError) or compat.worker_iteration(worker) != 0:
            raise  # ours already, or a tracer.iter loop that outran the generation: nnsight ends the loop with it
        earlier = _CALLS.get(worker, [])[:-1]  # the last entry is this call
        before = [f"{call}(layers={done})" for call, done in earlier]
        past = max((x for _, done in earlier for x in done if x > layer), default=None)
        raise TraceOrderError(
            f"eah_interp.nnsight.{what} asked for decoder layer {layer}, but this trace's forward had already run "
            f"past it ({error}). nnsight runs the trace body alongside one forward pass, so reads and edits must be "
            "written in the order the forward reaches them: earlier layers first"
            + (f" (layer {layer} before layer {past})" if past is not None else "")
            + (f". Earlier in this trace body: {'; '.join(before)}" if before else "")
            + f". Move the {what} call for layer {layer} above the calls for later layers (or any read of a later "
            "module), or run it in a second trace."
        ) from error


# ---------------------------------------------------------------------------- model navigation
def hf_model(nn_model: Any) -> nn.Module:
    """The HF model an nnsight model wraps (``NNsight``, ``TransformersModel``); a torch module is returned as is."""
    if isinstance(nn_model, nn.Module):
        return nn_model
    module = compat.wrapped_module(nn_model)
    if module is None:
        raise UnsupportedModelError(
            f"{type(nn_model).__name__} is not an nnsight model (no wrapped torch module): wrap the HF model with "
            "nnsight.NNsight(hf_model)."
        )
    return module


def self_attn(nn_model: Any, layer: int) -> Any:
    """The envoy of the language model's attention module of decoder layer ``layer``."""
    modules = attention_modules(hf_model(nn_model))
    if layer not in modules:
        raise LayerIndexError(
            f"Layer {layer} out of range: the language model has attention modules for layers "
            f"{min(modules)}..{max(modules)}."
        )
    target = modules[layer]
    envoy = compat.envoy_of(nn_model, target)
    if envoy is not None:
        return envoy
    raise UnsupportedModelError(f"The attention module of layer {layer} is not in {type(nn_model).__name__}'s envoy tree.")


def trace_layout(nn_model: Any, layout: TokenLayout | None = None, *, what: str = "this call") -> TokenLayout:
    """Inside a trace: ``layout``, or the layout of the trace's inputs (`eah_interp.models.token_layout`).

    Read from ``nn_model.trace(**inputs)`` without a request to the model (so it works wherever in the
    trace body it is called).

    Raises:
        LayoutError: the trace has no ``input_ids`` (embeddings only) or several invokes, or the config
            has no image token id; the message says to pass ``layout=TokenLayout(...)``.
    """
    if layout is not None:
        return layout
    inputs = compat.trace_inputs()
    ids = None if inputs is None else inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise LayoutError(
            f"eah_interp.nnsight.{what} derives the token layout from the trace's input_ids, but this trace has "
            "none it can read (inputs_embeds only, several invokes, or a call outside a trace). Pass "
            "layout=TokenLayout.from_input_ids(input_ids, model.config.image_token_id, attention_mask)."
        )
    mask = inputs.get("attention_mask") if inputs is not None else None
    return token_layout(hf_model(nn_model), ids, mask if isinstance(mask, torch.Tensor) else None)


def eager_attention_probs(nn_model: Any, layer: int) -> Any:
    """Inside a trace: make ``layer`` run eager attention and return the op holding its probabilities.

    The returned op's ``.output`` is ``Float[batch, heads, q, k]`` (post-softmax, pre-``@ V``); reading
    it gives the tensor, assigning it changes the layer's output. Calling this several times for the
    same layer in one trace is fine (the swap is done once per run).

    Args:
        nn_model: the nnsight model (``nnsight.NNsight(hf_model)``).
        layer: 0-based decoder layer of the language model.

    Returns:
        The nnsight operation (``...attention_interface_1.source.family_1.source.nn_functional_dropout_0``).

    Example:
        >>> with nn_model.trace(**inputs):
        ...     op = eah_interp.nnsight.eager_attention_probs(nn_model, 1)
        ...     op.output = op.output.flip(1)   # swap the heads' maps
    """
    _log_call("eager_attention_probs", [layer])
    with _in_forward_order("eager_attention_probs", layer):
        return _probs_op(nn_model, layer)


def _probs_op(nn_model: Any, layer: int) -> Any:
    """`eager_attention_probs` without the forward-order check (its callers check)."""
    source = self_attn(nn_model, layer).source
    call = source.node(compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="the attention function call"))
    drilled = compat.drilled_function(nn_model, call)
    if drilled is None:  # this run has not drilled into the call yet: swap in eager_attention first
        _point_attention_at(nn_model, layer, eager_attention)
    elif getattr(drilled, "__qualname__", None) != eager_attention.__qualname__:
        raise AttentionImplementationError(
            f"Layer {layer}'s attention call was already drilled into ({call.path}.source) with "
            f"{getattr(drilled, '__qualname__', drilled)!r} in this trace, so its probabilities cannot be exposed. "
            "Call eah_interp.nnsight functions for a layer before reading `.source` of its attention call yourself."
        )
    inner = call.source
    family = inner.node(compat.op_label(inner, "family_", what="the family's eager attention call")).source
    return family.node(compat.probability_op_label(family))


def attention_probs(nn_model: Any, layer: int) -> Float[Tensor, "batch heads q k"]:
    """Inside a trace: the post-softmax attention probabilities of ``layer`` (``[batch, heads, q, k]``).

    To edit them, assign ``eager_attention_probs(nn_model, layer).output``.
    """
    _log_call("attention_probs", [layer])
    with _in_forward_order("attention_probs", layer):
        return _probs_op(nn_model, layer).output


# ---------------------------------------------------------------------------- statistics
def _save(value: Any) -> Any:
    """Mark ``value`` to survive the trace (nnsight only returns saved objects)."""
    import nnsight

    return nnsight.save(value)


def _decoder_input(nn_model: Any, decoder: nn.Module) -> tuple[Any, tuple, dict, Tensor]:
    """Inside a trace: a decoder layer's envoy, its ``(args, kwargs)`` and its input hidden states."""
    envoy = compat.envoy_of(nn_model, decoder)
    args, kwargs = envoy.inputs
    hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs["hidden_states"]
    return envoy, args, kwargs, hidden


def record_attention(
    nn_model: Any,
    layers: str | Iterable[int] = "all",
    *,
    stats: HeadStats | None = None,
    keep_patterns: bool = False,
    layout: TokenLayout | None = None,
) -> Recording:
    """Inside a trace: record the prompt statistics (into ``stats``) and/or patterns of ``layers``.

    The verb, arguments and result of `eah_interp.hf.record_attention`. Only prompt (prefill) forwards are
    counted. Call it before `intervene` on the same layers for pre-edit statistics (the order of calls is
    the order in the forward).

    Args:
        nn_model: the nnsight model.
        layers: ``"all"`` or decoder layer indices.
        stats: a `HeadStats` to feed (its ``threshold`` / ``normalise``; with ``sink_dims`` each layer's
            input hidden states are read too).
        keep_patterns: keep each prompt's probabilities (``[batch, heads, q, k]``, on CPU) per layer.
        layout: layout of the prompt rows this trace sees (default: `trace_layout`).

    Returns:
        A `Recording` (saved, so it survives the trace; fed as the forward runs).
    """
    model = hf_model(nn_model)
    layout = trace_layout(nn_model, layout, what="record_attention")
    recording = _save(Recording(chosen_layers(layers, model_shape(model)[0]), stats, keep_patterns))
    decoders = decoder_layers(model) if stats is not None and stats.sink_dims else {}
    _log_call("record_attention", recording.layers)
    for layer in sorted(recording.layers):
        with _in_forward_order("record_attention", layer):
            hidden = _decoder_input(nn_model, decoders[layer])[3] if decoders else None
            probs = _probs_op(nn_model, layer).output
        if probs.shape[-2] != probs.shape[-1]:
            continue
        with torch.no_grad():
            fitted = layout.fit(probs.shape[0], probs.shape[-2], probs.shape[-1])
            recording.add(layer, probs, fitted, hidden=None if hidden is None else hidden.detach())
    return recording


# ---------------------------------------------------------------------------- interventions
def intervene(nn_model: Any, interventions: Intervention | Iterable[Intervention],
              layout: TokenLayout | None = None, layers: Iterable[int] | None = None) -> InterventionRun:
    """Inside a trace: apply `eah_interp.interventions` to this forward, as `eah_interp.hf.intervene` does.

    Each layer an intervention edits has its attention call pointed, in this trace only, at a function
    that runs the same dispatcher steps as the HF backend (`eah_interp.interventions.compile.Plan.steps`
    and `eah_interp.dispatch.run_steps`: score edits, softmax, probability edits, value edits, ``P @ V``,
    output edits; the model's own attention for rows nothing edits). Residual-stream edits (`ResidualEdit`)
    replace the decoder layer's ``.inputs`` / ``.output``; interventions that read hidden states (VAR) read
    the decoder layer's input (after any residual input edit, as in the HF backend). The layers are visited
    in execution order (layer input, attention, layer output), so call this before reading those modules
    yourself. In a traced ``generate`` it edits the first forward; call it inside ``for step in
    tracer.iter[:]`` for every step (VAR only on prompt forwards here: its decode steps need the prompt's
    sink flags, which `eah_interp.hf.intervene` keeps).

    Args:
        nn_model: the nnsight model (``nnsight.NNsight(hf_model)``).
        interventions: `eah_interp.interventions` objects (one or a list; empty: nothing is edited).
        layout: layout of the prompt rows this trace sees (extended for decode steps; default: `trace_layout`).
        layers: apply only the edits of these decoder layers now (default: all): call once per group of
            layers, in forward order, to read or write other modules of the layers in between.

    Returns:
        An `InterventionRun` (saved, so it survives the trace) holding one `InterventionRecord` per edit
        made, as ``hf.intervene`` yields it: ``.records``, ``.of(which)``, ``.source_heads()``, ``.summary()``.
        It is complete when ``intervene`` returns (it waits for the last edited attention call).
    """
    model = hf_model(nn_model)
    plan = Plan.for_model(interventions, model)
    run = _save(plan.run)
    if not plan.items:
        return run
    layout = trace_layout(nn_model, layout, what="intervene")
    inputs, outputs, readers = set(plan.input_layers), set(plan.output_layers), set(plan.hidden_layers)
    attention_layers = set(plan.attention_layers)
    decoders = decoder_layers(model) if inputs | outputs | readers else {}
    implementation = compat.attn_implementation(text_config(model)) or "eager"
    fallback = None if implementation == "eager" else compat.attention_functions().get(implementation)

    def attention(module, query, key, value, attention_mask, **kwargs):
        call = dispatch.AttentionCall(module, module.layer_idx, query, key, value, attention_mask, kwargs)
        own = fallback or compat.family_eager_attention(module)
        steps = plan.steps(call, layout.fit, layout.seq_len)
        if not steps:
            return own(module, query, key, value, attention_mask, **kwargs)
        return dispatch.run_steps(call, steps, own)

    visited = sorted(attention_layers | inputs | outputs | readers)
    if layers is not None:
        chosen = {int(x) for x in layers}
        visited = [layer for layer in visited if layer in chosen]
    last_attention = max((layer for layer in visited if layer in attention_layers), default=None)
    _log_call("intervene", visited)
    for layer in visited:
        with _in_forward_order("intervene", layer):
            total = None
            if layer in inputs | outputs | readers:  # the layer's input first
                envoy, args, kwargs, hidden = _decoder_input(nn_model, decoders[layer])
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = int(cache.get_seq_length(layer)) if cache is not None and hasattr(cache, "get_seq_length") else 0
                total = past + hidden.shape[1]
                edited = plan.edit_residual(layer, "residual_input", hidden, layout.fit, total, layout.seq_len)
                if edited is not None:
                    hidden = edited
                    positional = bool(args) and isinstance(args[0], Tensor)
                    envoy.inputs = ((edited, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": edited})
                if past == 0:
                    plan.note_hidden(layer, hidden)
            if layer in attention_layers:
                call = _point_attention_at(nn_model, layer, attention)
                if layer == last_attention:  # wait for the call: the run holds every record when intervene returns
                    _ = call.output
            if layer in outputs:
                envoy = compat.envoy_of(nn_model, decoders[layer])
                output = envoy.output
                hidden = output[0] if isinstance(output, tuple) else output
                total = total if total is not None else hidden.shape[1]
                edited = plan.edit_residual(layer, "residual_output", hidden, layout.fit, total, layout.seq_len)
                if edited is not None:
                    envoy.output = (edited, *output[1:]) if isinstance(output, tuple) else edited
    return run


def eah(nn_model: Any, config: EAH, layout: TokenLayout | None = None) -> InterventionRun:
    """Inside a trace: apply one EAH edit, ``intervene(nn_model, [config], layout)``."""
    return intervene(nn_model, [config], layout)


def _point_attention_at(nn_model: Any, layer: int, attention: Any) -> Any:
    """Inside a trace: make ``layer``'s attention call run ``attention`` (its binding op's output); the call's op."""
    source = self_attn(nn_model, layer).source
    binding = compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="the attention function binding", last=False)
    call_name = compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="the attention function call")
    if binding == call_name:
        raise AttentionImplementationError(
            f"{source.prefix!r} calls attention_interface without binding it in forward; available ops: "
            f"{', '.join(source.names)}."
        )
    source.node(binding).output = attention
    return source.node(call_name)
