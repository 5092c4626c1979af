"""Resumable results: a JSONL log tied to its arguments, atomic file writes, and recovery after a kill.

Long runs (`eah_interp.patching.sweep`, the evaluation runner, the studies) append each finished unit
to a log as it completes, so an interrupted run loses at most the unit in flight. Rerun with the same
arguments, the log says what is done; with other arguments, it refuses (a log mixes nothing).

File format (UTF-8 JSON lines):

* the header ``{"kind": ..., "arguments": {...}, ...extra}``: line 1 of the log, or its own JSON file
  (``header=``: several logs under one header, e.g. the shards of one evaluation and its ``run.json``),
  written atomically (`atomic_write`: a temporary file, then ``os.replace``);
* one JSON object per finished unit, appended with a single ``write`` and ``fsync``. A line cut off
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

__all__ = ["ResumableLog", "atomic_write", "read_items", "recover_items", "tensor_digest"]


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a partial one.

    The temporary file is named for this process, so processes writing one file at once (the ranks of a
    launched run) each replace it whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        header: the header's own JSON file, or None (line 1 of ``path``). Several logs may share one.
    """

    path: Path
    kind: str
    arguments: dict[str, Any]
    header: Path | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.header = None if self.header is None else Path(self.header)
        # normalise through JSON so that tuples and lists compare equal to what a header holds
        self.arguments = json.loads(json.dumps(self.arguments))

    def open(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The header and finished records of an existing log (``(None, [])`` if there is none).

        Raises:
            ConfigError: the file is not a log of this kind, or was written with other arguments
                (the message lists which).
        """
        records = recover_items(self.path)
        if self.header is None:
            header, records = (records[0], records[1:]) if records else (None, [])
        else:
            header = json.loads(self.header.read_text()) if self.header.exists() else None
            if header is None and records:
                raise ConfigError(f"{self.path} holds results but their header {self.header} is missing: pass "
                                  "another path, or delete the file to start over.")
        if header is None:
            return None, []
        a = "an" if self.kind[:1] in "aeiou" else "a"
        if header.get("kind") != self.kind or "arguments" not in header:
            where = "its first line" if self.header is None else self.header
            raise ConfigError(f"{self.path} is not {a} {self.kind} log ({where} is not its header): pass another path.")
        saved = header["arguments"]
        different = sorted(k for k in set(saved) | set(self.arguments) if saved.get(k) != self.arguments.get(k))
        if different:
            detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {self.arguments.get(k)!r}" for k in different[:4])
            more = f"; and {', '.join(different[4:])}" if len(different) > 4 else ""
            files = self.path if self.header is None else f"{self.path} and {self.header}"
            raise ConfigError(
                f"{self.path} holds {a} {self.kind} run with other arguments ({detail}{more}). Resuming would mix two "
                f"runs: pass a new path, or delete {files} to start over."
            )
        return header, records

    def start(self, **extra: Any) -> None:
        """Write the header (kind, arguments and ``extra`` values), atomically.

        A header on line 1 replaces the whole log (a new run); a header file is replaced alone (the records
        stay: a resumed run may record more, e.g. new arms).
        """
        header = {"kind": self.kind, "arguments": self.arguments, **extra}
        if self.header is None:
            atomic_write(self.path, (json.dumps(header) + "\n").encode())
        else:
            atomic_write(self.header, json.dumps(header, indent=1, default=str).encode())

    def append(self, *records: dict[str, Any]) -> None:
        """Append finished units, one line each (one ``write``, flushed and fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
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
