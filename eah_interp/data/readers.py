"""Readers: an image folder, COCO ``instances_*.json``, the CHAIR protocol's sample, and the synthetic scenes."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eah_interp.data.items import Dataset, Item, Question
from eah_interp.errors import DataFormatError

#: File endings read as images by `image_folder` (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_folder(path: str | Path, *, n: int | None = None, seed: int = 0) -> Dataset:
    """Every image file directly in ``path`` (sorted by name), or ``n`` of them drawn with ``seed``.

    Items have no objects and no questions: captions are recorded, CHAIR is undefined.

    Args:
        path: a folder of images (``.jpg``, ``.png``, ...; other files are ignored).
        n: keep ``n`` images drawn with `sample_items` (default: all).
        seed: the draw's seed.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataFormatError(f"--images {folder}: no such folder; pass a folder of image files.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataFormatError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder.")
    items = tuple(Item(p.name, p) for p in files)
    return Dataset("folder", items, source={"images": str(folder)}).sample(n, seed)


def _field(record: Any, key: str, kind: type, where: str) -> Any:
    """``record[key]`` if it is a ``kind`` (a bool is not an int here), else a `DataFormatError` naming ``where``."""
    if not isinstance(record, dict) or key not in record:
        raise DataFormatError(f"{where}: missing field {key!r}.")
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DataFormatError(f"{where}: field {key!r} should be {kind.__name__}, got {value!r}.")
    return value


def read_coco_instances(instances_json: str | Path) -> tuple[dict[int, str], dict[int, set[str]]]:
    """File name and ground-truth object names per image id of a COCO ``instances_*.json``.

    Returns:
        ``(files, objects)``: image id -> ``file_name``, image id -> set of category names (empty
        for images without annotations).

    Raises:
        DataFormatError: naming the file, the entry (``images[3]``, ``annotations[17]``) and the field.
    """
    path = Path(instances_json)
    if not path.is_file():
        raise DataFormatError(f"--coco-instances {path}: no such file.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}).") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataFormatError(f"{path}: missing field {key!r} (a list); is this a COCO instances_*.json file?")
    names: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"{path}, categories[{i}]"
        names[_field(cat, "id", int, where)] = _field(cat, "name", str, where)
    files: dict[int, str] = {}
    for i, image in enumerate(data["images"]):
        where = f"{path}, images[{i}]"
        files[_field(image, "id", int, where)] = _field(image, "file_name", str, where)
    objects: dict[int, set[str]] = {image_id: set() for image_id in files}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}, annotations[{i}]"
        image_id, cat = _field(ann, "image_id", int, where), _field(ann, "category_id", int, where)
        if image_id not in files:
            raise DataFormatError(f"{where}: field 'image_id' is {image_id}, which no entry of 'images' has.")
        if cat not in names:
            raise DataFormatError(f"{where}: field 'category_id' is {cat}, which no entry of 'categories' has.")
        objects[image_id].add(names[cat])
    return files, objects


def coco_instances(
    instances_json: str | Path, images: str | Path, *, n: int | None = None, seed: int = 0
) -> Dataset:
    """COCO images with their ground-truth objects (category names), item id = the image's file name.

    Only images of the annotation file whose file exists in ``images`` are kept (a val2014
    annotation file describes 40,504 images; a folder may hold some of them); how many is recorded in
    the dataset's ``source``. ``n`` then draws that many with `sample_items`.

    Args:
        instances_json: a COCO ``instances_*.json`` (``images``, ``annotations``, ``categories``).
        images: the folder of the image files (``file_name`` is relative to it).
        n: keep ``n`` images drawn with ``seed`` (default: all found).
    """
    folder = Path(images)
    if not folder.is_dir():
        raise DataFormatError(f"--images {folder}: no such folder; COCO's file_name entries are read relative to it.")
    files, objects = read_coco_instances(instances_json)
    present = {p.name for p in folder.iterdir()}
    items = tuple(
        Item(name, folder / name, frozenset(objects[image_id]))
        for image_id, name in sorted(files.items(), key=lambda kv: kv[1])
        if name in present
    )
    if not items:
        example = next(iter(files.values()), "(none)")
        raise DataFormatError(
            f"none of the {len(files)} images of {instances_json} is in {folder} (e.g. {example!r}); "
            "pass the folder that holds the annotated images as --images."
        )
    source = {"instances": str(instances_json), "images": str(folder), "annotated": len(files), "found": len(items)}
    return Dataset("coco", items, vocabulary="coco", chair_protocol="reference", source=source).sample(n, seed)


@dataclass(frozen=True)
class ChairProtocol:
    """The caption protocol of a CHAIR evaluation: which images, which request, how long.

    Attributes:
        n: images drawn from the annotated set.
        seed: the draw's seed.
        prompt: the user request (wrapped by the model's chat template).
        max_new_tokens: the generation budget.
        source: where these settings come from, and what is not known.
    """

    n: int = 500
    seed: int = 42
    prompt: str = "Please describe this image in detail."
    max_new_tokens: int = 512
    source: str = (
        "OPERA's chair_eval.py (github.com/shikiw/OPERA): 500 images of COCO val2014, 'Please describe this "
        "image in detail.', max_new_tokens=512, seed 42 (eval_configs/llava-1.5_eval.yaml, run.seed). OPERA "
        "shuffles os.listdir() order, so its exact 500 images depend on the file system and cannot be "
        "reproduced; eah-interp draws from the sorted file names instead. The EAH paper's own CHAIR "
        "settings (number of images, seed, max_new_tokens) were not verified here: unknown."
    )

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                "source": self.source}


#: The settings of the CHAIR evaluations that the EAH paper follows (OPERA's; see `ChairProtocol.source`).
OPERA_CHAIR = ChairProtocol()


def chair_sample(
    instances_json: str | Path, images: str | Path, protocol: ChairProtocol = OPERA_CHAIR
) -> Dataset:
    """The CHAIR protocol's images: ``protocol.n`` annotated COCO images drawn with ``protocol.seed``.

    The prompt and ``max_new_tokens`` of the protocol are recorded in the dataset's ``source``; the
    runner takes them from there only when told to (``eah-interp eval --prompt ... --max-new-tokens``).
    """
    data = coco_instances(instances_json, images, n=protocol.n, seed=protocol.seed)
    return Dataset(
        "chair", data.items, vocabulary="coco", chair_protocol="reference",
        source={**data.source, "chair_protocol": protocol.to_dict()},
    )


def scene_dataset(n: int, *, pair_strength: float = 0.9, question_seed: int = 0) -> Dataset:
    """``n`` held-out synthetic scenes, each with its exact objects and four yes/no questions.

    Item ids are ``"scene <seed>"``. Questions reproduce the scene world's previous evaluation exactly
    (one present kind, one random absent kind, one adversarial absent kind: the partner of a paired
    present kind first; one `random.Random(question_seed)` drawn over the scenes in order). The present
    question belongs to both splits, as before: it is listed once per split (``random/present:<kind>``
    and ``adversarial/present:<kind>``); the runner asks it once and records it for each split.
    """
    from eah_interp.scenes import absent_kinds, iter_scenes, make_scene, question_for

    rng = random.Random(question_seed)
    items = []
    for scene in iter_scenes("heldout", n, pair_strength=pair_strength):
        present = rng.choice(sorted(scene.kinds))
        rand = rng.choice(absent_kinds(scene, "random"))
        adversarial = absent_kinds(scene, "adversarial", rng)[0]
        questions = (
            Question(f"random/present:{present}", question_for(present), True, "random", present),
            Question(f"adversarial/present:{present}", question_for(present), True, "adversarial", present),
            Question(f"random/random:{rand}", question_for(rand), False, "random", rand),
            Question(f"adversarial/adversarial:{adversarial}", question_for(adversarial), False, "adversarial", adversarial),
        )

        def draw(seed: int = scene.seed, strength: float = pair_strength):
            return make_scene(seed, pair_strength=strength).image

        items.append(Item(f"scene {scene.seed}", draw, frozenset(scene.kinds), questions))
    return Dataset(
        "scenes", tuple(items), vocabulary="scenes", chair_protocol="strict",
        source={"scenes": "held-out", "n": n, "pair_strength": pair_strength, "question_seed": question_seed},
    )
