"""Datasets: an item protocol and readers for image folders, COCO, CHAIR, POPE and the synthetic scenes.

An `Item` is an image with a stable id, its ground-truth objects when known and its yes/no
questions; a `Dataset` is an ordered tuple of items with the CHAIR vocabulary of its object names
and a record of how it was made. The runners consume items only. The folder also ships the package's
data files (``organism.safetensors``), which are not Python modules.

Example:
    >>> from eah_interp.data import scene_dataset
    >>> data = scene_dataset(2)
    >>> [item.id for item in data], data.splits
    (['scene 100000000', 'scene 100000001'], ['random', 'adversarial'])
"""

from eah_interp.data.items import Dataset, ImageSource, Item, LazyImages, Question, sample_items
from eah_interp.data.pope import POPE_SPLITS, POPE_TEMPLATE, generate_pope, read_pope, split_name, write_pope
from eah_interp.data.readers import (
    OPERA_CHAIR,
    ChairProtocol,
    chair_sample,
    coco_instances,
    image_folder,
    read_coco_instances,
    scene_dataset,
)

__all__ = [
    "OPERA_CHAIR",
    "POPE_SPLITS",
    "POPE_TEMPLATE",
    "ChairProtocol",
    "Dataset",
    "ImageSource",
    "Item",
    "LazyImages",
    "Question",
    "chair_sample",
    "coco_instances",
    "generate_pope",
    "image_folder",
    "read_coco_instances",
    "read_pope",
    "sample_items",
    "scene_dataset",
    "split_name",
    "write_pope",
]
