"""Runs past one process: shards of a dataset, resumable per-shard scans, and merging their results.

A run is split into ``N`` shards; shard ``i`` takes the items whose index modulo ``N`` is ``i``
(deterministic, independent of timing). The shard comes from the environment that ``torchrun`` and
``accelerate launch`` set (``RANK`` / ``WORLD_SIZE``), or from ``--shard i/N`` for separate jobs (a SLURM
array). Every shard writes its own resumable checkpoint; merging is a pure function
(`HeadStats.merge`, items by key) that rank 0, or the ``eah-interp merge`` command, runs at the end.

There is no scheduler here: the launcher starts and stops the processes; torch.distributed (gloo) is
used for one thing only, a barrier so that rank 0 merges after every rank has finished.

Files in a scan's output folder:

* ``scan_checkpoint.safetensors``: the whole scan's `HeadStats` (a 1-process run, or the merge of the
  shards), with the scan's config and the names of the counted images in its metadata;
* ``scan_checkpoint.shard-<i>-of-<N>.safetensors``: the same for shard ``i`` of ``N``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from eah_interp.errors import ConfigError
from eah_interp.head_stats import HeadStats
from eah_interp.resumable import atomic_write, read_items

#: The whole scan's checkpoint in its output folder (1 process, or the merge of all shards).
SCAN_CHECKPOINT = "scan_checkpoint.safetensors"
#: A shard's checkpoint: ``SHARD_CHECKPOINT.format(index=i, count=N)``.
SHARD_CHECKPOINT = "scan_checkpoint.shard-{index}-of-{count}.safetensors"
_SHARD_FILE = re.compile(r"^scan_checkpoint\.shard-(\d+)-of-(\d+)\.safetensors$")
#: The key fields of one evaluation item (``items.jsonl``): one line per (condition, task, item, question).
ITEM_KEY = ("condition", "task", "item", "question")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Which part of a dataset this process works on: the items whose index modulo ``count`` is ``index``.

    Attributes:
        index: this shard's number, ``0 <= index < count`` (the rank under a launcher).
        count: the number of shards (the world size under a launcher).
        launched: True when the shard came from a launcher (``torchrun`` / ``accelerate launch``): then
            the ranks run together and rank 0 merges at the end; False for a ``--shard i/N`` job,
            merged later by ``eah-interp merge``.
    """

    index: int = 0
    count: int = 1
    launched: bool = False

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"A shard is i/N with 0 <= i < N; got {self.index}/{self.count}.")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/N"`` (``--shard 0/4`` ... ``--shard 3/4``) as a `Shard` of a separate job."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ConfigError(f"--shard takes i/N (e.g. 0/4 for the first of four jobs); got {text!r}.")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Shard:
        """The shard of this process from ``RANK`` / ``WORLD_SIZE`` (set by torchrun and accelerate launch).

        Without ``WORLD_SIZE`` (or with 1) this is the single shard ``0/1``.
        """
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        if "RANK" not in env:
            raise ConfigError(f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun or accelerate launch.")
        return cls(int(env["RANK"]), world, launched=True)

    @classmethod
    def resolve(cls, option: str | None, environ: dict[str, str] | None = None) -> Shard:
        """``--shard i/N`` if given, else the launcher's environment (refuses both at once)."""
        launched = cls.from_env(environ)
        if option is None:
            return launched
        if launched.count > 1:
            raise ConfigError(
                f"--shard {option} was given inside a launcher with WORLD_SIZE={launched.count}: use one or the "
                "other (the launcher's ranks already shard the data; --shard is for separate jobs)."
            )
        return cls.parse(option)

    def indices(self, n: int) -> range:
        """The indices of this shard's items among ``n``: ``index, index + count, ...``."""
        return range(self.index, n, self.count)

    def select(self, items: Sequence[T]) -> list[T]:
        """This shard's items, in their original order."""
        return [items[i] for i in self.indices(len(items))]

    @property
    def checkpoint_name(self) -> str:
        """This shard's checkpoint file name (`SCAN_CHECKPOINT` for a 1-shard run)."""
        return SCAN_CHECKPOINT if self.count == 1 else SHARD_CHECKPOINT.format(index=self.index, count=self.count)

    def describe(self) -> str:
        """One sentence: which items this process takes and who merges."""
        if self.count == 1:
            return "one process: every item."
        how = "rank 0 merges at the end" if self.launched else "merge the shards with `eah-interp merge`"
        return f"shard {self.index} of {self.count}: items {self.index}, {self.index + self.count}, ... ({how})."

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# ---------------------------------------------------------------------------- process group (barrier only)
@contextmanager
def process_group(shard: Shard, timeout: timedelta = timedelta(days=7)) -> Iterator[Callable[[], None]]:
    """A gloo process group for a launched shard; yields ``barrier()`` (a no-op for unlaunched shards).

    The group is created only if none exists (and then destroyed on exit); the long ``timeout`` lets a
    fast rank wait at the barrier for a slow one. The launcher kills every rank if one dies, so a
    barrier never waits for a dead rank.
    """
    if not shard.launched:
        yield lambda: None
        return
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(
            "RANK / WORLD_SIZE are set but MASTER_ADDR / MASTER_PORT are not: launch with torchrun or accelerate "
            "launch, or run separate jobs with --shard i/N and merge them with `eah-interp merge`."
        )
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=shard.index, world_size=shard.count, timeout=timeout)
    try:
        yield dist.barrier
    finally:
        if created:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- resumable, sharded scan
def scan_config(bundle: Any, threshold: float, normalise: str, dataset: str, stats: HeadStats | None = None) -> dict[str, Any]:
    """What two scan checkpoints must agree on to be resumed or merged (the batch size may differ)."""
    config = {"model": bundle.name, "threshold": float(threshold), "normalise": normalise, "layers": "all",
              "prompt": bundle.caption_prompt, "images": dataset}
    if stats is not None and stats.keep_examples:
        config["keep_examples"] = True
    if stats is not None and stats.sink_dims:
        config["sink_dims"], config["tau"] = list(stats.sink_dims), stats.tau
    return config


@dataclass(frozen=True)
class ScanCheckpoint:
    """A scan checkpoint read back: its statistics and what its metadata says.

    Attributes:
        path: the file.
        stats: the running statistics.
        config: the scan config (`scan_config`) it was written with.
        shard: the shard it belongs to (``0/1`` for a whole scan).
        done: the names of the images counted, in counting order.
        planned: the names of the images this shard was asked for when it was last written.
    """

    path: Path
    stats: HeadStats
    config: dict[str, Any]
    shard: Shard
    done: list[str]
    planned: list[str]

    @property
    def complete(self) -> bool:
        return set(self.done) == set(self.planned)


def read_checkpoint(path: str | Path) -> ScanCheckpoint:
    """Read a scan checkpoint (whole or shard) written by `scan`."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "scan_config" not in meta or "scan_done" not in meta:
        raise ConfigError(f"{path} is not a scan checkpoint (no scan_config / scan_done metadata).")
    done = json.loads(meta["scan_done"])
    shard = Shard.parse(meta.get("scan_shard", "0/1"))
    return ScanCheckpoint(path, HeadStats.load(path), json.loads(meta["scan_config"]), shard, done,
                          json.loads(meta.get("scan_planned", json.dumps(done))))


def write_checkpoint(path: Path, stats: HeadStats, config: dict[str, Any], shard: Shard,
                     done: Sequence[str], planned: Sequence[str]) -> Path:
    """Write a scan checkpoint atomically (`HeadStats.save`: a temporary file, then ``os.replace``)."""
    return stats.save(path, metadata={"scan_config": json.dumps(config), "scan_done": json.dumps(list(done)),
                                      "scan_shard": str(Shard(shard.index, shard.count)),
                                      "scan_planned": json.dumps(list(planned))})


@dataclass(frozen=True)
class ScanResult:
    """What `scan` returns.

    Attributes:
        stats: the whole scan's statistics if ``merged``, else this shard's.
        shard: the shard this process ran.
        merged: True when ``stats`` covers every shard (1 process, or rank 0 of a launched run).
        checkpoint: the checkpoint holding ``stats``.
    """

    stats: HeadStats
    shard: Shard
    merged: bool
    checkpoint: Path


def scan(
    bundle: Any,
    items: Sequence[tuple[str, Any]],
    out: str | Path,
    *,
    shard: Shard | None = None,
    dataset: str = "",
    threshold: float | None = None,
    normalise: str = "causal",
    batch_size: int = 8,
    resume: bool = True,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
    keep_examples: bool = False,
    sink_dims: Sequence[int] | None = None,
    tau: float = 20.0,
) -> ScanResult:
    """Head statistics of this process's shard of ``items``, checkpointed after every batch; rank 0 merges.

    The shard's checkpoint holds the running sums and, in its metadata, the scan config and the names
    of the images counted so far; it is replaced atomically after every batch, so an interruption at
    any point (even SIGKILL) leaves the state after the last finished batch, and rerunning the same
    call recomputes at most one batch. A launched run (`Shard.from_env`) waits at a barrier when its
    shard is done, then rank 0 merges every shard's checkpoint (`merge_scan`) into ``out/scan_checkpoint.safetensors``.

    Args:
        bundle: the `eah_interp.models.ModelBundle` to scan.
        items: ``(name, image)`` pairs (extra tuple entries are ignored); names are unique keys; an
            image may be a zero-argument callable that loads it (then a shard loads only its own).
        out: the output folder (created).
        shard: which items to take; default `Shard.from_env` (every item in a plain process).
        dataset: a description of where the items come from, kept in the checkpoint: a checkpoint of
            another dataset is not resumed or merged.
        threshold: the sink threshold (default: the bundle's).
        normalise: the sink-score normalisation (`eah_interp.sinks.sink_scores`).
        batch_size: images per forward pass (may change between resumptions).
        resume: continue from the shard's checkpoint (default), or discard it and start over.
        progress: a progress bar: on, off, or None (on only when stderr is a terminal).
        log: where progress messages go.
        keep_examples: keep every image's values, with its name as the example id (`HeadStats`).
        sink_dims, tau: also count massive-activation sinks and their overlap with EAH's per layer
            (`HeadStats`).

    Returns:
        A `ScanResult` (merged statistics on rank 0 and in a 1-shard run, the shard's otherwise).

    Raises:
        ConfigError: no items; the checkpoint is of another scan (model, threshold, normalisation, prompt), has
            counted images this run does not ask for, or two items share a name.
        DataFormatError: an image cannot be read (the checkpoint keeps every batch before its own).
    """
    from eah_interp.data import Item, LazyImages
    from eah_interp.experiments import scan_images

    shard = Shard.from_env() if shard is None else shard
    out = Path(out)
    names = [item[0] for item in items]
    if not names:
        raise ConfigError("the scan has no images: pass a dataset with at least one.")
    if len(set(names)) != len(names):
        dup = next(name for name in names if names.count(name) > 1)
        raise ConfigError(f"Item names are the keys of a scan and must be unique; {dup!r} appears twice.")
    stats = HeadStats(threshold=bundle.threshold if threshold is None else threshold, normalise=normalise,  # type: ignore[arg-type]
                      model=bundle.name, keep_examples=keep_examples, sink_dims=sink_dims, tau=tau)
    config = scan_config(bundle, stats.threshold, normalise, dataset, stats)
    mine = shard.select(list(items))
    planned = [item[0] for item in mine]
    path = out / shard.checkpoint_name
    with process_group(shard) as barrier:
        done: list[str] = []
        if not resume:
            path.unlink(missing_ok=True)
        elif path.exists():
            saved = read_checkpoint(path)
            _check_same_scan(saved, config)
            extra = [name for name in saved.done if name not in set(planned)]
            if extra:
                raise ConfigError(
                    f"{path} has already counted {len(extra)} image(s) this run does not ask for (e.g. {extra[0]!r}): "
                    "a scan cannot un-count them. Ask for at least the images of the earlier run (-n), use another "
                    "--out, or --no-resume."
                )
            stats, done = saved.stats, saved.done
            stats.model = bundle.name
            where = "" if shard.count == 1 else f" (shard {shard})"
            log(f"resuming {path}: {len(done)} of {len(planned)} images already counted{where}")
        finished = set(done)
        todo = [(name, image) for name, image, *_ in mine if name not in finished]
        out.mkdir(parents=True, exist_ok=True)

        def checkpoint(counted: int) -> None:
            write_checkpoint(path, stats, config, shard, done + [name for name, _ in todo[:counted]], planned)

        checkpoint(0)  # records this run's plan (a larger --n extends a finished shard)
        scan_images(bundle, LazyImages([Item(name, image) for name, image in todo]), stats=stats, batch_size=batch_size, progress=progress, on_batch=checkpoint,
                    ids=[name for name, _ in todo])
        barrier()
        if shard.count == 1:
            return ScanResult(stats, shard, True, path)
        if not (shard.launched and shard.index == 0):
            return ScanResult(stats, shard, False, path)
        merged = merge_scan([out / Shard(i, shard.count).checkpoint_name for i in range(shard.count)], out,
                            expected=names)
        return ScanResult(merged, shard, True, out / SCAN_CHECKPOINT)


def _check_same_scan(saved: ScanCheckpoint, config: dict[str, Any]) -> None:
    if saved.config != config:
        diff = "; ".join(f"{k}: checkpoint {saved.config.get(k)!r}, now {v!r}"
                         for k, v in config.items() if saved.config.get(k) != v)
        raise ConfigError(
            f"{saved.path} was written by a different scan ({diff}). Use another --out, or --no-resume to discard it."
        )


def find_shards(paths: Sequence[str | Path], *, missing_ok: bool = False) -> list[Path]:
    """The shard checkpoints among ``paths`` (files, or folders searched for ``scan_checkpoint.shard-*``).

    Raises:
        ConfigError: a path does not exist, or (unless ``missing_ok``) no checkpoint was found.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if _SHARD_FILE.match(f.name))
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"{p} does not exist: pass the --out folders (or checkpoint files) of the shard runs.")
    if not found and not missing_ok:
        raise ConfigError(f"No shard checkpoints (scan_checkpoint.shard-<i>-of-<N>.safetensors) in {list(map(str, paths))}.")
    return found


def merge_scan(paths: Sequence[str | Path], out: str | Path, *, expected: Sequence[str] | None = None,
               partial: bool = False) -> HeadStats:
    """Merge the shard checkpoints of one scan into ``out/scan_checkpoint.safetensors``; returns the statistics.

    Checks that the checkpoints are of one scan (same config), one shard count ``N`` with every shard
    ``0 .. N-1`` exactly once, each shard complete (it counted every image it was asked for), and that
    no image was counted twice. Statistics merge with `HeadStats.merge_all` in shard order; the merged
    checkpoint lists the images in the original item order (item ``k`` is shard ``k % N``'s ``k // N``-th),
    so a 1-process ``scan`` in ``out`` resumes from it.

    Args:
        paths: shard checkpoint files or folders holding them (`find_shards`).
        out: the folder of the merged checkpoint.
        expected: the names every shard together must have counted (rank 0 knows them); default: the
            shards' own plans.
        partial: merge shards that are not finished yet (a progress look; the result says so).

    Raises:
        ConfigError: any of the checks fails; the message names the shard and what to do.
    """
    shards = [read_checkpoint(p) for p in find_shards(paths)]
    counts = sorted({s.shard.count for s in shards})
    if len(counts) != 1:
        raise ConfigError(f"The checkpoints come from runs with different shard counts {counts}: pass one run's files.")
    count = counts[0]
    by_index: dict[int, ScanCheckpoint] = {}
    for s in shards:
        if s.shard.index in by_index:
            raise ConfigError(f"Shard {s.shard} appears twice ({by_index[s.shard.index].path} and {s.path}): pass each once.")
        by_index[s.shard.index] = s
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise ConfigError(f"Shards {[f'{i}/{count}' for i in missing]} of {count} are missing: run them (same command "
                          f"with --shard i/{count}) or pass their folders too.")
    ordered = [by_index[i] for i in range(count)]
    for s in ordered:
        counted = {s.stats.n_examples(layer) for layer in s.stats.layers} or {0}
        if counted != {len(s.done)}:
            raise ConfigError(f"{s.path} is inconsistent: its statistics count {sorted(counted)} examples but it lists "
                              f"{len(s.done)} counted images. Rerun that shard with --no-resume.")
    for s in ordered[1:]:
        _check_same_scan(s, ordered[0].config)
    if expected is not None:
        for s in ordered:
            want = Shard(s.shard.index, count).select(list(expected))
            if not partial and set(s.done) != set(want):
                raise ConfigError(f"Shard {s.shard} ({s.path}) has counted {len(s.done)} of its {len(want)} images: "
                                  "rerun it (same command) to finish it.")
    elif not partial:
        for s in ordered:
            if not s.complete:
                raise ConfigError(f"Shard {s.shard} ({s.path}) has counted {len(s.done)} of its {len(s.planned)} images: "
                                  "rerun it (same command) to finish it, or merge with --partial for a look.")
    seen: dict[str, int] = {}
    for s in ordered:
        for name in s.done:
            if name in seen:
                raise ConfigError(f"Image {name!r} was counted by shard {seen[name]}/{count} and shard {s.shard}: "
                                  "these are not shards of one run.")
            seen[name] = s.shard.index
    merged = HeadStats.merge_all([s.stats for s in ordered])
    rounds = max((len(s.done) for s in ordered), default=0)
    done = [s.done[k] for k in range(rounds) for s in ordered if k < len(s.done)]  # original item order
    planned = [s.planned[k] for k in range(max(len(s.planned) for s in ordered)) for s in ordered if k < len(s.planned)]
    write_checkpoint(Path(out) / SCAN_CHECKPOINT, merged, ordered[0].config, Shard(), done,
                     done if partial else planned)
    return merged


# ---------------------------------------------------------------------------- evaluation items
def items_path(out: str | Path, shard: Shard) -> Path:
    """The items file of ``shard`` in ``out``: ``items.jsonl`` for one shard, ``items.shard-<i>-of-<N>.jsonl`` otherwise."""
    name = "items.jsonl" if shard.count == 1 else f"items.shard-{shard.index}-of-{shard.count}.jsonl"
    return Path(out) / name


def run_sharded(run: Callable[[Sequence[T], str], Any], items: Sequence[T], out: str | Path, shard: Shard,
                log: Callable[[str], None] = print) -> Any:
    """A data-parallel ``run(items, items_file)`` (the evaluation runner): this process's shard, then the merge.

    With several shards, this process runs its items (`Shard.select`) into its own file (`items_path`)
    and, under a launcher, waits at a barrier for the other ranks. The process that merges (one process,
    rank 0 of a launched run, or a rerun without ``--shard`` after separate shard jobs) merges every shard
    file in ``out`` into ``out/items.jsonl`` (`merge_items`) and runs all ``items`` into it: only what no
    shard finished runs. Returns what that last ``run`` returns, or None for a shard that leaves the merge
    to another process.
    """
    out = Path(out)
    if shard.count > 1:
        with process_group(shard) as barrier:
            mine = shard.select(items)
            if len(mine):
                run(mine, items_path(out, shard).name)
            else:  # fewer items than shards: nothing to run here (the merge runs whatever is missing)
                log(f"shard {shard}: no items of the {len(items)} fall to this shard")
            barrier()
        if not (shard.launched and shard.index == 0):
            return None
    shard_files = sorted(out.glob("items.shard-*-of-*.jsonl"))
    if shard_files:
        merged = out / "items.jsonl"
        merge_items(([merged] if merged.exists() else []) + shard_files, merged)
        log(f"merged {len(shard_files)} shard result file(s) into {merged}")
    return run(items, "items.jsonl")


def item_key(item: dict[str, Any], fields: Sequence[str] = ITEM_KEY) -> tuple:
    """The key of one item: its ``fields`` values (a missing field is ``""``)."""
    return tuple(item.get(f, "") for f in fields)


def _sortable(key: tuple) -> tuple:
    # numbers before strings, each in its natural order: a deterministic total order over mixed keys
    return tuple((0, v, "") if isinstance(v, int | float) and not isinstance(v, bool) else (1, 0, json.dumps(v)) for v in key)


def merge_items(paths: Sequence[str | Path], out: str | Path, *, key: Sequence[str] = ITEM_KEY) -> Path:
    """Merge the ``items.jsonl`` files of several shards into one, by key: no duplicates, a fixed order.

    Items with the same key must be identical (a resumed shard may have written one twice); two
    different items with one key are an error (two runs that disagree). The output is sorted by key
    (numbers before strings), so it does not depend on which shard finished first, and written atomically.

    Args:
        paths: the shards' JSONL files.
        out: the merged file.
        key: the fields that identify an item (default `ITEM_KEY`).

    Returns:
        ``out``.

    Raises:
        ConfigError: an item lacks every key field, or one key holds two different items.
    """
    merged: dict[tuple, dict[str, Any]] = {}
    source: dict[tuple, str] = {}
    for p in paths:
        items, _ = read_items(p)
        for item in items:
            k = item_key(item, key)
            if all(v == "" for v in k):
                raise ConfigError(f"An item in {p} has none of the key fields {tuple(key)}: {json.dumps(item)[:200]}")
            if k in merged and merged[k] != item:
                raise ConfigError(f"Key {k} holds different items in {source[k]} and {p}: these are not shards of one run.")
            merged[k] = item
            source.setdefault(k, str(p))
    out = Path(out)
    lines = [json.dumps(merged[k]) + "\n" for k in sorted(merged, key=_sortable)]
    atomic_write(out, "".join(lines).encode())
    return out


__all__ = [
    "ITEM_KEY", "SCAN_CHECKPOINT", "SHARD_CHECKPOINT", "ScanCheckpoint", "ScanResult", "Shard", "find_shards",
    "item_key", "items_path", "merge_items", "merge_scan", "process_group", "read_checkpoint", "run_sharded", "scan",
    "scan_config", "write_checkpoint",
]
