"""TransformerLens 4.x backend: EAH and head statistics as ``blocks.{l}.attn.hook_pattern`` hooks.

`boot_bridge` wraps an HF LVLM in a `TransformerBridge` offline; the hooks run inside
``bridge.run_with_hooks(input_ids, fwd_hooks=..., pixel_values=..., attention_mask=...)`` or
``with bridge.hooks(fwd_hooks=...)``. For LLaVA-family bridges the bridge recomputes attention from the
hooked pattern, so an edited pattern changes the layer output (checked against the HF backend in the
tests). Bridges that fire ``hook_pattern`` after HF has already computed the output (Qwen2.5-VL,
Qwen3-VL) discard edits: use the HF or nnsight backend there.

Two traps of TransformerLens 4.3 that `boot_bridge` handles:

* booting a multimodal model calls ``pip install torchvision`` on the fly when torchvision is missing
  (which, here, replaced the CPU torch with a CUDA build): `boot_bridge` disables that step, as the
  bridge's image processor is not needed when you pass ``pixel_values`` yourself;
* the bridge needs a tokenizer loadable by name: `boot_bridge` saves the config and tokenizer to a
  temporary folder and boots from it, offline.

The bridge **replaces the HF model's modules in place** and switches it to eager attention: boot a
model you no longer need in its HF form (or load a second copy).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from eah_interp.config import EAHConfig
from eah_interp.edit import EditRecord, apply_eah_to_probs, should_edit
from eah_interp.layout import TokenLayout
from eah_interp.stats import HeadStats, head_statistics

Hook = tuple[str, Callable[[Tensor, Any], Tensor | None]]


def pattern_hook_name(layer: int) -> str:
    """The TransformerLens name of a layer's post-softmax attention pattern."""
    return f"blocks.{layer}.attn.hook_pattern"


@contextlib.contextmanager
def _no_runtime_installs():
    """Stop TransformerLens from ``pip install``-ing torchvision while booting a multimodal model."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # other TransformerLens layouts have no such step
        yield
        return
    original = getattr(helpers, "_ensure_torchvision", None)
    if original is None:
        yield
        return
    helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def _placeholder_tokenizer(vocab_size: int):
    """A word-level tokenizer ``t0 .. t{n-1}`` (for models without a tokenizer, e.g. tiny random ones)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")


def boot_bridge(hf_model: Any, tokenizer: Any = None, *, device: str = "cpu"):
    """Wrap an HF LVLM in a TransformerLens `TransformerBridge`, offline (see the module doc's traps).

    Args:
        hf_model: a loaded HF model whose architecture has a bridge adapter (LLaVA, LLaVA-NeXT, ...).
        tokenizer: its tokenizer (default: a placeholder word-level tokenizer of the vocab size).
        device: the bridge's device.

    Returns:
        The `TransformerBridge` (it shares, and rewires, ``hf_model``'s modules).
    """
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    config = hf_model.config
    if not getattr(config, "architectures", None):
        config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        tok = tokenizer if tokenizer is not None else _placeholder_tokenizer(config.get_text_config().vocab_size)
        tok.save_pretrained(folder)
        with _no_runtime_installs():
            return TransformerBridge.boot_transformers(
                folder, hf_model=hf_model, tokenizer=AutoTokenizer.from_pretrained(folder), device=device
            )


def eah_hooks(bridge: Any, config: EAHConfig, layout: TokenLayout, records: list[EditRecord] | None = None) -> list[Hook]:
    """``(hook_name, fn)`` pairs applying EAH at ``blocks.{l}.attn.hook_pattern`` for each configured layer.

    Args:
        bridge: the `TransformerBridge` (used to check layer and head indices).
        config: the edit.
        layout: the layout of the prompt the hooks will see.
        records: optional list receiving one `EditRecord` per edited call.
    """
    cfg = bridge.cfg
    config.validate_for(cfg.n_layers, cfg.n_heads)

    def make(layer: int):
        def hook(pattern: Tensor, hook: Any) -> Tensor:
            if not should_edit(config, layer, pattern.shape[-2], pattern.shape[-1]):
                return pattern
            edited, record = apply_eah_to_probs(pattern, layout, config, layer)
            if records is not None:
                records.append(record)
            return edited

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in config.layers]


def head_stats_hooks(stats: HeadStats, layout: TokenLayout, layers: Iterable[int]) -> list[Hook]:
    """Hooks that feed `HeadStats` from each layer's prompt pattern without caching any pattern."""

    def make(layer: int):
        def hook(pattern: Tensor, hook: Any) -> None:
            if pattern.shape[-2] == pattern.shape[-1]:
                stats.update_from_stats(layer, head_statistics(pattern, layout, stats.threshold, stats.normalise))

        return hook

    return [(pattern_hook_name(layer), make(layer)) for layer in layers]
