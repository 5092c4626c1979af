"""Where the time of one instrumented layer goes (SmolLM2-135M shape: 9 heads, 3 KV heads, head dim 64).

    python benchmarks/profile_layer.py [--tokens 600 2904] [--repeats 5] [--threads 1]

Times (median, one thread unless ``--threads``) the pieces `eah_interp.hf` runs in a chosen layer, against the SDPA call the
layer would otherwise make, on random q/k/v: SDPA with ``is_causal`` (what a plain forward uses),
SDPA with a materialised float mask (what every non-chosen layer got inside an ``hf`` context before the fix, see
docs/benchmarks.md), the family's eager attention (full ``[b, h, q, k]`` maps), `stats.head_statistics`,
`edit.apply_eah_to_probs` (the eager path), the map-free path the HF backend takes by default
(`chunked.chunked_attention`, with the native row kernel and with PyTorch rows;
`edit.map_free_eah`), and two floors for any exact statistics
pass: the causal ``Q K^T`` products alone, and with their ``exp``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[600, 2904])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from eah_interp import EAH, TokenLayout

    print("| piece (one layer, batch 1) | " + " | ".join(f"{n} tokens" for n in args.tokens) + " |")
    print("| --- |" + " ---: |" * len(args.tokens))
    results: dict[str, list[str]] = {}
    for seq in args.tokens:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 9, seq, 64, generator=g)
        k = torch.randn(1, 3, seq, 64, generator=g)
        v = torch.randn(1, 3, seq, 64, generator=g)
        n_image = seq - 24
        layout = TokenLayout.from_spans([(4, 4 + n_image)], seq)
        config = EAH.paper(threshold=0.0008 * 576 / n_image)
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
        float_mask = torch.zeros(seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        for name, fn in pieces(q, k, v, float_mask, layout, config).items():
            results.setdefault(name, []).append(f"{median_time(fn, args.repeats) * 1000:.0f} ms")
    for name, cells in results.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def pieces(q, k, v, float_mask, layout, config) -> dict:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from eah_interp import native
    from eah_interp.chunked import chunked_attention
    from eah_interp.edit import apply_eah_to_probs, map_free_eah
    from eah_interp.head_stats import head_statistics

    class Module:  # what eager_attention_forward reads from the attention module
        num_key_value_groups = 3
        training = False

    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    _, probs = eager_attention_forward(Module(), q, k, v, float_mask, scaling=0.125, dropout=0.0)
    q3, kt3 = q[0] * 0.125, kr[0].transpose(1, 2).contiguous()

    def logits_only(exp: bool) -> None:
        """The floor of any exact statistics pass: every probability needs its logit (and an exp)."""
        for s in range(0, q3.shape[1], 32):
            logits = torch.bmm(q3[:, s : s + 32], kt3[..., : s + 32])
            if exp:
                logits.exp_()

    def without_native(fn):
        def run() -> None:
            available = native.available
            native.available = lambda: False  # what chunked_attention asks before using the kernel
            try:
                fn()
            finally:
                native.available = available

        return run

    return {
        "SDPA, is_causal (plain forward)": lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True),
        "SDPA, materialised float mask (what the other layers got inside hf.* before the fix)": lambda: F.scaled_dot_product_attention(
            q, kr, vr, attn_mask=float_mask),
        "eager attention, full maps (chosen layer)": lambda: eager_attention_forward(
            Module(), q, k, v, float_mask, scaling=0.125, dropout=0.0),
        "head_stats.head_statistics on the full map": lambda: head_statistics(probs, layout),
        "edit.apply_eah_to_probs on the full map": lambda: apply_eah_to_probs(probs, layout, config, 1),
        "chunked attention + statistics sums (record_attention)": lambda: chunked_attention(
            q, k, v, None, 0.125, layout, output=True, statistics=True),
        "same, PyTorch rows instead of the native kernel (EAH_INTERP_NATIVE=0, or no C compiler)": without_native(
            lambda: chunked_attention(q, k, v, None, 0.125, layout, output=True, statistics=True)),
        "map-free EAH: chunked column sums + SDPA with the source head (hf.eah)": lambda: map_free_eah(
            q, k, v, None, 0.125, layout, config, 1),
        "floor: causal Q K^T alone, 32-row chunks (no softmax, no sums)": lambda: logits_only(False),
        "floor: causal Q K^T + exp, 32-row chunks (no sums)": lambda: logits_only(True),
    }


if __name__ == "__main__":
    main()
