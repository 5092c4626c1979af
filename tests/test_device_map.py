"""`load_model(device_map="auto")` keeps the vision tower, the projector and the input embeddings on one device.

The trap: accelerate fills devices in module order, so a full first GPU leaves (part of) the vision tower
there and the input embeddings on the next one, and the forward fails writing image features into the
embeddings ("tensors on different devices"). accelerate computes maps for device indices that are not
present, so the placement is checked here on CPU with budgets for two fake GPUs; the load itself is
checked with a CPU budget that sends the decoder to disk.

The checks are independent of eah-interp's map code: every parameter's device is looked up by the
longest key of the map (accelerate's rule), and a device's load is the sum of its parameters' bytes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from eah_interp.models import load_model
from eah_interp.models.tiny import tiny_family

pytest.importorskip("accelerate")

from accelerate import infer_auto_device_map  # noqa: E402

from eah_interp.models.placement import auto_device_map, check_explicit_map  # noqa: E402

#: Per family: parameter-name prefixes of the image path (written out by hand) and of the decoder layers.
IMAGE_PATH = {
    "llava": (("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.embed_tokens."),
              "model.language_model.layers."),
    "qwen2_vl": (("model.visual.", "model.language_model.embed_tokens."), "model.language_model.layers."),
    "gemma3": (("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.embed_tokens."),
               "model.language_model.layers."),
    "instructblip": (("query_tokens", "vision_model.", "qformer.", "language_projection.",
                      "language_model.model.embed_tokens."), "language_model.model.layers."),
}


def placement(model, device_map) -> dict[str, object]:
    """Parameter name -> device, by the longest map key that is the name or one of its prefixes."""
    out = {}
    for name, _ in model.named_parameters():
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        assert keys, f"{name} is not placed by the map"
        out[name] = device_map[max(keys, key=len)]
    return out


def budgets(model):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {0: int(total * 0.3), 1: int(total * 0.4), "cpu": 2 * total}


@pytest.mark.parametrize("family", sorted(IMAGE_PATH))
def test_auto_map_keeps_the_image_path_on_one_device_and_spreads_the_decoder(family):
    model, _ = tiny_family(family)
    prefixes, layers = IMAGE_PATH[family]
    max_memory = budgets(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # accelerate: "Device 0 is not available"
        plain = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules)
        pinned = auto_device_map(model, "sequential", max_memory=max_memory)
    front = lambda where: {d for n, d in where.items() if n.startswith(prefixes)}  # noqa: E731
    assert len(front(placement(model, plain))) > 1  # the trap is real with these budgets
    where = placement(model, pinned)
    assert len(front(where)) == 1, front(where)
    assert len({d for n, d in where.items() if n.startswith(layers)}) > 1  # the decoder still spreads
    for device, room in max_memory.items():  # no device over its budget
        used = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if where[n] == device)
        assert used <= room, (device, used, room)
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:  # tied: one tensor, one device
        assert {d for n, d in where.items() if n.startswith("lm_head")} <= front(where)
    assert next(d for d in pinned.values() if d not in ("cpu", "disk")) == front(where).pop()  # accelerate's main device


def test_explicit_map_splitting_the_image_path_warns():
    model, _ = tiny_family("llava")
    split = {"model.vision_tower": 0, "model.multi_modal_projector": 0, "model.language_model": 1, "lm_head": 1}
    with pytest.warns(UserWarning, match="model.vision_tower, model.multi_modal_projector on another device"):
        check_explicit_map(model, split)
    together = {"model.vision_tower": "cpu", "model.multi_modal_projector": 0, "model.language_model": 0, "lm_head": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # offloaded to the CPU: runs on the main device (0), no split
        check_explicit_map(model, together)


def test_load_model_auto_with_disk_offload_equals_the_plain_load(llava_checkpoint, tmp_path):
    plain = load_model(llava_checkpoint)
    model = plain.model
    image_path = ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens")
    front = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(image_path))
    layer = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the pinned map never triggers the split warning
        warnings.filterwarnings("ignore", message=".*(torchvision|offload|meta device).*")
        auto = load_model(llava_checkpoint, device_map="auto", max_memory={"cpu": front + layer // 2},
                          offload_folder=tmp_path)
    device_map = auto.model.hf_device_map
    where = placement(auto.model, device_map)
    assert {d for n, d in where.items() if n.startswith(image_path)} == {"cpu"}
    assert {d for n, d in where.items() if n.startswith("model.language_model.layers.")} == {"disk"}
    images = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 90, 200))]
    logits = []
    for bundle in (plain, auto):
        inputs = bundle.encode([bundle.caption_prompt] * 2, images)
        with torch.no_grad():
            logits.append(bundle.model(**inputs).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
