"""`check_model`: before trusting any statistic on a new LVLM, check that eah-interp sees and edits it right.

Three checks, each against the model's own eager attention (transformers' ``output_attentions=True``):

1. **layout**: every row has image tokens (the adapter's placeholder ids are in ``input_ids``);
2. **recording**: the probabilities eah-interp records in every layer equal the eager model's
   ``output_attentions`` (so the attention mask, bidirectional image blocks included, is right), and
   recording leaves the logits unchanged;
3. **identity edit**: broadcasting a head onto itself (`EAH` with ``source=h, target_heads=(h,)``)
   leaves the logits unchanged (so the edit path rebuilds ``P @ V`` with the right values and GQA groups).

Tolerances follow the dtype. In bfloat16 / float16 two correct attention implementations already
differ: plain SDPA and eager logits differ by ~1e-2 with no eah-interp involved (measured: 6.8e-3 on
the tiny LLaVA checkpoint in bfloat16, SDPA in the vision tower and the decoder). So `check_model`
measures that difference on the same model and inputs (the **floor**: the model as loaded, without
eah-interp, against its eager copy) and accepts

* logits: ``max(1e-4, 8 * eps(dtype) * max|logits|, 4 * floor)``;
* probabilities: ``max(1e-4, 4 * eps(dtype))`` (probabilities lie in [0, 1]; eager itself rounds its
  float32 softmax to the model dtype);

(``eps``: ``torch.finfo(dtype).eps``, 1.2e-7 for float32, 7.8e-3 for bfloat16, 9.8e-4 for float16).
A wrong mask or layer mapping moves probabilities by a large fraction of 1 and is caught in every
dtype; pass ``atol=`` to use one fixed tolerance instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eah_interp import compat
from eah_interp.interventions import EAH
from eah_interp.models.adapters import adapter_for, token_layout
from eah_interp.models.introspect import text_config

#: Multiple of the SDPA-vs-eager logit difference accepted as rounding (see the module docstring).
FLOOR_FACTOR = 4.0
#: Absolute minimum of every tolerance (float32 rounding of a few-layer model stays far below it).
MIN_ATOL = 1e-4


@dataclass
class ModelCheck:
    """Result of `check_model`: the largest deviation of each check, the tolerances it was held to.

    Attributes:
        family: the adapter used.
        image_tokens_per_row: image tokens found in each row.
        recording_prob_error: max |recorded P - eager P| over layers, real rows.
        recording_logit_error: max |logits while recording - eager logits|, real positions.
        identity_logit_error: max |logits under an identity edit - eager logits|, real positions (both on
            the eager copy).
        prob_atol: tolerance of the probability comparison.
        logit_atol: tolerance of the two logit comparisons.
        sdpa_eager_floor: max |logits of the model as loaded (e.g. SDPA) - eager logits| on the same
            inputs, without eah-interp (NaN when not measured).
        dtype: the model's dtype.
        problems: sentences naming what failed, by how much, against which tolerance.
    """

    family: str
    image_tokens_per_row: list[int]
    recording_prob_error: float
    recording_logit_error: float
    identity_logit_error: float
    prob_atol: float
    logit_atol: float
    sdpa_eager_floor: float = float("nan")
    dtype: str = "float32"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (
            f"check_model ({self.family}, {self.dtype}): {verdict}\n"
            f"  image tokens per row: {self.image_tokens_per_row}\n"
            f"  logits as loaded vs eager (rounding floor): {self.sdpa_eager_floor:.2e}\n"
            f"  recorded vs eager probabilities: max error {self.recording_prob_error:.2e} (tolerance {self.prob_atol:.1e})\n"
            f"  logits while recording vs eager: max error {self.recording_logit_error:.2e} (tolerance {self.logit_atol:.1e})\n"
            f"  identity edit vs eager logits:   max error {self.identity_logit_error:.2e} (tolerance {self.logit_atol:.1e})"
        )


def tolerances(dtype: torch.dtype, floor: float, logit_scale: float) -> tuple[float, float]:
    """``(probability tolerance, logit tolerance)`` for a model of ``dtype`` (rules in the module docstring).

    Args:
        dtype: the model's floating dtype.
        floor: measured max |logits as loaded - eager logits| (NaN: not measured, ignored).
        logit_scale: max |eager logits| over real positions.
    """
    eps = torch.finfo(dtype).eps
    prob = max(MIN_ATOL, 4 * eps)
    logit = max(MIN_ATOL, 8 * eps * logit_scale)
    if floor == floor:  # not NaN
        logit = max(logit, FLOOR_FACTOR * floor)
    return prob, logit


def check_model(
    model: nn.Module, inputs: Mapping[str, Any], *, layer: int = 1, head: int = 0, atol: float | None = None
) -> ModelCheck:
    """Run the three checks on ``model`` with a processor output ``inputs`` (see the module docstring).

    Args:
        model: an HF LVLM (SDPA or eager attention); it is not modified (an eager deep copy is made).
        inputs: processor output with ``input_ids`` and ``attention_mask``.
        layer, head: where the identity edit happens.
        atol: one fixed tolerance for every comparison; default: tolerances that follow the dtype,
            measured against the SDPA-vs-eager floor (`tolerances`).

    Returns:
        A `ModelCheck` (``.ok``, the errors and tolerances, and ``str`` a short report).
    """
    from eah_interp import hf  # check_model drives the HF backend: the one import from models/ upwards

    adapter = adapter_for(model)
    mask = inputs["attention_mask"].bool()
    layout = token_layout(model, inputs["input_ids"], inputs["attention_mask"], require_images=False)
    counts = layout.n_image_tokens.tolist()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    problems = []
    if min(counts) == 0:
        problems.append(f"rows {[i for i, c in enumerate(counts) if c == 0]} have no image tokens "
                        f"(visual token ids {adapter.visual_token_ids(model)}); the other checks were not run")
        nan = float("nan")
        return ModelCheck(adapter.family, counts, nan, nan, nan, nan, nan, nan, dtype_name, problems)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    with torch.no_grad():
        reference = eager(**inputs, use_cache=False, output_attentions=True)
        attentions = getattr(reference, "attentions", None) or reference.language_model_outputs.attentions
        plain = model(**inputs, use_cache=False).logits  # the model as loaded (e.g. SDPA), no eah-interp
        floor = float((plain - reference.logits)[mask].abs().max())
        with hf.record_attention(model, "all", keep_patterns=True) as rec:
            recorded_logits = model(**inputs, use_cache=False).logits
        normalise = "rows" if adapter.bidirectional_image_attention else "causal"  # no effect on an identity edit
        identity = EAH(layers=(layer,), threshold=0.0, source=head, target_heads=(head,), normalise=normalise, name="identity")
        with hf.eah(eager, identity):  # on the eager copy: SDPA-vs-eager rounding would blur the check
            edited = eager(**inputs, use_cache=False).logits

    if atol is None:
        scale = float(reference.logits[mask].abs().max())
        prob_atol, logit_atol = tolerances(dtype, floor, scale)
    else:
        prob_atol = logit_atol = atol
    rows = mask[:, None, :, None].to(attentions[0].dtype)
    per_layer = {i: float(((rec.patterns[i][0].to(attentions[i].dtype) - attentions[i]).abs() * rows).max()) for i in rec.patterns}
    worst = max(per_layer, key=per_layer.get)
    prob_error = per_layer[worst]
    logit_error = float((recorded_logits - reference.logits)[mask].abs().max())
    identity_error = float((edited - reference.logits)[mask].abs().max())
    implementation = str(compat.attn_implementation(text_config(model)))
    loaded = "SDPA" if implementation == "sdpa" else f"{implementation} (as loaded)"
    how = f"tolerance {{:.1e}} for {dtype_name}" + (" (fixed atol)" if atol is not None else f"; {loaded} vs eager differ by {floor:.1e}")
    if prob_error > prob_atol:
        problems.append(
            f"recorded probabilities differ from eager output_attentions by {prob_error:.2e} in layer {worst} "
            f"({how.format(prob_atol)}): the attention mask or the layer mapping is wrong"
        )
    if logit_error > logit_atol:
        problems.append(f"recording changed the logits by {logit_error:.2e} ({how.format(logit_atol)})")
    if identity_error > logit_atol:
        problems.append(
            f"the identity edit changed the logits by {identity_error:.2e} ({how.format(logit_atol)}): values or GQA groups"
        )
    return ModelCheck(
        adapter.family, counts, prob_error, logit_error, identity_error, prob_atol, logit_atol, floor, dtype_name, problems
    )
