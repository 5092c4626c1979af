"""Sites and positions: the named places every tool reads or writes, defined once, with one accessor per backend.

**Sites** are activations of one decoder layer ``l`` of the language model (`SITES`):

| site | what | HF module (hook) and nnsight envoy | TransformerLens hook |
| --- | --- | --- | --- |
| ``resid`` | the decoder layer's output (residual stream) | ``layers[l]``, output | ``blocks.{l}.hook_resid_post`` |
| ``attn_out`` | the attention block's output (after ``o_proj``) | ``layers[l].self_attn``, output[0] | ``blocks.{l}.hook_attn_out`` |
| ``mlp_out`` | the MLP's output | ``layers[l].mlp``, output | ``blocks.{l}.hook_mlp_out`` |
| ``head`` | every head's output: ``o_proj``'s input | ``layers[l].self_attn.o_proj``, input | ``blocks.{l}.attn.hook_z`` |

A site's value is ``Float[batch, seq, d_model]``, and ``Float[batch, seq, heads, d_head]`` for ``head``
in every backend (HF and nnsight see ``o_proj``'s input ``[batch, seq, heads * d_head]``; the accessors
unflatten it, so one head is ``value[:, :, h]``). `READ_ORDER` is the order a forward reaches them in a
layer (after ``residual_input``, the layer's input hidden states, which the HF accessor also reads).

**Edit points** (`EDIT_POINTS`) are where interventions edit: the layer's input hidden states, the
attention call's points (`eah_interp.dispatch.EDIT_POINTS`, in the dispatcher's order) and the layer's
output. Each backend applies an intervention list there: `eah_interp.hf.intervene` (HF),
`eah_interp.nnsight.intervene` (in a trace) and TransformerLens hooks at `LENS_HOOKS` names.

**Positions** are where along the sequence: a name of `eah_interp.layout.GROUPS` (``"system"``,
``"image"``, ``"question"``, ``"last"``, ``"generated"``, ``"text"``, ``"all"``; `TokenLayout.group_mask`)
or a user ``Bool[batch, seq]`` mask; `resolve_positions` turns names and masks into labelled masks for
every tool (activation and attribution patching, logit lens, probes). A bad name or mask is a
`LayoutError` everywhere.

Accessors:

* HF: ``with hf_hooks(model, {("resid", 3): fn, ...}):`` calls ``fn(value)`` at each site in every
  forward; a tensor it returns replaces the value (hooks removed on exit). `hf_module` is the module.
* nnsight: `NNsightSites` reads and writes the sites inside a trace (in `READ_ORDER`, layer by layer).
* TransformerLens: `lens_hook_name`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jaxtyping import Bool
from torch import Tensor, nn

from eah_interp import dispatch
from eah_interp.errors import ConfigError, LayoutError, UnsupportedModelError
from eah_interp.layout import TokenLayout
from eah_interp.models.introspect import decoder_layers, model_shape

__all__ = [
    "EDIT_POINTS",
    "LAYER_SITES",
    "LENS_HOOKS",
    "READ_ORDER",
    "SITES",
    "NNsightSites",
    "check_sites",
    "hf_hooks",
    "hf_module",
    "lens_hook_name",
    "resolve_positions",
]

#: The sites of a decoder layer that patching, attribution, logit lens and probes read and write.
SITES = ("attn_out", "mlp_out", "resid", "head")
#: The sites that are whole-layer activations (not one head's slice).
LAYER_SITES = ("attn_out", "mlp_out", "resid")
#: Readable places of a layer in the order a forward reaches them (``residual_input``: the layer's input).
READ_ORDER = ("residual_input", "head", "attn_out", "mlp_out", "resid")
#: Where interventions edit, in forward order within a layer.
EDIT_POINTS = ("residual_input", *dispatch.EDIT_POINTS, "residual_output")
#: TransformerLens (`TransformerBridge`) hook names of the sites and of edit points (tests/test_compat.py checks
#: they exist; whether an edit there reaches the output is the bridge adapter's, see eah_interp.transformer_lens.LENS_POINTS).
LENS_HOOKS: dict[str, str] = {
    "residual_input": "blocks.{}.hook_resid_pre",
    "scores": "blocks.{}.attn.hook_attn_scores",
    "probs": "blocks.{}.attn.hook_pattern",
    "head": "blocks.{}.attn.hook_z",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "resid": "blocks.{}.hook_resid_post",
    "residual_output": "blocks.{}.hook_resid_post",
}
# where each readable place is, relative to the decoder layer: (submodule path, "input" or "output")
_WHERE = {
    "residual_input": ("", "input"),
    "head": ("self_attn.o_proj", "input"),
    "attn_out": ("self_attn", "output"),
    "mlp_out": ("mlp", "output"),
    "resid": ("", "output"),
}


def check_sites(sites: Sequence[str], allowed: Sequence[str] = SITES) -> None:
    """Raise a `ConfigError` naming the choices unless every site is in ``allowed``."""
    unknown = [s for s in sites if s not in allowed]
    if unknown:
        raise ConfigError(f"Unknown site(s) {unknown}; choose from {tuple(allowed)}.")


def lens_hook_name(site: str, layer: int) -> str:
    """The `TransformerBridge` hook name of a site or edit point (a key of `LENS_HOOKS`) in block ``layer``."""
    check_sites([site], tuple(LENS_HOOKS))
    return LENS_HOOKS[site].format(layer)


# ---------------------------------------------------------------------------- positions
def resolve_positions(
    layout: TokenLayout, positions: str | Tensor | Mapping[str, str | Tensor] | Sequence[str | Tensor]
) -> dict[str, Bool[Tensor, "batch seq"]]:
    """Position groups by label: names of `eah_interp.layout.GROUPS` and user masks, as masks over the layout.

    Args:
        layout: the prompt layout.
        positions: a group name, a ``Bool[batch, seq]`` mask, a ``{label: name or mask}`` mapping, or a
            sequence of names / masks (a name labels itself; a mask is labelled ``"mask{i}"``, ``i`` its
            index in the sequence).

    Returns:
        ``{label: Bool[batch, seq]}`` in the order given (`TokenLayout.group_mask`: real positions only;
        a named group may be empty in a row, a user mask may not).

    Raises:
        LayoutError: an unknown name, or a mask of the wrong shape or dtype, selecting padding or empty in a row.
        ConfigError: no positions, or a label given twice.

    Example:
        >>> list(resolve_positions(layout, ["last", layout.image_mask]))
        ['last', 'mask1']
    """
    if isinstance(positions, str | Tensor):
        positions = [positions]
    if isinstance(positions, Mapping):
        items = [(str(label), group) for label, group in positions.items()]
    else:
        items = [(group if isinstance(group, str) else f"mask{i}", group) for i, group in enumerate(positions)]
    if not items:
        raise ConfigError("positions is empty: pass a group name (e.g. 'all'), a Bool[batch, seq] mask or a list of them.")
    out: dict[str, Tensor] = {}
    for label, group in items:
        if label in out:
            raise ConfigError(f"The position label {label!r} appears twice; give each group its own label.")
        try:
            out[label] = layout.group_mask(group)
        except LayoutError as error:
            raise LayoutError(f"positions {label!r}: {error}") from error
    return out


# ---------------------------------------------------------------------------- HF
def hf_module(model: nn.Module, site: str, layer: int) -> nn.Module:
    """The HF module holding a site (`READ_ORDER` names) of decoder layer ``layer``."""
    return _in_block(decoder_layers(model)[layer], site, layer)


def _in_block(block: Any, site: str, layer: int) -> Any:
    """The module (or envoy) of ``site`` inside a decoder layer's module (or envoy)."""
    check_sites([site], READ_ORDER)
    path = _WHERE[site][0]
    try:
        return functools.reduce(getattr, path.split("."), block) if path else block
    except AttributeError as error:
        raise UnsupportedModelError(
            f"Decoder layer {layer} ({type(block).__name__}) has no {path}: the site {site!r} needs a Llama-style "
            "decoder layer (self_attn.o_proj, mlp)."
        ) from error


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


@contextlib.contextmanager
def hf_hooks(model: nn.Module, fns: Mapping[tuple[str, int], Callable[[Tensor], Tensor | None]]) -> Iterator[None]:
    """Inside the block, every forward calls ``fn(value)`` at each ``(site, layer)``; a returned tensor replaces it.

    ``value`` is the site's activation (`READ_ORDER` names; ``head``: ``[batch, seq, heads, d_head]``), the
    tensor the forward goes on with, so a gradient taken with respect to it is the gradient at the site.
    Hooks run after those registered earlier (e.g. an `eah_interp.hf.intervene` entered before). Removed
    on exit, also on an exception.
    """
    n_heads = model_shape(model)[1]
    blocks = decoder_layers(model) if fns else {}
    handles = []

    def output_hook(fn: Callable) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            new = fn(_first(output))
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def input_hook(fn: Callable, head: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            named = not (args and isinstance(args[0], Tensor))
            value = kwargs["hidden_states"] if named else args[0]
            if head:  # always handed on as the view, so the graph runs through what fn saw
                value = value.unflatten(-1, (n_heads, -1))
            new = fn(value)
            if new is None and not head:
                return None
            new = (value if new is None else new).flatten(-2) if head else new
            return (args, {**kwargs, "hidden_states": new}) if named else ((new, *args[1:]), kwargs)

        return hook

    try:
        for (site, layer), fn in fns.items():
            module = _in_block(blocks[layer], site, layer)
            if _WHERE[site][1] == "output":
                handles.append(module.register_forward_hook(output_hook(fn)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(fn, site == "head"), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------- nnsight
class NNsightSites:
    """Read and write the sites of an nnsight-wrapped HF model inside a trace.

    Reads and writes must come in the order the forward reaches them: layer by layer, and within a
    layer in `READ_ORDER` (nnsight runs the trace body alongside the forward).

    Example:
        >>> at = NNsightSites(nn_model)
        >>> with nn_model.trace(**inputs):
        ...     z = at.read("head", 1)               # [batch, seq, heads, d_head]
        ...     at.write("head", 1, z * mask)
    """

    def __init__(self, nn_model: Any) -> None:
        from eah_interp import compat
        from eah_interp.nnsight import hf_model

        model = hf_model(nn_model)
        self.n_heads = model_shape(model)[1]
        self.blocks = {layer: compat.envoy_of(nn_model, module) for layer, module in decoder_layers(model).items()}

    def read(self, site: str, layer: int) -> Tensor:
        """The site's value in this trace (``head``: ``[batch, seq, heads, d_head]``)."""
        check_sites([site])
        envoy = _in_block(self.blocks[layer], site, layer)
        if site == "head":
            return envoy.input.unflatten(-1, (self.n_heads, -1))
        return _first(envoy.output)

    def write(self, site: str, layer: int, value: Tensor) -> None:
        """Replace the site's value in this trace (shaped as `read` returns it)."""
        check_sites([site])
        envoy = _in_block(self.blocks[layer], site, layer)
        if site == "head":
            envoy.input = value.flatten(-2)
            return
        out = envoy.output
        envoy.output = (value, *out[1:]) if isinstance(out, tuple) else value
