"""Smoke test of the benchmark runner: ``benchmarks/run.py --quick`` runs every mode (in-process, seconds).

The benchmarks themselves are not part of the test suite; this only checks that the runner works and
that every mode produced a time (no error rows). See docs/benchmarks.md for the real numbers.
"""

import importlib.util
import json
import math
from pathlib import Path

import torch

RUNNER = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("eah_benchmarks_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_every_mode(tmp_path):
    run = _load_runner()
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    rows = run.main(["--quick", "--out", str(out), "--plot", str(tmp_path / "bench.png")])
    assert torch.get_num_threads() == threads  # the runner restores the thread count

    expected = {mode for modes in run.GROUPS.values() for mode in modes}
    assert {r["mode"] for r in rows} == expected
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    for row in rows:
        assert math.isfinite(row["seconds"]) and row["seconds"] > 0, row
        assert math.isfinite(row["act_mb"]), row
    saved = json.loads(out.read_text())
    assert len(saved["rows"]) == len(rows) and saved["summary"]
    assert (tmp_path / "bench.png").stat().st_size > 0
