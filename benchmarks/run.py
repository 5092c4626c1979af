"""Speed and memory of eah-interp against baselines measured in the same run (medians of repeats).

    python benchmarks/run.py --out docs/benchmarks.json --plot docs/benchmarks_scaling.png   # full (~26 min)
    python benchmarks/run.py --quick          # smoke run: tiny random model, in-process (~5 s)

Model (``--model``): ``smollm`` (default) is the bundled organism's language model, SmolLM2-135M-Instruct
with its real weights (`eah_interp.models.organism.load_smollm`: 30 layers, hidden 576, 9 heads / 3 KV
heads, vocabulary 49,152); ``random`` is a random-weight Llama of the same shape with a 4,096-token
vocabulary (``--quick`` uses it with 2 layers). Prompts are ``n_image`` image positions + 24 text
positions (the token counts of LLaVA-1.5: 576 image tokens; LLaVA-NeXT: 2,880), fed as ``inputs_embeds``
(the model's own embeddings of random token ids) with an explicit `TokenLayout` marking the image span:
the vision tower is not what is measured.

Modes (each timed against the baseline named in ``BASELINE``, in the same process, interleaved):

* ``generate_sdpa`` / ``generate_eah``: greedy ``generate`` of ``--new-tokens`` tokens, plain SDPA vs
  inside ``hf.eah(model, EAH.paper(...))``;
* ``forward_sdpa`` / ``stats_streamed`` / ``stats_naive``: a prompt forward, plain vs
  ``hf.record_attention(model, "all", stats=HeadStats())`` vs the naive route (eager in every layer,
  ``output_attentions=True``, every layer's map kept, then ``HeadStats.update`` per layer); these run with
  ``logits_to_keep=1`` (a statistics scan needs no logits; full logits would add the same
  ``tokens x 49,152 x 4`` bytes to every mode);
* ``forward_eah_hf`` / ``forward_eah_nnsight`` / ``forward_eah_lens``: one EAH prompt forward through each
  backend (full logits);
* ``generate_plain`` / ``generate_<method>``: greedy ``generate`` under ``hf.intervene(model, [method])`` for
  each `eah_interp.interventions` method at its default layers (scaled to depth), and two stacks
  (``generate_eah_pai``: EAH + PAI; ``generate_eah_intervene``: EAH alone through ``intervene``), against
  plain SDPA generation measured in the same process (``generate_plain``);
* ``stacking_plain`` / ``stacking_<x>``: the same ``generate`` timed in a group of its own: the new edit points
  (``stacking_value``: `ValueEdit` of the image values in the middle third of the layers;
  ``stacking_residual``: a `ResidualEdit` steering vector there) and stacks of two methods (``STACKS``) next
  to each of their parts alone; the summary compares each stack's overhead with the sum of its parts';

``--clock process`` times with the process's CPU time instead of the wall clock (for a machine shared
with other jobs). Every measured process runs ``torch.set_num_threads(1)`` (the machine has 2 shared cores; ``--threads N``
sets another count). Times: one
warm-up per mode, then ``--repeats`` rounds, each running every mode of the group once (order rotated
per round); the median per mode is reported. Memory (``--memory fresh``, default): for each mode a fresh
process builds the model and inputs, reads its RSS (``rss_ready``), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and runs the mode once: ``peak_mb`` is the process's peak RSS (``VmHWM``) and
``act_mb = peak - rss_ready`` the extra memory of the call (activations, attention maps, mask).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT_TOKENS = 24
IMAGE_START = 4

#: mode -> the baseline it is reported against.
BASELINE = {
    "generate_eah": "generate_sdpa",
    "stats_streamed": "forward_sdpa",
    "stats_naive": "forward_sdpa",
    "forward_eah_hf": "forward_sdpa_logits",
    "forward_eah_nnsight": "forward_eah_hf",
    "forward_eah_lens": "forward_eah_hf",
}
#: the interventions timed in the "interventions" group (each against ``generate_plain``)
INTERVENTION_MODES = ["generate_pai", "generate_middle", "generate_vaf", "generate_adhh", "generate_headscale",
                      "generate_knockout", "generate_var", "generate_eah_intervene", "generate_eah_pai"]
BASELINE.update({mode: "generate_plain" for mode in INTERVENTION_MODES})
#: the "stacking" group, timed in its own process against its own plain run (``stacking_plain``): the two new
#: edit points, and stacks of two methods next to each method alone; ``stacking_<x>`` runs ``generate_<x>``'s
#: interventions. Stack -> its parts:
STACKS = {
    "stacking_var_pai": ("stacking_var", "stacking_pai"),
    "stacking_vaf_pai": ("stacking_vaf", "stacking_pai"),
    "stacking_value_residual": ("stacking_value", "stacking_residual"),
    "stacking_eah_pai": ("stacking_eah_intervene", "stacking_pai"),
}
STACKING_MODES = ["stacking_value", "stacking_residual", "stacking_pai", "stacking_vaf", "stacking_var",
                  "stacking_eah_intervene", *STACKS]
BASELINE.update({mode: "stacking_plain" for mode in STACKING_MODES})
GROUPS = {
    "generate": ["generate_sdpa", "generate_eah"],
    "stats": ["forward_sdpa", "stats_streamed", "stats_naive"],
    "backends": ["forward_sdpa_logits", "forward_eah_hf", "forward_eah_nnsight", "forward_eah_lens"],
    "interventions": ["generate_plain"] + INTERVENTION_MODES,
    "stacking": ["stacking_plain"] + STACKING_MODES,
}


# ---------------------------------------------------------------------------- process memory (Linux)
def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------------------- model and inputs
def build(n_layers: int, seed: int = 0, model: str = "random"):
    """The language model: ``random`` (random Llama, SmolLM2-135M shape, 4k vocab) or ``smollm`` (real)."""
    if model == "smollm":
        from eah_interp.models.organism import load_smollm

        lm, _ = load_smollm()
        if n_layers < lm.config.num_hidden_layers:
            lm.model.layers = lm.model.layers[:n_layers]
            lm.config.num_hidden_layers = n_layers
        lm.config.max_position_embeddings = max(lm.config.max_position_embeddings, 8192)
        lm.set_attn_implementation("sdpa")
        return lm.eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def prompt(model, n_image: int, batch: int):
    """``(inputs_embeds, attention_mask, layout)``: ``n_image`` image positions after 4 system tokens."""
    from eah_interp import TokenLayout

    seq = n_image + TEXT_TOKENS
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=g)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).detach()
    mask = torch.ones(batch, seq, dtype=torch.long)
    layout = TokenLayout.from_spans([(IMAGE_START, IMAGE_START + n_image)] * batch, seq)
    return embeds, mask, layout


def eah_config(n_image: int):
    from eah_interp import EAH

    # the paper's threshold is tuned for 576 image tokens; sink scores scale ~ 1 / prompt length
    return EAH.paper(threshold=0.0008 * 576 / n_image)


def interventions(mode: str, model, embeds, config) -> list:
    """The intervention list a ``generate_<method>`` mode runs (defaults; heads and sink dims from the model)."""
    from eah_interp.interventions import (
        ADHH,
        PAI,
        VAF,
        VAR,
        HeadScale,
        Knockout,
        MiddleLayerBoost,
        ResidualEdit,
        ValueEdit,
    )
    from eah_interp.sinks import massive_dims

    n_layers = model.config.num_hidden_layers
    heads = ((n_layers // 2, 0), (n_layers // 2, 1))
    middle = tuple(range(n_layers // 3, max(n_layers // 3 + 1, 2 * n_layers // 3)))
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    if mode in ("generate_var", "generate_var_pai"):  # the two dims with the largest RMS-normalised entries at layer 2's input
        with torch.no_grad():
            hidden = model(inputs_embeds=embeds[:1], output_hidden_states=True, use_cache=False).hidden_states
        dims = massive_dims(hidden[min(2, n_layers - 1)], top=2)
    eah = config
    return {
        "generate_pai": lambda: [PAI()],
        "generate_middle": lambda: [MiddleLayerBoost()],
        "generate_vaf": lambda: [VAF()],
        "generate_adhh": lambda: [ADHH(heads=heads)],
        "generate_headscale": lambda: [HeadScale(heads=heads, scale=0.0)],
        "generate_knockout": lambda: [Knockout(queries="last", keys="image", layers=tuple(range(n_layers // 2)))],
        "generate_var": lambda: [VAR(dims=dims)],
        "generate_eah_intervene": lambda: [eah],
        "generate_eah_pai": lambda: [eah, PAI()],
        # the new edit points: image values zeroed in the middle third of the layers (every query row reads
        # them), and a steering vector (norm 4) added to every position's output of the same layers
        "generate_value": lambda: [ValueEdit(keys="image", scale=0.0, layers=middle)],
        "generate_residual": lambda: [ResidualEdit.steer(direction / direction.norm(), 4.0, layers=middle)],
        "generate_var_pai": lambda: [VAR(dims=dims), PAI()],
        "generate_vaf_pai": lambda: [VAF(), PAI()],
        "generate_value_residual": lambda: [ValueEdit(keys="image", scale=0.0, layers=middle),
                                            ResidualEdit.steer(direction / direction.norm(), 4.0, layers=middle)],
    }[mode]()


def make_runner(mode: str, model, embeds, mask, layout, config, new_tokens: int, isolate: bool):
    """A zero-argument callable running ``mode`` once (setup such as booting a bridge happens here)."""
    from eah_interp import HeadStats, hf

    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    keep1 = dict(use_cache=False, logits_to_keep=1)

    def forward(**extra):
        return model(inputs_embeds=embeds, attention_mask=mask, **extra)

    if mode == "generate_sdpa":
        return lambda: model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
    if mode == "generate_eah":
        def run():
            with hf.eah(model, config, layout=layout):
                model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
        return run
    if mode in ("generate_plain", "stacking_plain"):
        return lambda: model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
    if mode in INTERVENTION_MODES or mode in STACKING_MODES:
        items = interventions(mode.replace("stacking_", "generate_"), model, embeds, config)

        def run():
            with hf.intervene(model, items, layout=layout):
                model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
        return run
    if mode == "forward_sdpa":
        return lambda: forward(**keep1)
    if mode == "forward_sdpa_logits":
        return lambda: forward(use_cache=False)
    if mode == "stats_streamed":
        def run():
            stats = HeadStats()
            with hf.record_attention(model, "all", stats=stats, layout=layout):
                forward(**keep1)
            return stats
        return run
    if mode == "stats_naive":
        def run():
            model.set_attn_implementation("eager")
            try:
                out = forward(output_attentions=True, **keep1)
            finally:
                model.set_attn_implementation("sdpa")
            stats = HeadStats()
            for layer, probs in enumerate(out.attentions):
                stats.update(layer, probs, layout)
            return stats
        return run
    if mode == "forward_eah_hf":
        def run():
            with hf.eah(model, config, layout=layout):
                forward(use_cache=False)
        return run
    if mode == "forward_eah_nnsight":
        import nnsight

        import eah_interp.nnsight as ens

        # in a shared timing process, wrap a copy so the other modes run the unwrapped model
        nn_model = nnsight.NNsight(copy.deepcopy(model) if isolate else model)

        def run():
            with nn_model.trace(inputs_embeds=embeds, attention_mask=mask, use_cache=False):
                ens.eah(nn_model, config, layout)
        return run
    if mode == "forward_eah_lens":
        import eah_interp.transformer_lens as lens

        bridge = lens.boot_bridge(model, copy=isolate)  # the bridge rewires (and switches to eager) in place
        hooks, _ = lens.eah(bridge, config, layout)
        return lambda: bridge.run_with_hooks(embeds, fwd_hooks=hooks, attention_mask=mask)
    raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------------- measurements
def _setup(spec: dict):
    torch.set_num_threads(spec.get("threads", 1))
    model = build(spec["layers"], model=spec["model"])
    embeds, mask, layout = prompt(model, spec["n_image"], spec["batch"])
    return model, embeds, mask, layout, eah_config(spec["n_image"])


def time_group(spec: dict) -> list[dict]:
    """Interleaved timing of ``spec["modes"]`` in one process; also the peak RSS growth of each call."""
    threads = torch.get_num_threads()
    try:
        model, embeds, mask, layout, config = _setup(spec)
        runners = {
            m: make_runner(m, model, embeds, mask, layout, config, spec["new_tokens"], isolate=True) for m in spec["modes"]
        }
        times: dict[str, list[float]] = {m: [] for m in spec["modes"]}
        growth: dict[str, list[float]] = {m: [] for m in spec["modes"]}
        errors: dict[str, str] = {}

        def once(mode: str, record: bool) -> None:
            if mode in errors:
                return
            try:
                reset_peak()
                before = rss_mb()
                clock = time.process_time if spec.get("clock") == "process" else time.perf_counter
                t = clock()
                with torch.no_grad():
                    runners[mode]()
                dt = clock() - t
            except Exception as error:  # noqa: BLE001 - reported as an error row
                errors[mode] = f"{type(error).__name__}: {error}"[:500]
                return
            if record:
                times[mode].append(dt)
                growth[mode].append(peak_mb() - before)

        modes = list(spec["modes"])
        for mode in modes:
            once(mode, record=False)  # warm-up
        for r in range(spec["repeats"]):
            k = r % len(modes)
            for mode in modes[k:] + modes[:k]:
                once(mode, record=True)
        rows = []
        for mode in modes:
            row = {"mode": mode, "n_image": spec["n_image"], "batch": spec["batch"], "tokens": spec["n_image"] + TEXT_TOKENS,
                   "layers": spec["layers"], "model": spec["model"]}
            if mode in errors:
                row["error"] = errors[mode]
            else:
                row.update(seconds=statistics.median(times[mode]), seconds_all=[round(x, 4) for x in times[mode]],
                           inline_act_mb=statistics.median(growth[mode]))
            rows.append(row)
        return rows
    finally:
        torch.set_num_threads(threads)


def memory_one(spec: dict) -> dict:
    """Peak RSS of one call of ``spec["mode"]`` in this (fresh) process."""
    model, embeds, mask, layout, config = _setup(spec)
    run = make_runner(spec["mode"], model, embeds, mask, layout, config, spec["new_tokens"], isolate=False)
    ready = rss_mb()
    reset_peak()
    with torch.no_grad():
        run()
    peak = peak_mb()
    return {"mode": spec["mode"], "n_image": spec["n_image"], "batch": spec["batch"], "rss_ready_mb": ready,
            "peak_mb": peak, "act_mb": peak - ready}


def _subprocess(kind: str, spec: dict, timeout: float) -> list[dict] | dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        return {"error": lines[-1][:500]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- report
def ratio(by: dict, mode: str, n_image: int, batch: int, key: str = "seconds", base: str | None = None) -> float:
    a = by.get((mode, n_image, batch), {})
    b = by.get((base or BASELINE[mode], n_image, batch), {})
    if key not in a or key not in b or not b[key]:
        return float("nan")
    return a[key] / b[key]


def summary(rows: list[dict], plan: list[tuple[int, int]]) -> list[str]:
    by = {(r["mode"], r["n_image"], r["batch"]): r for r in rows}
    lines = []
    for n_image, batch in plan:
        g = lambda m, k="seconds", n=n_image, b=batch: by.get((m, n, b), {}).get(k, float("nan"))  # noqa: E731
        r = lambda m, k="seconds", n=n_image, b=batch: ratio(by, m, n, b, k)  # noqa: E731
        lines.append(f"n_image={n_image} batch={batch} ({n_image + TEXT_TOKENS} tokens):")
        lines.append(
            f"  generate: SDPA {g('generate_sdpa'):.3f}s  EAH {g('generate_eah'):.3f}s  ratio {r('generate_eah'):.3f} "
            f"(target <= 1.10)"
        )
        lines.append(
            f"  stats time: forward {g('forward_sdpa'):.3f}s  streamed x{r('stats_streamed'):.2f} (throughput "
            f"{1 / r('stats_streamed'):.2f}, target >= 0.8)  naive x{r('stats_naive'):.2f}"
        )
        if "peak_mb" in by.get(("forward_sdpa", n_image, batch), {}):
            lines.append(
                f"  stats memory: peak MB forward {g('forward_sdpa', 'peak_mb'):.0f}  streamed {g('stats_streamed', 'peak_mb'):.0f} "
                f"(x{r('stats_streamed', 'peak_mb'):.2f}, target <= 1.2)  naive {g('stats_naive', 'peak_mb'):.0f} "
                f"(x{r('stats_naive', 'peak_mb'):.2f})"
            )
            lines.append(
                f"  stats extra MB (act): forward {g('forward_sdpa', 'act_mb'):.0f}  streamed {g('stats_streamed', 'act_mb'):.0f} "
                f"naive {g('stats_naive', 'act_mb'):.0f}"
            )
        if ("forward_eah_hf", n_image, batch) in by:
            lines.append(
                f"  backends: HF EAH {g('forward_eah_hf'):.3f}s (x{r('forward_eah_hf'):.2f} plain forward)  "
                f"nnsight x{r('forward_eah_nnsight'):.2f}  TransformerLens x{r('forward_eah_lens'):.2f} (vs HF EAH)"
            )
        if ("generate_plain", n_image, batch) in by:
            parts = [f"{m.removeprefix('generate_')} x{r(m):.3f}" for m in INTERVENTION_MODES]
            lines.append(f"  interventions (generate vs plain SDPA {g('generate_plain'):.3f}s): " + "  ".join(parts))
        if ("stacking_plain", n_image, batch) in by:
            parts = [f"{m.removeprefix('stacking_')} x{r(m):.3f}" for m in STACKING_MODES]
            lines.append(f"  stacking group (generate vs plain SDPA {g('stacking_plain'):.3f}s): " + "  ".join(parts))
            for stack, (a, b) in STACKS.items():
                extra, parts_sum = r(stack) - 1, (r(a) - 1) + (r(b) - 1)
                lines.append(
                    f"  stack {stack.removeprefix('stacking_')}: overhead {extra:+.3f} vs sum of its parts' "
                    f"{parts_sum:+.3f} ({a.removeprefix('stacking_')} {r(a) - 1:+.3f}, "
                    f"{b.removeprefix('stacking_')} {r(b) - 1:+.3f})"
                )
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"ERROR {r['mode']} n_image={r['n_image']} batch={r['batch']}: {r['error']}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["mode"], r["n_image"], r["batch"]): r for r in rows}
    images = sorted({r["n_image"] for r in rows if r["batch"] == 1})
    batches = sorted({r["batch"] for r in rows if r["n_image"] == images[0]})
    modes = [("forward_sdpa", "plain forward (SDPA)"), ("stats_streamed", "stats: record_attention"),
             ("stats_naive", "stats: naive output_attentions"),
             ("generate_sdpa", "generate (SDPA)"), ("generate_eah", "generate + EAH")]
    fig, grid = plt.subplots(2, 2, figsize=(13, 9.5))
    axes = grid.ravel()
    for mode, label in modes:
        style = "-"
        for ax, key, points, xof in (
            (axes[0], "seconds", [(n, 1) for n in images], lambda p: p[0] + TEXT_TOKENS),
            (axes[1], "act_mb", [(n, 1) for n in images], lambda p: p[0] + TEXT_TOKENS),
            (axes[2], "seconds", [(images[0], b) for b in batches], lambda p: p[1]),
            (axes[3], "act_mb", [(images[0], b) for b in batches], lambda p: p[1]),
        ):
            pts = [p for p in points if key in by.get((mode, *p), {})]
            if len(pts) > 1 or (pts and len(points) == 1):
                ax.loglog([xof(p) for p in pts], [max(by[(mode, *p)][key], 1e-3) for p in pts], style, marker="o",
                          label=label)
    if len(images) > 1:
        x0, x1 = images[0] + TEXT_TOKENS, images[-1] + TEXT_TOKENS
        ref = by.get(("stats_naive", images[0], 1), {}).get("act_mb")
        if ref:
            axes[1].loglog([x0, x1], [ref, ref * (x1 / x0) ** 2], ":", color="grey", label="slope 2 (N²)")
    tokens = "prompt tokens (image + 24 text)"
    axes[0].set(xlabel=tokens, ylabel="seconds (median)", title="time vs tokens (batch 1)")
    axes[1].set(xlabel=tokens, ylabel="extra peak RSS of the call, MB", title="memory vs tokens (batch 1)")
    axes[2].set(xlabel="batch size", ylabel="seconds (median)", title=f"time vs batch ({images[0]} image tokens)")
    axes[3].set(xlabel="batch size", ylabel="extra peak RSS of the call, MB", title=f"memory vs batch ({images[0]} image tokens)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else "?"
        info["mem_total_gb"] = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    except Exception:  # noqa: BLE001
        pass
    return info


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: random 2-layer model, 56 tokens, in-process")
    ap.add_argument("--model", choices=["smollm", "random"], default=None, help="default: smollm (random with --quick)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every measured process (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (median reported)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--images", type=int, nargs="+", default=[576, 1152, 2880], help="image-token counts (batch 1)")
    ap.add_argument("--batches", type=int, nargs="*", default=[2, 4], help="extra batch sizes at the first image count")
    ap.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--memory", choices=["fresh", "inline", "none"], default=None,
                    help="fresh: one process per mode (default); inline: growth inside the timing process")
    ap.add_argument("--inprocess", action="store_true", help="time in this process (default with --quick)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="time with the wall clock (default) or this process's CPU time (robust to other load "
                    "on a shared machine; with --threads 1 it is the compute time)")
    ap.add_argument("--out", type=Path, default=None, help="write rows + machine info as JSON")
    ap.add_argument("--plot", type=Path, default=None, help="write the log-log scaling plot (PNG)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps(time_group(spec) if kind == "time" else memory_one(spec)))
        return []

    if args.quick:
        model, layers, repeats, plan, new_tokens = args.model or "random", 2, 1, [(32, 1)], 4
        memory, inprocess = args.memory or "inline", True
    else:
        model, layers, repeats, new_tokens = args.model or "smollm", args.layers, args.repeats, args.new_tokens
        plan = [(n, 1) for n in args.images] + [(args.images[0], b) for b in args.batches]
        memory, inprocess = args.memory or "fresh", args.inprocess
    print(f"# {' '.join(['python benchmarks/run.py'] + (argv if argv is not None else sys.argv[1:]))}", flush=True)
    print(f"# machine: {json.dumps(machine())}", flush=True)
    started = time.perf_counter()
    rows: list[dict] = []
    for n_image, batch in plan:
        groups = [g for g in args.groups if g not in ("backends", "interventions", "stacking") or (n_image, batch) == plan[0]]
        for group in groups:
            spec = dict(model=model, layers=layers, n_image=n_image, batch=batch, repeats=repeats,
                        new_tokens=new_tokens, modes=GROUPS[group], threads=args.threads, clock=args.clock)
            t0 = time.perf_counter()
            result = time_group(spec) if inprocess else _subprocess("time", spec, timeout=3600)
            if isinstance(result, dict):  # the whole group failed
                result = [{"mode": m, "n_image": n_image, "batch": batch, **result} for m in GROUPS[group]]
            for row in result:
                if memory == "inline" and "inline_act_mb" in row:
                    row["act_mb"] = row["inline_act_mb"]
                if memory == "fresh" and "error" not in row:
                    mem = _subprocess("memory", {**spec, "mode": row["mode"]}, timeout=3600)
                    row.update({k: v for k, v in mem.items() if k not in row or k == "error"})
                print(json.dumps(row), flush=True)
                rows.append(row)
            print(f"#   group {group} n_image={n_image} batch={batch}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n# total {time.perf_counter() - started:.0f} s\nratios (baselines measured in the same run):")
    lines = summary(rows, plan)
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": machine(), "threads": args.threads,
                                        "clock": args.clock,
                                        "repeats": repeats, "new_tokens": new_tokens, "model": model, "layers": layers,
                                        "rows": rows, "summary": lines}, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
