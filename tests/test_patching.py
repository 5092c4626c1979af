"""Activation patching stacked with EAH: endpoints, hand-written HF-hook references, nnsight vs TransformerLens."""

from __future__ import annotations

import math

import matplotlib
import pandas.testing as pd_testing
import pytest
import torch
from nnsight import NNsight

import eah_interp.transformer_lens as lens
from eah_interp import EAH
from eah_interp.errors import LayoutError
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava
from eah_interp.patching import (
    COLUMNS,
    EXAMPLE_COLUMNS,
    LAYER_SITES,
    LensPatcher,
    LogitDiff,
    NNsightPatcher,
    Patch,
    TokenLogProb,
    last_positions,
    plot_heads,
    plot_sites,
    position_masks,
    run_with_patches,
    summarise,
    sweep,
)
from tests.test_nnsight_backend import hf_logits, preset, real, tiny_inputs, tiny_layout

matplotlib.use("Agg")
torch.set_num_threads(1)

N_LAYERS, N_HEADS = 4, 4


@pytest.fixture(scope="module")
def setup():
    """Model, inputs, the EAH config and a metric whose value EAH moves (tokens chosen on the EAH change)."""
    model = sharp_tiny_llava()
    inputs = tiny_inputs(model)
    config = preset("paper", model, inputs)
    want, _ = hf_logits(model, inputs, config)
    change = (want[:, -1] - hf_logits(model, inputs)[:, -1]).mean(0)  # left padding: -1 is the last real token
    metric = LogitDiff(yes=int(change.argmax()), no=int(change.argmin()))
    return model, inputs, config, metric


@pytest.fixture(scope="module")
def patcher(setup):
    model, inputs, config, _ = setup
    return NNsightPatcher(NNsight(model), inputs, config)


@pytest.fixture(scope="module")
def table(setup, patcher):
    return sweep(patcher, setup[3])


@pytest.fixture(scope="module")
def lens_patcher(setup):
    _, inputs, config, _ = setup
    return LensPatcher(lens.boot_bridge(sharp_tiny_llava()), inputs, config)


def value(logits, inputs, metric):
    return float(metric(logits, last_positions(tiny_layout(inputs))).mean())


def row(table, **where):
    sub = table
    for key, v in where.items():
        sub = sub[sub[key].isna()] if v is None else sub[sub[key] == v]
    assert len(sub) == 1, where
    return sub.iloc[0]


# ---------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize("which", ["nnsight", "lens"])
def test_patching_everything_gives_the_other_run_and_nothing_gives_its_own(setup, patcher, lens_patcher, which):
    model, inputs, config, _ = setup
    p = patcher if which == "nnsight" else lens_patcher
    baseline, (eah, _) = hf_logits(model, inputs), hf_logits(model, inputs, config)
    last = N_LAYERS - 1
    for direction, own, other in (("eah_into_baseline", baseline, eah), ("baseline_into_eah", eah, baseline)):
        nothing = run_with_patches(p, [], direction)
        assert torch.allclose(real(nothing, inputs), real(own, inputs), atol=1e-5)
        resid = run_with_patches(p, [Patch("resid", last, positions="all")], direction)
        assert torch.allclose(real(resid, inputs), real(other, inputs), atol=1e-5)
        every = [Patch(site, layer, positions="all") for layer in range(N_LAYERS) for site in ("attn_out", "mlp_out")]
        assert torch.allclose(real(run_with_patches(p, every, direction), inputs), real(other, inputs), atol=1e-5)
        # EAH edits only layer 1's attention: all of layer 1's heads carry the whole change
        heads = [Patch("head", 1, head, "all") for head in range(N_HEADS)]
        assert torch.allclose(real(run_with_patches(p, heads, direction), inputs), real(other, inputs), atol=1e-5)


def test_table_endpoints_and_layout(setup, table):
    model, inputs, config, metric = setup
    base = value(hf_logits(model, inputs), inputs, metric)
    eah = value(hf_logits(model, inputs, config)[0], inputs, metric)
    assert abs(eah - base) > 1e-3
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 2 * (N_LAYERS * len(LAYER_SITES) + N_LAYERS * N_HEADS) * 4
    assert table.attrs["baseline_metric"] == pytest.approx(base, abs=1e-5)
    assert table.attrs["eah_metric"] == pytest.approx(eah, abs=1e-5)
    effect = (table.metric - table.baseline_metric) / (table.eah_metric - table.baseline_metric)
    assert torch.allclose(torch.tensor(effect.values), torch.tensor(table.normalised_effect.values))
    for direction, want in (("eah_into_baseline", 1.0), ("baseline_into_eah", 0.0)):
        assert row(table, direction=direction, site="resid", layer=N_LAYERS - 1, positions="all",
                   head=None).normalised_effect == pytest.approx(want, abs=1e-4)
        # layer 0 runs before the edited layer 1: patching it changes nothing
        early = table[(table.direction == direction) & (table.layer == 0)]
        assert early.normalised_effect.tolist() == pytest.approx([1.0 - want] * len(early), abs=1e-4)
    assert table[table.site != "head"]["head"].isna().all() and not table[table.site == "head"]["head"].isna().any()


# ---------------------------------------------------------------------------- hand-written references
def test_one_layer_site_equals_a_hand_written_hf_hook_reference(setup, table):
    """mlp_out of layer 2 at the image tokens, EAH -> baseline, with plain torch hooks and hf.eah."""
    model, inputs, config, metric = setup
    mlp = model.model.language_model.layers[2].mlp
    image = position_masks(tiny_layout(inputs))["image"][..., None]
    cached = {}
    handle = mlp.register_forward_hook(lambda m, a, out: cached.setdefault("eah", out.detach().clone()))
    try:
        hf_logits(model, inputs, config)
    finally:
        handle.remove()
    handle = mlp.register_forward_hook(lambda m, a, out: torch.where(image, cached["eah"], out))
    try:
        want = value(hf_logits(model, inputs), inputs, metric)
    finally:
        handle.remove()
    got = row(table, direction="eah_into_baseline", site="mlp_out", layer=2, positions="image", head=None)
    assert got.metric == pytest.approx(want, abs=1e-6)
    assert not math.isclose(want, got.baseline_metric, abs_tol=1e-6)  # the reference is not trivially the baseline


def test_one_head_equals_a_hand_written_hf_hook_reference(setup, table):
    """Head 1 of layer 1 (its slice of o_proj's input) at the last token, baseline -> EAH."""
    model, inputs, config, metric = setup
    o_proj = model.model.language_model.layers[1].self_attn.o_proj
    head_dim = model.config.text_config.hidden_size // N_HEADS
    cols = slice(1 * head_dim, 2 * head_dim)
    cached = {}
    handle = o_proj.register_forward_pre_hook(lambda m, a: cached.setdefault("base", a[0].detach().clone()))
    try:
        hf_logits(model, inputs)
    finally:
        handle.remove()

    def patch(module, args):
        x = args[0].clone()
        x[:, -1, cols] = cached["base"][:, -1, cols]  # left padding: -1 is every row's last token
        return (x,)

    handle = o_proj.register_forward_pre_hook(patch)
    try:
        want = value(hf_logits(model, inputs, config)[0], inputs, metric)
    finally:
        handle.remove()
    got = row(table, direction="baseline_into_eah", site="head", layer=1, head=1, positions="last")
    assert got.metric == pytest.approx(want, abs=1e-6)
    assert not math.isclose(want, got.eah_metric, abs_tol=1e-6)


# ---------------------------------------------------------------------------- the two implementations agree
def test_nnsight_and_transformer_lens_agree(setup, table, lens_patcher):
    lens_table = sweep(lens_patcher, setup[3])
    keys = ["direction", "site", "layer", "head", "positions"]
    merged = table.merge(lens_table, on=keys, suffixes=("", "_lens"))
    assert len(merged) == len(table) == len(lens_table)
    assert torch.allclose(torch.tensor(merged.metric.values), torch.tensor(merged.metric_lens.values), atol=1e-5)


# ---------------------------------------------------------------------------- options, metrics, plots, errors
def test_subsets_other_metrics_and_a_null_edit(setup, patcher):
    model, inputs, config, metric = setup
    logprob = sweep(patcher, TokenLogProb(metric.yes), sites=("resid",), layers=[1], positions=("all", "last"),
                    directions=("eah_into_baseline",))
    assert len(logprob) == 2 and logprob.site.unique().tolist() == ["resid"]
    assert row(logprob, positions="all").normalised_effect == pytest.approx(1.0, abs=1e-4)
    pair = sweep(patcher, (metric.yes, metric.no), sites=("attn_out",), layers=[1], positions=("all",))
    assert len(pair) == 2
    null = NNsightPatcher(patcher.nn_model, inputs, EAH(layers=(1,), source=2, target_heads=(2,)))
    with pytest.warns(UserWarning, match="does not change the metric"):
        frame = sweep(null, metric, sites=("resid",), layers=[3], positions=("all",))
    assert frame.normalised_effect.isna().all()


def test_plots(table):
    fig = plot_sites(table, direction="eah_into_baseline", positions="all")
    assert fig.axes and fig.axes[0].get_xlabel() == "site"
    fig = plot_heads(table, direction="baseline_into_eah", positions="image")
    assert fig.axes and fig.axes[0].get_xlabel() == "head"


def test_errors_name_the_problem(setup, patcher):
    with pytest.raises(ValueError, match="Unknown site"):
        Patch("embed", 0)
    with pytest.raises(ValueError, match="head index goes with site='head'"):
        Patch("head", 0)
    with pytest.raises(ValueError, match="Unknown direction"):
        run_with_patches(patcher, [], "sideways")
    with pytest.raises(IndexError, match="out of range"):
        run_with_patches(patcher, [Patch("resid", 9)], "eah_into_baseline")
    with pytest.raises(ValueError, match="Unknown position group"):
        sweep(patcher, setup[3], positions=("middle",))


# ---------------------------------------------------------------------------- position groups and masks
def hand_question_mask(inputs):
    """Positions after each row's last image token, the last (real) position excluded: written from the ids."""
    ids = inputs["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for r in range(ids.shape[0]):
        last_image = max(j for j in range(ids.shape[1]) if int(ids[r, j]) == TINY_IMAGE_TOKEN_ID)
        for j in range(last_image + 1, ids.shape[1] - 1):  # left padding: the last real token is at -1
            mask[r, j] = True
    return mask


def hooked_value(model, inputs, config, metric, where, receiver_eah):
    """The metric with layer 2's mlp_out copied from the other run at ``where`` (plain torch hooks)."""
    mlp = model.model.language_model.layers[2].mlp
    cached = {}

    def forward(eah):
        return hf_logits(model, inputs, config)[0] if eah else hf_logits(model, inputs)

    handle = mlp.register_forward_hook(lambda m, a, out: cached.setdefault("donor", out.detach().clone()))
    try:
        forward(not receiver_eah)
    finally:
        handle.remove()
    handle = mlp.register_forward_hook(lambda m, a, out: torch.where(where[..., None], cached["donor"], out))
    try:
        return metric(forward(receiver_eah), last_positions(tiny_layout(inputs))).float()
    finally:
        handle.remove()


def test_question_group_and_a_user_mask_equal_a_hand_written_patch(setup, patcher):
    """positions="question" and a Bool mask patch exactly the hand-picked positions (the old code refused both)."""
    model, inputs, config, metric = setup
    question = hand_question_mask(inputs)
    assert question.sum(-1).tolist() == [5, 2]  # 1 separator + suffixes of 5 and 2 tokens, the last one excluded
    one = torch.zeros_like(question)
    one[0, -3] = one[1, -4] = True  # any positions of one's choosing, one per row
    frame = sweep(patcher, metric, sites=("mlp_out",), layers=[2], directions=("eah_into_baseline",),
                  positions={"question": "question", "mine": one}, progress=False)
    for label, where in (("question", question), ("mine", one)):
        want = float(hooked_value(model, inputs, config, metric, where, receiver_eah=False).mean())
        assert row(frame, positions=label).metric == pytest.approx(want, abs=1e-6)
        assert not math.isclose(want, row(frame, positions=label).baseline_metric, abs_tol=1e-6)
    logits = run_with_patches(patcher, [Patch("mlp_out", 2, positions=question)], "eah_into_baseline")
    assert value(logits, inputs, metric) == pytest.approx(row(frame, positions="question").metric, abs=1e-6)


def test_bad_position_masks_are_refused_before_a_forward(setup, patcher):
    with pytest.raises(LayoutError, match="shape"):
        sweep(patcher, setup[3], positions=(torch.ones(2, 3, dtype=torch.bool),), progress=False)
    with pytest.raises(ValueError, match="Bool"):
        Patch("resid", 0, positions=torch.ones(2, 3))
    empty = torch.zeros(patcher.layout.attention_mask.shape, dtype=torch.bool)
    empty[0, -1] = True
    with pytest.raises(LayoutError, match=r"no position in row\(s\) \[1\]"):
        run_with_patches(patcher, [Patch("resid", 0, positions=empty)], "eah_into_baseline")


# ---------------------------------------------------------------------------- per-example effects
def test_per_example_effects_equal_a_hand_computation(setup, patcher):
    """Per-row metric, effect and normalised effect vs plain hooks; the summary is computed from them."""
    model, inputs, config, metric = setup
    last = last_positions(tiny_layout(inputs))
    base = metric(hf_logits(model, inputs), last).float()
    eah = metric(hf_logits(model, inputs, config)[0], last).float()
    image = tiny_layout(inputs).image_mask
    kwargs = dict(sites=("mlp_out",), layers=[2], positions=("image",), progress=False)
    rows = sweep(patcher, metric, per_example=True, **kwargs)
    assert list(rows.columns) == list(EXAMPLE_COLUMNS) and len(rows) == 2 * 2  # 2 directions x 2 prompts
    for direction, receiver_eah in (("eah_into_baseline", False), ("baseline_into_eah", True)):
        want = hooked_value(model, inputs, config, metric, image, receiver_eah)
        sub = rows[rows.direction == direction].sort_values("example")
        assert sub.example.tolist() == [0, 1]
        assert sub.metric.tolist() == pytest.approx(want.tolist(), abs=1e-5)
        assert sub.baseline_metric.tolist() == pytest.approx(base.tolist(), abs=1e-5)
        assert sub.eah_metric.tolist() == pytest.approx(eah.tolist(), abs=1e-5)
        assert sub.effect.tolist() == pytest.approx((want - base).tolist(), abs=1e-5)
        assert sub.normalised_effect.tolist() == pytest.approx(((want - base) / (eah - base)).tolist(), abs=1e-4)
        summary = row(sweep(patcher, metric, directions=(direction,), **kwargs), direction=direction)
        assert summary.metric == pytest.approx(float(want.mean()), abs=1e-5)
        assert summary.normalised_effect == pytest.approx(
            float((want.mean() - base.mean()) / (eah.mean() - base.mean())), abs=1e-4)
        assert summary.n_examples == 2 and math.isnan(summary.ci_low)  # 2 rows: too few for an interval


def test_summary_interval_from_examples():
    """12 examples: a constant per-example ratio gives a zero-width interval at it; spread gives a real one."""
    import pandas as pd

    def table(effects):
        n = len(effects)
        return pd.DataFrame({"direction": "eah_into_baseline", "site": "resid", "layer": 0, "head": pd.NA,
                             "positions": "all", "example": range(n), "metric": effects, "baseline_metric": 0.0,
                             "eah_metric": 2.0, "effect": effects, "normalised_effect": [e / 2 for e in effects]})

    flat = summarise(table([1.0] * 12)).iloc[0]
    assert (flat.normalised_effect, flat.ci_low, flat.ci_high) == pytest.approx((0.5, 0.5, 0.5))
    spread = summarise(table([0.0, 2.0] * 6)).iloc[0]
    assert spread.normalised_effect == pytest.approx(0.5) and spread.n_examples == 12
    assert 0.0 < spread.ci_low < 0.5 < spread.ci_high < 1.0
    assert math.isnan(summarise(table([1.0] * 9)).iloc[0].ci_low)  # below MIN_CI_EXAMPLES


# ---------------------------------------------------------------------------- checkpoint and resume
class Counting:
    """A metric that counts its calls and raises after ``fail_after`` of them (an interrupted sweep)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls = inner, fail_after, 0

    def __call__(self, logits, last):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        return self.inner(logits, last)


def test_interrupted_sweep_resumes_to_the_uninterrupted_result_computing_nothing_twice(setup, patcher, tmp_path):
    metric = setup[3]
    kwargs = dict(sites=("resid", "head"), layers=[1, 2], heads=[1], positions=("question", "last"), progress=False)
    n_patches = 2 * (2 + 2) * 2  # directions x (2 resid + 2 heads) x groups
    plain = Counting(metric)
    want = sweep(patcher, plain, per_example=True, **kwargs)
    assert plain.calls == 2 + n_patches
    path = tmp_path / "sweep.jsonl"
    first = Counting(metric, fail_after=2 + 5)
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep(patcher, first, checkpoint=path, **kwargs)
    assert len(path.read_text().splitlines()) == 1 + 5  # header + the five finished patches
    with open(path, "a") as f:
        f.write('{"key": ["eah_into_baseline", "re')  # a record cut off by a kill
    second = Counting(metric)
    got = sweep(patcher, second, checkpoint=path, per_example=True, **kwargs)
    assert second.calls == n_patches - 5  # the baseline, EAH and finished patches come from the file
    pd_testing.assert_frame_equal(got, want)
    third = Counting(metric)
    again = sweep(patcher, third, checkpoint=path, **kwargs)  # everything done: nothing computed
    assert third.calls == 0
    pd_testing.assert_frame_equal(again, summarise(want))
    with pytest.raises(ValueError, match=r"other arguments \(layers"):
        sweep(patcher, metric, checkpoint=path, **{**kwargs, "layers": [1]})
    other = tmp_path / "other.jsonl"
    other.write_text('{"condition": "baseline"}\n')
    with pytest.raises(ValueError, match="is not a patching sweep log"):
        sweep(patcher, metric, checkpoint=other, **kwargs)
