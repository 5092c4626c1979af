"""A tiny COCO-style dataset on disk: real photos from skimage.data, a hand-written instances.json, POPE files.

The ground truth is written by hand for what the photos show (astronaut: a person; chelsea: a cat;
coffee: a cup, a spoon, a table). The annotation file also lists one image that is not on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

#: file name -> (skimage.data function, COCO image id, objects written into instances.json)
PHOTOS = {
    "COCO_val2014_000000000001.jpg": ("astronaut", 1, ["person"]),
    "COCO_val2014_000000000002.jpg": ("chelsea", 2, ["cat"]),
    "COCO_val2014_000000000003.jpg": ("coffee", 3, ["cup", "spoon", "dining table"]),
}

#: COCO category ids (the real COCO-80 ids of these names).
CATEGORIES = {"person": 1, "truck": 8, "cat": 17, "dog": 18, "cup": 47, "spoon": 50, "dining table": 67}


def write_photos(folder: Path) -> Path:
    """The three photos as JPEG files named like COCO val2014 images, plus a stray text file (to be ignored)."""
    from skimage import data as skdata

    folder.mkdir(parents=True, exist_ok=True)
    for name, (function, _, _) in PHOTOS.items():
        Image.fromarray(getattr(skdata, function)()).save(folder / name)
    (folder / "README.txt").write_text("not an image")
    return folder


def write_instances(path: Path, *, extra_image: bool = True) -> Path:
    """A COCO instances.json for `PHOTOS` (and one annotated image that is not on disk)."""
    images = [{"id": image_id, "file_name": name, "width": 1, "height": 1} for name, (_, image_id, _) in PHOTOS.items()]
    annotations = []
    for _, image_id, objects in PHOTOS.values():
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORIES[obj]})
    annotations.append({"id": len(annotations) + 1, "image_id": 1, "category_id": CATEGORIES["person"]})  # 2nd person
    if extra_image:
        images.append({"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "width": 1, "height": 1})
        annotations.append({"id": len(annotations) + 1, "image_id": 99, "category_id": CATEGORIES["dog"]})
    categories = [{"id": i, "name": n, "supercategory": "x"} for n, i in CATEGORIES.items()]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


#: Hand-written POPE questions (POPE repository format), two splits.
POPE_RANDOM = [
    {"question_id": 0, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a person in the image?", "label": "yes"},
    {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "no"},
    {"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a cat in the image?", "label": "yes"},
    {"question_id": 3, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a truck in the image?", "label": "no"},
]
POPE_ADVERSARIAL = [
    {"question_id": 0, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a person in the image?", "label": "yes"},
    {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cup in the image?", "label": "no"},
    {"question_id": 2, "image": "COCO_val2014_000000000003.jpg", "text": "Is there a cup in the image?", "label": "yes"},
    {"question_id": 3, "image": "COCO_val2014_000000000003.jpg", "text": "Is there a dog in the image?", "label": "no"},
]


def write_pope_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def photo_dataset(root: Path) -> dict[str, Path]:
    """Photos, instances.json and two POPE files under ``root``: their paths by role."""
    images = write_photos(root / "val2014")
    return {
        "images": images,
        "instances": write_instances(root / "instances_val2014.json"),
        "pope_random": write_pope_file(root / "coco_pope_random.json", POPE_RANDOM),
        "pope_adversarial": write_pope_file(root / "coco_pope_adversarial.json", POPE_ADVERSARIAL),
    }
