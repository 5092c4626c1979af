"""Model families: the bundled organism, per-family adapters and ``describe``."""

from eah_interp.models.bundle import ORGANISM_THRESHOLD, ModelBundle, load_model
from eah_interp.models.organism import load_organism

__all__ = ["ORGANISM_THRESHOLD", "ModelBundle", "load_model", "load_organism"]
