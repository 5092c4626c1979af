"""Property-based tests of the core tensor functions (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eah_interp import TokenLayout, broadcast_heads, detect_sinks, sink_scores


@st.composite
def causal_attention(draw):
    """Random causal, row-stochastic probabilities [b, h, n, n] with a random image span per row."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 5))
    n = draw(st.integers(3, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, h, n, n, generator=g) * draw(st.floats(0.1, 4.0))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    image = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        start = draw(st.integers(0, n - 2))
        end = draw(st.integers(start + 1, n))
        image[row, start:end] = True
    return probs, TokenLayout(image, torch.ones(b, n, dtype=torch.bool))


@settings(max_examples=60, deadline=None)
@given(causal_attention(), st.sampled_from(["full", "image"]), st.floats(0.05, 1.0))
def test_broadcast_keeps_rows_stochastic_and_causal(data, region, alpha):
    probs, layout = data
    heads = torch.randint(0, probs.shape[1], (probs.shape[0],))
    out = broadcast_heads(probs, heads, region=region, layout=layout, alpha=alpha)
    assert torch.allclose(out.sum(-1), torch.ones_like(out.sum(-1)), atol=1e-5)
    upper = torch.ones(probs.shape[-1], probs.shape[-1], dtype=torch.bool).triu(1)
    assert (out[..., upper] == 0).all()
    assert (out >= 0).all()


@settings(max_examples=60, deadline=None)
@given(causal_attention())
def test_broadcasting_a_head_onto_itself_is_the_identity(data):
    probs, _ = data
    head = probs.shape[1] - 1
    out = broadcast_heads(probs, head, target_heads=[head])
    assert torch.equal(out, probs)


@settings(max_examples=60, deadline=None)
@given(causal_attention(), st.sampled_from(["causal", "official"]))
def test_sinks_follow_a_permutation_of_heads(data, normalise):
    probs, layout = data
    perm = torch.randperm(probs.shape[1])
    a = detect_sinks(probs, layout, 0.05, normalise)[:, perm]
    b = detect_sinks(probs[:, perm], layout, 0.05, normalise)
    assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(causal_attention(), st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_sinks_shrink_as_the_threshold_grows(data, t1, t2):
    probs, layout = data
    lo, hi = min(t1, t2), max(t1, t2)
    assert (detect_sinks(probs, layout, hi) <= detect_sinks(probs, layout, lo)).all()
    scores = sink_scores(probs, layout)
    assert (scores[~layout.image_mask[:, None, :].expand_as(scores)] == 0).all()
