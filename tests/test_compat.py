"""One test per framework internal eah-interp relies on (`eah_interp.compat`), checked on the installed versions.

A release of transformers, nnsight or TransformerLens that breaks an assumption fails the test named for it.
Each test checks the framework's behaviour against an explicit expectation (a hand-built mask, a softmax
written out, the module object itself), not against eah-interp's own results.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest
import torch
import transformers
from nnsight import NNsight
from transformers import LlamaConfig, LlamaForCausalLM

from eah_interp import compat, dispatch
from eah_interp.errors import AttentionImplementationError, FrameworkVersionError
from eah_interp.models.tiny import tiny_family, tiny_llava, tiny_llava_inputs

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def tiny_llama(attn_implementation: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    return model


IDS = torch.tensor([[5, 9, 3, 17, 22, 8]])


# ---------------------------------------------------------------------------- versions
def test_floors_equal_pyproject_floors():
    """`compat.FLOORS` (named in run-time errors) are pyproject's floors: one source of truth, tested in CI."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][0-9A-Za-z.]*)", dep.strip())
        if match:
            declared[match.group(1).lower()] = match.group(2)
    for name, floor in compat.FLOORS.items():
        assert declared.get(name) == floor, f"pyproject declares {name}>={declared.get(name)}, compat.FLOORS {floor}"


def test_framework_version_error_names_the_supported_range():
    error = compat.unsupported("transformers", "transformers.masking_utils has no eager_mask")
    assert isinstance(error, FrameworkVersionError)
    message = str(error)
    assert f"transformers>={compat.FLOORS['transformers']}" in message
    assert f"(installed: {transformers.__version__})" in message
    assert "has no eager_mask" in message and "pip install" in message


def test_a_missing_internal_raises_an_error_naming_the_supported_range(monkeypatch):
    """A release without an internal compat reaches fails at run time with the range, not an AttributeError."""
    from transformers import masking_utils

    monkeypatch.delattr(masking_utils, "sdpa_mask")
    with pytest.raises(FrameworkVersionError, match=rf"sdpa_mask.*transformers>={re.escape(compat.FLOORS['transformers'])} \(installed: "):
        compat.mask_function("sdpa")

    class Config:  # a config class without transformers' private field
        pass

    with pytest.raises(FrameworkVersionError, match=r"Config\._attn_implementation is not available"):
        compat.attn_implementation(Config())


_PRIVATE_ATTRIBUTES = {
    "_global_mapping", "_attn_implementation", "_attn_implementation_internal", "_model_mapping",  # transformers
    "interleaver", "sourced", "_module",  # nnsight
    "hook_dict", "cfg", "_ensure_torchvision",  # TransformerLens
}
_INTERNAL_MODULES = {
    "transformers.masking_utils", "transformers.configuration_utils", "transformers.modeling_utils",
    "transformer_lens.model_bridge", "transformer_lens.model_bridge.sources.transformers",
}
_INTERNAL_NAMES = {
    "SubConfigSpec", "ALL_ATTENTION_FUNCTIONS", "AttentionInterface", "AttentionMaskInterface", "eager_mask",
    "sdpa_mask", "eager_attention_forward", "TransformerBridge",
}


def test_framework_internals_are_reached_only_through_compat():
    """No module but eah_interp/compat.py touches a framework internal (code only: docstrings may name them)."""
    import ast

    found = []
    for path in sorted((ROOT / "eah_interp").rglob("*.py")):
        if path.name == "compat.py" and path.parent.name == "eah_interp":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr in _PRIVATE_ATTRIBUTES:
                found.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module in _INTERNAL_MODULES or node.module.startswith("transformers.models.")
                or any(alias.name in _INTERNAL_NAMES for alias in node.names)
            ):
                found.append(f"{where} from {node.module} import {', '.join(a.name for a in node.names)}")
    assert not found, "framework internals outside eah_interp/compat.py (route them through it):\n" + "\n".join(found)


# ---------------------------------------------------------------------------- transformers
def test_transformers_attention_and_mask_registries_register_and_unregister_by_name():
    """``AttentionInterface`` / ``AttentionMaskInterface`` take a name; ``_global_mapping`` holds it until removed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def attention(*args, **kwargs):  # never called
        raise AssertionError

    name = "eah_interp.test_compat.registry"
    compat.register_attention(name, attention, eager_mask)
    try:
        assert AttentionInterface._global_mapping[name] is attention
        assert AttentionMaskInterface._global_mapping[name] is eager_mask
    finally:
        compat.unregister_attention(name)
    assert name not in AttentionInterface._global_mapping
    assert name not in AttentionMaskInterface._global_mapping


def test_transformers_registered_mask_is_what_a_custom_attention_function_receives():
    """With eager's mask registered under the same name, the function gets the additive causal mask."""
    from transformers.masking_utils import eager_mask

    seen = []

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        seen.append(attention_mask)
        return compat.family_eager_attention(module)(module, query, key, value, attention_mask, scaling=scaling)

    model = tiny_llama()
    name = "eah_interp.test_compat.mask"
    compat.register_attention(name, attention, eager_mask)
    try:
        compat.set_attn_implementation_internal(model.config, name)
        with torch.no_grad():
            model(IDS)
    finally:
        compat.set_attn_implementation_internal(model.config, "sdpa")
        compat.unregister_attention(name)
    assert len(seen) == 2  # one call per layer
    n = IDS.shape[1]
    mask = seen[0]
    assert mask is not None and mask.shape[-2:] == (n, n)
    for i in range(n):
        for j in range(n):
            if j <= i:
                assert mask[0, 0, i, j] == 0
            else:
                assert mask[0, 0, i, j] < -1e30


def test_transformers_mask_functions_are_sdpa_eager_or_registered():
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    assert compat.mask_function("sdpa") is sdpa_mask
    assert compat.mask_function("eager") is eager_mask
    assert compat.mask_function("no.such.implementation") is eager_mask
    name = "eah_interp.test_compat.mask_lookup"
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        assert compat.mask_function(name) is sdpa_mask
    finally:
        AttentionMaskInterface._global_mapping.pop(name, None)


def test_transformers_all_attention_functions_maps_sdpa_to_its_function():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    assert compat.attention_functions()["sdpa"] is sdpa_attention_forward


def test_transformers_config_attn_implementation_private_fields_select_the_layer_function():
    """``config._attn_implementation`` reads the choice; ``_attn_implementation_internal`` changes it in place."""
    model = tiny_llama("sdpa")
    assert compat.attn_implementation(model.config) == "sdpa"
    calls = []

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(module.layer_idx)
        return compat.family_eager_attention(module)(module, query, key, value, attention_mask, scaling=scaling)

    name = "eah_interp.test_compat.internal"
    from transformers.masking_utils import eager_mask

    compat.register_attention(name, attention, eager_mask)
    try:
        compat.set_attn_implementation_internal(model.config, name)
        assert compat.attn_implementation(model.config) == name
        with torch.no_grad():
            model(IDS)
    finally:
        compat.set_attn_implementation_internal(model.config, "sdpa")
        compat.unregister_attention(name)
    assert calls == [0, 1]
    assert compat.attn_implementation(model.config) == "sdpa"


def test_transformers_config_attn_implementation_setter_takes_a_dict_per_sub_config():
    """Setting ``config._attn_implementation`` to a dict before building chooses per sub-config."""
    model = tiny_llava(attn_implementation="sdpa")  # built with compat.preset_attn_implementation
    assert compat.attn_implementation(model.config.text_config) == "sdpa"
    assert compat.attn_implementation(model.config.vision_config) == "eager"
    assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_transformers_family_module_defines_eager_attention_forward_as_softmax_qk_v():
    """Each family's modeling module has ``eager_attention_forward`` = softmax(Q K^T * scaling + mask) V."""
    from transformers.models.llama import modeling_llama

    model = tiny_llama("eager")
    module = model.model.layers[0].self_attn
    fn = compat.family_eager_attention(module)
    assert fn is modeling_llama.eager_attention_forward
    torch.manual_seed(1)
    b, h, kv, n, d = 1, 4, 2, 5, 8
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, kv, n, d), torch.randn(b, kv, n, d)
    module.train(False)
    out, probs = fn(module, q, k, v, None, scaling=0.5, dropout=0.0)
    groups = h // kv
    for head in range(h):
        kh, vh = k[0, head // groups], v[0, head // groups]
        for i in range(n):
            scores = [0.5 * float(q[0, head, i] @ kh[j]) for j in range(n)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            weights = [w / sum(weights) for w in weights]
            assert torch.allclose(probs[0, head, i], torch.tensor(weights), atol=1e-5)
            want = sum(w * vh[j] for j, w in enumerate(weights))
            assert torch.allclose(out[0, i, head], want, atol=1e-5)  # output is [b, q, heads, d]


def test_transformers_auto_causal_lm_mapping_maps_text_configs_to_classes():
    assert compat.causal_lm_class(LlamaConfig()) is LlamaForCausalLM
    assert compat.causal_lm_class(transformers.CLIPVisionConfig()) is None


@pytest.mark.parametrize("family", ["llava", "smolvlm", "instructblip"])
def test_transformers_lvlm_get_placeholder_mask_marks_the_image_token_positions(family):
    """``get_placeholder_mask`` (SmolVLM's since transformers 5.21; InstructBLIP's on the outer model) marks the
    image placeholders."""
    from eah_interp.models.adapters import adapter_for

    model, inputs = tiny_family(family)
    ids = inputs["input_ids"]
    (token,) = adapter_for(model).visual_token_ids(model)[:1]
    inner = getattr(model, "model", model)  # as eah_interp.transformer_lens.multimodal_embeds finds it
    embeds = model.get_input_embeddings()(ids)
    n_image = int((ids == token).sum())
    features = torch.zeros(n_image, embeds.shape[-1])
    mask = compat.placeholder_mask(inner, ids, embeds, features)
    assert mask.dtype == torch.bool
    assert torch.equal(mask.expand_as(embeds), (ids == token)[..., None].expand_as(embeds))  # scattered as is


def test_transformers_config_post_init_runs_before_sub_configs_are_built():
    """A config subclass can default a sub-config in ``__post_init__`` (the organism's EfficientNet vision config)."""
    from transformers import LlavaConfig

    class Custom(LlavaConfig):
        model_type = "eah_test_compat_llava"

        def __post_init__(self, **kwargs):
            if self.vision_config is None:
                self.vision_config = {"model_type": "siglip_vision_model", "hidden_size": 48}
            super().__post_init__(**kwargs)

    config = Custom()
    assert type(config.vision_config).__name__ == "SiglipVisionConfig"
    assert config.vision_config.hidden_size == 48
    assert type(config.text_config).__name__ == "LlamaConfig"


# ---------------------------------------------------------------------------- nnsight
@pytest.fixture(scope="module")
def llava():
    model = tiny_llava()
    return model, tiny_llava_inputs(model)


def test_nnsight_source_labels_the_attention_interface_binding_and_call(llava):
    """In an HF attention forward nnsight labels the binding ``attention_interface_0`` and the call ``_1``."""
    model, _ = llava
    nn_model = NNsight(model)
    source = nn_model.model.language_model.layers[0].self_attn.source
    labels = [n for n in source.names if n.startswith(compat.ATTENTION_CALL_PREFIX)]
    assert labels == ["attention_interface_0", "attention_interface_1"]
    assert compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="call") == "attention_interface_1"
    assert compat.op_label(source, compat.ATTENTION_CALL_PREFIX, what="binding", last=False) == "attention_interface_0"
    with pytest.raises(AttentionImplementationError, match=r"nnsight>=.*installed"):
        compat.op_label(source, "no_such_op_", what="an op that is not there")


def test_nnsight_eager_attention_source_has_a_dropout_op_holding_the_probabilities(llava):
    """``.source`` of the family's eager function has ``nn_functional_dropout_<n>``: softmax(QK^T) per row."""
    model, inputs = llava
    nn_model = NNsight(model)
    from eah_interp.nnsight import eager_attention_probs, self_attn

    labels = []  # filled inside the trace (nnsight runs the block itself; plain locals do not come back)
    with torch.no_grad(), nn_model.trace(**inputs):
        probs = eager_attention_probs(nn_model, 1).output.save()
        call = self_attn(nn_model, 1).source.attention_interface_1.source
        labels.extend(call.node(compat.op_label(call, "family_", what="the family call")).source.names)
    assert any(re.fullmatch(r"nn_functional_dropout_\d+", n) for n in labels), labels
    assert compat.probability_op_label(
        type("Listing", (), {"names": labels, "prefix": "x"})()
    ).startswith("nn_functional_dropout_")
    eager = tiny_llava(attn_implementation="eager")
    with torch.no_grad():
        want = eager(**inputs, output_attentions=True).attentions[1]
    real = inputs["attention_mask"][:, None, :, None].bool() & inputs["attention_mask"][:, None, None, :].bool()
    assert torch.allclose(probs[real.expand_as(probs)], want[real.expand_as(want)], atol=1e-5)


def test_nnsight_interleaver_records_the_calls_drilled_into(llava):
    """``interleaver.sourced`` has no entry for a call before ``.source`` drills into it, then its function."""
    model, inputs = llava
    nn_model = NNsight(model)
    from eah_interp.nnsight import eager_attention_probs, self_attn

    found = []  # filled inside the trace (nnsight runs the block itself; plain locals do not come back)
    with torch.no_grad(), nn_model.trace(**inputs):
        call = self_attn(nn_model, 0).source.node("attention_interface_1")
        found.append(compat.drilled_function(nn_model, call))
        eager_attention_probs(nn_model, 0)
        found.append(compat.drilled_function(nn_model, call))
    before, after = found
    assert before is None
    assert after is not None and after.__qualname__ == dispatch.eager_attention.__qualname__


def test_nnsight_envoys_wrap_their_module_as_module_attribute(llava):
    model, _ = llava
    nn_model = NNsight(model)
    assert compat.wrapped_module(nn_model) is model
    attn = model.model.language_model.layers[1].self_attn
    envoy = compat.envoy_of(nn_model, attn)
    assert envoy is not None and compat.wrapped_module(envoy) is attn
    assert compat.wrapped_module(object()) is None


# ---------------------------------------------------------------------------- TransformerLens
@pytest.fixture(scope="module")
def bridge():
    from eah_interp.transformer_lens import boot_bridge

    return boot_bridge(tiny_llava())


def test_lens_bridge_has_the_hook_names_eah_interp_uses(bridge):
    from eah_interp.sites import LENS_HOOKS, lens_hook_name

    names = set(compat.bridge_hook_names(bridge))
    for site in LENS_HOOKS:
        for layer in range(4):
            assert lens_hook_name(site, layer) in names, lens_hook_name(site, layer)
    assert compat.bridge_shape(bridge) == (4, 4, 2, 64)  # tiny_llava: 4 decoder layers, 4 heads, 2 KV heads, d 64


def test_lens_pattern_hook_sees_the_post_softmax_probabilities(bridge, llava):
    """``blocks.{l}.attn.hook_pattern`` carries ``[batch, heads, q, k]`` rows that sum to one."""
    from eah_interp.sites import lens_hook_name

    _, inputs = llava
    seen = {}

    def keep(pattern, hook):
        seen["pattern"] = pattern.detach().clone()

    with torch.no_grad():
        bridge.run_with_hooks(
            inputs["input_ids"], fwd_hooks=[(lens_hook_name("probs", 1), keep)],
            pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"],
        )
    pattern = seen["pattern"]
    b, n = inputs["input_ids"].shape
    assert pattern.shape == (b, 4, n, n)
    assert torch.allclose(pattern.sum(-1)[:, :, -1], torch.ones(b, 4), atol=1e-5)
    assert torch.all(pattern.triu(1) == 0)  # causal


def test_lens_runtime_install_helper_is_replaced_while_booting_and_restored():
    """TransformerLens's ``helpers._ensure_torchvision`` (a runtime ``pip install``) is stubbed, then restored."""
    from transformer_lens.model_bridge.sources.transformers import helpers

    original = helpers._ensure_torchvision
    with compat.no_runtime_installs():
        assert helpers._ensure_torchvision() is False
    assert helpers._ensure_torchvision is original


def test_lens_boot_without_an_adapter_raises_value_error_naming_supported_architectures():
    """``boot_transformers`` refuses an architecture it has no adapter for with a ValueError eah-interp recognises."""
    from eah_interp.errors import UnsupportedModelError
    from eah_interp.transformer_lens import boot_bridge

    model, _ = tiny_family("qwen2_vl")
    with pytest.raises(UnsupportedModelError, match="no bridge adapter") as caught:
        boot_bridge(model, copy=True)
    assert compat.is_missing_bridge_adapter(caught.value.__cause__)
