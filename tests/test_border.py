"""Border units: `--min-inside` (exact against brute force, mergeable, resumable, recorded) and
every layer's `border_share`."""

from __future__ import annotations

import numpy as np
import pytest

import patchmine
from patchmine.cli import main
from patchmine.errors import UsageError
from patchmine.merge import merge
from patchmine.mine import mine
from patchmine.receptive import Field, inside_fraction
from tests.conftest import assert_same_file, assert_winners, signal_at, tiny_settings
from tests.test_mine import brute_force, inside_by_pixels

LAYERS = ["pool", "add", "head"]
SIZE, K, F = 64, 4, 0.6


def _settings(model: str, **change) -> dict:
    base = {"layers": LAYERS, "k": K, "input_size": SIZE, "min_inside": F}
    return tiny_settings(model, **{**base, **change})


def _border_share(lr) -> float:
    """The share of used slots whose stored box runs past the input, from the file's boxes."""
    used = lr.image >= 0
    b = lr.box[used]
    out = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > SIZE) | (b[:, 3] > SIZE)
    return float(out.mean())


@pytest.mark.parametrize(
    "field",
    [
        Field((9, 9), (4, 4), (-4, -4)),  # the tiny net's pool
        Field((25, 7), (4, 2), (-12, -1)),  # non-square
        Field((90, 90), (4, 4), (-40, -40)),  # larger than the input
        Field((64, 64), (64, 64), (0, 0), whole=True),
    ],
)
def test_inside_fraction_counts_pixels(field):
    got = inside_fraction(field, (16, 16), (SIZE, SIZE))
    np.testing.assert_array_equal(got, inside_by_pixels(field, (16, 16), SIZE))


@pytest.mark.parametrize("per_image", [1, 2])
def test_min_inside_matches_brute_force(tmp_path, corpus_dir, tiny_model, per_image):
    ref, fields = brute_force(tiny_model, LAYERS, SIZE, corpus_dir, K, per_image, min_inside=F)
    plain, _ = brute_force(tiny_model, LAYERS, SIZE, corpus_dir, K, per_image)
    outs = []
    for bs in (16, 3):
        outs.append(tmp_path / f"b{bs}.h5")
        mine([corpus_dir], outs[-1], **_settings(tiny_model, per_image=per_image, batch_size=bs))
    assert_same_file(outs[0], outs[1])
    changed = 0
    with patchmine.open(outs[0]) as r:
        assert r.attrs["min_inside"] == F
        for n in LAYERS:
            lr = r.layer(n)
            score, image, yx, a = ref[n]
            assert_winners(lr, score, image, yx, n)
            used = image >= 0
            frac = inside_by_pixels(fields[n], a.shape[2:], SIZE)
            assert (frac[yx[used][:, 0], yx[used][:, 1]] >= F).all(), n
            changed += not np.array_equal(image, plain[n][1])
            # statistics still cover every unit, barred ones included
            assert np.array_equal(lr.stats()["max"], a.max(axis=(0, 2, 3))), n
            assert lr.attrs["border_share"] == pytest.approx(_border_share(lr), abs=0), n
        assert r.layer("head").attrs["border_share"] == 0  # whole input: never past the edge
    assert changed  # the option barred winners of the reference run


def test_border_share_without_min_inside(tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "r.h5"
    mine([corpus_dir], out, **_settings(tiny_model, min_inside=None))
    with patchmine.open(out) as r:
        assert "min_inside" not in r.attrs
        shares = [r.layer(n).attrs["border_share"] for n in LAYERS]
        for n, share in zip(LAYERS, shares, strict=True):
            assert share == _border_share(r.layer(n)), n
    assert shares[0] > 0 and shares[2] == 0


def test_min_inside_shards_merge_to_one_process(tmp_path, corpus_dir, tiny_model):
    # the duplicate image (index 14) ties with index 1 across shards
    settings = _settings(tiny_model, per_image=2)
    ref = tmp_path / "ref.h5"
    mine([corpus_dir], ref, **settings)
    parts = [tmp_path / f"part-{i}.h5" for i in range(3)]
    for i, part in enumerate(parts):
        mine([corpus_dir], part, shard=(i, 3), **settings)
    out = merge(parts[::-1], tmp_path / "all.h5")
    assert_same_file(ref, out)


@pytest.mark.slow
def test_min_inside_torchrun_two_ranks_equal_one_process(tmp_path, corpus_dir, tiny_model):
    from tests.test_scaleout import _finish, _torchrun

    ref = tmp_path / "ref.h5"
    mine([corpus_dir], ref, **_settings(tiny_model, per_image=2))
    out = tmp_path / "tr.h5"
    args = [str(corpus_dir), "--out", str(out), "--model", tiny_model, "--weights", "none"]
    args += ["--layers", ",".join(LAYERS), "-k", str(K), "--per-image", "2"]
    args += ["--input-size", str(SIZE), "--workers", "0", "--min-inside", str(F), "-q"]
    _finish(_torchrun(2, args))
    assert_same_file(ref, out)


def test_min_inside_resume(tmp_path, corpus_dir, tiny_model, monkeypatch):
    ref = tmp_path / "ref.h5"
    mine([corpus_dir], ref, **_settings(tiny_model, batch_size=2))
    import patchmine.miner as m

    out = tmp_path / "run.h5"
    with monkeypatch.context() as mp:
        signal_at(mp, m.Miner, "collect", call=3)
        with pytest.raises(KeyboardInterrupt):
            mine([corpus_dir], out, **_settings(tiny_model, batch_size=2))
    assert (tmp_path / "run.h5.ckpt").exists() and not out.exists()
    for other in (0.5, None):
        with pytest.raises(UsageError, match="min_inside"):
            mine([corpus_dir], out, resume=True, **_settings(tiny_model, min_inside=other))
    s = mine([corpus_dir], out, resume=True, **_settings(tiny_model, batch_size=5))
    assert s.resumed_from > 0
    assert_same_file(ref, out)


def test_min_inside_refuses_bad_values(tmp_path, corpus_dir, tiny_model, capsys):
    base = [str(corpus_dir), "--out", str(tmp_path / "x.h5"), "--model", tiny_model]
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit) as e:
            main(["mine", *base, "--min-inside", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--min-inside" in err, err
    with pytest.raises(UsageError, match="min-inside"):
        mine([corpus_dir], tmp_path / "y.h5", **_settings(tiny_model, min_inside=-0.1))
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_info_shows_border_share(tmp_path, corpus_dir, tiny_model, capsys):
    out = tmp_path / "r.h5"
    mine([corpus_dir], out, **_settings(tiny_model))
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"min_inside={F:g}" in text
    with patchmine.open(out) as r:
        share = r.layer("pool").attrs["border_share"]
    assert f"border {100 * share:.0f}%" in text and "border 0%" in text


def test_pipeline_min_inside_key(tmp_path, corpus_dir):
    from patchmine.pipeline import load_pipeline

    def write(value: str):
        path = tmp_path / "p.toml"
        path.write_text(
            f'[corpus]\npaths = ["{corpus_dir}"]\n[mine]\nout = "r.h5"\nmin_inside = {value}\n'
        )
        return path

    assert load_pipeline(write("0.75")).mine["min_inside"] == 0.75
    for bad in ("0", "1.5", '"half"', "true"):
        with pytest.raises(UsageError, match="min_inside must be a number in"):
            load_pipeline(write(bad))
