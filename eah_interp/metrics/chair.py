"""CHAIR (Rohrbach et al., 2018): how many objects a caption names that are not in the image.

Two protocols (docs/metrics.md lists every rule of each, word by word):

- ``"reference"``: the original code's semantics (every mention counts; its tokenizer, singulariser,
  two-word rules and published synonym list, quirks included), so numbers compare with published ones.
  COCO only; the default for ``vocabulary="coco"``.
- ``"strict"``: each object once per caption, negation scope, ambiguity rules, the original's quirks
  fixed. The default for the synthetic world and for custom vocabularies; recommended for new studies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from eah_interp.metrics import chair_reference
from eah_interp.metrics.vocabulary import Mention, Vocabulary, get_vocabulary

PROTOCOLS = ("strict", "reference")


def default_protocol(vocabulary: str | Vocabulary) -> str:
    """``"reference"`` for ``vocabulary="coco"`` (published numbers use it), ``"strict"`` otherwise."""
    return "reference" if vocabulary == "coco" else "strict"


def _matcher(vocabulary: str | Vocabulary, protocol: str | None) -> tuple[str, Callable, Callable]:
    """(protocol, caption -> mentions, ground-truth name -> canonical name)."""
    protocol = protocol or default_protocol(vocabulary)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} (or None for the vocabulary's default); got {protocol!r}.")
    if protocol == "reference":
        if vocabulary != "coco":
            name = vocabulary.name if isinstance(vocabulary, Vocabulary) else vocabulary
            raise ValueError(
                f"protocol='reference' reproduces the original CHAIR code, whose word list and rules are COCO's; "
                f"it needs vocabulary='coco' (got {name!r}). Use protocol='strict' for other vocabularies."
            )
        return protocol, chair_reference.reference_mentions, chair_reference.canonical
    vocab = get_vocabulary(vocabulary)
    return protocol, vocab.find, vocab.canonical


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0 (a ratio with nothing to count is undefined, not 0)."""
    return num / den if den else math.nan


def chair_scores(
    captions: Sequence[str],
    objects: Sequence[Iterable[str]],
    vocabulary: str | Vocabulary = "scenes",
    protocol: str | None = None,
) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i, object recall and caption length of a set of captions, with every mention.

    Args:
        captions: one caption per image.
        objects: the ground-truth object names of each image (canonical names or synonyms).
        vocabulary: ``"scenes"`` (the synthetic world), ``"coco"`` (COCO-80) or a `Vocabulary`.
        protocol: ``"strict"``, ``"reference"`` (COCO only) or None for the default: ``"reference"`` for
            ``vocabulary="coco"``, ``"strict"`` otherwise.

    Returns:
        dict with ``chair_s`` (captions with at least one hallucinated mention / captions), ``chair_i``
        (hallucinated mentions / counted mentions), ``recall`` (ground-truth objects mentioned /
        ground-truth objects), ``length`` (mean whitespace-separated words per caption), ``n``,
        ``n_mentions``, ``n_hallucinated``, ``n_truth`` (so "0 mentions" is told from "CHAIR_i = 0"; a
        ratio whose denominator is 0 is NaN), ``protocol``, ``vocabulary`` and ``per_caption``: per
        caption ``mentioned`` and ``hallucinated`` (canonical names, one per counted mention: each object
        once in strict, every mention in reference), ``missed`` (ground truth not mentioned, sorted),
        ``n_mentions``, ``n_hallucinated`` and ``mentions`` (every match as `Mention.to_dict`, with the
        surface ``word``, its character ``span``, ``counted``, ``note`` and ``hallucinated``).
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} ground-truth object sets.")
    protocol, find, canonical = _matcher(vocabulary, protocol)
    per_caption = []
    n_mentions = n_halluc = n_truth = n_recalled = n_words = n_bad_captions = 0
    for caption, truth_names in zip(captions, objects, strict=True):
        truth = {canonical(name) for name in truth_names}
        found: list[Mention] = find(caption)
        counted = [m for m in found if m.counted]
        hallucinated = [m.object for m in counted if m.object not in truth]
        mentioned = [m.object for m in counted]
        missed = sorted(truth - set(mentioned))
        per_caption.append({
            "mentioned": mentioned,
            "hallucinated": hallucinated,
            "missed": missed,
            "n_mentions": len(counted),
            "n_hallucinated": len(hallucinated),
            "mentions": [{**m.to_dict(), "hallucinated": m.counted and m.object not in truth} for m in found],
        })
        n_mentions += len(counted)
        n_halluc += len(hallucinated)
        n_bad_captions += bool(hallucinated)
        n_truth += len(truth)
        n_recalled += len(truth) - len(missed)
        n_words += len(caption.split())
    n = len(captions)
    return {
        "chair_s": _ratio(n_bad_captions, n),
        "chair_i": _ratio(n_halluc, n_mentions),
        "recall": _ratio(n_recalled, n_truth),
        "length": _ratio(n_words, n),
        "n": n,
        "n_mentions": n_mentions,
        "n_hallucinated": n_halluc,
        "n_truth": n_truth,
        "protocol": protocol,
        "vocabulary": vocabulary.name if isinstance(vocabulary, Vocabulary) else vocabulary,
        "per_caption": per_caption,
    }


def _read_json(source: str | Path | Mapping) -> Mapping:
    return source if isinstance(source, Mapping) else json.loads(Path(source).read_text())


def load_coco_objects(
    instances: str | Path | Mapping,
    captions: str | Path | Mapping | None = None,
    protocol: str = "reference",
) -> dict[int, set[str]]:
    """Ground-truth object names per image id from COCO annotation files.

    Args:
        instances: a COCO ``instances_*.json`` (path or loaded dict): every annotated category counts.
        captions: optionally a COCO ``captions_*.json``: the objects its reference captions name are
            added, as the original CHAIR does (it uses instances *and* captions).
        protocol: how reference captions are read: ``"reference"`` (the original's reading, negations
            and all) or ``"strict"``.

    Returns:
        image id -> set of COCO category names (images of either file, possibly empty).
    """
    data = _read_json(instances)
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, set[str]] = {img["id"]: set() for img in data.get("images", [])}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    if captions is not None:
        _, find, _ = _matcher("coco", protocol)
        caps = _read_json(captions)
        for img in caps.get("images", []):
            objects.setdefault(img["id"], set())
        for ann in caps["annotations"]:
            found = objects.setdefault(ann["image_id"], set())
            found.update(m.object for m in find(ann["caption"]) if m.counted)
    return objects
