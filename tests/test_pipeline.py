"""`patchmine run`: pipeline files, steps re-run only where out of date, validation; the demo corpus."""

from __future__ import annotations

import importlib.util
import os
import sys
import textwrap
from pathlib import Path

import pytest

from patchmine.cli import main
from patchmine.pipeline import load_pipeline, run_pipeline
from tests.conftest import SHARED_CORPUS, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def write_pipeline(
    folder: Path, model: str, k: int = 3, batch_size: int = 4, extra: str = ""
) -> Path:
    path = folder / "job.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "tiny"
            {extra}
            [corpus]
            paths = ["corpus"]

            [mine]
            out = "out/tiny.h5"
            model = "{model}"
            input_size = 64
            k = {k}
            batch_size = {batch_size}
            workers = 0

            [render]
            out = "out/gallery"
            overlay = "heat"
            """
        )
    )
    return path


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    rc = main(["run", *args])
    cap = capsys.readouterr()
    return rc, cap.out.splitlines(), cap.err


def step_lines(lines: list[str]) -> dict[str, str]:
    return {
        line.split(":", 1)[0]: line.split(":", 1)[1].strip()
        for line in lines
        if line.split(":", 1)[0] in ("corpus", "mine", "render")
    }


@pytest.fixture
def job(tmp_path, tiny_model) -> Path:
    write_corpus(tmp_path / "corpus", 6)
    return write_pipeline(tmp_path, tiny_model)


def test_runs_then_skips_then_rerenders_then_remines(job, tiny_model, capsys):
    result, index = job.parent / "out/tiny.h5", job.parent / "out/gallery/index.html"
    rc, out, err = run(capsys, str(job), "-q")
    assert rc == 0, err
    steps = step_lines(out)
    assert steps["mine"].startswith("running (") and steps["mine"].endswith("does not exist)")
    assert steps["render"].startswith("running (")
    assert result.is_file() and index.is_file()
    assert out[-1] == f"gallery: {index.as_uri()}"
    made = (result.stat().st_mtime_ns, index.stat().st_mtime_ns)

    # second time: nothing to do
    rc, out, _ = run(capsys, str(job), "-q")
    assert rc == 0
    steps = step_lines(out)
    assert steps["mine"].startswith("up to date (") and steps["mine"].endswith("tiny.h5)")
    assert steps["render"].startswith("up to date (") and steps["render"].endswith("index.html)")
    assert (result.stat().st_mtime_ns, index.stat().st_mtime_ns) == made

    # settings that do not change the result do not re-run it
    write_pipeline(job.parent, tiny_model, batch_size=2)
    rc, out, _ = run(capsys, str(job), "-q")
    assert step_lines(out)["mine"].startswith("up to date (")

    # a result newer than the gallery: render only
    earlier = result.stat().st_mtime_ns - 5_000_000_000
    os.utime(index, ns=(earlier, earlier))
    rc, out, _ = run(capsys, str(job), "-q")
    steps = step_lines(out)
    assert steps["mine"].startswith("up to date (")
    assert steps["render"].startswith("running (") and "is newer than" in steps["render"]
    assert result.stat().st_mtime_ns == made[0]
    assert index.stat().st_mtime_ns > result.stat().st_mtime_ns
    rc, out, _ = run(capsys, str(job), "-q")
    assert step_lines(out)["render"].startswith("up to date (")

    # k changed: mine again, then render again
    write_pipeline(job.parent, tiny_model, k=4)
    rc, out, _ = run(capsys, str(job), "-q")
    steps = step_lines(out)
    assert steps["mine"] == "running (settings changed: k 3 -> 4)"
    assert steps["render"].startswith("running (")
    import patchmine

    with patchmine.open(result) as r:
        assert r.attrs["k"] == 4 and r.attrs["pipeline"] == "tiny"

    # resize changes the input pixels: the result is out of date
    job.write_text(job.read_text().replace("k = 4\n", "k = 4\nresize = 72\n"))
    rc, out, _ = run(capsys, str(job), "-q", "--dry-run")
    assert step_lines(out)["mine"] == "would run (settings changed: resize null -> 72)"
    write_pipeline(job.parent, tiny_model, k=4)

    # --force re-runs everything
    rc, out, _ = run(capsys, str(job), "-q", "--force")
    assert step_lines(out) == {"mine": "running (--force)", "render": "running (--force)"}


def test_remines_when_a_corpus_image_changes(job, capsys):
    assert run(capsys, str(job), "-q")[0] == 0
    result = job.parent / "out/tiny.h5"
    image = sorted((job.parent / "corpus").iterdir())[0]
    later = result.stat().st_mtime_ns + 5_000_000_000
    os.utime(image, ns=(later, later))
    rc, out, _ = run(capsys, str(job), "-q", "--dry-run")
    assert rc == 0
    steps = step_lines(out)
    assert steps["mine"].startswith("would run (1 corpus image is newer than ")
    assert steps["render"] == "would run (after mining)"
    assert result.stat().st_mtime_ns < later  # a dry run runs nothing


@pytest.mark.parametrize("channels", ['"0,2-3"', "[3, 0, 2]"])
def test_render_table_selects_channels(job, capsys, channels):
    job.write_text(job.read_text() + f"channels = {channels}\n")  # [render] is the last table
    rc, _, err = run(capsys, str(job), "-q")
    assert rc == 0, err
    gallery = job.parent / "out/gallery"
    folders = [p for p in gallery.iterdir() if p.is_dir() and p.name != "img"]
    assert folders
    for folder in folders:
        pages = sorted(p.name for p in folder.glob("c*.html"))
        assert pages == ["c0000.html", "c0002.html", "c0003.html"], folder


def test_recipe_builds_the_corpus_once(tmp_path, tiny_model, capsys):
    recipe = tmp_path / "make_corpus.py"
    recipe.write_text(
        textwrap.dedent(
            f"""\
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            from pathlib import Path
            from tests.conftest import write_corpus
            out = Path(sys.argv[1])
            (out.parent / "recipe_runs").open("a").write("x")
            write_corpus(out, 5)
            """
        )
    )
    job = write_pipeline(tmp_path, tiny_model)
    job.write_text(
        job.read_text().replace(
            'paths = ["corpus"]', 'paths = ["corpus"]\nrecipe = "make_corpus.py"'
        )
    )
    rc, out, err = run(capsys, str(job), "-q")
    assert rc == 0, err
    assert step_lines(out)["corpus"].startswith("running (")
    rc, out, _ = run(capsys, str(job), "-q")
    assert step_lines(out)["corpus"].startswith("up to date (")
    assert (tmp_path / "recipe_runs").read_text() == "x"
    recipe.write_text(recipe.read_text() + "# changed\n")
    rc, out, _ = run(capsys, str(job), "-q")
    assert "changed since the last build" in step_lines(out)["corpus"]
    # this recipe rewrites every image (same bytes, new mtimes): the result is out of date
    assert "6 corpus images are newer than" in step_lines(out)["mine"]
    assert (tmp_path / "recipe_runs").read_text() == "xx"


def test_paths_are_relative_to_the_pipeline_file(job, capsys, monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    p = load_pipeline(job)
    assert p.result == job.parent / "out/tiny.h5"
    assert p.corpus == (job.parent / "corpus",)
    assert p.gallery == job.parent / "out/gallery"
    done = run_pipeline(p, progress=False, log=lambda _: None)
    assert set(done) == {"mine", "render"}
    assert (job.parent / "out/tiny.h5").is_file()


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda s: s.replace("k = 3", "kk = 3"), "unknown key kk (did you mean k?)"),
        (lambda s: s.replace("[corpus]\npaths", "[corpus]\npath"), "unknown key path"),
        (lambda s: s.replace('[corpus]\npaths = ["corpus"]\n', ""), "missing table [corpus]"),
        (lambda s: s.replace('out = "out/tiny.h5"\n', ""), "missing key out (the result file"),
        (lambda s: s.replace("k = 3", "k = 0"), "k must be a whole number >= 1"),
        (lambda s: s.replace("k = 3", 'k = "3"'), "k must be a whole number >= 1"),
        (lambda s: s.replace('overlay = "heat"', 'overlay = "hot"'), "overlay must be"),
        (lambda s: s + "[render2]\n", "unknown key render2 (did you mean render?)"),
        (lambda s: s.replace("k = 3", "k = = 3"), "not valid TOML"),
        (
            lambda s: s.replace('paths = ["corpus"]', 'paths = ["nope"]'),
            "corpus path does not exist",
        ),
    ],
)
def test_bad_pipeline_files_exit_2_with_one_line(job, capsys, edit, needle):
    job.write_text(edit(job.read_text()))
    rc, out, err = run(capsys, str(job))
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("patchmine run: error: ")
    assert needle in err
    assert not (job.parent / "out").exists()


def test_missing_pipeline_file(tmp_path, capsys):
    rc, _, err = run(capsys, str(tmp_path / "none.toml"))
    assert rc == 2 and "pipeline file not found" in err


def test_shipped_pipelines_are_valid():
    from patchmine.lite0 import efficientnet_lite0
    from patchmine.taps import node_shapes

    demo = load_pipeline(ROOT / "pipelines/demo.toml")
    alexnet = load_pipeline(ROOT / "pipelines/alexnet.toml")
    assert demo.recipe == ROOT / "data/demo_corpus.py" and demo.recipe.is_file()
    assert demo.result == ROOT / "out/demo.h5" and alexnet.result == ROOT / "out/alexnet.h5"
    shapes = node_shapes(efficientnet_lite0(224, weights=None), 224)
    assert set(demo.mine["layers"]) <= set(shapes)
    assert set(demo.mine["projection_layers"]) <= set(demo.mine["layers"])
    assert alexnet.mine["layers"] == [f"features.{i}" for i in (1, 4, 7, 9, 11, 12)]


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")
def test_demo_corpus_is_deterministic_and_idempotent(tmp_path):
    demo_corpus = _data_module("demo_corpus")
    a = demo_corpus.build(tmp_path / "a", quiet=True)
    b = demo_corpus.build(tmp_path / "b", quiet=True)
    assert 150 <= len(a) <= 400
    assert [p.name for p in a] == [p.name for p in b]
    rows = (tmp_path / "a" / demo_corpus.LABELS).read_text().splitlines()  # each crop's photo
    assert rows[0] == "path,label"
    assert sorted(r.split(",")[0] for r in rows[1:]) == [p.name for p in a]
    assert all(p.startswith(f"sk_{label}_s") for p, label in (r.split(",") for r in rows[1:]))
    assert 5 <= len({r.split(",")[1] for r in rows[1:]}) <= 15
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    mtimes = [p.stat().st_mtime_ns for p in a]
    (tmp_path / "a" / "sk_stale.jpg").write_bytes(b"old")
    (tmp_path / "a" / "mine.txt").write_text("not the recipe's")
    assert demo_corpus.build(tmp_path / "a", quiet=True) == a
    assert [p.stat().st_mtime_ns for p in a] == mtimes  # nothing rewritten
    assert not (tmp_path / "a" / "sk_stale.jpg").exists()
    assert (tmp_path / "a" / "mine.txt").exists()


def _data_module(name: str):
    sys.path.insert(0, str(ROOT / "data"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "data"))


def test_fetch_verifies_what_the_manifest_knows(tmp_path, monkeypatch, capsys):
    import hashlib
    import urllib.error

    fetch = _data_module("fetch_imagenet_sample")
    known = fetch.read_manifest()
    assert len(known) == 500 and all(n.endswith(".JPEG") for n in known)
    name = sorted(known)[0]
    monkeypatch.setitem(known, name, hashlib.sha256(b"good").hexdigest())
    monkeypatch.setattr(fetch, "_get", lambda url: b"good" if "good" in url else b"bad")
    assert fetch.fetch_one(tmp_path, "good.JPEG", hashlib.sha256(b"good").hexdigest()) == "ok"
    assert fetch.fetch_one(tmp_path, "good.JPEG", hashlib.sha256(b"good").hexdigest()) == "kept"
    assert fetch.fetch_one(tmp_path, "x.JPEG", hashlib.sha256(b"good").hexdigest()) == "mismatch"
    assert not (tmp_path / "x.JPEG").exists()
    assert fetch.fetch_one(tmp_path, "odd.JPEG", None) == "unverified"

    def offline(url):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(fetch, "_get", offline)
    capsys.readouterr()
    assert fetch.main([str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network" in err


@pytest.mark.corpus
@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="needs ../shared/corpus")
def test_manifest_matches_the_shared_photographs():
    import hashlib

    known = _data_module("fetch_imagenet_sample").read_manifest()
    files = sorted(SHARED_CORPUS.glob("*.JPEG"))
    assert sorted(known) == [f.name for f in files]
    assert all(hashlib.sha256(f.read_bytes()).hexdigest() == known[f.name] for f in files)
