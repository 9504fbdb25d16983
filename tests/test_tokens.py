"""Token models: ViT token and @cls nodes, Swin channel-last stages, fields, resume and merge."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

import patchmine
from patchmine import store
from patchmine.cli import main
from patchmine.corpus import discover
from patchmine.errors import UsageError
from patchmine.merge import merge
from patchmine.mine import Miner, mine
from patchmine.models import load_model
from patchmine.receptive import Field, receptive_fields
from patchmine.taps import BATCH_MULTIPLE, select_layers
from patchmine.tokens import minable
from tests.conftest import assert_same_file, make_image

S = 32  # input side: a 4 x 4 grid of 8 x 8 patches
PRE = "encoder.layers.encoder_layer_0.ln"  # before the first attention: exact patch fields
POST = "encoder.layers.encoder_layer_0.add"  # after it: whole-input fields
LAST = "encoder.ln"

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torchvision.models.vision_transformer import VisionTransformer

    def vit():
        torch.manual_seed(0)
        m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                              hidden_dim=16, mlp_dim=32)
        with torch.no_grad():  # torchvision zero-inits the head and a tiny class token
            m.class_token.normal_()
            m.heads.head.weight.normal_()
        return m

    class Embed(nn.Module):
        '''A linear patch embedding only: positive weights, tokens with a class token in front.'''

        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 4, 8, stride=8, bias=False)
            self.cls = nn.Parameter(torch.zeros(1, 1, 4))
            nn.init.constant_(self.proj.weight, 1.0)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)

    def embed():
        m = Embed()
        m.mean, m.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return m
    """
)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tokmodels.py"
    path.write_text(MODELS)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """10 pictures already 32 x 32 (they pass through pixel-exact) and a duplicate (a tie)."""
    folder = tmp_path_factory.mktemp("tokcorpus")
    for i in range(10):
        make_image(500 + i, (S, S)).save(folder / f"t{i:02d}.png")
    (folder / "t99.png").write_bytes((folder / "t03.png").read_bytes())
    return folder


def _pixels(folder: Path) -> torch.Tensor:
    files = sorted(folder.glob("*.png"))
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files]
    )


def _brute(values: np.ndarray, per_image: int, k: int):
    """Top-k per channel of (N, C, H, W) maps; per_image locations of an image greedy by score (the
    token patches do not overlap: no suppression); ties by image, then flat location."""
    n, c, h, w = values.shape
    out = []
    for ch in range(c):
        entries = []
        for i in range(n):
            flat = values[i, ch].reshape(-1)
            order = sorted(range(h * w), key=lambda f: (-flat[f], f))[:per_image]
            entries += [(-float(flat[f]), i, f) for f in order]
        entries.sort()
        out.append([(-s, i, (f // w, f % w)) for s, i, f in entries[:k]])
    return out


@pytest.mark.parametrize("per_image", [1, 2])
def test_token_and_cls_nodes_match_brute_force(tmp_path, models, corpus, per_image):
    k = 4
    layers = [PRE, POST, f"{POST}@cls", LAST, f"{LAST}@cls"]
    out = tmp_path / "vit.h5"
    mine([corpus], out, model=f"{models}:vit", weights="none", layers=layers, k=k,
         per_image=per_image, input_size=S, batch_size=3, workers=0, progress=False)  # fmt: skip
    lm = load_model(f"{models}:vit", "none", S)
    fields = select_layers(lm.module, S, layers).fields
    extractor = create_feature_extractor(lm.module, [PRE, POST, LAST])
    pix = _pixels(corpus).float() / 255
    mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
    std = torch.tensor(lm.std).view(1, 3, 1, 1)
    x = (pix - mean) / std
    # the Tap's batch padding
    x = torch.cat([x, x.new_zeros((-len(x) % BATCH_MULTIPLE, *x.shape[1:]))])
    with torch.inference_mode():
        raw = {key: v[: len(pix)] for key, v in extractor(x).items()}
    with patchmine.open(out) as r:
        assert r.attrs["version"] == 2
        for name in layers:
            node, cls = name.removesuffix("@cls"), name.endswith("@cls")
            t = raw[node]  # (N, 1 + 16, 16) straight from the model
            if cls:
                maps = t[:, 0, :, None, None]
            else:
                maps = t[:, 1:, :].reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2)
            want = _brute(maps.numpy(), 1 if cls else per_image, k)
            lay = r.layer(name)
            a = lay.attrs
            if cls:
                assert a["fmap_hw"] == [1, 1] and a["rf_whole"] and a["prefix_tokens"] == 1
            else:
                assert a["layout"] == "tokens" and a["token_grid"] == [4, 4]
                assert a["prefix_tokens"] == 1 and a["rf_whole"] == (node != PRE)
                assert a["token_rf_size"] == [8, 8] and a["token_rf_stride"] == [8, 8]
            assert Field.from_attrs(a) == fields[name]  # what the gallery reads back
            for ch in range(16):
                got = [(float(s), int(i), tuple(int(v) for v in yx))
                       for s, i, yx in zip(lay.score[ch], lay.image[ch], lay.yx[ch], strict=True)]  # fmt: skip
                assert [g[1:] for g in got] == [w[1:] for w in want[ch]], (name, ch)
                np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want[ch]],
                                           rtol=1e-5, atol=1e-6)  # fmt: skip
                box = lay.box[ch, 0]
                y, xx = lay.yx[ch, 0]
                if node == PRE:  # exact: the token's own patch
                    assert box.tolist() == [8 * y, 8 * xx, 8 * y + 8, 8 * xx + 8]
                else:
                    assert box.tolist() == [0, 0, S, S]


def test_token_box_covers_the_planted_patch(tmp_path, models):
    folder = tmp_path / "planted"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        img = rng.integers(0, 40, (S, S, 3), dtype=np.uint8)
        if i == 4:
            img[8:16, 16:24] = 255  # patch (row 1, column 2)
        Image.fromarray(img).save(folder / f"p{i}.png")
    out = tmp_path / "embed.h5"
    node = "cat"
    mine([folder], out, model=f"{models}:embed", weights="none", layers=[node, f"{node}@cls"],
         k=2, input_size=S, workers=0, progress=False)  # fmt: skip
    with patchmine.open(out) as r:
        lay = r.layer(node)
        assert lay.attrs["layout"] == "tokens" and lay.attrs["token_grid"] == [4, 4]
        assert lay.attrs["prefix_tokens"] == 1 and not lay.attrs["rf_whole"]
        assert lay.channels == 4
        for ch in range(4):
            assert lay.image[ch, 0] == 4 and tuple(lay.yx[ch, 0]) == (1, 2)
            assert lay.box[ch, 0].tolist() == [8, 16, 16, 24]
            assert np.all(lay.patches(ch)[0] == 255)  # the patch is the planted square
            assert lay.score[ch, 0] == pytest.approx(3 * 64 * 1.0, rel=1e-6)


def _unit_gradient(model, node, view, unit) -> np.ndarray:
    """Where the input gradient of one mined unit is nonzero: (S, S) bool."""
    extractor = create_feature_extractor(model.double(), [node])
    x = torch.randn(1, 3, S, S, dtype=torch.float64, requires_grad=True)
    maps = view(extractor(x)[node]) if view is not None else extractor(x)[node]
    maps[(0, *unit)].backward()
    return (x.grad[0].abs().sum(0) > 0).numpy()


def test_gradient_fields_patch_before_attention_whole_after(models):
    lm = load_model(f"{models}:vit", "none", S)
    found = minable(lm.module, S)
    torch.manual_seed(1)
    for node in (PRE, "encoder.add", "cat", POST, LAST):
        f = found.fields[node]
        for c, y, x in [(0, 0, 0), (5, 2, 1), (15, 3, 3)]:
            hit = _unit_gradient(lm.module, node, found.views[node], (c, y, x))
            if node in (POST, LAST):
                assert f.whole and hit.all(), node
            else:
                y0, x0, y1, x1 = f.box(y, x)
                want = np.zeros((S, S), bool)
                want[max(y0, 0) : y1, max(x0, 0) : x1] = True
                assert not f.whole and np.array_equal(hit, want), (node, y, x)


def test_layers_lists_token_and_cls_nodes(capsys):
    assert main(["layers", "vit_b_16", "--weights", "none"]) == 0
    out = capsys.readouterr().out
    lines = [line.lstrip("* ") for line in out.splitlines() if not line.startswith("#")]
    rows = {line.split()[0]: line for line in lines}  # "*" marks the default layers
    assert "(768,14,14)" in rows[LAST] and "whole" in rows[LAST] and "tokens 1+14x14" in rows[LAST]
    assert "(768)" in rows[f"{LAST}@cls"] and "whole" in rows[f"{LAST}@cls"]
    pre = rows["encoder.layers.encoder_layer_0.ln"].split()
    assert pre[1:5] == ["(768,14,14)", "16", "16", "0"]


def test_default_layers_spread_over_the_encoder_blocks():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=S, patch_size=8, num_layers=12, num_heads=2, hidden_dim=16,
                            mlp_dim=32)  # fmt: skip
    chosen = select_layers(vit, S)  # every token node has the same 4 x 4 grid
    blocks = [f"encoder.layers.encoder_layer_{i}.add_1" for i in (0, 3, 6, 9)]
    assert chosen.names == [*blocks, LAST]
    assert all(chosen.views[n].layout == "tokens" and chosen.shapes[n] == (16, 4, 4)
               for n in chosen.names)  # fmt: skip


def test_token_node_without_a_grid_is_refused(tmp_path, models, corpus):
    (tmp_path / "seq.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Seq(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(32, 8)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x.mean(1))\n"  # (N, 32, 32) -> (N, 32, 8): no patch grid
        "def build():\n    return Seq()\n"
    )
    with pytest.raises(UsageError, match="node 'lin'.*grid"):
        Miner(discover([corpus]), model=f"{tmp_path / 'seq.py'}:build",
              weights="none", layers=["lin"], k=2, per_image=1, input_size=S)  # fmt: skip


def test_swin_channel_last_stages_mine(tmp_path, corpus):
    lm = load_model("swin_t", "none", 64)
    fields = receptive_fields(lm.module, 64)
    assert fields["features.0.2"].layout == "nhwc" and not fields["features.0.2"].whole
    assert fields["features.0.2"].size == (4, 4)
    stage = "features.3.1.add_1"
    assert fields[stage].layout == "nhwc" and fields[stage].whole
    assert fields[stage].unit.size == (8, 8)
    out = tmp_path / "swin.h5"
    mine([corpus], out, model="swin_t", weights="none", layers=["features.0.2", stage], k=2,
         input_size=64, workers=0, progress=False)  # fmt: skip
    extractor = create_feature_extractor(lm.module, [stage])
    with patchmine.open(out) as r:
        lay = r.layer(stage)
        assert lay.attrs["layout"] == "nhwc" and lay.channels == 192
        assert lay.attrs["fmap_hw"] == [8, 8]
        patch = torch.from_numpy(lay.patches(7)[0]).permute(2, 0, 1)[None].float() / 255
        assert patch.shape[-1] == 64  # a whole-field patch is the whole 64 px input
        mean = torch.tensor(lm.mean).view(1, 3, 1, 1)
        std = torch.tensor(lm.std).view(1, 3, 1, 1)
        x = torch.cat([(patch - mean) / std, torch.zeros(BATCH_MULTIPLE - 1, 3, 64, 64)])
        with torch.inference_mode():
            t = extractor(x)[stage][0]  # (H, W, C)
        y, xx = lay.yx[7, 0]
        assert float(t[y, xx, 7]) == pytest.approx(float(lay.score[7, 0]), rel=1e-4, abs=1e-4)
        assert float(t[..., 7].max()) == pytest.approx(float(lay.score[7, 0]), rel=1e-4, abs=1e-4)


def test_resume_and_merge_of_token_nodes(tmp_path, models, corpus):
    common = dict(model=f"{models}:vit", weights="none", layers=[LAST, f"{LAST}@cls"], k=3,
                  per_image=2, input_size=S, workers=0, progress=False)  # fmt: skip
    whole = tmp_path / "whole.h5"
    mine([corpus], whole, batch_size=4, **common)
    miner = Miner(discover([corpus]), **{
        k: v for k, v in common.items() if k not in ("workers", "progress")})  # fmt: skip
    resumed = tmp_path / "resumed.h5"
    ckpt = resumed.with_name(resumed.name + ".ckpt")
    with pytest.raises(KeyboardInterrupt):
        miner.first_pass(2, 0, False, lambda: True,
                         lambda: store.save_checkpoint(ckpt, miner.state_dict()))  # fmt: skip
    s = mine([corpus], resumed, resume=True, batch_size=3, **common)
    assert s.resumed_from == 2
    assert_same_file(whole, resumed)
    parts = [tmp_path / f"part{i}.h5" for i in range(2)]
    for i, part in enumerate(parts):
        mine([corpus], part, shard=(i, 2), batch_size=5, **common)
    merged = merge(parts, tmp_path / "merged.h5")
    assert_same_file(whole, merged)


def test_vit_pipeline_layers_are_minable():
    from patchmine.pipeline import load_pipeline

    job = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines/vit.toml")
    assert job.mine["model"] == "vit_b_16" and job.mine["weights"] == "DEFAULT"
    found = minable(load_model("vit_b_16", "none", 224).module, 224)
    assert set(job.mine["layers"]) <= set(found.shapes)
