"""The worked example of docs/new_model.md, step by step: Mistral 3 (Pixtral-style image rows), a family
eah-interp has no adapter for. Keep this file and the page in sync."""

from __future__ import annotations

import io

import pytest
import torch

from eah_interp import EAH, HeadStats, hf
from eah_interp.models import ADAPTERS, Adapter, adapter_for, check_model, describe, register_adapter
from eah_interp.models.tiny import (
    tiny_mistral3,  # step 1: the model and a batch laid out as its processor does
)

torch.set_num_threads(1)

@pytest.fixture()
def registry():
    """Leave the adapter registry as it was."""
    before = dict(ADAPTERS)
    yield
    ADAPTERS.clear()
    ADAPTERS.update(before)


def test_worked_example(registry):
    model, inputs = tiny_mistral3()

    # Step 2: describe() — the generic adapter finds layers, heads and the image positions.
    out = io.StringIO()
    d = describe(model, inputs, file=out)
    assert d.family == "generic"
    assert (d.n_layers, d.n_heads, d.n_kv_heads) == (3, 4, 2)
    assert d.layout.n_image_tokens.tolist() == [16, 16]
    assert "[7, 11), [12, 16), [17, 21), [22, 26)" in out.getvalue()  # 4 spans: the [IMG_BREAK]s are text

    # Step 3: register an adapter that records the family's quirks.
    register_adapter(Adapter(
        "mistral3",
        ("Mistral3ForConditionalGeneration",),
        quirks=("Pixtral-style image rows: an [IMG_BREAK] text token after each row of image tokens, [IMG_END] last",),
        support={"hf": "yes", "nnsight": "yes"},
    ))
    assert adapter_for(model).family == "mistral3"
    assert "Pixtral-style" in str(describe(model, inputs, file=None))

    # Step 4: check_model() — recording equals eager attention, the identity edit changes nothing.
    report = check_model(model, inputs)
    assert report.ok, str(report)
    assert report.recording_prob_error < 1e-5 and report.identity_logit_error < 1e-5

    # Step 5: a first scan and an EAH run.
    stats = HeadStats(threshold=0.02)
    with hf.record_attention(model, "all", stats=stats), torch.no_grad():
        model(**inputs)
    assert stats.matrix("sink_count").shape == (3, 4)
    with hf.eah(model, EAH.paper(threshold=0.02)) as run, torch.no_grad():
        model(**inputs)
    assert len(run.records) == 1 and run.records[0].layer == 1


def test_check_model_catches_a_wrong_layout(registry):
    """An adapter pointing at the wrong placeholder id is caught: no image tokens."""
    model, inputs = tiny_mistral3()
    register_adapter(Adapter("mistral3", ("Mistral3ForConditionalGeneration",), image_token_attrs=("spatial_merge_size",)))  # id 2: wrong
    report = check_model(model, inputs)
    assert not report.ok and "no image tokens" in str(report)


def test_check_model_catches_a_broken_mask(registry, monkeypatch):
    """If the registered attention mask were wrong (here: none), the recording check fails loudly."""
    model, inputs = tiny_mistral3()
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils.AttentionMaskInterface, "register", lambda *a, **k: None)
    report = check_model(model, inputs)
    assert not report.ok and "recorded probabilities differ" in str(report)


def test_register_adapter_refuses_duplicates_and_unknown_backends(registry):
    with pytest.raises(ValueError, match="registered already"):
        register_adapter(Adapter("llava", ("X",)))
    with pytest.raises(ValueError, match="unknown backends"):
        register_adapter(Adapter("x", ("X",), support={"jax": "yes"}))
