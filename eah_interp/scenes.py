"""A synthetic scene world with exact ground truth, for studying object hallucination offline.

Each scene is a 224x224 RGB picture of 1-4 objects drawn with PIL, from a vocabulary of
15 object kinds (shapes and icons) in random colours, sizes, positions and backgrounds, with its
exact object list. Captions name the objects left to right in a plain sentence; yes/no questions
ask about one present or absent kind.

Object co-occurrence is controllable: some kinds come in strongly paired couples
(``PAIRS``: a *house* brings a *tree*, a *moon* a *star*, an *umbrella* a *cloud*). A model trained
on scenes with a high ``pair_strength`` learns the prior "house ⇒ tree" and names the partner even
when it is absent: the object hallucination EAH targets. Held-out scenes can break the pairs
(lower ``pair_strength``) to measure it.

Splits are kept apart by seed: ``train`` scenes use seeds ``0 .. 10**8-1``, ``heldout`` scenes use
seeds from ``HELDOUT_SEED_OFFSET`` on. A scene is *named* by its split and its index within the split
("held-out scene 20000" is ``get_scene("heldout", 20000)``, seed ``10**8 + 20000``); `make_scene` takes
a raw seed, so ``make_scene(20000)`` is *training* scene 20000. Every scene knows which it is
(`Scene.split`, `Scene.index`, `Scene.name`).

One default co-occurrence strength, `PAIR_STRENGTH` (0.9): the organism was trained and is evaluated on
it, and every study and dataset reader uses it unless told otherwise.

Example:
    >>> scene = get_scene("heldout", 20000)
    >>> scene.seed, scene.name
    (100020000, 'heldout/20000')
    >>> make_scene(20000).name  # a raw seed below 10**8 is a training scene
    'train/20000'
    >>> scene.image.size
    (224, 224)
    >>> sorted(scene.kinds) == sorted(o.kind for o in scene.objects)
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "moon",
    "diamond",
    "ring",
    "arrow",
    "house",
    "tree",
    "flower",
    "umbrella",
    "cloud",
)
"""The object kinds of the world, as they are named in captions and questions."""

SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk", "dot", "ball"),
    "square": ("square", "box", "block", "rectangle"),
    "triangle": ("triangle",),
    "star": ("star",),
    "heart": ("heart",),
    "cross": ("cross", "plus", "plus sign"),
    "moon": ("moon", "crescent", "crescent moon"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "ring": ("ring", "donut", "doughnut", "hoop"),
    "arrow": ("arrow",),
    "house": ("house", "home", "hut", "cottage"),
    "tree": ("tree", "pine", "pine tree"),
    "flower": ("flower", "blossom", "daisy"),
    "umbrella": ("umbrella", "parasol"),
    "cloud": ("cloud",),
}
"""Words (singular) that count as a mention of each kind, for CHAIR. Plurals are handled by the metric."""

PAIRS: dict[str, str] = {"house": "tree", "moon": "star", "umbrella": "cloud"}
"""Strongly paired kinds: when the key is in a scene, the value is added with probability ``pair_strength``."""

HELDOUT_SEED_OFFSET = 10**8
"""Held-out scenes use seeds ``HELDOUT_SEED_OFFSET + i``; training scenes use seeds below it."""

PAIR_STRENGTH = 0.9
"""The default ``pair_strength`` of every scene function: the organism's training and evaluation value."""

SPLITS = ("train", "heldout")
"""The scene splits (`scene_seed`, `get_scene`, `scene_seeds`)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (240, 120, 180),
    "cyan": (40, 200, 210),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
}

# Kinds whose natural colours are fixed-ish (a tree is green, a cloud is white or grey).
_NATURAL_COLOURS: dict[str, tuple[str, ...]] = {
    "tree": ("green",),
    "cloud": ("white", "grey"),
    "moon": ("yellow", "white"),
    "sun": ("yellow",),
}


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: its kind, colour name, centre (x, y) and size (bounding box side, px)."""

    kind: str
    colour: str
    x: int
    y: int
    size: int


@dataclass
class Scene:
    """A picture with its exact object list.

    Attributes:
        image: the 224x224 RGB picture.
        objects: the objects drawn, left to right.
        seed: the seed that made it (scenes are reproducible from it).
    """

    image: Image.Image
    objects: list[SceneObject]
    seed: int
    background: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def split(self) -> str:
        """``"train"`` or ``"heldout"``: the split its seed belongs to (`split_of`)."""
        return split_of(self.seed)[0]

    @property
    def index(self) -> int:
        """Its index within its split (held-out: ``seed - HELDOUT_SEED_OFFSET``)."""
        return split_of(self.seed)[1]

    @property
    def name(self) -> str:
        """``"<split>/<index>"``, e.g. ``"heldout/20000"``: what a report should call it."""
        return f"{self.split}/{self.index}"

    @property
    def kinds(self) -> set[str]:
        """The set of object kinds present."""
        return {o.kind for o in self.objects}

    def caption(self) -> str:
        """The reference caption: the objects named left to right, e.g. ``"A circle, a star and a tree."``"""
        return caption_for([o.kind for o in self.objects])

    def question(self, kind: str) -> tuple[str, str]:
        """A yes/no question about ``kind`` and its true answer (``"Yes"`` or ``"No"``)."""
        return question_for(kind), ("Yes" if kind in self.kinds else "No")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(kinds: list[str]) -> str:
    """The canonical caption naming ``kinds`` in order: ``"A house, a tree and a star."``"""
    if not kinds:
        raise ValueError("a caption needs at least one object")
    phrases = [f"{_article(k)} {k}" for k in kinds]
    if len(phrases) == 1:
        text = phrases[0]
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return text[0].upper() + text[1:] + "."


def question_for(kind: str) -> str:
    """The canonical yes/no question about ``kind``."""
    return f"Is there {_article(kind)} {kind} in the image?"


# ----------------------------------------------------------------------------------------------
# drawing


def _polygon(cx: float, cy: float, r: float, n: int, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.42
        a = -math.pi / 2 + math.pi * i / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, s: int, rgb: tuple[int, int, int], bg: tuple[int, int, int]) -> None:
    r = s / 2
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        q = r * 0.85
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=rgb)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r, 3), fill=rgb)
    elif kind == "star":
        draw.polygon(_star(cx, cy, r), fill=rgb)
    elif kind == "heart":
        q = r * 0.5
        draw.ellipse((cx - r, cy - r * 0.8, cx, cy - r * 0.8 + 2 * q), fill=rgb)
        draw.ellipse((cx, cy - r * 0.8, cx + r, cy - r * 0.8 + 2 * q), fill=rgb)
        draw.polygon([(cx - r * 0.97, cy - r * 0.25), (cx + r * 0.97, cy - r * 0.25), (cx, cy + r)], fill=rgb)
    elif kind == "cross":
        w = r * 0.33
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=rgb)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=rgb)
    elif kind == "moon":
        draw.ellipse(box, fill=rgb)
        off = r * 0.45
        draw.ellipse((cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3), fill=bg)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=rgb)
    elif kind == "ring":
        draw.ellipse(box, outline=rgb, width=max(3, int(r * 0.32)))
    elif kind == "arrow":
        w = r * 0.22
        draw.rectangle((cx - r, cy - w, cx + r * 0.2, cy + w), fill=rgb)
        draw.polygon([(cx + r * 0.1, cy - r * 0.6), (cx + r, cy), (cx + r * 0.1, cy + r * 0.6)], fill=rgb)
    elif kind == "house":
        draw.rectangle((cx - r * 0.7, cy - r * 0.1, cx + r * 0.7, cy + r), fill=rgb)
        draw.polygon([(cx - r * 0.95, cy - r * 0.05), (cx + r * 0.95, cy - r * 0.05), (cx, cy - r)], fill=(150, 40, 30))
        draw.rectangle((cx - r * 0.18, cy + r * 0.4, cx + r * 0.18, cy + r), fill=(70, 40, 20))
    elif kind == "tree":
        draw.rectangle((cx - r * 0.15, cy + r * 0.2, cx + r * 0.15, cy + r), fill=(110, 70, 30))
        draw.polygon([(cx - r * 0.75, cy + r * 0.35), (cx + r * 0.75, cy + r * 0.35), (cx, cy - r)], fill=rgb)
    elif kind == "flower":
        pr = r * 0.36
        for i in range(6):
            a = 2 * math.pi * i / 6
            px, py = cx + r * 0.55 * math.cos(a), cy + r * 0.55 * math.sin(a)
            draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=rgb)
        draw.ellipse((cx - r * 0.3, cy - r * 0.3, cx + r * 0.3, cy + r * 0.3), fill=(250, 220, 40))
    elif kind == "umbrella":
        draw.pieslice((cx - r, cy - r * 0.8, cx + r, cy + r * 1.2), 180, 360, fill=rgb)
        w = max(2, int(r * 0.1))
        draw.line((cx, cy + r * 0.2, cx, cy + r * 0.9), fill=(60, 60, 60), width=w)
        draw.arc((cx - r * 0.3, cy + r * 0.65, cx, cy + r), 0, 180, fill=(60, 60, 60), width=w)
    elif kind == "cloud":
        for dx, dy, rr in ((-0.45, 0.15, 0.45), (0.0, -0.15, 0.55), (0.45, 0.15, 0.45), (0.0, 0.25, 0.4)):
            x0, y0, q = cx + dx * r, cy + dy * r, rr * r
            draw.ellipse((x0 - q, y0 - q, x0 + q, y0 + q), fill=rgb)
    else:  # pragma: no cover - guarded by make_scene
        raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")


def _background(rng: random.Random, size: int) -> tuple[Image.Image, tuple[int, int, int], str]:
    style = rng.choice(["plain", "plain", "gradient", "noise", "stripes"])
    base = tuple(rng.randint(150, 235) for _ in range(3))
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    if style == "gradient":
        other = tuple(rng.randint(120, 240) for _ in range(3))
        for y in range(size):
            t = y / (size - 1)
            draw.line((0, y, size, y), fill=tuple(int(base[i] * (1 - t) + other[i] * t) for i in range(3)))
    elif style == "noise":
        # Gaussian noise around 128 (what Image.effect_noise drew, but from C rand(): another image in every
        # call and process), seeded from the scene generator's state without drawing from it
        sigma = rng.uniform(10, 30)
        gen = np.random.default_rng(list(rng.getstate()[1]))
        pixels = np.clip(128 + sigma * gen.standard_normal((size, size)), 0, 255).astype(np.uint8)
        img = Image.blend(img, Image.fromarray(pixels, "L").convert("RGB"), 0.15)
    elif style == "stripes":
        other = tuple(max(0, c - rng.randint(15, 35)) for c in base)
        step = rng.randint(10, 24)
        for x in range(0, size, 2 * step):
            draw.rectangle((x, 0, x + step - 1, size), fill=other)
    return img, base, style


def make_scene(
    seed: int,
    *,
    n_objects: int | None = None,
    kinds: list[str] | None = None,
    pair_strength: float = PAIR_STRENGTH,
    size: int = 224,
) -> Scene:
    """Draw one scene, reproducibly from ``seed`` (a raw seed: to name a scene by split and index, use `get_scene`).

    Args:
        seed: the scene's seed, not an index: seeds below ``HELDOUT_SEED_OFFSET`` are training scenes,
            held-out scene ``i`` has seed ``HELDOUT_SEED_OFFSET + i`` (`scene_seed`).
        n_objects: number of objects (1-4); random when None.
        kinds: force exactly these kinds (no pairing applied); random when None.
        pair_strength: probability that the partner of a paired kind (``PAIRS``) is added (default
            `PAIR_STRENGTH`).
        size: side of the square image in pixels.

    Returns:
        The ``Scene`` with its image and exact object list (sorted left to right).
    """
    if not 0 <= seed < 2 * HELDOUT_SEED_OFFSET:
        raise ValueError(f"seed must be in [0, {2 * HELDOUT_SEED_OFFSET}); got {seed}. Name a scene by split and "
                         "index with get_scene(split, index).")
    rng = random.Random(seed)
    if kinds is None:
        n = n_objects if n_objects is not None else rng.choice([1, 2, 2, 3, 3, 4])
        if not 1 <= n <= 4:
            raise ValueError(f"n_objects must be in 1..4, got {n}")
        chosen: list[str] = []
        pool = list(KINDS)
        while len(chosen) < n:
            k = rng.choice([p for p in pool if p not in chosen])
            chosen.append(k)
            partner = PAIRS.get(k)
            if partner and partner not in chosen and len(chosen) < 4 and rng.random() < pair_strength:
                chosen.append(partner)
    else:
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown kinds {unknown}; known kinds: {', '.join(KINDS)}")
        if not 1 <= len(kinds) <= 4 or len(set(kinds)) != len(kinds):
            raise ValueError("kinds must be 1-4 distinct object kinds")
        chosen = list(kinds)

    img, bg, style = _background(rng, size)
    draw = ImageDraw.Draw(img)
    placed: list[SceneObject] = []
    margin = 6
    for kind in chosen:
        for _attempt in range(200):
            s = rng.randint(int(size * 0.2), int(size * 0.34))
            x = rng.randint(s // 2 + margin, size - s // 2 - margin)
            y = rng.randint(s // 2 + margin, size - s // 2 - margin)
            if all(abs(x - o.x) > (s + o.size) / 2 + 2 or abs(y - o.y) > (s + o.size) / 2 + 2 for o in placed):
                break
        else:  # pragma: no cover - 4 objects of at most 34% always fit
            raise RuntimeError("could not place objects without overlap")
        names = _NATURAL_COLOURS.get(kind) or tuple(c for c in COLOURS if c not in ("white", "grey"))
        colour = rng.choice(names)
        rgb = COLOURS[colour]
        if sum(abs(a - b) for a, b in zip(rgb, bg, strict=True)) < 90:  # keep objects visible
            colour = "black" if kind not in _NATURAL_COLOURS else colour
            rgb = COLOURS[colour] if kind not in _NATURAL_COLOURS else tuple(max(0, c - 90) for c in rgb)
        _draw(draw, kind, x, y, s, rgb, bg if style == "plain" else _pixel(img, x, y - s // 2))
        placed.append(SceneObject(kind=kind, colour=colour, x=x, y=y, size=s))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    placed.sort(key=lambda o: o.x)
    return Scene(image=img, objects=placed, seed=seed, background=style)


def _pixel(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    x = min(max(0, x), img.width - 1)
    y = min(max(0, y), img.height - 1)
    return img.getpixel((x, y))  # type: ignore[return-value]


def scene_seed(split: Literal["train", "heldout"], index: int) -> int:
    """The seed of scene ``index`` of ``split``: ``index`` (train) or ``HELDOUT_SEED_OFFSET + index`` (held-out).

    Example:
        >>> scene_seed("heldout", 20000)
        100020000
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0 <= index < HELDOUT_SEED_OFFSET:
        raise ValueError(f"a split has scenes 0..{HELDOUT_SEED_OFFSET - 1}; got index {index}.")
    return index if split == "train" else HELDOUT_SEED_OFFSET + index


def split_of(seed: int) -> tuple[str, int]:
    """``(split, index)`` of a seed: the inverse of `scene_seed` (``split_of(20000) == ("train", 20000)``)."""
    if not 0 <= seed < 2 * HELDOUT_SEED_OFFSET:
        raise ValueError(f"seed must be in [0, {2 * HELDOUT_SEED_OFFSET}); got {seed}.")
    return ("train", seed) if seed < HELDOUT_SEED_OFFSET else ("heldout", seed - HELDOUT_SEED_OFFSET)


def get_scene(split: Literal["train", "heldout"], index: int, **options) -> Scene:
    """Scene ``index`` of ``split`` (``get_scene("heldout", 20000)``: seed ``10**8 + 20000``).

    ``options`` are those of `make_scene` (``pair_strength`` defaults to `PAIR_STRENGTH`).
    """
    return make_scene(scene_seed(split, index), **options)


def scene_seeds(split: Literal["train", "heldout"], n: int, start: int = 0) -> range:
    """The seeds of ``n`` scenes of a split, from index ``start``: train and held-out never overlap."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if start < 0 or start + n > HELDOUT_SEED_OFFSET:
        raise ValueError(f"a split has scenes 0..{HELDOUT_SEED_OFFSET - 1}; got {n} from index {start}.")
    first = scene_seed(split, start)
    return range(first, first + n)


def iter_scenes(
    split: Literal["train", "heldout"], n: int, *, start: int = 0, pair_strength: float = PAIR_STRENGTH
) -> Iterator[Scene]:
    """Yield ``n`` scenes of ``split`` from index ``start`` (reproducible; see ``scene_seeds``)."""
    for seed in scene_seeds(split, n, start):
        yield make_scene(seed, pair_strength=pair_strength)


def absent_kinds(scene: Scene, mode: Literal["random", "adversarial"] = "random", rng: random.Random | None = None) -> list[str]:
    """Kinds absent from ``scene``: all of them (``random``), or the partners of present kinds first (``adversarial``)."""
    absent = [k for k in KINDS if k not in scene.kinds]
    if mode == "adversarial":
        partners = [PAIRS[k] for k in scene.kinds if k in PAIRS and PAIRS[k] not in scene.kinds]
        partners += [k for k, v in PAIRS.items() if v in scene.kinds and k not in scene.kinds]
        rest = [k for k in absent if k not in partners]
        (rng or random.Random(scene.seed)).shuffle(rest)
        return partners + rest
    return absent
