"""POPE (Li et al., 2023): yes/no questions about present and absent objects."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "not", "nope", "false", "none", "never"}


def parse_yes_no(answer: str | bool | None) -> bool | None:
    """Read a yes/no answer: True for yes, False for no, None if it is neither.

    Only the first word counts ("Yes, there is a cat." is yes; "No." and "Not really" are no;
    "There is a cat" is None). Case and punctuation are ignored. Booleans pass through.
    """
    if isinstance(answer, bool) or answer is None:
        return answer
    words = re.findall(r"[a-z']+", answer.lower())
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    return None


def pope_scores(answers: Sequence[str | bool | None], labels: Sequence[bool]) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers ("yes" is the positive class).

    Unparseable answers count as "no" (so they are wrong on present objects) and are counted in
    ``unparsed``.
    """
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels.")
    parsed = [parse_yes_no(a) for a in answers]
    said = [bool(p) for p in parsed]
    truth = [bool(x) for x in labels]
    tp = sum(s and t for s, t in zip(said, truth, strict=True))
    fp = sum(s and not t for s, t in zip(said, truth, strict=True))
    fn = sum((not s) and t for s, t in zip(said, truth, strict=True))
    n = len(said)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(s == t for s, t in zip(said, truth, strict=True)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(said) / n if n else 0.0,
        "n": n,
        "unparsed": sum(p is None for p in parsed),
    }


def pope_questions(
    objects_per_image: Sequence[Iterable[str]],
    vocabulary: Iterable[str],
    mode: Literal["random", "popular", "adversarial"] = "random",
    *,
    n_negative: int = 3,
    seed: int = 0,
) -> list[tuple[int, str, bool]]:
    """POPE questions: ``(image index, object, label)``, positives and negatives balanced per image.

    Each image gets up to ``n_negative`` present objects (label True) and as many absent ones (False):
    ``random``: absent objects drawn uniformly from the vocabulary; ``popular``: the absent objects most
    frequent in the whole annotation set; ``adversarial``: the absent objects that co-occur most often
    (over the annotation set) with the image's present objects.
    """
    if mode not in ("random", "popular", "adversarial"):
        raise ValueError(f"mode must be 'random', 'popular' or 'adversarial'; got {mode!r}.")
    rng = random.Random(seed)
    sets = [set(objs) for objs in objects_per_image]
    vocab = sorted(set(vocabulary))
    frequency = Counter(o for s in sets for o in s)
    cooccur: Counter[tuple[str, str]] = Counter()
    for s in sets:
        for a in s:
            for b in s:
                if a != b:
                    cooccur[a, b] += 1
    questions: list[tuple[int, str, bool]] = []
    for index, present in enumerate(sets):
        positives = rng.sample(sorted(present), min(n_negative, len(present)))
        absent = [o for o in vocab if o not in present]
        k = min(len(positives), len(absent))
        if mode == "random":
            negatives = rng.sample(absent, k)
        elif mode == "popular":
            negatives = sorted(absent, key=lambda o: (-frequency[o], o))[:k]
        else:
            score = {o: sum(cooccur[p, o] for p in present) for o in absent}
            negatives = sorted(absent, key=lambda o: (-score[o], -frequency[o], o))[:k]
        questions += [(index, o, True) for o in positives] + [(index, o, False) for o in negatives]
    return questions
