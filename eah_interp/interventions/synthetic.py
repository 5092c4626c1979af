"""`SyntheticMap`: replace every head's attention map with a synthetic one (controls for EAH's broadcast).

A pure previous-token map and a uniform causal map, built from the layout (`previous_token_map`,
`uniform_map`): does broadcasting a local pattern reproduce EAH's effect, does any homogenisation of the
heads? Used by the explain study (`studies.explain`); the column sums these maps give are
`eah_interp.sinks.null_column_sums` (the sink null models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from eah_interp.interventions.base import Intervention
from eah_interp.interventions.selectors import Site, check_choice
from eah_interp.layout import TokenLayout
from eah_interp.sinks import query_positions

#: The synthetic maps `SyntheticMap` can broadcast.
PATTERNS = ("previous_token", "uniform")


@dataclass(frozen=True)
class SyntheticMap(Intervention):
    """Replace every head's attention map at ``layers`` with a synthetic map (a control for EAH's broadcast).

    ``pattern="previous_token"``: each real query row at position ``i`` puts probability 1 on position ``i - 1``
    (a row's first real token on itself). ``pattern="uniform"``: each real row spreads its weight evenly over
    the real keys up to itself. Padding rows are left as they are. EAH copies one head's map onto every head;
    if that head is a previous-token head, broadcasting the pure previous-token map should reproduce EAH's
    effect, and the uniform map tells whether any homogenisation of the heads does the same.

    Args:
        pattern: one of `PATTERNS`.
        layers: decoder layers to edit.
        phase: ``"prefill"`` (EAH's default: the prompt forward), ``"decode"`` or ``"both"``.
    """

    pattern: str = "previous_token"
    layers: tuple[int, ...] | None = field(default=(1,), kw_only=True)
    phase: str = field(default="prefill", kw_only=True)

    point: ClassVar[str] = "probs"

    def check(self) -> None:
        check_choice("SyntheticMap.pattern", self.pattern, PATTERNS)

    def edit(self, tensor: Float[Tensor, "batch heads q k"], site: Site) -> tuple[Tensor, int]:
        if self.pattern == "previous_token":
            target = previous_token_map(site.layout, site.q_len)
        else:
            target = uniform_map(site.layout)[:, site.k_len - site.q_len :]
        target = target.to(tensor.device, tensor.dtype)
        real = site.layout.attention_mask.to(tensor.device)[:, query_positions(site.q_len, site.k_len, tensor.device)]
        out = torch.where(real[:, None, :, None], target[:, None], tensor)
        return out, int((out != tensor).sum())

    def describe(self) -> str:
        what = "attends with weight 1 to the previous token" if self.pattern == "previous_token" else (
            "attends uniformly to every real key up to itself")
        return f"SyntheticMap: at {self._layers_text()}, every head {what} ({self.phase} forwards)."


def previous_token_map(layout: TokenLayout, q_len: int | None = None) -> Float[Tensor, "batch q k"]:
    """The pure previous-token attention map of a layout: row ``i`` -> key ``i - 1`` (first real row -> itself).

    Args:
        layout: the layout of the ``k`` key positions.
        q_len: query rows (the last ``q_len`` positions; default: all ``k``).

    Returns:
        ``Float[batch, q, k]``; padding rows are all zero.
    """
    k = layout.seq_len
    q = k if q_len is None else q_len
    qpos = query_positions(q, k, layout.attention_mask.device)
    first = layout.first_real_position()  # [b]
    target = torch.where(qpos[None, :] > first[:, None], qpos[None, :] - 1, qpos[None, :])  # [b, q]
    out = torch.nn.functional.one_hot(target, k).float()
    return out * layout.attention_mask[:, qpos, None].float()


def uniform_map(layout: TokenLayout) -> Float[Tensor, "batch k k"]:
    """The uniform causal attention map of a layout: row ``i`` spreads weight evenly over the real keys ``<= i``."""
    k = layout.seq_len
    real = layout.attention_mask.float()
    causal = torch.tril(torch.ones(k, k, device=real.device))
    allowed = causal[None] * real[:, None, :] * real[:, :, None]
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
