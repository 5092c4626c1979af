"""The one seam to framework internals: every private name, label or convention of transformers, nnsight
and TransformerLens that eah-interp relies on lives here, next to the supported version range.

Public, documented APIs (``model.set_attn_implementation``, ``nn_model.trace``, ``bridge.run_with_hooks``)
are called directly where they are used. What is *not* public is reached only through this module:

* transformers: the attention-function and mask registries (``AttentionInterface``,
  ``masking_utils.AttentionMaskInterface`` and their ``_global_mapping``, ``eager_mask`` / ``sdpa_mask``,
  ``modeling_utils.ALL_ATTENTION_FUNCTIONS``), each family's module-level ``eager_attention_forward``,
  a config's ``_attn_implementation`` / ``_attn_implementation_internal``, the auto classes'
  ``_model_mapping`` and the LVLMs' ``get_placeholder_mask``;
* nnsight: the ``.source`` operation labels (``attention_interface_<n>``, ``<name>_<n>`` for a call of a
  local ``<name>``, ``nn_functional_dropout_<n>``), an envoy's ``_module`` and the interleaver's record
  of calls already drilled into (``interleaver.sourced``);
* TransformerLens: ``TransformerBridge.boot_transformers``, ``bridge.cfg`` / ``bridge.hook_dict`` and the
  runtime-install helper ``model_bridge.sources.transformers.helpers._ensure_torchvision`` (the
  bridge's hook names of each site, ``blocks.{l}.attn.hook_pattern`` ..., are `eah_interp.sites.LENS_HOOKS`).

``tests/test_compat.py`` checks each assumption against the installed framework, one test per
assumption, so a release that breaks one fails one clearly named test; at run time a broken assumption
raises `FrameworkVersionError` naming the supported versions (`FLOORS`, equal to ``pyproject.toml``'s
floors, which CI installs and tests; see docs/compatibility.md).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from eah_interp.errors import AttentionImplementationError, FrameworkVersionError, UnsupportedModelError

__all__ = [
    "ATTENTION_CALL_PREFIX",
    "FLOORS",
    "PROBABILITY_OP_FRAGMENT",
    "FrameworkVersionError",
    "attention_functions",
    "attn_implementation",
    "bridge_class",
    "bridge_hook_names",
    "bridge_shape",
    "causal_lm_class",
    "drilled_function",
    "envoy_of",
    "family_eager_attention",
    "installed_version",
    "is_missing_bridge_adapter",
    "mask_function",
    "no_runtime_installs",
    "op_label",
    "placeholder_mask",
    "preset_attn_implementation",
    "probability_op_label",
    "register_attention",
    "set_attn_implementation_internal",
    "supported_range",
    "unregister_attention",
    "unsupported",
    "wrapped_module",
]

#: The oldest versions of the frameworks whose internals this module relies on: the floors in
#: ``pyproject.toml`` (tests/test_compat.py checks they agree), all installed together and tested in CI.
FLOORS: dict[str, str] = {
    "torch": "2.6.0",
    "transformers": "5.21.0",
    "nnsight": "0.8.0",
    "transformer-lens": "4.2.0",
}


# ---------------------------------------------------------------------------- versions and errors
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (``"transformers"``), or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def supported_range(distribution: str) -> str:
    """``"transformers>=5.21.0 (installed: 5.24.0)"``: the supported versions and the installed one."""
    return f"{distribution}>={FLOORS[distribution]} (installed: {installed_version(distribution) or 'none'})"


def unsupported(distribution: str, what: str, cls: type[Exception] = FrameworkVersionError) -> Exception:
    """An error saying which assumption about ``distribution`` failed and which versions are supported.

    Args:
        distribution: a key of `FLOORS`.
        what: what was expected and not found, as a sentence without a final full stop.
        cls: the error class (`FrameworkVersionError` unless a caller's contract names another).

    Returns:
        The error, to be raised by the caller.
    """
    return cls(
        f"{what}. eah-interp supports {supported_range(distribution)}; install a supported version "
        f"(pip install '{distribution}>={FLOORS[distribution]}') or, if this version is supported, "
        "report it with the full message."
    )


@contextlib.contextmanager
def _internal(distribution: str, what: str) -> Iterator[None]:
    """Turn an ImportError / AttributeError raised by reaching a framework internal into an error naming the range."""
    try:
        yield
    except (ImportError, AttributeError) as error:
        raise unsupported(distribution, f"{what} is not available ({type(error).__name__}: {error})") from error


# ---------------------------------------------------------------------------- transformers
def _masking_utils() -> Any:
    with _internal("transformers", "transformers.masking_utils"):
        from transformers import masking_utils

        return masking_utils


def attention_functions() -> Any:
    """transformers' registry of attention functions by implementation name (``ALL_ATTENTION_FUNCTIONS``)."""
    with _internal("transformers", "transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS"):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS


def register_attention(name: str, attention: Callable, mask: Callable) -> None:
    """Register ``attention`` under ``name`` together with the mask function its layers receive.

    Without a mask registered under the same name transformers passes ``attention_mask=None`` (no causal
    mask), so the two are always registered together.
    """
    masking = _masking_utils()
    with _internal("transformers", "AttentionInterface.register / AttentionMaskInterface.register"):
        from transformers import AttentionInterface

        AttentionInterface.register(name, attention)
        masking.AttentionMaskInterface.register(name, mask)


def unregister_attention(name: str) -> None:
    """Remove ``name`` from both registries (transformers has no public way to unregister)."""
    masking = _masking_utils()
    with _internal("transformers", "AttentionInterface._global_mapping / AttentionMaskInterface._global_mapping"):
        from transformers import AttentionInterface

        AttentionInterface._global_mapping.pop(name, None)
        masking.AttentionMaskInterface._global_mapping.pop(name, None)


def mask_function(implementation: str) -> Callable:
    """The mask function layers of ``implementation`` receive: SDPA's or eager's own, a registered one, else eager's."""
    masking = _masking_utils()
    with _internal("transformers", "masking_utils.sdpa_mask / eager_mask / AttentionMaskInterface._global_mapping"):
        builtin = {"sdpa": masking.sdpa_mask, "eager": masking.eager_mask}
        if implementation in builtin:
            return builtin[implementation]
        return masking.AttentionMaskInterface._global_mapping.get(implementation, masking.eager_mask)


def attn_implementation(config: Any) -> Any:
    """The attention implementation a (sub-)config selects: a name, or None before one was chosen."""
    with _internal("transformers", f"{type(config).__name__}._attn_implementation"):
        return config._attn_implementation


def set_attn_implementation_internal(config: Any, name: str | None) -> None:
    """Point one (sub-)config at a registered implementation without transformers' checks or re-dispatch.

    ``model.set_attn_implementation`` validates names against the model class and walks every sub-model;
    an in-place swap of the text config's choice, undone on exit, needs the private field it reads.
    """
    config._attn_implementation_internal = name


def preset_attn_implementation(config: Any, implementation: str | dict[str, str]) -> None:
    """Choose attention implementations on a config before the model is built (per sub-config with a dict).

    Args:
        config: a model config.
        implementation: a name, or ``{"text_config": ..., "vision_config": ..., "": <top level>}``.
    """
    config._attn_implementation = implementation


def family_eager_attention(module: nn.Module) -> Callable:
    """The model family's own module-level ``eager_attention_forward`` for an attention module.

    Every transformers 5 family defines one in its ``modeling_<family>.py``; Llama's is the fallback for
    attention classes defined elsewhere (e.g. a custom model's).
    """
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        try:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        except ImportError as error:
            raise unsupported(
                "transformers", "transformers.models.llama.modeling_llama has no eager_attention_forward"
            ) from error
    return fn


def causal_lm_class(text_config: Any) -> type | None:
    """The ``*ForCausalLM`` class ``AutoModelForCausalLM`` maps a text config's class to (None if unmapped)."""
    with _internal("transformers", "AutoModelForCausalLM._model_mapping"):
        from transformers import AutoModelForCausalLM

        mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(text_config)] if type(text_config) in mapping else None


def placeholder_mask(inner: nn.Module, input_ids: Tensor, embeds: Tensor, features: Tensor) -> Tensor:
    """The boolean mask of the embedding positions an LVLM scatters image features into.

    Calls the inner model's ``get_placeholder_mask`` (with ``image_features`` where it takes them; InstructBLIP's
    does not), as its ``forward`` does.

    Args:
        inner: the LVLM's inner model (``hf_model.model``).
        input_ids: ``[batch, seq]`` ids with the image placeholders expanded.
        embeds: ``[batch, seq, d_model]`` input embeddings.
        features: ``[n_image_tokens, d_model]`` image features.

    Returns:
        ``[batch, seq, d_model]`` boolean mask.
    """
    import inspect

    method = getattr(inner, "get_placeholder_mask", None)
    if method is None:
        raise unsupported("transformers", f"{type(inner).__name__} has no get_placeholder_mask")
    if "image_features" in inspect.signature(method).parameters:
        return method(input_ids, inputs_embeds=embeds, image_features=features)
    return method(input_ids, inputs_embeds=embeds)


# ---------------------------------------------------------------------------- nnsight
#: ``.source`` label of a call of the local ``attention_interface`` in an HF attention forward; the binding
#: ``attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(...)`` is the first such op, the call the last.
ATTENTION_CALL_PREFIX = "attention_interface_"
#: Fragment of the ``.source`` label of the dropout applied to the probabilities in an eager attention function.
PROBABILITY_OP_FRAGMENT = "dropout"


def op_label(source: Any, prefix: str, *, what: str, last: bool = True) -> str:
    """The label of the op ``<prefix><n>`` in an nnsight ``.source`` listing (last or first), or a clear error.

    nnsight labels each call or assignment of a name inside a forward ``<name>_<n>``, numbered in source
    order.

    Args:
        source: an envoy's ``.source`` (or an op's ``.source``).
        prefix: the label without its number (``"attention_interface_"``).
        what: what the op is, for the error.
        last: the last occurrence (else the first).

    Returns:
        The label, e.g. ``"attention_interface_1"``.
    """
    names = [n for n in source.names if n.startswith(prefix) and n[len(prefix) :].isdigit()]
    if not names:
        raise unsupported(
            "nnsight",
            f"Cannot find {what} (an op named {prefix}<n>) in {source.prefix!r}; available ops: "
            f"{', '.join(source.names) or '(none)'}. eah_interp.nnsight supports attention modules that pick "
            "their function with `attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(...)`",
            AttentionImplementationError,
        )
    return names[-1] if last else names[0]


def probability_op_label(source: Any) -> str:
    """The label of the dropout op of an eager attention function (the probabilities right before ``@ V``)."""
    names = [n for n in source.names if PROBABILITY_OP_FRAGMENT in n]
    if not names:
        raise unsupported(
            "nnsight",
            f"The eager attention function at {source.prefix!r} has no dropout op to read probabilities from; "
            f"available ops: {', '.join(source.names)}",
            AttentionImplementationError,
        )
    return names[0]


def wrapped_module(nn_model: Any) -> nn.Module | None:
    """The torch module an nnsight model or envoy wraps (None if ``nn_model`` is neither)."""
    module = getattr(nn_model, "_module", None)
    return module if isinstance(module, nn.Module) else None


def envoy_of(nn_model: Any, module: nn.Module) -> Any | None:
    """The envoy of ``module`` in an nnsight model's envoy tree (None if it is not there)."""
    for envoy in nn_model.modules(include_fn=lambda e: wrapped_module(e) is module):
        return envoy
    return None


def drilled_function(nn_model: Any, call: Any) -> Callable | None:
    """The function this trace runs for an op already drilled into with ``.source`` (None if not yet)."""
    with _internal("nnsight", "the interleaver's record of drilled calls (nn_model.interleaver.sourced)"):
        entry = nn_model.interleaver.sourced.get(call.path)
    return None if entry is None else entry[0]


def out_of_order_error() -> type[BaseException]:
    """nnsight's exception for a trace request of a location the model already ran past (``OutOfOrderError``)."""
    with _internal("nnsight", "nnsight.intervention.interleaver.OutOfOrderError"):
        from nnsight.intervention.interleaver import OutOfOrderError
    return OutOfOrderError


def current_worker() -> Any | None:
    """The nnsight worker (``Mediator``) running the trace body that calls this, or None outside a trace.

    A trace body runs in a greenlet whose ``mediator`` attribute is a weak reference to its worker; the
    object identifies one trace (one invoke) for as long as it runs.
    """
    try:
        from greenlet import getcurrent

        reference = getattr(getcurrent(), "mediator", None)
        return reference() if callable(reference) else None
    except Exception:  # not under nnsight, or its internals moved: only the error message gets poorer
        return None


def worker_iteration(worker: Any) -> int | None:
    """The generation step a trace body's worker is at (0 outside ``tracer.iter`` loops), None if unknown.

    nnsight treats a request past the run at step 0 as an error, and at a later step as a loop that
    outran the generation (a warning); only the first is a mistake in the trace body.
    """
    value = getattr(worker, "iteration", None)
    return value if isinstance(value, int) else None


def trace_inputs() -> dict[str, Any] | None:
    """The inputs of the nnsight trace whose body calls this (``nn_model.trace(**inputs)``), by name.

    Read from the worker's interleaver (``worker.interleaver.batcher.invokes``: one ``(args, kwargs)``
    per invoke); a first positional tensor counts as ``input_ids``. None outside a trace, with several
    invokes (whose rows nnsight combines), or if nnsight's internals moved.
    """
    worker = current_worker()
    try:
        invokes = worker.interleaver.batcher.invokes  # type: ignore[union-attr]
        (args, kwargs), = invokes
    except (AttributeError, TypeError, ValueError):
        return None
    out = dict(kwargs) if isinstance(kwargs, dict) else {}
    if "input_ids" not in out and args and isinstance(args[0], Tensor):
        out["input_ids"] = args[0]
    return out


# ---------------------------------------------------------------------------- TransformerLens
def bridge_class() -> type:
    """TransformerLens's ``TransformerBridge`` (TransformerLens 4's wrapper of HF models)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as error:
        raise unsupported(
            "transformer-lens", "transformer_lens.model_bridge.TransformerBridge is missing", UnsupportedModelError
        ) from error
    return TransformerBridge


def bridge_shape(bridge: Any) -> tuple[int, int, int, int]:
    """``(blocks, heads, key/value heads, d_model)`` of a bridge."""
    with _internal("transformer-lens", "bridge.cfg.n_layers / n_heads / n_key_value_heads / d_model"):
        cfg = bridge.cfg
        return cfg.n_layers, cfg.n_heads, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads, cfg.d_model


def bridge_hook_names(bridge: Any) -> list[str]:
    """Every hook name of a bridge."""
    with _internal("transformer-lens", "bridge.hook_dict"):
        return list(bridge.hook_dict)


def is_missing_bridge_adapter(error: BaseException) -> bool:
    """Whether ``boot_transformers`` failed because TransformerLens has no adapter for the architecture."""
    return isinstance(error, ValueError) and "supported architecture" in str(error)


@contextlib.contextmanager
def no_runtime_installs() -> Iterator[None]:
    """Stop TransformerLens from ``pip install``-ing torchvision while booting a multimodal model."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # other TransformerLens layouts have no such step
        yield
        return
    original = getattr(helpers, "_ensure_torchvision", None)
    if original is None:
        yield
        return
    helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        helpers._ensure_torchvision = original
