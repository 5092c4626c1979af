"""`load_model` on hub-style checkpoint folders: prompts, encode/decode, yes/no ids, threshold, errors.

The folders come from `save_tiny_checkpoint` (tests/conftest.py): real transformers model and processor
classes, SmolLM2's real tokenizer, the families' chat templates. Expected values are written by hand
from the fixtures' configs (16 image tokens per image, LLaVA-1.5's and SmolVLM's prompt formats).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from skimage import data

from eah_interp.errors import EAHError, ModelLoadError
from eah_interp.models import ModelBundle, load_model
from eah_interp.models.bundle import default_threshold


def photos(n: int = 2) -> list[Image.Image]:
    """Real photos of different sizes (one greyscale) from scikit-image."""
    arrays = [data.astronaut(), data.camera(), data.chelsea(), data.coffee()]
    return [Image.fromarray(a) for a in arrays[:n]]


@pytest.fixture(scope="module")
def llava(llava_checkpoint) -> ModelBundle:
    return load_model(llava_checkpoint)


@pytest.fixture(scope="module")
def idefics3(idefics3_checkpoint) -> ModelBundle:
    return load_model(idefics3_checkpoint)


@pytest.fixture(scope="module")
def gemma3(gemma3_checkpoint) -> ModelBundle:
    return load_model(gemma3_checkpoint)


@pytest.fixture(scope="module")
def llava_next(llava_next_checkpoint) -> ModelBundle:
    return load_model(llava_next_checkpoint)


@pytest.fixture(scope="module")
def paligemma(paligemma_checkpoint) -> ModelBundle:
    with pytest.warns(UserWarning, match="no chat template but places the image itself"):
        return load_model(paligemma_checkpoint)


FAMILIES = ["llava", "llava_next", "idefics3", "gemma3", "paligemma"]
#: Image tokens per 512x512 photo: 16 (LLaVA: (28 / 7)^2; Idefics3: (56 / 7)^2 / 2^2; Gemma 3: 16 soft
#: tokens), LLaVA-NeXT 88 (see test_llava_next_anyres_counts_follow_the_image).
SQUARE_TOKENS = {"llava": 16, "llava_next": 88, "idefics3": 16, "gemma3": 16, "paligemma": 16}


# ---------------------------------------------------------------------------------------------- loading
def test_llava_folder_loads_as_the_real_classes(llava, llava_checkpoint):
    assert type(llava.model).__name__ == "LlavaForConditionalGeneration"
    assert type(llava.processor).__name__ == "LlavaProcessor"
    assert llava.name == str(llava_checkpoint)
    assert not llava.model.training
    assert llava.trained is False and "RANDOM" in llava.note  # the fixture says its weights are random


def test_idefics3_folder_loads_as_the_real_classes(idefics3):
    assert type(idefics3.model).__name__ == "Idefics3ForConditionalGeneration"
    assert type(idefics3.processor).__name__ == "Idefics3Processor"


def test_gemma3_folder_loads_as_the_real_classes(gemma3):
    assert type(gemma3.model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(gemma3.processor).__name__ == "Gemma3Processor"
    assert gemma3.caption_prompt == (  # SmolLM2's bos token, then Gemma 3's turns
        "<|im_start|><start_of_turn>user\n<start_of_image>Please describe this image in detail.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert gemma3.image_tokens == 16


def test_paligemma_prompts_are_the_bare_request(paligemma):
    # No chat template, and PaliGemma's processor puts 16 <image> tokens and bos before the text itself.
    assert type(paligemma.model).__name__ == "PaliGemmaForConditionalGeneration"
    assert paligemma.caption_prompt == "Please describe this image in detail."
    assert paligemma.yes_no_prompt("Is there a dog?") == "Is there a dog? Please answer this question with one word."
    inputs = paligemma.encode([paligemma.caption_prompt], photos(1))
    assert "labels" not in inputs  # the processor's training labels are dropped
    tokenizer = paligemma.processor.tokenizer
    assert tokenizer.decode(inputs["input_ids"][0]) == "<image>" * 16 + tokenizer.bos_token + "Please describe this image in detail.\n"


def test_prompts_follow_each_family_chat_template(llava, idefics3):
    # LLaVA-1.5's conversation format and SmolVLM's, written out by hand.
    assert llava.caption_prompt == "USER: <image>\nPlease describe this image in detail. ASSISTANT:"
    assert llava.yes_no_prompt("Is there a dog in the image?") == (
        "USER: <image>\nIs there a dog in the image? Please answer this question with one word. ASSISTANT:"
    )
    assert llava.prompt("What is this?") == "USER: <image>\nWhat is this? ASSISTANT:"
    assert idefics3.caption_prompt == (
        "<|im_start|>User:<image>Please describe this image in detail.<end_of_utterance>\nAssistant:"
    )


def test_threshold_scales_the_paper_value_by_the_image_token_count(llava, idefics3):
    # LLaVA fixture: 28 px / 7 px patches = 4 x 4 = 16 features; Idefics3: (56 / 7)^2 = 64 patches,
    # pixel shuffle by 2 -> 16 tokens. The rule: 0.0008 * 576 / 16 = 0.0288.
    for bundle in (llava, idefics3):
        assert bundle.image_tokens == 16
        assert bundle.threshold == pytest.approx(0.0288)
    assert default_threshold(576) == pytest.approx(0.0008)
    with pytest.raises(ValueError, match="at least 1"):
        default_threshold(0)


def test_yes_no_ids_are_the_tokenizer_yes_and_no(llava):
    tokenizer = llava.processor.tokenizer
    assert llava.yes_ids and llava.no_ids
    assert {tokenizer.decode([i]).strip().lower() for i in llava.yes_ids} == {"yes"}
    assert {tokenizer.decode([i]).strip().lower() for i in llava.no_ids} == {"no"}


def test_registry_names_still_load():
    bundle = load_model("tiny-llava")
    assert bundle.name == "tiny-llava" and bundle.trained is False
    assert bundle.threshold == pytest.approx(0.0008 * 576 / 16)
    assert bundle.caption_prompt == "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    assert bundle.yes_no_prompt("Is there a star?").endswith("Is there a star? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n")


def test_bfloat16_load_casts_pixel_values(llava_checkpoint):
    bundle = load_model(llava_checkpoint, dtype="bfloat16")
    assert bundle.model.dtype == torch.bfloat16
    inputs = bundle.encode([bundle.caption_prompt], photos(1))
    assert inputs["pixel_values"].dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(bundle.model(**inputs).logits).all()


# ---------------------------------------------------------------------------------------------- encode / decode
@pytest.mark.parametrize("family", FAMILIES)
def test_encode_calls_the_processor_by_keyword_and_pads_left(family, request):
    """Trap 1: HF processors take ``images=`` first; a positional call fails with "Incorrect image source"."""
    bundle = request.getfixturevalue(family)
    short, long = bundle.prompt("Hi."), bundle.prompt("Please describe this image in detail, every object in it.")
    assert [p.mode for p in photos(2)] == ["RGB", "L"]  # the greyscale camera is converted to RGB by encode
    inputs = bundle.encode([short, long], photos(2))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_id = bundle.model.config.image_token_id
    assert (ids == image_id).sum(1).tolist() == [SQUARE_TOKENS[family]] * 2  # astronaut and camera: 512x512
    n_short = len(bundle.processor.tokenizer(short.replace("<image>", "<image>" * 16), add_special_tokens=False)["input_ids"])
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1]
    pad = ids.shape[1] - lengths[0]
    assert mask[0, :pad].sum() == 0 and mask[0, pad:].all()  # left padding: generation continues each row
    if family == "llava":  # "<image>" expands to 16 copies of itself in the prompt, nothing else is added
        assert lengths[0] == n_short
    assert {v.device for v in inputs.values() if isinstance(v, torch.Tensor)} == {torch.device("cpu")}


def test_encode_rejects_mismatched_lengths(llava):
    with pytest.raises(ValueError, match="one image per prompt"):
        llava.encode([llava.caption_prompt] * 2, photos(1))


def test_decode_cuts_the_prompt_and_skips_special_tokens(llava):
    tokenizer = llava.processor.tokenizer
    inputs = llava.encode([llava.caption_prompt, llava.prompt("Hi.")], photos(2))
    answer = tokenizer("A cat on a mat.", add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [answer + [eos], answer[:2] + [eos, pad]]
    width = max(len(r) for r in rows)
    new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    output_ids = torch.cat([inputs["input_ids"], new], dim=1)
    assert llava.decode(output_ids, inputs) == ["A cat on a mat.", tokenizer.decode(answer[:2]).strip()]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_then_decode_returns_only_the_continuation(family, request):
    bundle = request.getfixturevalue(family)
    inputs = bundle.encode([bundle.caption_prompt] * 2, photos(2))
    with torch.no_grad():
        out = bundle.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    texts = bundle.decode(out, inputs)
    assert len(texts) == 2
    tokenizer = bundle.processor.tokenizer
    for text, row in zip(texts, out[:, inputs["input_ids"].shape[1] :], strict=True):
        assert text == tokenizer.decode(row, skip_special_tokens=True).strip()
        assert "Please describe" not in text and "<image>" not in text


def test_generate_texts_uses_decode(llava):
    from eah_interp.experiments import generate_texts

    texts, heads = generate_texts(llava, [llava.caption_prompt] * 2, photos(2), max_new_tokens=3, progress=False)
    inputs = llava.encode([llava.caption_prompt] * 2, photos(2))
    with torch.no_grad():
        out = llava.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert texts == [t.strip() for t in llava.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    assert heads == [[], []]


def test_processor_without_chat_template_falls_back_to_the_plain_format(llava_checkpoint, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(llava_checkpoint, folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "processor_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "processor_config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    with pytest.warns(UserWarning, match="no chat template"):
        bundle = load_model(folder)
    assert bundle.caption_prompt == "USER: <image>\nPlease describe this image in detail. ASSISTANT:"
    assert bundle.image_tokens == 16


# ---------------------------------------------------------------------------------------------- errors
def test_missing_folder_is_a_one_sentence_error(tmp_path):
    with pytest.raises(ModelLoadError, match="No model folder at") as info:
        load_model(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "llava-hf/llava-1.5-7b-hf", "organismm"])
def test_uncached_hub_id_or_unknown_name_offline_is_a_load_error(name):
    with pytest.raises(EAHError, match=f"Could not load the config of '{name}'") as info:
        load_model(name)  # a hub id (dots in the name included), not a missing folder
    assert "registry name (organism, tiny-llava)" in str(info.value) and "\n" not in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_folder_without_processor(llava_checkpoint, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(llava_checkpoint / name, folder / name)
    with pytest.raises(ModelLoadError, match="processor.save_pretrained"):
        load_model(folder)


def test_template_without_image_is_an_error(llava_checkpoint, tmp_path):
    folder = tmp_path / "blind-template"
    shutil.copytree(llava_checkpoint, folder)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}USER: {% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
        "{% endfor %}{% endfor %} ASSISTANT:"
    )
    # newer processors refuse the prompt themselves (5.24: "0 <image> tokens"); older ones (5.21) return a prompt
    # without the image token: either way load_model names the problem
    with pytest.raises(ModelLoadError, match=r"processor failed on a caption prompt with one image .*0 <image> tokens"
                                             r"|the caption prompt .* holds no image token \[49152\] after the processor"):
        load_model(folder)


def test_remote_code_needs_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "eah_custom_lvlm",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForImageTextToText": "modeling_custom.Custom"},
    }))
    with pytest.raises(ModelLoadError, match="trust_remote_code=True .CLI: --trust-remote-code") as info:
        load_model(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_dtype_and_device_with_device_map():
    with pytest.raises(ModelLoadError, match="Unknown dtype 'float8'"):
        load_model("tiny-llava", dtype="float8")
    with pytest.raises(ModelLoadError, match="not both"):
        load_model("tiny-llava", device="cpu", device_map="auto")


def test_empty_yes_no_ids_are_refused(llava):
    with pytest.raises(ModelLoadError, match="no token ids for 'yes'"):
        ModelBundle("x", llava.model, llava.processor, 0.01, True, "", [], [1], llava.template)


def test_device_map_without_accelerate_says_what_to_install(monkeypatch):
    import eah_interp.models.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "find_spec", lambda name: None if name == "accelerate" else object())
    with pytest.raises(ModelLoadError, match=r"need accelerate .*: pip install accelerate"):
        load_model("tiny-llava", device_map="auto")


def test_loading_a_folder_touches_no_network(llava_checkpoint, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    bundle = load_model(llava_checkpoint)
    assert bundle.image_tokens == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_and_eah_run_on_a_loaded_checkpoint(family, request):
    from eah_interp.experiments import generate_texts, scan_images
    from eah_interp.interventions import EAH
    from eah_interp.models import check_model, model_shape

    bundle = request.getfixturevalue(family)
    n_layers, n_heads, n_kv = model_shape(bundle.model)
    assert (n_heads, n_kv) == (4, 2) and n_layers == (4 if family == "llava" else 3)
    normalise = "rows" if family in ("gemma3", "paligemma") else "causal"  # bidirectional image attention
    assert bundle.normalise == normalise
    stats = scan_images(bundle, photos(3), batch_size=2, progress=False, normalise=normalise)
    assert stats.layers == list(range(n_layers)) and stats.n_examples(0) == 3
    assert stats.matrix("sink_density").shape == (n_layers, n_heads)
    texts, heads = generate_texts(
        bundle, [bundle.caption_prompt] * 2, photos(2), interventions=EAH.paper(threshold=bundle.threshold, normalise=normalise),
        max_new_tokens=3, progress=False,
    )
    assert len(texts) == 2 and all(len(h) == 1 for h in heads)  # one edited layer (the paper's layer 1) per item
    report = check_model(bundle.model, bundle.encode([bundle.caption_prompt, bundle.prompt("Hi.")], photos(2)))
    assert report.ok, str(report)


def test_llava_next_anyres_counts_follow_the_image(llava_next):
    bundle = llava_next
    assert type(bundle.model).__name__ == "LlavaNextForConditionalGeneration"
    # The 336x336 probe picks the 56x56 pinpoint: base view 4x4 = 16, tiles (2*4) x (2*4) = 64 features
    # (square: nothing unpadded), plus one image-newline per feature row (8): 88.
    assert bundle.image_tokens == 88
    assert bundle.threshold == pytest.approx(0.0008 * 576 / 88)
    # astronaut 512x512: square, 88 as above; coffee 400x600 (h x w): counted by an independent formula.
    images = [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee())]
    inputs = bundle.encode([bundle.caption_prompt] * 2, images)
    counts = (inputs["input_ids"] == bundle.model.config.image_token_id).sum(1).tolist()
    assert counts[0] == 88
    assert counts[1] == _anyres_tokens(400, 600)
    with torch.no_grad():
        out = bundle.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert len(bundle.decode(out, inputs)) == 2


def _anyres_tokens(height: int, width: int, patch: int = 7, base: int = 28) -> int:
    """LLaVA-NeXT's image token count for the fixture's grid, written from the AnyRes description.

    Best pinpoint: the one keeping the most of the image's resolution (then the least waste); the
    feature grid of the tiles is unpadded back to the image's aspect ratio; one newline per row.
    """
    pinpoints = [(28, 28), (28, 56), (56, 28), (56, 56)]  # (height, width)
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pw * ph - effective))
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    rows, cols = best[0] // base * (base // patch), best[1] // base * (base // patch)
    if width / height > cols / rows:  # wider than the grid: rows are cut
        new_rows = int(round(height * cols / width, 7))
        pad = (rows - new_rows) // 2
        rows = rows - 2 * pad
    else:
        new_cols = int(round(width * rows / height, 7))
        pad = (cols - new_cols) // 2
        cols = cols - 2 * pad
    return (base // patch) ** 2 + rows * cols + rows


def test_flash_attention_is_refused_at_load():
    with pytest.raises(ModelLoadError, match="cannot expose attention probabilities"):
        load_model("tiny-llava", attn_implementation="flash_attention_2")


def test_registry_model_takes_eager_attention():
    from eah_interp.models import text_config

    assert text_config(load_model("tiny-llava").model)._attn_implementation == "sdpa"
    assert text_config(load_model("tiny-llava", attn_implementation="eager").model)._attn_implementation == "eager"


def test_repr_says_what_was_loaded_in_one_line(llava, llava_checkpoint):
    assert repr(llava) == (
        f"ModelBundle({str(llava_checkpoint)!r}: LlavaForConditionalGeneration, 4 layers x 4 heads (2 KV), "
        "16 image tokens, threshold 0.0288, device cpu, RANDOM weights)"
    )


def test_a_hub_id_loads_from_the_local_hub_cache_offline(llava_checkpoint, tmp_path):
    """``load_model("org/name")`` finds a model in the hub cache (the layout huggingface_hub writes) offline."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(llava_checkpoint, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "OMP_NUM_THREADS": "1"}
    code = "from eah_interp.models import load_model\nprint(repr(load_model('tiny-org/tiny-llava')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("ModelBundle('tiny-org/tiny-llava': LlavaForConditionalGeneration, 4 layers")
