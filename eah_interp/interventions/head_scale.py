"""Per-head output scaling: multiply chosen heads' outputs before ``o_proj``.

A finding (heads ranked by `HeadStats`, or a patching result) becomes an intervention with
`HeadScale.from_head_stats` / `HeadScale.from_frame`: ``scale=0`` ablates the heads, ``> 1`` amplifies.

`HeadScale.allpath` is AllPath's form (SooLab/AllPath@c879251): ``mods/new_modeling_llama.py:186-220``
projects each head's output through its slice of ``o_proj``, multiplies hallucination heads by
``de_scale`` and "good" heads by ``in_scale``, optionally renormalises the layer's factors to sum to the
number of heads (``norm_distribution``), and sums the heads; ``main.py:309-310`` sets ``in_scale=2.0``,
``de_scale=0.0``; ``new_modeling_llama.py:794-804`` drops a head listed in both sets from both. ``o_proj``
has no bias in LLaMA, so scaling a head's projected output equals scaling its output before ``o_proj``
(what `HeadScale` does). The shipped ``main.py`` never passes ``norm_distribution``, so its runs do not
renormalise (``renormalise=False``, the default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.adhh import HeadList
from eah_interp.interventions.selectors import Site

if TYPE_CHECKING:
    import pandas as pd

    from eah_interp.head_stats import HeadStats


@dataclass(frozen=True)
class HeadScale(HeadList):
    """Multiply the per-head attention outputs (``[batch, q, heads, d]``, before ``o_proj``) of listed heads.

    Args:
        heads: ``(layer, head)`` pairs.
        scale: the multiplier (0 = ablate), or one multiplier per listed head.
        phase: ``"both"``, ``"prefill"`` or ``"decode"``.
        renormalise: in every edited layer, rescale all the layer's factors (1 for unlisted heads) so they
            sum to the number of heads (AllPath's ``norm_distribution``).
    """

    scale: float | tuple[float, ...] = 0.0
    renormalise: bool = False

    point: ClassVar[str] = "output"

    def check(self) -> None:
        super().check()
        scale = self.scale
        if isinstance(scale, (list, tuple)):
            scale = tuple(scale)
            if len(scale) != len(self.heads):
                raise ConfigError(
                    f"HeadScale.scale has {len(scale)} values for {len(self.heads)} heads: pass one number, or one "
                    "per head."
                )
            object.__setattr__(self, "scale", scale)
        values = scale if isinstance(scale, tuple) else (scale,)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"HeadScale.scale must be a number or one number per head; got {self.scale!r}.")
        if not isinstance(self.renormalise, bool):
            raise ConfigError(f"HeadScale.renormalise must be True or False; got {self.renormalise!r}.")

    @classmethod
    def allpath(
        cls,
        hallu_heads: object = (),
        good_heads: object = (),
        *,
        de_scale: float = 0.0,
        in_scale: float = 2.0,
        renormalise: bool = False,
        phase: str = "both",
    ) -> HeadScale:
        """AllPath's head scaling: hallucination heads x ``de_scale`` (0), good heads x ``in_scale`` (2).

        As SooLab/AllPath does (``mods/new_modeling_llama.py:186-220``, defaults ``main.py:309-310``): a head
        in both lists is left alone (``new_modeling_llama.py:794-804``); ``renormalise=True`` is its
        ``norm_distribution`` (the layer's factors rescaled to sum to its head count), which the shipped
        ``main.py`` never turns on. AllPath ranks its heads per benchmark (``heads_ours/<model>/*.jsonl``,
        the first entries hallucination heads, the last ones good heads); pass your own lists.

        Args:
            hallu_heads: ``(layer, head)`` pairs to scale by ``de_scale``.
            good_heads: ``(layer, head)`` pairs to scale by ``in_scale``.
        """
        hallu = [(int(layer), int(head)) for layer, head in hallu_heads]  # type: ignore[attr-defined]
        good = [(int(layer), int(head)) for layer, head in good_heads]  # type: ignore[attr-defined]
        both = set(hallu) & set(good)
        hallu = [pair for pair in dict.fromkeys(hallu) if pair not in both]
        good = [pair for pair in dict.fromkeys(good) if pair not in both]
        if not hallu and not good:
            raise ConfigError("HeadScale.allpath needs hallucination or good heads (a head in both lists is dropped).")
        scales = (float(de_scale),) * len(hallu) + (float(in_scale),) * len(good)
        return cls(heads=tuple(hallu + good), scale=scales, phase=phase, renormalise=renormalise)

    def scale_of(self, index: int) -> float:
        """The multiplier of the ``index``-th listed head."""
        return float(self.scale[index] if isinstance(self.scale, tuple) else self.scale)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, top: int, scale: float = 0.0, **kwargs: Any) -> HeadScale:
        """The first ``top`` rows of a frame with ``layer`` and ``head`` columns (e.g. ``HeadStats.rank(...)``)."""
        if not {"layer", "head"} <= set(frame.columns):
            raise ConfigError(f"The frame needs 'layer' and 'head' columns; it has {list(frame.columns)}.")
        rows = frame.head(top)
        return cls(heads=tuple(zip(rows["layer"].astype(int), rows["head"].astype(int), strict=True)), scale=scale, **kwargs)

    @classmethod
    def from_head_stats(
        cls, stats: HeadStats, by: str = "sink_density", top: int = 5, scale: float = 0.0, ascending: bool = False,
        **kwargs: Any,
    ) -> HeadScale:
        """The ``top`` heads of a `HeadStats` ranked by a statistic's mean (see `HeadStats.rank`)."""
        return cls.from_frame(stats.rank(by=by, ascending=ascending), top, scale, **kwargs)

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        n_heads = tensor.shape[2]
        factors = torch.ones(n_heads, dtype=torch.float64)
        for index, (layer, head) in enumerate(self.heads):
            if layer == site.layer:
                factors[head] = self.scale_of(index)
        if self.renormalise:
            factors = factors * (n_heads / factors.sum())
        changed = int((factors != 1).sum())
        real = site.layout.attention_mask[:, site.k_len - site.q_len :]
        factors = factors.to(dtype=tensor.dtype, device=tensor.device)
        return tensor * factors[None, None, :, None], int(real.sum()) * changed * tensor.shape[-1]

    def describe(self) -> str:
        if isinstance(self.scale, tuple):
            groups: dict[float, list[list[int]]] = {}
            for index, pair in enumerate(self.heads):
                groups.setdefault(self.scale_of(index), []).append(list(pair))
            what = "; ".join(f"heads {pairs} by {value:g}" for value, pairs in groups.items())
        else:
            what = f"heads {[list(p) for p in self.heads]} by {self.scale:g}"
        norm = ", then rescale each edited layer's factors to sum to its head count" if self.renormalise else ""
        return f"HeadScale: multiply the outputs (before o_proj) of {what}{norm} ({self.phase} forwards)."
