"""The console script: the main job (demo) offline on the bundled model, and scan/generate on a tiny model."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from eah_interp.cli import app


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_scan_and_generate_on_a_tiny_model(tmp_path, no_network):
    runner = CliRunner()
    result = runner.invoke(app, ["scan", "--model", "tiny-llava", "--n", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "head_stats.csv")
    assert len(frame) == 4 * 4 and (frame["n"] == 3).all()  # 4 layers x 4 heads, 3 images each
    assert (tmp_path / "sink_density.png").stat().st_size > 0
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["generate", "--model", "tiny-llava", "--scenes", "2", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "baseline vs eah" in result.output and "EAH source head" in result.output
    bad = runner.invoke(app, ["generate", "--model", "tiny-llava", "--interventions", "nonsense"])
    assert bad.exit_code == 2 and "Unknown" in bad.output and "nonsense" in bad.output


@pytest.mark.slow
def test_demo_runs_offline_on_the_bundled_model(tmp_path, no_network):
    result = CliRunner().invoke(app, ["demo", "--n-scan", "4", "--n-captions", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["trained"] and set(summary["baseline"]) == {"chair_s", "chair_i", "recall", "length"}
    assert "RANDOM" not in result.output
    frame = pd.read_csv(tmp_path / "head_stats.csv")
    assert len(frame) == 30 * 9  # SmolLM2: 30 layers x 9 heads


def test_device_option_places_model_and_inputs(tmp_path, no_network):
    """`eah-interp --device D cmd` loads the model on D and every runner feeds it inputs on D (CPU here: the
    only device CI has; the code path is the one a GPU takes)."""
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene

    result = CliRunner().invoke(app, ["--device", "cpu", "scan", "--model", "tiny-llava", "--n", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    bundle = load_model("tiny-llava", device="cpu")
    inputs = bundle.encode([bundle.caption_prompt], [make_scene(0).image])
    assert {v.device for v in inputs.values()} == {bundle.device}
    assert bundle.device == torch.device("cpu")
    bad = CliRunner().invoke(app, ["--device", "nonsense", "scan", "--model", "tiny-llava", "--n", "1", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "nonsense" in str(bad.exception)
