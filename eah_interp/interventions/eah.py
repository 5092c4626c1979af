"""EAH as one intervention among others: `EAH` is an `EAHConfig` that `hf.intervene` stacks with the rest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from eah_interp.config import EAHConfig
from eah_interp.errors import ConfigError
from eah_interp.interventions import base


@dataclass(frozen=True)
class EAH(EAHConfig):
    """The EAH probability edit (every field and preset of `EAHConfig`: ``EAH.paper()``, ``EAH(layers=(1,))``).

    ``hf.intervene(model, [EAH.paper(), PAI()])`` runs it like ``hf.eah`` (map-free where it can); a plain
    `EAHConfig` is accepted in the list too.
    """

    point: ClassVar[str] = "probs"
    last_row_only: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"method": "EAH", **super().to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EAH:
        d = {k: v for k, v in d.items() if k != "method"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown EAH fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**d)


base._METHODS["EAH"] = EAH  # type: ignore[assignment]
