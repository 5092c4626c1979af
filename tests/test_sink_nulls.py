"""Sink null-model diagnostics (`eah_interp.sinks`): nulls, density curves, the explained-by-null flag.

References are independent of the code under test: null patterns written out as explicit attention
maps with loops (fed to `sink_scores`), and hand-computed values on small layouts.
"""

from __future__ import annotations

import math

import pytest
import torch

from eah_interp.errors import ConfigError
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    density_curve,
    explained_by_null,
    null_densities,
    null_scores,
    plot_density_curve,
    sink_density,
    sink_scores,
)


def _loop_pattern(layout: TokenLayout, kind: str, q_len: int) -> torch.Tensor:
    """The null pattern as an explicit ``[batch, 1, q, k]`` map, one entry at a time."""
    b, k = layout.batch_size, layout.seq_len
    attn = torch.zeros(b, 1, q_len, k)
    for row in range(b):
        real = [j for j in range(k) if layout.attention_mask[row, j]]
        for qi in range(q_len):
            i = k - q_len + qi
            if i not in real:
                continue
            seen = [j for j in real if j <= i]
            if kind == "uniform":
                for j in seen:
                    attn[row, 0, qi, j] = 1.0 / len(seen)
            else:
                attn[row, 0, qi, seen[-2] if len(seen) > 1 else i] = 1.0
    return attn


def test_hand_computed_nulls_under_each_normaliser():
    # 8 positions, image tokens 1, 2, 3; every row a query row
    layout = TokenLayout.from_spans([(1, 4)], 8)
    prev = {n: null_scores(layout, normalise=n)["previous"][0, 1:4].tolist() for n in ("causal", "official", "rows")}
    # column j gets row j+1's whole attention; d(j): causal 7 - j, official (1 + 1) + 4 - j from key 2 on, rows 7
    assert prev["causal"] == pytest.approx([1 / 6, 1 / 5, 1 / 4])
    assert prev["official"] == pytest.approx([0, 1 / 4, 1 / 3])
    assert prev["rows"] == pytest.approx([1 / 7] * 3)
    # uniform: row i gives 1/(i+1) to each key; column j sums it over i > j
    uniform = null_scores(layout, normalise="causal")["uniform"][0]
    for j in (1, 2, 3):
        assert float(uniform[j]) == pytest.approx(sum(1 / (i + 1) for i in range(j + 1, 8)) / (7 - j))
    assert uniform[0] == 0 and uniform[4:].abs().sum() == 0  # non-image keys score 0
    # densities: previous scores 1/6, 1/5, 1/4; strictly above 0.2 is only 1/4
    dens = null_densities(layout, 0.2)
    assert dens["previous"].tolist() == pytest.approx([1 / 3])
    assert null_densities(layout, (0.1, 0.2, 0.3))["previous"][:, 0].tolist() == pytest.approx([1.0, 1 / 3, 0.0])


def test_hand_computed_nulls_with_left_padding():
    # row 0 is one padding token, then 7 real ones; image tokens at 2, 3, 4
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    layout = TokenLayout.from_spans([(2, 5)], 8, attention_mask=mask)
    scores = null_scores(layout)
    # real query rows after j: 7 - j; previous gives each column 1
    assert scores["previous"][0, 2:5].tolist() == pytest.approx([1 / 5, 1 / 4, 1 / 3])
    # row i sees i real keys (positions 1..i)
    expected = [sum(1 / i for i in range(j + 1, 8)) / (7 - j) for j in (2, 3, 4)]
    assert scores["uniform"][0, 2:5].tolist() == pytest.approx(expected)
    assert math.isclose(expected[0], (1 / 3 + 1 / 4 + 1 / 5 + 1 / 6 + 1 / 7) / 5)


@pytest.mark.parametrize("normalise", ["causal", "official", "rows"])
def test_nulls_equal_the_explicit_patterns(normalise):
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        b, k = 3, int(torch.randint(8, 20, (1,), generator=g))
        pad = torch.randint(0, 3, (b,), generator=g)
        mask = torch.ones(b, k, dtype=torch.long)
        spans = []
        for row in range(b):
            mask[row, : int(pad[row])] = 0
            start = int(pad[row]) + 1
            spans.append((start, start + int(torch.randint(2, k - start - 2, (1,), generator=g))))
        layout = TokenLayout.from_spans(spans, k, attention_mask=mask)
        for q_len in (k, k - 2):
            nulls = null_scores(layout, q_len if q_len < k else None, normalise)
            for kind in ("uniform", "previous"):
                reference = sink_scores(_loop_pattern(layout, kind, q_len), layout, normalise)[:, 0]
                torch.testing.assert_close(nulls[kind], reference, atol=1e-6, rtol=1e-5)


def test_density_curve_counts_scores_above_each_threshold():
    layout = TokenLayout.from_spans([(1, 5)], 9)
    attn = torch.softmax(torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1)), -1)
    attn = attn * torch.tril(torch.ones(9, 9))
    attn = attn / attn.sum(-1, keepdim=True)
    thresholds = (0.0, 0.05, 0.1, 0.3)
    curve = density_curve(attn, layout, thresholds)
    assert curve.shape == (4, 1, 3)
    scores = sink_scores(attn, layout)
    for t_index, t in enumerate(thresholds):
        for head in range(3):
            above = sum(1 for j in range(1, 5) if float(scores[0, head, j]) > t)
            assert float(curve[t_index, 0, head]) == pytest.approx(above / 4)
        torch.testing.assert_close(curve[t_index], sink_density(attn, layout, t))


def _organism_like(layout_len: int = 80, image: tuple[int, int] = (6, 50)):
    """A previous-token head (0.86 on the previous token, the rest uniform) and a sink head (two image
    tokens and BOS take all attention) on one layout, as explicit maps."""
    k = layout_len
    layout = TokenLayout.from_spans([image], k)
    prev, sink = torch.zeros(1, 1, k, k), torch.zeros(1, 1, k, k)
    a, b = image[0] + 3, image[0] + 20
    for i in range(k):
        prev[0, 0, i, : i + 1] = 0.14 / (i + 1)
        prev[0, 0, i, max(i - 1, 0)] += 0.86
        sink[0, 0, i, 0] = 1.0
        if i > b:
            sink[0, 0, i, 0], sink[0, 0, i, a], sink[0, 0, i, b] = 0.4, 0.3, 0.3
    return layout, torch.cat([prev, sink], 1)


def test_a_previous_token_head_is_flagged_and_a_sink_head_is_not():
    layout, attn = _organism_like()
    threshold = 0.01  # the organism's case: the previous-token null is dense under the causal normaliser
    nulls = null_densities(layout, threshold)
    assert float(nulls["previous"][0]) == 1.0  # 1/d(j) >= 1/(80 - 1 - 6) > 0.01 for every image token
    density = sink_density(attn, layout, threshold)
    assert float(density[0, 0]) == 1.0 and float(density[0, 1]) == pytest.approx(2 / 44)
    flags = explained_by_null(density, nulls["previous"][:, None])
    assert flags.tolist() == [[True, False]]
    # a threshold above every previous-token score: the null explains nothing, nothing is flagged
    high = null_densities(layout, 0.5)
    assert float(high["previous"][0]) == 0.0
    assert not explained_by_null(sink_density(attn, layout, 0.5), high["previous"][:, None]).any()


def test_explained_by_null_hand_cases_and_errors():
    density = torch.tensor([0.0, 0.5, 0.89, 0.9, 1.0])
    assert explained_by_null(density, torch.tensor(1.0)).tolist() == [False, False, False, True, True]
    assert explained_by_null(density, torch.tensor(0.0)).tolist() == [False] * 5
    assert explained_by_null(density, torch.tensor(0.5), tolerance=0.0).tolist() == [False, True, True, True, True]
    with pytest.raises(ConfigError, match="tolerance"):
        explained_by_null(density, torch.tensor(1.0), tolerance=1.0)
    with pytest.raises(ConfigError, match="Unknown null pattern"):
        from eah_interp.sinks import null_column_sums

        null_column_sums(TokenLayout.from_spans([(1, 3)], 5), "diagonal")
    with pytest.raises(ConfigError, match="thresholds"):
        null_densities(TokenLayout.from_spans([(1, 3)], 5), (-0.1,))


def test_plot_density_curve(tmp_path):
    layout, attn = _organism_like()
    thresholds = (1e-3, 1e-2, 1e-1)
    nulls = {k: v.mean(-1) for k, v in null_densities(layout, thresholds).items()}
    fig = plot_density_curve(thresholds, density_curve(attn, layout, thresholds).mean(1), nulls, threshold=0.01)
    fig.savefig(tmp_path / "curve.png")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == ["head 0", "head 1", "uniform null", "previous-token null", "threshold 0.01"]


# ---------------------------------------------------------------------------- how local a head is
def _hand_pattern() -> tuple[TokenLayout, torch.Tensor]:
    """Two rows (the second left-padded by 2), 8 positions, image tokens at real positions 2-5 of row 0 and 3-5
    of row 1; head 0 is 70% previous-token, head 1 spreads its rows evenly over what they see."""
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    layout = TokenLayout.from_spans([(2, 6), (3, 6)], seq_len=8, attention_mask=mask)
    attn = torch.zeros(2, 2, 8, 8)
    for row in range(2):
        real = [j for j in range(8) if mask[row, j]]
        for n, i in enumerate(real):
            if n == 0:
                attn[row, :, i, i] = 1.0
                continue
            attn[row, 0, i, real[n - 1]] = 0.7  # the previous real token
            attn[row, 0, i, i] += 0.3
            for j in real[: n + 1]:
                attn[row, 1, i, j] = 1.0 / (n + 1)
    return layout, attn


def test_previous_token_share_equals_a_hand_count():
    from eah_interp.sinks import previous_token_share

    layout, attn = _hand_pattern()
    # head 1, row 0: image rows 2..5 see 3..6 keys, each gives its previous token 1/3, 1/4, 1/5, 1/6
    # head 1, row 1: image rows 3, 4, 5 are the 2nd, 3rd, 4th real tokens (previous: 2 is padding, skipped)
    expected = torch.tensor([[0.7, (1 / 3 + 1 / 4 + 1 / 5 + 1 / 6) / 4], [0.7, (1 / 2 + 1 / 3 + 1 / 4) / 3]])
    assert torch.allclose(previous_token_share(attn, layout), expected, atol=1e-6)
    # question rows (after the image, the last excluded): positions 6 of both rows
    expected_q = torch.tensor([[0.7, 1 / 7], [0.7, 1 / 5]])
    assert torch.allclose(previous_token_share(attn, layout, "question"), expected_q, atol=1e-6)
    # a decode-shaped slice (the last 3 query rows) gives the same share for the rows it holds
    tail = previous_token_share(attn[:, :, -3:], layout, "image")
    assert torch.allclose(tail, torch.tensor([[0.7, 1 / 6], [0.7, 1 / 4]]), atol=1e-6)


def test_null_pattern_distance_tells_a_local_head_from_a_broad_one():
    from eah_interp.sinks import null_pattern_distance

    layout, attn = _hand_pattern()
    prev = null_pattern_distance(attn, layout, "previous")
    uni = null_pattern_distance(attn, layout, "uniform")
    assert torch.allclose(prev[:, 0], torch.tensor([0.3, 0.3]), atol=1e-6)  # 1 - 0.7
    assert torch.allclose(uni[:, 1], torch.zeros(2), atol=1e-6)  # head 1 is the uniform null itself
    # head 0 against uniform, by hand: row with r keys seen gives 0.5*(|0.7-1/r| + |0.3-1/r| + (r-2)/r)
    def tv(r):
        return 0.5 * (abs(0.7 - 1 / r) + abs(0.3 - 1 / r) + (r - 2) / r)
    assert uni[0, 0].item() == pytest.approx(sum(tv(r) for r in (3, 4, 5, 6)) / 4, abs=1e-6)
    assert uni[1, 0].item() == pytest.approx(sum(tv(r) for r in (2, 3, 4)) / 3, abs=1e-6)
    with pytest.raises(ConfigError, match="choose from"):
        null_pattern_distance(attn, layout, "diagonal")


def test_curve_distance_is_the_mean_gap_over_thresholds():
    from eah_interp.sinks import curve_distance

    curve = torch.tensor([[1.0, 1.0], [0.5, 1.0], [0.0, 0.25]])  # [T=3, heads=2]
    null = torch.tensor([[1.0], [1.0], [0.0]])
    assert torch.allclose(curve_distance(curve, null), torch.tensor([0.5 / 3, 0.25 / 3]))
