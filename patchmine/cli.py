"""The ``patchmine`` command line: a thin layer over the Python API.

Exit status: 0 success, 2 bad usage (one line on stderr), 1 internal failure or a failed write (a full
disk), 130 interrupted by SIGINT (Ctrl-C), 143 stopped by SIGTERM (128 + the signal, as shells do).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import traceback
from collections.abc import Iterable, Iterator, Sequence

from patchmine.errors import UsageError

__all__ = ["main", "parse_channels"]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _layer_list(value: str) -> list[str]:
    """An argparse type: comma-separated layer names, at least one."""
    names = _csv(value)
    if not names:
        raise argparse.ArgumentTypeError(
            f"no layer names in {value!r}; leave --layers out for the default set"
        )
    return names


def parse_channels(
    spec: str | Iterable[int] | None, channels: int | None = None
) -> list[int] | None:
    """``"0,5,9-20"`` -> [0, 5, 9, ..., 20] (sorted, unique); ``None`` -> None (all).

    Raises:
        UsageError: malformed ranges, or a channel >= ``channels`` when given.
    """
    if spec is None:
        return None
    out: set[int] = set()
    if isinstance(spec, str):
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
            if not m:
                raise UsageError(f"bad channel list item {part!r}; use e.g. 0,5,9-20")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
            if b < a:
                raise UsageError(f"bad channel range {part!r}: end before start")
            out.update(range(a, b + 1))
    else:
        for v in spec:
            if int(v) < 0:
                raise UsageError(f"channel numbers are 0 or more, got {v}")
            out.add(int(v))
    if not out:
        raise UsageError("empty channel list")
    if channels is not None and max(out) >= channels:
        raise UsageError(
            f"channel {max(out)} out of range: the layer has channels 0..{channels - 1}"
        )
    return sorted(out)


def _at_least(minimum: int):
    """An argparse type: a whole number no smaller than ``minimum``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    return parse


_positive, _nonneg = _at_least(1), _at_least(0)


def _fraction(value: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value!r}") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value!r}")
    return f


def _model_args(
    p: argparse.ArgumentParser, positional: bool = False, weights_help: str | None = None
) -> None:
    if positional:
        p.add_argument(
            "model",
            nargs="?",
            default=None,
            help="torchvision name, efficientnet_lite0 (default), or file.py:factory",
        )
    else:
        p.add_argument("--model", "-m", default=None, help="model (default: efficientnet_lite0)")
    p.add_argument(
        "--weights",
        "-w",
        default=None,
        help=weights_help or "DEFAULT, a weights name, none, or a path",
    )
    p.add_argument("--input-size", type=_positive, default=224, help="input side S (default 224)")


def cmd_layers(args: argparse.Namespace) -> int:
    from patchmine.describe import layer_table

    print("\n".join(layer_table(args.model, args.input_size, args.modules)))
    return 0


def _shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"need 0 <= I < N, got {value!r}")
    return i, n


def cmd_mine(args: argparse.Namespace) -> int:
    from patchmine.corpus import printable
    from patchmine.mine import mine

    try:
        summary = mine(
            args.corpus,
            args.out,
            model=args.model,
            weights=args.weights,
            layers=args.layers,
            k=args.k,
            per_image=args.per_image,
            input_size=args.input_size,
            resize=args.resize,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            shard=args.shard,
            force=args.force,
            progress=not args.quiet,
            patch_size=args.patch_size,
            labels=args.labels,
            channel_names=args.channel_names,
            bottom_k=args.bottom_k,
            min_inside=args.min_inside,
            jpeg_draft=args.jpeg_draft,
            projection=args.projection,
            projection_layers=args.projection_layers,
        )
    except KeyboardInterrupt as e:
        ckpt = _mine_checkpoint(args)
        if os.path.exists(ckpt):
            what = f"the run so far is saved in {ckpt}. Continue it with the same command plus --resume"
        else:
            what = "nothing was saved yet; run the command again to start over"
        print(f"patchmine mine: interrupted; {what}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    except OSError as e:  # a full disk and the like: the checkpoint (if any) survives
        ckpt = _mine_checkpoint(args)
        hint = (
            f"; the run so far is saved in {ckpt}: make room, then rerun with --resume"
            if os.path.exists(ckpt)
            else ""
        )
        print(f"patchmine mine: error: {_oserror(e)}{hint}", file=sys.stderr)
        _exit_if_stuck(e, 1)
        return 1
    if summary.extra.get("rank"):  # under torchrun: rank 0 reports
        return 0
    if not args.quiet:
        print(summary)
    elif summary.n_failed:  # quiet, but not silent about a partial corpus
        path, why = summary.failures[0]
        print(
            f"patchmine mine: {summary.n_failed} of {summary.n_images} images unreadable, skipped "
            f"(first: {printable(path)}: {' '.join(printable(why).split())}; "
            f"`patchmine info {args.out}` lists them)",
            file=sys.stderr,
        )
    return 0


def _mine_checkpoint(args: argparse.Namespace) -> str:
    rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE") else None  # torchrun
    return f"{args.out}.ckpt" + (f".rank{rank}" if rank is not None else "")


def _oserror(e: OSError) -> str:
    """One line: a WriteError's own message, else the errno text with the file name."""
    from patchmine.store import WriteError

    text = e.strerror if isinstance(e, WriteError) else f"{type(e).__name__}: {e}"
    return (str(text).splitlines() or [""])[0]


def _exit_if_stuck(e: OSError, code: int) -> None:
    """After a write that HDF5 could not abandon (a full disk), leave before its exit handlers,
    which would retry the write and crash; the temporary file is already gone."""
    if getattr(e, "stuck", False):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_merge(args: argparse.Namespace) -> int:
    from patchmine.merge import merge

    out = merge(args.files, args.out, force=args.force)
    if not args.quiet:
        print(f"merged {len(args.files)} shard files into {out}")
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    from patchmine.reproject import project

    try:
        summary = project(
            args.file,
            method=args.method,
            layers=args.layers,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            progress=not args.quiet,
        )
    except KeyboardInterrupt as e:
        print(f"patchmine project: interrupted; {args.file} is unchanged", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    if not args.quiet:
        print(summary)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from patchmine.describe import result_summary

    print("\n".join(result_summary(args.file)))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from patchmine.gallery import render

    channels = parse_channels(args.channels) if args.channels else None
    index = render(
        args.file,
        args.out,
        layers=args.layers,
        channels=channels,
        overlay=args.overlay,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"wrote {index}")
    return 0


def cmd_filters(args: argparse.Namespace) -> int:
    from patchmine.filters import filters

    im = filters(
        args.model,
        args.weights,
        args.out,
        scale=args.scale,
        norm=args.norm,
        input_size=args.input_size,
    )
    print(f"wrote {args.out}: {im.info['description']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from patchmine.pipeline import load_pipeline, run_pipeline

    pipeline = load_pipeline(args.pipeline)
    try:
        run_pipeline(pipeline, force=args.force, dry_run=args.dry_run, progress=not args.quiet)
    except KeyboardInterrupt as e:
        print(
            "patchmine run: interrupted; run the same command again to continue where it stopped",
            file=sys.stderr,
        )
        return 128 + int(getattr(e, "signum", 2))  # 130 for SIGINT, 143 for SIGTERM
    if pipeline.gallery is not None and not args.dry_run:
        print(f"gallery: {(pipeline.gallery / 'index.html').as_uri()}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2), like every other patchmine error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _run_options(p: argparse.ArgumentParser) -> None:
    """Batch size, decoding workers and device: the options of a command that runs the model."""
    p.add_argument("--batch-size", "-b", type=_positive, default=32)
    p.add_argument(
        "--workers",
        "-j",
        type=_nonneg,
        default=None,
        help="decoding worker processes (default: cores - 1, at most 4)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="patchmine",
        description="What each channel of a CNN responds to: top-k activations with their "
        "receptive-field patches, stored in HDF5, rendered as montages.",
    )
    from patchmine import __version__

    parser.add_argument("--version", action="version", version=f"patchmine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "layers",
        help="list a model's nodes and modules with shapes and "
        "receptive fields; * marks the default layers",
    )
    _model_args(
        p,
        positional=True,
        weights_help="ignored: the table is the architecture's, built "
        "without weights (no download, no checkpoint read)",
    )
    p.add_argument(
        "--modules",
        action="store_true",
        help="list the blocks (modules that hold others) with their output nodes",
    )
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("mine", help="mine a corpus into an HDF5 result file")
    p.add_argument("corpus", nargs="+", help="image folders and/or text files listing images")
    p.add_argument("--out", "-o", required=True, help="result file (.h5)")
    _model_args(p)
    p.add_argument(
        "--layers",
        "-l",
        type=_layer_list,
        default=None,
        help="comma-separated node or module names, as `patchmine layers MODEL` lists "
        "them (a module means its output node; default: the model's set, marked there)",
    )
    p.add_argument("-k", type=_positive, default=9, help="entries per channel (default 9)")
    p.add_argument(
        "--per-image",
        type=_positive,
        default=1,
        help="entries one image may give a channel (default 1; >1 uses IoU 0.5 NMS)",
    )
    _run_options(p)
    p.add_argument(
        "--resize",
        type=_positive,
        default=None,
        metavar="R",
        help="shorter side before the center crop, as torchvision's Resize(R) + "
        "CenterCrop(S) (default S; 256 for torchvision's ImageNet weights)",
    )
    p.add_argument(
        "--patch-size",
        type=_positive,
        default=96,
        help="largest stored patch side; larger fields are resampled (default 96)",
    )
    p.add_argument(
        "--min-inside",
        type=_fraction,
        default=None,
        metavar="F",
        help="only units whose field has at least fraction F (0 < F <= 1) inside the "
        "input compete: leaves out border units that padding drives (default: all)",
    )
    p.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode JPEGs at least twice the input size at 1/2, 1/4 or 1/8 scale "
        "(faster; pixels close to, not equal to, a full decode)",
    )
    p.add_argument(
        "--projection",
        default="none",
        metavar="METHOD",
        help="also store each entry's projection onto its patch: deconvnet (ZFNet), "
        "guided, gradient or none (default none)",
    )
    p.add_argument(
        "--projection-layers",
        type=_layer_list,
        default=None,
        metavar="LAYERS",
        help="comma-separated: only these mined layers get projections (default: all of them; "
        "deep layers and logits cost the most)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--checkpoint-every",
        type=_nonneg,
        default=50,
        metavar="N",
        help="save progress every N batches (default 50; 0 never)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=None,
        metavar="I/N",
        help="mine only slice I of N (merge the shard files with `patchmine merge`)",
    )
    p.add_argument(
        "--labels",
        default=None,
        metavar="folder|FILE.csv",
        help="image labels: 'folder' (ROOT/CLASS/IMAGE) or a CSV of path,label rows; "
        "stores per-channel class means and selectivity",
    )
    p.add_argument(
        "--channel-names",
        default=None,
        metavar="FILE.txt",
        help="names of the channels (one per line) of layers with as many channels",
    )
    p.add_argument(
        "--bottom-k",
        action="store_true",
        help="also keep each channel's k most negative activations (bottom/)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_mine)

    p = sub.add_parser("merge", help="combine shard files (mine --shard I/N) into one result")
    p.add_argument("files", nargs="+", help="every shard file of one run, in any order")
    p.add_argument("--out", "-o", required=True, help="merged result file (.h5)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser(
        "project", help="add (or replace) the projections of a result file, without mining again"
    )
    p.add_argument("file", help="result file (.h5), rewritten atomically")
    p.add_argument(
        "--method", default="deconvnet", help="deconvnet (ZFNet, default), guided or gradient"
    )
    p.add_argument(
        "--layers",
        "-l",
        type=_layer_list,
        default=None,
        help="comma-separated: project only these of the file's layers (the others are left "
        "without projections; default: all)",
    )
    _run_options(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("info", help="what a result file holds")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("render", help="montages, overviews and an HTML gallery of a result file")
    p.add_argument("file", help="result file (.h5)")
    p.add_argument("--out", "-o", required=True, help="output folder (gets index.html)")
    p.add_argument(
        "--layers", "-l", type=_layer_list, default=None, help="comma-separated layer names"
    )
    p.add_argument("--channels", "-c", default=None, help="e.g. 0,5,9-20 (default: all)")
    p.add_argument(
        "--overlay",
        choices=("heat", "mask", "none"),
        default="heat",
        help="activation overlay on the patches (default heat)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("filters", help="first-layer RGB kernels as an image (AlexNet conv1 style)")
    _model_args(p, positional=True)
    p.add_argument("--out", "-o", required=True, help="output image (.png)")
    p.add_argument(
        "--scale",
        type=_positive,
        default=None,
        help="pixels per kernel weight (default: kernels about 48 px wide)",
    )
    p.add_argument(
        "--norm",
        choices=("minmax", "symmetric"),
        default="minmax",
        help="per-kernel min/max to 0..255, or symmetric around 0 (default minmax)",
    )
    p.set_defaults(func=cmd_filters)

    p = sub.add_parser(
        "run", help="a pipeline file: build the corpus, mine, render; only what is out of date"
    )
    p.add_argument("pipeline", help="pipeline file (.toml), e.g. pipelines/demo.toml")
    p.add_argument("--force", action="store_true", help="re-run every step, even up to date ones")
    p.add_argument(
        "--dry-run",
        "-n",
        action="store_true",
        help="say what would run, and why, without running it",
    )
    p.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="step lines only: no progress bars or mining summary",
    )
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``patchmine`` command. It first tunes this process's C allocator (see
    :mod:`patchmine.allocator`; ``PATCHMINE_MALLOC=default`` turns that off)."""
    from patchmine.allocator import tune_allocator

    try:
        tune_allocator()
    except ValueError as e:
        print(f"patchmine: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    with _quiet_h5py_dealloc():
        return _run(args)


@contextlib.contextmanager
def _quiet_h5py_dealloc() -> Iterator[None]:
    """A failed write (full disk) also fails in h5py's object destructors, each printing a traceback
    (through sys.excepthook, then "Exception ignored in ... __dealloc__"); the command's own error
    says it in one line. The command line owns its process: it mutes them while a command runs."""
    old_unraisable, old_except = sys.unraisablehook, sys.excepthook

    def from_h5py(tb, obj=None) -> bool:
        where = " ".join(f.filename for f in traceback.extract_tb(tb))
        return "h5py" in repr(obj) + where

    def unraisable(u) -> None:
        if not from_h5py(u.exc_traceback, u.object):
            old_unraisable(u)

    def excepthook(kind, value, tb) -> None:
        if not from_h5py(tb):
            old_except(kind, value, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = old_unraisable, old_except


def _run(args: argparse.Namespace) -> int:
    """Run one parsed command: exit status 2 and one line for bad usage, 1 for failures."""
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(f"patchmine {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"patchmine {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as e:  # the environment failed (disk full, I/O error), not patchmine
        print(f"patchmine {args.command}: error: {_oserror(e)}", file=sys.stderr)
        _exit_if_stuck(e, 1)
        return 1
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback on request
        if os.environ.get("PATCHMINE_DEBUG"):
            traceback.print_exc()
        print(
            f"patchmine {args.command}: internal error: {type(e).__name__}: {e} "
            "(set PATCHMINE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
