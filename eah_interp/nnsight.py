"""nnsight backend: sinks, head statistics and EAH as interventions inside ``model.trace`` / ``model.generate``.

The probabilities of a layer are not a value of HF's SDPA path, so the layers you want to read or edit
are *exposed* first (`expose`): they run the family's eager attention and pass the probabilities through
an identity module ``self_attn.attn_probs`` whose output nnsight can read and assign; the layer then
recomputes ``P @ V`` from what you assigned. Every other layer keeps SDPA. Inside the trace, the
building blocks are ordinary nnsight reads and writes, so they stack with anything else you do in the
same trace (ablate a head, patch a residual, save a value).

Example:
    >>> from nnsight import NNsight
    >>> nn_model = NNsight(hf_model)
    >>> layout = TokenLayout.from_input_ids(inputs["input_ids"], hf_model.config.image_token_id, inputs["attention_mask"])
    >>> with eah_interp.nnsight.expose(nn_model, layers=[1]):
    ...     with nn_model.trace(**inputs):
    ...         records = eah_interp.nnsight.apply_eah(nn_model, EAHConfig.paper(), layout)
    ...         logits = nn_model.output.logits.save()
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from eah_interp import hf
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, apply_eah_to_probs, should_edit
from eah_interp.errors import UnsupportedModelError
from eah_interp.layout import TokenLayout
from eah_interp.stats import HeadStats, head_statistics


def _hf_model(nn_model: Any):
    """The wrapped torch module of an nnsight model (or the module itself)."""
    inner = getattr(nn_model, "_module", None)
    if inner is None:
        inner = getattr(nn_model, "_model", None)
    return inner if inner is not None else nn_model


def expose(nn_model: Any, layers: Iterable[int], *, decode: bool = True) -> hf.expose_attention_probs:
    """Context manager exposing the probabilities of ``layers`` as ``self_attn.attn_probs`` (see module doc)."""
    return hf.expose_attention_probs(_hf_model(nn_model), layers, decode=decode)


def _site(nn_model: Any, layer: int):
    """The envoy of layer ``layer``'s ``attn_probs`` module."""
    model = _hf_model(nn_model)
    modules = hf.attention_modules(model)
    if layer not in modules:
        raise UnsupportedModelError(f"Layer {layer} has no attention module; layers: {sorted(modules)}.")
    target = modules[layer]
    if not hasattr(target, "attn_probs"):
        raise RuntimeError(
            f"Layer {layer} is not exposed: wrap the trace in `with eah_interp.nnsight.expose(nn_model, layers=[{layer}]):`."
        )
    name = next(n for n, m in model.named_modules() if m is target)
    envoy = nn_model
    for part in name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy.attn_probs


def attention_probs(nn_model: Any, layer: int) -> Tensor:
    """Inside a trace: the post-softmax probabilities ``[batch, heads, q, k]`` of an exposed layer."""
    return _site(nn_model, layer).output


def set_attention_probs(nn_model: Any, layer: int, probs: Tensor) -> None:
    """Inside a trace: replace the probabilities of an exposed layer (the layer recomputes ``P @ V``)."""
    _site(nn_model, layer).output = probs


def apply_eah(nn_model: Any, config: EAHConfig, layout: TokenLayout) -> list[EditRecord]:
    """Inside a trace: apply EAH to every layer of ``config`` (the prompt forward), in layer order.

    Each layer's probabilities are read, edited with `apply_eah_to_probs` and written back. Other
    interventions in the same trace must address modules in forward order around these layers; to
    interleave, call `apply_eah_layer` per layer at the right point.

    Returns:
        One `EditRecord` per edited layer (filled in as the trace runs).
    """
    n_layers, n_heads, _ = hf.model_shape(_hf_model(nn_model))
    config.validate_for(n_layers, n_heads)
    records: list[EditRecord] = []
    for layer in sorted(config.layers):
        record = apply_eah_layer(nn_model, config, layout, layer)
        if record is not None:
            records.append(record)
    return records


def apply_eah_layer(nn_model: Any, config: EAHConfig, layout: TokenLayout, layer: int) -> EditRecord | None:
    """Inside a trace: apply EAH to one exposed layer; returns its `EditRecord` (None if not edited)."""
    site = _site(nn_model, layer)
    probs = site.output
    if not should_edit(config, layer, probs.shape[-2], probs.shape[-1]):
        return None
    edited, record = apply_eah_to_probs(probs, layout, config, layer)
    site.output = edited
    return record


def feed_head_stats(nn_model: Any, stats: HeadStats, layout: TokenLayout, layers: Iterable[int]) -> None:
    """Inside a trace: add the prompt statistics of exposed ``layers`` to ``stats`` (no maps are kept)."""
    for layer in sorted(layers):
        probs = _site(nn_model, layer).output
        stats.update_from_stats(layer, head_statistics(probs, layout, stats.threshold, stats.normalise))
