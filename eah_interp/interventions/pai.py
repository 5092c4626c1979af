"""PAI (Liu et al., ECCV 2024, "Paying More Attention to Image"): amplify the last row's image scores.

Official code: LALBJ/PAI@9bbd8bd, ``attention.py:90-94`` (``llama_new_forward``): after the mask is added,
``z[:, :, -1, img] = |z[:, :, -1, img]| * alpha + z[:, :, -1, img]`` in layers ``range(start_layer,
end_layer)`` (``llama_modify``, ``attention.py:120-128``); defaults in ``chair_eval.py:50-55``: ``alpha=0.2``,
``start_layer=2``, ``end_layer=32`` (layers 2..31 of LLaVA-1.5-7B's 32); the image span is
``len(tokens before the image) + 1`` plus 576 (``model_loader.py:121-122``). The edit runs at every forward
(the prompt's last row and every decode step) while ``use_cfg`` is off. Its contrastive text-only logits
(``gamma``) are `eah_interp.hf.ContrastiveLogits`; with them on, the official scripts leave the prompt
forward unedited (``llama_modify`` sets ``use_cfg=True``, ``CFG.py:48-49`` clears it only after the first
token), so the official run of both parts is ``PAI(phase="decode")`` with ``ContrastiveLogits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import Site, entries, key_span, query_rows, visible


def amplify_scores(
    scores: Float[Tensor, "batch heads q k"], selected: Bool[Tensor, "batch heads q k"], alpha: float
) -> Float[Tensor, "batch heads q k"]:
    """``z + alpha * |z|`` on the selected entries, ``z`` elsewhere."""
    return torch.where(selected, scores + alpha * scores.abs(), scores)


@dataclass(frozen=True)
class PAI(Intervention):
    """Add ``alpha * |z|`` to the last query row's post-mask scores on image keys.

    Args:
        alpha: the amplification (official 0.2).
        layers: layers to edit; None = the official 2..31 of 32, scaled to depth (`scaled_range`).
        phase: ``"both"`` (official: the prompt's last row and every decode step), ``"prefill"`` or ``"decode"``.
    """

    alpha: float = 0.2

    point: ClassVar[str] = "scores"
    last_row_only: ClassVar[bool] = True
    default_layers: ClassVar[tuple[int, int] | None] = (2, 32)

    def check(self) -> None:
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ConfigError(f"PAI.alpha must be a number >= 0; got {self.alpha!r}.")

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        selected = entries(query_rows("last", site), key_span("image", site)) & visible(tensor)
        return amplify_scores(tensor, selected, float(self.alpha)), count(selected)

    def describe(self) -> str:
        return (
            f"PAI: at {self._layers_text()}, add {self.alpha:g} * |score| to the last query row's post-mask "
            f"scores on image keys ({self.phase} forwards)."
        )
