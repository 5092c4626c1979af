"""`load_model(name_or_path)`: a model, its processor and the prompt and threshold conventions that go with it.

``load_model`` takes a registry name (``"organism"``, ``"tiny-llava"``) or any hub id / local folder
written by ``save_pretrained`` that transformers' ``AutoModelForImageTextToText`` (the older auto
classes as a fallback) and ``AutoProcessor`` load. The `ModelBundle` it returns is all the runners
(CLI, evaluation) use: prompts built with the processor's chat template, batched inputs on the
execution device, decoding of the generated continuation, yes/no token ids and a sink threshold for
the model's image-token count.

    >>> bundle = load_model("path/to/llava-1.5-7b-hf", dtype="bfloat16", device_map="auto")
    >>> inputs = bundle.encode([bundle.caption_prompt], [image])
    >>> bundle.decode(bundle.model.generate(**inputs, max_new_tokens=64), inputs)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from eah_interp.errors import EAHError, ModelLoadError, UnsupportedModelError
from eah_interp.models.introspect import execution_device
from eah_interp.sinks import OFFICIAL_THRESHOLD

#: The paper's threshold 0.0008 is tuned for LLaVA-1.5's 576 image tokens. Sink scores are averages of
#: attention shares, which scale roughly with 1 / prompt length, so for the organism's 49 image tokens
#: the threshold is scaled by 576 / 49 (0.0094) and rounded: 0.01.
ORGANISM_THRESHOLD = 0.01

#: Image tokens of LLaVA-1.5 at 336 px, for which the official threshold 0.0008 was tuned.
PAPER_IMAGE_TOKENS = 576

#: The caption request of the CHAIR protocol (OPERA's ``chair_eval.py``, shikiw/OPERA: 500 COCO val2014
#: images, this request, ``max_new_tokens=512``), which the EAH paper follows.
CAPTION_REQUEST = "Please describe this image in detail."

#: Appended to a POPE question, as VCD's POPE script for LLaVA-1.5 does (DAMO-NLP-SG/VCD,
#: ``experiments/eval/object_hallucination_vqa_llava.py``: ``qs + " Please answer this question with one
#: word."``). OPERA's ``pope_eval.py`` sends the bare question instead: set ``bundle.yes_no_suffix = ""``.
POPE_SUFFIX = " Please answer this question with one word."

#: The plain prompt used when a processor has no chat template: LLaVA-1.5's conversation format.
PLAIN_FORMAT = "USER: {image}\n{text} ASSISTANT:"

#: Registry names `load_model` knows besides paths and hub ids.
REGISTRY = ("organism", "tiny-llava")


def default_threshold(image_tokens: int) -> float:
    """The sink threshold for a prompt with ``image_tokens`` image tokens: ``0.0008 * 576 / image_tokens``.

    0.0008 is the official EAH code's threshold, tuned for LLaVA-1.5's 576 image tokens. Sink scores are
    averages of attention shares, which shrink roughly like 1 / (tokens a row can see), so the threshold
    is scaled by the ratio of image-token counts. The scaling is eah-interp's rule, not the paper's.
    """
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be at least 1, got {image_tokens}.")
    return OFFICIAL_THRESHOLD * PAPER_IMAGE_TOKENS / image_tokens


@dataclass(repr=False)
class ModelBundle:
    """A loaded LVLM with what the CLI and runners need to drive it.

    Attributes:
        name: the registry name, hub id or folder it was loaded from.
        model: the HF model (eval mode).
        processor: the processor, called as ``processor(text=..., images=...)``, with ``batch_decode``.
        threshold: the sink threshold suited to the model's image-token count (`default_threshold`).
        trained: False for random-weight stand-ins (their text is not language).
        note: a sentence to show users about this model.
        yes_ids, no_ids: first-token ids of "yes" / "no" variants (never empty).
        template: wraps a user request into the full prompt with one image (the chat template).
        caption_request: the request behind `caption_prompt`.
        yes_no_suffix: appended to a yes/no question by `yes_no_prompt`.
        processor_kwargs: extra keywords of every processor call (``return_tensors``, ``padding``).
        images_per_prompt: pass images as one list per prompt (``[[image], ...]``, HF processors).
        image_tokens: image tokens in the caption prompt (what the threshold was scaled by).
    """

    name: str
    model: Any
    processor: Any
    threshold: float
    trained: bool
    note: str
    yes_ids: list[int]
    no_ids: list[int]
    template: Callable[[str], str]
    caption_request: str = CAPTION_REQUEST
    yes_no_suffix: str = POPE_SUFFIX
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    images_per_prompt: bool = False
    image_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.yes_ids or not self.no_ids:
            raise ModelLoadError(
                f"{self.name}: the tokenizer gave no token ids for 'yes' ({self.yes_ids}) or 'no' ({self.no_ids}); "
                "yes/no probes need both. Pass ModelBundle(yes_ids=..., no_ids=...) by hand."
            )

    def __repr__(self) -> str:
        from eah_interp.models.introspect import model_shape

        layers, heads, kv = model_shape(self.model)
        return (
            f"ModelBundle({self.name!r}: {type(self.model).__name__}, {layers} layers x {heads} heads ({kv} KV), "
            f"{self.image_tokens} image tokens, threshold {self.threshold:.3g}, device {self.device}, "
            f"{'trained' if self.trained else 'RANDOM weights'})"
        )

    def intervention_defaults(self) -> dict[str, dict[str, Any]]:
        """Model-aware defaults of the spec grammar (`eah_interp.interventions.parse`'s ``defaults``):
        EAH's sink threshold scaled to this model's image tokens (`threshold`)."""
        return {"EAH": {"threshold": self.threshold}}

    # ------------------------------------------------------------------ prompts
    def prompt(self, text: str) -> str:
        """Any user request (``"Please describe this image in detail."``) as a full prompt with one image."""
        return self.template(text)

    @property
    def caption_prompt(self) -> str:
        """The caption request (`caption_request`) as a full prompt with one image."""
        return self.prompt(self.caption_request)

    def yes_no_prompt(self, question: str) -> str:
        """A yes/no question (``"Is there a dog in the image?"``) with `yes_no_suffix`, as a full prompt."""
        return self.prompt(question.rstrip() + self.yes_no_suffix)

    @property
    def normalise(self) -> str:
        """The sink normaliser for this family: ``"rows"`` where image tokens attend bidirectionally, else ``"causal"``."""
        from eah_interp.models.adapters import adapter_for

        return "rows" if adapter_for(self.model).bidirectional_image_attention else "causal"

    # ------------------------------------------------------------------ inputs and outputs
    @property
    def device(self) -> torch.device:
        """Where the inputs go: the execution device (`eah_interp.models.introspect.execution_device`).

        Under accelerate's ``device_map`` with offloading the embedding weights sit on ``meta``; the
        execution device is the one the offload hook runs them on.
        """
        return execution_device(self.model)

    def encode(self, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]:
        """Batched, padded model inputs for prompt/image pairs, on `device`.

        Args:
            prompts: full prompts (from `prompt`, `caption_prompt`, `yes_no_prompt`), one image each.
            images: PIL images (converted to RGB), as many as prompts.

        Returns:
            The processor's output (``input_ids`` ``[batch, seq]`` left-padded, ``attention_mask``,
            ``pixel_values`` and the family's extras), tensors on `device`, floating ones in the model's dtype.
        """
        prompts, images = list(prompts), list(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images; pass one image per prompt.")
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
        if self.images_per_prompt:  # HF processors: one list of images per prompt (Gemma 3 reads a flat list as one sample)
            images = [[image] for image in images]
        inputs = self.processor(text=prompts, images=images, **self.processor_kwargs)
        device, dtype = self.device, getattr(self.model, "dtype", None)
        out = {}
        for key, value in inputs.items():
            if key == "labels":  # PaliGemma's processor adds training labels: not an inference input
                continue
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype) if value.is_floating_point() and dtype is not None else value.to(device)
            out[key] = value
        return out

    def decode(self, output_ids: torch.Tensor, inputs: dict[str, Any]) -> list[str]:
        """The generated continuations of ``model.generate(**inputs)``: prompt cut off, special tokens skipped, stripped."""
        prompt_len = inputs["input_ids"].shape[1]
        texts = self.processor.batch_decode(output_ids[:, prompt_len:], skip_special_tokens=True)
        return [t.strip() for t in texts]


# ---------------------------------------------------------------------------------------------- load_model
def load_model(
    name_or_path: str | Path = "organism",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    offload_folder: str | Path | None = None,
    max_memory: dict[Any, Any] | None = None,
) -> ModelBundle:
    """Load an LVLM as a `ModelBundle`: a registry name, a hub id or a ``save_pretrained`` folder.

    Args:
        name_or_path: ``"organism"`` (the bundled trained LVLM), ``"tiny-llava"`` (random weights), a
            local folder or a hub id (``"llava-hf/llava-1.5-7b-hf"``; from the local cache when offline).
        dtype: parameter dtype (``torch.bfloat16`` or ``"bfloat16"``, ``"float16"``, ``"float32"``,
            ``"auto"``); default: float32 for registry models, transformers' default for checkpoints.
        device: move the model there (``"cuda"``, ``"cuda:1"``); not with ``device_map``.
        device_map: accelerate's placement; ``offload_folder`` / ``max_memory`` go with it. A strategy
            (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) keeps the vision tower, the
            projector and the input embeddings on one device while the decoder layers spread
            (`eah_interp.models.placement.auto_device_map`); a dict is used as given (a warning if it
            splits those parts).
        attn_implementation: of the language model (``"sdpa"`` or ``"eager"``).
        trust_remote_code: allow a checkpoint's own modelling code (only for code you trust).

    Returns:
        A `ModelBundle` in eval mode.

    Raises:
        ModelLoadError: no such folder, no processor, no image token, remote code needed, a bad dtype;
            the message names the fix.
        UnsupportedModelError: a model eah-interp cannot instrument.
    """
    if device is not None and device_map is not None:
        raise ModelLoadError("Pass device or device_map, not both (device_map places the model itself).")
    if attn_implementation not in ("sdpa", "eager"):
        raise ModelLoadError(
            f"attn_implementation={attn_implementation!r} cannot expose attention probabilities to eah-interp; "
            "pass 'sdpa' (default) or 'eager'."
        )
    torch_dtype = _resolve_dtype(dtype)
    if (device_map is not None or offload_folder is not None or max_memory is not None) and find_spec("accelerate") is None:
        raise ModelLoadError(
            "device_map, offload_folder and max_memory need accelerate (a dependency of transformer-lens, "
            "missing here): pip install accelerate."
        )
    name = str(name_or_path)
    if name in REGISTRY:
        if device_map is not None:
            raise ModelLoadError(f"{name!r} is a small registry model: pass device=..., not device_map.")
        bundle = _registry_bundle(name)
        if attn_implementation != "sdpa":  # registry models are built with SDPA in the decoder
            bundle.model.set_attn_implementation({"text_config": attn_implementation})
        if isinstance(torch_dtype, torch.dtype):
            bundle.model.to(torch_dtype)
            if hasattr(bundle.processor, "dtype"):
                bundle.processor.dtype = torch_dtype
        if device is not None:
            bundle.model.to(device)
        return bundle
    bundle = _checkpoint_bundle(
        name, dtype=torch_dtype, device_map=device_map, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, offload_folder=offload_folder, max_memory=max_memory,
    )
    if device is not None:
        bundle.model.to(device)
    return bundle


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; choose one of float32, float16, bfloat16 or auto.")
    return _DTYPES[key]


def _registry_bundle(name: str) -> ModelBundle:
    from eah_interp.metrics.probes import answer_token_ids
    from eah_interp.models.organism.processor import CAPTION_QUESTION, YES_NO_SUFFIX, chat_prompt

    if name == "organism":  # both registry models take the organism's chat format
        from eah_interp.models.organism import load_organism

        model, processor = load_organism()
        ids = answer_token_ids(processor.tokenizer)
        return ModelBundle(
            name, model, processor, ORGANISM_THRESHOLD, True,
            "the bundled organism: EfficientNet-Lite0 + SmolLM2-135M-Instruct, trained on the synthetic scene world",
            ids["yes"], ids["no"], chat_prompt, caption_request=CAPTION_QUESTION, yes_no_suffix=YES_NO_SUFFIX,
            image_tokens=processor.num_image_tokens,
        )
    from eah_interp.models.tiny import TinyProcessor, tiny_llava

    model = tiny_llava()
    processor = TinyProcessor(model)
    return ModelBundle(
        name, model, processor, default_threshold(processor.n_image), False,
        "a tiny RANDOM-WEIGHT LLaVA (real HF classes, no training): the pipeline runs, the text is noise",
        processor.encode_text("Yes")[1:2], processor.encode_text("No")[1:2], chat_prompt,
        caption_request=CAPTION_QUESTION, yes_no_suffix=YES_NO_SUFFIX, image_tokens=processor.n_image,
    )


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _checkpoint_bundle(
    name: str,
    *,
    dtype: torch.dtype | str | None,
    device_map: Any,
    attn_implementation: str,
    trust_remote_code: bool,
    offload_folder: str | Path | None,
    max_memory: Any,
) -> ModelBundle:
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the folder save_pretrained wrote (with config.json).")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json, so it is not a save_pretrained folder; pass the folder that "
                f"holds config.json, or a registry name ({', '.join(REGISTRY)})."
            )
        source = str(path)
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"No model folder at {name}; pass an existing save_pretrained folder, a hub id (org/name) or a "
            f"registry name ({', '.join(REGISTRY)})."
        )
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError / ValueError with long messages
        raise _load_error(name, "config", error) from error
    model = _load_weights(
        source, config, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, offload_folder=offload_folder, max_memory=max_memory,
    )
    model.eval()
    processor = _load_processor(name, source, trust_remote_code)
    return bundle_for(name, model, processor)


def _load_error(name: str, what: str, error: Exception) -> ModelLoadError:
    text = str(error)
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    if "trust_remote_code" in text:
        return ModelLoadError(
            f"{name} needs its own modelling code; if you trust it, pass trust_remote_code=True (CLI: --trust-remote-code)."
        )
    return ModelLoadError(
        f"Could not load the {what} of {name!r} ({first[:200]}); pass a save_pretrained folder, a hub id that is "
        f"in the local cache (no network is used when HF_HUB_OFFLINE=1) or a registry name ({', '.join(REGISTRY)})."
    )


def _load_weights(source: str, config: Any, **kwargs: Any):
    import transformers

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    attn = kwargs.pop("attn_implementation")
    auto_classes = [
        getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
        if hasattr(transformers, n)
    ]
    unrecognised = []
    for auto in auto_classes:
        try:
            if isinstance(kwargs.get("device_map"), str):  # a strategy: accelerate's map, the image path pinned
                kwargs["device_map"] = _pinned_device_map(auto, config, kwargs)
            model = auto.from_pretrained(source, config=config, attn_implementation=attn, **kwargs)
            if isinstance(kwargs.get("device_map"), dict):
                from eah_interp.models.placement import check_explicit_map

                check_explicit_map(model, kwargs["device_map"], stacklevel=5)
            return model
        except ValueError as error:
            text = str(error)
            if "Unrecognized configuration class" in text:
                unrecognised.append(auto.__name__)
                continue
            if "does not support" in text and attn != "eager":  # a vision tower without SDPA: only the text decoder's
                try:
                    return auto.from_pretrained(
                        source, config=config, attn_implementation={"text_config": attn, "vision_config": "eager"}, **kwargs
                    )
                except Exception as retry:
                    raise _load_error(source, "weights", retry) from retry
            raise _load_error(source, "weights", error) from error
        except OSError as error:
            raise _load_error(source, "weights", error) from error
    raise UnsupportedModelError(
        f"{type(config).__name__} ({source}) is not a model type {', '.join(unrecognised)} can load; eah-interp "
        "needs an image-text-to-text model (an LVLM)."
    )


def _pinned_device_map(auto: Any, config: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained``'s map for a strategy (``"auto"``, ...), with the vision tower, projector and input
    embeddings on one device (`eah_interp.models.placement.auto_device_map`), computed on an empty skeleton."""
    from accelerate import init_empty_weights

    from eah_interp.models.placement import auto_device_map

    dtype = kwargs.get("dtype")
    if not isinstance(dtype, torch.dtype):  # None or "auto": what transformers reads from the config
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = _DTYPES.get(str(dtype).removeprefix("torch."), None) if not isinstance(dtype, torch.dtype) else dtype
    extra = {"trust_remote_code": True} if kwargs.get("trust_remote_code") else {}
    with init_empty_weights():
        skeleton = auto.from_config(config, **extra)
    return auto_device_map(skeleton, kwargs["device_map"], max_memory=kwargs.get("max_memory"), dtype=dtype)


def _load_processor(name: str, source: str, trust_remote_code: bool):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise ModelLoadError(
            f"{name} has no loadable processor ({str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__}); "
            "save the model's processor into the folder with processor.save_pretrained(folder)."
        ) from error
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(
            f"{name} has only a {type(processor).__name__}, no multimodal processor (image processor + tokenizer); "
            "save the model's processor into the folder with processor.save_pretrained(folder)."
        )
    return processor


def _chat_template(processor: Any) -> Callable[[str], str]:
    """The processor's chat template as ``request -> prompt`` (one user turn: an image, then the text)."""

    def wrap(text: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    return wrap


def _bare_template(text: str) -> str:
    """The request itself: for processors that put the image (and the turn format) in place themselves."""
    return text


def _image_tokens(processor: Any, prompt: str, image: Any, visual: Sequence[int], kwargs: dict[str, Any]) -> int:
    """Image tokens in ``processor(text=[prompt], images=[[image]])``; 0 if the processor refuses the prompt."""
    try:
        inputs = processor(text=[prompt], images=[[image]], **kwargs)
    except Exception:  # e.g. "the number of image tokens does not match the number of images"
        return 0
    return int(sum(int((inputs["input_ids"] == i).sum()) for i in visual))


def _plain_template(image_token: str) -> Callable[[str], str]:
    def wrap(text: str) -> str:
        return PLAIN_FORMAT.format(image=image_token, text=text)

    return wrap


def bundle_for(name: str, model: Any, processor: Any) -> ModelBundle:
    """The bundle of an HF model and processor loaded by someone else (what `load_model` builds after loading).

    It finds the chat template, the yes/no ids and the sink threshold (`default_threshold` of the image tokens
    of a caption prompt with one 336 px image), and sets what generation needs: the tokenizer pads on the left
    and has a pad token, and ``model.generation_config.pad_token_id`` is set.

    Raises:
        ModelLoadError: the model's config has no image token id (register an adapter, docs/new_model.md).
    """
    from PIL import Image

    from eah_interp.metrics.probes import answer_token_ids
    from eah_interp.models.adapters import adapter_for

    adapter = adapter_for(model)
    visual = adapter.visual_token_ids(model)
    if not visual:
        raise ModelLoadError(
            f"{name}: the config of {type(model).__name__} has no image token id ({', '.join(adapter.image_token_attrs)}), "
            "so eah-interp cannot find image positions; register an adapter (docs/new_model.md)."
        )
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    kwargs = {"return_tensors": "pt", "padding": True}
    probe = Image.new("RGB", (336, 336), (128, 128, 128))  # LLaVA-1.5's input size; size-dependent processors use it as is
    if getattr(processor, "chat_template", None):
        template = _chat_template(processor)
    elif _image_tokens(processor, CAPTION_REQUEST, probe, visual, kwargs) > 0:
        warnings.warn(
            f"{name}'s processor has no chat template but places the image itself (as PaliGemma's and InstructBLIP's "
            "do): prompts are the bare request. Save a chat template with the processor if the model expects one.",
            stacklevel=3,
        )
        template = _bare_template
    else:
        image_token = getattr(processor, "image_token", None) or "<image>"
        warnings.warn(
            f"{name}'s processor has no chat template; prompts use the plain format {PLAIN_FORMAT!r} with "
            f"{image_token!r}. Save a chat template with the processor if the model expects another format.",
            stacklevel=3,
        )
        template = _plain_template(image_token)
    ids = answer_token_ids(tokenizer)
    random_weights = bool(getattr(model.config, "eah_interp_random_weights", False))
    bundle = ModelBundle(
        name, model, processor, OFFICIAL_THRESHOLD, not random_weights,
        f"{type(model).__name__} from {name}" + (" (RANDOM weights: the text is noise)" if random_weights else ""),
        ids["yes"], ids["no"], template, processor_kwargs=kwargs, images_per_prompt=True,
    )
    try:
        inputs = bundle.processor(text=[bundle.caption_prompt], images=[[probe]], **bundle.processor_kwargs)
    except EAHError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"{name}: the processor failed on a caption prompt with one image ({str(error).strip()[:200]}); "
            "check the processor and chat template saved with the model."
        ) from error
    count = int(sum(int((inputs["input_ids"] == i).sum()) for i in visual))
    if count == 0:
        raise ModelLoadError(
            f"{name}: the caption prompt {bundle.caption_prompt!r} holds no image token {list(visual)} after the "
            "processor; the chat template or the processor's image token does not match the model's config."
        )
    bundle.image_tokens = count
    bundle.threshold = default_threshold(count)
    return bundle
