"""Per-layer, per-head attention statistics, streamed over a dataset without keeping attention maps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.chunked import AttentionSums, text_rows_after_image
from eah_interp.config import OFFICIAL_THRESHOLD
from eah_interp.errors import ConfigError, LayoutError
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    QUERY_CHUNK,
    Normalise,
    column_sums,
    query_positions,
    sink_counts_from_scores,
    sink_scores_from_column_sums,
)

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

#: Statistics computed by `head_statistics`, in column order.
STATISTICS = ("sink_count", "sink_density", "max_sink_score", "image_mass_text", "entropy")
#: The running sums of one statistic of one layer (`HeadStats.state_dict` keys end in these).
_STATE_PARTS = ("n", "mean", "m2")
_STATE_FORMAT = "eah_interp.HeadStats/1"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        ``entropy``: mean over real query rows of the row entropy (nats).
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
    return {
        "sink_count": counts,
        "sink_density": counts / n_image[:, None],
        "max_sink_score": scores.max(-1).values,
        "image_mass_text": image_mass,
        "entropy": sums.entropy / sums.n_real.clamp_min(1)[:, None],
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

    Feed it one batch at a time with `update` (from probabilities) or `update_from_stats` (from a
    `head_statistics` result); it keeps only running sums, never attention maps. Accumulators of
    separate processes or shards combine with `merge` / `merge_all`.

    Args:
        threshold: the sink threshold of the statistics that count sinks.
        normalise: how sink scores are normalised (`eah_interp.sinks.sink_scores`).
        model: the name of the model the statistics come from (optional): `merge` refuses to mix two
            different names, and `save` / `load` keep it.

    Example:
        >>> stats = HeadStats(threshold=0.0008)
        >>> with eah_interp.hf.record_attention(model, layers="all", stats=stats):
        ...     model(**inputs)
        >>> stats.rank(by="sink_density").head()
    """

    def __init__(
        self, threshold: float = OFFICIAL_THRESHOLD, normalise: Normalise = "causal", model: str | None = None
    ) -> None:
        if threshold < 0:
            raise ConfigError(f"threshold must be >= 0; got {threshold}.")
        self.threshold = threshold
        self.normalise = normalise
        self.model = model
        self._acc: dict[int, dict[str, _Welford]] = {}

    @property
    def layers(self) -> list[int]:
        return sorted(self._acc)

    def n_examples(self, layer: int) -> int:
        return int(self._acc[layer]["sink_count"].n.max()) if layer in self._acc else 0

    def update(self, layer: int, probs: Float[Tensor, "batch heads q k"], layout: TokenLayout) -> None:
        """Add one batch of one layer's probabilities (prefill: ``q == k``)."""
        if probs.shape[-2] != probs.shape[-1]:
            raise LayoutError("HeadStats.update expects prompt (prefill) probabilities with q == k.")
        self.update_from_stats(layer, head_statistics(probs, layout, self.threshold, self.normalise))

    def update_from_stats(self, layer: int, stats: dict[str, Float[Tensor, "batch heads"]]) -> None:
        """Add precomputed per-example statistics (a `head_statistics` result) of one layer."""
        n_heads = stats["sink_count"].shape[-1]
        acc = self._acc.setdefault(layer, {name: _Welford(n_heads) for name in STATISTICS})
        if acc["sink_count"].n.shape[0] != n_heads:
            raise LayoutError(f"Layer {layer} was fed {acc['sink_count'].n.shape[0]} heads before, now {n_heads}.")
        for name in STATISTICS:
            acc[name].update(stats[name])

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
        per layer, statistic and head, so merging the statistics of any split of a dataset equals
        streaming it whole (float64, within rounding). Layers present on one side only are copied.
        Neither input is modified.

        Args:
            other: statistics of other examples, with the same ``threshold``, ``normalise`` and model.

        Returns:
            The merged `HeadStats` (its ``model`` is whichever side names one).

        Raises:
            ConfigError: the threshold, normalisation or model differ (statistics of another scan).
            LayoutError: a layer has a different number of heads on the two sides (another model).
        """
        problems = []
        if float(self.threshold) != float(other.threshold):
            problems.append(f"threshold {self.threshold!r} vs {other.threshold!r}")
        if self.normalise != other.normalise:
            problems.append(f"normalise {self.normalise!r} vs {other.normalise!r}")
        if self.model is not None and other.model is not None and self.model != other.model:
            problems.append(f"model {self.model!r} vs {other.model!r}")
        if problems:
            raise ConfigError(
                f"Cannot merge HeadStats of different scans ({'; '.join(problems)}): merge only shards of one "
                "scan (same model, threshold and normalisation); rescan one side with the other's settings."
            )
        merged = HeadStats(self.threshold, self.normalise, model=self.model if self.model is not None else other.model)
        for layer in sorted(set(self._acc) | set(other._acc)):
            mine, theirs = self._acc.get(layer), other._acc.get(layer)
            if mine is not None and theirs is not None:
                if mine["sink_count"].n.shape != theirs["sink_count"].n.shape:
                    raise LayoutError(
                        f"Cannot merge HeadStats: layer {layer} has {mine['sink_count'].n.shape[0]} heads on one side "
                        f"and {theirs['sink_count'].n.shape[0]} on the other (statistics of another model)."
                    )
                merged._acc[layer] = {name: mine[name].merged(theirs[name]) for name in STATISTICS}
            else:
                source = mine if mine is not None else theirs
                assert source is not None
                merged._acc[layer] = {name: source[name].merged(_Welford(source[name].n.shape[0])) for name in STATISTICS}
        return merged

    @classmethod
    def merge_all(cls, stats: Sequence[HeadStats]) -> HeadStats:
        """`merge` a list of accumulators left to right (e.g. one per rank or shard, in shard order).

        Raises:
            ConfigError: the list is empty, or two entries are of different scans (see `merge`).
        """
        if not stats:
            raise ConfigError("HeadStats.merge_all needs at least one HeadStats; got an empty list.")
        merged = stats[0].merge(HeadStats(stats[0].threshold, stats[0].normalise, model=stats[0].model))
        for other in stats[1:]:
            merged = merged.merge(other)
        return merged

    # ------------------------------------------------------------------ exact save / load
    def state_dict(self) -> dict[str, Tensor]:
        """The running sums as float64 CPU tensors, keyed ``"<layer>.<statistic>.<n|mean|m2>"`` (``[heads]`` each).

        With `load_state_dict` (and the same ``threshold`` / ``normalise``) it restores the accumulator
        exactly: further updates give bit-for-bit the same results as the original would.
        """
        state: dict[str, Tensor] = {}
        for layer in self.layers:
            for name, acc in self._acc[layer].items():
                for part in _STATE_PARTS:
                    state[f"{layer}.{name}.{part}"] = getattr(acc, part).detach().to("cpu", torch.float64).clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the running sums by a `state_dict` (every layer needs all statistics and parts)."""
        acc: dict[int, dict[str, _Welford]] = {}
        for key, value in state.items():
            parts = key.split(".")
            if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in STATISTICS or parts[2] not in _STATE_PARTS:
                raise ConfigError(f"Not a HeadStats state key: {key!r} (expected '<layer>.<statistic>.<n|mean|m2>').")
            if value.ndim != 1:
                raise LayoutError(f"HeadStats state {key!r} must be 1-d [heads]; got shape {tuple(value.shape)}.")
            layer, name, part = int(parts[0]), parts[1], parts[2]
            welford = acc.setdefault(layer, {}).setdefault(name, _Welford(value.shape[0]))
            if welford.n.shape != value.shape:
                raise LayoutError(f"HeadStats state {key!r} has {value.shape[0]} heads; layer {layer} has {welford.n.shape[0]}.")
            setattr(welford, part, value.detach().to("cpu", torch.float64).clone())
        for layer in acc:
            missing = [f"{layer}.{s}.{p}" for s in STATISTICS for p in _STATE_PARTS if f"{layer}.{s}.{p}" not in state]
            if missing:
                raise ConfigError(f"Incomplete HeadStats state: missing {missing}.")
            if len({w.n.shape[0] for w in acc[layer].values()}) != 1:
                raise LayoutError(f"HeadStats state of layer {layer}: the statistics disagree on the number of heads.")
        self._acc = {layer: {name: acc[layer][name] for name in STATISTICS} for layer in sorted(acc)}

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the accumulator to a safetensors file, atomically (a temporary file, then ``os.replace``).

        ``threshold`` and ``normalise`` go into the file's metadata, with any extra ``metadata`` strings;
        `HeadStats.load` restores it exactly (float64 sums, the threshold as its exact ``repr``).
        """
        from safetensors.torch import save

        meta = dict(metadata or {})
        meta.update(format=_STATE_FORMAT, threshold=repr(float(self.threshold)), normalise=str(self.normalise))
        if self.model is not None:
            meta["model"] = self.model
        path = Path(path)
        _atomic_write(path, save(self.state_dict(), metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadStats:
        """Read a file written by `save` (the inverse of `save`, exactly)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _STATE_FORMAT:
                raise ConfigError(f"{path} is not a HeadStats file written by HeadStats.save (format {meta.get('format')!r}).")
            state = {key: f.get_tensor(key) for key in f.keys()}
        stats = cls(threshold=float(meta["threshold"]), normalise=meta["normalise"], model=meta.get("model"))  # type: ignore[arg-type]
        stats.load_state_dict(state)
        return stats

    def __repr__(self) -> str:
        n = max((self.n_examples(layer) for layer in self.layers), default=0)
        model = "" if self.model is None else f", model={self.model!r}"
        return f"HeadStats(layers={self.layers}, examples={n}, threshold={self.threshold}, normalise={self.normalise!r}{model})"


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
