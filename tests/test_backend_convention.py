"""Issue 18: one calling convention for the three backends, and the TransformerLens route takes processor outputs.

On one tiny LLaVA (two rows whose image tokens start at different positions), with the layout left out
everywhere, ``hf``, ``nnsight`` and ``transformer_lens`` apply the same EAH edit (one result type, read the
same way: ``run.records``, ``run.source_heads()``, ``run.interventions``) and feed the same `HeadStats`;
the reference is a run with a layout written out by hand from the known token positions. The edit is
chosen so that the layout matters (a threshold under which the rows pick different source heads, and an
image-region copy): a layout one position off changes the logits, so these comparisons can fail. A language-model-only bridge takes
the processor's dict (``input_ids`` + ``pixel_values`` + ``attention_mask``) and equals the HF model; ids
with image placeholders but no image are refused instead of being embedded as text.
"""

from __future__ import annotations

import pytest
import torch
from nnsight import NNsight

import eah_interp.nnsight as ens
import eah_interp.transformer_lens as lens
from eah_interp import EAH, HeadStats, LayoutError, TokenLayout, hf, patching
from eah_interp.head_stats import STATISTICS
from eah_interp.interventions import InterventionRun
from eah_interp.models.tiny import n_image_tokens, sharp_tiny_llava, tiny_llava_inputs

PREFIX = (3, 6)  # row r: [bos, PREFIX[r] text tokens, image tokens, 1 token, SUFFIX[r] tokens]
SUFFIX = (5, 2)
#: Rows pick heads 1 and 2 at this threshold, and only image-key columns are copied: the logits depend on the layout.
CONFIG = EAH(layers=(1,), threshold=0.06, normalise="causal", region="image")
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
    assert run.source_heads() == want_heads and run.interventions == (CONFIG,) and run.records[0].layer == 1
    same_stats(stats, want_stats)


def test_a_wrong_layout_changes_the_reference(model, inputs, hand_layout, reference):
    """The comparisons above can fail: the image span one position off gives other logits and statistics."""
    want_logits, want_heads, want_stats = reference
    assert want_heads == [[1, 2]]  # not head 0: the threshold separates the heads
    shifted = TokenLayout(hand_layout.image_mask.roll(1, dims=1), hand_layout.attention_mask)
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), hf.eah(model, CONFIG, layout=shifted):
        logits = model(**inputs).logits
    with torch.no_grad(), hf.record_attention(model, LAYERS, stats=stats, layout=shifted):
        model(**inputs)
    assert (logits - want_logits).abs().max() > 1e-3
    with pytest.raises(AssertionError):
        same_stats(stats, want_stats)


def test_nnsight_without_a_layout_equals_hf(model, inputs, reference):
    want_logits, want_heads, want_stats = reference
    nn_model = NNsight(model)
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), nn_model.trace(**inputs):
        ens.record_attention(nn_model, LAYERS[:1], stats=stats)
        run = ens.eah(nn_model, CONFIG)
        # after the edit: the edited layer 2 sees layer 1's change
        ens.record_attention(nn_model, LAYERS[1:], stats=stats)
        logits = nn_model.output.logits.save()
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert run.source_heads() == want_heads and run.interventions == (CONFIG,) and type(run) is InterventionRun
    assert stats.n_examples(0) == 2


def test_nnsight_statistics_without_a_layout_equal_hf(model, inputs, reference):
    *_, want_stats = reference
    nn_model = NNsight(model)
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), nn_model.trace(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                         pixel_values=inputs["pixel_values"]):  # ids as the first positional input
        ens.record_attention(nn_model, LAYERS, stats=stats)
    same_stats(stats, want_stats)


@pytest.mark.parametrize("which", ["full", "lm_only"])
def test_lens_without_a_layout_equals_hf(bridges, inputs, reference, which):
    want_logits, want_heads, want_stats = reference
    bridge = bridges[0] if which == "full" else bridges[1]
    hooks, run = lens.eah(bridge, CONFIG)
    stats = HeadStats(threshold=0.01)
    with torch.no_grad():
        logits = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
        bridge.run_with_hooks(**inputs, fwd_hooks=lens.record_attention(bridge, LAYERS, stats=stats)[0])
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert run.source_heads() == want_heads and run.interventions == (CONFIG,) and type(run) is InterventionRun
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
            ens.eah(nn_model, CONFIG)


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
    config = EAH.paper(threshold=bundle.threshold)
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
