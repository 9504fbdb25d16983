"""Reliability: every bad input gets a clear answer; no fault loses work or leaves a broken file.

- a corpus zoo (broken, odd, hostile files) is mined: the good images exactly as if alone, each bad
  one recorded with its reason;
- bad arguments: exit 2 and one clear line on stderr, never a traceback;
- faults: SIGINT / SIGTERM in every phase, a full disk, a damaged checkpoint: a valid checkpoint, a
  message saying how to resume, no partial output and no stray temporary files.

CLI cases run in real processes. Importing torch costs seconds, so most of them go through one driver
process that imports patchmine once and forks a fresh child per command line (``cli_many`` in conftest).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import patchmine
import patchmine.mine as mine_mod
from patchmine import cli, store
from patchmine.errors import UsageError
from patchmine.mine import mine
from tests.conftest import (
    TINY_LAYERS,
    assert_same_file,
    cli_env,
    cli_many,
    make_image,
    popen_cli,
    signal_at,
    tiny_settings,
    write_corpus,
)

LAYERS = TINY_LAYERS
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------
# The zoo


def _png_header(w: int, h: int) -> bytes:
    """A valid PNG header that declares a ``w`` x ``h`` RGB image, with an empty image stream."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


NON_UTF8_GOOD = b"g_caf\xe9_good.png"  # Latin-1 bytes: not valid UTF-8
NON_UTF8_BAD = b"z_bad_\xff\xfe.jpg"


def _write_good(folder: Path) -> list[str]:
    """The odd-but-valid files of the zoo; returns their names (as ``discover`` gives them)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []

    def save(name: str, img: Image.Image, **kw) -> None:
        img.save(folder / name, **kw)
        names.append(name)

    save("a_plain.png", make_image(1, (90, 70)))
    save("a_plain2.jpg", make_image(2, (64, 64)))
    save("b_one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 60)))
    save("c_wide.png", make_image(3, (4000, 3)))
    save("c_tall.png", make_image(4, (3, 4000)))
    frames = [make_image(5 + i, (50, 40)).convert("P") for i in range(3)]
    save("d_animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
    gray16 = (np.asarray(make_image(8, (60, 50)).convert("L"), np.uint16) * 257).astype(np.uint16)
    save("e_gray16.png", Image.fromarray(gray16))
    assert Image.open(folder / "e_gray16.png").mode.startswith("I")
    save("f_cmyk.jpg", make_image(9, (70, 66)).convert("CMYK"))
    pal = make_image(10, (48, 48)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("g_palette_transparent.png", pal, transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save("h_exif_rotated.jpg", make_image(11, (100, 50)), exif=exif)
    # a PNG that calls itself .jpg: decoded by content, not by name
    make_image(12, (64, 80)).save(folder / "i_png_named.jpg", format="PNG")
    names.append("i_png_named.jpg")
    with open(os.path.join(os.fsencode(folder), NON_UTF8_GOOD), "wb") as f:
        make_image(13, (66, 64)).save(f, format="PNG")
    names.append(os.fsdecode(NON_UTF8_GOOD))
    return sorted(names)


def _write_bad(folder: Path) -> dict[str, str]:
    """The broken and hostile files; returns name -> a word the recorded reason must contain.

    The file deleted between discovery and reading (``m_deleted.png``) is made here and deleted by
    the test after discovery.
    """
    bad: dict[str, str] = {}
    (folder / "m_zero_bytes.jpg").write_bytes(b"")
    bad["m_zero_bytes.jpg"] = "cannot identify"
    jpeg = folder / "m_truncated.jpg"
    make_image(20, (120, 90)).save(jpeg, quality=95)
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    bad["m_truncated.jpg"] = "truncated"
    (folder / "m_text.jpg").write_text("hello, I am not a picture\n")
    bad["m_text.jpg"] = "cannot identify"
    # decompression bombs: a small file whose header declares 2 and 1.2 times Pillow's limit
    (folder / "m_bomb_big.png").write_bytes(_png_header(20000, 20000))
    bad["m_bomb_big.png"] = "DecompressionBomb"
    (folder / "m_bomb_small.png").write_bytes(_png_header(10000, 10000))
    bad["m_bomb_small.png"] = "DecompressionBomb"
    make_image(21, (64, 64)).save(folder / "m_deleted.png")
    bad["m_deleted.png"] = "No such file"
    os.symlink("m_loop.jpg", folder / "m_loop.jpg")  # a link to itself
    bad["m_loop.jpg"] = "symbolic links"
    os.mkfifo(folder / "m_fifo.jpg")  # opening it would block forever
    bad["m_fifo.jpg"] = "not a regular file"
    with open(os.path.join(os.fsencode(folder), NON_UTF8_BAD), "wb") as f:
        f.write(b"garbage")
    bad[os.fsdecode(NON_UTF8_BAD)] = "cannot identify"
    if not IS_ROOT:  # root reads through chmod 000; test_unreadable_file covers it otherwise
        (folder / "m_unreadable.png").write_bytes((folder / "a_plain.png").read_bytes())
        os.chmod(folder / "m_unreadable.png", 0)
        bad["m_unreadable.png"] = "Permission denied"
    return bad


def _safe(name: str) -> str:
    """A path as the result file stores it (non-UTF-8 bytes escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _mine(corpus, out, tiny_model, **kw):
    return mine(corpus, out, **tiny_settings(tiny_model, **kw))


def _assert_same_for_good_images(zoo_h5: Path, good_h5: Path) -> None:
    """Every layer of two results holds the same winners, image indices mapped through paths."""
    with patchmine.open(zoo_h5) as a, patchmine.open(good_h5) as b:
        assert a.layers == b.layers
        pa, pb = np.array(a.image_paths, object), np.array(b.image_paths, object)
        ia = {p: i for i, p in enumerate(a.image_paths)}
        for p, j in zip(b.image_paths, range(b.n_images), strict=True):
            i = ia[p]
            assert a.image_ok[i] and b.image_ok[j], p
            assert np.array_equal(a.image_shape[i], b.image_shape[j]), p
            assert np.array_equal(a.image_transform[i], b.image_transform[j]), p
        for name in a.layers:
            la, lb = a.layer(name), b.layer(name)
            assert la.attrs == lb.attrs, name
            assert np.array_equal(la.score, lb.score, equal_nan=True), name
            used = lb.image >= 0
            assert np.array_equal(la.image >= 0, used), name
            assert list(pa[la.image[used]]) == list(pb[lb.image[used]]), name
            for key in ("yx", "box", "box_orig"):
                assert np.array_equal(
                    getattr(la, key)[used], getattr(lb, key)[used], equal_nan=True
                ), (name, key)
            for ch in range(la.channels):
                assert np.array_equal(la.patches(ch), lb.patches(ch)), (name, ch)
                assert np.array_equal(la.heat(ch), lb.heat(ch), equal_nan=True), (name, ch)
            sa, sb = la.stats(), lb.stats()
            for key in sb:
                assert np.array_equal(sa[key], sb[key], equal_nan=True), (name, key)


def test_zoo_is_mined_and_bad_files_are_recorded(tmp_path, tiny_model, monkeypatch):
    zoo, alone = tmp_path / "zoo", tmp_path / "good"
    good = _write_good(zoo)
    shutil.copytree(zoo, alone)
    bad = _write_bad(zoo)

    real_discover = mine_mod.discover

    def discover_then_delete(sources):
        corpus = real_discover(sources)
        victim = zoo / "m_deleted.png"
        if victim.exists() and Path(sources[0]) == zoo:
            victim.unlink()
        return corpus

    monkeypatch.setattr(mine_mod, "discover", discover_then_delete)
    s = _mine([zoo], tmp_path / "zoo.h5", tiny_model, workers=2)  # bombs: refused by their header
    _mine([alone], tmp_path / "good.h5", tiny_model)

    assert s.n_images == len(good) + len(bad) and s.n_failed == len(bad)
    text = str(s)
    with patchmine.open(tmp_path / "zoo.h5") as r:
        assert r.attrs["n_failed"] == len(bad)
        got = {
            p: (bool(ok), e)
            for p, ok, e in zip(r.image_paths, r.image_ok, r.image_error, strict=True)
        }
        assert sorted(got) == sorted(_safe(n) for n in [*good, *bad])
        for name in good:
            assert got[_safe(name)] == (True, ""), name
        for name, reason in bad.items():
            ok, error = got[_safe(name)]
            assert not ok and reason in error, (name, error)
            assert "\n" not in error
            assert _safe(name) in text, name  # the summary names every failure
        for word in ("unreadable", str(len(bad))):
            assert word in text
        ok_shapes = {p: tuple(r.image_shape[i]) for i, p in enumerate(r.image_paths)}
    assert ok_shapes["c_wide.png"] == (3, 4000) and ok_shapes["c_tall.png"] == (4000, 3)
    assert ok_shapes["h_exif_rotated.jpg"] == (100, 50)  # rotated as displayed
    assert ok_shapes["b_one_pixel.png"] == (1, 1)
    _assert_same_for_good_images(tmp_path / "zoo.h5", tmp_path / "good.h5")
    assert sorted(os.listdir(tmp_path)) == ["good", "good.h5", "zoo", "zoo.h5"]


@pytest.mark.skipif(not IS_ROOT, reason="covered by the zoo when not root")
def test_unreadable_file(tmp_path, tiny_model):
    """chmod 000 stops everyone but root; as root, a folder named like an image stands in for it."""
    write_corpus(tmp_path / "c", 3, duplicates=False)
    (tmp_path / "c" / "x_folder.png").mkdir()  # not discovered in a folder walk
    lst = tmp_path / "list.txt"
    lst.write_text("c/img_000.jpg\nc/x_folder.png\nc/img_001.png\n")
    s = _mine([lst], tmp_path / "r.h5", tiny_model)
    assert s.n_failed == 1
    assert "c/x_folder.png" in str(s) and "not a regular file" in str(s)


def test_list_naming_missing_files_records_them(tmp_path, tiny_model):
    write_corpus(tmp_path / "c", 3, duplicates=False)
    lst = tmp_path / "list.txt"
    lst.write_text("c/img_000.jpg\nc/gone.png\n/nowhere/at/all.jpg\nc/img_002.png\n")
    s = _mine([lst], tmp_path / "r.h5", tiny_model)
    assert (s.n_images, s.n_failed) == (4, 2)
    with patchmine.open(tmp_path / "r.h5") as r:
        assert list(r.image_ok) == [True, False, False, True]
        assert all("No such file" in r.image_error[i] for i in (1, 2))


# ------------------------------------------------------------------------------------------------
# Bad arguments: exit 2, one line on stderr, no traceback


def _make_checkpoint(corpus: Path, out: Path, model: str) -> Path:
    """A real checkpoint of a run that has not started (k=3, layer pool)."""
    from patchmine.corpus import discover
    from patchmine.mine import Miner

    m = Miner(
        discover([corpus]),
        model=model,
        weights="none",
        layers=["pool"],
        k=3,
        per_image=1,
        input_size=64,
    )
    ckpt = out.with_name(out.name + ".ckpt")
    store.save_checkpoint(ckpt, m.state_dict())
    return ckpt


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, tiny_model):
    """Every bad command line of the table below, run once; name -> (code, stdout, stderr)."""
    d = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(d / "corpus", 5, duplicates=False)
    other = write_corpus(d / "other", 3, seed=7, duplicates=False)
    (d / "empty").mkdir()
    tiny2 = d / "tiny2.py"  # the same network under another name: another model
    tiny2.write_text(Path(tiny_model.rsplit(":", 1)[0]).read_text())
    done = d / "done.h5"
    _mine([corpus], done, tiny_model, layers=["pool"], k=2)
    (d / "again.h5").write_bytes(done.read_bytes())
    (d / "text.h5").write_text("I am not HDF5\n")
    with h5py.File(d / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    shutil.copy(done, d / "v2.h5")
    with h5py.File(d / "v2.h5", "a") as f:
        f.attrs["version"] = 3
    ckpt = _make_checkpoint(corpus, d / "res.h5", tiny_model)
    (d / "garbage.h5.ckpt").write_bytes(b"\x80\x04 this is not a checkpoint")
    data = ckpt.read_bytes()
    (d / "trunc.h5.ckpt").write_bytes(data[: len(data) // 2])
    ro = d / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o555)
    # root writes through chmod 555; the kernel refuses new files in /proc even to root
    ro_out = "/proc/result.h5" if IS_ROOT else ro / "result.h5"
    odd = d / "odd"
    write_corpus(odd, 2, duplicates=False)
    with open(os.path.join(os.fsencode(odd), NON_UTF8_BAD), "wb") as f:
        f.write(b"garbage")

    base = [
        "--model",
        f"{tiny_model}",
        "--weights",
        "none",
        "--input-size",
        "64",
        "--layers",
        "pool",
        "-k",
        "3",
        "-j",
        "0",
        "-q",
    ]
    mine_ = ["mine", corpus, "--out", d / "new.h5", *base]
    cases = {
        "unknown model": ["mine", corpus, "--out", d / "n.h5", "--model", "resnett50"],
        "unknown layer": [*mine_, "--layers", "pol,add"],
        "k < 1": [*mine_, "-k", "0"],
        "k not a number": [*mine_, "-k", "many"],
        "per-image < 1": [*mine_, "--per-image", "0"],
        "batch size < 1": [*mine_, "--batch-size", "0"],
        "bad shard": [*mine_, "--shard", "3/2"],
        "no --out": ["mine", corpus],
        "no command": [],
        "unknown command": ["frobnicate"],
        "empty corpus": ["mine", d / "empty", "--out", d / "n.h5", *base],
        "missing corpus": ["mine", d / "nowhere", "--out", d / "n.h5", *base],
        "output folder cannot be made": [
            "mine",
            corpus,
            "--out",
            d / "text.h5" / "sub" / "r.h5",
            *base,
        ],
        "output folder read-only": ["mine", corpus, "--out", ro_out, *base],
        "output exists": ["mine", corpus, "--out", done, *base],
        "output is a folder": ["mine", corpus, "--out", d / "empty", *base],
        "device unknown": [*mine_, "--device", "potato"],
        "weights file missing": [*mine_, "--weights", d / "no-such.pt"],
        "resume, corpus changed": ["mine", other, "--out", d / "res.h5", *base, "--resume"],
        "resume, model changed": [
            *mine_[:3],
            d / "res.h5",
            *base,
            "--model",
            f"{tiny2}:build",
            "--resume",
        ],
        "resume, layers changed": [*mine_[:3], d / "res.h5", *base, "--layers", "add", "--resume"],
        "resume, k changed": [*mine_[:3], d / "res.h5", *base, "-k", "4", "--resume"],
        "checkpoint garbage": [*mine_[:3], d / "garbage.h5", *base, "--resume"],
        "checkpoint truncated": [*mine_[:3], d / "trunc.h5", *base, "--resume"],
        "checkpoint, no --resume": [*mine_[:3], d / "res.h5", *base],
        "info: missing": ["info", d / "missing.h5"],
        "info: not HDF5": ["info", d / "text.h5"],
        "info: HDF5, not patchmine": ["info", d / "plain.h5"],
        "info: schema version 3": ["info", d / "v2.h5"],
        "render: not HDF5": ["render", d / "text.h5", "--out", d / "r1"],
        "render: HDF5, not patchmine": ["render", d / "plain.h5", "--out", d / "r2"],
        "render: schema version 3": ["render", d / "v2.h5", "--out", d / "r3"],
        "merge: not HDF5": ["merge", d / "text.h5", done, "--out", d / "m1.h5"],
        "merge: HDF5, not patchmine": ["merge", d / "plain.h5", done, "--out", d / "m2.h5"],
        "merge: schema version 3": ["merge", d / "v2.h5", done, "--out", d / "m3.h5"],
        # these succeed
        "ok: --force overwrites": ["mine", corpus, "--out", d / "again.h5", *base, "--force"],
        "ok: odd file names": ["mine", odd, "--out", d / "odd.h5", *base[:-1]],
    }
    if not torch.cuda.is_available():
        cases["no CUDA"] = [*mine_, "--device", "cuda"]
    results = cli_many(cases, d)
    results["_dir"] = d
    return results


USAGE = {  # case -> words the one line on stderr must hold
    "unknown model": ["unknown model 'resnett50'", "resnet50"],
    "unknown layer": ["unknown layer 'pol'", "pool"],
    "k < 1": ["-k", "at least 1, got 0"],
    "k not a number": ["-k", "whole number", "'many'"],
    "per-image < 1": ["--per-image", "at least 1"],
    "batch size < 1": ["--batch-size", "at least 1"],
    "bad shard": ["--shard", "3/2"],
    "no --out": ["--out"],
    "no command": ["COMMAND"],
    "unknown command": ["frobnicate", "mine"],
    "empty corpus": ["empty corpus", "empty"],
    "missing corpus": ["does not exist", "nowhere"],
    "output folder cannot be made": ["cannot create output folder", "text.h5 is not a folder"],
    "output folder read-only": ["not writable"],
    "output exists": ["output exists", "--force"],
    "output is a folder": ["is a folder"],
    "device unknown": ["unknown device 'potato'"],
    "no CUDA": ["CUDA is not available"],
    "weights file missing": ["weights file not found", "no-such.pt"],
    "resume, corpus changed": ["cannot resume", "corpus"],
    "resume, model changed": ["cannot resume", "model", "tiny2.py"],
    "resume, layers changed": ["cannot resume", "layers", "['pool']", "['add']"],
    "resume, k changed": ["cannot resume", "k: checkpoint 3, now 4"],
    "checkpoint garbage": ["garbage.h5.ckpt", "damaged"],
    "checkpoint truncated": ["trunc.h5.ckpt", "damaged"],
    "checkpoint, no --resume": ["interrupted run", "--resume", "--force"],
    "info: missing": ["no such file", "missing.h5"],
    "info: not HDF5": ["not an HDF5 file", "text.h5"],
    "info: HDF5, not patchmine": ["not a patchmine result file", "plain.h5"],
    "info: schema version 3": ["schema version 3", "reads versions 1 and 2"],
    "render: not HDF5": ["not an HDF5 file"],
    "render: HDF5, not patchmine": ["not a patchmine result file"],
    "render: schema version 3": ["schema version 3"],
    "merge: not HDF5": ["not an HDF5 file"],
    "merge: HDF5, not patchmine": ["not a patchmine result file"],
    "merge: schema version 3": ["schema version 3"],
}


@pytest.mark.parametrize("case", list(USAGE))
def test_bad_usage_is_one_line_and_exit_2(cli_results, case):
    if case not in cli_results:
        pytest.skip("CUDA is available here")
    code, out, err = cli_results[case]
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("patchmine"), err
    for word in USAGE[case]:
        assert word in lines[0], (word, lines[0])
    assert out == ""


def test_usage_errors_leave_nothing_behind(cli_results):
    d = cli_results["_dir"]
    assert not (d / "n.h5").exists() and not (d / "new.h5").exists()
    assert not list(d.glob(".*")), list(d.glob(".*"))  # no temp or probe files
    assert (d / "res.h5.ckpt").exists()  # a refused resume keeps the checkpoint
    for name in ("garbage.h5", "trunc.h5", "m1.h5", "m2.h5", "m3.h5"):
        assert not (d / name).exists()


def test_force_and_odd_names_succeed(cli_results):
    d = cli_results["_dir"]
    code, out, err = cli_results["ok: --force overwrites"]
    assert code == 0 and "Traceback" not in err, err
    with patchmine.open(d / "again.h5") as r:  # the new run's settings, not the old file's
        assert r.attrs["k"] == 3
    code, out, err = cli_results["ok: odd file names"]
    assert code == 0 and "Traceback" not in err, err
    assert "mined 2 of 3 images" in out
    assert _safe(os.fsdecode(NON_UTF8_BAD)) in out  # printed escaped, stdout strict UTF-8


# ------------------------------------------------------------------------------------------------
# Faults: signals in every phase, a full disk, damaged checkpoints

MINE_ARGS = [
    "--weights",
    "none",
    "--layers",
    ",".join(LAYERS),
    "-k",
    "4",
    "--input-size",
    "64",
    "--batch-size",
    "2",
    "--checkpoint-every",
    "1",
    "-q",
]


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory, tiny_model):
    """A small corpus and the result of one uninterrupted run over it."""
    d = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(d / "corpus", 12, seed=11)
    ref = d / "ref.h5"
    _mine([corpus], ref, tiny_model, k=4, batch_size=5)
    return corpus, ref


def _leftovers(folder: Path, *allowed: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n not in allowed)


PHASES = {  # where the signal lands: (object, attribute, which call)
    "first pass": (lambda: __import__("patchmine.miner").miner.TopK, "add", 4),
    "second pass": (lambda: __import__("patchmine.patches").patches, "cut_patches", 1),
    "write": (lambda: store, "_write_layer", 2),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_signal_leaves_checkpoint_and_resume_is_exact(
    tmp_path, fault_corpus, tiny_model, monkeypatch, capsys, phase, sig
):
    corpus, ref = fault_corpus
    out = tmp_path / "run.h5"
    owner, attr, call = PHASES[phase]
    argv = ["mine", str(corpus), "--out", str(out), "--model", tiny_model, *MINE_ARGS, "-j", "0"]
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with monkeypatch.context() as m:
        signal_at(m, owner(), attr, sig, call)
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0], err
    assert f"{out}.ckpt" in lines[0] and "--resume" in lines[0], err
    assert _leftovers(tmp_path) == ["run.h5.ckpt"]  # no partial file, no temp or scratch files
    state = store.load_checkpoint(f"{out}.ckpt")
    n = len(os.listdir(corpus))
    if phase == "first pass":
        assert 0 < state["cursor"] < n
    else:
        assert state["cursor"] == n
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored
    assert cli.main([*argv, "--resume"]) == 0
    assert _leftovers(tmp_path) == ["run.h5"]
    assert_same_file(ref, out)


def test_failed_run_leaves_no_worker_processes(tmp_path, fault_corpus, tiny_model, monkeypatch):
    """The loader's workers live for both passes; a run that fails in its first pass ends them,
    even while its traceback (a notebook's last error) still holds the run's frames."""
    import multiprocessing

    from patchmine.mine import mine

    def broken(*a, **kw):
        raise RuntimeError("collector broke")

    corpus, _ = fault_corpus
    before = {p.pid for p in multiprocessing.active_children()}
    monkeypatch.setattr(__import__("patchmine.miner").miner.TopK, "add", broken)
    with pytest.raises(RuntimeError, match="collector broke") as kept:
        mine([corpus], tmp_path / "run.h5", model=tiny_model, k=4, workers=2, progress=False)
    assert kept.tb is not None  # the frames, and the run's objects, are still referenced
    assert {p.pid for p in multiprocessing.active_children()} <= before


def test_second_signal_stops_at_once(tmp_path, fault_corpus, tiny_model, monkeypatch, capsys):
    """Ctrl-C twice: the second one does not wait for the batch; the last checkpoint survives."""
    corpus, ref = fault_corpus
    out = tmp_path / "run.h5"
    real = store._write_layer

    def twice(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(store, "_write_layer", twice)
    argv = ["mine", str(corpus), "--out", str(out), "--model", tiny_model, *MINE_ARGS, "-j", "0"]
    assert cli.main(argv) == 130
    assert "--resume" in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["run.h5.ckpt"]
    monkeypatch.undo()
    assert cli.main([*argv, "--resume"]) == 0
    assert_same_file(ref, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_process_group_with_workers(tmp_path, tiny_model, sig, capsys):
    """Ctrl-C in a terminal (or a scheduler's SIGTERM) reaches the DataLoader workers too: they
    must leave it to the main process, which saves and exits with one line, no tracebacks."""
    corpus = write_corpus(tmp_path / "c", 40, seed=4)
    out, ref = tmp_path / "run.h5", tmp_path / "ref.h5"
    common = ["--model", tiny_model, *MINE_ARGS]
    argv = ["mine", str(corpus), "--out", str(out), *common, "-j", "2", "--batch-size", "1"]
    p = popen_cli(*argv, start_new_session=True)
    ckpt = tmp_path / "run.h5.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and "Error" not in err, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err, err
    assert _leftovers(tmp_path) == ["c", "run.h5.ckpt"]
    assert 0 < store.load_checkpoint(ckpt)["cursor"] < 41
    fast = ["-j", "0", "--batch-size", "8"]  # the result does not depend on them
    assert cli.main(["mine", str(corpus), "--out", str(out), *common, *fast, "--resume"]) == 0
    assert cli.main(["mine", str(corpus), "--out", str(ref), *common, *fast]) == 0
    assert_same_file(ref, out)


def _file_size_limit(limit: int):
    def set_limit():  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


def test_full_disk_during_write_then_resume(tmp_path, fault_corpus, tiny_model):
    corpus, _ = fault_corpus
    # 128 px inputs: a (compressed) result larger than the checkpoint (~0.31 MB)
    args = ["128" if a == "64" else a for a in MINE_ARGS]
    ref = tmp_path / "ref" / "ref.h5"
    ref.parent.mkdir()
    assert cli.main(["mine", str(corpus), "--out", str(ref), "--model", tiny_model, *args,
                     "-j", "0"]) == 0  # fmt: skip
    out = tmp_path / "run.h5"
    argv = ["mine", corpus, "--out", out, "--model", tiny_model, *args, "-j", "0"]
    # room for the checkpoint and the second pass's scratch arrays, not the result
    assert os.path.getsize(ref) > 380_000
    p = popen_cli(*argv, preexec_fn=_file_size_limit(350_000))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "cannot write" in err and "File too large" in err and "disk is full" in err, err
    assert f"{out}.ckpt" in err and "--resume" in err, err
    assert _leftovers(tmp_path, "ref") == ["run.h5.ckpt"]
    assert store.load_checkpoint(f"{out}.ckpt")["cursor"] == len(os.listdir(corpus))
    assert cli.main([str(a) for a in argv] + ["--resume"]) == 0  # space is back
    assert _leftovers(tmp_path, "ref") == ["run.h5"]
    assert_same_file(ref, out)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, fault_corpus, tiny_model):
    """A checkpoint that cannot be written does not replace the last good one."""
    corpus, _ = fault_corpus
    ckpt = _make_checkpoint(corpus, tmp_path / "x.h5", tiny_model)
    before = ckpt.read_bytes()
    code = (
        "import sys, torch\n"
        "from patchmine import store\n"
        "try:\n"
        "    store.save_checkpoint(sys.argv[1], {'meta': {}, 'cursor': 0, 'big': torch.ones(10**6)})\n"
        "except store.WriteError as e:\n"
        "    print(e.strerror)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(ckpt)],
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(1_000_000),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "cannot write" in p.stdout and "File too large" in p.stdout
    assert ckpt.read_bytes() == before
    assert _leftovers(tmp_path) == ["x.h5.ckpt"]


def test_damaged_checkpoints_are_refused(tmp_path, fault_corpus, tiny_model):
    corpus, _ = fault_corpus
    ckpt = _make_checkpoint(corpus, tmp_path / "x.h5", tiny_model)
    data = ckpt.read_bytes()
    flipped = bytearray(data)
    mid = len(data) // 2
    flipped[mid : mid + 64] = bytes(b ^ 0xFF for b in flipped[mid : mid + 64])  # tensor data
    for damaged in (b"", data[:100], bytes(flipped), b"PK\x03\x04garbage"):
        ckpt.write_bytes(damaged)
        with pytest.raises(UsageError, match="damaged|not a patchmine checkpoint"):
            store.load_checkpoint(ckpt)
    torch.save({"checkpoint_version": 1}, ckpt)
    with pytest.raises(UsageError, match="damaged"):
        store.load_checkpoint(ckpt)
    torch.save({"checkpoint_version": 99, "meta": {}, "cursor": 0}, ckpt)
    with pytest.raises(UsageError, match="not a patchmine checkpoint of this version"):
        store.load_checkpoint(ckpt)


class _RunsCode:
    """Unpickling this object runs code: it creates the file ``marker`` (as an attacker's would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, fault_corpus, tiny_model, capsys):
    corpus, _ = fault_corpus
    out, marker = tmp_path / "run.h5", tmp_path / "pwned"
    ckpt = _make_checkpoint(corpus, out, tiny_model)
    state = torch.load(ckpt, weights_only=True)  # a real checkpoint, plus one crafted object
    torch.save({**state, "cursor": _RunsCode(marker)}, ckpt)
    with pytest.raises(UsageError, match=r"refused: it names (builtins\.)?exec\b"):
        store.load_checkpoint(ckpt)
    argv = ["mine", str(corpus), "--out", str(out), "--model", tiny_model, *MINE_ARGS, "-j", "0"]
    assert cli.main([*argv, "--layers", "pool", "-k", "3", "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "patchmine mine: error: checkpoint" in lines[0] and str(ckpt) in lines[0], lines
    assert "refused" in lines[0] and "delete it" in lines[0], lines
    assert not marker.exists()  # the code did not run
    assert ckpt.exists() and not out.exists()


def test_weights_file_that_runs_code_is_refused(tmp_path, tiny_model, capsys):
    weights, marker = tmp_path / "w.pt", tmp_path / "pwned"
    torch.save({"conv1.weight": _RunsCode(marker)}, weights)
    # `layers` reads no weights (the table is the architecture's): `filters` loads them
    argv = ["filters", tiny_model, "--weights", str(weights), "--out", str(tmp_path / "f.png")]
    assert cli.main([*argv, "--input-size", "64"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "patchmine filters: error: checkpoint" in lines[0] and str(weights) in lines[0], lines
    assert re.search(r"refused: it names (builtins\.)?exec\b", lines[0]), lines
    assert not marker.exists()


def test_output_checks_before_any_work(tmp_path, tiny_model, monkeypatch):
    """Unwritable or existing outputs are refused before the corpus is even read."""
    monkeypatch.setattr(mine_mod, "discover", lambda *_: pytest.fail("work started"))
    (tmp_path / "exists.h5").write_bytes(b"x")
    for out, match in [
        (tmp_path / "exists.h5", "output exists"),
        (tmp_path, "is a folder"),
        (tmp_path / "exists.h5" / "missing" / "r.h5", "cannot create output folder"),
    ]:
        with pytest.raises(UsageError, match=match):
            _mine([tmp_path], out, tiny_model)
    with pytest.raises(UsageError, match="at least 1"):
        _mine([tmp_path], tmp_path / "r.h5", tiny_model, k=0)
