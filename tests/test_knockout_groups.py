"""Knockout between named groups and user masks: the edit against hand-picked entries, JSON, errors, a model."""

from __future__ import annotations

import pytest
import torch

from eah_interp import hf
from eah_interp.errors import LayoutError
from eah_interp.interventions import Intervention, Knockout
from eah_interp.interventions.selectors import Site
from eah_interp.layout import TokenLayout
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs

MIN = torch.finfo(torch.float32).min
# row 0: [pad, sys, IMG, IMG, q, last]; row 1: [sys, IMG, IMG, q, q, last]
LAYOUT = TokenLayout(
    torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]).bool(), torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]).bool()
)
KEYS = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0]]).bool()  # row 0: {1, 4}; row 1: {0, 3}


def causal_scores(batch: int, q: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random post-mask scores [batch, 2 heads, q, k]: future keys hold the dtype minimum (query i at k - q + i)."""
    scores = torch.randn(batch, 2, q, k, generator=torch.Generator().manual_seed(seed))
    future = torch.arange(k)[None, :] > (k - q + torch.arange(q))[:, None]
    return scores.masked_fill(future, MIN)


def blocked(scores: torch.Tensor, picks: list[tuple[int, int, int]]) -> torch.Tensor:
    """``scores`` with the hand-picked (batch row, query row, key) entries set to the minimum, every head."""
    want = scores.clone()
    for b, q, k in picks:
        want[b, :, q, k] = MIN
    return want


def test_last_row_knocked_out_of_a_user_mask_of_keys():
    site = Site(layer=0, layout=LAYOUT, q_len=6, k_len=6, prompt_len=6)
    scores = causal_scores(2, 6, 6)
    out, changed = Knockout(queries="last", keys=KEYS).edit(scores, site)
    assert torch.equal(out, blocked(scores, [(0, 5, 1), (0, 5, 4), (1, 5, 0), (1, 5, 3)]))
    assert changed == 4 * 2  # two heads


def test_masked_query_rows_knocked_out_of_the_image():
    queries = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 1, 1, 0]]).bool()
    site = Site(layer=0, layout=LAYOUT, q_len=6, k_len=6, prompt_len=6)
    scores = causal_scores(2, 6, 6, seed=1)
    out, _ = Knockout(queries=queries, keys="image").edit(scores, site)
    assert torch.equal(out, blocked(scores, [(0, 4, 2), (0, 4, 3), (1, 3, 1), (1, 3, 2), (1, 4, 1), (1, 4, 2)]))


def test_question_knocked_out_of_the_last_position_and_system_out_of_nothing():
    """keys="last" (new): only queries after the last position could see it, i.e. none in a prompt."""
    site = Site(layer=0, layout=LAYOUT, q_len=6, k_len=6, prompt_len=6)
    scores = causal_scores(2, 6, 6, seed=2)
    out, changed = Knockout(queries="question", keys="last").edit(scores, site)
    assert changed == 0 and torch.equal(out, scores)
    # a decode step: the generated token cannot see the prompt's last position any more
    decode = Site(layer=0, layout=LAYOUT.extend(1), q_len=1, k_len=7, prompt_len=6)
    scores = causal_scores(2, 1, 7, seed=3)
    out, changed = Knockout(queries="generated", keys="last").edit(scores, decode)
    assert torch.equal(out, blocked(scores, [(0, 0, 5), (1, 0, 5)])) and changed == 2 * 2


def test_prompt_mask_fits_decode_steps_and_beams():
    """A mask of the prompt's width is extended over generated keys and repeated over expanded rows."""
    layout = LAYOUT.extend(1).repeat_interleave(2)  # 4 call rows (2 beams each), 7 keys
    decode = Site(layer=0, layout=layout, q_len=1, k_len=7, prompt_len=6)
    scores = causal_scores(4, 1, 7, seed=4)
    out, _ = Knockout(queries="generated", keys=KEYS).edit(scores, decode)
    picks = [(b, 0, k) for b, keys in ((0, (1, 4)), (1, (1, 4)), (2, (0, 3)), (3, (0, 3))) for k in keys]
    assert torch.equal(out, blocked(scores, picks))


def test_masks_round_trip_through_json_and_are_described():
    item = Knockout(queries="last", keys=KEYS, layers=(1,))
    assert item.keys == ((False, True, False, False, True, False), (True, False, False, True, False, False))
    again = Intervention.from_json(item.to_json())
    assert again == item and hash(again) == hash(item)
    assert "masked (2 x 6 mask, 4 positions) keys" in item.describe()


def test_bad_groups_and_masks_name_the_problem():
    with pytest.raises(ValueError, match="must be one of"):
        Knockout(keys="middle")
    with pytest.raises(ValueError, match="Bool"):
        Knockout(keys=KEYS.float())
    with pytest.raises(ValueError, match="one non-zero length"):
        Knockout(keys=[[True], [True, False]])
    site = Site(layer=0, layout=LAYOUT, q_len=6, k_len=6, prompt_len=6)
    with pytest.raises(LayoutError, match="does not fit this call"):
        Knockout(keys=KEYS[:, :4]).edit(causal_scores(2, 6, 6), site)
    padding = KEYS.clone()
    padding[0, 0] = True
    with pytest.raises(LayoutError, match="padding"):
        Knockout(keys=padding).edit(causal_scores(2, 6, 6), site)


def test_a_mask_of_the_image_acts_as_the_image_group_in_a_model():
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    image = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID

    def logits(items):
        with torch.no_grad():
            if not items:
                return model(**inputs, use_cache=False).logits[:, -1]
            with hf.intervene(model, items):
                return model(**inputs, use_cache=False).logits[:, -1]

    plain = logits([])
    named = logits([Knockout(queries="question", keys="image", layers=(1, 2))])
    masked = logits([Knockout(queries="question", keys=image, layers=(1, 2))])
    assert torch.equal(named, masked) and not torch.allclose(named, plain, atol=1e-4)


def test_query_rows_take_groups_and_masks():
    from eah_interp.interventions.selectors import query_rows

    site = Site(layer=0, layout=LAYOUT, q_len=6, k_len=6, prompt_len=6)
    assert query_rows("system", site).int().tolist() == [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert query_rows(KEYS, site).int().tolist() == KEYS.int().tolist()
    assert query_rows("last", site).int().tolist() == [[0] * 5 + [1]] * 2  # ROWS' "last": the call's last row
    decode = Site(layer=0, layout=LAYOUT.extend(1), q_len=1, k_len=7, prompt_len=6)
    assert query_rows("generated", decode).tolist() == [[True], [True]]
    assert query_rows(KEYS, decode).tolist() == [[False], [False]]  # a prompt mask never selects a new token
