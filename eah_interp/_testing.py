"""Tiny random-weight LVLMs built from real HF classes, and inputs for them (tests, notebooks, benchmarks).

No weights are downloaded: models are built from small configs with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from eah_interp import compat

TINY_IMAGE_TOKEN_ID = 120
TINY_PAD_ID = 0
TINY_BOS_ID = 1


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
) -> LlavaForConditionalGeneration:
    """A random-weight `LlavaForConditionalGeneration` (Llama decoder with GQA + CLIP vision tower).

    With the defaults: 4 decoder layers, 4 heads / 2 KV heads, ``(28 / 7)^2 = 16`` image tokens per image.
    """
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        pad_token_id=TINY_PAD_ID,
        bos_token_id=TINY_BOS_ID,
        eos_token_id=2,
    )
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


def sharp_tiny_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    """`tiny_llava` with sharper attention (queries scaled by 4), so that heads differ in their vision sinks."""
    model = tiny_llava(seed=seed, **kwargs)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def n_image_tokens(model: LlavaForConditionalGeneration) -> int:
    """Image tokens one image yields in a tiny LLaVA (CLS dropped by the "default" strategy)."""
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2


def tiny_llava_inputs(
    model: LlavaForConditionalGeneration,
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
        parts = [torch.tensor([TINY_BOS_ID]), torch.randint(3, 100, (pre,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.full((n_img,), TINY_IMAGE_TOKEN_ID), torch.randint(3, 100, (1,), generator=g)]
        parts.append(torch.randint(3, 100, (suf,), generator=g))
        rows.append(torch.cat(parts))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TINY_PAD_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    v = model.config.vision_config
    pixels = torch.randn(len(rows) * images_per_row, 3, v.image_size, v.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels.to(model.dtype)}


class TinyProcessor:
    """A stand-in processor for `tiny_llava`: characters → ids 3..99, ``<image>`` → image tokens.

    Only for smoke runs of the pipeline on random weights: its "text" is not language.
    """

    image_placeholder = "<image>"

    def __init__(self, model: LlavaForConditionalGeneration) -> None:
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
        rows = [self.encode_text(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), TINY_PAD_ID)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        out = {"input_ids": ids, "attention_mask": mask}
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
