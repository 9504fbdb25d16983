"""The Tap: tapped values untouched by later in-place ops; the same bits whatever the batch size."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchmine.models import load_model
from patchmine.taps import Tap, chunk_size, node_shapes
from tests.conftest import assert_same_file, cli_env, write_corpus


class InPlaceNet(nn.Module):
    """In-place ops of every kind FX keeps: module flag, method, positional and keyword flags, a
    mutation through a view whose base is read again afterwards (so it cannot be made out of place)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        y = self.conv2(x)
        y += x
        y = y.relu_()
        y = F.hardtanh(y, -0.5, 0.5, True)
        y = F.leaky_relu(y, 0.1, inplace=True)
        z = self.conv2(y)
        w = z.view(z.shape[0], -1).mul_(2)  # changes z too
        u = self.act(z + w.view_as(z))  # reads the changed z
        return self.head(u.mean((2, 3)))


def _resnet_layer1(names):
    return [n for n in names if n.split(".")[0] in ("bn1", "relu", "maxpool", "layer1")]


CASES = {
    "alexnet": (lambda: load_model("alexnet", "none").module, list, 96),
    "resnet18": (lambda: load_model("resnet18", "none").module, _resnet_layer1, 64),
    "custom": (lambda: InPlaceNet().eval(), list, 16),
}


@pytest.mark.parametrize("case", CASES)
def test_tapped_values_do_not_depend_on_other_taps(case, capfd):
    """Every node reads the same tapped with all the others as alone; the model is left as it was."""
    build, pick, size = CASES[case]
    torch.manual_seed(0)
    model = build()
    names = pick(list(node_shapes(model, size)))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    px = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: m.inplace for k, m in model.named_modules() if hasattr(m, "inplace")}
    assert any(flags.values()) or case == "custom"
    with torch.inference_mode():
        norm = Tap(model, names[:1], mean, std)
        x = (px.float() - norm.mean) / norm.std
        x = torch.cat([x, x.new_zeros(x.shape)])  # the Tap's chunk of 16, padded with zeros
        assert len(x) == chunk_size("cpu")  # (a GEMM's last bits may follow its row count)
        # on CPU the Tap runs channels-last; the custom net's view needs NCHW strides
        formats = [torch.contiguous_format] + [torch.channels_last] * (case != "custom")
        before = {f: model(x.contiguous(memory_format=f)) for f in formats}
        tap = Tap(model, names, mean, std)
        together = tap(px)
        assert tap.channels_last == (case != "custom")
        assert all(a.is_contiguous() for a in together.values())
        as_run = tap(px, contiguous=False)  # the second pass's: the model's own memory format
        assert all(torch.equal(as_run[n], together[n]) for n in names)
        for n in names:
            alone = Tap(model, [n], mean, std, channels_last=tap.channels_last)
            assert torch.equal(together[n], alone(px)[n]), n
        # the last node is the model's output: the rewritten graph still means the same
        if case != "resnet18":
            assert torch.equal(together[names[-1]], before[formats[-1]][: len(px)])
        assert all(torch.equal(model(x.contiguous(memory_format=f)), b) for f, b in before.items())
    assert {k: m.inplace for k, m in model.named_modules() if hasattr(m, "inplace")} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # torchvision's ReLUs are made out of place (no copy); only the custom net's view needs clones
    clones = [n for n in tap.extractor.graph.nodes if n.op == "call_method" and n.target == "clone"]
    assert bool(clones) == (case == "custom")
    assert capfd.readouterr().err == ""  # trying channels-last on the custom net is silent


INVARIANCE = textwrap.dedent("""
    import torch
    from patchmine.models import load_model
    from patchmine.taps import Tap, node_shapes

    assert torch.get_num_threads() == {threads}
    for lm in (load_model(), load_model("alexnet", "none")):
        names = list(node_shapes(lm.module, 96))
        tap = Tap(lm.module, [names[1], names[len(names) // 2], names[-1]], lm.mean, lm.std)
        torch.manual_seed(0)
        px = torch.randint(0, 256, (16, 3, 96, 96), dtype=torch.uint8)
        with torch.inference_mode():
            whole = tap(px)
            for sizes in ([1, 3, 5, 7], [11, 5], [8, 8]):
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                parts = [tap(px[s : s + b]) for s, b in zip(starts, sizes)]
                for k, v in whole.items():
                    assert torch.equal(v, torch.cat([p[k] for p in parts])), (lm.name, k, sizes)
    print("ok")
""")


def _env(threads: int) -> dict[str, str]:
    return cli_env(OMP_NUM_THREADS=str(threads))


@pytest.mark.parametrize("threads", [1, 2])
def test_tap_is_batch_size_invariant_at_any_thread_count(threads):
    """Bit-identical activations across batch splits, in a process with OMP_NUM_THREADS set (with
    1 thread the embedded model's kernels differ between a batch of 16 and one of 8)."""
    script = INVARIANCE.format(threads=threads)
    p = subprocess.run([sys.executable, "-c", script], env=_env(threads), capture_output=True)
    assert p.returncode == 0 and p.stdout.strip() == b"ok", p.stderr.decode()[-3000:]


@pytest.mark.parametrize("threads", [1, 2])
def test_mined_file_is_batch_size_invariant_at_any_thread_count(tmp_path, threads):
    corpus = write_corpus(tmp_path / "c", 20, seed=5)
    outs = []
    for bs in (16, 3):
        out = tmp_path / f"b{bs}.h5"
        args = ["--out", str(out), "--layers", "_blocks.2.add,_blocks.7.add,_fc", "-k", "4"]
        args += ["--input-size", "96", "--batch-size", str(bs), "--workers", "0", "-q"]
        cmd = [sys.executable, "-m", "patchmine", "mine", str(corpus), *args]
        p = subprocess.run(cmd, env=_env(threads), capture_output=True)
        assert p.returncode == 0, p.stderr.decode()[-3000:]
        outs.append(out)
    assert_same_file(*outs)
