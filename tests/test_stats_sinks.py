"""HeadStats: both sink definitions and their overlap per layer, per-example values, the null flag.

References are independent of the code under test: column sums written as explicit sums over the
kept probabilities, the hidden states from HF's own ``output_hidden_states``, RMS normalisation and
overlaps counted by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from eah_interp import hf
from eah_interp.errors import ConfigError, LayoutError
from eah_interp.head_stats import OVERLAP_STATISTICS, STATISTICS, HeadStats, head_statistics
from eah_interp.layout import TokenLayout
from eah_interp.models.tiny import sharp_tiny_llava, tiny_llava_inputs

THRESHOLD = 0.02


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=0)


def _reference(model, inputs, layer: int, dims: tuple[int, ...], tau: float, probs: torch.Tensor) -> list[dict]:
    """Per row: the overlap of EAH's sinks (explicit column sums, causal normaliser) with the tokens whose
    RMS-normalised input hidden state exceeds ``tau`` in ``dims`` (HF's hidden_states[layer])."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[layer]
    mask, image = inputs["attention_mask"].bool(), inputs["input_ids"] == 120
    rows = []
    for b in range(hidden.shape[0]):
        k = hidden.shape[1]
        eah, massive = set(), set()
        for j in range(k):
            if not image[b, j]:
                continue
            h = hidden[b, j].double()
            rms = h / torch.sqrt((h * h).mean() + 1e-6)
            if max(abs(float(rms[d])) for d in dims) > tau:
                massive.add(j)
            later = [i for i in range(j + 1, k) if mask[b, i]]
            for head in range(probs.shape[1]):
                total = sum(float(probs[b, head, i, j]) for i in later)
                if total / len(later) > THRESHOLD:
                    eah.add(j)
        both, either = len(eah & massive), len(eah | massive)
        rows.append({
            "eah_sinks": len(eah), "massive_sinks": len(massive), "both": both,
            "jaccard": both / either if either else math.nan, "eah_in_massive": both / len(eah) if eah else math.nan,
        })
    return rows, hidden


@pytest.mark.parametrize("keep_patterns", [False, True])  # the map-free sums path and the full-map path
def test_overlap_per_layer_equals_a_hand_count(model, inputs, keep_patterns):
    layer = 2
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[layer]
    image = inputs["input_ids"] == 120
    # two dims and a tau that split the image tokens: some massive, some not
    rms = hidden / torch.sqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    dims = tuple(int(d) for d in rms[image].abs().amax(0).topk(2).indices)
    peaks = rms[image][:, list(dims)].abs().amax(-1).sort().values
    middle = len(peaks) // 2
    tau = float(peaks[middle - 1] + peaks[middle]) / 2  # halfway between two tokens: no tie at tau
    stats = HeadStats(threshold=THRESHOLD, keep_examples=True, sink_dims=dims, tau=tau)
    with hf.record_attention(model, [1, layer], stats=stats, keep_patterns=True) as full, torch.no_grad():
        model(**inputs, use_cache=False)
    probs = full.patterns[layer][-1]
    expected, _ = _reference(model, inputs, layer, dims, tau, probs)
    assert 0 < expected[0]["massive_sinks"] < 16 and expected[0]["eah_sinks"] > 0  # the case is not degenerate
    if not keep_patterns:  # the same through the sums path of record_attention
        stats = HeadStats(threshold=THRESHOLD, keep_examples=True, sink_dims=dims, tau=tau)
        with hf.record_attention(model, [1, layer], stats=stats), torch.no_grad():
            model(**inputs, use_cache=False)
    frame = stats.examples_frame("layer")
    got = frame[frame.layer == layer].reset_index(drop=True)
    for row, want in enumerate(expected):
        for name in OVERLAP_STATISTICS:
            value = float(got.loc[row, name])
            assert (math.isnan(value) and math.isnan(want[name])) or value == pytest.approx(want[name]), (row, name)
    means = stats.layer_frame().set_index("layer").loc[layer]
    assert means["massive_sinks_mean"] == pytest.approx(sum(r["massive_sinks"] for r in expected) / 2)
    assert means["both_mean"] == pytest.approx(sum(r["both"] for r in expected) / 2)
    assert stats.layer_frame().layer.tolist() == [1, layer]


def test_sink_dims_without_hidden_states_is_an_error():
    stats = HeadStats(sink_dims=(0,))
    layout = TokenLayout.from_spans([(1, 3)], 5)
    probs = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    with pytest.raises(ConfigError, match="pass layer 0's input hidden states"):
        stats.update(0, probs, layout)
    with pytest.raises(LayoutError, match="do not cover"):
        stats.update(0, probs, layout, hidden=torch.randn(1, 4, 8))
    with pytest.raises(ConfigError, match="without sink_dims"):
        HeadStats().update_from_stats(0, head_statistics(probs, layout), overlap={"eah_sinks": torch.zeros(1)})
    with pytest.raises(ConfigError, match="got no overlap statistics"):
        stats.update_from_stats(0, head_statistics(probs, layout))


def test_label_next_is_consumed_once_per_layer(model, inputs):
    stats = HeadStats(threshold=THRESHOLD, keep_examples=True)
    with hf.record_attention(model, "all", stats=stats), torch.no_grad():
        stats.label_next(["a", "b"])
        model(**inputs, use_cache=False)
        with pytest.raises(ConfigError, match="label_next"):
            model(**inputs, use_cache=False)
    plain = HeadStats(threshold=THRESHOLD)  # without kept examples the labels are not used: no error
    with hf.record_attention(model, [0], stats=plain), torch.no_grad():
        plain.label_next(["a", "b"])
        model(**inputs, use_cache=False)
        model(**inputs, use_cache=False)
    assert plain.n_examples(0) == 4


def test_examples_survive_save_and_load(model, inputs, tmp_path):
    stats = HeadStats(threshold=THRESHOLD, keep_examples=True, sink_dims=(0, 1), tau=1.0, model="tiny")
    with hf.record_attention(model, "all", stats=stats), torch.no_grad():
        for names in (["a", "b"], None):
            stats.label_next(names)
            model(**inputs, use_cache=False)
    frame = stats.examples_frame()
    assert set(frame.example) == {"a", "b", "2", "3"} and len(frame) == 4 * 4 * 4  # layers x heads x examples
    assert list(frame[(frame.layer == 0) & (frame["head"] == 0)].example) == ["a", "b", "2", "3"]
    # per-example values are the batch's head_statistics, row by row
    with hf.record_attention(model, [0], keep_patterns=True) as rec, torch.no_grad():
        model(**inputs, use_cache=False)
    direct = head_statistics(rec.patterns[0][-1], rec.layouts[-1], THRESHOLD)
    first = frame[(frame.layer == 0) & (frame.example == "b")].sort_values("head")
    for name in STATISTICS:
        torch.testing.assert_close(torch.tensor(first[name].to_numpy()), direct[name][1].double(), equal_nan=True)
    loaded = HeadStats.load(stats.save(tmp_path / "s.safetensors"))
    assert (loaded.keep_examples, loaded.sink_dims, loaded.tau, loaded.model) == (True, (0, 1), 1.0, "tiny")
    assert loaded.examples_frame().equals(frame)
    assert loaded.examples_frame("layer").equals(stats.examples_frame("layer"))
    assert loaded.layer_frame().equals(stats.layer_frame())
    with pytest.raises(ConfigError, match="keep_examples=True"):
        HeadStats(sink_dims=(0, 1)).load_state_dict(stats.state_dict())
    with pytest.raises(ConfigError, match="sink_dims=..."):
        HeadStats(keep_examples=True).load_state_dict(stats.state_dict())
    with pytest.raises(ConfigError, match="keep_examples=True"):
        HeadStats().examples_frame()


def test_the_null_flag_marks_a_previous_token_head():
    """A batch with a previous-token head (flagged) and a head that dumps on BOS and two sinks (not flagged)."""
    k, image = 80, (6, 50)
    layout = TokenLayout.from_spans([image], k)
    probs = torch.zeros(1, 2, k, k)
    for i in range(k):
        probs[0, 0, i, max(i - 1, 0)] = 1.0
        probs[0, 1, i, 0] = 1.0 if i <= 30 else 0.4
        if i > 30:
            probs[0, 1, i, 9] = probs[0, 1, i, 26] = 0.3
    values = head_statistics(probs, layout, threshold=0.01)
    # previous-token null: 1/(79 - j) > 0.01 at every image token j < 50
    assert values["previous_null_density"].tolist() == [[1.0, 1.0]]
    assert values["sink_density"][0].tolist() == pytest.approx([1.0, 2 / 44])
    assert values["explained_by_null"].tolist() == [[1.0, 0.0]]
    stats = HeadStats(threshold=0.01)
    stats.update(0, probs, layout)
    assert stats.explained_heads()[["layer", "head"]].values.tolist() == [[0, 0]]


def test_scan_cli_writes_the_overlap_examples_and_null_flags(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from eah_interp.cli import app

    args = ["scan", "--model", "tiny-llava", "--n", "2", "--out", str(tmp_path), "--sink-dims", "0,1", "--tau", "1",
            "--keep-examples", "--threshold", "0.0008"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    from eah_interp.cli import _write_scan

    table = _write_scan(HeadStats.load(tmp_path / "scan_checkpoint.safetensors"), tmp_path / "again", "t")
    headers = [str(c.header) for c in table.columns]
    assert headers[-4:] == ["null-explained heads", "massive sinks", "EAH sinks", "overlap (Jaccard)"]
    layers = pd.read_csv(tmp_path / "layer_sinks.csv")
    examples = pd.read_csv(tmp_path / "examples.csv")
    assert layers.layer.tolist() == [0, 1, 2, 3] and (layers.n == 2).all()
    assert len(examples) == 4 * 4 * 2 and sorted(examples.example.unique()) == ["scene 100000000", "scene 100000001"]
    assert "explained_by_null_mean" in pd.read_csv(tmp_path / "head_stats.csv").columns
    # the checkpoint keeps the options: a rerun resumes (nothing to add) instead of refusing the checkpoint
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "2 of 2 images already counted" in again.output, again.output
    bad = CliRunner().invoke(app, ["scan", "--model", "tiny-llava", "--n", "1", "--out", str(tmp_path / "x"), "--sink-dims", "a,b"])
    assert bad.exit_code != 0 and "comma-separated integers" in bad.output
