"""Compact files: gzip-compressed patches, and whole-field nodes' patches stored once per image
(``/thumbs`` + ``patch_ref``) behind the same ``LayerResult.patches``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import patchmine
from patchmine import store
from patchmine.corpus import CorpusDataset, discover
from patchmine.merge import merge
from patchmine.mine import mine
from patchmine.models import load_model
from tests.conftest import assert_same_file, tiny_settings

SIZE = 64


def _settings(model: str, **change) -> dict:
    base = {"layers": ["pool", "head"], "k": 20, "input_size": SIZE}  # k > 15 images: unused slots
    return tiny_settings(model, **{**base, **change})


def test_whole_field_patches_are_the_input_once_per_image(tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "r.h5"
    mine([corpus_dir], out, **_settings(tiny_model))
    ds = CorpusDataset(discover([corpus_dir]), SIZE)
    fill = [round(m * 255) for m in load_model(tiny_model, "none", SIZE).mean]
    with h5py.File(out, "r") as f:
        head, pool = f["layers/head"], f["layers/pool"]
        assert "patch" not in head and "patch" in pool
        assert pool["patch"].compression == "gzip" and pool["patch"].chunks[0] == 1
        assert f["thumbs/patch"].compression == "gzip"
        ids = f["thumbs/image"][()]
        image = head["image"][()]
        assert ids.tolist() == sorted(set(image[image >= 0].tolist()))
        assert f["thumbs/patch"].shape == (len(ids), SIZE, SIZE, 3)
        ref = head["patch_ref"][()]
        assert ref.dtype == np.int32 and ((ref == -1) == (image == -1)).all()
        assert (ids[ref[image >= 0]] == image[image >= 0]).all()
    with patchmine.open(out) as r:
        lr = r.layer("head")
        assert (lr.image == -1).any()
        for c in range(lr.channels):
            patches = lr.patches(c)
            assert patches.shape == (lr.k, SIZE, SIZE, 3)
            for slot, i in enumerate(lr.image[c].tolist()):
                if i < 0:
                    assert (patches[slot] == fill).all()
                else:  # P = the input side: the whole input, pixel for pixel
                    want = ds[i]["pixels"].permute(1, 2, 0).numpy()
                    np.testing.assert_array_equal(patches[slot], want)


@pytest.fixture(scope="module")
def per_slot_and_shared(tmp_path_factory, corpus_dir, tiny_model):
    """The same run written with the whole-field patches once per slot (the old layout) and once
    per image; patch_size 32, so the whole input is resampled."""
    folder = tmp_path_factory.mktemp("thumbs")
    shared, per_slot = folder / "shared.h5", folder / "per_slot.h5"
    mine([corpus_dir], shared, **_settings(tiny_model, patch_size=32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "_shared_patches", lambda layers: [])
        mine([corpus_dir], per_slot, **_settings(tiny_model, patch_size=32))
    return shared, per_slot


def test_patch_ref_equals_per_slot_patches(per_slot_and_shared):
    shared, per_slot = per_slot_and_shared
    with h5py.File(per_slot, "r") as f:
        assert "thumbs" not in f and "patch" in f["layers/head"]
    with patchmine.open(shared) as a, patchmine.open(per_slot) as b:
        for name in a.layers:
            la, lb = a.layer(name), b.layer(name)
            for c in range(la.channels):
                np.testing.assert_array_equal(la.patches(c), lb.patches(c), err_msg=name)
    assert shared.stat().st_size < per_slot.stat().st_size


def test_shards_with_patch_ref_merge_to_one_process(tmp_path, corpus_dir, tiny_model):
    ref = tmp_path / "ref.h5"
    mine([corpus_dir], ref, **_settings(tiny_model, patch_size=32, k=5))
    parts = [tmp_path / f"part-{i}.h5" for i in range(3)]
    for i, part in enumerate(parts):
        mine([corpus_dir], part, shard=(i, 3), **_settings(tiny_model, patch_size=32, k=5))
    out = merge([parts[1], parts[2], parts[0]], tmp_path / "all.h5")
    assert_same_file(ref, out)
    with h5py.File(out, "r") as f:
        assert "patch_ref" in f["layers/head"] and len(f["thumbs/image"]) > 1
