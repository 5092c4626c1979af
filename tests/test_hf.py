"""HF backend on a tiny random LLaVA (real transformers classes, no weights), against explicit references."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from eah_interp import (
    EAH,
    AttentionImplementationError,
    HeadStats,
    LayerIndexError,
    NoImageTokensError,
    TokenLayout,
    hf,
    sink_scores,
)
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava, tiny_llava_inputs
from tests.reference import explicit_eah_layer


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava(seed=0)  # sharper attention than random init, so heads differ in their sinks


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def real(x, inputs):
    """Logits at real (non-padding) positions only."""
    return x[inputs["attention_mask"].bool()]


def discriminative_threshold(model, inputs, layer, normalise="causal"):
    """A sink threshold for ``layer`` under which every row has a sink head, and not always head 0."""
    with hf.record_attention(model, [layer], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    scores = sink_scores(rec.patterns[layer][0], layout, normalise)
    levels = scores[layout.image_mask[:, None, :].expand_as(scores)].unique().flip(0)
    for threshold in (levels[1:] + levels[:-1]) / 2:  # midpoints: no score sits on the threshold
        counts = ((scores > threshold) & layout.image_mask[:, None, :]).sum(-1)
        if (counts.max(-1).values > 0).all() and (counts.argmax(-1) != 0).any():
            return float(threshold)
    raise AssertionError("no discriminative threshold in this tiny model")


def test_identity_edit_equals_eager_and_other_layers_keep_sdpa(model, inputs):
    sdpa = logits(model, inputs)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        eager = logits(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    # a head broadcast onto itself changes nothing; the edited layer runs eager attention
    identity = EAH(layers=(1,), source=2, target_heads=(2,))
    with hf.eah(model, identity) as run:
        edited = logits(model, inputs)
    assert len(run.records) == 1
    assert torch.allclose(real(edited, inputs), real(eager, inputs), atol=1e-5)
    assert torch.allclose(real(edited, inputs), real(sdpa, inputs), atol=1e-5)
    # layers other than the edited one keep SDPA: their implementation is never asked for weights
    calls = []
    with hf.record_attention(model, [3], stats=HeadStats()), torch.no_grad():
        model.model.language_model.layers[0].self_attn.register_forward_hook(lambda m, a, o: calls.append(o[1]))
        model(**inputs, use_cache=False)
    model.model.language_model.layers[0].self_attn._forward_hooks.clear()
    assert calls == [None]  # SDPA returns no attention weights


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_eah_logits_equal_an_explicit_computation(model, inputs, preset):
    layer = 1 if preset == "paper" else 2
    normalise = "causal" if preset == "paper" else "official"
    threshold = discriminative_threshold(model, inputs, layer, normalise)
    config = (EAH.paper if preset == "paper" else EAH.reference)(layers=(layer,), threshold=threshold)
    with hf.eah(model, config) as run:
        got = logits(model, inputs)
    image_mask = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID
    record = []
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with explicit_eah_layer(model, layer, inputs["attention_mask"], image_mask, threshold=threshold,
                                normalise=normalise, skip_if_head0=config.skip_if_head0, record=record):
            want = logits(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert run.records[0].source_head.tolist() == [c for c, _ in record]
    assert run.records[0].eah.sink_counts.tolist() == [counts for _, counts in record]
    assert all(c >= 0 for c, _ in record[1:]) and any(c > 0 for c, _ in record)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert not torch.allclose(real(got, inputs), real(logits(model, inputs), inputs), atol=1e-3)


def test_generate_equals_edited_prefill_then_plain_decoding(model):
    x = tiny_llava_inputs(model, prefix_lengths=(4,), seed=3)
    config = EAH.paper(threshold=discriminative_threshold(model, x, 1))
    with hf.eah(model, config) as run, torch.no_grad():
        generated = model.generate(**x, max_new_tokens=6, do_sample=False)
    assert len(run.records) == 1 and run.records[0].q_len == run.records[0].k_len  # prefill only
    # hand-written loop: edited prefill once, then greedy decoding from the cache without any edit
    with torch.no_grad():
        with hf.eah(model, config):
            out = model(**x, use_cache=True)
        cache, ids, mask = out.past_key_values, x["input_ids"], x["attention_mask"]
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(5):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step = model(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            tokens.append(step.logits[:, -1].argmax(-1))
    assert generated[0, ids.shape[1]:].tolist() == torch.stack(tokens, 1)[0].tolist()


def test_model_is_restored_exactly_also_after_an_exception(model, inputs):
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, inputs)
    impl = model.config.text_config._attn_implementation
    keys = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    with pytest.raises(RuntimeError, match="boom"):
        with hf.eah(model, EAH.paper(threshold=0.0)):
            logits(model, inputs)
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with hf.record_attention(model, "all", stats=HeadStats()):
            raise KeyboardInterrupt
    assert model.config.text_config._attn_implementation == impl
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == keys
    assert not model._forward_pre_hooks
    assert "generate" not in vars(model)  # the layout-noting generate wrapper is gone
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, inputs), before)


def test_nested_and_two_models_do_not_interfere(model, inputs):
    other = tiny_llava(seed=1)
    stats = HeadStats()
    config = EAH.paper(threshold=0.0)
    with hf.eah(model, config) as run_a, hf.record_attention(other, "all", stats=stats), hf.eah(
        other, EAH(layers=(2,), threshold=0.0)
    ) as run_b:
        logits(model, inputs)
        logits(other, inputs)
    assert [r.layer for r in run_a.records] == [1] and [r.layer for r in run_b.records] == [2]
    assert stats.layers == [0, 1, 2, 3]  # layer 2 is edited by the inner eah context and still recorded
    assert model.config.text_config._attn_implementation == "sdpa"
    assert other.config.text_config._attn_implementation == "sdpa"


def test_batched_rows_equal_rows_alone(model, inputs):
    config = EAH.paper(threshold=discriminative_threshold(model, inputs, 1))
    with hf.eah(model, config) as run:
        batched = logits(model, inputs)
    mask = inputs["attention_mask"].bool()
    for row in range(2):
        keep = mask[row]
        alone = {
            "input_ids": inputs["input_ids"][row : row + 1, keep],
            "attention_mask": inputs["attention_mask"][row : row + 1, keep],
            "pixel_values": inputs["pixel_values"][row : row + 1],
        }
        with hf.eah(model, config) as run_alone:
            single = logits(model, alone)
        assert run_alone.records[0].source_head.tolist() == [run.records[0].source_head[row].item()]
        assert torch.allclose(single[0], batched[row, keep], atol=1e-5)


def test_record_attention_streams_stats_and_patterns(model, inputs):
    stats = HeadStats(threshold=0.0)
    with hf.record_attention(model, [0, 2], stats=stats, keep_patterns=True) as rec:
        logits(model, inputs)
        logits(model, inputs)
    assert stats.layers == [0, 2] and stats.n_examples(0) == 4
    p = rec.patterns[2][0]
    assert p.shape == (2, 4, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1])
    real_rows = p[inputs["attention_mask"].bool()[:, None, :].expand(-1, 4, -1)]
    assert torch.allclose(real_rows.sum(-1), torch.ones(real_rows.shape[0]), atol=1e-5)
    frame = stats.to_frame()
    assert (frame["sink_density_mean"] == 1.0).all()  # threshold 0: every image token is a sink


def test_errors_name_the_problem(model, inputs):
    with pytest.raises(LayerIndexError, match="4 decoder layers"):
        hf.eah(model, EAH.reference())
    no_image = {"input_ids": torch.tensor([[1, 5, 6, 7]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with pytest.raises(NoImageTokensError, match="no image tokens"):
        with hf.eah(model, EAH.paper()):
            logits(model, no_image)
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(AttentionImplementationError, match="flash_attention_2"):
            with hf.eah(model, EAH.paper()):
                pass
    finally:
        model.config.text_config._attn_implementation_internal = "sdpa"


def test_layers_that_keep_sdpa_keep_its_causal_shortcut(model):
    """Inside a context, the layers not chosen get SDPA's own mask: None for an unpadded causal prompt (so
    SDPA takes its is_causal path; a materialised float mask halves its speed at 2,900 tokens,
    docs/benchmarks.md), and the chosen layer still computes the causal attention right."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    unpadded = tiny_llava_inputs(model, prefix_lengths=(3, 3), seed=2)
    plain = logits(model, unpadded)
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, attention_mask))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface._global_mapping["sdpa"] = spy
    try:
        with hf.eah(model, EAH(layers=(1,), source=2, target_heads=(2,))):  # identity edit
            got = logits(model, unpadded)
    finally:
        AttentionInterface._global_mapping["sdpa"] = sdpa
    assert sorted({layer for layer, _ in seen}) == [0, 2, 3]
    assert all(mask is None for _, mask in seen)
    assert torch.allclose(got, plain, atol=1e-5)
