"""A new method needs one file: an intervention defined here, in the test file, used with no library change
through `hf.intervene`, `nnsight.intervene`, activation patching (`HFPatcher` + `sweep`), attribution
patching and the CLI's spec grammar (by its class name and as a registered preset).

The method scales chosen heads' outputs at the image positions (the ``"output"`` edit point, per head,
before ``o_proj``). The independent reference is a plain torch pre-hook on ``o_proj`` that scales the same
columns at positions found from ``input_ids`` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from nnsight import NNsight
from typer.testing import CliRunner

import eah_interp.nnsight as eah_nn
from eah_interp import hf
from eah_interp.attribution import attribution_patching
from eah_interp.interventions import Intervention, parse, register_preset
from eah_interp.interventions import spec as spec_module
from eah_interp.interventions.base import count
from eah_interp.interventions.selectors import Site, query_rows
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs
from eah_interp.patching import HFPatcher, LogitDiff, Patch, run_with_patches, sweep
from tests.test_patching import capture, hook_swap

torch.set_num_threads(1)

LAYER, HEADS, FACTOR = 1, (0, 2), 0.25


@dataclass(frozen=True)
class ScaleImageHeads(Intervention):
    """Scale the outputs of ``heads`` at the image positions (prompt forwards only)."""

    heads: tuple[int, ...] = (0,)
    factor: float = 0.5

    point: ClassVar[str] = "output"

    def edit(self, tensor: torch.Tensor, site: Site) -> tuple[torch.Tensor, int]:
        rows = query_rows("image", site)  # [batch, q]: the query rows at image positions
        chosen = torch.zeros(tensor.shape[2], dtype=torch.bool, device=tensor.device)
        chosen[list(self.heads)] = True
        where = rows[:, :, None, None] & chosen[None, None, :, None]  # [batch, q, heads, 1]
        return torch.where(where, tensor * self.factor, tensor), count(where) * tensor.shape[-1]

    def describe(self) -> str:
        return f"scale heads {list(self.heads)} by {self.factor:g} at image positions ({self._layers_text()})"


METHOD = ScaleImageHeads(heads=HEADS, factor=FACTOR, layers=(LAYER,), phase="prefill")


@pytest.fixture(scope="module")
def setup():
    model = sharp_tiny_llava(seed=3)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 5), suffix_lengths=(4, 2), seed=4)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return model, inputs, head_dim


def reference_logits(model, inputs, head_dim):
    """The method as a plain pre-hook on layer ``LAYER``'s ``o_proj``: scale the heads' columns at image ids."""
    image = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID  # [batch, seq]
    cols = torch.zeros(model.config.get_text_config().num_attention_heads * head_dim, dtype=torch.bool)
    for h in HEADS:
        cols[h * head_dim:(h + 1) * head_dim] = True
    where = image[..., None] & cols

    def scale(module, args):
        return (torch.where(where, args[0] * FACTOR, args[0]), *args[1:])

    o_proj = model.model.language_model.layers[LAYER].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(scale)
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        handle.remove()


def test_hf_and_nnsight_apply_it_as_the_hand_written_hook(setup):
    model, inputs, head_dim = setup
    expected = reference_logits(model, inputs, head_dim)
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
    assert (expected - plain).abs().max() > 1e-3  # the edit matters on this model
    with torch.no_grad(), hf.intervene(model, [METHOD]) as run:
        got = model(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (record,) = run.of("ScaleImageHeads")
    n_image = int((inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum())
    assert (record.layer, record.point, record.changed) == (LAYER, "output", n_image * len(HEADS) * head_dim)

    nn_model = NNsight(model)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        nn_run = eah_nn.intervene(nn_model, [METHOD])
        nn_logits = nn_model.output.logits.save()
    torch.testing.assert_close(nn_logits, expected, atol=1e-5, rtol=1e-5)
    assert [(r.layer, r.changed) for r in nn_run.records] == [(record.layer, record.changed)]


def test_activation_and_attribution_patching_take_it(setup):
    model, inputs, head_dim = setup
    metric = LogitDiff(yes=5, no=7)
    patcher = HFPatcher(model, inputs, treatment=[METHOD])
    # one site by hand: the treatment's attention output at the last position of layer LAYER, into the baseline
    where = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    where[:, -1] = True
    donor = capture(model, inputs, [METHOD], LAYER)
    expected = hook_swap(model, inputs, [], donor, "attn_out", LAYER, None, where, head_dim)
    got = run_with_patches(patcher, [Patch("attn_out", LAYER, positions="last")], "treatment_into_baseline")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    frame = sweep(patcher, metric, sites=["resid"], positions=["image", "all"], layers=[0, LAYER], progress=False)
    row = frame.set_index(["direction", "layer", "positions"])["normalised_effect"]
    # patching the whole residual stream after the edited layer carries all of the change; before it, none
    assert row[("treatment_into_baseline", LAYER, "all")] == pytest.approx(1.0, abs=1e-4)
    assert row[("treatment_into_baseline", 0, "all")] == pytest.approx(0.0, abs=1e-4)

    estimates = attribution_patching(model, inputs, [METHOD], metric, sites=["resid"], positions=["all"],
                                     directions=["treatment_into_baseline"])
    by_layer = estimates.set_index("layer")
    # layers before the edit have no activation difference, so attribution estimates no effect there
    assert by_layer.loc[0, "metric"] == pytest.approx(by_layer.loc[0, "baseline_metric"], abs=1e-6)
    with torch.no_grad(), hf.intervene(model, [METHOD]):
        treated = model(**inputs, use_cache=False).logits
    last = torch.full((treated.shape[0],), inputs["attention_mask"].shape[1] - 1)  # left padding: the last column
    assert by_layer.loc[0, "treatment_metric"] == pytest.approx(float(metric(treated, last).mean()), abs=1e-5)


def test_the_cli_reaches_it_by_class_name_and_as_a_registered_preset():
    from eah_interp.cli import app

    assert parse("scale-image-heads(heads=[0, 2], factor=0.25, layers=[1], phase='prefill')") == (METHOD,)
    runner = CliRunner()
    args = ["generate", "--model", "tiny-llava", "--scenes", "1", "--max-new-tokens", "3"]
    result = runner.invoke(app, [*args, "--interventions", "scale-image-heads(factor=0.0, layers=[1])"])
    assert result.exit_code == 0, result.output
    assert "ScaleImageHeads" in result.output or "scale-image-heads" in result.output
    try:
        register_preset("mute-image-heads", lambda **kw: ScaleImageHeads(**{"factor": 0.0, **kw}),
                        method=ScaleImageHeads, summary="head 0 silent at image positions")
        result = runner.invoke(app, [*args, "--interventions", "mute-image-heads(layers=[1])+pai"])
        assert result.exit_code == 0, result.output
        bad = runner.invoke(app, [*args, "--interventions", "mute-image-heads(layers=[9])"])
        flat = " ".join(bad.output.replace("│", " ").split())  # the usage box wraps the message
        assert bad.exit_code == 2 and "ScaleImageHeads: layers [9] out of range" in flat, flat
    finally:
        spec_module._PRESETS.pop("muteimageheads", None)
