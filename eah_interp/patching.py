"""Activation patching stacked with EAH: which components carry the change EAH makes to an answer.

Two runs of the same inputs are compared: the **baseline** (the plain model) and the **EAH** run (the
model with `EAHConfig` applied). A *patch* copies one site's activation, at a group of positions, from
one run into the other, and the metric (default: the yes-minus-no logit difference at the last real
position) is measured on the patched run:

* ``"eah_into_baseline"`` (sufficiency): the baseline run receives the EAH activation. An effect near 1
  means this site alone carries the change EAH makes to the metric.
* ``"baseline_into_eah"`` (necessity): the EAH run receives the baseline activation. An effect near 0
  means the change cannot happen without this site (restoring it undoes EAH); near 1, it is not needed.

``normalised_effect = (patched - baseline) / (eah - baseline)`` in both directions (metrics are means
over the batch rows), so 0 is the baseline metric and 1 the EAH metric.

Sites (`SITES`), for every decoder layer ``l`` of the language model:

* ``"attn_out"``: the attention block's output (after ``o_proj``), ``blocks.{l}.hook_attn_out``;
* ``"mlp_out"``: the MLP output, ``blocks.{l}.hook_mlp_out``;
* ``"resid"``: the decoder layer's output (residual stream after the layer), ``blocks.{l}.hook_resid_post``;
* ``"head"``: one head's output = its slice of ``o_proj``'s input, ``blocks.{l}.attn.hook_z[:, :, h]``.

Position groups (`POSITION_GROUPS`), per row from its `TokenLayout`: ``"image"`` (image tokens),
``"text"`` (real non-image tokens except the last), ``"last"`` (the last real token), ``"all"`` (every
position, padding included).

Two implementations share the sweep and the tables: `NNsightPatcher` (primary: nnsight interventions,
EAH by `eah_interp.nnsight.apply_eah`) and `LensPatcher` (TransformerLens hooks, EAH by
`eah_interp.lens.eah_hooks`). The tests check they agree.

Example:
    >>> metric = LogitDiff(yes=yes_id, no=no_id)
    >>> frame = patch_nnsight(nnsight.NNsight(model), inputs, EAHConfig.paper(), metric)
    >>> plot_sites(frame, direction="eah_into_baseline", positions="all")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from eah_interp import compat
from eah_interp.config import EAHConfig
from eah_interp.errors import ConfigError, HeadIndexError, LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.layout import TokenLayout

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

SITES = ("attn_out", "mlp_out", "resid", "head")
LAYER_SITES = ("attn_out", "mlp_out", "resid")
POSITION_GROUPS = ("image", "text", "last", "all")
DIRECTIONS = ("eah_into_baseline", "baseline_into_eah")
#: Columns of the tables `sweep` returns.
COLUMNS = (
    "direction", "site", "layer", "head", "positions", "metric", "normalised_effect", "baseline_metric", "eah_metric",
)

__all__ = [
    "COLUMNS",
    "DIRECTIONS",
    "LAYER_SITES",
    "POSITION_GROUPS",
    "SITES",
    "LensPatcher",
    "LogitDiff",
    "NNsightPatcher",
    "Patch",
    "TokenLogProb",
    "last_positions",
    "patch_lens",
    "patch_nnsight",
    "plot_heads",
    "plot_sites",
    "position_masks",
    "run_with_patches",
    "sweep",
]


# ---------------------------------------------------------------------------- metrics
class Metric(Protocol):
    """A metric maps logits and each row's last real position to one number per row."""

    def __call__(self, logits: Float[Tensor, "batch seq vocab"], last: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]: ...


def _at_last(logits: Float[Tensor, "batch seq vocab"], last: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)].float()


@dataclass(frozen=True)
class LogitDiff:
    """``log p(yes) - log p(no)`` at the last real position; with one id each, the logit difference.

    Attributes:
        yes, no: token id(s); several ids are pooled (``logsumexp`` of their log-probabilities), as in
            `eah_interp.metrics.yes_no_logit_diff`.
    """

    yes: int | tuple[int, ...]
    no: int | tuple[int, ...]

    def __call__(self, logits: Float[Tensor, "batch seq vocab"], last: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        from eah_interp.metrics.probes import yes_no_logit_diff

        yes = [self.yes] if isinstance(self.yes, int) else list(self.yes)
        no = [self.no] if isinstance(self.no, int) else list(self.no)
        return yes_no_logit_diff(_at_last(logits, last), yes, no)


@dataclass(frozen=True)
class TokenLogProb:
    """``log p(token)`` at the last real position."""

    token: int

    def __call__(self, logits: Float[Tensor, "batch seq vocab"], last: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        return torch.log_softmax(_at_last(logits, last), dim=-1)[:, self.token]


def _as_metric(metric: Metric | tuple[int, int]) -> Metric:
    if isinstance(metric, tuple) and len(metric) == 2 and all(isinstance(t, int) for t in metric):
        return LogitDiff(yes=metric[0], no=metric[1])
    if not callable(metric):
        raise ConfigError(f"metric must be a callable (LogitDiff, TokenLogProb) or a (yes_id, no_id) pair; got {metric!r}.")
    return metric


# ---------------------------------------------------------------------------- positions and patches
def last_positions(layout: TokenLayout) -> Int[Tensor, " batch"]:
    """Index of the last real (non-padding) token of each row."""
    pos = torch.arange(layout.seq_len, device=layout.attention_mask.device)
    return torch.where(layout.attention_mask, pos, -1).max(-1).values


def position_masks(layout: TokenLayout) -> dict[str, Bool[Tensor, "batch seq"]]:
    """The `POSITION_GROUPS` of each row as boolean masks ``[batch, seq]``."""
    last = torch.zeros_like(layout.attention_mask)
    last[torch.arange(layout.batch_size), last_positions(layout)] = True
    return {
        "image": layout.image_mask,
        "text": layout.attention_mask & ~layout.image_mask & ~last,
        "last": last,
        "all": torch.ones_like(layout.attention_mask),
    }


@dataclass(frozen=True)
class Patch:
    """One patched site: ``site`` of ``layer`` (and ``head`` for ``site="head"``) at ``positions``."""

    site: str
    layer: int
    head: int | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ConfigError(f"Unknown site {self.site!r}; choose from {SITES}.")
        if self.positions not in POSITION_GROUPS:
            raise ConfigError(f"Unknown position group {self.positions!r}; choose from {POSITION_GROUPS}.")
        if (self.site == "head") != (self.head is not None):
            raise ConfigError(f"A head index goes with site='head' and only with it; got {self}.")


def _patched(
    current: Float[Tensor, "batch seq ..."],
    donor: Float[Tensor, "batch seq ..."],
    patches: Sequence[Patch],
    masks: dict[str, Tensor],
    head_dim: int | None = None,
) -> Tensor:
    """``current`` with the donor's values at each patch's positions (and head slice)."""
    out = current.clone()
    for patch in patches:
        where = masks[patch.positions].to(out.device)
        if patch.site == "head":
            if out.ndim == 4:  # [b, seq, heads, d_head] (TransformerLens hook_z)
                cols = (slice(None), slice(None), patch.head)
            else:  # [b, seq, heads * d_head] (o_proj input)
                cols = (slice(None), slice(None), slice(patch.head * head_dim, (patch.head + 1) * head_dim))
            sel = where[..., None].expand_as(out[cols])
            out[cols] = torch.where(sel, donor[cols].to(out.dtype), out[cols])
        else:
            sel = where.view(*where.shape, *([1] * (out.ndim - 2))).expand_as(out)
            out = torch.where(sel, donor.to(out.dtype), out)
    return out


# ---------------------------------------------------------------------------- backends
class Patcher(Protocol):
    """What `sweep` needs from a backend."""

    n_layers: int
    n_heads: int
    layout: TokenLayout
    config: EAHConfig

    def collect(self, eah: bool) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
        """All site activations (keyed ``(site, layer)``) and the logits of the baseline/EAH run."""
        ...

    def run(self, patches: Sequence[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
        """Logits of the run receiving ``patches`` (``direction`` says which run receives them)."""
        ...


def _default_layout(model: Any, inputs: dict[str, Tensor], layout: TokenLayout | None) -> TokenLayout:
    from eah_interp import hf

    if layout is not None:
        return layout
    tokens = hf.image_token_ids(model)
    if not tokens or "input_ids" not in inputs:
        raise LayoutError(
            "Cannot derive the token layout (no image token id in the config or no input_ids): pass layout=TokenLayout(...)."
        )
    return TokenLayout.from_input_ids(inputs["input_ids"], tokens, inputs.get("attention_mask"))


@dataclass
class NNsightPatcher:
    """Patching runs as nnsight traces; EAH by `eah_interp.nnsight.apply_eah` in the same trace.

    Args:
        nn_model: ``nnsight.NNsight(hf_model)``.
        inputs: the model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        config: the EAH edit.
        layout: the prompt layout (default: from ``input_ids`` and the config's image token id).
    """

    nn_model: Any
    inputs: dict[str, Tensor]
    config: EAHConfig
    layout: TokenLayout | None = None
    _donors: dict[bool, dict[tuple[str, int], Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from eah_interp import hf
        from eah_interp.nnsight import hf_model

        model = hf_model(self.nn_model)
        self.n_layers, self.n_heads, _ = hf.model_shape(model)
        self.config.validate_for(self.n_layers, self.n_heads)
        text = hf.text_config(model)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.n_heads
        self.layout = _default_layout(model, self.inputs, self.layout)
        self._layers = [self._layer_envoy(i) for i in range(self.n_layers)]

    def _layer_envoy(self, layer: int) -> Any:
        from eah_interp.nnsight import self_attn

        return self_attn(self.nn_model, layer).parent

    def _trace(self, eah: bool, edit: Callable[[int, str, Any, Callable[[], Tensor], Callable[[Tensor], None]], None]) -> Tensor:
        """One forward; ``edit(layer, site, envoy, read, write)`` is called at each site in forward order."""
        from eah_interp.nnsight import apply_eah

        with torch.no_grad(), self.nn_model.trace(**self.inputs):
            for layer, block in enumerate(self._layers):
                if eah and layer in self.config.layers:
                    apply_eah(self.nn_model, self.config, self.layout, layers=[layer])
                attn, mlp = block.self_attn, block.mlp

                def write_z(v, attn=attn):
                    attn.o_proj.input = v

                def write_attn(v, attn=attn):
                    out = attn.output
                    attn.output = (v, *out[1:]) if isinstance(out, tuple) else v

                def write_mlp(v, mlp=mlp):
                    mlp.output = v

                def write_resid(v, block=block):
                    out = block.output
                    block.output = (v, *out[1:]) if isinstance(out, tuple) else v

                edit(layer, "head", attn, lambda attn=attn: attn.o_proj.input, write_z)
                edit(layer, "attn_out", attn, lambda attn=attn: _first(attn.output), write_attn)
                edit(layer, "mlp_out", mlp, lambda mlp=mlp: mlp.output, write_mlp)
                edit(layer, "resid", block, lambda block=block: _first(block.output), write_resid)
            logits = self.nn_model.output.logits.save()
        return logits

    def collect(self, eah: bool) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
        import nnsight

        acts: dict[tuple[str, int], Tensor] = {}

        def edit(layer, site, envoy, read, write):
            acts[(site, layer)] = nnsight.save(read().clone())

        logits = self._trace(eah, edit)
        self._donors[eah] = acts
        return acts, logits

    def run(self, patches: Sequence[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
        receiver_eah = direction == "baseline_into_eah"
        donor = self._donors.get(not receiver_eah) or self.collect(not receiver_eah)[0]
        masks = position_masks(self.layout)
        by_site: dict[tuple[str, int], list[Patch]] = {}
        for patch in patches:
            by_site.setdefault(("head" if patch.site == "head" else patch.site, patch.layer), []).append(patch)

        def edit(layer, site, envoy, read, write):
            chosen = by_site.get((site, layer))
            if chosen:
                write(_patched(read(), donor[(site, layer)], chosen, masks, self.head_dim))

        return self._trace(receiver_eah, edit)


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


_LENS_HOOKS = {site: compat.LENS_HOOKS[site] for site in ("attn_out", "mlp_out", "resid", "head")}


@dataclass
class LensPatcher:
    """Patching runs as TransformerLens hooks on a `TransformerBridge`; EAH by `eah_interp.lens.eah_hooks`.

    Args:
        bridge: from `eah_interp.lens.boot_bridge`.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...; a
            language-model-only bridge from `eah_interp.lens.boot_bridge` builds the embeddings itself), or
            a float ``inputs_embeds`` with ``attention_mask`` (then pass ``layout``).
        config: the EAH edit.
        layout: the prompt layout (default: from ``input_ids`` and the config's image token id).
    """

    bridge: Any
    inputs: dict[str, Tensor]
    config: EAHConfig
    layout: TokenLayout | None = None
    _donors: dict[bool, dict[tuple[str, int], Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.n_layers, self.n_heads = compat.bridge_shape(self.bridge)
        self.config.validate_for(self.n_layers, self.n_heads)
        from eah_interp.lens import lvlm_of  # the LVLM also behind a language-model-only bridge

        self.layout = _default_layout(lvlm_of(self.bridge), self.inputs, self.layout)
        hook_names = compat.bridge_hook_names(self.bridge)
        missing = [n.format(0) for n in _LENS_HOOKS.values() if n.format(0) not in hook_names]
        if missing:
            raise UnsupportedModelError(
                f"The bridge has no hook(s) {missing}; patching needs {list(_LENS_HOOKS.values())}."
            )

    def _call(self, eah: bool, hooks: list) -> Tensor:
        from eah_interp.lens import eah_hooks

        kwargs = dict(self.inputs)
        first = kwargs.pop("inputs_embeds", None)
        if first is None:
            first = kwargs.pop("input_ids")
        all_hooks = (eah_hooks(self.bridge, self.config, self.layout) if eah else []) + hooks
        with torch.no_grad():
            return self.bridge.run_with_hooks(first, fwd_hooks=all_hooks, return_type="logits", **kwargs)

    def collect(self, eah: bool) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
        acts: dict[tuple[str, int], Tensor] = {}

        def make(site: str, layer: int):
            def hook(value: Tensor, hook: Any) -> None:
                acts[(site, layer)] = value.detach().clone()

            return hook

        hooks = [(name.format(layer), make(site, layer)) for site, name in _LENS_HOOKS.items() for layer in range(self.n_layers)]
        logits = self._call(eah, hooks)
        self._donors[eah] = acts
        return acts, logits

    def run(self, patches: Sequence[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
        receiver_eah = direction == "baseline_into_eah"
        donor = self._donors.get(not receiver_eah) or self.collect(not receiver_eah)[0]
        masks = position_masks(self.layout)
        by_site: dict[tuple[str, int], list[Patch]] = {}
        for patch in patches:
            by_site.setdefault((patch.site, patch.layer), []).append(patch)

        def make(key: tuple[str, int], chosen: list[Patch]):
            def hook(value: Tensor, hook: Any) -> Tensor:
                return _patched(value, donor[key], chosen, masks)

            return hook

        hooks = [(_LENS_HOOKS[site].format(layer), make((site, layer), chosen)) for (site, layer), chosen in by_site.items()]
        return self._call(receiver_eah, hooks)


# ---------------------------------------------------------------------------- the sweep
def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ConfigError(f"Unknown direction {direction!r}; choose from {DIRECTIONS}.")


def run_with_patches(patcher: Patcher, patches: Iterable[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
    """Logits of one run receiving several patches at once (e.g. every site, or nothing)."""
    _check_direction(direction)
    patches = list(patches)
    for patch in patches:
        if not 0 <= patch.layer < patcher.n_layers:
            raise LayerIndexError(f"Patch layer {patch.layer} out of range (0..{patcher.n_layers - 1}).")
        if patch.head is not None and not 0 <= patch.head < patcher.n_heads:
            raise HeadIndexError(f"Patch head {patch.head} out of range (0..{patcher.n_heads - 1}).")
    return patcher.run(patches, direction)


def sweep(
    patcher: Patcher,
    metric: Metric | tuple[int, int],
    *,
    sites: Sequence[str] = SITES,
    positions: Sequence[str] = POSITION_GROUPS,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    directions: Sequence[str] = DIRECTIONS,
) -> pd.DataFrame:
    """Patch one site at a time, in each direction, and tabulate the metric.

    Args:
        patcher: `NNsightPatcher` or `LensPatcher`.
        metric: `LogitDiff`, `TokenLogProb`, any ``(logits, last) -> [batch]`` callable, or a
            ``(yes_id, no_id)`` pair.
        sites, positions, directions: subsets of `SITES`, `POSITION_GROUPS`, `DIRECTIONS`.
        layers: decoder layers to patch (default: all).
        heads: heads patched for ``site="head"`` (default: all).

    Returns:
        A tidy frame with `COLUMNS`: one row per (direction, site, layer, head, positions); ``head`` is
        ``<NA>`` for layer sites; ``metric`` is the batch mean; ``normalised_effect`` is
        ``(metric - baseline_metric) / (eah_metric - baseline_metric)``.
    """
    import pandas as pd

    metric = _as_metric(metric)
    for name, given, allowed in (("site", sites, SITES), ("position group", positions, POSITION_GROUPS)):
        unknown = [x for x in given if x not in allowed]
        if unknown:
            raise ConfigError(f"Unknown {name}(s) {unknown}; choose from {allowed}.")
    for direction in directions:
        _check_direction(direction)
    layer_list = list(range(patcher.n_layers)) if layers is None else sorted({int(x) for x in layers})
    head_list = list(range(patcher.n_heads)) if heads is None else sorted({int(x) for x in heads})
    last = last_positions(patcher.layout)

    def score(logits: Tensor) -> float:
        return float(metric(logits, last).float().mean())

    baseline = score(patcher.collect(eah=False)[1])
    eah = score(patcher.collect(eah=True)[1])
    # An effect this small is float rounding (an edited layer runs eager attention, the baseline SDPA).
    no_effect = math.isclose(eah, baseline, rel_tol=1e-6, abs_tol=1e-6)
    if no_effect:
        warnings.warn(
            "EAH does not change the metric on these inputs (|eah - baseline| is within float rounding, 1e-6): "
            "normalised effects are NaN. Check the "
            "config (threshold, layers) with eah_interp.hf.eah(...) records.",
            stacklevel=2,
        )
    rows = []
    for direction in directions:
        for site in sites:
            for layer in layer_list:
                for head in head_list if site == "head" else [None]:
                    for group in positions:
                        value = score(run_with_patches(patcher, [Patch(site, layer, head, group)], direction))
                        denominator = eah - baseline
                        effect = float("nan") if no_effect else (value - baseline) / denominator
                        rows.append((direction, site, layer, head, group, value, effect, baseline, eah))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["head"] = frame["head"].astype("Int64")
    frame.attrs.update(baseline_metric=baseline, eah_metric=eah, config=patcher.config.to_dict(), metric=repr(metric))
    return frame


def patch_nnsight(
    nn_model: Any, inputs: dict[str, Tensor], config: EAHConfig, metric: Metric | tuple[int, int], *,
    layout: TokenLayout | None = None, **options: Any,
) -> pd.DataFrame:
    """`sweep` with an `NNsightPatcher` (``options``: ``sites``, ``positions``, ``layers``, ``heads``, ``directions``)."""
    return sweep(NNsightPatcher(nn_model, inputs, config, layout), metric, **options)


def patch_lens(
    bridge: Any, inputs: dict[str, Tensor], config: EAHConfig, metric: Metric | tuple[int, int], *,
    layout: TokenLayout | None = None, **options: Any,
) -> pd.DataFrame:
    """`sweep` with a `LensPatcher` (``options``: ``sites``, ``positions``, ``layers``, ``heads``, ``directions``)."""
    return sweep(LensPatcher(bridge, inputs, config, layout), metric, **options)


# ---------------------------------------------------------------------------- plots
def _heatmap(data, row_labels, col_labels, xlabel: str, title: str, ax=None) -> Figure:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(col_labels), 1.2 + 0.3 * len(row_labels)))
    else:
        fig = ax.figure
    finite = np.abs(data[np.isfinite(data)])
    limit = max(1.0, float(finite.max())) if finite.size else 1.0
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="normalised effect")
    fig.tight_layout()
    return fig


def plot_sites(frame: pd.DataFrame, direction: str = "eah_into_baseline", positions: str = "all", ax=None) -> Figure:
    """Heatmap of the normalised effect, layer (rows) x layer site (columns), for one direction and position group."""
    sub = frame[(frame.direction == direction) & (frame.positions == positions) & frame.site.isin(LAYER_SITES)]
    if sub.empty:
        raise ConfigError(f"No layer-site rows for direction={direction!r}, positions={positions!r} in the frame.")
    table = sub.pivot_table(index="layer", columns="site", values="normalised_effect", dropna=False)
    table = table[[s for s in LAYER_SITES if s in table.columns]]
    return _heatmap(table.to_numpy(), list(table.index), list(table.columns), "site",
                    f"{direction}, positions={positions}", ax)


def plot_heads(frame: pd.DataFrame, direction: str = "eah_into_baseline", positions: str = "all", ax=None) -> Figure:
    """Heatmap of the normalised effect of patching single heads, layer (rows) x head (columns)."""
    sub = frame[(frame.direction == direction) & (frame.positions == positions) & (frame.site == "head")]
    if sub.empty:
        raise ConfigError(f"No head rows for direction={direction!r}, positions={positions!r} in the frame.")
    table = sub.astype({"head": int}).pivot_table(index="layer", columns="head", values="normalised_effect", dropna=False)
    return _heatmap(table.to_numpy(), list(table.index), list(table.columns), "head",
                    f"heads, {direction}, positions={positions}", ax)
