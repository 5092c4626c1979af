"""VAF, "visual amplification fusion" (ClearSight, Yin et al., CVPR 2025): rescale pre-mask scores.

Official code: ustc-hyin/ClearSight, ``visaug/inference/AttnAdapter.py``: before the mask is added,
rows after the image (all rows at a decode step) get their image-key scores multiplied by ``enh_para``
and their system-prompt scores (keys before the image) by ``sup_para``; ``visaug/inference/infer_pope.py``
installs it in layers ``8 < i < 15`` (9..14 of 32) and ``infer_pope.sh`` passes ``--enh-para 1.15
--sup-para 0.95``. The code hard-codes ``SYS_LEN = 35`` and ``IMG_LEN = 576``; here the spans come from
the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import Site, entries, key_span, query_rows, rows_after_image


@dataclass(frozen=True)
class VAF(Intervention):
    """Multiply pre-mask scores of rows after the image: image keys by ``image_scale``, system keys by ``system_scale``.

    Args:
        image_scale: the official ``enh_para`` (1.15).
        system_scale: the official ``sup_para`` (0.95).
        layers: None = the official 9..14 of 32, scaled to depth (`scaled_range`).
        phase: ``"both"`` (official), ``"prefill"`` or ``"decode"``.
    """

    image_scale: float = 1.15
    system_scale: float = 0.95

    point: ClassVar[str] = "scores_premask"
    default_layers: ClassVar[tuple[int, int] | None] = (9, 15)

    def check(self) -> None:
        for name in ("image_scale", "system_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"VAF.{name} must be a number >= 0; got {value!r}.")

    def tail_rows(self, site: Site) -> int | None:
        return rows_after_image(site)  # only rows after the image are edited

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        rows = query_rows("after_image", site)
        image = entries(rows, key_span("image", site))
        system = entries(rows, key_span("system", site))
        edited = torch.where(image, tensor * float(self.image_scale), tensor)
        edited = torch.where(system, edited * float(self.system_scale), edited)
        heads = tensor.shape[1]
        return edited, heads * (count(image) + count(system))

    def describe(self) -> str:
        return (
            f"VAF: at {self._layers_text()}, multiply the pre-mask scores of query rows after the image by "
            f"{self.image_scale:g} on image keys and by {self.system_scale:g} on system-prompt keys ({self.phase} forwards)."
        )
