"""Why the broadcast changes the organism's answers: source head, visual evidence, where the change travels, controls.

``eah-interp study explain --out docs/results/explain`` (or `main`) answers four questions on the bundled
organism with the library's tools, on a **discovery** split of held-out scenes and a pre-registered
**replication** split (another seed range), both reported:

* **Q1 what EAH's source head is** (`section_source_head`): at layer 1, each head's share of the image rows'
  attention on the previous token, on itself and on the first real token; sink density as a function of the
  threshold under each normaliser, next to the density a uniform and a previous-token pattern get on the same
  layout (null models);
* **Q2 what the broadcast does to the question tokens' visual evidence** (`section_arms`, `section_evidence`,
  `section_probe`): per layer, the attention mass of the question rows and of the last row on the image, every
  arm, per example; a linear presence probe (`eah_interp.probing`) on the question / last residuals, trained on
  discovery and tested on replication, baseline vs EAH;
* **Q3 where the change travels** (`section_patching`, `section_attribution`, `section_dla`): activation
  patching (nnsight, `eah_interp.patching`) of the residual stream x position groups between the baseline and
  the EAH run, per example; attribution patching of every site and head (`eah_interp.attribution`) with its
  agreement with the activation-patching rows; direct logit attribution of the yes-minus-no logit difference,
  baseline vs EAH, per example, both splits;
* **Q4 the controls** (`section_arms`, `section_tests`): random head, fewest-sink head, deep layer, synthetic
  maps broadcast at layer 1 (`SyntheticMap`: does a pure previous-token map reproduce EAH's effect? does a
  uniform map, i.e. any homogenisation of the heads?) and a question+last -> image attention knockout in an
  early and a late window of layers (a positive control); paired differences per example, sign-flip p-values,
  Holm over arms x metrics within each split, replication = Holm-significant in both splits with one sign.

Each section writes its JSON (and figures) into ``out`` when it is done; a rerun skips finished sections and
resumes the per-example files (``arms.jsonl``, ``patching.jsonl``) where they stopped. A section whose tool does
not exist in this version of the library (or that this study does not run) says so in ``report.md``; it is
never faked.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from eah_interp.config import EAHConfig
from eah_interp.errors import ConfigError
from eah_interp.experiments import batches
from eah_interp.interventions.synthetic import PATTERNS, SyntheticMap, previous_token_map, uniform_map
from eah_interp.layout import TokenLayout
from eah_interp.resumable import atomic_write, recover_items
from eah_interp.sinks import NORMALISE_CHOICES

#: Significance level, applied to Holm-adjusted p-values only.
ALPHA = 0.05
#: Held-out scene index where each split starts (docs/results.md's evaluation used indices 0..199).
SPLITS = {"discovery": 20_000, "replication": 30_000}
#: Co-occurrence pair strength of the scenes (as in docs/results.md's evaluation).
PAIR_STRENGTH = 0.9
#: Sink thresholds of the density-vs-threshold curves (0.01 is the organism's, 0.0008 the paper's).
THRESHOLDS = (0.0008, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: Position groups of the activation-patching section (`eah_interp.layout.GROUPS`).
PATCH_GROUPS = ("image", "question", "last")
#: Position groups of the attribution-patching section.
ATTRIBUTION_GROUPS = ("system", "image", "question", "last")
#: Metrics of the paired tests: name -> (per-example column, which questions, what "worse" means).
METRICS = {
    "probe_absent": ("probe", False, "higher = more 'yes' to an absent object"),
    "probe_present": ("probe", True, "lower = less 'yes' to a present object"),
    "correct": ("correct", None, "first answer token right (1) or wrong (0)"),
    "question_image_mass_layer1": ("question_mass_layer1", None, "question rows' attention on the image at layer 1"),
    "question_image_mass": ("question_mass_after", None, "question rows' attention on the image, layers 2-29"),
    "last_image_mass": ("last_mass_after", None, "last row's attention on the image, layers 2-29"),
}


def image_mass(probs: Float[Tensor, "batch heads q k"], layout: TokenLayout, rows: str) -> Float[Tensor, " batch"]:
    """Mean over heads of `eah_interp.stats.group_attention` from the group ``rows`` to the image (NaN: no such row)."""
    from eah_interp.stats import group_attention

    return group_attention(probs, layout, rows, "image").mean(-1)


# ---------------------------------------------------------------------------- plan and examples
@dataclass(frozen=True)
class Plan:
    """How big a run is (the ``quick`` plan is a smoke test, not the documented numbers)."""

    n_scenes: int = 24
    batch_size: int = 8
    patch_prompts: int = 8
    resid_layers: tuple[int, ...] = (2, 4, 8, 16)
    block_layers: tuple[int, ...] = (1,)
    knockout_early: tuple[int, ...] = tuple(range(1, 11))
    knockout_late: tuple[int, ...] = tuple(range(11, 30))
    deep_layer: int = 27
    arms: tuple[str, ...] = (
        "baseline", "eah_paper", "control_random_head", "control_fewest_sinks", "control_deep_layer",
        "control_previous_token_map", "control_uniform_map", "knockout_question_image_early",
        "knockout_question_image_late",
    )

    @classmethod
    def quick(cls) -> Plan:
        """One scene per split, three arms, a few patches: a smoke test of every section."""
        return cls(n_scenes=1, batch_size=2, patch_prompts=1, resid_layers=(2,), block_layers=(1,),
                   arms=("baseline", "eah_paper", "control_previous_token_map"))


@dataclass(frozen=True)
class Example:
    """One yes/no question about one scene."""

    id: str
    split: str
    seed: int
    object: str
    label: bool
    kinds: tuple[str, ...]


def examples(split: str, n_scenes: int) -> list[Example]:
    """Two questions per held-out scene of ``split``: one present object and its first adversarial absent object.

    The present object is drawn with the scene's seed; the absent one is `absent_kinds(scene, "adversarial")[0]`
    (a co-occurrence partner of a present object when there is one, so "yes" would be a hallucination).
    """
    from eah_interp.scenes import absent_kinds, make_scene, scene_seeds

    out = []
    for seed in scene_seeds("heldout", n_scenes, SPLITS[split]):
        scene = make_scene(seed, pair_strength=PAIR_STRENGTH)
        kinds = tuple(sorted(scene.kinds))
        present = random.Random(seed).choice(kinds)
        absent = absent_kinds(scene, "adversarial")[0]
        out.append(Example(f"{seed}:present:{present}", split, seed, present, True, kinds))
        out.append(Example(f"{seed}:absent:{absent}", split, seed, absent, False, kinds))
    return out


def encode(bundle: Any, batch: Sequence[Example]) -> dict[str, Tensor]:
    """The model inputs of a batch of examples (yes/no prompts with their scene images)."""
    from eah_interp.scenes import make_scene, question_for

    prompts = [bundle.yes_no_prompt(question_for(e.object)) for e in batch]
    images = [make_scene(e.seed, pair_strength=PAIR_STRENGTH).image for e in batch]
    return bundle.encode(prompts, images)


def arms(plan: Plan, threshold: float) -> dict[str, list[Any]]:
    """The arms of Q2/Q4 (``plan.arms``): name -> interventions for `eah_interp.hf.intervene` (empty: the baseline)."""
    from eah_interp.interventions import Knockout

    every = {
        "baseline": [],
        "eah_paper": [EAHConfig.paper(threshold=threshold)],
        "control_random_head": [EAHConfig.paper(threshold=threshold, source="random")],
        "control_fewest_sinks": [EAHConfig.paper(threshold=threshold, source="fewest")],
        "control_deep_layer": [EAHConfig.paper(threshold=threshold, layers=(plan.deep_layer,))],
        "control_previous_token_map": [SyntheticMap("previous_token", layers=(1,))],
        "control_uniform_map": [SyntheticMap("uniform", layers=(1,))],
        "knockout_question_image_early": [Knockout(queries="question", keys="image", layers=plan.knockout_early),
                                          Knockout(queries="last", keys="image", layers=plan.knockout_early)],
        "knockout_question_image_late": [Knockout(queries="question", keys="image", layers=plan.knockout_late),
                                         Knockout(queries="last", keys="image", layers=plan.knockout_late)],
    }
    unknown = [a for a in plan.arms if a not in every]
    if unknown or "baseline" not in plan.arms:
        raise ConfigError(f"Plan.arms must include 'baseline' and name known arms {sorted(every)}; got {plan.arms}.")
    return {a: every[a] for a in plan.arms}


# ---------------------------------------------------------------------------- resumable files
def _done(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=_jsonable).encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, default=_jsonable) + "\n")


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]


# ---------------------------------------------------------------------------- Q1: the source head
def section_source_head(bundle: Any, plan: Plan, out: Path, progress: bool = True) -> dict[str, Any]:
    """Q1: layer 1's heads on the discovery and replication prompts: local pattern shares, sink density vs threshold.

    For each head: the mean share of the image rows' attention on the previous token, on the token itself
    and on the row's first real token; its sink density (`eah_interp.sinks.density_curve`) at every
    `THRESHOLDS` value under each normaliser; the density a uniform and a previous-token pattern get on
    the same layouts (`eah_interp.sinks.null_densities`); and the share of prompts where a null explains
    the head's "sinks" at the model's threshold (`eah_interp.sinks.explained_by_null`).
    """
    from eah_interp import hf
    from eah_interp.sinks import density_curve, explained_by_null, null_densities

    path = out / "q1_source_head.json"
    if _done(path):
        result = json.loads(path.read_text())
        if not (out / "q1_density_vs_threshold.png").exists():
            _plot_source_head(result, out / "q1_density_vs_threshold.png")
        return result
    result: dict[str, Any] = {"thresholds": list(THRESHOLDS), "normalisers": list(NORMALISE_CHOICES), "splits": {},
                              "model_threshold": bundle.threshold}
    for split in SPLITS:
        exs = examples(split, plan.n_scenes)
        prev, self_, first = [], [], []
        dens: dict[str, list[Tensor]] = {n: [] for n in NORMALISE_CHOICES}
        nulls: dict[str, list[Tensor]] = {}
        explained: dict[str, list[Tensor]] = {}
        for batch in tqdm(batches(exs, plan.batch_size), desc=f"Q1 {split}", disable=not progress, leave=False):
            inputs = encode(bundle, batch)
            with torch.no_grad(), hf.record_attention(bundle.model, [1], keep_patterns=True) as rec:
                bundle.model(**inputs, use_cache=False)
            probs, layout = rec.patterns[1][-1].float(), rec.layouts[-1].to("cpu")
            b, _, _, k = probs.shape
            pos = torch.arange(k)
            image_rows = layout.image_mask.float()  # [b, q] (prefill: q == k)
            n_rows = image_rows.sum(-1).clamp_min(1)[:, None]
            firsts = layout.first_real_position()
            on_prev = probs[:, :, pos[1:], pos[:-1]]  # [b, h, k-1]: row i -> key i-1
            prev.append((on_prev * image_rows[:, None, 1:]).sum(-1) / n_rows)
            self_.append((probs[:, :, pos, pos] * image_rows[:, None]).sum(-1) / n_rows)
            on_first = torch.stack([probs[i, :, :, int(firsts[i])] for i in range(b)])  # [b, h, q]
            first.append((on_first * image_rows[:, None]).sum(-1) / n_rows)
            for normalise in NORMALISE_CHOICES:
                curve = density_curve(probs, layout, THRESHOLDS, normalise)  # [t, b, h]
                dens[normalise].append(curve)
                null = null_densities(layout, THRESHOLDS, normalise=normalise)  # kind -> [t, b]
                for kind, values in null.items():
                    nulls.setdefault(f"{kind}/{normalise}", []).append(values)
                at = null_densities(layout, bundle.threshold, normalise=normalise)
                density = density_curve(probs, layout, bundle.threshold, normalise)[0]  # [b, h]
                for kind, values in at.items():
                    explained.setdefault(f"{kind}/{normalise}", []).append(explained_by_null(density, values[:, None]))
        prev_t, self_t, first_t = torch.cat(prev), torch.cat(self_), torch.cat(first)  # [n, h]
        result["splits"][split] = {
            "n_prompts": len(exs),
            "previous_token_share": prev_t.mean(0).tolist(),
            "previous_token_share_min_max": [prev_t.min(0).values.tolist(), prev_t.max(0).values.tolist()],
            "self_share": self_t.mean(0).tolist(),
            "first_token_share": first_t.mean(0).tolist(),
            "density": {n: torch.cat(v, 1).mean(1).T.tolist() for n, v in dens.items()},  # [h, t]
            "null_density": {key: torch.cat(v, 1).mean(1).tolist() for key, v in nulls.items()},  # [t]
            "explained_by_null_at_model_threshold": {
                key: torch.cat(v).float().mean(0).tolist() for key, v in explained.items()  # [h]: share of prompts
            },
        }
    _write_json(path, result)
    _plot_source_head(result, out / "q1_density_vs_threshold.png")
    return result


def _plot_source_head(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = result["splits"]["discovery"]
    thresholds = result["thresholds"]
    fig, axes = plt.subplots(1, len(result["normalisers"]), figsize=(4.2 * len(result["normalisers"]), 3.4), sharey=True)
    shares = np.asarray(split["previous_token_share"])
    for ax, normalise in zip(axes, result["normalisers"], strict=True):
        density = np.asarray(split["density"][normalise])  # [h, t]
        for head in range(density.shape[0]):
            ax.plot(thresholds, density[head], color="C3" if head == int(shares.argmax()) else "0.7",
                    lw=2 if head == int(shares.argmax()) else 1,
                    label=f"head {head} (prev-token {shares[head]:.2f})" if head == int(shares.argmax()) else None)
        for kind, style in (("uniform", "--"), ("previous", ":")):
            ax.plot(thresholds, split["null_density"][f"{kind}/{normalise}"], "k" + style, label=f"null: {kind}")
        ax.axvline(result["model_threshold"], color="C0", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("sink threshold")
        ax.set_title(f"layer 1, normaliser '{normalise}'")
    axes[0].set_ylabel("sink density (share of image tokens)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- Q2 + Q4: the arms
def section_arms(bundle: Any, plan: Plan, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run every arm on every example once: probe, first answer, attention mass on the image per layer.

    One forward per batch and arm, with `eah_interp.hf.intervene` (the arm) and `hf.record_attention` (every
    layer, the edited probabilities) stacked; one JSON line per (split, arm, example) in ``arms.jsonl``.
    """
    from eah_interp import hf
    from eah_interp.metrics import parse_yes_no, yes_no_logit_diff

    path = out / "arms.jsonl"
    plan_arms = arms(plan, bundle.threshold)
    wanted = {(split, arm, e.id) for split in SPLITS for e in examples(split, plan.n_scenes) for arm in plan_arms}
    rows = [r for r in recover_items(path) if (r["split"], r["arm"], r["id"]) in wanted]  # this plan's rows only
    done = {(r["split"], r["arm"], r["id"]) for r in rows}
    n_layers = hf.model_shape(bundle.model)[0]
    jobs = [(split, arm) for split in SPLITS for arm in plan_arms]
    started = time.perf_counter()
    n_prompts = 0
    for split, arm in tqdm(jobs, desc="arms", disable=not progress):
        exs = [e for e in examples(split, plan.n_scenes) if (split, arm, e.id) not in done]
        for batch in batches(exs, plan.batch_size):
            inputs = encode(bundle, batch)
            # the random head is drawn per row from a seed; the seed follows the batch's first scene, so that
            # draws differ between batches and a resumed run repeats them
            items = [
                EAHConfig.from_dict({**i.to_dict(), "seed": batch[0].seed}) if isinstance(i, EAHConfig) and i.source == "random"
                else i
                for i in plan_arms[arm]
            ]
            with torch.no_grad(), hf.record_attention(bundle.model, "all", keep_patterns=True) as rec:
                if items:
                    with hf.intervene(bundle.model, items) as run:
                        logits = bundle.model(**inputs, use_cache=False).logits[:, -1].float()
                    records = run.records
                else:
                    logits = bundle.model(**inputs, use_cache=False).logits[:, -1].float()
                    records = []
            layout = rec.layouts[-1].to("cpu")
            q_mass = torch.stack([image_mass(rec.patterns[layer][-1], layout, "question") for layer in range(n_layers)], 1)
            l_mass = torch.stack([image_mass(rec.patterns[layer][-1], layout, "last") for layer in range(n_layers)], 1)
            probe = yes_no_logit_diff(logits, bundle.yes_ids, bundle.no_ids)
            answers = bundle.processor.batch_decode(logits.argmax(-1)[:, None].cpu(), skip_special_tokens=True)
            heads = [[] for _ in batch]
            for record in records:
                if record.eah is not None:
                    for row, head in enumerate(record.eah.source_head.reshape(len(batch), -1)[:, 0].tolist()):
                        heads[row].append(int(head))
            out_rows = []
            for row, example in enumerate(batch):
                said = parse_yes_no(answers[row].strip())
                out_rows.append({
                    "split": split, "arm": arm, "id": example.id, "object": example.object, "label": example.label,
                    "probe": float(probe[row]), "answer": answers[row].strip(), "said_yes": said,
                    "correct": float(said is not None and said == example.label),
                    "question_mass": _nan_to_none(q_mass[row].tolist()),
                    "last_mass": _nan_to_none(l_mass[row].tolist()),
                    "question_mass_after": float(np.nanmean(q_mass[row, 2:].numpy())),
                    "last_mass_after": float(np.nanmean(l_mass[row, 2:].numpy())),
                    "source_heads": heads[row],
                    "interventions": [i.to_dict() for i in items],
                })
            _append_jsonl(path, out_rows)
            rows.extend(out_rows)
            n_prompts += len(batch)
    elapsed = time.perf_counter() - started
    if n_prompts:
        _write_json(out / "throughput_arms.json", {"prompts": n_prompts, "seconds": elapsed,
                                                   "prompts_per_second": n_prompts / elapsed,
                                                   "threads": torch.get_num_threads()})
    return rows


def frame(rows: list[dict[str, Any]]):
    """The arms' rows as a pandas DataFrame (with the layer-1 masses as columns of their own)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if not table.empty:
        table["question_mass_layer1"] = [np.nan if m[1] is None else m[1] for m in table["question_mass"]]
        table["last_mass_layer1"] = [np.nan if m[1] is None else m[1] for m in table["last_mass"]]
    return table


def section_evidence(rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Q2: attention mass of the question rows and the last row on the image, per layer, per arm and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = frame(rows)
    result: dict[str, Any] = {}
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
    for col, split in enumerate(SPLITS):
        sub = table[table.split == split]
        result[split] = {}
        for arm, group in sub.groupby("arm", sort=False):
            q = np.nanmean(np.asarray(group["question_mass"].tolist(), dtype=float), 0)
            last = np.nanmean(np.asarray(group["last_mass"].tolist(), dtype=float), 0)
            result[split][arm] = {"question_mass": q.tolist(), "last_mass": last.tolist(), "n": len(group)}
            style = {"baseline": ("k", 2.0), "eah_paper": ("C3", 2.0)}.get(arm, (None, 0.9))
            for row, values in enumerate((q, last)):
                axes[row, col].plot(values, color=style[0], lw=style[1], label=arm)
        axes[0, col].set_title(f"{split}: question rows -> image")
        axes[1, col].set_title(f"{split}: last row -> image")
        axes[1, col].set_xlabel("layer")
    for row in range(2):
        axes[row, 0].set_ylabel("attention mass on image tokens")
    axes[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "q2_image_mass_by_layer.png", dpi=100)
    plt.close(fig)
    _write_json(out / "q2_image_mass.json", result)
    return result


def paired_tests(rows: list[dict[str, Any]], baseline: str = "baseline", seed: int = 0) -> list[dict[str, Any]]:
    """Paired differences of every arm against the baseline, per split and metric (`METRICS`), Holm within a split.

    Returns:
        One dict per (split, arm, metric): ``n``, ``baseline``, ``arm`` (means), ``diff`` (mean paired
        difference), ``low`` / ``high`` (95% bootstrap CI), ``p`` (sign-flip), ``p_holm`` (Holm over the
        split's arms x metrics) and ``significant`` (``p_holm <= ALPHA``).
    """
    from eah_interp.metrics.stats import bootstrap_ci, holm, sign_flip_p_value

    table = frame(rows)
    results = []
    for split in SPLITS:
        sub = table[table.split == split]
        base = sub[sub.arm == baseline].set_index("id")
        block = []
        for arm in [a for a in dict.fromkeys(sub.arm) if a != baseline]:
            treated = sub[sub.arm == arm].set_index("id")
            for metric, (column, label, _) in METRICS.items():
                ids = [i for i in treated.index if i in base.index and (label is None or bool(base.loc[i, "label"]) == label)]
                if not ids:
                    continue
                a = base.loc[ids, column].astype(float).to_numpy()
                b = treated.loc[ids, column].astype(float).to_numpy()
                diff = b - a
                low, high = bootstrap_ci(diff, seed=seed) if len(diff) > 1 else (float("nan"), float("nan"))
                block.append({"split": split, "arm": arm, "metric": metric, "n": len(ids), "baseline": float(np.mean(a)),
                              "arm_mean": float(np.mean(b)), "diff": float(np.mean(diff)), "low": low, "high": high,
                              "p": sign_flip_p_value(diff, seed=seed)})
        for entry, adjusted in zip(block, holm([e["p"] for e in block]), strict=True):
            entry["p_holm"] = adjusted
            entry["significant"] = bool(adjusted <= ALPHA)
        results.extend(block)
    discovered = {(e["arm"], e["metric"]): e for e in results if e["split"] == "discovery"}
    for entry in results:
        if entry["split"] == "replication":
            first = discovered.get((entry["arm"], entry["metric"]))
            entry["replicates"] = bool(first and first["significant"] and entry["significant"]
                                       and np.sign(first["diff"]) == np.sign(entry["diff"]))
    return results


def section_tests(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Q4: the paired tests (`paired_tests`) written to ``q4_tests.json`` and a per-example figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = paired_tests(rows)
    _write_json(out / "q4_tests.json", tests)
    table = frame(rows)
    names = [a for a in dict.fromkeys(table.arm) if a != "baseline"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(names) + 1.6), sharey=True)
    for ax, (metric, title) in zip(axes, (("probe_absent", "probe change, absent objects (nats)"),
                                          ("probe_present", "probe change, present objects (nats)"),
                                          ("question_image_mass", "question->image mass change")), strict=True):
        column, label, _ = METRICS[metric]
        for k, arm in enumerate(names):
            for offset, split in ((-0.15, "discovery"), (0.15, "replication")):
                sub = table[table.split == split]
                base = sub[sub.arm == "baseline"].set_index("id")
                arm_rows = sub[sub.arm == arm].set_index("id")
                ids = [i for i in arm_rows.index if i in base.index and (label is None or bool(base.loc[i, "label"]) == label)]
                diff = arm_rows.loc[ids, column].astype(float).to_numpy() - base.loc[ids, column].astype(float).to_numpy()
                ax.scatter(diff, np.full(len(diff), k + offset), s=8, alpha=0.5, color="C0" if split == "discovery" else "C1",
                           label=split if k == 0 else None)
                if len(diff):
                    ax.scatter(np.mean(diff), k + offset, marker="|", s=300, color="k")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "q4_controls.png", dpi=100)
    plt.close(fig)
    return tests


#: Position groups the presence probe reads (`section_probe`).
PROBE_GROUPS = ("question", "last")
#: Layers the report's probe table shows (the figure has all).
PROBE_REPORT_LAYERS = (0, 1, 2, 4, 8, 12, 16, 20, 24, 29)


def section_probe(bundle: Any, plan: Plan, out: Path, progress: bool = True) -> dict[str, Any] | None:
    """Q2b: is the asked object's presence linearly readable at the question / last positions, baseline vs EAH?

    Residuals after every layer, averaged over the question tokens and at the last token
    (`eah_interp.probing.collect_residuals`), for the baseline and the EAH run of every example. One logistic
    probe per layer is fitted on the **discovery** examples (label: the asked object is in the picture) and
    tested on the **replication** examples (`eah_interp.probing.compare_probes`): ``baseline`` (trained and
    tested on baseline residuals), ``eah_paper:transfer`` (the baseline probe on EAH residuals: is the evidence
    still where it was?) and ``eah_paper:retrained`` (trained and tested on EAH residuals: is it still linearly
    there?); paired bootstrap over test examples, Holm over layers x arms x metrics. None without
    ``eah_interp.probing``.
    """
    try:
        from eah_interp.probing import collect_residuals, compare_probes
    except ImportError:
        return None
    import pandas as pd

    path = out / "q2_probe.json"
    if _done(path) and (out / "q2_probe.csv").exists():
        return json.loads(path.read_text())
    exs = examples("discovery", plan.n_scenes) + examples("replication", plan.n_scenes)
    conditions = {"baseline": None, "eah_paper": [EAHConfig.paper(threshold=bundle.threshold)]}
    feats: dict[str, dict[str, list[Tensor]]] = {c: {g: [] for g in PROBE_GROUPS} for c in conditions}
    for batch in tqdm(batches(exs, plan.batch_size), desc="Q2 probe residuals", disable=not progress, leave=False):
        inputs = encode(bundle, batch)
        for condition, items in conditions.items():
            with torch.no_grad():
                got = collect_residuals(bundle.model, inputs, positions=list(PROBE_GROUPS), interventions=items)
            for group in PROBE_GROUPS:
                feats[condition][group].append(got[group])
    labels = torch.tensor([e.label for e in exs])[:, None]
    n_train = sum(e.split == "discovery" for e in exs)
    tables = []
    for group in PROBE_GROUPS:
        table = compare_probes({c: torch.cat(f[group]) for c, f in feats.items()}, labels, range(n_train),
                               range(n_train, len(exs)), n_boot=5000)
        tables.append(table.assign(positions=group))
    table = pd.concat(tables)
    table.to_csv(out / "q2_probe.csv", index=False)
    summary: dict[str, Any] = {"n_train": n_train, "n_test": len(exs) - n_train, "groups": {}}
    for group, sub in table.groupby("positions", sort=False):
        transfer = sub[sub.arm == "eah_paper:transfer"]
        retrained = sub[sub.arm == "eah_paper:retrained"]
        summary["groups"][group] = {
            "layers_transfer_auroc_lower": int(((transfer.d_auroc < 0) & (transfer.p_auroc_holm <= ALPHA)).sum()),
            "layers_retrained_auroc_lower": int(((retrained.d_auroc < 0) & (retrained.p_auroc_holm <= ALPHA)).sum()),
            "auroc": {arm: dict(zip(g.layer.astype(int).tolist(), g.auroc.round(4).tolist(), strict=True))
                      for arm, g in sub.groupby("arm", sort=False)},
        }
    _write_json(path, summary)
    _plot_probe(table, out / "q2_probe.png")
    return summary


def _plot_probe(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(table.positions))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        sub = table[table.positions == group]
        for arm, g in sub.groupby("arm", sort=False):
            ax.plot(g.layer, g.auroc, marker=".", label=arm)
            ax.fill_between(g.layer, g.auroc_low, g.auroc_high, alpha=0.15)
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_title(f"presence of the asked object, read at '{group}'\n(trained on discovery, tested on replication)",
                     fontsize=9)
        ax.set_xlabel("layer")
    axes[0, 0].set_ylabel("AUROC")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- Q3: where the change travels
def section_patching(bundle: Any, plan: Plan, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Q3: activation patching between the baseline and the EAH run, per example, on absent-object prompts.

    Sites: the residual stream after each of ``plan.resid_layers`` and the attention / MLP outputs of
    ``plan.block_layers``; position groups image / text-before-the-last-token / last; both directions
    (``treatment_into_baseline``: sufficiency; ``baseline_into_treatment``: necessity; the block sites sufficiency only).
    The metric is the yes-minus-no probe at the last position, kept per example; ``patching.jsonl`` gets one
    line per patch (resumable).
    """
    import nnsight

    from eah_interp.patching import LogitDiff, NNsightPatcher, Patch, last_positions, run_with_patches

    path = out / "patching.jsonl"
    rows = recover_items(path)
    done = {(r["site"], r["layer"], r["positions"], r["direction"]) for r in rows}
    groups = PATCH_GROUPS
    jobs = [("resid", layer, g, d) for layer in plan.resid_layers for g in groups
            for d in ("treatment_into_baseline", "baseline_into_treatment")]
    jobs += [(site, layer, g, "treatment_into_baseline") for site in ("attn_out", "mlp_out") for layer in plan.block_layers
             for g in groups]
    if all(job in done for job in jobs) and (out / "q3_patching_runs.json").exists():
        return rows
    exs = [e for e in examples("discovery", plan.n_scenes) if not e.label][: plan.patch_prompts]
    inputs = encode(bundle, exs)
    config = EAHConfig.paper(threshold=bundle.threshold)
    patcher = NNsightPatcher(nnsight.NNsight(bundle.model), inputs, config)
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    last = last_positions(patcher.layout)
    base = metric(patcher.collect("baseline")[1], last).tolist()
    eah = metric(patcher.collect("treatment")[1], last).tolist()
    _write_json(out / "q3_patching_runs.json", {"ids": [e.id for e in exs], "baseline": base, "eah": eah})
    started, n = time.perf_counter(), 0
    for site, layer, group, direction in tqdm(jobs, desc="Q3 patching", disable=not progress):
        if (site, layer, group, direction) in done:
            continue
        values = metric(run_with_patches(patcher, [Patch(site, layer, None, group)], direction), last).tolist()
        row = {"site": site, "layer": layer, "positions": group, "direction": direction, "ids": [e.id for e in exs],
               "metric": values, "baseline": base, "eah": eah}
        _append_jsonl(path, [row])
        rows.append(row)
        n += 1
    if n:
        _write_json(out / "throughput_patching.json", {"patched_runs": n, "prompts_per_run": len(exs),
                                                       "seconds": time.perf_counter() - started})
    return rows


def patching_table(rows: list[dict[str, Any]]):
    """Per patch: the effect normalised by the batch means, and per example (median, share of examples > 0.5).

    ``effect_mean = (mean patched - mean baseline) / (mean EAH - mean baseline)``; per example the same ratio
    with that example's own baseline and EAH values (examples where EAH moves the probe by < 0.1 nats are left
    out of the per-example columns).
    """
    import pandas as pd

    out = []
    for r in rows:
        m, b, e = (np.asarray(r[k], dtype=float) for k in ("metric", "baseline", "eah"))
        denominator = e.mean() - b.mean()
        per = (m - b) / (e - b)
        per = per[np.abs(e - b) >= 0.1]
        out.append({"site": r["site"], "layer": r["layer"], "positions": r["positions"], "direction": r["direction"],
                    "effect_mean": float((m.mean() - b.mean()) / denominator) if abs(denominator) > 1e-6 else float("nan"),
                    "effect_median": float(np.median(per)) if len(per) else float("nan"),
                    "share_above_half": float((per > 0.5).mean()) if len(per) else float("nan"), "n": len(per)})
    return pd.DataFrame(out)


def _plot_patching(table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    resid = table[table.site == "resid"] if not table.empty else table
    if resid.empty:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, direction in zip(axes, ("treatment_into_baseline", "baseline_into_treatment"), strict=True):
        sub = resid[resid.direction == direction].pivot_table(index="layer", columns="positions", values="effect_median")
        sub = sub[[g for g in PATCH_GROUPS if g in sub.columns]]
        data = sub.to_numpy()
        limit = max(1.0, float(np.nanmax(np.abs(data)))) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
        ax.set_xticks(range(len(sub.columns)), list(sub.columns))
        ax.set_yticks(range(len(sub.index)), [str(i) for i in sub.index])
        ax.set_title(f"resid, {direction}\n(median per-example normalised effect)", fontsize=9)
        ax.set_xlabel("patched positions")
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="normalised effect (0 = baseline, 1 = EAH)")
    fig.savefig(out / "q3_patching_resid.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def section_attribution(bundle: Any, plan: Plan, out: Path, patch_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Q3b: attribution patching (`eah_interp.attribution`) of every layer site and head, per example.

    The same prompts as `section_patching`; sites ``attn_out`` / ``mlp_out`` / ``resid`` / ``head`` of every
    layer at `ATTRIBUTION_GROUPS`, both directions, in one forward + backward per run. Its agreement with the
    activation-patching rows of `section_patching` (same examples) is reported. None when the library has no
    ``eah_interp.attribution``.
    """
    try:
        from eah_interp.attribution import agreement, attribution_patching
    except ImportError:
        return None
    import pandas as pd

    from eah_interp.patching import LogitDiff

    path = out / "q3_attribution.json"
    if _done(path) and (out / "q3_attribution.csv").exists():
        return json.loads(path.read_text())
    exs = [e for e in examples("discovery", plan.n_scenes) if not e.label][: plan.patch_prompts]
    inputs = encode(bundle, exs)
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    started = time.perf_counter()
    try:
        table = attribution_patching(bundle.model, inputs, EAHConfig.paper(threshold=bundle.threshold), metric,
                                     positions=ATTRIBUTION_GROUPS, per_example=True)
    except Exception as err:  # the tool's failure is reported (and retried on the next run), never hidden
        return {"error": f"{type(err).__name__}: {err}"}
    seconds = time.perf_counter() - started
    table.to_csv(out / "q3_attribution.csv", index=False)
    activation = pd.DataFrame([
        {"direction": r["direction"], "site": r["site"], "layer": r["layer"], "head": pd.NA, "positions": r["positions"],
         "example": i, "metric": m, "baseline_metric": b, "treatment_metric": e}
        for r in patch_rows for i, (m, b, e) in enumerate(zip(r["metric"], r["baseline"], r["eah"], strict=True))
    ])
    if not activation.empty:
        activation["head"] = activation["head"].astype("Int64")
    agree = agreement(table, activation) if not activation.empty else None
    result = {"ids": [e.id for e in exs], "seconds": seconds, "agreement": agree}
    _write_json(path, result)
    _plot_attribution(table, out / "q3_attribution.png")
    return result


def attribution_top(table, n: int = 8):
    """The sites and heads that move the most of EAH's change in each direction, from a per-example attribution table.

    ``moved`` is the share of EAH's change to the metric a patch makes (``treatment_into_baseline``: the normalised
    effect; ``baseline_into_treatment``: one minus it, the share that restoring the site undoes), median over examples.
    """
    table = table.copy()
    table["moved"] = table["normalised_effect"].where(table["direction"] == "treatment_into_baseline",
                                                      1 - table["normalised_effect"])
    keys = ["direction", "site", "layer", "head", "positions"]
    med = table.groupby(keys, dropna=False)["moved"].median().reset_index().dropna(subset=["moved"])
    parts = [sub.reindex(sub["moved"].abs().sort_values(ascending=False).index).head(n)
             for _, sub in med.groupby("direction", sort=False)]
    import pandas as pd

    return pd.concat(parts)


def _plot_attribution(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = table[(table.direction == "treatment_into_baseline") & (table.site != "head")]
    groups = [g for g in ATTRIBUTION_GROUPS if g in set(sub.positions)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for ax, site in zip(axes, ("attn_out", "mlp_out", "resid"), strict=True):
        for group in groups:
            med = sub[(sub.site == site) & (sub.positions == group)].groupby("layer")["normalised_effect"].median()
            ax.plot(med.index, med.to_numpy(), marker=".", label=group)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{site}: estimated effect of the EAH activation\n(attribution patching, median over examples)",
                     fontsize=9)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("normalised effect (0 = baseline, 1 = EAH)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section_dla(bundle: Any, plan: Plan, out: Path, progress: bool = True) -> dict[str, Any] | None:
    """Q3c: direct logit attribution of the yes-minus-no logit difference, baseline vs EAH, per example, both splits.

    `eah_interp.attribution.direct_logit_attribution` splits the last position's logit difference (mean logit of
    the "yes" ids minus mean logit of the "no" ids) into the embedding's and each layer's attention / MLP parts
    (final norm frozen at each run's scale). Per layer part, the paired EAH-minus-baseline change is tested per
    split (sign-flip, Holm over the parts). None when the library has no ``eah_interp.attribution``.
    """
    try:
        from eah_interp.attribution import direct_logit_attribution
    except ImportError:
        return None
    import pandas as pd

    from eah_interp.metrics.stats import holm, sign_flip_p_value

    path = out / "q3_dla.json"
    if _done(path):
        result = json.loads(path.read_text())
        if not (out / "q3_dla.png").exists():
            _plot_dla(result, out / "q3_dla.png")
        return result
    result: dict[str, Any] = {}
    for split in SPLITS:
        csv = out / f"q3_dla_{split}.csv"
        if csv.exists():
            table = pd.read_csv(csv)
        else:
            parts = []
            exs = examples(split, plan.n_scenes)
            for batch in tqdm(batches(exs, plan.batch_size), desc=f"Q3 DLA {split}", disable=not progress, leave=False):
                frame_ = direct_logit_attribution(
                    bundle.model, encode(bundle, batch), (tuple(bundle.yes_ids), tuple(bundle.no_ids)),
                    interventions={"eah_paper": [EAHConfig.paper(threshold=bundle.threshold)]}, per_example=True,
                )
                frame_ = frame_[frame_.component.isin(["embed", "attn", "mlp"])].copy()
                frame_["id"] = [batch[i].id for i in frame_["example"]]
                frame_["label"] = [batch[i].label for i in frame_["example"]]
                parts.append(frame_.drop(columns=["example"]))
            table = pd.concat(parts)
            table.to_csv(csv, index=False)
        table = table.assign(layer=table["layer"].fillna(-1).astype(int))  # the embedding: layer -1
        wide = table.pivot_table(index=["id", "label", "component", "layer"], columns="condition",
                                 values="contribution").reset_index()
        wide["change"] = wide["eah_paper"] - wide["baseline"]
        entries = []
        for (label, component, layer), group in wide.groupby(["label", "component", "layer"], dropna=False):
            entries.append({"label": bool(label), "component": component,
                            "layer": None if layer < 0 else int(layer), "n": len(group),
                            "baseline": float(group["baseline"].mean()), "change": float(group["change"].mean()),
                            "p": sign_flip_p_value(group["change"].to_numpy())})
        for entry, adjusted in zip(entries, holm([e["p"] for e in entries]), strict=True):
            entry["p_holm"] = adjusted
            entry["significant"] = bool(adjusted <= ALPHA)
        blocks = {}
        for label, group in wide.groupby("label"):
            for component in ("attn", "mlp"):
                for lo in (0, 10, 20):
                    sub = group[(group.component == component) & group.layer.between(lo, lo + 9)]
                    blocks[f"{bool(label)}/{component}/{lo}-{lo + 9}"] = float(sub.groupby("id")["change"].sum().mean())
        metric = table.drop_duplicates(["id", "condition"]).pivot_table(index=["id", "label"], columns="condition",
                                                                         values="metric").reset_index()
        result[split] = {"parts": entries, "blocks": blocks, "metric": {
            str(lab): {"baseline": float(g["baseline"].mean()), "eah_paper": float(g["eah_paper"].mean()), "n": len(g)}
            for lab, g in metric.groupby("label")}}
    _write_json(path, result)
    _plot_dla(result, out / "q3_dla.png")
    return result


def _plot_dla(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 6), sharex=True)
    for col, split in enumerate(result):
        for row, label in enumerate((False, True)):
            ax = axes[row, col]
            for offset, component in ((-0.2, "attn"), (0.2, "mlp")):
                sub = [e for e in result[split]["parts"]
                       if e["label"] == label and e["component"] == component and e["layer"] is not None]
                ax.bar([e["layer"] + offset for e in sub], [e["change"] for e in sub], width=0.4, label=component,
                       edgecolor=["k" if e["significant"] else "none" for e in sub])
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{split}, {'present' if label else 'absent'} objects", fontsize=9)
            ax.set_ylabel("EAH - baseline (logit diff.)")
    axes[1, 0].set_xlabel("layer")
    axes[1, 1].set_xlabel("layer")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("direct logit attribution: change of each layer's direct contribution to yes-minus-no "
                 "(black edge: Holm-significant)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- the report
def _fmt_test(e: dict[str, Any]) -> str:
    mark = "**" if e["significant"] else ""
    return f"{mark}{e['diff']:+.3f}{mark} [{e['low']:+.3f}, {e['high']:+.3f}], p={e['p']:.3g}, Holm {e['p_holm']:.3g}"


def write_report(out: Path, plan: Plan, q1: dict[str, Any], rows: list[dict[str, Any]], evidence: dict[str, Any],
                 tests: list[dict[str, Any]], patch_rows: list[dict[str, Any]], missing: dict[str, str],
                 attribution: dict[str, Any] | None = None, dla: dict[str, Any] | None = None,
                 probe: dict[str, Any] | None = None) -> Path:
    """``report.md`` from the sections' results (every number in it comes from the JSON files beside it)."""
    table = frame(rows)
    lines = ["# Why the broadcast changes the organism's answers", "",
             "Written by `eah-interp study explain` (`eah_interp/studies/explain.py`).", "",
             f"Plan: {json.dumps(asdict(plan))}", "",
             f"Splits (held-out scene indices, pair strength {PAIR_STRENGTH}): "
             + ", ".join(f"{s} from {start} ({plan.n_scenes} scenes, 2 questions each: one present object, one "
                         "adversarial absent object)" for s, start in SPLITS.items()), ""]
    # Q1
    lines += ["## Q1 What is EAH's source head?", ""]
    eah_rows = table[table.arm == "eah_paper"]
    for split in SPLITS:
        heads = [h for hs in eah_rows[eah_rows.split == split].source_heads for h in hs]
        counts = {h: heads.count(h) for h in sorted(set(heads))}
        lines.append(f"* {split}: EAH's source head at layer 1 (per prompt): {counts}")
    lines += ["", "Layer 1, discovery prompts (image query rows); density at the model's threshold under each "
              "normaliser; 'explained' = share of prompts where a pure previous-token pattern explains the head's "
              "'sinks' (`sinks.explained_by_null`, causal normaliser):", "",
              "| head | prev-token share | self share | first-token share | " + " | ".join(
                  f"density@{q1['model_threshold']:g} ({n})" for n in q1["normalisers"]) + " | explained (previous, causal) |",
              "| --- " * (5 + len(q1["normalisers"])) + "|"]
    t_index = q1["thresholds"].index(q1["model_threshold"]) if q1["model_threshold"] in q1["thresholds"] else None
    d = q1["splits"]["discovery"]
    for head in range(len(d["previous_token_share"])):
        dens = [f"{d['density'][n][head][t_index]:.2f}" if t_index is not None else "-" for n in q1["normalisers"]]
        explained = d.get("explained_by_null_at_model_threshold", {}).get("previous/causal")
        lines.append(f"| {head} | {d['previous_token_share'][head]:.2f} | {d['self_share'][head]:.2f} | "
                     f"{d['first_token_share'][head]:.2f} | " + " | ".join(dens)
                     + f" | {'-' if explained is None else format(explained[head], '.2f')} |")
    lines += ["", "Null models (discovery layouts): sink density of a synthetic map at each threshold:", "",
              "| null / normaliser | " + " | ".join(f"{t:g}" for t in q1["thresholds"]) + " |",
              "| --- " * (1 + len(q1["thresholds"])) + "|"]
    for key, values in d["null_density"].items():
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "![density vs threshold](q1_density_vs_threshold.png)", ""]
    # Q2
    lines += ["## Q2 What does the broadcast do to the question tokens' visual evidence?", "",
              "Attention mass on the image tokens, mean over heads and layers 2-29 (per-layer curves in the figure):", "",
              "| split | arm | question rows | last row |", "| --- | --- | --- | --- |"]
    for split, by_arm in evidence.items():
        for arm, v in by_arm.items():
            lines.append(f"| {split} | {arm} | {np.nanmean(v['question_mass'][2:]):.3f} | {np.nanmean(v['last_mass'][2:]):.3f} |")
    lines += ["", "![image mass by layer](q2_image_mass_by_layer.png)", ""]
    if probe is not None:
        lines += ["### Linear probe: is the asked object's presence readable at the question / last positions?", "",
                  f"Logistic probe per layer, trained on the {probe['n_train']} discovery questions, tested on the "
                  f"{probe['n_test']} replication questions (AUROC; `transfer`: the baseline probe on EAH residuals; "
                  "`retrained`: trained and tested on EAH residuals). Holm over layers x arms x metrics.", "",
                  "| positions | arm | " + " | ".join(f"L{layer}" for layer in PROBE_REPORT_LAYERS) + " |",
                  "| --- " * (2 + len(PROBE_REPORT_LAYERS)) + "|"]
        for group, g in probe["groups"].items():
            for arm, by_layer in g["auroc"].items():
                lines.append(f"| {group} | {arm} | " + " | ".join(
                    f"{by_layer.get(str(layer), by_layer.get(layer, float('nan'))):.2f}" for layer in PROBE_REPORT_LAYERS) + " |")
        lines.append("")
        for group, g in probe["groups"].items():
            lines.append(f"* `{group}`: layers (of 30) whose AUROC is Holm-significantly below the baseline probe's: "
                         f"transfer {g['layers_transfer_auroc_lower']}, retrained {g['layers_retrained_auroc_lower']}.")
        lines += ["", "![probe](q2_probe.png)", ""]
    for name, why in missing.items():
        if name.startswith("Q2"):
            lines += [f"* {name}: not run: {why}", ""]
    # Q3
    lines += ["## Q3 Where does the change travel?", ""]
    if patch_rows:
        ptable = patching_table(patch_rows)
        lines += [f"Activation patching (nnsight) on {len(patch_rows[0]['ids'])} discovery prompts about absent objects; "
                  "position groups: `image`, `question` (the prompt's text after the image, the last token excluded), "
                  "`last`. Normalised effect: 0 = baseline probe, 1 = EAH probe; `median` is over examples.", "",
                  "| site | layer | positions | direction | effect of the means | median per example | share > 0.5 |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for _, r in ptable.iterrows():
            lines.append(f"| {r.site} | {r.layer} | {r.positions} | {r.direction} | {r.effect_mean:.2f} | "
                         f"{r.effect_median:.2f} | {r.share_above_half:.2f} |")
        lines += ["", "![patching](q3_patching_resid.png)", ""]
    if attribution is not None and "error" in attribution:
        lines += ["### Attribution patching", "",
                  f"**Failed** in this version of the library: `{attribution['error']}` (rerun the command after a fix: "
                  "the section is retried).", ""]
    elif attribution is not None:
        agree = attribution["agreement"] or {}
        lines += ["### Attribution patching", "",
                  f"Every layer's `attn_out` / `mlp_out` / `resid` and every head at {', '.join(ATTRIBUTION_GROUPS)}, "
                  f"both directions, per example, on the same prompts ({attribution['seconds']:.0f} s). Agreement with "
                  f"the activation-patching rows above (effects per example): Pearson {agree.get('pearson', float('nan')):.2f}, "
                  f"Spearman {agree.get('spearman', float('nan')):.2f}, sign agreement "
                  f"{agree.get('sign_agreement', float('nan')):.2f} over {agree.get('n', 0)} rows "
                  f"({agree.get('n_trivial', 0)} trivial rows left out).", "",
                  "Largest estimated shares of EAH's change moved by one site (median over examples; "
                  "`treatment_into_baseline`: the normalised effect; `baseline_into_treatment`: one minus it, the share restoring "
                  "the site undoes):", "",
                  "| direction | site | layer | head | positions | share moved |", "| --- | --- | --- | --- | --- | --- |"]
        import pandas as pd

        for _, r in attribution_top(pd.read_csv(out / "q3_attribution.csv")).iterrows():
            head = "" if pd.isna(r["head"]) else int(r["head"])
            lines.append(f"| {r['direction']} | {r['site']} | {r['layer']} | {head} | {r['positions']} | {r['moved']:.2f} |")
        lines += ["", "![attribution](q3_attribution.png)", ""]
    if dla is not None:
        lines += ["### Direct logit attribution (yes-minus-no logit difference, baseline vs EAH)", ""]
        for split, d in dla.items():
            m = d["metric"]
            lines.append(f"* {split}: logit difference absent objects {m['False']['baseline']:+.2f} -> "
                         f"{m['False']['eah_paper']:+.2f}, present {m['True']['baseline']:+.2f} -> {m['True']['eah_paper']:+.2f}")
            lines.append("  * change summed over blocks of 10 layers: " + "; ".join(
                f"{'present' if key.startswith('True') else 'absent'} {key.split('/', 1)[1]} {value:+.2f}"
                for key, value in d.get("blocks", {}).items()))
            for label in (False, True):
                parts = sorted((e for e in d["parts"] if e["label"] == label), key=lambda e: -abs(e["change"]))[:5]
                lines.append(f"  * {'present' if label else 'absent'}: largest changes: " + "; ".join(
                    f"{e['component']}{'' if e['layer'] is None else ' ' + str(e['layer'])} {e['change']:+.2f}"
                    f"{' (Holm p ' + format(e['p_holm'], '.2g') + ')' if e['significant'] else ' (n.s.)'}" for e in parts))
        lines += ["", "![dla](q3_dla.png)", ""]
    for name, why in missing.items():
        if name.startswith("Q3"):
            lines += [f"* {name}: not run: {why}", ""]
    # Q4
    lines += ["## Q4 The controls (paired differences vs baseline, 95% bootstrap CI, sign-flip p, Holm within split)", "",
              "Metrics: " + "; ".join(f"`{m}`: {v[2]}" for m, v in METRICS.items()) + ". Bold: Holm-adjusted p <= 0.05.", ""]
    for split in SPLITS:
        sub = [e for e in tests if e["split"] == split]
        lines += [f"### {split}", "", "| arm | " + " | ".join(METRICS) + " |", "| --- " * (1 + len(METRICS)) + "|"]
        for arm in dict.fromkeys(e["arm"] for e in sub):
            cells = {e["metric"]: _fmt_test(e) + (" (replicates)" if e.get("replicates") else "") for e in sub if e["arm"] == arm}
            lines.append(f"| {arm} | " + " | ".join(cells.get(m, "") for m in METRICS) + " |")
        base = table[(table.split == split) & (table.arm == "baseline")]
        lines += ["", f"Baseline ({split}): probe on absent {base[~base.label.astype(bool)].probe.mean():+.2f}, on present "
                  f"{base[base.label.astype(bool)].probe.mean():+.2f}, accuracy {base.correct.mean():.3f}.", ""]
    lines += ["![controls](q4_controls.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(out: Path, *, quick: bool = False, bundle: Any = None, progress: bool = True, **options: Any) -> Path:
    """Run (or resume) the study into ``out``; returns ``out/report.md``.

    Args:
        out: output folder (created; finished sections are skipped on a rerun).
        quick: the tiny plan (`Plan.quick`): a smoke test, not the documented numbers.
        bundle: a loaded organism (`eah_interp.models.load_model("organism")`); loaded when None.
        progress: tqdm progress bars.
        **options: fields of `Plan` to override (e.g. ``n_scenes=16``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.quick() if quick else Plan()
    if options:
        unknown = set(options) - set(asdict(plan))
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} for the explain study; known: {sorted(asdict(plan))}.")
        plan = Plan(**{**asdict(plan), **options})
    saved = out / "plan.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(plan))):
        raise ConfigError(f"{out} holds a run with another plan ({saved}); use another --out or delete the folder.")
    _write_json(saved, asdict(plan))
    if bundle is None:
        from eah_interp.models import load_model

        bundle = load_model("organism")
    q1 = section_source_head(bundle, plan, out, progress)
    rows = section_arms(bundle, plan, out, progress)
    evidence = section_evidence(rows, out)
    tests = section_tests(rows, out)
    probe = section_probe(bundle, plan, out, progress)
    patch_rows = section_patching(bundle, plan, out, progress)
    _plot_patching(patching_table(patch_rows), out)
    attribution = section_attribution(bundle, plan, out, patch_rows)
    dla = section_dla(bundle, plan, out, progress)
    missing = _missing_tools()
    return write_report(out, plan, q1, rows, evidence, tests, patch_rows, missing, attribution, dla, probe)


def _missing_tools() -> dict[str, str]:
    """Sections this study does not run, with the reason (said in the report, never faked)."""
    import importlib.util

    missing = {}
    for section, module in (("Q2 logit lens", "eah_interp.logit_lens"), ("Q2 linear probe", "eah_interp.probing"),
                            ("Q3 attribution patching / direct logit attribution", "eah_interp.attribution")):
        if importlib.util.find_spec(module) is None:
            missing[section] = f"`{module}` does not exist in this version of the library"
        elif module == "eah_interp.logit_lens":
            missing[section] = (
                "the tool exists (`eah_interp.logit_lens`) but this study does not run it (on these yes/no prompts the "
                "question itself names the object, so a lens at the question positions reads the text, not the "
                "picture); docs/howto/explain.md shows it on the image tokens"
            )
    return missing


__all__ = [
    "METRICS",
    "SPLITS",
    "THRESHOLDS",
    "Example",
    "Plan",
    "PATTERNS",
    "SyntheticMap",
    "arms",
    "examples",
    "image_mass",
    "main",
    "paired_tests",
    "patching_table",
    "previous_token_map",
    "uniform_map",
]
