"""The experiment layer: arms, a resumable runner, statistics with one significance rule, and the report.

* `arms`: an `Arm` is a name and a list of interventions (`Arm.from_spec("eah+pai")`: the spec grammar
  of `eah_interp.interventions.parse`); `default_arms` are the baseline, EAH and its controls.
* `runner`: `run_experiment` runs every arm on every item of a dataset (captions with CHAIR, yes/no
  questions with the logit probe) into a resumable ``items.jsonl`` (`eah_interp.resumable.ResumableLog`).
* `statistics`: metrics as ratios of per-item sums, paired bootstrap CIs and permutation p-values,
  Holm's correction with one rule (significant: ``p_holm <= ALPHA``, `holm_family`), a pre-registered
  `ReplicationSplit` and its `verdict`s.
* `report`: `write_report` writes ``results.csv``, ``report.md`` (each arm's resolved layers and EAH
  source heads) and ``effects.png``.

The experiment layer sits above the toolkit: it knows nothing about where items come from
(`eah_interp.data`), and data-parallel runs shard it through `eah_interp.distributed.run_sharded`.
"""

from eah_interp.evaluation.arms import Arm, ArmWarning, deep_control_layer, default_arms
from eah_interp.evaluation.report import effects_plot, load_items, replication_markdown, write_report
from eah_interp.evaluation.runner import CHAIR_PROTOCOLS, first_token_answers, run_experiment
from eah_interp.evaluation.statistics import (
    ALPHA,
    PARTS,
    RatioMetric,
    ReplicationSplit,
    holm_family,
    item_table,
    metrics_for,
    replication_table,
    summarise_items,
    verdict,
)

__all__ = [
    "ALPHA", "CHAIR_PROTOCOLS", "PARTS", "Arm", "ArmWarning", "RatioMetric", "ReplicationSplit", "deep_control_layer", "default_arms",
    "effects_plot", "first_token_answers", "holm_family", "item_table", "load_items", "metrics_for",
    "replication_markdown", "replication_table", "run_experiment", "summarise_items", "verdict", "write_report",
]
