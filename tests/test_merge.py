"""`HeadStats.merge` / `merge_all`: merging the accumulators of any split of a stream equals streaming it whole.

The reference is independent of the code under test: numpy's ``nanmean`` / ``nanstd(ddof=1)`` of all
the values at once, and the plain sequential Welford stream (`update_from_stats` over every row in order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eah_interp.errors import ConfigError, LayoutError
from eah_interp.head_stats import STATISTICS, HeadStats

REL = 1e-6


def _close(a: float, b: float, scale: float) -> bool:
    """Equal within 1e-6 relative (NaN == NaN); ``scale`` bounds the cancellation error of a near-zero value."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL * max(abs(a), abs(b)) + 1e-12 * scale


def _rows(seed: int, n_rows: int, n_heads: int, nan_rate: float, spread: float, offset: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = offset + spread * rng.standard_normal((n_rows, n_heads))
    values[rng.random((n_rows, n_heads)) < nan_rate] = np.nan  # rows without text queries: skipped per head
    return values


def _feed(stats: HeadStats, layer: int, values: np.ndarray) -> None:
    if len(values):
        tensor = torch.from_numpy(values)
        stats.update_from_stats(layer, {name: tensor * (i + 1) for i, name in enumerate(STATISTICS)})


def _assert_matches_numpy(stats: HeadStats, layer: int, values: np.ndarray) -> None:
    frame = stats.to_frame()
    frame = frame[frame.layer == layer].reset_index(drop=True)
    for head in range(values.shape[1]):
        column = values[:, head]
        finite = column[~np.isnan(column)]
        scale = float(np.max(np.abs(finite), initial=1.0))
        for i, name in enumerate(STATISTICS):
            # sink_count is fed the plain values; n counts the non-NaN ones of every statistic alike
            assert int(stats._acc[layer][name].n[head]) == len(finite)
            mean = float(np.mean(finite * (i + 1))) if len(finite) else math.nan
            std = float(np.std(finite * (i + 1), ddof=1)) if len(finite) > 1 else math.nan
            assert _close(frame.loc[head, f"{name}_mean"], mean, scale * (i + 1)), (name, head)
            assert _close(frame.loc[head, f"{name}_std"], std, scale * (i + 1)), (name, head)
        assert frame.loc[head, "n"] == len(finite)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_rows=st.integers(1, 40),
    n_heads=st.integers(1, 5),
    n_cuts=st.integers(0, 6),
    nan_rate=st.sampled_from([0.0, 0.2, 0.9]),
    spread=st.sampled_from([1e-3, 1.0, 1e3]),
    offset=st.sampled_from([0.0, 5.0, 1e4]),
    data=st.data(),
)
def test_merging_any_split_equals_streaming_whole(seed, n_rows, n_heads, n_cuts, nan_rate, spread, offset, data):
    values = _rows(seed, n_rows, n_heads, nan_rate, spread, offset)
    cuts = sorted(data.draw(st.lists(st.integers(0, n_rows), min_size=n_cuts, max_size=n_cuts)))
    bounds = [0, *cuts, n_rows]
    parts = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]  # may be empty

    whole = HeadStats(threshold=0.01)
    _feed(whole, 0, values)
    shards = []
    for part in parts:
        shard = HeadStats(threshold=0.01)
        _feed(shard, 0, part)
        shards.append(shard)
    merged = HeadStats.merge_all(shards)

    _assert_matches_numpy(merged, 0, values)
    _assert_matches_numpy(whole, 0, values)
    a, b = merged.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".n"):
            assert torch.equal(a[key], b[key]), key  # counts exactly
    fa, fb = merged.to_frame(), whole.to_frame()
    scale = float(np.nanmax(np.abs(values), initial=1.0)) * len(STATISTICS)
    for col in fa.columns:
        for x, y in zip(fa[col], fb[col], strict=True):
            assert _close(float(x), float(y), scale), col


def test_merge_of_a_hand_computed_example():
    """Values 1, 2 | 3, 4, 5 of one head: n 5, mean 3, sample variance 2.5 (m2 = 4 + 1 + 0 + 1 + 4 = 10)."""
    left, right = HeadStats(), HeadStats()
    _feed(left, 2, np.array([[1.0], [2.0]]))
    _feed(right, 2, np.array([[3.0], [4.0], [5.0]]))
    merged = left.merge(right)
    acc = merged._acc[2]["sink_count"]
    assert acc.n.tolist() == [5.0] and acc.mean.tolist() == [3.0] and acc.m2.tolist() == [10.0]
    row = merged.to_frame().iloc[0]
    assert row["n"] == 5 and row["sink_count_mean"] == 3.0 and row["sink_count_std"] == pytest.approx(math.sqrt(2.5))
    # the inputs are untouched
    assert left._acc[2]["sink_count"].n.tolist() == [2.0] and right._acc[2]["sink_count"].mean.tolist() == [4.0]


def test_layers_on_one_side_only_are_copied_and_order_does_not_matter():
    a, b = HeadStats(), HeadStats()
    _feed(a, 0, _rows(0, 4, 3, 0.0, 1.0, 0.0))
    _feed(a, 3, _rows(1, 2, 3, 0.0, 1.0, 0.0))
    _feed(b, 0, _rows(2, 5, 3, 0.0, 1.0, 0.0))
    _feed(b, 1, _rows(3, 3, 2, 0.0, 1.0, 0.0))  # another layer may have another head count
    ab, ba = a.merge(b), b.merge(a)
    assert ab.layers == ba.layers == [0, 1, 3]
    assert ab.n_examples(0) == 9 and ab.n_examples(1) == 3 and ab.n_examples(3) == 2
    for key, value in ab.state_dict().items():
        assert torch.allclose(value, ba.state_dict()[key], rtol=1e-12, atol=1e-12), key
    assert torch.equal(ab.state_dict()["3.entropy.mean"], a.state_dict()["3.entropy.mean"])
    ab._acc[3]["entropy"].mean += 1  # a copy, not a view of the input
    assert not torch.equal(ab.state_dict()["3.entropy.mean"], a.state_dict()["3.entropy.mean"])


def test_merge_refuses_statistics_of_another_scan():
    base = HeadStats(threshold=0.01, normalise="causal", model="organism")
    _feed(base, 0, _rows(0, 3, 4, 0.0, 1.0, 0.0))
    for other, words in [
        (HeadStats(threshold=0.02, normalise="causal", model="organism"), "threshold 0.01 vs 0.02"),
        (HeadStats(threshold=0.01, normalise="official", model="organism"), "normalise 'causal' vs 'official'"),
        (HeadStats(threshold=0.01, normalise="causal", model="tiny-llava"), "model 'organism' vs 'tiny-llava'"),
    ]:
        with pytest.raises(ConfigError, match="different scans") as err:
            base.merge(other)
        assert words in str(err.value)
    heads = HeadStats(threshold=0.01, model="organism")
    _feed(heads, 0, _rows(0, 3, 5, 0.0, 1.0, 0.0))
    with pytest.raises(LayoutError, match="layer 0 has 4 heads on one side and 5"):
        base.merge(heads)
    with pytest.raises(ConfigError, match="empty list"):
        HeadStats.merge_all([])
    # an unnamed accumulator merges with a named one and the result keeps the name
    unnamed = HeadStats(threshold=0.01)
    _feed(unnamed, 0, _rows(1, 2, 4, 0.0, 1.0, 0.0))
    assert unnamed.merge(base).model == "organism"


def test_the_model_name_survives_save_and_load(tmp_path):
    stats = HeadStats(threshold=0.25, model="organism")
    _feed(stats, 1, _rows(0, 3, 2, 0.0, 1.0, 0.0))
    loaded = HeadStats.load(stats.save(tmp_path / "s.safetensors"))
    assert loaded.model == "organism" and "model='organism'" in repr(loaded)
    assert HeadStats.load(HeadStats().save(tmp_path / "t.safetensors")).model is None


def _overlap_rows(seed: int, n_rows: int) -> dict[str, torch.Tensor]:
    """Per-row sink-overlap values as `sink_overlap` returns them (counts, NaN where undefined)."""
    rng = np.random.default_rng(seed)
    eah, mas = rng.integers(0, 6, n_rows).astype(float), rng.integers(0, 6, n_rows).astype(float)
    both = np.minimum(eah, mas) * rng.random(n_rows) // 1
    either = eah + mas - both
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(either > 0, both / either, np.nan)
        share = np.where(eah > 0, both / eah, np.nan)
    return {k: torch.from_numpy(v) for k, v in dict(
        eah_sinks=eah, massive_sinks=mas, both=both, jaccard=jac, eah_in_massive=share).items()}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_rows=st.integers(1, 25), n_heads=st.integers(1, 4),
       n_cuts=st.integers(0, 4), named=st.booleans(), data=st.data())
def test_merging_keeps_examples_and_sink_overlap_exactly(seed, n_rows, n_heads, n_cuts, named, data):
    """Per-example values and the per-layer overlap statistics of any split merge into the whole stream's:
    examples bit for bit and in stream order, overlap means/stds as numpy's nanmean/nanstd."""
    values = _rows(seed, n_rows, n_heads, 0.2, 1.0, 0.0)
    overlap = _overlap_rows(seed, n_rows)
    ids = [f"img{i}" for i in range(n_rows)] if named else None
    cuts = sorted(data.draw(st.lists(st.integers(0, n_rows), min_size=n_cuts, max_size=n_cuts)))
    bounds = [0, *cuts, n_rows]

    def feed(stats: HeadStats, a: int, b: int) -> HeadStats:
        if b > a:
            tensor = torch.from_numpy(values[a:b])
            stats.update_from_stats(5, {name: tensor + i for i, name in enumerate(STATISTICS)},
                                    overlap={k: v[a:b] for k, v in overlap.items()},
                                    ids=None if ids is None else ids[a:b])
        return stats

    options = dict(threshold=0.01, keep_examples=True, sink_dims=(3, 7))
    whole = feed(HeadStats(**options), 0, n_rows)
    merged = HeadStats.merge_all([feed(HeadStats(**options), a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    heads = merged.examples_frame()
    assert heads.equals(whole.examples_frame())
    assert list(heads[heads["head"] == 0].example) == (ids or [str(i) for i in range(n_rows)])
    for head in range(n_heads):  # the kept values are the fed ones, bit for bit
        fed = values[:, head] + STATISTICS.index("entropy")
        np.testing.assert_array_equal(heads[heads["head"] == head].entropy.to_numpy(), fed)
    layer = merged.layer_frame().iloc[0]
    for name, column in overlap.items():
        finite = column.numpy()[~np.isnan(column.numpy())]
        assert int(merged._overlap[5][name].n[0]) == len(finite)
        assert _close(layer[f"{name}_mean"], float(np.mean(finite)) if len(finite) else math.nan, 10)
        assert _close(layer[f"{name}_std"], float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan, 10)
    pooled = overlap["both"].sum() / (overlap["eah_sinks"] + overlap["massive_sinks"] - overlap["both"]).sum()
    assert _close(layer["pooled_jaccard"], float(pooled) if not math.isnan(float(pooled)) else math.nan, 1)
    np.testing.assert_array_equal(merged.examples_frame("layer").jaccard.to_numpy(), overlap["jaccard"].numpy())


def test_merge_refuses_examples_counted_twice_and_mixed_options():
    a, b = HeadStats(keep_examples=True), HeadStats(keep_examples=True)
    stats = {name: torch.zeros(2, 3, dtype=torch.float64) for name in STATISTICS}
    a.update_from_stats(0, stats, ids=["x", "y"])
    b.update_from_stats(0, stats, ids=["y", "z"])
    with pytest.raises(ConfigError, match=r"examples \['y'\] were counted on both sides"):
        a.merge(b)
    for other, words in [(HeadStats(), "keep_examples True vs False"),
                         (HeadStats(keep_examples=True, sink_dims=(1,)), "sink_dims () vs (1,)")]:
        with pytest.raises(ConfigError, match="different scans") as err:
            a.merge(other)
        assert words in str(err.value)
