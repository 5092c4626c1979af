"""The organism's processor: chat prompts with an ``<image>`` placeholder → ``input_ids`` + ``pixel_values``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eah_interp.models.organism.modeling import IMAGE_TOKEN_ID, NUM_IMAGE_TOKENS
from eah_interp.models.organism.vision import ImagePreprocessor

IMAGE_PLACEHOLDER = "<image>"
CAPTION_QUESTION = "Describe the image."
YES_NO_SUFFIX = " Answer yes or no."


def chat_prompt(question: str, *, with_image: bool = True) -> str:
    """The organism's prompt for one user turn (SmolLM2 chat format, no system turn)."""
    image = f"{IMAGE_PLACEHOLDER}\n" if with_image else ""
    return f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"


def caption_prompt() -> str:
    """The prompt that asks for a caption."""
    return chat_prompt(CAPTION_QUESTION)


def yes_no_prompt(question: str) -> str:
    """The prompt that asks a yes/no question (e.g. ``"Is there a star in the image?"``)."""
    return chat_prompt(question + YES_NO_SUFFIX)


class OrganismProcessor:
    """Turns text with ``<image>`` placeholders and images into model inputs.

    Each ``<image>`` becomes ``NUM_IMAGE_TOKENS`` (49) copies of ``image_token_id`` in ``input_ids``
    (the LLaVA convention: one placeholder per image feature).

    Args:
        tokenizer: SmolLM2's tokenizer.
        padding_side: ``"left"`` (default, for generation) or ``"right"``.
    """

    def __init__(self, tokenizer, *, padding_side: str = "left"):
        self.tokenizer = tokenizer
        self.image_processor = ImagePreprocessor()
        self.image_token_id = IMAGE_TOKEN_ID
        self.num_image_tokens = NUM_IMAGE_TOKENS
        self.padding_side = padding_side
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text``, each ``<image>`` expanded to 49 image-token ids."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        images=None,
        *,
        return_tensors: str = "pt",
        padding_side: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode a prompt or a batch of prompts (with as many images as ``<image>`` placeholders).

        Returns:
            dict with ``input_ids`` and ``attention_mask`` (``[batch, seq]``, padded) and, when images
            are given, ``pixel_values`` (``[n_images, 3, 224, 224]``).
        """
        texts = [text] if isinstance(text, str) else list(text)
        n_placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
        imgs = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if n_placeholders != len(imgs):
            raise ValueError(
                f"the text has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(imgs)} image(s) were "
                f"given; put one {IMAGE_PLACEHOLDER} in the prompt per image (see chat_prompt())."
            )
        encoded = [self.encode_text(t) for t in texts]
        width = max(len(e) for e in encoded)
        side = padding_side or self.padding_side
        ids = torch.full((len(encoded), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            sl = slice(width - len(e), width) if side == "left" else slice(0, len(e))
            ids[row, sl] = torch.tensor(e, dtype=torch.long)
            mask[row, sl] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if imgs:
            out["pixel_values"] = self.image_processor(imgs)
        return out

    def batch_decode(self, ids, **kwargs) -> list[str]:
        """Decode generated ids (``skip_special_tokens=True`` by default)."""
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)
