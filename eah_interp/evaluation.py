"""The hallucination experiment runner: baseline vs EAH vs controls on any dataset, paired, resumable.

For every condition (a named `EAH`, or None for baseline decoding) and every item of a
`eah_interp.data.Dataset` it records one JSON line per result in ``<out>/items.jsonl``, keyed by
(condition, task, item, question):

* ``task="caption"``: the greedy (or beam) caption of the item's image and, when the item's objects
  are known, its CHAIR mentions (with the CHAIR protocol used);
* ``task="pope"``: for each of the item's yes/no questions, the model's first answer token (greedy
  decoding's first token, from one forward pass) and the logit probe ``log p(yes) - log p(no)``.

The schema is documented in ``docs/data.md``. A rerun skips results already in the file (resumable).
`summarise` turns the results into a tidy table of metrics per condition (POPE per split that exists)
with paired bootstrap 95% CIs, paired permutation p-values against the baseline and Holm-adjusted
p-values across every arm x metric; `write_report` writes ``results.csv``, ``report.md`` and plots.
The runner knows nothing about where items come from.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from eah_interp.data import Dataset, Item, Question
from eah_interp.errors import ConfigError
from eah_interp.experiments import Treatment, generate_texts, treated
from eah_interp.interventions import EAH
from eah_interp.interventions.compile import as_interventions
from eah_interp.metrics.stats import holm, sign_flip_p_value
from eah_interp.models.bundle import ModelBundle
from eah_interp.models.introspect import model_shape

#: Significance level of the report's marks (applied to Holm-adjusted p-values only).
ALPHA = 0.05


@dataclass(frozen=True)
class Condition:
    """One arm of the experiment: a name, what it applies and the beam width.

    ``config`` is None (baseline) or interventions applied by `hf.intervene` (one, e.g. ``EAH.paper()``, or
    a list, e.g. ``(EAH.paper(), PAI())``; kept as a tuple), serialised through their own ``to_dict``.
    """

    name: str
    config: Treatment = None
    num_beams: int = 1

    def __post_init__(self) -> None:
        if self.config is not None:
            object.__setattr__(self, "config", as_interventions(self.config))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_beams": self.num_beams, "interventions": [i.to_dict() for i in self.config or ()]}


#: The two parts of a replication split, in report order.
PARTS = ("discovery", "replication")
#: How a `ReplicationSplit` assigns items: a hash of the item id, or the dataset's order (a seed range for scenes).
SPLIT_METHODS = ("hash", "order")


@dataclass(frozen=True)
class ReplicationSplit:
    """A pre-registered discovery / replication split of a dataset's items, fixed before any result is seen.

    Every item belongs to one part: ``"discovery"`` (find effects) or ``"replication"`` (confirm them).
    `summarise` analyses each part on its own (Holm within each part) and `replication_table` calls a
    result *replicated* only when it is significant after Holm in discovery and significant after Holm,
    with the same sign, in replication. The split is recorded in ``run.json`` and in every result
    (field ``part``), so a resumed run cannot change it.

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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicationSplit:
        return cls(**d)


def deep_control_layer(n_layers: int, treatment_layers: Iterable[int], shallow_layers: Iterable[int] = (1,)) -> int:
    """The layer of the deep-layer control: the third-last layer, or the nearest layer that no treatment uses.

    Candidates are the layers deeper than every ``shallow_layers`` entry (the paper's edited layer) that
    no treatment edits; the one closest to ``n_layers - 3`` wins (ties: the deeper). On LLaVA-1.5 (32
    layers, treatments at 1 and 15) that is layer 29; on a 4-layer model (treatments at 1 and 3), layer 2.

    Raises:
        ConfigError: no such layer exists (a model too shallow for a separate deep-layer control).
    """
    used = set(treatment_layers)
    floor = max(shallow_layers, default=-1)
    candidates = [layer for layer in range(n_layers) if layer > floor and layer not in used]
    if not candidates:
        raise ConfigError(
            f"no layer for the deep-layer control: the model has {n_layers} decoder layers and the treatments "
            f"edit {sorted(used)}; a control must edit a layer deeper than {floor} that no treatment edits. "
            "Leave the control out (choose arms with --condition)."
        )
    target = n_layers - 3
    return min(candidates, key=lambda layer: (abs(layer - target), -layer))


def default_conditions(bundle: ModelBundle, *, beams: int = 3) -> list[Condition]:
    """Baseline, EAH (paper and reference presets) and the controls that separate the hypotheses.

    Controls: the broadcast from a random head, from the head with the fewest sinks, at a deep layer
    (`deep_control_layer`: never a layer a treatment edits; left out, with a warning, on a model too
    shallow to have one) instead of layer 1, and a sink-free variant (the source map with its sink
    columns removed). Beam search (``beams``) for baseline and EAH-paper.
    """
    n_layers = model_shape(bundle.model)[0]
    t = bundle.threshold
    paper = EAH.paper(threshold=t)
    reference = EAH.reference(threshold=t, layers=(min(15, n_layers - 1),))
    conditions = [
        Condition("baseline"),
        Condition("eah_paper", paper),
        Condition("eah_reference", reference),
        Condition("control_random_head", EAH.paper(threshold=t, source="random", seed=0)),
        Condition("control_fewest_sinks", EAH.paper(threshold=t, source="fewest")),
    ]
    try:
        deep = deep_control_layer(n_layers, paper.layers + reference.layers, paper.layers)
        conditions.append(Condition("control_deep_layer", EAH.paper(threshold=t, layers=(deep,))))
    except ConfigError as err:
        warnings.warn(f"control_deep_layer left out: {err}", stacklevel=2)
    conditions.append(Condition("control_sink_free", EAH.paper(threshold=t, drop_sinks=True)))
    if beams > 1:
        conditions += [Condition(f"baseline_beam{beams}", None, beams), Condition(f"eah_paper_beam{beams}", paper, beams)]
    return conditions


class _Store:
    """Append-only JSONL of finished results, keyed by (condition, task, item, question)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[tuple[str, str, str, str]] = set()
        lines = path.read_text().splitlines() if path.exists() else []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self.done.add(self.key(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                if number == len(lines):  # the last line, cut short by an interruption: redo that result
                    path.write_text("".join(kept + "\n" for kept in lines[:-1]))
                    break
                raise ConfigError(
                    f"{path}, line {number}: not an eah-interp result (fields condition, task, item, question); "
                    "results written before the dataset runner (keyed by scene seed) cannot be resumed: "
                    "use another --out."
                ) from None

    @staticmethod
    def key(record: dict[str, Any]) -> tuple[str, str, str, str]:
        return (record["condition"], record["task"], record["item"], record["question"])

    def add(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
                self.done.add(self.key(record))


def first_token_answers(
    bundle: ModelBundle, prompts: Sequence[str], images: Sequence[Any], config: Treatment
) -> tuple[list[str], list[float]]:
    """Greedy first answer token (decoded) and ``log p(yes) - log p(no)`` at the last prompt position."""
    from eah_interp.metrics import yes_no_logit_diff

    inputs = bundle.encode(prompts, images)
    with torch.no_grad(), treated(bundle.model, config):
        logits = bundle.model(**inputs, use_cache=False).logits[:, -1]
    answers = bundle.processor.batch_decode(logits.argmax(-1)[:, None].cpu(), skip_special_tokens=True)
    diffs = yes_no_logit_diff(logits.float(), bundle.yes_ids, bundle.no_ids)
    return [a.strip() for a in answers], diffs.tolist()


def _chair(captions: list[str], truths: list[frozenset[str]], vocabulary: str, protocol: str) -> dict[str, Any]:
    from eah_interp.metrics import chair_scores

    return chair_scores(captions, truths, vocabulary=vocabulary, protocol=protocol)


def _settings(bundle: ModelBundle, dataset: Dataset, prompt: str, max_new_tokens: int, chair_protocol: str,
              replication: ReplicationSplit | None = None) -> dict:
    """What every result of a run depends on besides the condition: a resumed run must agree on it."""
    settings = {"model": bundle.name, "dataset": dataset.name, "prompt": prompt,
                "yes_no_prompt": bundle.yes_no_prompt("<question>"), "max_new_tokens": max_new_tokens,
                "chair_protocol": chair_protocol, "vocabulary": dataset.vocabulary}
    if replication is not None:  # absent (not None) without a split: runs from before the split resume as they were
        settings["replication"] = replication.to_dict()
        if replication.by == "order":  # the parts depend on the whole dataset: another size is another split
            settings["replication"]["n_items"] = len(dataset)
    return settings


def run_experiment(
    bundle: ModelBundle,
    dataset: Dataset,
    out: Path,
    *,
    conditions: Sequence[Condition] | None = None,
    tasks: Sequence[str] = ("caption", "pope"),
    prompt: str | None = None,
    max_new_tokens: int = 30,
    chair_protocol: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    items_file: str = "items.jsonl",
    replication: ReplicationSplit | None = None,
) -> Path:
    """Run (or resume) the experiment on ``dataset``; returns the results file ``out/items.jsonl``.

    Args:
        bundle: the model (`eah_interp.models.load_model`).
        dataset: the items (`eah_interp.data`): captions for every item, POPE for every question.
        out: the output folder; ``run.json`` records the settings, the dataset and the arms.
        conditions: the arms (default: `default_conditions`).
        tasks: ``"caption"`` and/or ``"pope"``.
        prompt: the caption request (``bundle.prompt(prompt)``); default: the model's caption prompt.
        max_new_tokens: caption length budget.
        chair_protocol: ``"reference"``, ``"strict"`` or ``"both"`` (default: the dataset's), recorded in every
            caption.
        items_file: the results file's name in ``out`` (a shard of a data-parallel run writes its own,
            `eah_interp.distributed.items_path`; ``run.json`` is shared and written atomically).
        replication: a pre-registered `ReplicationSplit`: every result records its item's ``part``
            (``"discovery"`` or ``"replication"``), ``run.json`` the split and the part sizes. With
            ``by="order"`` the split is taken over ``dataset`` as given (pass the whole dataset, not a shard).

    Raises:
        ConfigError: ``out`` holds results of a run with other settings (model, dataset, prompt,
            max_new_tokens, CHAIR protocol), or an unknown task.
    """
    unknown = set(tasks) - {"caption", "pope"}
    if unknown:
        raise ConfigError(f"unknown task(s) {sorted(unknown)}; choose 'caption' and/or 'pope'.")
    out.mkdir(parents=True, exist_ok=True)
    conditions = list(conditions or default_conditions(bundle))
    protocol = chair_protocol or dataset.chair_protocol
    if protocol not in CHAIR_PROTOCOLS:
        raise ConfigError(f"chair_protocol must be 'reference', 'strict' or 'both'; got {protocol!r}.")
    if protocol == "both" and dataset.vocabulary != "coco":
        raise ConfigError(
            f"chair_protocol='both' needs the COCO vocabulary (the reference protocol is COCO's); dataset "
            f"{dataset.name!r} uses {dataset.vocabulary!r}: pass 'strict'."
        )
    if prompt is None:
        caption_prompt = bundle.caption_prompt
    elif callable(getattr(bundle, "prompt", None)):
        caption_prompt = bundle.prompt(prompt)  # type: ignore[attr-defined]
    else:
        raise ConfigError(f"model {bundle.name!r} cannot wrap a custom prompt (its bundle has no .prompt); drop --prompt.")
    settings = _settings(bundle, dataset, caption_prompt, max_new_tokens, protocol, replication)
    parts = None if replication is None else replication.assign([item.id for item in dataset])
    run_file = out / "run.json"
    arms = {c.name: c.to_dict() for c in conditions}
    if run_file.exists() and (out / items_file).exists():
        saved_run = json.loads(run_file.read_text())
        saved = saved_run.get("settings", {})
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            raise ConfigError(
                f"{out} holds results of a run with other settings ("
                + "; ".join(f"{k}: then {a!r}, now {b!r}" for k, (a, b) in diff.items())
                + "). Use another --out, or delete its items.jsonl."
            )
        before = {c["name"]: c for c in saved_run.get("conditions", [])}
        changed = [name for name, arm in arms.items() if name in before and before[name] != arm]
        if changed:
            raise ConfigError(
                f"{out} holds results of condition(s) {changed} with another configuration; results are keyed by "
                "condition name: give the new configuration another name, or use another --out."
            )
        arms = {**before, **arms}
    # the ranks of a data-parallel run write this file at once: each through its own temporary file
    tmp = run_file.with_name(f"{run_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({
        "settings": settings, "dataset": {"description": dataset.describe(), "source": dataset.source},
        "conditions": list(arms.values()),
        "tasks": list(tasks),
        **({} if parts is None else {"replication": {
            "description": replication.describe(),  # type: ignore[union-attr]
            "n": {part: sum(v == part for v in parts.values()) for part in PARTS},
        }}),
    }, indent=1, default=str))
    os.replace(tmp, run_file)
    store = _Store(out / items_file)
    for cond in tqdm(conditions, desc="conditions", disable=not progress):
        if "caption" in tasks:
            _run_captions(bundle, dataset, cond, store, caption_prompt, max_new_tokens, protocol, batch_size, progress,
                          parts)
        if "pope" in tasks and cond.num_beams == 1:
            _run_questions(bundle, dataset, cond, store, batch_size, progress, parts)
    return store.path


def _run_captions(bundle, dataset: Dataset, cond: Condition, store: _Store, prompt: str, max_new_tokens: int,
                  protocol: str, batch_size: int, progress: bool, parts: dict[str, str] | None = None) -> None:
    todo = [item for item in dataset if (cond.name, "caption", item.id, "") not in store.done]
    for i in tqdm(range(0, len(todo), batch_size), desc=f"{cond.name}: captions", leave=False, disable=not progress):
        chunk = todo[i : i + batch_size]
        texts, heads = generate_texts(
            bundle, [prompt] * len(chunk), [item.load_image() for item in chunk], config=cond.config,
            max_new_tokens=max_new_tokens, num_beams=cond.num_beams, batch_size=batch_size, progress=False,
        )
        known = [j for j, item in enumerate(chunk) if item.objects is not None and dataset.vocabulary]
        # "both": the reference protocol's findings in the main fields, the strict one's beside them
        main, extra = ("reference", "strict") if protocol == "both" else (protocol, None)
        scores: dict[int, Any] = {}
        strict_scores: dict[int, Any] = {}
        if known:
            captions, truths = [texts[j] for j in known], [chunk[j].objects for j in known]
            scores = dict(zip(known, _chair(captions, truths, dataset.vocabulary, main)["per_caption"], strict=True))
            if extra is not None:
                per = _chair(captions, truths, dataset.vocabulary, extra)["per_caption"]
                strict_scores = dict(zip(known, per, strict=True))
        records = []
        for j, (item, text, h) in enumerate(zip(chunk, texts, heads, strict=True)):
            pc = scores.get(j)
            record = {
                "condition": cond.name, "task": "caption", "item": item.id, "question": "", "caption": text,
                "truth": None if item.objects is None else sorted(item.objects),
                "mentioned": None if pc is None else sorted(pc["mentioned"]),
                "hallucinated": None if pc is None else sorted(pc["hallucinated"]),
                "chair_protocol": None if pc is None else main, "n_words": len(text.split()),
                "source_heads": h, "max_new_tokens": max_new_tokens, "num_beams": cond.num_beams,
            }
            if j in strict_scores:
                record["mentioned_strict"] = sorted(strict_scores[j]["mentioned"])
                record["hallucinated_strict"] = sorted(strict_scores[j]["hallucinated"])
            if parts is not None:
                record["part"] = parts[item.id]
            records.append(record)
        store.add(records)


def _run_questions(bundle, dataset: Dataset, cond: Condition, store: _Store, batch_size: int, progress: bool,
                   parts: dict[str, str] | None = None) -> None:
    """Ask every unanswered question; a question text asked twice about one item (in two splits) runs once."""
    from eah_interp.metrics import parse_yes_no

    todo: dict[tuple[str, str], list[tuple[Item, Question]]] = {}
    for item in dataset:
        for q in item.questions:
            if (cond.name, "pope", item.id, q.id) not in store.done:
                todo.setdefault((item.id, q.text), []).append((item, q))
    prompts = list(todo)
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"{cond.name}: yes/no", leave=False, disable=not progress):
        chunk = prompts[i : i + batch_size]
        firsts = [todo[key][0][0] for key in chunk]
        answers, diffs = first_token_answers(
            bundle, [bundle.yes_no_prompt(text) for _, text in chunk], [item.load_image() for item in firsts], cond.config
        )
        store.add([
            {
                "condition": cond.name, "task": "pope", "item": item.id, "question": q.id, "split": q.split,
                "object": q.object, "text": q.text, "label": q.label, "answer": a, "said_yes": parse_yes_no(a),
                "logit_diff": d, **({} if parts is None else {"part": parts[item.id]}),
            }
            for key, a, d in zip(chunk, answers, diffs, strict=True)
            for item, q in todo[key]
        ])


# ---------------------------------------------------------------------------- analysis
def load_items(path: Path):
    import pandas as pd

    return pd.DataFrame([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()])


@dataclass(frozen=True)
class Metric:
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
    Metric("chair_s", "caption", "any_hallucination", "chair_n", "no ground-truth objects"),
    Metric("chair_i", "caption", "n_hallucinated", "n_mentioned", "no mentions"),
    Metric("recall", "caption", "n_recalled", "n_truth", "no ground-truth objects"),
    Metric("length", "caption", "n_words", "one", "no captions"),
)

#: The same CHAIR metrics under the strict protocol, reported next to the reference ones for ``"both"``.
STRICT_CAPTION_METRICS = (
    Metric("chair_s_strict", "caption", "any_hallucination_strict", "chair_n", "no ground-truth objects"),
    Metric("chair_i_strict", "caption", "n_hallucinated_strict", "n_mentioned_strict", "no mentions"),
    Metric("recall_strict", "caption", "n_recalled_strict", "n_truth", "no ground-truth objects"),
)

#: Values of ``chair_protocol`` the runner takes: one protocol, or both (reference in the main metrics).
CHAIR_PROTOCOLS = ("reference", "strict", "both")


def pope_metrics(split: str) -> tuple[Metric, ...]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio of one split ("yes" is the positive class)."""
    return (
        Metric(f"pope_acc_{split}", "pope", f"correct_{split}", f"n_{split}", "no questions", split),
        Metric(f"pope_precision_{split}", "pope", f"tp_{split}", f"yes_{split}", "no yes answers", split),
        Metric(f"pope_recall_{split}", "pope", f"tp_{split}", f"pos_{split}", "no present-object questions", split),
        Metric(f"pope_f1_{split}", "pope", f"f1num_{split}", f"f1den_{split}", "no yes answers and no present objects",
               split),
        Metric(f"pope_yes_ratio_{split}", "pope", f"yes_{split}", f"n_{split}", "no questions", split),
    )


#: The logit probe over each item's distinct questions (a question in two splits counts once).
PROBE_METRICS = (
    Metric("probe_present", "pope", "probe_present_sum", "n_present", "no present-object questions"),
    Metric("probe_absent", "pope", "probe_absent_sum", "n_absent", "no absent-object questions"),
)


def _splits(items) -> list[str]:
    if "split" not in items or items.empty:
        return []
    pope = items[items["task"] == "pope"]
    return list(dict.fromkeys(pope["split"].dropna()))


def metrics_for(items) -> list[Metric]:
    """The metrics the results support: captions, then POPE per split present (first-seen order), then probes."""
    tasks = set(items["task"]) if "task" in items else set()
    metrics: list[Metric] = list(CAPTION_METRICS) if "caption" in tasks else []
    if "caption" in tasks and "mentioned_strict" in items and items["mentioned_strict"].notna().any():
        metrics += STRICT_CAPTION_METRICS
    if "pope" in tasks:
        for split in _splits(items):
            metrics += pope_metrics(split)
        metrics += PROBE_METRICS
    return metrics


def _said_yes(value: Any) -> bool:
    return value is True or value == 1  # unparsed (None/NaN) counts as "no"


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
                # counted mentions as the CHAIR protocol lists them (once per object, or every mention)
                mentioned, halluc, truth = rec["mentioned"], rec["hallucinated"], set(rec["truth"])
                row.update(
                    chair_n=1.0, any_hallucination=float(len(halluc) > 0), n_hallucinated=float(len(halluc)),
                    n_mentioned=float(len(mentioned)), n_recalled=float(len(set(mentioned) & truth)),
                    n_truth=float(len(truth)),
                )
                if isinstance(rec.get("mentioned_strict"), list):
                    mentioned, halluc = rec["mentioned_strict"], rec["hallucinated_strict"]
                    row.update(
                        any_hallucination_strict=float(len(halluc) > 0), n_hallucinated_strict=float(len(halluc)),
                        n_mentioned_strict=float(len(mentioned)), n_recalled_strict=float(len(set(mentioned) & truth)),
                    )
            continue
        said, label, split = _said_yes(rec["said_yes"]), bool(rec["label"]), rec["split"]
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


def summarise(items, *, baseline: str = "baseline", n_resamples: int = 5000, seed: int = 0, alpha: float = ALPHA):
    """Metrics per condition (and replication part) with paired bootstrap 95% CIs and Holm's correction.

    Without a replication split (results without a ``part`` field) the whole table is one family: see
    `summarise_part`, every row has ``part == "all"``. With one (`ReplicationSplit`), each part is
    summarised on its own items and Holm adjusts within each part (the discovery family, the replication
    family); `replication_table` then decides what replicated.

    Returns:
        A tidy DataFrame: part, condition, task, split, metric, value, baseline, diff, ci_low, ci_high,
        p_value, p_holm, significant, n, note.
    """
    import pandas as pd

    parts = parts_of(items)
    if not parts:
        frame = summarise_part(items, baseline=baseline, n_resamples=n_resamples, seed=seed, alpha=alpha)
        return frame.assign(part="all")[["part", *frame.columns]]
    frames = []
    for part in parts:
        frame = summarise_part(items[items["part"] == part], baseline=baseline, n_resamples=n_resamples, seed=seed,
                               alpha=alpha)
        frames.append(frame.assign(part=part)[["part", *frame.columns]])
    return pd.concat(frames, ignore_index=True)


def replication_table(summary, *, alpha: float = ALPHA):
    """Per arm x metric: the discovery and replication effects and whether the effect replicated.

    ``verdict`` is ``"replicated"`` when the difference is significant after Holm (``p_holm < alpha``,
    within its part) in discovery and in replication with the same sign; ``"not replicated"`` when
    significant in discovery only (or with the opposite sign in replication); ``"replication only"``
    when significant in replication but not in discovery (not a finding: it was not predicted);
    ``"null"`` when significant in neither. Unadjusted p-values never count.

    Args:
        summary: `summarise`'s frame of results with a replication split (parts ``discovery`` and
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
    rows = []
    for key in disc.index.union(rep.index, sort=False):
        d = disc.loc[key] if key in disc.index else None
        r = rep.loc[key] if key in rep.index else None
        sig_d = d is not None and bool(d["p_holm"] < alpha)
        sig_r = r is not None and bool(r["p_holm"] < alpha)
        same = d is not None and r is not None and np.sign(d["diff"]) == np.sign(r["diff"]) and d["diff"] != 0
        if sig_d and sig_r and same:
            verdict = "replicated"
        elif sig_d:
            verdict = "not replicated"
        elif sig_r:
            verdict = "replication only"
        else:
            verdict = "null"
        nan = float("nan")
        rows.append(dict(zip(keys, key, strict=True)) | {
            "diff_discovery": nan if d is None else d["diff"], "p_holm_discovery": nan if d is None else d["p_holm"],
            "diff_replication": nan if r is None else r["diff"],
            "ci_low_replication": nan if r is None else r["ci_low"],
            "ci_high_replication": nan if r is None else r["ci_high"],
            "p_holm_replication": nan if r is None else r["p_holm"], "verdict": verdict,
        })
    columns = [*keys, "diff_discovery", "p_holm_discovery", "diff_replication", "ci_low_replication",
               "ci_high_replication", "p_holm_replication", "verdict"]
    return pd.DataFrame(rows, columns=columns)


def summarise_part(items, *, baseline: str = "baseline", n_resamples: int = 5000, seed: int = 0, alpha: float = ALPHA):
    """Metrics per condition with paired bootstrap 95% CIs of the difference to ``baseline`` and Holm's correction.

    Items are the resampling unit: each bootstrap draw resamples items with replacement and recomputes
    every metric (a ratio of sums over items) on the same items for the condition and the baseline,
    restricted to items where both have a non-zero denominator. The p-value is a paired sign-flip
    permutation test on per-item differences; ``p_holm`` adjusts all p-values of the table (every
    non-baseline arm x metric) with Holm's step-down method, and ``significant`` is ``p_holm < alpha``,
    never the raw p.

    POPE metrics exist only for the splits the results contain. A metric whose denominator sums to 0
    for a condition (CHAIR_i when nothing is mentioned) is kept as a row with ``value`` NaN and
    ``note`` = ``"undefined (<why>)"``.

    Returns:
        A tidy DataFrame: condition, task, split, metric, value, baseline, diff, ci_low, ci_high, p_value,
        p_holm, significant, n, note.
    """
    import pandas as pd

    table = item_table(items)
    rng = np.random.default_rng(seed)
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
                counts = rng.multinomial(len(paired), np.full(len(paired), 1 / len(paired)), size=n_resamples)
                with np.errstate(invalid="ignore", divide="ignore"):
                    diffs = (counts @ a_num) / (counts @ a_den) - (counts @ b_num) / (counts @ b_den)
                    per_item = a_num / a_den - b_num / b_den
                row["ci_low"], row["ci_high"] = (float(x) for x in np.nanpercentile(diffs, [2.5, 97.5]))
                row["p_value"] = sign_flip_p_value(per_item, n_resamples=n_resamples, seed=seed)
    frame = pd.DataFrame(rows)
    for col in ("ci_low", "ci_high", "p_value"):
        if col not in frame:
            frame[col] = np.nan
    frame["p_holm"] = holm(frame["p_value"].tolist()) if len(frame) else []
    frame["significant"] = frame["p_holm"] < alpha
    order = {m.name: i for i, m in enumerate(metrics)}
    conds = list(dict.fromkeys(items["condition"])) if len(items) else []
    frame["_m"], frame["_c"] = frame["metric"].map(order), frame["condition"].map({c: i for i, c in enumerate(conds)})
    frame = frame.sort_values(["_c", "_m"], kind="stable").drop(columns=["_m", "_c"]).reset_index(drop=True)
    return frame[["condition", "task", "split", "metric", "value", "baseline", "diff", "ci_low", "ci_high",
                  "p_value", "p_holm", "significant", "n", "note"]]


def source_head_table(items) -> str:
    """Markdown table: for each EAH condition, how often each head was the (first-layer) source."""
    if "source_heads" not in items:
        return "(no captions)"
    caps = items[(items["task"] == "caption") & items["source_heads"].map(lambda h: isinstance(h, list) and len(h) > 0)]
    if caps.empty:
        return "(no EAH condition)"
    counts = caps.assign(head=caps["source_heads"].map(lambda h: h[0])).groupby(["condition", "head"]).size()
    table = counts.unstack(fill_value=0)
    table.columns = [f"head {h}" if h >= 0 else "none" for h in table.columns]
    return table.to_markdown()


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


def _markdown_table(sub, metrics: list[str], baseline: str) -> list[str]:
    lines = ["| condition | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for cond, g in sub.groupby("condition", sort=False):
        cells = []
        for m in metrics:
            r = g[g["metric"] == m]
            cells.append("" if r.empty else _cell(r.iloc[0], baseline))
        lines.append(f"| {cond} | " + " | ".join(cells) + " |")
    return lines + [""]


def _part_tables(summary, baseline: str, level: str = "##", label: str = "") -> list[str]:
    """The report's tables of one family (all results, or one replication part)."""
    lines: list[str] = []
    caption = summary[summary["task"] == "caption"]
    if not caption.empty:
        lines += [f"{level} {label}Captions (CHAIR)", ""]
        lines += _markdown_table(caption, list(dict.fromkeys(caption["metric"])), baseline)
    pope = summary[(summary["task"] == "pope") & summary["split"].notna()]
    for split in dict.fromkeys(pope["split"]):
        sub = pope[pope["split"] == split]
        lines += [f"{level} {label}Yes/no questions (POPE), split `{split}`", ""]
        lines += _markdown_table(sub, list(dict.fromkeys(sub["metric"])), baseline)
    probes = summary[(summary["task"] == "pope") & summary["split"].isna()]
    if not probes.empty:
        lines += [f"{level} {label}Logit probe log p(yes) - log p(no) (each distinct question once)", ""]
        lines += _markdown_table(probes, list(dict.fromkeys(probes["metric"])), baseline)
    return lines


def replication_markdown(table) -> list[str]:
    """`replication_table` as Markdown lines (tested arm x metrics; replicated ones first)."""
    if table.empty:
        return ["(nothing was tested)", ""]
    order = {"replicated": 0, "not replicated": 1, "replication only": 2, "null": 3}
    table = table.assign(_o=table["verdict"].map(order)).sort_values("_o", kind="stable")
    lines = ["| condition | metric | discovery diff (Holm p) | replication diff [95% CI] (Holm p) | verdict |",
             "|---|---|---|---|---|"]
    for r in table.itertuples():
        disc = f"{r.diff_discovery:+.3f} ({r.p_holm_discovery:.3f})" if r.diff_discovery == r.diff_discovery else ""
        rep = (f"{r.diff_replication:+.3f} [{r.ci_low_replication:+.3f}, {r.ci_high_replication:+.3f}] "
               f"({r.p_holm_replication:.3f})") if r.diff_replication == r.diff_replication else ""
        verdict = f"**{r.verdict}**" if r.verdict == "replicated" else r.verdict
        lines.append(f"| {r.condition} | {r.metric} | {disc} | {rep} | {verdict} |")
    return lines + [""]


def _effects_plot(summary, out: Path, baseline: str) -> None:
    """``effects.png``: differences to the baseline with 95% CIs for a few key metrics (one colour per part)."""
    import matplotlib.pyplot as plt

    pope = summary[(summary["task"] == "pope") & summary["split"].notna()]
    first_split = next(iter(dict.fromkeys(pope["split"])), None)
    wanted = ["chair_i", "recall", f"pope_acc_{first_split}", "probe_absent"]
    plot = summary[(summary["condition"] != baseline) & summary["metric"].isin(wanted) & summary["ci_low"].notna()]
    if plot.empty:
        return
    metrics = list(dict.fromkeys(plot["metric"]))
    conds = list(dict.fromkeys(plot["condition"]))
    parts = list(dict.fromkeys(plot["part"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.8 + 0.4 * len(conds)), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for k, part in enumerate(parts):
            g = plot[(plot["metric"] == m) & (plot["part"] == part)]
            y = np.array([conds.index(c) for c in g["condition"]]) + (k - (len(parts) - 1) / 2) * 0.25
            ax.errorbar(g["diff"], y, xerr=[g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]], fmt="o",
                        label=part if part != "all" else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(np.arange(len(conds)), conds if ax is axes[0][0] else [""] * len(conds))
        ax.invert_yaxis()
        ax.set_title(f"{m}: diff vs baseline")
    if len(parts) > 1:
        axes[0][-1].legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "effects.png", dpi=120)
    plt.close(fig)


def write_report(
    items_path: Path, out: Path, *, title: str = "EAH vs baseline vs controls", n_resamples: int = 5000,
    baseline: str = "baseline",
):
    """Write ``results.csv`` (tidy, `summarise`), ``report.md`` (tables with CIs) and ``effects.png`` into ``out``.

    The report states the dataset, prompt, generation budget and CHAIR protocol (from ``run.json`` when
    present), gives POPE per split that exists, names every undefined metric and why, and marks as
    significant (``*``) only what survives Holm's correction across all arms x metrics of its family.
    With a replication split (`ReplicationSplit`) it gives the tables of each part (Holm within each)
    and the replication verdicts (`replication_table`, also written as ``replication.csv``).
    """
    items = load_items(items_path)
    summary = summarise(items, n_resamples=n_resamples, baseline=baseline)
    summary.to_csv(out / "results.csv", index=False)
    n_items = items["item"].nunique() if len(items) else 0
    lines = [f"# {title}", "", f"Results: `{items_path}`; {n_items} items.", ""]
    run_file = Path(items_path).parent / "run.json"
    run: dict[str, Any] = json.loads(run_file.read_text()) if run_file.exists() else {}
    if run:
        settings = run.get("settings", {})
        lines += [
            f"* Dataset: {run.get('dataset', {}).get('description', '?')}",
            f"* Model: `{settings.get('model')}`; captions: max_new_tokens={settings.get('max_new_tokens')}, prompt:",
            "", "  ```text", *("  " + line for line in str(settings.get("prompt", "")).splitlines()), "  ```", "",
            f"* CHAIR protocol: `{settings.get('chair_protocol')}`, vocabulary `{settings.get('vocabulary')}`.",
            "",
        ]
    parts = [p for p in dict.fromkeys(summary["part"]) if p != "all"]
    if not parts:
        n_tests = int(summary["p_value"].notna().sum())
        lines += [
            "Differences are condition minus baseline on the same items; 95% CIs from a paired bootstrap over",
            "items; p from a paired sign-flip permutation test on per-item differences; Holm p adjusts all",
            f"{n_tests} p-values of this report (every arm x metric) for multiple comparisons. `*` marks Holm p < {ALPHA}",
            "(the raw p alone never marks a result).", "",
        ]
        lines += _part_tables(summary, baseline)
    else:
        n_part = {p: int(items.loc[items["part"] == p, "item"].nunique()) for p in parts}
        how = run.get("replication", {}).get("description", "a pre-registered replication split")
        lines += [
            f"Items are split into parts before any result is seen ({how}): "
            + ", ".join(f"{p}: {n_part[p]} items" for p in parts) + ".",
            "Differences are condition minus baseline on the same items; 95% CIs from a paired bootstrap over",
            "items; p from a paired sign-flip permutation test on per-item differences; Holm p adjusts the",
            "p-values of one part (every arm x metric of that part: "
            + ", ".join(f"{p}: {int(summary.loc[summary['part'] == p, 'p_value'].notna().sum())}" for p in parts)
            + f" tests). `*` marks Holm p < {ALPHA} (the raw p alone never marks a result).", "",
        ]
        if set(PARTS) <= set(parts):
            table = replication_table(summary)
            table.to_csv(out / "replication.csv", index=False)
            counts = table["verdict"].value_counts()
            lines += ["## Replication", "",
                      f"A result is **replicated** when it is significant after Holm in discovery and significant "
                      f"after Holm, with the same sign, in replication: {int(counts.get('replicated', 0))} of "
                      f"{int(counts.get('replicated', 0) + counts.get('not replicated', 0))} discoveries replicated "
                      f"({len(table)} arm x metric tests per part).", ""]
            lines += replication_markdown(table)
        for part in parts:
            lines += [f"## {part.capitalize()} part ({n_part[part]} items)", ""]
            lines += _part_tables(summary[summary["part"] == part], baseline, "###")
    undefined = summary[summary["value"].isna()]
    if not undefined.empty:
        lines += ["## Undefined metrics", ""]
        where = lambda r: "" if r.part == "all" else f" ({r.part})"  # noqa: E731
        lines += [f"* `{r.metric}` for `{r.condition}`{where(r)}: {r.note}" for r in undefined.itertuples()] + [""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _effects_plot(summary, out, baseline)
    return summary
