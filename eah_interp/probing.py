"""Linear probes for object presence on the residual stream: does an intervention remove visual evidence?

A probe is an L2-regularised logistic regression per layer (and per label) on residuals taken at a
position group (the mean over the image tokens, the last token, any group or mask), fitted on a
discovery set of scenes and evaluated on held-out scenes:

* `collect_residuals`: one batch → ``Float[batch, layer, d_model]`` (the group's mean per row), under
  any interventions (`eah_interp.hf.intervene`); `collect_scenes` runs it over scenes with progress.
* `scene_labels`: multi-label targets, one column per object kind (present / absent).
* `fit_probe` → `LinearProbe` (torch, L-BFGS, features standardised on the training set);
  `evaluate_probe`: accuracy and AUROC per layer with bootstrap CIs over scenes.
* `compare_probes`: baseline vs edited residuals on the same scenes: the probe trained on the
  baseline applied to the edited residuals (``transfer``: is the evidence still where it was?) and a
  probe retrained on the edited residuals (``retrained``: is it still linearly there at all?), each with
  its difference to the baseline (paired bootstrap over scenes, Holm-adjusted over layers x arms x
  metrics).

Metrics (`METRICS`): ``accuracy`` (threshold 0, pooled over all (scene, label) pairs), ``auroc`` pooled
over all pairs (micro: a present object must outscore an absent one, whichever kinds they are, so it
also needs the labels' scores on one scale) and ``auroc_macro`` (the mean of per-label AUROCs: ranking
within each kind only, blind to per-kind offsets). Where the two AUROCs part, a representation kept its
ranking but shifted by a per-kind offset (e.g. a transferred probe on shifted residuals). Bootstrap
resamples scenes (all of a scene's labels together), so CIs account for the labels of one scene being
correlated.

Example:
    >>> scenes = list(iter_scenes("heldout", 300))
    >>> y = scene_labels(scenes)
    >>> base = collect_scenes(bundle, scenes, positions="image")
    >>> eah = collect_scenes(bundle, scenes, positions="image", interventions=[EAH.paper(threshold=0.01)])
    >>> compare_probes({"baseline": base, "eah": eah}, y, train=range(200), test=range(200, 300))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from eah_interp.errors import ConfigError, LayoutError
from eah_interp.logit_lens import residual_stream
from eah_interp.metrics.stats import auroc, bootstrap_weights
from eah_interp.metrics.stats import bootstrap_wald_p_value as _wald_p
from eah_interp.metrics.stats import percentile_interval as _interval
from eah_interp.sites import resolve_positions

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "LinearProbe",
    "auroc",
    "collect_residuals",
    "collect_scenes",
    "compare_probes",
    "evaluate_probe",
    "fit_probe",
    "plot_probes",
    "scene_labels",
]


# ---------------------------------------------------------------------------------------------- residuals
def collect_residuals(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    positions: str | Bool[Tensor, "batch seq"] | Sequence[str | Tensor] = "image",
    layers: int | Iterable[int] | None = None,
    interventions: Any = None,
) -> Float[Tensor, "batch layer d_model"] | dict[str, Float[Tensor, "batch layer d_model"]]:
    """Residual stream after each chosen layer, averaged over a position group of each row (one forward).

    Args:
        model: an HF LVLM.
        inputs: the processor's outputs.
        positions: a group name (``"image"``: mean over the image tokens; ``"last"``: the last real token;
            the layout's groups) or a bool mask ``[batch, seq]``; or a list/tuple of them, read from the
            same forward (`eah_interp.sites.resolve_positions`: a mask is labelled ``"mask{i}"``).
        layers: decoder layers; all when None.
        interventions: None or interventions for `eah_interp.hf.intervene` applied during the forward.

    Returns:
        ``Float[batch, layer, d_model]`` on the CPU (float32), layers in ascending order; for a list of
        groups, ``{label: that tensor}``.

    Raises:
        LayoutError: a bad group name or mask, or a group empty in some row.
    """
    residuals, _, layout = residual_stream(model, inputs, layers=layers, interventions=interventions)
    pooled = {label: _pooled(residuals, label, mask) for label, mask in resolve_positions(layout, positions).items()}
    return pooled if isinstance(positions, (list, tuple)) else next(iter(pooled.values()))


def _pooled(residuals: Tensor, label: str, mask: Tensor) -> Tensor:
    """The mean of ``residuals [layer, batch, seq, d]`` over a position group of each row → ``[batch, layer, d]``."""
    mask = mask.to(residuals.device)
    if empty := (~mask.any(-1)).nonzero().flatten().tolist():
        raise LayoutError(f"Position group {label!r} is empty in rows {empty}.")
    weights = mask.float() / mask.sum(-1, keepdim=True)  # [batch, seq]
    return torch.einsum("lbsd,bs->bld", residuals.float(), weights).cpu()


def collect_scenes(
    bundle: Any,
    scenes: Sequence[Any],
    *,
    prompt: str | None = None,
    positions: str | Sequence[str] = "image",
    layers: int | Iterable[int] | None = None,
    interventions: Any = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Float[Tensor, "scene layer d_model"] | dict[str, Float[Tensor, "scene layer d_model"]]:
    """`collect_residuals` over scenes (or any items with ``.image``), in batches, with a progress bar.

    Args:
        bundle: a `eah_interp.models.ModelBundle` (``load_model("organism")``): ``.model``, ``.encode``,
            ``.caption_prompt``.
        scenes: objects with an ``image`` attribute (`eah_interp.scenes.Scene`, dataset items).
        prompt: the full prompt given with every image; the bundle's caption prompt when None.
        positions, layers, interventions: as in `collect_residuals`.
        batch_size: scenes per forward.
        progress: a tqdm bar: on, off, or None (tqdm's rule: on only when stderr is a terminal).

    Returns:
        ``Float[scene, layer, d_model]``; for a list of groups, ``{group: that tensor}`` (one forward per batch).
    """
    from eah_interp.experiments import progress_bar

    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1; got {batch_size}.")
    prompt = bundle.caption_prompt if prompt is None else prompt
    chunks = []
    for start in progress_bar(range(0, len(scenes), batch_size), progress, desc="residuals", leave=False):
        part = scenes[start : start + batch_size]
        inputs = bundle.encode([prompt] * len(part), [s.image for s in part])
        chunks.append(collect_residuals(bundle.model, inputs, positions=positions, layers=layers, interventions=interventions))
    if not chunks:
        raise ConfigError("collect_scenes got no scenes.")
    if isinstance(chunks[0], dict):
        return {group: torch.cat([c[group] for c in chunks]) for group in chunks[0]}
    return torch.cat(chunks)


def scene_labels(scenes: Sequence[Any], kinds: Sequence[str] | None = None) -> Bool[Tensor, "scene kind"]:
    """Multi-label presence targets: ``[i, k]`` is True when kind ``k`` is in scene ``i``.

    Args:
        scenes: objects with a ``kinds`` set (`eah_interp.scenes.Scene`).
        kinds: the label columns; the scene world's 15 kinds (`eah_interp.scenes.KINDS`) when None.
    """
    if kinds is None:
        from eah_interp.scenes import KINDS

        kinds = KINDS
    return torch.tensor([[k in s.kinds for k in kinds] for s in scenes], dtype=torch.bool).reshape(len(scenes), len(kinds))


# ---------------------------------------------------------------------------------------------- the probe
@dataclass(frozen=True)
class LinearProbe:
    """Logistic-regression probes, one per layer and label, on standardised residuals.

    ``logit = ((x - mean) / std) @ weight + bias`` per layer.

    Attributes:
        weight: ``Float[layer, d_model, label]``.
        bias: ``Float[layer, label]``.
        mean, std: ``Float[layer, d_model]``: the training set's feature statistics.
        l2: the L2 penalty it was fitted with.
        train_loss: ``Float[layer]``: the final penalised training loss per layer (mean over labels).
    """

    weight: Float[Tensor, "layer d_model label"]
    bias: Float[Tensor, "layer label"]
    mean: Float[Tensor, "layer d_model"]
    std: Float[Tensor, "layer d_model"]
    l2: float
    train_loss: Float[Tensor, " layer"]

    def logits(self, features: Float[Tensor, "n layer d_model"]) -> Float[Tensor, "n layer label"]:
        """The probe's logits (``> 0`` predicts present)."""
        x = _as_3d(features)
        if x.shape[1:] != self.mean.shape:
            raise ConfigError(
                f"Features of shape {tuple(x.shape[1:])} (layer, d_model) do not fit the probe's {tuple(self.mean.shape)}."
            )
        z = (x.float() - self.mean) / self.std
        return torch.einsum("nld,ldk->nlk", z, self.weight) + self.bias

    def describe(self) -> str:
        """One sentence: what the probe is."""
        layers, d, k = self.weight.shape
        return f"LinearProbe: {layers} layer(s) x {k} label(s), logistic regression on {d} standardised features, L2 {self.l2:g}."


def _as_3d(features: Tensor) -> Tensor:
    if features.ndim == 2:
        return features[:, None, :]
    if features.ndim != 3:
        raise ConfigError(f"Features must be [n, d_model] or [n, layer, d_model]; got shape {tuple(features.shape)}.")
    return features


def _as_labels(labels: Tensor, n: int) -> Tensor:
    y = torch.as_tensor(labels)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != n:
        raise ConfigError(f"Labels must be [n] or [n, label] with n = {n} (one row per example); got {tuple(y.shape)}.")
    if y.dtype != torch.bool:
        if not bool(((y == 0) | (y == 1)).all()):
            raise ConfigError("Labels must be booleans (or 0/1).")
        y = y.bool()
    return y


def fit_probe(
    features: Float[Tensor, "n layer d_model"],
    labels: Bool[Tensor, "n label"],
    *,
    l2: float = 1e-2,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit logistic-regression probes for every layer and label (L-BFGS on the penalised mean log-loss).

    Each (layer, label) probe minimises ``mean_i BCE(z_i @ w + b, y_i) + l2 / 2 * |w|^2`` on the
    standardised features ``z`` (the bias is not penalised); the problems are independent and solved
    jointly.

    Args:
        features: ``[n, layer, d_model]`` (or ``[n, d_model]`` for one layer).
        labels: ``[n, label]`` booleans (or ``[n]`` for one label).
        l2: the L2 penalty (> 0 keeps separable data's weights finite).
        max_iter: L-BFGS iterations.

    Returns:
        The fitted `LinearProbe`.

    Raises:
        ConfigError: shapes that do not match, a non-positive ``l2``, or a label column with one class only.
    """
    x = _as_3d(features).float().cpu()
    y = _as_labels(labels, x.shape[0]).cpu()
    if l2 <= 0:
        raise ConfigError(f"l2 must be positive (separable data would have infinite weights); got {l2}.")
    constant = [k for k in range(y.shape[1]) if y[:, k].all() or not y[:, k].any()]
    if constant:
        raise ConfigError(
            f"Label column(s) {constant} have one class only in the training set; a probe needs both present and "
            "absent examples (more scenes, or drop those labels)."
        )
    n, n_layers, d = x.shape
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    target = y.float()[:, None, :].expand(n, n_layers, y.shape[1])
    weight = torch.zeros(n_layers, d, y.shape[1], requires_grad=True)
    bias = torch.zeros(n_layers, y.shape[1], requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def losses() -> Tensor:
        logits = torch.einsum("nld,ldk->nlk", z, weight) + bias
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(0)  # [layer, label]
        return bce + l2 / 2 * weight.pow(2).sum(1)

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = losses().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        final = losses().mean(-1)
    return LinearProbe(weight.detach(), bias.detach(), mean, std, float(l2), final)


# ---------------------------------------------------------------------------------------------- evaluation
def _scene_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[1 + n_boot, n]`` multiplicities: the sample itself, then bootstrap resamples of the n scenes."""
    return np.concatenate([np.ones((1, n)), bootstrap_weights(None, n, n_resamples=n_boot, seed=seed)])


METRICS = ("accuracy", "auroc", "auroc_macro")
"""What `evaluate_probe` and `compare_probes` report: pooled accuracy, pooled (micro) AUROC, per-label (macro) AUROC."""


def _metrics(logits: np.ndarray, y: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """`METRICS` of ``logits [n, label]`` for each scene weighting ``[B, n]`` → ``[B]`` each."""
    n, k = y.shape
    pair_w = np.repeat(weights, k, axis=1)  # scene i's weight for each of its k labels (row-major flatten)
    correct = ((logits > 0) == y).ravel().astype(float)
    per_label = np.stack([auroc(logits[:, j], y[:, j], weights) for j in range(k)])  # [k, B]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a label with one class in a resample: NaN, skipped
        macro = np.nanmean(per_label, axis=0)
    return {
        "accuracy": (pair_w * correct).sum(1) / pair_w.sum(1),
        "auroc": auroc(logits.ravel(), y.ravel(), pair_w),
        "auroc_macro": macro,
    }


def evaluate_probe(
    probe: LinearProbe,
    features: Float[Tensor, "n layer d_model"],
    labels: Bool[Tensor, "n label"],
    *,
    layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy and AUROC of a probe per layer on held-out examples, with bootstrap CIs over examples.

    Args:
        probe: a fitted `LinearProbe`.
        features: ``[n, layer, d_model]`` of the held-out examples.
        labels: ``[n, label]``.
        layers: names for the layer axis (e.g. the decoder-layer indices); ``0 .. layer-1`` when None.
        n_boot: bootstrap resamples of the examples (scenes).
        ci: the interval's coverage.
        seed: the resampling seed.

    Returns:
        One row per layer: ``layer``, each of `METRICS` with ``_low`` / ``_high`` CI bounds, ``n``.
    """
    import pandas as pd

    logits = probe.logits(features).numpy()
    y = _as_labels(labels, logits.shape[0]).numpy()
    names = list(range(logits.shape[1])) if layers is None else list(layers)
    if len(names) != logits.shape[1]:
        raise ConfigError(f"{len(names)} layer names for {logits.shape[1]} layers.")
    weights = _scene_weights(logits.shape[0], n_boot, seed)
    rows = []
    for li, layer in enumerate(names):
        m = _metrics(logits[:, li], y, weights)
        row: dict[str, Any] = {"layer": layer}
        for metric in METRICS:
            low, high = _interval(m[metric][1:], ci)
            row.update({metric: float(m[metric][0]), f"{metric}_low": low, f"{metric}_high": high})
        row["n"] = int(logits.shape[0])
        rows.append(row)
    return pd.DataFrame(rows)


def compare_probes(
    features: Mapping[str, Float[Tensor, "n layer d_model"]],
    labels: Bool[Tensor, "n label"],
    train: Sequence[int] | Tensor,
    test: Sequence[int] | Tensor,
    *,
    reference: str = "baseline",
    layers: Sequence[int] | None = None,
    l2: float = 1e-2,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Probes on the reference residuals vs each other condition's, on the same scenes (does an edit remove evidence?).

    For every layer: the ``reference`` arm (probe fitted on the reference residuals of ``train``, tested on
    the reference residuals of ``test``); for each other condition ``c``, ``c:transfer`` (that same probe
    applied to ``c``'s residuals of ``test``) and ``c:retrained`` (a probe fitted on ``c``'s ``train``
    residuals, tested on its ``test`` residuals). Each arm's difference to the reference arm is a paired
    bootstrap over the test scenes (the same resamples for every arm and layer): percentile CI, and a
    two-sided Wald p-value with the bootstrap standard error, ``erfc(|d| / (se* sqrt 2))``, Holm-adjusted
    over all layers x arms x `METRICS`. (A percentile p-value ``2 min(P*(d <= 0), P*(d >= 0))``
    cannot go below ``2 / (n_boot + 1)``, so with many tests Holm could never reject even for effects
    whose CI is far from 0.)

    Args:
        features: ``{condition: Float[n, layer, d_model]}`` on the same n scenes, in the same order.
        labels: ``[n, label]`` booleans.
        train, test: disjoint scene indices (discovery and held-out).
        reference: the condition the transfer probe is trained on.
        layers: names of the layer axis; ``0 .. layer-1`` when None.
        l2: the probes' L2 penalty (`fit_probe`).
        n_boot, ci, seed: the bootstrap (`evaluate_probe`).

    Returns:
        One row per layer and arm: ``layer, arm, condition, probe_trained_on``, then for each metric ``m``
        of `METRICS`: ``m, m_low, m_high, d_m, d_m_low, d_m_high, p_m, p_m_holm``; and ``n_train, n_test``.
        The reference arm's differences are 0 and its p-values NaN.
    """
    import pandas as pd

    from eah_interp.metrics.stats import holm

    if reference not in features:
        raise ConfigError(f"The reference condition {reference!r} is not among the features' {list(features)}.")
    train_idx = torch.as_tensor(list(train) if not isinstance(train, Tensor) else train, dtype=torch.long)
    test_idx = torch.as_tensor(list(test) if not isinstance(test, Tensor) else test, dtype=torch.long)
    overlap = set(train_idx.tolist()) & set(test_idx.tolist())
    if overlap:
        raise ConfigError(f"train and test share {len(overlap)} scene(s) (e.g. {sorted(overlap)[:3]}); keep them disjoint.")
    shapes = {name: tuple(_as_3d(x).shape) for name, x in features.items()}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"The conditions' features differ in shape {shapes}; collect them on the same scenes and layers.")
    feats = {name: _as_3d(x) for name, x in features.items()}
    n_total = next(iter(shapes.values()))[0]
    y = _as_labels(labels, n_total)
    y_train, y_test = y[train_idx], y[test_idx].numpy()
    n_layers = next(iter(shapes.values()))[1]
    names = list(range(n_layers)) if layers is None else list(layers)
    if len(names) != n_layers:
        raise ConfigError(f"{len(names)} layer names for {n_layers} layers.")
    weights = _scene_weights(len(test_idx), n_boot, seed)

    ref_probe = fit_probe(feats[reference][train_idx], y_train, l2=l2)
    arms: list[tuple[str, str, str, np.ndarray]] = [
        (reference, reference, reference, ref_probe.logits(feats[reference][test_idx]).numpy())
    ]
    for name, x in feats.items():
        if name == reference:
            continue
        arms.append((f"{name}:transfer", name, reference, ref_probe.logits(x[test_idx]).numpy()))
        own = fit_probe(x[train_idx], y_train, l2=l2)
        arms.append((f"{name}:retrained", name, name, own.logits(x[test_idx]).numpy()))

    rows = []
    for li, layer in enumerate(names):
        ref_m = _metrics(arms[0][3][:, li], y_test, weights)
        for arm, condition, trained_on, logits in arms:
            m = ref_m if arm == reference else _metrics(logits[:, li], y_test, weights)
            row: dict[str, Any] = {"layer": layer, "arm": arm, "condition": condition, "probe_trained_on": trained_on}
            for metric in METRICS:
                low, high = _interval(m[metric][1:], ci)
                row.update({metric: float(m[metric][0]), f"{metric}_low": low, f"{metric}_high": high})
                d = m[metric] - ref_m[metric]
                d_low, d_high = _interval(d[1:], ci)
                p = float("nan") if arm == reference else _wald_p(float(d[0]), d[1:])
                row.update({f"d_{metric}": float(d[0]), f"d_{metric}_low": d_low, f"d_{metric}_high": d_high, f"p_{metric}": p})
            row.update({"n_train": len(train_idx), "n_test": len(test_idx)})
            rows.append(row)
    frame = pd.DataFrame(rows)
    adjusted = holm([p for metric in METRICS for p in frame[f"p_{metric}"]])
    for i, metric in enumerate(METRICS):
        frame[f"p_{metric}_holm"] = adjusted[i * len(frame) : (i + 1) * len(frame)]
    return frame


def plot_probes(frame: pd.DataFrame, metric: str = "auroc") -> Figure:
    """Probe quality per layer with its CI band, one line per arm (and one panel per position group).

    Args:
        frame: the output of `compare_probes` (optionally with a ``positions`` column, one panel each) or of
            `evaluate_probe` (one line).
        metric: one of `METRICS` (``"auroc"``, ``"auroc_macro"``, ``"accuracy"``).

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {METRICS}; got {metric!r}.")
    groups = list(dict.fromkeys(frame["positions"])) if "positions" in frame.columns else [None]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.2), squeeze=False, layout="constrained")
    for ax, group in zip(axes[0], groups, strict=True):
        part = frame if group is None else frame[frame["positions"] == group]
        arms = list(dict.fromkeys(part["arm"])) if "arm" in part.columns else [None]
        for arm in arms:
            line = (part if arm is None else part[part["arm"] == arm]).sort_values("layer")
            ax.plot(line["layer"], line[metric], marker="o", ms=2.5, label=arm or metric)
            ax.fill_between(line["layer"], line[f"{metric}_low"], line[f"{metric}_high"], alpha=0.2)
        ax.set_xlabel("layer")
        ax.set_ylabel(f"held-out {metric}")
        ax.set_title(f"presence probe: {group}" if group is not None else "presence probe")
        ax.legend(fontsize=7)
    return fig
