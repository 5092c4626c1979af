"""Cost of `hf.record_attention` on the bundled organism (CPU): statistics only vs a plain forward, every layer.

Issue 27: a researcher measured 17 s vs 7.8 s for 8 prompts when recording every layer. This times, in one
process and interleaved (one warm-up each, then ``--rounds`` rounds, each running every mode once, order
rotated), the same batch of ``--batch`` yes/no prompts on held-out scenes:

* ``plain``: the model's forward;
* ``stats_layer1``: `record_attention(model, [1], stats=HeadStats(...))` (one layer, statistics only);
* ``stats_all``: `record_attention(model, "all", stats=HeadStats(...))` (every layer, statistics only: no map
  is kept, each layer's statistics are accumulated over query chunks);
* ``patterns_all``: `record_attention(model, "all", keep_patterns=True)` (every layer's probability map kept);
* ``stats_patterns_all``: both (what a study that wants the maps and the statistics runs).

Reports the median seconds per mode and the ratio of medians to ``plain``, for wall time and for the process's
CPU time (`time.process_time`: on a machine shared with other jobs, wall time mostly measures the neighbours; the
CPU time of a single-threaded process does not count the time it waits for a core). With ``--profile`` it also
runs cProfile over ``stats_all`` and prints the functions with the largest own time.

    OMP_NUM_THREADS=1 python benchmarks/record_attention.py --rounds 5 --out docs/benchmarks_record_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

MODES = ("plain", "stats_layer1", "stats_all", "patterns_all", "stats_patterns_all")


def _runner(bundle, inputs, mode: str):
    from eah_interp import hf
    from eah_interp.head_stats import HeadStats

    model = bundle.model

    def run() -> None:
        with torch.no_grad():
            if mode == "plain":
                model(**inputs, use_cache=False)
                return
            layers = [1] if mode == "stats_layer1" else "all"
            stats = HeadStats(threshold=bundle.threshold) if "stats" in mode else None
            with hf.record_attention(model, layers, stats=stats, keep_patterns="patterns" in mode):
                model(**inputs, use_cache=False)

    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--profile", action="store_true", help="cProfile the stats_all mode and print the top functions")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from eah_interp.models import load_model
    from eah_interp.scenes import get_scene, question_for

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        torch.manual_seed(0)
        bundle = load_model("organism")
        scenes = [get_scene("heldout", 90_000 + i) for i in range(args.batch)]
        prompts = [bundle.yes_no_prompt(question_for(sorted(s.kinds)[0])) for s in scenes]
        inputs = bundle.encode(prompts, [s.image for s in scenes])
        runners = {mode: _runner(bundle, inputs, mode) for mode in args.modes}
        for run in runners.values():  # warm-up: kernels built, caches filled
            run()
        times: dict[str, list[float]] = {mode: [] for mode in args.modes}
        cpu: dict[str, list[float]] = {mode: [] for mode in args.modes}
        started = time.perf_counter()
        for round_ in range(args.rounds):
            order = args.modes[round_ % len(args.modes):] + args.modes[: round_ % len(args.modes)]
            for mode in order:
                t, c = time.perf_counter(), time.process_time()
                runners[mode]()
                times[mode].append(time.perf_counter() - t)
                cpu[mode].append(time.process_time() - c)
        wall = time.perf_counter() - started
        medians = {mode: statistics.median(v) for mode, v in times.items()}
        cpu_medians = {mode: statistics.median(v) for mode, v in cpu.items()}
        result = {
            "rounds": args.rounds, "batch": args.batch, "threads": args.threads,
            "tokens_per_prompt": int(inputs["input_ids"].shape[1]), "seconds": times, "cpu_seconds": cpu,
            "median_s": medians, "median_cpu_s": cpu_medians,
            "ratio_to_plain": {mode: medians[mode] / medians["plain"] for mode in medians} if "plain" in medians else {},
            "cpu_ratio_to_plain": ({mode: cpu_medians[mode] / cpu_medians["plain"] for mode in cpu_medians}
                                   if "plain" in cpu_medians else {}),
            "load_average": list(os.getloadavg()),
            "wall_s": wall, "machine": platform.platform(), "torch": torch.__version__,
        }
        if args.profile:
            import cProfile
            import io
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            runners["stats_all"]()
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            result["profile_stats_all"] = text.getvalue()
            print(text.getvalue())
    finally:
        torch.set_num_threads(before)
    print(json.dumps({k: v for k, v in result.items() if k not in ("seconds", "cpu_seconds", "profile_stats_all")},
                     indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
