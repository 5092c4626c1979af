"""Same answers, two scorers: lmms-eval's POPE and CHAIR (coco_cap_chair) vs eah-interp's, side by side.

    python benchmarks/lmms_eval_metrics.py            # needs lmms-eval installed (its task utils)

1. POPE: lmms-eval's ``pope_process_results`` + aggregates and `eah_interp.metrics.pope.pope_scores` on one
   list of answers written like real LVLM answers ("Yes", "No.", "Yes, there is a dog.", ...).
2. CHAIR aggregation: the 62 captions of ``tests/data/chair_reference`` (hand-labelled ground truth). Object
   words come from eah-interp's reference protocol (`chair_scores(..., vocabulary="coco")`); the same words
   are fed to lmms-eval's ``coco_cap_chair_aggregate_results_*``, so only the aggregation differs.
3. CHAIR extraction: lmms-eval's ``caption_to_words`` (nltk ``word_tokenize`` + ``pos_tag`` + WordNet
   lemmas) vs eah-interp's reference protocol on the same captions, per caption. Needs nltk's
   ``punkt_tab``, ``averaged_perceptron_tagger_eng`` and ``wordnet`` data (``python -m nltk.downloader
   punkt_tab averaged_perceptron_tagger_eng wordnet``); skipped, and said so, where they are missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (answer, ground truth): answers as LLaVA-style models write them.
POPE_ANSWERS = [
    ("Yes", "yes"), ("No", "no"), ("yes", "yes"), ("no", "no"),
    ("Yes.", "yes"), ("No.", "no"), ("Yes, there is a dog in the image.", "yes"), ("No, there is no cup.", "no"),
    ("Yes", "no"), ("Yes, it is.", "yes"), ("There is a cat.", "yes"), ("yes.", "no"),
]


def lmms_pope(answers: list[tuple[str, str]]) -> dict[str, float]:
    """lmms-eval's POPE task functions on the answers (its process_results, then its aggregates)."""
    from lmms_eval.tasks.pope import utils

    rows = [utils.pope_process_results({"answer": gt, "question_id": str(i)}, [a])["pope_accuracy"]
            for i, (a, gt) in enumerate(answers)]
    return {
        "accuracy": utils.pope_aggregate_accuracy(rows), "precision": utils.pope_aggregate_precision(rows),
        "recall": utils.pope_aggregate_recall(rows), "f1": utils.pope_aggregate_f1_score(rows),
        "yes_ratio": utils.pope_aggregate_yes_ratio(rows),
    }


def eah_pope(answers: list[tuple[str, str]]) -> dict[str, float]:
    from eah_interp.metrics.pope import pope_scores

    scores = pope_scores([a for a, _ in answers], [gt == "yes" for _, gt in answers])
    return {k: scores[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio", "unparsed")}


def chair_items() -> list[dict]:
    return json.loads((ROOT / "tests" / "data" / "chair_reference" / "captions.json").read_text())["items"]


def chair_aggregation() -> dict[str, dict[str, float]]:
    """The same object words through both aggregations (lmms-eval's are percentages)."""
    from lmms_eval.tasks.coco_cap_chair import utils

    from eah_interp.metrics.chair import chair_scores
    from eah_interp.metrics.chair_reference import canonical

    items = chair_items()
    truth = [[canonical(n) for n in item["instances"]] for item in items]
    ours = chair_scores([item["caption"] for item in items], truth, vocabulary="coco")
    rows = [{"answer": t, "pred": list(c["mentioned"]), "image_id": i}
            for i, (t, c) in enumerate(zip(truth, ours["per_caption"], strict=True))]
    return {
        "eah_interp": {"chair_s": ours["chair_s"], "chair_i": ours["chair_i"], "recall": ours["recall"]},
        "lmms_eval_on_the_same_words": {
            "chair_s": utils.coco_cap_chair_aggregate_results_chair_s(rows),
            "chair_i": utils.coco_cap_chair_aggregate_results_chair_i(rows),
            "recall": utils.coco_cap_chair_aggregate_results_recall(rows),
        },
    }


def chair_extraction() -> dict:
    """Per caption, lmms-eval's object words vs eah-interp's (None where nltk's data are missing)."""
    import nltk

    for resource in ("tokenizers/punkt_tab", "taggers/averaged_perceptron_tagger_eng", "corpora/wordnet"):
        try:
            nltk.data.find(resource)
        except LookupError:
            return {"skipped": f"nltk data {resource!r} is not installed (no download offline)"}
    from lmms_eval.tasks.coco_cap_chair import utils

    from eah_interp.metrics.chair import chair_scores

    differ = []
    for item in chair_items():
        _, theirs, _, _ = utils.caption_to_words(item["caption"])
        ours = chair_scores([item["caption"]], [[]], vocabulary="coco")["per_caption"][0]["mentioned"]
        if sorted(theirs) != sorted(ours):
            differ.append({"id": item["id"], "lmms_eval": sorted(theirs), "eah_interp": sorted(ours)})
    return {"captions": len(chair_items()), "differ": len(differ), "examples": differ[:10]}


def main() -> None:
    report = {
        "pope_answers": POPE_ANSWERS,
        "pope": {"lmms_eval": lmms_pope(POPE_ANSWERS), "eah_interp": eah_pope(POPE_ANSWERS)},
        "chair_aggregation": chair_aggregation(),
        "chair_extraction": chair_extraction(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
