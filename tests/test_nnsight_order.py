"""Issue 18: an eah_interp.nnsight call written out of forward order names itself, its layer and the order.

nnsight runs a trace body alongside one forward pass; a request for a layer the forward already passed
fails with ``'model.model.language_model.layers.0.self_attn.source.attention_interface_0.output.i0' was
requested but the model already ran past it`` (an internal ``.source`` label). eah-interp's calls turn it
into a `TraceOrderError` that names the call, the layer, what came earlier and the fix; it stays an
nnsight ``OutOfOrderError`` so nnsight's own handling (``tracer.iter[:]`` loops ending) is unchanged.
"""

from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight import NNsight
from nnsight.intervention.interleaver import OutOfOrderError

import eah_interp.nnsight as ens
from eah_interp import EAH, HeadStats, TokenLayout, compat
from eah_interp.interventions import PAI
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs


@pytest.fixture(scope="module")
def setup():
    model = sharp_tiny_llava()
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    return model, NNsight(model), inputs, layout


EAH_2 = EAH(layers=(2,), source=1, threshold=0.0)


def run(nn_model, inputs, body):
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        body()


@pytest.mark.parametrize(
    ("body", "call", "earlier"),
    [
        (lambda nn, layout: (ens.eah(nn, EAH_2, layout),
                             ens.record_attention(nn, [0], stats=HeadStats(threshold=0.01), layout=layout)),
         "record_attention", "intervene(layers=[2])"),
        (lambda nn, layout: (ens.intervene(nn, [PAI(layers=(2,))], layout),
                             ens.eah(nn, EAH(layers=(0,), source=1, threshold=0.0), layout)),
         "intervene", "intervene(layers=[2])"),
        (lambda nn, layout: (ens.record_attention(nn, [2], stats=HeadStats(threshold=0.01), layout=layout),
                             ens.attention_probs(nn, 0).save()),
         "attention_probs", "record_attention(layers=[2])"),
        (lambda nn, layout: (ens.attention_probs(nn, 2).save(), ens.eager_attention_probs(nn, 0)),
         "eager_attention_probs", "attention_probs(layers=[2])"),
    ],
    ids=["eah-then-stats", "intervene-then-eah", "stats-then-probs", "probs-then-op"],
)
def test_out_of_order_call_names_itself_the_layer_and_the_earlier_call(setup, body, call, earlier):
    _, nn_model, inputs, layout = setup
    with pytest.raises(ens.TraceOrderError) as caught:
        run(nn_model, inputs, lambda: body(nn_model, layout))
    message = str(caught.value)
    assert f"eah_interp.nnsight.{call} asked for decoder layer 0" in message
    assert "(layer 0 before layer 2)" in message
    assert f"Earlier in this trace body: {earlier}" in message
    assert f"Move the {call} call for layer 0 above" in message
    assert isinstance(caught.value, OutOfOrderError)  # nnsight still recognises it


def test_a_later_read_of_the_users_own_is_named_without_earlier_calls(setup):
    _, nn_model, inputs, layout = setup
    with pytest.raises(ens.TraceOrderError, match=r"intervene asked for decoder layer 1.*or run it in a second trace"):
        run(nn_model, inputs, lambda: (nn_model.model.language_model.layers[2].output.save(),
                                       ens.eah(nn_model, EAH(layers=(1,), source=1, threshold=0.0), layout)))


def test_forward_order_works_and_each_trace_starts_a_fresh_log(setup):
    model, nn_model, inputs, layout = setup
    stats = HeadStats(threshold=0.01)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        ens.record_attention(nn_model, [0], stats=stats, layout=layout)
        records = ens.eah(nn_model, EAH_2, layout)
    assert [r.layer for r in records.records] == [2] and stats.n_examples(0) == 2
    # a second trace may start at layer 0 again: the first trace's calls are not held against it
    with pytest.raises(ens.TraceOrderError) as caught:
        run(nn_model, inputs, lambda: (ens.eah(nn_model, EAH(layers=(3,), source=1, threshold=0.0), layout),
                                       ens.record_attention(nn_model, [1], stats=HeadStats(threshold=0.01),
                                                            layout=layout)))
    assert "Earlier in this trace body: intervene(layers=[3])." in str(caught.value)
    assert "record_attention(layers=[0])" not in str(caught.value)


def test_a_generation_loop_that_outruns_the_run_still_ends_quietly(setup):
    """``tracer.iter[:]`` ends on nnsight's out-of-order error; ours is one, so the loop ends as before."""
    model, nn_model, inputs, layout = setup
    config = EAH(layers=(1,), source=2, threshold=0.0, phase="both")
    with torch.no_grad(), nn_model.trace(**inputs, fn=model.generate, max_new_tokens=3, do_sample=False) as tracer:
        records = nnsight.save([])
        for _ in tracer.iter[:]:
            records += ens.eah(nn_model, config, layout).records
    assert [r.q_len for r in records] == [inputs["input_ids"].shape[1], 1, 1]


def test_compat_assumptions_for_the_order_errors(setup):
    """compat: nnsight's OutOfOrderError class, a trace body's worker (None outside a trace) and its step."""
    model, nn_model, inputs, _ = setup
    assert compat.out_of_order_error() is OutOfOrderError
    assert compat.current_worker() is None
    seen = []
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        seen.append((compat.current_worker(), compat.worker_iteration(compat.current_worker())))
    assert type(seen[0][0]).__name__ == "Mediator" and seen[0][1] == 0
    steps = []
    with torch.no_grad(), nn_model.trace(**inputs, fn=model.generate, max_new_tokens=2, do_sample=False) as tracer:
        for _ in tracer.iter[:2]:
            steps.append(compat.worker_iteration(compat.current_worker()))
    assert steps == [0, 1]
