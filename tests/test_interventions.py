"""`eah_interp.interventions` through `hf.intervene`, against a loop-written reference attention.

The reference is a test-only attention function registered with transformers (it shares no code with
eah_interp): it receives the layer's query/key/value after rotary embedding, builds the causal +
padding mask itself, and applies each method's edit with Python loops over (row, head, query, key),
written from the method's description (docs/methods.md), at the method's edit point. Residual-stream
edits are checked against plain forward hooks on the decoder layers that edit the hidden states by
hand (`reference_model`). Every method is checked on a tiny LLaVA (Llama decoder, GQA 4 heads / 2 KV heads) and a tiny Qwen2-VL (M-RoPE, GQA),
on a prompt forward and on decode steps (``generate`` logits step by step).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from eah_interp import (
    ConfigError,
    HeadStats,
    LayerIndexError,
    LayoutError,
    TokenLayout,
    UnsupportedModelError,
    dispatch,
    hf,
)
from eah_interp.interventions import (
    ADHH,
    EAH,
    PAI,
    VAF,
    VAR,
    HeadScale,
    Intervention,
    Knockout,
    MiddleLayerBoost,
    ResidualEdit,
    Site,
    ValueEdit,
    scaled_range,
)
from eah_interp.models.tiny import (
    TINY_IMAGE_ID,
    TINY_IMAGE_TOKEN_ID,
    sharp_tiny_llava,
    tiny_llava_inputs,
    tiny_qwen2_vl,
)
from tests.reference import explicit_edit

REFERENCE = "eah_interp_tests.reference_attention"
LOWEST = torch.finfo(torch.float32).min


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def family(request):
    if request.param == "llava":
        model = sharp_tiny_llava(seed=0)
        inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)
        return model, inputs, TINY_IMAGE_TOKEN_ID
    model, inputs = tiny_qwen2_vl(seed=0)
    with torch.no_grad():  # sharper attention, as sharp_tiny_llava does
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model, inputs, TINY_IMAGE_ID


# ------------------------------------------------------------------------------------------- reference
class Reference:
    """A loop-written eager attention with the edits of a list of interventions (prefill and decode)."""

    def __init__(self, interventions, input_ids, attention_mask, image_id):
        self.items = interventions
        self.prompt_len = input_ids.shape[1]
        self.past = 0
        self.sinks = {}
        self.prompt_mask = attention_mask.bool()
        self.image = (input_ids == image_id).tolist()

    # position groups of one batch row, for a call over k keys (keys >= prompt_len are generated text)
    def groups(self, row, k):
        real = self.prompt_mask[row].tolist() + [True] * (k - self.prompt_len)
        image = self.image[row] + [False] * (k - self.prompt_len)
        first = image.index(True)
        end = max(j for j in range(k) if image[j]) + 1
        return {
            "real": real,
            "image": image,
            # the layout's groups (left padding: the last prompt position is prompt_len - 1)
            "system": [real[j] and j < first for j in range(k)],
            "question": [real[j] and j >= first and not image[j] and j < self.prompt_len - 1 for j in range(k)],
            "last": [j == self.prompt_len - 1 for j in range(k)],
            "generated": [j >= self.prompt_len for j in range(k)],
            "text": [real[j] and not image[j] and j != self.prompt_len - 1 for j in range(k)],
            "after_image": [real[j] and j >= first and not image[j] for j in range(k)],
            "all": real,
            "end": end,
        }

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        b, h, q, _ = query.shape
        k = key.shape[-2]
        group = h // key.shape[1]
        keys = torch.stack([key[:, head // group] for head in range(h)], 1).float()
        values = torch.stack([value[:, head // group] for head in range(h)], 1).float()
        scores = (query.float() @ keys.transpose(-1, -2)) * scaling
        offset = k - q
        groups = [self.groups(row, k) for row in range(b)]
        prefill = q == k
        active = [item for item in self.items if self.applies(item, layer, prefill)]
        for item in active:
            if isinstance(item, VAF):  # before the mask: rows after the image, image x s1, system x s2
                for row in range(b):
                    g = groups[row]
                    for i in range(q):
                        if not (g["real"][offset + i] and offset + i >= g["end"]):
                            continue
                        for j in range(k):
                            for head in range(h):
                                if g["image"][j]:
                                    scores[row, head, i, j] *= item.image_scale
                                elif g["system"][j]:
                                    scores[row, head, i, j] *= item.system_scale
        for row in range(b):  # the causal + padding mask
            for i in range(q):
                for j in range(k):
                    if not (groups[row]["real"][j] and j <= offset + i):
                        scores[row, :, i, j] = LOWEST
        for item in active:
            last = q - 1
            if isinstance(item, PAI):
                for row in range(b):
                    for j in range(k):
                        if groups[row]["image"][j]:
                            for head in range(h):
                                z = float(scores[row, head, last, j])
                                scores[row, head, last, j] = z + item.alpha * abs(z)
            elif isinstance(item, MiddleLayerBoost):
                for row in range(b):
                    for j in range(k):
                        if groups[row]["image"][j]:
                            mean_abs = sum(abs(float(scores[row, head, last, j])) for head in range(h)) / h
                            for head in range(h):
                                scores[row, head, last, j] += item.alpha * mean_abs
            elif isinstance(item, Knockout):
                for row in range(b):
                    g = groups[row]
                    for i in range(q):
                        pos = offset + i
                        in_group = i == last if item.queries == "last" else g[item.queries][pos]
                        if not (in_group and g["real"][pos]):
                            continue
                        for j in range(k):
                            if j != pos and g[item.keys][j] and scores[row, 0, i, j] > LOWEST / 2:
                                scores[row, :, i, j] = LOWEST
        probs = torch.softmax(scores, -1)
        for item in active:
            if isinstance(item, EAH):
                image_mask = torch.tensor([g["image"] for g in groups])
                real = torch.tensor([g["real"] for g in groups])
                probs = explicit_edit(probs, real, image_mask, threshold=item.threshold, normalise=item.normalise,
                                      skip_if_head0=item.skip_if_head0)
            elif isinstance(item, VAR):
                probs = self.var(item, layer, probs, groups, offset)
            elif isinstance(item, ADHH):
                for layer_, head in item.heads:
                    if layer_ != layer:
                        continue
                    for row in range(b):
                        text = groups[row]["after_image"]
                        mass = sum(float(probs[row, head, q - 1, j]) for j in range(k) if text[j])
                        if mass >= item.tau:
                            for j in range(k):
                                if text[j]:
                                    probs[row, head, q - 1, j] = 0.0
        out = (probs @ values).transpose(1, 2)  # [b, q, h, d]
        value_edits = [item for item in active if isinstance(item, ValueEdit)]
        if value_edits:  # each (row, query) reads the values edited by the ValueEdits that select it
            for row in range(b):
                g = groups[row]
                edited_values = {}  # which ValueEdits select the row -> that row's edited values
                for i in range(q):
                    pos = offset + i
                    flags = tuple(
                        {"all": g["real"][pos], "last": i == q - 1 and g["real"][pos],
                         "decode": not prefill and g["real"][pos],
                         "after_image": g["real"][pos] and pos >= g["end"]}[item.rows]
                        for item in value_edits
                    )
                    if flags in edited_values:
                        kv = edited_values[flags]
                        for head in range(h):
                            out[row, i, head] = probs[row, head, i] @ kv[head // group]
                        continue
                    kv = value[row].float().clone()  # [kv_heads, k, d]
                    edited_values[flags] = kv
                    for item, chosen in zip(value_edits, flags, strict=True):
                        if not chosen:
                            continue
                        keys = [j for j in range(k) if self.span(g, item.keys, row, k)[j]]
                        for kv_head in range(kv.shape[0]):
                            if item.heads is not None and kv_head not in item.heads:
                                continue
                            if item.mode == "mean":
                                mean = sum(kv[kv_head, j] for j in keys) / len(keys)
                                for j in keys:
                                    kv[kv_head, j] = mean
                            else:
                                for j in keys:
                                    kv[kv_head, j] = kv[kv_head, j] * item.scale
                    for head in range(h):  # sum_j P[i, j] V'[j], with the query head's KV head
                        out[row, i, head] = probs[row, head, i] @ kv[head // group]
        for item in active:
            if isinstance(item, HeadScale):
                for layer_, head in item.heads:
                    if layer_ == layer:
                        out[:, :, head] *= item.scale
        return out.to(query.dtype).contiguous(), probs

    def note_hidden(self, layer, hidden, item):
        """VAR's sinks by hand on the prompt: |h_d / rms(h)| > tau for a sink dim d; decode steps add non-sinks."""
        b, n, dim = hidden.shape
        history = self.sinks.get(layer)
        if history is not None and n == 1:  # a decode step: the new token is never a sink (prompt sinks only)
            self.sinks[layer] = [old + [False] for old in history]
            return
        flags = []
        for row in range(b):
            row_flags = []
            for t in range(n):
                h = hidden[row, t].double()
                rms = math.sqrt(sum(float(x) ** 2 for x in h) / dim + 1e-6)
                row_flags.append(any(abs(float(h[d])) / rms > item.tau for d in item.dims))
            flags.append(row_flags)
        self.sinks[layer] = flags

    def var(self, item, layer, probs, groups, offset):
        b, h, q, k = probs.shape
        out = probs.clone()
        for row in range(b):
            g, sink = groups[row], self.sinks[layer][row]
            image = [j for j in range(k) if g["image"][j]]
            vis = [j for j in image if sink[j]]
            sinks = [j for j in range(k) if sink[j]]
            if not vis:
                continue
            for head in range(h):
                for i in range(q):
                    if not (g["real"][offset + i] and offset + i >= g["end"]):
                        continue
                    p = [float(x) for x in probs[row, head, i]]
                    image_sum = sum(p[j] for j in image)
                    portion = sum(p[j] for j in vis) / (image_sum + len(image) * 1e-6)
                    others = {j: p[j] for j in image if j not in vis}
                    if not (portion <= item.rho and image_sum >= item.summ and sum(others.values()) > 0):
                        continue
                    budget = (1 - item.p) * sum(p[j] for j in sinks)
                    for j in sinks:
                        out[row, head, i, j] = p[j] * item.p
                    total = sum(others.values())
                    for j, value in others.items():
                        out[row, head, i, j] = value + budget * value / total
        return out

    def span(self, g, spec, row, k):
        """A named span of the row's groups, or a user mask over the prompt (generated positions: False)."""
        if isinstance(spec, str):
            return g[spec]
        return [bool(spec[row][j]) and g["real"][j] if j < self.prompt_len else False for j in range(k)]

    def edit_residual(self, layer, where, hidden):
        """ResidualEdit by hand: h * scale + add at the selected positions of this forward."""
        b, q, _ = hidden.shape
        total = self.past + q
        hidden = hidden.clone()
        for item in self.items:
            if not (isinstance(item, ResidualEdit) and item.where == where and layer in item.layers):
                continue
            if not (item.phase == "both" or (item.phase == "prefill") == (q == total)):
                continue
            for row in range(b):
                g = self.groups(row, total)
                for i in range(q):
                    pos = total - q + i
                    if item.positions == "last":
                        chosen = i == q - 1 and g["real"][pos]
                    else:
                        chosen = self.span(g, item.positions, row, total)[pos]
                    if chosen:
                        new = hidden[row, i] * item.scale
                        if item.add is not None:
                            new = new + torch.tensor(item.add, dtype=hidden.dtype)
                        hidden[row, i] = new
        return hidden

    @staticmethod
    def applies(item, layer, prefill):
        if isinstance(item, EAH):
            return layer in item.layers and prefill
        if isinstance(item, (ADHH, HeadScale)):
            layers = {layer_ for layer_, _ in item.heads}
        else:
            layers = set(item.layers)
        return layer in layers and (item.phase == "both" or (item.phase == "prefill") == prefill)


class reference_model:  # noqa: N801 - a context manager
    """The model's language attention replaced by `Reference` (registered under a test-only name)."""

    def __init__(self, model, reference):
        self.model, self.reference = model, reference

    def __enter__(self):
        AttentionInterface.register(REFERENCE, self.reference.attention)
        AttentionMaskInterface.register(REFERENCE, eager_mask)
        self.config = self.model.config.get_text_config(decoder=True)
        self.previous = self.config._attn_implementation
        self.config._attn_implementation_internal = REFERENCE
        self.hooks = []
        reference, layers = self.reference, self.model.model.language_model.layers

        def note_past(module, args, kwargs):  # positions before this forward: 0 for the prompt, then counted
            q = kwargs["input_ids"].shape[1]
            reference.past = 0 if q == reference.prompt_len else reference.total
            reference.total = reference.past + q

        self.hooks.append(self.model.register_forward_pre_hook(note_past, with_kwargs=True))
        for layer in range(len(layers)):
            def edit_input(module, args, kwargs, layer=layer):
                if "hidden_states" in kwargs:
                    return args, {**kwargs, "hidden_states": reference.edit_residual(layer, "input", kwargs["hidden_states"])}
                return (reference.edit_residual(layer, "input", args[0]), *args[1:]), kwargs

            def edit_output(module, args, output, layer=layer):
                if isinstance(output, tuple):
                    return (reference.edit_residual(layer, "output", output[0]), *output[1:])
                return reference.edit_residual(layer, "output", output)

            self.hooks.append(layers[layer].register_forward_pre_hook(edit_input, with_kwargs=True))
            self.hooks.append(layers[layer].register_forward_hook(edit_output))
        for item in self.reference.items:
            if isinstance(item, VAR):
                for layer in item.layers:
                    decoder = self.model.model.language_model.layers[layer]
                    self.hooks.append(decoder.register_forward_pre_hook(
                        lambda m, a, kw, layer=layer, item=item: self.reference.note_hidden(
                            layer, kw.get("hidden_states", a[0] if a else None), item),
                        with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.config._attn_implementation_internal = self.previous
        AttentionInterface._global_mapping.pop(REFERENCE, None)
        AttentionMaskInterface._global_mapping.pop(REFERENCE, None)


def prompt_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def generated(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


#: A steering vector of the tiny models' hidden size (64), with varied signs and sizes.
STEER = tuple(0.5 * math.sin(1.7 * i) for i in range(64))

CASES = {
    "PAI": [PAI(alpha=0.5, layers=(1, 2))],
    "MiddleLayerBoost": [MiddleLayerBoost(alpha=0.5, layers=(0, 2))],
    "VAF": [VAF(image_scale=2.0, system_scale=0.5, layers=(0, 2))],
    "Knockout-last": [Knockout(queries="last", keys="image", layers=(0, 1, 2))],
    "Knockout-question": [Knockout(queries="question", keys="image", layers=(1, 2))],
    "ADHH": [ADHH(heads=((1, 0), (2, 3), (2, 1)), tau=0.05)],
    "HeadScale": [HeadScale(heads=((0, 1), (2, 2)), scale=0.0)],
    "PAI-decode-only": [PAI(alpha=1.0, layers=(0, 1), phase="decode")],
    "EAH+PAI": [EAH(layers=(1,), threshold=0.0), PAI(alpha=0.5, layers=(1, 2))],
    "VAF+HeadScale+Knockout": [
        VAF(image_scale=2.0, system_scale=0.5, layers=(1,)),
        HeadScale(heads=((1, 3),), scale=2.0),
        Knockout(queries="last", keys="system", layers=(1,)),
    ],
    "ValueEdit-image-zero": [ValueEdit(keys="image", scale=0.0, layers=(1, 2))],
    "ValueEdit-kv-head-last-row": [ValueEdit(keys="system", scale=3.0, heads=(1,), rows="last", layers=(0, 2))],
    "ValueEdit-mean-after-image": [ValueEdit(keys="image", mode="mean", rows="after_image", layers=(1,))],
    "ValueEdit-image-prefill-only": [ValueEdit(keys="image", scale=0.0, layers=(1,), phase="prefill")],
    "ValueEdit-text-decode-only": [ValueEdit(keys="text", scale=0.0, layers=(1, 2), phase="decode")],
    "ResidualEdit-output-image": [ResidualEdit(layers=(1,), where="output", positions="image", scale=0.5)],
    "ResidualEdit-steer-last": [ResidualEdit(layers=(0, 2), where="input", positions="last", add=STEER)],
    "ResidualEdit-decode-only": [ResidualEdit(layers=(2,), positions="all", add=STEER, phase="decode")],
    "ValueEdit+PAI+ResidualEdit": [
        ValueEdit(keys="image", scale=0.0, heads=(0,), rows="after_image", layers=(1,)),
        PAI(alpha=0.5, layers=(1, 2)),
        ResidualEdit(layers=(1,), where="input", positions="question", scale=2.0),
        ValueEdit(keys="system", scale=2.0, layers=(1,)),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_intervention_equals_the_loop_written_reference_prefill_and_decode(family, case):
    model, inputs, image_id = family
    check_against_reference(model, inputs, image_id, CASES[case], case)


def check_against_reference(model, inputs, image_id, items, case):
    real = inputs["attention_mask"].bool()
    plain = prompt_logits(model, inputs)
    with hf.intervene(model, items) as run:
        got = prompt_logits(model, inputs)
    reference = Reference(items, inputs["input_ids"], inputs["attention_mask"], image_id)
    with reference_model(model, reference):
        want = prompt_logits(model, inputs)
    assert torch.allclose(got[real], want[real], atol=1e-4), case
    if not case.endswith("decode-only"):
        assert not torch.allclose(got[real], plain[real], atol=1e-4), f"{case} changed nothing"
        for index in range(len(items)):
            assert sum(r.changed for r in run.of(index)) > 0, (case, index)
    else:
        assert run.records == []
    # decode steps (the KV cache): the same edits at every step, logits step by step
    with hf.intervene(model, items) as run:
        sequences, logits = generated(model, inputs)
    with reference_model(model, reference):
        want_sequences, want_logits = generated(model, inputs)
    assert torch.allclose(logits, want_logits, atol=1e-4), case
    assert sequences.tolist() == want_sequences.tolist()
    decode = [r for r in run.records if r.q_len < r.k_len]
    prefill_only = all(isinstance(i, EAH) or i.phase == "prefill" for i in items)
    assert bool(decode) != prefill_only


VAR_DIMS = {TINY_IMAGE_TOKEN_ID: ((27, 51), 2.8), TINY_IMAGE_ID: ((15, 62), 2.5)}  # found with massive_dims


def test_user_position_masks_equal_the_loop_written_reference(family):
    """ValueEdit keys and ResidualEdit positions given as a Bool[batch, seq] mask of prompt positions (a
    few hand-picked real positions per row, image and text), prompt forward and decode steps."""
    model, inputs, image_id = family
    ids = inputs["input_ids"]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(ids.shape[0]):
        real = [j for j in range(ids.shape[1]) if inputs["attention_mask"][row, j]]
        image = [j for j in real if ids[row, j] == image_id]
        for j in (real[1], image[0], image[-2], real[-2]):
            mask[row, j] = True
    items = [ValueEdit(keys=mask, scale=0.0, layers=(1,)), ResidualEdit(layers=(0,), positions=mask, add=STEER)]
    assert items[0].keys == tuple(tuple(row) for row in mask.tolist())
    check_against_reference(model, inputs, image_id, items, "user masks")
    with pytest.raises(LayoutError, match="user position mask"), torch.no_grad():
        with hf.intervene(model, [ValueEdit(keys=mask[:, 1:], layers=(1,))]):
            model(**inputs)


@pytest.mark.parametrize("stacked", [False, True])
def test_var_equals_the_loop_written_reference_prefill_and_decode(family, stacked):
    """VAR with sink dimensions of these random models (their largest RMS-normalised dims at layer 1) and
    thresholds that mark a few image tokens; rho / summ loosened so that some heads qualify. Stacked: a
    residual edit of layer 1's input first makes the question tokens sinks too (a push along a sink
    dimension); VAR reads the edited input, as the layer does."""
    model, inputs, image_id = family
    dims, tau = VAR_DIMS[image_id]
    items = [VAR(dims=dims, tau=tau, rho=0.9, summ=0.05, layers=(1,))]
    if stacked:
        push = tuple(1.0 if d == dims[0] else 0.0 for d in range(64))
        items = [ResidualEdit(layers=(1,), where="input", positions="question", add=push), *items]
    check_against_reference(model, inputs, image_id, items, "VAR")


def test_last_row_methods_do_not_run_eager_attention_over_the_prompt(monkeypatch):
    """PAI edits the last row only: on a prompt the dispatcher keeps SDPA for every row and recomputes
    the last row alone (a [batch, heads, 1, k] map), never the full [.., q, k] one."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    shapes = []
    scores = dispatch._scores
    monkeypatch.setattr(dispatch, "_scores", lambda call, steps: shapes.append(call.q_len) or scores(call, steps))
    monkeypatch.setattr(dispatch, "eager_attention", lambda *a, **k: pytest.fail("eager attention over the prompt"))
    with hf.intervene(model, [PAI(layers=(0, 1, 2, 3)), MiddleLayerBoost(layers=(1,))]) as run:
        prompt_logits(model, inputs)
    assert shapes == [1, 1, 1, 1] and len(run.records) == 5


def test_rows_after_image_methods_recompute_only_those_rows(monkeypatch):
    """VAF edits rows after the image: on a prompt only the rows after the earliest image end (over the
    batch) get an eager map; the others keep SDPA. The count of those rows is found here by hand."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    ids = inputs["input_ids"].tolist()
    ends = [max(j for j, t in enumerate(row) if t == TINY_IMAGE_TOKEN_ID) + 1 for row in ids]
    tail = len(ids[0]) - min(ends)
    assert 0 < tail < len(ids[0])
    shapes = []
    scores = dispatch._scores
    monkeypatch.setattr(dispatch, "_scores", lambda call, steps: shapes.append(call.q_len) or scores(call, steps))
    monkeypatch.setattr(dispatch, "eager_attention", lambda *a, **k: pytest.fail("eager attention over the prompt"))
    with hf.intervene(model, [VAF(layers=(1, 3)), PAI(layers=(3,))]):
        prompt_logits(model, inputs)
    assert shapes == [tail, tail]


def test_value_edits_leave_the_kv_cache_unedited_and_keep_sdpa(monkeypatch):
    """The cache holds the model's own values (HF fills it before the attention function runs); only the
    outputs read edited ones. Value edits alone keep SDPA: no eager map, no score computation."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    with torch.no_grad():
        plain = model(**inputs, use_cache=True)
    monkeypatch.setattr(dispatch, "_scores", lambda *a: pytest.fail("scores computed for a value edit"))
    monkeypatch.setattr(dispatch, "eager_attention", lambda *a, **k: pytest.fail("eager attention for a value edit"))
    for rows in ("all", "last"):
        with hf.intervene(model, [ValueEdit(keys="image", scale=0.0, rows=rows, layers=(1,))]) as run, torch.no_grad():
            edited = model(**inputs, use_cache=True)
        assert [r.layer for r in run.records] == [1]
        cache, plain_cache = edited.past_key_values.layers, plain.past_key_values.layers
        assert torch.equal(cache[1].values, plain_cache[1].values)  # layer 1's cache: the model's own values
        assert torch.equal(cache[0].values, plain_cache[0].values)
        assert not torch.allclose(cache[2].values, plain_cache[2].values, atol=1e-4)  # later layers read the edit
        real = inputs["attention_mask"].bool()
        assert not torch.allclose(edited.logits[real], plain.logits[real], atol=1e-4)
        if rows == "last":  # rows before the last read the model's own values: same logits there
            assert torch.allclose(edited.logits[:, :-1], plain.logits[:, :-1], atol=1e-5)


def test_default_layers_scale_with_depth():
    """The documented rule, by hand: floor(x * n / 32 + 0.5) for both ends, at least one layer."""
    assert scaled_range(2, 32, 32) == tuple(range(2, 32))  # PAI on LLaVA-1.5-7B: unchanged
    assert scaled_range(2, 32, 4) == (0, 1, 2, 3)  # 0.25 -> 0, 4 -> 4
    assert scaled_range(5, 19, 4) == (1,)  # 0.625 -> 1, 2.375 -> 2
    assert scaled_range(9, 15, 24) == (7, 8, 9, 10)  # 6.75 -> 7, 11.25 -> 11
    assert scaled_range(9, 15, 2) == (1,)  # 0.5625 -> 1, 0.9375 -> 1: kept one layer
    assert PAI().layers_for(4) == (0, 1, 2, 3) and VAF().layers_for(32) == tuple(range(9, 15))
    assert MiddleLayerBoost().layers_for(32) == tuple(range(5, 19))


def test_selectors_resolve_spans_from_the_layout():
    # row 0: [pad, bos, sys, img, img, q, q] + 2 generated; row 1: [bos, sys, sys, img, img, q, q] + 2 generated
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 9]).bool()
    layout = TokenLayout.from_spans([(3, 5), (3, 5)], 9, mask)
    site = Site(layer=0, layout=layout, q_len=9, k_len=9, prompt_len=7)
    from eah_interp.interventions.selectors import key_span, query_rows

    assert key_span("system", site).int().tolist() == [[0, 1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert key_span("question", site).int().tolist() == [[0, 0, 0, 0, 0, 1, 0, 0, 0]] * 2  # the last one is "last"
    assert key_span("last", site).int().tolist() == [[0, 0, 0, 0, 0, 0, 1, 0, 0]] * 2
    assert key_span("generated", site).int().tolist() == [[0, 0, 0, 0, 0, 0, 0, 1, 1]] * 2
    assert key_span("text", site).int().tolist() == [[0, 1, 1, 0, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1, 0, 1, 1]]
    assert key_span("after_image", site).int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]] * 2
    assert query_rows("after_image", site).int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]] * 2
    assert query_rows("last", site).int().tolist() == [[0] * 8 + [1]] * 2
    decode = Site(layer=0, layout=layout, q_len=1, k_len=9, prompt_len=7)
    assert query_rows("decode", decode).tolist() == [[True], [True]]
    assert query_rows("decode", site).sum() == 0


@pytest.mark.parametrize("item", [
    PAI(alpha=0.3, layers=(1, 2)), MiddleLayerBoost(), VAF(image_scale=1.2, phase="prefill"),
    Knockout(queries="question", keys="image", layers=(0,)), ADHH(heads=((1, 2),)), ADHH.llava15_7b(),
    HeadScale(heads=((0, 1),), scale=2.0),
    EAH.paper(threshold=0.01), VAR(dims=(3, 7), tau=15.0), VAR.llava15_7b(),
    ValueEdit(keys="system", mode="mean", heads=(1,), rows="last", layers=(2,)),
    ValueEdit(keys=[[True, False, True], [False, False, True]], layers=(1,)),
    ResidualEdit(layers=(1, 2), where="input", positions="image", scale=0.5, add=(1.0, -2.0)),
])
def test_interventions_round_trip_through_json_and_describe_themselves(item):
    again = Intervention.from_json(item.to_json())
    assert again == item and type(again) is type(item)
    assert type(item).__name__ in item.describe() or "EAH" in type(item).__name__


def test_bad_interventions_raise_errors_that_name_the_fix():
    model = sharp_tiny_llava(seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        PAI(alpha=-1)
    with pytest.raises(ConfigError, match="phase"):
        PAI(phase="sometimes")
    with pytest.raises(ConfigError, match="keys"):
        Knockout(keys="nothing")
    with pytest.raises(ConfigError, match="Unknown intervention method"):
        Intervention.from_dict({"method": "Magic"})
    with pytest.raises(LayerIndexError, match="4 decoder layers.*layers=None"):
        hf.intervene(model, [PAI(layers=(7,))])
    with pytest.raises(IndexError, match="4 heads"):
        hf.intervene(model, [HeadScale(heads=((0, 9),))])
    with pytest.raises(TypeError, match="EAH"):
        hf.intervene(model, ["PAI"])
    with pytest.raises(ConfigError, match="changes nothing"):
        ValueEdit(scale=1.0)
    with pytest.raises(IndexError, match="2 key/value heads.*not query heads"):
        hf.intervene(model, [ValueEdit(heads=(3,))])  # 4 query heads share 2 KV heads
    with pytest.raises(ConfigError, match="layers"):
        ResidualEdit(scale=0.5)
    with pytest.raises(ConfigError, match="changes nothing"):
        ResidualEdit(layers=(1,))
    with pytest.raises(ConfigError, match="positions"):
        ResidualEdit(layers=(1,), scale=0.5, positions="middle")
    with pytest.raises(ConfigError, match="3 entries but the language model's hidden size is 64"):
        hf.intervene(model, [ResidualEdit(layers=(1,), add=(1.0, 2.0, 3.0))])


def test_head_scale_from_head_stats_takes_the_top_heads():
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3,), seed=1)
    stats = HeadStats(threshold=0.0)
    with hf.record_attention(model, "all", stats=stats), torch.no_grad():
        model(**inputs)
    frame = stats.to_frame().sort_values("entropy_mean", ascending=False, kind="stable")
    item = HeadScale.from_head_stats(stats, by="entropy", top=3, scale=0.5)
    assert list(item.heads) == [(int(r.layer), int(r.head)) for r in frame.head(3).itertuples()]
    assert item.scale == 0.5


def test_intervene_stacks_with_record_attention_and_restores_everything(family):
    model, inputs, _ = family
    keys = set(AttentionInterface._global_mapping)
    impl = model.config.get_text_config(decoder=True)._attn_implementation
    stats = HeadStats(threshold=0.0)
    with pytest.raises(RuntimeError, match="boom"):
        with hf.record_attention(model, [1], stats=stats), hf.intervene(model, [Knockout(layers=(1,))]) as run:
            prompt_logits(model, inputs)
            raise RuntimeError("boom")
    assert run.records and stats.n_examples(1) == 2
    assert set(AttentionInterface._global_mapping) == keys
    assert model.config.get_text_config(decoder=True)._attn_implementation == impl
    assert hf.active_contexts(model) == [] and not model._forward_pre_hooks


def test_residual_and_hidden_state_hooks_are_removed_even_on_an_exception():
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3,), seed=1)
    layers = model.model.language_model.layers
    items = [ResidualEdit(layers=(0, 2), where="input", positions="image", scale=0.5),
             ResidualEdit(layers=(1,), positions="last", add=STEER), VAR(dims=(27, 51), tau=2.8, layers=(1, 2))]
    with pytest.raises(RuntimeError, match="boom"):
        with hf.intervene(model, items) as run:
            prompt_logits(model, inputs)
            assert any(layer._forward_pre_hooks for layer in layers) and layers[1]._forward_hooks
            raise RuntimeError("boom")
    assert [r.point for r in run.records if r.intervention == "ResidualEdit"] == [
        "residual_input", "residual_output", "residual_input"]  # layers 0, 1, 2 in execution order
    assert not any(layer._forward_pre_hooks or layer._forward_hooks for layer in layers)
    assert hf.active_contexts(model) == []


def test_knockout_of_the_image_blocks_all_image_attention_in_recorded_maps():
    """Recorded after the edit: with the last row knocked out of image keys, its image mass is exactly 0."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), seed=1)
    with hf.intervene(model, [Knockout(queries="after_image", keys="image", layers=(2,))]), hf.record_attention(
        model, [2], keep_patterns=True
    ) as rec:
        prompt_logits(model, inputs)
    probs = rec.patterns[2][0]
    image = inputs["input_ids"] == TINY_IMAGE_TOKEN_ID
    text_rows = torch.zeros_like(image)
    for row in range(image.shape[0]):
        end = max(j for j in range(image.shape[1]) if image[row, j]) + 1
        text_rows[row, end:] = True
    mass = (probs * image[:, None, None, :]).sum(-1)  # [b, h, q]
    assert float(mass[text_rows[:, None, :].expand_as(mass)].abs().max()) == 0.0
    assert math.isclose(float(probs[0, 0, -1].sum()), 1.0, rel_tol=1e-5)


def test_massive_activation_sinks_by_hand():
    from eah_interp.sinks import massive_activation_sinks, massive_dims

    hidden = torch.ones(1, 3, 4)
    hidden[0, 1, 2] = 40.0  # rms = sqrt((1 + 1 + 1600 + 1) / 4) = 20.02; 40 / 20.02 = 1.998
    hidden[0, 2, 0] = -400.0  # rms = sqrt((160000 + 3) / 4) = 200.0; 400 / 200.0 = 2.0 (just under 2.0 + 1e-9)
    flags = massive_activation_sinks(hidden, dims=(0, 2), tau=1.99)
    assert flags.tolist() == [[False, True, True]]
    assert massive_activation_sinks(hidden, dims=(1,), tau=1.0).tolist() == [[False, False, False]]
    assert set(massive_dims(hidden, top=2)) == {0, 2}
    with pytest.raises(ConfigError, match="massive_dims"):
        massive_activation_sinks(hidden, dims=())
    with pytest.raises(ConfigError, match="massive_dims"):
        VAR()


NNSIGHT_CASES = {
    **{case: CASES[case] for case in CASES if not case.endswith("decode-only")},
    "VAR": [VAR(dims=VAR_DIMS[TINY_IMAGE_TOKEN_ID][0], tau=VAR_DIMS[TINY_IMAGE_TOKEN_ID][1], rho=0.9, summ=0.05,
                layers=(1,))],
    "VAR+ResidualEdit+ValueEdit": [
        ResidualEdit(layers=(1,), where="input", positions="image", scale=1.5),
        VAR(dims=VAR_DIMS[TINY_IMAGE_TOKEN_ID][0], tau=VAR_DIMS[TINY_IMAGE_TOKEN_ID][1], rho=0.9, summ=0.05,
            layers=(1, 2)),
        ValueEdit(keys="image", scale=0.5, rows="last", layers=(2,)),
    ],
}


@pytest.fixture(scope="module")
def nnsight_llava():
    from nnsight import NNsight

    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)
    return model, NNsight(model), inputs


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output'")
@pytest.mark.parametrize("case", list(NNSIGHT_CASES))
def test_nnsight_intervene_equals_hf_intervene(nnsight_llava, case):
    """The nnsight backend runs the same steps at the same sites, for every intervention (VAR reading its
    sinks from the decoder input, residual edits through the decoder's inputs / output): logits and records
    equal hf.intervene's (which is checked against the loop-written reference above)."""
    import eah_interp.nnsight as ens

    model, nn_model, inputs = nnsight_llava
    items = NNSIGHT_CASES[case]
    with hf.intervene(model, items) as run:
        want = prompt_logits(model, inputs)
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        got = ens.intervene(nn_model, items, layout)
        logits = nn_model.output.logits.save()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits[real], want[real], atol=1e-5)
    assert [(r.intervention, r.layer, r.point, r.changed) for r in got.records] == [
        (r.intervention, r.layer, r.point, r.changed) for r in run.records
    ]
    assert all(sum(r.changed for r in run.of(index)) > 0 for index in range(len(items))), case
    # one result type: nnsight returns what hf yields
    assert type(got) is type(run) and got.interventions == run.interventions and got.summary() == run.summary()
    assert all(
        [(r.layer, r.point, r.changed) for r in got.of(index)] == [(r.layer, r.point, r.changed) for r in run.of(index)]
        for index in range(len(items))
    ), case


def test_compare_sink_definitions_counts_both_sink_kinds_by_hand():
    """Per layer and row: EAH sinks (loop-written sink scores over the layer's map, a sink in any head)
    and massive-activation sinks (hand RMS over the layer's input), and their overlap on image tokens."""
    from tests.reference import explicit_sink_scores

    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)
    dims, tau, threshold = (27, 51), 2.8, 0.02
    frame = hf.compare_sink_definitions(model, inputs, dims=dims, tau=tau, threshold=threshold, layers=[1])
    hidden = {}
    decoder = model.model.language_model.layers[1]
    handle = decoder.register_forward_pre_hook(
        lambda m, a, kw: hidden.__setitem__("h", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    try:
        with hf.record_attention(model, [1], keep_patterns=True) as rec, torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    probs = rec.patterns[1][0]
    for row in range(2):
        real = inputs["attention_mask"][row].bool().tolist()
        image = [j for j, t in enumerate(inputs["input_ids"][row].tolist()) if t == TINY_IMAGE_TOKEN_ID]
        eah = set()
        for head in range(probs.shape[1]):
            scores = explicit_sink_scores(probs[row, head], image, real, "causal", real.index(True))
            eah |= {j for j, v in scores.items() if v > threshold}
        h = hidden["h"][row].double()
        massive = set()
        for j in image:
            rms = math.sqrt(sum(float(x) ** 2 for x in h[j]) / h.shape[-1] + 1e-6)
            if any(abs(float(h[j, d])) / rms > tau for d in dims):
                massive.add(j)
        got = frame[(frame.layer == 1) & (frame.row == row)].iloc[0]
        assert (got.eah, got.massive, got.both) == (len(eah), len(massive), len(eah & massive))
        assert got.jaccard == pytest.approx(len(eah & massive) / len(eah | massive))
    assert frame.massive.sum() > 0 and frame.eah.sum() > 0


def test_contrastive_logits_equal_a_hand_written_decoding_loop():
    """PAI with its contrastive part: the processed scores at every step are gamma * (s - u) + u with s the
    edited run's log-probabilities and u the plain text-only run's, cut below log(0.1) + max(s); here the
    loop recomputes both runs from scratch at every step (no cache, no pausing)."""
    model = sharp_tiny_llava(seed=0)
    inputs = tiny_llava_inputs(model, prefix_lengths=(4,), seed=3)
    ids = inputs["input_ids"]
    text_only = ids[:, ids[0] != TINY_IMAGE_TOKEN_ID]
    unconditional = {"input_ids": text_only, "attention_mask": torch.ones_like(text_only)}
    items, gamma = [PAI(alpha=0.5, layers=(1, 2))], 2.0
    processor = hf.ContrastiveLogits(model, unconditional, gamma=gamma)
    with hf.intervene(model, items), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, logits_processor=[processor],
                             output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, ids.shape[1]:].tolist()
    tokens = []
    for step in range(3):
        grown = torch.tensor([tokens], dtype=ids.dtype).view(1, -1)
        cond_inputs = {**inputs, "input_ids": torch.cat([ids, grown], 1),
                       "attention_mask": torch.ones(1, ids.shape[1] + step, dtype=torch.long)}
        with hf.intervene(model, items):
            s = torch.log_softmax(prompt_logits(model, cond_inputs)[0, -1], -1)
        u_ids = torch.cat([text_only, grown], 1)
        with torch.no_grad():
            u = torch.log_softmax(model(input_ids=u_ids, attention_mask=torch.ones_like(u_ids)).logits[0, -1], -1)
        want = gamma * (s - u) + u
        want[s < math.log(0.1) + float(s.max())] = -float("inf")
        got = out.scores[step][0]
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        assert torch.allclose(got[finite], want[finite], atol=5e-4)  # gamma doubles cache-vs-no-cache rounding
        tokens.append(int(want.argmax()))
    assert new == tokens
    assert hf.active_contexts(model) == []


def test_decode_steps_of_sliding_window_layers_see_the_last_window_of_positions():
    """Gemma 3's sliding layers keep only the last `sliding_window` keys at decode steps: the layout the
    edits see is the last window of the sequence (counted here by hand from the prompt's image ids)."""
    from eah_interp.models.tiny import tiny_gemma3

    model, inputs = tiny_gemma3()
    window, heads = model.config.text_config.sliding_window, model.config.text_config.num_attention_heads
    assert model.config.text_config.layer_types[0] == "sliding_attention"
    with hf.intervene(model, [PAI(layers=(0,))]) as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    decode = [r for r in run.records if r.q_len == 1]
    prompt = inputs["input_ids"].shape[1]
    assert len(decode) == 3 and all(r.k_len == window for r in decode)
    for step, record in enumerate(decode):
        total = prompt + step + 1  # the new token included
        image_keys = sum(
            1 for row in inputs["input_ids"].tolist() for j in range(total - window, min(total, prompt))
            if row[j] == TINY_IMAGE_ID
        )
        assert record.changed == heads * image_keys, step


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output'")
def test_nnsight_intervene_at_every_decode_step_equals_hf_generate(nnsight_llava):
    """A traced generate calling intervene at every step: the value, residual and score edits of each step
    (positions counted from the cache at the decoder input) equal hf.intervene's; VAR needs the prompt's sink
    flags at decode steps, so there it raises an error naming the fix, and VAR(phase="prefill") runs."""
    import nnsight

    import eah_interp.nnsight as ens

    model, nn_model, inputs = nnsight_llava
    layout = TokenLayout.from_input_ids(inputs["input_ids"], TINY_IMAGE_TOKEN_ID, inputs["attention_mask"])
    kwargs = dict(max_new_tokens=3, do_sample=False)
    dims, tau = VAR_DIMS[TINY_IMAGE_TOKEN_ID]
    var = VAR(dims=dims, tau=tau, rho=0.9, summ=0.05, layers=(1,), phase="prefill")
    items = [ValueEdit(keys="image", scale=0.0, layers=(1,)), ResidualEdit(layers=(2,), positions="last", add=STEER),
             PAI(alpha=0.5, layers=(1, 2)), var]
    with hf.intervene(model, items) as run, torch.no_grad():
        want = model.generate(**inputs, **kwargs)
    with torch.no_grad(), nn_model.trace(**inputs, fn=model.generate, **kwargs) as tracer:
        records = nnsight.save([])
        for _ in tracer.iter[:3]:
            records += ens.intervene(nn_model, items, layout).records
        got = tracer.result.save()
    assert torch.equal(got, want)
    key = [(r.intervention, r.layer, r.point, r.q_len, r.k_len, r.changed) for r in records]
    assert key == [(r.intervention, r.layer, r.point, r.q_len, r.k_len, r.changed) for r in run.records]
    assert {r[2] for r in key} == {"values", "residual_output", "scores", "probs"}
    with pytest.raises(UnsupportedModelError, match=r"prompt forwards only.*hf.intervene"), torch.no_grad():
        with nn_model.trace(**inputs, fn=model.generate, **kwargs) as tracer:
            for _ in tracer.iter[:3]:
                ens.intervene(nn_model, [dataclasses.replace(var, phase="both")], layout)
