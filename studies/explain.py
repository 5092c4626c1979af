"""Why the broadcast changes the organism's answers: source head, visual evidence, where the change travels, controls.

``python -m studies explain --out docs/results/explain`` (or `main`) answers four questions on the bundled
organism with the library's tools, on a **discovery** split of held-out scenes, a pre-registered
**replication** split and a **confirmation** split (three ranges of held-out scene indices, `SPLITS`), all
reported:

* **Q1 what EAH's source head is** (`section_source_head`): at layer 1, each head's previous-token share
  (`eah_interp.sinks.previous_token_share`) and its distance from each null pattern (previous-token, uniform:
  `sinks.null_pattern_distance`) and from each null's density-vs-threshold curve (`sinks.curve_distance`), each
  null on its own; sink density as a function of the threshold under each normaliser next to the nulls';
* **Q2 what the broadcast does to the question tokens' visual evidence** (`section_arms`, `section_evidence`,
  `layer_tests`, `section_probe`): per layer, the attention mass of the question rows and of the last row on
  the image, every arm, per example, tested layer by layer; a linear presence probe (`eah_interp.probing`) on
  the question / last residuals, trained on discovery and tested on replication, baseline vs EAH;
* **Q3 where the change travels** (`section_patching`, `patching_label_tests`, `section_attribution`,
  `section_dla`): activation patching (nnsight, `eah_interp.patching`) of the residual stream x position groups
  between the baseline and the EAH run, per example, on absent *and* present objects (shares of EAH's change as
  ratios of means with CIs, and where the two question types differ); attribution patching of every site and
  head (`eah_interp.attribution`) with its agreement with the activation-patching rows; direct logit attribution
  of the yes-minus-no logit difference, baseline vs EAH, per example, every split;
* **Q4 the controls** (`section_arms`, `paired_tests`, `versus_tests`): random head, fewest-sink head, deep
  layer, synthetic maps broadcast at layer 1 (`eah_interp.interventions.SyntheticMap`) and a question+last ->
  image attention knockout in an early and a late window of layers (a positive control); paired differences per
  example against the baseline *and* against EAH (same direction is not same magnitude).

Statistics (`eah_interp.metrics.stats`): the two questions of a scene are a cluster: cluster-bootstrap CIs over
scenes, clustered sign-flip p-values, ratio-of-means CIs for shares; Holm within each split; "replicates" /
"confirms" = Holm-significant in discovery and in replication / confirmation with the same sign.

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.evaluation.statistics import ALPHA, holm_family, verdict
from eah_interp.experiments import batches, progress_bar
from eah_interp.interventions import EAH
from eah_interp.interventions.synthetic import PATTERNS, SyntheticMap, previous_token_map, uniform_map
from eah_interp.layout import TokenLayout
from eah_interp.models.introspect import model_shape
from eah_interp.resumable import atomic_write, recover_items
from eah_interp.scenes import PAIR_STRENGTH
from eah_interp.sinks import NORMALISE_CHOICES

#: Held-out scene *index* (`eah_interp.scenes.get_scene("heldout", i)`, seed 10**8 + i) where each split
#: starts: discovery, a pre-registered replication, and a confirmation range added after the first run (the
#: corrections of issue 27 are checked on it); docs/results.md's evaluation used held-out indices 0..199.
SPLITS = {"discovery": 20_000, "replication": 30_000, "confirmation": 40_000}
#: Bootstrap / sign-flip resamples of the tests.
N_RESAMPLES = 20_000
#: Sink thresholds of the density-vs-threshold curves (0.01 is the organism's, 0.0008 the paper's).
THRESHOLDS = (0.0008, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
#: Position groups of the activation-patching section (`eah_interp.layout.GROUPS`).
PATCH_GROUPS = ("image", "question", "last")
#: Position groups of the attribution-patching section.
ATTRIBUTION_GROUPS = ("system", "image", "question", "last")
#: The attribution section's per-example table (gzip-compressed CSV; `pandas.read_csv` reads it as it is).
ATTRIBUTION_CSV = "q3_attribution.csv.gz"
#: Metrics of the paired tests: name -> (per-example column, which questions, what "worse" means).
ARM_METRICS = {
    "probe_absent": ("probe", False, "higher = more 'yes' to an absent object"),
    "probe_present": ("probe", True, "lower = less 'yes' to a present object"),
    "correct": ("correct", None, "first answer token right (1) or wrong (0)"),
    "question_image_mass_layer1": ("question_mass_layer1", None, "question rows' attention on the image at layer 1"),
    "question_image_mass": ("question_mass_after", None, "question rows' attention on the image, layers 2-29"),
    "last_image_mass": ("last_mass_after", None, "last row's attention on the image, layers 2-29"),
}


def image_mass(probs: Float[Tensor, "batch heads q k"], layout: TokenLayout, rows: str) -> Float[Tensor, " batch"]:
    """Mean over heads of `eah_interp.head_stats.group_attention` from the group ``rows`` to the image (NaN: no such row)."""
    from eah_interp.head_stats import group_attention

    return group_attention(probs, layout, rows, "image").mean(-1)


# ---------------------------------------------------------------------------- plan and examples
@dataclass(frozen=True)
class Plan:
    """How big a run is (the ``quick`` plan is a smoke test, not the documented numbers)."""

    n_scenes: int = 24
    batch_size: int = 8
    splits: tuple[tuple[str, int], ...] = tuple(SPLITS.items())
    patch_splits: tuple[str, ...] = ("discovery", "replication", "confirmation")
    patch_prompts: int = 24
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
        return cls(n_scenes=1, batch_size=2, patch_prompts=1, patch_splits=("discovery",), resid_layers=(2,),
                   block_layers=(1,), arms=("baseline", "eah_paper", "control_previous_token_map"))

    def split_starts(self) -> dict[str, int]:
        """Split name -> first held-out scene index."""
        return {name: int(start) for name, start in self.splits}


@dataclass(frozen=True)
class Example:
    """One yes/no question about one scene."""

    id: str
    split: str
    seed: int
    object: str
    label: bool
    kinds: tuple[str, ...]

    @property
    def scene(self) -> str:
        """The scene's name (``"heldout/20000"``): the cluster its two questions share."""
        from eah_interp.scenes import split_of

        held, index = split_of(self.seed)
        return f"{held}/{index}"


def scene_of(example_id: str) -> str:
    """The scene (cluster) of an example id ``"<seed>:<present|absent>:<object>"``."""
    return example_id.split(":", 1)[0]


def examples(split: str, n_scenes: int, start: int | None = None) -> list[Example]:
    """Two questions per held-out scene of ``split``: one present object and its first adversarial absent object.

    Scenes are held-out scenes ``start .. start + n_scenes - 1`` (`eah_interp.scenes.get_scene`; ``start``
    defaults to ``SPLITS[split]``). The present object is drawn with the scene's seed; the absent one is
    `absent_kinds(scene, "adversarial")[0]` (a co-occurrence partner of a present object when there is one,
    so "yes" would be a hallucination).
    """
    from eah_interp.scenes import absent_kinds, get_scene

    first = SPLITS[split] if start is None else start
    out = []
    for index in range(first, first + n_scenes):
        scene = get_scene("heldout", index, pair_strength=PAIR_STRENGTH)
        seed = scene.seed
        kinds = tuple(sorted(scene.kinds))
        present = random.Random(seed).choice(kinds)
        absent = absent_kinds(scene, "adversarial")[0]
        out.append(Example(f"{seed}:present:{present}", split, seed, present, True, kinds))
        out.append(Example(f"{seed}:absent:{absent}", split, seed, absent, False, kinds))
    return out


def encode(bundle: Any, batch: Sequence[Example]) -> dict[str, Tensor]:
    """The model inputs of a batch of examples (yes/no prompts with their scene images)."""
    from eah_interp.scenes import make_scene, question_for

    prompts = [bundle.yes_no_prompt(question_for(e.object)) for e in batch]  # e.seed: the scene's own seed
    images = [make_scene(e.seed, pair_strength=PAIR_STRENGTH).image for e in batch]
    return bundle.encode(prompts, images)


def arms(plan: Plan, threshold: float) -> dict[str, list[Any]]:
    """The arms of Q2/Q4 (``plan.arms``): name -> interventions for `eah_interp.hf.intervene` (empty: the baseline)."""
    from eah_interp.interventions import Knockout

    every = {
        "baseline": [],
        "eah_paper": [EAH.paper(threshold=threshold)],
        "control_random_head": [EAH.paper(threshold=threshold, source="random")],
        "control_fewest_sinks": [EAH.paper(threshold=threshold, source="fewest")],
        "control_deep_layer": [EAH.paper(threshold=threshold, layers=(plan.deep_layer,))],
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


def _finished(path: Path, figure: Path, plot: Callable[[Any, Path], None]) -> Any:
    """A finished section's JSON (None when ``path`` is not written yet), its ``figure`` redrawn if missing."""
    if not _done(path):
        return None
    result = json.loads(path.read_text())
    if not figure.exists():
        plot(result, figure)
    return result


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


def split_examples(plan: Plan, split: str) -> list[Example]:
    """The examples of one of ``plan.splits``."""
    return examples(split, plan.n_scenes, plan.split_starts()[split])


# ---------------------------------------------------------------------------- Q1: the source head
#: A head "is" a null pattern when its rows' mean total-variation distance from it is at most this
#: (`eah_interp.sinks.null_pattern_distance`): at least 90% of its attention placed as the null places it.
PATTERN_TOLERANCE = 0.1


def section_source_head(bundle: Any, plan: Plan, out: Path, progress: bool | None = None) -> dict[str, Any]:
    """Q1: layer 1's heads on every split's prompts: how local each head is, each null model on its own.

    Per prompt and head (image rows): the previous-token share (`eah_interp.sinks.previous_token_share`), the
    self and first-token shares; the distance of the head's rows from each null pattern
    (`eah_interp.sinks.null_pattern_distance`, "previous" and "uniform" separately); the distance of its
    density-vs-threshold curve (`sinks.DEFAULT_THRESHOLDS`, causal) from each null's (`sinks.curve_distance`);
    its sink density at every `THRESHOLDS` value under each normaliser, the nulls' densities on the same
    layouts (`sinks.null_densities`); and the density-based flag of each null at the model's threshold
    (`sinks.explained_by_null`, reported separately, not OR-ed). Per-prompt values are kept (``per_prompt``)
    so that the report can give cluster-bootstrap CIs over scenes.
    """
    from eah_interp import hf
    from eah_interp.sinks import (
        DEFAULT_THRESHOLDS,
        curve_distance,
        density_curve,
        explained_by_null,
        null_densities,
        null_pattern_distance,
        previous_token_share,
    )

    path = out / "q1_source_head.json"
    if (finished := _finished(path, out / "q1_density_vs_threshold.png", _plot_source_head)) is not None:
        return finished
    result: dict[str, Any] = {"thresholds": list(THRESHOLDS), "normalisers": list(NORMALISE_CHOICES), "splits": {},
                              "model_threshold": bundle.threshold, "pattern_tolerance": PATTERN_TOLERANCE}
    for split in plan.split_starts():
        exs = split_examples(plan, split)
        per: dict[str, list[Tensor]] = {}
        dens: dict[str, list[Tensor]] = {n: [] for n in NORMALISE_CHOICES}
        nulls: dict[str, list[Tensor]] = {}
        for batch in progress_bar(batches(exs, plan.batch_size), progress, desc=f"Q1 {split}", leave=False):
            inputs = encode(bundle, batch)
            with torch.no_grad(), hf.record_attention(bundle.model, [1], keep_patterns=True) as rec:
                bundle.model(**inputs, use_cache=False)
            probs, layout = rec.patterns[1][-1].float(), rec.layouts[-1].to("cpu")
            b, _, _, k = probs.shape
            pos = torch.arange(k)
            image_rows = layout.image_mask.float()  # [b, q] (prefill: q == k)
            n_rows = image_rows.sum(-1).clamp_min(1)[:, None]
            firsts = layout.first_real_position()
            on_first = torch.stack([probs[i, :, :, int(firsts[i])] for i in range(b)])  # [b, h, q]
            values = {
                "previous_token_share": previous_token_share(probs, layout),
                "self_share": (probs[:, :, pos, pos] * image_rows[:, None]).sum(-1) / n_rows,
                "first_token_share": (on_first * image_rows[:, None]).sum(-1) / n_rows,
            }
            curve = density_curve(probs, layout, DEFAULT_THRESHOLDS, "causal")  # [T, b, h]
            null_curve = null_densities(layout, DEFAULT_THRESHOLDS, normalise="causal")  # kind -> [T, b]
            at = null_densities(layout, bundle.threshold, normalise="causal")  # kind -> [b]
            density = density_curve(probs, layout, bundle.threshold, "causal")[0]  # [b, h]
            for kind in ("previous", "uniform"):
                values[f"pattern_distance_{kind}"] = null_pattern_distance(probs, layout, kind)
                values[f"curve_distance_{kind}"] = curve_distance(curve, null_curve[kind][:, :, None])
                values[f"density_flag_{kind}"] = explained_by_null(density, at[kind][:, None]).float()
            for key, value in values.items():
                per.setdefault(key, []).append(value)
            for normalise in NORMALISE_CHOICES:
                dens[normalise].append(density_curve(probs, layout, THRESHOLDS, normalise))  # [t, b, h]
                for kind, v in null_densities(layout, THRESHOLDS, normalise=normalise).items():  # kind -> [t, b]
                    nulls.setdefault(f"{kind}/{normalise}", []).append(v)
        per_prompt = {key: torch.cat(v).tolist() for key, v in per.items()}  # [n, h]
        result["splits"][split] = {
            "n_prompts": len(exs),
            "scenes": [e.scene for e in exs],
            "ids": [e.id for e in exs],
            "per_prompt": per_prompt,
            **{key: torch.cat(v).mean(0).tolist() for key, v in per.items()},  # [h]: means over prompts
            "previous_token_share_min_max": [torch.cat(per["previous_token_share"]).min(0).values.tolist(),
                                             torch.cat(per["previous_token_share"]).max(0).values.tolist()],
            "density": {n: torch.cat(v, 1).mean(1).T.tolist() for n, v in dens.items()},  # [h, t]
            "null_density": {key: torch.cat(v, 1).mean(1).tolist() for key, v in nulls.items()},  # [t]
        }
    _write_json(path, result)
    _plot_source_head(result, out / "q1_density_vs_threshold.png")
    return result


def source_head_table(q1: dict[str, Any], split: str, seed: int = 0) -> list[dict[str, Any]]:
    """Per head of one split: each Q1 statistic's mean with a 95% cluster-bootstrap CI over scenes.

    ``is_previous`` / ``is_uniform``: the CI's upper end of the head's distance from that null pattern is at
    most `PATTERN_TOLERANCE` (the head is that pattern, on these prompts); ``flag_*``: the share of prompts the
    density-based flag (`sinks.explained_by_null`) marks, per null.
    """
    from eah_interp.metrics.stats import cluster_bootstrap

    d = q1["splits"][split]
    scenes = d["scenes"]
    per = {k: np.asarray(v, dtype=float) for k, v in d["per_prompt"].items()}
    n_heads = per["previous_token_share"].shape[1]
    tolerance = q1.get("pattern_tolerance", PATTERN_TOLERANCE)
    rows = []
    for head in range(n_heads):
        row: dict[str, Any] = {"split": split, "head": head}
        for key in ("previous_token_share", "pattern_distance_previous", "pattern_distance_uniform",
                    "curve_distance_previous", "curve_distance_uniform"):
            r = cluster_bootstrap(per[key][:, head], scenes, n_resamples=N_RESAMPLES, seed=seed)
            row[key], row[f"{key}_low"], row[f"{key}_high"] = r.estimate, r.low, r.high
        for kind in ("previous", "uniform"):
            row[f"flag_{kind}"] = float(per[f"density_flag_{kind}"][:, head].mean())
            row[f"is_{kind}"] = bool(row[f"pattern_distance_{kind}_high"] <= tolerance)
        rows.append(row)
    return rows


def _plot_source_head(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = result["splits"]["discovery"]
    thresholds = result["thresholds"]
    n_norm = len(result["normalisers"])
    fig, axes = plt.subplots(1, n_norm + 1, figsize=(4.2 * (n_norm + 1), 3.6))
    shares = np.asarray(split["previous_token_share"])
    for ax, normalise in zip(axes[:n_norm], result["normalisers"], strict=True):
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
    ax = axes[n_norm]  # each null on its own: how far each head's rows are from each null pattern
    if "pattern_distance_previous" in split:
        for head, (x, y) in enumerate(zip(split["pattern_distance_previous"], split["pattern_distance_uniform"],
                                          strict=True)):
            ax.scatter(x, y, color="C3" if head == int(shares.argmax()) else "C0")
            ax.annotate(str(head), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.axvline(result.get("pattern_tolerance", PATTERN_TOLERANCE), color="grey", lw=0.8, ls=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("distance from the previous-token pattern")
        ax.set_ylabel("distance from the uniform pattern")
        ax.set_title("layer 1 heads vs each null pattern\n(mean total variation of image rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- Q2 + Q4: the arms
def section_arms(bundle: Any, plan: Plan, out: Path, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run every arm on every example once: probe, first answer, attention mass on the image per layer.

    One forward per batch and arm, with `eah_interp.hf.intervene` (the arm) and `hf.record_attention` (every
    layer, the edited probabilities) stacked; one JSON line per (split, arm, example) in ``arms.jsonl``.
    """
    from eah_interp import hf
    from eah_interp.metrics import parse_yes_no, yes_no_logit_diff

    path = out / "arms.jsonl"
    plan_arms = arms(plan, bundle.threshold)
    splits = plan.split_starts()
    wanted = {(split, arm, e.id) for split in splits for e in split_examples(plan, split) for arm in plan_arms}
    rows = [r for r in recover_items(path) if (r["split"], r["arm"], r["id"]) in wanted]  # this plan's rows only
    done = {(r["split"], r["arm"], r["id"]) for r in rows}
    n_layers = model_shape(bundle.model)[0]
    jobs = [(split, arm) for split in splits for arm in plan_arms]
    started = time.perf_counter()
    n_prompts = 0
    for split, arm in progress_bar(jobs, progress, desc="arms"):
        exs = [e for e in split_examples(plan, split) if (split, arm, e.id) not in done]
        for batch in batches(exs, plan.batch_size):
            inputs = encode(bundle, batch)
            # the random head is drawn per row from a seed; the seed follows the batch's first scene, so that
            # draws differ between batches and a resumed run repeats them
            items = [
                replace(i, seed=batch[0].seed) if isinstance(i, EAH) and i.source == "random" else i
                for i in plan_arms[arm]
            ]
            with torch.no_grad(), hf.record_attention(bundle.model, "all", keep_patterns=True) as rec, \
                    hf.intervene(bundle.model, items) as run:  # an empty list: the plain model
                logits = bundle.model(**inputs, use_cache=False).logits[:, -1].float()
            records = run.records
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
    splits = list(dict.fromkeys(table.split))
    fig, axes = plt.subplots(2, len(splits), figsize=(5.5 * len(splits), 6.5), sharex=True, squeeze=False)
    for col, split in enumerate(splits):
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
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "q2_image_mass_by_layer.png", dpi=100)
    plt.close(fig)
    _write_json(out / "q2_image_mass.json", result)
    return result


def _test(diff: np.ndarray, clusters: Sequence[str], seed: int) -> dict[str, Any]:
    """Mean paired difference, 95% cluster-bootstrap CI over scenes, clustered sign-flip p (`metrics.stats`)."""
    from eah_interp.metrics.stats import cluster_bootstrap, sign_flip_p_value

    ok = ~np.isnan(diff)
    diff, clusters = diff[ok], [c for c, keep in zip(clusters, ok, strict=True) if keep]
    if len(diff) < 2:
        return {"n": int(len(diff)), "n_scenes": len(set(clusters)), "diff": float(np.mean(diff)) if len(diff) else
                float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan")}
    ci = cluster_bootstrap(diff, clusters, n_resamples=N_RESAMPLES, seed=seed)
    return {"n": int(len(diff)), "n_scenes": ci.n_clusters, "diff": ci.estimate, "low": ci.low, "high": ci.high,
            "p": sign_flip_p_value(diff, clusters=clusters, n_resamples=N_RESAMPLES, seed=seed)}


def _holm_block(block: list[dict[str, Any]]) -> None:
    """``p_holm`` and ``significant`` of one family of tests (evaluation's one rule: Holm p <= `ALPHA`)."""
    adjusted, significant = holm_family([e["p"] for e in block])
    for entry, p_holm, is_significant in zip(block, adjusted, significant, strict=True):
        entry["p_holm"], entry["significant"] = p_holm, is_significant


def _verdicts(results: list[dict[str, Any]], key: Sequence[str]) -> None:
    """``replicates`` (replication rows) / ``confirms`` (confirmation rows): Holm-significant there and in
    discovery, with the same sign."""
    discovered = {tuple(e[k] for k in key): e for e in results if e["split"] == "discovery"}
    for entry in results:
        field = {"replication": "replicates", "confirmation": "confirms"}.get(entry["split"])
        if field:
            first = discovered.get(tuple(entry[k] for k in key))
            entry[field] = bool(first) and verdict(first["significant"], entry["significant"], first["diff"],
                                                   entry["diff"]) == "replicated"


def _against(rows: list[dict[str, Any]], reference: str, skip: Sequence[str] = ()) -> Iterator[tuple[str, Any, list]]:
    """Per split: ``(split, the reference arm's rows by id, [(arm, its rows by id), ...])`` for every other arm
    (and not those in ``skip``); splits without the reference are left out."""
    table = frame(rows)
    for split in dict.fromkeys(table.split):
        sub = table[table.split == split]
        ref = sub[sub.arm == reference].set_index("id")
        if not ref.empty:
            others = [a for a in dict.fromkeys(sub.arm) if a != reference and a not in skip]
            yield split, ref, [(arm, sub[sub.arm == arm].set_index("id")) for arm in others]


def paired_tests(rows: list[dict[str, Any]], baseline: str = "baseline", seed: int = 0) -> list[dict[str, Any]]:
    """Paired differences of every arm against the baseline, per split and metric (`ARM_METRICS`), Holm within a split.

    The two questions of a scene are not independent: CIs are cluster bootstraps over scenes and p-values
    clustered sign flips (`eah_interp.metrics.stats`), `N_RESAMPLES` resamples.

    Returns:
        One dict per (split, arm, metric): ``n``, ``n_scenes``, ``baseline``, ``arm_mean`` (means), ``diff``
        (mean paired difference), ``low`` / ``high`` (95% CI), ``p``, ``p_holm`` (Holm over the split's arms x
        metrics), ``significant`` (``p_holm <= ALPHA``); replication rows get ``replicates`` and confirmation
        rows ``confirms`` (significant there and in discovery with the same sign).
    """
    results = []
    for split, base, arms in _against(rows, baseline):
        block = []
        for arm, treated in arms:
            for metric, (column, label, _) in ARM_METRICS.items():
                ids = [i for i in treated.index if i in base.index and (label is None or bool(base.loc[i, "label"]) == label)]
                if not ids:
                    continue
                a = base.loc[ids, column].astype(float).to_numpy()
                b = treated.loc[ids, column].astype(float).to_numpy()
                block.append({"split": split, "arm": arm, "metric": metric, "baseline": float(np.nanmean(a)),
                              "arm_mean": float(np.nanmean(b)), **_test(b - a, [scene_of(i) for i in ids], seed)})
        _holm_block(block)
        results.extend(block)
    _verdicts(results, ("arm", "metric"))
    return results


#: The arm-vs-arm comparisons of Q4: each control against EAH on the same questions.
VERSUS_METRICS = ("probe_absent", "probe_present", "correct")


def versus_tests(rows: list[dict[str, Any]], reference: str = "eah_paper", seed: int = 0) -> list[dict[str, Any]]:
    """Each control minus ``reference`` (EAH) per question, per split and `VERSUS_METRICS`; Holm within a split.

    Same statistics as `paired_tests` (cluster bootstrap over scenes, clustered sign flips). A control that
    "does the same" as EAH in direction can still differ in magnitude: this is the test of the magnitude.
    """
    results = []
    for split, ref, arms in _against(rows, reference, skip=("baseline",)):
        block = []
        for arm, other in arms:
            for metric in VERSUS_METRICS:
                column, label, _ = ARM_METRICS[metric]
                ids = [i for i in other.index if i in ref.index and (label is None or bool(ref.loc[i, "label"]) == label)]
                if not ids:
                    continue
                a = ref.loc[ids, column].astype(float).to_numpy()
                b = other.loc[ids, column].astype(float).to_numpy()
                block.append({"split": split, "arm": arm, "reference": reference, "metric": metric,
                              "reference_mean": float(np.nanmean(a)), "arm_mean": float(np.nanmean(b)),
                              **_test(b - a, [scene_of(i) for i in ids], seed)})
        _holm_block(block)
        results.extend(block)
    _verdicts(results, ("arm", "metric"))
    return results


#: Row groups whose attention on the image `layer_tests` tests at every layer.
LAYER_GROUPS = ("question", "last")


def layer_tests(rows: list[dict[str, Any]], baseline: str = "baseline", seed: int = 0) -> list[dict[str, Any]]:
    """Q2 per layer: every arm's change of the question rows' (and the last row's) attention on the image.

    For each split, arm, row group (`LAYER_GROUPS`) and layer, plus the mean over layers 2-29 (``layer =
    "2-29"``, the summary the first report used): the paired difference to the baseline with a cluster
    bootstrap CI over scenes and a clustered sign-flip p; ``relative`` = diff / baseline mean. Holm within a
    split over arms x groups x layers (the layer means included).
    """
    results = []
    for split, base, arms in _against(rows, baseline):
        block = []
        for arm, treated in arms:
            ids = [i for i in treated.index if i in base.index]
            clusters = [scene_of(i) for i in ids]
            for group in LAYER_GROUPS:
                a = np.asarray([[np.nan if v is None else v for v in m] for m in base.loc[ids, f"{group}_mass"]], dtype=float)
                b = np.asarray([[np.nan if v is None else v for v in m] for m in treated.loc[ids, f"{group}_mass"]],
                               dtype=float)
                columns = [(layer, a[:, layer], b[:, layer]) for layer in range(a.shape[1])]
                columns.append(("2-29", np.nanmean(a[:, 2:], 1), np.nanmean(b[:, 2:], 1)))
                for layer, x, y in columns:
                    entry = {"split": split, "arm": arm, "group": group, "layer": layer,
                             "baseline": float(np.nanmean(x)), **_test(y - x, clusters, seed)}
                    entry["relative"] = entry["diff"] / entry["baseline"] if entry["baseline"] else float("nan")
                    block.append(entry)
        _holm_block(block)
        results.extend(block)
    _verdicts(results, ("arm", "group", "layer"))
    return results


def _plot_layer_tests(tests: list[dict[str, Any]], path: Path, arms_shown: Sequence[str] = ("eah_paper",)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(e["split"] for e in tests))
    fig, axes = plt.subplots(len(LAYER_GROUPS), 1, figsize=(11, 3.2 * len(LAYER_GROUPS)), sharex=True, squeeze=False)
    for row, group in enumerate(LAYER_GROUPS):
        ax = axes[row, 0]
        for k, split in enumerate(splits):
            for arm in arms_shown:
                sub = [e for e in tests if e["split"] == split and e["arm"] == arm and e["group"] == group
                       and e["layer"] != "2-29"]
                x = np.array([e["layer"] for e in sub]) + (k - (len(splits) - 1) / 2) * 0.25
                y = np.array([e["diff"] for e in sub])
                err = np.array([[e["diff"] - e["low"] for e in sub], [e["high"] - e["diff"] for e in sub]])
                ax.errorbar(x, y, yerr=err, fmt="o", ms=3, lw=0.8, color=f"C{k}", label=f"{arm}, {split}")
                sig = [e["significant"] for e in sub]
                ax.scatter(x[sig], y[sig], s=40, facecolors="none", edgecolors="k", lw=0.8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel(f"{group} rows -> image\n(EAH - baseline)")
        ax.set_yscale("symlog", linthresh=0.01)
    axes[0, 0].set_title("change of the attention mass on the image per layer, 95% cluster-bootstrap CI "
                         "(black ring: Holm-significant in that split)", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def section_tests(rows: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Q4: the paired tests (`paired_tests`) written to ``q4_tests.json`` and a per-example figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = paired_tests(rows)
    _write_json(out / "q4_tests.json", tests)
    _write_json(out / "q4_versus_eah.json", versus_tests(rows))
    layers = layer_tests(rows)
    _write_json(out / "q2_layer_tests.json", layers)
    _plot_layer_tests(layers, out / "q2_layer_tests.png")
    table = frame(rows)
    names = [a for a in dict.fromkeys(table.arm) if a != "baseline"]
    splits = list(dict.fromkeys(table.split))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(names) + 1.6), sharey=True)
    for ax, (metric, title) in zip(axes, (("probe_absent", "probe change, absent objects (nats)"),
                                          ("probe_present", "probe change, present objects (nats)"),
                                          ("question_image_mass", "question->image mass change")), strict=True):
        column, label, _ = ARM_METRICS[metric]
        for k, arm in enumerate(names):
            for n, split in enumerate(splits):
                offset = (n - (len(splits) - 1) / 2) * 0.2
                sub = table[table.split == split]
                base = sub[sub.arm == "baseline"].set_index("id")
                arm_rows = sub[sub.arm == arm].set_index("id")
                ids = [i for i in arm_rows.index if i in base.index and (label is None or bool(base.loc[i, "label"]) == label)]
                diff = arm_rows.loc[ids, column].astype(float).to_numpy() - base.loc[ids, column].astype(float).to_numpy()
                ax.scatter(diff, np.full(len(diff), k + offset), s=8, alpha=0.5, color=f"C{n}",
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


def section_probe(bundle: Any, plan: Plan, out: Path, progress: bool | None = None) -> dict[str, Any] | None:
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
    exs = split_examples(plan, "discovery") + split_examples(plan, "replication")
    conditions = {"baseline": None, "eah_paper": [EAH.paper(threshold=bundle.threshold)]}
    feats: dict[str, dict[str, list[Tensor]]] = {c: {g: [] for g in PROBE_GROUPS} for c in conditions}
    for batch in progress_bar(batches(exs, plan.batch_size), progress, desc="Q2 probe residuals", leave=False):
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
def _directions() -> tuple[str, str]:
    """(sufficiency, necessity): the patching library's two directions (treatment into baseline, and back)."""
    from eah_interp.patching import DIRECTIONS

    return DIRECTIONS[0], DIRECTIONS[1]


def _label_name(label: bool) -> str:
    return "present" if label else "absent"


def section_patching(bundle: Any, plan: Plan, out: Path, progress: bool | None = None) -> list[dict[str, Any]]:
    """Q3: activation patching between the baseline and the EAH run, per example, on both question types.

    For every split of ``plan.patch_splits`` and both labels (absent and present objects), the first
    ``plan.patch_prompts`` questions of that label. Sites: the residual stream after each of
    ``plan.resid_layers`` and the attention / MLP outputs of ``plan.block_layers``; position groups image /
    question (the text after the image, the last token excluded) / last; both directions for the residual
    stream (sufficiency: EAH's activation into the baseline run; necessity: the baseline's into the EAH run),
    sufficiency for the block sites. The metric is the yes-minus-no probe at the last position, kept per
    example; ``patching.jsonl`` gets one line per (split, label, patch) (resumable).
    """
    import nnsight

    from eah_interp.patching import LogitDiff, NNsightPatcher, Patch, last_positions, run_with_patches

    sufficiency, necessity = _directions()
    path = out / "patching.jsonl"
    rows = recover_items(path)
    done = {(r["split"], r["label"], r["site"], r["layer"], r["positions"], r["direction"]) for r in rows}
    patches = [("resid", layer, g, d) for layer in plan.resid_layers for g in PATCH_GROUPS for d in (sufficiency, necessity)]
    patches += [(site, layer, g, sufficiency) for site in ("attn_out", "mlp_out") for layer in plan.block_layers
                for g in PATCH_GROUPS]
    runs_path = out / "q3_patching_runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    started, n = time.perf_counter(), 0
    for split in plan.patch_splits:
        for label in (False, True):
            key = f"{split}/{_label_name(label)}"
            todo = [p for p in patches if (split, label, *p) not in done]
            if not todo and key in runs:
                continue
            exs = [e for e in split_examples(plan, split) if e.label == label][: plan.patch_prompts]
            inputs = encode(bundle, exs)
            patcher = NNsightPatcher(nnsight.NNsight(bundle.model), inputs, [EAH.paper(threshold=bundle.threshold)])
            last = last_positions(patcher.layout)
            base = metric(patcher.collect("baseline")[1], last).tolist()
            eah = metric(patcher.collect("treatment")[1], last).tolist()
            runs[key] = {"ids": [e.id for e in exs], "baseline": base, "eah": eah}
            _write_json(runs_path, runs)
            for site, layer, group, direction in progress_bar(todo, progress, desc=f"Q3 patching {key}"):
                values = metric(run_with_patches(patcher, [Patch(site, layer, None, group)], direction), last).tolist()
                row = {"split": split, "label": label, "site": site, "layer": layer, "positions": group,
                       "direction": direction, "ids": [e.id for e in exs], "metric": values, "baseline": base, "eah": eah}
                _append_jsonl(path, [row])
                rows.append(row)
                n += 1
    if n:
        _write_json(out / "throughput_patching.json", {"patched_runs": n, "seconds": time.perf_counter() - started,
                                                       "threads": torch.get_num_threads()})
    order = {split: i for i, split in enumerate(plan.patch_splits)}  # a split added to a finished run goes in its place
    return sorted(rows, key=lambda r: order.get(r["split"], len(order)))


def patching_table(rows: list[dict[str, Any]], seed: int = 0):
    """Per patch: the share of EAH's change it moves, with a 95% bootstrap CI, and per-example summaries.

    ``effect_mean = (mean patched - mean baseline) / (mean EAH - mean baseline)`` (a ratio of means,
    `eah_interp.metrics.stats.ratio_ci`, resampling scenes) with ``effect_low`` / ``effect_high``; ``moved`` is
    the share of the change the patch makes: the effect itself for the sufficiency direction (the share the
    site *carries*), one minus it for the necessity direction (the share restoring the baseline there
    *undoes*), with its CI. Per example the same ratios with that example's own values: ``effect_median``,
    ``moved_median`` and ``moved_above_half`` (the share of examples whose moved share is above 0.5;
    examples EAH moves by < 0.1 nats are left out of these three).
    """
    import pandas as pd

    from eah_interp.metrics.stats import ratio_ci

    sufficiency, _ = _directions()
    out = []
    for r in rows:
        m, b, e = (np.asarray(r[k], dtype=float) for k in ("metric", "baseline", "eah"))
        clusters = [scene_of(i) for i in r["ids"]]
        share = ratio_ci(m - b, e - b, clusters, n_resamples=N_RESAMPLES, seed=seed)
        per = (m - b) / (e - b)
        per = per[np.abs(e - b) >= 0.1]
        flip = r["direction"] != sufficiency
        per_moved = 1 - per if flip else per
        moved = (1 - share.estimate, 1 - share.high, 1 - share.low) if flip else (share.estimate, share.low, share.high)
        out.append({"split": r.get("split", "discovery"), "label": _label_name(bool(r.get("label", False))),
                    "site": r["site"], "layer": r["layer"], "positions": r["positions"], "direction": r["direction"],
                    "effect_mean": share.estimate, "effect_low": share.low, "effect_high": share.high,
                    "moved": moved[0], "moved_low": moved[1], "moved_high": moved[2],
                    "effect_median": float(np.median(per)) if len(per) else float("nan"),
                    "moved_median": float(np.median(per_moved)) if len(per) else float("nan"),
                    "moved_above_half": float((per_moved > 0.5).mean()) if len(per) else float("nan"), "n": len(m)})
    return pd.DataFrame(out)


def patching_label_tests(rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Does a patch move a different share of EAH's change on present than on absent objects?

    Per split and patch with both labels: ``diff`` = share moved (`patching_table`'s ``moved``) on present
    minus absent objects, 95% CI from a bootstrap that resamples scenes (a scene's two questions together),
    two-sided percentile-bootstrap p (`eah_interp.metrics.stats.bootstrap_p_value`), Holm within a split
    over the patches.
    """
    from eah_interp.metrics.stats import bootstrap_p_value, cluster_bootstrap

    sufficiency, _ = _directions()
    by: dict[tuple, dict[bool, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["split"], r["site"], r["layer"], r["positions"], r["direction"]), {})[bool(r["label"])] = r
    results = []
    for split in dict.fromkeys(k[0] for k in by):
        block = []
        for key, pair in by.items():
            if key[0] != split or len(pair) != 2:
                continue
            columns, clusters = [], []
            for label in (False, True):
                r = pair[label]
                m, b, e = (np.asarray(r[k], dtype=float) for k in ("metric", "baseline", "eah"))
                for num, den in zip(m - b, e - b, strict=True):
                    columns.append((num, den, float(label)))
                clusters += [scene_of(i) for i in r["ids"]]
            values = np.asarray(columns)
            flip = key[4] != sufficiency

            def statistic(v: np.ndarray, w: np.ndarray, flip: bool = flip) -> float:
                shares = []
                for label in (0.0, 1.0):
                    sel = v[:, 2] == label
                    top, bottom = float(w[sel] @ v[sel, 0]), float(w[sel] @ v[sel, 1])
                    share = top / bottom if bottom != 0 else float("nan")
                    shares.append(1 - share if flip else share)
                return shares[1] - shares[0]

            boot = cluster_bootstrap(values, clusters, statistic=statistic, n_resamples=N_RESAMPLES // 4, seed=seed)
            block.append({"split": split, "site": key[1], "layer": key[2], "positions": key[3], "direction": key[4],
                          "diff": boot.estimate, "low": boot.low, "high": boot.high, "n_scenes": boot.n_clusters,
                          "p": bootstrap_p_value(boot.draws)})
        _holm_block(block)
        results.extend(block)
    return results


def _plot_patching(table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    resid = table[table.site == "resid"] if not table.empty else table
    if resid.empty:
        return
    panels = [(split, label, direction) for split in dict.fromkeys(resid.split) for label in ("absent", "present")
              for direction in _directions()]
    panels = [p for p in panels if not resid[(resid.split == p[0]) & (resid.label == p[1])].empty]
    cols = 4
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    im = None
    for ax, (split, label, direction) in zip(axes.ravel(), panels, strict=False):
        sub = resid[(resid.split == split) & (resid.label == label) & (resid.direction == direction)]
        sub = sub.pivot_table(index="layer", columns="positions", values="moved")
        sub = sub[[g for g in PATCH_GROUPS if g in sub.columns]]
        data = sub.to_numpy()
        im = ax.imshow(data, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -1.2, 1.2))
        ax.set_xticks(range(len(sub.columns)), list(sub.columns))
        ax.set_yticks(range(len(sub.index)), [str(i) for i in sub.index])
        what = "carried" if direction == _directions()[0] else "undone by restoring"
        ax.set_title(f"{split}, {label} objects\nshare {what}", fontsize=9)
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes, label="share of EAH's change (ratio of means)")
    fig.savefig(out / "q3_patching_resid.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def section_attribution(bundle: Any, plan: Plan, out: Path, patch_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Q3b: attribution patching (`eah_interp.attribution`) of every layer site and head, per example.

    The discovery prompts of `section_patching` (both labels, one call each; ``example`` numbered across
    the two, absent first, so that every example has one key); sites ``attn_out`` / ``mlp_out`` / ``resid`` /
    ``head`` of every layer at `ATTRIBUTION_GROUPS`, both directions, in one forward + backward per run. Its
    agreement with the activation-patching rows of the same examples is reported (overall and per label).
    None when the library has no ``eah_interp.attribution``.
    """
    try:
        from eah_interp.attribution import agreement, attribution_patching
    except ImportError:
        return None
    import pandas as pd

    from eah_interp.patching import LogitDiff

    path = out / "q3_attribution.json"
    if _done(path) and (out / ATTRIBUTION_CSV).exists():
        return json.loads(path.read_text())
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    tables, ids, started = [], [], time.perf_counter()
    for label in (False, True):
        exs = [e for e in split_examples(plan, "discovery") if e.label == label][: plan.patch_prompts]
        try:
            table = attribution_patching(bundle.model, encode(bundle, exs), EAH.paper(threshold=bundle.threshold), metric,
                                         positions=ATTRIBUTION_GROUPS, per_example=True)
        except Exception as err:  # the tool's failure is reported (and retried on the next run), never hidden
            return {"error": f"{type(err).__name__}: {err}"}
        tables.append(table.assign(example=table["example"] + len(ids), label=_label_name(label)))
        ids += [e.id for e in exs]
    seconds = time.perf_counter() - started
    table = pd.concat(tables, ignore_index=True)
    table.to_csv(out / ATTRIBUTION_CSV, index=False)  # gzip: 48 examples x every site and head
    index = {i: n for n, i in enumerate(ids)}
    activation = pd.DataFrame([
        {"direction": r["direction"], "site": r["site"], "layer": r["layer"], "head": pd.NA, "positions": r["positions"],
         "example": index[i], "label": _label_name(bool(r["label"])), "metric": m, "baseline_metric": b, "treatment_metric": e}
        for r in patch_rows if r["split"] == "discovery"
        for i, m, b, e in zip(r["ids"], r["metric"], r["baseline"], r["eah"], strict=True) if i in index
    ])
    agree: dict[str, Any] | None = None
    if not activation.empty:
        activation["head"] = activation["head"].astype("Int64")
        agree = agreement(table.drop(columns="label"), activation.drop(columns="label"))
        agree["by_label"] = {
            lab: agreement(table[table.label == lab].drop(columns="label"),
                           activation[activation.label == lab].drop(columns="label"), by=())
            for lab in ("absent", "present") if (activation.label == lab).any()
        }
    result = {"ids": ids, "seconds": seconds, "agreement": agree}
    _write_json(path, result)
    _plot_attribution(table, out / "q3_attribution.png")
    return result


def attribution_top(table, n: int = 8):
    """The sites and heads that move the most of EAH's change in each direction, from a per-example attribution table.

    ``moved`` is the share of EAH's change to the metric a patch makes (sufficiency direction: the normalised
    effect; necessity direction: one minus it, the share that restoring the site undoes), median over examples.
    """
    sufficiency, _ = _directions()
    table = table.copy()
    table["moved"] = table["normalised_effect"].where(table["direction"] == sufficiency, 1 - table["normalised_effect"])
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

    sub = table[(table.direction == _directions()[0]) & (table.site != "head")]
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


def section_dla(bundle: Any, plan: Plan, out: Path, progress: bool | None = None) -> dict[str, Any] | None:
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

    from eah_interp.metrics.stats import sign_flip_p_value

    path = out / "q3_dla.json"
    if (finished := _finished(path, out / "q3_dla.png", _plot_dla)) is not None:
        return finished
    result: dict[str, Any] = {}
    for split in plan.split_starts():
        csv = out / f"q3_dla_{split}.csv"
        if csv.exists():
            table = pd.read_csv(csv)
        else:
            parts = []
            exs = split_examples(plan, split)
            for batch in progress_bar(batches(exs, plan.batch_size), progress, desc=f"Q3 DLA {split}", leave=False):
                frame_ = direct_logit_attribution(
                    bundle.model, encode(bundle, batch), (tuple(bundle.yes_ids), tuple(bundle.no_ids)),
                    interventions={"eah_paper": [EAH.paper(threshold=bundle.threshold)]}, per_example=True,
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
        _holm_block(entries)
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

    fig, axes = plt.subplots(2, len(result), figsize=(6 * len(result), 6), sharex=True, squeeze=False)
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
    for ax in axes[1]:
        ax.set_xlabel("layer")
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


def _ci(value: float, low: float, high: float, fmt: str = ".2f") -> str:
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _report_q1(q1: dict[str, Any], table: Any, plan: Plan) -> list[str]:
    lines = ["## Q1 What is EAH's source head?", ""]
    eah_rows = table[table.arm == "eah_paper"]
    for split in plan.split_starts():
        heads = [h for hs in eah_rows[eah_rows.split == split].source_heads for h in hs]
        counts = {h: heads.count(h) for h in sorted(set(heads))}
        lines.append(f"* {split}: EAH's source head at layer 1 (per prompt): {counts}")
    tolerance = q1.get("pattern_tolerance", PATTERN_TOLERANCE)
    lines += ["", "Layer 1, image rows, per head, **each null on its own** (mean over prompts, 95% cluster-bootstrap CI "
              "over scenes): the previous-token share (`sinks.previous_token_share`); the distance of the head's rows "
              "from the previous-token and from the uniform pattern (`sinks.null_pattern_distance`, mean total "
              "variation: 0 = the head is that pattern); the distance of its density-vs-threshold curve from each "
              "null's (`sinks.curve_distance`, causal normaliser, 41 thresholds 1e-4..1); and the share of prompts the "
              f"density-based flag (`sinks.explained_by_null` at {q1['model_threshold']:g}) marks, per null. A head *is* "
              f"a null pattern here when the upper end of its distance CI is <= {tolerance:g}.", ""]
    for split in q1["splits"]:
        if "per_prompt" not in q1["splits"][split]:
            continue
        lines += [f"{split}:", "", "| head | prev-token share | distance: previous | distance: uniform | "
                  "curve distance: previous | curve distance: uniform | density flag: previous | density flag: uniform | "
                  "verdict |", "| --- " * 9 + "|"]
        for r in source_head_table(q1, split):
            verdict = ("previous-token pattern" if r["is_previous"] else "uniform pattern" if r["is_uniform"]
                       else "neither null")
            lines.append(
                f"| {r['head']} | {_ci(r['previous_token_share'], r['previous_token_share_low'], r['previous_token_share_high'])} | "
                f"{_ci(r['pattern_distance_previous'], r['pattern_distance_previous_low'], r['pattern_distance_previous_high'])} | "
                f"{_ci(r['pattern_distance_uniform'], r['pattern_distance_uniform_low'], r['pattern_distance_uniform_high'])} | "
                f"{r['curve_distance_previous']:.3f} | {r['curve_distance_uniform']:.3f} | {r['flag_previous']:.2f} | "
                f"{r['flag_uniform']:.2f} | {verdict} |")
        lines.append("")
    t_index = q1["thresholds"].index(q1["model_threshold"]) if q1["model_threshold"] in q1["thresholds"] else None
    d = q1["splits"]["discovery"]
    lines += [f"Sink density at {q1['model_threshold']:g} under each normaliser (discovery):", "",
              "| head | " + " | ".join(q1["normalisers"]) + " |", "| --- " * (1 + len(q1["normalisers"])) + "|"]
    for head in range(len(d["previous_token_share"])):
        lines.append(f"| {head} | " + " | ".join(
            f"{d['density'][n][head][t_index]:.2f}" if t_index is not None else "-" for n in q1["normalisers"]) + " |")
    lines += ["", "Null models (discovery layouts): sink density of a synthetic map at each threshold:", "",
              "| null / normaliser | " + " | ".join(f"{t:g}" for t in q1["thresholds"]) + " |",
              "| --- " * (1 + len(q1["thresholds"])) + "|"]
    for key, values in d["null_density"].items():
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "![density vs threshold](q1_density_vs_threshold.png)", ""]
    return lines


def _report_layers(layers: list[dict[str, Any]]) -> list[str]:
    splits = list(dict.fromkeys(e["split"] for e in layers))
    lines = ["### Question rows -> image, per layer (EAH vs baseline)", "",
             "Paired difference per question, 95% cluster-bootstrap CI over scenes, clustered sign-flip p, Holm within "
             "each split over arms x row groups x layers (and the layer means); `rel.` = difference / baseline. Bold: "
             "Holm p <= 0.05. The full table (every arm, the last row too) is `q2_layer_tests.json`.", "",
             "| layer | " + " | ".join(f"{s}: baseline | {s}: EAH - baseline (rel.), Holm p" for s in splits) + " |",
             "| --- " * (1 + 2 * len(splits)) + "|"]
    by = {(e["split"], e["layer"]): e for e in layers if e["arm"] == "eah_paper" and e["group"] == "question"}
    for layer in [*sorted({k[1] for k in by if k[1] != "2-29"}), "2-29"]:
        cells = []
        for split in splits:
            e = by.get((split, layer))
            if e is None:
                cells += ["", ""]
                continue
            mark = "**" if e["significant"] else ""
            cells += [f"{e['baseline']:.3f}", f"{mark}{e['diff']:+.4f}{mark} [{e['low']:+.4f}, {e['high']:+.4f}] "
                      f"({e['relative']:+.0%}), {e['p_holm']:.2g}"]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "Holm-significant layers per arm (question rows; of 30):", "",
              "| arm | " + " | ".join(splits) + " |", "| --- " * (1 + len(splits)) + "|"]
    for arm in dict.fromkeys(e["arm"] for e in layers):
        counts = []
        for split in splits:
            sig = [e for e in layers if e["arm"] == arm and e["split"] == split and e["group"] == "question"
                   and e["layer"] != "2-29" and e["significant"]]
            shown = ", ".join(str(e["layer"]) for e in sig[:12]) + (", ..." if len(sig) > 12 else "")
            counts.append(f"{len(sig)} ({shown})")
        lines.append(f"| {arm} | " + " | ".join(counts) + " |")
    lines += ["", "![per layer](q2_layer_tests.png)", ""]
    return lines


def _report_patching(ptable: Any, labels: list[dict[str, Any]], patch_rows: list[dict[str, Any]]) -> list[str]:
    sufficiency, necessity = _directions()
    n = {(r["split"], bool(r["label"])): len(r["ids"]) for r in patch_rows}
    lines = ["Activation patching (nnsight) per example, **both question types**: "
             + ", ".join(f"{split} {_label_name(label)} objects {k} prompts" for (split, label), k in n.items())
             + ". Position groups: `image`, `question` (the text after the image, the last token excluded), `last`. "
             f"`{sufficiency}`: share of EAH's change the site *carries* (its EAH activation in the baseline run); "
             f"`{necessity}`: share that *restoring* the baseline at the site *undoes* (one minus its normalised "
             "effect). Shares are ratios of means (`metrics.stats.ratio_ci`) with a 95% bootstrap CI over scenes; "
             "`median` is the median per-example ratio.", "",
             "| split | objects | site | layer | positions | direction | share moved [95% CI] | median per example | share > 0.5 |",
             "| --- " * 9 + "|"]
    for _, r in ptable.iterrows():
        lines.append(f"| {r.split} | {r.label} | {r.site} | {r.layer} | {r.positions} | {r.direction} | "
                     f"{_ci(r.moved, r.moved_low, r.moved_high)} | {r.moved_median:.2f} | {r.moved_above_half:.2f} |")
    if labels:
        lines += ["", "Where the story differs: share moved on present minus absent objects (scenes resampled with both "
                  "their questions; percentile-bootstrap p, Holm within each split over the patches). Bold: Holm p <= 0.05.",
                  "", "| split | site | layer | positions | direction | present - absent [95% CI] | p | Holm p |",
                  "| --- " * 8 + "|"]
        for e in labels:
            mark = "**" if e["significant"] else ""
            lines.append(f"| {e['split']} | {e['site']} | {e['layer']} | {e['positions']} | {e['direction']} | "
                         f"{mark}{_ci(e['diff'], e['low'], e['high'], '+.2f')}{mark} | {e['p']:.2g} | {e['p_holm']:.2g} |")
    lines += ["", "![patching](q3_patching_resid.png)", ""]
    return lines


def _write_report(out: Path, plan: Plan, q1: dict[str, Any], rows: list[dict[str, Any]], evidence: dict[str, Any],
                 tests: list[dict[str, Any]], patch_rows: list[dict[str, Any]], missing: dict[str, str],
                 attribution: dict[str, Any] | None = None, dla: dict[str, Any] | None = None,
                 probe: dict[str, Any] | None = None, layers: list[dict[str, Any]] | None = None,
                 versus: list[dict[str, Any]] | None = None, patch_labels: list[dict[str, Any]] | None = None,
                 ptable: Any = None) -> Path:
    """``report.md`` from the sections' results (every number in it comes from the JSON files beside it;
    ``ptable``: `patching_table` of ``patch_rows``, as written to ``q3_patching.csv``)."""
    from eah_interp.scenes import scene_seed

    table = frame(rows)
    lines = ["# Why the broadcast changes the organism's answers", "",
             "Written by `python -m studies explain` (`studies/explain.py`).", "",
             f"Plan: {json.dumps(asdict(plan))}", "",
             f"Splits (held-out scene indices `get_scene('heldout', i)`, pair strength {PAIR_STRENGTH}): "
             + ", ".join(f"{s}: indices {start}-{start + plan.n_scenes - 1} (seeds {scene_seed('heldout', start)}-"
                         f"{scene_seed('heldout', start + plan.n_scenes - 1)})" for s, start in plan.split_starts().items())
             + "; 2 questions per scene (one present object, one adversarial absent object). Tests within a split: "
             "cluster bootstrap over scenes and clustered sign flips (`eah_interp.metrics.stats`), Holm; "
             "`replicates` / `confirms` = Holm-significant in discovery and in replication / confirmation with the "
             "same sign.", ""]
    lines += _report_q1(q1, table, plan)
    # Q2
    lines += ["## Q2 What does the broadcast do to the question tokens' visual evidence?", ""]
    if layers:
        lines += _report_layers(layers)
    lines += ["Attention mass on the image tokens, mean over heads (all arms, per split; figure):", "",
              "![image mass by layer](q2_image_mass_by_layer.png)", ""]
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
        lines += _report_patching(patching_table(patch_rows) if ptable is None else ptable, patch_labels or [], patch_rows)
    if attribution is not None and "error" in attribution:
        lines += ["### Attribution patching", "",
                  f"**Failed** in this version of the library: `{attribution['error']}` (rerun the command after a fix: "
                  "the section is retried).", ""]
    elif attribution is not None:
        agree = attribution["agreement"] or {}
        by_label = "; ".join(f"{lab}: Pearson {v['pearson']:.2f}, Spearman {v['spearman']:.2f}, sign {v['sign_agreement']:.2f}, "
                             f"n {v['n']}" for lab, v in agree.get("by_label", {}).items())
        lines += ["### Attribution patching", "",
                  f"Every layer's `attn_out` / `mlp_out` / `resid` and every head at {', '.join(ATTRIBUTION_GROUPS)}, "
                  f"both directions, per example, on the discovery patching prompts ({attribution['seconds']:.0f} s). "
                  f"Agreement with the activation-patching rows of the same examples (effects per example, one key per "
                  f"example): Pearson {agree.get('pearson', float('nan')):.2f}, Spearman "
                  f"{agree.get('spearman', float('nan')):.2f}, sign agreement {agree.get('sign_agreement', float('nan')):.2f} "
                  f"over {agree.get('n', 0)} rows ({agree.get('n_trivial', 0)} trivial rows left out); by question type: "
                  f"{by_label}.", "",
                  "Largest estimated shares of EAH's change moved by one site (median over examples; sufficiency: the "
                  "normalised effect; necessity: one minus it, the share restoring the site undoes):", "",
                  "| direction | site | layer | head | positions | share moved |", "| --- | --- | --- | --- | --- | --- |"]
        import pandas as pd

        for _, r in attribution_top(pd.read_csv(out / ATTRIBUTION_CSV)).iterrows():
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
    lines += ["## Q4 The controls (paired differences vs baseline, 95% cluster-bootstrap CI over scenes, clustered "
              "sign-flip p, Holm within split)", "",
              "Metrics: " + "; ".join(f"`{m}`: {v[2]}" for m, v in ARM_METRICS.items()) + ". Bold: Holm-adjusted p <= 0.05.", ""]
    for split in plan.split_starts():
        sub = [e for e in tests if e["split"] == split]
        lines += [f"### {split}", "", "| arm | " + " | ".join(ARM_METRICS) + " |", "| --- " * (1 + len(ARM_METRICS)) + "|"]
        for arm in dict.fromkeys(e["arm"] for e in sub):
            cells = {e["metric"]: _fmt_test(e) + (" (replicates)" if e.get("replicates") else "")
                     + (" (confirms)" if e.get("confirms") else "") for e in sub if e["arm"] == arm}
            lines.append(f"| {arm} | " + " | ".join(cells.get(m, "") for m in ARM_METRICS) + " |")
        base = table[(table.split == split) & (table.arm == "baseline")]
        lines += ["", f"Baseline ({split}): probe on absent {base[~base.label.astype(bool)].probe.mean():+.2f}, on present "
                  f"{base[base.label.astype(bool)].probe.mean():+.2f}, accuracy {base.correct.mean():.3f}.", ""]
    if versus:
        lines += ["### Each control against EAH (control minus EAH per question; same statistics, Holm within split)", "",
                  "| arm | metric | " + " | ".join(dict.fromkeys(e["split"] for e in versus)) + " |",
                  "| --- " * (2 + len(dict.fromkeys(e["split"] for e in versus))) + "|"]
        for arm, metric in dict.fromkeys((e["arm"], e["metric"]) for e in versus):
            cells = [_fmt_test(e) + (" (replicates)" if e.get("replicates") else "") + (" (confirms)" if e.get("confirms") else "")
                     for split in dict.fromkeys(x["split"] for x in versus)
                     for e in versus if e["arm"] == arm and e["metric"] == metric and e["split"] == split]
            lines.append(f"| {arm} | {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![controls](q4_controls.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(out: Path, *, quick: bool = False, bundle: Any = None, progress: bool | None = None, **options: Any) -> Path:
    """Run (or resume) the study into ``out``; returns ``out/report.md``.

    Args:
        out: output folder (created; finished sections are skipped on a rerun).
        quick: the tiny plan (`Plan.quick`): a smoke test, not the documented numbers.
        bundle: a loaded organism (`eah_interp.models.load_model("organism")`); loaded when None.
        progress: tqdm progress bars (None: only when stderr is a terminal).
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
    ptable = patching_table(patch_rows)
    ptable.to_csv(out / "q3_patching.csv", index=False)
    patch_labels = patching_label_tests(patch_rows)
    _write_json(out / "q3_patching_labels.json", patch_labels)
    _plot_patching(ptable, out)
    attribution = section_attribution(bundle, plan, out, patch_rows)
    dla = section_dla(bundle, plan, out, progress)
    missing = _missing_tools()
    layers = json.loads((out / "q2_layer_tests.json").read_text())
    versus = json.loads((out / "q4_versus_eah.json").read_text())
    return _write_report(out, plan, q1, rows, evidence, tests, patch_rows, missing, attribution, dla, probe, layers,
                        versus, patch_labels, ptable)


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
    "ARM_METRICS",
    "SPLITS",
    "THRESHOLDS",
    "Example",
    "Plan",
    "PATTERNS",
    "SyntheticMap",
    "arms",
    "examples",
    "image_mass",
    "layer_tests",
    "main",
    "paired_tests",
    "patching_label_tests",
    "patching_table",
    "source_head_table",
    "versus_tests",
    "previous_token_map",
    "uniform_map",
]
