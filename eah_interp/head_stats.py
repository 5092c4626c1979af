"""Per-layer, per-head attention statistics, streamed over a dataset without keeping attention maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eah_interp.chunked import AttentionSums, text_rows_after_image
from eah_interp.errors import ConfigError, LayoutError
from eah_interp.layout import TokenLayout
from eah_interp.resumable import atomic_write
from eah_interp.sinks import (
    MASSIVE_TAU,
    OFFICIAL_THRESHOLD,
    QUERY_CHUNK,
    Normalise,
    column_sums,
    explained_by_null,
    massive_activation_sinks,
    null_densities,
    query_positions,
    sink_agreement,
    sink_counts_from_scores,
    sink_scores_from_column_sums,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Statistics computed by `head_statistics`, in column order.
STATISTICS = (
    "sink_count",
    "sink_density",
    "max_sink_score",
    "image_mass_text",
    "entropy",
    "previous_null_density",
    "uniform_null_density",
    "explained_by_null",
)
#: Per-layer statistics of the two sink definitions (`sink_overlap`), kept when `HeadStats` has ``sink_dims``.
OVERLAP_STATISTICS = ("eah_sinks", "massive_sinks", "both", "jaccard", "eah_in_massive")
#: The running sums of one statistic of one layer (`HeadStats.state_dict` keys end in these).
_STATE_PARTS = ("n", "mean", "m2")
_STATE_FORMAT = "eah_interp.HeadStats/1"


def head_statistics(
    probs: Float[Tensor, "batch heads q k"],
    layout: TokenLayout,
    threshold: float = OFFICIAL_THRESHOLD,
    normalise: Normalise = "causal",
) -> dict[str, Float[Tensor, "batch heads"]]:
    """Per-example, per-head statistics of one layer's probabilities (float32).

    Returns a dict with (each ``Float[batch, heads]``):
        ``sink_count``: number of vision sinks; ``sink_density``: sinks / image tokens of the row;
        ``max_sink_score``: the largest sink score; ``image_mass_text``: mean over text query rows
        after the first image token of the attention mass on image keys (NaN if the row has none);
        ``entropy``: mean over real query rows of the row entropy (nats);
        ``previous_null_density`` / ``uniform_null_density``: the density a pure previous-token / uniform
        pattern gets on the row's layout at this threshold and normaliser (`eah_interp.sinks.null_densities`;
        the same for every head); ``explained_by_null``: 1.0 where the head's density is explained by
        either null (`eah_interp.sinks.explained_by_null`), else 0.0. Where both nulls saturate (density 1 at
        a low threshold) this flags any dense head, local or broad: tell those apart with
        `eah_interp.sinks.previous_token_share` and `eah_interp.sinks.null_pattern_distance`, per null.
    """
    return head_statistics_from_sums(attention_sums(probs, layout), layout, probs.shape[-2], threshold, normalise)


def attention_sums(probs: Float[Tensor, "batch heads q k"], layout: TokenLayout) -> AttentionSums:
    """The `AttentionSums` of a full probability map (``QUERY_CHUNK`` rows at a time, in float32)."""
    b, h, q, k = probs.shape
    layout = layout.to(probs.device)
    qpos = query_positions(q, k, probs.device)
    real = layout.attention_mask[:, qpos]  # [b, q]
    text_rows = text_rows_after_image(layout, q)
    image_cols = layout.image_mask[:, None, None, :].float()
    mass_sum = torch.zeros(b, h, device=probs.device)
    entropy_sum = torch.zeros(b, h, device=probs.device)
    for s in range(0, q, QUERY_CHUNK):
        chunk = probs[:, :, s : s + QUERY_CHUNK].float()
        mass = (chunk * image_cols).sum(-1)  # [b, h, qc]
        ent = -(chunk * chunk.clamp_min(1e-30).log()).sum(-1)
        mass_sum += (mass * text_rows[:, None, s : s + QUERY_CHUNK]).sum(-1)
        entropy_sum += (ent * real[:, None, s : s + QUERY_CHUNK]).sum(-1)
    return AttentionSums(
        column_sums(probs, layout), mass_sum, entropy_sum, text_rows.sum(-1).float(), real.sum(-1).float()
    )


def head_statistics_from_sums(
    sums: AttentionSums,
    layout: TokenLayout,
    q_len: int,
    threshold: float = OFFICIAL_THRESHOLD,
    normalise: Normalise = "causal",
) -> dict[str, Float[Tensor, "batch heads"]]:
    """`head_statistics` from running sums (`attention_sums` of a full map, or `eah_interp.chunked`)."""
    layout = layout.to(sums.column_sums.device)
    scores = sink_scores_from_column_sums(sums.column_sums, layout, q_len, normalise)
    counts = sink_counts_from_scores(scores, layout, threshold).float()
    n_image = layout.n_image_tokens.clamp_min(1).float()
    n_text = sums.n_text
    image_mass = torch.where(n_text[:, None] > 0, sums.image_mass / n_text.clamp_min(1)[:, None], torch.nan)
    density = counts / n_image[:, None]
    nulls = {kind: value[:, None].expand_as(density) for kind, value in null_densities(layout, threshold, q_len, normalise).items()}
    explained = explained_by_null(density, nulls["previous"]) | explained_by_null(density, nulls["uniform"])
    return {
        "sink_count": counts,
        "sink_density": density,
        "max_sink_score": scores.max(-1).values,
        "image_mass_text": image_mass,
        "entropy": sums.entropy / sums.n_real.clamp_min(1)[:, None],
        "previous_null_density": nulls["previous"].float(),
        "uniform_null_density": nulls["uniform"].float(),
        "explained_by_null": explained.float(),
    }


def column_sinks_from_sums(
    sums: AttentionSums,
    layout: TokenLayout,
    q_len: int,
    threshold: float = OFFICIAL_THRESHOLD,
    normalise: Normalise = "causal",
) -> Bool[Tensor, "batch heads k"]:
    """EAH's vision sinks (`eah_interp.sinks.detect_sinks`) from running sums instead of a full map."""
    layout = layout.to(sums.column_sums.device)
    scores = sink_scores_from_column_sums(sums.column_sums, layout, q_len, normalise)
    return (scores > threshold) & layout.image_mask[:, None, :]


def sink_overlap(
    column_sinks: Bool[Tensor, "batch heads k"], massive: Bool[Tensor, "batch k"], layout: TokenLayout
) -> dict[str, Float[Tensor, " batch"]]:
    """Per-row counts of the two sink definitions on the image tokens and their overlap (float32).

    Returns a dict with (each ``Float[batch]``): ``eah_sinks``: image tokens that are an EAH sink
    (`detect_sinks`) in at least one head; ``massive_sinks``: image tokens with a massive activation
    (`massive_activation_sinks`); ``both``; ``jaccard`` = both / either (the counts of
    `eah_interp.sinks.sink_agreement`); ``eah_in_massive`` = both / eah_sinks, the fraction of EAH's sinks
    that are massive-activation sinks (each NaN where its denominator is 0: skipped by `HeadStats`).
    """
    agreement = sink_agreement(column_sinks.to(massive.device), massive, layout.image_mask)
    n_eah, both = agreement["eah"], agreement["both"]
    return {
        "eah_sinks": n_eah,
        "massive_sinks": agreement["massive"],
        "both": both,
        "jaccard": agreement["jaccard"],
        "eah_in_massive": torch.where(n_eah > 0, both / n_eah.clamp_min(1), torch.nan),
    }


class _Welford:
    """Streaming mean / variance per head, in float64; NaN values are skipped."""

    def __init__(self, n_heads: int) -> None:
        self.n = torch.zeros(n_heads, dtype=torch.float64)
        self.mean = torch.zeros(n_heads, dtype=torch.float64)
        self.m2 = torch.zeros(n_heads, dtype=torch.float64)

    def update(self, values: Float[Tensor, "batch heads"]) -> None:
        for row in values.detach().to("cpu", torch.float64):
            ok = ~torch.isnan(row)
            self.n += ok
            delta = torch.where(ok, row - self.mean, 0.0)
            self.mean += torch.where(ok, delta / self.n.clamp_min(1), 0.0)
            self.m2 += torch.where(ok, delta * (row - self.mean), 0.0)

    @property
    def std(self) -> Tensor:
        return torch.where(self.n > 1, (self.m2 / (self.n - 1).clamp_min(1)).sqrt(), torch.nan)

    def merged(self, other: _Welford) -> _Welford:
        """The state of one stream holding both streams' values (Chan, Golub & LeVeque's parallel update).

        ``n`` adds exactly; ``mean = mean_a + delta * n_b / n`` and
        ``m2 = m2_a + m2_b + delta**2 * n_a * n_b / n`` with ``delta = mean_b - mean_a``, per head (a head
        with no values on one side takes the other side's state unchanged).
        """
        out = _Welford(self.n.shape[0])
        n = self.n + other.n
        safe_n = n.clamp_min(1)
        delta = other.mean - self.mean
        out.n = n
        out.mean = torch.where(other.n == 0, self.mean, torch.where(self.n == 0, other.mean, self.mean + delta * other.n / safe_n))
        out.m2 = torch.where(
            (self.n == 0) | (other.n == 0), self.m2 + other.m2, self.m2 + other.m2 + delta * delta * self.n * other.n / safe_n
        )
        return out


class HeadStats:
    """Streaming accumulator of per-layer, per-head statistics (mean and std over examples).

    Feed it one batch at a time with `update` (from probabilities), `update_from_sums` (from running
    sums) or `update_from_stats` (from a `head_statistics` result); by default it keeps only running
    sums, never attention maps. Accumulators of separate processes or shards combine with `merge` /
    `merge_all`.

    Args:
        threshold: the sink threshold of the statistics that count sinks.
        normalise: how sink scores are normalised (`eah_interp.sinks.sink_scores`).
        model: the name of the model the statistics come from (optional): `merge` refuses to mix two
            different names, and `save` / `load` keep it.
        keep_examples: also keep every example's values (per layer, statistic and head, with example
            ids) for paired tests: `examples_frame`; `merge`, `save` and `load` keep them.
        sink_dims: the model's massive-activation dimensions (`eah_interp.sinks.massive_dims`): with
            them, each layer also accumulates the two sink definitions and their overlap
            (`OVERLAP_STATISTICS`, from the layer's input hidden states: `eah_interp.hf.record_attention`
            passes them) — `layer_frame`.
        tau: the massive-activation threshold (VAR: 20).

    Example:
        >>> stats = HeadStats(threshold=0.0008)
        >>> with eah_interp.hf.record_attention(model, layers="all", stats=stats):
        ...     model(**inputs)
        >>> stats.rank(by="sink_density").head()
    """

    def __init__(
        self,
        threshold: float = OFFICIAL_THRESHOLD,
        normalise: Normalise = "causal",
        model: str | None = None,
        *,
        keep_examples: bool = False,
        sink_dims: Sequence[int] | None = None,
        tau: float = MASSIVE_TAU,
    ) -> None:
        if threshold < 0:
            raise ConfigError(f"threshold must be >= 0; got {threshold}.")
        dims = tuple(int(d) for d in sink_dims) if sink_dims is not None else ()
        if any(d < 0 for d in dims):
            raise ConfigError(f"sink_dims must be hidden-state dimensions >= 0; got {list(dims)}.")
        self.threshold = threshold
        self.normalise = normalise
        self.model = model
        self.keep_examples = bool(keep_examples)
        self.sink_dims = dims
        self.tau = float(tau)
        self._acc: dict[int, dict[str, _Welford]] = {}
        self._overlap: dict[int, dict[str, _Welford]] = {}
        # per layer: the example ids (None: the example's index in the stream) and values
        self._ids: dict[int, list[str | None]] = {}
        self._examples: dict[int, dict[str, list[Tensor]]] = {}
        self._overlap_examples: dict[int, dict[str, list[Tensor]]] = {}
        self._next_ids: list[str] | None = None
        self._labels_used: set[int] = set()

    def _settings(self) -> dict:
        return {"keep_examples": self.keep_examples, "sink_dims": self.sink_dims, "tau": self.tau}

    @property
    def layers(self) -> list[int]:
        return sorted(self._acc)

    def n_examples(self, layer: int) -> int:
        return int(self._acc[layer]["sink_count"].n.max()) if layer in self._acc else 0

    # ------------------------------------------------------------------ feeding
    def label_next(self, ids: Sequence[str] | None) -> None:
        """Name the examples of the next batch (each layer's next update uses these ids; None: unnamed).

        For recordings that call `update` for you (`eah_interp.hf.record_attention`): call it before
        each forward. Ids given to an update directly take precedence.
        """
        self._next_ids = None if ids is None else [str(i) for i in ids]
        self._labels_used = set()

    def update(
        self,
        layer: int,
        probs: Float[Tensor, "batch heads q k"],
        layout: TokenLayout,
        hidden: Float[Tensor, "batch k dim"] | None = None,
        ids: Sequence[str] | None = None,
    ) -> None:
        """Add one batch of one layer's probabilities (prefill: ``q == k``).

        Args:
            layer: the layer index.
            probs: the layer's post-softmax probabilities.
            layout: the batch's layout.
            hidden: the layer's input hidden states (needed when ``sink_dims`` is set).
            ids: example ids of the batch rows (default: `label_next`'s, else unnamed).
        """
        if probs.shape[-2] != probs.shape[-1]:
            raise LayoutError("HeadStats.update expects prompt (prefill) probabilities with q == k.")
        self.update_from_sums(layer, attention_sums(probs, layout), layout, probs.shape[-2], hidden, ids)

    def update_from_sums(
        self,
        layer: int,
        sums: AttentionSums,
        layout: TokenLayout,
        q_len: int,
        hidden: Float[Tensor, "batch k dim"] | None = None,
        ids: Sequence[str] | None = None,
    ) -> None:
        """Add one batch from running sums (`attention_sums`, `eah_interp.chunked`); see `update`."""
        stats = head_statistics_from_sums(sums, layout, q_len, self.threshold, self.normalise)
        overlap = None
        if self.sink_dims:
            if hidden is None:
                raise ConfigError(
                    f"This HeadStats compares sinks with massive activations (sink_dims={list(self.sink_dims)}): "
                    f"pass layer {layer}'s input hidden states (hidden=...), or build it without sink_dims."
                )
            if hidden.shape[:2] != (layout.batch_size, layout.seq_len):
                raise LayoutError(
                    f"Hidden states of shape {tuple(hidden.shape)} do not cover the layout's "
                    f"{layout.batch_size} rows x {layout.seq_len} positions (pass the prompt's, [batch, seq, dim])."
                )
            sinks = column_sinks_from_sums(sums, layout, q_len, self.threshold, self.normalise)
            massive = massive_activation_sinks(hidden, self.sink_dims, self.tau)
            overlap = sink_overlap(sinks, massive, layout.to(massive.device))
        extra = {k: v for k, v in (("overlap", overlap), ("ids", ids)) if v is not None}
        self.update_from_stats(layer, stats, **extra)

    def update_from_stats(
        self,
        layer: int,
        stats: dict[str, Float[Tensor, "batch heads"]],
        overlap: dict[str, Float[Tensor, " batch"]] | None = None,
        ids: Sequence[str] | None = None,
    ) -> None:
        """Add precomputed per-example statistics of one layer.

        Args:
            layer: the layer index.
            stats: a `head_statistics` result (every name of `STATISTICS`, each ``[batch, heads]``).
            overlap: a `sink_overlap` result (``[batch]`` each), for a HeadStats with ``sink_dims``.
            ids: example ids of the batch rows (default: `label_next`'s, else unnamed).
        """
        missing = [name for name in STATISTICS if name not in stats]
        if missing:
            raise ConfigError(f"update_from_stats needs every statistic of STATISTICS; missing {missing} (use head_statistics).")
        batch, n_heads = stats["sink_count"].shape[-2:]
        acc = self._acc.setdefault(layer, {name: _Welford(n_heads) for name in STATISTICS})
        if acc["sink_count"].n.shape[0] != n_heads:
            raise LayoutError(f"Layer {layer} was fed {acc['sink_count'].n.shape[0]} heads before, now {n_heads}.")
        if overlap is not None and not self.sink_dims:
            raise ConfigError("overlap statistics given to a HeadStats without sink_dims: build it with sink_dims=(...).")
        if overlap is None and self.sink_dims:
            raise ConfigError(
                f"This HeadStats compares sinks with massive activations (sink_dims={list(self.sink_dims)}) but got no "
                "overlap statistics for this batch: feed it through update / update_from_sums with hidden=..., or "
                "hf.record_attention (the nnsight and TransformerLens recorders do not pass hidden states), or build "
                "it without sink_dims."
            )
        if ids is None and self._next_ids is not None and self.keep_examples:
            if layer in self._labels_used:
                raise ConfigError(
                    f"Layer {layer} was fed twice since label_next(...): call label_next with the ids of each batch "
                    "before its forward (or label_next(None) for unnamed examples)."
                )
            self._labels_used.add(layer)
            ids = self._next_ids
        if ids is not None and len(ids) != batch:
            raise LayoutError(f"{len(ids)} example ids for a batch of {batch} rows.")
        for name in STATISTICS:
            acc[name].update(stats[name])
        if overlap is not None:
            lacc = self._overlap.setdefault(layer, {name: _Welford(1) for name in OVERLAP_STATISTICS})
            for name in OVERLAP_STATISTICS:
                lacc[name].update(overlap[name].reshape(-1, 1))
        if self.keep_examples:
            self._ids.setdefault(layer, []).extend([str(i) for i in ids] if ids is not None else [None] * batch)
            kept = self._examples.setdefault(layer, {name: [] for name in STATISTICS})
            for name in STATISTICS:
                kept[name].append(stats[name].detach().to("cpu", torch.float64).reshape(batch, n_heads))
            if overlap is not None:
                lkept = self._overlap_examples.setdefault(layer, {name: [] for name in OVERLAP_STATISTICS})
                for name in OVERLAP_STATISTICS:
                    lkept[name].append(overlap[name].detach().to("cpu", torch.float64).reshape(batch, 1))

    # ------------------------------------------------------------------ reading
    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, head): ``n`` and ``<stat>_mean`` / ``<stat>_std`` for every statistic."""
        import pandas as pd

        rows = []
        for layer in self.layers:
            acc = self._acc[layer]
            for head in range(acc["sink_count"].n.shape[0]):
                row: dict[str, float | int] = {"layer": layer, "head": head, "n": int(acc["sink_count"].n[head])}
                for name in STATISTICS:
                    row[f"{name}_mean"] = float(acc[name].mean[head]) if acc[name].n[head] > 0 else float("nan")
                    row[f"{name}_std"] = float(acc[name].std[head])
                rows.append(row)
        return pd.DataFrame(rows, columns=["layer", "head", "n"] + [f"{s}_{m}" for s in STATISTICS for m in ("mean", "std")])

    def layer_frame(self) -> pd.DataFrame:
        """One row per layer: the two sink definitions and their overlap (needs ``sink_dims``).

        Columns: ``n`` (examples), ``<stat>_mean`` / ``<stat>_std`` for each of `OVERLAP_STATISTICS`
        (means over the examples where the statistic is defined), and ``pooled_jaccard`` =
        ``both / (eah_sinks + massive_sinks - both)`` of the summed counts (NaN where neither has a sink).
        """
        import pandas as pd

        rows = []
        for layer in sorted(self._overlap):
            acc = self._overlap[layer]
            row: dict[str, float | int] = {"layer": layer, "n": int(acc["eah_sinks"].n[0])}
            for name in OVERLAP_STATISTICS:
                row[f"{name}_mean"] = float(acc[name].mean[0]) if acc[name].n[0] > 0 else float("nan")
                row[f"{name}_std"] = float(acc[name].std[0])
            either = row["eah_sinks_mean"] + row["massive_sinks_mean"] - row["both_mean"]
            row["pooled_jaccard"] = row["both_mean"] / either if either > 0 else float("nan")
            rows.append(row)
        columns = ["layer", "n"] + [f"{s}_{m}" for s in OVERLAP_STATISTICS for m in ("mean", "std")] + ["pooled_jaccard"]
        return pd.DataFrame(rows, columns=columns)

    def _example_ids(self, layer: int) -> list[str]:
        return [str(i) if name is None else name for i, name in enumerate(self._ids.get(layer, []))]

    def examples_frame(self, level: str = "head") -> pd.DataFrame:
        """Every kept example's values as a tidy table (needs ``keep_examples=True``).

        Args:
            level: ``"head"``: one row per (layer, head, example) with a column per statistic of
                `STATISTICS`; ``"layer"``: one row per (layer, example) with a column per statistic of
                `OVERLAP_STATISTICS` (needs ``sink_dims``).

        Returns:
            A DataFrame with ``layer``, (``head``,) ``example`` (its id; an unnamed example's index in the
            stream as a string), ``index`` (its position in the layer's stream) and the statistics.
        """
        import pandas as pd

        if not self.keep_examples:
            raise ConfigError("This HeadStats keeps no per-example values: build it with HeadStats(..., keep_examples=True).")
        if level not in ("head", "layer"):
            raise ConfigError(f"level must be 'head' or 'layer'; got {level!r}.")
        names, source = (STATISTICS, self._examples) if level == "head" else (OVERLAP_STATISTICS, self._overlap_examples)
        frames = []
        for layer in sorted(source):
            values = {name: torch.cat(source[layer][name]) for name in names}  # [n, heads]
            n, heads = values[names[0]].shape
            ids = self._example_ids(layer)
            data: dict[str, object] = {
                "layer": layer,
                "example": [ids[i] for i in range(n) for _ in range(heads)],
                "index": [i for i in range(n) for _ in range(heads)],
            }
            if level == "head":
                data["head"] = [h for _ in range(n) for h in range(heads)]
            for name in names:
                data[name] = values[name].reshape(-1).numpy()
            frames.append(pd.DataFrame(data))
        key = ["layer", "head"] if level == "head" else ["layer"]
        columns = key + ["example", "index", *names]
        if not frames:
            return pd.DataFrame(columns=columns)
        return pd.concat(frames, ignore_index=True)[columns].sort_values(key + ["index"], kind="stable").reset_index(drop=True)

    def explained_heads(self, min_fraction: float = 0.5) -> pd.DataFrame:
        """Heads whose sinks a null pattern explains in at least ``min_fraction`` of the examples.

        A warning sign, not a verdict: at this threshold and normaliser a pure previous-token or uniform
        pattern marks (nearly) as many image tokens as sinks as these heads do (`head_statistics`'s
        ``explained_by_null``; `eah_interp.sinks.explained_by_null` with its default tolerance). Read their
        `eah_interp.sinks.density_curve` against the nulls before calling them sink heads.

        Returns:
            The `to_frame` rows of those heads.
        """
        frame = self.to_frame()
        return frame[frame.explained_by_null_mean >= min_fraction].reset_index(drop=True)

    def rank(self, by: str = "sink_density", layer: int | None = None, ascending: bool = False) -> pd.DataFrame:
        """Heads sorted by a statistic's mean (``by`` is a name from `STATISTICS`), optionally of one layer."""
        if by not in STATISTICS:
            raise ConfigError(f"Unknown statistic {by!r}; choose from {STATISTICS}.")
        frame = self.to_frame()
        if layer is not None:
            frame = frame[frame.layer == layer]
        return frame.sort_values(f"{by}_mean", ascending=ascending, kind="stable").reset_index(drop=True)

    def matrix(self, stat: str = "sink_density") -> Float[Tensor, "layers heads"]:
        """The mean of a statistic as a ``[len(layers), heads]`` tensor (rows in `layers` order)."""
        if stat not in STATISTICS:
            raise ConfigError(f"Unknown statistic {stat!r}; choose from {STATISTICS}.")
        return torch.stack([self._acc[layer][stat].mean for layer in self.layers])

    def plot_heatmap(self, stat: str = "sink_density", ax=None, title: str | None = None) -> Figure:
        """Heatmap of a statistic's mean, layers (rows) x heads (columns). Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        data = self.matrix(stat).numpy()
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.2 + 0.35 * data.shape[1], 1.0 + 0.25 * data.shape[0]))
        else:
            fig = ax.figure
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_title(title or f"{stat} (mean over {max(self.n_examples(la) for la in self.layers)} examples)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return fig

    # ------------------------------------------------------------------ merge (data-parallel runs)
    def merge(self, other: HeadStats) -> HeadStats:
        """A new `HeadStats` holding both accumulators' examples, as if one stream had seen them all.

        Counts add exactly; means and variances combine with the parallel-variance formula (Chan et al.),
        per layer, statistic and head (and per layer for the sink-overlap statistics), so merging the
        statistics of any split of a dataset equals streaming it whole (float64, within rounding).
        Kept examples are concatenated, ``self``'s first (as a stream that saw ``self``'s examples
        first). Layers present on one side only are copied. Neither input is modified.

        Args:
            other: statistics of other examples, with the same ``threshold``, ``normalise``, model,
                ``keep_examples``, ``sink_dims`` and ``tau``.

        Returns:
            The merged `HeadStats` (its ``model`` is whichever side names one).

        Raises:
            ConfigError: the settings differ (statistics of another scan), or both sides kept an example
                with the same id (an example counted twice).
            LayoutError: a layer has a different number of heads on the two sides (another model).
        """
        problems = []
        if float(self.threshold) != float(other.threshold):
            problems.append(f"threshold {self.threshold!r} vs {other.threshold!r}")
        if self.normalise != other.normalise:
            problems.append(f"normalise {self.normalise!r} vs {other.normalise!r}")
        if self.model is not None and other.model is not None and self.model != other.model:
            problems.append(f"model {self.model!r} vs {other.model!r}")
        for name, mine in self._settings().items():
            if mine != other._settings()[name]:
                problems.append(f"{name} {mine!r} vs {other._settings()[name]!r}")
        if problems:
            raise ConfigError(
                f"Cannot merge HeadStats of different scans ({'; '.join(problems)}): merge only shards of one "
                "scan (same model, threshold, normalisation and options); rescan one side with the other's settings."
            )
        merged = HeadStats(self.threshold, self.normalise, model=self.model if self.model is not None else other.model,
                           **self._settings())
        merged._acc = _merge_welfords(self._acc, other._acc, STATISTICS)
        merged._overlap = _merge_welfords(self._overlap, other._overlap, OVERLAP_STATISTICS)
        if self.keep_examples:
            for layer in sorted(set(self._ids) | set(other._ids)):
                mine, theirs = self._ids.get(layer, []), other._ids.get(layer, [])
                twice = sorted({i for i in mine if i is not None} & {i for i in theirs if i is not None})
                if twice:
                    raise ConfigError(
                        f"Cannot merge HeadStats: examples {twice[:5]} were counted on both sides (layer {layer}); "
                        "merge statistics of disjoint shards (or give their examples distinct ids)."
                    )
                merged._ids[layer] = list(mine) + list(theirs)
            for target, a, b in ((merged._examples, self._examples, other._examples),
                                 (merged._overlap_examples, self._overlap_examples, other._overlap_examples)):
                for layer in sorted(set(a) | set(b)):
                    names = (a.get(layer) or b[layer]).keys()
                    target[layer] = {name: [*a.get(layer, {}).get(name, []), *b.get(layer, {}).get(name, [])] for name in names}
        return merged

    @classmethod
    def merge_all(cls, stats: Sequence[HeadStats]) -> HeadStats:
        """`merge` a list of accumulators left to right (e.g. one per rank or shard, in shard order).

        Raises:
            ConfigError: the list is empty, or two entries are of different scans (see `merge`).
        """
        if not stats:
            raise ConfigError("HeadStats.merge_all needs at least one HeadStats; got an empty list.")
        first = stats[0]
        merged = first.merge(HeadStats(first.threshold, first.normalise, model=first.model, **first._settings()))
        for other in stats[1:]:
            merged = merged.merge(other)
        return merged

    # ------------------------------------------------------------------ exact save / load
    def state_dict(self) -> dict[str, Tensor]:
        """The running sums as float64 CPU tensors, keyed ``"<layer>.<statistic>.<part>"``.

        Parts: ``n`` / ``mean`` / ``m2`` (``[heads]``; ``[1]`` for `OVERLAP_STATISTICS`) and, with
        ``keep_examples``, ``examples`` (``[n_examples, heads]``). With `load_state_dict` (and the same
        settings) it restores the accumulator exactly: further updates give bit-for-bit the same results
        as the original would. Example ids are not tensors: `save` / `load` keep them.
        """
        state: dict[str, Tensor] = {}
        for accs in (self._acc, self._overlap):
            for layer in sorted(accs):
                for name, acc in accs[layer].items():
                    for part in _STATE_PARTS:
                        state[f"{layer}.{name}.{part}"] = getattr(acc, part).detach().to("cpu", torch.float64).clone()
        for kept in (self._examples, self._overlap_examples):
            for layer in sorted(kept):
                for name, values in kept[layer].items():
                    state[f"{layer}.{name}.examples"] = torch.cat(values).to(torch.float64).clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor], ids: dict[int, list[str | None]] | None = None) -> None:
        """Replace the running sums by a `state_dict` (every layer needs all statistics and parts).

        Args:
            state: a `state_dict`.
            ids: the example ids per layer (None entries: unnamed); default: all unnamed.
        """
        acc: dict[int, dict[str, _Welford]] = {}
        overlap: dict[int, dict[str, _Welford]] = {}
        examples: dict[int, dict[str, list[Tensor]]] = {}
        overlap_examples: dict[int, dict[str, list[Tensor]]] = {}
        for key, value in state.items():
            parts = key.split(".")
            known = STATISTICS + OVERLAP_STATISTICS
            if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in known or parts[2] not in (*_STATE_PARTS, "examples"):
                raise ConfigError(
                    f"Not a HeadStats state key: {key!r} (expected '<layer>.<statistic>.<n|mean|m2|examples>' with a "
                    f"statistic of STATISTICS or OVERLAP_STATISTICS; a checkpoint of an older version: rescan)."
                )
            layer, name, part = int(parts[0]), parts[1], parts[2]
            if part == "examples":
                if not self.keep_examples:
                    raise ConfigError(f"State {key!r} holds per-example values: load it into HeadStats(..., keep_examples=True).")
                if value.ndim != 2:
                    raise LayoutError(f"HeadStats state {key!r} must be 2-d [examples, heads]; got shape {tuple(value.shape)}.")
                target = examples if name in STATISTICS else overlap_examples
                target.setdefault(layer, {})[name] = [value.detach().to("cpu", torch.float64).clone()]
                continue
            if value.ndim != 1:
                raise LayoutError(f"HeadStats state {key!r} must be 1-d [heads]; got shape {tuple(value.shape)}.")
            if name in OVERLAP_STATISTICS and not self.sink_dims:
                raise ConfigError(f"State {key!r} holds sink-overlap statistics: load it into HeadStats(..., sink_dims=...).")
            accs = acc if name in STATISTICS else overlap
            welford = accs.setdefault(layer, {}).setdefault(name, _Welford(value.shape[0]))
            if welford.n.shape != value.shape:
                raise LayoutError(f"HeadStats state {key!r} has {value.shape[0]} heads; layer {layer} has {welford.n.shape[0]}.")
            setattr(welford, part, value.detach().to("cpu", torch.float64).clone())
        for accs, names in ((acc, STATISTICS), (overlap, OVERLAP_STATISTICS)):
            for layer in accs:
                missing = [f"{layer}.{s}.{p}" for s in names for p in _STATE_PARTS if f"{layer}.{s}.{p}" not in state]
                if missing:
                    raise ConfigError(f"Incomplete HeadStats state: missing {missing} (a checkpoint of an older version: rescan).")
                if len({w.n.shape[0] for w in accs[layer].values()}) != 1:
                    raise LayoutError(f"HeadStats state of layer {layer}: the statistics disagree on the number of heads.")
        if self.keep_examples:
            for kept, names in ((examples, STATISTICS), (overlap_examples, OVERLAP_STATISTICS)):
                for layer in kept:
                    if set(kept[layer]) != set(names) or len({v[0].shape[0] for v in kept[layer].values()}) != 1:
                        raise ConfigError(f"Incomplete HeadStats state: the per-example values of layer {layer} are incomplete.")
            missing_layers = sorted(set(acc) - set(examples))
            if missing_layers and any(int(acc[la]["sink_count"].n.max()) > 0 for la in missing_layers):
                raise ConfigError(f"HeadStats state keeps no per-example values for layers {missing_layers}.")
        self._acc = {layer: {name: acc[layer][name] for name in STATISTICS} for layer in sorted(acc)}
        self._overlap = {layer: {name: overlap[layer][name] for name in OVERLAP_STATISTICS} for layer in sorted(overlap)}
        self._examples = {layer: {name: examples[layer][name] for name in STATISTICS} for layer in sorted(examples)}
        self._overlap_examples = {
            layer: {name: overlap_examples[layer][name] for name in OVERLAP_STATISTICS} for layer in sorted(overlap_examples)
        }
        ids = ids or {}
        self._ids = {}
        for layer in self._examples:
            n = self._examples[layer]["sink_count"][0].shape[0]
            layer_ids = list(ids.get(layer, [None] * n))
            if len(layer_ids) != n:
                raise LayoutError(f"{len(layer_ids)} example ids for layer {layer}, which keeps {n} examples.")
            self._ids[layer] = layer_ids

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the accumulator to a safetensors file, atomically (a temporary file, then ``os.replace``).

        ``threshold``, ``normalise`` and the options (``keep_examples``, ``sink_dims``, ``tau``, the
        example ids) go into the file's metadata, with any extra ``metadata`` strings; `HeadStats.load`
        restores it exactly (float64 sums, the threshold as its exact ``repr``).
        """
        import json

        from safetensors.torch import save

        meta = dict(metadata or {})
        meta.update(format=_STATE_FORMAT, threshold=repr(float(self.threshold)), normalise=str(self.normalise))
        if self.model is not None:
            meta["model"] = self.model
        if self.keep_examples:
            meta["keep_examples"] = "1"
            meta["example_ids"] = json.dumps({str(layer): ids for layer, ids in self._ids.items()})
        if self.sink_dims:
            meta["sink_dims"] = json.dumps(list(self.sink_dims))
            meta["tau"] = repr(self.tau)
        path = Path(path)
        atomic_write(path, save(self.state_dict(), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadStats:
        """Read a file written by `save` (the inverse of `save`, exactly)."""
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _STATE_FORMAT:
                raise ConfigError(f"{path} is not a HeadStats file written by HeadStats.save (format {meta.get('format')!r}).")
            state = {key: f.get_tensor(key) for key in f.keys()}
        stats = cls(
            threshold=float(meta["threshold"]),
            normalise=meta["normalise"],  # type: ignore[arg-type]
            model=meta.get("model"),
            keep_examples=meta.get("keep_examples") == "1",
            sink_dims=json.loads(meta["sink_dims"]) if "sink_dims" in meta else None,
            tau=float(meta.get("tau", MASSIVE_TAU)),
        )
        ids = {int(layer): values for layer, values in json.loads(meta.get("example_ids", "{}")).items()}
        stats.load_state_dict(state, ids)
        return stats

    def __repr__(self) -> str:
        n = max((self.n_examples(layer) for layer in self.layers), default=0)
        model = "" if self.model is None else f", model={self.model!r}"
        extra = ", keep_examples=True" if self.keep_examples else ""
        if self.sink_dims:
            extra += f", sink_dims={self.sink_dims}, tau={self.tau:g}"
        return (f"HeadStats(layers={self.layers}, examples={n}, threshold={self.threshold}, "
                f"normalise={self.normalise!r}{model}{extra})")


@dataclass
class Recording:
    """What ``record_attention`` collected, in every backend: the fed `HeadStats` and the kept prompt patterns.

    Attributes:
        layers: the recorded decoder layers.
        stats: the `HeadStats` fed once per prompt forward and layer, or None.
        keep_patterns: whether each prompt's probabilities are kept.
        patterns: per layer, each prompt forward's probabilities ``[batch, heads, q, k]`` (on CPU).
        layouts: each prompt forward's layout, once per forward.
    """

    layers: tuple[int, ...]
    stats: HeadStats | None = None
    keep_patterns: bool = False
    patterns: dict[int, list[Tensor]] = field(default_factory=dict)
    layouts: list[TokenLayout] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.stats is None and not self.keep_patterns:
            raise ConfigError("record_attention needs stats=HeadStats(...) and/or keep_patterns=True.")

    def add(self, layer: int, probs: Float[Tensor, "batch heads q k"], layout: TokenLayout,
            hidden: Tensor | None = None) -> None:
        """Record one prompt forward's probabilities of one layer (``hidden``: its input, for ``sink_dims``)."""
        if self.stats is not None:
            self.stats.update(layer, probs.detach(), layout, hidden=hidden)
        if self.keep_patterns:
            self.patterns.setdefault(layer, []).append(probs.detach().to("cpu"))
        self._note(layout)

    def add_sums(self, layer: int, sums: AttentionSums, layout: TokenLayout, q_len: int,
                 hidden: Tensor | None = None) -> None:
        """Record one prompt forward of one layer from running sums (statistics only)."""
        assert self.stats is not None
        self.stats.update_from_sums(layer, sums, layout, q_len, hidden=hidden)
        self._note(layout)

    def _note(self, layout: TokenLayout) -> None:
        """Keep each prompt's layout once (the layers of one forward share it)."""
        if not self.layouts or self.layouts[-1] is not layout:
            self.layouts.append(layout)


def _merge_welfords(
    a: dict[int, dict[str, _Welford]], b: dict[int, dict[str, _Welford]], names: tuple[str, ...]
) -> dict[int, dict[str, _Welford]]:
    """Per-layer `_Welford.merged` of two accumulators (a layer on one side only is copied)."""
    out: dict[int, dict[str, _Welford]] = {}
    for layer in sorted(set(a) | set(b)):
        mine, theirs = a.get(layer), b.get(layer)
        if mine is not None and theirs is not None:
            if mine[names[0]].n.shape != theirs[names[0]].n.shape:
                raise LayoutError(
                    f"Cannot merge HeadStats: layer {layer} has {mine[names[0]].n.shape[0]} heads on one side "
                    f"and {theirs[names[0]].n.shape[0]} on the other (statistics of another model)."
                )
            out[layer] = {name: mine[name].merged(theirs[name]) for name in names}
        else:
            source = mine if mine is not None else theirs
            assert source is not None
            out[layer] = {name: source[name].merged(_Welford(source[name].n.shape[0])) for name in names}
    return out


def group_attention(
    probs: Float[Tensor, "batch heads q k"],
    layout: TokenLayout,
    queries: str | Tensor = "question",
    keys: str | Tensor = "image",
) -> Float[Tensor, "batch heads"]:
    """Mean over the query rows in one position group of the attention mass on the keys of another.

    E.g. the question tokens' attention to the image (the defaults). Groups are names of
    `eah_interp.layout.GROUPS` or ``Bool[batch, k]`` masks (`TokenLayout.group_mask`); query row ``i``
    sits at key position ``k - q + i``. A row with no query in the group gives NaN.

    Args:
        probs: one layer's attention probabilities ``[batch, heads, q, k]``.
        layout: the layout of the ``k`` key positions.
        queries, keys: the two groups.

    Returns:
        ``Float[batch, heads]``, in float32.
    """
    if layout.seq_len != probs.shape[-1] or layout.batch_size != probs.shape[0]:
        raise LayoutError(
            f"The layout ({layout.batch_size} rows x {layout.seq_len} positions) does not fit the map "
            f"({probs.shape[0]} rows x {probs.shape[-1]} keys)."
        )
    q_len, k_len = probs.shape[-2:]
    rows = layout.group_mask(queries)[:, query_positions(q_len, k_len, layout.attention_mask.device)]
    key_mask = layout.group_mask(keys).to(probs.device)
    mass = (probs.float() * key_mask[:, None, None, :]).sum(-1)  # [b, h, q]
    rows = rows.to(probs.device)[:, None, :].float()
    return (mass * rows).sum(-1) / rows.sum(-1)
