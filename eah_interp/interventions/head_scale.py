"""Per-head output scaling (AllPath-style): multiply chosen heads' outputs before ``o_proj``.

A finding (heads ranked by `HeadStats`, or a patching result) becomes an intervention with
`HeadScale.from_head_stats` / `HeadScale.from_frame`: ``scale=0`` ablates the heads, ``> 1`` amplifies.
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
        scale: the multiplier (0 = ablate).
        phase: ``"both"``, ``"prefill"`` or ``"decode"``.
    """

    scale: float = 0.0

    point: ClassVar[str] = "output"

    def check(self) -> None:
        super().check()
        if not isinstance(self.scale, (int, float)):
            raise ConfigError(f"HeadScale.scale must be a number; got {self.scale!r}.")

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
        factors = torch.ones(tensor.shape[2], dtype=tensor.dtype, device=tensor.device)
        chosen = self.heads_of(site.layer)
        factors[chosen] = float(self.scale)
        real = site.layout.attention_mask[:, site.k_len - site.q_len :]
        return tensor * factors[None, None, :, None], int(real.sum()) * len(chosen) * tensor.shape[-1]

    def describe(self) -> str:
        return (
            f"HeadScale: multiply the outputs (before o_proj) of heads {[list(p) for p in self.heads]} by "
            f"{self.scale:g} ({self.phase} forwards)."
        )
