"""Issue 24, one intervention model: base fields, capabilities on the base class, one compiler, one result type.

A method defined here, in the test file, runs through ``intervene`` of every backend with no library change;
EAH is an `Intervention` like the others; a layer the model lacks is a `LayerIndexError` naming its depth in
every backend, for presets too; `InterventionRun.summary` is checked against counts made from the records by
hand; an empty list is the plain model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from nnsight import NNsight

import eah_interp.nnsight as ens
import eah_interp.transformer_lens as lens
from eah_interp import EAH, ConfigError, LayerIndexError, hf
from eah_interp.interventions import PAI, VAR, Intervention, InterventionRun, Knockout
from eah_interp.interventions.base import count
from eah_interp.interventions.compile import Plan
from eah_interp.interventions.selectors import Site, entries, key_span, query_rows
from eah_interp.models.tiny import sharp_tiny_llava, tiny_llava_inputs


@dataclass(frozen=True)
class HalveImageAttention(Intervention):
    """Halve the last query row's attention to image keys (not renormalised): a method written by a user."""

    factor: float = 0.5

    point: ClassVar[str] = "probs"
    last_row_only: ClassVar[bool] = True

    def check(self) -> None:
        if not 0 <= self.factor <= 1:
            raise ConfigError(f"HalveImageAttention.factor must be in [0, 1]; got {self.factor!r}.")

    def edit(self, tensor, site: Site):
        selected = entries(query_rows("last", site), key_span("image", site)).expand_as(tensor)
        return torch.where(selected, tensor * self.factor, tensor), count(selected)

    def describe(self) -> str:
        return f"HalveImageAttention: at {self._layers_text()}, multiply the last row's image attention by {self.factor}."


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_llava_inputs(model, prefix_lengths=(3, 6), suffix_lengths=(5, 2), padding_side="left", seed=1)


def logits_by_hand(model, inputs, layers, factor):
    """The same edit written out by hand: the edited layers' attention modules replaced by a loop-free
    re-implementation (projections, rotary, causal + padding mask, softmax, the edit, ``P @ V``, ``o_proj``)."""
    from eah_interp.models import attention_modules, token_layout

    layout = token_layout(model, inputs["input_ids"], inputs["attention_mask"])
    modules = attention_modules(model)
    handles = []

    def patch(layer):
        module = modules[layer]

        def hooked(hidden_states, *args, **kwargs):
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

            b, q, _ = hidden_states.shape
            shape = (b, q, -1, module.head_dim)
            query = module.q_proj(hidden_states).view(shape).transpose(1, 2)
            key = module.k_proj(hidden_states).view(shape).transpose(1, 2)
            value = module.v_proj(hidden_states).view(shape).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
            scores = query @ key.transpose(-1, -2) * module.scaling
            allowed = torch.tril(torch.ones(q, q, dtype=torch.bool)) & inputs["attention_mask"].bool()[:, None, None, :]
            probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), -1)
            last = probs[:, :, -1, :]
            probs[:, :, -1, :] = torch.where(layout.image_mask[:, None, :], last * factor, last)
            out = (probs @ value).transpose(1, 2).reshape(b, q, -1)
            return module.o_proj(out), probs

        module.forward = hooked
        return lambda: vars(module).pop("forward")

    try:
        handles = [patch(layer) for layer in layers]
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for undo in handles:
            undo()


def test_a_method_defined_in_a_test_runs_on_every_backend(model, inputs):
    item = HalveImageAttention(factor=0.25, layers=(1, 2))
    want = logits_by_hand(model, inputs, (1, 2), 0.25)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        assert (want[real] - model(**inputs, use_cache=False).logits[real]).abs().max() > 1e-3  # the edit matters
    with hf.intervene(model, [item]) as run, torch.no_grad():
        got_hf = model(**inputs, use_cache=False).logits
    assert torch.allclose(got_hf[real], want[real], atol=1e-5)
    assert [(r.intervention, r.layer) for r in run.records] == [("HalveImageAttention", 1), ("HalveImageAttention", 2)]
    nn_model = NNsight(model)
    with torch.no_grad(), nn_model.trace(**inputs, use_cache=False):
        nn_run = ens.intervene(nn_model, [item])
        got_nn = nn_model.output.logits.save()
    assert torch.allclose(got_nn[real], want[real], atol=1e-5) and nn_run.summary() == run.summary()
    bridge = lens.boot_bridge(sharp_tiny_llava())
    hooks, lens_run = lens.intervene(bridge, [item])
    with torch.no_grad():
        got_lens = bridge.run_with_hooks(**inputs, fwd_hooks=hooks)
    assert torch.allclose(got_lens[real], want[real], atol=1e-5) and lens_run.summary() == run.summary()
    assert Intervention.from_json(item.to_json()) == item  # serialised through the registry, no entry written


def test_base_fields_are_keyword_only_and_validated_once():
    assert PAI(0.5).alpha == 0.5 and Knockout("question", "system").keys == "system"  # positional order kept
    assert EAH(0.01).threshold == 0.01 and EAH().layers == (1,) and EAH().phase == "prefill"
    with pytest.raises(TypeError):
        PAI(0.5, (1,))  # layers is keyword-only
    for cls in (PAI, Knockout, HalveImageAttention):
        with pytest.raises(ConfigError, match=f"{cls.__name__}.phase"):
            cls(phase="sometimes")
        with pytest.raises(ConfigError, match=f"{cls.__name__}.layers"):
            cls(layers=(-1,))
        assert cls(layers=3).layers == (3,)
    with pytest.raises(ConfigError, match="EAH.layers is None"):
        EAH(layers=None)
    assert EAH.paper(phase="both").describe().endswith("Prompt and decode steps are edited.")
    assert {f.name for f in dataclasses.fields(EAH)} >= {"layers", "phase", "threshold", "source"}
    assert not hasattr(EAH(), "apply_to_decode")


def test_capabilities_are_declared_on_the_base_class():
    assert Intervention.reads_hidden is False and VAR.reads_hidden is True
    site = None
    assert Intervention.map_free(PAI(), site) is None and Intervention.row_mask(PAI(), site) is None
    with pytest.raises(NotImplementedError, match="does not read hidden states"):
        PAI().hidden_flags(torch.zeros(1, 2, 3))


@pytest.mark.parametrize("item", [EAH.reference(), PAI(layers=(7,)), HalveImageAttention(layers=(4,))])
def test_a_layer_out_of_range_names_the_depth_in_every_backend(model, inputs, item):
    with pytest.raises(LayerIndexError, match=r"has 4 decoder layers \(0\.\.3\)"):
        hf.intervene(model, [item])
    nn_model = NNsight(model)
    with pytest.raises(LayerIndexError, match="has 4 decoder layers"), nn_model.trace(**inputs):
        ens.intervene(nn_model, [item])
    with pytest.raises(LayerIndexError, match="has 4 decoder layers"):
        Plan([item], 4, 4)


def test_summary_counts_the_records_by_hand(model, inputs):
    items = [EAH(layers=(1,), threshold=0.06), PAI(alpha=0.5, layers=(1, 2)), HalveImageAttention(layers=(3,))]
    with hf.intervene(model, items) as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    summary = run.summary()["interventions"]
    assert [entry["method"] for entry in summary] == ["EAH", "PAI", "HalveImageAttention"]
    assert [entry["layers"] for entry in summary] == [[1], [1, 2], [3]]
    for index, entry in enumerate(summary):
        for phase in ("prefill", "decode"):
            cells = {}
            for r in run.records:
                if r.index == index and (r.q_len == r.k_len) == (phase == "prefill"):
                    cell = cells.setdefault(str(r.layer), {"edits": 0, "changed": 0})
                    cell["edits"] += 1
                    cell["changed"] += r.changed
            assert entry[phase] == cells, (index, phase)
    assert summary[1]["decode"] == {"1": {"edits": 2, "changed": summary[1]["decode"]["1"]["changed"]},
                                    "2": {"edits": 2, "changed": summary[1]["decode"]["2"]["changed"]}}
    heads = Counter(str(h) for r in run.of("EAH") for h in r.source_head.tolist())
    assert summary[0]["source_heads"] == {"1": dict(sorted(heads.items()))} and "source_heads" not in summary[1]
    assert run.source_heads() == [r.source_head.tolist() for r in run.of(0)]


def test_an_empty_list_is_the_plain_model(model, inputs):
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
    with hf.intervene(model, []) as run, torch.no_grad():
        got = model(**inputs, use_cache=False).logits
    assert torch.equal(got, want) and run.records == [] and isinstance(run, InterventionRun)
    assert run.summary() == {"interventions": []}


def test_an_empty_list_leaves_the_model_untouched_even_without_image_tokens(model, inputs):
    """No dispatcher, no hooks, no layout: a text-only prompt (which has no image layout) runs as it would
    alone, and ``generate`` stays the model's own (was: NoImageTokensError from the layout of every prompt)."""
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert not (text["input_ids"] == model.config.image_token_id).any()
    with torch.no_grad():
        want = model(**text, use_cache=False).logits
    generate = vars(model).get("generate")
    with hf.intervene(model, None) as run, torch.no_grad():
        assert vars(model).get("generate") is generate and not model._forward_pre_hooks
        got = model(**text, use_cache=False).logits
    assert torch.equal(got, want) and run.records == []
