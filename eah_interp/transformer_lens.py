"""TransformerLens 4.x backend: interventions and attention recording as bridge hooks.

`boot_bridge` wraps an HF LVLM in a `TransformerBridge`, offline. The verbs are those of `eah_interp.hf`
and `eah_interp.nnsight`, returning ordinary ``(hook_name, fn)`` pairs for ``bridge.run_with_hooks(...)``
or ``with bridge.hooks(fwd_hooks=...)`` beside the usual result: `intervene` (any list of
`eah_interp.interventions`, each edit point reached by its hook: `LENS_POINTS`; `eah` is
``intervene(bridge, [config])``) and `record_attention`. The bridge takes the processor's outputs as they
are, and the hooks derive the token layout from each forward's ``input_ids`` unless given one (the
calling convention shared with `eah_interp.hf` and `eah_interp.nnsight`: docs/backends.md)::

    >>> bridge = eah_interp.transformer_lens.boot_bridge(hf_model)
    >>> hooks, run = eah_interp.transformer_lens.intervene(bridge, [EAH.paper(), PAI()])
    >>> logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)   # input_ids, attention_mask, pixel_values
    >>> run.source_heads()

For LLaVA-family bridges (LLaVA, LLaVA-NeXT, LLaVA-OneVision) the bridge recomputes attention from
the hooked scores and pattern, so an edit changes the layer output (the tests check the bridge against
`eah_interp.hf.intervene` to 1e-5). Bridges that fire the attention hooks after HF has computed the
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
from eah_interp.errors import LayoutError, UnsupportedModelError
from eah_interp.head_stats import HeadStats, Recording
from eah_interp.interventions.base import Intervention, InterventionRun
from eah_interp.interventions.compile import Plan
from eah_interp.interventions.eah import EAH
from eah_interp.interventions.selectors import chosen_layers
from eah_interp.layout import TokenLayout
from eah_interp.models.adapters import token_layout
from eah_interp.sites import lens_hook_name

#: A TransformerLens forward hook: ``(hook_name, fn(activation, hook) -> activation | None)``.
Hook = tuple[str, Callable[[Tensor, Any], Tensor | None]]

__all__ = [
    "LENS_POINTS",
    "Hook",
    "boot_bridge",
    "bridge_layout",
    "eah",
    "intervene",
    "language_model_as_causal_lm",
    "lvlm_of",
    "multimodal_embeds",
    "pattern_hook_name",
    "record_attention",
]


def pattern_hook_name(layer: int) -> str:
    """The TransformerLens name of a layer's post-softmax attention pattern ``[batch, heads, q, k]``."""
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
            state.layout = None if ids is None or not visual else token_layout(
                lvlm, ids, mask if isinstance(mask, Tensor) else None, require_images=False)
        if language_model_only:
            image = {name: kwargs.pop(name) for name in list(kwargs) if name in image_names}
            image = {name: value for name, value in image.items() if value is not None}
            if image and ids is None:
                raise LayoutError(
                    f"This bridge wraps only the language model and got image inputs ({', '.join(image)}) with "
                    "embeddings instead of input_ids: pass the processor's outputs as they are "
                    "(bridge(**inputs)), or the embeddings alone (from eah_interp.transformer_lens.multimodal_embeds)."
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
            "It is derived only for bridges from eah_interp.transformer_lens.boot_bridge run on input_ids (with the image "
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
#: The edit points a bridge reaches, by the `eah_interp.sites.LENS_HOOKS` entry that exposes them (checked on
#: TransformerLens 4.3 LLaVA bridges: each fires and an edit changes the output). The others are refused:
#: ``scores_premask`` (the bridge exposes scores only after the mask: ``hook_attn_scores``) and ``values``
#: (``hook_v`` edits the values before they enter the KV cache and for every query row).
LENS_POINTS = {
    "scores": "scores",
    "probs": "probs",
    "output": "head",
    "residual_input": "residual_input",
    "residual_output": "residual_output",
}


def _check_hooks(bridge: Any, names: Iterable[str]) -> None:
    hook_names = set(compat.bridge_hook_names(bridge))
    missing = [name for name in names if name not in hook_names]
    if missing:
        kind = missing[0].rsplit(".", 1)[-1]
        raise UnsupportedModelError(
            f"The bridge has no hook {missing[0]!r}; {kind} hooks available: "
            f"{[n for n in sorted(hook_names) if n.endswith(kind)][:8]} ..."
        )


def intervene(
    bridge: Any, interventions: Intervention | Iterable[Intervention], layout: TokenLayout | None = None
) -> tuple[list[Hook], InterventionRun]:
    """Interventions as bridge hooks plus the run they fill: ``hooks, run = intervene(bridge, [EAH.paper(), PAI()])``.

    The list is compiled as in `eah_interp.hf.intervene` (`eah_interp.interventions.compile.Plan`), and each
    edit point is reached by its hook (`LENS_POINTS`): scores after the mask at ``attn.hook_attn_scores``,
    probabilities at ``attn.hook_pattern``, per-head outputs (before ``o_proj``) at ``attn.hook_z``, a
    layer's input / output at ``hook_resid_pre`` / ``hook_resid_post`` (interventions that read hidden
    states, VAR, read ``hook_resid_pre``). At one point the interventions edit in list order. Pre-mask score
    edits (VAF) and value edits (`ValueEdit`) are refused with `UnsupportedModelError`: use the HF or nnsight
    backend. LLaVA-family bridges recompute attention from these hooks (tests check them against
    `eah_interp.hf.intervene`); bridges that fire them after HF computed the output (Qwen2.5-VL, Qwen3-VL)
    discard the edits with TransformerLens's warning.

    Args:
        bridge: the `TransformerBridge` (sizes checked against it).
        interventions: `eah_interp.interventions` objects (one or a list; empty: no hooks).
        layout: the layout of the prompt the hooks will see (extended for decode steps); default: the
            layout of each forward's ``input_ids`` (`bridge_layout`; bridges from `boot_bridge`).

    Returns:
        ``(hooks, run)``: ``[(hook_name, fn), ...]`` for ``run_with_hooks(fwd_hooks=...)`` / ``bridge.hooks(...)``,
        and the `InterventionRun` the hooks fill (``run.records``, ``run.source_heads()``, ``run.summary()``).

    Example:
        >>> hooks, run = eah_interp.transformer_lens.intervene(bridge, [EAH.paper()])
        >>> logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        >>> run.source_heads()
    """
    n_layers, n_heads, n_kv_heads, hidden_size = compat.bridge_shape(bridge)
    plan = Plan(interventions, n_layers, n_heads, n_kv_heads, hidden_size)
    plan.warn_for(lvlm_of(bridge))  # the family's warnings, as hf and nnsight give them
    refused = [(type(item).__name__, item.point) for item in plan.items if item.point not in LENS_POINTS]
    if refused:
        name, point = refused[0]
        raise UnsupportedModelError(
            f"{name} edits at {point!r}, which a TransformerLens bridge does not expose (it reaches "
            f"{sorted(LENS_POINTS)}). Use eah_interp.hf.intervene or eah_interp.nnsight.intervene."
        )
    k_len: dict[int, int] = {}  # per layer: keys of the current call (read at the pattern, used at hook_z)

    def fit(batch: int, q: int, k: int) -> TokenLayout:
        return bridge_layout(bridge, layout).fit(batch, q, k)

    def attention_hook(point: str, layer: int) -> Callable:
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            if point == "output":  # [batch, q, heads, d]
                q, k = tensor.shape[1], k_len.get(layer, tensor.shape[1])
            else:  # [batch, heads, q, k]
                q, k = tensor.shape[-2:]
                k_len[layer] = k
            return plan.edit_at(point, layer, tensor, fit, q, k, bridge_layout(bridge, layout).seq_len)

        return hook

    def residual_hook(point: str, layer: int) -> Callable:
        def hook(hidden: Tensor, hook: Any) -> Tensor:
            prompt = bridge_layout(bridge, layout)
            if hidden.shape[1] != prompt.seq_len:
                raise UnsupportedModelError(
                    f"Layer {layer}: residual edits and hidden-state reads reach a bridge on prompt forwards only "
                    "(this forward is a decode step); use eah_interp.hf.intervene for generation."
                )
            total = hidden.shape[1]
            edited = plan.edit_residual(layer, point, hidden, fit, total, prompt.seq_len)
            hidden = hidden if edited is None else edited
            if point == "residual_input":
                plan.note_hidden(layer, hidden)
            return hidden

        return hook

    points_at: dict[int, set[str]] = {}
    for item in plan.items:
        for layer in item.layers_for(n_layers):
            points_at.setdefault(layer, set()).add(item.point)
    for layer in plan.hidden_layers:
        points_at.setdefault(layer, set()).add("residual_input")
    hooks: list[Hook] = []
    for layer in sorted(points_at):
        points = points_at[layer]
        if "output" in points:
            points.add("probs")  # the pattern hook notes the call's key count for hook_z
        for point in ("residual_input", "scores", "probs", "output", "residual_output"):  # the forward's order
            if point in points:
                make = residual_hook if point.startswith("residual") else attention_hook
                hooks.append((lens_hook_name(LENS_POINTS[point], layer), make(point, layer)))
    _check_hooks(bridge, [name for name, _ in hooks])
    return hooks, plan.run


def eah(bridge: Any, config: EAH, layout: TokenLayout | None = None) -> tuple[list[Hook], InterventionRun]:
    """One EAH edit as hooks: ``intervene(bridge, [config], layout)``."""
    return intervene(bridge, [config], layout)


def record_attention(
    bridge: Any,
    layers: str | Iterable[int] = "all",
    *,
    stats: HeadStats | None = None,
    keep_patterns: bool = False,
    layout: TokenLayout | None = None,
) -> tuple[list[Hook], Recording]:
    """Hooks recording prompt statistics (into ``stats``) and/or patterns: ``hooks, rec = record_attention(bridge)``.

    The verb, arguments and result of `eah_interp.hf.record_attention`, as hooks at
    ``blocks.{l}.attn.hook_pattern`` (and ``hook_resid_pre`` for a `HeadStats` with ``sink_dims``). Decode
    steps (``q != k``) are skipped. The hooks return nothing, so the forward is unchanged.

    Args:
        bridge: the `TransformerBridge` (layer indices are checked against it).
        layers: ``"all"`` or block indices.
        stats: a `HeadStats` to feed (its ``threshold`` / ``normalise``).
        keep_patterns: keep each prompt's probabilities (on CPU) per layer.
        layout: the layout of the prompt the hooks will see; default: each forward's (`bridge_layout`).
    """
    recording = Recording(chosen_layers(layers, compat.bridge_shape(bridge)[0]), stats, keep_patterns)
    hidden: dict[int, Tensor] = {}

    def note(layer: int) -> Callable:
        def hook(resid: Tensor, hook: Any) -> None:
            hidden[layer] = resid.detach()

        return hook

    def record(layer: int) -> Callable:
        def hook(pattern: Float[Tensor, "batch heads q k"], hook: Any) -> None:
            b, _, q, k = pattern.shape
            if q != k:
                return None
            fitted = bridge_layout(bridge, layout).fit(b, q, k)  # as every backend fits it (LayoutError if it cannot)
            with torch.no_grad():
                recording.add(layer, pattern, fitted, hidden=hidden.pop(layer, None))
            return None

        return hook

    hooks: list[Hook] = []
    for layer in sorted(recording.layers):
        if stats is not None and stats.sink_dims:
            hooks.append((lens_hook_name("residual_input", layer), note(layer)))
        hooks.append((pattern_hook_name(layer), record(layer)))
    _check_hooks(bridge, [name for name, _ in hooks])
    return hooks, recording
