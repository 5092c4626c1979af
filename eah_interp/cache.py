"""Where eah-interp keeps what it builds once per machine (converted weights, the native kernel)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EAH_INTERP_CACHE`` if set, else the user cache directory (``~/.cache/eah-interp`` on Linux)."""
    env = os.environ.get("EAH_INTERP_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("eah-interp"))
