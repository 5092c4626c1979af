"""Model families: the bundled organism, per-family adapters and ``describe``."""

from eah_interp.models.organism import load_organism

__all__ = ["load_organism"]
