"""The pre-registered replication split: assignment, per-part Holm, and the "replicated" verdict.

Hand-made results where the answer is known: one arm's effect is there in both parts (replicates),
one is there in discovery only (does not), one flips sign (does not), one is a null.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from eah_interp import evaluation
from eah_interp.data import scene_dataset
from eah_interp.errors import ConfigError
from eah_interp.evaluation import Arm, ReplicationSplit, replication_table, run_experiment, summarise_items
from eah_interp.metrics.stats import holm
from eah_interp.models import load_model

N = 16  # items per part: 16 same-sign differences give a sign-flip p of about 2 / 2**16


def absent(cond, item, diff, part):
    """One absent-object question (answered "no" by every arm: POPE metrics do not move), its probe value."""
    return {"condition": cond, "task": "pope", "item": item, "question": "random/0", "split": "random",
            "text": "Is there a cat?", "label": False, "said_yes": False, "logit_diff": diff, "part": part}


def hand_items():
    """Baseline probe -2 (+ per-item noise); per arm the shift in discovery and in replication."""
    shifts = {"real": (1.0, 1.0), "fluke": (1.0, 0.0), "flipped": (1.0, -1.0), "null": (0.0, 0.0)}
    rows = []
    for k in range(2 * N):
        part = "discovery" if k < N else "replication"
        noise = 0.05 * ((k * 7) % 5 - 2)  # -0.1 .. 0.1, the same for every arm of an item
        rows.append(absent("baseline", f"i{k}", -2.0 + noise, part))
        for arm, (d, r) in shifts.items():
            shift = d if part == "discovery" else r
            wobble = 0.01 * (k % 3 - 1) if shift == 0 else 0.0  # a null arm differs by +-0.01 around 0
            rows.append(absent(arm, f"i{k}", -2.0 + noise + shift + wobble, part))
    return pd.DataFrame(rows)


def test_order_split_is_a_seed_range_and_hash_split_depends_on_the_id_only():
    ids = [f"scene {100000000 + k}" for k in range(10)]
    order = ReplicationSplit(0.3, by="order").assign(ids)
    assert [order[i] for i in ids] == ["discovery"] * 7 + ["replication"] * 3
    hashed = ReplicationSplit(0.5).assign(ids)
    subset = ReplicationSplit(0.5).assign(list(reversed(ids[2:])))  # another sample, another order
    assert all(subset[i] == hashed[i] for i in subset)
    many = ReplicationSplit(0.25).assign([f"item {k}" for k in range(4000)])
    share = sum(p == "replication" for p in many.values()) / 4000
    assert abs(share - 0.25) < 0.03  # the hash is uniform: about the asked share
    assert ReplicationSplit(0.5, salt="other").assign(ids) != hashed  # the salt draws another split


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, True, "half"])
def test_a_bad_fraction_is_refused(fraction):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        ReplicationSplit(fraction)


def test_an_empty_part_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        ReplicationSplit(0.1, by="order").assign(["a", "b", "c"])
    with pytest.raises(ConfigError, match="by must be one of"):
        ReplicationSplit(0.5, by="random")


def test_holm_is_within_each_part():
    summary = summarise_items(hand_items(), n_resamples=2000)
    for part in ("discovery", "replication"):
        rows = summary[summary["part"] == part]
        tested = rows[rows["p_value"].notna()]
        assert np.allclose(tested["p_holm"], holm(tested["p_value"].tolist()))  # this part's p-values only
    real = summary.set_index(["part", "condition", "metric"])
    assert real.loc[("discovery", "real", "probe_absent"), "diff"] == pytest.approx(1.0)
    assert real.loc[("replication", "flipped", "probe_absent"), "diff"] == pytest.approx(-1.0)


def test_only_an_effect_significant_in_both_parts_with_one_sign_replicates():
    table = replication_table(summarise_items(hand_items(), n_resamples=2000)).set_index(["condition", "metric"])
    verdict = table["verdict"]
    assert verdict[("real", "probe_absent")] == "replicated"
    assert verdict[("fluke", "probe_absent")] == "not replicated"
    assert verdict[("flipped", "probe_absent")] == "not replicated"  # significant twice, opposite signs
    assert verdict[("null", "probe_absent")] == "null"
    # POPE answers never change: no verdict other than null there
    assert set(table.loc[[k for k in table.index if k[1] != "probe_absent"], "verdict"]) == {"null"}


def test_a_raw_p_alone_never_replicates(monkeypatch):
    monkeypatch.setattr(evaluation.statistics, "sign_flip_p_value", lambda *a, **k: 0.02)  # raw p < 0.05 everywhere
    table = replication_table(summarise_items(hand_items(), n_resamples=200))
    assert len(table) > 3 and (table["verdict"] == "null").all()


def test_report_has_both_parts_and_the_verdicts(tmp_path):
    items = hand_items()
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items.to_dict("records")))
    evaluation.write_report(tmp_path / "items.jsonl", tmp_path, n_resamples=2000)
    report = (tmp_path / "report.md").read_text()
    assert "## Discovery part (16 items)" in report and "## Replication part (16 items)" in report
    assert "1 of 3 discoveries replicated" in report
    assert "| real | probe_absent | +1.000" in report and "**replicated**" in report
    assert (tmp_path / "replication.csv").exists()


def test_mixed_results_with_and_without_a_part_are_refused():
    items = hand_items()
    items.loc[0, "part"] = None
    with pytest.raises(ConfigError, match="with and without a replication split"):
        summarise_items(items, n_resamples=10)


def test_without_a_split_everything_is_one_family():
    items = hand_items().drop(columns="part")
    summary = summarise_items(items, n_resamples=200)
    assert set(summary["part"]) == {"all"}
    with pytest.raises(ConfigError, match="no 'discovery' part"):
        replication_table(summary)


def test_runner_records_the_part_and_keeps_the_split_on_resume(tmp_path):
    bundle = load_model("tiny-llava")
    data = scene_dataset(4)
    split = ReplicationSplit(0.5, by="order")
    path = run_experiment(bundle, data, tmp_path, arms=[Arm("baseline")], tasks=("pope",), progress=False,
                          replication=split)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    parts = {r["item"]: r["part"] for r in records}
    assert parts == {"scene 100000000": "discovery", "scene 100000001": "discovery",
                     "scene 100000002": "replication", "scene 100000003": "replication"}
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["arguments"]["replication"] == {"fraction": 0.5, "by": "order", "salt": "eah-interp", "n_items": 4}
    assert run["replication"]["n"] == {"discovery": 2, "replication": 2}
    with pytest.raises(ConfigError, match="replication"):  # another split cannot be mixed in
        run_experiment(bundle, data, tmp_path, arms=[Arm("baseline")], tasks=("pope",), progress=False,
                       replication=ReplicationSplit(0.5))
    with pytest.raises(ConfigError, match="n_items"):  # by order, more items move the boundary: refused
        run_experiment(bundle, scene_dataset(6), tmp_path, arms=[Arm("baseline")], tasks=("pope",),
                       progress=False, replication=split)


def test_eval_cli_takes_a_replication_split(tmp_path):
    from typer.testing import CliRunner

    from eah_interp.cli import app

    common = ["eval", "--model", "tiny-llava", "-n", "4", "--arm", "eah_paper", "--beams", "1", "--task", "pope"]
    bad = CliRunner().invoke(app, [*common, "--replication", "1.5", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "strictly between 0 and 1" in bad.output
    result = CliRunner().invoke(app, [*common, "--replication", "0.5", "--replicate-by", "order",
                                      "--bootstrap", "100", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "report.md").read_text()
    assert "## Replication" in report and "## Discovery part (2 items)" in report and "## Replication part (2 items)" in report
    parts = {json.loads(line)["item"]: json.loads(line)["part"] for line in (tmp_path / "items.jsonl").read_text().splitlines()}
    assert sorted(parts.values()) == ["discovery", "discovery", "replication", "replication"]
