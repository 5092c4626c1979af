"""The methods study (EAH among its peers): its arms follow the documented rules; the quick run works end to end."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from eah_interp.interventions import ADHH, EAH, PAI, VAF, VAR, HeadScale, MiddleLayerBoost
from studies import methods
from studies.__main__ import main as run_study_command

MINED = {"n_layers": 30, "n_heads": 9, "var_dims": [507, 17],
         "sink_heads": [[1, 2], [0, 3], [2, 1], [5, 5], [7, 0], [9, 1]] + [[10 + k, 0] for k in range(20)],
         "text_heads": [[18, 8], [18, 7], [25, 4], [27, 7], [28, 3], [20, 4]] + [[12 + k, 1] for k in range(18)]}


def test_organism_settings_follow_the_documented_rules():
    arms = {a.name: list(a.interventions) for a in methods.arms_for(0.01, MINED, hidden=576)}
    assert list(arms)[0] == "baseline" and arms["baseline"] == []
    # 20 of 1024 heads on LLaVA-1.5-7B -> round(20 * 270 / 1024) = 5 of the organism's 30 x 9 heads
    assert arms["adhh_organism"] == [ADHH(heads=MINED["text_heads"][:5])]
    assert arms["adhh_default"] == [ADHH(heads=MINED["text_heads"][:20])]
    assert arms["headscale_organism"] == [HeadScale(heads=MINED["sink_heads"][:5], scale=0.0)]
    # VAR's tau 20 x sqrt(576 / 4096) = 7.5; the mined dimensions in both
    assert arms["var_default"] == [VAR(dims=(507, 17), tau=20.0)]
    assert arms["var_organism"] == [VAR(dims=(507, 17), tau=7.5)]
    # EAH: the paper's 0.0008 by default, the organism threshold (0.0008 x 576 / 49, rounded) otherwise
    assert arms["eah_default"][0].threshold == 0.0008 and arms["eah_organism"][0].threshold == 0.01
    assert arms["pai_organism"] == [PAI(alpha=0.4)] and arms["pai_default"] == [PAI(alpha=0.2)]
    assert arms["middle_organism"] == [MiddleLayerBoost(alpha=1.0)]
    assert arms["vaf_organism"] == [VAF(image_scale=1.3, system_scale=0.9)]
    assert arms["eah_organism+pai_default"] == [EAH.paper(threshold=0.01), PAI()]
    rules = methods.organism_rules(30, 9, 49, 576)
    assert "7.50" in rules["var"] and "5 heads" in rules["adhh"] and "576/49" in rules["eah"]
    assert math.floor(13 * 30 / 32 + 0.5) == 12  # the first layer AD-HH heads are mined from (see mine)


@pytest.mark.slow
def test_quick_study_runs_through_python_m_studies_mines_on_discovery_only_and_resumes(tmp_path, monkeypatch):
    seen = []
    real_mine = methods.mine
    monkeypatch.setattr(methods, "mine", lambda bundle, items, *a: seen.extend(i.id for i in items) or real_mine(bundle, items, *a))
    assert run_study_command(["methods", "--quick", "--out", str(tmp_path)]) == tmp_path / "report.md"
    assert seen == ["scene 100000000"]  # QUICK: 2 scenes, the first is discovery, the second replication
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [a["name"] for a in plan["arms"]] == ["baseline", "eah_organism", "pai_default"]
    assert all(layer >= 12 for layer, _ in plan["mined"]["text_heads"])
    assert plan["acts"]["pai_default"]["changed"] > 0
    summary = pd.read_csv(tmp_path / "results.csv")
    assert set(summary["part"]) == {"discovery", "replication"}
    assert {"probe_absent", "chair_i", "pope_acc_adversarial"} <= set(summary["metric"])
    report = (tmp_path / "report.md").read_text()
    assert "## Replication" in report and "## Discovery part" in report and "## Arms" in report
    assert (tmp_path / "effects.png").exists()
    before = {p: (tmp_path / p / "items.jsonl").read_text() for p in ("pope", "captions")}
    seen.clear()
    run_study_command(["methods", "--quick", "--out", str(tmp_path)])
    assert seen == []  # resumed: the mined heads come from plan.json, nothing is recomputed
    assert {p: (tmp_path / p / "items.jsonl").read_text() for p in ("pope", "captions")} == before
