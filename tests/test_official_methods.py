"""Every method's library default against an eager attention written from its official repository's lines.

`Official` below is a test-only attention function (registered with transformers under its own name; it
shares no code with eah_interp). Each method's edit is written as its official code computes it, with
the official slicing, loops and quirks, and cited by repository, commit, file and line:

* EAH: itsqyh/Shallow-Focus-Deep-Fixes@092c454, ``modeling_llama_eah.py:68`` (``THRES = 0.0008``),
  ``:73-101`` (``atten_process_cal``), ``:447-448`` (called after the softmax), ``:1096-1098`` (layer 15 only).
* PAI: LALBJ/PAI@9bbd8bd, ``attention.py:67-94`` (mask, ``torch.max`` clamp, the edit), ``:120-128``
  (``llama_modify``), ``chair_eval.py:50-55`` (defaults), ``model_loader.py:121-122`` (image span),
  ``CFG.py:28-58`` (``CFGLogits``).
* VAR: MICV-yonsei/VisAttnSink@98e62d6, ``src/logic/logic.py:31-55`` (``activate``, sink layers
  ``range(n)[2:]``), ``:99-110`` (``DimProspector``), ``:115-145`` (``HeadFork``), ``:147-212``
  (``VARProcessor``: its own ``except_last_layer = False``), ``src/model/llava.py:136-148, 313-316``.
* VAF: ustc-hyin/ClearSight@5466c94, ``visaug/inference/AttnAdapter.py:68-92``, ``infer_pope.py:54``
  (``8 < i < 15``), ``infer_pope.sh`` (``--enh-para 1.15 --sup-para 0.95``).
* MiddleLayerBoost: ZhangqiJiang07/middle_layers_indicating_hallucinations@a0622a9,
  ``modify_attention.py:67-87, 113-121``, ``chair_eval.py:44-47, 73-74``.
* AD-HH: TianyunYoung/Hallucination-Attribution@841fc1b, ``LLaVA/llava/model/language_model/
  modeling_llama.py:575-581``, ``LLaVA/eval_scripts/eval_caption_adhh.py:141-144`` (heads, span),
  ``LLaVA/bash_scripts/decoding.sh`` (``adhh_threshold=0.4``).
* AllPath: SooLab/AllPath@c879251, ``mods/new_modeling_llama.py:186-220`` (per-head ``o_proj`` slices,
  scales, ``norm_distribution``), ``:789-804`` (per-layer lists, overlap dropped), ``main.py:212-218``
  (``prepare_heads``), ``:309-310`` (``in_scale=2``, ``de_scale=0``).

Models: a tiny LLaVA with LLaVA-1.5-7B's decoder shape (32 layers x 32 heads, MHA) and a GQA one (32 x 32,
8 KV heads), hidden size 64. Layouts: LLaVA-1.5's (BOS + 34 system tokens, 576 image tokens from 36
16-token images, a question) where the hard-coded window is the point (EAH's reference preset), else a
short one (BOS + 4 + 16 image tokens + 6), where the official codes' hard-coded LLaVA-1.5 positions
(ClearSight's ``SYS_LEN = 35, IMG_LEN = 576``, AD-HH's ``img_start_pos = 35, img_length = 576``) are this
layout's image start and length. Each case: the prompt forward (logits at every position) and 4 greedy
decode steps with the KV cache, within 1e-5, and the edit must change the output.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LogitsProcessor, LogitsProcessorList
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from eah_interp import ConfigError, TokenLayout, hf, sink_scores
from eah_interp.interventions import ADHH, EAH, PAI, VAF, VAR, HeadScale, MiddleLayerBoost
from eah_interp.models.tiny import TINY_BOS_ID, TINY_IMAGE_TOKEN_ID, sharp_tiny_llava

OFFICIAL = "eah_interp_tests.official_attention"
N_LAYERS, N_HEADS, HIDDEN = 32, 32, 64
STEPS = 4  # decode steps after the prompt

#: LLaVA-1.5-7B's hallucination heads as the official file lists them (eval_caption_adhh.py:141-142).
ADHH_HEADS = [[16, 29], [26, 9], [13, 31], [15, 10], [20, 12], [30, 9], [19, 18], [17, 0], [18, 9], [26, 28],
              [19, 27], [18, 26], [15, 25], [14, 16], [31, 26], [15, 24], [31, 3], [22, 20], [27, 29], [17, 28]]
#: AllPath-style head lists for the test (hallucination, good); (20, 5) is in both, so AllPath drops it.
ALLPATH_HALLU = [(3, 1), (3, 7), (20, 5), (31, 0)]
ALLPATH_GOOD = [(3, 2), (10, 30), (20, 5), (20, 6)]
#: VAR's sink dimensions of the test models (planted in `build`) and a threshold between planted and other tokens
#: (the official tau 20 needs a hidden size above 400: an RMS-normalised entry is at most sqrt(hidden)).
VAR_DIMS, VAR_TAU = (7, 11), 5.0


# ------------------------------------------------------------------------------------------- fixtures
def build(kv_heads: int):
    """The tiny LLaVA with planted massive activations (VAR's sinks, like LLaMA-2-7B's dims 2533 and 1415): image
    tokens 3 and 9 of every image carry 5.0 in dim 7 (a projector hook), BOS carries 5.0 in dim 11 (its
    embedding); RMS-normalised that is about 7.8 at every layer's input, other tokens stay below 3.5."""
    model = sharp_tiny_llava(seed=3, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=kv_heads, hidden=HIDDEN)
    d, group = HIDDEN // N_HEADS, N_HEADS // kv_heads
    with torch.no_grad():  # AD-HH's heads peaked (q = 2000 k of their KV head): the last row's text mass is near 0 or 1
        for layer, head in ADHH_HEADS:
            attn = model.model.language_model.layers[layer].self_attn
            g = head // group
            attn.q_proj.weight[head * d : (head + 1) * d] = 2000.0 * attn.k_proj.weight[g * d : (g + 1) * d]
        model.model.language_model.embed_tokens.weight[TINY_BOS_ID, VAR_DIMS[1]] = 5.0

    def plant(module, args, output):
        output = output.clone()
        output[..., [3, 9], VAR_DIMS[0]] = 5.0
        return output

    model.model.multi_modal_projector.register_forward_hook(plant)
    return model


@pytest.fixture(scope="module", params=["mha", "gqa"])
def model(request):
    return build(32 if request.param == "mha" else 8)


def prompt(n_system: int, n_images: int, n_question: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``[BOS, system text, image tokens (16 per image), question]``, batch 1, with pixel values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([
        torch.tensor([TINY_BOS_ID]), torch.randint(3, 100, (n_system - 1,), generator=g),
        torch.full((16 * n_images,), TINY_IMAGE_TOKEN_ID), torch.randint(3, 100, (n_question,), generator=g),
    ])[None]
    pixels = torch.randn(n_images, 3, 28, 28, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


SHORT = dict(n_system=5, n_images=1, n_question=6)  # image tokens [5, 21)
LLAVA15 = dict(n_system=35, n_images=36, n_question=12)  # image tokens [35, 611), as LLaVA-1.5's prompt


def span(inputs) -> tuple[int, int]:
    image = (inputs["input_ids"][0] == TINY_IMAGE_TOKEN_ID).nonzero().flatten()
    return int(image[0]), int(image[-1]) + 1 - int(image[0])


def run(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt forward (every position) and of STEPS greedy decode steps with the KV cache."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        logits, tokens, mask = [out.logits[0]], [], inputs["attention_mask"]
        for _ in range(STEPS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[0])
    return torch.cat(logits), torch.cat(tokens, 1)


# ------------------------------------------------------------------------------------------- official lines
def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv``, as the official files import it: KV head g serves query heads g*r .. g*r+r-1."""
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, n, d).reshape(b, kv * n_rep, n, d)


class Official:
    """One method's official attention lines (see the module docstring), as a transformers attention function."""

    def __init__(self, method: str, image_start: int, image_len: int, **params):
        self.method, self.im, self.pa, self.params = method, image_start, image_len, params
        self.indices: dict[int, torch.Tensor] = {}  # VAR's DimProspector.indices
        self.use_cfg = params.get("use_cfg", False)  # PAI: llama_modify(..., use_cfg, ...) sets it on every edited layer

    # --- EAH: modeling_llama_eah.py:73-101, on batch row 0, all 32 heads
    def atten_process_cal(self, attention_map, start, end, divisor, require_not_head0):
        threshod = self.params["threshold"]
        k, n, copied_attention_map = 0, 0, None
        for head_num in range(attention_map.shape[1]):
            modified_head = attention_map[0][head_num]
            mask = ~torch.eye(modified_head.size(0), dtype=bool)
            indices = torch.nonzero(torch.where(
                torch.sum(modified_head * mask, dim=0)[start:end] / divisor(modified_head.size(0)) > threshod, 1, 0))
            if len(indices) > n:
                n, k = len(indices), head_num
                copied_attention_map = modified_head.detach().clone()
        if (k > 0) if require_not_head0 else (n > 0):
            for head_num in range(attention_map.shape[1]):
                attention_map[0][head_num] = copied_attention_map
        return attention_map

    # --- VAR: logic.py:99-110 (DimProspector), run on a decoder layer's input during the prompt forward
    def dim_prospector(self, hidden_states, layer):
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        rms_norm_hs = torch.abs(hidden_states * torch.rsqrt(variance + 1e-6))
        rms_values = torch.stack([rms_norm_hs[:, :, idx] for idx in self.params["dims"]], dim=-1)
        max_rms_values = torch.max(rms_values, dim=-1)[0]
        self.indices[layer] = torch.nonzero(max_rms_values > self.params["tau"])[:, 1]

    # --- VAR: logic.py:115-145 (HeadFork) and 163-212 (attn_redist; except_last_layer is VARProcessor's False)
    def var(self, attention_map, layer, prefill):
        im, pa, p = self.im, self.pa, self.params["p"]
        sink_inds = self.indices.get(layer, [])
        vis_sink_inds = [i.unsqueeze(0) for i in sink_inds if im <= i < im + pa]
        if len(vis_sink_inds) == 0:
            return attention_map
        vis_sink_inds = torch.cat(vis_sink_inds, dim=0)
        image_attn = attention_map[:, :, :, im : im + pa]
        portion = torch.sum(image_attn[:, :, :, vis_sink_inds - im], dim=-1) / torch.sum(image_attn + 1e-6, dim=-1)
        summation = torch.sum(image_attn, dim=-1)
        coord = torch.nonzero((portion <= self.params["rho"]) & (summation >= self.params["summ"]))
        indices = self.indices[layer]
        attention_map = attention_map.clone()
        if len(coord) > 0:
            for h in range(attention_map.shape[1]):
                query_coord = coord[coord[:, 1] == h][:, 2]
                query_coord = query_coord[im + pa <= query_coord] if prefill else query_coord
                bsz_coord = coord[coord[:, 1] == h][:, 0][: len(query_coord)]
                head_coord = coord[coord[:, 1] == h][:, 1][: len(query_coord)]
                if not query_coord.shape[0] or not head_coord.shape[0]:
                    continue
                selected_attn_map = attention_map[bsz_coord, head_coord, query_coord, :].clone()
                vis_indices = indices[(im <= indices) & (indices < im + pa)]
                text_indices = indices[~torch.isin(indices, vis_indices)]
                copied_attention_map = selected_attn_map.detach().clone()
                selected_attn_map[:, text_indices] *= p
                selected_attn_map[:, vis_indices] *= p
                weight_budget_vis = copied_attention_map[:, vis_indices].sum(dim=1) * (1 - p)
                weight_budget_text = copied_attention_map[:, text_indices].sum(dim=1) * (1 - p)
                copied_attention_map[:, vis_indices] *= 0
                ratios_vis = copied_attention_map[:, im : im + pa] / copied_attention_map[:, im : im + pa].sum(
                    dim=1, keepdim=True)
                selected_attn_map[:, im : im + pa] += (weight_budget_vis + weight_budget_text).view(-1, 1) * ratios_vis
                attention_map[bsz_coord, head_coord, query_coord, :] = selected_attn_map
        return attention_map

    def edits_layer(self, layer: int) -> bool:
        m = self.method
        return {
            "eah_reference": layer == 15, "eah_paper": layer == 1, "pai": 2 <= layer < 32, "pai_cfg": 2 <= layer < 32,
            "middle": 5 <= layer < 19, "vaf": 8 < layer < 15, "var": True, "adhh": True, "allpath": False,
        }[m]

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer, (bsz, num_heads, q_len, head_dim) = module.layer_idx, query.shape
        key_states = repeat_kv(key, num_heads // key.shape[1])
        value_states = repeat_kv(value, num_heads // value.shape[1])
        if not self.edits_layer(layer) and self.params.get("fast_plain_layers"):
            out = F.scaled_dot_product_attention(query, key_states, value_states, attn_mask=attention_mask)
            return out.transpose(1, 2).contiguous(), None
        kv_seq_len, prefill = key_states.shape[-2], q_len == key_states.shape[-2]
        im, pa = self.im, self.pa
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) / math.sqrt(head_dim)
        if self.method == "vaf" and 8 < layer < 15:  # AttnAdapter.py:71-78 (before the mask)
            SYS_LEN, IMG_LEN, enh_para, sup_para = im, pa, 1.15, 0.95  # noqa: N806 - the official names
            if q_len > SYS_LEN + IMG_LEN:
                attn_weights[:, :, SYS_LEN + IMG_LEN :, SYS_LEN : SYS_LEN + IMG_LEN] = (
                    enh_para * attn_weights[:, :, SYS_LEN + IMG_LEN :, SYS_LEN : SYS_LEN + IMG_LEN])
                attn_weights[:, :, SYS_LEN + IMG_LEN :, :SYS_LEN] = sup_para * attn_weights[:, :, SYS_LEN + IMG_LEN :, :SYS_LEN]
            else:
                attn_weights[:, :, :, SYS_LEN : SYS_LEN + IMG_LEN] = enh_para * attn_weights[:, :, :, SYS_LEN : SYS_LEN + IMG_LEN]
                attn_weights[:, :, :, :SYS_LEN] = sup_para * attn_weights[:, :, :, :SYS_LEN]
        attn_weights = attn_weights + attention_mask
        if self.method in ("pai", "pai_cfg", "middle") and self.edits_layer(layer):
            attn_weights = torch.max(attn_weights, torch.tensor(torch.finfo(attn_weights.dtype).min))
            img_start_idx, img_end_idx = im, im + pa  # len(token_before) + 1, + 576
            if self.method != "middle" and not self.use_cfg:  # attention.py:90-94, alpha 0.2
                attn_weights[:, :, -1, img_start_idx:img_end_idx] = (
                    attn_weights[:, :, -1, img_start_idx:img_end_idx].abs() * 0.2
                    + attn_weights[:, :, -1, img_start_idx:img_end_idx])
            elif self.method == "middle":  # modify_attention.py:83-87, alpha 0.5
                attn_weights[:, :, -1, img_start_idx:img_end_idx] = (
                    attn_weights[:, :, -1, img_start_idx:img_end_idx]
                    + 0.5 * attn_weights[:, :, -1, img_start_idx:img_end_idx].abs().mean(dim=1, keepdim=True))
        attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
        if self.method == "eah_reference" and layer == 15:  # the hard-coded window, 647 - j
            attn_weights = self.atten_process_cal(
                attn_weights, 36, 611, lambda q: torch.arange(611, 36, -1), require_not_head0=True)
        elif self.method == "eah_paper" and layer == 1:  # the paper preset: layer 1, every image key, rows after j
            attn_weights = self.atten_process_cal(
                attn_weights, im, im + pa, lambda q: torch.arange(q - 1 - im, q - 1 - im - pa, -1), require_not_head0=False)
        elif self.method == "var":
            attn_weights = self.var(attn_weights, layer, prefill)
        elif self.method == "adhh":  # modeling_llama.py:576-581, heads of this layer, text = keys from 35 + 576 on
            for head in [h for l_, h in ADHH_HEADS if l_ == layer]:
                aggre_attention = torch.sum(attn_weights[:, head, -1, im + pa :])
                if aggre_attention >= 0.4:
                    attn_weights[:, head, -1, im + pa :] = 0
        attn_output = torch.matmul(attn_weights, value_states)
        assert attn_output.shape == (bsz, num_heads, q_len, head_dim) and kv_seq_len == key.shape[-2]
        return attn_output.transpose(1, 2).contiguous(), attn_weights


def allpath_o_proj_hook(hallu_heads, good_heads, in_scale=2.0, de_scale=0.0, norm_distribution=None):
    """AllPath's head scaling on one layer's ``o_proj`` (new_modeling_llama.py:186-220, lists per layer 794-804)."""

    def hook(o_proj, args, output):
        cur_hallu_heads, cur_good_heads = set(hallu_heads), set(good_heads)
        cur_overlap_heads = cur_hallu_heads & cur_good_heads
        cur_hallu_heads, cur_good_heads = list(cur_hallu_heads - cur_overlap_heads), list(cur_good_heads - cur_overlap_heads)
        if not (cur_hallu_heads or cur_good_heads):
            return output
        bsz, q_len, _ = args[0].shape
        raw_attn_output = args[0].reshape(bsz, q_len, N_HEADS, -1).transpose(1, 2)  # [b, heads, q, d], before the reshape
        num_head, head_dim = raw_attn_output.shape[1], raw_attn_output.shape[-1]
        o_proj_slices = o_proj.weight.T.reshape(num_head, head_dim, o_proj.out_features)
        raw_attn_output = raw_attn_output @ o_proj_slices
        scale = torch.ones(bsz, num_head, q_len, dtype=raw_attn_output.dtype)
        scale[:, cur_hallu_heads, :] = de_scale
        scale[:, cur_good_heads, :] = in_scale
        if norm_distribution:
            scale = scale * (num_head / scale.sum(dim=-2, keepdim=True))
        scale = scale.reshape(bsz, num_head, q_len, 1)
        return (scale * raw_attn_output).sum(dim=1)

    return hook


def prepare_heads(heads_list):
    """main.py:212-218: (layer, head) pairs -> {layer: [heads]}."""
    formatted = defaultdict(list)
    for layer, head in heads_list:
        formatted[layer].append(head)
    return formatted


class official_model:  # noqa: N801 - a context manager
    """The model's language attention replaced by `Official` (plus VAR's and AllPath's hooks)."""

    def __init__(self, model, official: Official, allpath: dict | None = None):
        self.model, self.official, self.allpath = model, official, allpath

    def __enter__(self):
        AttentionInterface.register(OFFICIAL, self.official.attention)
        AttentionMaskInterface.register(OFFICIAL, eager_mask)
        self.config = self.model.config.get_text_config(decoder=True)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation_internal = OFFICIAL
        layers, self.hooks = self.model.model.language_model.layers, []
        if self.official.method == "var":  # llava.py:313-316: sinks from the inputs of layers range(n)[2:], prompt only
            for i in range(len(layers))[2:]:
                def prospect(module, args, kwargs, i=i):
                    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
                    if hidden_states.shape[1] > 1:
                        self.official.dim_prospector(hidden_states, i)
                self.hooks.append(layers[i].register_forward_pre_hook(prospect, with_kwargs=True))
        if self.allpath is not None:
            hallu, good = prepare_heads(self.allpath["hallu"]), prepare_heads(self.allpath["good"])
            for i, layer in enumerate(layers):
                self.hooks.append(layer.self_attn.o_proj.register_forward_hook(
                    allpath_o_proj_hook(hallu[i], good[i], norm_distribution=self.allpath["norm"])))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.config._attn_implementation_internal = self.previous
        AttentionInterface._global_mapping.pop(OFFICIAL, None)
        AttentionMaskInterface._global_mapping.pop(OFFICIAL, None)


# ------------------------------------------------------------------------------------------- the comparisons
def compare(model, inputs, library_items, official: Official, allpath=None):
    real = inputs["attention_mask"][0].bool()
    plain, _ = run(model, inputs)
    with hf.intervene(model, library_items) as lib_run:
        got, got_tokens = run(model, inputs)
    with official_model(model, official, allpath):
        want, want_tokens = run(model, inputs)
    n = inputs["input_ids"].shape[1]
    assert torch.allclose(got[:n][real], want[:n][real], atol=1e-5), (got[:n] - want[:n]).abs().max()
    assert torch.allclose(got[n:], want[n:], atol=1e-5), (got[n:] - want[n:]).abs().max()
    assert got_tokens.tolist() == want_tokens.tolist()
    assert not torch.allclose(got, plain, atol=1e-4), "the edit changed nothing"
    return lib_run


def test_eah_reference_default_equals_the_official_window_on_llava15s_layout(model):
    """EAH.reference() on LLaVA-1.5's layout (image tokens [35, 611)): atten_process_cal's [36, 611) and 647 - j."""
    inputs = prompt(**LLAVA15)
    assert span(inputs) == (35, 576)
    run_ = compare(model, inputs, [EAH.reference()],
                   Official("eah_reference", 35, 576, threshold=0.0008, fast_plain_layers=True))
    (record,) = [r for r in run_.records if r.eah is not None and r.q_len == r.k_len]
    assert record.layer == 15 and record.eah.source_head.tolist()[0] > 0  # a broadcast happened (head 0 never)


CASES = {
    "eah_paper": lambda m, x: ([EAH.paper()], dict(threshold=0.0008)),
    "pai": lambda m, x: ([PAI()], {}),
    "var": lambda m, x: ([VAR(dims=VAR_DIMS, tau=VAR_TAU)], dict(dims=VAR_DIMS, tau=VAR_TAU, rho=0.5, summ=0.2, p=0.6)),
    "vaf": lambda m, x: ([VAF()], {}),
    "middle": lambda m, x: ([MiddleLayerBoost()], {}),
    "adhh": lambda m, x: ([ADHH.llava15_7b()], {}),
}


@pytest.mark.parametrize("method", list(CASES))
def test_library_default_equals_the_official_lines(model, method):
    inputs = prompt(**SHORT)
    items, params = CASES[method](model, inputs)
    start, n = span(inputs)
    run_ = compare(model, inputs, items, Official(method, start, n, **params))
    decode = [r for r in run_.records if r.q_len < r.k_len and r.changed]
    assert sum(r.changed for r in run_.records) > 0 and (bool(decode) or method == "eah_paper")
    if method == "var":  # the shipped code's layers: 2 .. 31, the last one included
        assert {r.layer for r in run_.records if r.changed} == set(range(2, N_LAYERS))


@pytest.mark.parametrize("renormalise", [False, True])
def test_headscale_allpath_equals_allpaths_head_scaling(model, renormalise):
    """HeadScale.allpath: AllPath's per-head o_proj slices x 0 / x 2 (a head in both lists untouched), optionally
    renormalised; the shipped main.py never renormalises (norm_distribution is never passed)."""
    inputs = prompt(**SHORT)
    start, n = span(inputs)
    item = HeadScale.allpath(ALLPATH_HALLU, ALLPATH_GOOD, renormalise=renormalise)
    assert (20, 5) not in item.heads and item.scale == (0.0, 0.0, 0.0, 2.0, 2.0, 2.0)
    compare(model, inputs, [item], Official("allpath", start, n),
            allpath={"hallu": ALLPATH_HALLU, "good": ALLPATH_GOOD, "norm": renormalise})


class CFGLogits(LogitsProcessor):
    """LALBJ/PAI CFG.py:28-58, with ``use_cfg`` toggled on the edited layers of `Official` (CFG.py:32-33, 48-49)."""

    def __init__(self, guidance_scale, uncond, model, official):
        self.guidance_scale, self.uncond, self.model, self.official, self.out = guidance_scale, uncond, model, official, None

    def __call__(self, input_ids, scores):
        scores = F.log_softmax(scores, dim=-1)
        if self.guidance_scale == 1:
            return scores
        self.official.use_cfg = True
        if self.out is None:
            self.out = self.model(self.uncond, use_cache=True)
        else:
            self.out = self.model(input_ids[:, -1:], use_cache=True, past_key_values=self.out.past_key_values)
        self.official.use_cfg = False
        unconditional_logits = F.log_softmax(self.out.logits[:, -1, :], dim=-1)
        cutoff = torch.log(torch.tensor(0.1)) + scores.max(dim=-1, keepdim=True).values
        out = self.guidance_scale * (scores - unconditional_logits) + unconditional_logits
        return out.masked_fill(scores < cutoff, -float("inf"))


@pytest.mark.parametrize("preset", ["readme", "chair_eval"])
def test_pai_with_contrastive_logits_equals_the_official_scripts(model, preset):
    """PAI's scripts with --use-attn --use-cfg: llama_modify sets use_cfg, so the prompt forward is not edited
    (attention.py:90) and decode steps are; the text-only pass runs unedited. The library: PAI(phase="decode")
    with ContrastiveLogits.<preset> (gamma 1.1 README / 2 chair_eval.py), greedy as the README's commands."""
    inputs = prompt(**SHORT)
    start, n = span(inputs)
    ids = inputs["input_ids"]
    uncond = ids[:, ids[0] != TINY_IMAGE_TOKEN_ID]  # [bos, token_before, token_after] (model_loader.py:290)
    gamma = {"readme": 1.1, "chair_eval": 2.0}[preset]

    def generate(processor):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=STEPS + 1, do_sample=False, logits_processor=LogitsProcessorList(
                [processor]), output_scores=True, output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores, 1), torch.stack(out.logits, 1)

    with hf.intervene(model, [PAI(phase="decode")]):
        lib = generate(getattr(hf.ContrastiveLogits, preset)(model, {"input_ids": uncond, "attention_mask": torch.ones_like(uncond)}))
    official = Official("pai_cfg", start, n, use_cfg=True)
    with official_model(model, official):
        want = generate(CFGLogits(gamma, uncond, model, official))
    plain = generate(CFGLogits(gamma, uncond, model, Official("pai_cfg", start, n)))  # no attention edit at all
    assert lib[0].tolist() == want[0].tolist()
    finite = torch.isfinite(want[1])
    assert torch.equal(torch.isfinite(lib[1]), finite) and torch.allclose(lib[1][finite], want[1][finite], atol=1e-5)
    assert torch.allclose(lib[2], want[2], atol=1e-5)
    assert torch.allclose(lib[2][:, 0], plain[2][:, 0], atol=1e-6) and not torch.allclose(lib[2][:, 1:], plain[2][:, 1:], atol=1e-4)


# ------------------------------------------------------------------------------------------- the window, without a model
def test_official_sink_score_on_llava15s_layout_is_col_over_647_minus_j():
    """35 tokens (BOS + system), 576 image tokens, a question: keys 36..610 score col_j / (647 - j); key 35
    (the first image token) and every non-image key score 0."""
    n = 35 + 576 + 12
    layout = TokenLayout.from_spans([(35, 611)], n)
    attn = torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(0)).tril()
    attn = attn / attn.sum(-1, keepdim=True)
    scores = sink_scores(attn, layout, "official")[0]
    col = (attn[0] * (1 - torch.eye(n))).sum(-2)  # column sums without the diagonal, [heads, k]
    j = torch.arange(36, 611)
    assert torch.allclose(scores[:, 36:611], col[:, 36:611] / (647 - j), rtol=1e-5)
    assert scores[:, 35].abs().sum() == 0 and scores[:, :35].abs().sum() == 0 and scores[:, 611:].abs().sum() == 0


def test_official_window_rule_on_any_layout():
    """The rule on another span and with left padding: keys s+1 .. e-1 with d(j) = (s + 1) + e - j, positions
    counted from the first real token (the official arithmetic with start = s + 1 and end = e)."""
    pad, n_real = 3, 20
    mask = torch.tensor([[0] * pad + [1] * n_real])
    image = torch.zeros(1, pad + n_real, dtype=torch.bool)
    image[0, pad + 4 : pad + 12] = True  # s = 4, e = 12 relative to the first real token
    layout = TokenLayout(image_mask=image, attention_mask=mask.bool())
    g = torch.Generator().manual_seed(1)
    real = torch.rand(1, 3, n_real, n_real, generator=g).tril()
    attn = torch.zeros(1, 3, pad + n_real, pad + n_real)
    attn[..., pad:, pad:] = real / real.sum(-1, keepdim=True)
    scores = sink_scores(attn, layout, "official")[0, :, pad:]
    s, e = 4, 12
    col = (attn[0, :, pad:, pad:] * (1 - torch.eye(n_real))).sum(-2)
    start, end = s + 1, e
    want = torch.zeros_like(col)
    want[:, start:end] = col[:, start:end] / torch.arange(end, start, -1)
    assert torch.allclose(scores, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------- presets
def test_var_default_layers_are_the_shipped_codes_and_except_last_layer_the_yamls():
    """The shipped code redistributes in layers 2..n-1 (VARProcessor.except_last_layer stays False); the YAML's
    except_last_layer: 1 would skip the last one."""
    var = VAR(dims=(1,))
    assert var.layers_for(32) == tuple(range(2, 32)) and VAR.llava15_7b().layers_for(32) == tuple(range(2, 32))
    skip = VAR(dims=(1,), except_last_layer=True)
    assert skip.layers_for(32) == tuple(range(2, 31))
    assert VAR(dims=(1,), layers=(5, 31), except_last_layer=True).layers_for(32) == (5,)
    assert VAR.from_json(skip.to_json()) == skip and "except the last layer" in skip.describe()


def test_allpath_preset_round_trips_and_says_what_it_does():
    item = HeadScale.allpath(ALLPATH_HALLU, ALLPATH_GOOD, renormalise=True)
    assert HeadScale.from_json(item.to_json()) == item
    text = item.describe()
    assert "by 0" in text and "by 2" in text and "sum to its head count" in text
    with pytest.raises(ConfigError, match="one per head"):
        HeadScale(heads=((1, 2), (1, 3)), scale=(0.0,))
    with pytest.raises(ConfigError, match="dropped"):
        HeadScale.allpath([(1, 1)], [(1, 1)])


def test_contrastive_presets_carry_the_official_gammas():
    model = build(32)
    uncond = {"input_ids": torch.tensor([[1, 5, 6]])}
    assert hf.ContrastiveLogits.chair_eval(model, uncond).gamma == 2.0
    assert hf.ContrastiveLogits.readme(model, uncond).gamma == 1.1
    assert hf.ContrastiveLogits.readme(model, uncond, cutoff=0.2).cutoff == 0.2
