"""Building blocks of the CLI and the evaluation runner: scan heads, caption images with or without EAH."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from eah_interp import hf
from eah_interp.head_stats import HeadStats
from eah_interp.interventions import Intervention
from eah_interp.models.bundle import ModelBundle

#: What an arm applies: nothing (None), or one intervention or a list (`eah_interp.interventions`, through
#: `hf.intervene`).
Treatment = Union[Intervention, Sequence[Intervention], None]  # noqa: UP007 - a runtime alias, not only an annotation


@contextlib.contextmanager
def treated(model: Any, treatment: Treatment) -> Iterator[Callable[[], list[Any]]]:
    """Apply ``treatment`` inside the block; yields a function returning EAH's `EditRecord`s made so far.

    Interventions run through `hf.intervene` (the records of its EAH members); None changes nothing (no records).
    """
    if treatment is None:
        yield list
    else:
        with hf.intervene(model, treatment) as run:
            yield lambda: [r.eah for r in run.records if r.eah is not None]


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def scan_images(
    bundle: ModelBundle,
    images: Sequence[Any],
    *,
    layers: str | Sequence[int] = "all",
    threshold: float | None = None,
    normalise: str = "causal",
    batch_size: int = 8,
    progress: bool = True,
    stats: HeadStats | None = None,
    on_batch: Callable[[int], None] | None = None,
    ids: Sequence[str] | None = None,
    keep_examples: bool = False,
    sink_dims: Sequence[int] | None = None,
) -> HeadStats:
    """Head statistics of the caption prompt over ``images`` (all layers by default), streamed.

    Args:
        stats: accumulate into this `HeadStats` (e.g. one loaded from a checkpoint) instead of a new one
            built from ``threshold`` / ``normalise`` / ``keep_examples`` / ``sink_dims``.
        on_batch: called after every batch with the number of images counted so far in this call
            (the CLI writes its resumable checkpoint there).
        ids: one id per image, kept with its per-example values (`HeadStats.label_next`).
        keep_examples, sink_dims: options of a new `HeadStats` (per-example values; the
            massive-activation sinks and their overlap with EAH's, per layer).
    """
    if stats is None:
        stats = HeadStats(threshold=bundle.threshold if threshold is None else threshold, normalise=normalise,  # type: ignore[arg-type]
                          keep_examples=keep_examples, sink_dims=sink_dims)
    if ids is not None and len(ids) != len(images):
        raise ValueError(f"scan_images got {len(ids)} ids for {len(images)} images.")
    model = bundle.model
    counted = 0
    with hf.record_attention(model, layers, stats=stats), torch.no_grad():
        for chunk in tqdm(_batches(images, batch_size), desc="scan", disable=not progress):
            stats.label_next(None if ids is None else list(ids[counted : counted + len(chunk)]))
            model(**bundle.encode([bundle.caption_prompt] * len(chunk), list(chunk)), use_cache=False)
            counted += len(chunk)
            if on_batch is not None:
                on_batch(counted)
    return stats


def generate_texts(
    bundle: ModelBundle,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    config: Treatment = None,
    max_new_tokens: int = 30,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
) -> tuple[list[str], list[list[int]]]:
    """Greedy (or beam) generation for prompt/image pairs, with EAH or other interventions when ``config`` is given.

    Args:
        config: a `Treatment`: None, or interventions (one or a list, `hf.intervene`).

    Returns:
        ``(texts, source_heads)``: the decoded continuations and, per item, the source head EAH used
        in each edited layer (empty lists without EAH).
    """
    model = bundle.model
    texts: list[str] = []
    heads: list[list[int]] = []
    pairs = list(zip(prompts, images, strict=True))
    for chunk in tqdm(_batches(pairs, batch_size), desc=desc, disable=not progress):
        inputs = bundle.encode([p for p, _ in chunk], [i for _, i in chunk])
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
        with torch.no_grad(), treated(model, config) as records:
            out = model.generate(**inputs, **kwargs)
            prefill = [r for r in records() if r.q_len == r.k_len]
        per_layer = [r.source_head.view(len(chunk), -1)[:, 0].tolist() for r in prefill]
        heads += [[layer_heads[i] for layer_heads in per_layer] for i in range(len(chunk))]
        texts += bundle.decode(out, inputs)
    return texts, heads
