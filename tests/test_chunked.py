"""`eah_interp.chunked` and the map-free EAH path against explicit full-map computations.

The reference here is written out: ``softmax(Q K^T * scale + additive mask) @ V`` with GQA groups
repeated by hand, over the whole map at once. The chunked code must match it for every mask format
the HF backend can receive (None = causal, boolean with left padding, additive float), with chunks
much smaller than the prompt (so chunk borders and the causal key trimming are exercised), both with
the native row kernel and with the PyTorch rows (`row_kernel`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eah_interp import EAH, TokenLayout, native
from eah_interp.chunked import chunked_attention
from eah_interp.edit import apply_eah_to_probs, is_plain_copy, map_free_eah
from eah_interp.head_stats import head_statistics, head_statistics_from_sums

B, H, KV, N, D = 2, 6, 2, 19, 8


@pytest.fixture(autouse=True, params=["native", "pytorch"])
def row_kernel(request, monkeypatch):
    """Every test here runs twice: with the native row kernel (CPU) and with the PyTorch rows."""
    if request.param == "pytorch":
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        if native.enabled() and native.has_compiler():
            pytest.fail(f"a C compiler is here but {native.status()}")
        pytest.skip(native.status())
    return request.param
SCALE = D**-0.5


def projections(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * 2
    k = torch.randn(B, KV, N, D, generator=g) * 2
    v = torch.randn(B, KV, N, D, generator=g)
    return q, k, v


def layout(pad: int) -> TokenLayout:
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :pad] = False  # row 0 left-padded
    return TokenLayout.from_spans([(pad + 2, pad + 9), (3, 10)], N, mask)


def masks(lay: TokenLayout):
    """The three formats, all meaning causal + the layout's padding (None only without padding)."""
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    allowed = causal[None, None] & lay.attention_mask[:, None, None, :]
    additive = torch.zeros(B, 1, N, N).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed, additive


def explicit(q, k, v, allowed):
    """Full-map reference: probabilities [b, h, n, n] and output [b, n, h, d]."""
    groups = H // KV
    keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    logits = (q @ keys.transpose(-1, -2)) * SCALE
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1)
    return probs, (probs @ values).transpose(1, 2)


@pytest.mark.parametrize("form", ["none", "bool", "additive"])
def test_chunked_attention_equals_the_full_map(form):
    q, k, v = projections()
    pad = 0 if form == "none" else 4
    lay = layout(pad)
    allowed, additive = masks(lay)
    mask = {"none": None, "bool": allowed, "additive": additive}[form]
    probs, want = explicit(q, k, v, allowed)
    real = lay.attention_mask
    for chunk in (3, 7, 128):
        out, sums = chunked_attention(q, k, v, mask, SCALE, lay, chunk=chunk)
        assert torch.allclose(out[real], want[real], atol=1e-5), chunk
        # the statistics from running sums equal those of the full map
        got = head_statistics_from_sums(sums, lay, N, threshold=0.05)
        ref = head_statistics(probs.nan_to_num(0.0), lay, threshold=0.05)
        for name, value in ref.items():
            assert torch.allclose(got[name], value, atol=1e-5, equal_nan=True), (name, chunk)


@pytest.mark.parametrize("source", ["auto", "fewest", 3])
@pytest.mark.parametrize("normalise", ["causal", "rows", "official"])
def test_map_free_eah_equals_editing_the_full_map(source, normalise):
    q, k, v = projections(1)
    lay = layout(4)
    allowed, _ = masks(lay)
    probs, _ = explicit(q, k, v, allowed)
    config = EAH(layers=(1,), threshold=0.03, source=source, normalise=normalise)
    assert is_plain_copy(config)
    edited, want_record = apply_eah_to_probs(probs.nan_to_num(0.0), lay, config, layer=1)
    want = (edited @ v.repeat_interleave(H // KV, 1)).transpose(1, 2)
    got, record, _ = map_free_eah(q, k, v, allowed, SCALE, lay, config, layer=1)
    real = lay.attention_mask
    assert torch.equal(record.source_heads, want_record.source_heads)
    assert torch.equal(record.sink_counts, want_record.sink_counts)
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_rows_without_a_sink_head_keep_plain_attention():
    q, k, v = projections(2)
    lay = layout(0)
    allowed, _ = masks(lay)
    _, plain = explicit(q, k, v, allowed)
    config = EAH(layers=(1,), threshold=10.0)  # no score reaches 10: no source head anywhere
    got, record, _ = map_free_eah(q, k, v, None, SCALE, lay, config, layer=1)
    assert (record.source_heads == -1).all() and not record.edited.any()
    assert torch.allclose(got, plain, atol=1e-5)


def test_map_free_eah_refuses_what_it_cannot_compute():
    q, k, v = projections()
    with pytest.raises(ValueError, match="plain-copy"):
        map_free_eah(q, k, v, None, SCALE, layout(0), EAH(layers=(1,), alpha=0.5), 1)
    with pytest.raises(ValueError, match="prompt forwards"):
        map_free_eah(q[:, :, -1:], k, v, None, SCALE, layout(0), EAH(layers=(1,)), 1)


def float64_reference(q, k, v, allowed):
    """`explicit` in float64: probabilities [b, h, q, k] and output [b, q, h, d]."""
    probs, out = explicit(q.double(), k.double(), v.double(), allowed)
    return probs, out


def test_logits_far_below_the_row_maximum_stay_exact_enough():
    # logits spread over hundreds of nats: most exp(x - max) underflow; the floor must not change the
    # statistics, and entries a row cannot see must contribute exactly 0
    q, k, v = projections(3)
    q = q * 40
    lay = layout(0)
    allowed, _ = masks(lay)
    probs, want = float64_reference(q, k, v, allowed)
    spread = ((q @ k.repeat_interleave(H // KV, 1).transpose(-1, -2)) * SCALE).masked_fill(~allowed, 0)
    assert (spread.amax(-1) - spread.amin(-1)).amax() > 300  # the case this test is about
    out, sums = chunked_attention(q, k, v, None, SCALE, lay, chunk=5)
    # logits reach ~900 here: float32 rounds them by ~5e-5 nats, so even PyTorch's own float32 SDPA is
    # ~1.4e-5 off the float64 output; the chunked output must be as accurate as that
    sdpa = F.scaled_dot_product_attention(q, *(t.repeat_interleave(H // KV, 1) for t in (k, v)), is_causal=True, scale=SCALE)
    sdpa_error = (sdpa.transpose(1, 2).double() - want).abs().max()
    assert (out.double() - want).abs().max() <= 2 * sdpa_error + 1e-6
    got = head_statistics_from_sums(sums, lay, N, threshold=0.05)
    ref = head_statistics(probs, lay, threshold=0.05)
    for name, value in ref.items():
        assert torch.allclose(got[name].double(), value.double(), atol=1e-5), name
    # the last key is seen by the last row only, and that is the removed diagonal
    assert (sums.column_sums[..., -1] == 0).all()


def test_fewer_queries_than_keys_and_low_precision_inputs():
    q, k, v = projections(4)
    lay = layout(0)
    allowed, _ = masks(lay)
    probs, want = float64_reference(q, k, v, allowed)
    # the last 6 query rows against all N keys (a prompt continued after a cache), mask None = causal
    out, sums = chunked_attention(q[:, :, -6:], k, v, None, SCALE, lay, chunk=4)
    assert torch.allclose(out.double(), want[:, -6:], atol=1e-5)
    col = probs[:, :, -6:].sum(-2)  # over the 6 rows, minus each row's own (diagonal) entry
    col[..., -6:] -= torch.diagonal(probs[:, :, -6:, -6:], dim1=-2, dim2=-1)
    assert torch.allclose(sums.column_sums.double(), col, atol=1e-5)
    # bfloat16 projections: computed in float32, output returned in bfloat16
    out16, _ = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, SCALE, lay)
    assert out16.dtype == torch.bfloat16
    assert torch.allclose(out16.double(), want, atol=0.05)


def test_rows_that_see_no_key_output_zero_and_count_nothing():
    q, k, v = projections(5)
    lay = layout(4)
    allowed, additive = masks(lay)
    allowed = allowed.clone()
    allowed[0, :, :4] = False  # row 0's padding positions see nothing (as a padded SDPA mask can say)
    for mask in (allowed, additive.masked_fill(~allowed, torch.finfo(torch.float32).min)):
        out, sums = chunked_attention(q, k, v, mask, SCALE, lay, chunk=3)
        assert (out[0, :4] == 0).all() and out.isfinite().all()
        assert sums.column_sums.isfinite().all() and sums.entropy.isfinite().all()
        assert (sums.column_sums[0, :, :4] == 0).all()  # padding keys: seen by no real row
