"""`stats.group_attention`: attention mass from one position group to another, against a loop."""

from __future__ import annotations

import math

import pytest
import torch

from eah_interp.errors import LayoutError
from eah_interp.head_stats import group_attention
from eah_interp.layout import TokenLayout

# row 0: [pad, sys, IMG, IMG, q, q, last]; row 1: [sys, sys, IMG, IMG, IMG, q, last]
LAYOUT = TokenLayout(
    torch.tensor([[0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0]]).bool(), torch.tensor([[0] + [1] * 6, [1] * 7]).bool()
)


def causal_probs(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 7, 7, generator=g).masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    return scores.softmax(-1)


def test_question_to_image_equals_a_loop():
    probs = causal_probs()
    got = group_attention(probs, LAYOUT)  # question -> image
    for b, (question, image) in enumerate((([4, 5], [2, 3]), ([5], [2, 3, 4]))):
        for h in range(3):
            want = sum(float(probs[b, h, q, image].sum()) for q in question) / len(question)
            assert float(got[b, h]) == pytest.approx(want, abs=1e-6)


def test_user_masks_and_an_empty_group():
    probs = causal_probs(1)
    rows = torch.tensor([[0, 0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0, 1]]).bool()
    keys = torch.tensor([[0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1, 0]]).bool()
    got = group_attention(probs, LAYOUT, rows, keys)
    assert float(got[0, 1]) == pytest.approx(float(probs[0, 1, 6, [1, 4]].sum()), abs=1e-6)
    assert float(got[1, 2]) == pytest.approx(float(probs[1, 2, 1, 0] + probs[1, 2, 6, [0, 5]].sum()) / 2, abs=1e-6)
    generated = group_attention(probs, LAYOUT, "generated", "image")  # nothing generated: NaN, not 0
    assert all(math.isnan(float(v)) for v in generated.flatten())
    with pytest.raises(LayoutError, match="does not fit"):
        group_attention(probs[:, :, :, :6], LAYOUT)
