"""Tests for patchmine.receptive: analytic receptive fields against the gradient method.

The contract (DESIGN.md, "Receptive fields"): make the network linear with positive weights
(constant conv / linear weights, norms and activations as identity, max-pool as average-pool),
backprop one unit; the box of nonzero input gradients must equal the analytic box clipped to the
input. A unit here is a location summed over channels: the field of a concatenation is the union
of its inputs' fields, while each channel of it only sees its own branch's.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine.lite0 import efficientnet_lite0
from patchmine.receptive import (
    Field,
    boxes,
    centers,
    locations,
    pixel_centers,
    receptive_fields,
    to_input,
    to_original,
)

# ---------------------------------------------------------------------------------------------
# Gradient method

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_ACTS = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU,
    nn.Sigmoid, nn.Tanh, nn.Dropout, nn.Dropout2d,
)  # fmt: skip


# float32, not float64: CPU convolutions in float64 take a slow path (10-40x, depthwise worst).
# Underflow is the only risk of float32 here (all terms are positive, nothing cancels); it could
# only shrink the gradient box, and _gradient_boxes asserts the smallest nonzero gradient stays far
# above float32's smallest normal number, so no boundary pixel can have been flushed to zero.
DTYPE = torch.float32
TINY = 1e-30


def _linearize(model: nn.Module) -> nn.Module:
    """A copy that is linear with positive weights (its gradients show the true field)."""
    model = copy.deepcopy(model).eval()

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, _NORMS + _ACTS):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                assert child.dilation in (1, (1, 1)), "avg-pool cannot replace a dilated max-pool"
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(parent, name, pool)
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
            else:
                swap(child)

    swap(model)
    model = model.to(DTYPE)
    with torch.no_grad():
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "weight":
                    p.fill_(1.0 / p[0].numel())  # positive; activations stay ~1 however deep
                elif isinstance(module, (nn.Conv2d, nn.Linear)) and pname == "bias":
                    p.zero_()
                else:
                    p.fill_(1.0)  # layer scales and the like
    return model


def _units(h: int, w: int) -> list[tuple[int, int]]:
    """Center, the four corners and an edge unit of an h x w map (no duplicates)."""
    units = [(h // 2, w // 2), (0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (0, w // 2)]
    return list(dict.fromkeys(units))


def _gradient_boxes(
    model: nn.Module, size: int, nodes: list[str]
) -> dict[tuple[str, tuple[int, int]], tuple[int, int, int, int] | None]:
    """Per (node, unit): the bounding box of nonzero input gradients (None: no gradient at all).

    All units go in one batch: item b backprops only its own unit, and a linear network with no
    batch statistics keeps the items independent.
    """
    # cut first (the copy then holds only the layers needed), then linearize the cut graph
    extractor = _linearize(create_feature_extractor(model.eval(), return_nodes=nodes))
    with torch.no_grad():
        shapes = {
            k: v.shape for k, v in extractor(torch.ones(1, 3, size, size, dtype=DTYPE)).items()
        }
    jobs = [(node, u) for node in nodes for u in _units(shapes[node][2], shapes[node][3])]
    x = torch.ones(len(jobs), 3, size, size, dtype=DTYPE, requires_grad=True)
    outs = extractor(x)
    loss = x.new_zeros(())
    for b, (node, (y, xx)) in enumerate(jobs):
        loss = loss + outs[node][b, :, y, xx].sum()
    loss.backward()
    support = (x.grad != 0).any(dim=1)  # (B, H, W)
    assert (x.grad >= 0).all(), "a positive linear network must have nonnegative gradients"
    assert x.grad[x.grad > 0].min() > TINY, "gradients close to underflow: use float64"
    result = {}
    for b, job in enumerate(jobs):
        rows = torch.nonzero(support[b].any(dim=1)).flatten()
        cols = torch.nonzero(support[b].any(dim=0)).flatten()
        if len(rows) == 0:
            result[job] = None
        else:
            result[job] = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
    return result


def _clip(box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int] | None:
    """The box clipped to the input; None when it lies wholly in the padding."""
    y0, x0, y1, x1 = max(box[0], 0), max(box[1], 0), min(box[2], h), min(box[3], w)
    return (y0, x0, y1, x1) if y0 < y1 and x0 < x1 else None


def _check_against_gradients(model: nn.Module, size: int, nodes: list[str]) -> None:
    fields = receptive_fields(model, size, nodes)
    grads = _gradient_boxes(model, size, nodes)
    wrong, inside = [], 0
    for (node, (y, x)), got in grads.items():
        box = fields[node].box(y, x)
        want = _clip(box, size, size)
        if box == want:
            inside += 1
        if got != want:
            wrong.append(f"{node} unit {(y, x)}: analytic {box} -> clipped {want}, gradient {got}")
    assert not wrong, "\n".join(wrong)
    # a test whose boxes are all clipped to the whole image proves nothing
    assert inside > 0, f"no tested unit has its box strictly inside the {size}px input"
    assert all(not f.whole for f in fields.values())


def _tv(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs)


# model name, constructor kwargs, input size, nodes (early, middle, late, with merges)
MODELS = [
    ("alexnet", {}, 128, ["features.0", "features.2", "features.7", "features.12"]),
    ("vgg16", {}, 64, ["features.4", "features.16", "features.23"]),
    ("resnet18", {}, 128, ["maxpool", "layer1.1.add", "layer2.0.add", "layer3.0.relu_1"]),
    ("resnet50", {}, 112, ["layer1.0.add", "layer2.0.add", "layer2.3.relu_2"]),
    (
        "googlenet",
        {"aux_logits": False, "init_weights": False},
        128,
        ["maxpool1", "inception3a.cat", "inception4a.cat"],
    ),
    (
        "densenet121",
        {},
        112,
        ["features.pool0", "features.denseblock1.denselayer3.cat", "features.transition1.pool"],
    ),
    (
        "mobilenet_v2",
        {},
        128,
        ["features.0", "features.3.add", "features.6.add", "features.13.add"],
    ),
    # every unit after the first squeeze-excitation is whole-input: test up to it
    ("efficientnet_b0", {}, 128, ["features.0", "features.1.0.block.0"]),
    ("convnext_tiny", {}, 96, ["features.0", "features.1.0.add", "features.1.2.add"]),
    # channel shuffle: view / transpose / view and chunk must keep track of the spatial axes
    ("shufflenet_v2_x0_5", {}, 128, ["stage2.0.view_1", "stage2.1.view_1", "stage3.3.view_1"]),
]
SLOW = {"vgg16", "resnet50", "densenet121", "convnext_tiny"}


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "nodes"),
    [pytest.param(*m, id=m[0], marks=[pytest.mark.slow] if m[0] in SLOW else []) for m in MODELS],
)
def test_torchvision_model_matches_gradients(name, kwargs, size, nodes):
    _check_against_gradients(_tv(name, **kwargs), size, nodes)


def test_efficientnet_lite0_matches_gradients():
    size = 128
    model = efficientnet_lite0(input_size=size, weights=None)
    nodes = ["_conv_stem", "_blocks.1._depthwise_conv", "_blocks.2.add", "_blocks.6.add"]
    _check_against_gradients(model, size, nodes)
    fields = receptive_fields(model, size, ["_stem_pad", "_conv_stem", "_fc"])
    # TF "same" padding at an even size pads the stem 0 on top/left, 1 on bottom/right
    assert fields["_conv_stem"] == Field((3, 3), (2, 2), (0, 0))
    assert fields["_fc"].whole


def test_efficientnet_b0_after_squeeze_excitation_is_whole():
    model = _tv("efficientnet_b0")
    nodes = ["features.1.0.block.0", "features.1.0.block.1", "features.1.0.block.2",
             "features.2.0.block.0", "features.4.1.add", "features.8"]  # fmt: skip
    fields = receptive_fields(model, 128, nodes)
    assert not fields["features.1.0.block.0"].whole
    for node in nodes[1:]:
        assert fields[node].whole, node
        assert fields[node] == Field((128, 128), (128, 128), (0, 0), whole=True)
        assert fields[node].box(3, 2) == (0, 0, 128, 128)


# ---------------------------------------------------------------------------------------------
# Node names and the whole-input field


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("mobilenet_v2", {}),
        ("convnext_tiny", {}),
        ("googlenet", {"aux_logits": False, "init_weights": False}),
    ],  # fmt: skip
)
def test_names_are_torchvision_eval_names(name, kwargs):
    model = _tv(name, **kwargs)
    model.train()
    fields = receptive_fields(model, 96)
    assert model.training, "the training flag must be restored"
    eval_names = get_graph_node_names(model)[1]
    assert set(fields) <= set(eval_names)
    assert list(fields) == [n for n in eval_names if n in fields]  # graph order
    extractor = create_feature_extractor(model.eval(), return_nodes=list(fields))
    with torch.no_grad():
        outs = extractor(torch.zeros(1, 3, 96, 96))
    for node, out in outs.items():
        assert out.ndim in (2, 4), node  # (N, C) or (N, C, H, W); channels-last left out
        if out.ndim == 2:
            assert fields[node].whole, node


def test_resnet18_logits_and_pooling_are_whole():
    fields = receptive_fields(_tv("resnet18"), (96, 128), ["avgpool", "flatten", "fc"])
    for f in fields.values():
        assert f == Field((96, 128), (96, 128), (0, 0), whole=True)
        assert f.box(0, 0) == (0, 0, 96, 128)


def test_resnet18_known_values():
    fields = receptive_fields(_tv("resnet18"), 224, ["conv1", "maxpool", "layer4.1.relu_1"])
    assert fields["conv1"] == Field((7, 7), (2, 2), (-3, -3))
    assert fields["maxpool"] == Field((11, 11), (4, 4), (-5, -5))
    assert fields["layer4.1.relu_1"] == Field((435, 435), (32, 32), (-217, -217))


def test_adaptive_pool_that_divides_is_a_pool():
    fields = receptive_fields(_tv("vgg16"), 224, ["features.30", "avgpool"])
    assert fields["avgpool"] == fields["features.30"]  # 7x7 -> 7x7 at 224 px
    assert receptive_fields(_tv("vgg16"), 96, ["avgpool"])["avgpool"].whole  # 3x3 -> 7x7


def test_unknown_node_lists_nearest():
    with pytest.raises(KeyError, match=r"layer1\.0\.relu"):
        receptive_fields(_tv("resnet18"), 64, ["layer1.0.rleu"])


def test_channels_last_nodes_inside_convnext_block():
    model = _tv("convnext_tiny")
    fields = receptive_fields(model, 64)
    assert fields["features.1.0.block.2"].layout == "nhwc"  # LayerNorm over (N, H, W, C)
    asked = receptive_fields(model, 64, ["features.1.0.block.0", "features.1.0.block.3"])
    conv, linear = asked["features.1.0.block.0"], asked["features.1.0.block.3"]
    assert conv.layout == "nchw" and linear.layout == "nhwc" and linear.unit == conv
    assert replace(linear, layout="nchw", unit=None) == conv  # Linear is pointwise


# ---------------------------------------------------------------------------------------------
# The rules on hand-built networks


def test_sequential_pads_dilation_ceil_mode_stride():
    model = nn.Sequential(
        nn.ZeroPad2d((1, 2, 3, 4)),  # left, right, top, bottom
        nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=4),
        nn.ReLU(),
        nn.AvgPool2d(2),
    )
    f = receptive_fields(model, 37)
    # pad: o = (-3, -1); conv: k' = (3, 9); r = (3, 9), o = (-4, -1), j = (2, 1)
    assert f["1"] == Field((3, 9), (2, 1), (-4, -1))
    # pool k=3 s=2 p=1: r += 2j, o -= j, j *= 2
    assert f["2"] == Field((7, 11), (4, 2), (-6, -2))
    # dilated 'same' conv: k' = 5, padding 2: r += 4j, o -= 2j
    assert f["3"] == Field((23, 19), (4, 2), (-14, -6))
    assert f["4"] == f["3"]
    assert f["5"] == Field((27, 21), (8, 4), (-14, -6))
    _check_against_gradients(model, 37, ["1", "2", "3", "5"])


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 3, 3, 3))

    def forward(self, x):
        x = F.pad(x, (2, 0, 1, 3))  # left, right, top, bottom
        x = F.conv2d(x, self.weight, None, 2, 1)
        x = F.max_pool2d(x, 3, 1, 1)
        x = F.avg_pool2d(x, kernel_size=2)
        return x[:, :, 1:, 2:]


def test_functional_ops_and_crops():
    f = receptive_fields(_Functional(), 40)
    assert f["pad"] == Field((1, 1), (1, 1), (-1, -2))
    assert f["conv2d"] == Field((3, 3), (2, 2), (-2, -3))
    assert f["max_pool2d"] == Field((7, 7), (2, 2), (-4, -5))
    assert f["avg_pool2d"] == Field((9, 9), (4, 4), (-4, -5))
    assert f["getitem"] == Field((9, 9), (4, 4), (0, 3))


class _Misaligned(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=0)
        self.pad = nn.ZeroPad2d((0, 2, 0, 2))
        self.after = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.after(self.a(x) + self.pad(self.b(x)))


def test_misaligned_add_raises_not_aligned():
    model = _Misaligned()
    with pytest.raises(ValueError, match="not aligned at node 'add'"):
        receptive_fields(model, 32, ["add"])
    with pytest.raises(ValueError, match="not aligned at node 'add'"):
        receptive_fields(model, 32, ["after"])
    fields = receptive_fields(model, 32)  # nodes=None leaves the lost ones out
    assert set(fields) == {"x", "a", "b", "pad"}


class _Aligned(nn.Module):
    """A 1x1 stride-2 shortcut beside a 3x3 stride-2 conv: the fields differ but are centered."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 1, stride=2)
        self.c = nn.Conv2d(3, 8, 1, stride=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1) * torch.sigmoid(self.c(x))


def test_aligned_merges_take_the_union():
    f = receptive_fields(_Aligned(), 32)
    assert f["cat"] == f["a"] == f["mul"] == Field((3, 3), (2, 2), (-1, -1))


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.up(y)), F.interpolate(y, scale_factor=2.0)


def test_transposed_conv_and_upsampling_are_refused():
    model = _Transposed()
    with pytest.raises(ValueError, match="'up'.*ConvTranspose2d"):
        receptive_fields(model, 16, ["head"])
    with pytest.raises(ValueError, match="interpolate"):
        receptive_fields(model, 16, ["interpolate"])
    assert set(receptive_fields(model, 16)) == {"x", "conv"}


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        gate = y.mean((2, 3), keepdim=True).sigmoid()
        return y * gate, y.flatten(1), y.permute(0, 2, 3, 1).softmax(-1), y.softmax(-1)


def test_gates_reductions_and_softmax():
    f = receptive_fields(_Gate(), 16, ["mul", "flatten", "softmax", "softmax_1"])
    assert f["mul"].whole and f["flatten"].whole and f["softmax_1"].whole
    softmax = f["softmax"]  # over channels (channels-last)
    assert softmax.layout == "nhwc" and softmax.unit == Field((3, 3), (1, 1), (-1, -1))
    assert replace(softmax, layout="nchw", unit=None) == Field((3, 3), (1, 1), (-1, -1))


# ---------------------------------------------------------------------------------------------
# Boxes and coordinate maps


def test_boxes_matches_box_numpy_and_torch():
    field = Field((11, 7), (4, 2), (-2, -3))
    yx = np.array([[[0, 0], [3, 5]], [[10, 1], [2, 9]]])
    got = boxes(field, yx)
    assert got.dtype == np.int32 and got.shape == (2, 2, 4)
    for i in range(2):
        for j in range(2):
            assert tuple(got[i, j]) == field.box(*yx[i, j])
    np.testing.assert_array_equal(boxes(field, torch.from_numpy(yx)), got)
    whole = Field((64, 48), (64, 48), (0, 0), whole=True)
    np.testing.assert_array_equal(boxes(whole, yx), np.broadcast_to([0, 0, 64, 48], (2, 2, 4)))


@settings(max_examples=100, deadline=None)
@given(
    box=st.lists(st.integers(-500, 500), min_size=4, max_size=4),
    scale=st.floats(0.05, 20.0),
    oy=st.floats(-300, 300),
    ox=st.floats(-300, 300),
)
def test_to_original_to_input_round_trip(box, scale, oy, ox):
    transform = np.array([scale, oy, ox], np.float32)
    orig = to_original(np.array(box), transform)
    assert orig.dtype == np.float32
    expected = (np.array(box, np.float64) + [oy, ox, oy, ox]) / scale
    np.testing.assert_allclose(orig, expected, rtol=1e-5, atol=1e-3)
    back = to_input(orig, transform)
    np.testing.assert_allclose(back, box, rtol=1e-5, atol=1e-2 * max(1.0, scale))


def test_to_original_broadcasts_per_image():
    box = np.array([[[0, 0, 224, 224]], [[10, 20, 30, 40]]])  # (N=2, 1, 4)
    transform = np.array([[[0.5, 0.0, 16.0]], [[2.0, 4.0, 0.0]]])  # (N=2, 1, 3)
    got = to_original(box, transform)
    np.testing.assert_allclose(got[0, 0], [0, 32, 448, 480])
    np.testing.assert_allclose(got[1, 0], [7, 10, 17, 20])
    assert math.isclose(float(to_input(got, transform)[1, 0, 3]), 40.0)


def test_field_from_stored_attrs():
    f = Field((11, 7), (4, 2), (-2, -3))
    attrs = {"rf_size": [11, 7], "rf_stride": [4, 2], "rf_offset": [-2, -3], "rf_whole": False}
    assert Field.from_attrs(attrs) == f
    assert Field.from_attrs({"rf_size": 5, "rf_stride": 2, "rf_offset": -1}) == Field(
        (5, 5), (2, 2), (-1, -1)
    )
    whole = {"rf_size": [32, 32], "rf_stride": [32, 32], "rf_offset": [0, 0], "rf_whole": True}
    assert Field.from_attrs(whole) == Field((32, 32), (32, 32), (0, 0), whole=True)


_FIELDS = [
    Field((11, 7), (4, 2), (-2, -3)),
    Field((1, 1), (1, 1), (0, 0)),
    Field((6, 5), (3, 1), (-4, 0)),  # an even size: centers fall between pixels
    Field((195, 195), (32, 32), (-96, -96)),
]


@pytest.mark.parametrize("field", _FIELDS)
def test_centers_are_the_middle_of_each_box(field):
    yx = np.stack(np.meshgrid(np.arange(-1, 6), np.arange(-1, 6), indexing="ij"), -1)
    got = centers(field, yx)
    assert got.shape == yx.shape and got.dtype == np.float64
    for (y, x), c in zip(yx.reshape(-1, 2), got.reshape(-1, 2), strict=True):
        y0, x0, y1, x1 = field.box(y, x)
        assert tuple(c) == (np.arange(y0, y1).mean(), np.arange(x0, x1).mean())


@pytest.mark.parametrize("field", _FIELDS)
def test_locations_find_the_unit_centered_nearest(field):
    """Brute force: for every pixel, the units whose box center is nearest."""
    units = np.arange(-30, 100)
    box_centers = [
        np.array([np.arange(*field.box(u, 0)[0::2]).mean() for u in units]),
        np.array([np.arange(*field.box(0, u)[1::2]).mean() for u in units]),
    ]
    grid = np.meshgrid(np.arange(-20, 90), np.arange(-20, 90), indexing="ij")
    pixels = np.stack(grid, -1).reshape(-1, 2).astype(np.float64)
    got = locations(field, pixels)
    np.testing.assert_allclose(centers(field, got), pixels, rtol=0, atol=1e-9)
    for axis in (0, 1):
        dist = np.abs(box_centers[axis][None, :] - pixels[:, axis, None])
        nearest = units[dist.argmin(1)]
        assert (np.abs(got[:, axis] - nearest) <= 0.5).all()
        on = dist.min(1) == 0  # the pixel is a unit's center: exactly that unit
        np.testing.assert_array_equal(got[on, axis], nearest[on])


def test_whole_field_centers_and_locations():
    whole = Field((64, 48), (64, 48), (0, 0), whole=True)
    np.testing.assert_array_equal(centers(whole, [[0, 0], [3, 1]]), [[31.5, 23.5]] * 2)
    np.testing.assert_array_equal(locations(whole, [[0.0, 0.0], [60.0, 7.0]]), np.zeros((2, 2)))


@pytest.mark.parametrize(
    "box", [(-2, -3, 9, 8), (0, 0, 224, 224), (5, 7, 6, 8), (-96, 32, 99, 227)]
)
@pytest.mark.parametrize("n", [1, 7, 32, 96, 113, 224])
def test_pixel_centers_of_a_resampled_box(box, n):
    """Against PIL: nearest resampling takes for each pixel the input pixel under its center."""
    y0, x0, y1, x1 = box
    side = y1 - y0
    got = pixel_centers(box, n)
    assert got.shape == (n, 2)
    src = np.broadcast_to(np.arange(side, dtype=np.uint8)[:, None], (side, side))
    resized = Image.fromarray(np.ascontiguousarray(src)).resize((n, n), Image.NEAREST)
    picked = np.asarray(resized).astype(np.int64)  # the source row of every pixel
    for axis, start in ((0, y0), (1, x0)):
        under = np.floor(got[:, axis] + 0.5)  # the input pixel under each center
        edge = under == got[:, axis] + 0.5  # a center on the line between two pixels: either
        np.testing.assert_array_equal(under[~edge], start + picked[~edge, 0])
        assert np.isin(start + picked[edge, 0] - under[edge], (-1, 0)).all()
    if n == side:  # no resampling: the box's own pixels
        np.testing.assert_array_equal(got, np.stack([np.arange(y0, y1), np.arange(x0, x1)], 1))
    if n % side == 0:  # upscaled by f: each input pixel's f copies center on it
        f = n // side
        np.testing.assert_allclose(got.reshape(side, f, 2).mean(1)[:, 0], np.arange(y0, y1))
    if side % n == 0:  # downscaled by f: the mean of the f input pixels it covers
        f = side // n
        np.testing.assert_allclose(got[:, 0], np.arange(y0, y1).reshape(n, f).mean(1))


class _ValidStride(nn.Module):
    """A valid stride-2 conv that never reads the last input row, then a padded conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x))


def test_field_is_theoretical_where_the_map_does_not_tile_the_input():
    # 10 px -> 4 units reading pixels 0..8: pixel 9 is never read. Unit 3 of `b` would see units
    # 2..4 of `a`; unit 4 does not exist (it is `b`'s zero padding), so the gradient box ends at 9
    # while the theoretical field ends at 11 (clipped: 10). The field over-estimates there, which is
    # why the model tests use input sizes whose feature maps tile the input.
    size = 10
    model = _ValidStride()
    field = receptive_fields(model, size, ["b"])["b"]
    assert field == Field((7, 7), (2, 2), (-2, -2))
    grads = _gradient_boxes(model, size, ["b"])
    assert grads[("b", (3, 3))] == (4, 4, 9, 9)
    assert _clip(field.box(3, 3), size, size) == (4, 4, 10, 10)
    for (_, (y, x)), got in grads.items():
        want = _clip(field.box(y, x), size, size)
        assert got[0] == want[0] and got[1] == want[1]
        assert got[2] <= want[2] and got[3] <= want[3]
