"""`eah-interp scan` survives interruption: exact HeadStats save/load, checkpoint after every batch, resume."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from eah_interp import cli
from eah_interp.errors import ConfigError
from eah_interp.experiments import scan_images
from eah_interp.head_stats import STATISTICS, HeadStats
from eah_interp.models import load_model

N, BATCH = 5, 2  # batches of the scan: [0, 1], [2, 3], [4]


def random_stats(stats: HeadStats, seed: int, n_layers: int = 3, n_heads: int = 4) -> HeadStats:
    g = torch.Generator().manual_seed(seed)
    for layer in range(n_layers):
        values = {name: torch.rand(3, n_heads, generator=g, dtype=torch.float64) * 7 for name in STATISTICS}
        values["image_mass_text"][1, 2] = math.nan  # a row without text queries: skipped for that head
        stats.update_from_stats(layer, values)
    return stats


def assert_same_state(a: HeadStats, b: HeadStats) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype == torch.float64
        assert torch.equal(sa[key], sb[key]), key
    assert (a.threshold, a.normalise) == (b.threshold, b.normalise)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame(), check_exact=True)


def test_head_stats_save_load_round_trip_is_exact(tmp_path):
    stats = random_stats(HeadStats(threshold=0.1 + 1e-17 + 1 / 3, normalise="official"), seed=0)
    loaded = HeadStats.load(stats.save(tmp_path / "stats.safetensors", metadata={"note": "kept"}))
    assert_same_state(stats, loaded)
    assert loaded.threshold == stats.threshold and repr(loaded) == repr(stats)
    # the restored accumulator continues exactly like the original
    random_stats(stats, seed=1)
    random_stats(loaded, seed=1)
    assert_same_state(stats, loaded)
    # in memory too, and an empty accumulator
    copy = HeadStats(stats.threshold, stats.normalise)
    copy.load_state_dict(stats.state_dict())
    assert_same_state(stats, copy)
    assert HeadStats.load(HeadStats().save(tmp_path / "empty.safetensors")).layers == []
    with safe_open(str(tmp_path / "stats.safetensors"), framework="pt") as f:
        assert f.metadata()["note"] == "kept"
    assert not list(tmp_path.glob("*.tmp"))  # atomic write: no temporary file left behind


def test_head_stats_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="not a HeadStats file"):
        HeadStats.load(tmp_path / "other.safetensors")
    state = random_stats(HeadStats(), seed=0).state_dict()
    del state["1.entropy.m2"]
    with pytest.raises(ConfigError, match="missing"):
        HeadStats().load_state_dict(state)


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted scan of the same N images, computed by `scan_images` (not by the CLI)."""
    bundle = load_model("tiny-llava")
    images = [item.load_image() for item in cli._images(N, [], [])]
    return scan_images(bundle, images, batch_size=BATCH, progress=False)


def scan(out, *extra):
    return CliRunner().invoke(
        cli.app, ["scan", "--model", "tiny-llava", "--n", str(N), "--batch-size", str(BATCH), "--out", str(out), *extra]
    )


def checkpoint_done(out) -> list[str]:
    with safe_open(str(out / cli.SCAN_CHECKPOINT), framework="pt") as f:
        return json.loads(f.metadata()["scan_done"])


def test_interrupted_scan_resumes_to_the_uninterrupted_statistics(tmp_path, monkeypatch, reference):
    names = [item.id for item in cli._images(N, [], [])]
    original = HeadStats.update_from_stats
    calls = []

    def interrupt(self, layer, stats):  # dies inside the second batch's forward, after 2 of its 4 layers
        calls.append(layer)
        if len(calls) == 4 + 3:
            raise KeyboardInterrupt
        original(self, layer, stats)

    with monkeypatch.context() as m:
        m.setattr(HeadStats, "update_from_stats", interrupt)
        result = scan(tmp_path)
    assert result.exit_code != 0 and not (tmp_path / "head_stats.csv").exists()
    assert checkpoint_done(tmp_path) == names[:2]  # the last finished batch
    assert HeadStats.load(tmp_path / cli.SCAN_CHECKPOINT).n_examples(0) == 2

    result = scan(tmp_path)
    assert result.exit_code == 0, result.output
    assert "2 of 5 images already counted" in result.output
    assert checkpoint_done(tmp_path) == names  # every image once, in order
    resumed = HeadStats.load(tmp_path / cli.SCAN_CHECKPOINT)
    assert all(resumed.n_examples(layer) == N for layer in resumed.layers)
    assert_same_state(resumed, reference)  # bit-for-bit: same batches, same sums
    frame = pd.read_csv(tmp_path / "head_stats.csv")
    assert (frame["n"] == N).all()

    # rerunning a finished scan counts nothing again
    again = scan(tmp_path)
    assert again.exit_code == 0 and "5 of 5" in again.output
    assert_same_state(HeadStats.load(tmp_path / cli.SCAN_CHECKPOINT), reference)


def test_a_different_scan_config_is_an_error_and_no_resume_starts_over(tmp_path, reference):
    assert scan(tmp_path).exit_code == 0
    before = (tmp_path / cli.SCAN_CHECKPOINT).read_bytes()
    other = scan(tmp_path, "--threshold", "0.5")
    assert other.exit_code != 0 and "different scan" in other.output and "threshold" in other.output
    fewer = CliRunner().invoke(cli.app, ["scan", "--model", "tiny-llava", "--n", "2", "--out", str(tmp_path)])
    assert fewer.exit_code != 0 and "un-count" in fewer.output
    assert (tmp_path / cli.SCAN_CHECKPOINT).read_bytes() == before  # errors leave the checkpoint alone
    fresh = scan(tmp_path, "--threshold", "0.5", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    restarted = HeadStats.load(tmp_path / cli.SCAN_CHECKPOINT)
    assert restarted.threshold == 0.5 and restarted.n_examples(0) == N


def test_a_larger_n_extends_a_finished_scan(tmp_path):
    names = [item.id for item in cli._images(N, [], [])]
    first = CliRunner().invoke(cli.app, ["scan", "--model", "tiny-llava", "--n", "3", "--batch-size", "1", "--out", str(tmp_path)])
    assert first.exit_code == 0, first.output
    result = CliRunner().invoke(cli.app, ["scan", "--model", "tiny-llava", "--n", str(N), "--batch-size", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert checkpoint_done(tmp_path) == names
    one_by_one = scan_images(load_model("tiny-llava"), [item.load_image() for item in cli._images(N, [], [])], batch_size=1, progress=False)
    assert_same_state(HeadStats.load(tmp_path / cli.SCAN_CHECKPOINT), one_by_one)
