"""Activation patching of any intervention: which components carry the change a treatment makes to an answer.

Two runs of the same inputs are compared: the **baseline** and the **treatment**, each the model with
a list of interventions applied (`eah_interp.interventions`: ``[EAH.paper()]``, ``[PAI()]``,
``[EAH.paper(), PAI()]``, ...; an empty list is the plain model, the default baseline). A *patch*
copies one site's activation, at a group of positions, from one run into the other, and the metric
(default: the yes-minus-no logit difference at the last real position) is measured on the patched run:

* ``"treatment_into_baseline"`` (sufficiency): the baseline run receives the treatment's activation. An
  effect near 1 means this site alone carries the change the treatment makes to the metric.
* ``"baseline_into_treatment"`` (necessity): the treatment run receives the baseline's activation. An
  effect near 0 means the change cannot happen without this site (restoring it undoes the treatment);
  one minus the effect is the share of the change that restoring the site undoes.

``normalised_effect = (patched - baseline) / (treatment - baseline)`` in both directions, so 0 is the
baseline metric and 1 the treatment's. The metric is measured per example (batch row): `sweep` can
return the per-example values (``per_example=True``), and its batch summary is computed from them
(`summarise`: means, and a bootstrap confidence interval of the normalised effect when the batch has
at least `MIN_CI_EXAMPLES` rows).

Sites are those of `eah_interp.sites` (``resid``, ``attn_out``, ``mlp_out``, ``head``); positions any
name of `eah_interp.layout.GROUPS` or a ``Bool[batch, seq]`` mask (`eah_interp.sites.resolve_positions`);
`sweep` patches the `POSITION_GROUPS` by default.

A long sweep shows a progress bar with a time estimate, and with ``checkpoint=PATH`` appends each
finished patch to a `eah_interp.resumable.ResumableLog`: rerun with the same arguments, it skips what
is done; with other arguments (other interventions on either side included), it refuses the file.

One engine (`Patcher`: the two runs, the donors, the patches), three backends sharing the sweep and the
tables: `HFPatcher` (plain PyTorch hooks, interventions by `eah_interp.hf.intervene`), `NNsightPatcher`
(nnsight envoy reads and writes, interventions by `eah_interp.nnsight.intervene` in the same trace) and
`LensPatcher` (TransformerLens hooks, interventions by `eah_interp.transformer_lens.intervene`: the edit
points a bridge exposes). The tests check they agree.

Example:
    >>> metric = LogitDiff(yes=yes_id, no=no_id)
    >>> frame = sweep(HFPatcher(model, inputs, treatment=[PAI(alpha=0.5)]), metric)
    >>> plot_sites(frame, direction="treatment_into_baseline", positions="all")
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from eah_interp import compat
from eah_interp.errors import ConfigError, HeadIndexError, LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.interventions.compile import Plan, as_interventions
from eah_interp.layout import TokenLayout
from eah_interp.models.adapters import token_layout
from eah_interp.models.introspect import model_shape
from eah_interp.resumable import ResumableLog, tensor_digest
from eah_interp.sites import LAYER_SITES, READ_ORDER, SITES, check_sites, resolve_positions

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: The position groups `sweep` patches by default (any name of `eah_interp.layout.GROUPS`, or a mask, is accepted).
POSITION_GROUPS = ("image", "text", "last", "all")
#: Which run receives a patch: the baseline (from the treatment) or the treatment (from the baseline).
DIRECTIONS = ("treatment_into_baseline", "baseline_into_treatment")
#: What identifies one patch in the tables.
KEY = ("direction", "site", "layer", "head", "positions")
#: Columns of the batch summary `sweep` returns (`summarise`).
COLUMNS = (
    *KEY, "metric", "normalised_effect", "baseline_metric", "treatment_metric", "n_examples", "ci_low", "ci_high",
)
#: Columns of the per-example table (``sweep(..., per_example=True)``): one row per patch and batch row.
EXAMPLE_COLUMNS = (*KEY, "example", "metric", "baseline_metric", "treatment_metric", "effect", "normalised_effect")
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
    "HFPatcher",
    "LensPatcher",
    "LogitDiff",
    "NNsightPatcher",
    "Patch",
    "Patcher",
    "TokenLogProb",
    "last_positions",
    "plot_heads",
    "plot_sites",
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


# ---------------------------------------------------------------------------- patches
def last_positions(layout: TokenLayout) -> Int[Tensor, " batch"]:
    """Index of the last real (non-padding) token of each row."""
    pos = torch.arange(layout.seq_len, device=layout.attention_mask.device)
    return torch.where(layout.attention_mask, pos, -1).max(-1).values


@dataclass(frozen=True, eq=False)
class Patch:
    """One patched site: ``site`` of ``layer`` (and ``head`` for ``site="head"``) at ``positions``.

    ``positions`` is a name of `eah_interp.layout.GROUPS` or a ``Bool[batch, seq]`` mask over the
    patcher's layout (checked against it before the patched forward runs).
    """

    site: str
    layer: int
    head: int | None = None
    positions: str | Bool[Tensor, "batch seq"] = "all"

    def __post_init__(self) -> None:
        check_sites([self.site])
        if (self.site == "head") != (self.head is not None):
            raise ConfigError(f"A head index goes with site='head' and only with it; got {self}.")

    def __repr__(self) -> str:
        where = self.positions if isinstance(self.positions, str) else f"mask{tuple(self.positions.shape)}"
        head = "" if self.head is None else f", head={self.head}"
        return f"Patch({self.site!r}, layer={self.layer}{head}, positions={where!r})"


def _patched(current: Tensor, donor: Tensor, chosen: Sequence[tuple[int | None, Tensor]]) -> Tensor:
    """``current`` with the donor's values at each ``(head, mask)``'s positions (and head, ``[b, s, heads, d]``)."""
    out = current.clone()
    for head, where in chosen:
        cols = (slice(None), slice(None)) if head is None else (slice(None), slice(None), head)
        sel = where.to(out.device).view(*where.shape, *([1] * (out[cols].ndim - 2))).expand_as(out[cols])
        out[cols] = torch.where(sel, donor[cols].to(out), out[cols])
    return out


def _describe(item: Any) -> dict[str, Any]:
    return item.to_dict() if hasattr(item, "to_dict") else {"repr": repr(item)}


def _default_layout(model: Any, inputs: Mapping[str, Tensor], layout: TokenLayout | None) -> TokenLayout:
    if layout is not None:
        return layout
    if "input_ids" not in inputs:
        raise LayoutError("Cannot derive the token layout without input_ids: pass layout=TokenLayout(...).")
    return token_layout(model, inputs["input_ids"], inputs.get("attention_mask"))


# ---------------------------------------------------------------------------- the engine
Visit = Callable[[Tensor], "Tensor | None"]


class Patcher:
    """Two runs of the same inputs, ``baseline`` and ``treatment`` (each any intervention list), and patches
    between them; a backend only says how to run one forward with site visits (`_forward`).

    Attributes:
        inputs: the model inputs; layout: their `TokenLayout`; n_layers, n_heads: the language model's.
        treatment, baseline: the two intervention lists (``()``: the plain model).
    """

    def _setup(self, model: Any, inputs: Mapping[str, Tensor], treatment: Any, baseline: Any,
               layout: TokenLayout | None) -> None:
        """Sizes, layout and both lists from the HF model (checked against it: fails before any forward)."""
        self.inputs, self.treatment, self.baseline = dict(inputs), as_interventions(treatment), as_interventions(baseline)
        self.n_layers, self.n_heads, _ = model_shape(model)
        self.layout = _default_layout(model, self.inputs, layout)
        Plan.for_model(self.treatment + self.baseline, model)  # checks both lists against the model
        self._donors: dict[str, dict[tuple[str, int], Tensor]] = {}

    def _forward(self, side: str, visits: dict[tuple[str, int], Visit]) -> Float[Tensor, "batch seq vocab"]:
        """Logits of one run (``side``: ``"baseline"`` or ``"treatment"``), calling ``visits[(site, layer)](value)``
        at each site; a returned tensor replaces the value."""
        raise NotImplementedError

    def collect(self, side: str) -> tuple[dict[tuple[str, int], Tensor], Float[Tensor, "batch seq vocab"]]:
        """Every site's activation (keyed ``(site, layer)``) and the logits of the ``"baseline"`` / ``"treatment"`` run."""
        acts: dict[tuple[str, int], Tensor] = {}

        def keep(key: tuple[str, int]) -> Visit:
            def visit(value: Tensor) -> None:
                acts[key] = value.detach().clone()

            return visit

        logits = self._forward(side, {(s, la): keep((s, la)) for la in range(self.n_layers) for s in SITES})
        self._donors[side] = acts
        return acts, logits

    def run(self, patches: Sequence[Patch], direction: str) -> Float[Tensor, "batch seq vocab"]:
        """Logits of the run receiving ``patches`` (``direction`` says which run receives them)."""
        receiver = "baseline" if direction == "treatment_into_baseline" else "treatment"
        source = "treatment" if receiver == "baseline" else "baseline"
        by_key: dict[tuple[str, int], list[tuple[int | None, Tensor]]] = {}
        for patch in patches:  # bad masks fail here, before a forward
            by_key.setdefault((patch.site, patch.layer), []).append((patch.head, self.layout.group_mask(patch.positions)))
        donor = self._donors.get(source) or self.collect(source)[0]

        def swap(key: tuple[str, int], chosen: list) -> Visit:
            return lambda value: _patched(value, donor[key], chosen)

        return self._forward(receiver, {key: swap(key, chosen) for key, chosen in by_key.items()})

    def interventions(self, side: str) -> tuple[Any, ...]:
        return self.treatment if side == "treatment" else self.baseline

    def to_dict(self) -> dict[str, Any]:
        """The patcher type and both intervention lists (`to_dict()` of each), as the checkpoint header records them."""
        return {"patcher": type(self).__name__, "treatment": [_describe(i) for i in self.treatment],
                "baseline": [_describe(i) for i in self.baseline]}


class HFPatcher(Patcher):
    """Patching with plain PyTorch hooks on an HF model (`eah_interp.sites.hf_hooks`); interventions by
    `eah_interp.hf.intervene`.

    Args:
        model: an HF LVLM (or LM).
        inputs: the model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        treatment: the treatment run's interventions (a list, one, or ``[]`` for the plain model).
        baseline: the baseline run's interventions (default ``[]``: the plain model).
        layout: the prompt layout (default: from ``input_ids`` and the model's image token id).
    """

    def __init__(self, model: Any, inputs: Mapping[str, Tensor], treatment: Any, baseline: Any = (), *,
                 layout: TokenLayout | None = None) -> None:
        self.model = model
        self._setup(model, inputs, treatment, baseline, layout)

    def _forward(self, side: str, visits: dict[tuple[str, int], Visit]) -> Tensor:
        from eah_interp.hf import intervene
        from eah_interp.sites import hf_hooks

        items = self.interventions(side)
        with torch.no_grad(), intervene(self.model, items, self.layout), hf_hooks(self.model, visits):
            return self.model(**self.inputs, use_cache=False).logits


class NNsightPatcher(Patcher):
    """Patching as nnsight traces (`eah_interp.sites.NNsightSites` reads and writes); interventions by
    `eah_interp.nnsight.intervene` in the same trace, layer by layer between the site visits.

    Args:
        nn_model: ``nnsight.NNsight(hf_model)``.
        inputs, treatment, baseline, layout: as in `HFPatcher`.
    """

    def __init__(self, nn_model: Any, inputs: Mapping[str, Tensor], treatment: Any, baseline: Any = (), *,
                 layout: TokenLayout | None = None) -> None:
        from eah_interp.nnsight import hf_model
        from eah_interp.sites import NNsightSites

        self.nn_model, self._sites = nn_model, NNsightSites(nn_model)
        self._setup(hf_model(nn_model), inputs, treatment, baseline, layout)

    def _forward(self, side: str, visits: dict[tuple[str, int], Visit]) -> Tensor:
        from eah_interp.nnsight import intervene

        items, done = self.interventions(side), -1
        with torch.no_grad(), self.nn_model.trace(**self.inputs):
            for layer in sorted({layer for _, layer in visits}):
                if items:  # this layer's edits (and those of the layers before it) before its sites are read
                    intervene(self.nn_model, items, self.layout, layers=range(done + 1, layer + 1))
                done = layer
                for site in READ_ORDER:
                    visit = visits.get((site, layer))
                    if visit is not None and (new := visit(self._sites.read(site, layer))) is not None:
                        self._sites.write(site, layer, new)
            if items and done < self.n_layers - 1:
                intervene(self.nn_model, items, self.layout, layers=range(done + 1, self.n_layers))
            logits = self.nn_model.output.logits.save()
        return logits


class LensPatcher(Patcher):
    """Patching as TransformerLens hooks on a `TransformerBridge` (`eah_interp.sites.LENS_HOOKS`).

    Interventions: those whose edit points a bridge exposes (`eah_interp.transformer_lens.intervene`); the
    others (pre-mask score edits, value edits) raise, naming the patchers that apply them.

    Args:
        bridge: from `eah_interp.transformer_lens.boot_bridge`.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...; a
            language-model-only bridge builds the embeddings itself), or a float ``inputs_embeds`` with
            ``attention_mask`` (then pass ``layout``).
        treatment, baseline, layout: as in `HFPatcher`.
    """

    def __init__(self, bridge: Any, inputs: Mapping[str, Tensor], treatment: Any, baseline: Any = (), *,
                 layout: TokenLayout | None = None) -> None:
        from eah_interp.sites import lens_hook_name
        from eah_interp.transformer_lens import lvlm_of  # the LVLM also behind a language-model-only bridge

        self.bridge = bridge
        self._setup(lvlm_of(bridge), inputs, treatment, baseline, layout)
        names = set(compat.bridge_hook_names(bridge))
        if missing := [lens_hook_name(s, 0) for s in SITES if lens_hook_name(s, 0) not in names]:
            raise UnsupportedModelError(f"The bridge has no hook(s) {missing}; patching needs one per site of {SITES}.")
        for side in ("treatment", "baseline"):
            self._edit_hooks(side)  # refuse what cannot be applied before any forward

    def _edit_hooks(self, side: str) -> list:
        from eah_interp.transformer_lens import intervene

        return intervene(self.bridge, self.interventions(side), self.layout)[0]

    def _forward(self, side: str, visits: dict[tuple[str, int], Visit]) -> Tensor:
        from eah_interp.sites import lens_hook_name

        kwargs = dict(self.inputs)
        first = kwargs.pop("inputs_embeds", None)
        if first is None:
            first = kwargs.pop("input_ids")
        hooks = self._edit_hooks(side) + [
            (lens_hook_name(site, layer), lambda value, hook, visit=visit: visit(value))
            for (site, layer), visit in visits.items()
        ]
        with torch.no_grad():
            return self.bridge.run_with_hooks(first, fwd_hooks=hooks, return_type="logits", **kwargs)


# ---------------------------------------------------------------------------- the sweep
def _layers_and_heads(layers: Iterable[int] | None, heads: Iterable[int] | None, n_layers: int,
                      n_heads: int) -> tuple[list[int], list[int]]:
    """Sorted layer and head lists (None: all), refused before any forward when one is out of range."""
    layer_list = list(range(n_layers)) if layers is None else sorted({int(x) for x in layers})
    head_list = list(range(n_heads)) if heads is None else sorted({int(x) for x in heads})
    if bad := [x for x in layer_list if not 0 <= x < n_layers]:
        raise LayerIndexError(f"Layers {bad} out of range: the language model has {n_layers} layers (0..{n_layers - 1}).")
    if bad := [x for x in head_list if not 0 <= x < n_heads]:
        raise HeadIndexError(f"Heads {bad} out of range: the language model has {n_heads} heads (0..{n_heads - 1}).")
    return layer_list, head_list


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


def _metric_name(metric: Metric) -> str:
    """A stable name of the metric (a dataclass's repr; else its qualified name, never a memory address)."""
    if dataclasses.is_dataclass(metric):
        return repr(metric)
    kind = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    return f"{kind.__module__}.{kind.__qualname__}"


def _arguments(patcher: Patcher, metric: Metric, sites, masks, layers, heads, directions) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the inputs, layout, both intervention lists, metric and patches."""
    return {
        **patcher.to_dict(),
        "model": [patcher.n_layers, patcher.n_heads],
        "metric": _metric_name(metric),
        "inputs": {k: tensor_digest(v) for k, v in sorted(patcher.inputs.items()) if isinstance(v, Tensor)},
        "layout": [tensor_digest(patcher.layout.image_mask), tensor_digest(patcher.layout.attention_mask)],
        "sites": list(sites),
        "positions": [[label, tensor_digest(mask)] for label, mask in masks.items()],
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
    progress: bool | None = None,
) -> pd.DataFrame:
    """Patch one site at a time, in each direction, and tabulate the metric per example and for the batch.

    Args:
        patcher: `HFPatcher`, `NNsightPatcher` or `LensPatcher`.
        metric: `LogitDiff`, `TokenLogProb`, any ``(logits, last) -> [batch]`` callable, or a
            ``(yes_id, no_id)`` pair.
        sites, directions: subsets of `SITES`, `DIRECTIONS`.
        positions: names of `eah_interp.layout.GROUPS` and/or ``Bool[batch, seq]`` masks (labelled
            ``"mask0"``, ``"mask1"``, ... in the table), or a mapping ``{label: name or mask}``
            (`eah_interp.sites.resolve_positions`).
        layers: decoder layers to patch (default: all).
        heads: heads patched for ``site="head"`` (default: all).
        per_example: return the per-example table (`EXAMPLE_COLUMNS`) instead of the batch summary.
        checkpoint: a JSONL file (`eah_interp.resumable.ResumableLog`) to which each finished patch is
            appended; rerun with the same arguments, the sweep skips what the file holds (the baseline
            and treatment metrics included); a file written with other arguments is refused.
        progress: a progress bar with a time estimate (tqdm); None: only when stderr is a terminal.

    Returns:
        The batch summary with `COLUMNS` (`summarise` of the per-example table): one row per (direction,
        site, layer, head, positions); ``head`` is ``<NA>`` for layer sites; ``metric``,
        ``baseline_metric``, ``treatment_metric`` are batch means; ``normalised_effect`` is ``(metric -
        baseline_metric) / (treatment_metric - baseline_metric)``; ``ci_low``/``ci_high`` its 95% bootstrap
        interval over the batch rows (NaN below `MIN_CI_EXAMPLES` rows). With ``per_example=True``, the
        per-example table instead. ``frame.attrs`` holds the baseline and treatment batch means, both
        intervention lists and the metric.

    Raises:
        ConfigError: an unknown site or direction, or a checkpoint of other arguments.
        LayoutError: an unknown position group, or a mask that does not fit the patcher's layout.
    """
    metric = _as_metric(metric)
    check_sites(sites)
    masks = resolve_positions(patcher.layout, positions)
    for direction in directions:
        _check_direction(direction)
    layer_list, head_list = _layers_and_heads(layers, heads, patcher.n_layers, patcher.n_heads)
    last = last_positions(patcher.layout)

    def score(logits: Tensor) -> list[float]:
        return [float(v) for v in metric(logits, last).float().cpu()]

    log = None
    header: dict[str, Any] | None = None
    done: dict[tuple, list[float]] = {}
    if checkpoint is not None:
        log = ResumableLog(Path(checkpoint), "patching sweep",
                           _arguments(patcher, metric, sites, masks, layer_list, head_list, directions))
        header, records = log.open()
        done = {tuple(r["key"]): r["metric"] for r in records}
    if header is None:
        baseline = score(patcher.collect("baseline")[1])
        treatment = score(patcher.collect("treatment")[1])
        if log is not None:
            log.start(baseline=baseline, treatment=treatment)
    else:
        baseline, treatment = header["baseline"], header["treatment"]
    base_mean, treatment_mean = sum(baseline) / len(baseline), sum(treatment) / len(treatment)
    # An effect this small is float rounding (an edited layer may run eager attention, the other run SDPA).
    if math.isclose(treatment_mean, base_mean, rel_tol=1e-6, abs_tol=1e-6):
        warnings.warn(
            "The treatment does not change the metric on these inputs (|treatment - baseline| is within float "
            "rounding, 1e-6): normalised effects are NaN. Check the interventions (threshold, layers) with "
            "eah_interp.hf.intervene(...) records.",
            stacklevel=2,
        )
    tasks = [
        (direction, site, layer, head, label)
        for direction in directions for site in sites for layer in layer_list
        for head in (head_list if site == "head" else [None]) for label in masks
    ]
    values: list[list[float]] = []
    todo = sum(task not in done for task in tasks)
    with tqdm(total=len(tasks), initial=len(tasks) - todo, desc="patching", unit="patch", 
              disable=None if progress is None else not progress) as bar:
        for direction, site, layer, head, label in tasks:
            key = (direction, site, layer, head, label)
            if key not in done:
                done[key] = score(run_with_patches(patcher, [Patch(site, layer, head, masks[label])], direction))
                if log is not None:
                    log.append({"key": list(key), "metric": done[key]})
                bar.update()
            values.append(done[key])
    frame = _per_example_frame(tasks, values, baseline, treatment)
    if not per_example:
        frame = summarise(frame)
    frame.attrs.update(baseline_metric=base_mean, treatment_metric=treatment_mean, metric=repr(metric),
                       **{k: v for k, v in patcher.to_dict().items() if k != "patcher"})
    return frame


def _per_example_frame(tasks, values, baseline: list[float], treatment: list[float]) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    n = len(baseline)
    base, treated = np.asarray(baseline, dtype=float), np.asarray(treatment, dtype=float)
    change = treated - base
    scale = np.where(np.isclose(treated, base, rtol=1e-6, atol=1e-6), np.nan, change)
    rows = []
    for (direction, site, layer, head, label), metric in zip(tasks, values, strict=True):
        effect = np.asarray(metric, dtype=float) - base
        for example in range(n):
            rows.append((direction, site, layer, head, label, example, metric[example], base[example],
                         treated[example], effect[example], effect[example] / scale[example]))
    frame = pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))
    frame["head"] = frame["head"].astype("Int64")
    return frame


def summarise(per_example: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """The batch summary of a per-example table: means, normalised effect and its bootstrap interval.

    ``normalised_effect = (mean(metric) - mean(baseline)) / (mean(treatment) - mean(baseline))`` (NaN when the
    denominator is within float rounding, 1e-6). Its 95% interval is the percentile bootstrap over batch
    rows (`N_BOOTSTRAP` resamples of the rows, the same resamples for every patch, numerator and
    denominator resampled together), reported when the batch has at least `MIN_CI_EXAMPLES` rows.

    Args:
        per_example: a table with `EXAMPLE_COLUMNS` (``sweep(..., per_example=True)``).
        seed: the bootstrap's random seed.

    Returns:
        One row per patch with `COLUMNS`, in the order of the per-example table.
    """
    import pandas as pd

    from eah_interp.metrics.stats import ratio_ci

    groups = per_example.groupby(list(KEY), sort=False, dropna=False)
    n = int(groups.size().max()) if len(per_example) else 0
    rows = []
    for key, sub in groups:
        sub = sub.sort_values("example")
        metric, base, treated = (sub[c].to_numpy(dtype=float) for c in ("metric", "baseline_metric", "treatment_metric"))
        m, b, e = metric.mean(), base.mean(), treated.mean()
        denominator = e - b
        no_effect = math.isclose(e, b, rel_tol=1e-6, abs_tol=1e-6)
        effect = float("nan") if no_effect else (m - b) / denominator
        low = high = float("nan")
        if n >= MIN_CI_EXAMPLES and not no_effect and len(sub) == n:  # the same seed: the same resamples for every patch
            interval = ratio_ci(metric - base, treated - base, n_resamples=N_BOOTSTRAP, seed=seed)
            low, high = interval.low, interval.high
        rows.append((*key, m, effect, b, e, len(sub), low, high))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["head"] = frame["head"].astype("Int64")
    return frame


# ---------------------------------------------------------------------------- plots
def _heatmap(data, row_labels, col_labels, xlabel: str, title: str, ax=None, *, label: str = "normalised effect",
             min_limit: float = 1.0) -> Figure:
    """Layer (rows) x ``col_labels`` heatmap on a diverging scale centred on 0, ``±max(min_limit, max |data|)``."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        fig, ax = plt.subplots(figsize=(1.6 + 0.6 * len(col_labels), 1.2 + 0.3 * len(row_labels)))
    else:
        fig = ax.figure
    finite = np.abs(data[np.isfinite(data)])
    limit = max(min_limit, float(finite.max())) if finite.size else 1.0
    im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def plot_sites(frame: pd.DataFrame, direction: str = "treatment_into_baseline", positions: str = "all", ax=None) -> Figure:
    """Heatmap of the normalised effect, layer (rows) x layer site (columns), for one direction and position group."""
    sub = frame[(frame.direction == direction) & (frame.positions == positions) & frame.site.isin(LAYER_SITES)]
    if sub.empty:
        raise ConfigError(f"No layer-site rows for direction={direction!r}, positions={positions!r} in the frame.")
    table = sub.pivot_table(index="layer", columns="site", values="normalised_effect", dropna=False)
    table = table[[s for s in LAYER_SITES if s in table.columns]]
    return _heatmap(table.to_numpy(), list(table.index), list(table.columns), "site",
                    f"{direction}, positions={positions}", ax)


def plot_heads(frame: pd.DataFrame, direction: str = "treatment_into_baseline", positions: str = "all", ax=None) -> Figure:
    """Heatmap of the normalised effect of patching single heads, layer (rows) x head (columns)."""
    sub = frame[(frame.direction == direction) & (frame.positions == positions) & (frame.site == "head")]
    if sub.empty:
        raise ConfigError(f"No head rows for direction={direction!r}, positions={positions!r} in the frame.")
    table = sub.astype({"head": int}).pivot_table(index="layer", columns="head", values="normalised_effect", dropna=False)
    return _heatmap(table.to_numpy(), list(table.index), list(table.columns), "head",
                    f"heads, {direction}, positions={positions}", ax)
