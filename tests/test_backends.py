"""nnsight and TransformerLens backends: equal to the HF backend, stackable, restored after use."""

from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight import NNsight

import eah_interp.lens as lens
import eah_interp.nnsight as ens
from eah_interp import EAHConfig, HeadStats, TokenLayout, hf
from eah_interp._testing import TINY_IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs


def sharp_tiny_llava(seed=0):
    m = tiny_llava(seed=seed)
    with torch.no_grad():  # sharper attention than random init, so heads differ in their sinks
        for layer in m.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), seed=1)


@pytest.fixture(scope="module")
def layout(inputs):
    return TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])


CONFIGS = {
    "paper": EAHConfig.paper(threshold=0.05),
    "reference": EAHConfig.reference(layers=(2,), threshold=0.04),  # edits row 1 (head 1); row 0: head 0, skipped
    "two_layers_image_region": EAHConfig(layers=(1, 3), threshold=0.05, region="image", alpha=0.5),
}


def real(x, inputs):
    return x[inputs["attention_mask"].bool()]


def hf_logits(model, inputs, config=None):
    with torch.no_grad():
        if config is None:
            return model(**inputs, use_cache=False).logits
        with hf.eah(model, config) as run:
            return model(**inputs, use_cache=False).logits, run.records


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nnsight_eah_equals_hf_eah(model, inputs, layout, name):
    config = CONFIGS[name]
    want, hf_records = hf_logits(model, inputs, config)
    nn_model = NNsight(model)
    with ens.expose(nn_model, config.layers), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            records = nnsight.save(ens.apply_eah(nn_model, config, layout))
            got = nn_model.output.logits.save()
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in hf_records]
    assert not torch.allclose(real(got, inputs), real(hf_logits(model, inputs), inputs), atol=1e-4)


def test_nnsight_identity_edit_and_restoration(model, inputs, layout):
    base = hf_logits(model, inputs)
    nn_model = NNsight(model)
    identity = EAHConfig(layers=(1,), source=2, target_heads=(2,))
    with ens.expose(nn_model, [1]), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            ens.apply_eah(nn_model, identity, layout)
            got = nn_model.output.logits.save()
    assert torch.allclose(real(got, inputs), real(base, inputs), atol=1e-5)
    with pytest.raises(ValueError, match="boom"):
        with ens.expose(nn_model, [1]):
            raise ValueError("boom")
    attn = model.model.language_model.layers[1].self_attn
    assert "attn_probs" not in attn._modules and model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(hf_logits(model, inputs), base)
    with pytest.raises(RuntimeError, match="not exposed"):
        with nn_model.trace(**inputs, use_cache=False):
            ens.apply_eah(nn_model, EAHConfig.paper(), layout)


def test_nnsight_eah_stacks_with_a_head_ablation(model, inputs, layout):
    """EAH plus zeroing head 3's output of layer 2 in one trace == the same two edits done with HF hooks."""
    config = CONFIGS["paper"]
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads

    def zero_head(module, args):
        x = args[0].clone()
        x[..., 3 * head_dim : 4 * head_dim] = 0
        return (x,)

    o_proj = model.model.language_model.layers[2].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(zero_head)
    try:
        want, _ = hf_logits(model, inputs, config)
    finally:
        handle.remove()
    nn_model = NNsight(model)
    with ens.expose(nn_model, [1]), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            ens.apply_eah(nn_model, config, layout)
            o = nn_model.model.language_model.layers[2].self_attn.o_proj
            x = o.input.clone()
            x[..., 3 * head_dim : 4 * head_dim] = 0
            o.input = x
            got = nn_model.output.logits.save()
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)


def test_nnsight_head_stats_equal_hf_recording(model, inputs, layout):
    want = HeadStats(threshold=0.05)
    with hf.record_attention(model, [0, 2], stats=want), torch.no_grad():
        model(**inputs, use_cache=False)
    got = HeadStats(threshold=0.05)
    nn_model = NNsight(model)
    with ens.expose(nn_model, [0, 2]), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            ens.feed_head_stats(nn_model, got, layout, [0, 2])
    a, b = want.to_frame(), got.to_frame()
    assert list(a.columns) == list(b.columns)
    assert torch.allclose(torch.tensor(a.drop(columns=["layer", "head"]).to_numpy(dtype=float)),
                          torch.tensor(b.drop(columns=["layer", "head"]).to_numpy(dtype=float)), atol=1e-5, equal_nan=True)


def test_lens_hooks_equal_hf_eah_and_feed_stats(inputs, layout):
    # The bridge rewires the HF model in place: compute the HF reference on an identical copy first.
    reference_model = sharp_tiny_llava()
    config = CONFIGS["paper"]
    want, hf_records = hf_logits(reference_model, inputs, config)
    base = hf_logits(reference_model, inputs)
    bridge = lens.boot_bridge(sharp_tiny_llava())
    kwargs = dict(pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    records = []
    with torch.no_grad():
        got = bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=lens.eah_hooks(bridge, config, layout, records), **kwargs)
        plain = bridge(inputs["input_ids"], **kwargs)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert torch.allclose(real(plain, inputs), real(base, inputs), atol=1e-5)
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in hf_records]
    stats, reference_stats = HeadStats(threshold=0.05), HeadStats(threshold=0.05)
    with torch.no_grad():
        bridge.run_with_hooks(inputs["input_ids"], fwd_hooks=lens.head_stats_hooks(stats, layout, [1]), **kwargs)
        with hf.record_attention(reference_model, [1], stats=reference_stats):
            reference_model(**inputs, use_cache=False)
    assert torch.allclose(stats.matrix("sink_count"), reference_stats.matrix("sink_count"))
    assert torch.allclose(stats.matrix("entropy"), reference_stats.matrix("entropy"), atol=1e-5)


@pytest.mark.slow
def test_nnsight_eah_equals_hf_eah_on_the_bundled_model():
    from eah_interp.models import ORGANISM_THRESHOLD, load_organism
    from eah_interp.models.organism import caption_prompt
    from eah_interp.scenes import iter_scenes

    model, processor = load_organism()
    scenes = list(iter_scenes("heldout", 2))
    inputs = processor([caption_prompt()] * 2, [s.image for s in scenes])
    layout = TokenLayout.from_input_ids(inputs["input_ids"], model.config.image_token_id, inputs["attention_mask"])
    config = EAHConfig.paper(threshold=ORGANISM_THRESHOLD)
    want, hf_records = hf_logits(model, inputs, config)
    nn_model = NNsight(model)
    with ens.expose(nn_model, config.layers), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            records = nnsight.save(ens.apply_eah(nn_model, config, layout))
            got = nn_model.output.logits.save()
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in hf_records]
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
