"""Activation patching stacked with EAH, against hand-written HF-hook references; nnsight vs TransformerLens."""

from __future__ import annotations

import pytest
import torch
from nnsight import NNsight

import eah_interp.lens as lens
from eah_interp import EAHConfig, TokenLayout, hf
from eah_interp._testing import TINY_IMAGE_TOKEN_ID, tiny_llava_inputs
from eah_interp.patching import (
    patch_sites,
    patch_sites_lens,
    plot_head_patching,
    plot_patching,
    position_mask,
    yes_no_metric,
)
from tests.test_backends import sharp_tiny_llava

CONFIG = EAHConfig.paper(threshold=0.05)
METRIC = yes_no_metric([5, 7], [6])


@pytest.fixture(scope="module")
def setup():
    model = sharp_tiny_llava()
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), seed=1)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    table = patch_sites(NNsight(model), inputs, CONFIG, layout, METRIC, positions=("all", "image", "last"),
                        heads=True, progress=False)
    return model, inputs, layout, table


def hf_metric(model, inputs, config=None, hook=None):
    """The metric with plain HF forward hooks (the hand-written reference)."""
    handles = [] if hook is None else [hook[0].register_forward_hook(hook[1])]
    try:
        with torch.no_grad():
            if config is None:
                logits = model(**inputs, use_cache=False).logits
            else:
                with hf.eah(model, config):
                    logits = model(**inputs, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return METRIC(logits[:, -1]).mean().item()


def test_endpoints_patch_everything_or_nothing(setup):
    model, inputs, layout, table = setup
    base, eah = hf_metric(model, inputs), hf_metric(model, inputs, CONFIG)
    assert table["baseline"].iloc[0] == pytest.approx(base, abs=1e-5)
    assert table["eah"].iloc[0] == pytest.approx(eah, abs=1e-5)
    assert abs(eah - base) > 1e-4
    last = model.config.text_config.num_hidden_layers - 1
    full = table[(table.site == "resid") & (table.layer == last) & (table.positions == "all")].set_index("direction")
    # the whole residual stream after the last layer carries everything: effect 1 one way, 0 the other
    assert full.loc["eah->baseline", "metric"] == pytest.approx(eah, abs=1e-5)
    assert full.loc["baseline->eah", "metric"] == pytest.approx(base, abs=1e-5)
    # layer 0 runs before the edited layer 1: patching it changes nothing
    early = table[(table.layer == 0) & (table.site != "head") & (table.positions == "all")]
    assert early["metric"].tolist() == pytest.approx([base] * 3 + [eah] * 3, abs=1e-5)


def test_one_site_equals_a_hand_written_hook_reference(setup):
    model, inputs, layout, table = setup
    mlp = model.model.language_model.layers[2].mlp
    cached = {}
    hf_metric(model, inputs, CONFIG, hook=(mlp, lambda m, a, out: cached.setdefault("eah", out.detach().clone())))
    mask = position_mask(layout, "image")[..., None]
    want = hf_metric(model, inputs, hook=(mlp, lambda m, a, out: torch.where(mask, cached["eah"], out)))
    row = table[(table.direction == "eah->baseline") & (table.site == "mlp_out") & (table.layer == 2) & (table.positions == "image")]
    assert row["metric"].item() == pytest.approx(want, abs=1e-5)


def test_nnsight_and_transformer_lens_agree(setup):
    _, inputs, layout, table = setup
    bridge = lens.boot_bridge(sharp_tiny_llava())
    lens_table = patch_sites_lens(bridge, inputs, CONFIG, layout, METRIC, positions=("all", "image", "last"), heads=True)
    merged = table.merge(lens_table, on=["direction", "site", "layer", "head", "positions"], suffixes=("", "_lens"))
    assert len(merged) == len(table) == len(lens_table)
    assert torch.allclose(torch.tensor(merged["metric"].values), torch.tensor(merged["metric_lens"].values), atol=1e-4)


def test_plots(setup):
    *_, table = setup
    assert plot_patching(table).axes and plot_head_patching(table).axes
