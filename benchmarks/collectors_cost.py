"""What the collectors cost inside a real first pass: `mine` with and without `Miner.collect`.

The limit loop of `make bench` section 5 forwards the same images and collects nothing, so the
collectors' own work bounds how close patchmine's streaming can come to it. `bench.py` section 1
times them in process on ready batches (3-4% of AlexNet's forward); here they run as in `mine`,
beside the DataLoader worker that decodes the next batch, against the same run with
`Miner.collect` replaced by a no-op (the file it writes is then empty: only the time counts).
One untimed warm-up run, then alternated rounds; first-pass seconds from `mine`'s summary.

    python benchmarks/collectors_cost.py --corpus ../shared/corpus/imagenet-sample-500 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench import ALEXNET  # section 5's AlexNet nodes; bench puts the repository on sys.path

from patchmine.allocator import tune_allocator
from patchmine.corpus import discover


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="../shared/corpus/imagenet-sample-500")
    ap.add_argument("--photos", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=2, help="times the photo list is repeated")
    ap.add_argument("--model", default="alexnet", help="alexnet, or lite0 (its default layers)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tune_allocator()  # as the patchmine command does

    from patchmine import miner as M
    from patchmine.mine import mine

    root = Path(args.corpus).resolve()
    files = [str(root / p) for p in discover([root]).paths[: args.photos]]
    work = Path(tempfile.mkdtemp())
    listing = work / "list.txt"
    listing.write_text("\n".join(files * args.repeat) + "\n")
    if args.model == "alexnet":
        model = dict(zip(("model", "weights", "layers"), ALEXNET, strict=True))
    else:
        model = {}
    mine([listing], work / "out.h5", force=True, progress=False, k=1, **model)  # warm-up, untimed
    collect = M.Miner.collect
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    for r in range(args.rounds):
        for mode in ("with", "without") if r % 2 == 0 else ("without", "with"):
            M.Miner.collect = collect if mode == "with" else (lambda self, acts, index: None)
            s = mine([listing], work / "out.h5", force=True, progress=False, k=1, **model)
            seconds[mode].append(s.first_pass_seconds)
            print(f"round {r} {mode:7s} collectors: first pass {s.first_pass_seconds:.2f} s",
                  flush=True)  # fmt: skip
    M.Miner.collect = collect
    n = len(files) * args.repeat
    w, wo = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    print(f"{args.model}, {n} images, medians: with {w:.2f} s, without {wo:.2f} s; the collectors "
          f"take {1000 * (w - wo) / n:.2f} ms per image, {100 * (w - wo) / w:.1f}% of the first "
          "pass")  # fmt: skip


if __name__ == "__main__":
    main()
