"""nnsight backend on a tiny random LLaVA: equal to the HF backend, stackable, nothing left behind."""

from __future__ import annotations

import dataclasses

import nnsight
import pytest
import torch
from nnsight import NNsight
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import eah_interp.nnsight as ens
from eah_interp import EAH, HeadStats, LayerIndexError, LayoutError, TokenLayout, hf, sink_scores
from eah_interp.models import attention_modules
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs

torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than the maths on a shared 2-core box


# ---------------------------------------------------------------------------- shared helpers (also used by
# tests/test_lens_backend.py and tests/test_patching.py)
def tiny_inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)


def tiny_layout(inputs) -> TokenLayout:
    return TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])


def real(x, inputs):
    """Values at real (non-padding) positions only."""
    return x[inputs["attention_mask"].bool()]


def hf_logits(model, inputs, config=None):
    """Plain logits, or ``(logits, records)`` under `hf.eah`."""
    with torch.no_grad():
        if config is None:
            return model(**inputs, use_cache=False).logits
        with hf.eah(model, config) as run:
            return model(**inputs, use_cache=False).logits, run.records


def discriminative_threshold(model, inputs, layer, normalise="causal"):
    """A sink threshold for ``layer`` under which every row has a sink head, and not always head 0."""
    with hf.record_attention(model, [layer], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    layout = tiny_layout(inputs)
    scores = sink_scores(rec.patterns[layer][0], layout, normalise)
    levels = scores[layout.image_mask[:, None, :].expand_as(scores)].unique().flip(0)
    for threshold in (levels[1:] + levels[:-1]) / 2:  # midpoints: no score sits on the threshold
        counts = ((scores > threshold) & layout.image_mask[:, None, :]).sum(-1)
        if (counts.max(-1).values > 0).all() and (counts.argmax(-1) != 0).any():
            return float(threshold)
    raise AssertionError("no discriminative threshold in this tiny model")


def preset(name: str, model, inputs) -> EAH:
    """The paper preset (layer 1) or the reference preset moved to layer 2, with a discriminative threshold."""
    if name == "paper":
        return EAH.paper(threshold=discriminative_threshold(model, inputs, 1))
    return EAH.reference(layers=(2,), threshold=discriminative_threshold(model, inputs, 2, "official"))


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_inputs(model)


@pytest.fixture(scope="module")
def layout(inputs):
    return tiny_layout(inputs)


@pytest.fixture(scope="module")
def nn_model(model):
    return NNsight(model)


def nnsight_eah(nn_model, inputs, config, layout):
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        run = ens.eah(nn_model, config, layout)
        logits = nn_model.output.logits.save()
    return logits, run.records


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("name", ["paper", "reference"])
def test_eah_equals_hf_eah(model, nn_model, inputs, layout, name):
    config = preset(name, model, inputs)
    want, hf_records = hf_logits(model, inputs, config)
    got, records = nnsight_eah(nn_model, inputs, config, layout)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in hf_records]
    assert [r.eah.sink_counts.tolist() for r in records] == [r.eah.sink_counts.tolist() for r in hf_records]
    assert any(h >= 0 for r in records for h in r.source_head.tolist())  # something was broadcast
    assert not torch.allclose(real(got, inputs), real(hf_logits(model, inputs), inputs), atol=1e-4)


def test_two_layers_blend_and_image_region_equal_hf(model, nn_model, inputs, layout):
    config = EAH(layers=(1, 3), threshold=0.0, source=1, region="image", alpha=0.5)
    want, _ = hf_logits(model, inputs, config)
    got, records = nnsight_eah(nn_model, inputs, config, layout)
    assert [r.layer for r in records] == [1, 3]
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    # one of the layers (a copy of the config with other layers)
    want_3, _ = hf_logits(model, inputs, EAH(layers=(3,), threshold=0.0, source=1, region="image", alpha=0.5))
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        only_3 = ens.eah(nn_model, dataclasses.replace(config, layers=(3,)), layout)
        got_3 = nn_model.output.logits.save()
    assert [r.layer for r in only_3.records] == [3]
    assert torch.allclose(real(got_3, inputs), real(want_3, inputs), atol=1e-5)


def test_identity_edit_leaves_logits_unchanged(model, nn_model, inputs, layout):
    identity = EAH(layers=(1,), source=2, target_heads=(2,))  # head 2 broadcast onto itself
    got, records = nnsight_eah(nn_model, inputs, identity, layout)
    assert records[0].source_head.tolist() == [2, 2]
    assert torch.allclose(real(got, inputs), real(hf_logits(model, inputs), inputs), atol=1e-5)


# ---------------------------------------------------------------------------- reading probabilities
def test_probabilities_are_read_in_place_and_other_layers_keep_sdpa(model, nn_model, inputs, layout):
    with hf.record_attention(model, [0, 2], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    weights = {}
    handles = [
        attn.register_forward_hook(lambda m, a, o, i=i: weights.__setitem__(i, o[1]))
        for i, attn in attention_modules(model).items()
    ]
    try:
        with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
            p0 = ens.attention_probs(nn_model, 0).save()
            p2 = ens.attention_probs(nn_model, 2).save()
            p2_again = ens.attention_probs(nn_model, 2).save()  # a second read of the same layer is fine
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(p0, rec.patterns[0][0], atol=1e-6) and torch.allclose(p2, rec.patterns[2][0], atol=1e-6)
    assert torch.equal(p2, p2_again)
    assert weights[1] is None and weights[3] is None  # SDPA: no probabilities computed
    assert weights[0] is not None and weights[2] is not None


def test_record_attention_equals_hf_recording(model, nn_model, inputs, layout):
    want = HeadStats(threshold=0.05)
    with hf.record_attention(model, [0, 2], stats=want), torch.no_grad():
        model(**inputs, use_cache=False)
    got = HeadStats(threshold=0.05)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        ens.record_attention(nn_model, [2, 0], stats=got, layout=layout)
    a, b = want.to_frame(), got.to_frame()
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 8
    assert torch.allclose(torch.tensor(a.to_numpy(dtype=float)), torch.tensor(b.to_numpy(dtype=float)),
                          atol=1e-5, equal_nan=True)


# ---------------------------------------------------------------------------- stacking with other interventions
def test_eah_stacks_with_a_head_ablation_and_a_saved_residual(model, nn_model, inputs, layout):
    """EAH at layer 1 + zeroing head 3 of layer 2 (o_proj input) + saving layer 3's output, in one trace,
    equal the same edits made with hf.eah and plain torch hooks."""
    config = preset("paper", model, inputs)
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    layers = model.model.language_model.layers

    def zero_head(module, args):
        x = args[0].clone()
        x[..., 3 * head_dim : 4 * head_dim] = 0
        return (x,)

    saved = {}
    handles = [
        layers[2].self_attn.o_proj.register_forward_pre_hook(zero_head),
        layers[3].register_forward_hook(lambda m, a, o: saved.__setitem__("resid", o.clone())),
    ]
    try:
        want, _ = hf_logits(model, inputs, config)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        ens.eah(nn_model, config, layout)
        o_proj = nn_model.model.language_model.layers[2].self_attn.o_proj
        x = o_proj.input.clone()
        x[..., 3 * head_dim : 4 * head_dim] = 0
        o_proj.input = x
        resid = nn_model.model.language_model.layers[3].output.save()
        got = nn_model.output.logits.save()
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    assert torch.allclose(real(resid, inputs), real(saved["resid"], inputs), atol=1e-5)


def test_a_custom_edit_through_the_probability_op(model, nn_model, inputs, layout):
    """Assigning the op's output is an edit: writing the head-2 map into every head == EAH with source=2."""
    want, _ = hf_logits(model, inputs, EAH(layers=(2,), source=2))
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        op = ens.eager_attention_probs(nn_model, 2)
        op.output = op.output[:, 2:3].expand_as(op.output).clone()
        got = nn_model.output.logits.save()
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)


# ---------------------------------------------------------------------------- generate
def test_generate_edits_the_prefill_only_and_each_step_on_request(model, nn_model, inputs, layout):
    kwargs = dict(max_new_tokens=4, do_sample=False)
    for config in (preset("paper", model, inputs), EAH(layers=(1,), source=2, threshold=0.0, phase="both")):
        with hf.eah(model, config) as run, torch.no_grad():
            want = model.generate(**inputs, **kwargs)
        with torch.no_grad(), nn_model.trace(**inputs, fn=model.generate, **kwargs) as tracer:
            if config.phase == "both":
                records = nnsight.save([])
                for _ in tracer.iter[:4]:
                    records += ens.eah(nn_model, config, layout).records
            else:
                run_nn = ens.eah(nn_model, config, layout)
            got = tracer.result.save()
        if config.phase != "both":
            records = run_nn.records
        assert torch.equal(got, want)
        assert [(r.q_len, r.k_len) for r in records] == [(r.q_len, r.k_len) for r in run.records]
    assert [r.q_len for r in records] == [26, 1, 1, 1]


# ---------------------------------------------------------------------------- nothing left behind
def test_nothing_outside_the_trace_changes_even_after_an_exception(model, nn_model, inputs, layout):
    before = hf_logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config.text_config._attn_implementation
    registries = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    config = EAH.paper(threshold=0.0)
    with pytest.raises(ValueError, match="boom"), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            ens.eah(nn_model, config, layout)
            raise ValueError("boom")
    wrong = TokenLayout.from_input_ids(inputs["input_ids"][:, 1:], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"][:, 1:])
    with pytest.raises(LayoutError, match="does not fit"), torch.no_grad():
        with nn_model.trace(**inputs, use_cache=False):
            ens.eah(nn_model, config, wrong)
    assert model.config.text_config._attn_implementation == impl
    assert (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)) == registries
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(hf_logits(model, inputs), before)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):  # a later plain trace is plain
        plain = nn_model.output.logits.save()
    assert torch.equal(plain, before)


def test_errors_name_the_problem(model, nn_model, inputs, layout):
    with pytest.raises(LayerIndexError, match="4 decoder layers"), nn_model.trace(**inputs, use_cache=False):
        ens.eah(nn_model, EAH.reference(), layout)
    with pytest.raises(LayerIndexError, match="out of range"), nn_model.trace(**inputs, use_cache=False):
        ens.attention_probs(nn_model, 7)
    with pytest.raises(TypeError, match="EAH"), nn_model.trace(**inputs, use_cache=False):
        ens.eah(nn_model, {"layers": [1]}, layout)  # type: ignore[arg-type]


def test_transformers_model_wrapper_trace_and_generate(model, inputs, layout):
    """nnsight's TransformersModel around the pre-loaded model (offline: a tokenizer and the task given)."""
    from nnsight.modeling.transformers import TransformersModel

    from eah_interp.transformer_lens import _placeholder_tokenizer

    wrapped = TransformersModel(model, tokenizer=_placeholder_tokenizer(128), task="text-generation")
    config = preset("paper", model, inputs)
    want, _ = hf_logits(model, inputs, config)
    got, _ = nnsight_eah(wrapped, inputs, config, layout)
    assert torch.allclose(real(got, inputs), real(want, inputs), atol=1e-5)
    with hf.eah(model, config), torch.no_grad():
        want_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad(), wrapped.generate(**inputs, max_new_tokens=3, do_sample=False) as tracer:
        ens.eah(wrapped, config, layout)
        ids = tracer.result.save()
    assert torch.equal(ids, want_ids)


@pytest.mark.slow
def test_eah_equals_hf_eah_on_the_bundled_model():
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene, question_for

    bundle = load_model("organism")
    model = bundle.model
    scenes = [make_scene(100000001), make_scene(100000002)]
    x = bundle.processor([bundle.yes_no_prompt(question_for("triangle")), bundle.caption_prompt],
                         [s.image for s in scenes])
    layout = TokenLayout.from_input_ids(x["input_ids"], model.config.image_token_id, x["attention_mask"])
    config = EAH.paper(threshold=bundle.threshold)
    want, hf_records = hf_logits(model, x, config)
    got, records = nnsight_eah(NNsight(model), x, config, layout)
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in hf_records]
    assert torch.allclose(real(got, x), real(want, x), atol=2e-4)  # HF: SDPA kernels in the edited layer; nnsight: eager; 29 trained layers after it


def test_unpadded_prompt_where_sdpa_builds_no_mask(model, nn_model):
    """Without padding SDPA passes no mask (is_causal); eager_attention must build the causal one."""
    x = tiny_llava_inputs(model, prefix_lengths=(4,), seed=3)
    config = EAH(layers=(2,), source=1, threshold=0.0)
    want, _ = hf_logits(model, x, config)
    got, _ = nnsight_eah(nn_model, x, config, tiny_layout(x))
    assert torch.allclose(got, want, atol=1e-5)
    identity, _ = nnsight_eah(nn_model, x, EAH(layers=(2,), source=1, target_heads=(1,)), tiny_layout(x))
    assert torch.allclose(identity, hf_logits(model, x), atol=1e-5)
