"""Dataset readers: image folders, COCO instances, the CHAIR sample, POPE files and generation, scenes.

Expected values are written by hand from the fixture files (tests/photos.py) and the POPE repository's
sampling rules, never read back from the readers themselves.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eah_interp.data import (
    OPERA_CHAIR,
    ChairProtocol,
    Dataset,
    Item,
    LazyImages,
    chair_sample,
    coco_instances,
    generate_pope,
    image_folder,
    read_coco_instances,
    read_pope,
    sample_items,
    scene_dataset,
    split_name,
    write_pope,
)
from eah_interp.data.pope import _with_article, object_of
from eah_interp.errors import DataFormatError, EAHError
from tests.photos import PHOTOS, photo_dataset, write_pope_file

A, B, C = sorted(PHOTOS)  # the three photo file names


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return photo_dataset(tmp_path_factory.mktemp("coco"))


# ----------------------------------------------------------------------------- folder, COCO, sampling
def test_image_folder_reads_images_only_in_name_order_as_rgb(files):
    data = image_folder(files["images"])
    assert [item.id for item in data] == [A, B, C]  # README.txt ignored
    assert all(item.objects is None and item.questions == () for item in data)
    image = data.items[1].load_image()
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (451, 300)  # chelsea
    assert data.vocabulary is None and data.splits == []
    more = image_folder(files["images"], n=10)
    assert len(more) == 3 and "asked for 10: only 3 available" in more.describe()


def test_grey_image_files_load_as_rgb(tmp_path):
    from skimage import data as skdata

    Image.fromarray(skdata.camera()).save(tmp_path / "camera.png")
    assert Image.open(tmp_path / "camera.png").mode == "L"
    assert image_folder(tmp_path).items[0].load_image().mode == "RGB"


def test_sampling_is_seeded_and_independent_of_listing_order():
    items = [Item(f"img{i:02d}.jpg", Image.new("RGB", (2, 2))) for i in range(20)]
    a = sample_items(items, 5, seed=3)
    b = sample_items(list(reversed(items)), 5, seed=3)
    assert len(a) == 5 and {i.id for i in a} == {i.id for i in b}
    assert [i.id for i in a] == sorted(i.id for i in a)  # original order kept
    assert {i.id for i in sample_items(items, 5, seed=4)} != {i.id for i in a}
    assert sample_items(items, 50, seed=0) == items


def test_missing_folder_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(DataFormatError, match="no such folder"):
        image_folder(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataFormatError, match="no image files"):
        image_folder(tmp_path)


def test_coco_instances_maps_image_ids_to_files_and_objects(files):
    ids, objects = read_coco_instances(files["instances"])
    assert ids == {1: A, 2: B, 3: C, 99: "COCO_val2014_000000000099.jpg"}
    assert objects == {1: {"person"}, 2: {"cat"}, 3: {"cup", "spoon", "dining table"}, 99: {"dog"}}
    data = coco_instances(files["instances"], files["images"])
    assert [(item.id, item.objects) for item in data] == [
        (A, frozenset({"person"})), (B, frozenset({"cat"})), (C, frozenset({"cup", "spoon", "dining table"})),
    ]  # image 99 is annotated but not on disk: left out, and counted
    assert data.source["annotated"] == 4 and data.source["found"] == 3 and data.vocabulary == "coco"
    assert data.chair_protocol == "reference"


@pytest.mark.parametrize(
    ("edit", "where", "field"),
    [
        (lambda d: d["images"][1].pop("file_name"), "images[1]", "file_name"),
        (lambda d: d["annotations"][2].update(category_id=12345), "annotations[2]", "category_id"),
        (lambda d: d["annotations"][0].update(image_id="1"), "annotations[0]", "image_id"),
        (lambda d: d["categories"][0].update(name=None), "categories[0]", "name"),
    ],
)
def test_malformed_instances_name_the_file_entry_and_field(files, tmp_path, edit, where, field):
    data = json.loads(files["instances"].read_text())
    edit(data)
    bad = tmp_path / "instances_bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as err:
        read_coco_instances(bad)
    assert str(bad) in str(err.value) and where in str(err.value) and repr(field) in str(err.value)
    assert isinstance(err.value, EAHError)


def test_instances_that_are_not_coco_are_an_error(tmp_path):
    (tmp_path / "x.json").write_text('{"images": []}')
    with pytest.raises(DataFormatError, match="'annotations'"):
        read_coco_instances(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_coco_instances(tmp_path / "y.json")


def test_chair_protocol_is_opera_s_and_draws_n_images_with_its_seed(files):
    assert (OPERA_CHAIR.n, OPERA_CHAIR.prompt, OPERA_CHAIR.max_new_tokens, OPERA_CHAIR.seed) == (
        500, "Please describe this image in detail.", 512, 42,
    )
    assert "shikiw/OPERA" in OPERA_CHAIR.source and "unknown" in OPERA_CHAIR.source
    data = chair_sample(files["instances"], files["images"], ChairProtocol(n=2, seed=42))
    assert len(data) == 2 and data.vocabulary == "coco"
    assert data.source["chair_protocol"]["prompt"] == "Please describe this image in detail."
    again = chair_sample(files["instances"], files["images"], ChairProtocol(n=2, seed=42))
    assert [i.id for i in data] == [i.id for i in again]


# ----------------------------------------------------------------------------- POPE files
def test_pope_files_become_items_with_questions_per_split(files):
    data = read_pope([files["pope_random"], files["pope_adversarial"]], files["images"])
    assert data.splits == ["random", "adversarial"]
    by_id = {item.id: item for item in data}
    assert list(by_id) == [A, B, C] and all(item.objects is None for item in data)
    assert [(q.id, q.label, q.object) for q in by_id[A].questions] == [
        ("random/0", True, "person"), ("random/1", False, "dog"),
        ("adversarial/0", True, "person"), ("adversarial/1", False, "cup"),
    ]
    assert [q.split for q in by_id[C].questions] == ["adversarial", "adversarial"]
    assert data.n_questions == 8
    with_objects = read_pope([files["pope_random"]], files["images"], objects={A: {"person"}})
    assert with_objects.items[0].objects == frozenset({"person"}) and with_objects.items[1].objects is None


def test_split_names_come_from_file_names():
    assert split_name("output/coco/coco_pope_random.json") == "random"
    assert split_name("aokvqa_pope_seem_adversarial.json") == "adversarial"
    assert split_name("gqa-popular.jsonl") == "popular"
    assert split_name("my_questions.json") == "my_questions"
    assert object_of("Is there a dining table in the image?") == "dining table"
    assert object_of("Is there an orange in the image?") == "orange"
    assert object_of("What colour is the cat?") is None


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"question_id": 7, "image": "%s", "text": "Is there a cat in the image?", "label": "maybe"}', "label"),
        ('{"question_id": 7, "image": "%s", "label": "yes"}', "text"),
        ('{"question_id": 7, "image": "missing.jpg", "text": "Is there a cat?", "label": "no"}', "image"),
        ('{"question_id": [7], "image": "%s", "text": "Is there a cat?", "label": "no"}', "question_id"),
        ('{"question_id": 0, "image": "%s", "text": "Is there a cat?", "label": "no"}', "question_id"),  # duplicate id
    ],
)
def test_malformed_pope_lines_name_the_file_line_and_field(files, tmp_path, line, field):
    good = [json.dumps(r) for r in json.loads(json.dumps([
        {"question_id": 0, "image": A, "text": "Is there a person in the image?", "label": "yes"},
        {"question_id": 1, "image": A, "text": "Is there a dog in the image?", "label": "no"},
    ]))]
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text("\n".join(good + ["", line.replace("%s", B)]) + "\n")  # the bad one is line 4
    with pytest.raises(DataFormatError) as err:
        read_pope([bad], files["images"])
    message = str(err.value)
    assert str(bad) in message and "line 4" in message and repr(field) in message


def test_pope_file_that_is_not_json_lines_and_two_files_of_one_split(files, tmp_path):
    bad = tmp_path / "coco_pope_popular.json"
    bad.write_text(json.dumps([{"question_id": 0}]))  # a JSON array, not JSON lines
    with pytest.raises(DataFormatError, match="line 1: not a JSON object"):
        read_pope([bad], files["images"])
    copy = write_pope_file(tmp_path / "other_random.json", [])
    with pytest.raises(DataFormatError, match="both hold split 'random'"):
        read_pope([files["pope_random"], copy], files["images"])


def test_pope_n_keeps_whole_images(files):
    data = read_pope([files["pope_random"], files["pope_adversarial"]], files["images"], n=2, seed=0)
    assert len(data) == 2
    full = {item.id: item for item in read_pope([files["pope_random"], files["pope_adversarial"]], files["images"])}
    assert all(item.questions == full[item.id].questions for item in data)


# ----------------------------------------------------------------------------- POPE generation
#: A hand-made annotation set: four images and their objects.
OBJECTS = {
    "a.jpg": {"person", "dog", "frisbee"},
    "b.jpg": {"person", "car", "bus"},
    "c.jpg": {"person", "dog", "car"},
    "d.jpg": {"cat", "couch", "tv", "umbrella"},
}
#: Counted by hand from OBJECTS: images containing each object, most frequent first (ties by name).
POPULAR = ["person", "car", "dog", "bus", "cat", "couch", "frisbee", "tv", "umbrella"]
#: Co-occurrence counts by hand: COOCCUR[x][y] = images holding both x and y.
COOCCUR = {
    "person": {"dog": 2, "car": 2, "frisbee": 1, "bus": 1},
    "dog": {"person": 2, "frisbee": 1, "car": 1},
    "frisbee": {"person": 1, "dog": 1},
    "car": {"person": 2, "bus": 1, "dog": 1},
    "bus": {"person": 1, "car": 1},
    "cat": {"couch": 1, "tv": 1, "umbrella": 1},
    "couch": {"cat": 1, "tv": 1, "umbrella": 1},
    "tv": {"cat": 1, "couch": 1, "umbrella": 1},
    "umbrella": {"cat": 1, "couch": 1, "tv": 1},
}


def annotated() -> Dataset:
    items = tuple(Item(name, Image.new("RGB", (4, 4)), frozenset(objs)) for name, objs in OBJECTS.items())
    return Dataset("hand", items + (Item("none.jpg", Image.new("RGB", (4, 4))),), vocabulary="coco")


def test_generated_pope_follows_the_repository_sampling():
    data = generate_pope(annotated(), seed=5)
    assert data.splits == ["random", "popular", "adversarial"] and [i.id for i in data] == list(OBJECTS)
    for item in data:
        present = OBJECTS[item.id]
        by_split = {s: [q for q in item.questions if q.split == s] for s in data.splits}
        positives = [q.object for q in by_split["random"] if q.label]
        assert len(positives) == 3 and set(positives) <= present
        for qs in by_split.values():
            assert [q.object for q in qs if q.label] == positives  # the same positives in every split
            negatives = [q.object for q in qs if not q.label]
            assert len(negatives) == 3 and len(set(negatives)) == 3 and not set(negatives) & present
            assert [q.label for q in qs] == [True] * 3 + [False] * 3
        # popular: the three most frequent objects absent from the image
        assert [q.object for q in by_split["popular"] if not q.label] == [o for o in POPULAR if o not in present][:3]
        # adversarial: per positive, its most frequent co-occurring absent object not yet asked (else random)
        history = list(positives)
        for positive, asked in zip(positives, [q.object for q in by_split["adversarial"] if not q.label], strict=True):
            ranked = sorted(COOCCUR[positive], key=lambda o: (-COOCCUR[positive][o], o))
            expected = next((o for o in ranked if o not in present and o not in history), None)
            if expected is not None:
                assert asked == expected
            history.append(asked)
    # d.jpg's objects co-occur only with each other: all its adversarial negatives are random fallbacks
    questions = {q.id: q for item in data for q in item.questions}
    assert questions["random/0"].text.startswith("Is there a") and questions["random/0"].id == "random/0"
    assert len({q.id for item in data for q in item.questions}) == 4 * 6 * 3


def test_generated_pope_is_seeded():
    first = [q for item in generate_pope(annotated(), seed=1) for q in item.questions]
    again = [q for item in generate_pope(annotated(), seed=1) for q in item.questions]
    other = [q for item in generate_pope(annotated(), seed=2) for q in item.questions]
    assert first == again and first != other


def test_generated_pope_n_and_errors():
    assert len(generate_pope(annotated(), ["random"], n=2, seed=0)) == 2
    with pytest.raises(DataFormatError, match="only 4 have"):
        generate_pope(annotated(), n=5)
    with pytest.raises(DataFormatError, match="unknown POPE split"):
        generate_pope(annotated(), ["hard"])
    with pytest.raises(DataFormatError, match="3 or more ground-truth objects"):
        generate_pope(Dataset("x", (Item("a", Image.new("RGB", (2, 2)), frozenset({"cat"})),)))


def test_question_articles():
    assert _with_article("Is there a {} in the image?", "umbrella") == "Is there an umbrella in the image?"
    assert _with_article("Is there a {} in the image?", "tv") == "Is there a tv in the image?"
    assert _with_article("Is there a {} in the image?", "apple") == "Is there an apple in the image?"


def test_written_pope_files_read_back(files, tmp_path):
    data = generate_pope(coco_instances(files["instances"], files["images"]), n_positive=1, seed=0)
    paths = write_pope(data, tmp_path / "pope")
    assert [p.name for p in paths] == ["coco_pope_random.json", "coco_pope_popular.json", "coco_pope_adversarial.json"]
    first = json.loads(paths[0].read_text().splitlines()[0])
    assert set(first) == {"question_id", "image", "text", "label"} and first["label"] in ("yes", "no")
    back = read_pope(paths, files["images"])
    assert [(i.id, i.questions) for i in back] == [(i.id, i.questions) for i in data]


# ----------------------------------------------------------------------------- scenes
def test_scene_dataset_keeps_the_previous_evaluation_questions():
    # the questions the scene-world evaluation asked before the dataset runner (its pope_questions_for with
    # random.Random(0) over held-out scenes, pair strength 0.9), recorded from the previous code
    before = [
        ("tree", "ring", "house"),
        ("tree", "triangle", "house"),
        ("umbrella", "square", "house"),
        ("triangle", "house", "star"),
        ("star", "flower", "moon"),
    ]
    data = scene_dataset(5)
    assert [item.id for item in data] == [f"scene {100000000 + i}" for i in range(5)]
    for item, (present, rand, adversarial) in zip(data, before, strict=True):
        got = [(q.split, q.object, q.label) for q in item.questions]
        assert got == [("random", present, True), ("adversarial", present, True),
                       ("random", rand, False), ("adversarial", adversarial, False)]
        assert item.questions[0].text == item.questions[1].text  # one question, listed in both splits
        assert present in item.objects and rand not in item.objects and adversarial not in item.objects
    assert data.vocabulary == "scenes" and data.chair_protocol == "strict"
    assert data.items[0].load_image().size == (224, 224)


def test_lazy_images_read_on_demand(files):
    data = image_folder(files["images"])
    lazy = LazyImages(data.items)
    assert len(lazy) == 3 and lazy[0].size == (512, 512) and [im.size for im in lazy[1:3]] == [(451, 300), (600, 400)]


def test_duplicate_item_ids_are_an_error():
    with pytest.raises(DataFormatError, match="two items with id"):
        Dataset("x", (Item("a", Image.new("RGB", (2, 2))), Item("a", Image.new("RGB", (2, 2)))))
