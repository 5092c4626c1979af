"""The explain study (issue 18): its synthetic controls, position groups, masses and statistics against hand
computations on tiny inputs, and one quick run of the whole study on the organism (each section written,
resumed without recomputation, reachable from the CLI)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eah_interp import hf
from eah_interp.errors import ConfigError
from eah_interp.layout import TokenLayout
from eah_interp.metrics.stats import holm
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs
from studies import explain

# two rows, left padding on row 0: [pad, sys, img, img, q, q, last] and [sys, sys, img, img, q, last, last']
ATTENTION = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
IMAGE = torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)


def layout() -> TokenLayout:
    return TokenLayout(IMAGE, ATTENTION)


def test_previous_token_map_by_hand():
    got = explain.previous_token_map(layout())
    expected = torch.zeros(2, 7, 7)
    expected[0, 1, 1] = 1  # the first real token of row 0 attends to itself
    for i in range(2, 7):
        expected[0, i, i - 1] = 1
    expected[1, 0, 0] = 1
    for i in range(1, 7):
        expected[1, i, i - 1] = 1
    assert torch.equal(got, expected)  # row 0's padding row 0 stays all zero


def test_uniform_map_by_hand():
    got = explain.uniform_map(layout())
    assert float(got[0, 0].abs().sum()) == 0.0  # padding row
    assert torch.allclose(got[0, 3], torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0]))  # keys 1..3 (0 is padding)
    assert torch.allclose(got[1, 6], torch.full((7,), 1 / 7))


def test_image_mass_equals_a_loop():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 7, 7, generator=g).softmax(-1)
    rows = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 0]], dtype=torch.bool)  # the question, by hand
    got = explain.image_mass(probs, layout(), "question")
    for b in range(2):
        values = [sum(float(probs[b, h, i, j]) for j in range(7) if IMAGE[b, j])
                  for h in range(3) for i in range(7) if rows[b, i]]
        assert math.isclose(float(got[b]), sum(values) / len(values), rel_tol=1e-5)
    one_row = TokenLayout(IMAGE, torch.tensor([[0, 1, 1, 1, 0, 0, 0], [1] * 7], dtype=torch.bool) & ATTENTION)
    assert math.isnan(float(explain.image_mass(probs, one_row, "question")[0]))  # row 0 has no question token


@pytest.mark.parametrize("pattern", explain.PATTERNS)
def test_synthetic_map_is_what_the_layer_computes(pattern):
    """Recorded after the edit, the map is the synthetic one; the heads' output (o_proj's input) is P @ V by hand."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    lay = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    attn = model.model.language_model.layers[2].self_attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("hidden", k["hidden_states"]), with_kwargs=True),
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0])),
    ]
    try:
        with torch.no_grad(), hf.intervene(model, [explain.SyntheticMap(pattern, layers=(2,))]) as run, \
                hf.record_attention(model, [2], keep_patterns=True) as rec:
            model(**inputs, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    probs = rec.patterns[2][0]
    real = lay.attention_mask
    for b in range(probs.shape[0]):
        first = int(real[b].float().argmax())
        for i in range(first, probs.shape[2]):
            if pattern == "previous_token":
                expected = torch.zeros(probs.shape[-1])
                expected[max(i - 1, first)] = 1
            else:
                expected = torch.tensor([1.0 if first <= j <= i else 0.0 for j in range(probs.shape[-1])])
                expected /= expected.sum()
            for head in range(probs.shape[1]):
                assert torch.allclose(probs[b, head, i], expected, atol=1e-6)
    n_heads, n_kv = model.config.text_config.num_attention_heads, model.config.text_config.num_key_value_heads
    d = attn.head_dim
    v = attn.v_proj(seen["hidden"]).view(*seen["hidden"].shape[:2], n_kv, d)
    for b in range(probs.shape[0]):
        first = int(real[b].float().argmax())
        for i in range(first, probs.shape[2]):
            for head in range(n_heads):
                keys = [max(i - 1, first)] if pattern == "previous_token" else list(range(first, i + 1))
                expected = sum(v[b, j, head // (n_heads // n_kv)] for j in keys) / len(keys)
                assert torch.allclose(seen["z"][b, i, head * d : (head + 1) * d], expected, atol=1e-5)
    assert run.records and run.records[0].changed > 0


def test_previous_token_map_agrees_with_the_sinks_null_model():
    """Two independent constructions: the explicit map's sink scores == `sinks.null_scores`' closed form."""
    from eah_interp.sinks import null_scores, sink_scores

    for normalise in ("causal", "official", "rows"):
        explicit = sink_scores(explain.previous_token_map(layout())[:, None], layout(), normalise)[:, 0]
        assert torch.allclose(explicit, null_scores(layout(), normalise=normalise)["previous"], atol=1e-6)
        explicit = sink_scores(explain.uniform_map(layout())[:, None], layout(), normalise)[:, 0]
        assert torch.allclose(explicit, null_scores(layout(), normalise=normalise)["uniform"], atol=1e-6)


def test_synthetic_map_validates_and_describes_itself():
    with pytest.raises(ConfigError, match="pattern"):
        explain.SyntheticMap("diagonal")
    item = explain.SyntheticMap("uniform", layers=(1,))
    assert "uniformly" in item.describe()
    assert explain.SyntheticMap.from_json(item.to_json()) == item


def _rows(split: str, arm: str, probes: list[float], labels: list[bool]) -> list[dict]:
    return [{"split": split, "arm": arm, "id": str(i), "label": lab, "probe": p, "correct": 1.0,
             "question_mass": [0.1, 0.05] + [0.1] * 3, "last_mass": [0.1] * 5,
             "question_mass_after": 0.1, "last_mass_after": 0.1}
            for i, (p, lab) in enumerate(zip(probes, labels, strict=True))]


def test_paired_tests_by_hand():
    """Six absent-object questions per split: the arm adds exactly +1 to each probe in discovery, +-1 in replication."""
    labels = [False] * 6
    rows = _rows("discovery", "baseline", [0.0] * 6, labels) + _rows("discovery", "arm", [1.0] * 6, labels)
    rows += _rows("replication", "baseline", [0.0] * 6, labels) + _rows("replication", "arm", [1, -1] * 3, labels)
    tests = explain.paired_tests(rows)
    by = {(t["split"], t["metric"]): t for t in tests}
    found = by[("discovery", "probe_absent")]
    assert found["diff"] == 1.0 and found["n"] == 6
    # all 2^6 sign patterns: only the two all-equal ones reach |mean| = 1, so p = 2/64 (+1 smoothing, 10k draws)
    assert abs(found["p"] - 2 / 64) < 0.01
    # Holm over the discovery block: the metrics without differences have p = 1
    block = [t for t in tests if t["split"] == "discovery"]
    assert [t["p_holm"] for t in block] == pytest.approx(holm([t["p"] for t in block]))
    assert ("discovery", "probe_present") not in by  # no present-object question
    again = by[("replication", "probe_absent")]
    assert again["diff"] == 0.0 and not again["replicates"]
    assert by[("discovery", "question_image_mass_layer1")]["diff"] == 0.0


# ---------------------------------------------------------------------------- one quick run on the organism
@pytest.fixture(scope="module")
def organism():
    from eah_interp.models import load_model

    torch.manual_seed(0)
    return load_model("organism")


def test_quick_study_writes_every_section_and_resumes(organism, tmp_path, monkeypatch):
    out = tmp_path / "explain"
    report = explain.main(out, quick=True, bundle=organism, progress=False)
    text = report.read_text()
    for heading in ("## Q1", "## Q2", "## Q3", "## Q4", "### discovery", "### replication", "### confirmation"):
        assert heading in text
    for name in ("q1_source_head.json", "q2_image_mass.json", "q4_tests.json", "q1_density_vs_threshold.png",
                 "q2_image_mass_by_layer.png", "q3_patching_resid.png", "q4_controls.png", "q2_probe.json",
                 "q2_probe.png", "q3_attribution.json", "q3_attribution.png", "q3_dla.json", "q3_dla.png",
                 "q2_layer_tests.json", "q2_layer_tests.png", "q4_versus_eah.json", "q3_patching.csv",
                 "q3_patching_labels.json"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "arms.jsonl").read_text().splitlines()]
    plan = explain.Plan.quick()
    assert len(rows) == len(plan.splits) * 2 * plan.n_scenes * len(plan.arms)  # splits x questions x scenes x arms
    # patching ran on both question types
    patched = [json.loads(line) for line in (out / "patching.jsonl").read_text().splitlines()]
    assert {r["label"] for r in patched} == {False, True}
    assert json.loads((out / "q3_attribution.json").read_text())["agreement"]["matched"] > 0
    assert all(r["source_heads"] == [] for r in rows if r["arm"] == "baseline")
    assert all(len(r["source_heads"]) == 1 for r in rows if r["arm"] == "eah_paper")
    q1 = json.loads((out / "q1_source_head.json").read_text())
    shares = q1["splits"]["discovery"]["previous_token_share"]
    assert len(shares) == 9 and all(0 <= s <= 1 for s in shares)
    distance = q1["splits"]["discovery"]["pattern_distance_previous"]
    assert distance == pytest.approx([1 - x for x in shares], abs=1e-6)  # the two views of one null
    # a previous-token map under the causal normaliser: every image key's score is 1 / (rows after it) > 0.01
    assert q1["splits"]["discovery"]["null_density"]["previous/causal"][q1["thresholds"].index(0.01)] == 1.0
    patches = (out / "patching.jsonl").read_text().splitlines()

    # a rerun recomputes nothing: no forward pass may run
    def no_forward(*args, **kwargs):
        raise AssertionError("a finished section ran the model again")

    monkeypatch.setattr(explain, "encode", no_forward)
    redrawn = ("q1_density_vs_threshold.png", "q3_dla.png")  # a finished section redraws a missing figure
    for name in redrawn:
        (out / name).unlink()
    explain.main(out, quick=True, bundle=organism, progress=False)
    assert all((out / name).exists() for name in redrawn)
    assert len((out / "arms.jsonl").read_text().splitlines()) == len(rows)
    assert (out / "patching.jsonl").read_text().splitlines() == patches
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="another plan"):
        explain.main(out, quick=True, bundle=organism, progress=False, n_scenes=2)


def test_python_m_studies_runs_the_study(tmp_path, monkeypatch):
    """``python -m studies explain --quick --out DIR`` reaches `explain.main` (whose quick run is tested above)."""
    from studies.__main__ import main as run_study_command

    calls = []

    def fake_main(out, *, quick=False, **options):
        calls.append((out, quick, options))
        (out / "report.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text("# report")
        return out / "report.md"

    monkeypatch.setattr(explain, "main", fake_main)
    assert run_study_command(["explain", "--quick", "--out", str(tmp_path / "cli")]) == tmp_path / "cli" / "report.md"
    assert calls == [(tmp_path / "cli", True, {})]


def test_unknown_options_are_named(tmp_path):
    with pytest.raises(ConfigError, match="n_scene"):
        explain.main(tmp_path, quick=True, bundle=object(), n_scene=3)
    with pytest.raises(ConfigError, match="baseline"):
        explain.arms(explain.Plan(arms=("eah_paper",)), 0.01)



def test_paired_tests_cluster_by_scene():
    """Two questions per scene that move together: the clustered test sees 4 scenes, not 8 independent questions."""
    from eah_interp.metrics.stats import cluster_bootstrap, sign_flip_p_value

    ids = [f"{100020000 + s}:{kind}:x" for s in range(4) for kind in ("present", "absent")]
    diffs = [1.0, 1.2, 0.8, 0.9, 1.1, 1.0, 0.7, 0.8]
    rows = [{"split": "discovery", "arm": arm, "id": i, "label": False, "probe": d if arm == "arm" else 0.0,
             "correct": 1.0, "question_mass": [0.1] * 3, "last_mass": [0.1] * 3, "question_mass_after": 0.1,
             "last_mass_after": 0.1} for arm in ("baseline", "arm") for i, d in zip(ids, diffs, strict=True)]
    found = {t["metric"]: t for t in explain.paired_tests(rows)}["probe_absent"]
    scenes = [i.split(":")[0] for i in ids]
    assert found["n_scenes"] == 4 and found["n"] == 8
    assert found["p"] == pytest.approx(sign_flip_p_value(diffs, clusters=scenes, n_resamples=explain.N_RESAMPLES))
    assert found["p"] > 1 / 16  # 4 scenes: at best 2 of 16 sign patterns are as extreme
    ci = cluster_bootstrap(diffs, scenes, n_resamples=explain.N_RESAMPLES)
    assert (found["low"], found["high"]) == pytest.approx((ci.low, ci.high))


def test_layer_tests_and_versus_tests_by_hand():
    """An arm that adds 0.02 to the question's image mass at layer 1 only; a control that moves the probe half as far."""
    labels = [False] * 6
    rows = _rows("discovery", "baseline", [0.0] * 6, labels)
    shifted = _rows("discovery", "eah_paper", [2.0] * 6, labels)
    for r in shifted:
        r["question_mass"] = [0.1, 0.07] + [0.1] * 3
    rows += shifted + _rows("discovery", "control", [1.0] * 6, labels)
    layers = {(t["arm"], t["group"], t["layer"]): t for t in explain.layer_tests(rows)}
    hit = layers[("eah_paper", "question", 1)]
    assert hit["diff"] == pytest.approx(0.02) and hit["relative"] == pytest.approx(0.02 / 0.05)
    assert layers[("eah_paper", "question", 2)]["diff"] == 0 and layers[("eah_paper", "question", "2-29")]["diff"] == 0
    block = [t for t in explain.layer_tests(rows)]
    assert [t["p_holm"] for t in block] == pytest.approx(holm([t["p"] for t in block]))
    versus = {t["metric"]: t for t in explain.versus_tests(rows)}
    assert versus["probe_absent"]["diff"] == pytest.approx(-1.0) and versus["probe_absent"]["arm"] == "control"


def test_patching_table_shares_and_label_difference():
    """Share carried = ratio of means; the necessity direction reports the share undone (one minus the effect)."""
    from eah_interp.patching import DIRECTIONS

    ids = [f"{100020000 + s}:{kind}:x" for s in range(3) for kind in ("absent",)]
    rows = [
        {"split": "discovery", "label": False, "site": "resid", "layer": 2, "positions": "question",
         "direction": DIRECTIONS[0], "ids": ids, "metric": [1.0, 2.0, 3.0], "baseline": [0.0] * 3, "eah": [2.0, 4.0, 4.0]},
        {"split": "discovery", "label": False, "site": "resid", "layer": 2, "positions": "question",
         "direction": DIRECTIONS[1], "ids": ids, "metric": [0.5, 1.0, 1.0], "baseline": [0.0] * 3, "eah": [2.0, 4.0, 4.0]},
    ]
    table = explain.patching_table(rows)
    assert table.effect_mean[0] == pytest.approx(6 / 10) and table.moved[0] == pytest.approx(0.6)
    assert table.effect_mean[1] == pytest.approx(2.5 / 10) and table.moved[1] == pytest.approx(0.75)  # undone
    assert table.moved_low[1] <= 0.75 <= table.moved_high[1]
    present = [{**r, "label": True, "ids": [i.replace("absent", "present") for i in ids],
                "metric": [m * 0.5 for m in r["metric"]]} for r in rows]
    tests = {t["direction"]: t for t in explain.patching_label_tests(rows + present)}
    assert tests[DIRECTIONS[0]]["diff"] == pytest.approx(0.3 - 0.6)  # carried: half as much on present objects
    assert tests[DIRECTIONS[0]]["n_scenes"] == 3
