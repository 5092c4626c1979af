"""A resumable results log: one JSONL file, a header with the arguments, then one line per finished unit.

Long sweeps (`eah_interp.patching.sweep`, and any other loop over independent units of work) append
each finished unit to the log as it completes, so an interrupted run loses at most the unit in flight.
Rerun with the same arguments, the log says what is done; with other arguments, it refuses (a log
mixes nothing).

File format (UTF-8 JSON lines):

* line 1, the header: ``{"kind": ..., "arguments": {...}, ...extra}``, written atomically (a temporary
  file, then ``os.replace``) before any record;
* then one JSON object per finished unit, appended with a single ``write`` and ``fsync``. A line cut off
  by a kill (no final newline, not JSON) is the unit that was in flight: it is dropped on resume and
  the file truncated to its last complete line (`recover_items`).

Example:
    >>> log = ResumableLog(path, kind="patching sweep", arguments={"layers": [0, 1]})
    >>> header, done = log.open()            # (None, []) for a new log
    >>> log.start(baseline=[0.5, 0.2])        # writes the header
    >>> log.append({"key": [0], "value": 1.0})
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from eah_interp.errors import ConfigError

__all__ = ["ResumableLog", "tensor_digest"]


def tensor_digest(tensor: Tensor) -> str:
    """A short SHA-256 of a tensor's shape, dtype and bytes (to tell two inputs apart in a header)."""
    data = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(data.shape)} {data.dtype}".encode())
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ResumableLog:
    """An append-only JSONL results log tied to the arguments that produced it.

    Args:
        path: the log file (its folder is created).
        kind: what wrote it (e.g. ``"patching sweep"``); a log of another kind is refused.
        arguments: JSON-ready arguments of the run; a log written with other arguments is refused.
    """

    path: Path
    kind: str
    arguments: dict[str, Any]

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        # normalise through JSON so that tuples and lists compare equal to what a header holds
        self.arguments = json.loads(json.dumps(self.arguments))

    def open(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The header and finished records of an existing log (``(None, [])`` if there is none).

        Raises:
            ConfigError: the file is not a log of this kind, or was written with other arguments
                (the message lists which).
        """
        if not self.path.exists():
            return None, []
        lines = recover_items(self.path)
        if not lines:
            return None, []
        header, records = lines[0], lines[1:]
        if header.get("kind") != self.kind or "arguments" not in header:
            raise ConfigError(
                f"{self.path} is not a {self.kind} log (its first line is not its header): pass another path."
            )
        saved = header["arguments"]
        different = sorted(k for k in set(saved) | set(self.arguments) if saved.get(k) != self.arguments.get(k))
        if different:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.arguments.get(k)!r}" for k in different[:4])
            more = f"; and {', '.join(different[4:])}" if len(different) > 4 else ""
            raise ConfigError(
                f"{self.path} holds a {self.kind} run with other arguments ({detail}{more}). "
                "Resuming would mix two runs: pass a new path, or delete the file to start over."
            )
        return header, records

    def start(self, **extra: Any) -> None:
        """Write the header (kind, arguments and ``extra`` values), atomically, replacing any file."""
        from eah_interp.stats import _atomic_write

        header = {"kind": self.kind, "arguments": self.arguments, **extra}
        _atomic_write(self.path, (json.dumps(header) + "\n").encode())

    def append(self, record: dict[str, Any]) -> None:
        """Append one finished unit as one line (one ``write``, flushed and fsynced)."""
        line = json.dumps(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_items(path: str | Path) -> tuple[list[dict[str, Any]], bool]:
    """The items of a JSONL file, and whether its last line was cut off (a process killed mid-write).

    A cut-off final line (no newline at the end, not valid JSON) is the trace of an append that was
    interrupted: that item was never finished, so it is dropped (and reported). Any other bad line is
    an error.

    Raises:
        ConfigError: a line other than an unfinished last one is not a JSON object.
    """
    text = Path(path).read_text()
    lines = text.split("\n")
    items: list[dict[str, Any]] = []
    cut = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                cut = True
                continue
            raise ConfigError(f"{path}, line {number}, is not JSON ({err}): fix or remove that line.") from err
        if not isinstance(item, dict):
            raise ConfigError(f"{path}, line {number}, is not a JSON object.")
        items.append(item)
    return items, cut


def recover_items(path: str | Path) -> list[dict[str, Any]]:
    """The items of a JSONL file a killed process was appending to, with its cut-off last line removed.

    Call it before appending to the file again on resume: a line cut off by a kill (no newline at the
    end) would otherwise run into the next appended line and corrupt both. The file is truncated to
    its last complete line (in place: what remains is unchanged).

    Returns:
        The complete items (``[]`` if the file does not exist).

    Raises:
        ConfigError: a line other than an unfinished last one is not a JSON object (see `read_items`).
    """
    path = Path(path)
    if not path.exists():
        return []
    items, cut = read_items(path)
    if cut:
        data = path.read_bytes()
        os.truncate(path, data.rfind(b"\n") + 1)
    return items
