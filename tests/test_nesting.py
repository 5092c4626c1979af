"""Nested HF contexts on one model share one attention dispatcher (issue 18).

Before, each context registered its own attention function and the innermost won: ``hf.eah`` outside
``hf.record_attention`` on the same layer left EAH unapplied (``run.records == []``), the reverse order
left the layer unrecorded. Now every active context's edits run in one documented order, and a
recording sees what the edited layer computes. The references here are written out: the edited layer
is `tests.reference.explicit_eah_layer` (loops over rows, heads and columns), its statistics are
computed below with loops from the edited probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from eah_interp import EAH, HeadStats, TokenLayout, hf, sink_scores
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs
from tests.reference import explicit_eah_layer, explicit_sink_scores

LAYER = 1


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)


@pytest.fixture(scope="module")
def threshold(model, inputs):
    """A sink threshold under which every row has a sink head, and not always head 0."""
    with hf.record_attention(model, [LAYER], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    scores = sink_scores(rec.patterns[LAYER][0], layout, "causal")
    levels = scores[layout.image_mask[:, None, :].expand_as(scores)].unique().flip(0)
    for t in (levels[1:] + levels[:-1]) / 2:
        counts = ((scores > t) & layout.image_mask[:, None, :]).sum(-1)
        if (counts.max(-1).values > 0).all() and (counts.argmax(-1) != 0).any():
            return float(t)
    raise AssertionError("no discriminative threshold in this tiny model")


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def explicit_edited_layer(model, inputs, threshold, *, source=None):
    """Logits and the EDITED probabilities of layer ``LAYER`` from the loop-written EAH layer (eager)."""
    image_mask = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID
    captured = []
    attn = model.model.language_model.layers[LAYER].self_attn
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with explicit_eah_layer(model, LAYER, inputs["attention_mask"], image_mask, threshold=threshold,
                                source=source):
            handle = attn.register_forward_hook(lambda m, a, out: captured.append(out[1].detach().clone()))
            try:
                want = logits(model, inputs)
            finally:
                handle.remove()
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    return want, captured[0]


def explicit_statistics(probs, attention_mask, image_mask, threshold):
    """Per-head statistics of one batch of prefill probabilities, by loops; averaged over rows like HeadStats."""
    b, h, n, _ = probs.shape
    per_row = []
    for row in range(b):
        real = attention_mask[row].bool().tolist()
        image_pos = [j for j, x in enumerate(image_mask[row].tolist()) if x]
        first_image = min(image_pos)
        text_rows = [i for i in range(n) if real[i] and i not in image_pos and i >= first_image]
        real_rows = [i for i in range(n) if real[i]]
        heads = []
        for head in range(h):
            p = probs[row, head].double()
            scores = explicit_sink_scores(p, image_pos, real, "causal", real.index(True))
            count = sum(1 for v in scores.values() if v > threshold)
            mass = sum(sum(float(p[i, j]) for j in image_pos) for i in text_rows) / len(text_rows)
            entropy = 0.0
            for i in real_rows:
                entropy -= sum(float(p[i, j]) * math.log(float(p[i, j])) for j in range(n) if p[i, j] > 0)
            heads.append({
                "sink_count": count,
                "sink_density": count / len(image_pos),
                "max_sink_score": max(scores.values()),
                "image_mass_text": mass,
                "entropy": entropy / len(real_rows),
            })
        per_row.append(heads)
    return {
        name: [sum(per_row[r][hd][name] for r in range(b)) / b for hd in range(h)] for name in per_row[0][0]
    }


def nested(model, config, stats, order, **record_kwargs):
    eah = hf.eah(model, config)
    record = hf.record_attention(model, [LAYER], stats=stats, **record_kwargs)
    return (eah, record) if order == "eah_outside" else (record, eah)


@pytest.mark.parametrize("order", ["eah_outside", "record_outside"])
@pytest.mark.parametrize("keep_patterns", [False, True], ids=["map_free", "eager"])
def test_nested_eah_and_recording_chain_in_either_order(model, inputs, threshold, order, keep_patterns):
    config = EAH.paper(threshold=threshold)
    stats = HeadStats(threshold=threshold)
    outer, inner = nested(model, config, stats, order, keep_patterns=keep_patterns)
    with outer as first, inner as second:
        got = logits(model, inputs)
    run, rec = (first, second) if order == "eah_outside" else (second, first)
    want, edited = explicit_edited_layer(model, inputs, threshold)
    real = inputs["attention_mask"].bool()
    # (a) EAH was applied, once, with its record, and the layer was recorded
    assert len(run.records) == 1 and run.records[0].layer == LAYER
    assert run.records[0].eah.edited.all()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert not torch.allclose(got[real], logits(model, inputs)[real], atol=1e-3)  # the edit changed the output
    assert stats.layers == [LAYER] and stats.n_examples(LAYER) == 2
    # (b) the recorded statistics are those of the EDITED layer, computed by hand
    image_mask = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID
    hand = explicit_statistics(edited, inputs["attention_mask"], image_mask, threshold)
    frame = stats.to_frame()
    for name, values in hand.items():
        got_mean = torch.tensor(frame[f"{name}_mean"].tolist(), dtype=torch.float64)
        assert torch.allclose(got_mean, torch.tensor(values, dtype=torch.float64), atol=1e-5), name
    # every head carries the source head's map after the edit, so all heads' statistics agree per row
    assert frame["sink_count_mean"].nunique() == 1
    if keep_patterns:  # the kept pattern is the edited map itself
        pattern = rec.patterns[LAYER][0]
        pairs = (real[:, None, :, None] & real[:, None, None, :]).expand_as(pattern)
        assert torch.allclose(pattern[pairs], edited[pairs], atol=1e-5)


@pytest.mark.parametrize("outer_source, inner_source", [(1, 3), (3, 1)])
def test_two_edits_of_one_layer_run_in_stack_order(model, inputs, outer_source, inner_source):
    """Outer edit first: after copying head ``a`` onto every head, copying head ``b`` copies ``a`` again.
    So the result is the explicit layer with source ``a`` (the outer one), whatever ``b`` is."""
    with hf.eah(model, EAH(layers=(LAYER,), source=outer_source)) as outer, hf.eah(
        model, EAH(layers=(LAYER,), source=inner_source)
    ) as inner:
        got = logits(model, inputs)
    assert len(outer.records) == len(inner.records) == 1
    want, _ = explicit_edited_layer(model, inputs, threshold=0.0, source=outer_source)
    other, _ = explicit_edited_layer(model, inputs, threshold=0.0, source=inner_source)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert not torch.allclose(got[real], other[real], atol=1e-3)


def test_exception_inside_nested_contexts_restores_everything(model, inputs):
    before = logits(model, inputs)
    impl = model.config.text_config._attn_implementation
    keys = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    with pytest.raises(RuntimeError, match="boom"):
        with hf.eah(model, EAH.paper(threshold=0.0)), hf.record_attention(model, "all", stats=HeadStats()):
            assert model.config.text_config._attn_implementation.startswith("eah_interp.dispatch.")
            assert len(hf.active_contexts(model)) == 2
            logits(model, inputs)
            raise RuntimeError("boom")
    assert model.config.text_config._attn_implementation == impl
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == keys
    assert not model._forward_pre_hooks and "generate" not in vars(model)
    assert hf.active_contexts(model) == []
    assert torch.equal(logits(model, inputs), before)


def test_one_dispatcher_is_registered_per_model(model, inputs):
    keys = set(AttentionInterface._global_mapping)
    with hf.eah(model, EAH.paper(threshold=0.0)), hf.record_attention(model, [0], stats=HeadStats()):
        with hf.record_attention(model, [2], stats=HeadStats()):
            added = set(AttentionInterface._global_mapping) - keys
            assert len(added) == 1
        assert set(AttentionInterface._global_mapping) - keys == added  # the inner exit keeps it
    assert set(AttentionInterface._global_mapping) == keys


def test_a_context_cannot_be_entered_twice(model):
    context = hf.eah(model, EAH.paper())
    with context, pytest.raises(RuntimeError, match="already active"):
        with context:
            pass
    assert hf.active_contexts(model) == []


@pytest.mark.parametrize("order", ["eah_outside", "record_outside"])
def test_generate_under_nested_contexts(model, threshold, order):
    x = tiny_llava_inputs(model, prefix_lengths=(4,), seed=3)
    config = EAH.paper(threshold=threshold)
    with hf.eah(model, config) as alone, torch.no_grad():
        want = model.generate(**x, max_new_tokens=5, do_sample=False)
    stats = HeadStats(threshold=threshold)
    outer, inner = nested(model, config, stats, order)
    with torch.no_grad(), outer as first, inner as second:
        got = model.generate(**x, max_new_tokens=5, do_sample=False)
    run = first if order == "eah_outside" else second
    assert len(run.records) == 1 and run.records[0].q_len == run.records[0].k_len  # the prompt, edited once
    assert stats.n_examples(LAYER) == 1  # the prompt, recorded once (decode steps are not recorded)
    assert got.tolist() == want.tolist()
    assert run.records[0].source_head.tolist() == alone.records[0].source_head.tolist()
    assert "generate" not in vars(model) and hf.active_contexts(model) == []
