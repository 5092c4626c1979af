"""The arms of an experiment: each a name and a list of interventions (none: the baseline), and the default arms."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from eah_interp.errors import ConfigError
from eah_interp.interventions import EAH, Intervention
from eah_interp.interventions.compile import as_interventions
from eah_interp.models.introspect import model_shape


@dataclass(frozen=True)
class Arm:
    """One arm: a name, the interventions it applies through `hf.intervene` (none: the baseline), the beam width.

    Example:
        >>> Arm("eah+pai", (EAH.paper(), PAI()))  # or Arm.from_spec("eah+pai"): the spec text is the name
    """

    name: str
    interventions: tuple[Any, ...] = ()
    num_beams: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", as_interventions(self.interventions))

    @classmethod
    def from_spec(cls, spec: str, *, defaults: dict[str, dict[str, Any]] | None = None, num_beams: int = 1) -> Arm:
        """The arm an intervention spec names (`eah_interp.interventions.parse`); its name is the spec text."""
        from eah_interp.interventions import parse

        return cls(spec.strip(), parse(spec, defaults=defaults), num_beams)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_beams": self.num_beams,
                "interventions": [i.to_dict() for i in self.interventions]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Arm:
        return cls(d["name"], tuple(Intervention.from_dict(i) for i in d.get("interventions") or ()),
                   d.get("num_beams", 1))

    def edits(self, n_layers: int) -> list[dict[str, Any]]:
        """What each intervention edits in a model of ``n_layers`` layers: ``{"method", "layers"}`` (resolved)."""
        return [{"method": type(i).__name__, "layers": list(i.layers_for(n_layers))}
                for i in self.interventions]


def edits_text(edits: list[dict[str, Any]]) -> str:
    """`Arm.edits` as text: ``"EAH at layers 1; PAI at layers 2..29"`` (``"none (baseline)"`` when empty)."""
    def runs(layers: list[int]) -> str:
        spans: list[list[int]] = []
        for layer in sorted(layers):
            if spans and layer == spans[-1][-1] + 1:
                spans[-1].append(layer)
            else:
                spans.append([layer])
        return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in spans)

    return "; ".join(f"{e['method']} at layers {runs(e['layers'])}" for e in edits) or "none (baseline)"


def deep_control_layer(n_layers: int, treatment_layers: Any, shallow_layers: Any = (1,)) -> int:
    """The layer of the deep-layer control: the third-last layer, or the nearest layer that no treatment uses.

    Candidates are the layers deeper than every ``shallow_layers`` entry (the paper's edited layer) that
    no treatment edits; the one closest to ``n_layers - 3`` wins (ties: the deeper). On LLaVA-1.5 (32
    layers, treatments at 1 and 15) that is layer 29; on a 4-layer model (treatments at 1 and 3), layer 2.

    Raises:
        ConfigError: no such layer exists (a model too shallow for a separate deep-layer control).
    """
    used = set(treatment_layers)
    floor = max(shallow_layers, default=-1)
    candidates = [layer for layer in range(n_layers) if layer > floor and layer not in used]
    if not candidates:
        raise ConfigError(
            f"no layer for the deep-layer control: the model has {n_layers} decoder layers and the treatments "
            f"edit {sorted(used)}; a control must edit a layer deeper than {floor} that no treatment edits. "
            "Leave the control out (choose arms with --arm)."
        )
    target = n_layers - 3
    return min(candidates, key=lambda layer: (abs(layer - target), -layer))


class ArmWarning(UserWarning):
    """A default arm changed or left out on this model; ``arm`` names it (the CLI shows the note of the
    arms it runs, and the note of a left-out arm when one asks for it)."""

    def __init__(self, arm: str, message: str) -> None:
        super().__init__(message)
        self.arm = arm


def default_arms(bundle: Any, *, beams: int = 3) -> list[Arm]:
    """Baseline, EAH (paper and reference presets) and the controls that separate the hypotheses.

    Controls: the broadcast from a random head, from the head with the fewest sinks, at a deep layer
    (`deep_control_layer`: never a layer a treatment edits; left out, with a warning, on a model too
    shallow to have one) instead of layer 1, and a sink-free variant (the source map with its sink
    columns removed). Beam search (``beams``) for baseline and EAH-paper. The reference preset edits
    layer 15; on a model with 15 layers or fewer the arm edits its last layer instead, with a warning
    (the report names every arm's layers).
    """
    n_layers = model_shape(bundle.model)[0]
    t = bundle.threshold
    paper = EAH.paper(threshold=t)
    reference = EAH.reference(threshold=t)
    if max(reference.layers) >= n_layers:
        reference = EAH.reference(threshold=t, layers=(n_layers - 1,))
        warnings.warn(ArmWarning("eah_reference", f"eah_reference edits layer {n_layers - 1} (this model's last): the "
                                 f"reference preset's layer 15 does not exist in a model of {n_layers} decoder layers."),
                      stacklevel=2)
    arms = [
        Arm("baseline"),
        Arm("eah_paper", paper),
        Arm("eah_reference", reference),
        Arm("control_random_head", EAH.paper(threshold=t, source="random", seed=0)),
        Arm("control_fewest_sinks", EAH.paper(threshold=t, source="fewest")),
    ]
    try:
        deep = deep_control_layer(n_layers, paper.layers + reference.layers, paper.layers)
        arms.append(Arm("control_deep_layer", EAH.paper(threshold=t, layers=(deep,))))
    except ConfigError as err:
        warnings.warn(ArmWarning("control_deep_layer", f"control_deep_layer left out: {err}"), stacklevel=2)
    arms.append(Arm("control_sink_free", EAH.paper(threshold=t, drop_sinks=True)))
    if beams > 1:
        arms += [Arm(f"baseline_beam{beams}", (), beams), Arm(f"eah_paper_beam{beams}", paper, beams)]
    return arms
