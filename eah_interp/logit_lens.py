"""Logit lens for LVLMs: the residual stream of every layer decoded through the final norm and unembedding.

What an image token "means" to the language model at each layer, and how confident the model is,
layer by layer, that an object is in the picture, with and without an intervention (e.g. EAH):

* `residual_stream`: the residual stream after each decoder layer (the ``resid`` site of
  `eah_interp.sites`, read by `eah_interp.sites.hf_hooks`, under any list of interventions; `hf.intervene`
  applies them).
* `decode`: residuals → logits with the model's own final norm and LM head (``lm_head(norm(h))``,
  final-logit soft-capping applied where the model's own forward applies it). Decoding the last layer gives exactly
  the model's logits.
* `object_vocabulary`: each object word → the token ids that stand for it.
* `image_token_lens`: per layer and image token, every object word's logit, log-probability and its
  probability *among the object words* (rank 1 = the object the token decodes to), as a tidy frame
  with the token's cell on the vision tower's grid; `plot_grid` draws it as an image-grid heatmap.
* `object_confidence`: per layer, an object's logit / probability at a position group (the image
  tokens, the last token, any mask), reduced by max and mean over the group; `plot_confidence`.

Why not ``output_hidden_states``: in transformers 5 the last entry of ``hidden_states`` is the final
norm's *output* (``last_hidden_state``, see ``transformers/utils/output_capturing.py``,
``tie_last_hidden_states``), while the others are raw decoder-layer outputs; decoding them all
through the norm would normalise the last layer twice. The decoder-layer hooks give every layer the
same (un-normed) definition, and `decode` adds the norm once.

The object vocabulary (`object_vocabulary`): by default each word is tokenised with a leading space
(``" star"``, as it follows an article in a caption) and its **first sub-token** stands for it (one
token per word on SmolLM2 for all 15 scene kinds). ``subtokens="all"`` counts every sub-token of the
word instead (their probability mass pooled), which for multi-token words also counts shared
word-pieces; ids shared between two words are refused either way, since they could not tell the
objects apart. An object's log-probability is ``logsumexp`` of the full-vocabulary log-softmax over
its ids; its logit is the largest raw logit among them; ``prob`` renormalises over the object words
only (a softmax over their pooled log-probabilities), so the words of the vocabulary compete.

Example:
    >>> vocab = object_vocabulary(processor.tokenizer)            # the 15 scene kinds
    >>> frame = image_token_lens(model, inputs, vocab, interventions={"baseline": None, "eah": [EAH.paper()]})
    >>> plot_grid(frame, layer=[5, 15, 29], condition="eah")
    >>> conf = object_confidence(model, inputs, vocab, positions=("image", "last"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp.errors import ConfigError, LayerIndexError, LayoutError, UnsupportedModelError
from eah_interp.hf import intervene
from eah_interp.layout import TokenLayout
from eah_interp.sites import hf_hooks, resolve_positions

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "LENS_COLUMNS",
    "CONFIDENCE_COLUMNS",
    "decode",
    "image_grid",
    "image_token_lens",
    "object_confidence",
    "object_vocabulary",
    "plot_confidence",
    "plot_grid",
    "residual_stream",
    "unembedding",
]

#: Columns of `image_token_lens` frames.
LENS_COLUMNS = (
    "condition", "row", "layer", "token", "position", "grid_row", "grid_col", "object",
    "logit", "logprob", "prob", "rank",
)
#: Columns of `object_confidence` frames.
CONFIDENCE_COLUMNS = (
    "condition", "row", "layer", "positions", "n_positions", "object",
    "logit_max", "logit_mean", "logprob_max", "logprob_mean", "prob_max", "prob_mean",
)


# ---------------------------------------------------------------------------------------------- vocabulary
def object_vocabulary(
    tokenizer: Any,
    words: Iterable[str] | None = None,
    *,
    variants: Sequence[str] = (" {}",),
    subtokens: str = "first",
) -> dict[str, tuple[int, ...]]:
    """Token ids standing for each object word.

    Args:
        tokenizer: the model's tokenizer (``processor.tokenizer``).
        words: the object words; the 15 kinds of the scene world (`eah_interp.scenes.KINDS`) when None.
        variants: format strings of the spellings to count (``" {}"``: with a leading space, as after an
            article; add ``"{}"`` or ``" {}s"`` for more).
        subtokens: ``"first"`` (the first sub-token of each spelling) or ``"all"`` (every sub-token).

    Returns:
        ``{word: (id, ...)}`` in the order of ``words``.

    Raises:
        ConfigError: unknown ``subtokens``, a word with no ids, or an id shared by two words.
    """
    if subtokens not in ("first", "all"):
        raise ConfigError(f"subtokens must be 'first' or 'all'; got {subtokens!r}.")
    if words is None:
        from eah_interp.scenes import KINDS

        words = KINDS
    vocab: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}
    for word in words:
        ids: list[int] = []
        for variant in variants:
            tokens = tokenizer(variant.format(word), add_special_tokens=False)["input_ids"]
            for token in tokens if subtokens == "all" else tokens[:1]:
                if int(token) not in ids:
                    ids.append(int(token))
        if not ids:
            raise ConfigError(f"The tokenizer gave no token for {word!r} (variants {list(variants)}).")
        for token in ids:
            if owner.setdefault(token, word) != word:
                raise ConfigError(
                    f"Token id {token} stands for both {owner[token]!r} and {word!r}, so the lens could not tell "
                    "them apart; use subtokens='first' or other variants."
                )
        vocab[word] = tuple(ids)
    return vocab


def _check_vocabulary(vocabulary: Mapping[str, Sequence[int]], vocab_size: int) -> None:
    if not vocabulary:
        raise ConfigError("The object vocabulary is empty; build one with object_vocabulary(processor.tokenizer).")
    for word, ids in vocabulary.items():
        if len(ids) == 0:
            raise ConfigError(f"Object {word!r} has no token ids in the vocabulary.")
        bad = [int(i) for i in ids if not 0 <= int(i) < vocab_size]
        if bad:
            raise ConfigError(f"Object {word!r}: ids {bad} are outside the model's vocabulary (0..{vocab_size - 1}).")


# ---------------------------------------------------------------------------------------------- residuals
def _layers(layers: int | Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [layer for layer in chosen if not -n_layers <= layer < n_layers]
    if bad:
        raise LayerIndexError(
            f"The language model has {n_layers} decoder layers (0..{n_layers - 1}); layers {bad} do not exist."
        )
    return sorted({layer % n_layers for layer in chosen})


def _conditions(interventions: Any) -> dict[str, Any]:
    """``{condition name: interventions}`` from None, one intervention / a list, or a mapping."""
    if isinstance(interventions, Mapping):
        if not interventions:
            raise ConfigError("interventions is an empty mapping; pass e.g. {'baseline': None, 'eah': [EAH.paper()]}.")
        return dict(interventions)
    return {"baseline" if interventions is None else "intervened": interventions}


def residual_stream(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    layers: int | Iterable[int] | None = None,
    interventions: Any = None,
) -> tuple[Float[Tensor, "layer batch seq d_model"], list[int], TokenLayout]:
    """The residual stream after each chosen decoder layer, in one forward (no gradients).

    Args:
        model: an HF LVLM (any family with an adapter) or a causal LM.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...).
        layers: decoder layers (negative counts from the end); all when None.
        interventions: None (the plain model), or interventions for `eah_interp.hf.intervene`
            (``[EAH.paper()]``, an `EAH`, ...) applied during the forward.

    Returns:
        ``(residuals, layers, layout)``: ``Float[layer, batch, seq, d_model]`` (each decoder layer's output,
        before the final norm, on the model's device), the layer indices in that order, and the `TokenLayout`.
    """
    from eah_interp.models import model_shape, token_layout

    chosen = _layers(layers, model_shape(model)[0])
    layout = token_layout(model, inputs["input_ids"], inputs.get("attention_mask"), require_images=False)
    seen: dict[int, Tensor] = {}

    def keep(layer: int) -> Callable[[Tensor], None]:
        return lambda hidden: seen.__setitem__(layer, hidden.detach())

    with torch.no_grad(), intervene(model, interventions), hf_hooks(model, {("resid", la): keep(la) for la in chosen}):
        model(**inputs)
    missing = [layer for layer in chosen if layer not in seen]
    if missing:
        raise UnsupportedModelError(f"Decoder layers {missing} did not run in the forward; cannot read their residuals.")
    return torch.stack([seen[layer] for layer in chosen]), chosen, layout


def unembedding(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The model's final norm, LM head and final-logit soft-cap (None when the model's forward applies none)."""
    from eah_interp.models.adapters import adapter_for
    from eah_interp.models.introspect import text_config

    adapter = adapter_for(model)
    try:
        decoder, head = adapter.decoder(model), adapter.head(model)
    except UnsupportedModelError:  # a text-only causal LM: transformers' public accessors
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if decoder is None or head is None:
            raise
    norm = getattr(decoder, "norm", None)
    if norm is None:
        norm = getattr(decoder, "final_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise UnsupportedModelError(
            f"{type(decoder).__name__} has no final norm at .norm or .final_layernorm; the logit lens decodes "
            "residuals through it. Register an adapter whose language_model path leads to a decoder with .norm."
        )
    # the cap as the model's own forward applies it: a causal LM (Gemma 2 / 3 ForCausalLM) reads its config's
    # final_logit_softcapping; transformers' LVLM classes (Gemma3ForConditionalGeneration) do not apply it
    cap = getattr(model.config, "final_logit_softcapping", None) if model.config is text_config(model) else None
    return norm, head, (float(cap) if cap else None)


def decode(model: nn.Module, residuals: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Logits of residuals read through the model's final norm and LM head (``lm_head(norm(h))``, soft-capped).

    Args:
        model: the model the residuals come from.
        residuals: any leading shape, last dimension the hidden size.

    Returns:
        Logits (float32), same leading shape, last dimension the vocabulary.
    """
    norm, head, cap = unembedding(model)
    with torch.no_grad():
        logits = head(norm(residuals)).float()
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _object_scores(
    logits: Float[Tensor, "n vocab"], id_lists: list[list[int]]
) -> tuple[Float[Tensor, "n objects"], Float[Tensor, "n objects"], Float[Tensor, "n objects"]]:
    """Per object: max raw logit over its ids, pooled full-vocabulary log-probability, probability among the objects."""
    logp = torch.log_softmax(logits, dim=-1)
    logit = torch.stack([logits[:, ids].max(-1).values for ids in id_lists], dim=-1)
    logprob = torch.stack([torch.logsumexp(logp[:, ids], dim=-1) for ids in id_lists], dim=-1)
    return logit, logprob, torch.softmax(logprob, dim=-1)


# ---------------------------------------------------------------------------------------------- image tokens
def image_grid(n_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(rows, cols)`` of the vision tower's grid for ``n_tokens`` image tokens (row-major order).

    Args:
        n_tokens: image tokens per row.
        grid: an explicit ``(rows, cols)``; derived as a square when None.

    Raises:
        LayoutError: ``n_tokens`` is not a square and no grid is given, or the grid does not hold ``n_tokens``.
    """
    if grid is not None:
        rows, cols = (int(g) for g in grid)
        if rows * cols != n_tokens:
            raise LayoutError(f"grid={tuple(grid)} holds {rows * cols} cells but the rows have {n_tokens} image tokens.")
        return rows, cols
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise LayoutError(
            f"{n_tokens} image tokens do not form a square grid (several images, tiles or a class token?); pass "
            "grid=(rows, cols) with rows * cols == the image tokens per row."
        )
    return side, side


def image_token_lens(
    model: nn.Module,
    inputs: Mapping[str, Any],
    vocabulary: Mapping[str, Sequence[int]],
    interventions: Any = None,
    layers: int | Iterable[int] | None = None,
    *,
    grid: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Which object each image token decodes to, per layer: the logit lens at the image tokens.

    Args:
        model: an HF LVLM.
        inputs: the processor's outputs for a batch of prompts with one image each.
        vocabulary: ``{object: token ids}`` (`object_vocabulary`).
        interventions: None (the plain model), interventions for `eah_interp.hf.intervene`, or a mapping
            ``{condition: interventions}`` (one forward each, e.g. ``{"baseline": None, "eah": [EAH.paper()]}``).
        layers: decoder layers to read; all when None.
        grid: ``(rows, cols)`` of the image tokens; a square is derived from their number when None.

    Returns:
        A tidy frame with `LENS_COLUMNS`: one row per condition, batch row, layer, image token and object;
        ``token`` is the image token's index within its row (row-major on the grid: ``grid_row``,
        ``grid_col``), ``position`` its absolute position, ``rank`` 1 for the object it decodes to.

    Raises:
        LayoutError: rows with different numbers of image tokens, or a non-square count without ``grid``.
    """
    import pandas as pd

    records: list[pd.DataFrame] = []
    for condition, items in _conditions(interventions).items():
        residuals, chosen, layout = residual_stream(model, inputs, layers=layers, interventions=items)
        layout.check_has_images()
        counts = layout.n_image_tokens.tolist()
        if len(set(counts)) != 1:
            raise LayoutError(f"Rows have different numbers of image tokens {counts}; run the lens on one row at a time.")
        n_img = counts[0]
        _, cols_ = image_grid(n_img, grid)
        words = list(vocabulary)
        id_lists = [[int(i) for i in vocabulary[w]] for w in words]
        for row in range(layout.batch_size):
            pos = layout.image_positions(row).to(residuals.device)
            for li, layer in enumerate(chosen):
                logits = decode(model, residuals[li, row, pos])  # [n_img, vocab]
                if li == 0 and row == 0:
                    _check_vocabulary(vocabulary, logits.shape[-1])
                logit, logprob, prob = _object_scores(logits, id_lists)
                rank = prob.argsort(dim=-1, descending=True).argsort(dim=-1) + 1
                token = torch.arange(n_img).repeat_interleave(len(words))
                records.append(pd.DataFrame({
                    "condition": condition,
                    "row": row,
                    "layer": layer,
                    "token": token.numpy(),
                    "position": pos.cpu().repeat_interleave(len(words)).numpy(),
                    "grid_row": (token // cols_).numpy(),
                    "grid_col": (token % cols_).numpy(),
                    "object": words * n_img,
                    "logit": logit.flatten().cpu().numpy(),
                    "logprob": logprob.flatten().cpu().numpy(),
                    "prob": prob.flatten().cpu().numpy(),
                    "rank": rank.flatten().cpu().numpy(),
                }))
    return pd.concat(records, ignore_index=True)[list(LENS_COLUMNS)]


def object_confidence(
    model: nn.Module,
    inputs: Mapping[str, Any],
    vocabulary: Mapping[str, Sequence[int]],
    interventions: Any = None,
    layers: int | Iterable[int] | None = None,
    *,
    positions: str | Tensor | Sequence[str | Tensor] = ("image", "last"),
) -> pd.DataFrame:
    """An object's internal confidence per layer: its logit / probability at position groups, max and mean.

    Args:
        model: an HF LVLM.
        inputs: the processor's outputs.
        vocabulary: ``{object: token ids}`` (`object_vocabulary`).
        interventions: as in `image_token_lens` (None, a list, or ``{condition: interventions}``).
        layers: decoder layers to read; all when None.
        positions: one position group or several: names (``"image"``, ``"last"``, the layout's groups) or
            bool masks ``[batch, seq]`` (named ``"mask0"``, ``"mask1"``, ... in the frame).

    Returns:
        A tidy frame with `CONFIDENCE_COLUMNS`: one row per condition, batch row, layer, group and object;
        ``*_max`` / ``*_mean`` reduce over the group's positions in that row (``prob`` is the probability
        among the vocabulary's objects, ``logprob`` the full-vocabulary log-probability).

    Raises:
        LayoutError: a group is empty in some row.
    """
    import pandas as pd

    words = list(vocabulary)
    id_lists = [[int(i) for i in vocabulary[w]] for w in words]
    records: list[dict[str, Any]] = []
    for condition, items in _conditions(interventions).items():
        residuals, chosen, layout = residual_stream(model, inputs, layers=layers, interventions=items)
        named = list(resolve_positions(layout, positions).items())
        for name, mask in named:
            if empty := (~mask.any(-1)).nonzero().flatten().tolist():
                raise LayoutError(f"Position group {name!r} is empty in rows {empty}; choose a group every row has.")
        for row in range(layout.batch_size):
            for name, mask in named:
                pos = mask[row].nonzero().flatten().to(residuals.device)
                logits = decode(model, residuals[:, row, pos])  # [layer, n_pos, vocab]
                _check_vocabulary(vocabulary, logits.shape[-1])
                flat = logits.reshape(-1, logits.shape[-1])
                scores = [s.reshape(len(chosen), len(pos), len(words)) for s in _object_scores(flat, id_lists)]
                for li, layer in enumerate(chosen):
                    for k, word in enumerate(words):
                        entry = {"condition": condition, "row": row, "layer": layer, "positions": name,
                                 "n_positions": len(pos), "object": word}
                        for label, s in zip(("logit", "logprob", "prob"), scores, strict=True):
                            entry[f"{label}_max"] = float(s[li, :, k].max())
                            entry[f"{label}_mean"] = float(s[li, :, k].mean())
                        records.append(entry)
    return pd.DataFrame.from_records(records, columns=list(CONFIDENCE_COLUMNS))


# ---------------------------------------------------------------------------------------------- plots
def plot_grid(
    frame: pd.DataFrame,
    layer: int | Sequence[int],
    *,
    row: int = 0,
    condition: str | None = None,
    object: str | None = None,  # noqa: A002 - the column's name
    image: Any = None,
) -> Figure:
    """Image-grid heatmap of `image_token_lens` at one or several layers.

    Each cell is an image token at its place on the vision tower's grid. With ``object=None`` the cell is
    coloured by the probability of the object it decodes to (rank 1) and labelled with that object's first
    three letters; with ``object="star"`` it shows that object's probability among the vocabulary.

    Args:
        frame: the output of `image_token_lens`.
        layer: one layer or several (one panel each).
        row: the batch row.
        condition: which condition (required when the frame has several).
        object: an object to map, or None for the top object per token.
        image: optionally the picture (PIL image or array), drawn as the first panel.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    conditions = sorted(frame["condition"].unique())
    if condition is None:
        if len(conditions) > 1:
            raise ConfigError(f"The frame holds conditions {conditions}; pass condition=... to choose one.")
        condition = conditions[0]
    layers = [layer] if isinstance(layer, int) else list(layer)
    sub = frame[(frame["condition"] == condition) & (frame["row"] == row)]
    missing = [la for la in layers if la not in set(sub["layer"])]
    if sub.empty or missing:
        raise ConfigError(
            f"No lens values for condition {condition!r}, row {row}, layers {missing or layers}; the frame has layers "
            f"{sorted(frame['layer'].unique())} and rows {sorted(frame['row'].unique())}."
        )
    if object is not None and object not in set(sub["object"]):
        raise ConfigError(f"Object {object!r} is not in the frame's vocabulary {sorted(sub['object'].unique())}.")
    n_rows, n_cols = int(sub["grid_row"].max()) + 1, int(sub["grid_col"].max()) + 1
    panels = len(layers) + (image is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels + 1.0, 2.9), squeeze=False, layout="constrained")
    axes = axes[0]
    if image is not None:
        axes[0].imshow(np.asarray(image))
        axes[0].set_title("image")
        axes[0].axis("off")
    mappable = None
    for ax, la in zip(axes[panels - len(layers):], layers, strict=True):
        at = sub[sub["layer"] == la]
        cells = at[at["object"] == object] if object is not None else at[at["rank"] == 1]
        heat = np.full((n_rows, n_cols), np.nan)
        heat[cells["grid_row"].to_numpy(), cells["grid_col"].to_numpy()] = cells["prob"].to_numpy()
        mappable = ax.imshow(heat, vmin=0.0, vmax=1.0, cmap="viridis")
        if object is None:
            for r, c, word in zip(cells["grid_row"], cells["grid_col"], cells["object"], strict=True):
                ax.text(c, r, word[:3], ha="center", va="center", fontsize=6, color="white")
        ax.set_title(f"layer {la}" + (f": p({object})" if object else ""))
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.8, label="probability among objects")
    fig.suptitle(f"logit lens on image tokens ({condition}, row {row})", fontsize=9)
    return fig


def plot_confidence(
    frame: pd.DataFrame, object: str, *, row: int = 0, value: str = "prob_mean"  # noqa: A002
) -> Figure:
    """Lines over layers of `object_confidence` for one object: one line per condition and position group.

    Args:
        frame: the output of `object_confidence`.
        object: the object word.
        row: the batch row.
        value: the column to plot (``"prob_mean"``, ``"prob_max"``, ``"logprob_mean"``, ...).
    """
    import matplotlib.pyplot as plt

    if value not in frame.columns:
        raise ConfigError(f"Unknown value {value!r}; choose from {list(CONFIDENCE_COLUMNS[6:])}.")
    sub = frame[(frame["object"] == object) & (frame["row"] == row)]
    if sub.empty:
        raise ConfigError(f"No confidence values for object {object!r} in row {row}.")
    fig, ax = plt.subplots(figsize=(5.5, 3.2), layout="constrained")
    for (condition, group), part in sub.groupby(["condition", "positions"], sort=True):
        part = part.sort_values("layer")
        ax.plot(part["layer"], part[value], marker="o", ms=3, label=f"{condition}, {group}")
    ax.set_xlabel("layer")
    ax.set_ylabel(value)
    ax.set_title(f"{object!r} through the layers (row {row})")
    ax.legend(fontsize=7)
    return fig
