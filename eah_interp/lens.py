"""TransformerLens 4.x backend: EAH and head statistics as ``blocks.{l}.attn.hook_pattern`` hooks.

`boot_bridge` wraps an HF LVLM in a `TransformerBridge`, offline. The hooks are ordinary
``(hook_name, fn)`` pairs for ``bridge.run_with_hooks(...)`` or ``with bridge.hooks(fwd_hooks=...)``;
the bridge takes the processor's outputs as they are, and the hooks derive the token layout from each
forward's ``input_ids`` unless given one (the calling convention shared with `eah_interp.hf` and
`eah_interp.nnsight`: docs/backends.md)::

    >>> bridge = eah_interp.lens.boot_bridge(hf_model)
    >>> hooks, run = eah_interp.lens.eah(bridge, EAHConfig.paper())
    >>> logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)   # input_ids, attention_mask, pixel_values
    >>> run.source_heads()

For LLaVA-family bridges (LLaVA, LLaVA-NeXT, LLaVA-OneVision) the bridge recomputes attention from
the hooked pattern, so an edited pattern changes the layer output (the tests check bridge + EAH
against `eah_interp.hf.eah` to 1e-5). Bridges that fire ``hook_pattern`` after HF has computed the
output (Qwen2.5-VL, Qwen3-VL) discard edits with a warning: use the HF or nnsight backend there.

Instead of ``pixel_values`` you may pass the language model's input embeddings (a float tensor as
``input``; then pass ``layout``): `multimodal_embeds` builds them with the HF model's own
``get_image_features`` and placeholder scatter, e.g. to patch or edit the image features themselves.
A language-model-only bridge (``boot_bridge(..., language_model_only=True)``) builds them itself from
the processor's outputs.

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
import functools
import inspect
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from eah_interp import compat
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, EditRecords, apply_eah_to_probs, should_edit
from eah_interp.errors import LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.layout import TokenLayout
from eah_interp.stats import HeadStats, head_statistics

#: A TransformerLens forward hook: ``(hook_name, fn(activation, hook) -> activation | None)``.
Hook = tuple[str, Callable[[Tensor, Any], Tensor | None]]

__all__ = [
    "Hook",
    "boot_bridge",
    "bridge_layout",
    "eah",
    "eah_hooks",
    "head_stats_hooks",
    "language_model_as_causal_lm",
    "lvlm_of",
    "multimodal_embeds",
    "pattern_hook_name",
]


def pattern_hook_name(layer: int) -> str:
    """The TransformerLens name of a layer's post-softmax attention pattern ``[batch, heads, q, k]``."""
    from eah_interp.sites import lens_hook_name

    return lens_hook_name("probs", layer)


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
        switches it to eager attention. It takes the processor's outputs as they are
        (``bridge(**inputs)``, ``bridge.run_with_hooks(**inputs, fwd_hooks=...)``,
        ``bridge.run_with_cache(**inputs)``): a language-model-only
        bridge builds the multimodal embeddings from ``input_ids`` and the image inputs itself
        (`multimodal_embeds`), and refuses ids with image placeholders but no image (it would embed
        them as text). Each forward notes its prompt layout for hooks made without ``layout``.
    """
    TransformerBridge = compat.bridge_class()
    from transformers import AutoTokenizer

    lvlm = copy_module.deepcopy(hf_model) if copy else hf_model
    model = language_model_as_causal_lm(lvlm) if language_model_only else lvlm
    bridge = _boot(TransformerBridge, AutoTokenizer, model, tokenizer, device)
    _accept_processor_outputs(bridge, lvlm, language_model_only)
    return bridge


def _boot(TransformerBridge: Any, AutoTokenizer: Any, model: Any, tokenizer: Any, device: str) -> Any:  # noqa: N803
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


class _BridgeState:
    """What `boot_bridge` keeps beside a bridge: the LVLM, and the layout of the forward running now."""

    def __init__(self, lvlm: Any, language_model_only: bool) -> None:
        self.lvlm = lvlm
        self.language_model_only = language_model_only
        self.layout: TokenLayout | None = None


def _state(bridge: Any) -> _BridgeState | None:
    return vars(bridge).get("_eah_state")


def lvlm_of(bridge: Any) -> Any:
    """The HF LVLM behind a bridge: the one `boot_bridge` wrapped (also for language-model-only bridges)."""
    state = _state(bridge)
    return state.lvlm if state is not None else bridge.original_model


def _image_input_names(lvlm: Any) -> set[str]:
    """Keyword inputs of the LVLM's ``get_image_features`` (``pixel_values``, ``image_sizes``, ...)."""
    inner = getattr(lvlm, "model", lvlm)
    method = getattr(inner, "get_image_features", None)
    if method is None:
        return {"pixel_values"}
    names = {n for n, p in inspect.signature(method).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names | {"pixel_values"}


def _accept_processor_outputs(bridge: Any, lvlm: Any, language_model_only: bool) -> None:
    """Wrap ``bridge.forward`` (this instance only): processor outputs in, the prompt layout noted."""
    from eah_interp.models.adapters import adapter_for

    state = _BridgeState(lvlm, language_model_only)
    adapter = adapter_for(lvlm)
    visual = adapter.visual_token_ids(lvlm)
    image_names = _image_input_names(lvlm) if language_model_only else set()
    original = bridge.forward

    @functools.wraps(original)
    def forward(input: Any = None, *args: Any, **kwargs: Any) -> Any:  # noqa: A002 - TransformerLens's name
        if input is None and "input_ids" in kwargs:  # bridge(**processor_outputs)
            input = kwargs.pop("input_ids")  # noqa: A001
        ids = input if isinstance(input, Tensor) and not input.is_floating_point() and input.ndim == 2 else None
        if kwargs.get("past_key_values") is None:  # a prompt, not a cached decode step
            mask = kwargs.get("attention_mask")
            state.layout = None if ids is None or not visual else TokenLayout.from_input_ids(
                ids, visual, mask if isinstance(mask, Tensor) else None, require_images=False)
        if language_model_only:
            image = {name: kwargs.pop(name) for name in list(kwargs) if name in image_names}
            image = {name: value for name, value in image.items() if value is not None}
            if image and ids is None:
                raise LayoutError(
                    f"This bridge wraps only the language model and got image inputs ({', '.join(image)}) with "
                    "embeddings instead of input_ids: pass the processor's outputs as they are "
                    "(bridge(**inputs)), or the embeddings alone (from eah_interp.lens.multimodal_embeds)."
                )
            if image:
                extra = {k: v for k, v in image.items() if k != "pixel_values"}
                input = multimodal_embeds(lvlm, ids, image.get("pixel_values"), **extra)  # noqa: A001
            elif ids is not None and visual and bool(torch.isin(ids, torch.tensor(visual, device=ids.device)).any()):
                raise LayoutError(
                    f"These input_ids hold image placeholders (ids {list(visual)}) but no pixel_values came with "
                    "them: this bridge wraps only the language model and would embed the placeholders as text. "
                    "Pass the processor's outputs as they are (bridge(**inputs), or bridge(input_ids, "
                    "attention_mask=..., pixel_values=...)), or multimodal_embeds(model, input_ids, pixel_values) "
                    "as the input."
                )
        return original(input, *args, **kwargs)

    vars(bridge)["forward"] = forward  # instance attributes: nn.Module.__call__ and run_with_hooks use them
    for name in ("run_with_hooks", "run_with_cache"):  # their first parameter is `input`: take input_ids too
        vars(bridge)[name] = _ids_as_input(getattr(bridge, name))
    vars(bridge)["_eah_state"] = state


def _ids_as_input(method: Callable) -> Callable:
    """``method(**inputs)`` with the processor's ``input_ids`` passed as the bridge's first argument."""

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not args and "input" not in kwargs and "input_ids" in kwargs:
            args = (kwargs.pop("input_ids"),)
        return method(*args, **kwargs)

    return wrapped


def bridge_layout(bridge: Any, layout: TokenLayout | None = None) -> TokenLayout:
    """``layout``, or the layout of the prompt the bridge is running now (noted by `boot_bridge`'s forward).

    Derived as `eah_interp.hf` derives it: positions of ``input_ids`` holding the family's image token ids
    (`eah_interp.models.adapter_for`), padding from ``attention_mask``.

    Raises:
        LayoutError: the bridge was not booted by `boot_bridge`, or this forward got embeddings, not ids.
    """
    if layout is not None:
        return layout
    state = _state(bridge)
    if state is None or state.layout is None:
        raise LayoutError(
            "No token layout: pass layout=TokenLayout.from_input_ids(input_ids, image_token_id, attention_mask). "
            "It is derived only for bridges from eah_interp.lens.boot_bridge run on input_ids (with the image "
            "inputs), not on embeddings."
        )
    return state.layout


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


def eah(
    bridge: Any, config: EAHConfig, layout: TokenLayout | None = None
) -> tuple[list[Hook], EditRecords]:
    """EAH as hooks plus the records they fill: ``hooks, run = eah(bridge, config)``.

    ``run`` is `EditRecords` (``run.records``, ``run.config``, ``run.source_heads()``), as ``hf.eah``
    yields and ``eah_interp.nnsight.apply_eah`` returns; it fills when the hooks run.

    Example:
        >>> hooks, run = eah_interp.lens.eah(bridge, EAHConfig.paper())
        >>> logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        >>> run.source_heads()
    """
    run = EditRecords(config)
    return eah_hooks(bridge, config, layout, run), run


def eah_hooks(
    bridge: Any, config: EAHConfig, layout: TokenLayout | None = None, records: list[EditRecord] | None = None
) -> list[Hook]:
    """Hooks applying EAH at ``blocks.{l}.attn.hook_pattern`` for each layer of ``config``.

    Each hook calls `apply_eah_to_probs` on the pattern when `should_edit` says so (prefill; decode
    steps too with ``config.apply_to_decode``) and returns the edited pattern.

    Args:
        bridge: the `TransformerBridge` (its layer and head counts are checked).
        config: the edit.
        layout: the layout of the prompt the hooks will see (extended for decode steps); default: the
            layout of each forward's ``input_ids`` (`bridge_layout`; bridges from `boot_bridge`).
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
            edited, record = apply_eah_to_probs(pattern, bridge_layout(bridge, layout).fit(b, q, k), config, layer)
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
        layout: the layout of the prompt the hooks will see; default: each forward's (`bridge_layout`).
        layers: blocks to read (default: all).
    """
    if isinstance(bridge, HeadStats):  # head_stats_hooks(stats, layout, layers)
        bridge, stats, layout, layers = None, bridge, stats, layout  # type: ignore[assignment]
        if layout is None or layers is None:
            raise TypeError("head_stats_hooks(stats, layout, layers) without a bridge needs a layout and the layers.")
    if layers is None:
        layers = range(compat.bridge_shape(bridge)[0])
    chosen = _check_layers(bridge, layers) if bridge is not None else sorted({int(x) for x in layers})

    def make(layer: int):
        def hook(pattern: Float[Tensor, "batch heads q k"], hook: Any) -> None:
            b, _, q, k = pattern.shape
            if q != k:
                return None
            fitted = bridge_layout(bridge, layout)
            if fitted.batch_size != b or fitted.seq_len != k:
                raise LayoutError(
                    f"The layout ({fitted.batch_size} x {fitted.seq_len}) does not fit the pattern of "
                    f"{hook.name if hasattr(hook, 'name') else pattern_hook_name(layer)} ({b} x {k})."
                )
            with torch.no_grad():
                values = head_statistics(pattern.detach(), fitted, stats.threshold, stats.normalise)  # type: ignore[arg-type]
            stats.update_from_stats(layer, values)
            return None

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in chosen]
