"""POPE question files: read them (several files = several splits), generate them from annotations, write them.

The format is the POPE repository's (github.com/AoiDragon/POPE, ``output/coco/coco_pope_*.json``): one
JSON object a line with ``question_id``, ``image`` (a file name), ``text`` and ``label`` (``"yes"`` or
``"no"``); other fields (``image_id``) are ignored. The split is named by the file:
``coco_pope_random.json`` -> ``random`` (``popular``, ``adversarial`` likewise), any other file by its stem.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from eah_interp.data.items import Dataset, Item, Question, sample_items
from eah_interp.errors import DataFormatError

#: POPE's three ways of choosing absent objects (POPE paper, Li et al. 2023, section 4; repo utils.py).
POPE_SPLITS = ("random", "popular", "adversarial")

#: The POPE repository's question template (main.py, ``--template``).
POPE_TEMPLATE = "Is there a {} in the image?"

_QUESTION = re.compile(r"^is there (?:a|an) (.+?) in the (?:image|picture)\?$", re.IGNORECASE)


def split_name(path: str | Path) -> str:
    """The split a POPE file holds, from its name: ``coco_pope_adversarial.json`` -> ``"adversarial"``."""
    stem = Path(path).stem
    found = [s for s in POPE_SPLITS if re.search(rf"(^|[_\-.]){s}($|[_\-.])", stem)]
    return found[0] if len(found) == 1 else stem


def object_of(question: str) -> str | None:
    """The object a POPE question asks about (``"Is there a dining table in the image?"`` -> ``"dining table"``)."""
    match = _QUESTION.match(question.strip())
    return match.group(1) if match else None


def read_pope(
    files: Sequence[str | Path],
    images: str | Path,
    *,
    objects: Mapping[str, frozenset[str] | set[str]] | None = None,
    n: int | None = None,
    seed: int = 0,
) -> Dataset:
    """POPE question files as one dataset: one item per image, its questions from every file (split).

    Args:
        files: POPE files (JSON lines); each is one split, named by `split_name`.
        images: the folder the ``image`` fields are relative to.
        objects: ground-truth objects per image file name (from COCO instances) to attach, so that
            captions of the same items get CHAIR; None leaves items without objects.
        n: keep ``n`` images (with all their questions) drawn with `sample_items` and ``seed``.

    Raises:
        DataFormatError: naming the file, the line and the field that is wrong, a missing image, or
            two files that name the same split.
    """
    folder = Path(images)
    if not folder.is_dir():
        raise DataFormatError(f"--images {folder}: no such folder; POPE's 'image' fields are read relative to it.")
    if not files:
        raise DataFormatError("read_pope needs at least one POPE file.")
    questions: dict[str, list[Question]] = {}
    split_files: dict[str, Path] = {}
    for file in map(Path, files):
        split = split_name(file)
        if split in split_files:
            raise DataFormatError(f"{file} and {split_files[split]} both hold split {split!r}; pass one file per split.")
        split_files[split] = file
        if not file.is_file():
            raise DataFormatError(f"--pope {file}: no such file.")
        seen: set[str] = set()
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{file}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{where}: not a JSON object ({err.msg}); POPE files hold one object a line.") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{where}: not a JSON object; POPE files hold one object a line.")
            for key in ("question_id", "image", "text", "label"):
                if key not in record:
                    raise DataFormatError(f"{where}: missing field {key!r}.")
            qid, image, text, label = record["question_id"], record["image"], record["text"], record["label"]
            if isinstance(qid, bool) or not isinstance(qid, int | str):
                raise DataFormatError(f"{where}: field 'question_id' should be an int or a string, got {qid!r}.")
            if not isinstance(image, str) or not image:
                raise DataFormatError(f"{where}: field 'image' should be an image file name, got {image!r}.")
            if not isinstance(text, str) or not text.strip():
                raise DataFormatError(f"{where}: field 'text' should be the question, got {text!r}.")
            if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
                raise DataFormatError(f"{where}: field 'label' should be \"yes\" or \"no\", got {label!r}.")
            if not (folder / image).is_file():
                raise DataFormatError(f"{where}: field 'image' names {image!r}, which is not in {folder}.")
            key = f"{split}/{qid}"
            if key in seen:
                raise DataFormatError(f"{where}: field 'question_id' {qid!r} appears twice in this file.")
            seen.add(key)
            question = Question(key, text.strip(), label.strip().lower() == "yes", split, object_of(text))
            questions.setdefault(image, []).append(question)
    items = tuple(
        Item(image, folder / image, None if objects is None or image not in objects else frozenset(objects[image]), tuple(qs))
        for image, qs in questions.items()
    )
    source = {"pope": {split: str(path) for split, path in split_files.items()}, "images": str(folder)}
    return Dataset("pope", items, vocabulary="coco" if objects is not None else None, source=source).sample(n, seed)


def _with_article(template: str, name: str) -> str:
    """``template`` with ``name`` and "a" turned into "an" before a vowel (the POPE files' spelling).

    The repository's ``create_question`` replaces every "a" of the template (``template.replace("a", "an")``),
    which would spell "in the imange"; its released files read "Is there an orange in the image?", which
    is what this writes.
    """
    text = template.format(name)
    if name[:1].lower() in "aeiou":
        text = re.sub(rf"\ba {re.escape(name)}", f"an {name}", text, count=1)
    return text


def generate_pope(
    dataset: Dataset,
    splits: Sequence[str] = POPE_SPLITS,
    *,
    n: int | None = None,
    n_positive: int = 3,
    seed: int = 0,
    template: str = POPE_TEMPLATE,
) -> Dataset:
    """POPE questions from ground-truth objects, sampled as the POPE repository does (``utils.py``, ``main.py``).

    Images with at least ``n_positive`` objects are eligible; ``n`` of them are drawn with ``seed``
    (POPE: 500). Frequencies and co-occurrences are counted over the drawn images. Per image,
    ``n_positive`` present objects (label yes) are asked in every split; for each one absent object (no)
    is chosen, never an object of the image or one already asked about it:

    * ``random``: uniformly among all objects of the drawn images;
    * ``popular``: the most frequent object (ties: by name);
    * ``adversarial``: the object that co-occurs most often with that positive (ties: by name); an
      object that co-occurs with nothing left falls back to a random one, as in the repository.

    Differences from the repository, all deterministic given ``seed``: the positives are the first
    ``n_positive`` objects of a seeded shuffle of the sorted names (the repository takes the first of
    its segmentation file's order, which COCO annotations do not define); a random choice draws from
    the allowed objects instead of redrawing until allowed (same distribution); questions list the
    positives then the negatives (as the released files do).

    Args:
        dataset: items with ``objects`` (e.g. `coco_instances`); items without objects are skipped.
        splits: any of ``"random"``, ``"popular"``, ``"adversarial"``.
        n: images to draw (default: every eligible image).
        n_positive: POPE's ``sample_num`` (3).

    Returns:
        The drawn items with their questions (ids ``"<split>/<k>"``, k counted from 0 per split).
    """
    unknown = [s for s in splits if s not in POPE_SPLITS]
    if unknown:
        raise DataFormatError(f"unknown POPE split(s) {unknown}; choose from {list(POPE_SPLITS)}.")
    eligible = [item for item in dataset.items if item.objects is not None and len(item.objects) >= n_positive]
    if not eligible:
        raise DataFormatError(
            f"no image of {dataset.name!r} has {n_positive} or more ground-truth objects: POPE questions need them "
            "(pass COCO instances with --coco-instances)."
        )
    if n is not None and n > len(eligible):
        raise DataFormatError(f"asked for {n} POPE images but only {len(eligible)} have >= {n_positive} objects.")
    chosen = sample_items(eligible, n, seed) if n is not None else eligible
    frequency: Counter[str] = Counter(o for item in chosen for o in item.objects or ())
    cooccur: dict[str, Counter[str]] = {}
    for item in chosen:
        for a in item.objects or ():
            cooccur.setdefault(a, Counter()).update(b for b in item.objects or () if b != a)
    vocabulary = sorted(frequency)
    popular = sorted(vocabulary, key=lambda o: (-frequency[o], o))
    positive_rng = random.Random(seed)
    positives = {}
    for item in chosen:
        names = sorted(item.objects or ())
        positive_rng.shuffle(names)
        positives[item.id] = names[:n_positive]
    questions: dict[str, list[Question]] = {item.id: [] for item in chosen}
    for split in splits:
        rng = random.Random(f"{seed}/{split}")
        k = 0
        for item in chosen:
            present = item.objects or frozenset()
            history = list(positives[item.id])
            negatives = []
            for pos in positives[item.id]:
                allowed = [o for o in vocabulary if o not in history and o not in present]
                if not allowed:
                    raise DataFormatError(
                        f"image {item.id!r}: no absent object left to ask about (only {len(vocabulary)} object names "
                        "in the drawn images); draw more images."
                    )
                ranked = popular if split == "popular" else (
                    sorted(cooccur.get(pos, {}), key=lambda o: (-cooccur[pos][o], o)) if split == "adversarial" else []
                )
                pick = next((o for o in ranked if o in allowed), None)
                negatives.append(pick if pick is not None else rng.choice(allowed))
                history.append(negatives[-1])
            for name, label in [(p, True) for p in positives[item.id]] + [(o, False) for o in negatives]:
                questions[item.id].append(Question(f"{split}/{k}", _with_article(template, name), label, split, name))
                k += 1
    items = tuple(replace(item, questions=item.questions + tuple(questions[item.id])) for item in chosen)
    source = {**dataset.source, "pope_generated": {"splits": list(splits), "n": n, "n_positive": n_positive,
                                                   "seed": seed, "template": template}}
    return Dataset("pope", items, vocabulary=dataset.vocabulary, chair_protocol=dataset.chair_protocol, source=source)


def write_pope(dataset: Dataset, folder: str | Path, *, prefix: str = "coco") -> list[Path]:
    """Write the dataset's questions as POPE files, one per split: ``<folder>/<prefix>_pope_<split>.json``.

    The ``image`` field is the item id (a file name for file-backed datasets); ``question_id`` is the part
    of the question id after ``"<split>/"`` (an int when it is one). `read_pope` reads them back.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in dataset.splits:
        path = out / f"{prefix}_pope_{split}.json"
        with path.open("w") as f:
            for item in dataset.items:
                for q in item.questions:
                    if q.split != split:
                        continue
                    qid = q.id.split("/", 1)[-1]
                    record = {"question_id": int(qid) if qid.isdigit() else qid, "image": item.id, "text": q.text,
                              "label": "yes" if q.label else "no"}
                    f.write(json.dumps(record) + "\n")
        paths.append(path)
    return paths
