"""The experiment runner: resumable items, and summaries checked against hand-computed values."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from eah_interp.config import EAHConfig
from eah_interp.evaluation import Condition, run_experiment, summarise
from eah_interp.models import load_model


def test_runner_resumes_without_losing_or_duplicating_items(tmp_path):
    bundle = load_model("tiny-llava")
    arms = [Condition("baseline"), Condition("eah_paper", EAHConfig.paper(threshold=bundle.threshold))]
    path = run_experiment(bundle, tmp_path, n=3, conditions=arms, max_new_tokens=2, progress=False)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * (3 + 3 * 3)  # per arm: 3 captions + 3 scenes x 3 questions
    run_experiment(bundle, tmp_path, n=3, conditions=arms, max_new_tokens=2, progress=False)
    assert path.read_text().splitlines() == lines  # nothing redone
    path.write_text("\n".join(lines[:-5]) + "\n")  # an interrupted run: the last 5 items are missing
    run_experiment(bundle, tmp_path, n=3, conditions=arms, max_new_tokens=2, progress=False)
    resumed = [json.loads(line) for line in path.read_text().splitlines()]
    original = [json.loads(line) for line in lines]
    key = lambda item: (item["condition"], item["task"], item["seed"], item.get("object", ""))  # noqa: E731
    assert len(resumed) == len(original) and sorted(map(key, resumed)) == sorted(map(key, original))
    # the redone items match the originals (up to float rounding: they ran in a different batch)
    by_key = {key(item): item for item in original}
    for item in resumed[-5:]:
        want = by_key[key(item)]
        assert {k: v for k, v in item.items() if k != "logit_diff"} == {k: v for k, v in want.items() if k != "logit_diff"}
        assert item.get("logit_diff", 0) == pytest.approx(want.get("logit_diff", 0), abs=1e-4)


def caption(cond, seed, truth, mentioned, words=4):
    hall = [m for m in mentioned if m not in truth]
    return {"condition": cond, "task": "caption", "seed": seed, "truth": truth, "mentioned": mentioned,
            "hallucinated": hall, "n_words": words}


def pope(cond, seed, mode, label, said, diff):
    return {"condition": cond, "task": "pope", "seed": seed, "object": mode, "mode": mode, "label": label,
            "said_yes": said, "logit_diff": diff}


def test_summary_matches_hand_computed_metrics():
    items = pd.DataFrame([
        caption("baseline", 1, ["star"], ["star", "moon"]),
        caption("baseline", 2, ["house"], ["house", "tree"]),
        caption("baseline", 3, ["cloud", "ring"], ["cloud"]),
        caption("eah", 1, ["star"], ["star"]),
        caption("eah", 2, ["house"], ["house", "tree"]),
        caption("eah", 3, ["cloud", "ring"], ["cloud", "ring"]),
        pope("baseline", 1, "present", True, True, 2.0),
        pope("baseline", 1, "adversarial", False, True, 1.0),
        pope("baseline", 1, "random", False, None, -1.0),  # unparsed: counts as "no"
        pope("eah", 1, "present", True, True, 1.0),
        pope("eah", 1, "adversarial", False, False, -2.0),
        pope("eah", 1, "random", False, False, -3.0),
    ])
    s = summarise(items, n_resamples=500).set_index(["condition", "metric"])
    assert s.loc[("baseline", "chair_i"), "value"] == pytest.approx(2 / 5)
    assert s.loc[("eah", "chair_i"), "value"] == pytest.approx(1 / 5)
    assert s.loc[("baseline", "chair_s"), "value"] == pytest.approx(2 / 3)
    assert s.loc[("eah", "recall"), "value"] == pytest.approx(4 / 4)
    assert s.loc[("baseline", "recall"), "value"] == pytest.approx(3 / 4)
    assert s.loc[("baseline", "pope_acc_adversarial"), "value"] == pytest.approx(1 / 2)
    assert s.loc[("baseline", "pope_acc_random"), "value"] == pytest.approx(2 / 2)
    assert s.loc[("eah", "pope_acc_adversarial"), "value"] == pytest.approx(1.0)
    assert s.loc[("baseline", "yes_ratio"), "value"] == pytest.approx(2 / 3)
    assert s.loc[("eah", "probe_absent"), "value"] == pytest.approx(-2.5)
    row = s.loc[("eah", "chair_i")]
    assert row["diff"] == pytest.approx(-1 / 5) and row.ci_low <= row["diff"] <= row.ci_high
    assert 0 < row.p_value <= 1
