"""The hallucination experiment runner: baseline vs EAH vs controls, paired, resumable.

For every condition (a named `EAHConfig`, or None for baseline decoding) and every held-out scene it
records, one JSON line per item in ``<out>/items.jsonl``:

* ``task="caption"``: the greedy (or beam) caption and its CHAIR mentions;
* ``task="pope"``: for one present, one random-absent and one adversarial-absent (co-occurrence
  partner) object, the model's first answer token to "Is there a X in the image? Answer yes or no."
  (greedy decoding's first token, from one forward pass) and the logit probe
  ``log p(yes) - log p(no)``.

A rerun skips items already in the file (resumable). `summarise` turns the items into a tidy table of
metrics per condition with paired bootstrap 95% CIs and paired permutation p-values against the
baseline, and `write_report` writes ``results.csv``, ``report.md`` and plots.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eah_interp import hf
from eah_interp.config import EAHConfig
from eah_interp.experiments import generate_texts
from eah_interp.metrics.stats import sign_flip_p_value
from eah_interp.models.bundle import ModelBundle
from eah_interp.scenes import Scene, absent_kinds, iter_scenes, question_for


@dataclass(frozen=True)
class Condition:
    """One arm of the experiment: a name, an EAH config (None = baseline) and the beam width."""

    name: str
    config: EAHConfig | None = None
    num_beams: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_beams": self.num_beams, "config": None if self.config is None else self.config.to_dict()}


def default_conditions(bundle: ModelBundle, *, beams: int = 3) -> list[Condition]:
    """Baseline, EAH (paper and reference presets) and the controls that separate the hypotheses.

    Controls: the broadcast from a random head, from the head with the fewest sinks, at a deep layer
    (the third-last) instead of layer 1, and a sink-free variant (the source map with its sink columns
    removed). Beam search (``beams``) for baseline and EAH-paper.
    """
    n_layers = hf.model_shape(bundle.model)[0]
    t = bundle.threshold
    paper = EAHConfig.paper(threshold=t)
    reference = EAHConfig.reference(threshold=t, layers=(min(15, n_layers - 1),))
    conditions = [
        Condition("baseline"),
        Condition("eah_paper", paper),
        Condition("eah_reference", reference),
        Condition("control_random_head", EAHConfig.paper(threshold=t, source="random", seed=0)),
        Condition("control_fewest_sinks", EAHConfig.paper(threshold=t, source="fewest")),
        Condition("control_deep_layer", EAHConfig.paper(threshold=t, layers=(n_layers - 3,))),
        Condition("control_sink_free", EAHConfig.paper(threshold=t, drop_sinks=True)),
    ]
    if beams > 1:
        conditions += [Condition(f"baseline_beam{beams}", None, beams), Condition(f"eah_paper_beam{beams}", paper, beams)]
    return conditions


def pope_questions_for(scene: Scene, rng: random.Random) -> list[tuple[str, str, bool]]:
    """(mode, object, label): one present kind, one random absent kind, one adversarial absent kind."""
    present = rng.choice(sorted(scene.kinds))
    rand = rng.choice(absent_kinds(scene, "random"))
    adversarial = absent_kinds(scene, "adversarial", rng)[0]
    return [("present", present, True), ("random", rand, False), ("adversarial", adversarial, False)]


class _Store:
    """Append-only JSONL of finished items, keyed by (condition, task, seed, object)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[tuple] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.done.add(self.key(json.loads(line)))

    @staticmethod
    def key(item: dict[str, Any]) -> tuple:
        return (item["condition"], item["task"], item["seed"], item.get("object", ""))

    def add(self, items: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
                self.done.add(self.key(item))


def first_token_answers(
    bundle: ModelBundle, prompts: Sequence[str], images: Sequence[Any], config: EAHConfig | None
) -> tuple[list[str], list[float]]:
    """Greedy first answer token (decoded) and ``log p(yes) - log p(no)`` at the last prompt position."""
    from eah_interp.metrics import yes_no_logit_diff

    inputs = bundle.encode(prompts, images)
    with torch.no_grad():
        if config is None:
            logits = bundle.model(**inputs, use_cache=False).logits[:, -1]
        else:
            with hf.eah(bundle.model, config):
                logits = bundle.model(**inputs, use_cache=False).logits[:, -1]
    answers = bundle.processor.batch_decode(logits.argmax(-1)[:, None])
    diffs = yes_no_logit_diff(logits.float(), bundle.yes_ids, bundle.no_ids)
    return [a.strip() for a in answers], diffs.tolist()


def run_experiment(
    bundle: ModelBundle,
    out: Path,
    *,
    n: int = 100,
    conditions: Sequence[Condition] | None = None,
    pair_strength: float = 0.9,
    max_new_tokens: int = 30,
    batch_size: int = 8,
    tasks: Sequence[str] = ("caption", "pope"),
    progress: bool = True,
) -> Path:
    """Run (or resume) the experiment; returns the items file ``out/items.jsonl``."""
    from eah_interp.metrics import chair_scores, parse_yes_no

    out.mkdir(parents=True, exist_ok=True)
    conditions = list(conditions or default_conditions(bundle))
    (out / "conditions.json").write_text(json.dumps([c.to_dict() for c in conditions], indent=1))
    store = _Store(out / "items.jsonl")
    scenes = list(iter_scenes("heldout", n, pair_strength=pair_strength))
    rng = random.Random(0)
    questions = {s.seed: pope_questions_for(s, rng) for s in scenes}
    for cond in tqdm(conditions, desc="conditions", disable=not progress):
        if "caption" in tasks:
            todo = [s for s in scenes if (cond.name, "caption", s.seed, "") not in store.done]
            for i in tqdm(range(0, len(todo), batch_size), desc=f"{cond.name}: captions", leave=False, disable=not progress):
                chunk = todo[i : i + batch_size]
                texts, heads = generate_texts(
                    bundle, [bundle.caption_prompt] * len(chunk), [s.image for s in chunk], config=cond.config,
                    max_new_tokens=max_new_tokens, num_beams=cond.num_beams, batch_size=batch_size, progress=False,
                )
                chair = chair_scores(texts, [s.kinds for s in chunk], vocabulary="scenes")
                store.add([
                    {
                        "condition": cond.name, "task": "caption", "seed": s.seed, "truth": sorted(s.kinds),
                        "caption": text, "mentioned": sorted(pc["mentioned"]), "hallucinated": sorted(pc["hallucinated"]),
                        "n_words": len(text.split()), "source_heads": h,
                    }
                    for s, text, h, pc in zip(chunk, texts, heads, chair["per_caption"], strict=True)
                ])
        if "pope" in tasks and cond.num_beams == 1:
            todo = [
                (s, mode, obj, label)
                for s in scenes
                for mode, obj, label in questions[s.seed]
                if (cond.name, "pope", s.seed, f"{mode}:{obj}") not in store.done
            ]
            for i in tqdm(range(0, len(todo), batch_size), desc=f"{cond.name}: yes/no", leave=False, disable=not progress):
                chunk = todo[i : i + batch_size]
                prompts = [bundle.yes_no_prompt(question_for(obj)) for _, _, obj, _ in chunk]
                answers, diffs = first_token_answers(bundle, prompts, [s.image for s, *_ in chunk], cond.config)
                store.add([
                    {
                        "condition": cond.name, "task": "pope", "seed": s.seed, "object": f"{mode}:{obj}", "mode": mode,
                        "label": label, "answer": a, "said_yes": parse_yes_no(a), "logit_diff": d,
                    }
                    for (s, mode, obj, label), a, d in zip(chunk, answers, diffs, strict=True)
                ])
    return store.path


# ---------------------------------------------------------------------------- analysis
def load_items(path: Path):
    import pandas as pd

    return pd.DataFrame([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()])


#: Every metric is a ratio of per-scene sums: name -> (task, numerator column, denominator column).
METRICS: dict[str, tuple[str, str, str]] = {
    "chair_s": ("caption", "any_hallucination", "one"),
    "chair_i": ("caption", "n_hallucinated", "n_mentioned"),
    "recall": ("caption", "n_recalled", "n_truth"),
    "length": ("caption", "n_words", "one"),
    "pope_acc_random": ("pope", "correct_random", "n_random"),
    "pope_acc_adversarial": ("pope", "correct_adversarial", "n_adversarial"),
    "pope_f1_adversarial": ("pope", "f1_num", "f1_den"),
    "yes_ratio": ("pope", "said_yes", "n_questions"),
    "probe_absent": ("pope", "probe_absent_sum", "n_absent"),
    "probe_present": ("pope", "probe_present_sum", "n_present"),
}


def scene_table(items):
    """Per (condition, seed) sufficient statistics from which every metric in `METRICS` is a ratio of sums."""
    import pandas as pd

    rows: dict[tuple[str, int], dict[str, float]] = {}
    for item in items.to_dict("records"):
        row = rows.setdefault((item["condition"], item["seed"]), {"condition": item["condition"], "seed": item["seed"]})
        if item["task"] == "caption":
            truth, mentioned, halluc = set(item["truth"]), set(item["mentioned"]), item["hallucinated"]
            row.update(
                one=1.0, any_hallucination=float(len(halluc) > 0), n_hallucinated=len(halluc), n_mentioned=len(mentioned),
                n_recalled=len(mentioned & truth), n_truth=len(truth), n_words=item["n_words"],
            )
        else:
            said = item["said_yes"] is True or item["said_yes"] == 1  # unparsed (None/NaN) counts as "no"
            label, mode = bool(item["label"]), item["mode"]
            correct = float(said == label)
            for m in ("random", "adversarial"):
                if mode in ("present", m):
                    row[f"correct_{m}"] = row.get(f"correct_{m}", 0.0) + correct
                    row[f"n_{m}"] = row.get(f"n_{m}", 0.0) + 1
            if mode in ("present", "adversarial"):
                tp, fp, fn = said and label, said and not label, (not said) and label
                row["f1_num"] = row.get("f1_num", 0.0) + 2 * tp
                row["f1_den"] = row.get("f1_den", 0.0) + 2 * tp + fp + fn
            row["said_yes"] = row.get("said_yes", 0.0) + float(said)
            row["n_questions"] = row.get("n_questions", 0.0) + 1
            kind = "present" if label else "absent"
            row[f"probe_{kind}_sum"] = row.get(f"probe_{kind}_sum", 0.0) + float(item["logit_diff"])
            row[f"n_{kind}"] = row.get(f"n_{kind}", 0.0) + 1
    return pd.DataFrame(list(rows.values())).fillna(0.0)


def summarise(items, *, baseline: str = "baseline", n_resamples: int = 5000, seed: int = 0):
    """Metrics per condition with paired bootstrap 95% CIs of the difference to ``baseline``.

    Scenes are the resampling unit: each bootstrap draw resamples scene seeds with replacement and
    recomputes every metric (a ratio of sums over scenes) on the same scenes for the condition and the
    baseline. The p-value is a paired sign-flip permutation test on per-scene metric differences.

    Returns:
        A tidy DataFrame: condition, task, metric, value, baseline, diff, ci_low, ci_high, p_value, n.
    """
    import pandas as pd

    table = scene_table(items)
    rng = np.random.default_rng(seed)
    base = table[table["condition"] == baseline].set_index("seed")
    rows = []
    for cond, sub in table.groupby("condition", sort=False):
        sub = sub.set_index("seed")
        for name, (task, num, den) in METRICS.items():
            if num not in sub or den not in sub or num not in base:
                continue
            seeds = sorted(set(sub.index[sub[den] > 0]) & set(base.index[base[den] > 0]))
            if not seeds:
                continue
            a_num, a_den = sub.loc[seeds, num].to_numpy(), sub.loc[seeds, den].to_numpy()
            b_num, b_den = base.loc[seeds, num].to_numpy(), base.loc[seeds, den].to_numpy()
            value, ref = a_num.sum() / a_den.sum(), b_num.sum() / b_den.sum()
            row = {"condition": cond, "task": task, "metric": name, "value": value, "baseline": ref,
                   "diff": value - ref, "n": len(seeds)}
            if cond != baseline:
                counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=n_resamples)
                with np.errstate(invalid="ignore", divide="ignore"):
                    diffs = (counts @ a_num) / (counts @ a_den) - (counts @ b_num) / (counts @ b_den)
                    per_scene = a_num / a_den - b_num / b_den
                row["ci_low"], row["ci_high"] = (float(x) for x in np.nanpercentile(diffs, [2.5, 97.5]))
                row["p_value"] = sign_flip_p_value(per_scene, n_resamples=n_resamples, seed=seed)
            rows.append(row)
    return pd.DataFrame(rows)


def source_head_table(items) -> str:
    """Markdown table: for each EAH condition, how often each head was the (first-layer) source."""
    caps = items[(items["task"] == "caption") & items["source_heads"].map(lambda h: isinstance(h, list) and len(h) > 0)]
    if caps.empty:
        return "(no EAH condition)"
    counts = caps.assign(head=caps["source_heads"].map(lambda h: h[0])).groupby(["condition", "head"]).size()
    table = counts.unstack(fill_value=0)
    table.columns = [f"head {h}" if h >= 0 else "none" for h in table.columns]
    return table.to_markdown()


def write_report(items_path: Path, out: Path, *, title: str = "EAH vs baseline vs controls", n_resamples: int = 5000):
    """Write ``results.csv`` (tidy), ``report.md`` (tables with CIs) and ``effects.png`` into ``out``."""
    import matplotlib.pyplot as plt

    items = load_items(items_path)
    summary = summarise(items, n_resamples=n_resamples)
    summary.to_csv(out / "results.csv", index=False)
    lines = [f"# {title}", "", f"Items: `{items_path}`; scenes per condition: {int(summary['n'].max())}.", ""]
    lines += [
        "Differences are condition minus baseline on the same scenes; 95% CIs from a paired bootstrap over",
        "scenes; p from a paired sign-flip permutation test on per-scene differences.", "",
    ]
    for task in ("caption", "pope"):
        sub = summary[summary["task"] == task]
        if sub.empty:
            continue
        metrics = list(dict.fromkeys(sub["metric"]))
        lines += [f"## {'Captions (CHAIR)' if task == 'caption' else 'Yes/no questions (POPE) and logit probe'}", ""]
        lines.append("| condition | " + " | ".join(metrics) + " |")
        lines.append("|---" * (len(metrics) + 1) + "|")
        for cond, g in sub.groupby("condition", sort=False):
            cells = []
            for m in metrics:
                r = g[g["metric"] == m]
                if r.empty:
                    cells.append("")
                    continue
                r = r.iloc[0]
                cell = f"{r.value:.3f}"
                if cond != "baseline" and not np.isnan(r.get("ci_low", np.nan)):
                    cell += f" ({r['diff']:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], p={r.p_value:.3f})"
                cells.append(cell)
            lines.append(f"| {cond} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot = summary[(summary["condition"] != "baseline") & summary["metric"].isin(["chair_i", "recall", "pope_acc_adversarial", "probe_absent"])]
    if not plot.empty:
        metrics = list(dict.fromkeys(plot["metric"]))
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.5 + 0.4 * plot["condition"].nunique()), squeeze=False)
        for ax, m in zip(axes[0], metrics, strict=True):
            g = plot[plot["metric"] == m]
            y = np.arange(len(g))
            ax.errorbar(g["diff"], y, xerr=[g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]], fmt="o")
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(y, g["condition"] if ax is axes[0][0] else [""] * len(g))
            ax.set_title(f"{m}: diff vs baseline")
        fig.tight_layout()
        fig.savefig(out / "effects.png", dpi=120)
        plt.close(fig)
    return summary
