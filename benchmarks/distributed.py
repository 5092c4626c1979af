"""Data-parallel scan: 2 processes (torchrun) vs 1, merged statistics vs the 1-process run, kill-and-resume cost.

    python benchmarks/distributed.py --out docs/benchmarks_distributed.json   # organism, 64 scenes (~6 min)
    python benchmarks/distributed.py --quick                                  # tiny-llava, 8 scenes (~1 min)

Every measured process runs one torch thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). Each
run is a fresh launch in a fresh output folder: the 1-process run is a plain ``python`` process, the
2-process run ``torchrun --standalone --nproc_per_node 2``; both run `eah_interp.distributed.scan` (what
``eah-interp scan`` calls) over the same held-out scenes with the same batch size.

* ``scan_seconds``: from the ranks entering `scan` together (model loaded, process group created) to
  the last rank leaving it (rank 0 after the barrier and the merge): the scan's own span, including
  rendering each rank's scenes; ``throughput = images / scan_seconds``.
* ``wall_seconds``: the whole launch (process start, imports, model load, scan, merge).
* ``ratio``: 2-process throughput / 1-process throughput (``efficiency = ratio / 2``); medians over
  ``--repeats`` pairs, the two launches of a pair run back to back in alternating order;
  ``pair_ratios``: the ratio within each pair (closer in time, so under more similar load).
* ``cpu_seconds``: CPU time of the scan phase summed over the ranks (``time.process_time``);
  ``cpu_efficiency = cpu_seconds_1 / cpu_seconds_2`` (1.0 = the 2-process run spends no extra CPU), a
  measure that does not depend on what else the machine runs.
* ``max_rel_diff``: the largest relative difference of any mean / std column of the merged
  ``head_stats.csv`` against the 1-process one (counts are compared exactly).
* Kill-and-resume: rank 1 is SIGKILLed inside the forward of its second batch; the same command is
  rerun. ``recomputed_images`` = images sent through the model over both runs minus the scan's images
  (a forward pre-hook logs every batch before it runs), per rank; the merged result is compared again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(args: argparse.Namespace) -> None:
    """One rank (or the single process): load, scan its shard, log timings and forwarded images."""
    import torch

    torch.set_num_threads(1)
    from eah_interp import distributed
    from eah_interp.head_stats import HeadStats
    from eah_interp.models import load_model, model_shape
    from eah_interp.models.tiny import scene_items

    rank = int(os.environ.get("RANK", "0"))
    log = Path(args.log)
    t0 = time.time()
    bundle = load_model(args.model)
    n_layers = model_shape(bundle.model)[0]

    def record(_module, _args, kwargs):
        with open(log / f"forwards.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"images": int(kwargs["input_ids"].shape[0])}) + "\n")

    bundle.model.register_forward_pre_hook(record, with_kwargs=True)
    if args.kill_rank == rank:  # SIGKILL in the middle of the second batch's forward
        original, calls = HeadStats.update_from_stats, [0]

        def update(self, layer, stats):
            calls[0] += 1
            if calls[0] == n_layers + n_layers // 2:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, layer, stats)

        HeadStats.update_from_stats = update  # type: ignore[method-assign]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the group `scan` would create, created first: the ranks
        import torch.distributed as dist  # start scanning together (model-load skew is in wall_seconds only)

        dist.init_process_group("gloo")
    t1, c1 = time.time(), time.process_time()
    result = distributed.scan(bundle, scene_items(args.n), args.scan_out, batch_size=args.batch_size,
                              progress=False, log=lambda _msg: None)
    t2, c2 = time.time(), time.process_time()
    (log / f"times.rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "start": t0, "scan_start": t1, "scan_end": t2, "cpu_seconds": c2 - c1, "merged": result.merged}))


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def launch(procs: int, model: str, n: int, batch: int, out: Path, log: Path, kill_rank: int = -1) -> dict:
    """Run the scan with ``procs`` processes; returns timings, forwarded images and whether it succeeded."""
    log.mkdir(parents=True, exist_ok=True)
    for f in log.glob("times.*"):
        f.unlink()
    spec = {"model": model, "n": n, "batch_size": batch, "scan_out": str(out), "log": str(log), "kill_rank": kill_rank}
    script = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]  # one argument: torchrun parses no flag of it
    if procs == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *script]
    t0 = time.time()
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    times = [json.loads(f.read_text()) for f in sorted(log.glob("times.rank*.json"))]
    row = {"procs": procs, "returncode": proc.returncode, "wall_seconds": round(wall, 2)}
    if proc.returncode == 0:
        span = max(t["scan_end"] for t in times) - min(t["scan_start"] for t in times)
        row.update(scan_seconds=round(span, 2), throughput=round(n / span, 4),
                   cpu_seconds=round(sum(t["cpu_seconds"] for t in times), 2))
    else:
        row["tail"] = (proc.stdout + proc.stderr)[-2000:]
    return row


def forwarded(log: Path) -> dict[int, int]:
    out = {}
    for f in sorted(log.glob("forwards.rank*.jsonl")):
        rank = int(f.name.split(".")[1][4:])
        out[rank] = sum(json.loads(line)["images"] for line in f.read_text().splitlines())
    return out


def compare(a: Path, b: Path) -> dict:
    """Counts (exactly) and the largest relative difference of the mean / std columns of two scans' statistics."""
    import math

    from eah_interp.distributed import SCAN_CHECKPOINT
    from eah_interp.head_stats import HeadStats

    fa, fb = HeadStats.load(a / SCAN_CHECKPOINT).to_frame(), HeadStats.load(b / SCAN_CHECKPOINT).to_frame()
    same_counts = fa[["layer", "head", "n"]].equals(fb[["layer", "head", "n"]])
    worst = 0.0
    for col in fa.columns[3:]:
        for x, y in zip(fa[col], fb[col], strict=True):
            if math.isnan(x) or math.isnan(y):
                same_counts &= math.isnan(x) and math.isnan(y)
            elif x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    sink_counts = bool(((fa.sink_count_mean - fb.sink_count_mean).abs() < 1e-9).all())
    return {"counts_identical": bool(same_counts), "sink_counts_identical": sink_counts, "max_rel_diff": worst}


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llava over 8 scenes (a smoke run)")
    ap.add_argument("--model", default=None, help="organism (default) or tiny-llava")
    ap.add_argument("--scenes", type=int, default=None, help="scenes (default 64; 8 with --quick)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (2 with --quick)")
    ap.add_argument("--repeats", type=int, default=1, help="timed pairs (1 and 2 processes, alternating)")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume measurement")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(argparse.Namespace(**json.loads(args.child)))
        return {}
    args.model = args.model or ("tiny-llava" if args.quick else "organism")
    args.n = args.scenes or (8 if args.quick else 64)
    args.batch_size = args.batch_size or (2 if args.quick else 8)
    work = Path(tempfile.mkdtemp(prefix="eah-distributed-"))
    result: dict = {"model": args.model, "n": args.n, "batch_size": args.batch_size, "threads_per_process": 1,
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "load_average_before": load_average(), "runs": []}
    print(f"load average before: {result['load_average_before']}", flush=True)
    try:
        for r in range(args.repeats):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for procs in order:
                out = work / f"p{procs}_r{r}"
                row = launch(procs, args.model, args.n, args.batch_size, out, work / f"log{procs}_r{r}")
                row["repeat"] = r
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
        ok = [row for row in result["runs"] if row["returncode"] == 0]
        by = {p: sorted(row["throughput"] for row in ok if row["procs"] == p) for p in (1, 2)}
        if by[1] and by[2]:
            t1, t2 = by[1][len(by[1]) // 2], by[2][len(by[2]) // 2]
            result.update(throughput_1=t1, throughput_2=t2, ratio=round(t2 / t1, 3), efficiency=round(t2 / t1 / 2, 3))
            result["pair_ratios"] = [
                round(next(row["throughput"] for row in ok if row["repeat"] == r and row["procs"] == 2)
                      / next(row["throughput"] for row in ok if row["repeat"] == r and row["procs"] == 1), 3)
                for r in range(args.repeats)
                if {row["procs"] for row in ok if row["repeat"] == r} == {1, 2}
            ]
            cpu = {p: sorted(row["cpu_seconds"] for row in ok if row["procs"] == p) for p in (1, 2)}
            c1, c2 = cpu[1][len(cpu[1]) // 2], cpu[2][len(cpu[2]) // 2]
            result.update(cpu_seconds_1=c1, cpu_seconds_2=c2, cpu_efficiency=round(c1 / c2, 3))
            result["equality"] = compare(work / "p1_r0", work / "p2_r0")
        if not args.no_kill:
            out, log = work / "killed", work / "log_killed"
            first = launch(2, args.model, args.n, args.batch_size, out, log, kill_rank=1)
            second = launch(2, args.model, args.n, args.batch_size, out, log)
            counts = forwarded(log)
            per_rank = {rank: len(range(rank, args.n, 2)) for rank in (0, 1)}
            result["kill_resume"] = {
                "killed_returncode": first["returncode"], "rerun_returncode": second["returncode"],
                "forwarded_images": counts, "recomputed_images": {r: counts.get(r, 0) - per_rank[r] for r in per_rank},
                "batch_size": args.batch_size, "equality": compare(work / "p1_r0", out) if second["returncode"] == 0 else None,
            }
            print(json.dumps(result["kill_resume"]), flush=True)
        result["load_average_after"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {k: result.get(k) for k in ("ratio", "efficiency", "pair_ratios", "throughput_1", "throughput_2",
                                          "cpu_efficiency", "equality")}
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
