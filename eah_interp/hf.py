"""HF transformers backend: EAH and attention recording inside ``forward`` / ``generate``.

Both context managers register a uniquely named function with transformers' `AttentionInterface`
(and a mask function under the same name with `AttentionMaskInterface`, or the function would receive
no causal mask: SDPA's own for an SDPA model, so the other layers keep their fast causal path), set it
on the language model's config only, and dispatch on ``module.layer_idx``. Every layer not chosen runs
the implementation the model had before (e.g. SDPA). A chosen layer takes one of two paths:

* **map-free** (default, for decoders whose attention is softmax of scaled ``Q K^T`` + mask, without
  soft-capping or attention sinks): `record_attention` with ``stats`` computes the layer a chunk of query
  rows at a time and accumulates the statistics' sums (`eah_interp.chunked`); `eah` with a plain-copy
  edit (`eah_interp.edit.is_plain_copy`, e.g. the paper preset) gets the sink scores from chunked column
  sums and the output from one SDPA call with the source head's query and key. No ``[batch, heads, q,
  k]`` map exists;
* **eager**: the model family's own eager function computes the probabilities, the core edits or reads
  them (`apply_eah_to_probs`, `head_statistics`) and ``P @ V`` is recomputed: for kept patterns, blends,
  image-region or dropped-sink edits, decode steps and other attention variants.

Both give the same numbers (tests compare them with explicit computations within 1e-5). On exit, even
by exception, the config, the registries and the hooks are restored exactly.

Example:
    >>> config = EAHConfig.paper()
    >>> with eah_interp.hf.eah(model, config) as run:
    ...     out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    >>> run.records[0].source_head  # the head whose map was broadcast, per row
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp import compat
from eah_interp.chunked import chunked_attention
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, apply_eah_to_attention, apply_eah_to_probs, is_plain_copy, should_edit
from eah_interp.errors import (
    AttentionImplementationError,
    LayerIndexError,
    LayoutError,
    UnsupportedModelError,
)
from eah_interp.layout import TokenLayout
from eah_interp.sinks import Normalise
from eah_interp.stats import HeadStats, head_statistics, head_statistics_from_sums

_MISSING = object()
_names = itertools.count()
_names_lock = threading.Lock()

#: Attention implementations whose layers can run next to an eager-mask edited layer.
_COMPATIBLE = ("eager", "sdpa")


# ---------------------------------------------------------------------------- model introspection
def text_config(model: nn.Module):
    """The language model's config (the text sub-config of an LVLM, the config itself of an LM)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not an HF PreTrainedModel (no .config); eah_interp.hf needs one."
        )
    return config.get_text_config(decoder=True)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The language model's attention modules by ``layer_idx`` (those whose config is the text config)."""
    cfg = text_config(model)
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if getattr(module, "config", None) is cfg and isinstance(getattr(module, "layer_idx", None), int):
            if hasattr(module, "num_key_value_groups") or hasattr(module, "scaling"):
                found.setdefault(module.layer_idx, module)
    if not found:
        from eah_interp.models.adapters import known_families

        raise UnsupportedModelError(
            f"Found no attention modules with a layer_idx in {type(model).__name__}'s language model, so "
            "eah-interp cannot instrument it. It works with transformers models whose text decoder uses the "
            f"AttentionInterface; known families: {known_families()}. To add a model, see docs/new_model.md."
        )
    return found


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(decoder layers, attention heads, key/value heads)`` of the language model."""
    cfg = text_config(model)
    n_heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, n_heads, getattr(cfg, "num_key_value_heads", None) or n_heads


def image_token_ids(model: nn.Module) -> tuple[int, ...]:
    """Placeholder ids that mark visual positions in ``input_ids``, from the model's family adapter.

    ``(config.image_token_id,)`` for most families (``image_token_index`` in older configs); Qwen adds
    ``video_token_id``. Empty when the config has none (then pass an explicit `TokenLayout`).
    """
    from eah_interp.models.adapters import adapter_for

    return adapter_for(model).visual_token_ids(model)


def eager_function(module: nn.Module) -> Callable:
    """The model family's own ``eager_attention_forward`` for an attention module (Llama's as a fallback)."""
    return compat.family_eager_attention(module)


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
    family = eager_function(module)
    return family(module, query, key, value, mask, **kwargs)


def _plain_attention(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Softmax of scaled ``Q K^T`` + mask, nothing else: what `eah_interp.chunked` reproduces exactly."""
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks")):
        return False
    return not (module.training and kwargs.get("dropout", 0.0))


def _past_length(input_ids: Tensor | None, kwargs: dict[str, Any]) -> int:
    """Tokens already in the KV cache at a forward call (0 for a prompt forward)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # renamed `cache` in transformers 5.2x
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    mask = kwargs.get("attention_mask")
    if input_ids is not None and isinstance(mask, Tensor) and mask.ndim == 2:
        return mask.shape[1] - input_ids.shape[1]
    return 0


# ---------------------------------------------------------------------------- the shared mechanism
@dataclass
class _State:
    layout: TokenLayout | None = None
    user_layout: TokenLayout | None = None
    token_ids: tuple[int, ...] = ()
    generate_layout: TokenLayout | None = None
    step: int = -1


class _AttentionOverride:
    """Registers a per-context attention function; subclasses say which calls to intercept."""

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
        self._name: str | None = None
        self._previous_impl: Any = None
        self._previous_fn: Callable | None = None
        self._hook = None
        self._previous_generate: Any = None

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
    def wants(self, layer: int, q_len: int, k_len: int) -> bool:
        raise NotImplementedError

    def on_probs(self, layer: int, probs: Tensor, layout: TokenLayout) -> Tensor | None:
        """Return edited probabilities, or None to keep the layer's output as computed."""
        raise NotImplementedError

    def on_projections(
        self, module, layer: int, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
        layout: TokenLayout, kwargs: dict[str, Any],
    ) -> tuple[Tensor, None] | None:
        """The layer's ``(output [batch, q, heads, d], None)`` computed without a full probability map
        (`eah_interp.chunked`), or None to take the eager path through `on_probs`."""
        return None

    # context ---------------------------------------------------------
    def __enter__(self):
        previous = compat.attn_implementation(self.config)
        if previous is None:
            previous = "eager"
        if previous not in _COMPATIBLE and not str(previous).startswith("eah_interp."):
            raise AttentionImplementationError(
                f"The language model uses attn_implementation={previous!r}, which cannot expose attention "
                "probabilities. Load the model with attn_implementation='sdpa' or 'eager' "
                "(model.set_attn_implementation('sdpa')) to use eah-interp."
            )
        self._previous_impl = previous
        self._previous_fn = None if previous == "eager" else compat.attention_functions()[previous]
        with _names_lock:
            self._name = f"eah_interp.{self.kind}.{next(_names)}"
        # Layers that keep SDPA get SDPA's own mask (None for a causal prompt without padding, so SDPA
        # takes its fast causal path); the chosen layers convert it (`additive_mask`). A nested context
        # keeps the outer context's mask function.
        compat.register_attention(self._name, self._attention, compat.mask_function(previous))
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._previous_generate = vars(self.model).get("generate", _MISSING)  # an outer context's wrapper
        self.model.generate = self._generate_wrapper(self.model.generate)
        compat.set_attn_implementation_internal(self.config, self._name)
        return self

    def __exit__(self, *exc) -> None:
        compat.set_attn_implementation_internal(self.config, self._previous_impl)
        compat.unregister_attention(self._name)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._previous_generate is _MISSING:
            vars(self.model).pop("generate", None)
        elif self._previous_generate is not None:
            self.model.generate = self._previous_generate
        self._previous_generate = None

    # hooks -----------------------------------------------------------
    def _pre_forward(self, module, args, kwargs) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if _past_length(input_ids, kwargs) > 0:
            return  # a decode step: the prompt layout is extended in _layout_for
        self.state.step += 1
        if self.state.user_layout is not None:
            self.state.layout = self.state.user_layout  # fitted to each call (beams, decode) in _layout_for
        elif input_ids is not None:
            self.state.layout = self._prompt_layout(input_ids, kwargs.get("attention_mask"))
        else:  # inputs_embeds only: the layout `generate` noted from its input_ids, else none (`_layout_for` raises)
            self.state.layout = self.state.generate_layout

    def _generate_wrapper(self, generate: Callable) -> Callable:
        """``model.generate`` that notes the prompt layout first: some LVLMs (InstructBLIP) never call their
        own ``forward`` in ``generate`` but hand ``inputs_embeds`` to the language model's ``generate``."""

        @functools.wraps(generate)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
            if self.state.user_layout is None and isinstance(input_ids, Tensor) and input_ids.ndim == 2:
                self.state.generate_layout = self._prompt_layout(input_ids, kwargs.get("attention_mask"))
                self.state.layout = self.state.generate_layout
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
        fitted = layout.fit(batch, q_len, k_len)
        if fitted is not layout:  # keep the extension for the next layers of this step
            self.state.layout = fitted
        return fitted

    def _attention(self, module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        q_len, k_len = query.shape[-2], key.shape[-2]
        if not isinstance(layer, int) or getattr(module, "config", None) is not self.config or not self.wants(
            layer, q_len, k_len
        ):
            fn = self._previous_fn or eager_function(module)
            return fn(module, query, key, value, attention_mask, **kwargs)
        layout = self._layout_for(query.shape[0], q_len, k_len)
        if _plain_attention(module, kwargs):
            fast = self.on_projections(module, layer, query, key, value, attention_mask, layout, kwargs)
            if fast is not None:
                return fast
        out, probs = eager_attention(module, query, key, value, attention_mask, **kwargs)
        edited = self.on_probs(layer, probs, layout)
        if edited is None:
            return out, probs
        values = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
        out = torch.matmul(edited.to(values.dtype), values).transpose(1, 2).contiguous()
        return out, edited


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

    def wants(self, layer: int, q_len: int, k_len: int) -> bool:
        return should_edit(self.eah_config, layer, q_len, k_len)

    def on_probs(self, layer: int, probs: Tensor, layout: TokenLayout) -> Tensor | None:
        edited, record = apply_eah_to_probs(probs, layout, self.eah_config, layer)
        self.run.records.append(record)
        return edited

    def on_projections(self, module, layer, query, key, value, mask, layout, kwargs):
        if query.shape[-2] != key.shape[-2] or not is_plain_copy(self.eah_config):
            return None  # decode steps and blends / image-region / dropped-sink edits take the eager path
        scaling = kwargs.get("scaling", module.scaling)
        out, record = apply_eah_to_attention(query, key, value, mask, scaling, layout, self.eah_config, layer)
        self.run.records.append(record)
        return out, None


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

    def __enter__(self) -> Recording:  # type: ignore[override]
        super().__enter__()
        return self.recording

    def wants(self, layer: int, q_len: int, k_len: int) -> bool:
        return layer in self.recording.layers and q_len == k_len

    def on_projections(self, module, layer, query, key, value, mask, layout, kwargs):
        rec = self.recording
        if self._keep_patterns or rec.stats is None:
            return None  # kept patterns need the full map
        scaling = kwargs.get("scaling", module.scaling)
        out, sums = chunked_attention(query, key, value, mask, scaling, layout, output=True, statistics=True)
        rec.stats.update_from_stats(
            layer, head_statistics_from_sums(sums, layout, query.shape[-2], rec.stats.threshold, rec.stats.normalise)
        )
        self._note_layout(layout)
        return out, None

    def on_probs(self, layer: int, probs: Tensor, layout: TokenLayout) -> Tensor | None:
        rec = self.recording
        if rec.stats is not None:
            rec.stats.update_from_stats(
                layer, head_statistics(probs, layout, rec.stats.threshold, rec.stats.normalise)
            )
        if self._keep_patterns:
            rec.patterns.setdefault(layer, []).append(probs.detach().to("cpu"))
        self._note_layout(layout)
        return None

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
) -> HeadStats:
    """Stream head statistics of every prompt forward over an iterable of model input dicts."""
    from tqdm.auto import tqdm

    stats = HeadStats(threshold=threshold, normalise=normalise)
    with record_attention(model, layers, stats=stats), torch.no_grad():
        for inputs in tqdm(batches, desc="scanning heads", disable=not progress):
            model(**inputs)
    return stats
