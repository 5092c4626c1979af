"""Hallucination metrics: CHAIR, POPE, logit probes and the statistics (`eah_interp.metrics.stats`)."""

from eah_interp.metrics.chair import PROTOCOLS, chair_scores, load_coco_objects
from eah_interp.metrics.chair_reference import reference_mentions
from eah_interp.metrics.pope import parse_yes_no, pope_questions, pope_scores
from eah_interp.metrics.probes import answer_token_ids, probe_scores, yes_no_logit_diff
from eah_interp.metrics.stats import (
    BootstrapResult,
    auroc,
    bootstrap_ci,
    bootstrap_p_value,
    bootstrap_wald_p_value,
    bootstrap_weights,
    cluster_bootstrap,
    holm,
    mcnemar,
    paired_bootstrap,
    paired_permutation_test,
    percentile_interval,
    ratio_ci,
    sign_flip_p_value,
)
from eah_interp.metrics.vocabulary import COCO_SYNONYMS, Mention, Vocabulary, get_vocabulary, plural_forms

__all__ = [
    "BootstrapResult",
    "COCO_SYNONYMS",
    "PROTOCOLS",
    "Mention",
    "Vocabulary",
    "answer_token_ids",
    "auroc",
    "bootstrap_ci",
    "bootstrap_p_value",
    "bootstrap_wald_p_value",
    "bootstrap_weights",
    "chair_scores",
    "cluster_bootstrap",
    "get_vocabulary",
    "holm",
    "load_coco_objects",
    "mcnemar",
    "paired_bootstrap",
    "paired_permutation_test",
    "parse_yes_no",
    "percentile_interval",
    "plural_forms",
    "pope_questions",
    "pope_scores",
    "probe_scores",
    "ratio_ci",
    "reference_mentions",
    "sign_flip_p_value",
    "yes_no_logit_diff",
]
