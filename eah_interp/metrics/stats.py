"""Statistics for comparing conditions on the same items: bootstrap CIs (plain, clustered, of a ratio), sign-flip p, Holm, AUROC.

Items are often nested (two questions per scene): `cluster_bootstrap`, `ratio_ci` and
`sign_flip_p_value(..., clusters=)` resample or flip whole clusters. The one place for these: studies,
the runner and the analysis code call them instead of writing their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 10_000, ci: float = 0.95, seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over ``values``."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("bootstrap_ci needs at least one value.")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), size=(n_resamples, len(x)))
    stats = np.array([statistic(x[idx]) for idx in draws]) if statistic is not np.mean else x[draws].mean(1)
    tail = (1 - ci) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000, ci: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of the per-item differences ``b - a`` with its bootstrap CI (items resampled in pairs)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {len(x)} vs {len(y)}.")
    diff = y - x
    low, high = bootstrap_ci(diff, n_resamples=n_resamples, ci=ci, seed=seed)
    return {"mean_diff": float(diff.mean()), "low": low, "high": high, "n": int(len(diff))}


def paired_permutation_test(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000, seed: int = 0
) -> float:
    """Two-sided sign-flip permutation p-value of the mean paired difference ``b - a``."""
    return sign_flip_p_value(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), n_resamples=n_resamples, seed=seed)


def sign_flip_p_value(
    diffs: Sequence[float], *, n_resamples: int = 10_000, seed: int = 0,
    clusters: Sequence[Any] | np.ndarray | None = None,
) -> float:
    """Two-sided sign-flip permutation p-value that paired differences have mean 0 (NaNs dropped, +1 smoothing).

    With ``clusters`` (one label per difference, e.g. the scene of each question) the signs are flipped per
    cluster: all differences of a cluster keep or flip their sign together (``rng.choice([-1, 1], size=
    (n_resamples, G))``, clusters numbered by `cluster_codes`), which is the valid test when items of one
    cluster are not independent. Without clusters every item is its own cluster.
    """
    diff = np.asarray(diffs, dtype=float)
    labels = None if clusters is None else list(clusters)
    if labels is not None and len(labels) != len(diff):
        raise ValueError(f"{len(diff)} differences but {len(labels)} cluster labels: pass one label per difference.")
    ok = ~np.isnan(diff)
    codes = cluster_codes(None if labels is None else [c for c, keep in zip(labels, ok, strict=True) if keep],
                          int(ok.sum()))
    diff = diff[ok]
    if len(diff) == 0 or np.all(diff == 0):
        return 1.0
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    sums = np.bincount(codes, weights=diff)  # [G]
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, len(sums)))
    null = np.abs(signs @ sums) / len(diff)
    return float((1 + (null >= observed - 1e-12).sum()) / (1 + n_resamples))


def mcnemar(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict[str, float]:
    """Exact McNemar test: ``b01`` = items only B gets right, ``b10`` = only A; two-sided binomial p."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}.")
    b01, b10 = int((~a & b).sum()), int((a & ~b).sum())
    n, k = b01 + b10, min(b01, b10)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"b01": b01, "b10": b10, "p_value": p}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; controls the family-wise error rate), in input order.

    With the m p-values sorted ascending, ``p_(1) <= ... <= p_(m)``, the adjusted value of the i-th
    (1-based) is ``max_{j <= i} min(1, (m - j + 1) * p_(j))``. Reject at level alpha where the adjusted
    p-value is <= alpha. NaN entries are left NaN and do not count towards m.

    Example:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if np.any((p[valid] < 0) | (p[valid] > 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p_values!r}.")
    m = len(valid)
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return [float(x) for x in out]


# ---------------------------------------------------------------------------- clustered data
def cluster_codes(clusters: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Integer codes ``0..G-1`` of each item's cluster, numbered in order of first appearance.

    ``None`` makes every item its own cluster (``0..n-1``). Raises `ValueError` when the number of
    labels is not ``n``.
    """
    if clusters is None:
        return np.arange(n)
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"{n} values but {len(labels)} cluster labels: pass one label (e.g. the scene) per value.")
    first: dict[Any, int] = {}
    return np.array([first.setdefault(label, len(first)) for label in labels], dtype=int)


def bootstrap_weights(
    clusters: Sequence[Any] | np.ndarray | None, n: int | None = None, *, n_resamples: int = 10_000, seed: int = 0,
    within: bool = False,
) -> np.ndarray:
    """``[n_resamples, n]`` multiplicities of a (two-stage) cluster bootstrap of ``n`` items.

    The draws, in this order from ``np.random.default_rng(seed)``:

    1. ``picks = rng.integers(0, G, size=(n_resamples, G))``: each resample draws G of the G clusters
       with replacement (clusters numbered by `cluster_codes`);
    2. with ``within=True`` only, ``u = rng.random((n_resamples, G, M))`` (``M``: the largest cluster):
       slot ``g`` of resample ``b`` draws, for each of the ``m`` members of cluster ``picks[b, g]``, the
       member ``floor(u[b, g, i] * m)`` (``i < m``; members in item order), i.e. items within a drawn
       cluster are resampled with replacement too.

    An item's weight is how often it lands in the resample. With one item per cluster (``clusters=None``)
    and ``within=False`` the draws are exactly those of `bootstrap_ci`.

    Args:
        clusters: one label per item (e.g. the scene of each question), or None (items independent).
        n: the number of items (needed only when ``clusters`` is None).
        n_resamples: resamples.
        seed: the generator's seed.
        within: also resample items within each drawn cluster (two-stage bootstrap).

    Returns:
        ``float64 [n_resamples, n]`` weights; each row sums to the number of items drawn.
    """
    if clusters is None and n is None:
        raise ValueError("bootstrap_weights needs clusters or n (the number of items).")
    n_items = len(clusters) if clusters is not None else int(n)  # type: ignore[arg-type]
    if n_items == 0:
        raise ValueError("bootstrap_weights needs at least one item.")
    codes = cluster_codes(clusters, n_items)
    n_clusters = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    if not within:
        counts = np.zeros((n_resamples, n_clusters))
        np.add.at(counts, (np.arange(n_resamples)[:, None], picks), 1.0)
        return counts[:, codes]
    order = np.argsort(codes, kind="stable")  # members of cluster g: order[start[g] : start[g] + sizes[g]]
    sizes = np.bincount(codes, minlength=n_clusters)
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    u = rng.random((n_resamples, n_clusters, int(sizes.max())))
    m = sizes[picks][..., None]  # [B, G, 1]: members of the drawn cluster
    keep = np.broadcast_to(np.arange(u.shape[-1])[None, None, :] < m, u.shape)
    position = start[picks][..., None] + np.floor(u * m).astype(int)
    item = order[np.where(keep, position, 0)]
    flat = (np.arange(n_resamples)[:, None, None] * n_items + item)[keep]
    weights = np.bincount(flat, minlength=n_resamples * n_items).reshape(n_resamples, n_items).astype(float)
    return weights


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic with its percentile bootstrap interval.

    Attributes:
        estimate: the statistic on the sample itself.
        low, high: the percentile interval of the resampled statistics (NaN resamples dropped).
        n: items; n_clusters: clusters (= n for independent items).
        draws: the resampled statistics, ``[n_resamples]`` (for tests of your own, e.g. a difference).
    """

    estimate: float
    low: float
    high: float
    n: int
    n_clusters: int
    draws: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, float]:
        """``{"estimate", "low", "high", "n", "n_clusters"}`` (JSON-ready)."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "n_clusters": self.n_clusters}


def percentile_interval(draws: Sequence[float] | np.ndarray, ci: float = 0.95) -> tuple[float, float]:
    """The percentile interval of resampled statistics (NaN draws dropped; ``(nan, nan)`` without any)."""
    d = np.asarray(draws, dtype=float)
    kept = d[~np.isnan(d)]
    if len(kept) == 0:
        return float("nan"), float("nan")
    tail = (1 - ci) / 2 * 100
    low, high = np.percentile(kept, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_wald_p_value(estimate: float, draws: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of ``estimate`` against 0 with the bootstrap draws' standard error: ``erfc(|d| / (se sqrt 2))``.

    Unlike `bootstrap_p_value` it has no floor of ``2 / (1 + B)``, so Holm over many tests can still reject; it
    assumes the draws are roughly normal. NaN with fewer than two draws; with a zero standard error, 1 for an
    estimate of 0 and 0 otherwise.
    """
    d = np.asarray(draws, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2 or np.isnan(estimate):
        return float("nan")
    se = float(d.std(ddof=1))
    if se == 0.0:
        return 1.0 if estimate == 0 else 0.0
    return float(math.erfc(abs(estimate) / (se * math.sqrt(2.0))))


def cluster_bootstrap(
    values: Sequence[float] | np.ndarray, clusters: Sequence[Any] | np.ndarray | None = None, *,
    statistic: Callable[[np.ndarray, np.ndarray], float] | None = None, within: bool = False,
    n_resamples: int = 10_000, ci: float = 0.95, seed: int = 0,
) -> BootstrapResult:
    """Percentile bootstrap CI of a statistic of items nested in clusters (questions in scenes).

    Clusters are resampled with replacement, and with ``within=True`` the items inside each drawn
    cluster as well (`bootstrap_weights`). The default statistic is the mean over items, which weights a
    cluster by its number of items (NaN values are dropped).

    Args:
        values: ``[n]`` or ``[n, k]`` (columns resampled together, e.g. a numerator and a denominator).
        clusters: one label per item (e.g. the scene id), or None (independent items: `bootstrap_ci`).
        statistic: ``f(values, weights) -> float`` with ``weights`` the items' multiplicities ``[n]``
            (all ones for the sample itself); default: the weighted mean of a 1-D ``values``.
        within: two-stage resampling (clusters, then items within them).
        n_resamples, ci, seed: the bootstrap.

    Returns:
        A `BootstrapResult`.

    Example:
        >>> r = cluster_bootstrap([1.0, 2.0, 3.0, 5.0], clusters=["a", "a", "b", "b"], n_resamples=2000)
        >>> r.estimate
        2.75
    """
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        raise ValueError("cluster_bootstrap needs at least one value.")
    weights = bootstrap_weights(clusters, len(x), n_resamples=n_resamples, seed=seed, within=within)
    if statistic is None:
        if x.ndim != 1:
            raise ValueError("the default statistic (the mean) needs 1-D values; pass statistic= for columns.")
        ok = ~np.isnan(x)
        w = weights[:, ok]
        with np.errstate(invalid="ignore", divide="ignore"):
            draws = (w @ x[ok]) / w.sum(1)
        estimate = float(x[ok].mean()) if ok.any() else float("nan")
    else:
        draws = np.array([statistic(x, w) for w in weights], dtype=float)
        estimate = float(statistic(x, np.ones(len(x))))
    low, high = percentile_interval(draws, ci)
    return BootstrapResult(estimate, low, high, len(x), int(cluster_codes(clusters, len(x)).max()) + 1, draws)


def ratio_ci(
    numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray,
    clusters: Sequence[Any] | np.ndarray | None = None, *, within: bool = False, n_resamples: int = 10_000,
    ci: float = 0.95, seed: int = 0,
) -> BootstrapResult:
    """A ratio of means, ``mean(numerator) / mean(denominator)``, with its (cluster) bootstrap interval.

    The "share carried" of patching: ``numerator = patched - baseline`` and ``denominator = treated -
    baseline`` per example, so the estimate is ``(mean patched - mean baseline) / (mean treated - mean
    baseline)``: a ratio of means, not a mean of per-example ratios (which examples with a small
    denominator would dominate). Numerator and denominator are resampled together (same items), by
    cluster when ``clusters`` is given. Items where either value is NaN are dropped; a resample whose
    denominator mean is 0 gives NaN (dropped from the interval).

    Example:
        >>> ratio_ci([1.0, 3.0], [2.0, 4.0], n_resamples=100).estimate
        0.6666666666666666
    """
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if num.shape != den.shape or num.ndim != 1:
        raise ValueError(f"numerator and denominator must be 1-D of one length; got {num.shape} and {den.shape}.")
    ok = ~(np.isnan(num) | np.isnan(den))
    if not ok.any():
        raise ValueError("ratio_ci needs at least one item with a numerator and a denominator.")
    if clusters is not None and len(list(clusters)) != len(num):
        raise ValueError(f"{len(num)} values but {len(list(clusters))} cluster labels: pass one label per value.")
    labels = None if clusters is None else [c for c, keep in zip(clusters, ok, strict=True) if keep]
    num, den = num[ok], den[ok]
    weights = bootstrap_weights(labels, len(num), n_resamples=n_resamples, seed=seed, within=within)
    with np.errstate(invalid="ignore", divide="ignore"):
        top, bottom = weights @ num, weights @ den
        draws = np.where(bottom != 0, top / np.where(bottom != 0, bottom, 1.0), np.nan)
    estimate = float(num.sum() / den.sum()) if den.sum() != 0 else float("nan")
    low, high = percentile_interval(draws, ci)
    return BootstrapResult(estimate, low, high, len(num), int(cluster_codes(labels, len(num)).max()) + 1, draws)


def bootstrap_p_value(draws: Sequence[float] | np.ndarray, null: float = 0.0) -> float:
    """Two-sided percentile-bootstrap p-value that a statistic equals ``null``: ``2 min(P*(d <= null), P*(d >= null))``.

    From the resampled statistics of `cluster_bootstrap` / `ratio_ci` (NaN draws dropped), with +1
    smoothing so that it is never 0: ``min(1, 2 (1 + min(#{d <= null}, #{d >= null})) / (1 + B))``.
    """
    d = np.asarray(draws, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return float("nan")
    tail = min(int((d <= null).sum()), int((d >= null).sum()))
    return float(min(1.0, 2 * (1 + tail) / (1 + len(d))))


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray,
          weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC (ties count one half) of scores against boolean labels, for one or many weightings of the examples.

    The probability that a positive outscores a negative. With bootstrap multiplicities
    (`bootstrap_weights`) it gives every resample's AUROC in one pass.

    Args:
        scores: ``[m]`` scores.
        labels: ``[m]`` booleans.
        weights: ``[B, m]`` non-negative example weights; all ones when None.

    Returns:
        ``[B]`` AUROCs (``[1]`` without weights); NaN where a weighting leaves no positive or no negative.

    Example:
        >>> float(auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])[0])
        0.75
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"{s.shape} scores but {y.shape} labels: pass one label per score.")
    w = np.ones((1, len(s))) if weights is None else np.asarray(weights, dtype=float)
    uniq, inv = np.unique(s, return_inverse=True)
    n_unique, n_draws = len(uniq), w.shape[0]
    offsets = (np.arange(n_draws)[:, None] * n_unique + inv[None, ~y]).ravel()
    neg = np.bincount(offsets, weights=w[:, ~y].ravel(), minlength=n_draws * n_unique).reshape(n_draws, n_unique)
    below = np.cumsum(neg, axis=1) - neg
    wins = (w[:, y] * (below[:, inv[y]] + 0.5 * neg[:, inv[y]])).sum(1)
    total = w[:, y].sum(1) * w[:, ~y].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, wins / np.where(total > 0, total, 1.0), np.nan)
