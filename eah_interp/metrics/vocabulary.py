"""Object vocabularies for CHAIR: canonical object names and the words that mention them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_IRREGULAR_PLURALS = {
    "person": ["people", "persons"], "man": ["men"], "woman": ["women"], "child": ["children"],
    "mouse": ["mice"], "knife": ["knives"], "goose": ["geese"], "sheep": ["sheep"], "ski": ["skis"],
    "leaf": ["leaves"], "shelf": ["shelves"], "foot": ["feet"], "tooth": ["teeth"], "fish": ["fish"],
    "bus": ["buses", "busses"], "glass": ["glasses"], "cactus": ["cacti", "cactuses"],
}


def plural_forms(word: str) -> list[str]:
    """The word and its plural(s); for a multi-word name the last word is inflected ("hot dogs")."""
    *head, last = word.split(" ")
    if last in _IRREGULAR_PLURALS:
        plurals = _IRREGULAR_PLURALS[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        plurals = [last + "es"]
    elif re.search(r"[^aeiou]y$", last):
        plurals = [last[:-1] + "ies"]
    elif last.endswith("fe"):
        plurals = [last[:-2] + "ves", last + "s"]
    else:
        plurals = [last + "s"]
    prefix = " ".join(head) + " " if head else ""
    return [word] + [prefix + p for p in plurals]


@dataclass
class Vocabulary:
    """Canonical object names, each with the (singular) words that mention it.

    `mentions` finds them in free text: case-insensitive, on word boundaries, singular or plural,
    longest phrase first (so "hot dog" is a hot dog, not a dog; "traffic light" is not "light").

    Attributes:
        synonyms: canonical name -> singular words/phrases (the name itself is always included).
        name: a label for reports.
    """

    synonyms: Mapping[str, Iterable[str]]
    name: str = "custom"
    _phrases: dict[str, str] = field(init=False, repr=False)
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phrases: dict[str, str] = {}
        for canonical, words in self.synonyms.items():
            for word in {canonical, *words}:
                for form in plural_forms(word.lower()):
                    previous = phrases.setdefault(form, canonical)
                    if previous != canonical:
                        raise ValueError(f"the phrase {form!r} maps to both {previous!r} and {canonical!r}")
        self._phrases = phrases
        alternatives = sorted(phrases, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(p) for p in alternatives) + r")\b")

    @property
    def objects(self) -> list[str]:
        return list(self.synonyms)

    def canonical(self, name: str) -> str:
        """The canonical object a name (or synonym, or plural) refers to; ValueError if unknown."""
        key = name.lower().strip()
        if key in self.synonyms:
            return key
        if key in self._phrases:
            return self._phrases[key]
        raise ValueError(f"{name!r} is not an object of the {self.name!r} vocabulary ({len(self.synonyms)} objects).")

    def mentions(self, text: str) -> list[str]:
        """Canonical objects mentioned in ``text``, each once, in order of first appearance."""
        found: list[str] = []
        for match in self._pattern.finditer(text.lower()):
            obj = self._phrases[match.group(1)]
            if obj not in found:
                found.append(obj)
        return found


COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "player", "skier", "surfer", "rider", "guy",
               "lady", "adult", "pedestrian", "skateboarder", "snowboarder", "toddler", "teenager", "worker"),
    "bicycle": ("bike", "cycle"), "car": ("automobile", "sedan", "taxi", "suv"), "motorcycle": ("motorbike", "scooter"),
    "airplane": ("plane", "jet", "aircraft", "airliner"), "bus": ("minibus",), "train": ("locomotive", "tram"),
    "truck": ("pickup", "lorry"), "boat": ("ship", "kayak", "canoe", "sailboat", "yacht"),
    "traffic light": ("stoplight", "traffic signal"), "fire hydrant": ("hydrant",), "stop sign": (),
    "parking meter": ("meter",), "bench": (), "bird": ("pigeon", "seagull", "duck", "parrot", "crow"),
    "cat": ("kitten", "kitty"), "dog": ("puppy", "pup"), "horse": ("pony", "foal"), "sheep": ("lamb", "ram"),
    "cow": ("cattle", "calf", "bull", "ox"), "elephant": (), "bear": ("grizzly",), "zebra": (), "giraffe": (),
    "backpack": ("rucksack",), "umbrella": ("parasol",), "handbag": ("purse",), "tie": ("necktie",),
    "suitcase": ("luggage",), "frisbee": (), "skis": ("ski",), "snowboard": (), "sports ball": ("ball", "football", "soccer ball", "baseball", "basketball", "tennis ball"),
    "kite": (), "baseball bat": ("bat",), "baseball glove": ("glove", "mitt"), "skateboard": (),
    "surfboard": ("surf board",), "tennis racket": ("racket", "racquet"), "bottle": (),
    "wine glass": (), "cup": ("mug",), "fork": (), "knife": (), "spoon": (), "bowl": (),
    "banana": (), "apple": (), "sandwich": ("burger", "sub"), "orange": (), "broccoli": (), "carrot": (),
    "hot dog": ("hotdog",), "pizza": (), "donut": ("doughnut",), "cake": ("cupcake",), "chair": ("stool",),
    "couch": ("sofa",), "potted plant": ("houseplant", "plant"), "bed": (), "dining table": ("table", "desk"),
    "toilet": (), "tv": ("television", "tv set"), "laptop": ("notebook computer",), "mouse": (),
    "remote": ("remote control", "controller"), "keyboard": (), "cell phone": ("phone", "cellphone", "smartphone", "mobile phone"),
    "microwave": (), "oven": ("stove",), "toaster": (), "sink": (), "refrigerator": ("fridge",),
    "book": ("novel",), "clock": (), "vase": (), "scissors": (), "teddy bear": ("teddy", "stuffed animal"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer"), "toothbrush": (),
}
"""Our own synonym table for the 80 COCO categories (canonical names as in COCO's ``categories``)."""


def scenes_vocabulary() -> Vocabulary:
    """The synthetic scene world's vocabulary (`eah_interp.scenes.SYNONYMS`)."""
    from eah_interp.scenes import SYNONYMS

    return Vocabulary(SYNONYMS, name="scenes")


def coco_vocabulary() -> Vocabulary:
    """The COCO-80 vocabulary with our synonym table."""
    return Vocabulary(COCO_SYNONYMS, name="coco")


def get_vocabulary(vocabulary: str | Vocabulary) -> Vocabulary:
    """``"scenes"``, ``"coco"`` or a `Vocabulary`."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if vocabulary == "scenes":
        return scenes_vocabulary()
    if vocabulary == "coco":
        return coco_vocabulary()
    raise ValueError(f"vocabulary must be 'scenes', 'coco' or a Vocabulary; got {vocabulary!r}.")
