"""HF transformers backend: EAH, attention recording and interventions inside ``forward`` / ``generate``.

A model gets exactly one attention override while any context is active: the first context entered
registers a uniquely named function with transformers' `AttentionInterface` (and a mask function under
the same name with `AttentionMaskInterface`, or the function would receive no causal mask: SDPA's own
for an SDPA model, so the other layers keep their fast causal path), sets it on the language model's
config only, and the last context to exit restores everything. The function holds the ordered stack of
active contexts and dispatches on ``module.layer_idx``: a layer no context wants runs the
implementation the model had before (e.g. SDPA); otherwise `run_steps` runs every context's steps in
one order (score edits before / after the mask, softmax, probability edits, recordings of the edited
probabilities, ``P @ V``, output edits), choosing per call one of two paths:

* **map-free** (for decoders whose attention is softmax of scaled ``Q K^T`` + mask, without soft-capping
  or attention sinks): recordings of statistics alone compute the layer a chunk of query rows at a time
  and accumulate the statistics' sums (`eah_interp.chunked`); a plain-copy EAH edit
  (`eah_interp.edit.is_plain_copy`, e.g. the paper preset), alone or with such recordings, gets the sink
  scores from chunked column sums and the output from one SDPA call with the source head's query and
  key (`eah_interp.edit.map_free_eah`). No ``[batch, heads, q, k]`` map exists;
* **eager**: the model family's own eager function (or, when a score edit is active, the same
  computation written out so the scores can be edited) gives the probabilities, the steps edit or read
  them and ``P @ V`` is recomputed: for kept patterns, blends, image-region or dropped-sink edits, decode
  steps, stacked edits and other attention variants.

Edits that touch only a prompt's last rows (the last row; the text after the image) keep the model's
own attention for the other rows and recompute only those rows; output and value edits alone keep it
entirely (with the edited values). Residual-stream edits (`ResidualEdit`) are not attention edits:
`intervene` applies them with hooks on the decoder layers' input and output.
Both paths give the same numbers (tests compare them with explicit computations within 1e-5). On exit,
even by exception, the config, the registries and the hooks are restored exactly.

Contexts: `eah` (EAH), `record_attention` (statistics / patterns), `intervene` (any list of
`eah_interp.interventions`), `paused` (an unedited forward inside an edited run, e.g. for
`ContrastiveLogits`).

Example:
    >>> config = EAHConfig.paper()
    >>> with eah_interp.hf.eah(model, config) as run:
    ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    >>> run.records[0].source_head  # the head whose map was broadcast, per row
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from eah_interp import dispatch
from eah_interp.chunked import AttentionSums
from eah_interp.config import EAHConfig
from eah_interp.dispatch import EDIT_POINTS as EDIT_POINTS  # re-exported: the backend's public names
from eah_interp.dispatch import AttentionCall as AttentionCall
from eah_interp.dispatch import AttentionStep as AttentionStep
from eah_interp.dispatch import additive_mask as additive_mask
from eah_interp.dispatch import eager_attention as eager_attention
from eah_interp.dispatch import eager_function as eager_function
from eah_interp.dispatch import run_steps as run_steps
from eah_interp.edit import EditRecord, apply_eah_to_probs, is_plain_copy, map_free_eah, should_edit
from eah_interp.errors import AttentionImplementationError as AttentionImplementationError
from eah_interp.errors import (
    ConfigError,
    LayerIndexError,
    LayoutError,
    UnsupportedModelError,  # noqa: F401  (re-exported: hf.UnsupportedModelError)
)
from eah_interp.interventions.base import RESIDUAL_POINTS, Intervention, InterventionRecord
from eah_interp.interventions.selectors import Site
from eah_interp.layout import TokenLayout
from eah_interp.models.adapters import image_token_ids as image_token_ids  # re-exported
from eah_interp.models.introspect import attention_modules, model_shape, text_config
from eah_interp.sinks import Normalise
from eah_interp.stats import HeadStats

_MISSING = object()


# ---------------------------------------------------------------------------- model introspection
# text_config, attention_modules, model_shape and image_token_ids live in eah_interp.models (the
# backends use them, never the reverse); they are re-exported here for existing callers.


def _past_length(input_ids: Tensor | None, kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache at a forward call (0 for a prompt forward)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # renamed `cache` in transformers 5.2x
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if input_ids is not None and isinstance(mask, Tensor) and mask.ndim == 2:
        return mask.shape[1] - input_ids.shape[1]
    return 0


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The language model's decoder layers by index: the modules whose ``self_attn`` is a layer's attention."""
    attention = {id(module): layer for layer, module in attention_modules(model).items()}
    found = {}
    for module in model.modules():
        layer = attention.get(id(getattr(module, "self_attn", None)))
        if layer is not None:
            found.setdefault(layer, module)
    if len(found) != len(attention):
        raise UnsupportedModelError(
            f"Found decoder layers (modules with .self_attn) for layers {sorted(found)} of {sorted(attention)} in "
            f"{type(model).__name__}; interventions that read hidden states need every one."
        )
    return found



# ---------------------------------------------------------------------------- contexts on the dispatcher
@contextlib.contextmanager
def paused(model: nn.Module) -> Iterator[None]:
    """Run the model without any active context's edits or recordings inside the ``with`` block.

    For a second, unedited forward in the middle of an edited run (e.g. the text-only pass of a
    contrastive logits processor). The contexts' prompt layouts are left as they are.
    """
    dispatcher = dispatch.dispatcher_for(text_config(model))
    if dispatcher is None:
        yield
        return
    dispatcher.paused += 1
    try:
        yield
    finally:
        dispatcher.paused -= 1


def active_contexts(model: nn.Module) -> list[_AttentionOverride]:
    """The contexts active on a model, outermost first (the order their edits run in)."""
    dispatcher = dispatch.dispatcher_for(text_config(model))
    return [] if dispatcher is None else list(dispatcher.stack)



# ---------------------------------------------------------------------------- a context: layout tracking
@dataclass
class _State:
    layout: TokenLayout | None = None
    user_layout: TokenLayout | None = None
    token_ids: tuple[int, ...] = ()
    generate_layout: TokenLayout | None = None
    step: int = -1
    prompt_len: int | None = None
    total_len: int | None = None  # positions so far at a decode step (from its 2-D attention mask)
    past: int = 0  # positions already in the KV cache at the current forward (0: a prompt forward)


class _AttentionOverride:
    """A context on the model's dispatcher: tracks the prompt layout; subclasses say which steps to run."""

    kind = "override"

    def __init__(self, model: nn.Module, layout: TokenLayout | None, *, needs_layout: bool = True) -> None:
        from eah_interp.models.adapters import adapter_for

        self.model = model
        self.config = text_config(model)
        self.modules = attention_modules(model)
        self.adapter = adapter_for(model)
        self.state = _State(user_layout=layout, token_ids=self.adapter.visual_token_ids(model))
        if needs_layout and layout is None and not self.state.token_ids:
            raise LayoutError(
                f"{type(model).__name__} has no image_token_id in its config: pass layout=TokenLayout(...) "
                "(e.g. TokenLayout.from_spans) so eah-interp knows which positions are image tokens."
            )
        self._hook = None
        self._previous_generate: Any = None
        self._entered = False
        # decoder-layer hooks a subclass adds (layer inputs it reads, residual edits), removed on exit
        self._hidden: dict[int, Tensor] = {}
        self._hidden_hooks: list[Any] = []

    def _note_hidden(self, layer: int) -> Callable:
        """A forward pre-hook keeping ``layer``'s input hidden states (detached) in ``self._hidden``."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(hidden, Tensor):
                self._hidden[layer] = hidden.detach()

        return hook

    def _remove_layer_hooks(self) -> None:
        """Remove the decoder-layer hooks and drop the hidden states they kept."""
        for hook in self._hidden_hooks:
            hook.remove()
        self._hidden_hooks.clear()
        self._hidden.clear()

    def _warn_if_causal_normaliser(self, normalise: str) -> None:
        """Warn when sink scores would divide by later rows only, but image tokens also attend backwards."""
        if self.adapter.bidirectional_image_attention and normalise == "causal":
            warnings.warn(
                f"{self.adapter.family}: image tokens attend to each other bidirectionally, so earlier rows also "
                "attend to an image token and normalise='causal' (later rows only) inflates sink scores of late "
                "image tokens. Use normalise='rows'.",
                stacklevel=3,
            )

    def _prompt_layout(self, input_ids: Tensor, attention_mask: Tensor | None) -> TokenLayout:
        """The layout of a prompt from its ids: positions holding the family's visual token ids."""
        return TokenLayout.from_input_ids(input_ids, self.state.token_ids, attention_mask)  # type: ignore[arg-type]

    # subclasses ------------------------------------------------------
    def steps(self, call: AttentionCall) -> list[AttentionStep]:
        """The edits and recordings this context asks for in one attention call (none: ``[]``)."""
        raise NotImplementedError

    # context ---------------------------------------------------------
    def __enter__(self):
        if self._entered:
            raise RuntimeError(f"This {type(self).__name__} context is already active; create a new one to nest.")
        dispatch.push(self)  # raises (changing nothing) if the model's attention cannot be instrumented
        self._entered = True
        try:
            self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
            self._previous_generate = vars(self.model).get("generate", _MISSING)  # an outer context's wrapper
            self.model.generate = self._generate_wrapper(self.model.generate)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if not self._entered:
            return
        self._entered = False
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._previous_generate is _MISSING:
                vars(self.model).pop("generate", None)
            elif self._previous_generate is not None:
                self.model.generate = self._previous_generate
            self._previous_generate = None
        finally:
            dispatch.pop(self)

    # hooks -----------------------------------------------------------
    def _pre_forward(self, module, args, kwargs) -> None:
        dispatcher = dispatch.dispatcher_for(self.config)
        if dispatcher is not None and dispatcher.paused:
            return  # a forward inside `paused`: not this context's prompt
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.state.past = _past_length(input_ids, kwargs)
        if self.state.past > 0:  # a decode step: the prompt layout is extended in _layout_for
            mask = kwargs.get("attention_mask")
            self.state.total_len = mask.shape[1] if isinstance(mask, Tensor) and mask.ndim == 2 else None
            return
        self.state.total_len = None
        self.state.step += 1
        if self.state.user_layout is not None:
            self.state.layout = self.state.user_layout  # fitted to each call (beams, decode) in _layout_for
        elif input_ids is not None:
            self.state.layout = self._prompt_layout(input_ids, kwargs.get("attention_mask"))
        else:  # inputs_embeds only: the layout `generate` noted from its input_ids, else none (`_layout_for` raises)
            self.state.layout = self.state.generate_layout
        self.state.prompt_len = None if self.state.layout is None else self.state.layout.seq_len

    def _generate_wrapper(self, generate: Callable) -> Callable:
        """``model.generate`` that notes the prompt layout first: some LVLMs (InstructBLIP) never call their
        own ``forward`` in ``generate`` but hand ``inputs_embeds`` to the language model's ``generate``."""

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
            if self.state.user_layout is None and isinstance(input_ids, Tensor) and input_ids.ndim == 2:
                self.state.generate_layout = self._prompt_layout(input_ids, kwargs.get("attention_mask"))
                self.state.layout = self.state.generate_layout
                self.state.prompt_len = self.state.layout.seq_len
            try:
                return generate(*args, **kwargs)
            finally:  # never reused by a later forward
                self.state.generate_layout = None
                self.state.layout = None

        return wrapped

    def _layout_for(self, batch: int, q_len: int, k_len: int) -> TokenLayout:
        layout = self.state.layout or self.state.user_layout
        if layout is None:
            raise LayoutError(
                "No token layout: the model was called without input_ids (inputs_embeds only). Pass "
                "layout=TokenLayout(...) to the context manager."
            )
        total = self._total_len(q_len, k_len)
        fitted = layout.fit(batch, q_len, total)
        if fitted is not layout:  # keep the extension for the next layers of this step
            self.state.layout = fitted
        if total > k_len:  # a sliding-window layer at a decode step sees only the last k_len positions
            return TokenLayout(fitted.image_mask[:, -k_len:], fitted.attention_mask[:, -k_len:])
        return fitted

    def _total_len(self, q_len: int, k_len: int) -> int:
        """Positions of the sequence so far at this call: ``k_len``, or more at a decode step of a
        sliding-window layer (whose cache keeps only the last keys), from the step's 2-D attention mask."""
        total = self.state.total_len
        return total if q_len < k_len and total is not None and total > k_len else k_len

    def _window_start(self, call: AttentionCall) -> int:
        """Absolute position of the call's first key (> 0 only at decode steps of sliding-window layers)."""
        return self._total_len(call.q_len, call.k_len) - call.k_len


# ---------------------------------------------------------------------------- EAH
@dataclass
class EAHRun:
    """What happened inside an `eah` context: one `EditRecord` per edited attention call."""

    config: EAHConfig
    records: list[EditRecord] = field(default_factory=list)

    def source_heads(self, layer: int | None = None) -> list[list[int]]:
        """Source head per row of each edited call (optionally of one layer), ``-1`` where none."""
        return [r.source_head.tolist() for r in self.records if layer is None or r.layer == layer]


class eah(_AttentionOverride):  # noqa: N801 - used as a function-style context manager
    """Apply EAH to an HF LVLM inside the ``with`` block (``forward`` and ``generate``).

    Args:
        model: an HF LVLM (or LM) whose language model uses the AttentionInterface.
        config: the edit (`EAHConfig`); its layers and heads are checked against the model.
        layout: optional explicit layout of the prompt; by default it is rebuilt from ``input_ids``
            at every prompt forward (positions holding the family's image token ids, see
            `image_token_ids`; padding from the mask).

    Yields:
        An `EAHRun` whose ``records`` list every edited call (chosen source heads, sink counts).
    """

    kind = "eah"

    def __init__(self, model: nn.Module, config: EAHConfig, layout: TokenLayout | None = None) -> None:
        if not isinstance(config, EAHConfig):
            raise TypeError(f"config must be an EAHConfig; got {type(config).__name__}.")
        super().__init__(model, layout)
        n_layers, n_heads, _ = model_shape(model)
        config.validate_for(n_layers, n_heads)
        self._warn_if_causal_normaliser(config.normalise)
        self.eah_config = config
        self.run = EAHRun(config)

    def __enter__(self) -> EAHRun:  # type: ignore[override]
        super().__enter__()
        return self.run

    def steps(self, call: AttentionCall) -> list[AttentionStep]:
        if not should_edit(self.eah_config, call.layer, call.q_len, call.k_len):
            return []
        layout = self._layout_for(call.query.shape[0], call.q_len, call.k_len)
        return [eah_step(self.eah_config, layout, call, self.run.records.append)]


def eah_step(
    config: EAHConfig, layout: TokenLayout, call: AttentionCall, note: Callable[[EditRecord], None]
) -> AttentionStep:
    """The dispatcher step of an EAH edit: a probability edit, map-free for plain copies of a prompt.

    Args:
        config: the edit.
        layout: the layout fitted to the call.
        call: the attention call (decides whether the map-free path is possible).
        note: receives the `EditRecord` of every edit made.
    """

    def edit_probs(probs: Tensor, layout: TokenLayout, call: AttentionCall) -> Tensor:
        edited, record = apply_eah_to_probs(probs, layout, config, call.layer)
        note(record)
        return edited

    def map_free(call: AttentionCall, layout: TokenLayout, statistics: bool) -> tuple[Tensor, AttentionSums]:
        out, record, sums = map_free_eah(
            call.query, call.key, call.value, call.mask, call.scaling, layout, config, call.layer,
            statistics=statistics,
        )
        note(record)
        return out, sums

    fast = map_free if call.prefill and is_plain_copy(config) else None
    return AttentionStep("probs", edit_probs, layout, map_free=fast)


# ---------------------------------------------------------------------------- interventions
@dataclass
class InterventionRun:
    """What happened inside an `intervene` context: one `InterventionRecord` per edit made, in order."""

    interventions: tuple[Any, ...]
    records: list[InterventionRecord] = field(default_factory=list)

    def of(self, which: int | str) -> list[InterventionRecord]:
        """The records of one intervention: its index in the list, or its method name."""
        from eah_interp.interventions.base import records_of

        return records_of(self.records, which)


class intervene(_AttentionOverride):  # noqa: N801
    """Apply several interventions to an HF LVLM inside the ``with`` block (``forward`` and ``generate``).

    Each intervention edits at its own point; at one point they run in list order, and within a
    decoder layer the points run in this order: the layer's input hidden states (``residual_input``,
    `ResidualEdit`), then the attention call's `EDIT_POINTS` in the dispatcher's order (score edits,
    softmax, probability edits, value edits, ``P @ V``, output edits; see
    `eah_interp.dispatch.run_steps`), then the layer's output hidden states (``residual_output``).
    Stacks with ``eah`` / ``record_attention`` contexts like any context.

    Args:
        model: an HF LVLM (or LM) whose language model uses the AttentionInterface.
        interventions: `eah_interp.interventions` objects (``EAH``, ``PAI``, ``VAF``, ...) and/or
            `EAHConfig` objects; one alone is accepted too.
        layout: optional explicit prompt layout (see `eah`).

    Yields:
        An `InterventionRun` whose ``records`` say what each intervention did in each attention call.

    Example:
        >>> from eah_interp.interventions import EAH, PAI
        >>> with eah_interp.hf.intervene(model, [EAH.paper(), PAI(alpha=0.2)]) as run:
        ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        >>> run.of("PAI")[0]
    """

    kind = "intervene"

    def __init__(self, model: nn.Module, interventions: Any, layout: TokenLayout | None = None) -> None:
        items = as_interventions(interventions)
        super().__init__(model, layout)
        n_layers = validate_interventions(items, model)
        for item in items:
            if isinstance(item, EAHConfig):
                self._warn_if_causal_normaliser(item.normalise)
        self.n_layers = n_layers
        self.run = InterventionRun(items)
        # interventions that read a layer's input hidden states (VAR's massive-activation sinks)
        readers = [item for item in items if getattr(item, "needs_hidden", False)]
        self._hidden_layers = sorted({layer for item in readers for layer in item.layers_for(n_layers)})
        self._sink_history: dict[tuple[int, int], Tensor] = {}
        # residual-stream edits: hooks on the decoder layers' input / output
        self._residual_layers = sorted({
            layer for item in items if _is_residual(item) for layer in item.layers_for(n_layers)
        })

    def __enter__(self) -> InterventionRun:  # type: ignore[override]
        super().__enter__()
        try:
            layers = decoder_layers(self.model) if self._hidden_layers or self._residual_layers else {}
            for layer in self._residual_layers:  # before _note_hidden: VAR reads the (edited) input the layer gets
                self._hidden_hooks.append(
                    layers[layer].register_forward_pre_hook(self._edit_input(layer), with_kwargs=True)
                )
                self._hidden_hooks.append(layers[layer].register_forward_hook(self._edit_output(layer)))
            for layer in self._hidden_layers:
                self._hidden_hooks.append(
                    layers[layer].register_forward_pre_hook(self._note_hidden(layer), with_kwargs=True)
                )
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.run

    def __exit__(self, *exc) -> None:
        try:
            self._remove_layer_hooks()
            self._sink_history.clear()
        finally:
            super().__exit__(*exc)

    def _edit_input(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if "hidden_states" in kwargs:
                edited = self._edit_residual(layer, "residual_input", kwargs["hidden_states"])
                return None if edited is None else (args, {**kwargs, "hidden_states": edited})
            if args and isinstance(args[0], Tensor):
                edited = self._edit_residual(layer, "residual_input", args[0])
                return None if edited is None else ((edited, *args[1:]), kwargs)
            return None

        return hook

    def _edit_output(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            edited = self._edit_residual(layer, "residual_output", hidden) if isinstance(hidden, Tensor) else None
            if edited is None:
                return None
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def _edit_residual(self, layer: int, point: str, hidden: Tensor) -> Tensor | None:
        """The residual edits of one layer's input or output, in list order (None: none applies)."""
        dispatcher = dispatch.dispatcher_for(self.config)
        if dispatcher is not None and dispatcher.paused:
            return None
        q_len = hidden.shape[1]
        total = self.state.past + q_len
        chosen = [
            (index, item) for index, item in enumerate(self.run.interventions)
            if _is_residual(item) and item.point == point and item.applies(layer, q_len, total, self.n_layers)
        ]
        if not chosen:
            return None
        layout = self._layout_for(hidden.shape[0], q_len, total)
        site = Site(layer=layer, layout=layout, q_len=q_len, k_len=total, prompt_len=self.state.prompt_len or total)
        for index, item in chosen:
            hidden, changed = item.edit(hidden, site)
            self.run.records.append(InterventionRecord(type(item).__name__, index, layer, point, q_len, total, changed))
        return hidden

    def _sinks(self, index: int, item: Any, call: AttentionCall) -> Tensor:
        """``Bool[batch, k]``: the massive-activation sinks among the call's keys (found in the prompt)."""
        from eah_interp.sinks import massive_activation_sinks

        hidden = self._hidden.get(call.layer)
        if call.prefill and (hidden is None or hidden.shape[1] != call.q_len):
            raise UnsupportedModelError(
                f"Layer {call.layer}: {type(item).__name__} reads the decoder layer's input hidden states, but no "
                "hidden states of this call were seen (is the decoder layer a module with .self_attn?)."
            )
        key = (index, call.layer)
        previous = self._sink_history.get(key)
        if call.prefill or previous is None:
            history = massive_activation_sinks(hidden, item.dims, item.tau)
        else:  # as in the official code, sinks come from the prompt: generated tokens are never sinks
            history = torch.cat([previous, previous.new_zeros(previous.shape[0], call.q_len)], dim=1)
        total = self._total_len(call.q_len, call.k_len)
        if history.shape != (call.query.shape[0], total):
            raise LayoutError(
                f"Layer {call.layer}: {type(item).__name__} tracked sink flags for {tuple(history.shape)} positions "
                f"but the call has {call.query.shape[0]} rows x {total} positions (beam search or a cache this "
                "context did not see from the prompt on?)."
            )
        self._sink_history[key] = history
        return history[:, -call.k_len :]  # a sliding-window layer's keys are the last k_len positions

    def steps(self, call: AttentionCall) -> list[AttentionStep]:
        if not any(_intervention_applies(item, call, self.n_layers) for item in self.run.interventions):
            return []
        layout = self._layout_for(call.query.shape[0], call.q_len, call.k_len)
        prompt_len = call.k_len if call.prefill else (self.state.prompt_len or call.k_len) - self._window_start(call)
        return intervention_steps(
            self.run.interventions, call, layout, prompt_len, self.run.records, self.n_layers, sinks=self._sinks
        )


def as_interventions(interventions: Any) -> tuple[Any, ...]:
    """A tuple of interventions from one or a list (`eah_interp.interventions` objects or `EAHConfig`)."""
    items = (interventions,) if isinstance(interventions, (Intervention, EAHConfig)) else tuple(interventions)
    if not items:
        raise ConfigError("intervene needs at least one intervention, e.g. [PAI()] or [EAHConfig.paper()].")
    for item in items:
        if not isinstance(item, (Intervention, EAHConfig)):
            raise TypeError(f"intervene takes eah_interp.interventions objects or EAHConfig; got {type(item).__name__}.")
    return items


def validate_interventions(items: tuple[Any, ...], model: nn.Module) -> int:
    """Check every intervention against the model's sizes (layers, heads, KV heads, hidden size); its depth."""
    n_layers, n_heads, n_kv_heads = model_shape(model)
    hidden_size = int(getattr(text_config(model), "hidden_size", 0) or 0)
    for item in items:
        if isinstance(item, EAHConfig):
            item.validate_for(n_layers, n_heads)
        else:
            item.validate_model(n_layers, n_heads, n_kv_heads, hidden_size)
    return n_layers


def _is_residual(item: Any) -> bool:
    """Whether an intervention edits the residual stream (a decoder layer's input or output), not attention."""
    return isinstance(item, Intervention) and item.point in RESIDUAL_POINTS


def _intervention_applies(item: Any, call: AttentionCall, n_layers: int) -> bool:
    """Whether an intervention edits this attention call (residual edits never do: hooks apply them)."""
    if isinstance(item, EAHConfig):
        return should_edit(item, call.layer, call.q_len, call.k_len)
    return not _is_residual(item) and item.applies(call.layer, call.q_len, call.k_len, n_layers)


def intervention_steps(
    items: tuple[Any, ...],
    call: AttentionCall,
    layout: TokenLayout,
    prompt_len: int,
    records: list[InterventionRecord],
    n_layers: int,
    sinks: Callable[[int, Any, AttentionCall], Tensor] | None = None,
) -> list[AttentionStep]:
    """The dispatcher steps of a list of interventions for one attention call (shared by the backends).

    Args:
        items: the interventions, in list order.
        call: the attention call.
        layout: the layout fitted to the call.
        prompt_len: positions of the prompt (later keys are generated tokens).
        records: receives one `InterventionRecord` per edit made.
        n_layers: the model's depth (resolves ``layers=None``).
        sinks: ``sinks(index, item, call) -> Bool[batch, k]`` for interventions that read hidden states (VAR).
    """
    steps = []
    for index, item in enumerate(items):
        if _intervention_applies(item, call, n_layers):
            steps.append(_intervention_step(index, item, call, layout, prompt_len, records, sinks))
    return steps


def _intervention_step(
    index: int, item: Any, call: AttentionCall, layout: TokenLayout, prompt_len: int,
    records: list[InterventionRecord], sinks: Callable | None,
) -> AttentionStep:
    q_len, k_len, layer = call.q_len, call.k_len, call.layer
    if isinstance(item, EAHConfig):
        def note(record: EditRecord) -> None:
            changed = int(record.edited.sum())
            records.append(InterventionRecord("EAH", index, layer, "probs", q_len, k_len, changed, eah=record))

        return eah_step(item, layout, call, note)
    flags = None
    if getattr(item, "needs_hidden", False):
        if sinks is None:
            raise UnsupportedModelError(
                f"{type(item).__name__} reads each layer's input hidden states; this backend cannot provide them "
                "(use eah_interp.hf.intervene)."
            )
        flags = sinks(index, item, call)

    def edit(tensor: Tensor, layout: TokenLayout, sub: AttentionCall) -> Tensor:
        site = Site(layer=layer, layout=layout, q_len=sub.q_len, k_len=sub.k_len, prompt_len=prompt_len)
        edited, changed = item.edit(tensor, site) if flags is None else item.edit(tensor, site, sinks=flags)
        records.append(InterventionRecord(type(item).__name__, index, layer, item.point, q_len, k_len, changed))
        return edited

    site = Site(layer=layer, layout=layout, q_len=q_len, k_len=k_len, prompt_len=prompt_len)
    rows = None
    if item.point == "values" and item.row_mask(site) is not None:
        def rows(layout: TokenLayout, sub: AttentionCall) -> Tensor:
            return item.row_mask(Site(layer=layer, layout=layout, q_len=sub.q_len, k_len=sub.k_len,
                                      prompt_len=prompt_len))
    return AttentionStep(item.point, edit, layout, tail=item.tail_rows(site), rows=rows)


# ---------------------------------------------------------------------------- recording
@dataclass
class Recording:
    """What `record_attention` collected: prompt patterns per layer (if kept) and the `HeadStats`."""

    layers: tuple[int, ...]
    stats: HeadStats | None
    patterns: dict[int, list[Tensor]] = field(default_factory=dict)
    layouts: list[TokenLayout] = field(default_factory=list)


class record_attention(_AttentionOverride):  # noqa: N801
    """Collect prompt attention statistics (into `HeadStats`) and/or patterns of chosen layers.

    Only the chosen layers run eager attention; the others keep their implementation (e.g. SDPA).
    Outputs are unchanged (up to eager-vs-SDPA rounding in the chosen layers).

    Args:
        model: an HF LVLM.
        layers: ``"all"`` or layer indices.
        stats: a `HeadStats` to feed (one update per prompt forward and layer), or None.
        keep_patterns: keep each prompt's probabilities (``[batch, heads, q, k]``, on CPU) per layer.
        layout: optional explicit layout (see `eah`).

    Yields:
        A `Recording`.
    """

    kind = "record"

    def __init__(
        self,
        model: nn.Module,
        layers: str | Iterable[int] = "all",
        *,
        stats: HeadStats | None = None,
        keep_patterns: bool = False,
        layout: TokenLayout | None = None,
    ) -> None:
        super().__init__(model, layout)
        n_layers, _, _ = model_shape(model)
        chosen = tuple(range(n_layers)) if layers == "all" else tuple(int(x) for x in layers)  # type: ignore[union-attr]
        bad = [x for x in chosen if not 0 <= x < n_layers]
        if bad:
            raise LayerIndexError(f"Layers {bad} out of range: the language model has {n_layers} layers.")
        if stats is None and not keep_patterns:
            raise ValueError("record_attention needs stats=HeadStats(...) and/or keep_patterns=True.")
        if stats is not None:
            self._warn_if_causal_normaliser(stats.normalise)
        self._keep_patterns = keep_patterns
        self.recording = Recording(layers=chosen, stats=stats)
        # a HeadStats comparing sinks with massive activations reads each layer's input hidden states
        # (self._note_hidden hooks, added on entry)

    def __enter__(self) -> Recording:  # type: ignore[override]
        super().__enter__()
        stats = self.recording.stats
        if stats is not None and stats.sink_dims:
            try:
                decoders = decoder_layers(self.model)
                for layer in self.recording.layers:
                    self._hidden_hooks.append(
                        decoders[layer].register_forward_pre_hook(self._note_hidden(layer), with_kwargs=True)
                    )
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self.recording

    def __exit__(self, *exc) -> None:
        try:
            self._remove_layer_hooks()
        finally:
            super().__exit__(*exc)

    def _prompt_hidden(self, call: AttentionCall) -> Tensor | None:
        """The recorded layer's input hidden states of this prompt forward (None without ``sink_dims``)."""
        stats = self.recording.stats
        if stats is None or not stats.sink_dims:
            return None
        hidden = self._hidden.pop(call.layer, None)
        if hidden is None or hidden.shape[1] != call.q_len:
            raise LayoutError(
                f"Layer {call.layer}: the HeadStats compares sinks with massive activations (sink_dims) and needs the "
                "decoder layer's input hidden states, but none of this prompt were seen (is the decoder layer a "
                "module called with hidden_states?). Build the HeadStats without sink_dims."
            )
        return hidden

    def steps(self, call: AttentionCall) -> list[AttentionStep]:
        if call.layer not in self.recording.layers or not call.prefill:
            return []
        layout = self._layout_for(call.query.shape[0], call.q_len, call.k_len)
        from_sums = None if self._keep_patterns or self.recording.stats is None else self._record_sums
        return [AttentionStep("record", self._record_probs, layout, sums=from_sums)]

    def _record_sums(self, sums: AttentionSums, layout: TokenLayout, call: AttentionCall) -> None:
        stats = self.recording.stats
        assert stats is not None
        stats.update_from_sums(call.layer, sums, layout, call.q_len, hidden=self._prompt_hidden(call))
        self._note_layout(layout)

    def _record_probs(self, probs: Tensor, layout: TokenLayout, call: AttentionCall) -> None:
        rec = self.recording
        if rec.stats is not None:
            rec.stats.update(call.layer, probs, layout, hidden=self._prompt_hidden(call))
        if self._keep_patterns:
            rec.patterns.setdefault(call.layer, []).append(probs.detach().to("cpu"))
        self._note_layout(layout)

    def _note_layout(self, layout: TokenLayout) -> None:
        """Keep each prompt's layout once (the layers of one forward share it)."""
        if not self.recording.layouts or self.recording.layouts[-1] is not layout:
            self.recording.layouts.append(layout)


def scan_heads(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    layers: str | Iterable[int] = "all",
    threshold: float = 0.0008,
    normalise: Normalise = "causal",
    progress: bool = True,
    keep_examples: bool = False,
    sink_dims: Iterable[int] | None = None,
    tau: float = 20.0,
) -> HeadStats:
    """Stream head statistics of every prompt forward over an iterable of model input dicts.

    ``keep_examples``, ``sink_dims`` and ``tau`` are those of `HeadStats`: per-example values, and the
    massive-activation sinks and their overlap with the column-mass sinks per layer (`HeadStats.layer_frame`).
    """
    from tqdm.auto import tqdm

    stats = HeadStats(threshold=threshold, normalise=normalise, keep_examples=keep_examples,
                      sink_dims=None if sink_dims is None else tuple(sink_dims), tau=tau)
    with record_attention(model, layers, stats=stats), torch.no_grad():
        for inputs in tqdm(batches, desc="scanning heads", disable=not progress):
            model(**inputs)
    return stats


def compare_sink_definitions(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    dims: Iterable[int],
    tau: float = 20.0,
    threshold: float = 0.0008,
    normalise: Normalise = "causal",
    layers: str | Iterable[int] = "all",
    layout: TokenLayout | None = None,
) -> Any:
    """EAH's column-mass sinks next to VAR's massive-activation sinks, per layer and prompt row.

    One prompt forward: each chosen layer's probabilities give EAH's vision sinks (`detect_sinks` with
    ``threshold`` / ``normalise``, a sink in at least one head), the layer's input hidden states give the
    massive-activation sinks (`massive_activation_sinks` with ``dims`` / ``tau``); `sink_agreement`
    counts both and their overlap on the image tokens. So "EAH's sinks are the model's sink tokens" can
    be checked on any model.

    Args:
        model: an HF LVLM.
        inputs: one batch of model inputs (a prompt forward).
        dims: the model's sink dimensions (`eah_interp.sinks.massive_dims` proposes them).
        tau: the massive-activation threshold (VAR: 20).
        threshold, normalise: EAH's sink threshold and normaliser.
        layers: ``"all"`` or layer indices.
        layout: optional explicit layout.

    Returns:
        A pandas DataFrame, one row per (layer, row): ``eah``, ``massive``, ``both``, ``jaccard``.
    """
    import pandas as pd

    from eah_interp.sinks import detect_sinks, massive_activation_sinks, sink_agreement

    dims = tuple(int(d) for d in dims)
    hidden: dict[int, Tensor] = {}
    hooks = []
    try:
        with record_attention(model, layers, keep_patterns=True, layout=layout) as rec:
            decoders = decoder_layers(model)
            for layer in rec.layers:
                def note(module, args, kwargs, layer=layer):
                    hidden[layer] = kwargs.get("hidden_states", args[0] if args else None).detach()

                hooks.append(decoders[layer].register_forward_pre_hook(note, with_kwargs=True))
            with torch.no_grad():
                model(**inputs, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for layer in rec.layers:
        probs, prompt_layout = rec.patterns[layer][-1], rec.layouts[-1]
        eah_sinks = detect_sinks(probs, prompt_layout, threshold, normalise)
        massive = massive_activation_sinks(hidden[layer], dims, tau)
        agreement = sink_agreement(eah_sinks, massive, prompt_layout.image_mask)
        for row in range(probs.shape[0]):
            rows.append({"layer": layer, "row": row, **{k: float(v[row]) for k, v in agreement.items()}})
    return pd.DataFrame(rows, columns=["layer", "row", "eah", "massive", "both", "jaccard"])


# ---------------------------------------------------------------------------- contrastive logits
class ContrastiveLogits:
    """A logits processor for ``generate``: contrast the (edited) run with an unedited text-only run.

    PAI's contrastive part (LALBJ/PAI, ``CFG.py``, ``CFGLogits``): with ``s = log_softmax(logits)`` of
    the run and ``u = log_softmax`` of the same model on the prompt without the image (its own KV cache,
    every edit paused: `paused`), the scores are ``gamma * (s - u) + u``, and tokens with
    ``s < log(cutoff) + max(s)`` are set to ``-inf``. PAI's defaults: ``gamma=2`` (``chair_eval.py``'s
    ``--gamma``), ``cutoff=0.1``.

    Args:
        model: the HF model ``generate`` runs.
        unconditional: the text-only prompt: ``{"input_ids": ..., "attention_mask": ...}`` (one row per
            generated row; without image tokens).
        gamma: the guidance scale (1: the run's own log-probabilities).
        cutoff: the plausibility cut relative to the best token.
    """

    def __init__(self, model: nn.Module, unconditional: dict[str, Tensor], gamma: float = 2.0, cutoff: float = 0.1) -> None:
        if not 0 < cutoff <= 1:
            raise ConfigError(f"cutoff must be in (0, 1]; got {cutoff!r}.")
        if "input_ids" not in unconditional:
            raise ConfigError("unconditional needs input_ids (the prompt without the image).")
        self.model, self.gamma, self.cutoff = model, float(gamma), float(cutoff)
        self.unconditional = dict(unconditional)
        self._out: Any = None
        self._mask: Tensor | None = None

    # LALBJ/PAI@9bbd8bd ships two gammas. With --use-cfg its scripts leave the prompt forward unedited
    # (llama_modify sets use_cfg on the edited layers, attention.py:90 skips the edit, CFGLogits resets the
    # flag only after its first call, CFG.py:48-49): the official run of both parts is PAI(phase="decode").
    @classmethod
    def chair_eval(cls, model: nn.Module, unconditional: dict[str, Tensor], **kwargs: Any) -> ContrastiveLogits:
        """``gamma=2``: the default of the scripts' ``--gamma`` (``chair_eval.py:53``, ``pope_eval.py:53``)."""
        return cls(model, unconditional, **{"gamma": 2.0, **kwargs})

    @classmethod
    def readme(cls, model: nn.Module, unconditional: dict[str, Tensor], **kwargs: Any) -> ContrastiveLogits:
        """``gamma=1.1``: the README's commands (``README.md:65, 68, 82``) and ``init_cfg_processor`` (``model_loader.py:253``).

        Those commands decode greedily (no ``--sample``); ``README.md:51`` recommends nucleus sampling
        without giving its settings (``--sample`` calls ``generate(do_sample=True)`` with the checkpoint's
        own ``top_p`` / ``temperature``).
        """
        return cls(model, unconditional, **{"gamma": 1.1, **kwargs})

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = torch.log_softmax(scores.float(), dim=-1)
        if self.gamma == 1:
            return scores
        with paused(self.model), torch.no_grad():
            if self._out is None:
                self._mask = self.unconditional.get("attention_mask")
                self._out = self.model(**self.unconditional, use_cache=True)
            else:
                if self._mask is not None:
                    self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
                self._out = self.model(
                    input_ids=input_ids[:, -1:], attention_mask=self._mask, past_key_values=self._out.past_key_values,
                    use_cache=True,
                )
        unconditional = torch.log_softmax(self._out.logits[:, -1].float(), dim=-1)
        cut = torch.log(torch.tensor(self.cutoff)) + scores.max(dim=-1, keepdim=True).values
        out = self.gamma * (scores - unconditional) + unconditional
        return out.masked_fill(scores < cut, -float("inf"))
