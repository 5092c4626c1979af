"""Model families: per-family adapters and ``describe``, the bundled organism, ``load_model``."""

from eah_interp.models.adapters import (
    ADAPTERS,
    GENERIC,
    Adapter,
    Description,
    adapter_for,
    describe,
    register_adapter,
)
from eah_interp.models.bundle import ORGANISM_THRESHOLD, ModelBundle, load_model
from eah_interp.models.organism import load_organism
from eah_interp.models.validate import ModelCheck, check_model

__all__ = [
    "ADAPTERS",
    "GENERIC",
    "ORGANISM_THRESHOLD",
    "Adapter",
    "Description",
    "ModelCheck",
    "ModelBundle",
    "adapter_for",
    "check_model",
    "describe",
    "load_model",
    "load_organism",
    "register_adapter",
]
