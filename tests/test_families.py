"""Every supported LVLM family, as the real transformers class with a tiny random config (no weights).

For each family the independent reference is HF's own eager attention: the edited layer's
probabilities come from ``output_attentions=True`` on an eager copy of the model, its values from a
hook on ``v_proj``; the expected attention output is the loop-written EAH edit of `tests.reference`
times those values, and the expected logits come from writing that output into ``o_proj``'s input of
the eager copy with a plain PyTorch pre-hook. eah-interp (SDPA model, `hf.eah`) must match both within
1e-5, `HeadStats` must count the same sinks, and the nnsight / TransformerLens backends must give the
HF backend's logits wherever `docs/models.md` says they are supported.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import eah_interp.nnsight as ens
from eah_interp import EAH, HeadStats, TokenLayout, UnsupportedModelError, hf
from eah_interp.models import ADAPTERS, adapter_for, check_model, describe
from eah_interp.models.tiny import TINY_FAMILIES, tiny_family
from tests.reference import explicit_edit, explicit_sink_scores

torch.set_num_threads(1)

LAYER = 1
#: The families whose image tokens attend bidirectionally: sink scores use every other real row.
BIDIRECTIONAL = {"paligemma", "gemma3"}


def _image_mask(model, input_ids):
    """Image positions computed here from the config (not through eah-interp)."""
    ids = [model.config.image_token_id]
    if "qwen" in model.config.model_type:
        ids.append(model.config.video_token_id)
    return torch.isin(input_ids, torch.tensor(ids))


def _attn_module(model, layer):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:  # families whose get_decoder returns the LVLM body
        layers = next(m.layers for m in model.modules() if type(m).__name__.endswith(("TextModel", "Model")) and hasattr(m, "layers"))
    return layers[layer].self_attn


class Reference:
    """Eager-attention reference quantities of one family's tiny model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model, self.inputs = organism_and_inputs() if name == "organism" else tiny_family(name, seed=0)
        self.normalise = "rows" if name in BIDIRECTIONAL else "causal"
        self.eager = copy.deepcopy(self.model)
        self.eager.set_attn_implementation({"text_config": "eager", "vision_config": "eager"})
        attn = _attn_module(self.eager, LAYER)
        seen = {}
        hooks = [
            attn.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out)),
            attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0])),
        ]
        try:
            with torch.no_grad():
                out = self.eager(**self.inputs, use_cache=False, output_attentions=True)
        finally:
            for h in hooks:
                h.remove()
        self.logits = out.logits
        attentions = getattr(out, "attentions", None) or out.language_model_outputs.attentions  # InstructBLIP
        self.probs = attentions[LAYER]  # [b, h, n, n]
        b, h, n, _ = self.probs.shape
        head_dim = attn.head_dim
        v = seen["v"].view(b, n, -1, head_dim).transpose(1, 2)  # [b, kv, n, d]
        self.values = v.repeat_interleave(h // v.shape[1], dim=1)  # [b, h, n, d]
        self.plain_o_in = seen["o_in"]
        self.mask = self.inputs["attention_mask"].bool()
        self.image = _image_mask(self.model, self.inputs["input_ids"]) & self.mask
        self.threshold = self._discriminative_threshold()
        # Logits after the edited layer: the HF backend computes the edited layer with SDPA kernels (no
        # full map), the references with explicit matmuls; the ~5e-7 difference in that layer's output
        # (checked at 1e-5) grows through the organism's 28 further trained layers to ~5e-5 on logits up
        # to |34|. The tiny random models stay within 1e-5.
        self.logit_atol = 2e-4 if name == "organism" else 1e-5

    def scores(self, row: int, head: int) -> dict[int, float]:
        real = self.mask[row].tolist()
        image_pos = [j for j, x in enumerate(self.image[row].tolist()) if x]
        return explicit_sink_scores(self.probs[row, head], image_pos, real, self.normalise, real.index(True))

    def counts(self, threshold: float) -> list[list[int]]:
        return [
            [sum(1 for s in self.scores(row, head).values() if s > threshold) for head in range(self.probs.shape[1])]
            for row in range(self.probs.shape[0])
        ]

    def _discriminative_threshold(self) -> float:
        """A midpoint between sink scores under which every row has a sink head, unique if possible."""
        values = sorted({round(v, 7) for r in range(self.probs.shape[0]) for h in range(self.probs.shape[1])
                         for v in self.scores(r, h).values()}, reverse=True)
        midpoints = [(hi + lo) / 2 for hi, lo in zip(values, values[1:], strict=False)]
        for unique in (True, False):  # ties are resolved to the lowest head index by both implementations
            for t in midpoints:
                counts = self.counts(t)
                if all(max(c) > 0 and (c.count(max(c)) == 1 or not unique) for c in counts):
                    return t
        raise AssertionError(f"{self.name}: no threshold gives every row a sink head")

    def config(self) -> EAH:
        return EAH(layers=(LAYER,), threshold=self.threshold, normalise=self.normalise)

    def expected(self):
        """(expected o_proj input at LAYER, expected logits, chosen head per row) under EAH."""
        chosen: list = []
        edited = explicit_edit(self.probs, self.mask, self.image, threshold=self.threshold, normalise=self.normalise,
                               skip_if_head0=False, record=chosen)
        b, h, n, d = self.values.shape
        o_in = torch.matmul(edited, self.values).transpose(1, 2).reshape(b, n, h * d)
        attn = _attn_module(self.eager, LAYER)
        hook = attn.o_proj.register_forward_pre_hook(lambda m, a: (o_in,))
        try:
            with torch.no_grad():
                logits = self.eager(**self.inputs, use_cache=False).logits
        finally:
            hook.remove()
        return o_in, logits, [c for c, _ in chosen]


def organism_and_inputs():
    """The bundled organism (real weights) on two scene prompts of different lengths, left-padded."""
    from eah_interp.models import load_organism
    from eah_interp.models.organism import caption_prompt, yes_no_prompt
    from eah_interp.scenes import make_scene

    model, processor = load_organism()
    prompts = [caption_prompt(), yes_no_prompt("Is there a red circle in the image?")]
    return model, processor(prompts, [make_scene(3).image, make_scene(4).image])


FAMILY_PARAMS = [*TINY_FAMILIES, pytest.param("organism", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=FAMILY_PARAMS)
def ref(request) -> Reference:
    return Reference(request.param)


def real(x, mask):
    return x[mask]


def eah_run(ref: Reference, model=None):
    """Logits, o_proj input at LAYER and records under `hf.eah` (on the SDPA model unless ``model``)."""
    model = ref.model if model is None else model
    attn = _attn_module(model, LAYER)
    seen = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("o_in", a[0]))
    try:
        with torch.no_grad(), hf.eah(model, ref.config()) as run:
            logits = model(**ref.inputs, use_cache=False).logits
    finally:
        hook.remove()
    return logits, seen["o_in"], run.records


def test_adapter_and_describe_find_the_layout(ref):
    adapter = adapter_for(ref.model)
    assert adapter.family == ref.name
    buffer = io.StringIO()
    d = describe(ref.model, ref.inputs, file=buffer)
    cfg = ref.model.config.get_text_config(decoder=True)
    assert (d.n_layers, d.n_heads, d.n_kv_heads) == (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    assert d.attention_layers == list(range(cfg.num_hidden_layers))
    assert torch.equal(d.layout.image_mask, ref.image)
    assert torch.equal(d.layout.attention_mask, ref.mask)
    assert adapter.decoder(ref.model).layers[LAYER].self_attn is _attn_module(ref.model, LAYER)
    text = buffer.getvalue()
    assert f"family: {ref.name}" in text and f"{int(ref.image[0].sum())} image tokens" in text


def test_plain_model_unchanged_by_recording(ref):
    """The registered attention function (with its mask) reproduces eager: bidirectional masks included."""
    stats = HeadStats(threshold=ref.threshold, normalise=ref.normalise)
    with torch.no_grad(), hf.record_attention(ref.model, "all", stats=stats, keep_patterns=True) as rec:
        logits = ref.model(**ref.inputs, use_cache=False).logits
    assert torch.allclose(real(logits, ref.mask), real(ref.logits, ref.mask), atol=1e-5)
    got = rec.patterns[LAYER][0]
    assert torch.allclose(got * ref.mask[:, None, :, None], ref.probs * ref.mask[:, None, :, None], atol=1e-6)
    counts = torch.tensor(ref.counts(ref.threshold), dtype=torch.float64)
    assert torch.allclose(stats.matrix("sink_count")[LAYER].double(), counts.mean(0), atol=1e-9)


def test_eah_equals_explicit_computation(ref):
    o_in, logits, chosen = ref.expected()
    _, got_o_in, records = eah_run(ref)  # the SDPA model: only the edited layer runs eager attention
    assert records[0].source_head.tolist() == chosen
    assert torch.allclose(real(got_o_in, ref.mask), real(o_in, ref.mask), atol=1e-5)
    # end to end on the eager copy (the SDPA model's other layers round differently)
    got_logits, _, _ = eah_run(ref, ref.eager)
    assert torch.allclose(real(got_logits, ref.mask), real(logits, ref.mask), atol=ref.logit_atol)
    # the edit is not a no-op on these models
    assert (real(o_in, ref.mask) - real(ref.plain_o_in, ref.mask)).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named 'output'")
def test_nnsight_equals_hf_backend(ref):
    if not adapter_for(ref.model).supported("nnsight"):
        pytest.skip(adapter_for(ref.model).support["nnsight"])
    from nnsight import NNsight

    want, _, hf_records = eah_run(ref)
    layout = TokenLayout(ref.image, ref.mask)
    nn_model = NNsight(ref.model)
    with torch.no_grad(), nn_model.trace(**ref.inputs, use_cache=False):
        run = ens.eah(nn_model, ref.config(), layout)
        logits = nn_model.output.logits.save()
    assert torch.allclose(real(logits, ref.mask), real(want, ref.mask), atol=ref.logit_atol)
    assert [r.source_head.tolist() for r in run.records] == [r.source_head.tolist() for r in hf_records]


def test_lens_support_is_as_documented(ref):
    """"yes": the full bridge with EAH hooks equals the HF backend; "lm-only": the bridge over the language
    model, fed the model's own image embeddings, does; otherwise booting the full bridge fails."""
    import eah_interp.transformer_lens as lens

    support = adapter_for(ref.model).support["lens"]
    layout = TokenLayout(ref.image, ref.mask)
    if support not in ("yes", "lm-only"):
        with pytest.raises((UnsupportedModelError, ImportError)):
            lens.boot_bridge(ref.model, copy=True)
        return
    want, _, _ = eah_run(ref, ref.eager)  # the bridge runs eager attention in every layer
    if support == "yes":
        bridge = lens.boot_bridge(ref.model, copy=True)
        source = ref.inputs["input_ids"]
        extra = {k: v for k, v in ref.inputs.items() if k != "input_ids"}
    else:
        bridge = lens.boot_bridge(ref.model, copy=True, language_model_only=True)
        image_kwargs = {k: v for k, v in ref.inputs.items() if k.startswith("qformer_")}
        with torch.no_grad():
            source = lens.multimodal_embeds(bridge_source(ref), ref.inputs["input_ids"], ref.inputs["pixel_values"], **image_kwargs)
        extra = {"attention_mask": ref.inputs["attention_mask"]}
    with torch.no_grad():
        got = bridge.run_with_hooks(source, fwd_hooks=lens.eah(bridge, ref.config(), layout)[0], **extra)
    assert torch.allclose(real(got, ref.mask), real(want, ref.mask), atol=ref.logit_atol)


def bridge_source(ref):
    """The HF model whose image tower builds the embeddings (an untouched copy: the bridge rewires its own)."""
    return ref.eager


def test_check_model_passes(ref):
    report = check_model(ref.model, ref.inputs, atol=1e-5)
    assert report.ok, str(report)


def test_every_registered_family_has_a_tiny_builder():
    assert set(ADAPTERS) == set(TINY_FAMILIES) | {"organism"}


def test_unknown_model_is_refused_with_the_family_list():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    class NotAnHFModel(torch.nn.Module):
        config = None

    with pytest.raises(UnsupportedModelError, match="not an HF PreTrainedModel"):
        adapter_for(NotAnHFModel())
    vision_only = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=28, patch_size=7))
    with pytest.raises(UnsupportedModelError, match=r"no attention modules.*qwen2_vl \(Qwen2VLFor.*docs/new_model.md"):
        adapter_for(vision_only)
    with pytest.raises(UnsupportedModelError, match="docs/new_model.md"):
        hf.eah(vision_only, EAH.paper())


@pytest.mark.parametrize("name", sorted(BIDIRECTIONAL))
def test_causal_normaliser_on_bidirectional_family_warns(name):
    model, _ = tiny_family(name)
    with pytest.warns(UserWarning, match="normalise='rows'"):
        hf.eah(model, EAH.paper())
    with pytest.warns(UserWarning, match="normalise='rows'"):
        hf.record_attention(model, [1], stats=HeadStats())


def test_the_lens_backend_gives_the_family_warning_too():
    """TransformerLens compiles the plan from the bridge's sizes; it warns as hf and nnsight do (it did not)."""
    import eah_interp.transformer_lens as lens

    model, _ = tiny_family("gemma3")
    bridge = lens.boot_bridge(model, copy=True)
    with pytest.warns(UserWarning, match="normalise='rows'"):
        lens.intervene(bridge, [EAH.paper()])


def test_generate_under_eah_edits_the_prompt_once(ref):
    """`generate` works under EAH for every family (M-RoPE, bidirectional masks, tiles): the prompt forward
    is edited once, decode steps are not, and the first new token is the argmax of the edited prompt logits."""
    want, _, _ = eah_run(ref)
    with torch.no_grad(), hf.eah(ref.model, ref.config()) as run:
        out = ref.model.generate(**ref.inputs, max_new_tokens=3, do_sample=False)
    assert len(run.records) == 1 and run.records[0].q_len == run.records[0].k_len
    prompt_len = ref.inputs["input_ids"].shape[1]
    assert out[:, prompt_len].tolist() == want[:, -1].argmax(-1).tolist()


def test_nested_contexts_during_generate_of_a_delegating_model():
    """InstructBLIP's generate hands inputs_embeds to its language model's generate, never calling its own
    forward: both nested contexts still see the prompt layout, and the wrappers unwind in order."""
    model, inputs = tiny_family("instructblip")
    stats = HeadStats(threshold=0.0)
    with torch.no_grad(), hf.record_attention(model, [0], stats=stats), hf.eah(model, EAH.paper(threshold=0.0)) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(run.records) == 1 and stats.n_examples(0) == 2
    assert "generate" not in vars(model)
    with pytest.raises(Exception, match="No token layout"):  # a later inputs_embeds-only call reuses nothing
        with hf.eah(model, EAH.paper(threshold=0.0)), torch.no_grad():
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
