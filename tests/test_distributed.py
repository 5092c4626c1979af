"""Past one process: shards, 2-process torchrun / accelerate launch scans, SIGKILL and rerun, --shard + merge.

The reference of every equality is a plain 1-process `scan_images` over the same images (no shards, no
checkpoints, no merge); merged results must equal it in counts exactly and in floats within 1e-6 relative.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from eah_interp import cli, distributed
from eah_interp.data import scene_dataset
from eah_interp.distributed import Shard, merge_items, merge_scan, read_checkpoint
from eah_interp.errors import ConfigError
from eah_interp.experiments import scan_images
from eah_interp.models import load_model
from eah_interp.models.tiny import scene_items
from eah_interp.resumable import read_items, recover_items

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
N, BATCH = 9, 2  # rank 0: items 0 2 4 6 8 (3 batches), rank 1: items 1 3 5 7 (2 batches)
LAYERS = 4  # tiny-llava's decoder layers: one HeadStats.update_from_stats call each per forward
#: Between the random model's sink scores (0.0218-0.0224), so that sink counts are not all 0 or all N.
THRESHOLD = "0.0221"
SCAN = ["scan", "--model", "tiny-llava", "-n", str(N), "--batch-size", str(BATCH), "--threshold", THRESHOLD]


@pytest.fixture(scope="module")
def names() -> list[str]:
    return [name for name, _ in scene_items(N)]


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    """An uninterrupted 1-process scan of the N images (`scan_images`, not the CLI or this module)."""
    images = [item.load_image() for item in cli._images(N, [], [])]
    stats = scan_images(load_model("tiny-llava"), images, threshold=float(THRESHOLD), batch_size=BATCH, progress=False)
    frame = stats.to_frame()
    assert (frame.n == N).all()
    assert 0 < frame.sink_count_mean.mean() < 16, "the threshold should make some, not all, image tokens sinks"
    return frame


def assert_same_frame(frame: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Same heads, identical counts (n and sink counts), other floats within 1e-6 relative."""
    assert list(frame.columns) == list(reference.columns)
    assert frame[["layer", "head", "n"]].equals(reference[["layer", "head", "n"]])
    for col in reference.columns[3:]:
        for got, want in zip(frame[col], reference[col], strict=True):
            if math.isnan(want):
                assert math.isnan(got), col
            else:
                assert abs(got - want) <= 1e-6 * abs(want) + 1e-12, (col, got, want)
    # sink counts are sums of integers: the means of the same integers in any grouping agree to rounding
    assert ((frame.sink_count_mean - reference.sink_count_mean).abs() < 1e-9).all()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    env.pop("EAH_TEST_FAULT", None)
    env.update(extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a test run inside a launcher must not leak its own rank into the children
    return env


def torchrun(args: list[str], *, worker: bool = False, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2`` of the CLI (``--no-python eah-interp`` as a user types it)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    script = shutil.which("eah-interp", path=str(Path(sys.executable).parent))
    if worker or script is None:
        command = launcher + [str(WORKER), *args]
    else:
        command = launcher + ["--no-python", script, *args]
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=300, cwd=ROOT)


def done_of(path: Path) -> list[str]:
    return read_checkpoint(path).done


# ---------------------------------------------------------------------------- shards
def test_shard_selection_parse_env_and_errors():
    items = list("abcdefg")
    assert Shard(0, 3).select(items) == ["a", "d", "g"] and Shard(2, 3).select(items) == ["c", "f"]
    assert sorted(x for i in range(3) for x in Shard(i, 3).select(items)) == items  # a partition
    assert Shard().select(items) == items and Shard(4, 5).select(items[:3]) == []
    assert Shard.parse(" 1/4 ") == Shard(1, 4) and str(Shard(1, 4)) == "1/4"
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="i/N"):
            Shard.parse(bad)
    assert Shard.from_env({}) == Shard() and Shard.from_env({"WORLD_SIZE": "1", "RANK": "0"}) == Shard()
    assert Shard.from_env({"WORLD_SIZE": "2", "RANK": "1"}) == Shard(1, 2, launched=True)
    with pytest.raises(ConfigError, match="RANK is not"):
        Shard.from_env({"WORLD_SIZE": "2"})
    assert Shard.resolve("1/3", {}) == Shard(1, 3, launched=False)
    with pytest.raises(ConfigError, match="one or the other"):
        Shard.resolve("0/2", {"WORLD_SIZE": "2", "RANK": "0"})
    assert "rank 0 merges" in Shard(1, 2, launched=True).describe() and "eah-interp merge" in Shard(1, 2).describe()
    assert Shard(1, 2).checkpoint_name == "scan_checkpoint.shard-1-of-2.safetensors"
    assert Shard().checkpoint_name == distributed.SCAN_CHECKPOINT
    assert distributed.items_path("o", Shard()) == Path("o/items.jsonl")
    assert distributed.items_path("o", Shard(1, 4)) == Path("o/items.shard-1-of-4.jsonl")


def test_a_shard_without_items_runs_nothing_and_leaves_the_merge_to_another_process(tmp_path):
    """Fewer items than shards: the empty shard does not call the runner (which refuses an empty dataset)."""
    calls, said = [], []
    got = distributed.run_sharded(lambda chosen, name: calls.append((list(chosen), name)), ["a", "b"], tmp_path,
                                  distributed.Shard(3, 4), log=said.append)
    assert got is None and calls == [] and said == ["shard 3/4: no items of the 2 fall to this shard"]
    distributed.run_sharded(lambda chosen, name: calls.append((list(chosen), name)), ["a", "b"], tmp_path,
                            distributed.Shard(1, 4), log=said.append)
    assert calls == [(["b"], distributed.items_path(tmp_path, distributed.Shard(1, 4)).name)]


def test_a_launched_shard_without_a_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        with distributed.process_group(Shard(0, 2, launched=True)):
            pass
    with distributed.process_group(Shard(1, 2)) as barrier:  # a --shard job: no group, the barrier is a no-op
        barrier()


def test_scan_refuses_duplicate_names_and_another_dataset(tmp_path):
    bundle = load_model("tiny-llava")
    with pytest.raises(ConfigError, match="appears twice"):
        distributed.scan(bundle, [("a", None), ("a", None)], tmp_path, shard=Shard())
    items = [(name, loader) for name, loader in scene_items(2)]
    first = distributed.scan(bundle, items, tmp_path, shard=Shard(), dataset="coco val2014", progress=False)
    assert first.merged and first.stats.n_examples(0) == 2 and first.stats.model == "tiny-llava"
    with pytest.raises(ConfigError, match="different scan.*images: checkpoint 'coco val2014', now 'scenes'"):
        distributed.scan(bundle, items, tmp_path, shard=Shard(), dataset="scenes", progress=False)


# ---------------------------------------------------------------------------- items (eval)
def test_logs_under_one_header_file(tmp_path):
    """Two shard logs share run.json as their header: other arguments are refused, records stay when the
    header is rewritten, a log whose header file is gone is refused, and a cut last line is dropped on open."""
    from eah_interp.resumable import ResumableLog

    header = tmp_path / "run.json"
    logs = [ResumableLog(tmp_path / f"items.shard-{i}-of-2.jsonl", "evaluation", {"model": "m"}, header=header)
            for i in range(2)]
    assert logs[0].open() == (None, [])
    logs[0].start(conditions=["baseline"])
    logs[0].append({"k": 1}, {"k": 2})
    logs[1].append({"k": 3})
    logs[1].path.write_text(logs[1].path.read_text() + '{"k": 4')  # killed mid-write
    logs[1].start(conditions=["baseline", "eah"])  # a resumed run with a new arm: the header only is replaced
    assert json.loads(header.read_text()) == {"kind": "evaluation", "arguments": {"model": "m"},
                                              "conditions": ["baseline", "eah"]}
    assert logs[0].open()[1] == [{"k": 1}, {"k": 2}] and logs[1].open()[1] == [{"k": 3}]
    assert logs[1].path.read_text() == '{"k": 3}\n'
    with pytest.raises(ConfigError, match=r"other arguments \(model: saved 'm', now 'n'\)"):
        ResumableLog(logs[1].path, "evaluation", {"model": "n"}, header=header).open()
    header.unlink()
    with pytest.raises(ConfigError, match="header .*run.json is missing"):
        logs[0].open()
    assert not list(tmp_path.glob("*.tmp"))


def _write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_text("\n".join(lines) + end)
    return path


def test_merge_items_by_key_without_duplicates_in_a_fixed_order(tmp_path):
    rows = [{"condition": c, "task": "pope", "item": i, "question": q, "answer": f"{c}{i}{q}"}
            for c in ("baseline", "eah") for i in (2, 10) for q in ("dog", "cat")]
    a = _write(tmp_path / "a.jsonl", [json.dumps(r) for r in rows[:5]])
    # shard b repeats one item of a (a resumed shard re-wrote it) and was killed while appending its last line
    b = _write(tmp_path / "b.jsonl", [json.dumps(r) for r in rows[4:]] + ['{"condition": "eah", "ta'], end="")
    items, cut = read_items(b)
    assert cut and len(items) == 4
    out = merge_items([b, a], tmp_path / "merged.jsonl")
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    # hand-sorted: condition, task, item as a number (2 before 10), question
    expected = sorted(rows, key=lambda r: (r["condition"], r["task"], r["item"], r["question"]))
    assert merged == expected and len(merged) == 8
    assert merge_items([a, b], tmp_path / "again.jsonl").read_text() == out.read_text()  # input order is irrelevant
    assert not list(tmp_path.glob("*.tmp"))

    clash = _write(tmp_path / "c.jsonl", [json.dumps(dict(rows[0], answer="other"))])
    with pytest.raises(ConfigError, match="different items"):
        merge_items([a, clash], tmp_path / "x.jsonl")
    broken = _write(tmp_path / "d.jsonl", ["{not json", json.dumps(rows[0])])
    with pytest.raises(ConfigError, match="line 1"):
        merge_items([broken], tmp_path / "x.jsonl")
    keyless = _write(tmp_path / "e.jsonl", [json.dumps({"answer": "yes"})])
    with pytest.raises(ConfigError, match="none of the key fields"):
        merge_items([keyless], tmp_path / "x.jsonl")
    # resuming an items file a kill cut off: the cut line is removed before anything is appended
    assert recover_items(tmp_path / "none.jsonl") == []
    recovered = recover_items(b)
    assert recovered == items and b.read_text().endswith("\n") and b.read_text().count("\n") == 4
    with b.open("a") as f:
        f.write(json.dumps(rows[0]) + "\n")
    assert read_items(b) == (items + [rows[0]], False)
    assert recover_items(a) == rows[:5] and a.read_text().count("\n") == 5  # a whole file: untouched
    # from the command line: items only (no scan shards in the folder)
    result = CliRunner().invoke(cli.app, ["merge", str(tmp_path), "--items", str(a), "--items", str(b)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "items.jsonl").read_text() == out.read_text()


# ---------------------------------------------------------------------------- --shard i/N jobs + merge
def test_shard_jobs_then_merge_equal_one_process(tmp_path, names, reference):
    runner = CliRunner()
    outs = [tmp_path / f"job{i}" for i in range(3)]
    for i, out in enumerate(outs[:2]):
        result = runner.invoke(cli.app, [*SCAN, "--shard", f"{i}/3", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert "eah-interp merge" in result.output and not (out / "head_stats.csv").exists()
    assert done_of(outs[1] / "scan_checkpoint.shard-1-of-3.safetensors") == [names[1], names[4], names[7]]

    missing = runner.invoke(cli.app, ["merge", str(outs[0]), str(outs[1]), "--out", str(tmp_path / "m")])
    assert missing.exit_code != 0 and "2/3" in missing.output and "missing" in missing.output
    # the third job first ran with -n 6 (images 2 and 5: one batch, as in the reference), then -n 9 extends it
    state = tmp_path / "partial"
    first = runner.invoke(cli.app, [*SCAN, "--shard", "2/3", "--out", str(state), "-n", "6"])
    assert first.exit_code == 0
    result = runner.invoke(cli.app, [*SCAN, "--shard", "2/3", "--out", str(state)])
    assert result.exit_code == 0 and "2 of 3 images already counted" in result.output
    shutil.copytree(state, outs[2])
    assert done_of(outs[2] / "scan_checkpoint.shard-2-of-3.safetensors") == [names[2], names[5], names[8]]

    merged = runner.invoke(cli.app, ["merge", *map(str, outs), "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    assert_same_frame(pd.read_csv(tmp_path / "m" / "head_stats.csv"), reference)
    whole = read_checkpoint(tmp_path / "m" / distributed.SCAN_CHECKPOINT)
    assert whole.done == names and whole.complete and whole.shard == Shard()
    # a 1-process scan in the merged folder resumes from the merge: nothing left to count
    again = runner.invoke(cli.app, [*SCAN, "--out", str(tmp_path / "m")])
    assert again.exit_code == 0 and f"{N} of {N} images already counted" in again.output
    assert_same_frame(pd.read_csv(tmp_path / "m" / "head_stats.csv"), reference)


def test_merge_refuses_mixed_incomplete_or_overlapping_shards(tmp_path):
    """Every refusal of `merge_scan`, on real shard checkpoints of tiny-llava scans."""
    runner = CliRunner()
    small = [*SCAN[:-2], "-n", "4"]  # without --threshold: the model's own
    for i in range(2):
        assert runner.invoke(cli.app, [*small, "--shard", f"{i}/2", "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(cli.app, [*small, "--threshold", "0.5", "--shard", "1/2", "--out", str(tmp_path / "b")]).exit_code == 0
    with pytest.raises(ConfigError, match="different scan.*threshold"):
        merge_scan([tmp_path / "a" / "scan_checkpoint.shard-0-of-2.safetensors", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(ConfigError, match="appears twice"):
        merge_scan([tmp_path / "a", tmp_path / "a" / "scan_checkpoint.shard-1-of-2.safetensors"], tmp_path / "m")
    assert runner.invoke(cli.app, [*small, "--shard", "0/3", "--out", str(tmp_path / "c")]).exit_code == 0
    with pytest.raises(ConfigError, match="different shard counts"):
        merge_scan([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="No shard checkpoints"):
        merge_scan([tmp_path / "empty"], tmp_path / "m")
    # a checkpoint whose statistics do not match its list of counted images
    full = read_checkpoint(tmp_path / "a" / "scan_checkpoint.shard-1-of-2.safetensors")
    distributed.write_checkpoint(tmp_path / "bad" / "scan_checkpoint.shard-1-of-2.safetensors", full.stats, full.config,
                                 full.shard, full.done[:1], full.planned)
    with pytest.raises(ConfigError, match="inconsistent"):
        merge_scan([tmp_path / "a" / "scan_checkpoint.shard-0-of-2.safetensors", tmp_path / "bad"], tmp_path / "m")
    # a shard that has counted 1 of its 2 images (interrupted after its first batch of 1)
    assert runner.invoke(cli.app, [*small[:-2], "-n", "2", "--shard", "1/2", "--out", str(tmp_path / "d")]).exit_code == 0
    half = read_checkpoint(tmp_path / "d" / "scan_checkpoint.shard-1-of-2.safetensors")
    distributed.write_checkpoint(half.path, half.stats, half.config, half.shard, half.done, full.planned)
    with pytest.raises(ConfigError, match="has counted 1 of its 2 images"):
        merge_scan([tmp_path / "a" / "scan_checkpoint.shard-0-of-2.safetensors", tmp_path / "d"], tmp_path / "m")
    assert merge_scan([tmp_path / "a" / "scan_checkpoint.shard-0-of-2.safetensors", tmp_path / "d"], tmp_path / "m",
                      partial=True).n_examples(0) == 3


def test_shard_option_inside_a_launcher_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliRunner().invoke(cli.app, [*SCAN, "--shard", "0/2", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "one or the other" in result.output
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- launched: torchrun, accelerate
def test_torchrun_two_processes_equal_one_process(tmp_path, names, reference):
    result = torchrun([*SCAN, "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_frame(pd.read_csv(tmp_path / "head_stats.csv"), reference)
    assert done_of(tmp_path / "scan_checkpoint.shard-0-of-2.safetensors") == names[0::2]
    assert done_of(tmp_path / "scan_checkpoint.shard-1-of-2.safetensors") == names[1::2]
    assert done_of(tmp_path / distributed.SCAN_CHECKPOINT) == names
    assert (tmp_path / "sink_density.png").stat().st_size > 0


def test_sigkill_of_one_rank_then_rerun_equals_the_uninterrupted_run(tmp_path, names, reference):
    shard1 = tmp_path / "scan_checkpoint.shard-1-of-2.safetensors"
    # run 1: rank 1 is SIGKILLed inside its second batch's forward (after 2 of its 4 layers)
    killed = torchrun([*SCAN, "--out", str(tmp_path)], worker=True, EAH_TEST_FAULT=f"1:layer:{LAYERS + 2}")
    assert killed.returncode != 0 and not (tmp_path / "head_stats.csv").exists()
    assert done_of(shard1) == [names[1], names[3]]  # the finished batch is kept, the killed one is lost
    assert read_checkpoint(shard1).stats.n_examples(0) == 2
    # run 2: rank 1 is SIGKILLed between writing its next checkpoint's temporary file and replacing
    # (its 1st replace is the resumed plan, its 2nd the first batch): the old checkpoint stays whole
    killed = torchrun([*SCAN, "--out", str(tmp_path)], worker=True, EAH_TEST_FAULT="1:replace:2")
    assert killed.returncode != 0 and not (tmp_path / "head_stats.csv").exists()
    assert done_of(shard1) == [names[1], names[3]] and read_checkpoint(shard1).stats.n_examples(0) == 2
    assert list(tmp_path.glob(shard1.name + ".*.tmp"))  # the unfinished write, never read
    # run 3: the same command, no fault
    result = torchrun([*SCAN, "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_frame(pd.read_csv(tmp_path / "head_stats.csv"), reference)
    assert done_of(shard1) == names[1::2]
    assert done_of(tmp_path / "scan_checkpoint.shard-0-of-2.safetensors") == names[0::2]
    assert done_of(tmp_path / distributed.SCAN_CHECKPOINT) == names  # every image once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes_equal_one_process(tmp_path, names, reference):
    pytest.importorskip("accelerate")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), *SCAN, "--out", str(tmp_path)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_frame(pd.read_csv(tmp_path / "head_stats.csv"), reference)
    assert done_of(tmp_path / distributed.SCAN_CHECKPOINT) == names


# ---------------------------------------------------------------------------- data-parallel eval
#: One item a batch, so that every result is computed alone whichever shard computes it.
EVAL = ["eval", "--model", "tiny-llava", "-n", "3", "--arm", "eah_paper", "--beams", "1", "--max-new-tokens", "2",
        "--bootstrap", "50", "--batch-size", "1"]


def _results(path: Path) -> dict[tuple, dict]:
    """The items of a results file by key, refusing duplicate keys."""
    items, _ = read_items(path)
    keyed = {distributed.item_key(item): item for item in items}
    assert len(keyed) == len(items), "a result was written twice"
    return keyed


@pytest.fixture(scope="module")
def one_process_eval(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval-one")
    result = CliRunner().invoke(cli.app, [*EVAL, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _same_values(a: Path, b: Path) -> None:
    """Same metric values in two reports (the CIs resample items in file order, which merging sorts)."""
    want = pd.read_csv(a / "results.csv").set_index(["condition", "metric"])["value"]
    got = pd.read_csv(b / "results.csv").set_index(["condition", "metric"])["value"]
    pd.testing.assert_series_equal(got.sort_index(), want.sort_index())


def test_eval_shard_jobs_then_a_plain_rerun_equal_one_process(tmp_path, one_process_eval):
    out = tmp_path / "sharded"
    for i in range(2):
        result = CliRunner().invoke(cli.app, [*EVAL, "--out", str(out), "--shard", f"{i}/2"])
        assert result.exit_code == 0, result.output
        assert "rerun this command without --shard" in result.output
    assert not (out / "items.jsonl").exists() and not (out / "report.md").exists()
    shard0, shard1 = _results(out / "items.shard-0-of-2.jsonl"), _results(out / "items.shard-1-of-2.jsonl")
    names = [item.id for item in scene_dataset(3)]  # held-out scenes: item i to shard i mod 2
    assert {k[2] for k in shard0} == {names[0], names[2]} and {k[2] for k in shard1} == {names[1]}
    generated = []
    original = cli.__dict__.get("_load")

    def counting_load(*args, **kwargs):
        bundle = original(*args, **kwargs)
        real = bundle.model.generate
        bundle.model.generate = lambda *a, **k: generated.append(1) or real(*a, **k)
        return bundle

    cli._load = counting_load
    try:
        result = CliRunner().invoke(cli.app, [*EVAL, "--out", str(out)])
    finally:
        cli._load = original
    assert result.exit_code == 0, result.output
    assert "merged 2 shard result file(s)" in result.output
    assert generated == []  # nothing recomputed: the plain rerun only merged and reported
    assert _results(out / "items.jsonl") == _results(one_process_eval / "items.jsonl")
    _same_values(one_process_eval, out)


def test_torchrun_eval_equals_one_process(tmp_path, one_process_eval):
    result = torchrun([*EVAL, "--out", str(tmp_path)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _results(tmp_path / "items.jsonl") == _results(one_process_eval / "items.jsonl")
    _same_values(one_process_eval, tmp_path)
    assert (tmp_path / "report.md").exists()


def test_sigkill_of_one_eval_rank_then_rerun_equals_one_process(tmp_path, one_process_eval):
    # run 1: rank 1 is SIGKILLed when it starts its second caption batch (its first item's captions are kept)
    killed = torchrun([*EVAL, "--out", str(tmp_path)], worker=True, EAH_TEST_FAULT="1:generate:2")
    assert killed.returncode != 0 and not (tmp_path / "report.md").exists()
    partial = _results(tmp_path / "items.shard-1-of-2.jsonl")
    assert 0 < len(partial) < len(_results(one_process_eval / "items.jsonl")) // 2
    # run 2: the same command, no fault: every result once, equal to the uninterrupted run
    result = torchrun([*EVAL, "--out", str(tmp_path)], worker=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _results(tmp_path / "items.jsonl") == _results(one_process_eval / "items.jsonl")
    _same_values(one_process_eval, tmp_path)


# ---------------------------------------------------------------------------- nnsight remote execution
class _Server:
    """What an NDIF server resolves persistent ids against (as nnsight's ``Remotable._remoteable_persistent_objects``)."""

    def __init__(self, nn_model) -> None:
        self.nn_model = nn_model

    def _remoteable_persistent_objects(self) -> dict:
        objects = {"Interleaver": self.nn_model.interleaver}
        for envoy in self.nn_model.modules():
            objects[f"Module:{envoy.path}"] = envoy._module
        return objects


@pytest.fixture(scope="module")
def remote_setup():
    import torch
    from nnsight import NNsight

    from eah_interp import EAH, TokenLayout
    from eah_interp.models.tiny import TINY_IMAGE_TOKEN_ID, sharp_tiny_llava, tiny_llava_inputs

    model = sharp_tiny_llava()
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    torch.set_num_threads(1)
    return model, NNsight(model), inputs, layout, EAH.paper(threshold=0.02)


def test_eah_trace_body_ships_only_its_arguments(remote_setup):
    """The block nnsight would send to a server references the package, the model's envoys, the config and the
    layout (plain tensors) only: no local function, closure or object of the caller."""
    import torch
    from nnsight.intervention.envoy import Envoy
    from nnsight.intervention.serialization import reduce_block
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.backend import Backend

    import eah_interp.nnsight as ens
    from eah_interp import EAH, TokenLayout

    model, nn_model, inputs, layout, config = remote_setup
    shipped = {}

    class Capture(Backend):  # stands in for RemoteBackend: build the payload, run nothing
        def __call__(self, tracer) -> None:
            frame = tracer.info.frame
            shipped["block"] = reduce_block(tracer.node, frame.f_globals, dict(frame.f_locals))
            shipped["bytes"] = len(RequestModel.serialize(tracer))

    local_helper = lambda: 0  # noqa: E731  (a local object the body does not use: must not be shipped)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False, backend=Capture()):
        records = ens.eah(nn_model, config, layout)  # noqa: F841
        logits = nn_model.output.logits.save()  # noqa: F841
    assert "records" not in locals()  # Capture only built the payload; nothing ran here
    assert local_helper() == 0
    source, globals_, locals_ = shipped["block"]
    assert "ens.eah(nn_model, config, layout)" in source
    captured = {**globals_, **locals_}
    assert set(captured) == {"ens", "nn_model", "config", "layout"}, sorted(captured)
    assert captured["ens"] is ens and isinstance(captured["nn_model"], Envoy)
    assert isinstance(captured["config"], EAH) and isinstance(captured["layout"], TokenLayout)
    for field in vars(captured["layout"]).values():
        assert field is None or isinstance(field, torch.Tensor | int | float | str | tuple), type(field)
    # the weights travel as persistent ids (the server's own model), not in the payload
    n_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert shipped["bytes"] < n_weight_bytes / 4, (shipped["bytes"], n_weight_bytes)


def test_eah_runs_under_nnsights_remote_serialisation(remote_setup, monkeypatch):
    """``remote="local"`` semantics: serialise the trace, deserialise it with the caller's own modules hidden
    (eah_interp counted as installed on the server), run it; equals `hf.eah` on the plain model."""
    import torch
    from nnsight.intervention.backends import local as nn_local

    import eah_interp.nnsight as ens
    from eah_interp import hf

    model, nn_model, inputs, layout, config = remote_setup
    monkeypatch.setattr(nn_local, "_SERVER_MODULES", nn_local._SERVER_MODULES | {"eah_interp"})
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False, backend=nn_local.LocalSimulationBackend(_Server(nn_model))):
        nn_run = ens.eah(nn_model, config, layout)
        logits = nn_model.output.logits.save()
    records = nn_run.records
    with torch.no_grad(), hf.eah(model, config) as run:
        want = model(**inputs, use_cache=False).logits
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(logits[mask], want[mask], atol=1e-5)
    assert [r.source_head.tolist() for r in records] == [r.source_head.tolist() for r in run.records]
    assert [r.eah.sink_counts.tolist() for r in records] == [r.eah.sink_counts.tolist() for r in run.records]
    assert any(r.eah.sink_counts.sum() > 0 for r in records)  # the edit did something to compare
