"""Trap 2: `ModelBundle.device` is the execution device, also when accelerate offloads the embeddings.

Under ``device_map`` with offloading, the input embeddings' weight sits on ``meta`` and accelerate's
hook moves it (and the inputs) to the execution device at call time. The old ``device`` read the
weight's device (``meta``), so every runner failed with "Tensor.item() cannot be called on meta
tensors". Here a tiny LLaVA checkpoint is loaded with its embeddings, first decoder layers and LM head
offloaded to disk, and scan statistics, generation and EAH are compared with the plain load.
"""

from __future__ import annotations

import types

import pytest
import torch
from PIL import Image
from skimage import data

from eah_interp import hf
from eah_interp.experiments import generate_texts, scan_images
from eah_interp.head_stats import STATISTICS
from eah_interp.interventions import EAH
from eah_interp.models import execution_device, load_model

pytest.importorskip("accelerate")

DISK = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.language_model.embed_tokens": "disk",
    "model.language_model.layers.0": "disk",
    "model.language_model.layers.1": "disk",
    "model.language_model.layers.2": "cpu",
    "model.language_model.layers.3": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def pair(llava_checkpoint, tmp_path_factory):
    plain = load_model(llava_checkpoint)
    offloaded = load_model(llava_checkpoint, device_map=DISK, offload_folder=tmp_path_factory.mktemp("offload"))
    return plain, offloaded


def images():
    return [Image.fromarray(a) for a in (data.astronaut(), data.chelsea(), data.coffee())]


def test_offloaded_embeddings_are_meta_but_the_device_is_the_cpu(pair):
    _, offloaded = pair
    assert offloaded.model.get_input_embeddings().weight.device.type == "meta"  # what the old property returned
    assert offloaded.device == torch.device("cpu")
    inputs = offloaded.encode([offloaded.caption_prompt], images()[:1])
    assert {v.device for v in inputs.values() if isinstance(v, torch.Tensor)} == {torch.device("cpu")}


def test_scan_statistics_equal_the_plain_load(pair):
    plain, offloaded = pair
    stats = [scan_images(b, images(), batch_size=2, progress=False) for b in pair]
    for stat in STATISTICS:
        torch.testing.assert_close(stats[1].matrix(stat), stats[0].matrix(stat), rtol=0, atol=1e-6)
    assert stats[1].n_examples(0) == 3


def test_generation_and_eah_equal_the_plain_load(pair):
    plain, offloaded = pair
    prompts = [plain.caption_prompt] * 3
    config = EAH.paper(threshold=0.0)  # every head ties at all-sinks: head 0 is broadcast (an active edit)
    results = [
        (generate_texts(b, prompts, images(), max_new_tokens=6, progress=False, batch_size=2),
         generate_texts(b, prompts, images(), interventions=config, max_new_tokens=6, progress=False, batch_size=2))
        for b in pair
    ]
    assert results[1] == results[0]
    (_, _), (_, heads) = results[0]
    assert all(len(h) == 1 and 0 <= h[0] < 4 for h in heads)
    # The edit is active (EAH logits differ from the baseline) and the same on both loads.
    logits = []
    for bundle in pair:
        inputs = bundle.encode(prompts[:2], images()[:2])
        with torch.no_grad():
            base = bundle.model(**inputs).logits
            with hf.eah(bundle.model, config):
                edited = bundle.model(**inputs).logits
        logits.append((base, edited))
    assert (logits[0][1] - logits[0][0]).abs().max() > 1e-4
    torch.testing.assert_close(logits[1][1], logits[0][1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the rules
def test_execution_device_rules(llava_checkpoint):
    bundle = load_model(llava_checkpoint)
    model = bundle.model
    assert execution_device(model) == torch.device("cpu")  # rule 3: a plain model's parameters
    model.hf_device_map = {"model.vision_tower": "cpu", "model.language_model": 1, "lm_head": "disk"}
    try:
        assert execution_device(model) == torch.device("cuda:1")  # rule 2: accelerate's main device
        model.hf_device_map = {"": "cpu"}
        assert execution_device(model) == torch.device("cpu")
        # rule 1: an offload hook on a parent of the embeddings wins over the device map
        model.model.language_model._hf_hook = types.SimpleNamespace(execution_device=2)
        assert execution_device(model) == torch.device("cuda:2")
        model.get_input_embeddings()._hf_hook = types.SimpleNamespace(execution_device="cuda:3")
        assert execution_device(model) == torch.device("cuda:3")  # the deepest hook first
    finally:
        del model.hf_device_map
        for module in (model.model.language_model, model.get_input_embeddings()):
            if hasattr(module, "_hf_hook"):
                del module._hf_hook
