"""HF transformers backend: interventions (EAH and the others) and attention recording in ``forward`` / ``generate``.

A model gets exactly one attention override while any context is active (`eah_interp.dispatch`): the
first context entered registers a uniquely named function with transformers' `AttentionInterface` (and a
mask function under the same name with `AttentionMaskInterface`, or the function would receive no causal
mask: SDPA's own for an SDPA model, so the other layers keep their fast causal path), sets it on the
language model's config only, and the last context to exit restores everything. The function holds the
ordered stack of active contexts and dispatches on ``module.layer_idx``: a layer no context wants runs the
implementation the model had before (e.g. SDPA); otherwise `eah_interp.dispatch.run_steps` runs every
context's steps in one order, on the cheapest path they allow (map-free running sums for statistics and
plain-copy EAH, the model's own attention plus the last rows for edits of a prompt's last rows, else the
eager map). Both paths give the same numbers (tests compare them with explicit computations within 1e-5).

This module only says how to reach the sites of an HF model: what an intervention list does at each
site is compiled by `eah_interp.interventions.compile.Plan`; residual-stream edits and the hidden
states interventions read (VAR) are reached with hooks on the decoder layers. On exit, even by
exception, the config, the registries and the hooks are restored exactly.

Contexts: `intervene` (any list of `eah_interp.interventions`; `eah` is ``intervene(model, [config])``),
`record_attention` (statistics / patterns), `paused` (an unedited forward inside an edited run, e.g. for
`ContrastiveLogits`).

Example:
    >>> with eah_interp.hf.eah(model, EAH.paper()) as run:
    ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    >>> run.records[0].source_head  # the head whose map was broadcast, per row
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from eah_interp import dispatch
from eah_interp.chunked import AttentionSums
from eah_interp.dispatch import AttentionCall, AttentionStep
from eah_interp.errors import ConfigError, LayoutError
from eah_interp.head_stats import HeadStats, Recording
from eah_interp.interventions.base import Intervention, InterventionRun
from eah_interp.interventions.compile import Plan, as_interventions
from eah_interp.interventions.eah import EAH
from eah_interp.interventions.selectors import chosen_layers
from eah_interp.layout import TokenLayout
from eah_interp.models.adapters import adapter_for, require_visual_token_ids, token_layout
from eah_interp.models.introspect import attention_modules, model_shape, text_config
from eah_interp.sinks import Normalise, normaliser_warning
from eah_interp.sites import hf_hooks

__all__ = [
    "ContrastiveLogits",
    "active_contexts",
    "compare_sink_definitions",
    "eah",
    "intervene",
    "paused",
    "record_attention",
]

_MISSING = object()


def _past_length(input_ids: Tensor | None, kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache at a forward call (0 for a prompt forward)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # renamed `cache` in transformers 5.2x
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if input_ids is not None and isinstance(mask, Tensor) and mask.ndim == 2:
        return mask.shape[1] - input_ids.shape[1]
    return 0


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
    generate_layout: TokenLayout | None = None
    step: int = -1
    prompt_len: int | None = None
    total_len: int | None = None  # positions so far at a decode step (from its 2-D attention mask)
    past: int = 0  # positions already in the KV cache at the current forward (0: a prompt forward)


class _AttentionOverride:
    """A context on the model's dispatcher: tracks the prompt layout; subclasses say which steps to run."""

    def __init__(self, model: nn.Module, layout: TokenLayout | None) -> None:
        self.model = model
        self.config = text_config(model)
        attention_modules(model)  # raises UnsupportedModelError when the decoder cannot be instrumented
        self.adapter = adapter_for(model)
        self.state = _State(user_layout=layout)
        if layout is None:
            require_visual_token_ids(model)  # a LayoutError now, not at the first forward
        self._hook = None
        self._previous_generate: Any = None
        self._entered = False
        # decoder-layer sites a subclass hooks (layer inputs it reads, residual edits), unhooked on exit
        self._hidden: dict[int, Tensor] = {}
        self._site_hooks = contextlib.ExitStack()

    def _note_hidden(self, layer: int, keep: Callable[[int, Tensor], None] | None = None) -> Callable[[Tensor], None]:
        """A site function handing ``layer``'s input hidden states (detached) to ``keep`` (default: ``self._hidden``)."""
        store = keep or self._hidden.__setitem__
        return lambda hidden: store(layer, hidden.detach())

    def _hook_sites(self, fns: dict[tuple[str, int], Callable[[Tensor], Tensor | None]]) -> None:
        """Hook decoder-layer sites with `eah_interp.sites.hf_hooks` until exit (on failure: exit now)."""
        try:
            self._site_hooks.enter_context(hf_hooks(self.model, fns))
        except BaseException:
            self.__exit__(None, None, None)
            raise

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
            self._site_hooks.close()  # decoder-layer hooks, and the hidden states they kept
            self._hidden.clear()
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
    def _paused(self) -> bool:
        """Inside `paused`: every context's edits and recordings are off."""
        dispatcher = dispatch.dispatcher_for(self.config)
        return dispatcher is not None and bool(dispatcher.paused)

    def _pre_forward(self, module, args, kwargs) -> None:
        if self._paused():
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
            self.state.layout = token_layout(self.model, input_ids, kwargs.get("attention_mask"))
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
                self.state.generate_layout = token_layout(self.model, input_ids, kwargs.get("attention_mask"))
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


def _then_note(edit: Callable[[Tensor], Tensor | None] | None,
               note: Callable[[Tensor], None]) -> Callable[[Tensor], Tensor | None]:
    """A site function: ``edit`` (if any), then ``note`` of the value the layer goes on with."""
    def fn(hidden: Tensor) -> Tensor | None:
        edited = None if edit is None else edit(hidden)
        note(hidden if edited is None else edited)
        return edited

    return fn


# ---------------------------------------------------------------------------- interventions
class intervene(_AttentionOverride):  # noqa: N801
    """Apply interventions to an HF LVLM inside the ``with`` block (``forward`` and ``generate``).

    Each intervention edits at its own point; at one point they run in list order, and within a
    decoder layer the points run in this order: the layer's input hidden states (``residual_input``,
    `ResidualEdit`), then the attention call's `EDIT_POINTS` in the dispatcher's order (score edits,
    softmax, probability edits, value edits, ``P @ V``, output edits; see
    `eah_interp.dispatch.run_steps`), then the layer's output hidden states (``residual_output``).
    The list is compiled once (`eah_interp.interventions.compile.Plan`); an empty list (or None) runs the
    plain model and leaves it untouched (no dispatcher, no hooks, no layout: a prompt without image tokens
    is fine). Stacks with other ``intervene`` / ``record_attention`` contexts like any context.

    Args:
        model: an HF LVLM (or LM) whose language model uses the AttentionInterface.
        interventions: `eah_interp.interventions` objects (``EAH``, ``PAI``, ``VAF``, ...); one alone is
            accepted too. Layers and heads are checked against the model (`LayerIndexError` names its depth).
        layout: optional explicit prompt layout; by default it is rebuilt from ``input_ids`` at every
            prompt forward (`eah_interp.models.token_layout`: the family's image token ids, padding from
            the mask).

    Yields:
        An `InterventionRun` whose ``records`` say what each intervention did in each call.

    Example:
        >>> from eah_interp.interventions import EAH, PAI
        >>> with eah_interp.hf.intervene(model, [EAH.paper(), PAI(alpha=0.2)]) as run:
        ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        >>> run.of("PAI")[0], run.source_heads()
    """

    def __init__(self, model: nn.Module, interventions: Intervention | Iterable[Intervention],
                 layout: TokenLayout | None = None) -> None:
        items = as_interventions(interventions)
        if not items:  # the plain model: nothing to check, compile or instrument
            self.plan = Plan((), n_layers=0, n_heads=0)
            self._entered = False
            return
        super().__init__(model, layout)
        self.plan = Plan.for_model(items, model)

    def __enter__(self) -> InterventionRun:  # type: ignore[override]
        plan = self.plan
        if not plan.items:  # the plain model: nothing to instrument (and __exit__ has nothing to undo)
            return plan.run
        super().__enter__()
        fns: dict[tuple[str, int], Callable[[Tensor], Tensor | None]] = {
            ("residual_input", layer): self._residual_edit(layer, "residual_input") for layer in plan.input_layers
        }
        for layer in plan.hidden_layers:  # after the layer's input edits: VAR reads the (edited) input
            fns[("residual_input", layer)] = _then_note(fns.get(("residual_input", layer)),
                                                        self._note_hidden(layer, plan.note_hidden))
        fns.update({("resid", layer): self._residual_edit(layer, "residual_output") for layer in plan.output_layers})
        self._hook_sites(fns)
        return plan.run

    def __exit__(self, *exc) -> None:
        try:
            self.plan.clear()
        finally:
            super().__exit__(*exc)

    def _residual_edit(self, layer: int, point: str) -> Callable[[Tensor], Tensor | None]:
        """The site function of ``layer``'s residual edits at ``point`` (None: nothing edited)."""
        return lambda hidden: self._edit_residual(layer, point, hidden)

    def _edit_residual(self, layer: int, point: str, hidden: Tensor) -> Tensor | None:
        if self._paused():
            return None
        total = self.state.past + hidden.shape[1]
        return self.plan.edit_residual(layer, point, hidden, self._layout_for, total, self.state.prompt_len or total)

    def steps(self, call: AttentionCall) -> list[AttentionStep]:
        prompt_len = call.k_len if call.prefill else (self.state.prompt_len or call.k_len) - self._window_start(call)
        return self.plan.steps(call, self._layout_for, prompt_len, self._total_len(call.q_len, call.k_len))


def eah(model: nn.Module, config: EAH, layout: TokenLayout | None = None) -> intervene:
    """Apply one EAH edit: ``intervene(model, [config], layout)``.

    Example:
        >>> with eah_interp.hf.eah(model, EAH.paper()) as run:
        ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        >>> run.source_heads()  # the head whose map was broadcast, per edited call and row
    """
    return intervene(model, [config], layout)


# ---------------------------------------------------------------------------- recording
class record_attention(_AttentionOverride):  # noqa: N801
    """Collect prompt attention statistics (into `HeadStats`) and/or patterns of chosen layers.

    Only the chosen layers run eager attention; the others keep their implementation (e.g. SDPA).
    Outputs are unchanged (up to eager-vs-SDPA rounding in the chosen layers).

    Args:
        model: an HF LVLM.
        layers: ``"all"`` or layer indices.
        stats: a `HeadStats` to feed (one update per prompt forward and layer), or None.
        keep_patterns: keep each prompt's probabilities (``[batch, heads, q, k]``, on CPU) per layer.
        layout: optional explicit layout (see `intervene`).

    Yields:
        A `Recording`. The same verb, arguments and result in every backend: `eah_interp.nnsight.record_attention`
        (inside a trace), `eah_interp.transformer_lens.record_attention` (hooks).
    """

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
        self.recording = Recording(chosen_layers(layers, model_shape(model)[0]), stats, keep_patterns)
        message = None if stats is None else normaliser_warning(
            self.adapter.family, self.adapter.bidirectional_image_attention, stats.normalise)
        if message:
            warnings.warn(message, stacklevel=2)

    def __enter__(self) -> Recording:  # type: ignore[override]
        super().__enter__()
        stats = self.recording.stats
        if stats is not None and stats.sink_dims:  # sinks compared with massive activations: the layers' inputs
            self._hook_sites({("residual_input", layer): self._note_hidden(layer) for layer in self.recording.layers})
        return self.recording

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
        from_sums = None if self.recording.keep_patterns or self.recording.stats is None else self._record_sums
        return [AttentionStep("record", self._record_probs, layout, sums=from_sums)]

    def _record_sums(self, sums: AttentionSums, layout: TokenLayout, call: AttentionCall) -> None:
        self.recording.add_sums(call.layer, sums, layout, call.q_len, hidden=self._prompt_hidden(call))

    def _record_probs(self, probs: Tensor, layout: TokenLayout, call: AttentionCall) -> None:
        self.recording.add(call.layer, probs, layout, hidden=self._prompt_hidden(call))


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
    hidden: dict[int, Tensor] = {}  # each recorded layer's input hidden states
    recorder = record_attention(model, layers, keep_patterns=True, layout=layout)
    reads = {("residual_input", layer): (lambda value, layer=layer: hidden.__setitem__(layer, value.detach()))
             for layer in recorder.recording.layers}
    with recorder as rec, hf_hooks(model, reads), torch.no_grad():
        model(**inputs, use_cache=False)
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
