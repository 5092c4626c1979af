"""Hallucination metrics against hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eah_interp.metrics import (
    Vocabulary,
    bootstrap_ci,
    chair_scores,
    get_vocabulary,
    load_coco_objects,
    mcnemar,
    paired_bootstrap,
    paired_permutation_test,
    parse_yes_no,
    plural_forms,
    pope_questions,
    pope_scores,
    probe_scores,
    yes_no_logit_diff,
)


def test_chair_hand_computed_on_scenes():
    captions = [
        "A star and a tree.",  # tree hallucinated
        "Two hearts, a circle.",  # both right
        "A cloud, an umbrella and a house.",  # umbrella right; cloud, house hallucinated; ring missed
    ]
    truth = [{"star"}, {"heart", "circle"}, {"umbrella", "ring"}]
    s = chair_scores(captions, truth, vocabulary="scenes")
    assert s["chair_s"] == pytest.approx(2 / 3)
    assert s["chair_i"] == pytest.approx(3 / 7)  # 7 mentions, 3 hallucinated
    assert s["recall"] == pytest.approx(4 / 5)
    assert s["length"] == pytest.approx((5 + 4 + 7) / 3)
    pc = s["per_caption"][2]
    assert {k: pc[k] for k in ("mentioned", "hallucinated", "missed")} == {
        "mentioned": ["cloud", "umbrella", "house"], "hallucinated": ["cloud", "house"], "missed": ["ring"]
    }


def test_chair_synonyms_plurals_multiword_and_errors():
    coco = get_vocabulary("coco")
    assert coco.mentions("Two men eat hot dogs by a traffic light; a puppy and some knives.") == [
        "person", "hot dog", "traffic light", "dog", "knife"
    ]
    assert coco.mentions("a hotdog") == ["hot dog"] and "dog" not in coco.mentions("hot dog stand")
    assert plural_forms("bus") == ["bus", "buses", "busses"] and plural_forms("teddy bear")[1] == "teddy bears"
    assert plural_forms("strawberry")[1] == "strawberries"
    s = chair_scores(["A man and a dog on skis."], [["person", "skis"]], vocabulary="coco")
    assert s["chair_i"] == pytest.approx(1 / 3) and s["recall"] == 1.0
    with pytest.raises(ValueError, match="'unicorn'"):
        chair_scores(["a cat"], [{"unicorn"}], vocabulary="coco")
    with pytest.raises(ValueError, match="2 captions but 1"):
        chair_scores(["a", "b"], [set()])
    with pytest.raises(ValueError, match="both"):
        Vocabulary({"a": ["x"], "b": ["x"]})
    nothing = chair_scores(["nothing here"], [{"star"}])
    assert math.isnan(nothing["chair_i"]) and nothing["n_mentions"] == 0  # undefined, not 0 (issue 20)


def test_load_coco_objects(tmp_path):
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 1},
                        {"image_id": 1, "category_id": 18}],
    }))
    assert load_coco_objects(path) == {1: {"dog", "person"}, 2: set()}


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [("Yes, there is a cat.", True), (" yes", True), ("YES!", True), ("No.", False), ("Not at all", False),
     ("no, there is not", False), ("There is a cat", None), ("", None), (True, True), (None, None)],
)
def test_parse_yes_no(answer, parsed):
    assert parse_yes_no(answer) is parsed


def test_pope_scores_hand_computed():
    answers = ["Yes", "yes.", "No", "No", "maybe", "Yes"]
    labels = [True, True, True, False, True, False]
    s = pope_scores(answers, labels)
    # said yes: T T F F F(unparsed) T ; tp=2 fp=1 fn=2 tn=1
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 4)
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert s["yes_ratio"] == pytest.approx(3 / 6) and s["unparsed"] == 1 and s["n"] == 6


def test_pope_question_sampling_modes():
    annotations = [{"house", "tree"}, {"house", "tree"}, {"house", "tree", "star"}, {"star", "moon"}, {"cat"}]
    vocab = ["house", "tree", "star", "moon", "cat", "dog"]
    adversarial = pope_questions(annotations, vocab, "adversarial", n_negative=1, seed=0)
    # the image with only a cat: nothing co-occurs with cat, so the most frequent absent object wins
    negatives = {i: o for i, o, label in adversarial if not label}
    assert negatives[3] == "house"  # star co-occurs with house (1x) and moon (1x): house is more frequent
    only_house = pope_questions([{"house"}, {"house", "tree"}, {"house", "tree"}], vocab, "adversarial", n_negative=1)
    assert [o for i, o, lab in only_house if i == 0 and not lab] == ["tree"]
    popular = pope_questions(annotations, vocab, "popular", n_negative=1)
    assert {i: o for i, o, lab in popular if not lab}[4] == "house"
    rand = pope_questions(annotations, vocab, "random", n_negative=2, seed=1)
    for i, o, label in rand:
        assert (o in annotations[i]) == label
    assert sum(lab for *_, lab in rand) == sum(not lab for *_, lab in rand)


def test_yes_no_logit_diff_matches_explicit_probabilities():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
    diff = yes_no_logit_diff(logits, yes_ids=[0, 2], no_ids=[1])
    p = logits.softmax(-1)
    expected = torch.log(p[:, 0] + p[:, 2]) - torch.log(p[:, 1])
    assert torch.allclose(diff, expected, atol=1e-6)


def test_probe_scores_hand_computed():
    s = probe_scores([2.0, 1.0, -1.0, 1.0], [True, True, False, False])
    assert s["mean_present"] == 1.5 and s["mean_absent"] == 0.0 and s["separation"] == 1.5
    assert s["accuracy"] == 0.75
    assert s["auroc"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # pairs: (2,-1),(2,1),(1,-1),(1,1 tie)


def test_bootstrap_and_paired_tests():
    values = [1.0, 2.0, 3.0, 4.0, 5.0] * 4
    low, high = bootstrap_ci(values, n_resamples=2000)
    assert low < 3.0 < high
    low_big, high_big = bootstrap_ci(values * 10, n_resamples=2000)
    assert high_big - low_big < high - low
    shifted = paired_bootstrap([0.0] * 30, [1.0 + 0.1 * (i % 3) for i in range(30)])
    assert shifted["mean_diff"] == pytest.approx(1.1) and shifted["low"] > 0.9
    assert paired_permutation_test([0.0] * 30, [1.0 + 0.1 * (i % 3) for i in range(30)], n_resamples=2000) < 0.01
    assert paired_permutation_test([0.0] * 30, [(-1.0) ** i for i in range(30)], n_resamples=2000) > 0.5


def test_mcnemar_hand_computed():
    a = [True] * 5 + [False] * 5
    b = [True] * 5 + [True] * 4 + [False]
    result = mcnemar(a, b)
    assert result["b01"] == 4 and result["b10"] == 0
    assert result["p_value"] == pytest.approx(2 * (1 / 16))
    assert math.isclose(mcnemar(a, a)["p_value"], 1.0)


# ---------------------------------------------------------------------------- clustered statistics
def _loop_resamples(codes, n_resamples, seed, within):
    """Loop-written cluster bootstrap: the item indices of every resample, drawn as `bootstrap_weights` documents."""
    import numpy as np

    n_clusters = max(codes) + 1
    members = [[i for i, c in enumerate(codes) if c == g] for g in range(n_clusters)]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, size=(n_resamples, n_clusters))
    u = rng.random((n_resamples, n_clusters, max(len(m) for m in members))) if within else None
    out = []
    for b in range(n_resamples):
        sample = []
        for g in range(n_clusters):
            chosen = members[picks[b, g]]
            if within:
                sample += [chosen[int(u[b, g, i] * len(chosen))] for i in range(len(chosen))]
            else:
                sample += chosen
        out.append(sample)
    return out


@pytest.mark.parametrize("within", [False, True])
def test_cluster_bootstrap_matches_a_loop_written_one(within):
    import numpy as np

    from eah_interp.metrics.stats import cluster_bootstrap

    rng = np.random.default_rng(7)
    scenes = ["s3", "s1", "s3", "s2", "s1", "s3", "s4", "s2", "s4", "s4"]  # unequal cluster sizes, labels out of order
    codes = [0, 1, 0, 2, 1, 0, 3, 2, 3, 3]  # numbered by first appearance
    values = rng.normal(size=len(scenes)) + np.array(codes)
    draws = [float(np.mean(values[idx])) for idx in _loop_resamples(codes, 400, 5, within)]
    low, high = np.percentile(draws, [2.5, 97.5])
    got = cluster_bootstrap(values, scenes, within=within, n_resamples=400, seed=5)
    assert got.estimate == pytest.approx(values.mean())
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert got.draws == pytest.approx(draws, abs=1e-12) and got.n_clusters == 4 and got.n == 10


def test_cluster_bootstrap_of_singletons_is_the_plain_bootstrap_and_clusters_widen_it():
    import numpy as np

    from eah_interp.metrics.stats import cluster_bootstrap

    values = np.random.default_rng(0).normal(size=40)
    got = cluster_bootstrap(values, n_resamples=3000, seed=2)
    assert (got.low, got.high) == pytest.approx(bootstrap_ci(values, n_resamples=3000, seed=2), abs=1e-12)
    # perfectly correlated pairs: 20 independent values, each counted twice; the CI must be that of 20 values
    pairs = np.repeat(values[:20], 2)
    naive = cluster_bootstrap(pairs, n_resamples=3000, seed=2)
    clustered = cluster_bootstrap(pairs, np.repeat(np.arange(20), 2), n_resamples=3000, seed=2)
    assert clustered.high - clustered.low > 1.25 * (naive.high - naive.low)


@pytest.mark.parametrize("within", [False, True])
def test_ratio_ci_matches_a_loop_written_one(within):
    import numpy as np

    from eah_interp.metrics.stats import ratio_ci

    rng = np.random.default_rng(3)
    scenes = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    den = 2.0 + rng.normal(size=len(scenes))
    num = 0.7 * den + 0.3 * rng.normal(size=len(scenes))
    draws = []
    for idx in _loop_resamples(scenes, 300, 11, within):
        draws.append(sum(num[i] for i in idx) / sum(den[i] for i in idx))
    got = ratio_ci(num, den, scenes, within=within, n_resamples=300, seed=11)
    assert got.estimate == pytest.approx(num.mean() / den.mean())
    assert (got.low, got.high) == pytest.approx(tuple(np.percentile(draws, [2.5, 97.5])), abs=1e-12)
    with pytest.raises(ValueError, match="one label per value"):
        ratio_ci(num, den, scenes[:-1])


def test_clustered_sign_flip_matches_a_loop_written_one():
    import numpy as np

    from eah_interp.metrics.stats import bootstrap_p_value, sign_flip_p_value

    diffs = np.array([0.5, 0.7, -0.1, 0.2, 0.9, 1.1, -0.3, 0.4])
    scenes = ["a", "a", "b", "b", "c", "c", "d", "d"]
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(2000, 4))
    sums = np.array([1.2, 0.1, 2.0, 0.1])
    hits = sum(abs(sum(signs[b, g] * sums[g] for g in range(4))) / 8 >= abs(diffs.mean()) - 1e-12 for b in range(2000))
    assert sign_flip_p_value(diffs, clusters=scenes, n_resamples=2000) == pytest.approx((1 + hits) / 2001)
    # 4 clusters: at best 2/16 of the sign patterns are as extreme, whatever the number of items
    assert sign_flip_p_value(diffs, clusters=scenes, n_resamples=2000) > 0.1 > sign_flip_p_value(diffs, n_resamples=2000)
    assert bootstrap_p_value([0.2, 0.4, -0.1, 0.3]) == pytest.approx(2 * 2 / 5)


def test_one_auroc_implementation():
    import eah_interp.metrics.probes
    import eah_interp.probing
    from eah_interp.metrics.stats import auroc

    assert eah_interp.probing.auroc is auroc and eah_interp.metrics.probes.auroc is auroc
    assert float(auroc([2.0, 1.0, -1.0, 1.0], [True, True, False, False])[0]) == pytest.approx(3.5 / 4)


def test_percentile_interval_and_wald_p_by_hand():
    import numpy as np

    from eah_interp.metrics.stats import bootstrap_wald_p_value, percentile_interval

    draws = np.array([0.0, 1.0, 2.0, 3.0, 4.0, np.nan])
    assert percentile_interval(draws, ci=0.5) == pytest.approx((1.0, 3.0))  # the 25th and 75th percentiles
    assert all(math.isnan(x) for x in percentile_interval([np.nan]))
    se = float(np.std([0.0, 1.0, 2.0, 3.0, 4.0], ddof=1))  # sqrt(2.5)
    assert bootstrap_wald_p_value(2.0, draws) == pytest.approx(math.erfc(2.0 / (se * math.sqrt(2.0))))
    assert bootstrap_wald_p_value(0.0, [1.0, 1.0]) == 1.0 and bootstrap_wald_p_value(0.5, [1.0, 1.0]) == 0.0
    assert math.isnan(bootstrap_wald_p_value(1.0, [2.0]))


def test_probing_uses_the_shared_interval_and_wald_p():
    import eah_interp.probing as probing
    from eah_interp.metrics import stats

    assert probing._interval is stats.percentile_interval and probing._wald_p is stats.bootstrap_wald_p_value
