"""eah-interp: vision sinks, head statistics and EAH attention broadcast for LVLMs.

The core is pure tensor functions (`sink_scores`, `detect_sinks`, `broadcast_heads`, `HeadStats`);
backends (`eah_interp.hf`, `eah_interp.nnsight`, `eah_interp.lens`) apply them to models.
"""

from eah_interp.broadcast import broadcast_heads, drop_columns, source_map
from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, apply_eah_to_probs
from eah_interp.errors import (
    AttentionImplementationError,
    ConfigError,
    EAHError,
    HeadIndexError,
    LayerIndexError,
    LayoutError,
    NoImageTokensError,
    UnsupportedModelError,
)
from eah_interp.layout import TokenLayout
from eah_interp.sinks import (
    detect_sinks,
    select_fewest_sink_heads,
    select_source_heads,
    sink_denominator,
    sink_density,
    sink_scores,
)
from eah_interp.stats import STATISTICS, HeadStats, head_statistics

__version__ = "0.1.0"

__all__ = [
    "STATISTICS",
    "AttentionImplementationError",
    "ConfigError",
    "EAHConfig",
    "EAHError",
    "EditRecord",
    "HeadIndexError",
    "HeadStats",
    "LayerIndexError",
    "LayoutError",
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
