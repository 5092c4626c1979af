"""Attribution patching vs activation patching on the organism: the full head x position-group sweep.

    python benchmarks/attribution.py --out docs/benchmarks_attribution.json --plot docs/benchmarks_attribution.png
    python benchmarks/attribution.py --quick        # smoke run: tiny random LLaVA, seconds

Both methods produce the same table: every (direction, layer, head, position group) of the language
model, i.e. ``2 x 30 x 9 x 4 = 2,160`` rows on the organism (`eah_interp.patching.sweep` with an
`NNsightPatcher`: one forward per row plus two collecting forwards; `eah_interp.attribution.
attribution_patching`: one forward + backward per run). Inputs: the yes/no prompt of
docs/patching.md's example (scene 100000001, "Is there a triangle in the image?"), the metric
``LogitDiff(bundle.yes_ids, bundle.no_ids)``, EAH ``EAH.paper(threshold=bundle.threshold)``.

Timing, in one process: the full attribution sweep ``--repeats`` times after one warm-up (median), then
the activation sweep once. Both the wall clock and the process CPU time (``time.process_time``, robust
to other jobs on a shared machine) are recorded; the ratio is activation / attribution. Every row of an
activation sweep is one forward of the same cost, so ``--layers 1,2,10,29`` times activation patching on
those layers' rows only (``layers x 9 heads x 4 groups x 2`` rows) and scales its time to the full
sweep's 2,160 rows (``extrapolated_*``): say so when you quote it. ``--layer-sites`` adds the attn_out /
mlp_out / resid sweep of both methods (on the same layers) for the agreement numbers. The JSON is
rewritten after each step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GROUPS = ("image", "text", "last", "all")


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _setup(quick: bool):
    from eah_interp import EAH
    from eah_interp.patching import LogitDiff

    if quick:
        from eah_interp.models.tiny import sharp_tiny_llava, tiny_llava_inputs

        model = sharp_tiny_llava()
        inputs = tiny_llava_inputs(model, prefix_lengths=(3,), seed=1)
        return model, inputs, EAH.paper(threshold=0.05), LogitDiff(yes=80, no=99), "tiny random LLaVA (4 layers x 4 heads)"
    from eah_interp.models import load_model
    from eah_interp.scenes import make_scene, question_for

    bundle = load_model("organism")
    scene = make_scene(100000001)
    inputs = bundle.processor([bundle.yes_no_prompt(question_for("triangle"))], [scene.image])
    metric = LogitDiff(yes=tuple(bundle.yes_ids), no=tuple(bundle.no_ids))
    return bundle.model, inputs, EAH.paper(threshold=bundle.threshold), metric, "organism (30 layers x 9 heads)"


def _write(out: Path | None, result: dict) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))


def _plot(frames: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, direction in zip(axes, ("treatment_into_baseline", "baseline_into_treatment"), strict=True):
        for attribution, activation in frames:
            keys = ["direction", "site", "layer", "head", "positions"]
            merged = attribution.merge(activation, on=keys, suffixes=("_attr", "_act"))
            merged = merged[merged.direction == direction]
            receiver = "baseline_metric" if direction == "treatment_into_baseline" else "treatment_metric"
            act = merged["metric_act"] - merged[f"{receiver}_act"]
            attr = merged["metric_attr"] - merged[f"{receiver}_attr"]
            for site, sub in merged.groupby("site"):
                ax.scatter(act[sub.index], attr[sub.index], s=6, alpha=0.6, label=site)
        lims = ax.get_xlim()
        ax.plot(lims, lims, color="grey", lw=0.5)
        ax.set_xlabel("activation patching: effect on the metric")
        ax.set_ylabel("attribution patching: estimated effect")
        ax.set_title(direction, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random LLaVA (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after each step)")
    parser.add_argument("--plot", type=Path, default=None, help="scatter of the two methods' effects (PNG)")
    parser.add_argument("--frames", type=Path, default=None, help="both methods' tables, matched rows (CSV)")
    parser.add_argument("--repeats", type=int, default=5, help="timed attribution runs (median)")
    parser.add_argument("--layer-sites", action="store_true", help="also sweep attn_out / mlp_out / resid (agreement)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default=None,
                        help="comma-separated layers for the activation sweep (default: all; then extrapolated)")
    args = parser.parse_args(argv)

    from nnsight import NNsight

    from eah_interp.attribution import agreement, attribution_patching
    from eah_interp.patching import NNsightPatcher, sweep

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model, inputs, config, metric, label = _setup(args.quick)
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True, check=False).stdout.strip()
        except OSError:
            commit = ""
        result: dict = {
            "command": " ".join(["python", "benchmarks/attribution.py", *(argv if argv is not None else sys.argv[1:])]),
            "model": label, "inputs": {k: list(v.shape) for k, v in inputs.items()}, "config": config.to_dict(),
            "metric": repr(metric), "threads": args.threads, "commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "machine": platform.machine(), "nproc": __import__("os").cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }

        def attribute(sites):
            return attribution_patching(model, inputs, config, metric, sites=sites, positions=GROUPS)

        attribute(("head",))  # warm-up
        walls, cpus = [], []
        for _ in range(args.repeats):
            heads_attr, wall, cpu = _timed(lambda: attribute(("head",)))
            walls.append(wall)
            cpus.append(cpu)
        result["attribution"] = {"rows": len(heads_attr), "wall_s": walls, "cpu_s": cpus,
                                 "median_wall_s": statistics.median(walls), "median_cpu_s": statistics.median(cpus)}
        _write(args.out, result)
        print(f"attribution: {len(heads_attr)} rows, median {statistics.median(walls):.2f} s wall", flush=True)

        patcher = NNsightPatcher(NNsight(model), inputs, config)
        layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
        # sweep starts with two collecting forwards (baseline, EAH): timed apart, they are no per-row cost
        _, collect_wall, collect_cpu = _timed(lambda: (patcher.collect("baseline"), patcher.collect("treatment")))
        heads_act, wall, cpu = _timed(lambda: sweep(patcher, metric, sites=("head",), positions=GROUPS,
                                                    layers=layers, progress=False))
        full, rows = len(heads_attr), len(heads_act)
        result["activation"] = {
            "rows": rows, "layers": layers or "all", "wall_s": wall, "cpu_s": cpu, "collect_wall_s": collect_wall,
            "collect_cpu_s": collect_cpu,
            "extrapolated_wall_s": collect_wall + (wall - collect_wall) * full / rows,
            "extrapolated_cpu_s": collect_cpu + (cpu - collect_cpu) * full / rows,
        }
        result["ratio_wall"] = result["activation"]["extrapolated_wall_s"] / result["attribution"]["median_wall_s"]
        result["ratio_cpu"] = result["activation"]["extrapolated_cpu_s"] / result["attribution"]["median_cpu_s"]
        result["ratio_is_extrapolated"] = len(heads_act) != full
        result["metrics"] = {"baseline": heads_act.attrs["baseline_metric"], "eah": heads_act.attrs["treatment_metric"],
                             "baseline_attribution_run": heads_attr.attrs["baseline_metric"],
                             "eah_attribution_run": heads_attr.attrs["treatment_metric"]}
        result["agreement_heads"] = agreement(heads_attr, heads_act, by=("direction", "site", "layer", "positions"))
        _write(args.out, result)
        print(f"activation: {len(heads_act)} rows, {wall:.1f} s wall; ratio {result['ratio_wall']:.0f}x wall, "
              f"{result['ratio_cpu']:.0f}x CPU", flush=True)
        frames = [(heads_attr, heads_act)]
        if args.layer_sites:
            sites = ("attn_out", "mlp_out", "resid")
            layer_attr, wall_attr, _ = _timed(lambda: attribute(sites))
            layer_act, wall_act, _ = _timed(lambda: sweep(patcher, metric, sites=sites, positions=GROUPS, layers=layers,
                                                          progress=False))
            result["layer_sites"] = {"rows": len(layer_act), "attribution_wall_s": wall_attr, "activation_wall_s": wall_act,
                                     "agreement": agreement(layer_attr, layer_act, by=("direction", "site", "layer"))}
            frames.append((layer_attr, layer_act))
            _write(args.out, result)
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        _write(args.out, result)
        if args.plot is not None:
            _plot(frames, args.plot)
        if args.frames is not None:
            import pandas as pd

            keys = ["direction", "site", "layer", "head", "positions"]
            matched = [a.merge(b, on=keys, suffixes=("_attribution", "_activation")) for a, b in frames]
            pd.concat(matched).to_csv(args.frames, index=False)
        return result
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
