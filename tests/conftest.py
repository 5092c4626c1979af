"""Shared test settings."""

import torch

# Tiny models: thread hand-offs cost more than the maths on a shared 2-core machine.
torch.set_num_threads(1)
