"""An independent, explicit EAH reference for tests: written with Python loops, shares no code with eah_interp.

`explicit_eah_layer(model, layer, ...)` replaces one Llama attention module's forward by a hand-written
computation: q/k/v projections, rotary embedding, causal + padding mask, softmax, sink scores by loops
over rows, heads and columns, the source head, the broadcast, ``P @ V`` and the output projection.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def explicit_sink_scores(p, image_pos, real, normalise, first_real):
    """p: [q, k] one head, prefill. Returns {j: score} for image positions j (loops, no vectorisation)."""
    n = p.shape[0]
    s, e = min(image_pos), max(image_pos) + 1
    scores = {}
    for j in image_pos:
        total = 0.0
        rows_after = 0
        for i in range(n):
            if not real[i]:
                continue
            if i != j:
                total += float(p[i, j])
            if i > j:
                rows_after += 1
        if normalise == "causal":
            d = rows_after
        elif normalise == "rows":  # every other real row (bidirectional image attention)
            d = sum(1 for i in range(n) if real[i] and i != j)
        else:  # the official window: keys s + 1 .. e - 1 (relative), divisor (s + 1) + e - j; key s never scored
            d = (s - first_real) + 1 + (e - first_real) - (j - first_real) if j > s else 0
        scores[j] = total / d if d > 0 else 0.0
    return scores


def explicit_edit(probs, attention_mask_2d, image_mask_2d, *, threshold, normalise, skip_if_head0, source=None, record=None):
    """probs: [b, h, n, n]. Returns the edited probabilities (EAH full broadcast, alpha 1)."""
    out = probs.clone()
    b, h = probs.shape[:2]
    for row in range(b):
        real = attention_mask_2d[row].tolist()
        image_pos = [j for j, x in enumerate(image_mask_2d[row].tolist()) if x]
        first_real = real.index(True) if True in real else 0
        counts = []
        for head in range(h):
            scores = explicit_sink_scores(probs[row, head], image_pos, real, normalise, first_real)
            counts.append(sum(1 for v in scores.values() if v > threshold))
        if source is None:
            best = max(counts)
            chosen = counts.index(best) if best > 0 else -1  # lowest index on ties
            if skip_if_head0 and chosen == 0:
                chosen = -1
        else:
            chosen = source
        if record is not None:
            record.append((chosen, counts))
        if chosen >= 0:
            for head in range(h):
                out[row, head] = probs[row, chosen]
    return out


@contextlib.contextmanager
def explicit_eah_layer(model, layer, attention_mask_2d, image_mask_2d, *, threshold, normalise="causal",
                       skip_if_head0=False, source=None, record=None, capture=None):
    """Replace ``layer``'s self-attention forward (prefill only) by an explicit EAH computation.

    ``capture``: a list receiving the unedited probabilities. ``record``: receives (chosen head, counts).
    """
    attn = model.model.language_model.layers[layer].self_attn
    cfg = model.config.text_config
    n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.q_proj(hidden_states).view(b, n, n_heads, head_dim).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(b, n, n_kv, head_dim).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(b, n, n_kv, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            k, v = cache.update(k, v, layer)
        n_k = k.shape[-2]
        assert n_k == n, "the explicit reference handles prompt forwards only"
        rep = n_heads // n_kv
        k = torch.cat([k[:, i // rep : i // rep + 1] for i in range(n_heads)], dim=1)
        v = torch.cat([v[:, i // rep : i // rep + 1] for i in range(n_heads)], dim=1)
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & attention_mask_2d[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1)
        if capture is not None:
            capture.append(probs.detach().clone())
        probs = explicit_edit(probs, attention_mask_2d.bool(), image_mask_2d, threshold=threshold, normalise=normalise,
                              skip_if_head0=skip_if_head0, source=source, record=record)
        out = (probs @ v).transpose(1, 2).reshape(b, n, n_heads * head_dim)
        return attn.o_proj(out), probs

    original = attn.forward
    attn.forward = forward
    try:
        yield
    finally:
        attn.forward = original
