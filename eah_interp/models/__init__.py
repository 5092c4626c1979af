"""Model families: per-family adapters and ``describe``, model introspection, the bundled organism, ``load_model``."""

from eah_interp.models.adapters import (
    ADAPTERS,
    GENERIC,
    Adapter,
    Description,
    adapter_for,
    describe,
    image_token_ids,
    register_adapter,
    token_layout,
)
from eah_interp.models.bundle import (
    ORGANISM_THRESHOLD,
    ModelBundle,
    bundle_for,
    default_threshold,
    load_model,
)
from eah_interp.models.introspect import (
    attention_modules,
    decoder_layers,
    execution_device,
    model_shape,
    text_config,
)
from eah_interp.models.organism import load_organism
from eah_interp.models.validate import ModelCheck, check_model

__all__ = [
    "ADAPTERS",
    "GENERIC",
    "ORGANISM_THRESHOLD",
    "Adapter",
    "Description",
    "ModelCheck",
    "ModelBundle",
    "adapter_for",
    "attention_modules",
    "bundle_for",
    "check_model",
    "decoder_layers",
    "default_threshold",
    "describe",
    "execution_device",
    "image_token_ids",
    "load_model",
    "load_organism",
    "model_shape",
    "register_adapter",
    "text_config",
    "token_layout",
]
