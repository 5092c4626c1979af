"""The lmms-eval plugin (``--model eah``) on a tiny ``save_pretrained`` LLaVA and local parquet tasks, offline.

Needs lmms-eval (``pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3``): CI runs this
file in its own environment (``.ci/lmms-env``); elsewhere it is skipped.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("EAH_REQUIRE_LMMS") == "1":  # .ci/lmms-env: these tests must run, not skip
    import lmms_eval  # noqa: F401
pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed (pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3); "
    "CI runs these tests in .venv-lmms (.ci/lmms-env)",
)

from tests.lmms_tasks import Explode  # noqa: E402,F401 - "explode" in a spec names it

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from tests.lmms_tasks import write_tasks

    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    return write_tasks(tmp_path_factory.mktemp("lmms-tasks"))


@pytest.fixture(scope="module")
def task_manager(tasks):
    from lmms_eval.tasks import TaskManager

    return TaskManager("WARNING", include_path=str(tasks), include_defaults=False)


def evaluate(task_manager, model: str, model_args: str, tasks=("pope_local",), **kwargs):
    """lmms-eval's ``simple_evaluate`` on the local tasks, samples logged; ``{task: [sample, ...]}`` and results."""
    from lmms_eval.evaluator import simple_evaluate

    results = simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), batch_size=1, device="cpu", log_samples=True,
        task_manager=task_manager, verbosity="WARNING", bootstrap_iters=0, **kwargs,
    )
    return {t: sorted(results["samples"][t], key=lambda s: s["doc_id"]) for t in tasks}, results


def answers(samples) -> dict[int, str]:
    return {s["doc_id"]: s["resps"][0][0] for s in samples}


def notes(samples) -> dict[int, dict]:
    return {s["doc_id"]: s["token_counts"][0]["eah_interp"] for s in samples}


def args(checkpoint, **extra) -> str:
    return ",".join([f"pretrained={checkpoint}", "device_map=cpu", *(f"{k}={v}" for k, v in extra.items())])


# ---------------------------------------------------------------------------------------------- parsing
def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model

    from eah_interp.integrations.lmms_eval import InterventionModel

    assert get_model("eah") is InterventionModel


@pytest.mark.parametrize(
    ("kwargs", "expected", "rest"),
    [
        ({"pretrained": "p", "interventions": "eah", "base": "llava_hf"}, "eah", {"pretrained": "p", "base": "llava_hf"}),
        ({"interventions": "'pai(alpha=0.5,layers=[2])'"}, "pai(alpha=0.5,layers=[2])", {}),  # quoted: kept whole
        ({"dtype": "float32", "interventions": "pai(alpha=0.5", "layers": "[2])", "device_map": "cpu"},
         "pai(alpha=0.5,layers=[2])", {"dtype": "float32", "device_map": "cpu"}),
        ({"interventions": "eah+head-scale(heads=[[1,0]]", "scale": 2, "phase": "prefill)", "base": "x"},
         "eah+head-scale(heads=[[1,0]],scale=2,phase=prefill)", {"base": "x"}),
        ({"pretrained": "p"}, "none", {"pretrained": "p"}),
    ],
)
def test_a_spec_cut_by_lmms_evals_comma_split_is_put_back(kwargs, expected, rest):
    from eah_interp.integrations.lmms_eval import rejoin_spec

    assert rejoin_spec(kwargs) == (expected, rest)


def test_an_unclosed_spec_is_refused():
    from eah_interp.errors import ConfigError
    from eah_interp.integrations.lmms_eval import rejoin_spec

    with pytest.raises(ConfigError, match="unclosed"):
        rejoin_spec({"dtype": "float32", "interventions": "pai(alpha=0.5", "device_map": "cpu)x("})


def test_var_without_dims_says_how_to_find_them(llava_checkpoint):
    from lmms_eval.models import get_model

    from eah_interp.errors import ConfigError

    with pytest.raises(ConfigError, match="eah-interp scan") as info:
        get_model("eah").create_from_arg_string(args(llava_checkpoint, interventions="var"), {"batch_size": 1, "device": "cpu"})
    assert "var(dims=[" in str(info.value)


def test_eah_gets_the_threshold_scaled_to_the_image_tokens(llava_checkpoint):
    """The tiny LLaVA has 16 image tokens per image: EAH's threshold is 0.0008 * 576 / 16, as load_model scales it."""
    from lmms_eval.models import get_model

    from eah_interp.interventions import EAH, PAI, parse

    lm = get_model("eah").create_from_arg_string(
        args(llava_checkpoint, interventions="eah+pai(alpha=0.5)"), {"batch_size": 1, "device": "cpu"}
    )
    assert lm.items == (EAH.paper(threshold=0.0008 * 576 / 16), PAI(alpha=0.5))
    assert lm.items == parse("eah+pai(alpha=0.5)", defaults={"EAH": {"threshold": 0.0008 * 576 / 16}})
    # the base runs as it would alone: padding side and pad tokens as llava_hf set them
    assert lm.base.tokenizer.padding_side == "left"
    assert lm.base.model.generation_config.pad_token_id is not None or lm.base.tokenizer.pad_token is None


# ---------------------------------------------------------------------------------------------- runs
def test_none_gives_the_base_models_answers_exactly(task_manager, llava_checkpoint):
    tasks = ("pope_local", "chair_local")
    base, _ = evaluate(task_manager, "llava_hf", args(llava_checkpoint), tasks)
    eah, results = evaluate(task_manager, "eah", args(llava_checkpoint, interventions="none"), tasks)
    for task in tasks:
        assert answers(eah[task]) == answers(base[task])
        assert all(n == {"interventions": "none", "calls": [{"interventions": []}]} for n in notes(eah[task]).values())
    assert results["config"]["model_args"].endswith("interventions=none")


def test_an_edit_that_must_change_the_answers_changes_them(task_manager, llava_checkpoint):
    """Every head's output of every layer scaled to 0: the decoder no longer reads any context."""
    heads = [[layer, head] for layer in range(4) for head in range(4)]
    base, _ = evaluate(task_manager, "eah", args(llava_checkpoint, interventions="none"))
    cut, _ = evaluate(task_manager, "eah", args(llava_checkpoint, interventions=f"head-scale(heads={heads},scale=0.0)"))
    before, after = answers(base["pope_local"]), answers(cut["pope_local"])
    assert sum(before[d] != after[d] for d in before) >= len(before) // 2
    changed = notes(cut["pope_local"])[0]["calls"][0]["interventions"][0]
    assert changed["method"] == "HeadScale" and set(changed["prefill"]) == {"0", "1", "2", "3"}


class _Capture:
    """Every ``generate`` call of the LLaVA class: its inputs (copied) and the tokens it returned."""

    def __init__(self, monkeypatch) -> None:
        from transformers import LlavaForConditionalGeneration

        self.calls: list[tuple[dict, torch.Tensor]] = []
        original = LlavaForConditionalGeneration.generate

        def generate(model, *a, **kw):
            inputs = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in kw.items()}
            out = original(model, *a, **kw)
            self.calls.append((inputs, out.clone()))
            return out

        monkeypatch.setattr(LlavaForConditionalGeneration, "generate", generate)


@pytest.mark.parametrize(
    ("task", "env", "gen_kwargs"),
    [
        ("pope_local", {}, None),
        ("chair_local", {"NUM_IMAGE": "2"}, "num_beams=2"),  # two images per request, two beams
    ],
)
def test_logged_records_equal_hf_intervene_on_the_same_prompt(task_manager, llava_checkpoint, monkeypatch, task, env, gen_kwargs):
    """The summary each sample carries = `hf.intervene`'s on the very inputs the base built for it, with
    a layout written independently from those inputs (image-token positions, attention mask)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from eah_interp import hf
    from eah_interp.interventions import EAH, PAI
    from eah_interp.layout import TokenLayout

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capture = _Capture(monkeypatch)
    samples, _ = evaluate(task_manager, "eah", args(llava_checkpoint, interventions="eah+pai"), (task,), gen_kwargs=gen_kwargs)
    logged = notes(samples[task])
    assert len(capture.calls) == len(logged)

    monkeypatch.undo()
    model = LlavaForConditionalGeneration.from_pretrained(llava_checkpoint).eval()
    tokenizer = AutoProcessor.from_pretrained(llava_checkpoint).tokenizer
    items = [EAH.paper(threshold=0.0008 * 576 / 16), PAI()]
    n_images = int(env.get("NUM_IMAGE", "1"))
    for (inputs, out), sample in zip(capture.calls, samples[task], strict=True):  # requests run in doc order
        ids = inputs["input_ids"]
        assert int((ids == model.config.image_token_id).sum()) == 16 * n_images
        layout = TokenLayout(ids == model.config.image_token_id, inputs["attention_mask"].bool())
        with hf.intervene(model, items, layout=layout) as run, torch.no_grad():
            again = model.generate(**inputs)
        assert torch.equal(again, out)
        assert sample["resps"][0][0] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert logged[sample["doc_id"]]["calls"] == [json.loads(json.dumps(run.summary()))]
    if gen_kwargs:  # each EAH prompt record covers both beams: two source heads counted per call
        for note in logged.values():
            assert sum(note["calls"][0]["interventions"][0]["source_heads"]["1"].values()) == 2


def test_a_raising_intervention_stops_the_run(task_manager, llava_checkpoint):
    from eah_interp.integrations.lmms_eval import EvaluationAborted

    with pytest.raises(EvaluationAborted, match="Explode: raised inside the attention call") as info:
        evaluate(task_manager, "eah", args(llava_checkpoint, interventions="explode"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "pope_local doc" in str(info.value)


def test_eah_interps_own_loader_as_the_base(task_manager, llava_checkpoint):
    """base=eah_interp: load_model's prompt; the answers are the model's own on that prompt."""
    from eah_interp.models import load_model
    from tests.lmms_tasks import pope_rows

    samples, _ = evaluate(task_manager, "eah", f"pretrained={llava_checkpoint},base=eah_interp,interventions=eah")
    got = notes(samples["pope_local"])
    assert got[0]["interventions"].startswith("EAH(threshold=0.0288")
    bundle = load_model(str(llava_checkpoint))
    from tests.lmms_tasks import _photos

    photos = _photos()
    row = pope_rows()[2]
    prompt = bundle.prompt(row["question"] + "\nAnswer the question using a single word or phrase.")
    inputs = bundle.encode([prompt], [photos[row["image_source"]].convert("RGB")])
    from eah_interp import hf
    from eah_interp.interventions import parse

    with hf.intervene(bundle.model, parse("eah", defaults=bundle.intervention_defaults())), torch.no_grad():
        out = bundle.model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    assert answers(samples["pope_local"])[2] == bundle.decode(out, inputs)[0]


# ---------------------------------------------------------------------------------------------- the CLI
def _cli(tasks, out: Path, model_args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    lmms = Path(sys.executable).parent / "lmms-eval"
    return subprocess.run(
        [str(lmms), "eval", "--model", "eah", "--model_args", model_args, "--tasks", "pope_local",
         "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1", "--log_samples",
         "--output_path", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )


def test_cli_run_twice_gives_the_same_samples_file(tasks, llava_checkpoint, tmp_path):
    spec = "eah+pai(alpha=0.5,layers=[1,2])"  # a comma inside (...): put back by the plugin
    files = []
    for run in range(2):
        done = _cli(tasks, tmp_path / f"run{run}", args(llava_checkpoint, interventions=spec))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (found,) = (tmp_path / f"run{run}").rglob("*_samples_pope_local.jsonl")
        files.append(found.read_text())
    assert files[0] == files[1]
    rows = [json.loads(line) for line in files[0].splitlines()]
    assert len(rows) == 8
    assert all(r["token_counts"][0]["eah_interp"]["interventions"].endswith("PAI(alpha=0.5, layers=(1, 2))") for r in rows)


def test_cli_exits_non_zero_when_an_intervention_raises(tasks, llava_checkpoint, tmp_path):
    """lmms-eval's CLI exits 0 when a run raises an Exception; the plugin's abort gets through."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # defines Explode in the CLI's process
        "import tests.lmms_tasks  # noqa: F401 - defines Explode\n"
    )
    done = _cli(tasks, tmp_path / "out", args(llava_checkpoint, interventions="explode"),
                {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"})
    assert done.returncode != 0
    assert "EvaluationAborted" in done.stderr and "Explode: raised inside the attention call" in done.stderr
    assert not list((tmp_path / "out").rglob("*_samples_*.jsonl"))


# ---------------------------------------------------------------------------------------------- metrics
def test_pope_same_answers_lmms_eval_vs_eah_interp():
    """lmms-eval scores an exact match of the lower-cased answer and its yes-ratio counts ground-truth "yes";
    eah-interp reads the first word and counts predicted "yes". Expected values counted by hand."""
    from benchmarks.lmms_eval_metrics import eah_pope, lmms_pope

    answers = [("Yes", "yes"), ("No.", "no"), ("Yes, there is a dog.", "yes"), ("no", "yes"), ("Yes", "no"),
               ("There is a cat.", "no")]
    lmms, ours = lmms_pope(answers), eah_pope(answers)
    # lmms-eval: exact "yes"/"no" only: right on 1 of 6; TP=1 FP=1 FN=1 ("Yes, there is a dog." is neither)
    assert lmms == pytest.approx({"accuracy": 1 / 6, "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "yes_ratio": 3 / 6})
    # eah-interp: first word: right on 4 of 6 ("There is a cat." unparsed = no); TP=2 FP=1 FN=1
    assert ours == pytest.approx({"accuracy": 4 / 6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 6,
                                  "unparsed": 1})
    exact = [("yes", "yes"), ("no", "no"), ("yes", "no"), ("no", "yes"), ("yes", "yes")]
    same = {k: v for k, v in lmms_pope(exact).items() if k != "yes_ratio"}
    assert same == pytest.approx({k: v for k, v in eah_pope(exact).items() if k in same})  # one-word answers agree
    assert lmms_pope(exact)["yes_ratio"] == 3 / 5 and eah_pope(exact)["yes_ratio"] == 3 / 5


def test_chair_aggregation_same_words_is_eah_interps_in_percent():
    from benchmarks.lmms_eval_metrics import chair_aggregation

    both = chair_aggregation()
    assert {k: v / 100 for k, v in both["lmms_eval_on_the_same_words"].items()} == pytest.approx(both["eah_interp"])
