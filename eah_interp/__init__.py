"""eah-interp: vision sinks, head statistics and EAH attention broadcast for LVLMs.

The core is pure tensor functions (`sink_scores`, `detect_sinks`, `broadcast_heads`, `HeadStats`);
interventions (`EAH` and the others in `eah_interp.interventions`) are frozen dataclasses; backends
(`eah_interp.hf`, `eah_interp.nnsight`, `eah_interp.transformer_lens`) apply them to models with one
verb each (`intervene`, `record_attention`). The backends and `eah_interp.patching` are imported on first
attribute access (``import eah_interp; eah_interp.hf.eah(...)``), so ``import eah_interp`` stays light.
"""

import importlib

from eah_interp.broadcast import broadcast_heads, drop_columns, source_map
from eah_interp.edit import EditRecord, apply_eah_to_probs
from eah_interp.errors import (
    AttentionImplementationError,
    ConfigError,
    EAHError,
    HeadIndexError,
    LayerIndexError,
    LayoutError,
    ModelLoadError,
    NoImageTokensError,
    UnsupportedModelError,
)
from eah_interp.head_stats import STATISTICS, HeadStats, head_statistics
from eah_interp.interventions import EAH
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    OFFICIAL_THRESHOLD,
    detect_sinks,
    select_fewest_sink_heads,
    select_source_heads,
    sink_denominator,
    sink_density,
    sink_scores,
)

__version__ = "0.1.0"

__all__ = [
    "EAH",
    "OFFICIAL_THRESHOLD",
    "STATISTICS",
    "AttentionImplementationError",
    "ConfigError",
    "EAHError",
    "EditRecord",
    "HeadIndexError",
    "HeadStats",
    "LayerIndexError",
    "LayoutError",
    "ModelLoadError",
    "NoImageTokensError",
    "TokenLayout",
    "UnsupportedModelError",
    "apply_eah_to_probs",
    "broadcast_heads",
    "detect_sinks",
    "drop_columns",
    "head_statistics",
    "select_fewest_sink_heads",
    "select_source_heads",
    "sink_density",
    "sink_denominator",
    "sink_scores",
    "source_map",
]

#: Submodules reachable as attributes without an explicit import (loaded on first access).
_LAZY_SUBMODULES = ("hf", "nnsight", "transformer_lens", "patching")


def __getattr__(name: str):
    """``eah_interp.hf`` / ``.nnsight`` / ``.transformer_lens`` / ``.patching``: import the submodule on first access."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")  # the import also binds it as an attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
