"""The statistics of an experiment: metrics as ratios of per-item sums, paired tests, Holm, replication.

One significance rule everywhere (the runner's tables, the studies): a difference is significant when
its Holm-adjusted p-value is at most `ALPHA` (`holm_family`); an unadjusted p never marks a result. The
primitives (bootstrap, sign-flip permutation p, Holm) are `eah_interp.metrics.stats`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eah_interp.errors import ConfigError
from eah_interp.metrics.stats import bootstrap_weights, holm, percentile_interval, sign_flip_p_value

#: Significance level, applied to Holm-adjusted p-values only.
ALPHA = 0.05
#: The two parts of a replication split, in report order.
PARTS = ("discovery", "replication")
#: How a `ReplicationSplit` assigns items: a hash of the item id, or the dataset's order (a seed range for scenes).
SPLIT_METHODS = ("hash", "order")


def holm_family(p_values: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm-adjusted p-values of one family of tests and which are significant: ``p_holm <= alpha``.

    NaN p-values (nothing tested) stay NaN, are not significant and do not count towards the family size.

    Example:
        >>> holm_family([0.01, 0.04, 0.03])
        ([0.03, 0.06, 0.06], [True, False, False])
    """
    adjusted = holm(list(p_values)) if len(p_values) else []
    return adjusted, [bool(p <= alpha) for p in adjusted]  # NaN <= alpha is False


def verdict(significant_discovery: bool, significant_replication: bool, diff_discovery: float,
            diff_replication: float) -> str:
    """``"replicated"`` (significant in both parts, same sign), ``"not replicated"`` (in discovery only, or
    with the opposite sign), ``"replication only"`` (not a finding: it was not predicted) or ``"null"``."""
    same = np.sign(diff_discovery) == np.sign(diff_replication) and diff_discovery != 0
    if significant_discovery:
        return "replicated" if significant_replication and same else "not replicated"
    return "replication only" if significant_replication else "null"


@dataclass(frozen=True)
class ReplicationSplit:
    """A pre-registered discovery / replication split of a dataset's items, fixed before any result is seen.

    Every item belongs to one part: ``"discovery"`` (find effects) or ``"replication"`` (confirm them).
    `summarise_items` analyses each part on its own (Holm within each part) and `replication_table` calls
    a result *replicated* only when it is significant after Holm in both parts with the same sign
    (`verdict`). The split is recorded in ``run.json`` and in every result (field ``part``), so a
    resumed run cannot change it.

    Args:
        fraction: the share of items in the replication part, in (0, 1).
        by: ``"hash"``: an item is in replication when ``sha256(f"{salt}:{item id}")``, read as a number
            in [0, 1), is below ``fraction`` (depends on the id only: stable under sampling, sharding and
            reordering; the part sizes are ``fraction`` on average). ``"order"``: the last
            ``round(fraction * n)`` items of the dataset in its order (for the held-out scenes, whose items
            are in seed order, that is the upper seed range; exact part sizes).
        salt: mixed into the hash (another salt = another random split).

    Example:
        >>> ReplicationSplit(0.5, by="order").assign(["a", "b", "c", "d"])
        {'a': 'discovery', 'b': 'discovery', 'c': 'replication', 'd': 'replication'}
    """

    fraction: float = 0.5
    by: str = "hash"
    salt: str = "eah-interp"

    def __post_init__(self) -> None:
        if not isinstance(self.fraction, (int, float)) or isinstance(self.fraction, bool) or not 0 < self.fraction < 1:
            raise ConfigError(
                f"the replication fraction must be a number strictly between 0 and 1 (the share of items kept for "
                f"replication, e.g. 0.5); got {self.fraction!r}."
            )
        if self.by not in SPLIT_METHODS:
            raise ConfigError(f"ReplicationSplit.by must be one of {SPLIT_METHODS}; got {self.by!r}.")

    def assign(self, item_ids: Sequence[str]) -> dict[str, str]:
        """The part of every item: ``{item id: "discovery" | "replication"}`` (``item_ids`` in dataset order).

        Raises:
            ConfigError: fewer than 2 items, or a part would be empty.
        """
        ids = list(item_ids)
        if len(ids) < 2:
            raise ConfigError(f"a replication split needs at least 2 items; the dataset has {len(ids)}.")
        if self.by == "order":
            n_rep = round(self.fraction * len(ids))
            if not 0 < n_rep < len(ids):
                raise ConfigError(
                    f"a replication fraction of {self.fraction:g} leaves a part of {len(ids)} items empty; "
                    "use more items or a fraction nearer 0.5."
                )
            return {i: PARTS[k >= len(ids) - n_rep] for k, i in enumerate(ids)}
        parts = {i: PARTS[self._unit(i) < self.fraction] for i in ids}
        missing = [p for p in PARTS if p not in parts.values()]
        if missing:
            raise ConfigError(
                f"the hash split with fraction {self.fraction:g} puts none of the {len(ids)} items in {missing[0]}; "
                "use more items, a fraction nearer 0.5, or by='order'."
            )
        return parts

    def _unit(self, item_id: str) -> float:
        digest = hashlib.sha256(f"{self.salt}:{item_id}".encode()).hexdigest()
        return int(digest[:15], 16) / 16**15

    def describe(self) -> str:
        """One sentence: how items are split."""
        how = (f"sha256('{self.salt}:<item id>') < {self.fraction:g}" if self.by == "hash"
               else f"the last {self.fraction:.0%} of the items in dataset order")
        return (f"pre-registered replication split: replication = {how}, discovery = the rest; each part is "
                "analysed on its own (Holm within the part); replicated = significant after Holm in discovery "
                "and in replication with the same sign.")

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "by": self.by, "salt": self.salt}


# ---------------------------------------------------------------------------- metrics
@dataclass(frozen=True)
class RatioMetric:
    """A metric as a ratio of per-item sums: ``sum(numerator) / sum(denominator)`` over the items.

    Attributes:
        name: e.g. ``"chair_i"``, ``"pope_f1_adversarial"``.
        task: ``"caption"`` or ``"pope"``.
        numerator, denominator: columns of `item_table`.
        undefined: why the metric has no value when its denominator sums to 0 (shown in the report).
        split: the POPE split, for per-split metrics.
    """

    name: str
    task: str
    numerator: str
    denominator: str
    undefined: str
    split: str | None = None


#: Caption metrics (CHAIR needs ground-truth objects: ``chair_n`` counts captions that have them).
CAPTION_METRICS = (
    RatioMetric("chair_s", "caption", "any_hallucination", "chair_n", "no ground-truth objects"),
    RatioMetric("chair_i", "caption", "n_hallucinated", "n_mentioned", "no mentions"),
    RatioMetric("recall", "caption", "n_recalled", "n_truth", "no ground-truth objects"),
    RatioMetric("length", "caption", "n_words", "one", "no captions"),
)

#: The same CHAIR metrics under the strict protocol, reported next to the reference ones for ``"both"``.
STRICT_CAPTION_METRICS = tuple(
    RatioMetric(f"{m.name}_strict", "caption", f"{m.numerator}_strict", m.denominator.replace("mentioned", "mentioned_strict"),
                m.undefined) for m in CAPTION_METRICS[:3]
)

#: The logit probe over each item's distinct questions (a question in two splits counts once).
PROBE_METRICS = (
    RatioMetric("probe_present", "pope", "probe_present_sum", "n_present", "no present-object questions"),
    RatioMetric("probe_absent", "pope", "probe_absent_sum", "n_absent", "no absent-object questions"),
)


def pope_metrics(split: str) -> tuple[RatioMetric, ...]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio of one split ("yes" is the positive class)."""
    return (
        RatioMetric(f"pope_acc_{split}", "pope", f"correct_{split}", f"n_{split}", "no questions", split),
        RatioMetric(f"pope_precision_{split}", "pope", f"tp_{split}", f"yes_{split}", "no yes answers", split),
        RatioMetric(f"pope_recall_{split}", "pope", f"tp_{split}", f"pos_{split}", "no present-object questions", split),
        RatioMetric(f"pope_f1_{split}", "pope", f"f1num_{split}", f"f1den_{split}",
                    "no yes answers and no present objects", split),
        RatioMetric(f"pope_yes_ratio_{split}", "pope", f"yes_{split}", f"n_{split}", "no questions", split),
    )


def metrics_for(items) -> list[RatioMetric]:
    """The metrics the results support: captions, then POPE per split present (first-seen order), then probes."""
    tasks = set(items["task"]) if "task" in items else set()
    metrics: list[RatioMetric] = list(CAPTION_METRICS) if "caption" in tasks else []
    if "caption" in tasks and "mentioned_strict" in items and items["mentioned_strict"].notna().any():
        metrics += STRICT_CAPTION_METRICS
    if "pope" in tasks:
        splits = dict.fromkeys(items.loc[items["task"] == "pope", "split"].dropna())
        for split in splits:
            metrics += pope_metrics(split)
        metrics += PROBE_METRICS
    return metrics


def item_table(items):
    """Per (condition, item, task) sufficient statistics: every metric in `metrics_for` is a ratio of their sums.

    Columns a row does not have (a caption without ground truth has no ``n_mentioned``) are NaN.
    """
    import pandas as pd

    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    probed: set[tuple[str, str, str]] = set()
    for rec in items.to_dict("records"):
        key = (rec["condition"], rec["item"], rec["task"])
        row = rows.setdefault(key, {"condition": rec["condition"], "item": rec["item"], "task": rec["task"]})
        if rec["task"] == "caption":
            row.update(one=1.0, n_words=float(rec["n_words"]))
            if isinstance(rec.get("mentioned"), list) and isinstance(rec.get("truth"), list):
                truth = set(rec["truth"])
                row.update(chair_n=1.0, n_truth=float(len(truth)))
                for sfx in ("", "_strict"):  # counted mentions as the protocol lists them (once per object, or all)
                    mentioned, halluc = rec.get(f"mentioned{sfx}"), rec.get(f"hallucinated{sfx}")
                    if isinstance(mentioned, list):
                        row.update({f"any_hallucination{sfx}": float(len(halluc) > 0),
                                    f"n_hallucinated{sfx}": float(len(halluc)), f"n_mentioned{sfx}": float(len(mentioned)),
                                    f"n_recalled{sfx}": float(len(set(mentioned) & truth))})
            continue
        said = rec["said_yes"] is True or rec["said_yes"] == 1  # unparsed (None/NaN) counts as "no"
        label, split = bool(rec["label"]), rec["split"]
        add = {
            f"n_{split}": 1.0, f"correct_{split}": float(said == label), f"yes_{split}": float(said),
            f"tp_{split}": float(said and label), f"pos_{split}": float(label),
            f"f1num_{split}": 2.0 * (said and label),
            f"f1den_{split}": 2.0 * (said and label) + float(said and not label) + float(label and not said),
        }
        for col, value in add.items():
            row[col] = row.get(col, 0.0) + value
        text_key = (rec["condition"], rec["item"], rec.get("text") or rec["question"])
        if text_key not in probed:
            probed.add(text_key)
            kind = "present" if label else "absent"
            row[f"probe_{kind}_sum"] = row.get(f"probe_{kind}_sum", 0.0) + float(rec["logit_diff"])
            row[f"n_{kind}"] = row.get(f"n_{kind}", 0.0) + 1.0
    table = pd.DataFrame(list(rows.values()))
    pope = table["task"] == "pope" if not table.empty else []
    if len(table) and any(pope):  # a POPE row lacking a split or a probe kind has 0 of it, not "unknown"
        cols = [c for c in table.columns if c.startswith(("n_", "correct_", "yes_", "tp_", "pos_", "f1", "probe_"))
                and not c.startswith(("n_words", "n_hallucinated", "n_mentioned", "n_recalled", "n_truth"))]
        table.loc[pope, cols] = table.loc[pope, cols].fillna(0.0)
    return table


def parts_of(items) -> list[str]:
    """The replication-split parts the results carry (``PARTS`` order), or ``[]`` for results without a split.

    Raises:
        ConfigError: some results have a part and others have none (results of two runs mixed).
    """
    if "part" not in items or items.empty or items["part"].isna().all():
        return []
    if items["part"].isna().any():
        raise ConfigError(
            "some results carry a replication part and others do not (results of runs with and without a "
            "replication split mixed in one file); rerun into another --out."
        )
    unknown = set(items["part"]) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown replication part(s) {sorted(unknown)}; parts are {PARTS}.")
    return [p for p in PARTS if (items["part"] == p).any()]


# ---------------------------------------------------------------------------- summaries
#: The columns of `summarise_items` (and of ``results.csv``).
SUMMARY_COLUMNS = ("part", "condition", "task", "split", "metric", "value", "baseline", "diff", "ci_low", "ci_high",
                   "p_value", "p_holm", "significant", "n", "note")


def summarise_items(items, *, baseline: str = "baseline", n_resamples: int = 5000, seed: int = 0,
                    alpha: float = ALPHA):
    """Metrics per arm (and replication part) with paired bootstrap 95% CIs of the difference to ``baseline``.

    Items are the resampling unit (`eah_interp.metrics.stats.bootstrap_weights`; an item's questions move
    together: a cluster bootstrap of questions in images): each draw resamples items with replacement and
    recomputes every metric (a ratio of sums over items) on the same items for the arm and the baseline,
    restricted to items where both have a non-zero denominator. The p-value is a paired sign-flip permutation test
    on per-item differences. ``p_holm`` adjusts the p-values of one family (every non-baseline arm x
    metric of one part; without a replication split, ``part == "all"`` and the whole table is one family)
    and ``significant`` is `holm_family`'s rule, ``p_holm <= alpha``, never the raw p.

    POPE metrics exist only for the splits the results contain. A metric whose denominator sums to 0
    for an arm (CHAIR_i when nothing is mentioned) is kept as a row with ``value`` NaN and ``note`` =
    ``"undefined (<why>)"``.

    Returns:
        A tidy DataFrame with `SUMMARY_COLUMNS`.
    """
    import pandas as pd

    frames = [_summarise_part(items if part == "all" else items[items["part"] == part], baseline, n_resamples,
                              seed, alpha).assign(part=part) for part in parts_of(items) or ["all"]]
    return pd.concat(frames, ignore_index=True)[list(SUMMARY_COLUMNS)]


def _summarise_part(items, baseline: str, n_resamples: int, seed: int, alpha: float):
    import pandas as pd

    table = item_table(items)
    rows = []
    metrics = metrics_for(items)
    for metric in metrics:
        per_task = table[table["task"] == metric.task]
        base = per_task[per_task["condition"] == baseline].set_index("item")
        for cond, sub in per_task.groupby("condition", sort=False):
            sub = sub.set_index("item")
            if metric.split is not None and (f"n_{metric.split}" not in sub or not sub[f"n_{metric.split}"].sum() > 0):
                continue  # this arm has no question of that split
            row: dict[str, Any] = {"condition": cond, "task": metric.task, "split": metric.split, "metric": metric.name,
                                   "value": np.nan, "baseline": np.nan, "diff": np.nan, "n": 0, "note": ""}
            rows.append(row)
            own_num = sub[metric.numerator] if metric.numerator in sub else pd.Series(dtype=float)
            own_den = sub[metric.denominator] if metric.denominator in sub else pd.Series(dtype=float)
            if metric.task == "caption" and metric.name != "length" and not (sub.get("chair_n", pd.Series()).sum() > 0):
                row["note"] = "undefined (no ground-truth objects)"
                continue
            if not own_den.sum() > 0:
                row["note"] = f"undefined ({metric.undefined})"
                continue
            row["value"] = own_num.sum() / own_den.sum()
            row["n"] = int((own_den > 0).sum())
            if metric.denominator not in base:
                row["note"] = "no baseline"
                continue
            paired = sorted(set(sub.index[sub[metric.denominator] > 0]) & set(base.index[base[metric.denominator] > 0]))
            if not paired:
                row["note"] = f"baseline undefined ({metric.undefined})"
                continue
            a_num, a_den = sub.loc[paired, metric.numerator].to_numpy(), sub.loc[paired, metric.denominator].to_numpy()
            b_num, b_den = base.loc[paired, metric.numerator].to_numpy(), base.loc[paired, metric.denominator].to_numpy()
            value, ref = a_num.sum() / a_den.sum(), b_num.sum() / b_den.sum()
            row.update(value=value, baseline=ref, diff=value - ref, n=len(paired))
            if cond != baseline:
                counts = bootstrap_weights(None, len(paired), n_resamples=n_resamples, seed=seed)
                with np.errstate(invalid="ignore", divide="ignore"):
                    diffs = (counts @ a_num) / (counts @ a_den) - (counts @ b_num) / (counts @ b_den)
                    per_item = a_num / a_den - b_num / b_den
                row["ci_low"], row["ci_high"] = percentile_interval(diffs)
                row["p_value"] = sign_flip_p_value(per_item, n_resamples=n_resamples, seed=seed)
    frame = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS if c not in ("part", "p_holm", "significant")])
    frame["p_holm"], frame["significant"] = holm_family(frame["p_value"].tolist(), alpha)
    order = {m.name: i for i, m in enumerate(metrics)}
    conds = {c: i for i, c in enumerate(dict.fromkeys(items["condition"]))} if len(items) else {}
    frame["_m"], frame["_c"] = frame["metric"].map(order), frame["condition"].map(conds)
    return frame.sort_values(["_c", "_m"], kind="stable").drop(columns=["_m", "_c"]).reset_index(drop=True)


def replication_table(summary, *, alpha: float = ALPHA):
    """Per arm x metric: the discovery and replication effects and whether the effect replicated (`verdict`).

    Significance is `holm_family`'s rule within each part (``p_holm <= alpha``); unadjusted p-values never
    count.

    Args:
        summary: `summarise_items`'s frame of results with a replication split (parts ``discovery`` and
            ``replication``).

    Returns:
        A DataFrame: condition, task, split, metric, diff_discovery, p_holm_discovery, diff_replication,
        ci_low_replication, ci_high_replication, p_holm_replication, verdict (only tested arm x metrics).

    Raises:
        ConfigError: the summary lacks one of the parts.
    """
    import pandas as pd

    missing = [p for p in PARTS if p not in set(summary["part"])]
    if missing:
        raise ConfigError(
            f"the summary has no {missing[0]!r} part: run the experiment with a replication split "
            "(run_experiment(..., replication=ReplicationSplit(0.5)), eah-interp eval --replication 0.5)."
        )
    keys = ["condition", "task", "split", "metric"]
    tested = summary[summary["p_value"].notna()]
    disc = tested[tested["part"] == "discovery"].set_index(keys)
    rep = tested[tested["part"] == "replication"].set_index(keys)
    nan = float("nan")
    rows = []
    for key in disc.index.union(rep.index, sort=False):
        d = disc.loc[key] if key in disc.index else {"diff": nan, "p_holm": nan}
        r = rep.loc[key] if key in rep.index else {"diff": nan, "p_holm": nan, "ci_low": nan, "ci_high": nan}
        rows.append(dict(zip(keys, key, strict=True)) | {
            "diff_discovery": d["diff"], "p_holm_discovery": d["p_holm"], "diff_replication": r["diff"],
            "ci_low_replication": r["ci_low"], "ci_high_replication": r["ci_high"], "p_holm_replication": r["p_holm"],
            "verdict": verdict(bool(d["p_holm"] <= alpha), bool(r["p_holm"] <= alpha), d["diff"], r["diff"]),
        })
    columns = [*keys, "diff_discovery", "p_holm_discovery", "diff_replication", "ci_low_replication",
               "ci_high_replication", "p_holm_replication", "verdict"]
    return pd.DataFrame(rows, columns=columns)
