"""Attention knockout: block one position group from attending to another in a window of layers.

The groups are span names (`SPANS`; see `eah_interp.interventions.selectors`) or user
``Bool[batch, seq]`` masks of the prompt's positions (kept as nested tuples, so the config stays JSON).

As in attention-knockout studies (e.g. Geva et al., 2023, "Dissecting Recall of Factual Associations"):
post-mask scores of the chosen (query, key) pairs are set to the dtype minimum, so the softmax gives
them zero weight. A query never loses its own position, so no row is left with nothing to attend to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import (
    Site,
    UserMask,
    as_group,
    entries,
    group_keys,
    query_rows,
    visible,
)
from eah_interp.sinks import query_positions


@dataclass(frozen=True)
class Knockout(Intervention):
    """Block queries in group ``queries`` from attending to keys in group ``keys`` at ``layers``.

    Args:
        queries: ``"last"`` (the call's last row), a span of `SPANS` (rows at those positions), or a
            ``Bool[batch, seq]`` mask of prompt positions (rows at those positions).
        keys: a span of `SPANS` or a ``Bool[batch, seq]`` mask of prompt positions.
        layers: the window (None = every layer).
        phase: ``"both"``, ``"prefill"`` or ``"decode"``.
    """

    queries: str | UserMask = "last"
    keys: str | UserMask = "image"

    point: ClassVar[str] = "scores"

    def check(self) -> None:
        object.__setattr__(self, "queries", as_group(self.queries, "Knockout.queries"))
        object.__setattr__(self, "keys", as_group(self.keys, "Knockout.keys"))
        if self.queries == self.keys == "all":
            raise ConfigError("Knockout(queries='all', keys='all') blocks every edge: choose narrower groups.")

    @property
    def last_row_only(self) -> bool:  # type: ignore[override]
        return self.queries == "last"

    def rows(self, site: Site) -> Tensor:
        """``Bool[batch, q]``: the query rows in the ``queries`` group."""
        return query_rows(self.queries, site)

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        qpos = query_positions(site.q_len, site.k_len, tensor.device)
        own = qpos[:, None] == torch.arange(site.k_len, device=tensor.device)[None, :]  # [q, k]
        selected = entries(self.rows(site), group_keys(self.keys, site)) & ~own & visible(tensor)
        return tensor.masked_fill(selected, torch.finfo(tensor.dtype).min), count(selected)

    def describe(self) -> str:
        who = "the last query row" if self.queries == "last" else f"{_group_text(self.queries)} rows"
        return (
            f"Knockout: at {self._layers_text()}, {who} cannot attend to {_group_text(self.keys)} keys "
            f"({self.phase} forwards)."
        )


def _group_text(group: str | UserMask) -> str:
    if isinstance(group, str):
        return group
    return f"masked ({len(group)} x {len(group[0])} mask, {sum(map(sum, group))} positions)"
