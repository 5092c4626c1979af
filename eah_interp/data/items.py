"""The dataset protocol: an `Item` (an image, its objects when known, its yes/no questions) and a `Dataset`.

Every reader in `eah_interp.data` returns a `Dataset`; the runners (`eah_interp.evaluation`, the CLI)
consume its items and never know where they came from.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from eah_interp.errors import DataFormatError

#: What an item's image may be: a file, a loaded picture, or a function that draws it on demand.
ImageSource = str | Path | Image.Image | Callable[[], Image.Image]


@dataclass(frozen=True)
class Question:
    """One yes/no question about an item's image.

    Attributes:
        id: unique within its item across splits (readers use ``"<split>/<question id>"``).
        text: the question as asked, e.g. ``"Is there a dog in the image?"``.
        label: the true answer (True = yes).
        split: the POPE split it belongs to (``"random"``, ``"popular"``, ``"adversarial"``, or a file's name).
        object: the object asked about, when known.
    """

    id: str
    text: str
    label: bool
    split: str
    object: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "label": self.label, "split": self.split, "object": self.object}


@dataclass(frozen=True, eq=False)
class Item:
    """One image of a dataset.

    Attributes:
        id: a stable string key (a file name, ``"scene 100000003"``): the results store is keyed by it.
        image: a path, a PIL image, or a zero-argument function returning one; `load_image` reads it.
        objects: the ground-truth object names, or None when unknown (then CHAIR is undefined for it).
        questions: its yes/no questions (empty when the dataset has none).
    """

    id: str
    image: ImageSource = field(repr=False)
    objects: frozenset[str] | None = None
    questions: tuple[Question, ...] = ()

    def load_image(self) -> Image.Image:
        """The image as an RGB PIL image (read from disk, or drawn, on every call: nothing is cached).

        Raises:
            DataFormatError: the file does not exist or is not a readable image (corrupt, truncated).
        """
        source = self.image
        if isinstance(source, Image.Image):
            return source.convert("RGB")
        if isinstance(source, str | Path):
            path = Path(source)
            if not path.is_file():
                raise DataFormatError(f"item {self.id!r}: image file {path} does not exist.")
            try:
                with Image.open(path) as image:
                    return image.convert("RGB")
            except (OSError, SyntaxError, ValueError) as err:  # PIL: unidentified, truncated, broken headers
                raise DataFormatError(f"cannot read image {path} ({err}): replace or remove that file.") from None
        return source().convert("RGB")


@dataclass(frozen=True)
class Dataset:
    """A named, ordered collection of items and how it was made.

    Attributes:
        name: a short name for reports (``"coco"``, ``"pope"``, ``"scenes"``, ``"folder"``).
        items: the items, in a fixed order (item ids are unique).
        vocabulary: the CHAIR vocabulary of its object names (``"coco"``, ``"scenes"``), None without objects.
        chair_protocol: the default CHAIR matching protocol for it (``"reference"`` or ``"strict"``).
        source: how it was made (files, seed, n, ...): written into every run's ``run.json``.
    """

    name: str
    items: tuple[Item, ...]
    vocabulary: str | None = None
    chair_protocol: str = "reference"
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise DataFormatError(f"dataset {self.name!r} has two items with id {item.id!r}; item ids must be unique.")
            seen.add(item.id)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    @property
    def splits(self) -> list[str]:
        """The question splits present, in first-seen order."""
        return list(dict.fromkeys(q.split for item in self.items for q in item.questions))

    @property
    def n_questions(self) -> int:
        return sum(len(item.questions) for item in self.items)

    def sample(self, n: int | None, seed: int = 0) -> Dataset:
        """`sample_items` on this dataset's items; records ``n`` and ``seed`` in `source`."""
        if n is None:
            return self
        if n >= len(self.items):  # fewer than asked for: keep all, and say so in describe()
            return replace(self, source={**self.source, "n_requested": n}) if n > len(self.items) else self
        return replace(self, items=tuple(sample_items(self.items, n, seed)), source={**self.source, "n": n, "seed": seed})

    def describe(self) -> str:
        """One sentence: what the dataset holds."""
        with_objects = sum(item.objects is not None for item in self.items)
        splits = ", ".join(f"{s}" for s in self.splits) or "none"
        short = self.source.get("n_requested")
        asked = f" (asked for {short}: only {len(self.items)} available)" if short else ""
        return (
            f"{self.name}: {len(self.items)} images{asked} ({with_objects} with ground-truth objects), "
            f"{self.n_questions} yes/no questions (splits: {splits})."
        )


def sample_items(items: Sequence[Item], n: int, seed: int = 0) -> list[Item]:
    """``n`` items drawn without replacement with ``random.Random(seed)``, kept in their original order.

    The draw depends only on the item ids (sorted), ``n`` and ``seed``: the same files give the same
    sample on every machine, whatever order the file system lists them in.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}.")
    if n >= len(items):
        return list(items)
    chosen = set(random.Random(seed).sample(sorted(item.id for item in items), n))
    return [item for item in items if item.id in chosen]


class LazyImages(Sequence[Image.Image]):
    """The items' images as a sequence that reads each image only when indexed (slices read a batch)."""

    def __init__(self, items: Sequence[Item]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [item.load_image() for item in self.items[index]]
        return self.items[index].load_image()
