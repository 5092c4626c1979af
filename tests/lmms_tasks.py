"""Local lmms-eval tasks on real photos (skimage.data): a POPE and a CHAIR-style caption task, offline.

Each task is a YAML file that ``include:``s lmms-eval's stock task and points it at a local parquet file
(``dataset_path: parquet`` + ``dataset_kwargs.data_files``), the recipe of docs/howto/lmms_eval.md. The
CHAIR-style task keeps coco_cap_chair's prompt and generation settings but scores with eah-interp's CHAIR
(lmms-eval's needs nltk's punkt, tagger and WordNet data, which cannot be downloaded offline) and
generates 24 tokens instead of 2048.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from eah_interp.interventions import Intervention
from tests.photos import PHOTOS, POPE_ADVERSARIAL, POPE_RANDOM

#: The task names the YAML files define.
POPE_TASK = "pope_local"
CHAIR_TASK = "chair_local"

_CHAIR_UTILS = '''"""process_results of the local CHAIR-style task: eah-interp's CHAIR (reference protocol) per caption."""

from eah_interp.metrics.chair import chair_scores


def process(doc, results):
    scores = chair_scores([results[0]], [list(doc["gt_object"])], vocabulary="coco")
    row = {"mentions": scores["n_mentions"], "hallucinated": scores["n_hallucinated"]}
    return {"chair_i_local": row, "mentions_local": row}


def chair_i(rows):
    mentions = sum(r["mentions"] for r in rows)
    return sum(r["hallucinated"] for r in rows) / mentions if mentions else 0.0


def mentions(rows):
    return float(sum(r["mentions"] for r in rows))
'''


@dataclass(frozen=True)
class Explode(Intervention):
    """An intervention that raises inside the model's forward (``explode`` in a spec): the run must stop."""

    point: ClassVar[str] = "probs"

    def edit(self, tensor, site):
        raise RuntimeError("Explode: raised inside the attention call")

    def describe(self) -> str:
        return "raises"


def _photos() -> dict[str, object]:
    from PIL import Image
    from skimage import data as skdata

    return {name: Image.fromarray(getattr(skdata, function)()) for name, (function, _, _) in PHOTOS.items()}


def pope_rows(repeat: int = 1) -> list[dict]:
    """POPE questions in lmms-lab's POPE columns (question_id, question, answer, image_source, category)."""
    rows = []
    for copy in range(repeat):
        for split, records in (("random", POPE_RANDOM), ("adversarial", POPE_ADVERSARIAL)):
            for r in records:
                rows.append({
                    "question_id": str(len(rows)), "question": r["text"], "answer": r["label"],
                    "image_source": r["image"], "category": split, "_copy": copy,
                })
    return rows


def write_tasks(folder: Path, *, pope_repeat: int = 1) -> Path:
    """Write the parquet files and task YAMLs into ``folder`` (pass it as ``--include_path``)."""
    import datasets
    import lmms_eval

    folder.mkdir(parents=True, exist_ok=True)
    photos = _photos()
    stock = Path(lmms_eval.__file__).parent / "tasks"

    rows = pope_rows(pope_repeat)
    pope = datasets.Dataset.from_dict({
        "question_id": [r["question_id"] for r in rows],
        "question": [r["question"] for r in rows],
        "answer": [r["answer"] for r in rows],
        "image_source": [r["image_source"] for r in rows],
        "category": [r["category"] for r in rows],
        "image": [photos[r["image_source"]] for r in rows],
    }).cast_column("image", datasets.Image())
    pope.to_parquet(str(folder / "pope.parquet"))
    (folder / f"{POPE_TASK}.yaml").write_text(
        f"include: {stock / 'pope' / 'pope_random.yaml'}\n"
        f"task: {POPE_TASK}\n"
        "dataset_path: parquet\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    random: pope.parquet\n"
        "generation_kwargs:\n"
        "  max_new_tokens: 8\n"
        "  temperature: 0\n"
        "  top_p: 0\n"
        "  num_beams: 1\n"
        "  do_sample: false\n"
    )

    names = list(PHOTOS)
    chair = datasets.Dataset.from_dict({
        "question_id": [str(PHOTOS[n][1]) for n in names],
        "gt_object": [PHOTOS[n][2] for n in names],
        "image": [photos[n] for n in names],
    }).cast_column("image", datasets.Image())
    chair.to_parquet(str(folder / "chair.parquet"))
    (folder / "chair_local_utils.py").write_text(_CHAIR_UTILS)
    (folder / f"{CHAIR_TASK}.yaml").write_text(
        f"include: {stock / 'coco_cap_chair' / 'coco_cap_chair.yaml'}\n"
        f"task: {CHAIR_TASK}\n"
        "dataset_path: parquet\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        "    test: chair.parquet\n"
        "generation_kwargs:\n"
        "  max_new_tokens: 24\n"
        "  temperature: 0\n"
        "  top_p: 1.0\n"
        "  num_beams: 1\n"
        "  do_sample: false\n"
        "  until: []\n"
        "process_results: !function chair_local_utils.process\n"
        "metric_list:\n"
        "  - metric: chair_i_local\n"
        "    aggregation: !function chair_local_utils.chair_i\n"
        "    higher_is_better: false\n"
        "  - metric: mentions_local\n"
        "    aggregation: !function chair_local_utils.mentions\n"
        "    higher_is_better: false\n"
    )
    return folder
