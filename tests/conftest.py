"""Shared fixtures and helpers: small image corpora the tests make themselves, tiny models, the
settings they are mined with, ``patchmine`` in real processes, signals at a chosen call, and
comparisons of result files and of winners with a reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPUS = Path(
    os.environ.get("PATCHMINE_SHARED_CORPUS")  # a worktree elsewhere can point at it
    or Path(__file__).resolve().parents[2] / "shared" / "corpus" / "imagenet-sample-500"
)


def make_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A structured picture (gradient, stripes, discs, boxes) that differs per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    freq = rng.uniform(0.02, 0.2)
    stripes = 127 + 100 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    base = np.stack([stripes, (xx / max(w - 1, 1)) * 255, (yy / max(h - 1, 1)) * 255], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(3, max(4, min(w, h) // 3)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
        else:
            draw.rectangle([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
    return img


def write_corpus(folder: Path, n: int, seed: int = 0, duplicates: bool = True) -> Path:
    """``n`` images of varied sizes and formats; with ``duplicates`` two files are byte-identical
    copies (exact ties between images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        if i % 5 == 0:
            w = h = 64  # already input-sized: passes through
        img = make_image(seed * 1000 + i, (w, h))
        fmt = "png" if i % 3 else "jpg"
        img.save(folder / f"img_{i:03d}.{fmt}")
    if duplicates and n >= 4:
        (folder / "img_dup.png").write_bytes((folder / "img_001.png").read_bytes())
    return folder


TINY_NET = textwrap.dedent(
    """
    import torch
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5, stride=2, padding=2)
            self.bn1 = nn.BatchNorm2d(6)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
            self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
            self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            y = torch.relu(self.conv2(x))
            y = y + self.conv3(y)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))

    def build():
        torch.manual_seed(0)
        m = Tiny()
        with torch.no_grad():
            m.bn1.running_mean.uniform_(-0.2, 0.2)
            m.bn1.running_var.uniform_(0.5, 2.0)
        return m
    """
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A model spec ``file.py:build`` for a small conv net with a residual add and a head."""
    path = tmp_path_factory.mktemp("models") / "tiny.py"
    path.write_text(TINY_NET)
    return f"{path}:build"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), 14)


TINY_LAYERS = ["pool", "add", "head"]  # fields 9 and 25 px, and the whole 64 px input


def tiny_settings(model: str, **change) -> dict:
    """Keyword arguments of ``mine()`` for the tiny net on 64 px inputs, in one process, quiet;
    ``change`` overrides or adds any of them."""
    base = dict(
        model=model,
        weights="none",
        layers=TINY_LAYERS,
        k=4,
        input_size=64,
        batch_size=4,
        workers=0,
        progress=False,
    )
    return {**base, **change}


# ------------------------------------------------------------------------------------------------
# patchmine in real processes


def cli_env(unset: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """The environment of a child process: this checkout's ``patchmine`` first on the path, a UTF-8
    locale (stdout is strict UTF-8, as on most desktops; the C locale would hide bugs), no warning
    filters from outside; minus the variables ``unset``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in set(unset)}
    return {**env, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8", "PYTHONWARNINGS": "", **extra}


def run_cli(
    *args, env: dict | None = None, timeout: float = 600, **kw
) -> subprocess.CompletedProcess:
    """``python -m patchmine ARGS`` in a fresh process (``cli_env()`` unless ``env``); the exit
    code and text output come back."""
    return subprocess.run(
        [sys.executable, "-m", "patchmine", *map(str, args)],
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def popen_cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    """``python -m patchmine ARGS`` started, not awaited (to signal or kill it); text pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "patchmine", *map(str, args)],
        env=cli_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


CLI_DRIVER = r"""
import json, os, runpy, sys, traceback
import patchmine.cli, patchmine.mine, patchmine.store  # imported once, shared by every fork
cases, folder = json.load(open(sys.argv[1])), sys.argv[2]
codes = []
for i, argv in enumerate(cases):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(f"{folder}/{i}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["patchmine", *argv]
        code = 0
        try:  # what `python -m patchmine ARGV` does, in a fresh process
            runpy.run_module("patchmine", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
json.dump(codes, sys.stdout)
"""


def cli_many(cases: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str, str]]:
    """Run ``patchmine ARGV`` for each case, each in its own process; name -> (code, out, err).

    Importing torch costs seconds, so one driver process imports patchmine once and forks a fresh
    child per command line."""
    names = list(cases)
    spec, logs = cwd / "cases.json", cwd / "logs"
    logs.mkdir()
    spec.write_text(json.dumps([[str(a) for a in cases[n]] for n in names]))
    p = subprocess.run(
        [sys.executable, "-c", CLI_DRIVER, str(spec), str(logs)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    codes = json.loads(p.stdout)
    return {
        n: (c, (logs / f"{i}.out").read_text(errors="replace"),
            (logs / f"{i}.err").read_text(errors="replace"))
        for i, (n, c) in enumerate(zip(names, codes, strict=True))
    }  # fmt: skip


def signal_at(monkeypatch, owner, attr: str, sig: int = signal.SIGINT, call: int = 1) -> None:
    """Send ``sig`` to this process when ``owner.attr`` is called for the ``call``-th time (the
    call itself still runs); ``monkeypatch`` (or one of its contexts) puts the original back."""
    real = getattr(owner, attr)
    count = {"n": 0}

    def wrapper(*a, **kw):
        count["n"] += 1
        if count["n"] == call:
            os.kill(os.getpid(), sig)
        return real(*a, **kw)

    monkeypatch.setattr(owner, attr, wrapper)


def h5_datasets(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by path (for whole-file comparisons)."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


def h5_attrs(path: Path) -> dict[str, dict]:
    """Every attribute of every object, minus the creation time and the allocator setting (the
    provenance of the process that wrote it; results never depend on it)."""
    out: dict[str, dict] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            out[name] = {
                k: v for k, v in obj.attrs.items() if k not in ("created_utc", "allocator")
            }

        visit("/", f)
        f.visititems(visit)
    return out


def assert_same_file(a: Path, b: Path, bytewise: bool = False) -> None:
    """Identical datasets (NaN == NaN) and attributes, creation time aside: every dataset, the
    statistics and their exact integer state under ``stats/state`` included, bit for bit.

    ``bytewise``: the datasets' bytes too (NaN payloads and signed zeros), strings as strings."""
    da, db = h5_datasets(a), h5_datasets(b)
    assert sorted(da) == sorted(db)
    for key in da:
        x, y = da[key], db[key]
        assert x.shape == y.shape, key
        if bytewise:
            assert x.dtype == y.dtype, key
            same = x.tolist() == y.tolist() if x.dtype == object else x.tobytes() == y.tobytes()
            assert same, key
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), key
        else:
            assert np.array_equal(x, y), key
    aa, ab = h5_attrs(a), h5_attrs(b)
    assert aa.keys() == ab.keys()
    for key in aa:
        assert aa[key].keys() == ab[key].keys(), key
        for attr in aa[key]:
            assert np.array_equal(np.asarray(aa[key][attr]), np.asarray(ab[key][attr])), (key, attr)


def assert_winners(layer, score: np.ndarray, image: np.ndarray, yx: np.ndarray, name: str) -> None:
    """A stored top-k (or bottom-k) ``layer`` holds exactly these winners: scores (NaN in unused
    slots), images, and the locations of the used slots."""
    assert np.array_equal(layer.score, score, equal_nan=True), name
    assert np.array_equal(layer.image, image), name
    used = image >= 0
    assert np.array_equal(layer.yx[used], yx[used]), name
