"""TransformerLens 4.x backend: EAH and head statistics as ``blocks.{l}.attn.hook_pattern`` hooks.

`boot_bridge` wraps an HF LVLM in a `TransformerBridge`, offline. The hooks are ordinary
``(hook_name, fn)`` pairs for ``bridge.run_with_hooks(...)`` or ``with bridge.hooks(fwd_hooks=...)``;
the bridge takes the multimodal inputs itself::

    >>> bridge = eah_interp.lens.boot_bridge(hf_model)
    >>> layout = TokenLayout.from_input_ids(inputs["input_ids"], image_token_id, inputs["attention_mask"])
    >>> logits = bridge.run_with_hooks(
    ...     inputs["input_ids"], fwd_hooks=eah_interp.lens.eah_hooks(bridge, EAHConfig.paper(), layout),
    ...     attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])

For LLaVA-family bridges (LLaVA, LLaVA-NeXT, LLaVA-OneVision) the bridge recomputes attention from
the hooked pattern, so an edited pattern changes the layer output (the tests check bridge + EAH
against `eah_interp.hf.eah` to 1e-5). Bridges that fire ``hook_pattern`` after HF has computed the
output (Qwen2.5-VL, Qwen3-VL) discard edits with a warning: use the HF or nnsight backend there.

Instead of ``pixel_values`` you may pass the language model's input embeddings (a float tensor as
``input``): `multimodal_embeds` builds them with the HF model's own ``get_image_features`` and
placeholder scatter, e.g. to patch or edit the image features themselves.

Traps of TransformerLens 4.3 that `boot_bridge` handles:

* booting a multimodal model tries to load a processor and, when that fails without torchvision,
  runs ``pip install torchvision`` on the fly (which can replace a CPU torch with a CUDA build):
  `boot_bridge` disables that step; pass ``pixel_values`` (or embeddings) yourself;
* the bridge wants a model folder and a tokenizer: `boot_bridge` saves the config (and tokenizer, or
  a placeholder word-level one) to a temporary folder and boots from it with ``hf_model=...``.

The bridge **replaces the HF model's modules in place** (``LlamaDecoderLayer`` becomes a
``BlockBridge``) and switches the whole model to eager attention, so the HF backends no longer
recognise it: boot a model you no longer need in its HF form, or pass ``copy=True``.
"""

from __future__ import annotations

import copy as copy_module
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eah_interp import compat
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, apply_eah_to_probs, should_edit
from eah_interp.errors import LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.layout import TokenLayout
from eah_interp.stats import HeadStats, head_statistics

#: A TransformerLens forward hook: ``(hook_name, fn(activation, hook) -> activation | None)``.
Hook = tuple[str, Callable[[Tensor, Any], Tensor | None]]

__all__ = [
    "Hook",
    "boot_bridge",
    "eah_hooks",
    "head_stats_hooks",
    "language_model_as_causal_lm",
    "multimodal_embeds",
    "pattern_hook_name",
]


def pattern_hook_name(layer: int) -> str:
    """The TransformerLens name of a layer's post-softmax attention pattern ``[batch, heads, q, k]``."""
    return compat.lens_hook_name("pattern", layer)


# ---------------------------------------------------------------------------- booting
def _placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer ``t0 .. t{n-1}`` for models shipped without one (e.g. tiny random ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")


def language_model_as_causal_lm(hf_model: Any) -> Any:
    """The LVLM's language model and ``lm_head`` as a plain ``*ForCausalLM``, sharing (not copying) weights.

    For LVLMs without a TransformerLens adapter (e.g. the bundled organism, Qwen2-VL, InstructBLIP) the
    bridge can wrap the language model; feed it `multimodal_embeds` as ``inputs_embeds``.

    Args:
        hf_model: an HF LVLM; its decoder and head are found by its family adapter
            (`eah_interp.models.adapter_for`).

    Returns:
        A causal LM (the class `AutoModelForCausalLM` maps the text config to) whose decoder and head are
        the LVLM's own modules.
    """
    from eah_interp.models.adapters import adapter_for

    adapter = adapter_for(hf_model)
    decoder, head = adapter.decoder(hf_model), adapter.head(hf_model)
    text_config = hf_model.config.get_text_config(decoder=True)
    lm_class = compat.causal_lm_class(text_config)
    if lm_class is None:
        raise UnsupportedModelError(f"No causal-LM class for {type(text_config).__name__} in transformers' auto mapping.")
    with torch.device("meta"):  # no weights allocated: both children are replaced below
        lm = lm_class(text_config)
    lm.model = decoder
    lm.lm_head = head
    lm.config.architectures = [type(lm).__name__]
    return lm.eval()


def boot_bridge(
    hf_model: Any, tokenizer: Any = None, *, device: str = "cpu", copy: bool = False, language_model_only: bool = False
):
    """Wrap an HF LVLM (or LM) in a TransformerLens `TransformerBridge`, offline.

    Args:
        hf_model: a loaded HF model whose architecture has a bridge adapter (LLaVA, LLaVA-NeXT,
            LLaVA-OneVision, Gemma 3, Qwen2.5-VL, ...; or a plain causal LM such as Llama).
        tokenizer: its tokenizer (default: a placeholder word-level tokenizer over the vocabulary; the
            bridge then only takes token ids / embeddings, which is all the EAH hooks need).
        device: the bridge's device (``"cpu"``, ``"cuda"``); a model already placed with
            ``device_map`` keeps its placement.
        copy: boot a deep copy and leave ``hf_model`` untouched (doubles the memory).
        language_model_only: wrap only the language model (`language_model_as_causal_lm`); run it with
            ``bridge(multimodal_embeds(hf_model, input_ids, pixel_values), attention_mask=...)``. Needed
            for LVLMs without a bridge adapter.

    Returns:
        The `TransformerBridge`. Unless ``copy``, it shares and rewires ``hf_model``'s modules and
        switches it to eager attention.
    """
    TransformerBridge = compat.bridge_class()
    from transformers import AutoTokenizer

    model = copy_module.deepcopy(hf_model) if copy else hf_model
    if language_model_only:
        model = language_model_as_causal_lm(model)
    config = model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        tok = tokenizer if tokenizer is not None else _placeholder_tokenizer(config.get_text_config().vocab_size)
        tok.save_pretrained(folder)
        with compat.no_runtime_installs():
            try:
                return TransformerBridge.boot_transformers(
                    folder, hf_model=model, tokenizer=AutoTokenizer.from_pretrained(folder), device=device
                )
            except ValueError as error:
                if not compat.is_missing_bridge_adapter(error):
                    raise
                raise UnsupportedModelError(
                    f"TransformerLens has no bridge adapter for {config.architectures}. Wrap the language model "
                    "instead: boot_bridge(model, language_model_only=True), then pass "
                    "multimodal_embeds(model, input_ids, pixel_values) as the bridge input."
                ) from error


def multimodal_embeds(
    hf_model: Any, input_ids: Int[Tensor, "batch seq"], pixel_values: Tensor, **image_kwargs: Any
) -> Float[Tensor, "batch seq d_model"]:
    """The language model's input embeddings with the image features scattered in (LLaVA style).

    Uses the HF model's own ``get_input_embeddings``, ``get_image_features`` and
    ``get_placeholder_mask`` + ``masked_scatter``, as its ``forward`` does. Pass the result as the
    bridge's ``input`` (a float tensor is taken as ``inputs_embeds``), together with ``attention_mask``.

    Args:
        hf_model: the HF LVLM, or ``bridge.original_model``.
        input_ids: ``[batch, seq]`` ids with the image placeholders expanded.
        pixel_values: the processor's pixel values.
        **image_kwargs: extra arguments of ``get_image_features`` (e.g. ``image_sizes``).

    Returns:
        ``[batch, seq, d_model]`` embeddings.
    """
    inner = getattr(hf_model, "model", hf_model)
    if not hasattr(inner, "get_image_features") or not hasattr(inner, "get_placeholder_mask"):
        raise UnsupportedModelError(
            f"{type(hf_model).__name__} has no get_image_features / get_placeholder_mask (LLaVA-style LVLMs do); "
            "pass pixel_values to the bridge instead."
        )
    embeds = hf_model.get_input_embeddings()(input_ids)
    out = inner.get_image_features(pixel_values=pixel_values, **image_kwargs)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features), dim=0)
    features = features.to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(compat.placeholder_mask(inner, input_ids, embeds, features), features)


# ---------------------------------------------------------------------------- hooks
def _check_layers(bridge: Any, layers: Iterable[int]) -> list[int]:
    n_layers, _ = compat.bridge_shape(bridge)
    chosen = sorted({int(x) for x in layers})
    bad = [x for x in chosen if not 0 <= x < n_layers]
    if bad:
        raise LayerIndexError(f"Layers {bad} out of range: the bridge has {n_layers} blocks.")
    hook_names = compat.bridge_hook_names(bridge)
    missing = [pattern_hook_name(x) for x in chosen if pattern_hook_name(x) not in hook_names]
    if missing:
        raise UnsupportedModelError(
            f"The bridge has no hook {missing[0]!r}; pattern hooks available: "
            f"{[n for n in hook_names if n.endswith('attn.hook_pattern')][:8]} ..."
        )
    return chosen


def eah_hooks(
    bridge: Any, config: EAHConfig, layout: TokenLayout, records: list[EditRecord] | None = None
) -> list[Hook]:
    """Hooks applying EAH at ``blocks.{l}.attn.hook_pattern`` for each layer of ``config``.

    Each hook calls `apply_eah_to_probs` on the pattern when `should_edit` says so (prefill; decode
    steps too with ``config.apply_to_decode``) and returns the edited pattern.

    Args:
        bridge: the `TransformerBridge` (its layer and head counts are checked).
        config: the edit.
        layout: the layout of the prompt the hooks will see (extended for decode steps).
        records: optional list receiving one `EditRecord` per edited call.

    Returns:
        ``[(hook_name, fn), ...]`` for ``run_with_hooks(fwd_hooks=...)`` / ``bridge.hooks(...)``.
    """
    if not isinstance(config, EAHConfig):
        raise TypeError(f"config must be an EAHConfig; got {type(config).__name__}.")
    config.validate_for(*compat.bridge_shape(bridge))
    _check_layers(bridge, config.layers)

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch heads q k"], hook: Any) -> Tensor:
            b, _, q, k = pattern.shape
            if not should_edit(config, layer, q, k):
                return pattern
            edited, record = apply_eah_to_probs(pattern, layout.fit(b, q, k), config, layer)
            if records is not None:
                records.append(record)
            return edited

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in sorted(config.layers)]


def head_stats_hooks(
    bridge: Any, stats: HeadStats, layout: TokenLayout | None = None, layers: Iterable[int] | None = None
) -> list[Hook]:
    """Hooks feeding `HeadStats` from each layer's prompt pattern, without caching any pattern.

    Decode steps (``q != k``) are skipped. The hooks return nothing, so the forward is unchanged.
    The earlier form ``head_stats_hooks(stats, layout, layers)`` (no bridge, no index check) is accepted.

    Args:
        bridge: the `TransformerBridge` (layer indices are checked against it).
        stats: the accumulator (its ``threshold`` / ``normalise`` are used).
        layout: the layout of the prompt the hooks will see.
        layers: blocks to read.
    """
    if isinstance(bridge, HeadStats):  # head_stats_hooks(stats, layout, layers)
        bridge, stats, layout, layers = None, bridge, stats, layout  # type: ignore[assignment]
    if layout is None or layers is None:
        raise TypeError("head_stats_hooks needs a layout and the layers to read.")
    chosen = _check_layers(bridge, layers) if bridge is not None else sorted({int(x) for x in layers})

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch heads q k"], hook: Any) -> None:
            b, _, q, k = pattern.shape
            if q != k:
                return None
            if layout.batch_size != b or layout.seq_len != k:
                raise LayoutError(
                    f"The layout ({layout.batch_size} x {layout.seq_len}) does not fit the pattern of "
                    f"{hook.name if hasattr(hook, 'name') else pattern_hook_name(layer)} ({b} x {k})."
                )
            with torch.no_grad():
                values = head_statistics(pattern.detach(), layout, stats.threshold, stats.normalise)  # type: ignore[arg-type]
            stats.update_from_stats(layer, values)
            return None

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in chosen]
