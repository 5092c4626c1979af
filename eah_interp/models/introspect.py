"""What eah-interp reads off an HF model: its text config, attention modules, decoder layers, shape and
execution device.

These are the lowest floor of ``eah_interp.models``: the family adapters, the loaders and every
backend (`eah_interp.hf`, `eah_interp.nnsight`, ...) use them; they import nothing from a backend.
"""

from __future__ import annotations

import torch
from torch import nn

from eah_interp.errors import UnsupportedModelError


def text_config(model: nn.Module):
    """The language model's config (the text sub-config of an LVLM, the config itself of an LM).

    Raises:
        UnsupportedModelError: ``model`` is not an HF ``PreTrainedModel`` (no ``.config``).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not an HF PreTrainedModel (no .config); eah-interp needs one."
        )
    return config.get_text_config(decoder=True)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The language model's attention modules by ``layer_idx`` (those whose config is the text config).

    Raises:
        UnsupportedModelError: no such module (the text decoder does not use transformers' attention
            interface); the message lists the known families.
    """
    cfg = text_config(model)
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if getattr(module, "config", None) is cfg and isinstance(getattr(module, "layer_idx", None), int):
            if hasattr(module, "num_key_value_groups") or hasattr(module, "scaling"):
                found.setdefault(module.layer_idx, module)
    if not found:
        from eah_interp.models.adapters import known_families  # same floor: the adapters' registry

        raise UnsupportedModelError(
            f"Found no attention modules with a layer_idx in {type(model).__name__}'s language model, so "
            "eah-interp cannot instrument it. It works with transformers models whose text decoder uses the "
            f"AttentionInterface; known families: {known_families()}. To add a model, see docs/new_model.md."
        )
    return found


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The language model's decoder layers by index: the modules whose ``self_attn`` is a layer's attention."""
    attention = {id(module): layer for layer, module in attention_modules(model).items()}
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer = attention.get(id(getattr(module, "self_attn", None)))
        if layer is not None:
            found.setdefault(layer, module)
    if len(found) != len(attention):
        raise UnsupportedModelError(
            f"Found decoder layers (modules with .self_attn) for layers {sorted(found)} of {sorted(attention)} in "
            f"{type(model).__name__}; reading or editing a decoder layer's hidden states needs every one."
        )
    return found


def model_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(decoder layers, attention heads, key/value heads)`` of the language model."""
    cfg = text_config(model)
    n_heads = cfg.num_attention_heads
    return cfg.num_hidden_layers, n_heads, getattr(cfg, "num_key_value_heads", None) or n_heads


def _as_device(value) -> torch.device:
    return torch.device(f"cuda:{value}") if isinstance(value, int) else torch.device(value)


def execution_device(model: nn.Module) -> torch.device:
    """Where the model's inputs must go: the device its input embeddings *run* on.

    The weight's own device is not the answer under accelerate: a module offloaded to the CPU or to
    disk (``device_map="auto"`` with ``max_memory``, or ``"disk"`` entries with ``offload_folder``) keeps
    its weights on the ``meta`` device and an ``AlignDevicesHook`` moves them, and the inputs, to the
    hook's ``execution_device`` at call time. The rules, first match wins:

    1. the ``execution_device`` of an accelerate hook on the input embeddings or on one of the modules
       above them (the module that ``device_map`` placed);
    2. ``model.hf_device_map``: the first entry that is a device rather than ``"cpu"`` / ``"disk"``
       (accelerate's main device), else the CPU;
    3. the device of the first parameter that is not on ``meta`` (a model moved with ``.to``);
    4. the CPU.

    Args:
        model: an HF model (any ``nn.Module`` with ``get_input_embeddings`` for rule 1).

    Returns:
        A ``torch.device`` (never ``meta``).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        owners = [(name, module) for name, module in model.named_modules() if module is embeddings]
        path = owners[0][0].split(".") if owners else []
        chain = [model.get_submodule(".".join(path[:i])) for i in range(len(path), -1, -1)]
        for module in chain:  # deepest first: the embeddings, then their parents, then the model
            device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if device is not None and _as_device(device).type != "meta":
                return _as_device(device)
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        placed = [d for d in device_map.values() if d not in ("cpu", "disk")]
        return _as_device(placed[0]) if placed else torch.device("cpu")
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")
