"""Middle-layer image-attention boost (Jiang et al., CVPR 2025, "Devils in Middle Layers").

Official code: ZhangqiJiang07/middle_layers_indicating_hallucinations@a0622a9, ``modify_attention.py``
(``llama_new_forward``, lines 83-87, ``aggregation == "mean"``, the only aggregation at HEAD): after the
mask is added, ``z[:, :, -1, img] += alpha * mean_heads |z[:, :, -1, img]|``. ``chair_eval.py:44-47``
defaults ``--alpha 0.5``, ``--aggregation mean``, ``--guide-range 5,18``; ``chair_eval.py:73-74`` makes the
range inclusive, so ``llama_head_guide`` (``modify_attention.py:113-121``) edits ``range(5, 19)``: layers
5..18 of 32, as the README's command (``README.md:74``) and the logged run
``log/llava-1.5/chair_eval_500images_mean_head_guided_alpha0.5_layers_5-19_tokens_512.jsonl``. The first
commit (bc5d76e) named the weight ``beta`` and also had a ``topK`` aggregation; both are gone at HEAD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import Site, entries, key_span, query_rows, visible


@dataclass(frozen=True)
class MiddleLayerBoost(Intervention):
    """Add ``alpha * mean over heads of |z|`` to the last query row's post-mask scores on image keys.

    Args:
        alpha: the boost (the official ``--alpha``, 0.5).
        layers: None = the official 5..18 of 32, scaled to depth (`scaled_range`).
        phase: ``"both"`` (official), ``"prefill"`` or ``"decode"``.
    """

    alpha: float = 0.5

    point: ClassVar[str] = "scores"
    last_row_only: ClassVar[bool] = True
    default_layers: ClassVar[tuple[int, int] | None] = (5, 19)

    def check(self) -> None:
        if not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ConfigError(f"MiddleLayerBoost.alpha must be a number >= 0; got {self.alpha!r}.")

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        selected = entries(query_rows("last", site), key_span("image", site)) & visible(tensor)
        mean_abs = tensor.abs().mean(dim=1, keepdim=True)  # [b, 1, q, k]: the mean over heads
        return torch.where(selected, tensor + float(self.alpha) * mean_abs, tensor), count(selected)

    def describe(self) -> str:
        return (
            f"MiddleLayerBoost: at {self._layers_text()}, add {self.alpha:g} * (mean over heads of |score|) to "
            f"the last query row's post-mask scores on image keys ({self.phase} forwards)."
        )
