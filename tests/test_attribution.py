"""Attribution patching and direct logit attribution against independent references.

* where the metric is linear in a site (the last layer's outputs, final norm replaced by the identity,
  a single-id logit difference), attribution patching equals activation patching (nnsight) exactly;
* elsewhere its estimate equals a central finite difference of the metric along the patch direction,
  computed with plain PyTorch hooks in float64 (no autograd);
* direct logit attribution: the parts add up to the logit difference read off the model's logits, and
  one head's share equals an explicit formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib
import pandas as pd
import pytest
import torch
from nnsight import NNsight

from eah_interp import hf
from eah_interp.attribution import (
    ATTRIBUTION_COLUMNS,
    agreement,
    attribution_patching,
    direct_logit_attribution,
    plot_dla,
)
from eah_interp.errors import ConfigError, HeadIndexError, LayerIndexError, LayoutError
from eah_interp.interventions import EAH, PAI
from eah_interp.models.tiny import sharp_tiny_llava
from eah_interp.patching import (
    COLUMNS,
    LogitDiff,
    NNsightPatcher,
    plot_heads,
    plot_sites,
    sweep,
)
from eah_interp.sites import resolve_positions
from tests.test_nnsight_backend import hf_logits, preset, tiny_inputs, tiny_layout

matplotlib.use("Agg")
torch.set_num_threads(1)

N_LAYERS, N_HEADS, HEAD_DIM = 4, 4, 16


@dataclass(frozen=True)
class ExactDiff:
    """``logit[yes] - logit[no]`` at the last position in the logits' own precision (LogitDiff computes in
    float32, which would cap float64 comparisons at 1e-7)."""

    yes: int
    no: int

    def __call__(self, logits, last):
        rows = torch.arange(logits.shape[0])
        return logits[rows, last, self.yes] - logits[rows, last, self.no]


def _metric_moved_by(model, inputs, config, kind=LogitDiff):
    """A single-id logit difference that EAH moves (ids chosen on the EAH change of the last logits)."""
    want, _ = hf_logits(model, inputs, config)
    change = (want[:, -1] - hf_logits(model, inputs)[:, -1]).mean(0)  # left padding: -1 is the last real token
    return kind(yes=int(change.argmax()), no=int(change.argmin()))


@pytest.fixture(scope="module")
def setup():
    model = sharp_tiny_llava()
    inputs = tiny_inputs(model)
    config = EAH.from_dict(preset("paper", model, inputs).to_dict())
    return model, inputs, config, _metric_moved_by(model, inputs, config)


class Norm64(torch.nn.Module):
    """LlamaRMSNorm's formula without its float32 round trip (which would put 1e-7 noise into float64 runs)."""

    def __init__(self, norm):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def float64_llava():
    """`sharp_tiny_llava` in float64 with exact float64 norms: finite differences good to 1e-9."""
    model = sharp_tiny_llava(dtype=torch.float64)
    lm = model.model.language_model
    lm.norm = Norm64(lm.norm)
    for layer in lm.layers:
        layer.input_layernorm = Norm64(layer.input_layernorm)
        layer.post_attention_layernorm = Norm64(layer.post_attention_layernorm)
    return model


@pytest.fixture(scope="module")
def setup64():
    """The same model in float64 (`float64_llava`)."""
    model = float64_llava()
    inputs = tiny_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    config = EAH.from_dict(preset("paper", model, inputs).to_dict())
    return model, inputs, config, _metric_moved_by(model, inputs, config, ExactDiff)


# ---------------------------------------------------------------------------- linear: equals activation patching
class Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_equals_activation_patching_where_the_metric_is_linear_in_the_site():
    """Final norm -> identity, the last layer's MLP -> zero (it would read attn_out through a norm), a
    single-id logit difference: the metric is linear in every output of the last layer (its heads' o_proj
    inputs, attn_out, resid), so the first-order estimate is exact (float64: 1e-9 against effects of 1e-4; the two backends' plain runs already differ by 1e-10)."""
    model = float64_llava()
    model.model.language_model.norm = torch.nn.Identity()
    model.model.language_model.layers[-1].mlp = Zero()
    inputs = tiny_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    config = EAH.from_dict(preset("paper", model, inputs).to_dict())
    metric = _metric_moved_by(model, inputs, config, ExactDiff)
    last = N_LAYERS - 1
    got = attribution_patching(model, inputs, config, metric, layers=[last])
    want = sweep(NNsightPatcher(NNsight(model), inputs, config), metric, layers=[last])
    keys = ["direction", "site", "layer", "head", "positions"]
    merged = got.merge(want, on=keys, suffixes=("", "_act"))
    assert len(merged) == len(want) == 2 * (3 + N_HEADS) * 4
    assert (merged["metric"] - merged["metric_act"]).abs().max() < 1e-9
    assert merged["metric_act"].sub(merged["baseline_metric_act"]).abs().max() > 1e-4  # patches move the metric
    score = agreement(got, want)
    assert score["pearson"] > 0.9999 and score["sign_agreement"] == 1.0


def test_not_exact_where_the_metric_is_not_linear(setup64):
    """With the real final norm and MLP the estimate is an approximation: the check above can fail."""
    model, inputs, config, metric = setup64
    last = N_LAYERS - 1
    got = attribution_patching(model, inputs, config, metric, layers=[last], sites=("head",), positions="last")
    want = sweep(NNsightPatcher(NNsight(model), inputs, config), metric, sites=("head",), layers=[last],
                 positions=("last",))
    assert abs(got["metric"].to_numpy() - want["metric"].to_numpy()).max() > 1e-8


# ---------------------------------------------------------------------------- finite differences (no autograd)
def _site_module(model, site: str, layer: int):
    block = model.model.language_model.layers[layer]
    return {"head": block.self_attn.o_proj, "attn_out": block.self_attn, "mlp_out": block.mlp, "resid": block}[site]


def _capture(model, inputs, site, layer, config=None):
    """The site's activation in the plain run (config None) or the EAH run, by a plain hook."""
    module, seen = _site_module(model, site, layer), {}
    if site == "head":
        handle = module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone()))
    else:
        handle = module.register_forward_hook(
            lambda m, a, out: seen.setdefault("x", (out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        hf_logits(model, inputs, config)
    finally:
        handle.remove()
    return seen["x"]


def _metric_with_added(model, inputs, site, layer, delta, config, metric, last):
    """Per-row metric of the run with ``delta`` added to the site's activation."""
    module = _site_module(model, site, layer)
    if site == "head":
        handle = module.register_forward_pre_hook(lambda m, a: (a[0] + delta,))
    else:
        def add(m, a, out):
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        handle = module.register_forward_hook(add)
    try:
        logits = hf_logits(model, inputs, config)
        logits = logits[0] if isinstance(logits, tuple) else logits
    finally:
        handle.remove()
    return metric(logits, last)


@pytest.mark.parametrize(
    ("direction", "site", "layer", "head", "group"),
    [
        ("treatment_into_baseline", "head", 2, 1, "image"),
        ("baseline_into_treatment", "resid", 1, None, "text"),
        ("baseline_into_treatment", "head", 1, 3, "all"),  # through the edited layer's backward (map-free EAH path)
        ("treatment_into_baseline", "mlp_out", 2, None, "last"),
    ],
)
def test_equals_a_finite_difference_along_the_patch(setup64, direction, site, layer, head, group):
    """d/dt m(receiver with a + t (a_donor - a_receiver) on the group) at t=0, by central differences."""
    model, inputs, config, metric = setup64
    layout = tiny_layout(inputs)
    last = torch.tensor([inputs["input_ids"].shape[1] - 1] * 2)  # left padding
    receiver_config, donor_config = (None, config) if direction == "treatment_into_baseline" else (config, None)
    delta = _capture(model, inputs, site, layer, donor_config) - _capture(model, inputs, site, layer, receiver_config)
    where = layout.group_mask(group)[..., None].double()
    if site == "head":
        cols = torch.zeros(delta.shape[-1], dtype=torch.float64)
        cols[head * HEAD_DIM : (head + 1) * HEAD_DIM] = 1.0
        where = where * cols
    delta = delta * where
    eps = 1e-4
    up = _metric_with_added(model, inputs, site, layer, eps * delta, receiver_config, metric, last)
    down = _metric_with_added(model, inputs, site, layer, -eps * delta, receiver_config, metric, last)
    want = (up - down) / (2 * eps)

    got = attribution_patching(model, inputs, config, metric, sites=(site,), layers=[layer],
                               heads=None if head is None else [head], positions=group, directions=(direction,),
                               per_example=True)
    assert len(got) == 2
    estimate = got["metric"] - got["baseline_metric" if direction == "treatment_into_baseline" else "treatment_metric"]
    assert torch.allclose(torch.tensor(estimate.to_numpy()), want, rtol=1e-6, atol=1e-9)
    assert want.abs().max() > 1e-4  # the reference is not trivially zero


def test_gradients_flow_through_hf_eah(setup):
    """Regression: the map-free EAH path used out= ops on the query/key and refused autograd."""
    model, inputs, config, _ = setup
    o_proj, seen = model.model.language_model.layers[1].self_attn.o_proj, {}
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("z", a[0]))
    try:
        with hf.eah(model, config) as run, torch.enable_grad():
            logits = model(**inputs, use_cache=False).logits
            (grad,) = torch.autograd.grad(logits[:, -1].sum(), [seen["z"]])
    finally:
        handle.remove()
    assert run.records and grad.abs().sum() > 0


# ---------------------------------------------------------------------------- the table
def test_table_columns_batch_means_and_per_example_rows(setup):
    model, inputs, config, metric = setup
    frame = attribution_patching(model, inputs, config, metric, layers=[1, 2])
    assert tuple(frame.columns) == ATTRIBUTION_COLUMNS and set(COLUMNS) <= set(frame.columns)
    assert len(frame) == 2 * 2 * (3 + N_HEADS) * 4
    base, eah = hf_logits(model, inputs), hf_logits(model, inputs, config)[0]
    last = torch.tensor([inputs["input_ids"].shape[1] - 1] * 2)
    assert frame.attrs["baseline_metric"] == pytest.approx(float(metric(base, last).mean()), abs=1e-5)
    assert frame.attrs["treatment_metric"] == pytest.approx(float(metric(eah, last).mean()), abs=1e-5)
    denominator = frame.attrs["treatment_metric"] - frame.attrs["baseline_metric"]
    assert frame["normalised_effect"].to_numpy() == pytest.approx(
        ((frame["metric"] - frame.attrs["baseline_metric"]) / denominator).to_numpy())
    layer0 = attribution_patching(model, inputs, config, metric, layers=[0])  # before the edited layer: no change
    receiver = layer0["baseline_metric"].where(layer0.direction == "treatment_into_baseline", layer0["treatment_metric"])
    assert (layer0["metric"] == receiver).all()

    rows = attribution_patching(model, inputs, config, metric, layers=[1, 2], per_example=True)
    assert len(rows) == 2 * len(frame) and set(rows["example"]) == {0, 1}
    keys = ["direction", "site", "layer", "head", "positions"]
    mean = rows.groupby(keys, sort=False, dropna=False)["metric"].mean().reset_index()
    assert mean["metric"].to_numpy() == pytest.approx(frame["metric"].to_numpy(), abs=1e-6)
    # each row's estimate is the one of that prompt alone (rows do not interact; padding handled)
    alone = {k: v[1:] for k, v in inputs.items()}
    one = attribution_patching(model, alone, config, metric, layers=[1, 2], per_example=True)
    second = rows[rows.example == 1].reset_index(drop=True)
    assert one["effect"].to_numpy() == pytest.approx(second["effect"].to_numpy(), abs=1e-5)


def test_position_masks_and_plots(setup):
    model, inputs, config, metric = setup
    layout = tiny_layout(inputs)
    named = attribution_patching(model, inputs, config, metric, layers=[2], positions="image")
    masked = attribution_patching(model, inputs, config, metric, layers=[2], positions={"img": layout.image_mask})
    assert set(masked["positions"]) == {"img"}
    assert masked["metric"].to_numpy() == pytest.approx(named["metric"].to_numpy(), abs=1e-7)
    assert list(resolve_positions(layout, ["last", layout.image_mask, ~layout.image_mask])) == ["last", "mask1", "mask2"]
    with pytest.raises(LayoutError, match="shape"):  # one error type for a bad position everywhere
        resolve_positions(layout, layout.image_mask[:, :3])
    with pytest.raises(LayoutError, match="Unknown position group"):
        resolve_positions(layout, "middle")
    with pytest.raises(LayoutError, match="Unknown position group"):
        attribution_patching(model, inputs, config, metric, positions="middle")
    frame = attribution_patching(model, inputs, config, metric)
    assert plot_heads(frame, positions="last").axes and plot_sites(frame, positions="image").axes


def test_any_intervention_list(setup):
    """An intervention list through hf.intervene: the EAH-run metric is that of the plain intervened forward."""
    model, inputs, config, metric = setup
    items = [config, PAI(alpha=0.5, layers=(2, 3))]
    frame = attribution_patching(model, inputs, items, metric, sites=("attn_out",), positions="last")
    with hf.intervene(model, items), torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    last = torch.tensor([inputs["input_ids"].shape[1] - 1] * 2)
    assert frame.attrs["treatment_metric"] == pytest.approx(float(metric(logits, last).mean()), abs=1e-5)
    assert frame.attrs["treatment"] == [item.to_dict() for item in items] and frame.attrs["baseline"] == []
    # an intervention list on the baseline side too: what PAI adds to EAH
    stacked = attribution_patching(model, inputs, items, metric, baseline=items[:1], sites=("attn_out",), positions="last")
    with hf.intervene(model, items[:1]), torch.no_grad():
        base = model(**inputs, use_cache=False).logits
    assert stacked.attrs["baseline_metric"] == pytest.approx(float(metric(base, last).mean()), abs=1e-5)
    assert stacked.attrs["treatment_metric"] == pytest.approx(frame.attrs["treatment_metric"], abs=1e-6)
    layer1 = stacked[(stacked.layer == 1) & (stacked.direction == "treatment_into_baseline")]  # PAI acts from layer 2
    assert (layer1["metric"] - layer1["baseline_metric"]).abs().max() < 1e-6


def test_errors_name_the_problem(setup):
    model, inputs, config, metric = setup
    with pytest.raises(ConfigError, match="needs a metric"):
        attribution_patching(model, inputs, config)
    with pytest.raises(ConfigError, match="Unknown site"):
        attribution_patching(model, inputs, config, metric, sites=("qkv",))
    with pytest.raises(LayerIndexError, match="4 layers"):
        attribution_patching(model, inputs, config, metric, layers=[4])
    with pytest.raises(HeadIndexError, match="4 heads"):
        attribution_patching(model, inputs, config, metric, heads=[7])


# ---------------------------------------------------------------------------- agreement
def _frame(effects, direction="treatment_into_baseline"):
    n = len(effects)
    return pd.DataFrame({"direction": direction, "site": "head", "layer": 1, "head": list(range(n)),
                         "positions": "all", "metric": [10.0 + e for e in effects], "baseline_metric": 10.0,
                         "treatment_metric": 12.0})


def test_agreement_by_hand():
    a = _frame([1.0, 2.0, 3.0, 4.0, 0.0])
    b = _frame([2.0, 3.0, 8.0, -1.0, 0.0])  # last row: 0 in both, left out
    out = agreement(a, b)
    assert out["n"] == 4 and out["n_trivial"] == 1 and out["matched"] == 5
    # pearson of (1,2,3,4) and (2,3,8,-1): means 2.5 / 3; deviations (-1.5,-.5,.5,1.5), (-1,0,5,-4)
    cov = 1.5 + 0 + 2.5 - 6.0
    assert out["pearson"] == pytest.approx(cov / math.sqrt(5.0 * 42.0))
    # spearman: ranks (1,2,3,4) vs (2,3,4,1): deviations (-1.5,-.5,.5,1.5) vs (-.5,.5,1.5,-1.5)
    assert out["spearman"] == pytest.approx((0.75 - 0.25 + 0.75 - 2.25) / 5.0)
    assert out["sign_agreement"] == pytest.approx(3 / 4)
    by_head = agreement(a, b, by=("head",))["by_head"]
    assert set(by_head) == {0, 1, 2, 3, 4} and by_head[4]["n"] == 0 and by_head[3]["n"] == 1
    with pytest.raises(ConfigError, match="break down"):
        agreement(a, b, by=("colour",))
    # baseline_into_treatment effects are measured from the treatment metric, not the baseline
    c = _frame([0.0, 0.0, 0.0], "baseline_into_treatment").assign(metric=[12.0, 13.0, 14.0])  # effects 0, 1, 2 from 12
    out = agreement(c, c.assign(metric=[12.0, 13.5, 13.0]))  # effects 0, 1.5, 1
    assert out["n_trivial"] == 1 and out["n"] == 2 and out["sign_agreement"] == 1.0
    with pytest.raises(ConfigError, match="share no"):
        agreement(a, _frame([1.0], "baseline_into_treatment"))



def test_agreement_refuses_duplicate_keys():
    # two batches of two examples each, concatenated with `example` restarting at 0: the keys repeat
    batch = pd.concat([_frame([1.0, 2.0]).assign(example=[0, 1]), _frame([3.0, 4.0]).assign(example=[0, 1])])
    other = batch.assign(metric=batch["metric"] + 0.5)
    with pytest.raises(ConfigError, match="share a key.*offset"):
        agreement(batch, other)
    with pytest.raises(ConfigError, match="activation_frame"):
        agreement(batch.assign(head=[0, 1, 2, 3]), other)
    # one id per example across batches: matched one to one (4 rows, not 8)
    fixed = batch.assign(example=[0, 1, 2, 3])
    assert agreement(fixed, fixed.assign(metric=fixed["metric"] + 0.5))["matched"] == 4


# ---------------------------------------------------------------------------- direct logit attribution
def _final_resid_and_z(model, inputs, layer, config=None):
    lm = model.model.language_model
    seen = {}
    handles = [lm.norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach().clone())),
               lm.layers[layer].self_attn.o_proj.register_forward_pre_hook(
                   lambda m, a: seen.setdefault("z", a[0].detach().clone()))]
    try:
        logits = hf_logits(model, inputs, config)
    finally:
        for h in handles:
            h.remove()
    return seen["x"], seen["z"], logits[0] if isinstance(logits, tuple) else logits


def test_dla_sums_to_the_logit_difference_and_one_head_by_hand(setup):
    model, inputs, config, metric = setup
    rows = direct_logit_attribution(model, inputs, (metric.yes, metric.no), interventions=config, per_example=True)
    assert list(dict.fromkeys(rows["condition"])) == ["baseline", "EAH"]
    for condition, cfg in (("baseline", None), ("EAH", config)):
        x, z, logits = _final_resid_and_z(model, inputs, 2, cfg)
        want = logits[:, -1, metric.yes] - logits[:, -1, metric.no]  # read off the model's logits
        sub = rows[rows.condition == condition]
        total = sub[sub.component.isin(["embed", "attn", "mlp"])].groupby("example")["contribution"].sum()
        assert torch.allclose(torch.tensor(total.to_numpy(), dtype=torch.float32), want, atol=1e-5)
        heads = sub[sub.component == "head"].groupby(["example", "layer"])["contribution"].sum()
        attn = sub[sub.component == "attn"].set_index(["example", "layer"])["contribution"]
        assert heads.to_numpy() == pytest.approx(attn.loc[heads.index].to_numpy(), abs=1e-6)
        # head 3 of layer 2, by hand: z_h W_O[:, h]^T, times the frozen RMSNorm gain, on W_U[yes] - W_U[no]
        lm, h = model.model.language_model, 3
        x_last = x[:, -1]
        gain = lm.norm.weight / torch.sqrt(x_last.pow(2).mean(-1, keepdim=True) + lm.norm.variance_epsilon)
        out = z[:, -1, h * HEAD_DIM : (h + 1) * HEAD_DIM] @ lm.layers[2].self_attn.o_proj.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].T
        u = model.lm_head.weight[metric.yes] - model.lm_head.weight[metric.no]
        by_hand = ((out * gain) * u).sum(-1)
        got = sub[(sub.component == "head") & (sub.layer == 2) & (sub["head"] == h)].sort_values("example")
        assert torch.allclose(torch.tensor(got["contribution"].to_numpy(), dtype=torch.float32), by_hand.detach(), atol=1e-6)
    means = direct_logit_attribution(model, inputs, metric, interventions={"paper": config})
    assert set(means["condition"]) == {"baseline", "paper"} and "example" not in means.columns
    assert plot_dla(means).axes


def test_dla_pooled_ids_and_errors(setup):
    model, inputs, _, metric = setup
    ids = ((metric.yes, 5), (metric.no,))
    frame = direct_logit_attribution(model, inputs, ids)
    logits = hf_logits(model, inputs)[:, -1]
    want = float(((logits[:, metric.yes] + logits[:, 5]) / 2 - logits[:, metric.no]).mean())
    parts = frame[frame.component.isin(["embed", "attn", "mlp"])]["contribution"].sum()
    assert parts == pytest.approx(want, abs=1e-5) and frame["metric"].iloc[0] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ConfigError, match="vocabulary"):
        direct_logit_attribution(model, inputs, (metric.yes, 10_000))
    with pytest.raises(ConfigError, match="d_model"):
        direct_logit_attribution(model, inputs, torch.ones(3))


@pytest.mark.slow
def test_organism_dla_adds_up_and_attribution_runs_match_plain_runs():
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene, question_for

    bundle = load_model("organism")
    model = bundle.model
    x = bundle.processor([bundle.yes_no_prompt(question_for("triangle"))], [make_scene(100000001).image])
    config = EAH.paper(threshold=bundle.threshold)
    yes, no = bundle.yes_ids[0], bundle.no_ids[0]
    frame = direct_logit_attribution(model, x, (yes, no), interventions=config)
    for condition, cfg in (("baseline", None), ("EAH", config)):
        logits = hf_logits(model, x, cfg)
        logits = logits[0] if isinstance(logits, tuple) else logits
        want = float(logits[0, -1, yes] - logits[0, -1, no])
        sub = frame[frame.condition == condition]
        assert sub[sub.component.isin(["embed", "attn", "mlp"])]["contribution"].sum() == pytest.approx(want, abs=2e-3)
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    attr = attribution_patching(model, x, config, metric, sites=("attn_out",), layers=[0, 1], positions=("all",))
    assert attr.attrs["treatment_metric"] != pytest.approx(attr.attrs["baseline_metric"], abs=1e-3)
    layer0 = attr[attr.layer == 0]  # before the edit: nothing to patch
    receiver = layer0["baseline_metric"].where(layer0.direction == "treatment_into_baseline", layer0["treatment_metric"])
    assert (layer0["metric"] == receiver).all()
    assert (attr[attr.layer == 1]["metric"] != attr[attr.layer == 1]["baseline_metric"]).any()


def test_benchmark_script_quick_run(tmp_path):
    """benchmarks/attribution.py --quick runs end to end (the numbers are in docs/benchmarks.md)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attribution.py"
    spec = importlib.util.spec_from_file_location("eah_benchmarks_attribution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    out = tmp_path / "attribution.json"
    result = module.main(["--quick", "--repeats", "1", "--layers", "1", "--out", str(out), "--frames",
                          str(tmp_path / "frames.csv")])
    assert torch.get_num_threads() == threads
    saved = json.loads(out.read_text())
    assert saved["activation"]["rows"] == 2 * 4 * 4 and saved["attribution"]["rows"] == 2 * 4 * 4 * 4
    assert result["ratio_is_extrapolated"] and math.isfinite(result["ratio_cpu"]) and result["ratio_cpu"] > 0
    assert len(pd.read_csv(tmp_path / "frames.csv")) == 32
