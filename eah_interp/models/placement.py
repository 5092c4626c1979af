"""Device maps for LVLMs split across devices: the image path stays on the input embeddings' device.

An LVLM writes its projected image features into the text embeddings (LLaVA's ``masked_scatter``,
Qwen2-VL's ``visual`` merger): the vision tower, the projector and the language model's input
embeddings must run on one device, or the forward fails with "Expected all tensors to be on the same
device". accelerate's ``infer_auto_device_map`` knows nothing about that: it fills devices in module
order, so a full first GPU leaves the vision tower there and the embeddings on the next one (or splits
the vision tower itself). `auto_device_map` computes accelerate's map and then **pins** the image path
(`image_path_modules`) and the input embeddings to one device, letting the decoder layers spread.

The image path is found by introspection, not by per-family names: it is everything that is neither
the text decoder nor the LM head (their paths come from the family adapter), i.e. the decoder's and
the head's siblings on the way up to the root (``model.vision_tower`` and ``model.multi_modal_projector``
in LLaVA, ``model.visual`` in Qwen2-VL, ``vision_model``, ``qformer``, ``language_projection`` and the
``query_tokens`` parameter in InstructBLIP), plus the embeddings module.

Maps are dicts from dotted module (or parameter) names to devices (``0``, ``"cuda:1"``, ``"cpu"``,
``"disk"``), as accelerate and ``from_pretrained(device_map=...)`` take them; a key stands for its
whole subtree.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

#: The strategies ``from_pretrained(device_map=...)`` accepts as a string (transformers' ``_get_device_map``).
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _inside(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or in its subtree (``""`` is the root and holds everything)."""
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _path_of(model: nn.Module, target: nn.Module, what: str) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"The {what} ({type(target).__name__}) is not a submodule of {type(model).__name__}.")


def embeddings_path(model: nn.Module) -> str:
    """Dotted name of the language model's input embeddings (``model.language_model.embed_tokens``)."""
    return _path_of(model, model.get_input_embeddings(), "input embeddings")


def image_path_modules(model: nn.Module) -> list[str]:
    """Names of the modules (and loose parameters) that must share the input embeddings' device.

    Everything outside the text decoder and the LM head (paths from `eah_interp.models.adapter_for`):
    for each ancestor of the decoder or the head, its other children and its own parameters and
    buffers. A text-only model has none.

    Args:
        model: an HF LVLM (real or on the ``meta`` device).

    Returns:
        Dotted names, e.g. ``["model.vision_tower", "model.multi_modal_projector"]`` for LLaVA.
    """
    from eah_interp.models.adapters import adapter_for

    adapter = adapter_for(model)
    keep = [_path_of(model, adapter.decoder(model), "text decoder"), _path_of(model, adapter.head(model), "LM head")]
    found: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            found.append(_join(prefix, name))
        for name, child in module.named_children():
            path = _join(prefix, name)
            if any(_inside(k, path) for k in keep):
                if path not in keep:  # an ancestor of the decoder or the head: look inside
                    walk(path, child)
            elif any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                found.append(path)

    if "" not in keep:
        walk("", model)
    return found


def device_of(device_map: Mapping[str, Any], name: str) -> Any:
    """The device a map gives ``name``: the entry of its longest covering key.

    Raises:
        KeyError: no key covers ``name``.
    """
    covering = [key for key in device_map if _inside(name, key)]
    if not covering:
        raise KeyError(f"The device map places nothing that holds {name!r}.")
    return device_map[max(covering, key=len)]


def _devices_within(device_map: Mapping[str, Any], name: str) -> set[Any]:
    """Every device that part of ``name``'s subtree is mapped to."""
    devices = {device_map[key] for key in device_map if _inside(key, name) and key != name}
    try:
        devices.add(device_of(device_map, name))
    except KeyError:
        pass
    return devices


def _same(a: Any, b: Any) -> bool:
    return str(torch.device(f"cuda:{a}") if isinstance(a, int) else a) == str(torch.device(f"cuda:{b}") if isinstance(b, int) else b)


def _expand(device_map: dict[str, Any], model: nn.Module, name: str) -> None:
    """Replace every key strictly above ``name`` by its children (same device), so ``name`` can get its own."""
    while True:
        above = [key for key in device_map if key != name and _inside(name, key)]
        if not above:
            return
        key = max(above, key=len)
        device = device_map.pop(key)
        module = model.get_submodule(key) if key else model
        parts = [n for n, _ in module.named_children()]
        parts += [n for n, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
        for part in parts:
            device_map.setdefault(_join(key, part), device)


def pin(device_map: Mapping[str, Any], model: nn.Module, names: Iterable[str], device: Any) -> dict[str, Any]:
    """A copy of ``device_map`` with each of ``names`` (and its subtree) on ``device``; the rest as it was.

    The pinned entries come first (accelerate takes the first non-CPU entry as its main device).
    """
    names = list(names)
    out = dict(device_map)
    for name in names:
        _expand(out, model, name)
    rest = {key: value for key, value in out.items() if not any(_inside(key, name) for name in names)}
    return {name: device for name in names} | rest


def auto_device_map(
    model: nn.Module,
    strategy: str = "auto",
    *,
    max_memory: Mapping[Any, int | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """accelerate's device map for ``model``, with the image path and the input embeddings on one device.

    The budgets are accelerate's, as ``from_pretrained(device_map=strategy)`` computes them
    (``get_balanced_memory`` unless ``"sequential"``; ``infer_auto_device_map`` with the model's
    ``_no_split_modules``). Then:

    1. the image path (`image_path_modules`) and the input embeddings, ``S`` bytes together, go to the
       first device (in ``max_memory`` order: ``0, 1, ..., "cpu", "disk"``) whose budget holds ``S``;
    2. accelerate places the rest of the model (the front replaced by empty modules) with that device's
       budget reduced by ``S``;
    3. the image path and the embeddings (and an LM head tied to them) are pinned to that device.

    So the decoder layers spread over the devices as accelerate likes, and no device exceeds its
    budget.

    Args:
        model: the model, typically an empty skeleton (``accelerate.init_empty_weights``).
        strategy: ``"auto"``, ``"balanced"``, ``"balanced_low_0"`` or ``"sequential"``.
        max_memory: per device budget (``{0: "20GiB", 1: "40GiB", "cpu": "100GiB"}``); default: what
            accelerate finds free. Keys need not be present devices (the map is only computed).
        dtype: the dtype the weights will have (default: the skeleton's).

    Returns:
        ``{module name: device}`` for ``from_pretrained(device_map=...)``; the pinned entries first
        (accelerate takes the first entry that is not ``"cpu"`` / ``"disk"`` as its main device).
    """
    from accelerate import infer_auto_device_map
    from accelerate.utils import (
        compute_module_sizes,
        convert_file_size_to_int,
        get_balanced_memory,
        get_max_memory,
    )

    if strategy not in STRATEGIES:
        raise ValueError(f"device_map={strategy!r} is not a strategy; pass one of {', '.join(STRATEGIES)} or a dict.")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    given = None if max_memory is None else {
        key: convert_file_size_to_int(value) if isinstance(value, str) else value for key, value in max_memory.items()
    }
    if strategy == "sequential":
        budget = dict(get_max_memory(given))
    else:
        budget = dict(get_balanced_memory(model, max_memory=given, no_split_module_classes=no_split, dtype=dtype,
                                          low_zero=strategy == "balanced_low_0"))
    names = image_path_modules(model)
    if not names:  # a text-only model: nothing to keep together
        return dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype))
    front = [*names, embeddings_path(model)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight:
        front.append(_path_of(model, head, "LM head"))  # tied to the embeddings: one tensor, one device
    sizes = compute_module_sizes(model, dtype=dtype)
    size = sum(sizes.get(name, 0) for name in dict.fromkeys(front))
    fitting = [device for device, room in budget.items() if room >= size]
    target = fitting[0] if fitting else "disk"
    if target in budget:
        budget[target] -= size
    with _hidden(model, front):  # accelerate places the rest as if the front weighed nothing
        placed = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    return pin(placed, model, front, target)


@contextmanager
def _hidden(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, each named module (parameter) of ``model`` is an empty module (an empty tensor)."""
    swapped: list[tuple[Any, str, str, Any]] = []
    try:
        for name in dict.fromkeys(names):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if attr in parent._modules:
                swapped.append((parent, "_modules", attr, parent._modules[attr]))
                parent._modules[attr] = nn.Module()
            elif attr in parent._parameters:
                swapped.append((parent, "_parameters", attr, parent._parameters[attr]))
                parent._parameters[attr] = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
            elif attr in parent._buffers:
                swapped.append((parent, "_buffers", attr, parent._buffers[attr]))
                parent._buffers[attr] = torch.empty(0, device="meta")
        yield
    finally:
        for parent, kind, attr, original in reversed(swapped):
            getattr(parent, kind)[attr] = original


def check_explicit_map(model: nn.Module, device_map: Mapping[str, Any], *, stacklevel: int = 2) -> None:
    """Warn if an explicit map makes part of the image path run on another device than the input embeddings.

    The map is used as given. Modules mapped to ``"cpu"`` / ``"disk"`` run on accelerate's main device
    (the first other entry; the CPU if there is none), so offloading alone is no split.
    """
    try:
        embeddings = embeddings_path(model)
        target = device_of(device_map, embeddings)
        names = image_path_modules(model)
    except (KeyError, ValueError):
        return
    accelerators = [d for d in device_map.values() if str(d) not in ("cpu", "disk")]
    main = accelerators[0] if accelerators else "cpu"

    def runs_on(device: Any) -> Any:
        return main if str(device) in ("cpu", "disk") else device

    split = [n for n in names if any(not _same(runs_on(d), runs_on(target)) for d in _devices_within(device_map, n))]
    if split:
        warnings.warn(
            f"The device_map runs {', '.join(split)} on another device than the input embeddings "
            f"({embeddings} on {runs_on(target)!r}); the image features are written into the embeddings, so the "
            "forward may fail with 'tensors on different devices'. Put them on one device, or pass "
            "device_map='auto' (eah-interp then pins them together).",
            stacklevel=stacklevel,
        )
