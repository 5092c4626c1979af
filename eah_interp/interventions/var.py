"""VAR, visual attention redistribution (Kang et al., ICLR 2025, "See What You Are Told").

Sinks are prompt tokens whose RMS-normalised input hidden state exceeds ``tau`` in the model's sink
dimensions (`eah_interp.sinks.massive_activation_sinks`). In an image-centric head (share of its image
attention on visual sinks <= ``rho`` and image attention >= ``summ``) each query row after the image
gives up a fraction ``1 - p`` of its attention on every sink (image or text) and hands that mass to the
non-sink image tokens in proportion to their attention.

Official code: MICV-yonsei/VisAttnSink@98e62d6: ``src/logic/logic.py`` (``LogicEngine.activate``: ``tau=20,
rho=0.5, summ=0.2, p=0.6``, sinks from layer 2 on: ``set_sink_select_layers`` takes ``range(n)[2:]``;
``DimProspector``, ``HeadFork``, ``VARProcessor.attn_redist``), ``src/logic/constants.py`` (``DIM_SINK``:
LLaMA-2-7B ``[2533, 1415]``, 13B ``[2100, 4743]``), ``src/model/llava.py`` (sinks found on the prompt only,
from each decoder layer's input; redistribution after the softmax), ``A_exps/lv1.5_7b.yml``.

Layers: the default is what the shipped code does, layers ``2 .. n - 1``, **the last layer included**.
``A_exps/lv1.5_7b.yml:18`` sets ``except_last_layer: 1`` and ``src/inference.py:74`` passes it to
``LogicEngine.activate``, which stores it on ``LogicEngine`` (``logic.py:46``); but ``VARProcessor``
declares its own ``except_last_layer = False`` (``logic.py:148``), the attribute the check in
``attn_redist`` reads (``logic.py:169``), and ``VARProcessor.config_last_layer`` is never called: the
check never fires. ``VAR(except_last_layer=True)`` gives the YAML's intent (layers ``2 .. n - 2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from eah_interp.errors import ConfigError
from eah_interp.interventions.base import Intervention, count
from eah_interp.interventions.selectors import Site, key_span, query_rows, rows_after_image
from eah_interp.sinks import massive_activation_sinks


def redistribute(
    probs: Float[Tensor, "batch heads q k"],
    rows: Bool[Tensor, "batch q"],
    image: Bool[Tensor, "batch k"],
    sinks: Bool[Tensor, "batch k"],
    *,
    rho: float,
    summ: float,
    p: float,
) -> tuple[Float[Tensor, "batch heads q k"], Bool[Tensor, "batch heads q"]]:
    """VAR's edit of one layer's probabilities; returns the edited map and the (row, head, query) edited.

    Image-centric entries: ``sum P[vis sinks] / (sum P[image] + n_image * 1e-6) <= rho`` and
    ``sum P[image] >= summ`` (the official ``portion`` and ``summation``), in a row that has a visual
    sink. There every sink's attention is multiplied by ``p`` and ``(1 - p) * sum P[sinks]`` is added to
    the non-sink image tokens in proportion to their attention.
    """
    vis = sinks & image
    image_f, vis_f, sinks_f = (m[:, None, None, :].to(probs.dtype) for m in (image, vis, sinks))
    image_sum = (probs * image_f).sum(-1)
    portion = (probs * vis_f).sum(-1) / (image_sum + image.sum(-1)[:, None, None] * 1e-6)
    others = probs * image_f * (1 - vis_f)  # non-sink image attention
    others_sum = others.sum(-1, keepdim=True)
    chosen = (
        (portion <= rho) & (image_sum >= summ) & rows[:, None, :] & vis.any(-1)[:, None, None]
        & (others_sum[..., 0] > 0)
    )
    budget = (1 - p) * (probs * sinks_f).sum(-1, keepdim=True)
    edited = probs * (1 - (1 - p) * sinks_f) + budget * others / others_sum.clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(chosen[..., None], edited, probs), chosen


@dataclass(frozen=True)
class VAR(Intervention):
    """Move attention from massive-activation sinks to the other image tokens in image-centric heads.

    Args:
        dims: the model's sink dimensions of the hidden state (required; model-specific: `llava15_7b` and
            `llava15_13b` carry the official ones).
        tau: sink threshold on the RMS-normalised hidden state (20).
        rho: image-centric heads give at most this share of their image attention to visual sinks (0.5).
        summ: ... and at least this much attention to the image (0.2).
        p: the fraction of sink attention kept (0.6).
        layers: None = the shipped code's rule on any depth: layers 2 .. n - 1 (from layer 2, the last layer
            included; see the module docstring).
        phase: ``"both"`` (official), ``"prefill"`` or ``"decode"``.
        except_last_layer: skip the model's last layer (the intent of the official YAML's
            ``except_last_layer: 1``, which the shipped code never applies): layers 2 .. n - 2 by default,
            and the last layer dropped from explicit ``layers``.
    """

    dims: tuple[int, ...] = ()
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    p: float = 0.6
    except_last_layer: bool = False

    point: ClassVar[str] = "probs"
    reads_hidden: ClassVar[bool] = True

    @classmethod
    def llava15_7b(cls, **overrides: object) -> VAR:
        """The official settings for LLaVA-1.5-7B (LLaMA-2-7B sink dims 2533 and 1415)."""
        return cls(**{"dims": (2533, 1415), **overrides})  # type: ignore[arg-type]

    @classmethod
    def llava15_13b(cls, **overrides: object) -> VAR:
        """The official settings for LLaVA-1.5-13B (LLaMA-2-13B sink dims 2100 and 4743)."""
        return cls(**{"dims": (2100, 4743), **overrides})  # type: ignore[arg-type]

    def check(self) -> None:
        dims = tuple(int(d) for d in self.dims)
        if not dims or any(d < 0 for d in dims):
            raise ConfigError(
                "VAR needs the model's sink dimensions (its massive-activation dimensions, model-specific): "
                "VAR(dims=(2533, 1415)) in Python, var(dims=[2533,1415]) in a spec (LLaVA-1.5-7B; the presets "
                "var-llava15-7b and var-llava15-13b carry the official ones). For another model, find them with "
                "eah_interp.sinks.massive_dims(hidden_states) on a prompt and check them with `eah-interp scan "
                "--model PATH --images DIR --sink-dims D1,D2` (its table shows the massive-activation sinks per "
                "layer beside EAH's)."
            )
        object.__setattr__(self, "dims", dims)
        for name, lo, hi in (("rho", 0, 1), ("summ", 0, 1), ("p", 0, 1)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"VAR.{name} must be in [{lo}, {hi}]; got {value!r}.")
        if not isinstance(self.tau, (int, float)) or self.tau < 0:
            raise ConfigError(f"VAR.tau must be a number >= 0; got {self.tau!r}.")
        if not isinstance(self.except_last_layer, bool):
            raise ConfigError(f"VAR.except_last_layer must be True or False; got {self.except_last_layer!r}.")

    def layers_for(self, n_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            layers = tuple(self.layers)
        else:  # the shipped code: sinks (and so redistribution) from layer 2 to the last layer
            layers = tuple(range(min(2, n_layers - 1), n_layers))
        if self.except_last_layer:
            layers = tuple(layer for layer in layers if layer != n_layers - 1)
        return layers

    def tail_rows(self, site: Site) -> int | None:
        return rows_after_image(site)  # only rows after the image are edited

    def hidden_flags(self, hidden: Tensor) -> Tensor:
        """The massive-activation sinks of a layer's input hidden states (`massive_activation_sinks`)."""
        return massive_activation_sinks(hidden, self.dims, self.tau)

    def edit(self, tensor: Tensor, site: Site) -> tuple[Tensor, int]:
        sinks = site.key_flags
        if sinks is None:
            raise ConfigError("VAR.edit needs site.key_flags: the sinks of the call's keys (VAR.hidden_flags).")
        rows = query_rows("after_image", site)
        edited, chosen = redistribute(
            tensor, rows, key_span("image", site), sinks, rho=float(self.rho), summ=float(self.summ), p=float(self.p)
        )
        return edited, count(chosen)

    def describe(self) -> str:
        layers = f"layers {list(self.layers)}" if self.layers is not None else "layers 2..n-1"
        if self.except_last_layer:
            layers += " except the last layer"
        return (
            f"VAR: at {layers}, sinks = tokens with |RMS-normalised hidden| > {self.tau:g} in dims {list(self.dims)}; "
            f"in heads whose visual-sink share of image attention is <= {self.rho:g} and image attention >= "
            f"{self.summ:g}, rows after the image keep {self.p:g} of their sink attention and give the rest to the "
            f"other image tokens ({self.phase} forwards)."
        )
