"""`check_model`: before trusting any statistic on a new LVLM, check that eah-interp sees and edits it right.

Three checks, each against the model's own eager attention (transformers' ``output_attentions=True``):

1. **layout**: every row has image tokens (the adapter's placeholder ids are in ``input_ids``);
2. **recording**: the probabilities eah-interp records in every layer equal the eager model's
   ``output_attentions`` (so the attention mask, bidirectional image blocks included, is right), and
   recording leaves the logits unchanged;
3. **identity edit**: broadcasting a head onto itself (`EAHConfig` with ``source=h, target_heads=(h,)``)
   leaves the logits unchanged (so the edit path rebuilds ``P @ V`` with the right values and GQA groups).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from eah_interp.config import EAHConfig
from eah_interp.models.adapters import adapter_for


@dataclass
class ModelCheck:
    """Result of `check_model`: the largest deviation of each check, and whether all are within ``atol``.

    Attributes:
        family: the adapter used.
        image_tokens_per_row: image tokens found in each row.
        recording_prob_error: max |recorded P - eager P| over layers, real rows.
        recording_logit_error: max |logits while recording - eager logits|, real positions.
        identity_logit_error: max |logits under an identity edit - eager logits|, real positions (both on
            the eager copy).
        atol: the tolerance.
        problems: sentences naming what failed.
    """

    family: str
    image_tokens_per_row: list[int]
    recording_prob_error: float
    recording_logit_error: float
    identity_logit_error: float
    atol: float
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (
            f"check_model ({self.family}): {verdict}\n"
            f"  image tokens per row: {self.image_tokens_per_row}\n"
            f"  recorded vs eager probabilities: max error {self.recording_prob_error:.2e}\n"
            f"  logits while recording vs eager: max error {self.recording_logit_error:.2e}\n"
            f"  identity edit vs eager logits:   max error {self.identity_logit_error:.2e} (atol {self.atol:g})"
        )


def check_model(model: nn.Module, inputs: Mapping[str, Any], *, layer: int = 1, head: int = 0, atol: float = 1e-4) -> ModelCheck:
    """Run the three checks on ``model`` with a processor output ``inputs`` (see the module docstring).

    Args:
        model: an HF LVLM (SDPA or eager attention); it is not modified (an eager deep copy is made).
        inputs: processor output with ``input_ids`` and ``attention_mask``.
        layer, head: where the identity edit happens.
        atol: tolerance on each maximum error.

    Returns:
        A `ModelCheck` (``.ok``, the errors, and ``str`` a short report).
    """
    from eah_interp import hf

    adapter = adapter_for(model)
    mask = inputs["attention_mask"].bool()
    layout = adapter.layout(model, inputs["input_ids"], inputs["attention_mask"], require_images=False)
    counts = layout.n_image_tokens.tolist()
    problems = []
    if min(counts) == 0:
        problems.append(f"rows {[i for i, c in enumerate(counts) if c == 0]} have no image tokens "
                        f"(visual token ids {adapter.visual_token_ids(model)}); the other checks were not run")
        nan = float("nan")
        return ModelCheck(adapter.family, counts, nan, nan, nan, atol, problems)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
    with torch.no_grad():
        reference = eager(**inputs, use_cache=False, output_attentions=True)
        attentions = getattr(reference, "attentions", None) or reference.language_model_outputs.attentions
        with hf.record_attention(model, "all", keep_patterns=True) as rec:
            recorded_logits = model(**inputs, use_cache=False).logits
        normalise = "rows" if adapter.bidirectional_image_attention else "causal"  # no effect on an identity edit
        identity = EAHConfig(layers=(layer,), threshold=0.0, source=head, target_heads=(head,), normalise=normalise, name="identity")
        with hf.eah(eager, identity):  # on the eager copy: SDPA-vs-eager rounding would blur the check
            edited = eager(**inputs, use_cache=False).logits

    rows = mask[:, None, :, None].to(attentions[0].dtype)
    prob_error = max(float(((rec.patterns[i][0] - attentions[i]).abs() * rows).max()) for i in rec.patterns)
    logit_error = float((recorded_logits - reference.logits)[mask].abs().max())
    identity_error = float((edited - reference.logits)[mask].abs().max())
    if prob_error > atol:
        problems.append(f"recorded probabilities differ from eager output_attentions by {prob_error:.2e} (mask or layer mapping)")
    if logit_error > atol:
        problems.append(f"recording changed the logits by {logit_error:.2e}")
    if identity_error > atol:
        problems.append(f"the identity edit changed the logits by {identity_error:.2e} (values or GQA groups)")
    return ModelCheck(adapter.family, counts, prob_error, logit_error, identity_error, atol, problems)
