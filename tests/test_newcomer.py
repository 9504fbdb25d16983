"""What a new user meets first: the README's own examples, layer names, error paths (issue 19).

Every shell example of README.md that can run offline runs here on a small corpus; module names
resolve to their output nodes by torchvision's rule; each error path is one line and exit 2.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import patchmine
from patchmine.errors import UnknownNameError, UsageError
from patchmine.models import load_model
from patchmine.taps import Tap, layer_names, module_outputs, resolve_layers, select_layers
from tests.conftest import cli_env, cli_many, run_cli, tiny_settings, write_corpus

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Module names as layers


def test_module_outputs_follow_torchvision():
    """Each module name means the node torchvision's create_feature_extractor returns for it."""
    lm = load_model("resnet18", "none")
    names = layer_names(lm.module)
    outs = module_outputs(names)
    assert outs["layer3"] == "layer3.1.relu_1" and outs["layer3.0"] == "layer3.0.relu_1"
    assert outs["layer1.0.relu"] == "layer1.0.relu"  # a node name means itself
    assert all(outs[n] == n for n in names)
    asked = ["layer2", "layer3.1", "layer4", "conv1", "fc"]
    extractor = create_feature_extractor(lm.module, return_nodes=asked)
    exact = create_feature_extractor(lm.module, return_nodes=[outs[a] for a in asked])
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        by_module, by_node = extractor(x), exact(x)
    for a in asked:
        assert torch.equal(by_module[a], by_node[outs[a]]), a


@pytest.mark.parametrize(
    ("model", "name", "node"),
    [
        ("resnet50", "layer3", "layer3.5.relu_2"),
        ("resnet50", "layer4.2", "layer4.2.relu_2"),
        ("alexnet", "features", "features.12"),
        ("efficientnet_lite0", "_blocks.10", "_blocks.10.add"),
        ("efficientnet_b0", "features.6", "features.6.3.add"),
    ],
)
def test_module_name_selects_its_output_node(model, name, node):
    lm = load_model(model, "none", 64)
    chosen = select_layers(lm.module, 64, [name])
    assert chosen.names == [name] and chosen.nodes == {name: node}
    whole = select_layers(lm.module, 64, [node])
    assert chosen.shapes[name] == whole.shapes[node]
    assert chosen.fields[name] == whole.fields[node]


def test_module_name_taps_the_same_activations_and_duplicates_drop():
    lm = load_model("resnet18", "none", 64)
    chosen = select_layers(lm.module, 64, ["layer3", "layer3.1.relu_1", "layer4", "layer4.1"])
    assert chosen.names == ["layer3", "layer4"]  # a node asked for twice is mined once
    tap = Tap(lm.module, chosen.names, lm.mean, lm.std)
    exact = Tap(lm.module, ["layer3.1.relu_1", "layer4.1.relu_1"], lm.mean, lm.std)
    px = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        a, b = tap(px), exact(px)
    assert torch.equal(a["layer3"], b["layer3.1.relu_1"])
    assert torch.equal(a["layer4"], b["layer4.1.relu_1"])


def test_blocks_of_a_user_model(tmp_path):
    src = tmp_path / "blocky.py"
    src.write_text(
        "import torch.nn as nn\n\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.stem = nn.Conv2d(3, 4, 3)\n"
        "        self.blocks = nn.Sequential(\n"
        "            *[nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()) for _ in range(8)]\n"
        "        )\n\n"
        "    def forward(self, x):\n"
        "        return self.blocks(self.stem(x))\n\n\n"
        "def build():\n"
        "    return Net()\n"
    )
    lm = load_model(f"{src}:build", "none", 64)
    chosen = select_layers(lm.module, 64, ["blocks.6", "blocks"])
    assert chosen.nodes == {"blocks.6": "blocks.6.1", "blocks": "blocks.7.1"}


def test_every_typo_is_named_with_block_outputs_first():
    lm = load_model("resnet18", "none", 64)
    with pytest.raises(UnknownNameError) as e:
        select_layers(lm.module, 64, ["layr3", "layer2", "layer9.0"])
    text = str(e.value)
    assert "\n" not in text and "'layr3'" in text and "'layer9.0'" in text
    first = re.search(r"'layr3' \(nearest: ([^,)]+)", text).group(1)
    assert first == "layer3", text
    # a typo of a block: the blocks and their outputs come before nodes inside blocks
    modules = module_outputs(layer_names(lm.module))
    shapes = {n: (1,) for n in layer_names(lm.module)}
    with pytest.raises(UnknownNameError) as e:
        resolve_layers(shapes, ["layer3.1.rel"], modules)
    hint = str(e.value).split("nearest: ")[1].split(")")[0].split(", ")
    blocks = {"layer3.1", "layer3.1.relu_1", "layer3", "layer3.0", "layer3.0.relu_1"}
    assert hint[0] in blocks, hint
    with pytest.raises(UsageError, match="no layers given"):
        select_layers(lm.module, 64, [])


def test_result_records_the_node(tmp_path, tiny_model):
    from patchmine.mine import mine

    corpus = write_corpus(tmp_path / "c", 4, duplicates=False)
    out = tmp_path / "r.h5"
    mine([corpus], out, **tiny_settings(tiny_model, layers=["pool", "head"], k=2))
    with patchmine.open(out) as r:
        assert r.layers == ["pool", "head"]
        assert r.layer("pool").attrs["node"] == "pool"


# ------------------------------------------------------------------------------------------------
# The README's shell examples

README = ROOT / "README.md"
SKIP_BLOCKS = {  # the start of a block's first line, for blocks that do not run -> why
    "patchmine layers [MODEL] [--modules] [--input-size S]": "the synopsis: placeholders, not commands",
}
SKIP = {  # a command (its start) that cannot run here -> why
}
SPEED = {  # smaller inputs and patches, fewer pages: what each command checks stays the same
    "mine": ["--input-size", "64", "--patch-size", "8", "-j", "0", "-q"],
    "render": ["--channels", "0-3", "-q"],
}


def readme_examples() -> list[tuple[str, list[str]]]:
    """(command, its expected output lines) for each command of README's ``` blocks, in order."""
    found: list[tuple[str, list[str]]] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), re.S | re.M):
        lines = block.replace("\\\n", " ").splitlines()
        if not lines or not lines[0].removeprefix("$ ").startswith("patchmine "):
            continue
        if any(lines[0].removeprefix("$ ").startswith(k) for k in SKIP_BLOCKS):
            continue
        for line in lines:
            if line.removeprefix("$ ").startswith("patchmine "):
                found.append((line.removeprefix("$ "), []))
            elif found and line.strip():
                found[-1][1].append(line)
    return found


def test_readme_skips_are_current():
    text = README.read_text()
    for line in [*SKIP_BLOCKS, *SKIP]:
        assert line in text, f"stale skip: {line}"


def _collapse(line: str) -> str:
    return " ".join(line.split())


def _runnable(command: str, tmp: Path) -> list[str]:
    """The README's command as it runs here: no downloads, small sizes, paths into the repo."""
    argv = shlex.split(command)[1:]
    sub = argv[0]
    model = argv[argv.index("--model") + 1] if "--model" in argv else None
    if sub == "filters":
        model = argv[1]
    if sub in ("mine", "filters") and model not in (None, "efficientnet_lite0"):
        if "--weights" not in argv:  # torchvision weights download on first use
            argv += ["--weights", "none"]
    argv += SPEED.get(sub, [])
    return [str(ROOT / a) if not (tmp / a).exists() and (ROOT / a).exists() else a for a in argv]


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    examples = readme_examples()
    commands = [c for c, _ in examples]
    assert any("--layers layer3,layer4" in c for c in commands), commands
    write_corpus(tmp_path / "photos", 3, duplicates=False)
    write_corpus(tmp_path / "more", 2, seed=5, duplicates=False)
    (tmp_path / "more.txt").write_text(
        "".join(f"more/{p.name}\n" for p in sorted((tmp_path / "more").iterdir()))
    )
    env = cli_env(TORCH_HOME=str(tmp_path / "torch-home"), OMP_NUM_THREADS="1")
    ran = 0
    for command, expected in examples:
        if any(command.startswith(s) for s in SKIP):
            continue
        argv = _runnable(command, tmp_path)
        p = run_cli(*argv, cwd=tmp_path, env=env)
        assert p.returncode == 0, (command, p.stderr)
        got = [_collapse(line) for line in p.stdout.splitlines()]
        at = 0
        for line in expected:  # every line shown, in order ("..." stands for lines left out)
            if line.strip() == "...":
                continue
            assert _collapse(line) in got[at:], (command, line, p.stdout)
            at = got.index(_collapse(line), at) + 1
        ran += 1
    assert ran >= 4
    assert not (tmp_path / "torch-home").exists()  # nothing was downloaded


# ------------------------------------------------------------------------------------------------
# Error paths: exit 2 and one line on stderr, or success where a newcomer expects it

MODEL_FILES = {
    "syntax.py": "import torch\n\ndef build(:\n    pass\n",
    "raises.py": "import torch\nraise RuntimeError('boom on import')\n",
    "badbuild.py": "import torch.nn as nn\n\n\ndef build():\n    return nn.Conv2d(3, 4, -1)\n",
    "good.py": "import torch.nn as nn\n\n\ndef build():\n    return nn.Conv2d(3, 4, 3)\n\n\n"
    "def other():\n    return build()\n",
}


def _tiny_args(model: str) -> list[str]:
    """``mine`` options for the tiny net: layer pool, 64 px, one process, quiet."""
    return ["--model", model, "--weights", "none", "--input-size", "64", "--layers", "pool",
            "-j", "0", "-q"]  # fmt: skip


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("newcomer")
    corpus = write_corpus(d / "corpus", 3, duplicates=False)
    bad = d / "unreadable"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "b.png").write_bytes(b"not a png either")
    mixed = write_corpus(d / "mixed", 3, duplicates=False)
    (mixed / "zz_broken.jpg").write_bytes(b"garbage")
    for name, text in MODEL_FILES.items():
        (d / name).write_text(text)
    (d / "done.h5").write_bytes(b"")  # an existing output
    (d / "afile").write_text("x")
    base = [*_tiny_args(tiny_model), "-k", "2"]
    tiny = ["--weights", "none", "--input-size", "64", "-j", "0", "-q"]
    cases = {
        "no readable image": ["mine", bad, "--out", d / "bad.h5", *base],
        "empty --layers": ["mine", corpus, "--out", d / "e.h5", *base, "--layers", ""],
        "empty --layers (render)": ["render", d / "done.h5", "--out", d / "g", "--layers", " , "],
        "two layer typos": ["mine", corpus, "--out", d / "t.h5", *base, "--layers", "pol,pool,hed"],
        "model: syntax error": [
            "mine",
            corpus,
            "--out",
            d / "m.h5",
            "--model",
            f"{d / 'syntax.py'}:build",
            *tiny,
        ],
        "model: raises on import": [
            "mine",
            corpus,
            "--out",
            d / "m.h5",
            "--model",
            f"{d / 'raises.py'}:build",
            *tiny,
        ],
        "model: raises in factory": ["layers", f"{d / 'badbuild.py'}:build"],
        "model: no :factory": [
            "mine",
            corpus,
            "--out",
            d / "m.h5",
            "--model",
            d / "good.py",
            *tiny,
        ],
        "output in /proc": ["mine", corpus, "--out", "/proc/a.h5", *base],
        "output folder under a file": ["mine", corpus, "--out", d / "afile" / "x" / "r.h5", *base],
        "output folder missing, usage error": [
            "mine",
            corpus,
            "--out",
            d / "later" / "r.h5",
            *base,
            "--layers",
            "nope",
        ],
        "merge onto an existing file": ["merge", d / "done.h5", "--out", d / "done.h5"],
        # these succeed
        "ok: mine makes the output folder": [
            "mine",
            corpus,
            "--out",
            d / "new" / "deep" / "r.h5",
            *base,
        ],
        "ok: -q with a skipped file": ["mine", mixed, "--out", d / "mixed.h5", *base],
        "ok: layers ignores weights": [
            "layers",
            "resnet18",
            "--weights",
            "IMAGENET1K_V1",
            "--input-size",
            "64",
        ],
        "ok: layers ignores a checkpoint": [
            "layers",
            f"{d / 'good.py'}:build",
            "--weights",
            d / "no-such.pt",
        ],
        "ok: module name": [
            "mine",
            corpus,
            "--out",
            d / "mod.h5",
            "--model",
            "resnet18",
            *tiny,
            "--layers",
            "layer3,layer4.1",
            "-k",
            "2",
        ],
    }
    results = cli_many(cases, d)
    results["_dir"] = d
    return results


ERRORS = {  # case -> words the one line on stderr must hold (and words it must not)
    "no readable image": (["no image could be read", "all 2 files", "a.jpg"], []),
    "empty --layers": (["--layers", "no layer names"], []),
    "empty --layers (render)": (["--layers", "no layer names"], []),
    "two layer typos": (["unknown layers", "'pol' (nearest: pool", "'hed' (nearest: head"], []),
    "model: syntax error": (["syntax.py:3", "syntax error"], []),
    "model: raises on import": (["raises.py:2", "RuntimeError", "boom on import"], []),
    "model: raises in factory": (["badbuild.py:5", "RuntimeError", "build()"], []),
    "model: no :factory": (["good.py:FACTORY", "build, other"], []),
    "output in /proc": (["not writable", "/proc"], ["No such file"]),
    "output folder under a file": (["cannot create output folder", "afile"], []),
    "output folder missing, usage error": (["unknown layer 'nope'"], []),
    "merge onto an existing file": (["output exists", "--force"], ["--resume"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_is_one_line_and_exit_2(cli, case):
    code, out, err = cli[case]
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("patchmine"), err
    must, must_not = ERRORS[case]
    for word in must:
        assert word in lines[0], (word, lines[0])
    for word in must_not:
        assert word not in lines[0], (word, lines[0])
    assert out == ""


def test_errors_write_nothing(cli):
    d = cli["_dir"]
    for name in ("bad.h5", "bad.h5.ckpt", "e.h5", "t.h5", "m.h5"):
        assert not (d / name).exists(), name
    assert not (d / "later").exists()  # the folder is made only once the work starts
    assert not list(d.glob(".*")), list(d.glob(".*"))


def test_successes(cli):
    d = cli["_dir"]
    for case in [c for c in cli if c.startswith("ok:")]:
        code, out, err = cli[case]
        assert code == 0 and "Traceback" not in err, (case, err)
    assert (d / "new" / "deep" / "r.h5").is_file()
    code, out, err = cli["ok: -q with a skipped file"]
    assert out == ""
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and "1 of 4 images unreadable" in lines[0] and "zz_broken.jpg" in lines[0]
    )
    code, out, err = cli["ok: layers ignores weights"]
    assert "layer3.1.relu_1" in out and "layer3" in out and "\n*" in out
    with patchmine.open(d / "mod.h5") as r:
        assert r.layers == ["layer3", "layer4.1"]
        assert r.layer("layer3").attrs["node"] == "layer3.1.relu_1"
        assert r.layer("layer4.1").attrs["node"] == "layer4.1.relu_1"
    info = run_cli("info", d / "mod.h5", check=True).stdout
    assert "(node layer3.1.relu_1)" in info


def test_quiet_mine_without_failures_prints_nothing(tmp_path, tiny_model):
    corpus = write_corpus(tmp_path / "c", 2, duplicates=False)
    p = run_cli("mine", corpus, "--out", tmp_path / "r.h5", *_tiny_args(tiny_model))
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p.stderr


def test_api_refuses_a_corpus_without_readable_images(tmp_path, tiny_model):
    from patchmine.mine import mine

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(UsageError, match="no image could be read"):
        mine(
            [tmp_path / "c"],
            tmp_path / "r.h5",
            model=tiny_model,
            weights="none",
            layers=["pool"],
            input_size=64,
            workers=0,
            progress=False,
        )
    assert sorted(os.listdir(tmp_path)) == ["c"]
