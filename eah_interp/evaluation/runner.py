"""The runner: every arm on every item of a dataset, one resumable JSON line per result.

For every arm (`Arm`) and item of a `eah_interp.data.Dataset` it appends one line to ``<out>/items.jsonl``
(an `eah_interp.resumable.ResumableLog` whose header is ``<out>/run.json``), keyed by (condition, task,
item, question):

* ``task="caption"``: the greedy (or beam) caption of the item's image and, when the item's objects
  are known, its CHAIR mentions (with the CHAIR protocol used);
* ``task="pope"``: for each of the item's yes/no questions, the model's first answer token (greedy
  decoding's first token, from one forward pass) and the logit probe ``log p(yes) - log p(no)``.

The schema is documented in ``docs/data.md``. A rerun skips results already in the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from eah_interp import hf
from eah_interp.data import Dataset, Item, Question
from eah_interp.distributed import item_key
from eah_interp.errors import ConfigError
from eah_interp.evaluation.arms import Arm, default_arms
from eah_interp.evaluation.statistics import PARTS, ReplicationSplit
from eah_interp.experiments import batches, check_fits, generate_texts, progress_bar
from eah_interp.models.introspect import model_shape
from eah_interp.resumable import ResumableLog

#: The kind of the results log (``run.json``'s ``"kind"``).
KIND = "evaluation"
#: Values of ``chair_protocol`` the runner takes: one protocol, or both (reference in the main metrics).
CHAIR_PROTOCOLS = ("reference", "strict", "both")


def first_token_answers(
    bundle: Any, prompts: Sequence[str], images: Sequence[Any], interventions: Sequence[Any] = ()
) -> tuple[list[str], list[float]]:
    """Greedy first answer token (decoded) and ``log p(yes) - log p(no)`` at the last prompt position."""
    from eah_interp.metrics import yes_no_logit_diff

    inputs = bundle.encode(prompts, images)
    with torch.no_grad(), hf.intervene(bundle.model, interventions):
        logits = bundle.model(**inputs, use_cache=False).logits[:, -1]
    answers = bundle.processor.batch_decode(logits.argmax(-1)[:, None].cpu(), skip_special_tokens=True)
    diffs = yes_no_logit_diff(logits.float(), bundle.yes_ids, bundle.no_ids)
    return [a.strip() for a in answers], diffs.tolist()


def run_experiment(
    bundle: Any,
    dataset: Dataset,
    out: Path,
    *,
    arms: Sequence[Arm] | None = None,
    tasks: Sequence[str] = ("caption", "pope"),
    max_new_tokens: int = 30,
    chair_protocol: str | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    items_file: str = "items.jsonl",
    replication: ReplicationSplit | None = None,
) -> Path:
    """Run (or resume) the experiment on ``dataset``; returns the results file ``out/items.jsonl``.

    Args:
        bundle: the model (`eah_interp.models.load_model`); captions use its ``caption_prompt``.
        dataset: the items (`eah_interp.data`): captions for every item, POPE for every question.
        out: the output folder; ``run.json`` records the settings, the dataset and the arms (with the
            layers each intervention edits in this model).
        arms: the arms (default: `default_arms`); results are keyed by arm name.
        tasks: ``"caption"`` and/or ``"pope"``.
        max_new_tokens: caption length budget.
        chair_protocol: ``"reference"``, ``"strict"`` or ``"both"`` (default: the dataset's), recorded in every
            caption.
        progress: progress bars: on, off, or None (on only when stderr is a terminal).
        items_file: the results file's name in ``out`` (a shard of a data-parallel run writes its own,
            `eah_interp.distributed.items_path`; ``run.json`` is shared and written atomically).
        replication: a pre-registered `ReplicationSplit`: every result records its item's ``part``
            (``"discovery"`` or ``"replication"``), ``run.json`` the split and the part sizes. With
            ``by="order"`` the split is taken over ``dataset`` as given (pass the whole dataset, not a shard).

    Raises:
        LayerIndexError: an arm edits a layer the model lacks (checked before anything runs).
        ConfigError: an empty dataset or an unknown task; ``out`` holds results of a run with other settings
            (model, dataset, prompt, max_new_tokens, CHAIR protocol), or of an arm of the same name that
            applied something else.
    """
    unknown = set(tasks) - {"caption", "pope"}
    if unknown:
        raise ConfigError(f"unknown task(s) {sorted(unknown)}; choose 'caption' and/or 'pope'.")
    if not len(dataset):
        raise ConfigError(f"dataset {dataset.name!r} has no items: nothing to evaluate.")
    arms = list(arms or default_arms(bundle))
    protocol = chair_protocol or dataset.chair_protocol
    if protocol not in CHAIR_PROTOCOLS:
        raise ConfigError(f"chair_protocol must be 'reference', 'strict' or 'both'; got {protocol!r}.")
    if protocol == "both" and dataset.vocabulary != "coco":
        raise ConfigError(
            f"chair_protocol='both' needs the COCO vocabulary (the reference protocol is COCO's); dataset "
            f"{dataset.name!r} uses {dataset.vocabulary!r}: pass 'strict'."
        )
    caption_prompt = bundle.caption_prompt
    settings = {"model": bundle.name, "dataset": dataset.name, "prompt": caption_prompt,
                "yes_no_prompt": bundle.yes_no_prompt("<question>"), "max_new_tokens": max_new_tokens,
                "chair_protocol": protocol, "vocabulary": dataset.vocabulary}
    if replication is not None:  # absent (not None) without a split: runs from before the split resume as they were
        settings["replication"] = replication.to_dict()
        if replication.by == "order":  # the parts depend on the whole dataset: another size is another split
            settings["replication"]["n_items"] = len(dataset)
    parts = None if replication is None else replication.assign([item.id for item in dataset])
    for arm in arms:  # an arm that does not fit the model (a layer it lacks) is refused before anything runs
        check_fits(bundle.model, arm.interventions)
    log = ResumableLog(Path(out) / items_file, KIND, settings, header=Path(out) / "run.json")
    header, records = log.open()
    before = {a["name"]: a for a in (header or {}).get("conditions", [])}
    changed = [a.name for a in arms if a.name in before and Arm.from_dict(before[a.name]) != a]
    if changed:
        raise ConfigError(
            f"{out} holds results of arm(s) {changed} that applied something else; results are keyed by arm "
            "name: give the new arm another name, or use another --out."
        )
    n_layers = model_shape(bundle.model)[0]
    log.start(
        dataset={"description": dataset.describe(), "source": dataset.source},
        conditions=list({**before, **{a.name: {**a.to_dict(), "edits": a.edits(n_layers)} for a in arms}}.values()),
        tasks=list(tasks),
        **({} if parts is None else {"replication": {
            "description": replication.describe(),  # type: ignore[union-attr]
            "n": {part: sum(v == part for v in parts.values()) for part in PARTS},
        }}),
    )
    done = {item_key(r) for r in records}
    for arm in progress_bar(arms, progress, desc="arms"):
        if "caption" in tasks:
            _run_captions(bundle, dataset, arm, log, done, caption_prompt, max_new_tokens, protocol, batch_size,
                          progress, parts)
        if "pope" in tasks and arm.num_beams == 1:
            _run_questions(bundle, dataset, arm, log, done, batch_size, progress, parts)
    return log.path


def _append(log: ResumableLog, done: set, records: list[dict[str, Any]]) -> None:
    log.append(*records)
    done.update(item_key(r) for r in records)


def _run_captions(bundle, dataset: Dataset, arm: Arm, log: ResumableLog, done: set, prompt: str,
                  max_new_tokens: int, protocol: str, batch_size: int, progress: bool | None,
                  parts: dict[str, str] | None) -> None:
    from eah_interp.metrics import chair_scores

    todo = [item for item in dataset if (arm.name, "caption", item.id, "") not in done]
    for chunk in progress_bar(batches(todo, batch_size), progress, desc=f"{arm.name}: captions", leave=False,
                              total=-(-len(todo) // batch_size)):
        texts, heads = generate_texts(
            bundle, [prompt] * len(chunk), [item.load_image() for item in chunk], interventions=arm.interventions,
            max_new_tokens=max_new_tokens, num_beams=arm.num_beams, batch_size=batch_size, progress=False,
        )
        known = [j for j, item in enumerate(chunk) if item.objects is not None and dataset.vocabulary]
        # "both": the reference protocol's findings in the main fields, the strict one's beside them
        main, extra = ("reference", "strict") if protocol == "both" else (protocol, None)
        scores: dict[str, dict[int, Any]] = {}
        for name in filter(None, (main, extra)):
            if known:
                found = chair_scores([texts[j] for j in known], [chunk[j].objects for j in known],
                                     vocabulary=dataset.vocabulary, protocol=name)["per_caption"]
                scores[name] = dict(zip(known, found, strict=True))
        records = []
        for j, (item, text, h) in enumerate(zip(chunk, texts, heads, strict=True)):
            pc = scores.get(main, {}).get(j)
            record = {
                "condition": arm.name, "task": "caption", "item": item.id, "question": "", "caption": text,
                "truth": None if item.objects is None else sorted(item.objects),
                "mentioned": None if pc is None else sorted(pc["mentioned"]),
                "hallucinated": None if pc is None else sorted(pc["hallucinated"]),
                "chair_protocol": None if pc is None else main, "n_words": len(text.split()),
                "source_heads": h, "max_new_tokens": max_new_tokens, "num_beams": arm.num_beams,
            }
            strict = scores.get(extra or "", {}).get(j)
            if strict is not None:
                record["mentioned_strict"] = sorted(strict["mentioned"])
                record["hallucinated_strict"] = sorted(strict["hallucinated"])
            if parts is not None:
                record["part"] = parts[item.id]
            records.append(record)
        _append(log, done, records)


def _run_questions(bundle, dataset: Dataset, arm: Arm, log: ResumableLog, done: set, batch_size: int,
                   progress: bool | None, parts: dict[str, str] | None) -> None:
    """Ask every unanswered question; a question text asked twice about one item (in two splits) runs once."""
    from eah_interp.metrics import parse_yes_no

    todo: dict[tuple[str, str], list[tuple[Item, Question]]] = {}
    for item in dataset:
        for q in item.questions:
            if (arm.name, "pope", item.id, q.id) not in done:
                todo.setdefault((item.id, q.text), []).append((item, q))
    prompts = list(todo)
    for chunk in progress_bar(batches(prompts, batch_size), progress, desc=f"{arm.name}: yes/no", leave=False,
                              total=-(-len(prompts) // batch_size)):
        firsts = [todo[key][0][0] for key in chunk]
        answers, diffs = first_token_answers(
            bundle, [bundle.yes_no_prompt(text) for _, text in chunk], [item.load_image() for item in firsts],
            arm.interventions,
        )
        _append(log, done, [
            {
                "condition": arm.name, "task": "pope", "item": item.id, "question": q.id, "split": q.split,
                "object": q.object, "text": q.text, "label": q.label, "answer": a, "said_yes": parse_yes_no(a),
                "logit_diff": d, **({} if parts is None else {"part": parts[item.id]}),
            }
            for key, a, d in zip(chunk, answers, diffs, strict=True)
            for item, q in todo[key]
        ])
