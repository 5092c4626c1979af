"""Speed and memory of eah-interp against baselines measured in the same run (median of repeats).

    python benchmarks/run.py                 # the full table (docs/benchmarks.md), ~10-20 min on 2 cores
    python benchmarks/run.py --quick         # a smoke run on tiny sizes (seconds)

Model: a random-weight Llama decoder shaped like the organism's language model (SmolLM2-135M: hidden
576, 9 heads / 3 KV heads, 30 layers), fed prompts of ``n_image`` image tokens + 24 text tokens as
``inputs_embeds`` with an explicit `TokenLayout` (the vision tower is not what is being measured).

Measures (each a ratio to its baseline in the same process):
1. generation latency: greedy ``generate`` of 16 tokens with EAH (paper preset) vs plain SDPA;
2. head statistics over all layers: time and peak memory of `hf.record_attention` (streamed
   `HeadStats`) vs a plain SDPA forward, and the naive route (``output_attentions=True``, eager in every
   layer, all maps kept);
3. backend overhead: one EAH prompt forward through nnsight and TransformerLens vs the HF backend;
4. scaling of (1) and (2) with image tokens (576, 1152, 2880) and batch size.
Peak memory is the peak RSS growth of a fresh subprocess per measurement (CPU: torch allocations are
process memory), so modes do not share allocator caches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TEXT_TOKENS = 24


def build(n_layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def prompt(model, n_image: int, batch: int):
    from eah_interp import TokenLayout

    seq = n_image + TEXT_TOKENS
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(batch, seq, model.config.hidden_size, generator=g) * 0.02
    mask = torch.ones(batch, seq, dtype=torch.long)
    layout = TokenLayout.from_spans([(4, 4 + n_image)] * batch, seq)
    return embeds, mask, layout


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(mode: str, n_layers: int, n_image: int, batch: int, repeats: int) -> dict:
    """One measurement (run in a subprocess): seconds and peak RSS growth (MB) of ``mode``."""
    import resource

    from eah_interp import EAHConfig, HeadStats, hf

    torch.set_num_threads(2)
    model = build(n_layers)
    embeds, mask, layout = prompt(model, n_image, batch)
    config = EAHConfig.paper(threshold=0.0008 * 576 / n_image)
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)

    def forward():
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)

    def run():
        with torch.no_grad():
            if mode == "generate_sdpa":
                model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
            elif mode == "generate_eah":
                with hf.eah(model, config, layout=layout):
                    model.generate(inputs_embeds=embeds, attention_mask=mask, **gen)
            elif mode == "forward_sdpa":
                forward()
            elif mode == "forward_eah_hf":
                with hf.eah(model, config, layout=layout):
                    forward()
            elif mode == "stats_streamed":
                with hf.record_attention(model, "all", stats=HeadStats(), layout=layout):
                    forward()
            elif mode == "stats_naive":
                model.set_attn_implementation("eager")
                out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_attentions=True)
                stats = HeadStats()
                for layer, probs in enumerate(out.attentions):
                    stats.update(layer, probs, layout)
                model.set_attn_implementation("sdpa")
            elif mode == "forward_eah_nnsight":
                import nnsight

                import eah_interp.nnsight as ens

                nn_model = nnsight.NNsight(model)
                with nn_model.trace(inputs_embeds=embeds, attention_mask=mask, use_cache=False):
                    ens.apply_eah(nn_model, config, layout)
            else:
                raise ValueError(mode)

    if mode == "forward_eah_lens":
        import eah_interp.lens as lens

        bridge = lens.boot_bridge(model)
        hooks = lens.eah_hooks(bridge, config, layout)

        def run():  # noqa: F811
            with torch.no_grad():
                bridge.run_with_hooks(embeds, fwd_hooks=hooks, attention_mask=mask)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = timed(run, repeats)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "n_image": n_image, "batch": batch, "seconds": seconds, "peak_mb": (after - before) / 1024}


def in_subprocess(mode, n_layers, n_image, batch, repeats) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from run import measure; "
        f"print(json.dumps(measure({mode!r}, {n_layers}, {n_image}, {batch}, {repeats})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"mode": mode, "n_image": n_image, "batch": batch, "error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        layers, repeats, plan = 2, 1, [(32, 1)]
    else:
        layers, repeats = args.layers, args.repeats
        plan = [(576, 1), (1152, 1), (2880, 1), (576, 2)]
    rows = []
    for n_image, batch in plan:
        modes = ["generate_sdpa", "generate_eah", "forward_sdpa", "stats_streamed", "stats_naive"]
        if (n_image, batch) == plan[0]:
            modes += ["forward_eah_hf", "forward_eah_nnsight", "forward_eah_lens"]
        for mode in modes:
            row = in_subprocess(mode, layers, n_image, batch, repeats)
            print(json.dumps(row), flush=True)
            rows.append(row)
    by = {(r["mode"], r["n_image"], r["batch"]): r for r in rows}
    print("\nratios (same run):")
    for n_image, batch in plan:
        def ratio(a, b, key="seconds", n_image=n_image, batch=batch):
            ra, rb = by.get((a, n_image, batch), {}), by.get((b, n_image, batch), {})
            if key not in ra or key not in rb or not rb[key]:
                return float("nan")
            return ra[key] / rb[key]

        print(
            f"n_image={n_image} batch={batch}: generate EAH/SDPA {ratio('generate_eah', 'generate_sdpa'):.3f}; "
            f"stats streamed/forward time {ratio('stats_streamed', 'forward_sdpa'):.3f}, "
            f"naive/forward time {ratio('stats_naive', 'forward_sdpa'):.3f}; "
            f"peak MB forward {by.get(('forward_sdpa', n_image, batch), {}).get('peak_mb', float('nan')):.0f}, "
            f"streamed {by.get(('stats_streamed', n_image, batch), {}).get('peak_mb', float('nan')):.0f}, "
            f"naive {by.get(('stats_naive', n_image, batch), {}).get('peak_mb', float('nan')):.0f}"
        )
        if (n_image, batch) == plan[0]:
            print(
                f"  backend overhead vs HF: nnsight {ratio('forward_eah_nnsight', 'forward_eah_hf'):.3f}, "
                f"TransformerLens {ratio('forward_eah_lens', 'forward_eah_hf'):.3f}"
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
