"""Issue 18: one calling convention for the three backends, and the TransformerLens route takes processor outputs.

On one tiny LLaVA (two rows whose image tokens start at different positions), with the layout left out
everywhere, ``hf``, ``nnsight`` and ``lens`` apply the same EAH edit (same records, read the same way:
``run.records``, ``run.source_heads()``, ``run.config``) and feed the same `HeadStats`; the reference is a
run with a layout written out by hand from the known token positions. A language-model-only bridge takes
the processor's dict (``input_ids`` + ``pixel_values`` + ``attention_mask``) and equals the HF model; ids
with image placeholders but no image are refused instead of being embedded as text.
"""

from __future__ import annotations

import pytest
import torch
from nnsight import NNsight

import eah_interp.lens as lens
import eah_interp.nnsight as ens
from eah_interp import EAHConfig, HeadStats, LayoutError, TokenLayout, hf, patching
from eah_interp._testing import n_image_tokens, sharp_tiny_llava, tiny_llava_inputs
from eah_interp.interventions import EAH
from eah_interp.stats import STATISTICS

PREFIX = (3, 6)  # row r: [bos, PREFIX[r] text tokens, image tokens, 1 token, SUFFIX[r] tokens]
SUFFIX = (5, 2)
CONFIG = EAHConfig(layers=(1,), threshold=0.0, normalise="causal")  # every image token a sink: ties -> head 0
LAYERS = (0, 2)


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=PREFIX, suffix_lengths=SUFFIX, padding_side="left", seed=1)


@pytest.fixture(scope="module")
def hand_layout(model, inputs):
    """The layout written out from the known positions (no padding: both rows have the same length)."""
    n = n_image_tokens(model)
    b, seq = inputs["input_ids"].shape
    image = torch.zeros(b, seq, dtype=torch.bool)
    for row, prefix in enumerate(PREFIX):
        image[row, 1 + prefix : 1 + prefix + n] = True
    assert inputs["attention_mask"].all()
    return TokenLayout(image, torch.ones(b, seq, dtype=torch.bool))


@pytest.fixture(scope="module")
def reference(model, inputs, hand_layout):
    """hf with the hand layout: logits, source heads and statistics."""
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), hf.eah(model, CONFIG, layout=hand_layout) as run:
        logits = model(**inputs).logits
    with torch.no_grad(), hf.record_attention(model, LAYERS, stats=stats, layout=hand_layout):
        model(**inputs)
    return logits, run.source_heads(), stats


@pytest.fixture(scope="module")
def bridges():
    full = lens.boot_bridge(sharp_tiny_llava())
    lm_only = lens.boot_bridge(sharp_tiny_llava(), language_model_only=True)
    return full, lm_only


def same_stats(got: HeadStats, want: HeadStats) -> None:
    for layer in LAYERS:
        assert got.n_examples(layer) == want.n_examples(layer)
    for stat in STATISTICS:
        torch.testing.assert_close(got.matrix(stat), want.matrix(stat), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- one convention
def test_hf_derives_the_hand_layout(model, inputs, reference):
    want_logits, want_heads, want_stats = reference
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), hf.eah(model, CONFIG) as run:
        logits = model(**inputs).logits
    with torch.no_grad(), hf.record_attention(model, LAYERS, stats=stats):
        model(**inputs)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    assert run.source_heads() == want_heads and run.config is CONFIG and run.records[0].layer == 1
    same_stats(stats, want_stats)


def test_nnsight_without_a_layout_equals_hf(model, inputs, reference):
    want_logits, want_heads, want_stats = reference
    nn_model = NNsight(model)
    with torch.no_grad(), nn_model.trace(**inputs):
        stats = ens.feed_head_stats(nn_model, HeadStats(threshold=0.01), layers=LAYERS[:1])
        run = ens.apply_eah(nn_model, CONFIG)
        ens.feed_head_stats(nn_model, stats, layers=LAYERS[1:])  # after the edit: the edited layer 2 sees layer 1's change
        logits = nn_model.output.logits.save()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert run.source_heads() == want_heads and run.config == CONFIG and run.records is run
    assert stats.n_examples(0) == 2


def test_nnsight_statistics_without_a_layout_equal_hf(model, inputs, reference):
    *_, want_stats = reference
    nn_model = NNsight(model)
    with torch.no_grad(), nn_model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         pixel_values=inputs["pixel_values"]):  # ids as the first positional input
        stats = ens.feed_head_stats(nn_model, HeadStats(threshold=0.01), layers=LAYERS)
    same_stats(stats, want_stats)


@pytest.mark.parametrize("which", ["full", "lm_only"])
def test_lens_without_a_layout_equals_hf(bridges, inputs, reference, which):
    want_logits, want_heads, want_stats = reference
    bridge = bridges[0] if which == "full" else bridges[1]
    hooks, run = lens.eah(bridge, CONFIG)
    stats = HeadStats(threshold=0.01)
    with torch.no_grad():
        logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        bridge.run_with_hooks(**inputs, fwd_hooks=lens.head_stats_hooks(bridge, stats, layers=LAYERS))
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert run.source_heads() == want_heads and run.config is CONFIG and run.records is run
    same_stats(stats, want_stats)


def test_a_layout_is_asked_for_where_it_cannot_be_derived(model, inputs, bridges):
    with pytest.raises(LayoutError, match="pass layout=TokenLayout"):
        lens.bridge_layout(bridges[0].original_model)  # not a bridge from boot_bridge
    embeds = lens.multimodal_embeds(model, inputs["input_ids"], inputs["pixel_values"])
    hooks, _ = lens.eah(bridges[1], CONFIG)
    with torch.no_grad(), pytest.raises(LayoutError, match="not on embeddings"):
        bridges[1].run_with_hooks(embeds, fwd_hooks=hooks, attention_mask=inputs["attention_mask"])
    nn_model = NNsight(model)
    with pytest.raises(LayoutError, match="derives the token layout from the trace's input_ids"):
        with torch.no_grad(), nn_model.trace(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]):
            ens.apply_eah(nn_model, CONFIG)


# ---------------------------------------------------------------------------- the language-model-only route
def test_language_model_only_bridge_takes_the_processor_outputs(model, inputs, bridges):
    _, lm_only = bridges
    with torch.no_grad():
        want = model(**inputs).logits
        assert torch.allclose(lm_only(**inputs), want, atol=1e-5)
        assert torch.allclose(lm_only(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      pixel_values=inputs["pixel_values"]), want, atol=1e-5)
        _, cache = lm_only.run_with_cache(**inputs)
    assert lens.pattern_hook_name(0) in cache


def test_language_model_only_bridge_refuses_placeholders_without_an_image(inputs, bridges, model):
    """The old bridge embedded the image placeholders as text and returned logits (a silent wrong answer)."""
    _, lm_only = bridges
    with torch.no_grad(), pytest.raises(LayoutError, match="hold image placeholders .* but no pixel_values"):
        lm_only(inputs["input_ids"], attention_mask=inputs["attention_mask"])
    embeds = lens.multimodal_embeds(model, inputs["input_ids"], inputs["pixel_values"])
    with torch.no_grad(), pytest.raises(LayoutError, match="with embeddings instead of input_ids"):
        lm_only(embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    with torch.no_grad():  # embeddings alone (the old route) still work
        assert torch.allclose(lm_only(embeds, attention_mask=inputs["attention_mask"]), model(**inputs).logits, atol=1e-5)


def test_patch_lens_on_the_language_model_only_bridge_takes_the_processor_outputs(bridges, inputs):
    """Was: LayoutError "Cannot derive the token layout" (the wrapped causal LM has no image token id)."""
    full, lm_only = bridges
    options = dict(sites=("attn_out",), positions=("image", "last"), layers=[1], directions=("treatment_into_baseline",),
                   progress=False)
    eah = [EAH.from_dict(CONFIG.to_dict())]
    got = patching.sweep(patching.LensPatcher(lm_only, dict(inputs), eah), (5, 7), **options)
    want = patching.sweep(patching.LensPatcher(full, dict(inputs), eah), (5, 7), **options)
    assert len(got) == len(want) == 2
    for column in ("metric", "baseline_metric", "treatment_metric"):
        torch.testing.assert_close(torch.tensor(got[column].to_numpy()), torch.tensor(want[column].to_numpy()),
                                   rtol=0, atol=1e-4)
    assert got["baseline_metric"].iloc[0] != got["treatment_metric"].iloc[0]  # the edit is active


@pytest.mark.parametrize("family", ["instructblip", "smolvlm"])
def test_language_model_only_families_take_their_processor_outputs(family):
    """Families served through the language model only: their image inputs (Q-Former ids, pixel attention
    masks) are recognised from ``get_image_features`` and the logits equal the HF model's."""
    from eah_interp.models.adapters import adapter_for
    from eah_interp.models.tiny import tiny_family

    model, inputs = tiny_family(family, attn_implementation="eager")  # the bridge runs eager attention
    assert adapter_for(model).support["lens"] == "lm-only"
    assert set(inputs) - {"input_ids", "attention_mask", "pixel_values"}  # extra image inputs to route
    with torch.no_grad():
        want = model(**inputs).logits
        got = lens.boot_bridge(model, copy=True, language_model_only=True)(**inputs)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_organism_through_its_language_model_takes_the_processor_outputs():
    """The issue's case: the bundled organism (no bridge adapter) fed the processor's dict as it is."""
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene, question_for

    bundle = load_model("organism")
    model = bundle.model
    x = bundle.processor([bundle.yes_no_prompt(question_for("triangle"))], [make_scene(100000001).image])
    bridge = lens.boot_bridge(model, bundle.processor.tokenizer, copy=True, language_model_only=True)
    config = EAHConfig.paper(threshold=bundle.threshold)
    model.set_attn_implementation({"text_config": "eager"})  # the bridge runs eager attention everywhere
    try:
        with torch.no_grad(), hf.eah(model, config) as want_run:
            want = model(**x).logits
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    hooks, run = lens.eah(bridge, config)
    with torch.no_grad():
        got = bridge.run_with_hooks(**x, fwd_hooks=hooks)
    assert run.source_heads() == want_run.source_heads()
    assert torch.allclose(got, want, atol=1e-4)
