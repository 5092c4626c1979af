"""TransformerLens 4 backend: bridge + intervention hooks equal the HF backend on a tiny random LLaVA."""

from __future__ import annotations

import subprocess

import pytest
import torch

import eah_interp.transformer_lens as lens
from eah_interp import EAH, HeadStats, LayerIndexError, TokenLayout, UnsupportedModelError, hf
from eah_interp.interventions import VAF, VAR, ValueEdit
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava
from tests.test_interventions import NNSIGHT_CASES, VAR_DIMS
from tests.test_nnsight_backend import hf_logits, preset, real, tiny_inputs, tiny_layout

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference():
    """The HF model the bridge results are compared with (the bridge rewires its own copy in place)."""
    return sharp_tiny_llava()


@pytest.fixture(scope="module")
def inputs(reference):
    return tiny_inputs(reference)


@pytest.fixture(scope="module")
def layout(inputs):
    return tiny_layout(inputs)


@pytest.fixture(scope="module")
def bridge():
    def refuse(*args, **kwargs):  # booting must never install packages
        raise AssertionError(f"boot_bridge tried to run {args!r}")

    original = subprocess.check_call
    subprocess.check_call = refuse
    try:
        return lens.boot_bridge(sharp_tiny_llava())
    finally:
        subprocess.check_call = original


def run(bridge, inputs, hooks=()):
    kwargs = dict(pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    with torch.no_grad():
        return bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=list(hooks), **kwargs)


def test_plain_bridge_equals_hf(bridge, reference, inputs):
    assert torch.allclose(real(run(bridge, inputs), inputs), real(hf_logits(reference, inputs), inputs), atol=1e-5)


@pytest.mark.parametrize("name", ["paper", "reference"])
def test_eah_hooks_equal_hf_eah(bridge, reference, inputs, layout, name):
    config = preset(name, reference, inputs)
    want, hf_records = hf_logits(reference, inputs, config)
    hooks, lens_run = lens.eah(bridge, config, layout)
    got = run(bridge, inputs, hooks)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert [r.source_head.tolist() for r in lens_run.records] == [r.source_head.tolist() for r in hf_records]
    assert not torch.allclose(real(got, inputs), real(hf_logits(reference, inputs), inputs), atol=1e-4)


def test_identity_edit_and_multi_layer_blend(bridge, reference, inputs, layout):
    identity = EAH(layers=(1,), source=2, target_heads=(2,))
    got = run(bridge, inputs, lens.eah(bridge, identity, layout)[0])
    assert torch.allclose(real(got, inputs), real(hf_logits(reference, inputs), inputs), atol=1e-5)
    blend = EAH(layers=(1, 3), threshold=0.0, source=1, region="image", alpha=0.5)
    want, _ = hf_logits(reference, inputs, blend)
    assert torch.allclose(real(run(bridge, inputs, lens.eah(bridge, blend, layout)[0]), inputs),
                          real(want, inputs), atol=1e-5)


def test_inputs_embeds_path_equals_pixel_values(bridge, reference, inputs, layout):
    """Image embeddings built by the HF model's own get_image_features + scatter, fed as the bridge's input."""
    config = preset("paper", reference, inputs)
    want, _ = hf_logits(reference, inputs, config)
    with torch.no_grad():
        embeds = lens.multimodal_embeds(bridge.original_model, inputs["input_ids"], inputs["pixel_values"])
        got = bridge.run_with_hooks(embeds, fwd_hooks=lens.eah(bridge, config, layout)[0],
                                    attention_mask=inputs["attention_mask"])
    assert embeds.shape == (*inputs["input_ids"].shape, reference.config.text_config.hidden_size)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)


def test_record_attention_equals_hf_recording_without_caching(bridge, reference, inputs, layout):
    want = HeadStats(threshold=0.05)
    with hf.record_attention(reference, [0, 2], stats=want), torch.no_grad():
        reference(**inputs, use_cache=False)
    got = HeadStats(threshold=0.05)
    hooks, recording = lens.record_attention(bridge, [0, 2], stats=got, layout=layout)
    out = run(bridge, inputs, hooks)
    assert torch.allclose(real(out, inputs), real(hf_logits(reference, inputs), inputs), atol=1e-5)  # unchanged
    a, b = want.to_frame(), got.to_frame()
    assert torch.allclose(torch.tensor(a.to_numpy(dtype=float)), torch.tensor(b.to_numpy(dtype=float)),
                          atol=1e-5, equal_nan=True)
    assert recording.stats is got and recording.layers == (0, 2) and len(recording.layouts) == 1


def test_boot_with_copy_leaves_the_hf_model_alone(inputs):
    model = sharp_tiny_llava(seed=2)
    before = hf_logits(model, inputs)
    layer_type = type(model.model.language_model.layers[0])
    copy_bridge = lens.boot_bridge(model, copy=True)
    assert type(model.model.language_model.layers[0]) is layer_type
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(hf_logits(model, inputs), before)
    assert torch.allclose(real(run(copy_bridge, inputs), inputs), real(before, inputs), atol=1e-5)
    from transformer_lens.model_bridge.sources.transformers import helpers

    assert helpers._ensure_torchvision.__name__ == "_ensure_torchvision"  # restored after boot


def test_errors_name_the_problem(bridge, layout):
    with pytest.raises(LayerIndexError, match="4 decoder layers"):
        lens.eah(bridge, EAH.reference(), layout)
    with pytest.raises(LayerIndexError, match="out of range"):
        lens.record_attention(bridge, [9], stats=HeadStats(), layout=layout)
    assert lens.pattern_hook_name(3) == "blocks.3.attn.hook_pattern"


def test_language_model_only_bridge_with_image_embeddings(reference, inputs, layout):
    """For LVLMs without a bridge adapter: wrap the language model, feed the HF model's own image embeddings."""
    model = sharp_tiny_llava()
    lm_bridge = lens.boot_bridge(model, copy=True, language_model_only=True)
    config = preset("paper", reference, inputs)
    want, _ = hf_logits(reference, inputs, config)
    with torch.no_grad():
        embeds = lens.multimodal_embeds(model, inputs["input_ids"], inputs["pixel_values"])
        got = lm_bridge.run_with_hooks(embeds, fwd_hooks=lens.eah(lm_bridge, config, layout)[0],
                                       attention_mask=inputs["attention_mask"])
    assert type(lm_bridge.original_model).__name__ == "LlamaForCausalLM"
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)


@pytest.mark.slow
def test_bundled_model_through_its_language_model():
    """The organism (EfficientNet + SmolLM2 as a LLaVA) has no bridge adapter: the language-model path."""
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene, question_for

    bundle = load_model("organism")
    model = bundle.model
    with pytest.raises(UnsupportedModelError, match="language_model_only=True"):
        lens.boot_bridge(model, bundle.processor.tokenizer, copy=True)
    lm_bridge = lens.boot_bridge(model, bundle.processor.tokenizer, copy=True, language_model_only=True)
    x = bundle.processor([bundle.yes_no_prompt(question_for("triangle"))], [make_scene(100000001).image])
    layout = TokenLayout.from_input_ids(x["input_ids"], model.config.image_token_id, x["attention_mask"])
    config = EAH.paper(threshold=bundle.threshold)
    model.set_attn_implementation({"text_config": "eager"})  # the bridge runs eager attention everywhere
    try:
        want, hf_records = hf_logits(model, x, config)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    hooks, lens_run = lens.eah(lm_bridge, config, layout)
    with torch.no_grad():
        embeds = lens.multimodal_embeds(model, x["input_ids"], x["pixel_values"])
        got = lm_bridge.run_with_hooks(embeds, fwd_hooks=hooks, attention_mask=x["attention_mask"])
    assert [r.source_head.tolist() for r in lens_run.records] == [r.source_head.tolist() for r in hf_records]
    assert torch.allclose(got, want, atol=1e-4)


# ---------------------------------------------------------------------------- intervene: any method
#: The cases of the nnsight comparison whose edit points a bridge exposes (scores after the mask, patterns,
#: head outputs, residual input / output; VAR reading hook_resid_pre), and a stack of them.
LENS_CASES = {
    case: items for case, items in NNSIGHT_CASES.items()
    if all(item.point in lens.LENS_POINTS for item in items)
}
LENS_CASES["EAH+Knockout+ResidualEdit+HeadScale"] = [
    EAH(layers=(1,), threshold=0.0, source=2), *NNSIGHT_CASES["Knockout-question"],
    *NNSIGHT_CASES["ResidualEdit-output-image"], *NNSIGHT_CASES["HeadScale"],
]


def test_the_lens_cases_cover_every_exposed_point():
    points = {item.point for items in LENS_CASES.values() for item in items}
    assert points == set(lens.LENS_POINTS) and any(item.reads_hidden for items in LENS_CASES.values() for item in items)


@pytest.mark.parametrize("case", list(LENS_CASES))
def test_intervene_equals_hf_intervene(bridge, reference, inputs, case):
    """Each exposed edit point through its hook: logits, records and the run's summary equal hf.intervene's
    (itself checked against loop-written references in tests/test_interventions.py)."""
    items = LENS_CASES[case]
    with hf.intervene(reference, items) as want_run, torch.no_grad():
        want = reference(**inputs, use_cache=False).logits
    hooks, got_run = lens.intervene(bridge, items)
    got = run(bridge, inputs, hooks)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5), case
    key = sorted((r.index, r.layer, r.point, r.changed) for r in got_run.records)
    assert key == sorted((r.index, r.layer, r.point, r.changed) for r in want_run.records), case
    assert all(got_run.of(index) for index in range(len(items))), case  # every intervention edited something
    assert got_run.summary() == want_run.summary() and type(got_run) is type(want_run)
    assert not torch.allclose(real(got, inputs), real(hf_logits(reference, inputs), inputs), atol=1e-4)


def test_intervene_refuses_the_points_a_bridge_does_not_expose(bridge):
    for item, point in ((VAF(layers=(1,)), "scores_premask"), (ValueEdit(keys="image", layers=(1,)), "values")):
        with pytest.raises(UnsupportedModelError, match=f"{type(item).__name__} edits at '{point}'.*hf.intervene"):
            lens.intervene(bridge, [EAH.paper(), item])
    assert lens.intervene(bridge, [])[0] == []


def test_var_reads_its_sinks_from_the_layer_input(bridge, reference, inputs):
    """VAR's sinks come from hook_resid_pre (after a residual input edit of the same layer, as in hf)."""
    dims, tau = VAR_DIMS[TINY_IMAGE_TOKEN_ID]
    var = VAR(dims=dims, tau=tau, rho=0.9, summ=0.05, layers=(2,))
    hooks, _ = lens.intervene(bridge, [var])
    assert [name for name, _ in hooks] == ["blocks.2.hook_resid_pre", "blocks.2.attn.hook_pattern"]
