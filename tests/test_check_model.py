"""Trap 3: `check_model`'s tolerances follow the dtype, measured against the SDPA-vs-eager floor.

A bfloat16 checkpoint loaded with SDPA (vision tower and decoder) differs from its eager copy by ~7e-3
in the logits with no eah-interp involved; the old fixed ``atol=1e-4`` failed it and blamed "mask or
layer mapping". A deliberately broken mask must still fail, in every dtype, with a message naming the
comparison, the error and the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from skimage import data

from eah_interp.models import check_model, load_model
from eah_interp.models.validate import MIN_ATOL, tolerances


def _inputs(bundle):
    return bundle.encode([bundle.caption_prompt, bundle.prompt("Hi.")], [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def loaded(request, llava_checkpoint):
    bundle = load_model(llava_checkpoint, dtype=request.param)
    return request.param, bundle, _inputs(bundle)


def test_tolerances_by_hand():
    # bfloat16: eps = 2^-7; probabilities 4 eps; logits max(1e-4, 8 eps * scale, 4 * floor).
    assert tolerances(torch.bfloat16, floor=0.01, logit_scale=2.0) == (pytest.approx(4 * 2**-7), pytest.approx(8 * 2**-7 * 2.0))
    assert tolerances(torch.bfloat16, floor=0.05, logit_scale=0.1) == (pytest.approx(2**-5), pytest.approx(0.2))
    # float32: eps = 2^-23, so the absolute minimum rules unless the floor is large.
    assert tolerances(torch.float32, floor=1e-6, logit_scale=10.0) == (MIN_ATOL, MIN_ATOL)
    assert tolerances(torch.float32, floor=1e-3, logit_scale=10.0)[1] == pytest.approx(4e-3)
    assert tolerances(torch.float32, floor=float("nan"), logit_scale=1.0) == (MIN_ATOL, MIN_ATOL)


def test_a_correct_model_passes_in_its_dtype(loaded):
    dtype, bundle, inputs = loaded
    report = check_model(bundle.model, inputs)
    assert report.ok, str(report)
    assert report.dtype == dtype
    if dtype == "bfloat16":
        # The floor is real (SDPA vs eager in bf16) and larger than the old fixed atol that failed this model.
        assert report.sdpa_eager_floor > 1e-4
        assert report.recording_logit_error > 1e-4
        assert report.logit_atol >= 4 * report.sdpa_eager_floor
        assert report.prob_atol == pytest.approx(4 * 2**-7)
    else:
        assert report.prob_atol == report.logit_atol == MIN_ATOL
        assert report.sdpa_eager_floor < 1e-5


def test_a_broken_mask_fails_in_every_dtype(loaded, monkeypatch):
    dtype, bundle, inputs = loaded
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils.AttentionMaskInterface, "register", lambda *a, **k: None)  # no causal mask
    report = check_model(bundle.model, inputs)
    assert not report.ok
    assert report.recording_prob_error > 10 * report.prob_atol
    problem = report.problems[0]
    assert problem.startswith(f"recorded probabilities differ from eager output_attentions by {report.recording_prob_error:.2e} in layer ")
    assert f"tolerance {report.prob_atol:.1e} for {dtype}" in problem and "SDPA vs eager differ by" in problem
    assert "the attention mask or the layer mapping is wrong" in problem


def test_fixed_atol_still_possible(loaded):
    _, bundle, inputs = loaded
    report = check_model(bundle.model, inputs, atol=1e-9)
    assert report.prob_atol == report.logit_atol == 1e-9
    assert all("(fixed atol)" in p for p in report.problems)
