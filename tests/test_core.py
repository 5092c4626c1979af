"""Core tensor functions against hand-computed values and explicit loops."""

from __future__ import annotations

import json

import pytest
import torch

from eah_interp import (
    EAH,
    ConfigError,
    HeadIndexError,
    HeadStats,
    LayerIndexError,
    LayoutError,
    NoImageTokensError,
    TokenLayout,
    apply_eah_to_probs,
    broadcast_heads,
    detect_sinks,
    drop_columns,
    head_statistics,
    select_source_heads,
    sink_density,
    sink_scores,
)

# A 6-token row: [text, img, img, text, text, text]; one head's causal attention, rows sum to 1.
HEAD_A = torch.tensor(
    [
        [1.0, 0, 0, 0, 0, 0],
        [0.5, 0.5, 0, 0, 0, 0],
        [0.2, 0.6, 0.2, 0, 0, 0],
        [0.1, 0.5, 0.3, 0.1, 0, 0],
        [0.1, 0.4, 0.1, 0.2, 0.2, 0],
        [0.1, 0.3, 0.1, 0.1, 0.2, 0.2],
    ]
)
# A second head that spreads attention: no sink on position 1.
HEAD_B = torch.tensor(
    [
        [1.0, 0, 0, 0, 0, 0],
        [0.9, 0.1, 0, 0, 0, 0],
        [0.7, 0.1, 0.2, 0, 0, 0],
        [0.6, 0.1, 0.2, 0.1, 0, 0],
        [0.5, 0.1, 0.1, 0.1, 0.2, 0],
        [0.4, 0.1, 0.1, 0.1, 0.1, 0.2],
    ]
)
IMAGE = [False, True, True, False, False, False]


def example(pad: int = 0):
    """Batch of one row (optionally left-padded by ``pad`` garbage positions), 2 heads."""
    n = 6 + pad
    probs = torch.zeros(1, 2, n, n)
    probs[0, 0, pad:, pad:] = HEAD_A
    probs[0, 1, pad:, pad:] = HEAD_B
    probs[0, :, :pad, :pad] = 1.0 / max(pad, 1)  # padded query rows: garbage that must be ignored
    image = torch.tensor([[False] * pad + IMAGE])
    mask = torch.tensor([[False] * pad + [True] * 6])
    return probs, TokenLayout(image, mask)


# ---------------------------------------------------------------------------- layout
def test_layout_from_input_ids_padding_and_extent():
    ids = torch.tensor([[0, 0, 5, 9, 9, 7], [5, 9, 9, 9, 7, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    layout = TokenLayout.from_input_ids(ids, 9, mask)
    assert layout.n_image_tokens.tolist() == [2, 3]
    start, end = layout.image_extent()
    assert start.tolist() == [3, 1] and end.tolist() == [5, 4]
    assert layout.first_real_position().tolist() == [2, 0]
    ext = layout.extend(2)
    assert ext.seq_len == 8 and ext.image_mask[:, 6:].sum() == 0 and ext.attention_mask[:, 6:].all()
    assert layout.select([1]).n_image_tokens.tolist() == [3]
    assert "[1, 4)" in layout.describe()


def test_layout_errors_name_the_problem():
    with pytest.raises(NoImageTokensError, match=r"row\(s\) \[1\]"):
        TokenLayout.from_input_ids(torch.tensor([[9, 1], [1, 1]]), 9)
    with pytest.raises(LayoutError, match="shape"):
        TokenLayout.from_input_ids(torch.tensor([[9, 1]]), 9, torch.ones(1, 3))
    with pytest.raises(LayoutError):
        TokenLayout.from_spans([(3, 9)], seq_len=5)
    assert TokenLayout.from_spans([(1, 3)], 6).image_mask.tolist() == [IMAGE]


# ---------------------------------------------------------------------------- sinks
def test_sink_scores_hand_computed_causal_and_official():
    probs, layout = example()
    causal = sink_scores(probs, layout, "causal")[0]
    # column 1 (rows 2..5): .6+.5+.4+.3 = 1.8 over 4 later rows; column 2 (rows 3..5): .3+.1+.1 = .5 over 3
    assert causal[0, 1].item() == pytest.approx(1.8 / 4)
    assert causal[0, 2].item() == pytest.approx(0.5 / 3)
    assert causal[1, 1].item() == pytest.approx(0.4 / 4)
    assert causal[:, [0, 3, 4, 5]].abs().sum() == 0
    official = sink_scores(probs, layout, "official")[0]
    # image extent [s, e) = [1, 3): keys s + 1 .. e - 1 scored with d(j) = (s + 1) + e - j = 5 - j; key s never
    assert official[:, 1].abs().sum() == 0
    assert official[0, 2].item() == pytest.approx(0.5 / 3)


def test_rows_normaliser_counts_earlier_rows_too():
    """Bidirectional image attention (Gemma 3): row 1 attends to image key 2 *before* it."""
    probs, layout = example()
    probs[0, 0, 1, 2] = 0.25  # an earlier row now attends to key 2 (rows no longer sum to 1: irrelevant here)
    rows = sink_scores(probs, layout, "rows")[0]
    # column 2: rows 1, 3, 4, 5 (not 2 itself): .25 + .3 + .1 + .1 = .75 over the 5 other real rows
    assert rows[0, 2].item() == pytest.approx(0.75 / 5)
    # column 1: rows 0, 2..5: 0 + .6 + .5 + .4 + .3 over 5
    assert rows[0, 1].item() == pytest.approx(1.8 / 5)
    padded_probs, padded = example(pad=2)
    padded_probs[0, 0, 3, 4] = 0.25
    assert torch.allclose(sink_scores(padded_probs, padded, "rows")[0][:, 2:], rows)  # padding rows never count


def test_official_denominator_matches_llava_647_minus_j():
    from eah_interp import sink_denominator

    # LLaVA-1.5's image span [35, 611): the official window [36, 611) with d(j) = 647 - j; key 35 unscored.
    layout = TokenLayout.from_spans([(35, 611)], seq_len=640)
    d = sink_denominator(layout, 640, "official")[0]
    assert d[36].item() == 611 and d[100].item() == 547 and d[610].item() == 37 and d[35].item() == 0
    causal = sink_denominator(layout, 640, "causal")[0]
    assert causal[100].item() == 640 - 1 - 100


def test_sinks_density_and_padding_invariance():
    probs, layout = example()
    sinks = detect_sinks(probs, layout, threshold=0.3)
    assert sinks[0, 0].nonzero().flatten().tolist() == [1]
    assert not sinks[0, 1].any()
    assert sink_density(probs, layout, threshold=0.15)[0].tolist() == [1.0, 0.0]  # B: .1, .133
    padded, playout = example(pad=3)
    for norm in ("causal", "official"):
        assert torch.allclose(sink_scores(padded, playout, norm)[..., 3:], sink_scores(probs, layout, norm))


def test_decode_step_scores_use_the_last_query_row():
    probs, layout = example()
    last = probs[:, :, -1:, :]
    scores = sink_scores(last, layout, "causal")
    assert scores[0, 0, 1].item() == pytest.approx(0.3)  # one later row sees column 1


def test_select_source_heads_ties_and_no_sinks():
    counts = torch.tensor([[1, 3, 3, 0], [0, 0, 0, 0], [2, 2, 1, 2]])
    assert select_source_heads(counts).flatten().tolist() == [1, -1, 0]
    assert select_source_heads(counts, top_k=3).tolist() == [[1, 2, 0], [-1, -1, -1], [0, 1, 3]]
    with pytest.raises(ConfigError):
        select_source_heads(counts, top_k=9)


# ---------------------------------------------------------------------------- broadcast
def test_broadcast_full_copies_the_source_map_and_image_region_keeps_mass():
    probs, layout = example()
    out = broadcast_heads(probs, torch.tensor([0]))
    assert torch.equal(out[0, 1], HEAD_A) and torch.equal(out[0, 0], HEAD_A)
    img = broadcast_heads(probs, 0, region="image", layout=layout)
    # head B row 5: image mass .2 redistributed like head A's (.3, .1) -> (.15, .05); text columns kept
    assert img[0, 1, 5].tolist() == pytest.approx([0.4, 0.15, 0.05, 0.1, 0.1, 0.2])
    assert torch.allclose(img.sum(-1), probs.sum(-1))
    blend = broadcast_heads(probs, 0, alpha=0.25)
    assert torch.allclose(blend[0, 1], 0.75 * HEAD_B + 0.25 * HEAD_A)
    only = broadcast_heads(probs, 1, target_heads=[0])
    assert torch.equal(only[0, 0], HEAD_B) and torch.equal(only[0, 1], HEAD_B)
    unchanged = broadcast_heads(probs, torch.tensor([-1]))
    assert torch.equal(unchanged, probs)
    with pytest.raises(HeadIndexError):
        broadcast_heads(probs, 5)


def test_drop_columns_renormalises_rows():
    maps = HEAD_A[None]
    out = drop_columns(maps, torch.tensor([IMAGE[:1] + [True] + [False] * 4]))
    assert out[0, 5].tolist() == pytest.approx([x / 0.7 for x in [0.1, 0, 0.1, 0.1, 0.2, 0.2]])
    assert torch.equal(out[0, 1], maps[0, 1] * 0 + torch.tensor([1.0, 0, 0, 0, 0, 0]))


# ---------------------------------------------------------------------------- config
def test_config_presets_roundtrip_and_validation():
    paper, ref = EAH.paper(), EAH.reference()
    assert paper.layers == (1,) and paper.normalise == "causal" and not paper.skip_if_head0
    assert ref.layers == (15,) and ref.normalise == "official" and ref.skip_if_head0 and ref.threshold == 0.0008
    for cfg in (paper, ref, EAH(layers=[2, 3], region="image", alpha=0.5, target_heads=[1])):
        assert EAH.from_json(cfg.to_json()) == cfg
        json.loads(cfg.to_json())
    assert "layer(s) [15]" in ref.describe()
    for bad in (
        dict(layers=()),
        dict(layers=(1, 1)),
        dict(threshold=-1),
        dict(normalise="mean"),
        dict(alpha=0),
        dict(source="best"),
        dict(source_top_k=2, source=3),
        dict(skip_if_head0=True, source=1),
        dict(target_heads=()),
    ):
        with pytest.raises(ConfigError):
            EAH(**bad)
    with pytest.raises(LayerIndexError, match="15"):
        EAH.reference().validate_for(n_layers=4, n_heads=4)
    with pytest.raises(HeadIndexError):
        EAH(source=7).validate_for(n_layers=4, n_heads=4)


# ---------------------------------------------------------------------------- edit
def test_apply_eah_picks_the_densest_head_and_records_it():
    probs, layout = example()
    probs = probs[:, [1, 0]]  # head 1 is now the sink head
    edited, record = apply_eah_to_probs(probs, layout, EAH(layers=(0,), threshold=0.3), layer=0)
    assert record.source_head.tolist() == [1] and record.sink_counts.tolist() == [[0, 1]]
    assert torch.equal(edited[0, 0], HEAD_A) and torch.equal(edited[0, 1], HEAD_A)
    # no head above the threshold: nothing changes
    edited, record = apply_eah_to_probs(probs, layout, EAH(layers=(0,), threshold=0.9), layer=0)
    assert record.source_head.tolist() == [-1] and torch.equal(edited, probs)


def test_reference_quirk_skips_head0_only_when_asked():
    probs, layout = example()  # head 0 is the sink head
    cfg = EAH.reference(layers=(0,), threshold=0.3)
    edited, record = apply_eah_to_probs(probs, layout, cfg, layer=0)
    assert record.source_head.tolist() == [-1] and torch.equal(edited, probs)
    edited, record = apply_eah_to_probs(probs, layout, EAH(layers=(0,), threshold=0.3), layer=0)
    assert record.source_head.tolist() == [0] and torch.equal(edited[0, 1], HEAD_A)


def test_controls_fewest_random_and_sink_free():
    probs, layout = example()
    _, rec = apply_eah_to_probs(probs, layout, EAH(layers=(0,), threshold=0.3, source="fewest"), layer=0)
    assert rec.source_head.tolist() == [1]
    _, rec1 = apply_eah_to_probs(probs, layout, EAH(layers=(0,), source="random", seed=3), layer=0)
    _, rec2 = apply_eah_to_probs(probs, layout, EAH(layers=(0,), source="random", seed=3), layer=0)
    assert rec1.source_head.tolist() == rec2.source_head.tolist()
    edited, _ = apply_eah_to_probs(probs, layout, EAH(layers=(0,), threshold=0.3, drop_sinks=True), layer=0)
    expected_row5 = [x / 0.7 for x in [0.1, 0, 0.1, 0.1, 0.2, 0.2]]
    assert edited[0, 1, 5].tolist() == pytest.approx(expected_row5)


# ---------------------------------------------------------------------------- statistics
def test_head_statistics_hand_computed():
    probs, layout = example()
    stats = head_statistics(probs, layout, threshold=0.3)
    assert stats["sink_count"][0].tolist() == [1, 0]
    assert stats["sink_density"][0].tolist() == [0.5, 0.0]
    # text rows after the first image token: rows 3, 4, 5; image mass of head A: .8, .5, .4
    assert stats["image_mass_text"][0, 0].item() == pytest.approx((0.8 + 0.5 + 0.4) / 3)
    ent = [-(r[r > 0] * r[r > 0].log()).sum().item() for r in HEAD_A]
    assert stats["entropy"][0, 0].item() == pytest.approx(sum(ent) / 6, rel=1e-5)


def test_headstats_streams_mean_and_std():
    probs, layout = example()
    stats = HeadStats(threshold=0.3)
    stats.update(0, probs, layout)
    stats.update(0, probs[:, [1, 0]], layout)
    frame = stats.to_frame()
    head0 = frame[(frame["layer"] == 0) & (frame["head"] == 0)].iloc[0]
    assert head0.n == 2 and head0.sink_count_mean == 0.5
    assert head0.sink_count_std == pytest.approx(torch.tensor([1.0, 0.0]).std().item())
    single = HeadStats(threshold=0.3)
    single.update(3, probs, layout)  # head 0's best sink score .45, head 1's .133
    assert single.rank(by="max_sink_score")["head"].tolist() == [0, 1]
    assert single.rank(by="max_sink_score", ascending=True)["head"].tolist() == [1, 0]
    fig = stats.plot_heatmap("sink_density")
    assert fig.axes
