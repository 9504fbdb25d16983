"""patchmine against the tools users already run: torchvision's preprocessing and HDF5's own tools.

- The embedded model's top-k, recomputed by independent code (torchvision transforms, the model's
  forward, ``torch.topk`` over per-image maxima), equals patchmine's.
- A mined file reads without error in Debian's ``h5dump`` and ``h5ls`` (HDF5 1.10): every dataset and
  attribute. Skipped with the reason where those tools are not installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor

import patchmine
from patchmine.lite0 import MEAN, STD, efficientnet_lite0
from patchmine.mine import mine
from tests.conftest import SHARED_CORPUS, tiny_settings, write_corpus

LAYERS = ["_blocks.10.add", "_fc"]


def _independent_topk(files: list[Path], size: int, resize: int, k: int) -> dict:
    """Per layer (scores (C,k), images (C,k)) from torchvision's transforms and a plain forward."""
    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    x = []
    for p in files:
        with Image.open(p) as im:
            x.append(tf(im.convert("RGB")))
    net = create_feature_extractor(efficientnet_lite0(size).eval(), LAYERS)
    with torch.inference_mode():
        outs = [net(batch) for batch in torch.stack(x).split(8)]
    ref = {}
    for name in LAYERS:
        a = torch.cat([o[name] for o in outs])
        per_image = a.flatten(2).amax(2) if a.ndim == 4 else a  # (N, C)
        score, image = per_image.T.topk(k, dim=1)  # (C, k): images by descending score
        ref[name] = (score.numpy(), image.numpy())
    return ref


def _check_topk(files: list[Path], tmp_path: Path, resize: int) -> None:
    k, size = 5, 224
    out = tmp_path / "r.h5"
    mine(files, out, layers=LAYERS, k=k, resize=resize, batch_size=8, workers=0, progress=False)
    ref = _independent_topk(files, size, resize, k)
    with patchmine.open(out) as r:
        assert r.attrs["resize"] == resize
        for name in LAYERS:
            lr = r.layer(name)
            want_score, want_image = ref[name]
            # corpus order: the files were given one by one, in this order
            got_image = lr.image
            assert np.array_equal(got_image, want_image), name
            # within 1e-4 of the row's magnitude (float32 sums in another order: a logit near 0
            # moves by ~1e-6 absolute, which is no relative bound on that one value)
            scale = np.abs(want_score).max(1, keepdims=True)
            err = np.abs(lr.score - want_score) / scale
            assert err.max() <= 1e-4, (name, float(err.max()))
            print(f"{name}: max |score difference| / row magnitude {err.max():.2e}")


def test_embedded_model_topk_equals_torchvision_pipeline(tmp_path):
    """On synthetic images of assorted sizes, with --resize 256 (torchvision's ImageNet convention)."""
    folder = write_corpus(tmp_path / "corpus", 12, seed=3, duplicates=False)
    files = sorted(folder.iterdir())
    _check_topk(files, tmp_path, resize=256)


@pytest.mark.corpus
@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason=f"needs {SHARED_CORPUS}")
def test_embedded_model_topk_equals_torchvision_pipeline_on_photos(tmp_path):
    files = sorted(SHARED_CORPUS.glob("*.JPEG"))[::20]  # 25 photographs
    _check_topk(files, tmp_path, resize=224)


# ---------------------------------------------------------------------------------------------
# HDF5 tools


def _objects(path: Path) -> tuple[list[str], list[str]]:
    """Every dataset, and every attribute as "object/name", as h5py sees them."""
    datasets, attrs = [], []
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets.append(name)
            attrs.extend(f"{name}/{a}" for a in obj.attrs)

        visit("", f)
        f.visititems(visit)
    return datasets, attrs


@pytest.mark.skipif(
    shutil.which("h5dump") is None or shutil.which("h5ls") is None,
    reason="h5dump/h5ls not installed (Debian: apt-get install hdf5-tools; .ci/run does)",
)
def test_result_file_reads_in_hdf5_tools(tmp_path, tiny_model):
    out = tmp_path / "r.h5"
    corpus = write_corpus(tmp_path / "corpus", 6)
    (corpus / "broken.png").write_bytes(b"not an image")  # /images/ok holds a False
    mine([corpus], out, **tiny_settings(tiny_model, layers=["pool", "head"], k=3))
    datasets, attrs = _objects(out)
    with h5py.File(out, "r") as f:  # the forms that HDF5 1.10 once failed to decode are there
        assert f["images/ok"].dtype == bool and not f["images/ok"][()].all()
        assert f["layers/pool/heat"].dtype == np.float16 and f["layers/pool/heat"].chunks
        assert f["layers/head"].attrs["rf_whole"].dtype == bool
        # v2 compact forms: gzip patches, whole-field patches once per image
        assert f["layers/pool/patch"].compression == "gzip" and "patch_ref" in f["layers/head"]
        assert f["thumbs/patch"].compression == "gzip"

    dump = subprocess.run(["h5dump", str(out)], capture_output=True, text=True, timeout=120)
    assert dump.returncode == 0, dump.stderr[-2000:]
    assert "error" not in dump.stderr.lower() and "*ERROR*" not in dump.stdout
    for name in datasets:
        assert f'DATASET "{name.rpartition("/")[2]}"' in dump.stdout, name
    for name in attrs:
        assert f'ATTRIBUTE "{name.rpartition("/")[2]}"' in dump.stdout, name
    assert dump.stdout.count('DATASET "') == len(datasets)
    assert dump.stdout.count('ATTRIBUTE "') == len(attrs)
    # each dataset and attribute by its own path too (what a user's script does)
    for name in [
        "/images/ok",
        "/images/transform",
        "/layers/pool/heat",
        "/layers/pool/patch",
        "/thumbs/patch",
        "/layers/head/patch_ref",
    ]:
        one = subprocess.run(["h5dump", "-d", name, str(out)], capture_output=True, text=True)
        assert one.returncode == 0 and "DATA {" in one.stdout, (name, one.stderr)
    one = subprocess.run(
        ["h5dump", "-a", "/layers/head/rf_whole", str(out)], capture_output=True, text=True
    )
    assert one.returncode == 0 and "TRUE" in one.stdout, one.stdout + one.stderr

    ls = subprocess.run(["h5ls", "-r", "-v", str(out)], capture_output=True, text=True, timeout=120)
    assert ls.returncode == 0, ls.stderr[-2000:]
    assert "*ERROR*" not in ls.stdout + ls.stderr, ls.stdout[-3000:]
    for name in datasets:
        assert f"/{name} " in ls.stdout, name
