"""Attribution patching and direct logit attribution: where an intervention's change to an answer goes, fast.

**Attribution patching** (gradient x activation difference; Nanda 2023, "Attribution patching:
activation patching at industrial scale"; Syed et al. 2023, "Attribution patching outperforms automated
circuit discovery") estimates every row of an activation-patching sweep (`eah_interp.patching.sweep`)
from one forward and one backward pass per run. For a site activation ``a`` (at a group of positions,
and one head's slice for ``site="head"``) and the metric ``m``:

* ``treatment_into_baseline``: ``m(base with a_treat) ≈ m_base + sum((a_treat - a_base) * ∂m/∂a |_base)``;
* ``baseline_into_treatment``: ``m(treat with a_base) ≈ m_treat + sum((a_base - a_treat) * ∂m/∂a |_treat)``,

the sums running over the group's positions and the site's features. It is the first-order Taylor
expansion of activation patching around the receiving run: exact where the metric is linear in the
site (e.g. the last layer's outputs with a linear read-out), an approximation elsewhere (attention
saturation, norms and large activation differences bend it). `agreement` measures how far it is
from activation patching on given inputs; do not trust a ranking it has not been checked on (on the
organism it ranks heads downstream of the edit well and the edited layer's own heads poorly: see
docs/benchmarks.md).

The treatment and the baseline are any intervention lists `eah_interp.hf.intervene` accepts
(``[EAH(...), PAI(...)]``, ...; the baseline's default ``[]`` is the plain model); the two runs and their
backward passes use plain PyTorch hooks on the HF model (`eah_interp.sites.hf_hooks`). The gradient of
an edit's discrete choices (EAH's source head, sink sets) is zero: they are held at the run's values.

Sites, position groups, directions and the tables (per-example rows and the `patching.summarise`
batch summary) are those of `eah_interp.patching`, so `patching.plot_heads` / `patching.plot_sites`
draw both kinds of table, and `agreement` compares them.

**Direct logit attribution** (`direct_logit_attribution`) splits a logit difference at the last
position into the residual stream's additive parts: the embedding (layer 0's input, image features
included), every layer's attention output (and each head's share: its slice of ``o_proj``'s input
times its columns of ``o_proj``) and MLP output, through the final norm with its scale **frozen** at the
value of the actual run. With the scale frozen the norm is linear, so the parts sum exactly to the
metric; the price is that a part's number is what it adds *at this run's norm scale*, not what removing
it would do (removing a part changes the scale, and later layers' inputs).

Example:
    >>> frame = attribution_patching(model, inputs, [EAH.paper(threshold=0.01)], LogitDiff(yes, no))
    >>> patching.plot_heads(frame, direction="treatment_into_baseline", positions="last")
    >>> dla = direct_logit_attribution(model, inputs, (yes, no), interventions=[EAH.paper(threshold=0.01)])
    >>> plot_dla(dla)
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from eah_interp.errors import ConfigError, UnsupportedModelError
from eah_interp.hf import intervene
from eah_interp.interventions.compile import as_interventions
from eah_interp.layout import TokenLayout
from eah_interp.models.introspect import model_shape, text_config
from eah_interp.patching import (
    COLUMNS,
    DIRECTIONS,
    EXAMPLE_COLUMNS,
    POSITION_GROUPS,
    SITES,
    LogitDiff,
    Metric,
    _as_metric,
    _default_layout,
    _describe,
    _heatmap,
    _layers_and_heads,
    _per_example_frame,
    last_positions,
    summarise,
)
from eah_interp.sites import check_sites, hf_hooks, hf_module, resolve_positions

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Columns of `attribution_patching`'s batch summary: `eah_interp.patching.COLUMNS` plus ``method``.
ATTRIBUTION_COLUMNS = (*COLUMNS, "method")
#: Columns of its per-example table: `eah_interp.patching.EXAMPLE_COLUMNS` plus ``method``.
ATTRIBUTION_EXAMPLE_COLUMNS = (*EXAMPLE_COLUMNS, "method")
#: Columns of `direct_logit_attribution`'s table (``example`` first with ``per_example``).
DLA_COLUMNS = ("condition", "component", "layer", "head", "contribution", "metric")
#: DLA components: ``embed`` + per layer ``attn`` and ``mlp`` sum to the metric (plus a ``bias`` row for
#: the norm's / unembedding's biases, if the model has any); ``head`` rows (and ``attn_bias``, o_proj's
#: bias, if any) split each layer's ``attn`` row.
DLA_COMPONENTS = ("embed", "attn", "mlp", "bias", "head", "attn_bias")

__all__ = [
    "ATTRIBUTION_COLUMNS",
    "ATTRIBUTION_EXAMPLE_COLUMNS",
    "DLA_COLUMNS",
    "DLA_COMPONENTS",
    "agreement",
    "attribution_patching",
    "direct_logit_attribution",
    "plot_dla",
]


# ---------------------------------------------------------------------------- shared helpers
@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters need no gradient here (only activations do): turned off inside, restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (float64 stays float64): sums of products in half precision lose digits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@dataclass
class _Run:
    """One run's site activations, metric per row and (optionally) the metric's gradient at every site."""

    acts: dict[tuple[str, int], Tensor]
    grads: dict[tuple[str, int], Tensor]
    metric: Float[Tensor, " batch"]


def _run(
    model: nn.Module, inputs: Mapping[str, Tensor], interventions: tuple[Any, ...], metric: Metric, last: Tensor,
    keys: Sequence[tuple[str, int]], layout: TokenLayout, *, grad: bool,
) -> _Run:
    """One forward (and backward if ``grad``) with every chosen site captured; hooks removed on exit."""
    store: dict[tuple[str, int], Tensor] = {}

    def keep(key: tuple[str, int]):
        return lambda value: store.__setitem__(key, value)

    visits = {key: keep(key) for key in keys}
    if grad:  # the graph starts at layer 0's input (parameters need no gradient)
        visits = {("residual_input", 0): lambda hidden: hidden.detach().requires_grad_(True), **visits}
    with _frozen_parameters(model), intervene(model, interventions, layout), torch.set_grad_enabled(grad), \
            hf_hooks(model, visits):
        logits = model(**inputs, use_cache=False).logits
        values = metric(logits, last.to(logits.device))
        grads: dict[tuple[str, int], Tensor] = {}
        if grad:
            live = [k for k in keys if store[k].requires_grad]  # a site the metric cannot depend on: gradient 0
            found = torch.autograd.grad(values.sum(), [store[k] for k in live], allow_unused=True) if live else ()
            grads = {k: torch.zeros_like(store[k]) for k in keys}
            grads.update({k: g.detach() for k, g in zip(live, found, strict=True) if g is not None})
    return _Run({k: v.detach() for k, v in store.items()}, grads, _wide(values.detach()))


def _per_position(donor: Tensor, receiver: Tensor, grad: Tensor) -> Float[Tensor, "batch seq *heads"]:
    """``(donor - receiver) * grad`` summed over features: ``[batch, seq]``, or ``[batch, seq, heads]`` for heads."""
    return ((_wide(donor) - _wide(receiver)) * _wide(grad)).sum(-1)


# ---------------------------------------------------------------------------- attribution patching
def attribution_patching(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    treatment: Any = None,
    metric: Metric | tuple[int, int] | None = None,
    *,
    baseline: Any = (),
    layout: TokenLayout | None = None,
    sites: Sequence[str] = SITES,
    positions: str | Tensor | Mapping[str, str | Tensor] | Sequence[str | Tensor] = POSITION_GROUPS,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    directions: Sequence[str] = DIRECTIONS,
    per_example: bool = False,
) -> pd.DataFrame:
    """Estimate every row of an activation-patching sweep from one forward + backward per run.

    Args:
        model: an HF LVLM (the ``hf`` backend: its decoder layers need ``self_attn.o_proj`` and ``mlp``).
        inputs: model inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...), ``[batch, seq]``.
        treatment: the treatment run's interventions (anything `eah_interp.hf.intervene` accepts: one, a
            list). Default: ``[EAH.paper(...)]`` with the threshold of `eah_interp.models.default_threshold`
            for the prompt's image-token count.
        metric: ``(logits [batch, seq, vocab], last [batch]) -> [batch]`` (`LogitDiff`, `TokenLogProb`,
            ...) or a ``(yes_id, no_id)`` pair. Required.
        baseline: the baseline run's interventions (default ``[]``: the plain model).
        layout: the prompt layout (default: from ``input_ids`` and the model's image token id).
        sites: subset of `eah_interp.sites.SITES`.
        positions: group name(s) and/or ``Bool[batch, seq]`` masks (`eah_interp.sites.resolve_positions`).
        layers: decoder layers (default: all).
        heads: heads for ``site="head"`` (default: all).
        directions: subset of `eah_interp.patching.DIRECTIONS`.
        per_example: return the per-example table (`ATTRIBUTION_EXAMPLE_COLUMNS`, one row per patch and
            batch row) instead of the batch summary.

    Returns:
        The tables of `eah_interp.patching.sweep`, with ``metric`` the *estimated* metric of the patched
        run and a column ``method = "attribution"``: the batch summary (`ATTRIBUTION_COLUMNS`:
        `eah_interp.patching.summarise` of the per-example table, so ``normalised_effect = (mean metric -
        mean baseline) / (mean treatment - mean baseline)`` with its bootstrap interval from 10 rows), or the
        per-example table (``effect = metric - baseline_metric`` and ``normalised_effect`` per row, as
        in patching). ``frame.attrs`` holds the two runs' mean metrics, both intervention lists and the metric.
    """
    if metric is None:
        raise ConfigError("attribution_patching needs a metric: LogitDiff(yes=..., no=...), TokenLogProb(...) or (yes_id, no_id).")
    metric = _as_metric(metric)
    check_sites(sites)
    if unknown := [x for x in directions if x not in DIRECTIONS]:
        raise ConfigError(f"Unknown direction(s) {unknown}; choose from {DIRECTIONS}.")
    layout = _default_layout(model, inputs, layout)
    masks = resolve_positions(layout, positions)
    n_layers, n_heads, _ = model_shape(model)
    layer_list, head_list = _layers_and_heads(layers, heads, n_layers, n_heads)
    if treatment is None:
        from eah_interp.interventions import EAH
        from eah_interp.models import default_threshold

        treatment = [EAH.paper(threshold=default_threshold(int(layout.n_image_tokens.max())))]
    treatment, baseline = as_interventions(treatment), as_interventions(baseline)
    last = last_positions(layout)
    keys = [(site, layer) for site in sites for layer in layer_list]
    base = _run(model, inputs, baseline, metric, last, keys, layout, grad="treatment_into_baseline" in directions)
    treated = _run(model, inputs, treatment, metric, last, keys, layout, grad="baseline_into_treatment" in directions)

    tasks: list[tuple] = []  # (direction, site, layer, head, positions) of each estimated patch
    values: list[list[float]] = []  # its estimated metric per example: the receiving run's plus the estimate
    for direction in directions:
        receiver, donor = (base, treated) if direction == "treatment_into_baseline" else (treated, base)
        for site, layer in keys:
            per_pos = _per_position(donor.acts[(site, layer)], receiver.acts[(site, layer)], receiver.grads[(site, layer)])
            for group, where in masks.items():
                weight = where.to(per_pos.device, per_pos.dtype)  # sites may sit on other devices
                if site == "head":
                    estimate = torch.einsum("bsh,bs->bh", per_pos, weight)
                    estimates = [(head, estimate[:, head]) for head in head_list]
                else:
                    estimates = [(None, (per_pos * weight).sum(-1))]
                for head, change in estimates:
                    tasks.append((direction, site, layer, head, group))
                    values.append((receiver.metric + change.to(receiver.metric)).tolist())
    frame = _per_example_frame(tasks, values, base.metric.tolist(), treated.metric.tolist()).assign(method="attribution")
    baseline_mean, treatment_mean = float(base.metric.mean()), float(treated.metric.mean())
    if not per_example:
        frame = summarise(frame).assign(method="attribution")
    if math.isclose(treatment_mean, baseline_mean, rel_tol=1e-6, abs_tol=1e-6):
        warnings.warn(
            "The treatment does not change the metric on these inputs (|treatment - baseline| <= 1e-6): normalised "
            "effects are NaN; the metric column still holds the estimates.",
            stacklevel=2,
        )
    frame.attrs.update(
        baseline_metric=baseline_mean, treatment_metric=treatment_mean, method="attribution", metric=repr(metric),
        treatment=[_describe(item) for item in treatment], baseline=[_describe(item) for item in baseline],
    )
    return frame


# ---------------------------------------------------------------------------- agreement
def _effects(frame: pd.DataFrame) -> pd.Series:
    """The change each row's patch makes to its receiving run's metric (from the `COLUMNS` every table has)."""
    receiver = frame["baseline_metric"].where(frame["direction"] == "treatment_into_baseline", frame["treatment_metric"])
    return frame["metric"] - receiver


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (sums / counts)[inverse]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _scores(a: Tensor, b: Tensor, atol: float) -> dict[str, float]:
    keep = (a.abs() > atol) | (b.abs() > atol)
    a, b = a[keep], b[keep]
    n = int(keep.sum())
    if n < 2:
        return {"n": n, "n_trivial": int((~keep).sum()), "pearson": math.nan, "spearman": math.nan,
                "sign_agreement": math.nan}
    return {
        "n": n,
        "n_trivial": int((~keep).sum()),
        "pearson": _pearson(a, b),
        "spearman": _pearson(_ranks(a), _ranks(b)),
        "sign_agreement": float((torch.sign(a) == torch.sign(b)).double().mean()),
    }


def agreement(
    attribution_frame: pd.DataFrame, activation_frame: pd.DataFrame, *, atol: float = 1e-6,
    by: Sequence[str] = ("direction", "site"),
) -> dict[str, Any]:
    """How well attribution patching estimates activation patching, row by row.

    Rows are matched on (direction, site, layer, head, positions[, example]) and compared on their
    *effect*: the change the patch makes to the receiving run's metric (``metric - baseline_metric``
    for ``treatment_into_baseline``, ``metric - treatment_metric`` for ``baseline_into_treatment``), so the two directions'
    different offsets do not inflate the correlation. Rows where both effects are within ``atol``
    (sites before the edited layer: exactly 0 in both) are left out and counted in ``n_trivial``.

    Args:
        attribution_frame: from `attribution_patching`.
        activation_frame: from `eah_interp.patching.sweep` (same inputs).
        atol: effects this small count as zero.
        by: key columns to break the scores down by (e.g. ``("layer", "positions")`` as well).

    Returns:
        ``{"n", "n_trivial", "pearson", "spearman", "sign_agreement", "matched", "by_direction": {...},
        "by_site": {...}}`` (one ``by_<column>`` per ``by``, keyed by the column's values);
        ``sign_agreement`` is the share of rows whose effects have the same sign.

    Raises:
        ConfigError: a frame holds two rows with the same key (e.g. per-batch frames concatenated with
            ``example`` restarting at 0): they would be matched many to many.
    """
    keys = ["direction", "site", "layer", "head", "positions"]
    if "example" in attribution_frame.columns and "example" in activation_frame.columns:
        keys.append("example")
    for name, frame in (("attribution_frame", attribution_frame), ("activation_frame", activation_frame)):
        duplicated = frame.duplicated(subset=keys, keep=False)
        if duplicated.any():
            first = frame.loc[duplicated, keys].iloc[0].to_dict()
            raise ConfigError(
                f"{name} has {int(duplicated.sum())} rows that share a key ({', '.join(keys)}), e.g. {first}: matching "
                "them would pair every copy with every other one. Give each example one id across batches (e.g. "
                "add the batch's offset to `example` when concatenating per-batch frames), or aggregate first."
            )
    left = attribution_frame.assign(_effect=_effects(attribution_frame))[[*keys, "_effect"]]
    right = activation_frame.assign(_effect=_effects(activation_frame))[[*keys, "_effect"]]
    merged = left.merge(right, on=keys, suffixes=("_a", "_b"))
    if merged.empty:
        raise ConfigError(
            "The two frames share no (direction, site, layer, head, positions) rows: run both on the same "
            "sites, layers and position groups (and both per example, or neither)."
        )

    def score(sub) -> dict[str, float]:
        a = torch.tensor(sub["_effect_a"].to_numpy(dtype=float), dtype=torch.float64)
        b = torch.tensor(sub["_effect_b"].to_numpy(dtype=float), dtype=torch.float64)
        return _scores(a, b, atol)

    out: dict[str, Any] = {**score(merged), "matched": len(merged)}
    for column in by:
        if column not in keys:
            raise ConfigError(f"agreement can break down by the key columns {keys}; got {column!r}.")
        out[f"by_{column}"] = {_plain(v): score(sub) for v, sub in merged.groupby(column, sort=False)}
    return out


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python one (JSON keys)."""
    return value.item() if hasattr(value, "item") else value


# ---------------------------------------------------------------------------- direct logit attribution
@dataclass
class _FrozenNorm:
    """The final norm as the linear map it is with the scale of one run held fixed."""

    gain: Float[Tensor, "batch d_model"]  # weight (or 1 + weight) times the frozen 1/rms (or 1/std)
    centre: bool  # LayerNorm subtracts each part's mean first
    bias: Tensor | None  # LayerNorm's bias: a part of its own

    def __call__(self, part: Float[Tensor, "batch ... d_model"]) -> Float[Tensor, "batch ... d_model"]:
        part = _wide(part)
        if self.centre:
            part = part - part.mean(-1, keepdim=True)
        shape = (part.shape[0],) + (1,) * (part.ndim - 2) + (part.shape[-1],)
        return part * self.gain.view(shape)


def _frozen_norm(norm: nn.Module, x: Float[Tensor, "batch d_model"]) -> _FrozenNorm:
    """Freeze the final norm at the run's input ``x`` (one position per row); checked against the module."""
    with torch.no_grad():
        want = _wide(norm(x))
    xf = _wide(x)
    weight = getattr(norm, "weight", None)
    weight = torch.ones_like(xf[0]) if weight is None else _wide(weight.detach()).to(xf.device)
    candidates = []
    if isinstance(norm, nn.LayerNorm):
        centred = xf - xf.mean(-1, keepdim=True)
        inv = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        bias = None if norm.bias is None else _wide(norm.bias.detach())
        candidates.append(_FrozenNorm(inv * weight, True, bias))
    else:
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is not None:
            inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + float(eps))
            candidates += [_FrozenNorm(inv * weight, False, None), _FrozenNorm(inv * (1.0 + weight), False, None)]
    for frozen in candidates:
        got = frozen(xf) + (0.0 if frozen.bias is None else frozen.bias)
        if torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp_min(1.0))):
            return frozen
    raise UnsupportedModelError(
        f"The final norm {type(norm).__name__} is neither an RMSNorm (weight, eps) nor nn.LayerNorm as eah-interp "
        "knows them, so it cannot be frozen into a linear map for direct logit attribution."
    )


def _final_norm_and_unembed(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    first = hf_module(model, "resid", 0)  # the first decoder layer
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and any(m is first for m in layers):
            norm = getattr(module, "norm", None)
            break
    else:
        norm = None
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(norm, nn.Module) or not isinstance(unembed, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__}: direct logit attribution needs the language model's final norm (.norm next "
            "to .layers) and a linear unembedding (get_output_embeddings())."
        )
    if getattr(text_config(model), "final_logit_softcapping", None):
        raise UnsupportedModelError(
            "The model soft-caps its final logits (tanh), so logit differences are not linear in the residual "
            "stream; direct logit attribution does not apply."
        )
    return norm, unembed


def _direction(
    direction: Any, unembed: nn.Linear
) -> tuple[Float[Tensor, " d_model"], float, str, tuple[list[int], list[int]] | None]:
    """The read-out vector in the final norm's output space, its bias, a label and the (yes, no) ids (None: a vector)."""
    weight = _wide(unembed.weight.detach())
    bias = None if unembed.bias is None else _wide(unembed.bias.detach())
    if isinstance(direction, LogitDiff):
        direction = (direction.yes, direction.no)
    if isinstance(direction, Tensor):
        if direction.ndim != 1 or direction.shape[0] != weight.shape[1]:
            raise ConfigError(
                f"A metric direction tensor must be [d_model] = [{weight.shape[1]}] in the unembedding's input "
                f"space; got {tuple(direction.shape)}."
            )
        return direction.detach().to(weight), 0.0, "direction", None
    if isinstance(direction, tuple) and len(direction) == 2:
        sides = []
        for side in direction:
            ids = [side] if isinstance(side, int) else [int(i) for i in side]
            if not ids or any(not 0 <= i < weight.shape[0] for i in ids):
                raise ConfigError(f"Token ids {ids} are empty or outside the vocabulary (0..{weight.shape[0] - 1}).")
            sides.append(ids)
        yes, no = sides
        vector = weight[yes].mean(0) - weight[no].mean(0)
        offset = 0.0 if bias is None else float(bias[yes].mean() - bias[no].mean())
        return vector, offset, f"mean logit {yes} - mean logit {no}", (yes, no)
    raise ConfigError(
        "direction must be a (yes_id, no_id) pair (ids or tuples of ids: the mean logit of each side), a LogitDiff, "
        f"or a Float[d_model] vector; got {direction!r}."
    )


def _condition_label(interventions: Any) -> str:
    return "+".join(type(i).__name__ for i in as_interventions(interventions))


def direct_logit_attribution(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    direction: Any,
    *,
    interventions: Any = None,
    layout: TokenLayout | None = None,
    positions: Int[Tensor, " batch"] | None = None,
    per_example: bool = False,
    atol: float = 1e-3,
) -> pd.DataFrame:
    """Split a logit difference into the embedding's, each layer's and each head's direct contributions.

    The residual stream entering the final norm at the metric's position is ``embed + sum_l (attn_l +
    mlp_l)``; each part is passed through the final norm with the run's own scale (``1/rms`` of the whole
    stream) held fixed and projected on the read-out direction. With the scale frozen the map is linear,
    so the parts add up to the metric exactly (checked: the call raises if they miss by more than
    ``atol``, e.g. for a model that adds more to the residual stream than its attention and MLP outputs).

    Args:
        model: an HF LVLM with Llama-style decoder layers (``self_attn.o_proj``, ``mlp``, a final ``norm``).
        inputs: model inputs, ``[batch, seq]``.
        direction: ``(yes_id, no_id)`` (the logit difference; tuples of ids: mean logit of each side), a
            `LogitDiff` (its ids, read the same way), or a ``Float[d_model]`` vector in the unembedding's
            input space.
        interventions: one intervention list (`eah_interp.hf.intervene`) for a second condition next to
            the baseline, or ``{name: interventions}`` for several; None: the baseline only.
        layout: the prompt layout (default: from ``input_ids``).
        positions: ``Int[batch]`` position per row (default: the last real token).
        per_example: one row per batch example (column ``example``) instead of batch means.
        atol: tolerance of the check that the parts sum to the metric.

    Returns:
        A tidy frame with `DLA_COLUMNS`: per condition (``"baseline"``, then the interventions' labels),
        component ``embed`` (layer and head ``<NA>``), ``attn`` / ``mlp`` per layer, ``head`` per layer and
        head and ``attn_bias`` (o_proj's bias, if any) split ``attn``; ``bias``: the constant the norm's /
        unembedding's biases add (if any); ``metric`` is the condition's metric. ``frame.attrs["residual"]`` is the largest |metric - sum of parts|.
    """
    import pandas as pd

    if interventions is None:
        conditions: dict[str, Any] = {"baseline": None}
    elif isinstance(interventions, Mapping):
        conditions = {"baseline": None, **{str(k): v for k, v in interventions.items()}}
    else:
        conditions = {"baseline": None, _condition_label(interventions): interventions}
    layout = _default_layout(model, inputs, layout)
    at = last_positions(layout) if positions is None else torch.as_tensor(positions).long()
    if at.shape != (layout.batch_size,):
        raise ConfigError(f"positions must be Int[batch] = [{layout.batch_size}] (one position per row); got {tuple(at.shape)}.")
    norm, unembed = _final_norm_and_unembed(model)
    vector, offset, label, ids = _direction(direction, unembed)
    rows: list[dict[str, Any]] = []
    residual = 0.0
    for condition, items in conditions.items():
        parts, metric = _dla_condition(model, inputs, as_interventions(items), layout, at, norm, vector, offset, ids)
        total = sum(value for component, _, _, value in parts if component in ("embed", "attn", "mlp", "bias"))
        gap = float((metric - total).abs().max())
        residual = max(residual, gap)
        if gap > atol * max(1.0, float(metric.abs().max())):
            raise UnsupportedModelError(
                f"Direct logit attribution: the parts sum to {total.tolist()} but the metric is {metric.tolist()} "
                f"(condition {condition!r}); the model's read-out is not the final norm followed by the unembedding."
            )
        for component, layer, head, value in parts:
            for example in range(metric.shape[0]):
                rows.append({"example": example, "condition": condition, "component": component, "layer": layer,
                             "head": head, "contribution": float(value[example]), "metric": float(metric[example])})
    frame = pd.DataFrame(rows, columns=["example", *DLA_COLUMNS])
    frame["layer"] = frame["layer"].astype("Int64")
    frame["head"] = frame["head"].astype("Int64")
    if not per_example:
        keys = ["condition", "component", "layer", "head"]
        frame = frame.groupby(keys, sort=False, dropna=False)[["contribution", "metric"]].mean().reset_index()
        frame = frame[list(DLA_COLUMNS)]
    frame.attrs.update(direction=label, residual=residual, conditions=list(conditions),
                       linearisation="final norm scale frozen at each condition's own run")
    return frame


def _dla_condition(
    model: nn.Module, inputs: Mapping[str, Tensor], items: tuple[Any, ...], layout: TokenLayout, at: Tensor,
    norm: nn.Module, vector: Tensor, offset: float, ids: tuple[list[int], list[int]] | None,
) -> tuple[list[tuple[str, int | None, int | None, Float[Tensor, " batch"]]], Float[Tensor, " batch"]]:
    """One run's direct contributions ``(component, layer, head, [batch])`` and its metric ``[batch]``."""
    n_layers, n_heads, _ = model_shape(model)
    rows = torch.arange(layout.batch_size)
    store: dict[tuple[str, int], Tensor] = {}  # each site at each row's position only: [batch, ...]

    def keep(key: tuple[str, int]) -> Callable[[Tensor], None]:
        def at_position(value: Tensor) -> None:
            store[key] = value.detach()[rows.to(value.device), at.to(value.device)]

        return at_position

    last = n_layers - 1  # the residual stream is read after the last layer only
    keys = [("residual_input", 0)] + [(site, layer) for layer in range(n_layers) for site in SITES
                                      if site != "resid" or layer == last]
    with torch.no_grad(), intervene(model, items, layout), hf_hooks(model, {key: keep(key) for key in keys}):
        logits = model(**inputs, use_cache=False).logits

    def pick(key: tuple[str, int]) -> Tensor:  # [batch, features] at each row's position
        return _wide(store[key])

    x = pick(("resid", last))
    frozen = _frozen_norm(norm, store[("resid", last)])
    read = frozen.gain * vector.to(x.device)  # [batch, d_model]: d metric / d part with the scale frozen

    def contribution(part: Tensor) -> Tensor:  # [batch, ..., d_model] -> [batch, ...]
        if frozen.centre:
            part = part - part.mean(-1, keepdim=True)
        return (part * read.view((part.shape[0],) + (1,) * (part.ndim - 2) + (part.shape[-1],))).sum(-1)

    stream = pick(("residual_input", 0)) + sum(pick(("attn_out", layer)) + pick(("mlp_out", layer)) for layer in range(n_layers))
    if not torch.allclose(stream, x, rtol=1e-3, atol=1e-3 * float(x.abs().max().clamp_min(1.0))):
        raise UnsupportedModelError(
            f"{type(model).__name__}: the residual stream is not the embedding plus the attention and MLP outputs "
            "(extra norms or scales around the sublayers?), so direct logit attribution would not add up."
        )
    parts: list[tuple[str, int | None, int | None, Tensor]] = [("embed", None, None, contribution(pick(("residual_input", 0))))]
    for layer in range(n_layers):
        parts += [("attn", layer, None, contribution(pick(("attn_out", layer)))),
                  ("mlp", layer, None, contribution(pick(("mlp_out", layer))))]
        o_proj = hf_module(model, "head", layer)
        z = pick(("head", layer))  # [batch, heads, d_head]
        w = _wide(o_proj.weight.detach()).unflatten(1, (n_heads, -1))  # [d_model, heads, d_head]
        per_head = contribution(torch.einsum("bhd,mhd->bhm", z, w.to(z.device)))  # [batch, heads]
        parts += [("head", layer, h, per_head[:, h]) for h in range(n_heads)]
        if o_proj.bias is not None:  # o_proj's bias is part of attn_out but no head's: with the heads, it splits attn
            parts.append(("attn_bias", layer, None, contribution(_wide(o_proj.bias.detach()).to(x).expand_as(x))))
    constant = x.new_zeros(x.shape[0])  # the norm's and the unembedding's biases, read out
    if frozen.bias is not None:
        constant += (frozen.bias.to(x.device) * vector.to(x.device)).sum()
    constant += float(offset)
    if bool((constant != 0).any()):
        parts.append(("bias", None, None, constant))
    if ids is None:  # a vector direction: no logit to read it off
        metric = contribution(x) + constant
    else:  # read off the model's own logits: the mean logit of each side
        at_logits = _wide(logits[rows, at.to(logits.device)])
        metric = at_logits[:, ids[0]].mean(-1) - at_logits[:, ids[1]].mean(-1)
    return parts, metric.to(x.device)


def plot_dla(frame: pd.DataFrame, *, against: str = "baseline") -> Figure:
    """Per-layer attention and MLP contributions of each condition, and each head's change against ``against``.

    Args:
        frame: from `direct_logit_attribution` (batch means).
        against: the condition the head heatmap subtracts (default ``"baseline"``); with one condition
            the heatmap shows its head contributions.

    Returns:
        A figure: left, contribution per layer (lines: condition x attn/mlp); right, layer x head heatmap.
    """
    import matplotlib.pyplot as plt

    if "example" in frame.columns:
        frame = frame.groupby(["condition", "component", "layer", "head"], sort=False, dropna=False)[
            ["contribution", "metric"]].mean().reset_index()
    conditions = list(dict.fromkeys(frame["condition"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, condition in enumerate(conditions):
        sub = frame[frame.condition == condition]
        metric = float(sub["metric"].iloc[0])
        for component, style in (("attn", "-"), ("mlp", "--")):  # colour: condition; line style: component
            part = sub[sub.component == component].sort_values("layer")
            left.plot(part["layer"].astype(int), part["contribution"], style, marker=".", color=f"C{index}",
                      label=f"{condition} {component} (metric {metric:.2f})")
    left.axhline(0.0, color="grey", lw=0.5)
    left.set_xlabel("layer")
    left.set_ylabel("direct contribution to the metric")
    left.legend(fontsize=7)
    left.set_title(f"direct logit attribution ({frame.attrs.get('direction', 'metric')})", fontsize=9)
    heads = frame[frame.component == "head"].astype({"layer": int, "head": int})
    table = heads.pivot_table(index="layer", columns=["condition", "head"], values="contribution")
    shown = [c for c in conditions if c != against]
    if shown and against in conditions:
        data = table[shown[-1]] - table[against]
        title = f"head contribution: {shown[-1]} - {against}"
    else:
        data = table[conditions[0]]
        title = f"head contribution: {conditions[0]}"
    _heatmap(data.to_numpy(), list(data.index), list(data.columns), "head", title, right, label="contribution",
             min_limit=1e-9)
    right.title.set_fontsize(9)
    fig.tight_layout()
    return fig

