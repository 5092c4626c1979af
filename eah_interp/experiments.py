"""Building blocks of the CLI, the evaluation runner and the studies: scan heads, caption images with interventions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from eah_interp import hf
from eah_interp.head_stats import HeadStats
from eah_interp.models.bundle import ModelBundle


def progress_bar(iterable: Iterable[Any], progress: bool | None, **kwargs: Any) -> tqdm:
    """A tqdm bar: on (True), off (False), or tqdm's own rule (None: on only when stderr is a terminal)."""
    return tqdm(iterable, disable=None if progress is None else not progress, **kwargs)


def check_fits(model: Any, interventions: Any) -> None:
    """Raise now if an intervention does not fit the model (`LayerIndexError`: a layer it lacks), not mid-run."""
    with hf.intervene(model, interventions):
        pass


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size`` items, taken one at a time (a lazy sequence reads one batch at a time)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def scan_images(
    bundle: ModelBundle,
    images: Sequence[Any],
    *,
    layers: str | Sequence[int] = "all",
    threshold: float | None = None,
    normalise: str = "causal",
    batch_size: int = 8,
    progress: bool | None = None,
    stats: HeadStats | None = None,
    on_batch: Callable[[int], None] | None = None,
    ids: Sequence[str] | None = None,
    keep_examples: bool = False,
    sink_dims: Sequence[int] | None = None,
) -> HeadStats:
    """Head statistics of the caption prompt over ``images`` (all layers by default), streamed.

    Args:
        images: the images; a lazy sequence (`eah_interp.data.LazyImages`) is read one batch at a time, so an
            unreadable image stops the scan after the batches before it (``on_batch`` saw them).
        progress: a progress bar: on, off, or None (on only when stderr is a terminal).
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
        for chunk in progress_bar(batches(images, batch_size), progress, desc="scan", total=-(-len(images) // batch_size)):
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
    interventions: Any = (),
    max_new_tokens: int = 30,
    num_beams: int = 1,
    batch_size: int = 8,
    progress: bool | None = None,
    desc: str = "generate",
) -> tuple[list[str], list[list[int]]]:
    """Greedy (or beam) generation for prompt/image pairs, with ``interventions`` applied (`hf.intervene`).

    Args:
        interventions: one intervention or a list (empty: the plain model).
        progress: a progress bar: on, off, or None (on only when stderr is a terminal).

    Returns:
        ``(texts, source_heads)``: the decoded continuations and, per item, the source head EAH used
        in each edited layer (empty lists without EAH).
    """
    if len(prompts) != len(images):
        raise ValueError(f"generate_texts: {len(prompts)} prompts but {len(images)} images.")
    model = bundle.model
    texts: list[str] = []
    heads: list[list[int]] = []
    chunks = zip(batches(prompts, batch_size), batches(images, batch_size), strict=True)  # lazy images: a batch at a time
    for chunk_prompts, chunk_images in progress_bar(chunks, progress, desc=desc, total=-(-len(prompts) // batch_size)):
        chunk = list(chunk_prompts)
        inputs = bundle.encode(chunk, list(chunk_images))
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams)
        with torch.no_grad(), hf.intervene(model, interventions) as run:
            out = model.generate(**inputs, **kwargs)
        prefill = [r.eah for r in run.records if r.eah is not None and r.q_len == r.k_len]
        per_layer = [r.source_head.view(len(chunk), -1)[:, 0].tolist() for r in prefill]
        heads += [[layer_heads[i] for layer_heads in per_layer] for i in range(len(chunk))]
        texts += bundle.decode(out, inputs)
    return texts, heads
