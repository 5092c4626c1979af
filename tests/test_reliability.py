"""Reliability: padding on either side, several images, dtypes, GQA, clear errors, hook hygiene."""

from __future__ import annotations

import threading

import pytest
import torch

from eah_interp import (
    EAH,
    ConfigError,
    HeadIndexError,
    HeadStats,
    LayerIndexError,
    LayoutError,
    TokenLayout,
    UnsupportedModelError,
    hf,
    sink_scores,
)
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava, tiny_llava_inputs

CONFIG = EAH.paper(threshold=0.05)


def eah_logits(model, inputs, config=CONFIG):
    with hf.eah(model, config) as run, torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    return logits, run.records


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_equal_rows_alone(side):
    model = sharp_tiny_llava()
    inputs = tiny_llava_inputs(model, prefix_lengths=(2, 7, 4), suffix_lengths=(6, 1, 3), padding_side=side, seed=5)
    batched, records = eah_logits(model, inputs)
    mask = inputs["attention_mask"].bool()
    for row in range(3):
        keep = mask[row]
        alone = {"input_ids": inputs["input_ids"][row : row + 1, keep], "attention_mask": inputs["attention_mask"][row : row + 1, keep],
                 "pixel_values": inputs["pixel_values"][row : row + 1]}
        single, single_records = eah_logits(model, alone)
        assert single_records[0].source_head.tolist() == [records[0].source_head[row].item()]
        assert torch.equal(single_records[0].eah.sink_counts[0], records[0].eah.sink_counts[row])
        assert torch.allclose(single[0], batched[row, keep], atol=1e-5)
    with torch.no_grad():  # greedy generation too (left padding is what generate expects)
        if side == "left":
            with hf.eah(model, CONFIG):
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            for row in range(3):
                keep = mask[row]
                alone = {"input_ids": inputs["input_ids"][row : row + 1, keep], "attention_mask": inputs["attention_mask"][row : row + 1, keep],
                         "pixel_values": inputs["pixel_values"][row : row + 1]}
                with hf.eah(model, CONFIG):
                    single = model.generate(**alone, max_new_tokens=4, do_sample=False)
                assert single[0, -4:].tolist() == out[row, -4:].tolist()


def test_several_images_per_prompt_form_one_layout():
    model = sharp_tiny_llava()
    inputs = tiny_llava_inputs(model, prefix_lengths=(2, 3), images_per_row=2, seed=2)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    assert layout.n_image_tokens.tolist() == [32, 32] and layout.describe().count("), [") == 2
    _, records = eah_logits(model, inputs, EAH.paper(threshold=0.03))
    assert records[0].eah.sink_counts.max() <= 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_edit_like_float32(dtype):
    model32 = sharp_tiny_llava()
    model = sharp_tiny_llava().to(dtype)
    inputs = tiny_llava_inputs(model32, prefix_lengths=(3, 5), seed=3)
    half_inputs = {**inputs, "pixel_values": inputs["pixel_values"].to(dtype)}
    want, want_records = eah_logits(model32, inputs, EAH.paper(threshold=0.0, source=1))
    got, got_records = eah_logits(model, half_inputs, EAH.paper(threshold=0.0, source=1))
    mask = inputs["attention_mask"].bool()
    assert got.dtype == dtype
    assert torch.allclose(got[mask].float(), want[mask], atol=5e-2)  # the precision of the dtype, not of eah-interp
    stats = HeadStats(threshold=0.05)
    with hf.record_attention(model, [1], stats=stats), torch.no_grad():
        model(**half_inputs, use_cache=False)
    assert stats.matrix("entropy").dtype == torch.float64 and torch.isfinite(stats.matrix("entropy")).all()


def test_gqa_heads_use_their_own_values():
    """9 query heads over 3 KV heads (the organism's shape): EAH broadcasts maps, each head keeps its values."""
    model = tiny_llava(n_heads=6, n_kv_heads=2, hidden=48, seed=4)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3,), seed=4)
    identity, _ = eah_logits(model, inputs, EAH(layers=(1,), source=5, target_heads=(5,)))
    with torch.no_grad():
        plain = model(**inputs, use_cache=False).logits
    assert torch.allclose(identity, plain, atol=1e-5)
    with hf.record_attention(model, [1], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    probs = rec.patterns[1][0]
    attn = model.model.language_model.layers[1].self_attn
    captured = {}
    handle = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("z", a[0].detach().clone()))
    try:
        eah_logits(model, inputs, EAH(layers=(1,), source=4))
    finally:
        handle.remove()
    # recompute head 0's output by hand: head 4's map with head 0's KV group (group 0) values
    values = {}
    handle = attn.v_proj.register_forward_hook(lambda m, a, out: values.setdefault("v", out.detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    d = 48 // 6
    v0 = values["v"].view(1, -1, 2, d)[:, :, 0]  # KV head 0 serves query heads 0-2
    want = probs[0, 4] @ v0[0]
    assert torch.allclose(captured["z"][0, :, 0:d], want, atol=1e-5)


def test_bad_input_errors_name_the_problem():
    model = tiny_llava()
    inputs = tiny_llava_inputs(model)
    with pytest.raises(ConfigError, match="alpha"):
        EAH(alpha=2.0)
    with pytest.raises(HeadIndexError, match="4 heads"):
        hf.eah(model, EAH(layers=(1,), source=9))
    with pytest.raises(LayerIndexError, match="out of range"):
        hf.record_attention(model, [7], stats=HeadStats())
    wrong = TokenLayout.from_spans([(1, 5)], seq_len=9)
    with pytest.raises(LayoutError, match="does not fit"):
        with hf.eah(model, CONFIG, layout=wrong), torch.no_grad():
            model(**inputs, use_cache=False)
    probs = torch.rand(1, 2, 4, 4)
    with pytest.raises(LayoutError, match="4 key positions"):
        sink_scores(probs, TokenLayout.from_spans([(1, 2)], seq_len=5))
    with pytest.raises(UnsupportedModelError, match="not an HF PreTrainedModel"):
        hf.eah(torch.nn.Linear(2, 2), CONFIG)
    mismatch = dict(inputs)
    mismatch["input_ids"] = torch.cat([inputs["input_ids"], torch.full((1, 1), TINY_IMAGE_TOKEN_ID)], 1)
    mismatch["attention_mask"] = torch.ones_like(mismatch["input_ids"])
    with pytest.raises(ValueError, match="(?i)image"):  # transformers: placeholders != image features
        with hf.eah(model, CONFIG), torch.no_grad():
            model(**mismatch, use_cache=False)


def test_threads_editing_two_models_do_not_share_state():
    a, b = sharp_tiny_llava(seed=0), sharp_tiny_llava(seed=1)
    inputs = tiny_llava_inputs(a, prefix_lengths=(3,), seed=0)
    want = {name: eah_logits(m, inputs, cfg)[0] for name, m, cfg in (("a", a, CONFIG), ("b", b, EAH(layers=(2,), threshold=0.05)))}
    got, errors = {}, []

    def work(name, m, cfg):
        try:
            for _ in range(3):
                got[name] = eah_logits(m, inputs, cfg)[0]
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=("a", a, CONFIG)), threading.Thread(target=work, args=("b", b, EAH(layers=(2,), threshold=0.05)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.allclose(got["a"], want["a"], atol=1e-6) and torch.allclose(got["b"], want["b"], atol=1e-6)
