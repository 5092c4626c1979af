"""`ResidualEdit`: scale the residual stream and/or add a vector to it (steering) at chosen positions.

The edit point is a decoder layer's residual stream: its input hidden states (``where="input"``, before
the layer's attention; the output of the previous layer) or its output (``where="output"``, after its
MLP). Within one layer the edit points run in this order: ``residual_input``, then the attention call's
points (`eah_interp.dispatch.EDIT_POINTS`), then ``residual_output``.

The hidden states are ``[batch, q, d]`` with ``q`` the positions of this forward (the whole prompt in a
prefill, the new token at a decode step); a position is selected by a key span of the layout
(`eah_interp.interventions.selectors.SPANS`, absolute positions) or ``"last"`` (the forward's last
position). At a decode step only the new token's hidden state exists: the KV cache holds keys and
values computed from the prompt's hidden states as they were, edited or not, in the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention
from eah_interp.interventions.selectors import Site, UserMask, as_group, check_choice, group_keys, span_text

WHERE = ("input", "output")


def positions_mask(positions: str | UserMask, site: Site) -> Bool[Tensor, "batch q"]:
    """The selected positions among the ``q`` positions of this forward (the last ``q`` of ``k``), real only."""
    real = site.layout.attention_mask[:, site.k_len - site.q_len :]
    if positions == "last":
        last = torch.zeros_like(real)
        last[:, -1] = True
        return real & last
    return group_keys(positions, site)[:, site.k_len - site.q_len :]


def edit_hidden(
    hidden: Float[Tensor, "batch q d"], selected: Bool[Tensor, "batch q"], scale: float, add: Tensor | None
) -> Float[Tensor, "batch q d"]:
    """``h * scale + add`` at the selected positions, ``h`` elsewhere."""
    new = hidden * scale if scale != 1 else hidden
    if add is not None:
        new = new + add.to(hidden.dtype)
    return torch.where(selected[..., None], new, hidden)


@dataclass(frozen=True)
class ResidualEdit(Intervention):
    """Replace a decoder layer's input or output hidden state ``h`` by ``h * scale + add`` at chosen positions.

    Args:
        layers: decoder layers (required: a residual edit has no method default).
        where: ``"input"`` (before the layer) or ``"output"`` (after it).
        positions: a position group (`SPANS`: the layout's groups, e.g. ``"image"``, ``"question"``,
            plus ``"after_image"``; ``"last"`` here is the forward's last position: the prompt's last
            token, each new token), or a ``Bool[batch, prompt length]`` mask of prompt positions (stored as tuples of booleans).
        scale: multiplier of the hidden state (1 = keep).
        add: a vector of the hidden size to add (steering), or None.
        phase: ``"both"``, ``"prefill"`` or ``"decode"``.
    """

    where: str = "output"
    positions: str | UserMask = "all"
    scale: float = 1.0
    add: tuple[float, ...] | None = None

    def check(self) -> None:
        if self.layers is None:
            raise ConfigError("ResidualEdit needs layers=(...): the decoder layers whose residual stream is edited.")
        check_choice("ResidualEdit.where", self.where, WHERE)
        object.__setattr__(self, "positions", as_group(self.positions, "ResidualEdit.positions"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigError(f"ResidualEdit.scale must be a number; got {self.scale!r}.")
        if self.add is not None:
            add = self.add.detach().flatten().tolist() if isinstance(self.add, Tensor) else list(self.add)
            if not add or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in add):
                raise ConfigError("ResidualEdit.add must be a 1-D vector of numbers (a tensor, list or tuple).")
            object.__setattr__(self, "add", tuple(float(x) for x in add))
        if self.scale == 1 and self.add is None:
            raise ConfigError("ResidualEdit changes nothing: pass add=<vector> (steering) and/or scale != 1.")

    @property
    def point(self) -> str:  # type: ignore[override]
        return f"residual_{self.where}"

    @classmethod
    def steer(cls, direction: Any, alpha: float, layers: Any, **kwargs: Any) -> ResidualEdit:
        """Add ``alpha * direction`` (a vector of the hidden size) to the residual stream of ``layers``."""
        vector = torch.as_tensor(direction, dtype=torch.float64).flatten() * float(alpha)
        return cls(layers=layers, add=tuple(vector.tolist()), **kwargs)

    def validate_for(
        self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        super().validate_for(n_layers, n_heads)
        if self.add is not None and hidden_size and len(self.add) != hidden_size:
            raise ConfigError(
                f"ResidualEdit.add has {len(self.add)} entries but the language model's hidden size is {hidden_size}."
            )

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        if self.add is not None and len(self.add) != tensor.shape[-1]:
            raise ConfigError(
                f"ResidualEdit.add has {len(self.add)} entries but the hidden states have size {tensor.shape[-1]}."
            )
        selected = positions_mask(self.positions, site).to(tensor.device)
        add = None if self.add is None else torch.tensor(self.add, dtype=torch.float32, device=tensor.device)
        return edit_hidden(tensor, selected, float(self.scale), add), int(selected.sum()) * tensor.shape[-1]

    def describe(self) -> str:
        parts = ([f"multiply by {self.scale:g}"] if self.scale != 1 else []) + (
            [f"add a vector of norm {float(torch.tensor(self.add).norm()):.3g}"] if self.add is not None else []
        )
        return (
            f"ResidualEdit: at the {self.where} of layers {list(self.layers or ())}, {' and '.join(parts)} at "
            f"{span_text(self.positions)} positions ({self.phase} forwards)."
        )
