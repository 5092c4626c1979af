"""Markdown tables of a benchmark JSON (``python benchmarks/report.py docs/benchmarks.json``; the stacking
group's: ``python benchmarks/report.py --stacking docs/benchmarks_stacking.json``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "docs/benchmarks.json") -> None:
    data = json.loads(Path(path).read_text())
    by = {(r["mode"], r["n_image"], r["batch"]): r for r in data["rows"]}
    points = sorted({(r["batch"], r["n_image"]) for r in data["rows"]})
    points = [(n, b) for b, n in points]

    def get(mode, n, b, key="seconds"):
        return by.get((mode, n, b), {}).get(key, float("nan"))

    def rat(mode, base, n, b, key="seconds"):
        return get(mode, n, b, key) / get(base, n, b, key)

    def head(n, b):
        return f"| {n} + 24 = {n + 24} | {b} |"

    print("### 1. Generation latency (target: EAH / SDPA <= 1.10)\n")
    print(f"`generate`, {data['new_tokens']} new tokens, greedy. Baseline: plain SDPA generation, same process.\n")
    print("| prompt tokens | batch | SDPA (s) | EAH (s) | **EAH / SDPA** | target met? |")
    print("| --- | ---: | ---: | ---: | ---: | :---: |")
    for n, b in points:
        r = rat("generate_eah", "generate_sdpa", n, b)
        print(f"{head(n, b)} {get('generate_sdpa', n, b):.2f} | {get('generate_eah', n, b):.2f} | **{r:.3f}** | "
              f"{'yes' if r <= 1.10 else 'no'} |")

    print("\n### 2a. Head statistics, all layers: time (target: throughput >= 0.8x plain forward)\n")
    print("Baseline: plain SDPA forward (`logits_to_keep=1`), same process. Throughput = 1 / time ratio.\n")
    print("| prompt tokens | batch | forward (s) | record_attention (s) | **throughput** | naive (s) | naive throughput |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, b in points:
        f = get("forward_sdpa", n, b)
        print(f"{head(n, b)} {f:.2f} | {get('stats_streamed', n, b):.2f} | **{f / get('stats_streamed', n, b):.2f}** | "
              f"{get('stats_naive', n, b):.2f} | {f / get('stats_naive', n, b):.2f} |")

    print("\n### 2b. Head statistics, all layers: memory (target: peak <= 1.2x plain forward)\n")
    print("Fresh process per mode, one call. `peak` = process peak RSS (model weights + runtime + the call); "
          "`extra` = peak minus the RSS just before the call. Baseline: plain SDPA forward.\n")
    print("| prompt tokens | batch | RSS before (MB) | forward peak / extra | record_attention peak / extra | "
          "**peak ratio** | **extra ratio** | naive peak / extra | naive peak ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, b in points:
        def pe(m, n=n, b=b):
            return f"{get(m, n, b, 'peak_mb'):.0f} / {get(m, n, b, 'act_mb'):.0f}"

        print(f"{head(n, b)} {get('forward_sdpa', n, b, 'rss_ready_mb'):.0f} | {pe('forward_sdpa')} | "
              f"{pe('stats_streamed')} | **{rat('stats_streamed', 'forward_sdpa', n, b, 'peak_mb'):.2f}** | "
              f"**{rat('stats_streamed', 'forward_sdpa', n, b, 'act_mb'):.1f}** | {pe('stats_naive')} | "
              f"{rat('stats_naive', 'forward_sdpa', n, b, 'peak_mb'):.2f} |")
    print("\nSteady state (extra peak RSS of a call after a warm-up, measured inside the timing process, MB):\n")
    print("| prompt tokens | batch | forward | record_attention | naive |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n, b in points:
        cells = " | ".join(f"{get(m, n, b, 'inline_act_mb'):.0f}" for m in
                           ("forward_sdpa", "stats_streamed", "stats_naive"))
        print(f"{head(n, b)} {cells} |")

    n0, b0 = points[0]
    if ("forward_eah_hf", n0, b0) in by:
        print(f"\n### 3. Backends: one EAH prompt forward, {n0} + 24 tokens, batch {b0}\n")
        print("| backend | seconds | vs HF EAH | vs plain SDPA forward | extra peak RSS (MB) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for mode, name in (("forward_sdpa_logits", "plain SDPA forward (no EAH)"), ("forward_eah_hf", "HF (`hf.eah`)"),
                           ("forward_eah_nnsight", "nnsight (`nnsight.eah`)"),
                           ("forward_eah_lens", "TransformerLens (`transformer_lens.eah`)")):
            print(f"| {name} | {get(mode, n0, b0):.3f} | {rat(mode, 'forward_eah_hf', n0, b0):.2f} | "
                  f"{rat(mode, 'forward_sdpa_logits', n0, b0):.2f} | {get(mode, n0, b0, 'act_mb'):.0f} |")

    print("\n### 4. Scaling (absolute medians; seconds / extra peak RSS MB)\n")
    modes = ("forward_sdpa", "stats_streamed", "stats_naive", "generate_sdpa", "generate_eah")
    print("| prompt tokens | batch | " + " | ".join(modes) + " |")
    print("| --- | ---: |" + " ---: |" * len(modes))
    for n, b in points:
        cells = " | ".join(f"{get(m, n, b):.2f} s / {get(m, n, b, 'act_mb'):.0f}" for m in modes)
        print(f"{head(n, b)} {cells} |")


def stacking(path: str = "docs/benchmarks_stacking.json") -> None:
    """The stacking group's table: each mode against ``stacking_plain``, as the ratio of medians and as the
    median over rounds of the per-round ratio (each round runs every mode once, so a round's ratio shares
    that round's machine load), then each stack's overhead against the sum of its parts'."""
    import statistics

    from run import STACKS  # benchmarks/run.py, next to this file

    data = json.loads(Path(path).read_text())
    times = {r["mode"]: r["seconds_all"] for r in data["rows"] if r["mode"].startswith("stacking_")}
    plain = times["stacking_plain"]
    median = {m: statistics.median(v) for m, v in times.items()}
    of_medians = {m: median[m] / median["stacking_plain"] for m in times}
    paired = {m: statistics.median(a / b for a, b in zip(v, plain, strict=True)) for m, v in times.items()}
    spread = {m: (min(a / b for a, b in zip(v, plain, strict=True)), max(a / b for a, b in zip(v, plain, strict=True)))
              for m, v in times.items()}
    print("| mode | median s | / plain (ratio of medians) | / plain (median per-round ratio) | per-round range |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for m in times:
        lo, hi = spread[m]
        print(f"| `{m.removeprefix('stacking_')}` | {median[m]:.2f} | {of_medians[m]:.3f} | **{paired[m]:.3f}** | "
              f"{lo:.2f}-{hi:.2f} |")
    print("\n| stack | overhead (ratio of medians) | sum of the parts' | overhead (per-round) | sum of the parts' |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stack, (a, b) in STACKS.items():
        print(f"| `{stack.removeprefix('stacking_')}` = `{a.removeprefix('stacking_')}` + `{b.removeprefix('stacking_')}` | "
              f"{of_medians[stack] - 1:+.3f} | {of_medians[a] + of_medians[b] - 2:+.3f} | "
              f"**{paired[stack] - 1:+.3f}** | {paired[a] + paired[b] - 2:+.3f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stacking"]:
        stacking(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
