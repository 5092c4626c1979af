"""Logit lens: residuals, decoding and object scores checked against hand computations on a tiny LLaVA."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from eah_interp import hf
from eah_interp import logit_lens as L
from eah_interp.errors import ConfigError, LayerIndexError, LayoutError
from eah_interp.interventions import EAH
from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, tiny_llava, tiny_llava_inputs

VOCAB = {"alpha": (5,), "beta": (7, 9), "gamma": (11,)}


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=3)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(4, 2))


def _hidden_states(model, inputs, interventions=None):
    """Decoder-layer outputs from a plain forward with output_hidden_states (the reference)."""
    ctx = hf.intervene(model, interventions) if interventions else torch.no_grad()
    with torch.no_grad(), ctx:
        out = model(**inputs, output_hidden_states=True)
    return out


def _rms_norm_by_hand(x, norm):
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + norm.variance_epsilon) * norm.weight


def _decode_by_hand(model, h):
    norm = model.model.language_model.norm
    return _rms_norm_by_hand(h, norm) @ model.lm_head.weight.T


def test_residual_stream_matches_output_hidden_states(model, inputs):
    """Layers 0..L-2 are hidden_states[l+1]; the last is before the norm (transformers stores it normed)."""
    res, layers, layout = L.residual_stream(model, inputs)
    ref = _hidden_states(model, inputs).hidden_states
    n = len(layers)
    assert layers == list(range(4)) and res.shape == (4, 2, inputs["input_ids"].shape[1], 64)
    for layer in range(n - 1):
        torch.testing.assert_close(res[layer], ref[layer + 1], rtol=0, atol=0)
    # hidden_states[-1] is last_hidden_state (after the final norm): decoding it again would norm twice
    norm = model.model.language_model.norm
    torch.testing.assert_close(_rms_norm_by_hand(res[-1], norm), ref[-1], rtol=1e-5, atol=1e-5)
    assert layout.n_image_tokens.tolist() == [16, 16]


def test_decoding_the_last_layer_gives_the_models_logits(model, inputs):
    res, _, _ = L.residual_stream(model, inputs, layers=[-1])
    logits = _hidden_states(model, inputs).logits
    torch.testing.assert_close(L.decode(model, res[0]), logits.float(), rtol=1e-5, atol=1e-5)


def test_residual_stream_under_eah_matches_a_manual_forward(model, inputs):
    eah = [EAH(layers=(1,), threshold=0.01)]
    res, _, _ = L.residual_stream(model, inputs, interventions=eah)
    ref = _hidden_states(model, inputs, eah).hidden_states
    base = _hidden_states(model, inputs).hidden_states
    for layer in range(3):
        torch.testing.assert_close(res[layer], ref[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(res[0], base[1])  # before the edited layer nothing changes
    assert not torch.allclose(res[1], base[2])  # the edit reaches the residual stream


def test_image_token_lens_by_hand(model, inputs):
    frame = L.image_token_lens(model, inputs, VOCAB, layers=[1, 2])
    assert tuple(frame.columns) == L.LENS_COLUMNS
    assert len(frame) == 2 * 2 * 16 * 3  # rows x layers x image tokens x objects
    hidden = _hidden_states(model, inputs).hidden_states
    for row, layer, token in [(0, 1, 0), (1, 2, 5), (1, 1, 15)]:
        position = (inputs["input_ids"][row] == TINY_IMAGE_TOKEN_ID).nonzero().flatten()[token].item()
        logits = _decode_by_hand(model, hidden[layer + 1][row, position])
        logp = torch.log_softmax(logits, -1)
        want_logprob = {w: torch.logsumexp(logp[list(ids)], 0).item() for w, ids in VOCAB.items()}
        want_logit = {w: max(logits[i].item() for i in ids) for w, ids in VOCAB.items()}
        z = sum(torch.exp(torch.tensor(v)).item() for v in want_logprob.values())
        got = frame[(frame.row == row) & (frame.layer == layer) & (frame.token == token)].set_index("object")
        assert (got.position == position).all()
        assert (got.grid_row == token // 4).all() and (got.grid_col == token % 4).all()
        ranked = sorted(VOCAB, key=lambda w: -want_logprob[w])
        for w in VOCAB:
            assert got.loc[w, "logprob"] == pytest.approx(want_logprob[w], abs=1e-4)
            assert got.loc[w, "logit"] == pytest.approx(want_logit[w], abs=1e-4)
            assert got.loc[w, "prob"] == pytest.approx(torch.exp(torch.tensor(want_logprob[w])).item() / z, abs=1e-5)
            assert got.loc[w, "rank"] == ranked.index(w) + 1


def test_image_token_lens_conditions_differ_only_from_the_edited_layer_on(model, inputs):
    frame = L.image_token_lens(model, inputs, VOCAB, {"baseline": None, "eah": [EAH(layers=(2,), threshold=0.01)]})
    base = frame[frame.condition == "baseline"].reset_index(drop=True)
    eah = frame[frame.condition == "eah"].reset_index(drop=True)
    early = base.layer < 2
    assert (base.loc[early, "logprob"] == eah.loc[early, "logprob"]).all()
    assert (base.loc[~early, "logprob"] - eah.loc[~early, "logprob"]).abs().max() > 1e-6


def test_grid_is_derived_or_refused(model):
    two = tiny_llava_inputs(model, images_per_row=2)  # 32 image tokens: not a square
    with pytest.raises(LayoutError, match=r"32 image tokens do not form a square grid.*grid=\(rows, cols\)"):
        L.image_token_lens(model, two, VOCAB, layers=[0])
    frame = L.image_token_lens(model, two, VOCAB, layers=[0], grid=(4, 8))
    assert frame.grid_row.max() == 3 and frame.grid_col.max() == 7
    assert L.image_grid(49) == (7, 7)
    with pytest.raises(LayoutError, match="holds 15 cells"):
        L.image_grid(16, grid=(3, 5))


def test_bad_layers_and_vocabulary_are_refused(model, inputs):
    with pytest.raises(LayerIndexError, match=r"4 decoder layers \(0..3\)"):
        L.residual_stream(model, inputs, layers=[4])
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        L.image_token_lens(model, inputs, {"x": (999,)}, layers=[0])
    with pytest.raises(ConfigError, match="empty"):
        L.object_confidence(model, inputs, {}, layers=[0])


class _Tokenizer:
    """Words → ids by a fixed table (a stand-in for a real tokenizer)."""

    table = {" star": [10], "star": [11, 12], " moon": [20, 21], "moon": [22], " ring": [30], " rings": [30, 31]}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.table[text]}


def test_object_vocabulary_first_or_all_subtokens():
    tok = _Tokenizer()
    assert L.object_vocabulary(tok, ["star", "moon"]) == {"star": (10,), "moon": (20,)}
    assert L.object_vocabulary(tok, ["star", "moon"], subtokens="all") == {"star": (10,), "moon": (20, 21)}
    assert L.object_vocabulary(tok, ["star"], variants=(" {}", "{}"), subtokens="all") == {"star": (10, 11, 12)}
    with pytest.raises(ConfigError, match="'first' or 'all'"):
        L.object_vocabulary(tok, ["star"], subtokens="last")


def test_object_vocabulary_refuses_shared_ids():
    class Shared(_Tokenizer):
        table = {" ring": [30], " rings": [30, 31]}

    with pytest.raises(ConfigError, match="stands for both 'ring' and 'rings'"):
        L.object_vocabulary(Shared(), ["ring", "rings"])


def test_object_confidence_by_hand(model, inputs):
    mask = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    mask[:, -3] = True
    frame = L.object_confidence(model, inputs, VOCAB, layers=[0, 3], positions=("image", "last", mask))
    assert tuple(frame.columns) == L.CONFIDENCE_COLUMNS
    assert set(frame.positions) == {"image", "last", "mask2"}
    out = _hidden_states(model, inputs)
    for row in (0, 1):
        image = (inputs["input_ids"][row] == TINY_IMAGE_TOKEN_ID).nonzero().flatten()
        for layer in (0, 3):  # the last layer's lens is the model's own output
            logits = _decode_by_hand(model, out.hidden_states[layer + 1][row]) if layer < 3 else out.logits[row]
            logp = torch.log_softmax(logits, -1)  # [seq, vocab]
            beta = torch.logsumexp(logp[:, [7, 9]], -1)
            got = frame[(frame.row == row) & (frame.layer == layer) & (frame.object == "beta")].set_index("positions")
            assert got.loc["image", "logprob_max"] == pytest.approx(beta[image].max().item(), abs=1e-4)
            assert got.loc["image", "logprob_mean"] == pytest.approx(beta[image].mean().item(), abs=1e-4)
            assert got.loc["image", "n_positions"] == 16
            assert got.loc["last", "logprob_mean"] == pytest.approx(beta[-1].item(), abs=1e-4)  # left padding: last is -1
            assert got.loc["mask2", "logprob_max"] == pytest.approx(beta[-3].item(), abs=1e-4)


def test_object_confidence_refuses_an_empty_group(model, inputs):
    empty = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    with pytest.raises(LayoutError, match="'mask0'.*selects no position in row"):
        L.object_confidence(model, inputs, VOCAB, layers=[0], positions=empty)
    with pytest.raises(LayoutError, match="Unknown position group .nowhere."):
        L.object_confidence(model, inputs, VOCAB, layers=[0], positions="nowhere")


def test_plots_run(model, inputs):
    from PIL import Image

    frame = L.image_token_lens(model, inputs, VOCAB, {"baseline": None, "eah": [EAH(layers=(1,), threshold=0.01)]})
    fig = L.plot_grid(frame, [0, 3], condition="eah", image=Image.new("RGB", (28, 28)))
    assert len(fig.axes) == 4  # image, two layers, colour bar
    fig = L.plot_grid(frame, 2, condition="baseline", object="beta", row=1)
    assert fig.axes[0].get_images()[0].get_array().shape == (4, 4)
    with pytest.raises(ConfigError, match="pass condition="):
        L.plot_grid(frame, 0)
    with pytest.raises(ConfigError, match="not in the frame's vocabulary"):
        L.plot_grid(frame, 0, condition="eah", object="delta")
    conf = L.object_confidence(model, inputs, VOCAB, {"baseline": None, "eah": [EAH(layers=(1,), threshold=0.01)]})
    fig = L.plot_confidence(conf, "alpha")
    assert len(fig.axes[0].get_lines()) == 4  # 2 conditions x 2 groups


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "instructblip", "paligemma", "gemma3", "idefics3"])
def test_decoding_the_last_layer_gives_the_logits_in_every_family(family):
    """The adapter's decoder norm and LM head are the model's own: the last layer's lens = the model's logits."""
    from eah_interp.models.tiny import tiny_family

    model, inputs = tiny_family(family)
    res, layers, _ = L.residual_stream(model, inputs, layers=[-1])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert layers == [model.config.get_text_config().num_hidden_layers - 1]
    torch.testing.assert_close(L.decode(model, res[0]), logits.float(), rtol=1e-5, atol=1e-5)


def test_final_logit_softcapping_is_applied_like_the_model():
    """A Gemma 3 causal LM soft-caps its logits (cap * tanh(logits / cap)); the LVLM class does not (transformers 5)."""
    from transformers import Gemma3ForCausalLM

    from eah_interp.models.tiny import tiny_family

    model, inputs = tiny_family("gemma3")
    text = model.config.get_text_config()
    text.final_logit_softcapping = 0.05  # small, so that a cap would bite
    res, _, _ = L.residual_stream(model, inputs, layers=[-1])
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    torch.testing.assert_close(L.decode(model, res[0]), logits, rtol=1e-5, atol=1e-6)

    lm = Gemma3ForCausalLM(text).eval()
    ids = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    res, _, _ = L.residual_stream(lm, ids, layers=[-1])
    with torch.no_grad():
        capped = lm(**ids).logits.float()
    assert capped.abs().max() <= 0.05
    torch.testing.assert_close(L.decode(lm, res[0]), capped, rtol=1e-5, atol=1e-6)
