"""Activation patching of any treatment: endpoints, hand-written two-run hook swaps, hf = nnsight = lens."""

from __future__ import annotations

import contextlib
import math

import matplotlib
import pandas.testing as pd_testing
import pytest
import torch
from nnsight import NNsight

import eah_interp.transformer_lens as lens
from eah_interp import hf, sink_scores
from eah_interp.errors import HeadIndexError, LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.interventions import EAH, PAI, VAF, VAR, Knockout
from eah_interp.layout import TokenLayout
from eah_interp.models.tiny import TINY_IMAGE_ID, TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_qwen2_vl
from eah_interp.patching import (
    COLUMNS,
    EXAMPLE_COLUMNS,
    LAYER_SITES,
    SITES,
    HFPatcher,
    LensPatcher,
    LogitDiff,
    NNsightPatcher,
    Patch,
    TokenLogProb,
    last_positions,
    plot_heads,
    plot_sites,
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
    """Model, inputs, EAH and a metric whose value EAH moves (tokens chosen on the EAH change)."""
    model = sharp_tiny_llava()
    inputs = tiny_inputs(model)
    config = EAH.from_dict(preset("paper", model, inputs).to_dict())
    want, _ = hf_logits(model, inputs, config)
    change = (want[:, -1] - hf_logits(model, inputs)[:, -1]).mean(0)  # left padding: -1 is the last real token
    metric = LogitDiff(yes=int(change.argmax()), no=int(change.argmin()))
    return model, inputs, config, metric


@pytest.fixture(scope="module")
def patcher(setup):
    model, inputs, config, _ = setup
    return HFPatcher(model, inputs, treatment=[config])


@pytest.fixture(scope="module")
def table(setup, patcher):
    return sweep(patcher, setup[3], progress=False)


@pytest.fixture(scope="module")
def lens_patcher(setup):
    _, inputs, config, _ = setup
    return LensPatcher(lens.boot_bridge(sharp_tiny_llava()), inputs, treatment=[config])


@pytest.fixture(scope="module")
def nnsight_patcher(setup):
    model, inputs, config, _ = setup
    return NNsightPatcher(NNsight(model), inputs, treatment=[config])


def value(logits, inputs, metric):
    return float(metric(logits, last_positions(tiny_layout(inputs))).mean())


def row(table, **where):
    sub = table
    for key, v in where.items():
        sub = sub[sub[key].isna()] if v is None else sub[sub[key] == v]
    assert len(sub) == 1, where
    return sub.iloc[0]


# ---------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize("which", ["hf", "nnsight", "lens"])
def test_patching_everything_gives_the_other_run_and_nothing_gives_its_own(setup, patcher, nnsight_patcher,
                                                                           lens_patcher, which):
    model, inputs, config, _ = setup
    p = {"hf": patcher, "nnsight": nnsight_patcher, "lens": lens_patcher}[which]
    baseline, (eah, _) = hf_logits(model, inputs), hf_logits(model, inputs, config)
    last = N_LAYERS - 1
    for direction, own, other in (("treatment_into_baseline", baseline, eah), ("baseline_into_treatment", eah, baseline)):
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
    assert table.attrs["treatment_metric"] == pytest.approx(eah, abs=1e-5)
    assert table.attrs["treatment"] == [config.to_dict()] and table.attrs["baseline"] == []
    effect = (table.metric - table.baseline_metric) / (table.treatment_metric - table.baseline_metric)
    assert torch.allclose(torch.tensor(effect.values), torch.tensor(table.normalised_effect.values))
    for direction, want in (("treatment_into_baseline", 1.0), ("baseline_into_treatment", 0.0)):
        assert row(table, direction=direction, site="resid", layer=N_LAYERS - 1, positions="all",
                   head=None).normalised_effect == pytest.approx(want, abs=1e-4)
        # layer 0 runs before the edited layer 1: patching it changes nothing
        early = table[(table.direction == direction) & (table.layer == 0)]
        assert early.normalised_effect.tolist() == pytest.approx([1.0 - want] * len(early), abs=1e-4)
    assert table[table.site != "head"]["head"].isna().all() and not table[table.site == "head"]["head"].isna().any()


# ---------------------------------------------------------------------------- EAH: hand-written references
def test_one_layer_site_equals_a_hand_written_hf_hook_reference(setup, table):
    """mlp_out of layer 2 at the image tokens, EAH -> baseline, with plain torch hooks and hf.eah."""
    model, inputs, config, metric = setup
    mlp = model.model.language_model.layers[2].mlp
    image = (inputs["input_ids"] == TINY_IMAGE_TOKEN_ID)[..., None]
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
    got = row(table, direction="treatment_into_baseline", site="mlp_out", layer=2, positions="image", head=None)
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
    got = row(table, direction="baseline_into_treatment", site="head", layer=1, head=1, positions="last")
    assert got.metric == pytest.approx(want, abs=1e-6)
    assert not math.isclose(want, got.treatment_metric, abs_tol=1e-6)


# ---------------------------------------------------------------------------- any treatment: two-run hook swaps
def _qwen():
    model, inputs = tiny_qwen2_vl(seed=0)
    with torch.no_grad():  # sharper attention, as sharp_tiny_llava does
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model, inputs, TINY_IMAGE_ID


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family(request):
    if request.param == "llava":
        model = sharp_tiny_llava()
        return model, tiny_inputs(model), TINY_IMAGE_TOKEN_ID
    return _qwen()


def discriminative_eah(model, inputs, image_id):
    """EAH.paper at layer 1 with a sink threshold under which the chosen source head differs between rows
    or from head 0 (so EAH's head choice matters), from the layer's own sink scores."""
    layout = TokenLayout.from_input_ids(inputs["input_ids"], image_id, inputs["attention_mask"])
    with hf.record_attention(model, [1], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    scores = sink_scores(rec.patterns[1][0], layout, "causal")
    levels = scores[layout.image_mask[:, None, :].expand_as(scores)].unique().flip(0)
    for threshold in (levels[1:] + levels[:-1]) / 2:
        counts = ((scores > threshold) & layout.image_mask[:, None, :]).sum(-1)
        if (counts.max(-1).values > 0).all() and (counts.argmax(-1) != 0).any():
            return EAH.paper(threshold=float(threshold))
    raise AssertionError("no discriminative threshold")


#: VAR's sink dimensions and threshold of the two tiny models (their largest RMS-normalised dims at layer 1,
#: as in tests/test_interventions.py), rho / summ loosened so that some heads qualify.
VAR_SETTINGS = {TINY_IMAGE_TOKEN_ID: ((27, 51), 2.8), TINY_IMAGE_ID: ((15, 62), 2.5)}


def treatments(model, inputs, image_id):
    """``{case: (treatment, baseline)}``: EAH, PAI, VAR, a Knockout, a stack, and a stack over an EAH baseline."""
    eah = discriminative_eah(model, inputs, image_id)
    dims, tau = VAR_SETTINGS[image_id]
    pai = PAI(alpha=0.5, layers=(1, 2))
    return {
        "EAH": ([eah], []),
        "PAI": ([pai], []),
        "VAR": ([VAR(dims=dims, tau=tau, rho=0.9, summ=0.05, layers=(1,))], []),
        "Knockout": ([Knockout(queries="question", keys="image", layers=(0, 1))], []),
        "EAH+PAI": ([eah, pai], []),
        "EAH+PAI over EAH": ([eah, pai], [eah]),  # what PAI adds to EAH
    }


def _site_module(model, site, layer):
    block = model.model.language_model.layers[layer]
    return {"head": block.self_attn.o_proj, "attn_out": block.self_attn, "mlp_out": block.mlp, "resid": block}[site]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _forward(model, inputs, items, hooks=()):
    """Logits of the plain model (``items`` empty) or under `hf.intervene`, with plain torch hooks ``(module, kind, fn)``."""
    handles = [module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn)
               for module, kind, fn in hooks]
    try:
        with torch.no_grad(), (hf.intervene(model, items) if items else contextlib.nullcontext()):
            return model(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def capture(model, inputs, items, layer):
    """Every site's activation of ``layer`` in the run with ``items`` (plain torch hooks; head: o_proj's input)."""
    seen = {}

    def keep(site, value):
        seen[site] = value.detach().clone()  # returns None: the forward goes on unchanged

    hooks = [(_site_module(model, "head", layer), "pre", lambda m, a: keep("head", a[0]))]
    hooks += [(_site_module(model, site, layer), "post", lambda m, a, out, site=site: keep(site, _first(out)))
              for site in LAYER_SITES]
    _forward(model, inputs, items, hooks)
    return seen


def hook_swap(model, inputs, receiver, donor, site, layer, head, where, head_dim):
    """The receiver run (``receiver`` interventions) with the donor's activation of ``site`` (``donor``: from
    `capture`; o_proj's input columns of ``head``) copied in at the positions ``where`` (``Bool[batch, seq]``)."""
    module, value = _site_module(model, site, layer), donor[site]
    if site == "head":
        cols = torch.zeros(value.shape[-1], dtype=torch.bool)
        cols[head * head_dim:(head + 1) * head_dim] = True
        chosen = where[..., None] & cols
        return _forward(model, inputs, receiver, [(module, "pre", lambda m, a: (torch.where(chosen, value, a[0]), *a[1:]))])

    def swap(m, a, out):
        new = torch.where(where[..., None], value, _first(out))
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return _forward(model, inputs, receiver, [(module, "post", swap)])


def hand_positions(inputs, image_id):
    """``last``: each row's last real position (left padding: -1); ``question``: after the last image token,
    the last position excluded; written from the ids."""
    ids = inputs["input_ids"]
    last, question = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True
    for r in range(ids.shape[0]):
        after = max(j for j in range(ids.shape[1]) if int(ids[r, j]) == image_id) + 1
        question[r, after:-1] = True
    return {"last": last, "question": question}


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output'")
@pytest.mark.parametrize("case", ["EAH", "PAI", "VAR", "Knockout", "EAH+PAI", "EAH+PAI over EAH"])
def test_any_treatment_equals_a_two_run_hook_swap_on_hf_and_nnsight(family, case):
    """Every site of layer 1 (one head), at the last position and the question, in both directions: the
    HF and nnsight patchers' per-example metric equals a hand-written two-run swap with plain torch hooks."""
    model, inputs, image_id = family
    treatment, baseline = treatments(model, inputs, image_id)[case]
    layer, head = 1, 2
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    where = hand_positions(inputs, image_id)
    last = torch.tensor([inputs["input_ids"].shape[1] - 1] * inputs["input_ids"].shape[0])
    plain_base, plain_treated = _forward(model, inputs, baseline)[:, -1], _forward(model, inputs, treatment)[:, -1]
    change = (plain_treated - plain_base).mean(0)
    metric = LogitDiff(yes=int(change.argmax()), no=int(change.argmin()))
    options = dict(sites=SITES, layers=[layer], heads=[head], positions=("last", "question"), per_example=True,
                   progress=False)
    frames = {
        "hf": sweep(HFPatcher(model, inputs, treatment, baseline), metric, **options),
        "nnsight": sweep(NNsightPatcher(NNsight(model), inputs, treatment=treatment, baseline=baseline), metric, **options),
    }
    moved = 0.0
    for direction, receiver, donor in (("treatment_into_baseline", baseline, treatment),
                                       ("baseline_into_treatment", treatment, baseline)):
        donated, own = capture(model, inputs, donor, layer), metric(_forward(model, inputs, receiver), last)
        for site in SITES:
            for group, mask in where.items():
                logits = hook_swap(model, inputs, receiver, donated, site, layer, head, mask, head_dim)
                want = metric(logits, last).tolist()
                moved = max(moved, float((torch.tensor(want) - own).abs().max()))
                for name, frame in frames.items():
                    sub = frame[(frame.direction == direction) & (frame.site == site) & (frame.positions == group)]
                    assert sub.sort_values("example").metric.tolist() == pytest.approx(want, abs=1e-5), (
                        name, direction, site, group)
    assert moved > 1e-4, f"{case}: no patch moved the metric, the check would be empty"


def test_lens_refuses_what_it_cannot_apply_yet(setup, lens_patcher):
    """A bridge exposes no pre-mask scores (VAF) and no values (ValueEdit): refused before any forward."""
    model, inputs, config, _ = setup
    with pytest.raises(UnsupportedModelError, match="VAF edits at 'scores_premask'.*hf.intervene"):
        LensPatcher(lens_patcher.bridge, inputs, treatment=[config, VAF()])


# ---------------------------------------------------------------------------- hf = nnsight = lens
def test_hf_nnsight_and_transformer_lens_agree(setup, table, nnsight_patcher, lens_patcher):
    options = dict(layers=[1, 3], heads=[0, 2], positions=("image", "last"), progress=False)
    keys = ["direction", "site", "layer", "head", "positions"]
    for other in (nnsight_patcher, lens_patcher):
        frame = sweep(other, setup[3], **options)
        merged = frame.merge(table, on=keys, suffixes=("", "_hf"))
        assert len(merged) == len(frame) == 2 * 2 * (3 + 2) * 2
        assert torch.allclose(torch.tensor(merged.metric.values), torch.tensor(merged.metric_hf.values), atol=1e-5)


@pytest.mark.parametrize("case", ["PAI", "VAR", "Knockout", "EAH+PAI over EAH"])
def test_transformer_lens_equals_hf_for_any_treatment_it_can_apply(case):
    """Beyond EAH: the lens patcher's table (hooks on the bridge: hook_attn_scores / hook_pattern / hook_z /
    resid) equals the HF patcher's (dispatcher edits, torch hooks) for PAI, VAR, a Knockout and a stack over an
    EAH baseline on tiny LLaVA, at every site of the edited layers, in both directions."""
    model = sharp_tiny_llava()
    inputs = tiny_inputs(model)
    treatment, baseline = treatments(model, inputs, TINY_IMAGE_TOKEN_ID)[case]
    plain_base, plain_treated = _forward(model, inputs, baseline)[:, -1], _forward(model, inputs, treatment)[:, -1]
    change = (plain_treated - plain_base).mean(0)
    metric = LogitDiff(yes=int(change.argmax()), no=int(change.argmin()))
    options = dict(sites=SITES, layers=[1, 2], heads=[0, 2], positions=("last", "question"), per_example=True,
                   progress=False)
    want = sweep(HFPatcher(model, inputs, treatment, baseline), metric, **options)
    bridge = lens.boot_bridge(model, copy=True)
    got = sweep(LensPatcher(bridge, inputs, treatment=treatment, baseline=baseline), metric, **options)
    keys = ["direction", "site", "layer", "head", "positions", "example"]
    merged = got.merge(want, on=keys, suffixes=("", "_hf"))
    assert len(merged) == len(got) == len(want) > 0
    assert merged.metric.tolist() == pytest.approx(merged.metric_hf.tolist(), abs=1e-5)
    assert merged.treatment_metric.tolist() == pytest.approx(merged.treatment_metric_hf.tolist(), abs=1e-5)
    assert (merged.metric - merged.baseline_metric).abs().max() > 1e-4, "no patch moved the metric"


# ---------------------------------------------------------------------------- options, metrics, plots, errors
def test_subsets_other_metrics_and_a_null_edit(setup, patcher):
    model, inputs, config, metric = setup
    logprob = sweep(patcher, TokenLogProb(metric.yes), sites=("resid",), layers=[1], positions=("all", "last"),
                    directions=("treatment_into_baseline",), progress=False)
    assert len(logprob) == 2 and logprob.site.unique().tolist() == ["resid"]
    assert row(logprob, positions="all").normalised_effect == pytest.approx(1.0, abs=1e-4)
    pair = sweep(patcher, (metric.yes, metric.no), sites=("attn_out",), layers=[1], positions=("all",), progress=False)
    assert len(pair) == 2
    null = HFPatcher(model, inputs, [EAH(layers=(1,), source=2, target_heads=(2,))])
    with pytest.warns(UserWarning, match="does not change the metric"):
        frame = sweep(null, metric, sites=("resid",), layers=[3], positions=("all",), progress=False)
    assert frame.normalised_effect.isna().all()
    # the plain model on both sides of an explicit baseline list: the treatment is the difference of two lists
    same = HFPatcher(model, inputs, treatment=[config], baseline=[config])
    with pytest.warns(UserWarning, match="does not change the metric"):
        sweep(same, metric, sites=("resid",), layers=[3], positions=("all",), progress=False)


def test_plots(table):
    fig = plot_sites(table, direction="treatment_into_baseline", positions="all")
    assert fig.axes and fig.axes[0].get_xlabel() == "site"
    fig = plot_heads(table, direction="baseline_into_treatment", positions="image")
    assert fig.axes and fig.axes[0].get_xlabel() == "head"


def test_errors_name_the_problem(setup, patcher):
    with pytest.raises(ValueError, match="Unknown site"):
        Patch("embed", 0)
    with pytest.raises(ValueError, match="head index goes with site='head'"):
        Patch("head", 0)
    with pytest.raises(ValueError, match="Unknown direction"):
        run_with_patches(patcher, [], "sideways")
    with pytest.raises(IndexError, match="out of range"):
        run_with_patches(patcher, [Patch("resid", 9)], "treatment_into_baseline")
    with pytest.raises(LayoutError, match="Unknown position group"):
        sweep(patcher, setup[3], positions=("middle",), progress=False)


def test_a_sweep_refuses_layers_and_heads_out_of_range_before_any_forward(setup, patcher, monkeypatch):
    """As attribution patching does (was: the two collecting forwards ran first, then run_with_patches failed)."""
    monkeypatch.setattr(patcher, "collect", lambda *a, **k: pytest.fail("a forward ran before the check"))
    with pytest.raises(LayerIndexError, match=r"Layers \[9\] out of range.*4 layers"):
        sweep(patcher, setup[3], layers=[1, 9], progress=False)
    with pytest.raises(HeadIndexError, match=r"Heads \[7\] out of range.*4 heads"):
        sweep(patcher, setup[3], heads=[7], progress=False)


# ---------------------------------------------------------------------------- position groups and masks
def hooked_value(model, inputs, config, metric, where, receiver_eah):
    """The metric with layer 2's mlp_out copied from the other run at ``where`` (plain torch hooks)."""
    receiver, donor = ([config], []) if receiver_eah else ([], [config])
    logits = hook_swap(model, inputs, receiver, capture(model, inputs, donor, 2), "mlp_out", 2, None, where, None)
    return metric(logits, last_positions(tiny_layout(inputs))).float()


def test_question_group_and_a_user_mask_equal_a_hand_written_patch(setup, patcher):
    """positions="question" and a Bool mask patch exactly the hand-picked positions."""
    model, inputs, config, metric = setup
    question = hand_positions(inputs, TINY_IMAGE_TOKEN_ID)["question"]
    assert question.sum(-1).tolist() == [5, 2]  # 1 separator + suffixes of 5 and 2 tokens, the last one excluded
    one = torch.zeros_like(question)
    one[0, -3] = one[1, -4] = True  # any positions of one's choosing, one per row
    frame = sweep(patcher, metric, sites=("mlp_out",), layers=[2], directions=("treatment_into_baseline",),
                  positions={"question": "question", "mine": one}, progress=False)
    for label, where in (("question", question), ("mine", one)):
        want = float(hooked_value(model, inputs, config, metric, where, receiver_eah=False).mean())
        assert row(frame, positions=label).metric == pytest.approx(want, abs=1e-6)
        assert not math.isclose(want, row(frame, positions=label).baseline_metric, abs_tol=1e-6)
    logits = run_with_patches(patcher, [Patch("mlp_out", 2, positions=question)], "treatment_into_baseline")
    assert value(logits, inputs, metric) == pytest.approx(row(frame, positions="question").metric, abs=1e-6)


def test_bad_position_masks_are_refused_before_a_forward(setup, patcher):
    with pytest.raises(LayoutError, match="shape"):
        sweep(patcher, setup[3], positions=(torch.ones(2, 3, dtype=torch.bool),), progress=False)
    with pytest.raises(LayoutError, match="torch.bool"):
        run_with_patches(patcher, [Patch("resid", 0, positions=torch.ones(patcher.layout.attention_mask.shape))],
                         "treatment_into_baseline")
    empty = torch.zeros(patcher.layout.attention_mask.shape, dtype=torch.bool)
    empty[0, -1] = True
    with pytest.raises(LayoutError, match=r"no position in row\(s\) \[1\]"):
        run_with_patches(patcher, [Patch("resid", 0, positions=empty)], "treatment_into_baseline")


# ---------------------------------------------------------------------------- per-example effects
def test_per_example_effects_equal_a_hand_computation(setup, patcher):
    """Per-row metric, effect and normalised effect vs plain hooks; the summary is computed from them."""
    model, inputs, config, metric = setup
    last = last_positions(tiny_layout(inputs))
    base = metric(hf_logits(model, inputs), last).float()
    eah = metric(hf_logits(model, inputs, config)[0], last).float()
    image = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID
    kwargs = dict(sites=("mlp_out",), layers=[2], positions=("image",), progress=False)
    rows = sweep(patcher, metric, per_example=True, **kwargs)
    assert list(rows.columns) == list(EXAMPLE_COLUMNS) and len(rows) == 2 * 2  # 2 directions x 2 prompts
    for direction, receiver_eah in (("treatment_into_baseline", False), ("baseline_into_treatment", True)):
        want = hooked_value(model, inputs, config, metric, image, receiver_eah)
        sub = rows[rows.direction == direction].sort_values("example")
        assert sub.example.tolist() == [0, 1]
        assert sub.metric.tolist() == pytest.approx(want.tolist(), abs=1e-5)
        assert sub.baseline_metric.tolist() == pytest.approx(base.tolist(), abs=1e-5)
        assert sub.treatment_metric.tolist() == pytest.approx(eah.tolist(), abs=1e-5)
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
        return pd.DataFrame({"direction": "treatment_into_baseline", "site": "resid", "layer": 0, "head": pd.NA,
                             "positions": "all", "example": range(n), "metric": effects, "baseline_metric": 0.0,
                             "treatment_metric": 2.0, "effect": effects, "normalised_effect": [e / 2 for e in effects]})

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
    model, inputs, config, metric = setup
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
        f.write('{"key": ["treatment_into_baseline", "re')  # a record cut off by a kill
    second = Counting(metric)
    got = sweep(patcher, second, checkpoint=path, per_example=True, **kwargs)
    assert second.calls == n_patches - 5  # the baseline, treatment and finished patches come from the file
    pd_testing.assert_frame_equal(got, want)
    third = Counting(metric)
    again = sweep(patcher, third, checkpoint=path, **kwargs)  # everything done: nothing computed
    assert third.calls == 0
    pd_testing.assert_frame_equal(again, summarise(want))
    with pytest.raises(ValueError, match=r"other arguments \(layers"):
        sweep(patcher, metric, checkpoint=path, **{**kwargs, "layers": [1]})
    # the header records both intervention lists: another baseline is other arguments
    other_baseline = HFPatcher(model, inputs, treatment=[config], baseline=[PAI(layers=(2,))])
    with pytest.raises(ValueError, match=r"other arguments \(baseline"):
        sweep(other_baseline, metric, checkpoint=path, **kwargs)
    other = tmp_path / "other.jsonl"
    other.write_text('{"condition": "baseline"}\n')
    with pytest.raises(ValueError, match="is not a patching sweep log"):
        sweep(patcher, metric, checkpoint=other, **kwargs)
