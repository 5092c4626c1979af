"""Activation patching stacked with EAH: which components carry the broadcast's effect on a metric?

Two runs of the same inputs — the **baseline** and the **EAH** run — and one site at a time:

* ``direction="eah->baseline"`` (sufficiency, "which component carries the fix?"): run the baseline
  and overwrite one site with its value from the EAH run;
* ``direction="baseline->eah"`` (necessity, "which component is needed?"): run EAH and overwrite one
  site with its baseline value.

Sites, per decoder layer: ``attn_out`` (the attention module's output), ``mlp_out`` (the MLP's
output), ``resid`` (the decoder layer's output, the residual stream after the layer) and, per head,
``head`` (the head's slice of the output projection's input, i.e. its ``P @ V`` result), each
restricted to a position group: ``image`` (image tokens), ``text`` (real prompt tokens that are
not image tokens, except the last), ``last`` (the last position) or ``all``.

The metric is a function of the last-position logits ``[batch, vocab]`` returning one number per row
(default: ``log p(yes) - log p(no)``, `yes_no_metric`); rows are averaged. Results are tidy
DataFrames with the metric and the normalised effect ``(patched - baseline) / (eah - baseline)``
(1 = the patch moves the metric all the way to the EAH value, 0 = not at all).

Two implementations with the same results: `patch_sites` runs through nnsight (the primary one) and
`patch_sites_lens` through TransformerLens hooks on a `TransformerBridge`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

import eah_interp.nnsight as ens
from eah_interp import hf
from eah_interp.config import EAHConfig
from eah_interp.layout import TokenLayout

SITES = ("attn_out", "mlp_out", "resid", "head")
POSITIONS = ("image", "text", "last", "all")
DIRECTIONS = ("eah->baseline", "baseline->eah")

Metric = Callable[[Tensor], Tensor]


def yes_no_metric(yes_ids: Sequence[int], no_ids: Sequence[int]) -> Metric:
    """``log p(yes) - log p(no)`` of the last-position logits, per row."""
    from eah_interp.metrics import yes_no_logit_diff

    return lambda logits: yes_no_logit_diff(logits, yes_ids, no_ids)


def token_logprob_metric(token_id: int) -> Metric:
    """``log p(token)`` of the last-position logits, per row (e.g. a hallucinated object word)."""
    return lambda logits: torch.log_softmax(logits.float(), -1)[:, token_id]


def position_mask(layout: TokenLayout, group: str) -> Tensor:
    """``Bool[batch, seq]`` of the positions of a group (``image``, ``text``, ``last``, ``all``)."""
    if group not in POSITIONS:
        raise ValueError(f"position group must be one of {POSITIONS}; got {group!r}.")
    real = layout.attention_mask
    last = torch.zeros_like(real)
    last[:, -1] = True
    return {
        "image": layout.image_mask,
        "text": real & ~layout.image_mask & ~last,
        "last": last,
        "all": real,
    }[group]


# ---------------------------------------------------------------------------- nnsight
def _layers(nn_model: Any):
    """The envoys of the language model's decoder layers."""
    model = ens._hf_model(nn_model)
    modules = hf.attention_modules(model)
    first = modules[min(modules)]
    name = next(n for n, m in model.named_modules() if m is first)
    parent_name = name.rsplit(".", 2)[0]  # "<...>.layers.<i>.self_attn" -> "<...>.layers"
    envoy = nn_model
    for part in parent_name.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return [envoy[i] for i in range(len(modules))]


def _site_value(layer_envoy: Any, site: str):
    if site == "attn_out":
        return layer_envoy.self_attn.output[0]
    if site == "mlp_out":
        return layer_envoy.mlp.output
    if site == "resid":
        return layer_envoy.output
    if site == "head":
        return layer_envoy.self_attn.o_proj.input
    raise ValueError(f"site must be one of {SITES}; got {site!r}.")


def _set_site(layer_envoy: Any, site: str, value: Tensor) -> None:
    if site == "attn_out":
        layer_envoy.self_attn.output = (value, layer_envoy.self_attn.output[1])
    elif site == "mlp_out":
        layer_envoy.mlp.output = value
    elif site == "resid":
        layer_envoy.output = value
    else:
        layer_envoy.self_attn.o_proj.input = value


def _run(nn_model, inputs, config, layout, metric, *, cache=None, patches=()):
    """One nnsight trace: baseline (config None) or EAH; optionally cache every site; apply patches.

    ``patches``: (layer, site, head or None, positions mask, replacement tensor).
    Returns (metric per row, cache dict {(layer, site): tensor} or None).
    """
    import nnsight

    layers = _layers(nn_model)
    by_layer: dict[int, list] = {}
    for patch in patches:
        by_layer.setdefault(patch[0], []).append(patch)
    n_heads = hf.model_shape(ens._hf_model(nn_model))[1]
    order = ("head", "attn_out", "mlp_out", "resid")  # the order the forward pass produces them
    if config is not None:
        config.validate_for(len(layers), n_heads)
    saved: dict = {}  # filled inside the trace (an outer object survives it; locals do not)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        for index, layer in enumerate(layers):
            if config is not None and index in config.layers:  # interleaved in forward order
                ens.apply_eah_layer(nn_model, config, layout, index)
            for site in order:
                todo = [p for p in by_layer.get(index, []) if p[1] == site]
                if cache is None and not todo:
                    continue
                value = _site_value(layer, site)
                if todo:
                    value = value.clone()
                    for _, _, head, mask, replacement in todo:
                        m = mask.to(value.device)[..., None]
                        if head is None:
                            value = torch.where(m, replacement, value)
                        else:
                            d = value.shape[-1] // n_heads
                            part = slice(head * d, (head + 1) * d)
                            value[..., part] = torch.where(m, replacement[..., part], value[..., part])
                    _set_site(layer, site, value)
                if cache is not None:
                    saved[(index, site)] = nnsight.save(value.detach().clone())
        result = nnsight.save(metric(nn_model.output.logits[:, -1]))
    return result, (saved if cache is not None else None)


def patch_sites(
    nn_model: Any,
    inputs: dict[str, Tensor],
    config: EAHConfig,
    layout: TokenLayout,
    metric: Metric,
    *,
    sites: Iterable[str] = ("attn_out", "mlp_out", "resid"),
    positions: Iterable[str] = ("all",),
    layers: Iterable[int] | None = None,
    heads: bool = False,
    directions: Iterable[str] = DIRECTIONS,
    progress: bool = True,
):
    """Patch one site at a time between the baseline and the EAH run (through nnsight).

    Args:
        nn_model: an ``nnsight.NNsight`` wrapping the HF LVLM.
        inputs: the model inputs (one processor call; several rows are averaged).
        config: the EAH edit.
        layout: layout of ``inputs``.
        metric: logits ``[batch, vocab]`` -> ``[batch]``.
        sites: layer-level sites (subset of ``attn_out``, ``mlp_out``, ``resid``).
        positions: position groups to patch.
        layers: layers to patch (default all).
        heads: also patch every head's output (site ``head``) per layer and position group.
        directions: ``eah->baseline`` and/or ``baseline->eah``.

    Returns:
        A tidy DataFrame: direction, site, layer, head, positions, metric, baseline, eah, effect.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    n_layers, n_heads, _ = hf.model_shape(ens._hf_model(nn_model))
    chosen = list(range(n_layers)) if layers is None else list(layers)
    with ens.expose(nn_model, config.layers):
        base_metric, base_cache = _run(nn_model, inputs, None, layout, metric, cache=True)
        eah_metric, eah_cache = _run(nn_model, inputs, config, layout, metric, cache=True)
        b, e = float(base_metric.mean()), float(eah_metric.mean())
        jobs = [(layer, site, None, group) for layer in chosen for site in sites for group in positions]
        if heads:
            jobs += [(layer, "head", h, group) for layer in chosen for h in range(n_heads) for group in positions]
        rows = []
        for direction in directions:
            if direction not in DIRECTIONS:
                raise ValueError(f"direction must be one of {DIRECTIONS}; got {direction!r}.")
            run_config, source = (None, eah_cache) if direction == "eah->baseline" else (config, base_cache)
            for layer, site, head, group in tqdm(jobs, desc=f"patching {direction}", disable=not progress):
                mask = position_mask(layout, group)
                value, _ = _run(
                    nn_model, inputs, run_config, layout, metric,
                    patches=[(layer, site, head, mask, source[(layer, site)])],
                )
                v = float(value.mean())
                rows.append({
                    "direction": direction, "site": site, "layer": layer, "head": -1 if head is None else head,
                    "positions": group, "metric": v, "baseline": b, "eah": e,
                    "effect": (v - b) / (e - b) if e != b else float("nan"),
                })
    return pd.DataFrame(rows)


def run_metric(nn_model: Any, inputs, config: EAHConfig | None, layout: TokenLayout, metric: Metric, patches=()) -> Tensor:
    """The metric of one (optionally patched) run through nnsight; ``patches`` as in `_run`."""
    with ens.expose(nn_model, config.layers if config is not None else ()):
        value, _ = _run(nn_model, inputs, config, layout, metric, patches=patches)
    return value


def cache_sites(nn_model: Any, inputs, config: EAHConfig | None, layout: TokenLayout, metric: Metric) -> dict:
    """Every site's value of the baseline (config None) or EAH run, keyed by (layer, site)."""
    with ens.expose(nn_model, config.layers if config is not None else ()):
        return _run(nn_model, inputs, config, layout, metric, cache=True)[1]


# ---------------------------------------------------------------------------- TransformerLens
_LENS_HOOKS = {"attn_out": "blocks.{l}.hook_attn_out", "mlp_out": "blocks.{l}.hook_mlp_out", "resid": "blocks.{l}.hook_resid_post", "head": "blocks.{l}.attn.hook_z"}


def patch_sites_lens(
    bridge: Any,
    inputs: dict[str, Tensor],
    config: EAHConfig,
    layout: TokenLayout,
    metric: Metric,
    *,
    sites: Iterable[str] = ("attn_out", "mlp_out", "resid"),
    positions: Iterable[str] = ("all",),
    layers: Iterable[int] | None = None,
    heads: bool = False,
    directions: Iterable[str] = DIRECTIONS,
):
    """`patch_sites` through TransformerLens hooks on a `TransformerBridge` (same table)."""
    import pandas as pd

    from eah_interp.lens import eah_hooks

    ids = inputs["input_ids"]
    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    chosen = list(range(n_layers)) if layers is None else list(layers)
    site_list = list(sites) + (["head"] if heads else [])
    names = [_LENS_HOOKS[s].format(l=layer) for layer in chosen for s in site_list]

    def run(edit: bool, fwd: list) -> Tensor:
        hooks = (eah_hooks(bridge, config, layout) if edit else []) + fwd
        with torch.no_grad():
            logits = bridge.run_with_hooks(ids, fwd_hooks=hooks, **kwargs)
        return metric(logits[:, -1])

    def caching(store: dict):
        def make(name: str):  # keyed by the name we asked for (TL reports aliases by their canonical name)
            def hook(value, hook):
                store[name] = value.detach().clone()

            return hook

        return [(n, make(n)) for n in names]

    base_cache: dict = {}
    eah_cache: dict = {}
    b = float(run(False, caching(base_cache)).mean())
    e = float(run(True, caching(eah_cache)).mean())
    rows = []
    for direction in directions:
        edit, source = (False, eah_cache) if direction == "eah->baseline" else (True, base_cache)
        jobs = [(layer, s, None, g) for layer in chosen for s in sites for g in positions]
        if heads:
            jobs += [(layer, "head", h, g) for layer in chosen for h in range(n_heads) for g in positions]
        for layer, site, head, group in jobs:
            name = _LENS_HOOKS[site].format(l=layer)
            mask = position_mask(layout, group)
            replacement = source[name]

            def patch(value, hook, mask=mask, replacement=replacement, head=head):
                m = mask.to(value.device)
                if head is None:
                    return torch.where(m[..., None], replacement, value)
                value = value.clone()  # hook_z: [batch, pos, heads, d_head]
                value[:, :, head] = torch.where(m[..., None], replacement[:, :, head], value[:, :, head])
                return value

            v = float(run(edit, [(name, patch)]).mean())
            rows.append({
                "direction": direction, "site": site, "layer": layer, "head": -1 if head is None else head,
                "positions": group, "metric": v, "baseline": b, "eah": e,
                "effect": (v - b) / (e - b) if e != b else float("nan"),
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- plots
def plot_patching(frame, *, direction: str = "eah->baseline", positions: str = "all", ax=None):
    """Heatmap of the normalised effect: layer (rows) x site (columns). Returns the Figure."""
    import matplotlib.pyplot as plt

    sub = frame[(frame["direction"] == direction) & (frame["positions"] == positions) & (frame["site"] != "head")]
    table = sub.pivot_table(index="layer", columns="site", values="effect")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * table.shape[1], 1 + 0.25 * table.shape[0]))
    else:
        fig = ax.figure
    im = ax.imshow(table.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(table.shape[1]), table.columns)
    ax.set_yticks(range(table.shape[0]), table.index)
    ax.set_xlabel("site")
    ax.set_ylabel("layer")
    ax.set_title(f"patching {direction} ({positions} positions): normalised effect")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def plot_head_patching(frame, *, direction: str = "eah->baseline", positions: str = "all", ax=None):
    """Heatmap of per-head effects: layer x head. Returns the Figure."""
    import matplotlib.pyplot as plt

    sub = frame[(frame["direction"] == direction) & (frame["positions"] == positions) & (frame["site"] == "head")]
    table = sub.pivot_table(index="layer", columns="head", values="effect")
    if ax is None:
        fig, ax = plt.subplots(figsize=(1.5 + 0.45 * table.shape[1], 1 + 0.25 * table.shape[0]))
    else:
        fig = ax.figure
    im = ax.imshow(table.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"head patching {direction} ({positions})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
