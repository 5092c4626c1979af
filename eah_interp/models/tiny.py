"""Tiny random-weight models of every supported LVLM family, with inputs shaped as their processors make them:
the one home of the tiny models (no weights, no hub).

Each builder constructs the **real** transformers class from a small config, so that tests, notebooks and benchmarks exercise the family's own forward: its placeholder scatter, its
rotary embedding (M-RoPE for Qwen), its attention masks (bidirectional image blocks for Gemma 3 and
PaliGemma) and its GQA layout.

    >>> model, inputs = tiny_family("qwen2_vl")
    >>> model(**inputs).logits.shape
    torch.Size([2, 30, 160])

`TINY_FAMILIES` lists the names; each entry builds ``(model, inputs)`` for a batch of two left-padded
rows with different prefix lengths (so image positions differ between rows). `tiny_llava` (with
`tiny_llava_inputs`, `sharp_tiny_llava`, `TinyProcessor`) is the configurable LLaVA most tests use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

TINY_VOCAB = 160
TINY_IMAGE_ID = 150
TINY_VIDEO_ID = 151  # also [IMG_BREAK] in tiny_mistral3
TINY_BOI_ID = 152  # begin-of-image (Gemma 3), <fake_token_around_image> (Idefics3)
TINY_EOI_ID = 153
TINY_GLOBAL_IMG_ID = 154  # Idefics3 "<global-img>"
TINY_PAD_ID = 0
TINY_BOS_ID = 1
TINY_EOS_ID = 2

_TEXT = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=TINY_PAD_ID,
    bos_token_id=TINY_BOS_ID,
    eos_token_id=TINY_EOS_ID,
)


def _text(**overrides: Any) -> dict[str, Any]:
    return {**_TEXT, **overrides}


def _finish(model, attn_implementation: str):
    model.set_attn_implementation({"text_config": attn_implementation, "vision_config": "eager"})
    model.eval()
    model.generation_config.pad_token_id = TINY_PAD_ID
    return model


def _rows(prefix_lengths: Sequence[int], middle: Callable[[int], list[int]], seed: int) -> list[list[int]]:
    """Rows ``[bos, prefix text, middle(row), suffix text]`` with random text ids in ``3..99``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, pre in enumerate(prefix_lengths):
        text = torch.randint(3, 100, (pre + 4,), generator=g).tolist()
        rows.append([TINY_BOS_ID, *text[:pre], *middle(i), *text[pre:]])
    return rows


def _pad(rows: list[list[int]], side: str = "left", **per_token: list[list[int]]) -> dict[str, Tensor]:
    """Pad rows to one width on ``side``: ``input_ids``, ``attention_mask`` (and per-token extras, padded with 0)."""
    width = max(len(r) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), TINY_PAD_ID), "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
    for name in per_token:
        out[name] = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        out["input_ids"][i, where] = torch.tensor(r)
        out["attention_mask"][i, where] = 1
        for name, values in per_token.items():
            out[name][i, where] = torch.tensor(values[i])
    return out


# ---------------------------------------------------------------------------------------------- LLaVA
#: The image placeholder id of `tiny_llava` (the other families use `TINY_IMAGE_ID`).
TINY_IMAGE_TOKEN_ID = 120


def tiny_llava(
    *,
    seed: int = 0,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    hidden: int = 64,
    image_size: int = 28,
    patch_size: int = 7,
    vocab_size: int = 128,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A random-weight `LlavaForConditionalGeneration` (Llama decoder with GQA + CLIP vision tower).

    With the defaults: 4 decoder layers, 4 heads / 2 KV heads, ``(28 / 7)^2 = 16`` image tokens per image.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from eah_interp import compat

    torch.manual_seed(seed)
    text = LlamaConfig(**_text(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads))
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=TINY_IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    compat.preset_attn_implementation(
        config, {"text_config": attn_implementation, "vision_config": "eager", "": attn_implementation}
    )
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = TINY_PAD_ID
    return model


def sharp_tiny_llava(seed: int = 0, **kwargs):
    """`tiny_llava` with sharper attention (queries scaled by 4), so that heads differ in their vision sinks."""
    model = tiny_llava(seed=seed, **kwargs)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def n_image_tokens(model) -> int:
    """Image tokens one image yields in a tiny LLaVA (CLS dropped by the "default" strategy)."""
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def tiny_llava_inputs(
    model,
    *,
    prefix_lengths: Sequence[int] = (3,),
    suffix_lengths: Sequence[int] | None = None,
    padding_side: str = "left",
    images_per_row: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch of prompts ``[bos, prefix text, image tokens, suffix text]`` with pixel values.

    Rows may have different prefix/suffix lengths (so image positions differ); shorter rows are padded
    on ``padding_side``. Returns ``input_ids``, ``attention_mask`` and ``pixel_values``.
    """
    g = torch.Generator().manual_seed(seed)
    suffix_lengths = suffix_lengths or [4] * len(prefix_lengths)
    n_img = n_image_tokens(model)
    rows = []
    for pre, suf in zip(prefix_lengths, suffix_lengths, strict=True):
        row = [TINY_BOS_ID, *torch.randint(3, 100, (pre,), generator=g).tolist()]
        for _ in range(images_per_row):
            row += [TINY_IMAGE_TOKEN_ID] * n_img + torch.randint(3, 100, (1,), generator=g).tolist()
        rows.append(row + torch.randint(3, 100, (suf,), generator=g).tolist())
    v = model.config.vision_config
    pixels = torch.randn(len(rows) * images_per_row, 3, v.image_size, v.image_size, generator=g)
    return {**_pad(rows, padding_side), "pixel_values": pixels.to(model.dtype)}


class TinyProcessor:
    """A stand-in processor for `tiny_llava`: characters → ids 3..99, ``<image>`` → image tokens.

    Only for smoke runs of the pipeline on random weights: its "text" is not language.
    """

    image_placeholder = "<image>"

    def __init__(self, model) -> None:
        self.n_image = n_image_tokens(model)
        self.image_size = model.config.vision_config.image_size
        self.dtype = model.dtype

    def encode_text(self, text: str) -> list[int]:
        ids = [TINY_BOS_ID]
        for i, piece in enumerate(text.split(self.image_placeholder)):
            if i:
                ids += [TINY_IMAGE_TOKEN_ID] * self.n_image
            ids += [3 + (ord(c) % 97) for c in piece]
        return ids

    def __call__(self, text, images=None, **_: object) -> dict[str, torch.Tensor]:
        import numpy as np

        texts = [text] if isinstance(text, str) else list(text)
        imgs = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        out = _pad([self.encode_text(t) for t in texts])
        if imgs:
            from PIL import Image

            arrays = []
            for img in imgs:
                img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
                a = np.asarray(img.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float32)
                arrays.append(torch.from_numpy(a / 127.5 - 1.0).permute(2, 0, 1))
            out["pixel_values"] = torch.stack(arrays).to(self.dtype)
        return out

    def batch_decode(self, ids: torch.Tensor, **_: object) -> list[str]:
        return ["<ids " + " ".join(str(int(t)) for t in row) + ">" for row in ids]


def scene_items(n: int) -> list:
    """``(name, loader)`` of the first ``n`` held-out scenes, as the CLI's ``scan`` names them.

    The items `eah_interp.distributed.scan` takes (loaders: a shard reads only its own images); shared by
    tests/test_distributed.py and benchmarks/distributed.py.
    """
    from eah_interp.data import scene_dataset

    return [(item.id, item.load_image) for item in scene_dataset(n)]


def tiny_llava_family(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`LlavaForConditionalGeneration`: Llama (4 heads / 2 KV) + CLIP, 16 image tokens per image."""
    model = tiny_llava(seed=seed, n_layers=3, attn_implementation=attn_implementation, vocab_size=TINY_VOCAB)
    inputs = tiny_llava_inputs(model, prefix_lengths=prefix_lengths, suffix_lengths=[4] * len(prefix_lengths), seed=seed)
    return model, inputs


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`LlavaNextForConditionalGeneration` with AnyRes tiling: a 28x56 image → base view + 2 tiles + newlines."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        text_config=LlamaConfig(**_text()),
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
        ),
        image_token_index=TINY_IMAGE_ID,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = _finish(LlavaNextForConditionalGeneration(config), attn_implementation)
    batch = len(prefix_lengths)
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, 3, 28, 28, generator=g)  # [images, base + tiles, C, H, W]
    image_sizes = torch.tensor([[28, 56]] * batch)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
    counts = [f.shape[0] for f in getattr(features, "pooler_output", features)]
    inputs = _pad(_rows(prefix_lengths, lambda i: [TINY_IMAGE_ID] * counts[i], seed))
    return model, {**inputs, "pixel_values": pixel_values, "image_sizes": image_sizes}


# ---------------------------------------------------------------------------------------------- Qwen
def _qwen(kind: str, seed: int, attn_implementation: str, prefix_lengths: Sequence[int]):
    import transformers

    if kind == "qwen2_vl":
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=4, patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
    else:
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=2,
            spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
        )
    torch.manual_seed(seed)
    text = _text(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    config = config_cls(
        text_config=text, vision_config=vision, image_token_id=TINY_IMAGE_ID, video_token_id=TINY_VIDEO_ID,
        vision_start_token_id=TINY_BOI_ID, vision_end_token_id=TINY_EOI_ID,
    )
    model = _finish(model_cls(config), attn_implementation)
    batch, (t, h, w) = len(prefix_lengths), (1, 8, 8)  # patches of one image; merged 2x2 → 16 tokens
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch * t * h * w, 3 * 2 * 2 * 2, generator=g)
    grid = torch.tensor([[t, h, w]] * batch)
    n_tokens = t * h * w // 4
    rows = _rows(prefix_lengths, lambda i: [TINY_BOI_ID, *[TINY_IMAGE_ID] * n_tokens, TINY_EOI_ID], seed)
    types = [[1 if x == TINY_IMAGE_ID else 0 for x in r] for r in rows]
    inputs = _pad(rows, mm_token_type_ids=types)
    return model, {**inputs, "pixel_values": pixel_values, "image_grid_thw": grid}


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`Qwen2VLForConditionalGeneration`: M-RoPE decoder, 8x8 patches merged 2x2 → 16 image tokens."""
    return _qwen("qwen2_vl", seed, attn_implementation, prefix_lengths)


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`Qwen2_5_VLForConditionalGeneration`: as Qwen2-VL, with windowed vision attention."""
    return _qwen("qwen2_5_vl", seed, attn_implementation, prefix_lengths)


# ---------------------------------------------------------------------------------------------- InstructBLIP
def tiny_instructblip(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`InstructBlipForConditionalGeneration` with a Llama decoder: 16 Q-Former query tokens stand for the image."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    torch.manual_seed(seed)
    n_query = 16
    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7),
        qformer_config=dict(
            vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            encoder_hidden_size=32, max_position_embeddings=64, pad_token_id=TINY_PAD_ID,
        ),
        text_config={"model_type": "llama", **_text()},
        num_query_tokens=n_query,
        image_token_index=TINY_IMAGE_ID,
    )
    model = _finish(InstructBlipForConditionalGeneration(config), attn_implementation)
    batch = len(prefix_lengths)
    g = torch.Generator().manual_seed(seed)
    # InstructBLIP's processor puts the query placeholders first, then the text.
    rows = [[*[TINY_IMAGE_ID] * n_query, *r] for r in _rows(prefix_lengths, lambda i: [], seed)]
    inputs = _pad(rows)
    qformer_ids = torch.randint(3, 100, (batch, 5), generator=g)
    return model, {
        **inputs,
        "pixel_values": torch.randn(batch, 3, 28, 28, generator=g),
        "qformer_input_ids": qformer_ids,
        "qformer_attention_mask": torch.ones_like(qformer_ids),
    }


# ---------------------------------------------------------------------------------------------- Gemma family
def tiny_paligemma(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`PaliGemmaForConditionalGeneration`: Gemma (GQA 4/2) + SigLIP; image + prompt form a bidirectional prefix."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7,
            projection_dim=64,
        ),
        text_config=GemmaConfig(**_text(head_dim=16)),
        image_token_index=TINY_IMAGE_ID,
        projection_dim=64,
    )
    config.text_config.num_image_tokens = 16
    config.vision_config.projection_dim = 64
    model = _finish(PaliGemmaForConditionalGeneration(config), attn_implementation)
    batch = len(prefix_lengths)
    g = torch.Generator().manual_seed(seed)
    # PaliGemma's processor: image tokens first, then bos + prompt; token_type_ids 0 on the prefix.
    rows = [[*[TINY_IMAGE_ID] * 16, *r] for r in _rows(prefix_lengths, lambda i: [], seed)]
    inputs = _pad(rows, token_type_ids=[[0] * len(r) for r in rows])
    return model, {**inputs, "pixel_values": torch.randn(batch, 3, 28, 28, generator=g)}


def tiny_gemma3(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`Gemma3ForConditionalGeneration`: sliding/global layers, 16 image tokens attended bidirectionally."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    n_image = 16
    config = Gemma3Config(
        text_config=Gemma3TextConfig(**_text(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=7
        ),
        mm_tokens_per_image=n_image,
        image_token_index=TINY_IMAGE_ID,
        boi_token_index=TINY_BOI_ID,
        eoi_token_index=TINY_EOI_ID,
    )
    model = _finish(Gemma3ForConditionalGeneration(config), attn_implementation)
    batch = len(prefix_lengths)
    g = torch.Generator().manual_seed(seed)
    rows = _rows(prefix_lengths, lambda i: [TINY_BOI_ID, *[TINY_IMAGE_ID] * n_image, TINY_EOI_ID], seed)
    inputs = _pad(rows, token_type_ids=[[1 if x == TINY_IMAGE_ID else 0 for x in r] for r in rows])
    return model, {**inputs, "pixel_values": torch.randn(batch, 3, 28, 28, generator=g)}


# ---------------------------------------------------------------------------------------------- Idefics3 / SmolVLM
def _idefics(kind: str, seed: int, attn_implementation: str, prefix_lengths: Sequence[int]):
    import transformers

    if kind == "idefics3":
        config_cls, model_cls = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
    else:
        config_cls, model_cls = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
    torch.manual_seed(seed)
    config = config_cls(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=56, patch_size=7),
        text_config={"model_type": "llama", **_text()},
        image_token_id=TINY_IMAGE_ID,
        scale_factor=2,
    )
    model = _finish(model_cls(config), attn_implementation)
    batch = len(prefix_lengths)
    n_image = (56 // 7) ** 2 // 4  # 64 patches, pixel shuffle by scale_factor 2 → 16 tokens per image
    g = torch.Generator().manual_seed(seed)
    # The processor wraps each image as <fake_token_around_image><global-img><image>*n<fake_token_around_image>.
    rows = _rows(prefix_lengths, lambda i: [TINY_BOI_ID, TINY_GLOBAL_IMG_ID, *[TINY_IMAGE_ID] * n_image, TINY_BOI_ID], seed)
    inputs = _pad(rows)
    pixel_values = torch.randn(batch, 1, 3, 56, 56, generator=g)  # [batch, images, C, H, W]
    return model, {**inputs, "pixel_values": pixel_values, "pixel_attention_mask": torch.ones(batch, 1, 56, 56, dtype=torch.bool)}


def tiny_idefics3(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`Idefics3ForConditionalGeneration`: Llama + SigLIP-like encoder, pixel shuffle (scale factor 2), 16 image tokens."""
    return _idefics("idefics3", seed, attn_implementation, prefix_lengths)


def tiny_smolvlm(seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """`SmolVLMForConditionalGeneration` (the Idefics3 architecture as SmolVLM ships it)."""
    return _idefics("smolvlm", seed, attn_implementation, prefix_lengths)


# ---------------------------------------------------------------------------------------------- not a listed family
def tiny_mistral3(seed: int = 0, attn_implementation: str = "sdpa"):
    """`Mistral3ForConditionalGeneration`, a family with **no** adapter (docs/new_model.md's worked example).

    Pixtral-style prompts: 4 rows of 4 image tokens (56 px, 7 px patches merged 2x2), an ``[IMG_BREAK]``
    text token after each row but the last, then ``[IMG_END]``; two left-padded rows.
    """
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    torch.manual_seed(seed)
    config = Mistral3Config(
        vision_config=PixtralVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=56,
            patch_size=7, head_dim=8,
        ),
        text_config=MistralConfig(**_text(head_dim=16)),
        image_token_index=TINY_IMAGE_ID,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    model = _finish(Mistral3ForConditionalGeneration(config), attn_implementation)
    image: list[int] = []
    for row in range(4):
        image += [TINY_IMAGE_ID] * 4 + [TINY_VIDEO_ID if row < 3 else TINY_EOI_ID]  # [IMG_BREAK] / [IMG_END]
    inputs = _pad(_rows((3, 6), lambda i: image, seed))
    g = torch.Generator().manual_seed(seed)
    return model, {**inputs, "pixel_values": torch.randn(2, 3, 56, 56, generator=g), "image_sizes": torch.tensor([[56, 56]] * 2)}


TINY_FAMILIES: dict[str, Callable[..., tuple[Any, dict[str, Tensor]]]] = {
    "llava": tiny_llava_family,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "instructblip": tiny_instructblip,
    "paligemma": tiny_paligemma,
    "gemma3": tiny_gemma3,
    "idefics3": tiny_idefics3,
    "smolvlm": tiny_smolvlm,
}


def tiny_family(name: str, seed: int = 0, attn_implementation: str = "sdpa", prefix_lengths: Sequence[int] = (3, 6)):
    """``(model, inputs)`` of a tiny random-weight model of family ``name`` (see `TINY_FAMILIES`)."""
    if name not in TINY_FAMILIES:
        raise KeyError(f"No tiny builder for {name!r}; available: {', '.join(TINY_FAMILIES)}.")
    return TINY_FAMILIES[name](seed=seed, attn_implementation=attn_implementation, prefix_lengths=prefix_lengths)


# ---------------------------------------------------------------------------------------------- hub-style folders
#: The families `save_tiny_checkpoint` can write. ``"idefics3"`` is the format SmolVLM (v1) ships in
#: (``Idefics3ForConditionalGeneration`` + ``Idefics3Processor``); Qwen2-VL and SmolVLM-2 processors need
#: a video processor, which needs torchvision (not installable beside the CPU torch wheel used here).
CHECKPOINT_FAMILIES = ("llava", "llava_next", "idefics3", "gemma3", "paligemma")

#: The conversation format of LLaVA-1.5 (``USER: <image>\n{request} ASSISTANT:``) as a chat template,
#: written for these fixtures after the one llava-hf ships (llava-hf/llava-1.5-7b-hf, chat_template.json).
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: SmolVLM-Instruct's format (``<|im_start|>User:<image>{request}<end_of_utterance>\nAssistant:``), written
#: for these fixtures after HuggingFaceTB/SmolVLM-Instruct's chat template.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_utterance>\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


#: Gemma 3's turn format (``<bos><start_of_turn>user\n<start_of_image>{request}<end_of_turn>\n<start_of_turn>model\n``),
#: written for these fixtures after google/gemma-3-4b-it's chat template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _checkpoint_text(tokenizer, n_layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def save_tiny_checkpoint(family: str, path, *, seed: int = 0):
    """Write a hub-style checkpoint folder: a tiny random LVLM that ``load_model(path)`` loads like a real one.

    The folder is what ``save_pretrained`` writes for a released model: the real transformers model class
    (random weights from a small config: 4 decoder layers for LLaVA, 3 for the others; 4 heads / 2 KV
    heads; 16 image tokens per image, LLaVA-NeXT more), SmolLM2-135M-Instruct's real tokenizer (from its GGUF, see
    `eah_interp.models.organism.loading.load_smollm_tokenizer`) with the family's image tokens added, the
    family's chat template and its real image processor class. ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` load it offline. Its config carries ``eah_interp_random_weights: true``, so
    `eah_interp.models.load_model` marks the bundle ``trained=False`` (its text is noise).

    * ``"llava"``: ``LlavaForConditionalGeneration`` (Llama + CLIP, 28 px images in 7 px patches) with
      ``LlavaProcessor`` (``CLIPImageProcessor``), ``<image>`` and LLaVA-1.5's conversation format;
    * ``"llava_next"``: ``LlavaNextForConditionalGeneration`` with ``LlavaNextProcessor`` (AnyRes: a 28 px
      base view plus tiles from the grid pinpoints 28/56 px, an image-newline token per tile row; a
      336x336 image gives 16 + 64 + 8 = 88 image tokens), ``<image>`` and LLaVA-1.5's format, 3 layers;
    * ``"gemma3"``: ``Gemma3ForConditionalGeneration`` (sliding-window and global layers, bidirectional
      attention within an image) with ``Gemma3Processor`` (no pan-and-scan, 16 soft tokens per image)
      and Gemma 3's turn format;
    * ``"paligemma"``: ``PaliGemmaForConditionalGeneration`` (Gemma + SigLIP, image + prompt a bidirectional
      prefix) with ``PaliGemmaProcessor``, which adds its own ``<image>`` / location tokens and places the
      image itself; no chat template, as released PaliGemma checkpoints have none;
    * ``"idefics3"`` (SmolVLM v1's format): ``Idefics3ForConditionalGeneration`` (Llama + SigLIP-like,
      56 px, pixel shuffle 2) with ``Idefics3Processor`` (no image splitting) and SmolVLM's format.

    Args:
        family: one of `CHECKPOINT_FAMILIES`.
        path: the folder to write (created if missing).
        seed: seed of the random weights.

    Returns:
        The folder as a ``Path``.
    """
    from pathlib import Path

    import transformers as tf

    from eah_interp.models.organism.loading import load_smollm_tokenizer

    if family not in CHECKPOINT_FAMILIES:
        raise KeyError(f"No tiny checkpoint for {family!r}; available: {', '.join(CHECKPOINT_FAMILIES)}.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_smollm_tokenizer(
        extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
    ) if family == "gemma3" else load_smollm_tokenizer()
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
    if family == "llava_next":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
        image_processor = tf.LlavaNextImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
        )
        processor = tf.LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=7, vision_feature_select_strategy="default",
            chat_template=LLAVA_15_CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
        )
        config = tf.LlavaNextConfig(
            text_config=tf.LlamaConfig(**_checkpoint_text(tokenizer, 3)),
            vision_config=tf.CLIPVisionConfig(**vision),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        model = tf.LlavaNextForConditionalGeneration(config)
    elif family == "gemma3":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
        image_processor = tf.Gemma3ImageProcessor(size={"height": 28, "width": 28}, do_pan_and_scan=False)
        processor = tf.Gemma3Processor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=16
        )
        config = tf.Gemma3Config(
            text_config=dict(
                _checkpoint_text(tokenizer, 3), head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            ),
            vision_config=dict(vision, num_hidden_layers=1),
            mm_tokens_per_image=16,
            image_token_id=tokenizer.image_token_id,
            boi_token_id=tokenizer.boi_token_id,
            eoi_token_id=tokenizer.eoi_token_id,
            tie_word_embeddings=False,
        )
        model = tf.Gemma3ForConditionalGeneration(config)
    elif family == "paligemma":
        image_processor = tf.SiglipImageProcessor(size={"height": 28, "width": 28})
        image_processor.image_seq_length = 16
        tokenizer.chat_template = None  # SmolLM2's text chat template would be taken for the processor's
        processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <image> & co
        config = tf.PaliGemmaConfig(
            vision_config=tf.SiglipVisionConfig(**dict(vision, num_hidden_layers=1), projection_dim=64),
            text_config=tf.GemmaConfig(**_checkpoint_text(tokenizer, 3), head_dim=16),
            image_token_id=processor.image_token_id,
            projection_dim=64,
            tie_word_embeddings=False,
        )
        config.text_config.num_image_tokens = 16
        model = tf.PaliGemmaForConditionalGeneration(config)
    elif family == "llava":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = tf.LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=7, vision_feature_select_strategy="default",
            chat_template=LLAVA_15_CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
        )
        config = tf.LlavaConfig(
            text_config=tf.LlamaConfig(**_checkpoint_text(tokenizer, 4)),
            vision_config=tf.CLIPVisionConfig(**vision, projection_dim=32),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        model = tf.LlavaForConditionalGeneration(config)
    else:
        extra = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
        image_processor = tf.Idefics3ImageProcessor(
            do_image_splitting=False, size={"longest_edge": 56}, max_image_size={"longest_edge": 56}
        )
        processor = tf.Idefics3Processor(
            image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16, chat_template=SMOLVLM_CHAT_TEMPLATE
        )
        config = tf.Idefics3Config(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=56, patch_size=7),
            text_config={"model_type": "llama", **_checkpoint_text(tokenizer, 3)},
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = tf.Idefics3ForConditionalGeneration(config)
    model.config.eah_interp_random_weights = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
