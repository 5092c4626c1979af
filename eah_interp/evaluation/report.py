"""The report of an experiment: ``results.csv``, ``report.md`` (what each arm edited, tables with CIs) and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from eah_interp.evaluation.arms import edits_text
from eah_interp.evaluation.statistics import ALPHA, PARTS, replication_table, summarise_items


def load_items(path: str | Path):
    """The results of ``items.jsonl`` as a DataFrame (one row per result)."""
    import pandas as pd

    from eah_interp.resumable import read_items

    return pd.DataFrame(read_items(path)[0])


def arms_markdown(run: dict[str, Any], items) -> list[str]:
    """Per arm: its interventions, the layers each edits in this model and, for EAH, the source heads it chose.

    Source heads are those of the prompt forward of each caption (``source_heads``: one per edited layer),
    counted over items as ``head x items`` (``none``: no broadcast in that row, e.g. the reference preset's
    skip when head 0 would be the source).
    """
    lines = ["| arm | interventions (resolved layers) | EAH source heads (prompt forward: head x items) |",
             "|---|---|---|"]
    captions = items[items["task"] == "caption"] if "source_heads" in items else None
    for arm in run.get("conditions", []):
        edits = edits_text(arm.get("edits", []))
        heads: dict[str, int] = {}
        chosen_per_item = [] if captions is None else captions.loc[captions["condition"] == arm["name"], "source_heads"]
        for per_item in chosen_per_item:
            for h in per_item if isinstance(per_item, list) else []:
                heads[str(h)] = heads.get(str(h), 0) + 1
        chosen = ", ".join(f"{h if h != '-1' else 'none'} x {n}" for h, n in sorted(heads.items(), key=lambda kv: -kv[1]))
        beams = f" (beam {arm['num_beams']})" if arm.get("num_beams", 1) > 1 else ""
        lines.append(f"| {arm['name']}{beams} | {edits} | {chosen or '-'} |")
    return lines + [""]


def _cell(row, baseline: str) -> str:
    if np.isnan(row["value"]):
        return row["note"] or "undefined"
    cell = f"{row['value']:.3f}"
    if row["condition"] != baseline and not np.isnan(row.get("ci_low", np.nan)):
        mark = " *" if row["significant"] else ""
        cell += (f" ({row['diff']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}], "
                 f"p={row['p_value']:.3f}, Holm p={row['p_holm']:.3f}{mark})")
    elif row["note"]:
        cell += f" ({row['note']})"
    return cell


def _markdown_table(sub, baseline: str) -> list[str]:
    metrics = list(dict.fromkeys(sub["metric"]))
    lines = ["| condition | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for cond, g in sub.groupby("condition", sort=False):
        cells = [_cell(g[g["metric"] == m].iloc[0], baseline) if (g["metric"] == m).any() else "" for m in metrics]
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return lines + [""]


def _part_tables(summary, baseline: str, level: str = "##") -> list[str]:
    """The report's tables of one family (all results, or one replication part)."""
    lines: list[str] = []
    caption = summary[summary["task"] == "caption"]
    if not caption.empty:
        lines += [f"{level} Captions (CHAIR)", "", *_markdown_table(caption, baseline)]
    pope = summary[(summary["task"] == "pope") & summary["split"].notna()]
    for split in dict.fromkeys(pope["split"]):
        lines += [f"{level} Yes/no questions (POPE), split `{split}`", ""]
        lines += _markdown_table(pope[pope["split"] == split], baseline)
    probes = summary[(summary["task"] == "pope") & summary["split"].isna()]
    if not probes.empty:
        lines += [f"{level} Logit probe log p(yes) - log p(no) (each distinct question once)", ""]
        lines += _markdown_table(probes, baseline)
    return lines


def replication_markdown(table, *, hide_null: bool = False) -> list[str]:
    """A ``## Replication`` section: how many discoveries replicated, then `replication_table` as Markdown
    (replicated first; ``hide_null``: without the arm x metrics significant in neither part)."""
    counts = table["verdict"].value_counts()
    found = int(counts.get("replicated", 0) + counts.get("not replicated", 0))
    lines = ["## Replication", "", f"A result is **replicated** when it is significant after Holm in discovery and "
             f"significant after Holm, with the same sign, in replication: {int(counts.get('replicated', 0))} of {found} "
             f"discoveries replicated ({len(table)} arm x metric tests per part).", ""]
    shown = table[table["verdict"] != "null"] if hide_null else table
    if shown.empty:
        return lines + ["(no arm x metric is significant in either part)" if hide_null else "(nothing was tested)", ""]
    order = {"replicated": 0, "not replicated": 1, "replication only": 2, "null": 3}
    shown = shown.assign(_o=shown["verdict"].map(order)).sort_values("_o", kind="stable")
    lines += ["| condition | metric | discovery diff (Holm p) | replication diff [95% CI] (Holm p) | verdict |",
              "|---|---|---|---|---|"]
    for r in shown.itertuples():
        disc = f"{r.diff_discovery:+.3f} ({r.p_holm_discovery:.3f})" if r.diff_discovery == r.diff_discovery else ""
        rep = (f"{r.diff_replication:+.3f} [{r.ci_low_replication:+.3f}, {r.ci_high_replication:+.3f}] "
               f"({r.p_holm_replication:.3f})") if r.diff_replication == r.diff_replication else ""
        verdict = f"**{r.verdict}**" if r.verdict == "replicated" else r.verdict
        lines.append(f"| {r.condition} | {r.metric} | {disc} | {rep} | {verdict} |")
    if hide_null:
        lines += ["", f"({int(counts.get('null', 0))} arm x metric tests significant in neither part are left out; "
                  "all are in replication.csv.)"]
    return lines + [""]


def effects_plot(summary, path: Path, *, baseline: str = "baseline", metrics: list[str] | None = None,
                 title: str = "{metric}: diff vs baseline") -> None:
    """Differences to the baseline with 95% CIs, one panel per metric, one colour per replication part.

    ``metrics``: the panels (default: CHAIR_i, recall, the first POPE split's accuracy, the absent-object
    probe). Nothing is written when no arm has a CI for them.
    """
    import matplotlib.pyplot as plt  # the caller's backend stays as it is (the figure is saved and closed)

    if metrics is None:
        first_split = next(iter(dict.fromkeys(summary.loc[summary["task"] == "pope", "split"].dropna())), None)
        metrics = ["chair_i", "recall", f"pope_acc_{first_split}", "probe_absent"]
    plot = summary[(summary["condition"] != baseline) & summary["metric"].isin(metrics) & summary["ci_low"].notna()]
    if plot.empty:
        return
    shown = [m for m in metrics if m in set(plot["metric"])]
    conds = list(dict.fromkeys(plot["condition"]))
    parts = list(dict.fromkeys(plot["part"]))
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 0.8 + 0.35 * len(conds)), squeeze=False)
    for ax, m in zip(axes[0], shown, strict=True):
        for k, part in enumerate(parts):
            g = plot[(plot["metric"] == m) & (plot["part"] == part)]
            y = np.array([conds.index(c) for c in g["condition"]]) + (k - (len(parts) - 1) / 2) * 0.25
            ax.errorbar(g["diff"], y, xerr=[g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]], fmt="o", ms=3,
                        label=part if part != "all" else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(np.arange(len(conds)), conds if ax is axes[0][0] else [""] * len(conds))
        ax.invert_yaxis()
        ax.set_title(title.format(metric=m), fontsize=9)
    if len(parts) > 1:
        axes[0][-1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    items_path: Path, out: Path, *, title: str = "EAH vs baseline vs controls", n_resamples: int = 5000,
    baseline: str = "baseline",
):
    """Write ``results.csv`` (`summarise_items`), ``report.md`` and ``effects.png`` into ``out``; returns the summary.

    The report states the dataset, prompt, generation budget and CHAIR protocol and each arm's resolved
    layers and EAH source heads (from ``run.json`` and the results), gives POPE per split that exists, names
    every undefined metric and why, and marks as significant (``*``) only what survives Holm's correction
    (``p_holm <= ALPHA``) across all arms x metrics of its family. With a replication split
    (`ReplicationSplit`) it gives the tables of each part (Holm within each) and the replication verdicts
    (`replication_table`, also written as ``replication.csv``).
    """
    items = load_items(items_path)
    summary = summarise_items(items, n_resamples=n_resamples, baseline=baseline)
    summary.to_csv(out / "results.csv", index=False)
    n_items = items["item"].nunique() if len(items) else 0
    lines = [f"# {title}", "", f"Results: `{items_path}`; {n_items} items.", ""]
    run_file = Path(items_path).parent / "run.json"
    run: dict[str, Any] = json.loads(run_file.read_text()) if run_file.exists() else {}
    if run:
        settings = run.get("arguments", {})
        lines += [
            f"* Dataset: {run.get('dataset', {}).get('description', '?')}",
            f"* Model: `{settings.get('model')}`; captions: max_new_tokens={settings.get('max_new_tokens')}, prompt:",
            "", "  ```text", *("  " + line for line in str(settings.get("prompt", "")).splitlines()), "  ```", "",
            f"* CHAIR protocol: `{settings.get('chair_protocol')}`, vocabulary `{settings.get('vocabulary')}`.",
            "", "## Arms", "", *arms_markdown(run, items),
        ]
    parts = [p for p in dict.fromkeys(summary["part"]) if p != "all"]
    method = ("Differences are condition minus baseline on the same items; 95% CIs from a paired bootstrap over "
              "items; p from a paired sign-flip permutation test on per-item differences; Holm p adjusts the p-values "
              "of {family} for multiple comparisons. `*` marks Holm p <= " + f"{ALPHA} (the raw p alone never marks "
              "a result).")
    if not parts:
        n_tests = int(summary["p_value"].notna().sum())
        lines += [method.format(family=f"all {n_tests} tests of this report (every arm x metric)"), ""]
        lines += _part_tables(summary, baseline)
    else:
        n_part = {p: int(items.loc[items["part"] == p, "item"].nunique()) for p in parts}
        how = run.get("replication", {}).get("description", "a pre-registered replication split")
        tests = ", ".join(f"{p}: {int(summary.loc[summary['part'] == p, 'p_value'].notna().sum())}" for p in parts)
        lines += [f"Items are split into parts before any result is seen ({how}): "
                  + ", ".join(f"{p}: {n_part[p]} items" for p in parts) + ".",
                  method.format(family=f"one part (every arm x metric of that part: {tests} tests)"), ""]
        if set(PARTS) <= set(parts):
            table = replication_table(summary)
            table.to_csv(out / "replication.csv", index=False)
            lines += replication_markdown(table)
        for part in parts:
            lines += [f"## {part.capitalize()} part ({n_part[part]} items)", ""]
            lines += _part_tables(summary[summary["part"] == part], baseline, "###")
    undefined = summary[summary["value"].isna()]
    if not undefined.empty:
        lines += ["## Undefined metrics", ""]
        lines += [f"* `{r.metric}` for `{r.condition}`{'' if r.part == 'all' else f' ({r.part})'}: {r.note}"
                  for r in undefined.itertuples()] + [""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    effects_plot(summary, out / "effects.png", baseline=baseline)
    return summary
