"""Logit probes: p(yes) versus p(no) at the answer position, without generating."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.metrics.stats import auroc


def answer_token_ids(tokenizer, words: Iterable[str] = ("yes", "no")) -> dict[str, list[int]]:
    """First-token ids of each word's variants (" Yes", "Yes", " yes", "yes"), deduplicated."""
    ids: dict[str, list[int]] = {}
    for word in words:
        found: list[int] = []
        for variant in (f" {word.capitalize()}", word.capitalize(), f" {word}", word):
            tokens = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if tokens and tokens[0] not in found:
                found.append(tokens[0])
        ids[word] = found
    return ids


def yes_no_logit_diff(
    logits: Float[Tensor, "batch vocab"], yes_ids: Sequence[int], no_ids: Sequence[int]
) -> Float[Tensor, " batch"]:
    """``log p(yes) - log p(no)`` where p(yes) sums the probabilities of all yes tokens (same for no).

    Args:
        logits: next-token logits at the answer position.
        yes_ids, no_ids: token ids of the "yes" / "no" variants (e.g. `answer_token_ids`); both non-empty.

    Returns:
        One log-odds difference per row.

    Raises:
        ValueError: an id list is empty (the log of an empty sum would be a silent ``-inf`` / NaN), or an
            id is outside the vocabulary.
    """
    vocab = logits.shape[-1]
    for label, ids in (("yes_ids", yes_ids), ("no_ids", no_ids)):
        if len(ids) == 0:
            raise ValueError(
                f"{label} is empty, so p({label[:-4]}) is an empty sum and the difference would be NaN; pass the "
                "token ids of the answer words, e.g. answer_token_ids(tokenizer) or bundle.yes_ids / bundle.no_ids."
            )
        bad = [int(i) for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"{label} {bad} are outside the vocabulary (0..{vocab - 1}); pass ids of this model's tokenizer.")
    logp = torch.log_softmax(logits.float(), dim=-1)
    yes = torch.logsumexp(logp[:, list(yes_ids)], dim=-1)
    no = torch.logsumexp(logp[:, list(no_ids)], dim=-1)
    return yes - no


def probe_scores(diffs: Sequence[float] | Tensor, labels: Sequence[bool]) -> dict[str, Any]:
    """Summary of logit differences for present (label True) and absent objects.

    Returns ``mean_present``, ``mean_absent``, ``separation`` (their difference), ``accuracy`` (sign of
    the difference vs the label) and ``auroc`` (probability that a present object outscores an absent
    one, ties counting one half).
    """
    d = np.asarray(diffs, dtype=float)
    y = np.asarray(labels, dtype=bool)
    if d.shape != y.shape:
        raise ValueError(f"{d.shape[0]} differences but {y.shape[0]} labels.")
    pos, neg = d[y], d[~y]
    auc = float(auroc(d, y)[0]) if len(pos) and len(neg) else float("nan")
    mean_pos = float(pos.mean()) if len(pos) else float("nan")
    mean_neg = float(neg.mean()) if len(neg) else float("nan")
    return {
        "mean_present": mean_pos,
        "mean_absent": mean_neg,
        "separation": mean_pos - mean_neg,
        "accuracy": float(((d > 0) == y).mean()) if len(d) else float("nan"),
        "auroc": auc,
        "n": int(len(d)),
    }
