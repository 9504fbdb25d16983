"""Scale-out: torchrun ranks, and `--shard` + `merge`, give exactly the single-process file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from patchmine.cli import main
from patchmine.errors import UsageError
from patchmine.merge import merge
from patchmine.mine import mine
from tests.conftest import TINY_NET, assert_same_file, tiny_settings, write_corpus

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["pool", "add", "head"]


def _settings(model: str, per_image: int, k: int = 4, layers=LAYERS) -> dict:
    return tiny_settings(model, per_image=per_image, k=k, layers=layers)


def _cli_args(model: str, per_image: int) -> list[str]:
    return [
        "--model", model, "--weights", "none", "--layers", ",".join(LAYERS), "-k", "4",
        "--per-image", str(per_image), "--input-size", "64", "--batch-size", "4",
        "--workers", "0",
    ]  # fmt: skip


def _torchrun(nproc: int, args: list[str], **kw) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N -m patchmine mine ARGS` (a free port each time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "patchmine", "mine", *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun starts its ranks in sessions of their own)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _finish(p: subprocess.Popen) -> str:
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def corpus14(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("c14"), 13, seed=5)  # 13 + a duplicate


@pytest.fixture(scope="module")
def corpus2(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("c2"), 2, seed=7)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model):
    """The single-process reference file of (corpus, per_image), made once."""
    made: dict = {}
    folder = tmp_path_factory.mktemp("single")

    def get(corpus: Path, per_image: int) -> Path:
        key = (corpus, per_image)
        if key not in made:
            out = folder / f"{corpus.name}-p{per_image}.h5"
            mine([corpus], out, **_settings(tiny_model, per_image))
            made[key] = out
        return made[key]

    return get


# ------------------------------------------------------------------ torchrun


@pytest.mark.slow
@pytest.mark.parametrize("per_image", [1, 2])
def test_torchrun_two_ranks_equal_one_process(tmp_path, corpus_dir, tiny_model, single, per_image):
    """15 images over 2 ranks (7 + 8): the duplicate image ties across ranks and still loses."""
    out = tmp_path / "tr.h5"
    quiet = ["-q"] if per_image == 2 else []
    stdout = _finish(
        _torchrun(
            2, [str(corpus_dir), "--out", str(out), *_cli_args(tiny_model, per_image), *quiet]
        )
    )
    assert_same_file(single(corpus_dir, per_image), out)
    assert not list(tmp_path.glob("*.ckpt*")) and not list(tmp_path.glob(".*scratch"))
    if not quiet:  # rank 0 alone prints the summary, for the whole corpus
        assert stdout.count("mined 15 of 15 images") == 1, stdout


@pytest.mark.slow
def test_torchrun_rank_without_images(tmp_path, corpus2, tiny_model, single):
    """2 images over 3 ranks: rank 0 (the writer) streams none, ranks 1 and 2 one each."""
    out = tmp_path / "tr3.h5"
    _finish(_torchrun(3, [str(corpus2), "--out", str(out), *_cli_args(tiny_model, 1), "-q"]))
    assert_same_file(single(corpus2, 1), out)


@pytest.mark.slow
def test_torchrun_list_repeating_its_files(tmp_path, corpus2, tiny_model, single):
    """A list naming 2 files 3 times over 2 ranks: each winner file's copies are re-read by one
    rank, and the file equals one process's."""
    files = sorted(str(p) for p in corpus2.iterdir())
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(files * 3) + "\n")
    out = tmp_path / "tr.h5"
    _finish(_torchrun(2, [str(listing), "--out", str(out), *_cli_args(tiny_model, 1), "-q"]))
    assert_same_file(single(listing, 1), out)


@pytest.mark.slow
def test_torchrun_shard_sigkill_then_resume_per_rank(tmp_path, tiny_model):
    """Shard 1/2 of 48 images (24:48) over 2 ranks (24:36, 36:48), killed, resumed per rank: the
    shard file equals the one a single process writes for that shard."""
    corpus = write_corpus(tmp_path / "c", 47, seed=11)
    out, ref = tmp_path / "run.h5", tmp_path / "ref.h5"
    mine([corpus], ref, shard=(1, 2), **_settings(tiny_model, 1))
    args = [str(corpus), "--out", str(out), *_cli_args(tiny_model, 1), "-q", "--shard", "1/2"]
    args += ["--batch-size", "1", "--checkpoint-every", "2"]
    p = _torchrun(2, args)
    ckpts = [tmp_path / f"run.h5.ckpt.rank{r}" for r in range(2)]
    deadline = time.time() + 120
    while not all(c.exists() for c in ckpts) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [*_children(p.pid), p.pid]:  # both ranks (own sessions), then torchrun
        os.kill(pid, signal.SIGKILL)
    p.wait()
    assert all(c.exists() for c in ckpts), "the run ended before both ranks checkpointed"
    assert not out.exists()
    cursors = [torch.load(c, weights_only=False)["cursor"] for c in ckpts]
    assert 24 < cursors[0] < 36 or 36 < cursors[1] < 48, cursors  # one rank stopped midway
    _finish(_torchrun(2, [*args, "--resume"]))
    assert not any(c.exists() for c in ckpts)
    assert_same_file(ref, out)


# ------------------------------------------------------------------ --shard + merge


@pytest.mark.parametrize("per_image", [1, 2])
def test_three_shards_merge_to_one_process(tmp_path, corpus14, tiny_model, single, per_image):
    """14 images in 3 uneven shards (4 + 5 + 5), merged by the CLI in shuffled order."""
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part-{i}.h5")
        mine([corpus14], parts[-1], shard=(i, 3), **_settings(tiny_model, per_image))
    out = tmp_path / "all.h5"
    assert main(["merge", *map(str, [parts[2], parts[0], parts[1]]), "--out", str(out), "-q"]) == 0
    assert_same_file(single(corpus14, per_image), out)


def test_merge_with_an_empty_shard(tmp_path, corpus2, tiny_model, single):
    parts = [tmp_path / f"part-{i}.h5" for i in range(3)]  # shard 0 of 2 images / 3 is empty
    for i, part in enumerate(parts):
        mine([corpus2], part, shard=(i, 3), **_settings(tiny_model, 1))
    out = merge(parts, tmp_path / "all.h5")
    assert_same_file(single(corpus2, 1), out)
    with pytest.raises(UsageError, match="output exists"):
        merge(parts, out)
    merge(parts, out, force=True)  # a single-run file also counts as shard 0/1
    assert_same_file(out, merge([out], tmp_path / "again.h5"))


@pytest.fixture(scope="module")
def odd_parts(tmp_path_factory, corpus2, tiny_model) -> dict[str, Path]:
    """Shard files of a 2-image corpus cut in 2, under the reference settings and variations."""
    folder = tmp_path_factory.mktemp("odd")
    other_model = folder / "tiny_copy.py"
    other_model.write_text(TINY_NET)
    runs = {
        "a": {},
        "k": {"k": 3},
        "layers": {"layers": ["pool", "add"]},
        "model": {"model": f"{other_model}:build"},
        "inside": {"min_inside": 0.6},
    }
    parts = {}
    for name, change in runs.items():
        for i in range(2):
            if name != "a" and i == 0:
                continue
            parts[f"{name}{i}"] = folder / f"{name}{i}.h5"
            mine(
                [corpus2],
                parts[f"{name}{i}"],
                shard=(i, 2),
                **{**_settings(tiny_model, 1), **change},
            )
    (folder / "plain.h5").unlink(missing_ok=True)
    with h5py.File(folder / "plain.h5", "w") as f:
        f["x"] = [1, 2, 3]
    parts["plain"] = folder / "plain.h5"
    parts["text"] = folder / "notes.txt"
    parts["text"].write_text("not a result\n")
    return parts


@pytest.mark.parametrize(
    "names, words",
    [
        (["a0", "k1"], "k differs (4 vs 3)"),
        (["a0", "layers1"], "layers differs"),
        (["a0", "model1"], "model differs"),
        (["a0", "inside1"], "--min-inside differs ('off' vs 0.6)"),
        (["a0"], "missing shard(s) 1/2"),
        (["a1", "a0", "a1"], "shard 1/2 is given twice"),
        (["a0", "a1", "plain"], "not a patchmine result file"),
        (["a0", "a1", "text"], "not an HDF5 file"),
        (["a0", "a1", "nowhere"], "no such file"),
    ],
)
def test_merge_refuses(tmp_path, odd_parts, capsys, names, words):
    files = [str(odd_parts.get(n, tmp_path / n)) for n in names]
    assert main(["merge", *files, "--out", str(tmp_path / "m.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchmine merge: error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert not (tmp_path / "m.h5").exists()
