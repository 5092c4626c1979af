"""`load_model(name)`: a model, its processor and the prompt and threshold conventions that go with it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eah_interp.errors import UnsupportedModelError

#: The paper's threshold 0.0008 is tuned for LLaVA-1.5's 576 image tokens. Sink scores are averages of
#: attention shares, which scale roughly with 1 / prompt length, so for the organism's 49 image tokens
#: the threshold is scaled by 576 / 49 (0.0094) and rounded: 0.01.
ORGANISM_THRESHOLD = 0.01


@dataclass
class ModelBundle:
    """A loaded LVLM with what the CLI and runners need to drive it.

    Attributes:
        name: registry name (``"organism"`` or ``"tiny-llava"``).
        model: the HF model (eval mode).
        processor: callable ``processor(prompts, images) -> inputs`` with ``batch_decode``.
        caption_prompt: the prompt asking for a caption (with one ``<image>`` placeholder).
        yes_no_prompt: maps a question to a yes/no prompt.
        threshold: the sink threshold suited to the model's image-token count.
        trained: False for random-weight stand-ins (their text is not language).
        note: a sentence to show users about this model.
    """

    name: str
    model: Any
    processor: Any
    caption_prompt: str
    yes_no_prompt: Callable[[str], str]
    threshold: float
    trained: bool
    note: str
    yes_ids: list[int] = field(default_factory=list)
    no_ids: list[int] = field(default_factory=list)

    @property
    def device(self):
        """Where the model takes its inputs: the device of its input embeddings (first device under ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    def encode(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]:
        """``processor(prompts, images)`` with every tensor moved to `device`: what the runners feed the model."""
        inputs = self.processor(list(prompts), list(images))
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}


def load_model(name: str = "organism", device: str | None = None) -> ModelBundle:
    """Load a model by registry name: ``"organism"`` (the bundled trained LVLM) or ``"tiny-llava"`` (random).

    Args:
        name: the registry name.
        device: move the model there (``"cuda"``, ``"cuda:1"``, ...); default: stay on the CPU.
    """
    bundle = _load_bundle(name)
    if device is not None:
        bundle.model.to(device)
    return bundle


def _load_bundle(name: str) -> ModelBundle:
    if name == "organism":
        from eah_interp.metrics import answer_token_ids
        from eah_interp.models.organism import caption_prompt, load_organism, yes_no_prompt

        model, processor = load_organism()
        ids = answer_token_ids(processor.tokenizer)
        return ModelBundle(
            name, model, processor, caption_prompt(), yes_no_prompt, ORGANISM_THRESHOLD, True,
            "the bundled organism: EfficientNet-Lite0 + SmolLM2-135M-Instruct, trained on the synthetic scene world",
            ids["yes"], ids["no"],
        )
    if name == "tiny-llava":
        from eah_interp._testing import TinyProcessor, tiny_llava
        from eah_interp.models.organism.processor import caption_prompt, yes_no_prompt

        model = tiny_llava()
        processor = TinyProcessor(model)
        return ModelBundle(
            name, model, processor, caption_prompt(), yes_no_prompt, 0.0008 * 576 / 16, False,
            "a tiny RANDOM-WEIGHT LLaVA (real HF classes, no training): the pipeline runs, the text is noise",
            processor.encode_text("Yes")[1:2], processor.encode_text("No")[1:2],
        )
    raise UnsupportedModelError(f"Unknown model {name!r}; choose 'organism' or 'tiny-llava'.")
