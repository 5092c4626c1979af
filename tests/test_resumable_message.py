"""The refusal of a resumable log written with other arguments names each differing argument once."""

from __future__ import annotations

import pytest

from eah_interp.errors import ConfigError
from eah_interp.resumable import ResumableLog


def test_refusal_names_each_argument_once(tmp_path):
    path = tmp_path / "sweep.jsonl"
    ResumableLog(path, "patching sweep", {"layers": [0, 1], "sites": ["resid"]}).start()
    with pytest.raises(ConfigError) as caught:
        ResumableLog(path, "patching sweep", {"layers": [1], "sites": ["resid"]}).open()
    message = str(caught.value)
    assert "other arguments (layers: saved [0, 1], now [1])" in message
    assert message.count("layers") == 1
    many = {f"a{i}": i + 1 for i in range(6)}
    ResumableLog(path, "patching sweep", many).start()
    with pytest.raises(ConfigError, match=r"a3: saved 4, now -4; and a4, a5\)"):
        ResumableLog(path, "patching sweep", {k: -v for k, v in many.items()}).open()
