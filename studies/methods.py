"""EAH among its peers: every training-free attention intervention on the bundled organism, paired and replicated.

``python -m studies methods --out docs/results/methods`` (or `main`) runs, on held-out synthetic scenes:

* every method of `eah_interp.interventions` (EAH paper preset, PAI, VAR, VAF, MiddleLayerBoost, ADHH,
  HeadScale) at its **default** and at one **organism setting** (`organism_rules` says how each is
  derived; nothing is tuned on results), EAH + PAI stacked, against the baseline;
* EAH vs VAR (amplify a shallow sink head's map vs move attention away from sinks) compared directly
  (paired, on the same items, EAH as the reference arm);
* with a pre-registered replication split (`eah_interp.evaluation.ReplicationSplit`, by seed range:
  the first half of the scenes is the discovery part, the second half the replication part), Holm
  within each part over every arm x metric, and "replicated" only for results significant after Holm
  in both parts with the same sign.

Head lists (ADHH, HeadScale) and VAR's sink dimensions are mined with the library's own tools
(`eah_interp.experiments.scan_images` head statistics; `eah_interp.sinks.massive_dims` on the decoder
layers' input hidden states) on discovery scenes only. Yes/no questions (POPE and the logit probe, one
forward per question) run on many scenes, captions (CHAIR) on fewer. Every stage writes its files as
it finishes and the results store is resumable, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eah_interp.data import Dataset, scene_dataset
from eah_interp.evaluation import (
    ALPHA,
    PARTS,
    Arm,
    ReplicationSplit,
    effects_plot,
    load_items,
    replication_markdown,
    replication_table,
    run_experiment,
    summarise_items,
)
from eah_interp.interventions import ADHH, EAH, PAI, VAF, VAR, HeadScale, MiddleLayerBoost
from eah_interp.interventions.selectors import REFERENCE_DEPTH
from eah_interp.models.introspect import model_shape

#: LLaVA-1.5-7B, the model every official default was set for: image tokens, hidden size, heads per layer.
REFERENCE_IMAGE_TOKENS = 576
REFERENCE_HIDDEN = 4096
REFERENCE_HEADS = 32
#: The official AD-HH head list of LLaVA-1.5-7B has 20 heads (of 32 x 32 = 1024) from layer 13 on.
REFERENCE_ADHH_HEADS = 20
REFERENCE_ADHH_FIRST_LAYER = 13
#: The stronger "organism setting" of the score boosts (PAI, MiddleLayerBoost, VAF): the official change x 2.
DOSE = 2.0


@dataclass(frozen=True)
class Plan:
    """How big a run is.

    Attributes:
        n_pope: scenes asked the yes/no questions (4 per scene: random and adversarial POPE splits).
        n_caption: scenes captioned (half from each part).
        max_new_tokens: caption length budget.
        n_mine: discovery scenes used to mine head lists and sink dimensions.
        arms: arm names to run (None = all of `arms_for`).
        bootstrap: bootstrap / permutation resamples.
        batch_size: the runner's batch size.
    """

    n_pope: int = 32
    n_caption: int = 8
    max_new_tokens: int = 30
    n_mine: int = 16
    arms: tuple[str, ...] | None = None
    bootstrap: int = 20000
    batch_size: int = 8


#: The documented run (docs/results.md, "EAH among its peers").
FULL = Plan()
#: The smoke test: a few scenes, two arms besides the baseline.
QUICK = Plan(n_pope=2, n_caption=2, max_new_tokens=4, n_mine=1, arms=("baseline", "eah_organism", "pai_default"),
             bootstrap=100, batch_size=4)


# ---------------------------------------------------------------------------- mining (discovery only)
def mine(bundle: Any, items: list[Any], n_layers: int, n_heads: int) -> dict[str, Any]:
    """Head lists and VAR's sink dimensions from discovery scenes, with the library's own tools.

    * Head statistics of the caption prompt (`eah_interp.experiments.scan_images`, all layers, the
      bundle's sink threshold): ``sink_heads`` = heads by mean sink density, highest first (HeadScale
      ablates them: "are the sink heads needed?"); ``text_heads`` = heads of layers at relative depth
      >= 13/32 (where the official AD-HH heads start) by the mean attention mass their text rows give the
      image, lowest first (AD-HH's hallucination heads are the ones that read text instead of the image).
    * VAR's sink dimensions: `eah_interp.sinks.massive_dims` (top 2) over the input hidden states of
      VAR's layers (2 .. n - 2), and the largest RMS-normalised value found in them.

    Returns:
        A JSON-ready dict: ``sink_heads``, ``text_heads`` (lists of [layer, head]), ``var_dims``,
        ``var_peak`` (largest ``|rms(h)[d]|`` over those dims), ``var_peak_image`` (over image tokens only),
        ``items`` (the scenes used).
    """
    from eah_interp.data import LazyImages
    from eah_interp.experiments import scan_images
    from eah_interp.sinks import massive_dims, rms_normalised

    stats = scan_images(bundle, LazyImages(items), progress=False, batch_size=8)
    frame = stats.to_frame()
    sink = frame.sort_values(["sink_density_mean", "layer", "head"], ascending=[False, True, True], kind="stable")
    first = math.floor(REFERENCE_ADHH_FIRST_LAYER * n_layers / REFERENCE_DEPTH + 0.5)
    late = frame[frame["layer"] >= first].sort_values(["image_mass_text_mean", "layer", "head"], kind="stable")
    inputs = bundle.encode([bundle.caption_prompt] * len(items), [item.load_image() for item in items])
    with torch.no_grad():
        hidden = bundle.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    var_layers = range(min(2, n_layers - 1), n_layers - 1)  # VAR's own rule: layers 2 .. n - 2
    real = inputs["attention_mask"].bool()
    stacked = torch.cat([hidden[layer][real] for layer in var_layers])[None]  # [1, tokens x layers, dim]
    dims = massive_dims(stacked, top=2)
    normed = rms_normalised(stacked)[0][:, list(dims)].abs().max(-1).values
    image = torch.cat([(inputs["input_ids"] == bundle.model.config.image_token_id)[real] for _ in var_layers])
    return {
        "items": [item.id for item in items],
        "sink_heads": sink[["layer", "head"]].astype(int).values.tolist(),
        "sink_density": sink["sink_density_mean"].round(4).tolist(),
        "text_heads": late[["layer", "head"]].astype(int).values.tolist(),
        "image_mass_text": late["image_mass_text_mean"].round(4).tolist(),
        "first_text_layer": first,
        "var_dims": list(dims),
        "var_peak": float(normed.max()),
        "var_peak_image": float(normed[image].max()) if image.any() else float("nan"),
        "n_heads": n_heads, "n_layers": n_layers,
    }


# ---------------------------------------------------------------------------- the arms
def organism_rules(n_layers: int, n_heads: int, n_image: int, hidden: int) -> dict[str, str]:
    """How each method's organism setting is derived from its default (one sentence per method)."""
    total = n_layers * n_heads
    return {
        "eah": f"threshold 0.0008 x {REFERENCE_IMAGE_TOKENS}/{n_image} image tokens (rounded: the bundle's threshold): "
               "a sink score is a mean over the image tokens, so the official threshold scales with their count",
        "pai": f"alpha x {DOSE:g} (no scaling argument moves a per-key logit boost to another model: a pre-chosen "
               "stronger dose)",
        "middle": f"alpha x {DOSE:g} (as PAI)",
        "vaf": f"the changes x {DOSE:g}: image scores x {1 + DOSE * 0.15:.2f}, system-prompt scores x "
               f"{1 - DOSE * 0.05:.2f} (as PAI)",
        "var": f"tau x sqrt({hidden}/{REFERENCE_HIDDEN}) = {20 * math.sqrt(hidden / REFERENCE_HIDDEN):.2f}: an "
               "RMS-normalised entry is at most sqrt(hidden size), so the official threshold scales with its root",
        "adhh": f"{_scaled_count(total)} heads instead of {REFERENCE_ADHH_HEADS}: the official list's share of heads "
                f"({REFERENCE_ADHH_HEADS} of {REFERENCE_DEPTH * REFERENCE_HEADS}) of this model's {total}",
        "headscale": f"{_scaled_count(total)} heads instead of {REFERENCE_ADHH_HEADS} (as AD-HH)",
    }


def _scaled_count(total_heads: int) -> int:
    return max(1, round(REFERENCE_ADHH_HEADS * total_heads / (REFERENCE_DEPTH * REFERENCE_HEADS)))


def arms_for(threshold: float, mined: dict[str, Any], hidden: int) -> list[Arm]:
    """The study's arms: baseline, each method at its default and its organism setting, EAH + PAI.

    Defaults: the constructors' defaults (the official values for LLaVA-1.5-7B; layer ranges mapped to
    the model's depth by `scaled_range`); EAH's default is the paper preset with the official threshold
    0.0008; VAR's and the head lists are mined (`mine`); AD-HH and HeadScale take the official list's
    length (20 heads). Organism settings: `organism_rules`.
    """
    n_small = _scaled_count(mined["n_layers"] * mined["n_heads"])
    text, sink, dims = mined["text_heads"], mined["sink_heads"], tuple(mined["var_dims"])
    tau = 20 * math.sqrt(hidden / REFERENCE_HIDDEN)
    eah = EAH.paper(threshold=threshold)
    return [
        Arm("baseline"),
        Arm("eah_default", EAH.paper()),
        Arm("eah_organism", eah),
        Arm("pai_default", PAI()),
        Arm("pai_organism", PAI(alpha=0.2 * DOSE)),
        Arm("var_default", VAR(dims=dims)),
        Arm("var_organism", VAR(dims=dims, tau=round(tau, 2))),
        Arm("vaf_default", VAF()),
        Arm("vaf_organism", VAF(image_scale=round(1 + DOSE * 0.15, 4), system_scale=round(1 - DOSE * 0.05, 4))),
        Arm("middle_default", MiddleLayerBoost()),
        Arm("middle_organism", MiddleLayerBoost(alpha=0.5 * DOSE)),
        Arm("adhh_default", ADHH(heads=text[:REFERENCE_ADHH_HEADS])),
        Arm("adhh_organism", ADHH(heads=text[:n_small])),
        Arm("headscale_default", HeadScale(heads=sink[:REFERENCE_ADHH_HEADS])),
        Arm("headscale_organism", HeadScale(heads=sink[:n_small])),
        Arm("eah_organism+pai_default", [eah, PAI()]),
    ]


def edit_counts(bundle: Any, arms: list[Arm], items: list[Any]) -> dict[str, dict[str, Any]]:
    """Whether each arm acts at all: entries each intervention changed in one yes/no forward of ``items``.

    Returns:
        Per arm: ``changed`` (entries changed, summed over layers and interventions) and ``layers`` (the
        layers where something changed).
    """
    from eah_interp import hf

    question = items[0].questions[0].text
    inputs = bundle.encode([bundle.yes_no_prompt(question)] * len(items), [item.load_image() for item in items])
    counts: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if not arm.interventions:
            continue
        with torch.no_grad(), hf.intervene(bundle.model, arm.interventions) as run:
            bundle.model(**inputs, use_cache=False)
        changed = [r for r in run.records if r.changed > 0 or r.eah is not None]
        counts[arm.name] = {"changed": int(sum(r.changed for r in run.records)),
                            "layers": sorted({r.layer for r in changed})}
    return counts


def var_sink_counts(bundle: Any, items: list[Any], dims: tuple[int, ...], taus: tuple[float, ...]) -> dict[str, Any]:
    """Massive-activation sinks per layer on yes/no prompts: image and text tokens that VAR would call sinks.

    Returns:
        ``{"taus": [...], "n_image": image tokens in all, "layers": {layer: {tau: [image sinks, text sinks]}}}``
        for VAR's layers 2 .. n - 2 (`eah_interp.sinks.massive_activation_sinks` on each layer's input).
    """
    from eah_interp.sinks import massive_activation_sinks

    question = items[0].questions[0].text
    inputs = bundle.encode([bundle.yes_no_prompt(question)] * len(items), [item.load_image() for item in items])
    with torch.no_grad():
        hidden = bundle.model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
    real = inputs["attention_mask"].bool()
    image = (inputs["input_ids"] == bundle.model.config.image_token_id) & real
    layers: dict[str, dict[str, list[int]]] = {}
    for layer in range(min(2, len(hidden) - 2), len(hidden) - 2):
        layers[str(layer)] = {}
        for tau in taus:
            sinks = massive_activation_sinks(hidden[layer], dims, tau) & real
            layers[str(layer)][f"{tau:g}"] = [int((sinks & image).sum()), int((sinks & ~image).sum())]
    return {"taus": [float(t) for t in taus], "n_image": int(image.sum()), "layers": layers}


# ---------------------------------------------------------------------------- the run
def _datasets(plan: Plan) -> tuple[Dataset, Dataset]:
    """The yes/no scenes and the captioned scenes (the first ``n_caption / 2`` scenes of each part)."""
    pope = scene_dataset(plan.n_pope)
    half, k = plan.n_pope // 2, max(1, plan.n_caption // 2)
    if plan.n_pope < 2 or k > half:
        raise ValueError(f"n_pope must be >= 2 and n_caption <= n_pope; got {plan.n_pope} and {plan.n_caption}.")
    chosen = pope.items[:k] + pope.items[half : half + k]
    captions = dataclasses.replace(pope, items=chosen, source={**pope.source, "captioned": f"{k} per part"})
    return pope, captions


def main(out: Path, *, quick: bool = False, plan: Plan | None = None, progress: bool | None = None) -> Path:
    """Run (or resume) the study into ``out``; returns ``out/report.md``.

    Args:
        out: output folder: ``plan.json`` (arms, rules, mined heads), ``pope/`` and ``captions/`` (the
            runner's resumable results), ``results.csv``, ``replication.csv``, ``versus_eah.csv``,
            ``summary.json``, ``effects.png``, ``report.md``.
        quick: the smoke-test plan (`QUICK`) instead of the documented one (`FULL`).
        plan: an explicit `Plan` (overrides ``quick``).
        progress: progress bars: on, off, or None (on only when stderr is a terminal).
    """
    from eah_interp.models import load_model

    plan = plan or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    bundle = load_model("organism")
    n_layers, n_heads = model_shape(bundle.model)[:2]
    hidden = int(bundle.model.config.text_config.hidden_size)
    split = ReplicationSplit(0.5, by="order")
    pope, captions = _datasets(plan)
    parts = split.assign([item.id for item in pope])
    discovery = [item for item in pope if parts[item.id] == "discovery"]

    plan_file = out / "plan.json"
    saved = json.loads(plan_file.read_text()) if plan_file.exists() else {}
    if saved and saved.get("plan") != json.loads(json.dumps(dataclasses.asdict(plan))):
        raise ValueError(f"{out} holds a study run with another plan ({saved.get('plan')}); use another --out.")
    mined = saved.get("mined") or mine(bundle, discovery[: plan.n_mine], n_layers, n_heads)
    arms = arms_for(bundle.threshold, mined, hidden)
    if plan.arms is not None:
        arms = [a for a in arms if a.name in plan.arms]
    n_image = int((bundle.encode([bundle.caption_prompt], [pope.items[0].load_image()])["input_ids"]
                   == bundle.model.config.image_token_id).sum())
    rules = organism_rules(n_layers, n_heads, n_image, hidden)
    acts = saved.get("acts") or edit_counts(bundle, arms, discovery[:4])
    var_tau = round(20 * math.sqrt(hidden / REFERENCE_HIDDEN), 2)
    var_sinks = saved.get("var_sinks") or var_sink_counts(bundle, discovery[:4], tuple(mined["var_dims"]), (20.0, var_tau))
    plan_file.write_text(json.dumps({
        "plan": dataclasses.asdict(plan), "split": split.to_dict(), "rules": rules, "mined": mined, "acts": acts,
        "var_sinks": var_sinks,
        "arms": [a.to_dict() for a in arms],
        "describe": {a.name: [i.describe() for i in a.interventions] for a in arms if a.interventions},
    }, indent=1, default=str))

    common = dict(arms=arms, replication=split, batch_size=plan.batch_size, progress=progress)
    run_experiment(bundle, pope, out / "pope", tasks=("pope",), **common)
    write(out, plan)  # the yes/no results are in: a first report
    run_experiment(bundle, captions, out / "captions", tasks=("caption",), max_new_tokens=plan.max_new_tokens,
                   **common)
    return write(out, plan)


def _load(out: Path):
    import pandas as pd

    frames = [load_items(out / sub / "items.jsonl") for sub in ("pope", "captions") if (out / sub / "items.jsonl").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write(out: Path, plan: Plan) -> Path:
    """Summarise what is in ``out`` so far and write the report files; returns ``out/report.md``."""
    import pandas as pd

    meta = json.loads((out / "plan.json").read_text())
    items = _load(out)
    summary = summarise_items(items, n_resamples=plan.bootstrap)
    summary.to_csv(out / "results.csv", index=False)
    table = replication_table(summary) if set(PARTS) <= set(summary["part"]) else pd.DataFrame()
    if not table.empty:
        table.to_csv(out / "replication.csv", index=False)
    names = [a["name"] for a in meta["arms"]]
    # against EAH itself: VAR (the opposite mechanism) and the EAH + PAI stack (does PAI add to EAH?)
    versus = [n for n in names if n.startswith("var_") or n == "eah_organism+pai_default"]
    direct = pd.DataFrame()
    if "eah_organism" in names and versus and len(items):
        sub = items[items["condition"].isin(["eah_organism", *versus])]
        direct = summarise_items(sub, baseline="eah_organism", n_resamples=plan.bootstrap)
        direct.to_csv(out / "versus_eah.csv", index=False)
    effects_plot(summary, out / "effects.png", metrics=list(MAIN), title="{metric}")
    (out / "summary.json").write_text(json.dumps({
        "n_items": {p: int(items.loc[items["part"] == p, "item"].nunique()) for p in PARTS if len(items)},
        "verdicts": table.to_dict("records") if not table.empty else [],
        "results": summary.replace({np.nan: None}).to_dict("records"),
    }, indent=1, default=str))
    lines = _report(meta, items, summary, table, direct)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


#: The metrics of the report's main table (all metrics are in results.csv and enter Holm's family).
MAIN = ("pope_acc_adversarial", "pope_yes_ratio_adversarial", "probe_present", "probe_absent", "chair_i", "recall")


def _cell(rows, metric: str, part: str) -> str:
    r = rows[(rows["metric"] == metric) & (rows["part"] == part)]
    if r.empty or r.iloc[0]["value"] != r.iloc[0]["value"]:
        return ""
    r = r.iloc[0]
    if r["p_value"] != r["p_value"]:
        return f"{r['value']:.3f}"
    mark = " *" if r["significant"] else ""
    return f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] p_H={r['p_holm']:.2g}{mark}"


def _report(meta: dict, items, summary, table, direct) -> list[str]:
    n_tests = {p: int(summary.loc[summary["part"] == p, "p_value"].notna().sum()) for p in PARTS}
    n_items = {p: int(items.loc[items["part"] == p, "item"].nunique()) if len(items) else 0 for p in PARTS}
    plan, mined = meta["plan"], meta["mined"]
    lines = [
        "# EAH among its peers (the bundled organism)", "",
        f"Held-out synthetic scenes: yes/no questions (POPE random + adversarial, logit probe) on {plan['n_pope']} "
        f"scenes, captions (CHAIR, max_new_tokens={plan['max_new_tokens']}) on {plan['n_caption']}. Pre-registered "
        "replication split by seed range: the first half of the scenes is the discovery part, the second half the "
        f"replication part (items so far: discovery {n_items['discovery']}, replication {n_items['replication']}).",
        "", "Paired differences to the baseline on the same scenes, bootstrap 95% CI over scenes, sign-flip "
        f"permutation p ({plan['bootstrap']} resamples); Holm within each part over every arm x metric "
        f"(discovery {n_tests['discovery']} tests, replication {n_tests['replication']}); `*` = Holm p <= {ALPHA}.",
        "",
        "## Arms", "",
        "| arm | what it does | `changed` in its records, one yes/no forward of 4 discovery scenes (EAH: prompts "
        "broadcast; others: entries edited) |", "|---|---|---|",
    ]
    for arm in meta["arms"]:
        text = " + ".join(meta["describe"].get(arm["name"], ["nothing (plain decoding)"])).replace("|", "\\|")
        act = meta["acts"].get(arm["name"])
        acted = "" if act is None else f"{act['changed']} (layers {act['layers']})"
        lines.append(f"| {arm['name']} | {text} | {acted} |")
    lines += ["", "Organism settings (each derived by a rule fixed before any result; none tuned):", ""]
    lines += [f"* {name}: {rule}" for name, rule in meta["rules"].items()]
    lines += [
        "", "Mined on discovery scenes only "
        f"({len(mined['items'])} scenes, `scan_images` head statistics of the caption prompt):",
        f"* HeadScale heads (highest mean sink density): {mined['sink_heads'][:REFERENCE_ADHH_HEADS]}",
        f"* AD-HH heads (layers >= {mined['first_text_layer']}, lowest image mass from text rows): "
        f"{mined['text_heads'][:REFERENCE_ADHH_HEADS]}",
        f"* VAR sink dimensions (`massive_dims` over layers 2..n-2): {mined['var_dims']}; largest RMS-normalised "
        f"value there {mined['var_peak']:.1f} (image tokens: {mined['var_peak_image']:.1f}).", "",
    ]
    if "var_sinks" in meta:
        counts = meta["var_sinks"]
        lines += [f"VAR's massive-activation sinks on the yes/no prompts of 4 "
                  f"discovery scenes ({counts['n_image']} image tokens), image / text tokens per layer:", "",
                  "| layer | " + " | ".join(f"tau={t:g}" for t in counts["taus"]) + " |",
                  "|---" * (len(counts["taus"]) + 1) + "|"]
        lines += [f"| {layer} | " + " | ".join(f"{v[0]} / {v[1]}" for v in row.values()) + " |"
                  for layer, row in counts["layers"].items()]
        lines.append("")
    if not table.empty:
        lines += replication_markdown(table, hide_null=True)
    for part in PARTS:
        rows = summary[summary["part"] == part]
        if rows.empty:
            continue
        metrics = [m for m in MAIN if m in set(rows["metric"])]
        lines += [f"## {part.capitalize()} part: difference to baseline [95% CI], Holm p", "",
                  "| arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for cond in dict.fromkeys(rows["condition"]):
            g = rows[rows["condition"] == cond]
            lines.append(f"| {cond} | " + " | ".join(_cell(g, m, part) for m in metrics) + " |")
        lines.append("")
    if not direct.empty:
        lines += ["## Against EAH directly: VAR (the opposite mechanism) and EAH + PAI (arm minus EAH at the organism "
                  "threshold, same scenes; Holm within this comparison's family per part)", ""]
        metrics = [m for m in MAIN if m in set(direct["metric"])]
        lines += ["| part | arm | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for part in PARTS:
            rows = direct[(direct["part"] == part) & (direct["condition"] != "eah_organism")]
            for cond in dict.fromkeys(rows["condition"]):
                g = rows[rows["condition"] == cond]
                lines.append(f"| {part} | {cond} | " + " | ".join(_cell(g, m, part) for m in metrics) + " |")
        lines.append("")
    lines += ["![effects](effects.png)", "",
              "Every metric (POPE accuracy, precision, recall, F1, yes-ratio per split; probes; CHAIR_s, CHAIR_i, "
              "recall, length) is in `results.csv` and in Holm's family.", ""]
    return lines


__all__ = ["FULL", "QUICK", "Plan", "arms_for", "edit_counts", "main", "mine", "organism_rules"]
