"""CHAIR's reference protocol: the semantics of the original code, so numbers compare with published ones.

The original is ``utils/chair.py`` of github.com/LisaAnne/Hallucination (Rohrbach et al. 2018, commit
6e4d33c4bedf6dfcd24c61bf527f40714717be47); OPERA, VCD, EAH and most LVLM papers run copies of it. This
module is written from its documented behaviour (not copied): lower-case the caption, tokenize it
(`eah_interp.metrics.text.word_tokenize`), singularise every token
(`eah_interp.metrics.text.singularize`), merge the original's two-word rules left to right, drop "seat"
when "toilet" is also there, keep the tokens in the published synonym list, and count every one of them.
Every quirk this reproduces is listed in docs/metrics.md.
"""

from __future__ import annotations

from functools import cache

from eah_interp.metrics.text import singularize, word_tokenize
from eah_interp.metrics.vocabulary import Mention, published_synonyms

DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)
"""Two-token names the original reads as one word (matched on *singularised* tokens; "stove top oven"
has three words and so never matches; "sports ball" and "tennis racket" never match either, because
"sports" and "tennis" singularise to "sport" and "tenni")."""

ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
"""'baby X' and 'adult X' read as X for these words (so "baby" there is not a person)."""

VEHICLE_WORDS = ("jet", "train")
"""'passenger X' reads as X for these words (so "passenger" there is not a person)."""


@cache
def double_word_rules() -> dict[str, str]:
    """Pair of singularised tokens -> the word the original reads it as."""
    rules = {pair: pair for pair in DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        rules[f"baby {animal}"] = animal
        rules[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        rules[f"passenger {vehicle}"] = vehicle
    rules["bow tie"] = "tie"
    rules["toilet seat"] = "toilet"
    rules["wine glas"] = "wine glass"  # "glass" singularises to "glas"
    return rules


@cache
def inverse_synonyms() -> dict[str, str]:
    """Every published word (exactly as written, " motor bike" and "iPhone" included) -> its COCO category."""
    return {word: row[0] for row in published_synonyms() for word in row}


def canonical(name: str) -> str:
    """The COCO category a ground-truth name stands for (a category name or a published synonym).

    Raises:
        ValueError: the name is not in the published list.
    """
    inverse = inverse_synonyms()
    if name in inverse:
        return inverse[name]
    if name.lower().strip() in inverse:
        return inverse[name.lower().strip()]
    raise ValueError(
        f"{name!r} is not a COCO category or a word of CHAIR's published synonym list; ground truth for "
        f"protocol='reference' must use COCO category names such as 'person', 'dining table', 'tv'."
    )


def reference_mentions(caption: str) -> list[Mention]:
    """Every COCO object word the original CHAIR code finds in a caption, with the words it came from.

    Args:
        caption: one generated (or reference) caption.

    Returns:
        one `Mention` per object word, all counted (repeats included), in caption order; a "seat"
        dropped by the toilet rule is listed with ``counted=False``. ``lemma`` is the word the original
        reports (after singularising and merging two-word names), ``word``/``start``/``end`` the
        caption text it came from.
    """
    tokens = word_tokenize(caption)
    lemmas = [singularize(t.text.lower()) for t in tokens]
    rules = double_word_rules()
    merged: list[tuple[str, int, int]] = []  # (word, first token, one past the last token)
    i = 0
    while i < len(lemmas):
        pair = " ".join(lemmas[i: i + 2])
        if pair in rules:
            merged.append((rules[pair], i, i + 2))
            i += 2
        else:
            merged.append((lemmas[i], i, i + 1))
            i += 1
    words = {w for w, _, _ in merged}
    drop_seat = "toilet" in words and "seat" in words
    inverse = inverse_synonyms()
    mentions = []
    for word, first, last in merged:
        if word not in inverse:
            continue
        start, end = tokens[first].start, tokens[last - 1].end
        if drop_seat and word == "seat":
            mentions.append(Mention(caption[start:end], start, end, inverse[word], False, "'seat' with a toilet", word))
        else:
            mentions.append(Mention(caption[start:end], start, end, inverse[word], True, "", word))
    return mentions
