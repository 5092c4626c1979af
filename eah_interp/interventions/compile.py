"""A list of interventions compiled for one model: what a backend runs at each edit point.

`Plan` is the one place that turns ``[EAH.paper(), PAI(), ResidualEdit(...)]`` into work: it validates the
list against the model's sizes (`LayerIndexError` naming its depth), says which layers need an attention
edit, a residual edit or their input hidden states, builds the attention dispatcher's steps of one call
(`steps`; the map-free, tail-row and row-selection capabilities of each intervention passed on), applies
the edits of one edit point (`edit_at`; for backends that reach each point by a hook) and the residual
edits (`edit_residual`), keeps the flags that interventions read from hidden states (VAR's sinks: found in
the prompt, generated positions never flagged), and records every edit in one `InterventionRun`.

A backend only says how to reach a site: `eah_interp.hf` (the attention dispatcher and decoder-layer
hooks), `eah_interp.nnsight` (the attention call's binding and the decoder layer's inputs and outputs in a
trace) and `eah_interp.transformer_lens` (the bridge's hook points).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from eah_interp.dispatch import AttentionCall, AttentionStep
from eah_interp.errors import LayoutError, UnsupportedModelError
from eah_interp.interventions.base import RESIDUAL_POINTS, Intervention, InterventionRecord, InterventionRun
from eah_interp.interventions.selectors import Site, phase_matches
from eah_interp.layout import TokenLayout

#: ``fit(batch, q_len, k_len) -> TokenLayout``: the prompt layout fitted to one call (extended for decode steps).
Fit = Callable[[int, int, int], TokenLayout]


def as_interventions(interventions: Intervention | Iterable[Intervention] | None) -> tuple[Intervention, ...]:
    """A tuple of interventions from one or a list (None or an empty list: the plain model)."""
    if interventions is None:
        return ()
    items = (interventions,) if isinstance(interventions, Intervention) else tuple(interventions)
    for item in items:
        if not isinstance(item, Intervention):
            raise TypeError(
                f"intervene takes eah_interp.interventions objects (EAH, PAI, ...); got {type(item).__name__}."
            )
    return items


class Plan:
    """Interventions compiled for a model of given sizes; its `run` receives the records.

    Args:
        interventions: one intervention or a list (in the order they edit at a shared point).
        n_layers, n_heads, n_kv_heads, hidden_size: the language model's sizes (every intervention is
            checked against them).
    """

    def __init__(
        self, interventions: Intervention | Iterable[Intervention], n_layers: int, n_heads: int,
        n_kv_heads: int | None = None, hidden_size: int | None = None,
    ) -> None:
        self.items = as_interventions(interventions)
        for item in self.items:
            item.validate_for(n_layers, n_heads, n_kv_heads, hidden_size)
        self.n_layers = n_layers
        self.run = InterventionRun(self.items, n_layers=n_layers)
        self._layers = [frozenset(item.layers_for(n_layers)) for item in self.items]
        self._history: dict[tuple[int, int], Tensor] = {}  # (index, layer) -> Bool[batch, positions so far]
        self._hidden: dict[int, Tensor] = {}  # layer -> input hidden states of the latest forward

    @classmethod
    def for_model(cls, interventions: Intervention | Iterable[Intervention], model: nn.Module) -> Plan:
        """The plan for an HF model (its sizes from the text config; each intervention's `warnings_for` its family)."""
        from eah_interp.models.introspect import model_shape, text_config

        n_layers, n_heads, n_kv_heads = model_shape(model)
        hidden_size = int(getattr(text_config(model), "hidden_size", 0) or 0) or None
        plan = cls(interventions, n_layers, n_heads, n_kv_heads, hidden_size)
        plan.warn_for(model, stacklevel=4)
        return plan

    def warn_for(self, model: nn.Module, stacklevel: int = 3) -> None:
        """Warn what each intervention says a user should know about the model's family
        (`Intervention.warnings_for`, e.g. EAH's causal normaliser on bidirectional image attention)."""
        from eah_interp.models.adapters import adapter_for

        adapter = adapter_for(model)
        for item in self.items:
            for message in item.warnings_for(adapter):
                warnings.warn(message, stacklevel=stacklevel)

    # ------------------------------------------------------------------ which layers need what
    def _where(self, test: Callable[[Intervention], bool]) -> list[int]:
        return sorted({layer for item, layers in zip(self.items, self._layers, strict=True) if test(item)
                       for layer in layers})

    @cached_property
    def attention_layers(self) -> list[int]:
        """Layers with an edit inside the attention call."""
        return self._where(lambda item: item.point not in RESIDUAL_POINTS)

    @cached_property
    def input_layers(self) -> list[int]:
        """Layers whose input hidden states are edited (``residual_input``)."""
        return self._where(lambda item: item.point == "residual_input")

    @cached_property
    def output_layers(self) -> list[int]:
        """Layers whose output hidden states are edited (``residual_output``)."""
        return self._where(lambda item: item.point == "residual_output")

    @cached_property
    def hidden_layers(self) -> list[int]:
        """Layers whose input hidden states an intervention reads (``reads_hidden``: `note_hidden`)."""
        return self._where(lambda item: item.reads_hidden)

    @cached_property
    def _hidden_set(self) -> frozenset[int]:
        return frozenset(self.hidden_layers)

    def _active(self, point: str | None, layer: int, q_len: int, k_len: int) -> list[tuple[int, Intervention]]:
        """``(index, intervention)`` editing at ``point`` (None: any attention point) in this call, in list order:
        `Intervention.applies` (its layer and phase) with each intervention's layers computed once."""
        return [
            (index, item) for index, item in enumerate(self.items)
            if (item.point == point if point is not None else item.point not in RESIDUAL_POINTS)
            and layer in self._layers[index] and phase_matches(item.phase, q_len, k_len)
        ]

    # ------------------------------------------------------------------ hidden states read by interventions
    def note_hidden(self, layer: int, hidden: Tensor) -> None:
        """A decoder layer's input hidden states ``[batch, q, d]`` at this forward (after residual input edits)."""
        if layer in self._hidden_set:
            self._hidden[layer] = hidden.detach()

    def _key_flags(self, index: int, item: Intervention, layer: int, batch: int, q_len: int, k_len: int,
                   total: int) -> Tensor:
        """``Bool[batch, k]``: the intervention's `hidden_flags` of the call's keys, found in the prompt."""
        key = (index, layer)
        previous = self._history.get(key)
        name = type(item).__name__
        if q_len == k_len:
            hidden = self._hidden.get(layer)
            if hidden is None or hidden.shape[1] != q_len:
                raise UnsupportedModelError(
                    f"Layer {layer}: {name} reads the decoder layer's input hidden states, but none of this forward "
                    "were seen (is the decoder layer a module called with hidden_states?)."
                )
            history = item.hidden_flags(hidden)
        elif previous is None:
            raise UnsupportedModelError(
                f"Layer {layer}: {name} needs the flags of all {k_len} key positions, found in the prompt forward, "
                "but this run did not see the prompt forward (a decode step of a new nnsight intervene call: in "
                f"nnsight, {name} runs on prompt forwards only, {name}(phase='prefill')). Use "
                f"eah_interp.hf.intervene for generation with {name}."
            )
        else:  # as in VAR's official code, flags come from the prompt: generated tokens are never flagged
            history = torch.cat([previous, previous.new_zeros(previous.shape[0], q_len)], dim=1)
        if tuple(history.shape) != (batch, total):
            raise LayoutError(
                f"Layer {layer}: {name} tracked flags for {tuple(history.shape)} positions but the call has {batch} "
                f"rows x {total} positions (beam search or a cache this run did not see from the prompt on?)."
            )
        self._history[key] = history
        return history[:, -k_len:]  # a sliding-window layer's keys are the last k_len positions

    # ------------------------------------------------------------------ edits
    def _edit(self, index: int, item: Intervention, tensor: Tensor, site: Site, q_len: int, k_len: int) -> Tensor:
        edited, changed, detail = item.edit_with_detail(tensor, site)
        self._record(index, item, site.layer, q_len, k_len, changed, detail)
        return edited

    def _record(self, index: int, item: Intervention, layer: int, q_len: int, k_len: int, changed: int,
                detail: Any) -> None:
        self.run.records.append(
            InterventionRecord(type(item).__name__, index, layer, item.point, q_len, k_len, int(changed), eah=detail)
        )

    def _site(self, index: int, item: Intervention, layer: int, layout: TokenLayout, q_len: int, k_len: int,
              prompt_len: int, total: int) -> Site:
        flags = (self._key_flags(index, item, layer, layout.batch_size, q_len, k_len, total)
                 if item.reads_hidden else None)
        return Site(layer=layer, layout=layout, q_len=q_len, k_len=k_len, prompt_len=prompt_len, key_flags=flags)

    def steps(self, call: AttentionCall, fit: Fit, prompt_len: int, total: int | None = None) -> list[AttentionStep]:
        """The dispatcher steps of one attention call (`eah_interp.dispatch.run_steps` runs them); empty when
        no intervention edits the call (its layer and phase), without fitting a layout.

        Args:
            call: the attention call.
            fit: ``fit(batch, q_len, k_len)``: the prompt layout fitted to the call's keys.
            prompt_len: positions of the prompt among the call's keys (later ones are generated).
            total: positions of the sequence so far (more than ``call.k_len`` at a decode step of a
                sliding-window layer); default ``call.k_len``.
        """
        active = self._active(None, call.layer, call.q_len, call.k_len)
        if not active:
            return []
        layout = fit(call.query.shape[0], call.q_len, call.k_len)
        steps = []
        for index, item in active:
            site = self._site(index, item, call.layer, layout, call.q_len, call.k_len, prompt_len, total or call.k_len)
            steps.append(self._step(index, item, call, site))
        return steps

    def _step(self, index: int, item: Intervention, call: AttentionCall, site: Site) -> AttentionStep:
        q_len, k_len = call.q_len, call.k_len

        def at(layout: TokenLayout, sub: AttentionCall) -> Site:  # the site of a sub-call (a prompt's last rows)
            return Site(layer=site.layer, layout=layout, q_len=sub.q_len, k_len=sub.k_len,
                        prompt_len=site.prompt_len, key_flags=site.key_flags)

        def edit(tensor: Tensor, layout: TokenLayout, sub: AttentionCall) -> Tensor:
            return self._edit(index, item, tensor, at(layout, sub), q_len, k_len)

        rows = None
        if item.row_mask(site) is not None:
            def rows(layout: TokenLayout, sub: AttentionCall) -> Tensor:
                return item.row_mask(at(layout, sub))  # type: ignore[return-value]

        map_free = None
        fast = item.map_free(site)
        if fast is not None:
            def map_free(sub: AttentionCall, layout: TokenLayout, statistics: bool) -> tuple[Tensor, Any]:
                out, changed, detail, sums = fast(sub, layout, statistics)
                self._record(index, item, site.layer, q_len, k_len, changed, detail)
                return out, sums

        return AttentionStep(item.point, edit, site.layout, map_free=map_free, tail=item.tail_rows(site), rows=rows)

    def edit_at(self, point: str, layer: int, tensor: Tensor, fit: Fit, q_len: int, k_len: int,
                prompt_len: int) -> Tensor:
        """Apply the edits at one attention edit point of one call, in list order (for backends with a hook
        per point). ``tensor`` is shaped as that point's tensor (see `eah_interp.dispatch.EDIT_POINTS`);
        ``fit(batch, q_len, k_len)`` gives the call's layout."""
        for index, item in self._active(point, layer, q_len, k_len):
            site = self._site(index, item, layer, fit(tensor.shape[0], q_len, k_len), q_len, k_len, prompt_len, k_len)
            tensor = self._edit(index, item, tensor, site, q_len, k_len)
        return tensor

    def edit_residual(self, layer: int, point: str, hidden: Tensor, fit: Fit, total: int,
                      prompt_len: int | None = None) -> Tensor | None:
        """The residual edits of one layer's input or output ``[batch, q, d]``, in list order (None: none applies).

        Args:
            layer: the decoder layer.
            point: ``"residual_input"`` or ``"residual_output"``.
            hidden: the hidden states of this forward's positions.
            fit: fits the prompt layout to ``(batch, q, total)``.
            total: positions of the sequence so far (the KV cache's plus this forward's).
            prompt_len: positions of the prompt (default ``total``).
        """
        q_len = hidden.shape[1]
        chosen = self._active(point, layer, q_len, total)
        if not chosen:
            return None
        site = Site(layer=layer, layout=fit(hidden.shape[0], q_len, total), q_len=q_len, k_len=total,
                    prompt_len=total if prompt_len is None else prompt_len)
        for index, item in chosen:
            hidden = self._edit(index, item, hidden, site, q_len, total)
        return hidden

    def clear(self) -> None:
        """Forget the hidden states and flags kept between calls."""
        self._history.clear()
        self._hidden.clear()
