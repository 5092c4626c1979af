"""Activation patching stacked with EAH: which components carry the change EAH makes to an answer.

Two runs of the same inputs are compared: the **baseline** (the plain model) and the **EAH** run (the
model with `EAH` applied). A *patch* copies one site's activation, at a group of positions, from
one run into the other, and the metric (default: the yes-minus-no logit difference at the last real
position) is measured on the patched run:

* ``"eah_into_baseline"`` (sufficiency): the baseline run receives the EAH activation. An effect near 1
  means this site alone carries the change EAH makes to the metric.
* ``"baseline_into_eah"`` (necessity): the EAH run receives the baseline activation. An effect near 0
  means the change cannot happen without this site (restoring it undoes EAH); near 1, it is not needed.

``normalised_effect = (patched - baseline) / (eah - baseline)`` in both directions, so 0 is the
baseline metric and 1 the EAH metric. The metric is measured per example (batch row): `sweep` can
return the per-example values (``per_example=True``), and its batch summary is computed from them
(`summarise`: means, and a bootstrap confidence interval of the normalised effect when the batch has
at least `MIN_CI_EXAMPLES` rows).

Sites (`SITES`), for every decoder layer ``l`` of the language model:

* ``"attn_out"``: the attention block's output (after ``o_proj``), ``blocks.{l}.hook_attn_out``;
* ``"mlp_out"``: the MLP output, ``blocks.{l}.hook_mlp_out``;
* ``"resid"``: the decoder layer's output (residual stream after the layer), ``blocks.{l}.hook_resid_post``;
* ``"head"``: one head's output = its slice of ``o_proj``'s input, ``blocks.{l}.attn.hook_z[:, :, h]``.

Positions: any named group of `eah_interp.layout.GROUPS` (``"system"``, ``"image"``, ``"question"``,
``"last"``, ``"generated"``, ``"text"``, ``"all"``, defined per row by `TokenLayout.group_mask`) or a
user ``Bool[batch, seq]`` mask; `sweep` patches the `POSITION_GROUPS` by default.

A long sweep shows a progress bar with a time estimate, and with ``checkpoint=PATH`` appends each
finished patch to a `eah_interp.resumable.ResumableLog`: rerun with the same arguments, it skips what
is done; with other arguments, it refuses the file.

Two implementations share the sweep and the tables: `NNsightPatcher` (primary: nnsight interventions,
EAH by `eah_interp.nnsight.intervene`) and `LensPatcher` (TransformerLens hooks, EAH by
`eah_interp.transformer_lens.intervene`). The tests check they agree.

Example:
    >>> metric = LogitDiff(yes=yes_id, no=no_id)
    >>> frame = patch_nnsight(nnsight.NNsight(model), inputs, EAH.paper(), metric)
    >>> plot_sites(frame, direction="eah_into_baseline", positions="all")
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from eah_interp import compat
from eah_interp.errors import ConfigError, HeadIndexError, LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.interventions import EAH
from eah_interp.layout import GROUPS, TokenLayout
from eah_interp.models.adapters import token_layout
from eah_interp.models.introspect import model_shape, text_config
from eah_interp.resumable import ResumableLog, tensor_digest

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

SITES = ("attn_out", "mlp_out", "resid", "head")
LAYER_SITES = ("attn_out", "mlp_out", "resid")
#: The position groups `sweep` patches by default (any name of `eah_interp.layout.GROUPS`, or a mask, is accepted).
POSITION_GROUPS = ("image", "text", "last", "all")
DIRECTIONS = ("eah_into_baseline", "baseline_into_eah")
#: What identifies one patch in the tables.
KEY = ("direction", "site", "layer", "head", "positions")
#: Columns of the batch summary `sweep` returns (`summarise`).
COLUMNS = (
    *KEY, "metric", "normalised_effect", "baseline_metric", "eah_metric", "n_examples", "ci_low", "ci_high",
)
#: Columns of the per-example table (``sweep(..., per_example=True)``): one row per patch and batch row.
EXAMPLE_COLUMNS = (*KEY, "example", "metric", "baseline_metric", "eah_metric", "effect", "normalised_effect")
#: The smallest batch for which the summary gives a confidence interval (smaller: NaN).
MIN_CI_EXAMPLES = 10
#: Bootstrap resamples of the summary's confidence interval (percentile, 95%, fixed seed).
N_BOOTSTRAP = 2000

__all__ = [
    "COLUMNS",
    "DIRECTIONS",
    "EXAMPLE_COLUMNS",
    "KEY",
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
    "summarise",
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
    """Every named position group of `eah_interp.layout.GROUPS` as a ``Bool[batch, seq]`` mask.

    A thin wrapper of `TokenLayout.group_mask` (kept for callers written before it): groups hold real
    positions only, so ``"all"`` no longer includes padding (patching padding never changed a real
    position's value).
    """
    return {name: layout.group_mask(name) for name in GROUPS}


def _check_positions(positions: object) -> None:
    """Raise a `ConfigError` unless ``positions`` is a name of `GROUPS` or a 2-d bool tensor."""
    if isinstance(positions, Tensor):
        if positions.ndim != 2 or positions.dtype != torch.bool:
            raise ConfigError(
                f"A position mask must be a Bool[batch, seq] tensor; got {positions.dtype} of shape {tuple(positions.shape)}."
            )
    elif positions not in GROUPS:
        raise ConfigError(f"Unknown position group {positions!r}; choose from {GROUPS} or pass a Bool[batch, seq] mask.")


@dataclass(frozen=True, eq=False)
class Patch:
    """One patched site: ``site`` of ``layer`` (and ``head`` for ``site="head"``) at ``positions``.

    ``positions`` is a name of `eah_interp.layout.GROUPS` or a ``Bool[batch, seq]`` mask over the
    patcher's layout (checked against it when the patch runs).
    """

    site: str
    layer: int
    head: int | None = None
    positions: str | Bool[Tensor, "batch seq"] = "all"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ConfigError(f"Unknown site {self.site!r}; choose from {SITES}.")
        _check_positions(self.positions)
        if (self.site == "head") != (self.head is not None):
            raise ConfigError(f"A head index goes with site='head' and only with it; got {self}.")

    def __repr__(self) -> str:
        where = self.positions if isinstance(self.positions, str) else f"mask{tuple(self.positions.shape)}"
        head = "" if self.head is None else f", head={self.head}"
        return f"Patch({self.site!r}, layer={self.layer}{head}, positions={where!r})"


def _patched(
    current: Float[Tensor, "batch seq ..."],
    donor: Float[Tensor, "batch seq ..."],
    patches: Sequence[Patch],
    layout: TokenLayout,
    head_dim: int | None = None,
) -> Tensor:
    """``current`` with the donor's values at each patch's positions (and head slice)."""
    out = current.clone()
    for patch in patches:
        where = layout.group_mask(patch.positions).to(out.device)
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
    config: EAH

    def collect(self, eah: bool) -> tuple[dict[tuple[str, int], Tensor], Tensor]:
        """All site activations (keyed ``(site, layer)``) and the logits of the baseline/EAH run."""
        ...

    def run(self, patches: Sequence[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
        """Logits of the run receiving ``patches`` (``direction`` says which run receives them)."""
        ...


def _default_layout(model: Any, inputs: dict[str, Tensor], layout: TokenLayout | None) -> TokenLayout:
    if layout is not None:
        return layout
    if "input_ids" not in inputs:
        raise LayoutError("Cannot derive the token layout without input_ids: pass layout=TokenLayout(...).")
    return token_layout(model, inputs["input_ids"], inputs.get("attention_mask"))


@dataclass
class NNsightPatcher:
    """Patching runs as nnsight traces; EAH by `eah_interp.nnsight.intervene` in the same trace.

    Args:
        nn_model: ``nnsight.NNsight(hf_model)``.
        inputs: the model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        config: the EAH edit.
        layout: the prompt layout (default: from ``input_ids`` and the config's image token id).
    """

    nn_model: Any
    inputs: dict[str, Tensor]
    config: EAH
    layout: TokenLayout | None = None
    _donors: dict[bool, dict[tuple[str, int], Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        from eah_interp.nnsight import hf_model

        model = hf_model(self.nn_model)
        self.n_layers, self.n_heads, _ = model_shape(model)
        self.config.validate_for(self.n_layers, self.n_heads)
        text = text_config(model)
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // self.n_heads
        self.layout = _default_layout(model, self.inputs, self.layout)
        self._layers = [self._layer_envoy(i) for i in range(self.n_layers)]

    def _layer_envoy(self, layer: int) -> Any:
        from eah_interp.nnsight import self_attn

        return self_attn(self.nn_model, layer).parent

    def _trace(self, eah: bool, edit: Callable[[int, str, Any, Callable[[], Tensor], Callable[[Tensor], None]], None]) -> Tensor:
        """One forward; ``edit(layer, site, envoy, read, write)`` is called at each site in forward order."""
        from eah_interp.nnsight import intervene

        with torch.no_grad(), self.nn_model.trace(**self.inputs):
            for layer, block in enumerate(self._layers):
                if eah and layer in self.config.layers:
                    intervene(self.nn_model, [dataclasses.replace(self.config, layers=(layer,))], self.layout)
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
        for patch in patches:  # bad masks fail here, before a forward
            self.layout.group_mask(patch.positions)
        by_site: dict[tuple[str, int], list[Patch]] = {}
        for patch in patches:
            by_site.setdefault(("head" if patch.site == "head" else patch.site, patch.layer), []).append(patch)

        def edit(layer, site, envoy, read, write):
            chosen = by_site.get((site, layer))
            if chosen:
                write(_patched(read(), donor[(site, layer)], chosen, self.layout, self.head_dim))

        return self._trace(receiver_eah, edit)


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


_LENS_HOOKS = {site: compat.LENS_HOOKS[site] for site in ("attn_out", "mlp_out", "resid", "head")}


@dataclass
class LensPatcher:
    """Patching runs as TransformerLens hooks on a `TransformerBridge`; EAH by `eah_interp.transformer_lens.intervene`.

    Args:
        bridge: from `eah_interp.transformer_lens.boot_bridge`.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...; a
            language-model-only bridge from `eah_interp.transformer_lens.boot_bridge` builds the embeddings itself), or
            a float ``inputs_embeds`` with ``attention_mask`` (then pass ``layout``).
        config: the EAH edit.
        layout: the prompt layout (default: from ``input_ids`` and the config's image token id).
    """

    bridge: Any
    inputs: dict[str, Tensor]
    config: EAH
    layout: TokenLayout | None = None
    _donors: dict[bool, dict[tuple[str, int], Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.n_layers, self.n_heads = compat.bridge_shape(self.bridge)[:2]
        self.config.validate_for(self.n_layers, self.n_heads)
        from eah_interp.transformer_lens import lvlm_of  # the LVLM also behind a language-model-only bridge

        self.layout = _default_layout(lvlm_of(self.bridge), self.inputs, self.layout)
        hook_names = compat.bridge_hook_names(self.bridge)
        missing = [n.format(0) for n in _LENS_HOOKS.values() if n.format(0) not in hook_names]
        if missing:
            raise UnsupportedModelError(
                f"The bridge has no hook(s) {missing}; patching needs {list(_LENS_HOOKS.values())}."
            )

    def _call(self, eah: bool, hooks: list) -> Tensor:
        from eah_interp.transformer_lens import intervene

        kwargs = dict(self.inputs)
        first = kwargs.pop("inputs_embeds", None)
        if first is None:
            first = kwargs.pop("input_ids")
        all_hooks = (intervene(self.bridge, [self.config], self.layout)[0] if eah else []) + hooks
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
        for patch in patches:  # bad masks fail here, before a forward
            self.layout.group_mask(patch.positions)
        by_site: dict[tuple[str, int], list[Patch]] = {}
        for patch in patches:
            by_site.setdefault((patch.site, patch.layer), []).append(patch)

        def make(key: tuple[str, int], chosen: list[Patch]):
            def hook(value: Tensor, hook: Any) -> Tensor:
                return _patched(value, donor[key], chosen, self.layout)

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


def _position_items(
    positions: Sequence[str | Tensor] | Mapping[str, str | Tensor], layout: TokenLayout
) -> list[tuple[str, str | Tensor]]:
    """``(label, group)`` pairs: a name labels itself, a mask is ``"mask{i}"`` (or its key in a mapping)."""
    if isinstance(positions, str | Tensor):
        positions = [positions]
    items = list(positions.items()) if isinstance(positions, Mapping) else [
        (p if isinstance(p, str) else f"mask{i}", p) for i, p in enumerate(positions)
    ]
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Position groups repeat a label: {labels}.")
    for _, group in items:
        _check_positions(group)
        layout.group_mask(group)  # a mask must fit this layout
    return items


def _metric_name(metric: Metric) -> str:
    """A stable name of the metric (a dataclass's repr; else its qualified name, never a memory address)."""
    if dataclasses.is_dataclass(metric):
        return repr(metric)
    kind = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    return f"{kind.__module__}.{kind.__qualname__}"


def _arguments(patcher: Patcher, metric: Metric, sites, items, layers, heads, directions) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the inputs, layout, edit, metric and the patches."""
    inputs = getattr(patcher, "inputs", {}) or {}
    return {
        "patcher": type(patcher).__name__,
        "model": [patcher.n_layers, patcher.n_heads],
        "config": patcher.config.to_dict(),
        "metric": _metric_name(metric),
        "inputs": {k: tensor_digest(v) for k, v in sorted(inputs.items()) if isinstance(v, Tensor)},
        "layout": [tensor_digest(patcher.layout.image_mask), tensor_digest(patcher.layout.attention_mask)],
        "sites": list(sites),
        "positions": [[label, group if isinstance(group, str) else tensor_digest(group)] for label, group in items],
        "layers": layers,
        "heads": heads,
        "directions": list(directions),
    }


def sweep(
    patcher: Patcher,
    metric: Metric | tuple[int, int],
    *,
    sites: Sequence[str] = SITES,
    positions: Sequence[str | Tensor] | Mapping[str, str | Tensor] = POSITION_GROUPS,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    per_example: bool = False,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Patch one site at a time, in each direction, and tabulate the metric per example and for the batch.

    Args:
        patcher: `NNsightPatcher` or `LensPatcher`.
        metric: `LogitDiff`, `TokenLogProb`, any ``(logits, last) -> [batch]`` callable, or a
            ``(yes_id, no_id)`` pair.
        sites, directions: subsets of `SITES`, `DIRECTIONS`.
        positions: names of `eah_interp.layout.GROUPS` and/or ``Bool[batch, seq]`` masks (labelled
            ``"mask0"``, ``"mask1"``, ... in the table), or a mapping ``{label: name or mask}``.
        layers: decoder layers to patch (default: all).
        heads: heads patched for ``site="head"`` (default: all).
        per_example: return the per-example table (`EXAMPLE_COLUMNS`) instead of the batch summary.
        checkpoint: a JSONL file (`eah_interp.resumable.ResumableLog`) to which each finished patch is
            appended; rerun with the same arguments, the sweep skips what the file holds (the baseline
            and EAH metrics included); a file written with other arguments is refused.
        progress: show a progress bar with a time estimate (tqdm).

    Returns:
        The batch summary with `COLUMNS` (`summarise` of the per-example table): one row per (direction,
        site, layer, head, positions); ``head`` is ``<NA>`` for layer sites; ``metric``,
        ``baseline_metric``, ``eah_metric`` are batch means; ``normalised_effect`` is ``(metric -
        baseline_metric) / (eah_metric - baseline_metric)``; ``ci_low``/``ci_high`` its 95% bootstrap
        interval over the batch rows (NaN below `MIN_CI_EXAMPLES` rows). With ``per_example=True``, the
        per-example table instead. ``frame.attrs`` holds the baseline and EAH batch means, the config
        and the metric.

    Raises:
        ConfigError: an unknown site, group or direction, or a checkpoint of other arguments.
        LayoutError: a mask that does not fit the patcher's layout.
    """
    metric = _as_metric(metric)
    unknown = [x for x in sites if x not in SITES]
    if unknown:
        raise ConfigError(f"Unknown site(s) {unknown}; choose from {SITES}.")
    items = _position_items(positions, patcher.layout)
    for direction in directions:
        _check_direction(direction)
    layer_list = list(range(patcher.n_layers)) if layers is None else sorted({int(x) for x in layers})
    head_list = list(range(patcher.n_heads)) if heads is None else sorted({int(x) for x in heads})
    last = last_positions(patcher.layout)

    def score(logits: Tensor) -> list[float]:
        return [float(v) for v in metric(logits, last).float().cpu()]

    log = None
    header: dict[str, Any] | None = None
    done: dict[tuple, list[float]] = {}
    if checkpoint is not None:
        log = ResumableLog(Path(checkpoint), "patching sweep",
                           _arguments(patcher, metric, sites, items, layer_list, head_list, directions))
        header, records = log.open()
        done = {tuple(r["key"]): r["metric"] for r in records}
    if header is None:
        baseline = score(patcher.collect(eah=False)[1])
        eah = score(patcher.collect(eah=True)[1])
        if log is not None:
            log.start(baseline=baseline, eah=eah)
    else:
        baseline, eah = header["baseline"], header["eah"]
    base_mean, eah_mean = sum(baseline) / len(baseline), sum(eah) / len(eah)
    # An effect this small is float rounding (an edited layer runs eager attention, the baseline SDPA).
    if math.isclose(eah_mean, base_mean, rel_tol=1e-6, abs_tol=1e-6):
        warnings.warn(
            "EAH does not change the metric on these inputs (|eah - baseline| is within float rounding, 1e-6): "
            "normalised effects are NaN. Check the config (threshold, layers) with eah_interp.hf.eah(...) records.",
            stacklevel=2,
        )
    tasks = [
        (direction, site, layer, head, label, group)
        for direction in directions for site in sites for layer in layer_list
        for head in (head_list if site == "head" else [None]) for label, group in items
    ]
    values: list[list[float]] = []
    todo = sum((d, s, la, h, lb) not in done for d, s, la, h, lb, _ in tasks)
    with tqdm(total=len(tasks), initial=len(tasks) - todo, desc="patching", unit="patch", disable=not progress) as bar:
        for direction, site, layer, head, label, group in tasks:
            key = (direction, site, layer, head, label)
            if key not in done:
                done[key] = score(run_with_patches(patcher, [Patch(site, layer, head, group)], direction))
                if log is not None:
                    log.append({"key": list(key), "metric": done[key]})
                bar.update()
            values.append(done[key])
    frame = _per_example_frame(tasks, values, baseline, eah)
    if not per_example:
        frame = summarise(frame)
    frame.attrs.update(baseline_metric=base_mean, eah_metric=eah_mean, config=patcher.config.to_dict(), metric=repr(metric))
    return frame


def _per_example_frame(tasks, values, baseline: list[float], eah: list[float]) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    n = len(baseline)
    base, treated = np.asarray(baseline, dtype=float), np.asarray(eah, dtype=float)
    change = treated - base
    scale = np.where(np.isclose(treated, base, rtol=1e-6, atol=1e-6), np.nan, change)
    rows = []
    for (direction, site, layer, head, label, _), metric in zip(tasks, values, strict=True):
        effect = np.asarray(metric, dtype=float) - base
        for example in range(n):
            rows.append((direction, site, layer, head, label, example, metric[example], base[example],
                         treated[example], effect[example], effect[example] / scale[example]))
    frame = pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))
    frame["head"] = frame["head"].astype("Int64")
    return frame


def summarise(per_example: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """The batch summary of a per-example table: means, normalised effect and its bootstrap interval.

    ``normalised_effect = (mean(metric) - mean(baseline)) / (mean(eah) - mean(baseline))`` (NaN when the
    denominator is within float rounding, 1e-6). Its 95% interval is the percentile bootstrap over batch
    rows (`N_BOOTSTRAP` resamples of the rows, the same resamples for every patch, numerator and
    denominator resampled together), reported when the batch has at least `MIN_CI_EXAMPLES` rows.

    Args:
        per_example: a table with `EXAMPLE_COLUMNS` (``sweep(..., per_example=True)``).
        seed: the bootstrap's random seed.

    Returns:
        One row per patch with `COLUMNS`, in the order of the per-example table.
    """
    import numpy as np
    import pandas as pd

    groups = per_example.groupby(list(KEY), sort=False, dropna=False)
    n = int(groups.size().max()) if len(per_example) else 0
    resamples = np.random.default_rng(seed).integers(0, n, size=(N_BOOTSTRAP, n)) if n >= MIN_CI_EXAMPLES else None
    rows = []
    for key, sub in groups:
        sub = sub.sort_values("example")
        metric, base, eah = (sub[c].to_numpy(dtype=float) for c in ("metric", "baseline_metric", "eah_metric"))
        m, b, e = metric.mean(), base.mean(), eah.mean()
        denominator = e - b
        no_effect = math.isclose(e, b, rel_tol=1e-6, abs_tol=1e-6)
        effect = float("nan") if no_effect else (m - b) / denominator
        low = high = float("nan")
        if resamples is not None and not no_effect and len(sub) == n:
            boot = (metric - base)[resamples].mean(1) / (eah - base)[resamples].mean(1)
            low, high = (float(x) for x in np.nanpercentile(boot, [2.5, 97.5]))
        rows.append((*key, m, effect, b, e, len(sub), low, high))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["head"] = frame["head"].astype("Int64")
    return frame


def patch_nnsight(
    nn_model: Any, inputs: dict[str, Tensor], config: EAH, metric: Metric | tuple[int, int], *,
    layout: TokenLayout | None = None, **options: Any,
) -> pd.DataFrame:
    """`sweep` with an `NNsightPatcher` (``options``: those of `sweep`)."""
    return sweep(NNsightPatcher(nn_model, inputs, config, layout), metric, **options)


def patch_lens(
    bridge: Any, inputs: dict[str, Tensor], config: EAH, metric: Metric | tuple[int, int], *,
    layout: TokenLayout | None = None, **options: Any,
) -> pd.DataFrame:
    """`sweep` with a `LensPatcher` (``options``: those of `sweep`)."""
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
