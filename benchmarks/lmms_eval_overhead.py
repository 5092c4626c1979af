"""The lmms-eval plugin's cost: wrapper overhead vs the plain base model, and memory over a long task.

    python benchmarks/lmms_eval_overhead.py --out docs/benchmarks_lmms_eval.json       # ~5 min on 2 shared cores
    python benchmarks/lmms_eval_overhead.py --quick                                    # smoke run, ~1 min

Needs lmms-eval (``pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3``). Model: the tiny
``save_pretrained`` LLaVA of the tests (`eah_interp.models.tiny.save_tiny_checkpoint`); task: the local
POPE task of ``tests/lmms_tasks.py`` (real photos, 8 questions, repeated to ``--samples``), 8 new tokens
per answer, batch size 1, CPU.

Overhead, in one process: lmms-eval's ``simple_evaluate`` on one pre-loaded model object per arm
(``llava_hf``; ``eah`` with ``interventions=none``; ``eah`` with ``interventions=eah+pai``), the arms
interleaved ``--repeats`` times over ``--overhead-samples`` requests after a warm-up; the ratio of the
median wall times (and of the median process CPU times) eah / llava_hf. A tiny model makes the wrapper's
fixed per-request cost as visible as it can be: on a 7B model the same cost is a far smaller fraction.

Memory: ``--samples`` requests through ``eah`` with ``eah+pai`` and through plain ``llava_hf``, the process
RSS after every request (the plugin's ``_call``, or the base's ``generate_until``) and, at the end, how many
`InterventionRecord` / `EditRecord` objects are still alive (0 if records are dropped per request).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from benchmarks.run import rss_mb  # noqa: E402  (this process's resident set size in MB)


def alive(*types: type) -> int:
    return sum(isinstance(o, types) for o in gc.get_objects())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=200, help="requests of the memory runs")
    parser.add_argument("--overhead-samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.overhead_samples, args.repeats = 24, 8, 2

    import torch

    torch.set_num_threads(1)
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from eah_interp.edit import EditRecord
    from eah_interp.integrations import lmms_eval as plugin
    from eah_interp.interventions import InterventionRecord
    from eah_interp.models.tiny import save_tiny_checkpoint
    from tests.lmms_tasks import POPE_TASK, write_tasks

    work = Path(tempfile.mkdtemp(prefix="eah-lmms-bench-"))
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf")
    checkpoint = save_tiny_checkpoint("llava", work / "llava")
    tasks = write_tasks(work / "tasks", pope_repeat=max(1, -(-args.samples // 8)))
    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False)
    common = f"pretrained={checkpoint},device_map=cpu"
    config = {"batch_size": 1, "device": "cpu"}
    arms = {
        "llava_hf": get_model("llava_hf").create_from_arg_string(common, config),
        "eah none": get_model("eah").create_from_arg_string(f"{common},interventions=none", config),
        "eah eah+pai": get_model("eah").create_from_arg_string(f"{common},interventions=eah+pai", config),
    }

    for lm in arms.values():  # simple_evaluate ends with lm.clean(), which deletes the model: keep it for reuse
        object.__setattr__(lm, "clean", lambda: None)

    def run(lm, limit: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        simple_evaluate(model=lm, tasks=[POPE_TASK], limit=limit, log_samples=True, task_manager=manager,
                        verbosity="WARNING", bootstrap_iters=0)
        return time.perf_counter() - wall, time.process_time() - cpu

    report: dict = {
        "command": "python benchmarks/lmms_eval_overhead.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
        "model": "tiny save_pretrained LLaVA (4 layers, 16 image tokens), POPE prompt, 8 new tokens, batch 1",
    }

    # ---------------------------------------------------------------- overhead
    for lm in arms.values():
        run(lm, 4)  # warm-up
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in arms}
    for _ in range(args.repeats):
        for name, lm in arms.items():
            wall, cpu = run(lm, args.overhead_samples)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu)
    medians = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    report["overhead"] = {
        "requests_per_run": args.overhead_samples,
        "repeats": args.repeats,
        "median_seconds": medians,
        "ratio_vs_llava_hf": {
            name: {k: medians[name][k] / medians["llava_hf"][k] for k in ("wall", "cpu")} for name in arms
        },
        "runs": times,
    }
    print(json.dumps(report["overhead"]["ratio_vs_llava_hf"], indent=1), flush=True)

    # ---------------------------------------------------------------- memory
    memory = {}
    for name in ("llava_hf", "eah eah+pai"):
        lm = arms[name]
        trace: list[float] = []
        # per request: the plugin's _call (one request each); the plain base answers a whole task in one
        # generate_until call, so its model's generate is traced instead (one call per request)
        target, method = (lm.model, "generate") if name == "llava_hf" else (lm, "_call")
        original = getattr(target, method)

        def traced(*a, _original=original, _trace=trace, **kw):
            out = _original(*a, **kw)
            _trace.append(rss_mb())
            return out

        object.__setattr__(target, method, traced)
        gc.collect()
        start = rss_mb()
        run(lm, args.samples)
        object.__delattr__(target, method)
        gc.collect()
        n = len(trace)
        tenth = max(1, n // 10)
        memory[name] = {
            "requests": n,
            "rss_mb_before": round(start, 1),
            "rss_mb_after_first_10pct": round(statistics.median(trace[:tenth]), 1),
            "rss_mb_last_10pct": round(statistics.median(trace[-tenth:]), 1),
            "growth_mb_first_to_last_10pct": round(statistics.median(trace[-tenth:]) - statistics.median(trace[:tenth]), 1),
            "rss_mb_every_20": [round(x, 1) for x in trace[::20]],
            "records_alive_after": alive(InterventionRecord, EditRecord),
        }
        print(name, json.dumps(memory[name]), flush=True)
    report["memory"] = memory
    report["plugin"] = plugin.__name__
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
