"""Shared test settings and fixtures."""

import os

import pytest
import torch

# Nothing in the tests may reach the model hub: loading a checkpoint folder must work offline.
os.environ["HF_HUB_OFFLINE"] = "1"

# Tiny models: thread hand-offs cost more than the maths on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llava_checkpoint(tmp_path_factory):
    """A hub-style LLaVA-1.5 folder (tiny random model, SmolLM2's tokenizer, LLaVA-1.5's chat template)."""
    from eah_interp.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("llava", tmp_path_factory.mktemp("llava-checkpoint"))


@pytest.fixture(scope="session")
def llava_next_checkpoint(tmp_path_factory):
    """A hub-style LLaVA-NeXT folder (AnyRes tiles; LLaVA-1.5's chat format, SmolLM2's tokenizer)."""
    from eah_interp.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("llava_next", tmp_path_factory.mktemp("llava-next-checkpoint"))


@pytest.fixture(scope="session")
def idefics3_checkpoint(tmp_path_factory):
    """A hub-style Idefics3 (SmolVLM v1 format) folder: tiny random model, SmolLM2's tokenizer, SmolVLM's template."""
    from eah_interp.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("idefics3", tmp_path_factory.mktemp("idefics3-checkpoint"))


@pytest.fixture(scope="session")
def gemma3_checkpoint(tmp_path_factory):
    """A hub-style Gemma 3 folder (bidirectional attention within an image; Gemma 3's turn format)."""
    from eah_interp.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("gemma3", tmp_path_factory.mktemp("gemma3-checkpoint"))


@pytest.fixture(scope="session")
def paligemma_checkpoint(tmp_path_factory):
    """A hub-style PaliGemma folder (no chat template: the processor places the image; bidirectional prefix)."""
    from eah_interp.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint("paligemma", tmp_path_factory.mktemp("paligemma-checkpoint"))
