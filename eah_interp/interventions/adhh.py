"""AD-HH, adaptive deactivation of hallucination heads (Yang et al., ICLR 2025, "Understanding and
Mitigating Hallucinations in Large Vision-Language Models via Modular Attribution and Intervention").

Official code: TianyunYoung/Hallucination-Attribution, ``LLaVA/llava/model/language_model/modeling_llama.py``
(the attention forward, ``adaptive_deactivate``): after the softmax, for each listed head of the layer,
if the last query row's attention summed over the keys after the image is ``>= adhh_threshold``, those
entries are set to 0 (the row is not renormalised). ``LLaVA/bash_scripts/decoding.sh`` runs it with
``adhh_threshold=0.4``; ``LLaVA/eval_scripts/eval_caption_adhh.py`` holds the 20 (layer, head) pairs of
LLaVA-1.5-7B (`ADHH.llava15_7b`) and hard-codes the image span (``img_start_pos = 35``,
``img_length = 576``); here the keys after the image come from the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from eah_interp.errors import ConfigError, HeadIndexError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import Site, entries, key_span, query_rows


@dataclass(frozen=True)
class HeadList(Intervention, register=False):
    """Base of the methods that edit listed ``(layer, head)`` pairs: their layers are those of the heads."""

    heads: tuple[tuple[int, int], ...] = ()

    def check(self) -> None:
        name = type(self).__name__
        if self.layers is not None:
            raise ConfigError(f"{name} takes its layers from heads=((layer, head), ...); leave layers=None.")
        object.__setattr__(self, "heads", as_heads(self.heads, name))

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.heads}))

    def validate_for(
        self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, hidden_size: int | None = None
    ) -> None:
        super().validate_for(n_layers, n_heads, n_kv_heads, hidden_size)
        name = type(self).__name__
        bad = [pair for pair in self.heads if pair[1] >= n_heads]
        if bad:
            raise HeadIndexError(f"{name}: heads {bad} out of range: the layers have {n_heads} heads (0..{n_heads - 1}).")

    def heads_of(self, layer: int) -> list[int]:
        """The listed heads of one layer."""
        return [h for at, h in self.heads if at == layer]


def as_heads(heads: object, what: str) -> tuple[tuple[int, int], ...]:
    """Normalise ``heads``: an iterable of ``(layer, head)`` pairs of non-negative ints, no duplicates."""
    try:
        pairs = tuple((int(layer), int(head)) for layer, head in heads)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what}.heads must be (layer, head) pairs; got {heads!r}.") from err
    if not pairs or any(x < 0 for pair in pairs for x in pair):
        raise ConfigError(f"{what}.heads must be non-empty (layer, head) pairs >= 0; got {heads!r}.")
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"{what}.heads has duplicates: {pairs!r}.")
    return pairs


#: LLaVA-1.5-7B's hallucination heads, (layer, head), from the official ``eval_caption_adhh.py``.
LLAVA15_7B_HEADS = (
    (16, 29), (26, 9), (13, 31), (15, 10), (20, 12), (30, 9), (19, 18), (17, 0), (18, 9), (26, 28),
    (19, 27), (18, 26), (15, 25), (14, 16), (31, 26), (15, 24), (31, 3), (22, 20), (27, 29), (17, 28),
)


@dataclass(frozen=True)
class ADHH(HeadList):
    """Zero the last row's attention to the text after the image in listed heads when it reaches ``tau``.

    Args:
        heads: ``(layer, head)`` pairs (the hallucination heads; `llava15_7b` has the official list).
        tau: the text-attention threshold (official 0.4 for LLaVA-1.5).
        phase: ``"both"``, ``"prefill"`` or ``"decode"``.
    """

    tau: float = 0.4

    point: ClassVar[str] = "probs"
    last_row_only: ClassVar[bool] = True

    @classmethod
    def llava15_7b(cls, **overrides: object) -> ADHH:
        """The official head list and threshold for LLaVA-1.5-7B (``eval_caption_adhh.py``, ``decoding.sh``)."""
        return cls(**{"heads": LLAVA15_7B_HEADS, "tau": 0.4, **overrides})  # type: ignore[arg-type]

    def check(self) -> None:
        super().check()
        if not isinstance(self.tau, (int, float)) or not 0 <= self.tau <= 1:
            raise ConfigError(f"ADHH.tau must be in [0, 1]; got {self.tau!r}.")

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        chosen = torch.zeros(tensor.shape[1], dtype=torch.bool, device=tensor.device)
        chosen[self.heads_of(site.layer)] = True
        text = entries(query_rows("last", site), key_span("after_image", site))  # [b, 1, q, k]
        mass = (tensor * text).sum(-1, keepdim=True)  # [b, h, q, 1]
        selected = text & (mass >= self.tau) & chosen[None, :, None, None]
        return tensor.masked_fill(selected, 0.0), count(selected)

    def describe(self) -> str:
        return (
            f"ADHH: in heads {[list(p) for p in self.heads]}, zero the last query row's attention to text after "
            f"the image when that mass is >= {self.tau:g} ({self.phase} forwards)."
        )
