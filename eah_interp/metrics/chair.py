"""CHAIR (Rohrbach et al., 2018): how many objects a caption names that are not in the image."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from eah_interp.metrics.vocabulary import Vocabulary, get_vocabulary


def chair_scores(
    captions: Sequence[str], objects: Sequence[Iterable[str]], vocabulary: str | Vocabulary = "scenes"
) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i, object recall and caption length of a set of captions.

    Args:
        captions: one caption per image.
        objects: the ground-truth object names of each image (canonical names or synonyms).
        vocabulary: ``"scenes"`` (the synthetic world), ``"coco"`` (COCO-80) or a `Vocabulary`.

    Returns:
        dict with ``chair_s`` (fraction of captions with at least one hallucinated object),
        ``chair_i`` (hallucinated mentions / all mentions; 0 when nothing is mentioned), ``recall``
        (ground-truth objects mentioned / all ground-truth objects), ``length`` (mean words per
        caption), ``n`` and ``per_caption`` (per caption: ``mentioned``, ``hallucinated``, ``missed``,
        lists of canonical names). Each object counts once per caption.
    """
    if len(captions) != len(objects):
        raise ValueError(f"{len(captions)} captions but {len(objects)} ground-truth object sets.")
    vocab = get_vocabulary(vocabulary)
    per_caption = []
    n_mentions = n_halluc = n_truth = n_recalled = n_words = n_bad_captions = 0
    for caption, truth_names in zip(captions, objects, strict=True):
        truth = {vocab.canonical(name) for name in truth_names}
        mentioned = vocab.mentions(caption)
        hallucinated = [m for m in mentioned if m not in truth]
        missed = sorted(truth - set(mentioned))
        per_caption.append({"mentioned": mentioned, "hallucinated": hallucinated, "missed": missed})
        n_mentions += len(mentioned)
        n_halluc += len(hallucinated)
        n_bad_captions += bool(hallucinated)
        n_truth += len(truth)
        n_recalled += len(truth) - len(missed)
        n_words += len(caption.split())
    n = len(captions)
    return {
        "chair_s": n_bad_captions / n if n else 0.0,
        "chair_i": n_halluc / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_truth if n_truth else 0.0,
        "length": n_words / n if n else 0.0,
        "n": n,
        "per_caption": per_caption,
    }


def load_coco_objects(instances_json: str | Path) -> dict[int, set[str]]:
    """Ground-truth object names per image id from a COCO ``instances_*.json`` annotation file."""
    data = json.loads(Path(instances_json).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    objects: dict[int, set[str]] = {img["id"]: set() for img in data.get("images", [])}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], set()).add(names[ann["category_id"]])
    return objects
