"""Tests for patchmine.projections: deconvnet, guided backprop and gradient projections.

Oracles: the theoretical receptive field (every method is exactly 0 outside the entry's box), the
composite kernel of a linear network written out as an explicit chain-rule sum, and the classic
hook-based implementation (``register_full_backward_hook`` on ReLU modules, in-place turned off).
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchmine.errors import UnknownNameError
from patchmine.models import load_model
from patchmine.patches import cut_patches
from patchmine.projections import (
    METHODS,
    ProjectionWarning,
    Projector,
    _pack,
    cut_projections,
    rectified_ops,
)
from patchmine.receptive import boxes, receptive_fields
from patchmine.taps import BATCH_MULTIPLE, Tap

S = 64


@functools.cache
def _model(name: str | None):
    return load_model(name, None if name is None else "none", input_size=S)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g)


def _entries(shape: tuple[int, ...], n_images: int, count: int, seed: int):
    """rows, channels, yx for ``count`` entries, corners included, some images with several."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_images, count)
    channels = rng.integers(0, shape[0], count)
    if len(shape) == 1:
        return rows, channels, None
    h, w = shape[1:]
    yx = np.stack([rng.integers(0, h, count), rng.integers(0, w, count)], 1)
    yx[0], yx[1 % count] = (0, 0), (h - 1, w - 1)
    return rows, channels, yx


# nodes with fields partly inside a 64 px input, and a logits node (whole-input field)
ZERO_CASES = {
    "resnet18": ["maxpool", "layer1.1.relu_1", "layer2.0.add", "fc"],
    "alexnet": ["features.1", "features.4", "features.5", "classifier.6"],
    None: ["_blocks.2.add", "_blocks.4.add", "_fc"],
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ZERO_CASES), ids=lambda n: n or "lite0")
def test_zero_outside_the_box(name, method):
    lm = _model(name)
    layers = ZERO_CASES[name]
    fields = receptive_fields(lm.module, S, layers)
    pixels = _pixels(3, seed=1)
    proj = Projector(lm.module, layers, lm.mean, lm.std, method)
    for node in layers:
        shape = tuple(proj.activations(pixels, node).shape[1:])
        rows, channels, yx = _entries(shape, 3, 5, seed=len(node))
        seen = 0
        for index, maps in proj.project(pixels, node, rows, channels, yx):
            for i, m in zip(index, maps, strict=True):
                f = fields[node]
                y0, x0, y1, x1 = f.box(*yx[i]) if yx is not None else (0, 0, S, S)
                outside = torch.ones(S, S, dtype=torch.bool)
                outside[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = False
                assert torch.count_nonzero(m[:, outside]) == 0, (node, i)
                assert torch.isfinite(m).all()
                seen += int(torch.count_nonzero(m) > 0)
        assert seen > 0, f"{node}: every projection is 0"


def _composite_reference(w1, w2, conv1, conv2, std, c, y, x, size):
    """d out[c, y, x] / d input01 by the chain rule, summed term by term (no convolution code)."""
    (s1y, s1x), (p1y, p1x) = conv1.stride, conv1.padding
    (s2y, s2x), (p2y, p2x) = conv2.stride, conv2.padding
    h1 = (size + 2 * p1y - w1.shape[2]) // s1y + 1
    w1_ = (size + 2 * p1x - w1.shape[3]) // s1x + 1
    out = np.zeros((3, size, size))
    for m in range(w2.shape[1]):
        for p in range(w2.shape[2]):
            for q in range(w2.shape[3]):
                my, mx = y * s2y - p2y + p, x * s2x - p2x + q
                if not (0 <= my < h1 and 0 <= mx < w1_):
                    continue  # a padding position of the intermediate map
                for ch in range(3):
                    for u in range(w1.shape[2]):
                        for v in range(w1.shape[3]):
                            iy, ix = my * s1y - p1y + u, mx * s1x - p1x + v
                            if 0 <= iy < size and 0 <= ix < size:
                                out[ch, iy, ix] += w2[c, m, p, q] * w1[m, ch, u, v]
    return out / np.asarray(std)[:, None, None]


class _LinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, (3, 5), stride=2, padding=(1, 2))
        self.conv2 = nn.Conv2d(4, 5, 3, stride=(1, 2), padding=(1, 0))

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_linear_network_equals_the_composite_kernel():
    torch.manual_seed(3)
    net = _LinearNet().eval()
    size, mean, std = 20, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    rows = np.array([0, 1, 0, 1, 0])
    channels = np.array([0, 4, 2, 1, 3])
    yx = np.array([[0, 0], [5, 2], [9, 3], [4, 1], [9, 0]])
    w1 = net.conv1.weight.detach().double().numpy()
    w2 = net.conv2.weight.detach().double().numpy()
    results = {}
    for method in METHODS:
        if method == "gradient":
            proj = Projector(net, ["conv2"], mean, std, method)
        else:
            with pytest.warns(ProjectionWarning, match="equals gradient"):
                proj = Projector(net, ["conv2"], mean, std, method)
        assert proj.n_modified == 0
        results[method] = proj.project_all(pixels, "conv2", rows, channels, yx)
        # float input in [0, 1] gives the same derivative
        floats = proj.project_all(pixels.float() / 255, "conv2", rows, channels, yx)
        torch.testing.assert_close(floats, results[method], rtol=1e-6, atol=1e-9)
    for i, (c, (y, x)) in enumerate(zip(channels, yx, strict=True)):
        want = _composite_reference(w1, w2, net.conv1, net.conv2, std, c, y, x, size)
        for method in METHODS:
            got = results[method][i].double().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
        # the field per axis: size 7 x 9, stride 2 x 4, offset -3 x -2
        support = np.argwhere(np.abs(want).sum(0) > 0)
        assert support[:, 0].min() >= y * 2 - 3 and support[:, 0].max() < y * 2 - 3 + 7
        assert support[:, 1].min() >= x * 4 - 2 and support[:, 1].max() < x * 4 - 2 + 9
    assert torch.equal(results["gradient"], results["deconvnet"])
    assert torch.equal(results["gradient"], results["guided"])


def _hook_reference(model, module_name, mean, std, pixels, entries, method):
    """The classic way: full backward hooks on ReLU modules, one forward and backward per entry."""
    ref = copy.deepcopy(model).eval()
    for m in ref.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = False

            def hook(mod, grad_in, grad_out):
                if method == "deconvnet":
                    return (grad_out[0].clamp(min=0),)
                return (grad_in[0].clamp(min=0),)

            m.register_full_backward_hook(hook)
    captured = {}
    target = ref.get_submodule(module_name)
    target.register_forward_hook(lambda mod, inp, out: captured.__setitem__("out", out))
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    out = []
    for row, c, yx in entries:
        x01 = (pixels[row : row + 1].double() / 255).float().requires_grad_(True)
        ref((x01 - mean_t) / std_t)
        act = captured["out"]
        unit = act[0, c] if yx is None else act[0, c, yx[0], yx[1]]
        (g,) = torch.autograd.grad(unit, x01)
        out.append(g[0])
    return torch.stack(out)


HOOK_CASES = [
    ("alexnet", "features.12"),
    ("alexnet", "classifier.6"),
    ("resnet18", "layer3.1.conv2"),
    (None, "_blocks.4._project_conv"),  # ReLU6
]


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
@pytest.mark.parametrize("name,node", HOOK_CASES, ids=lambda v: str(v))
def test_rules_match_the_hook_reference(name, node, method):
    lm = _model(name)
    pixels = _pixels(2, seed=4)
    proj = Projector(lm.module, [node], lm.mean, lm.std, method)
    assert proj.n_modified > 0
    shape = tuple(proj.activations(pixels, node).shape[1:])
    rows, channels, yx = _entries(shape, 2, 3, seed=7)
    got = torch.zeros(3, 3, S, S)
    for index, maps in proj.project(pixels, node, rows, channels, yx):
        got[index] = maps
    entries = [
        (int(r), int(c), None if yx is None else tuple(int(v) for v in yx[i]))
        for i, (r, c) in enumerate(zip(rows, channels, strict=True))
    ]
    want = _hook_reference(lm.module, node, lm.mean, lm.std, pixels, entries, method)
    scale = float(want.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    plain = Projector(lm.module, [node], lm.mean, lm.std, "gradient").project_all(
        pixels, node, rows, channels, yx
    )
    assert not torch.allclose(got, plain), "the rule changed nothing"


class _Functional(nn.Module):
    """Every ReLU-family spelling a traced graph can hold, and an in-place alias."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(9))
        self.relu = nn.ReLU(inplace=True)
        self.last = nn.ReLU6()

    def forward(self, x):
        c = self.convs
        x = F.relu(c[0](x))
        x = torch.relu(c[1](x))
        x = F.relu6(c[2](x) * 4)
        x = F.hardtanh(c[3](x) * 4, 0.0, 6.0)
        x = c[4](x).clamp(min=0)
        y = c[5](x)
        z = y.relu_()
        x = y + z  # y was rectified in place: y + z is 2 * relu
        x = torch.clamp(c[6](x), 0, None)
        x = self.relu(c[7](x))
        return self.last(c[8](x) * 4)


class _Modules(nn.Module):
    """The same network spelled with ReLU modules (for the hook reference)."""

    def __init__(self, functional: _Functional):
        super().__init__()
        self.convs = functional.convs
        self.acts = nn.ModuleList(
            [nn.ReLU(), nn.ReLU(), nn.ReLU6(), nn.ReLU6(), nn.ReLU(), nn.ReLU(), nn.ReLU()]
            + [nn.ReLU(), nn.ReLU6()]
        )

    def forward(self, x):
        c, a = self.convs, self.acts
        x = a[0](c[0](x))
        x = a[1](c[1](x))
        x = a[2](c[2](x) * 4)
        x = a[3](c[3](x) * 4)
        x = a[4](c[4](x))
        x = 2 * a[5](c[5](x))
        x = a[6](c[6](x))
        x = a[7](c[7](x))
        self.out = a[8](c[8](x) * 4)
        return self.out


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_functional_relu_spellings(method):
    torch.manual_seed(5)
    net = _Functional().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert rectified_ops(net, ["last"]) == 9
    proj = Projector(net, ["last"], mean, std, method)
    assert proj.n_modified == 9
    with torch.no_grad():
        plain = net((pixels.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(proj.activations(pixels, "last"), plain, rtol=1e-6, atol=1e-6)
    rows, channels = np.array([0, 1, 1, 0]), np.array([0, 3, 5, 2])
    yx = np.array([[8, 8], [3, 12], [15, 0], [7, 9]])
    got = torch.zeros(4, 3, 16, 16)
    for index, maps in proj.project(pixels, "last", rows, channels, yx):
        got[index] = maps

    modules = _Modules(net).eval()
    ref = copy.deepcopy(modules)
    for m in ref.acts:
        m.register_full_backward_hook(
            lambda mod, gi, go: (
                (go[0].clamp(min=0),) if method == "deconvnet" else (gi[0].clamp(min=0),)
            )
        )
    want = []
    for r, c, (y, x) in zip(rows, channels, yx, strict=True):
        x01 = (pixels[r : r + 1].float() / 255).requires_grad_(True)
        out = ref((x01 - 0.5) / 0.25)
        want.append(torch.autograd.grad(out[0, c, y, x], x01)[0][0])
    want = torch.stack(want)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_unbatched(method):
    lm = _model("resnet18")
    node = "layer2.0.add"
    pixels = _pixels(5, seed=2)
    proj = Projector(lm.module, [node], lm.mean, lm.std, method)
    rows = np.array([0, 3, 3, 3, 1, 4, 0, 2])
    channels = np.array([1, 2, 2, 7, 60, 127, 1, 5])
    yx = np.array([[0, 0], [3, 4], [3, 5], [7, 7], [2, 2], [6, 1], [5, 5], [4, 4]])
    together = proj.project_all(pixels, node, rows, channels, yx)
    for i in range(len(rows)):
        alone = proj.project_all(
            pixels[rows[i] : rows[i] + 1], node, [0], channels[i : i + 1], yx[i : i + 1]
        )
        assert torch.equal(alone[0], together[i]), i
    # under inference_mode, as the second pass runs
    with torch.inference_mode():
        again = proj.project_all(pixels, node, rows, channels, yx)
    assert torch.equal(again, together)
    # an image that wins many channels: stacked copies, several forwards of at most 8 rows
    rng = np.random.default_rng(0)
    rows = np.array([2] * 30 + [0, 1, 3, 4, 2])
    channels = rng.integers(0, 128, len(rows))
    yx = rng.integers(0, 8, (len(rows), 2))
    copy_of, round_of = _pack(rows)
    pairs = set(zip(copy_of.tolist(), round_of.tolist(), strict=True))
    assert len(pairs) == len(rows)  # one entry per copy and round
    assert all(len(set(rows[copy_of == c])) == 1 for c in np.unique(copy_of))
    assert copy_of.max() + 1 > 5  # the busy image was copied
    small = Projector(lm.module, [node], lm.mean, lm.std, method, max_rows=8)
    together = small.project_all(pixels, node, rows, channels, yx)
    for i in range(0, len(rows), 7):
        alone = proj.project_all(
            pixels[rows[i] : rows[i] + 1], node, [0], channels[i : i + 1], yx[i : i + 1]
        )
        assert torch.equal(alone[0], together[i]), i
    default = proj.project_all(pixels, node, rows, channels, yx)
    torch.testing.assert_close(
        default, together, rtol=1e-5, atol=1e-6 * float(together.abs().max())
    )


# early nodes with small fields (many disjoint boxes on a 64 px input) and later ones (few)
PACK_CASES = {
    "alexnet": ["features.1", "features.2"],
    "resnet18": ["maxpool", "layer1.1.relu_1"],
    None: ["_relu0", "_blocks.2.add"],
}


def _inside(bx: np.ndarray) -> torch.Tensor:
    """(M, 3, S, S) bool: the pixels inside each entry's box."""
    b = torch.from_numpy(np.asarray(bx, np.int64))
    s = torch.arange(S)
    in_y = (s >= b[:, 0:1]) & (s < b[:, 2:3])
    in_x = (s >= b[:, 1:2]) & (s < b[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None].expand(-1, 3, -1, -1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(PACK_CASES), ids=lambda n: n or "lite0")
def test_packed_equals_one_entry_per_backward(name, method):
    """Entries with disjoint boxes seeded in one backward give the bits of one backward each."""
    lm = _model(name)
    layers = PACK_CASES[name]
    fields = receptive_fields(lm.module, S, layers)
    pixels = _pixels(4, seed=5)
    # one chunk shape (BATCH_MULTIPLE rows) for both, whatever the number of copies
    proj = Projector(lm.module, layers, lm.mean, lm.std, method, max_rows=BATCH_MULTIPLE)
    for node in layers:
        assert proj.packable(node)
        shape = tuple(proj.activations(pixels, node).shape[1:])
        rows, channels, yx = _entries(shape, 4, 60, seed=len(node))
        yx[2] = yx[3]  # the same unit of two channels: overlapping boxes
        rows[2] = rows[3]
        bx = boxes(fields[node], yx)
        copy_of, round_of = _pack(rows, bx)
        seeds = list(zip(copy_of.tolist(), round_of.tolist(), strict=True))
        assert len(set(seeds)) < len(rows)  # some entries share a backward
        assert seeds[2] != seeds[3]
        for key in set(seeds):  # pairwise disjoint boxes in each (copy, round)
            b = bx[[i for i, s in enumerate(seeds) if s == key]]
            assert len(set(rows[[i for i, s in enumerate(seeds) if s == key]])) == 1
            for i in range(len(b)):
                for j in range(i):
                    assert (
                        b[i, 0] >= b[j, 2] or b[j, 0] >= b[i, 2]
                        or b[i, 1] >= b[j, 3] or b[j, 1] >= b[i, 3]
                    )  # fmt: skip
        before = proj.backwards
        packed = proj.project_all(pixels, node, rows, channels, yx, bx)
        n_packed, before = proj.backwards - before, proj.backwards
        single = proj.project_all(pixels, node, rows, channels, yx)
        assert n_packed < proj.backwards - before
        inside = _inside(bx)
        assert torch.count_nonzero(packed[~inside]) == 0
        assert torch.count_nonzero(single[~inside]) == 0
        assert torch.count_nonzero(packed) > 0
        want = torch.where(inside, single, 0.0)
        assert torch.equal(packed.view(torch.int32), want.view(torch.int32)), node  # bit for bit


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.norm(self.conv(x)))


def test_spatial_statistics_never_pack():
    """GroupNorm's statistics mix positions (the field analysis counts it element-wise): its
    entries keep one backward each, and mixing shows outside the box without the mask."""
    torch.manual_seed(0)
    model = _Grouped().eval()
    proj = Projector(model, ["relu"], (0.5,) * 3, (0.25,) * 3, "gradient")
    assert not proj.packable("relu")
    rows, channels, yx = np.array([0, 0]), np.array([1, 1]), np.array([[0, 0], [20, 20]])
    bx = np.array([[-1, -1, 2, 2], [19, 19, 22, 22]])
    masked = proj.project_all(_pixels(1), "relu", rows, channels, yx, bx)  # packed would differ
    raw = proj.project_all(_pixels(1), "relu", rows, channels, yx)
    assert torch.count_nonzero(raw[~_inside(bx)]) > 0
    assert torch.equal(masked, torch.where(_inside(bx), raw, 0.0))
    lm = _model("resnet18")
    assert Projector(lm.module, ["fc"], lm.mean, lm.std, "gradient").packable("fc")


def test_activations_equal_the_tap():
    # each node alone: a Tap that also returns a later node shows an output that an in-place
    # ReLU after it has overwritten (AlexNet's features.10 then reads as features.11)
    lm = _model("alexnet")
    layers = ["features.1", "features.10", "classifier.6"]
    pixels = _pixels(3, seed=6)
    for method in METHODS:
        proj = Projector(lm.module, layers, lm.mean, lm.std, method)
        for node in layers:
            with torch.inference_mode():
                want = Tap(lm.module, [node], lm.mean, lm.std)(pixels)[node]
            assert torch.equal(proj.activations(pixels, node), want), (method, node)
    assert proj.activations(pixels, "features.10").min() < 0  # before its ReLU


def test_model_unchanged():
    lm = load_model("resnet18", "none", input_size=S)
    model = lm.module
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pixels = _pixels(2, seed=8)
    x = (pixels.float() / 255 - 0.45) / 0.226
    with torch.no_grad():
        before = model(x)
    kinds = [type(m) for m in model.modules()]
    for method in METHODS:
        proj = Projector(model, ["layer3.1.add", "fc"], lm.mean, lm.std, method)
        proj.project_all(pixels, "fc", [0, 1], [3, 9])
        proj.project_all(pixels, "layer3.1.add", [1], [4], [[1, 1]])
    assert [type(m) for m in model.modules()] == kinds
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    after_state = model.state_dict()
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert isinstance(model.relu, nn.ReLU) and model.relu.inplace


def test_unknown_method():
    lm = _model("alexnet")
    with pytest.raises(UnknownNameError, match="deconvnet, guided"):
        Projector(lm.module, ["features.1"], lm.mean, lm.std, "deconv")


def test_cut_matches_patch_geometry():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.normal(size=(3, 3, S, S)).astype(np.float32))
    # fits in P: a pixel-exact crop, 0 outside the input
    box = np.array([[-3, 5, 8, 16], [60, 58, 71, 69], [10, -11, 21, 0]])
    cut = cut_projections(maps, box, 96)
    assert cut.dtype == np.float16 and cut.shape == (3, 11, 11, 3)
    for i, (y0, x0, y1, x1) in enumerate(box):
        want = np.zeros((11, 11, 3), np.float32)
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, S), min(x1, S)
        if sy1 > sy0 and sx1 > sx0:
            region = maps[i, :, sy0:sy1, sx0:sx1].permute(1, 2, 0).numpy()
            want[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = region
        np.testing.assert_array_equal(cut[i], want.astype(np.float16))
    # larger than P: resampled like the pixels; a map equal to an image's pixels cuts to its patch
    image = torch.randint(0, 256, (1, 3, S, S), dtype=torch.uint8)
    big = np.array([[-20, -10, 60, 70], [10, 3, 90, 83]])
    patch = cut_patches(image, np.array([0, 0]), big, 32, (0, 0, 0)).numpy().astype(np.float32)
    cut = cut_projections(image.float().expand(2, -1, -1, -1), big, 32).astype(np.float32)
    assert cut.shape == (2, 32, 32, 3)
    assert np.abs(cut - patch).max() <= 1 + 0.25  # the uint8 kernel's fixed point, float16
    white = torch.full((1, 3, S, S), 255, dtype=torch.uint8)
    outside = cut_patches(white, np.array([0, 0]), big, 32, (0, 0, 0)).numpy() == 0
    assert outside.any() and (~outside).any()
    assert np.all(cut[outside] == 0)
