"""Errors raised by eah-interp. Each one says what was wrong and what to do about it."""

from __future__ import annotations


class EAHError(Exception):
    """Base class of every error eah-interp raises on purpose."""


class ConfigError(EAHError, ValueError):
    """An `EAH` (or another option set) is invalid or self-contradictory."""


class LayoutError(EAHError, ValueError):
    """The token layout does not fit the inputs (no image tokens, wrong shape, count mismatch)."""


class NoImageTokensError(LayoutError):
    """A prompt row holds no image tokens, so there is nothing to find sinks in."""


class LayerIndexError(EAHError, IndexError):
    """A layer index is out of range for the model."""


class HeadIndexError(EAHError, IndexError):
    """A head index is out of range for the layer."""


class UnsupportedModelError(EAHError, TypeError):
    """The model is not one eah-interp knows how to instrument."""


class AttentionImplementationError(EAHError, RuntimeError):
    """The model's attention implementation cannot expose (or accept) attention probabilities."""


class ModelLoadError(EAHError, ValueError):
    """A model could not be loaded (no such folder, no processor, no image token, remote code needed)."""


class DataFormatError(EAHError, ValueError):
    """A dataset file (COCO instances, POPE questions) or image folder is missing or malformed."""


class FrameworkVersionError(EAHError, RuntimeError):
    """An installed framework (transformers, nnsight, TransformerLens) lacks an internal eah-interp relies on.

    The message names the supported version range (`eah_interp.compat.FLOORS`).
    """
