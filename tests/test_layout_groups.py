"""Named position groups and user masks of `TokenLayout.group_mask`, against hand-written layouts."""

from __future__ import annotations

import pytest
import torch

from eah_interp.errors import LayoutError
from eah_interp.layout import GROUPS, TokenLayout

# Three rows of 8 positions, written by hand:
#   row 0 (left-padded): pad pad  sys  IMG  IMG  q    q    last
#   row 1 (two images):  sys IMG  q    IMG  IMG  q    q    last   (text between images is question)
#   row 2 (no image):    pad q    q    q    q    q    q    last
ATTN = [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]]
IMAGE = [[0, 0, 0, 1, 1, 0, 0, 0], [0, 1, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
EXPECTED = {
    "system": [[0, 0, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]],
    "image": IMAGE,
    "question": [[0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 0]],
    "last": [[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1]],
    "generated": [[0] * 8, [0] * 8, [0] * 8],
    "text": [[0, 0, 1, 0, 0, 1, 1, 0], [1, 0, 1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 0]],
    "all": ATTN,
}


def layout() -> TokenLayout:
    return TokenLayout(torch.tensor(IMAGE).bool(), torch.tensor(ATTN).bool())


@pytest.mark.parametrize("group", GROUPS)
def test_named_groups_match_hand_written_masks(group):
    assert layout().group_mask(group).int().tolist() == EXPECTED[group]


def test_groups_partition_the_real_positions():
    lay = layout()
    parts = [lay.group_mask(g).int() for g in ("system", "image", "question", "last", "generated")]
    assert torch.stack(parts).sum(0).tolist() == ATTN  # each real position in exactly one group, padding in none


def test_generated_positions_after_extend():
    # two generated tokens appended; the second row's second generated token is right padding
    attn = torch.tensor([row + extra for row, extra in zip(ATTN, ([1, 1], [1, 0], [1, 1]), strict=True)]).bool()
    ext = layout().extend(2, attention_mask=attn)
    assert ext.prompt_len == 8 and ext.n_prompt == 8
    assert ext.group_mask("generated").int().tolist() == [[0] * 8 + [1, 1], [0] * 8 + [1, 0], [0] * 8 + [1, 1]]
    # "last" stays the last prompt position; "question" does not grow into the generated tokens
    assert ext.group_mask("last").int().tolist() == [r + [0, 0] for r in EXPECTED["last"]]
    assert ext.group_mask("question").int().tolist() == [r + [0, 0] for r in EXPECTED["question"]]
    assert ext.group_mask("text").int().tolist() == [
        r + g for r, g in zip(EXPECTED["text"], ([1, 1], [1, 0], [1, 1]), strict=True)
    ]
    # prompt_len survives the other transforms
    assert ext.select([1]).prompt_len == 8 and ext.repeat_interleave(2).prompt_len == 8 and ext.to("cpu").prompt_len == 8
    assert ext.fit(6, 1, 11).group_mask("generated")[0].int().tolist() == [0] * 8 + [1, 1, 1]


def test_right_padded_last_is_the_last_real_prompt_token():
    lay = TokenLayout(torch.tensor([[0, 1, 0, 0, 0]]).bool(), torch.tensor([[1, 1, 1, 0, 0]]).bool())
    assert lay.group_mask("last").int().tolist() == [[0, 0, 1, 0, 0]]
    assert lay.group_mask("question").int().tolist() == [[0, 0, 0, 0, 0]]
    assert lay.group_mask("system").int().tolist() == [[1, 0, 0, 0, 0]]


def test_user_mask_is_returned_and_validated():
    lay = layout()
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, 7] = True
    mask[1, 0] = True
    assert torch.equal(lay.group_mask(mask), mask)
    with pytest.raises(LayoutError, match=r"shape \(batch, seq\) = \(3, 8\)"):
        lay.group_mask(torch.ones(3, 7, dtype=torch.bool))
    with pytest.raises(LayoutError, match="torch.bool"):
        lay.group_mask(mask.int())
    with pytest.raises(LayoutError, match=r"no position in row\(s\) \[2\]"):
        lay.group_mask(torch.tensor([[0] * 7 + [1], [0] * 7 + [1], [0] * 8]).bool())
    with pytest.raises(LayoutError, match=r"padding in row\(s\) \[0\]"):
        lay.group_mask(torch.tensor([[1] + [0] * 7, [0] * 7 + [1], [0] * 7 + [1]]).bool())
    with pytest.raises(LayoutError, match="Unknown position group 'prompt'"):
        lay.group_mask("prompt")


def test_prompt_len_is_validated():
    with pytest.raises(LayoutError, match="prompt_len"):
        TokenLayout(torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool), prompt_len=5)
    with pytest.raises(LayoutError, match="after the prompt"):
        TokenLayout(torch.tensor([[0, 0, 0, 1]]).bool(), torch.ones(1, 4, dtype=torch.bool), prompt_len=3)
