"""Object vocabularies for CHAIR: canonical object names, the words that mention them, and where they occur.

`Vocabulary` is the engine of the **strict** protocol: phrase matching on word boundaries (singular or
plural, longest phrase first), negation scope, ambiguity rules, and a `Mention` for every match so any
number can be audited. The COCO word list is the one published with CHAIR (``coco_synonyms.txt``), with
the fixes listed in docs/metrics.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Mention:
    """One place in a caption where an object word was found.

    Attributes:
        word: the words as written in the caption, ``caption[start:end]``.
        start: character offset of the first character.
        end: character offset after the last character.
        object: the canonical object the words name; None when they name none ("toilet paper").
        counted: whether this mention enters CHAIR (strict: the first non-negated mention of an object;
            reference: every mention).
        note: why a mention is not counted ("negated by 'no'", "repeat", "colour", ...), or "".
        lemma: the reference protocol's word after singularisation (what the original code reports), or "".
    """

    word: str
    start: int
    end: int
    object: str | None
    counted: bool = True
    note: str = ""
    lemma: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``span`` as ``[start, end]``)."""
        d = asdict(self)
        d["span"] = [d.pop("start"), d.pop("end")]
        return d


_IRREGULAR_PLURALS = {
    "person": ["people", "persons"], "child": ["children"],
    "mouse": ["mice"], "knife": ["knives"], "goose": ["geese"], "sheep": ["sheep"], "ski": ["skis"],
    "leaf": ["leaves"], "shelf": ["shelves"], "foot": ["feet"], "tooth": ["teeth"], "fish": ["fish"],
    "bus": ["buses", "busses"], "glass": ["glasses"], "cactus": ["cacti", "cactuses"], "calf": ["calves"],
    "ox": ["oxen"], "bison": ["bison"], "cattle": ["cattle"], "people": [], "children": [], "oxen": [],
    "scissors": [], "skis": [], "human": ["humans"], "shaman": ["shamans"], "ottoman": ["ottomans"],
}


def plural_forms(word: str) -> list[str]:
    """The word and its plural(s); for a multi-word name the last word is inflected ("hot dogs").

    Regular ``-s``/``-es``/``-ies``/``-ves``, irregulars (people, mice, knives, geese, calves, ...), any word
    ending in "man" or "child" ("policemen", "grandchildren") and both ``-os``/``-oes`` after a final "o".
    """
    *head, last = word.split(" ")
    if last in _IRREGULAR_PLURALS:
        plurals = _IRREGULAR_PLURALS[last]
    elif last.endswith("man"):
        plurals = [last[:-3] + "men"]
    elif last.endswith("child"):
        plurals = [last + "ren"]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        plurals = [last + "es"]
    elif re.search(r"[^aeiou]y$", last):
        plurals = [last[:-1] + "ies"]
    elif last.endswith("fe"):
        plurals = [last[:-2] + "ves", last + "s"]
    elif last.endswith("o"):
        plurals = [last + "s", last + "es"]
    else:
        plurals = [last + "s"]
    prefix = " ".join(head) + " " if head else ""
    return [word] + [prefix + p for p in plurals]


# ---------------------------------------------------------------------------------------------- negation
_NEGATION_CUES = {"no": "short", "without": "short", "not": "not", "never": "not", "cannot": "not"}
"""'no X', 'without X': the first object within a few words; 'not/n't/never': only after a determiner."""
_NOT_DETERMINERS = {"any", "a", "an", "one", "single"}
_CLAUSE_ENDS = {"but", "however", "although", "though", "while", "whereas", "yet", "except", "instead", "only"}
_CONNECTORS = {",", "or", "nor", "and", "any", "no", "other", "even"}
_DETERMINERS = {"a", "an", "the", "some", "this", "that", "these", "those", "his", "her", "their", "its", "one",
                "two", "three", "four", "five", "several", "many", "few", "another", "each", "every"}
_WINDOW = 4
"""At most this many words between a negation cue and the object it negates."""
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|n't|[^\sa-z0-9]")


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text))


def _negation_cue(text: str, start: int, previous_end: int) -> str | None:
    """The negation cue that scopes over a mention starting at ``start``, if any.

    Looks back from ``start`` (not past ``previous_end``, the end of the previous object mention) for a
    cue: "no"/"without" within ``_WINDOW`` words, with no determiner after the cue's first word ("without
    a hat holds an umbrella" leaves the umbrella); "not"/"n't"/"never" within the window with exactly one
    determiner between cue and object, and that one "any", "a", "an", "one" or "single" ("is not holding
    a cup", "there aren't any dogs", but not "is not on the couch"). A clause boundary (. ; : ! ?
    brackets, "but", "however", ...) closes the scope; "no" followed by punctuation is not a cue.
    """
    words = _words(text[:start])
    between: list[str] = []
    for w in reversed(words):
        if w.end() <= previous_end:
            return None
        token = w.group()
        cue = "not" if token.endswith("n't") else token
        if cue in _NEGATION_CUES:
            forward = between[::-1]  # the words from the cue to the mention
            if forward and not forward[0][0].isalnum():  # "No, there is a dog": an answer, not a determiner
                return None
            determiners = [t for t in forward if t in _DETERMINERS | _NOT_DETERMINERS]
            if _NEGATION_CUES[cue] == "not":
                if len(determiners) != 1 or determiners[0] not in _NOT_DETERMINERS:
                    return None
            elif any(t in _DETERMINERS | _NOT_DETERMINERS for t in forward[1:]):
                return None  # "without a hat holds an umbrella": a second noun phrase
            return "n't" if token.endswith("n't") else token
        if token in ".;:!?()[]" or token in _CLAUSE_ENDS:
            return None
        between.append(token)
        if sum(t.isalnum() for t in between) > _WINDOW:
            return None
    return None


def _coordinated(text: str, previous_end: int, start: int) -> bool:
    """Whether the words between two mentions join them in one list ("no dogs, cats or horses")."""
    tokens = [w.group() for w in _words(text[previous_end:start])]
    if not tokens or not set(tokens) & {",", "or", "nor", "and"}:
        return False
    if set(tokens) & _DETERMINERS or set(tokens) & _CLAUSE_ENDS or set(tokens) & set(".;:!?()[]"):
        return False
    return sum(t not in _CONNECTORS for t in tokens) <= 2


# ---------------------------------------------------------------------------------------------- colours
_COLOURS = {"white", "black", "red", "blue", "green", "yellow", "brown", "gray", "grey", "pink", "purple", "orange",
            "gold", "golden", "silver", "tan", "beige", "striped", "spotted", "dark", "light", "bright", "colored",
            "coloured", "-"}
_FRUIT_AFTER = {"slice", "slices", "wedge", "wedges", "peel", "peels", "half", "halves", "segment", "segments",
                "tree", "trees"}
_FRUIT_BEFORE = {"a", "an", "one", "the", "this", "that", "each", "another", "single", "whole", "half", "peeled",
                 "sliced", "ripe", "fresh"}
_FRUIT_FOLLOWERS = {"and", "or", "on", "in", "with", "next", "beside", "near", "is", "sits", "lies", "sitting",
                    "lying", "placed", "from", "of", "to", "at", "by", "under", "inside", "has", "was"}


def _is_colour(text: str, start: int, end: int) -> bool:
    """Whether a singular word that is both a colour and an object ("orange") is used as the colour.

    The fruit: followed by slice(s), wedge(s), peel(s), half, segment(s) or tree; or after "a", "an",
    "the", "one", ... when the next word is not a noun (end of text, punctuation, "and"/"or" not followed
    by another colour, a preposition or "is", "sits", ...). Otherwise the colour: "an orange cat", "orange
    and white", "the cat is orange", "bright orange".
    """
    before = [w.group() for w in _words(text[:start])][-1:]
    after = [w.group() for w in _words(text[end:])][:2]
    if after and after[0] in _FRUIT_AFTER:
        return False
    if not before or before[0] not in _FRUIT_BEFORE:
        return True
    if not after or not after[0][0].isalnum():
        return after[:1] == ["-"]
    if after[0] in {"and", "or"} and len(after) > 1 and after[1] in _COLOURS:
        return True
    return after[0] not in _FRUIT_FOLLOWERS


@dataclass
class Vocabulary:
    """Canonical object names, each with the (singular) words that mention it: the strict protocol.

    `find` lists every match (case-insensitive, on word boundaries, singular or plural, longest phrase
    first: "hot dog" is a hot dog, not a dog; "traffic light" is not a "light") with its span and whether
    it counts; `mentions` gives the counted objects, each once.

    Attributes:
        synonyms: canonical name -> singular words/phrases (the name itself is always included).
        name: a label for reports.
        phrases: extra phrase -> object rules that override the words inside them ("baby bird" -> "bird",
            "toilet seat" -> "toilet"); an object of None marks a phrase that names no object ("toilet
            paper", "table tennis").
        colour_words: words that are both an object and a colour ("orange"); see `_is_colour`.
        unless_present: word -> object: the word does not count when the caption also names that object
            ("seat" is not a chair when a toilet is mentioned).
        negation: whether negated mentions ("no dog", "without a hat") are left out.
    """

    synonyms: Mapping[str, Iterable[str]]
    name: str = "custom"
    phrases: Mapping[str, str | None] = field(default_factory=dict)
    colour_words: frozenset[str] = frozenset()
    unless_present: Mapping[str, str] = field(default_factory=dict)
    negation: bool = True
    _phrases: dict[str, str | None] = field(init=False, repr=False)
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phrases: dict[str, str | None] = {}
        for canonical, words in self.synonyms.items():
            for word in {canonical, *words}:
                for form in plural_forms(word.lower()):
                    previous = phrases.setdefault(form, canonical)
                    if previous != canonical:
                        raise ValueError(f"the phrase {form!r} maps to both {previous!r} and {canonical!r}")
        for phrase, obj in self.phrases.items():
            if obj is not None and obj not in self.synonyms:
                raise ValueError(f"phrase rule {phrase!r} -> {obj!r}: {obj!r} is not an object of this vocabulary.")
            for form in plural_forms(phrase.lower()):
                phrases[form] = obj
        self._phrases = phrases
        alternatives = sorted(phrases, key=len, reverse=True)
        self._pattern = re.compile(r"(?<![\w])(" + "|".join(re.escape(p) for p in alternatives) + r")(?![\w])")

    @property
    def objects(self) -> list[str]:
        return list(self.synonyms)

    def canonical(self, name: str) -> str:
        """The canonical object a name (or synonym, or plural) refers to; ValueError if unknown."""
        key = name.lower().strip()
        if key in self.synonyms:
            return key
        if self._phrases.get(key) is not None:
            return self._phrases[key]  # type: ignore[return-value]
        raise ValueError(
            f"{name!r} is not an object of the {self.name!r} vocabulary ({len(self.synonyms)} objects); "
            f"use one of its names, e.g. {sorted(self.synonyms)[:5]}."
        )

    def find(self, text: str) -> list[Mention]:
        """Every object word in ``text`` with its span, and whether (and why not) it counts.

        Args:
            text: a caption.

        Returns:
            the matches in order. Hyphens read as spaces ("hot-dog" is a hot dog). Not counted: phrases
            that name no object, a word hyphenated to the next ("dog-shaped"), colour uses of colour
            words, words excluded by `unless_present`, negated mentions, and repeats of an object
            already counted in this caption.
        """
        lower = text.lower()
        found: list[Mention] = []
        for match in self._pattern.finditer(lower.replace("-", " ")):  # "hot-dog" is a hot dog
            start, end = match.span()
            word = text[start:end]
            obj = self._phrases[match.group(1)]
            if obj is None:
                found.append(Mention(word, start, end, None, False, f"{match.group(1)!r} names no object"))
            elif re.match(r"-[a-z]", lower[end:]):
                found.append(Mention(word, start, end, obj, False, "compound modifier (word-word)"))
            elif match.group(1) in self.colour_words and _is_colour(lower, start, end):
                found.append(Mention(word, start, end, obj, False, "colour"))
            else:
                found.append(Mention(word, start, end, obj))
        named = {m.object for m in found if m.counted}
        counted: set[str] = set()
        previous_end, previous_negated = 0, False
        result = []
        for m in found:
            key = m.word.lower()
            if m.counted and key in self.unless_present and self.unless_present[key] in named:
                m = Mention(m.word, m.start, m.end, m.object, False, f"{key!r} with a {self.unless_present[key]}")
            if m.object is not None and self.negation:
                cue = _negation_cue(lower, m.start, previous_end)
                if cue is None and previous_negated and _coordinated(lower, previous_end, m.start):
                    cue = "a list after a negation"
                negated = cue is not None
                if negated and m.counted:
                    m = Mention(m.word, m.start, m.end, m.object, False, f"negated by {cue!r}")
                previous_end, previous_negated = m.end, negated
            if m.counted:
                if m.object in counted:
                    m = Mention(m.word, m.start, m.end, m.object, False, "repeat")
                counted.add(m.object)  # type: ignore[arg-type]
            result.append(m)
        return result

    def mentions(self, text: str) -> list[str]:
        """Canonical objects mentioned (and counted) in ``text``, each once, in order of first appearance."""
        return [m.object for m in self.find(text) if m.counted]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- COCO
@cache
def published_synonyms() -> tuple[tuple[str, ...], ...]:
    """The CHAIR synonym list as published, one row per COCO category, first word the category name.

    Read verbatim (stray spaces and capitals included) from ``coco_synonyms.txt``, a copy of
    ``data/synonyms.txt`` of github.com/LisaAnne/Hallucination at commit
    6e4d33c4bedf6dfcd24c61bf527f40714717be47 (Rohrbach et al. 2018); rows are split on ", " exactly as
    the original code does.
    """
    text = resources.files("eah_interp.metrics").joinpath("coco_synonyms.txt").read_text(encoding="utf-8")
    return tuple(tuple(line.strip().split(", ")) for line in text.splitlines() if line.strip())


_STRICT_DROPPED = {"phon", "knive", "bow"}
"""Published words strict leaves out: "phon"/"knive" only served the original's singulariser; "bow"
(of a ship, in hair, with arrows) is rarely a bow tie."""
_STRICT_ADDED = {"hot dog": ("hotdog",)}

_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
_VEHICLES = {"jet": "airplane", "plane": "airplane", "airplane": "airplane", "aircraft": "airplane",
             "jetliner": "airplane", "airliner": "airplane", "train": "train", "bus": "bus", "car": "car",
             "van": "car", "boat": "boat", "ship": "boat", "ferry": "boat", "vessel": "boat", "liner": "boat"}
STRICT_COCO_PHRASES: dict[str, str | None] = {
    **{f"{age} {word}": row[0] for row in published_synonyms() if row[0] in _ANIMALS
       for word in row for age in ("baby", "adult") if word.strip()},
    "baby animal": None, "adult animal": None, "baby cub": None, "adult cub": None,
    **{f"passenger {word}": obj for word, obj in _VEHICLES.items()},
    "toilet seat": "toilet", "toilet paper": None, "toilet tissue": None, "toilet roll": None,
    "table tennis": None, "orange juice": None, "home plate": None, "train track": None,
    **{f"{dog} {place}": None for dog in ("hot dog", "hotdog") for place in ("stand", "cart", "vendor", "stall")},
}
"""Strict's phrase rules for COCO: the original's two-word rules, extended, and the ambiguous phrases."""


def coco_synonyms() -> dict[str, tuple[str, ...]]:
    """Strict's COCO table: the published list cleaned (see docs/metrics.md, "strict departures")."""
    table: dict[str, tuple[str, ...]] = {}
    for row in published_synonyms():
        words = [w.strip().lower() for w in row[1:]]
        words = [w for w in dict.fromkeys(words) if w and w != row[0] and w not in _STRICT_DROPPED]
        table[row[0]] = tuple(words) + _STRICT_ADDED.get(row[0], ())
    return table


COCO_SYNONYMS: dict[str, tuple[str, ...]] = coco_synonyms()
"""The 80 COCO categories (canonical names as in COCO's ``categories``) with strict's synonyms."""


def scenes_vocabulary() -> Vocabulary:
    """The synthetic scene world's vocabulary (`eah_interp.scenes.SYNONYMS`)."""
    from eah_interp.scenes import SYNONYMS

    return Vocabulary(SYNONYMS, name="scenes")


@cache
def coco_vocabulary() -> Vocabulary:
    """The COCO-80 vocabulary of the strict protocol (published list with strict's fixes and rules)."""
    return Vocabulary(
        COCO_SYNONYMS, name="coco", phrases=STRICT_COCO_PHRASES, colour_words=frozenset({"orange"}),
        unless_present={"seat": "toilet", "seats": "toilet"},
    )


def get_vocabulary(vocabulary: str | Vocabulary) -> Vocabulary:
    """``"scenes"``, ``"coco"`` or a `Vocabulary`."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if vocabulary == "scenes":
        return scenes_vocabulary()
    if vocabulary == "coco":
        return coco_vocabulary()
    raise ValueError(f"vocabulary must be 'scenes', 'coco' or a Vocabulary; got {vocabulary!r}.")
