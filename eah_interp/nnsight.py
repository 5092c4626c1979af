"""nnsight 0.8 backend: attention probabilities, head statistics and EAH as interventions in a trace.

Everything here is called **inside** ``with nn_model.trace(...)`` (or a traced ``generate``), where
``nn_model = nnsight.NNsight(hf_model)``. The functions are ordinary nnsight reads and writes, so they
stack with whatever else the trace does (ablate a head at ``o_proj``'s input, save a residual, ...).

How the probabilities are reached (``.source``)
------------------------------------------------
HF attention modules pick their attention function at run time::

    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(...)   # op attention_interface_0
    attn_output, attn_weights = attention_interface(self, query_states, ...)     # op attention_interface_1

SDPA never materialises the probabilities, so for each layer we read or edit, `eager_attention_probs`
**assigns** the output of the binding op (``self_attn.source.attention_interface_0.output =
eager_attention``): that layer, in this trace only, calls `eager_attention`, which runs the model
family's own ``eager_attention_forward``. The probabilities are then the output of the eager
function's dropout call, right before ``@ V``::

    self_attn.source.attention_interface_1            # the call, now to `eager_attention`
        .source.family_1                              # its call of the family's eager function
        .source.nn_functional_dropout_0.output        # post-softmax (post-dropout) probabilities

Writing that ``.output`` changes ``P @ V`` and thus the layer output. Labels are resolved at run time
from the ``.source`` listings (an error lists the available names). Nothing outside the trace is
changed: no config, no registry, no other layer (every other layer keeps SDPA), so there is nothing to
restore and an exception cannot leave the model modified. `eager_attention` converts whatever mask the
model built for SDPA (``None`` = causal, or boolean) into eager's additive mask, so it is correct
whatever implementation the rest of the model uses.

nnsight caches a drilled-into call for the rest of the run: in a traced ``generate`` the chosen layer
keeps calling `eager_attention` at every decode step (numerically equal to SDPA up to float
rounding; edits apply only where you write, and `apply_eah` writes only in the prefill unless
``config.apply_to_decode``).

Example:
    >>> import nnsight, torch
    >>> from eah_interp import EAHConfig, TokenLayout
    >>> from eah_interp import nnsight as eah_nn
    >>> nn_model = nnsight.NNsight(hf_model)
    >>> layout = TokenLayout.from_input_ids(inputs["input_ids"], hf_model.config.image_token_id,
    ...                                     inputs["attention_mask"])
    >>> with torch.no_grad(), nn_model.trace(**inputs):
    ...     records = eah_nn.apply_eah(nn_model, EAHConfig.paper(), layout)
    ...     logits = nn_model.output.logits.save()
    >>> records[0].source_head  # the head broadcast per row
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp import compat, dispatch, hf
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecords, apply_eah_to_probs, should_edit
from eah_interp.errors import (
    AttentionImplementationError,
    EAHError,
    LayerIndexError,
    LayoutError,
    UnsupportedModelError,
)
from eah_interp.interventions.base import InterventionRecords
from eah_interp.layout import TokenLayout
from eah_interp.stats import HeadStats, head_statistics

__all__ = [
    "TraceOrderError",
    "apply_eah",
    "attention_probs",
    "eager_attention",
    "eager_attention_probs",
    "feed_head_stats",
    "hf_model",
    "intervene",
    "self_attn",
    "trace_layout",
]


# ---------------------------------------------------------------------------- the function we swap in
# `eager_attention` (defined in `eah_interp.hf`, which uses it for its eager path too): a layer calls it in
# place of its attention function; its op ``family_1`` is the family's ``eager_attention_forward``, whose
# dropout output holds the probabilities.
eager_attention = hf.eager_attention


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
    modules = hf.attention_modules(hf_model(nn_model))
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
    """Inside a trace: ``layout``, or the layout of the trace's inputs, derived as `eah_interp.hf` does.

    The image positions are those of ``input_ids`` holding the family's image token ids
    (`eah_interp.models.adapter_for`), with the trace's ``attention_mask`` for padding: the same rule as
    the HF backend's contexts, read from ``nn_model.trace(**inputs)`` without a request to the model
    (so it works wherever in the trace body it is called).

    Raises:
        LayoutError: the trace has no ``input_ids`` (embeddings only) or several invokes, or the config
            has no image token id; the message says to pass ``layout=TokenLayout(...)``.
    """
    if layout is not None:
        return layout
    from eah_interp.models.adapters import adapter_for

    model = hf_model(nn_model)
    inputs = compat.trace_inputs()
    ids = None if inputs is None else inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise LayoutError(
            f"eah_interp.nnsight.{what} derives the token layout from the trace's input_ids, but this trace has "
            "none it can read (inputs_embeds only, several invokes, or a call outside a trace). Pass "
            "layout=TokenLayout.from_input_ids(input_ids, model.config.image_token_id, attention_mask)."
        )
    mask = inputs.get("attention_mask") if inputs is not None else None
    return adapter_for(model).layout(model, ids, mask if isinstance(mask, torch.Tensor) else None)


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
        binding = compat.op_label(
            source, compat.ATTENTION_CALL_PREFIX, what="the attention function binding", last=False
        )
        if binding == call.name:
            raise AttentionImplementationError(
                f"{source.prefix!r} calls attention_interface without binding it in forward; available ops: "
                f"{', '.join(source.names)}."
            )
        source.node(binding).output = eager_attention
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


# ---------------------------------------------------------------------------- EAH and statistics
def _save(value: Any) -> Any:
    """Mark ``value`` to survive the trace (nnsight only returns saved objects)."""
    import nnsight

    return nnsight.save(value)


def apply_eah(
    nn_model: Any, config: EAHConfig, layout: TokenLayout | None = None, layers: Iterable[int] | None = None
) -> EditRecords:
    """Inside a trace: apply EAH to the configured layers of this forward.

    For each layer in increasing order: read its probabilities (`eager_attention_probs`), edit them with
    `apply_eah_to_probs` when `should_edit` says so (prefill; decode steps too with
    ``config.apply_to_decode``), and write them back. Call it where those layers run in your trace body:
    after interventions on earlier modules, before later ones. In a traced ``generate`` it edits the
    first forward (the prefill); call it inside ``for step in tracer.iter[:]`` for every step.

    Args:
        nn_model: the nnsight model.
        config: the edit; its layers and heads are checked against the model.
        layout: layout of the prompt rows this trace (invoke) sees; it is extended for decode steps.
            Default: derived from the trace's ``input_ids`` (`trace_layout`).
        layers: edit these layers instead of ``config.layers``.

    Returns:
        `EditRecords` (saved, so it survives the trace): a list receiving one `EditRecord` per edited
        layer, with ``.records`` / ``.config`` / ``.source_heads()`` as ``hf.eah`` yields them.
    """
    if not isinstance(config, EAHConfig):
        raise TypeError(f"config must be an EAHConfig; got {type(config).__name__}.")
    if layers is not None:
        config = dataclasses.replace(config, layers=tuple(sorted({int(x) for x in layers})))
    n_layers, n_heads, _ = hf.model_shape(hf_model(nn_model))
    config.validate_for(n_layers, n_heads)
    layout = trace_layout(nn_model, layout, what="apply_eah")
    records = _save(EditRecords(config))
    _log_call("apply_eah", config.layers)
    for layer in sorted(config.layers):
        with _in_forward_order("apply_eah", layer):
            op = _probs_op(nn_model, layer)
            probs = op.output
            b, _, q, k = probs.shape
            if not should_edit(config, layer, q, k):
                continue
            edited, record = apply_eah_to_probs(probs, layout.fit(b, q, k), config, layer)
            op.output = edited
        records.append(record)
    return records


def feed_head_stats(
    nn_model: Any, stats: HeadStats, layout: TokenLayout | None = None, layers: Iterable[int] | None = None
) -> HeadStats:
    """Inside a trace: add the prompt statistics of ``layers`` to ``stats`` (no attention map is kept).

    Only prompt (prefill) forwards are counted; decode steps are ignored. Call it before `apply_eah` on
    the same layer to get pre-edit statistics (the order of calls is the order in the forward).

    Args:
        nn_model: the nnsight model.
        stats: the accumulator (its ``threshold`` / ``normalise`` are used).
        layout: layout of the prompt rows this trace (invoke) sees (default: `trace_layout`).
        layers: decoder layers to read (default: all).

    Returns:
        ``stats`` (saved, so it survives the trace; fed as the forward runs), as ``hf.record_attention(...).stats``.
    """
    layout = trace_layout(nn_model, layout, what="feed_head_stats")
    n_layers = hf.model_shape(hf_model(nn_model))[0]
    chosen = list(range(n_layers)) if layers is None else sorted({int(x) for x in layers})
    _log_call("feed_head_stats", chosen)
    for layer in chosen:
        with _in_forward_order("feed_head_stats", layer):
            probs = _probs_op(nn_model, layer).output
        if probs.shape[-2] != probs.shape[-1]:
            continue
        with torch.no_grad():
            values = head_statistics(probs.detach(), layout.fit(probs.shape[0], probs.shape[-2], probs.shape[-1]),
                                     stats.threshold, stats.normalise)  # type: ignore[arg-type]
        stats.update_from_stats(layer, values)
    return _save(stats)


# ---------------------------------------------------------------------------- interventions
def intervene(
    nn_model: Any, interventions: Any, layout: TokenLayout | None = None, layers: Iterable[int] | None = None
) -> InterventionRecords:
    """Inside a trace: apply `eah_interp.interventions` to this forward, as `eah_interp.hf.intervene` does.

    Each layer an intervention edits has its attention call pointed, in this trace only, at a function
    that runs the same dispatcher steps as the HF backend (`eah_interp.hf.intervention_steps` and
    `eah_interp.dispatch.run_steps`: score edits, softmax, probability edits, value edits, ``P @ V``, output
    edits; the model's own attention for rows nothing edits). Residual-stream edits (`ResidualEdit`)
    replace the decoder layer's ``.inputs`` / ``.output``; VAR reads its sinks from the decoder layer's
    input (after any residual input edit, as in the HF backend). The layers are visited in execution order
    (layer input, attention, layer output), so call this before reading those modules yourself. In a
    traced ``generate`` it edits the first forward; call it inside ``for step in tracer.iter[:]`` for
    every step (VAR only on prompt forwards here: its decode steps need the prompt's sink flags, which
    `eah_interp.hf.intervene` keeps).

    Args:
        nn_model: the nnsight model (``nnsight.NNsight(hf_model)``).
        interventions: `eah_interp.interventions` objects and/or `EAHConfig` (one or a list).
        layout: layout of the prompt rows this trace sees (extended for decode steps; default: `trace_layout`).
        layers: apply only the edits of these decoder layers now (default: all): call once per group of
            layers, in forward order, to read or write other modules of the layers in between.

    Returns:
        An `InterventionRecords` (a saved list, so it survives the trace) receiving one `InterventionRecord`
        per edit made; read it as `eah_interp.hf.InterventionRun`: ``.records``, ``.interventions``, ``.of(which)``.
    """
    from eah_interp.interventions.base import InterventionRecord
    from eah_interp.interventions.selectors import Site
    from eah_interp.sinks import massive_activation_sinks

    model = hf_model(nn_model)
    layout = trace_layout(nn_model, layout, what="intervene")
    items = hf.as_interventions(interventions)
    n_layers = hf.validate_interventions(items, model)
    residual = [(index, item) for index, item in enumerate(items) if hf._is_residual(item)]
    readers = [(index, item) for index, item in enumerate(items) if getattr(item, "needs_hidden", False)]
    attention_layers = {
        layer for item in items if not hf._is_residual(item)
        for layer in (item.layers if isinstance(item, EAHConfig) else item.layers_for(n_layers))
    }
    inputs_edited = {layer for _, item in residual if item.point == "residual_input" for layer in item.layers_for(n_layers)}
    outputs_edited = {layer for _, item in residual if item.point == "residual_output"
                      for layer in item.layers_for(n_layers)}
    residual_layers = inputs_edited | outputs_edited
    hidden_layers = {layer for _, item in readers for layer in item.layers_for(n_layers)}
    decoders = hf.decoder_layers(model) if residual_layers or hidden_layers else {}
    implementation = compat.attn_implementation(hf.text_config(model)) or "eager"
    fallback = None if implementation == "eager" else compat.attention_functions().get(implementation)
    records = _save(InterventionRecords(items))
    sinks: dict[tuple[int, int], Tensor] = {}  # (intervention index, layer) -> Bool[batch, k] of this forward

    def sink_flags(index: int, item: Any, call: dispatch.AttentionCall) -> Tensor:
        flags = sinks.get((index, call.layer))
        if flags is None or flags.shape[-1] != call.k_len:
            raise UnsupportedModelError(
                f"Layer {call.layer}: {type(item).__name__} needs the sink flags of all {call.k_len} key positions, but "
                "this forward's decoder input covers only its new positions (a decode step): in nnsight, VAR runs on "
                "prompt forwards only (VAR(phase='prefill')). Use eah_interp.hf.intervene for generation with VAR."
            )
        return flags

    def attention(module, query, key, value, attention_mask, **kwargs):
        call = dispatch.AttentionCall(module, module.layer_idx, query, key, value, attention_mask, kwargs)
        fitted = layout.fit(query.shape[0], call.q_len, call.k_len)
        steps = hf.intervention_steps(items, call, fitted, layout.seq_len, records, n_layers, sinks=sink_flags)
        own = fallback or hf.eager_function(module)
        if not steps:
            return own(module, query, key, value, attention_mask, **kwargs)
        return dispatch.run_steps(call, steps, own)

    def edit_residual(layer: int, point: str, hidden: Tensor, total: int) -> Tensor | None:
        q_len = hidden.shape[1]
        chosen = [(i, item) for i, item in residual
                  if item.point == point and item.applies(layer, q_len, total, n_layers)]
        if not chosen:
            return None
        site = Site(layer=layer, layout=layout.fit(hidden.shape[0], q_len, total), q_len=q_len, k_len=total,
                    prompt_len=layout.seq_len)
        for index, item in chosen:
            hidden, changed = item.edit(hidden, site)
            records.append(InterventionRecord(type(item).__name__, index, layer, point, q_len, total, changed))
        return hidden

    visited = sorted(attention_layers | residual_layers | hidden_layers)
    if layers is not None:
        chosen = {int(x) for x in layers}
        visited = [layer for layer in visited if layer in chosen]
    _log_call("intervene", visited)
    for layer in visited:
        with _in_forward_order("intervene", layer):
            total = None
            if layer in inputs_edited or layer in hidden_layers or layer in outputs_edited:  # the layer's input first
                decoder = compat.envoy_of(nn_model, decoders[layer])
                args, kwargs = decoder.inputs
                positional = bool(args) and isinstance(args[0], Tensor)
                hidden = args[0] if positional else kwargs["hidden_states"]
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = int(cache.get_seq_length(layer)) if cache is not None and hasattr(cache, "get_seq_length") else 0
                total = past + hidden.shape[1]
                edited = edit_residual(layer, "residual_input", hidden, total)
                if edited is not None:
                    hidden = edited
                    decoder.inputs = ((edited, *args[1:]), kwargs) if positional else (args, {**kwargs, "hidden_states": edited})
                if past == 0:
                    for index, item in readers:
                        if layer in item.layers_for(n_layers):
                            sinks[(index, layer)] = massive_activation_sinks(hidden.detach(), item.dims, item.tau)
            if layer in attention_layers:
                _point_attention_at(nn_model, layer, attention)
            if layer in outputs_edited:
                decoder = compat.envoy_of(nn_model, decoders[layer])
                output = decoder.output
                hidden = output[0] if isinstance(output, tuple) else output
                edited = edit_residual(layer, "residual_output", hidden, total if total is not None else hidden.shape[1])
                if edited is not None:
                    decoder.output = (edited, *output[1:]) if isinstance(output, tuple) else edited
    return records


def _point_attention_at(nn_model: Any, layer: int, attention: Any) -> None:
    """Inside a trace: make ``layer``'s attention call run ``attention`` (its binding op's output)."""
    source = self_attn(nn_model, layer).source
    binding = compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="the attention function binding", last=False)
    call_name = compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="the attention function call")
    if binding == call_name:
        raise AttentionImplementationError(
            f"{source.prefix!r} calls attention_interface without binding it in forward; available ops: "
            f"{', '.join(source.names)}."
        )
    source.node(binding).output = attention
