"""Model naming and loading: torchvision registry, embedded default, custom factories, checkpoints."""

from __future__ import annotations

import textwrap
import urllib.error

import pytest
import torch

from patchmine.errors import UnknownNameError, UsageError
from patchmine.models import DEFAULT_MODEL, load_model, model_names
from patchmine.taps import Tap, default_layers, layer_names, node_shapes, resolve_layers


def test_names_include_default_and_torchvision():
    names = model_names()
    assert names[0] == DEFAULT_MODEL and "alexnet" in names and "resnet50" in names


def test_unknown_model_lists_nearest():
    with pytest.raises(UnknownNameError, match="resnet50") as e:
        load_model("resnet05", "none")
    assert "unknown model 'resnet05'" in str(e.value)


def test_torchvision_random_init_has_imagenet_stats():
    lm = load_model("resnet18", "none")
    assert lm.weights == "none" and not lm.module.training
    assert lm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert all(not p.requires_grad for p in lm.module.parameters())


def test_unknown_weights_name():
    with pytest.raises(UnknownNameError, match="IMAGENET1K_V1"):
        load_model("alexnet", "IMAGENET9K")


def test_offline_download_fails_clearly(monkeypatch):
    def offline(*a, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match="need a network"):
        load_model("alexnet", "DEFAULT")


def test_embedded_default_loads_packaged_weights():
    lm = load_model()
    assert lm.name == DEFAULT_MODEL and "efficientnet" in lm.weights
    assert lm.mean == pytest.approx((0.498,) * 3)
    with torch.inference_mode():
        out = lm.module(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1000)


def test_custom_factory_from_file_and_checkpoint(tmp_path):
    src = tmp_path / "tiny.py"
    src.write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def build():
            m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 6, 3), nn.ReLU())
            m.mean, m.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
            return m
    """)
    )
    lm = load_model(f"{src}:build", "none")
    assert lm.mean == (0.5, 0.5, 0.5) and lm.std == (0.25, 0.25, 0.25)
    torch.manual_seed(3)
    trained = load_model(f"{src}:build", "none").module
    ckpt = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    again = load_model(f"{src}:build", str(ckpt))
    assert again.weights == str(ckpt)
    for a, b in zip(again.module.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UnknownNameError, match="build"):
        load_model(f"{src}:buidl", "none")
    with pytest.raises(UsageError, match="not found"):
        load_model(f"{tmp_path / 'nope.py'}:build", "none")


def test_checkpoint_that_does_not_fit(tmp_path):
    ckpt = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, ckpt)
    with pytest.raises(UsageError, match="does not fit"):
        load_model("resnet18", str(ckpt))


def test_taps_shapes_names_and_errors():
    lm = load_model("alexnet", "none")
    names = layer_names(lm.module)
    assert names[0] == "features.0" and "classifier.6" in names
    shapes = node_shapes(lm.module, 224)
    assert shapes["features.1"] == (64, 55, 55) and shapes["classifier.6"] == (1000,)
    # the last node of each feature-map size: 55, 27, 13 and 6 pixels
    assert default_layers(shapes) == ["features.1", "features.4", "features.11", "avgpool"]
    with pytest.raises(UnknownNameError, match="features.10"):
        resolve_layers(shapes, ["features.100"])
    tap = Tap(lm.module, ["features.4", "classifier.6"], lm.mean, lm.std)
    px = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        out = tap(px)
        ref = lm.module(
            (px.float() / 255 - torch.tensor(lm.mean).view(1, 3, 1, 1))
            / torch.tensor(lm.std).view(1, 3, 1, 1)
        )
    assert out["features.4"].shape == (3, 192, 27, 27)
    assert torch.allclose(out["classifier.6"], ref, atol=1e-4)


@pytest.mark.parametrize("threads", [1, None])
def test_tap_is_batch_size_invariant(threads):
    """The padded forward gives bit-identical activations whatever the batch split, also
    single-threaded (where PyTorch picks a 1x1 convolution's kernel by batch size)."""
    lm = load_model(DEFAULT_MODEL, "none")
    names = layer_names(lm.module)
    tap = Tap(lm.module, [names[2], names[len(names) // 2], names[-1]], lm.mean, lm.std)
    torch.manual_seed(0)
    px = torch.randint(0, 256, (11, 3, 96, 96), dtype=torch.uint8)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        with torch.inference_mode():
            whole = tap(px)
            parts = [tap(px[i : i + 3]) for i in range(0, 11, 3)]
    finally:
        torch.set_num_threads(before)
    for k, v in whole.items():
        assert torch.equal(v, torch.cat([p[k] for p in parts]))
