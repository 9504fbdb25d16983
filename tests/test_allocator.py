"""The patchmine command's malloc settings: results unchanged, library use untouched."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import pytest

from patchmine import allocator
from tests.conftest import assert_same_file, cli_env, h5_datasets, run_cli, write_corpus


def _env(**extra: str) -> dict:
    return cli_env(unset=[allocator.ENV], **extra)


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_parse_and_describe():
    s = allocator._parse("mmap_max=0, trim_threshold=1G,top_pad=64m")
    assert s == {"mmap_max": 0, "trim_threshold": 1 << 30, "top_pad": 64 << 20}
    assert allocator._describe(s) == "glibc mallopt mmap_max=0,trim_threshold=1G,top_pad=64M"
    for bad in ("mmap_max", "nope=1", "top_pad=lots", ""):
        with pytest.raises(ValueError):
            allocator._parse(bad)


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", None)  # as in a fresh process (tests call main())
    monkeypatch.setenv(allocator.ENV, "default")
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: pytest.fail("mallopt reached"))
    assert allocator.tune_allocator() == "default"


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator._glibc_mallopt() is None
    assert allocator.tune_allocator() == allocator.allocator_setting()


def test_library_use_does_not_tune(tmp_path, tiny_model):
    """Importing patchmine and calling mine() leaves malloc alone (and the file says so);
    patchmine.tune_allocator() is the explicit opt-in."""
    corpus = write_corpus(tmp_path / "c", 6)
    p = _python(
        """
        import sys
        import patchmine
        from patchmine import allocator
        from patchmine.mine import mine
        calls = []
        real = allocator.tune_allocator
        allocator.tune_allocator = lambda *a, **k: calls.append(a) or real(*a, **k)
        mine([sys.argv[1]], sys.argv[2], model=sys.argv[3], weights="none", k=2,
             progress=False, workers=1)
        assert not calls and allocator.applied_settings() is None, calls
        print(patchmine.open(sys.argv[2]).attrs["allocator"])
        print(patchmine.tune_allocator())
        """,
        str(corpus), str(tmp_path / "lib.h5"), tiny_model,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    lib, opt_in = p.stdout.split("\n")[:2]
    assert lib == "default"
    if allocator._glibc_mallopt() is not None:
        assert opt_in.startswith("glibc mallopt mmap_max=0")


def test_cli_results_identical_with_and_without(tmp_path, tiny_model):
    """`python -m patchmine mine` tuned and with PATCHMINE_MALLOC=default: every dataset equal.

    Input 256 and batch 16 give maps of several MB, which glibc's default serves with mmap and the
    tuned one from the heap.
    """
    corpus = write_corpus(tmp_path / "c", 40, seed=5)
    files = {}
    for name, env in (("tuned", {}), ("default", {allocator.ENV: "default"})):
        out = tmp_path / f"{name}.h5"
        args = [str(corpus), "--out", str(out), "--model", tiny_model, "--weights", "none"]
        args += ["--input-size", "256", "-b", "16", "-k", "4", "--workers", "1", "--quiet"]
        p = run_cli("mine", *args, env=_env(**env), timeout=300)
        assert p.returncode == 0, p.stderr
        files[name] = out
    assert len(h5_datasets(files["tuned"])) > 20
    # every dataset bit for bit (NaN slots too), strings as strings, and the attributes
    assert_same_file(files["tuned"], files["default"], bytewise=True)
    with h5py.File(files["tuned"]) as f, h5py.File(files["default"]) as g:
        tuned = f.attrs["allocator"]
        assert g.attrs["allocator"] == "default"
    info = run_cli("info", files["tuned"], env=_env(), timeout=120)
    assert f"allocator  {tuned}" in info.stdout
    if allocator._glibc_mallopt() is not None:
        assert tuned.startswith("glibc mallopt")


def test_bad_setting_is_one_line_and_exit_2(tmp_path):
    p = run_cli("info", tmp_path / "x.h5", env=_env(**{allocator.ENV: "mmap_max"}), timeout=120)
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and allocator.ENV in p.stderr


class Settings:
    """A dataset whose items are the worker's malloc settings (module level: spawn pickles it)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> str:
        return allocator.allocator_setting()


@pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="glibc only")
def test_spawned_workers_get_the_settings():
    """A forked worker inherits the settings with the process's memory; a spawned one starts a new
    interpreter, and patchmine's loader applies them there (its worker_init_fn)."""
    p = _python(
        """
        from torch.utils.data import DataLoader
        from patchmine.allocator import tune_allocator
        from patchmine.corpus import make_loader
        from tests.test_allocator import Settings
        want = tune_allocator()
        init = make_loader(Settings(), 1, workers=1).worker_init_fn
        for method in ("fork", "spawn"):
            got = list(DataLoader(Settings(), batch_size=None, num_workers=1,
                                  multiprocessing_context=method, worker_init_fn=init))
            assert got == [want, want], (method, got, want)
            bare = list(DataLoader(Settings(), batch_size=None, num_workers=1,
                                   multiprocessing_context=method))
            print(method, bare[0])
        """
    )
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines())
    assert lines["spawn"] == "default"  # what the worker_init_fn is for
