"""Paired statistics for comparing two decoding conditions on the same items."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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


def sign_flip_p_value(diffs: Sequence[float], *, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value that paired differences have mean 0 (NaNs dropped, +1 smoothing)."""
    diff = np.asarray(diffs, dtype=float)
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0 or np.all(diff == 0):
        return 1.0
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, len(diff)))
    null = np.abs((signs * diff).mean(1))
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
