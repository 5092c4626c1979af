"""The experiment runner: items only, resumable, POPE per split, undefined metrics named, Holm, controls.

Summaries are checked against values computed by hand from the listed results.
"""

from __future__ import annotations

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from eah_interp import evaluation
from eah_interp.data import scene_dataset
from eah_interp.errors import ConfigError
from eah_interp.evaluation import Arm, deep_control_layer, default_arms, run_experiment, summarise_items
from eah_interp.interventions import EAH, PAI
from eah_interp.metrics.stats import holm
from eah_interp.models import load_model


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny-llava")


def key(record):
    return (record["condition"], record["task"], record["item"], record["question"])


def test_runner_resumes_without_losing_or_duplicating_items(tmp_path, bundle):
    arms = [Arm("baseline"), Arm("eah_paper", EAH.paper(threshold=bundle.threshold))]
    data = scene_dataset(3)
    run = lambda: run_experiment(bundle, data, tmp_path, arms=arms, max_new_tokens=2, progress=False)  # noqa: E731
    path = run()
    lines = path.read_text().splitlines()
    assert len(lines) == 2 * (3 + 3 * 4)  # per arm: 3 captions + 3 scenes x 4 questions (2 splits)
    original = [json.loads(line) for line in lines]
    assert len({key(r) for r in original}) == len(original)
    run()
    assert path.read_text().splitlines() == lines  # nothing redone
    path.write_text("\n".join(lines[:-5]) + "\n" + lines[-5][:20])  # interrupted: 5 missing, one cut short
    run()
    resumed = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(resumed) == len(original) and sorted(map(key, resumed)) == sorted(map(key, original))
    by_key = {key(item): item for item in original}
    for item in resumed[-5:]:  # redone items match (up to float rounding: they ran in another batch)
        want = by_key[key(item)]
        assert {k: v for k, v in item.items() if k != "logit_diff"} == {k: v for k, v in want.items() if k != "logit_diff"}
        assert item.get("logit_diff", 0) == pytest.approx(want.get("logit_diff", 0), abs=1e-4)
    settings = json.loads((tmp_path / "run.json").read_text())["arguments"]
    assert settings["dataset"] == "scenes" and settings["max_new_tokens"] == 2 and settings["chair_protocol"] == "strict"
    with pytest.raises(ConfigError, match="max_new_tokens: saved 2, now 3"):  # other settings: not mixed in
        run_experiment(bundle, data, tmp_path, arms=arms, max_new_tokens=3, progress=False)
    other = [Arm("eah_paper", EAH.paper(threshold=bundle.threshold, layers=(2,)))]
    with pytest.raises(ConfigError, match=r"arm\(s\) \['eah_paper'\] that applied something else"):
        run_experiment(bundle, data, tmp_path, arms=other, max_new_tokens=2, progress=False)
    assert path.read_text().splitlines() == [json.dumps(r) for r in resumed]  # refused runs write nothing


def test_a_question_in_two_splits_is_asked_once(tmp_path, bundle, monkeypatch):
    asked = []
    original = evaluation.runner.first_token_answers

    def counting(b, prompts, images, config):
        asked.extend(prompts)
        return original(b, prompts, images, config)

    monkeypatch.setattr(evaluation.runner, "first_token_answers", counting)
    path = run_experiment(bundle, scene_dataset(2), tmp_path, arms=[Arm("baseline")], tasks=("pope",),
                          progress=False)
    assert len(asked) == 2 * 3  # present, random-absent, adversarial-absent per scene
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 * 4
    first = {r["question"]: r for r in records if r["item"] == "scene 100000000"}
    shared = first["random/present:tree"], first["adversarial/present:tree"]
    assert shared[0]["logit_diff"] == shared[1]["logit_diff"] and shared[0]["split"] != shared[1]["split"]


# ------------------------------------------------------------------------------------ summaries
def caption(cond, item, truth, mentioned, words=4):
    hall = None if mentioned is None else [m for m in mentioned if m not in truth]
    return {"condition": cond, "task": "caption", "item": item, "question": "", "truth": truth, "mentioned": mentioned,
            "hallucinated": hall, "n_words": words, "caption": "x", "source_heads": []}


def pope(cond, item, split, qid, label, said, diff, text=None):
    return {"condition": cond, "task": "pope", "item": item, "question": f"{split}/{qid}", "split": split,
            "text": text or f"{split} question {qid}", "label": label, "said_yes": said, "logit_diff": diff}


def hand_items():
    return pd.DataFrame([
        caption("baseline", "a", ["star"], ["star", "moon"]),
        caption("baseline", "b", ["house"], ["house", "tree"]),
        caption("baseline", "c", ["cloud", "ring"], ["cloud"]),
        caption("eah", "a", ["star"], ["star"]),
        caption("eah", "b", ["house"], ["house", "tree"]),
        caption("eah", "c", ["cloud", "ring"], ["cloud", "ring"]),
        # item a: random split (present + absent) and adversarial split; the present question is in both
        pope("baseline", "a", "random", 0, True, True, 2.0, "present"),
        pope("baseline", "a", "random", 1, False, None, -1.0),  # unparsed: counts as "no"
        pope("baseline", "a", "adversarial", 0, True, True, 2.0, "present"),
        pope("baseline", "a", "adversarial", 1, False, True, 1.0),
        pope("baseline", "b", "random", 2, False, True, 0.5),
        pope("eah", "a", "random", 0, True, True, 1.0, "present"),
        pope("eah", "a", "random", 1, False, False, -3.0),
        pope("eah", "a", "adversarial", 0, True, True, 1.0, "present"),
        pope("eah", "a", "adversarial", 1, False, False, -2.0),
        pope("eah", "b", "random", 2, False, False, -1.0),
    ])


def test_summary_matches_hand_computed_metrics():
    s = summarise_items(hand_items(), n_resamples=500).set_index(["condition", "metric"])
    v = lambda c, m: s.loc[(c, m), "value"]  # noqa: E731
    assert v("baseline", "chair_i") == pytest.approx(2 / 5) and v("eah", "chair_i") == pytest.approx(1 / 5)
    assert v("baseline", "chair_s") == pytest.approx(2 / 3) and v("eah", "chair_s") == pytest.approx(1 / 3)
    assert v("eah", "recall") == pytest.approx(4 / 4) and v("baseline", "recall") == pytest.approx(3 / 4)
    assert v("baseline", "length") == 4
    # random split, baseline: yes/no on (a: present yes, a: absent unparsed=no, b: absent yes)
    assert v("baseline", "pope_acc_random") == pytest.approx(2 / 3)
    assert v("baseline", "pope_precision_random") == pytest.approx(1 / 2)  # tp 1, fp 1
    assert v("baseline", "pope_recall_random") == pytest.approx(1.0)
    assert v("baseline", "pope_f1_random") == pytest.approx(2 * 1 / (2 * 1 + 1 + 0))
    assert v("baseline", "pope_yes_ratio_random") == pytest.approx(2 / 3)
    # adversarial split, baseline: present yes, absent yes
    assert v("baseline", "pope_acc_adversarial") == pytest.approx(1 / 2)
    assert v("eah", "pope_acc_adversarial") == pytest.approx(1.0)
    assert v("eah", "pope_yes_ratio_adversarial") == pytest.approx(1 / 2)
    # probes over distinct questions: eah present {1.0} (listed twice, counted once), absent {-3, -2, -1}
    assert v("eah", "probe_present") == pytest.approx(1.0)
    assert v("eah", "probe_absent") == pytest.approx(-2.0)
    assert v("baseline", "probe_absent") == pytest.approx((-1.0 + 1.0 + 0.5) / 3)
    row = s.loc[("eah", "chair_i")]
    assert row["diff"] == pytest.approx(-1 / 5) and row.ci_low <= row["diff"] <= row.ci_high
    assert 0 < row.p_value <= row.p_holm <= 1
    assert not any(m.startswith("pope_") and "popular" in m for _, m in s.index)


def test_only_the_splits_present_are_reported(tmp_path):
    """Trap 5: a random-only POPE file gives random metrics and nothing adversarial (no 0.000 with a CI)."""
    items = pd.DataFrame([
        pope(c, item, "random", q, label, said, d)
        for c in ("baseline", "eah")
        for item, q, label, said, d in (("a", 0, True, True, 1.0), ("a", 1, False, c == "baseline", 0.2),
                                         ("b", 2, True, False, -1.0), ("b", 3, False, False, -0.5))
    ])
    summary = summarise_items(items, n_resamples=200)
    assert set(summary["split"].dropna()) == {"random"}
    assert not summary["metric"].str.contains("adversarial|popular").any()
    assert summary.set_index(["condition", "metric"]).loc[("eah", "pope_acc_random"), "value"] == pytest.approx(3 / 4)
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items.to_dict("records")))
    evaluation.write_report(tmp_path / "items.jsonl", tmp_path, n_resamples=200)
    report = (tmp_path / "report.md").read_text()
    assert "split `random`" in report and "adversarial" not in report and "popular" not in report


def test_a_zero_denominator_metric_is_reported_as_undefined(tmp_path):
    """Trap 6: CHAIR_i with no mentions at all stays in the table and the report, with the reason."""
    items = pd.DataFrame([caption(c, i, ["star"], []) for c in ("baseline", "eah") for i in ("a", "b")])
    summary = summarise_items(items, n_resamples=200).set_index(["condition", "metric"])
    row = summary.loc[("eah", "chair_i")]
    assert math.isnan(row["value"]) and row["note"] == "undefined (no mentions)"
    assert summary.loc[("eah", "recall"), "value"] == 0.0  # defined: 0 of 2 objects recalled
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items.to_dict("records")))
    evaluation.write_report(tmp_path / "items.jsonl", tmp_path, n_resamples=200)
    report = (tmp_path / "report.md").read_text()
    assert "| eah | 0.000" in report and "undefined (no mentions)" in report
    assert "* `chair_i` for `eah`: undefined (no mentions)" in report


def test_chair_i_counts_mentions_as_the_protocol_lists_them():
    # the reference protocol lists every mention: "two dogs ... a dog ... a cat" with truth {cat}
    items = pd.DataFrame([caption(c, "a", ["cat"], ["dog", "dog", "cat"]) for c in ("baseline", "eah")])
    s = summarise_items(items, n_resamples=50).set_index(["condition", "metric"])
    assert s.loc[("eah", "chair_i"), "value"] == pytest.approx(2 / 3)
    assert s.loc[("eah", "recall"), "value"] == 1.0 and s.loc[("eah", "chair_s"), "value"] == 1.0


def test_captions_without_ground_truth_report_chair_undefined():
    items = pd.DataFrame([caption(c, i, None, None, words=3) for c in ("baseline", "eah") for i in ("a", "b")])
    summary = summarise_items(items, n_resamples=100).set_index(["condition", "metric"])
    assert summary.loc[("eah", "chair_s"), "note"] == "undefined (no ground-truth objects)"
    assert summary.loc[("eah", "chair_i"), "note"] == "undefined (no ground-truth objects)"
    assert summary.loc[("eah", "length"), "value"] == 3


def test_holm_by_hand():
    # sorted: 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> stays 0.06, monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    got = holm([0.02, float("nan"), 0.01])
    assert got[0] == pytest.approx(0.02) and math.isnan(got[1]) and got[2] == pytest.approx(0.02)
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([1.5])


def test_significance_comes_from_holm_not_the_raw_p(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.statistics, "sign_flip_p_value", lambda *a, **k: 0.02)  # every raw p = 0.02 < 0.05
    items = hand_items()
    summary = summarise_items(items, n_resamples=100)
    tested = summary[summary["p_value"].notna()]
    m = len(tested)
    assert m > 3 and np.allclose(tested["p_holm"], min(1.0, m * 0.02))
    assert not summary["significant"].any()
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items.to_dict("records")))
    evaluation.write_report(tmp_path / "items.jsonl", tmp_path, n_resamples=100)
    report = (tmp_path / "report.md").read_text()
    assert "p=0.020" in report and " *)" not in report and f"Holm p={min(1.0, m * 0.02):.3f}" in report
    monkeypatch.setattr(evaluation.statistics, "sign_flip_p_value", lambda *a, **k: 0.0001)
    assert summarise_items(items, n_resamples=100).query("p_value == p_value")["significant"].all()


# ------------------------------------------------------------------------------------ controls
def test_deep_layer_control_never_edits_a_treatment_layer(bundle):
    """Trap 4: on a 4-layer model the third-last layer (1) is the paper's layer: another one is chosen."""
    arms = {c.name: c for c in default_arms(bundle)}
    treatment = set(arms["eah_paper"].interventions[0].layers) | set(arms["eah_reference"].interventions[0].layers)
    assert treatment == {1, 3}
    deep = arms["control_deep_layer"].interventions[0].layers
    assert deep == (2,) and not set(deep) & treatment


def test_deep_control_layer_rule():
    assert deep_control_layer(32, (1, 15)) == 29  # LLaVA-1.5: the third-last, as before
    assert deep_control_layer(4, (1, 3)) == 2
    assert deep_control_layer(8, (1, 5)) == 6  # 5 (the third-last) is taken: 4 and 6 are as near, the deeper wins
    with pytest.raises(ConfigError, match="no layer for the deep-layer control"):
        deep_control_layer(3, (1, 2))


def test_a_model_too_shallow_for_the_deep_control_leaves_it_out(monkeypatch):
    fake = SimpleNamespace(model=None, threshold=0.01)
    monkeypatch.setattr(evaluation.arms, "model_shape", lambda model: (3, 4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [c.name for c in default_arms(fake, beams=1)]
    assert "control_deep_layer" not in names and "eah_paper" in names
    assert any("control_deep_layer left out" in str(w.message) for w in caught)


def test_chair_protocol_is_passed_to_chair_scores_and_recorded(tmp_path, bundle, monkeypatch):
    import eah_interp.metrics as metrics

    seen = []
    real = metrics.chair_scores

    def with_protocol(captions, objects, vocabulary="scenes", protocol="reference"):
        seen.append(protocol)
        return real(captions, objects, vocabulary=vocabulary)

    monkeypatch.setattr(metrics, "chair_scores", with_protocol)
    arms = [Arm("baseline")]
    path = run_experiment(bundle, scene_dataset(2), tmp_path / "s", arms=arms, tasks=("caption",),
                          max_new_tokens=2, progress=False)
    assert seen == ["strict"]  # the scene world's default
    assert {json.loads(line)["chair_protocol"] for line in path.read_text().splitlines()} == {"strict"}
    run_experiment(bundle, scene_dataset(2), tmp_path / "r", arms=arms, tasks=("caption",), max_new_tokens=2,
                   chair_protocol="reference", progress=False)
    assert seen == ["strict", "reference"]
    with pytest.raises(ConfigError, match="'reference', 'strict' or 'both'"):
        run_experiment(bundle, scene_dataset(1), tmp_path / "x", arms=arms, chair_protocol="loose", progress=False)


def test_both_chair_protocols_are_reported_side_by_side():
    # truth {cat}; reference lists every mention (dog, dog, cat), strict each object once (dog, cat)
    items = pd.DataFrame([
        {**caption(c, "a", ["cat"], ["cat", "dog", "dog"]), "mentioned_strict": ["cat", "dog"],
         "hallucinated_strict": ["dog"]}
        for c in ("baseline", "eah")
    ] + [
        {**caption(c, "b", ["cup"], ["cup"]), "mentioned_strict": [], "hallucinated_strict": []}
        for c in ("baseline", "eah")
    ])
    s = summarise_items(items, n_resamples=50).set_index(["condition", "metric"])
    assert s.loc[("eah", "chair_i"), "value"] == pytest.approx(2 / 4)  # (2 dogs) / (cat, dog, dog, cup)
    assert s.loc[("eah", "chair_i_strict"), "value"] == pytest.approx(1 / 2)  # dog / (cat, dog)
    assert s.loc[("eah", "chair_s_strict"), "value"] == pytest.approx(1 / 2)
    assert s.loc[("eah", "recall_strict"), "value"] == pytest.approx(1 / 2)  # cat yes, cup not mentioned


def test_both_chair_protocols_on_coco_images(tmp_path, bundle):
    from eah_interp.data import coco_instances
    from eah_interp.metrics import chair_scores
    from tests.photos import write_instances, write_photos

    data = coco_instances(write_instances(tmp_path / "instances.json"), write_photos(tmp_path / "images"))
    path = run_experiment(bundle, data, tmp_path / "run", arms=[Arm("baseline")], tasks=("caption",),
                          max_new_tokens=3, chair_protocol="both", progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records and all(r["chair_protocol"] == "reference" for r in records)
    for r in records:
        strict = chair_scores([r["caption"]], [r["truth"]], vocabulary="coco", protocol="strict")["per_caption"][0]
        assert r["mentioned_strict"] == sorted(strict["mentioned"])
    with pytest.raises(ConfigError, match="needs the COCO vocabulary"):
        run_experiment(bundle, scene_dataset(1), tmp_path / "s", arms=[Arm("baseline")],
                       chair_protocol="both", progress=False)


def test_an_arm_can_stack_interventions(tmp_path, bundle):
    """An arm's interventions run through hf.intervene: the EAH arm's captions and source heads equal generate()
    inside hf.eah written by hand; a stack keeps EAH's source heads; PAI alone changes the yes/no logits."""
    from eah_interp import hf

    paper = EAH.paper(threshold=bundle.threshold)
    arms = [Arm("baseline"), Arm("eah", paper), Arm("eah_plus_pai", (paper, PAI(alpha=0.5))), Arm("pai", [PAI(alpha=0.5)])]
    data = scene_dataset(2)
    path = run_experiment(bundle, data, tmp_path, arms=arms, max_new_tokens=3, progress=False)
    by = {}
    for r in map(json.loads, path.read_text().splitlines()):
        by.setdefault(r["condition"], {})[(r["task"], r["item"], r["question"])] = r
    inputs = bundle.encode([bundle.caption_prompt] * 2, [item.load_image() for item in data])
    with torch.no_grad(), hf.eah(bundle.model, paper) as run:
        out = bundle.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    heads = [r.source_head.tolist() for r in run.records if r.q_len == r.k_len][0]
    for k, item in enumerate(data):
        rec = by["eah"][("caption", item.id, "")]
        assert rec["caption"] == bundle.decode(out, inputs)[k] and rec["source_heads"] == [heads[k]]
    assert all(r["source_heads"] for k, r in by["eah_plus_pai"].items() if k[0] == "caption")
    assert all(r["source_heads"] == [] for k, r in by["pai"].items() if k[0] == "caption")
    pope_keys = [k for k in by["baseline"] if k[0] == "pope"]
    assert any(abs(by["pai"][k]["logit_diff"] - by["baseline"][k]["logit_diff"]) > 1e-6 for k in pope_keys)
    saved = {c["name"]: c for c in json.loads((tmp_path / "run.json").read_text())["conditions"]}
    assert [i["method"] for i in saved["eah_plus_pai"]["interventions"]] == ["EAH", "PAI"]
    assert saved["eah_plus_pai"]["interventions"][1]["alpha"] == 0.5
    assert Arm.from_dict(saved["eah_plus_pai"]) == arms[2] and Arm("x", PAI()).interventions == (PAI(),)
    assert saved["eah"]["edits"] == [{"method": "EAH", "layers": [1]}]


def test_one_significance_rule_holm_p_at_most_alpha(monkeypatch):
    """Significant means p_holm <= alpha (the runner used '<', the explain study '<='): a Holm p equal to alpha counts."""
    from eah_interp.evaluation import holm_family, replication_table, verdict

    assert holm_family([0.025, 0.025]) == ([0.05, 0.05], [True, True])  # 2 x 0.025 = 0.05 exactly
    assert holm_family([0.03, float("nan")])[1] == [True, False]  # NaN: not tested, not significant
    monkeypatch.setattr(evaluation.statistics, "sign_flip_p_value", lambda *a, **k: 0.01)
    items = hand_items()
    m = int(summarise_items(items, n_resamples=50)["p_value"].notna().sum())
    summary = summarise_items(items, n_resamples=50, alpha=m * 0.01)  # every p_holm is m x 0.01, exactly alpha
    tested = summary[summary["p_value"].notna()]
    assert (tested["p_holm"] == m * 0.01).all() and tested["significant"].all()
    both = pd.concat([summary.assign(part=p) for p in ("discovery", "replication")], ignore_index=True)
    verdicts = replication_table(both, alpha=m * 0.01).set_index(["condition", "metric"])["verdict"]
    assert verdicts[("eah", "chair_i")] == "replicated"  # diff -0.2 in both parts, Holm p = alpha in both
    assert verdict(True, True, 0.2, 0.1) == "replicated" and verdict(True, True, 0.2, -0.1) == "not replicated"
    assert verdict(False, True, 0.0, 0.1) == "replication only" and verdict(False, False, 1.0, 1.0) == "null"
