"""Model-family adapters: where an LVLM keeps its language model, how it marks image positions, its quirks.

EAH's official code hard-codes a window on LLaVA-1.5's image span (keys 36..610) and 32 heads; eah-interp
instead asks the model. Each supported family has an `Adapter` (a frozen dataclass): the config
attributes that hold its visual placeholder ids, the dotted path of its text decoder and LM head, and
the quirks a user must know before trusting a statistic (tiles, bidirectional image attention,
M-RoPE, Q-Former queries). Layers, heads and KV heads are read from the text config; attention modules
are found by their ``layer_idx`` (see `eah_interp.models.introspect.attention_modules`).

    >>> adapter = adapter_for(model)              # by class (and its base classes), else the generic one
    >>> adapter.visual_token_ids(model)           # e.g. (151655, 151656) for Qwen2-VL: image + video
    >>> describe(model, inputs)                   # prints the detected layout: check it first

A model the library does not know gets the generic adapter when its config has an image token id and
its text decoder uses transformers' attention interface; otherwise `adapter_for` raises
`UnsupportedModelError` naming the known families. `register_adapter` adds one (docs/new_model.md).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from torch import Tensor, nn

from eah_interp import compat
from eah_interp.errors import LayoutError, UnsupportedModelError
from eah_interp.layout import TokenLayout
from eah_interp.models.introspect import attention_modules, model_shape, text_config

#: The backends a support entry may name.
BACKENDS = ("hf", "nnsight", "lens")


@dataclass(frozen=True)
class Adapter:
    """How eah-interp finds its way around one LVLM family.

    Attributes:
        family: short name (``"llava"``, ``"qwen2_vl"``, ...).
        architectures: HF class names this adapter serves (subclasses match too).
        image_token_attrs: config attributes holding the image placeholder id, first found wins.
        video_token_attrs: config attributes of further visual placeholder ids counted as image
            tokens (Qwen's video frames).
        language_model: dotted path from the model to its text decoder (the module with ``.layers``).
        lm_head: dotted path to the output head.
        bidirectional_image_attention: image tokens attend to each other in both directions, so the
            ``"causal"`` sink normaliser undercounts the rows that attend to a token: use
            ``normalise="rows"``.
        quirks: sentences a user should read before trusting a statistic of this family.
        support: per backend (``"hf"``, ``"nnsight"``, ``"lens"``): ``"yes"`` (verified on the real class),
            ``"lm-only"`` (TransformerLens only: the bridge wraps the language model, fed the model's own
            image embeddings through `eah_interp.transformer_lens.multimodal_embeds`), or the reason it is not supported.
    """

    family: str
    architectures: tuple[str, ...]
    image_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_attrs: tuple[str, ...] = ()
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    bidirectional_image_attention: bool = False
    quirks: tuple[str, ...] = ()
    support: Mapping[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    def visual_token_ids(self, model: nn.Module) -> tuple[int, ...]:
        """Placeholder ids that mark visual positions in ``input_ids`` (empty if the config has none)."""
        config = model.config
        ids: list[int] = []
        for name in self.image_token_attrs:
            value = getattr(config, name, None)
            if isinstance(value, int):
                ids.append(value)
                break
        for name in self.video_token_attrs:
            value = getattr(config, name, None)
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return tuple(ids)

    def decoder(self, model: nn.Module) -> nn.Module:
        """The text decoder module (``language_model`` path)."""
        return _resolve(model, self.language_model, "language_model", self)

    def head(self, model: nn.Module) -> nn.Module:
        """The LM head module (``lm_head`` path)."""
        return _resolve(model, self.lm_head, "lm_head", self)

    def supported(self, backend: str) -> bool:
        """Whether the backend is verified for this family (fully, or through the language model only)."""
        return self.support.get(backend, "not verified") in ("yes", "lm-only")


def require_visual_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The family's image placeholder ids (`Adapter.visual_token_ids`); a `LayoutError` when the config names
    none (a layout cannot be derived from ``input_ids``: pass one yourself, or register an adapter)."""
    ids = adapter_for(model).visual_token_ids(model)
    if not ids:
        raise LayoutError(
            f"{type(model).__name__}'s config has no image token id, so eah-interp cannot tell image positions: pass "
            "layout=TokenLayout(...) (e.g. TokenLayout.from_spans) or register an adapter (docs/new_model.md)."
        )
    return tuple(ids)


def token_layout(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, require_images: bool = True
) -> TokenLayout:
    """The `TokenLayout` of a batch of ``model``'s inputs: the one rule every backend and analysis uses.

    Visual positions are those of ``input_ids`` holding one of the family's placeholder ids
    (`Adapter.visual_token_ids`: image, and video frames for Qwen), padding comes from ``attention_mask``.

    Args:
        model: an HF model (its family adapter: `adapter_for`).
        input_ids: ``[batch, seq]`` ids with the image placeholders expanded.
        attention_mask: ``[batch, seq]`` (1 = real token), or None (every position real).
        require_images: raise `NoImageTokensError` when a row has no image token; without it, a model whose
            config names no placeholder (a text-only LM) gets a layout without image positions.

    Raises:
        LayoutError: the config names no placeholder id and ``require_images``: pass a layout yourself.
    """
    ids = require_visual_token_ids(model) if require_images else adapter_for(model).visual_token_ids(model)
    return TokenLayout.from_input_ids(input_ids, ids, attention_mask, require_images=require_images)


def _resolve(model: nn.Module, path: str, what: str, adapter: Adapter) -> nn.Module:
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no {path!r} (the {what} path of the {adapter.family!r} adapter). "
                "Register an adapter with the right path (docs/new_model.md)."
            )
        obj = getattr(obj, part)
    return obj


_ALL = {"hf": "yes", "nnsight": "yes"}

ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Add an adapter to the registry (``replace=True`` to override a family's existing one)."""
    if adapter.family in ADAPTERS and not replace:
        raise ValueError(f"An adapter for {adapter.family!r} is registered already; pass replace=True to override it.")
    unknown = set(adapter.support) - set(BACKENDS)
    if unknown:
        raise ValueError(f"Adapter.support names unknown backends {sorted(unknown)}; choose from {BACKENDS}.")
    ADAPTERS[adapter.family] = adapter
    return adapter


for _adapter in (
    Adapter(
        "llava",
        ("LlavaForConditionalGeneration",),
        quirks=("one placeholder per image feature (576 for LLaVA-1.5 at 336 px); several images per prompt are one union",),
        support={**_ALL, "lens": "yes"},
    ),
    Adapter(
        "llava_next",
        ("LlavaNextForConditionalGeneration",),
        quirks=(
            "AnyRes: an image is a base view plus tiles, unpadded, with an image_newline token per tile row; all of "
            "them are image positions (~2,900 for LLaVA-NeXT at 672 px)",
        ),
        support={**_ALL, "lens": "yes"},
    ),
    Adapter(
        "qwen2_vl",
        ("Qwen2VLForConditionalGeneration",),
        video_token_attrs=("video_token_id",),
        quirks=(
            "M-RoPE (3D positions): pass mm_token_type_ids from the processor",
            "image tokens sit between <|vision_start|> and <|vision_end|>, which are text; video tokens count as visual",
            "the number of image tokens depends on the image size (dynamic resolution)",
        ),
        support={
            **_ALL,
            "lens": "no TransformerLens bridge for Qwen2-VL, and the language-model-only route would lose M-RoPE "
            "(transformers maps no causal-LM class to Qwen2VLTextConfig)",
        },
    ),
    Adapter(
        "qwen2_5_vl",
        ("Qwen2_5_VLForConditionalGeneration",),
        video_token_attrs=("video_token_id",),
        quirks=(
            "M-RoPE (3D positions): pass mm_token_type_ids from the processor",
            "image tokens sit between <|vision_start|> and <|vision_end|>, which are text; video tokens count as visual",
        ),
        support={
            **_ALL,
            "lens": "the TransformerLens bridge needs torchvision (which does not install beside the CPU torch "
            "here), and its hook_pattern fires after HF computed attention, so pattern edits are discarded",
        },
    ),
    Adapter(
        "instructblip",
        ("InstructBlipForConditionalGeneration",),
        language_model="language_model.model",
        lm_head="language_model.lm_head",
        quirks=(
            "the 'image tokens' are the Q-Former's query outputs (num_query_tokens, 32 in released models), placed "
            "at the start of the prompt; they are not patches, so a sink is a query slot, not an image region",
        ),
        support={**_ALL, "lens": "lm-only"},
    ),
    Adapter(
        "paligemma",
        ("PaliGemmaForConditionalGeneration",),
        bidirectional_image_attention=True,
        quirks=(
            "image + prompt form a prefix attended bidirectionally (token_type_ids 0): use normalise='rows'",
            "image tokens come first in the prompt",
        ),
        support={
            **_ALL,
            "lens": "no TransformerLens bridge for PaliGemma, and the language-model-only route would lose the "
            "bidirectional prefix mask",
        },
    ),
    Adapter(
        "gemma3",
        ("Gemma3ForConditionalGeneration",),
        bidirectional_image_attention=True,
        quirks=(
            "tokens of one image attend to each other bidirectionally (token_type_ids 1): use normalise='rows'",
            "interleaved sliding-window and global layers; image tokens sit between <start_of_image> and <end_of_image>",
        ),
        support={**_ALL, "lens": "yes"},
    ),
    Adapter(
        "idefics3",
        ("Idefics3ForConditionalGeneration",),
        language_model="model.text_model",
        quirks=(
            "an image is split into tiles plus a global view; each tile's tokens sit between <fake_token_around_image> "
            "and a row/col (or <global-img>) marker, which are text",
        ),
        support={**_ALL, "lens": "yes"},
    ),
    Adapter(
        "smolvlm",
        ("SmolVLMForConditionalGeneration",),
        language_model="model.text_model",
        quirks=("the Idefics3 architecture: tiles plus a global view, marker tokens between them are text",),
        support={**_ALL, "lens": "lm-only"},
    ),
    Adapter(
        "organism",
        ("OrganismForConditionalGeneration",),
        quirks=("the bundled model organism: LLaVA layout with an EfficientNet-Lite0 tower, 49 image tokens, 9 heads / 3 KV heads",),
        support={**_ALL, "lens": "lm-only"},
    ),
):
    register_adapter(_adapter)

#: The adapter used for models no family claims.
GENERIC = Adapter(
    "generic",
    (),
    quirks=("no family adapter: image positions come from the config's image token id; check describe() before trusting it",),
)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a model: the family registered for its class (or its nearest base class), else `GENERIC`.

    Raises:
        UnsupportedModelError: not an HF model, or no registered family and no attention modules with a
            ``layer_idx`` in the text decoder (so the generic route cannot work either).
    """
    for cls in type(model).__mro__:  # the most specific class first: the organism is a LLaVA subclass
        for adapter in ADAPTERS.values():
            if cls.__name__ in adapter.architectures:
                return adapter
    attention_modules(model)  # raises UnsupportedModelError with the list of families
    return GENERIC


def image_token_ids(model: nn.Module) -> tuple[int, ...]:
    """Placeholder ids that mark visual positions in ``input_ids``, from the model's family adapter.

    ``(config.image_token_id,)`` for most families (``image_token_index`` in older configs); Qwen adds
    ``video_token_id``. Empty when the config has none (then pass an explicit `TokenLayout`).
    """
    return adapter_for(model).visual_token_ids(model)


def known_families() -> str:
    """``"llava (LlavaForConditionalGeneration), ..."``: for error messages and docs."""
    return ", ".join(f"{a.family} ({', '.join(a.architectures)})" for a in ADAPTERS.values())


# ---------------------------------------------------------------------------------------------- describe
@dataclass
class Description:
    """What eah-interp detected in a model (and a batch): printed by `describe`.

    Attributes:
        family: the adapter's family (``"generic"`` for an unknown model).
        architecture: the model's class name.
        n_layers, n_heads, n_kv_heads, head_dim: of the text decoder.
        attn_implementation: of the text decoder.
        attention_layers: layer indices of the attention modules found.
        visual_token_ids: placeholder ids counted as image tokens.
        layout: the batch's `TokenLayout` (None without inputs).
        adapter: the `Adapter` used.
    """

    family: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_implementation: str
    attention_layers: list[int]
    visual_token_ids: tuple[int, ...]
    layout: TokenLayout | None
    adapter: Adapter

    def __str__(self) -> str:
        a = self.adapter
        lines = [
            f"{self.architecture}  (family: {self.family})",
            f"  language model: {a.language_model}   attention: {self.attn_implementation}",
            f"  {self.n_layers} layers x {self.n_heads} heads ({self.n_kv_heads} KV heads, GQA group "
            f"{self.n_heads // max(self.n_kv_heads, 1)}), head_dim {self.head_dim}",
            f"  attention modules found for layers {_ranges(self.attention_layers)}",
            f"  visual token ids: {list(self.visual_token_ids) or 'none (pass a TokenLayout)'}",
        ]
        if self.layout is not None:
            lines.append("  layout:")
            lines += ["    " + line for line in self.layout.describe().splitlines()]
        if a.bidirectional_image_attention:
            lines.append("  NOTE: bidirectional image attention: use normalise='rows' for sink scores")
        lines += [f"  quirk: {q}" for q in a.quirks]
        if not a.support:
            lines.append("  backends: not verified for this model: run check_model(model, inputs)")
            return "\n".join(lines)
        support = ", ".join(f"{b}: {a.support.get(b, 'not verified') if a.supported(b) else 'no'}" for b in BACKENDS)
        lines.append(f"  backends: {support}")
        lines += [f"    {b}: {a.support[b]}" for b in BACKENDS if b in a.support and not a.supported(b)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        rows = None if self.layout is None else self.layout.n_image_tokens.tolist()
        return (
            f"Description(family={self.family!r}, layers={self.n_layers}, heads={self.n_heads}, "
            f"kv_heads={self.n_kv_heads}, image_tokens_per_row={rows})"
        )


def _ranges(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return str(values)


def describe(model: nn.Module, inputs: Mapping[str, Any] | None = None, *, file: IO[str] | None = sys.stdout) -> Description:
    """Print (to ``file``; None to stay silent) and return what eah-interp detects in ``model``.

    Args:
        model: an HF LVLM.
        inputs: optional processor output (``input_ids``, ``attention_mask``): adds the per-row image
            token counts and spans.

    Returns:
        A `Description` (its ``str`` is the printed report).
    """
    adapter = adapter_for(model)
    cfg = text_config(model)
    n_layers, n_heads, n_kv = model_shape(model)
    modules = attention_modules(model)
    layout = None
    if inputs is not None:
        if "input_ids" not in inputs:
            raise ValueError("describe(model, inputs) needs inputs['input_ids'] (the processor's output).")
        layout = token_layout(model, inputs["input_ids"], inputs.get("attention_mask"), require_images=False)
    description = Description(
        family=adapter.family,
        architecture=type(model).__name__,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
        attn_implementation=str(compat.attn_implementation(cfg)),
        attention_layers=sorted(modules),
        visual_token_ids=adapter.visual_token_ids(model),
        layout=layout,
        adapter=adapter,
    )
    if file is not None:
        print(description, file=file)
    return description
