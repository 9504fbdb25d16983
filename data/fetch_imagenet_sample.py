"""Fetch the 1000 ImageNet sample photographs (one per class) for users who have a network.

    python data/fetch_imagenet_sample.py [OUT]      # default OUT: build/imagenet-sample

Source: the public repository https://github.com/EliSchwartz/imagenet-sample-images, one JPEG per
ImageNet-1k class named ``<wnid>_<class_name>.JPEG``. The file list comes from GitHub's API (one
request); each file from https://raw.githubusercontent.com/EliSchwartz/imagenet-sample-images/master/.

Verification: ``data/imagenet_sample.sha256`` holds the SHA-256 of the 500 photographs of the even
class indices (0, 2, ..., 998), the ones measured for this project. Those are verified: a file whose
bytes differ is deleted and the script exits with status 1. The 500 odd-index photographs have no
checksum in the manifest: they are fetched and kept unverified, and the script says how many. If the
API cannot be reached but raw files can, only the 500 manifest files are fetched.

Idempotent: files already present (and, where a checksum exists, correct) are not fetched again.
Exit status: 0 done; 1 a checksum mismatch or failed downloads; 2 no network (one line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = "EliSchwartz/imagenet-sample-images"
RAW = f"https://raw.githubusercontent.com/{REPO}/master/"
TREE = f"https://api.github.com/repos/{REPO}/git/trees/master"
MANIFEST = Path(__file__).resolve().parent / "imagenet_sample.sha256"
TIMEOUT = 30


class NoNetwork(Exception):
    """No route to GitHub at all (as opposed to one failed file)."""


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """File name -> SHA-256, from ``sha256sum``-style lines (``#`` comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def _get(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "patchmine-fetch"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.read()


def _offline(e: Exception) -> bool:
    """A failure that means "no network" rather than "this one URL failed"."""
    if isinstance(e, urllib.error.HTTPError):
        return False
    return isinstance(e, (urllib.error.URLError, OSError))


def list_files(known: dict[str, str]) -> list[str]:
    """Every photograph of the repository (from the API), or the manifest's when it is unreachable."""
    try:
        tree = json.loads(_get(TREE))
    except Exception as e:  # noqa: BLE001 - rate limits, proxies: fall back to the manifest
        try:
            _get(RAW + next(iter(known)))
        except Exception as e2:  # noqa: BLE001
            if _offline(e2):
                raise NoNetwork(f"{type(e2).__name__}: {getattr(e2, 'reason', e2)}") from e2
        print(f"fetch: the file list is unavailable ({e}); fetching the {len(known)} verified ones")
        return sorted(known)
    names = [t["path"] for t in tree.get("tree", []) if t["path"].lower().endswith(".jpeg")]
    return sorted(names) or sorted(known)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_one(out: Path, name: str, want: str | None) -> str:
    """'ok', 'kept', 'unverified', 'mismatch' or 'failed: ...' for one file."""
    path = out / name
    if path.is_file() and (want is None or sha256(path.read_bytes()) == want):
        return "kept"
    try:
        data = _get(RAW + urllib.request.quote(name))
    except Exception as e:  # noqa: BLE001
        if _offline(e) and not isinstance(e, urllib.error.HTTPError):
            return f"offline: {getattr(e, 'reason', e)}"
        return f"failed: {e}"
    if want is not None and sha256(data) != want:
        path.unlink(missing_ok=True)
        return "mismatch"
    tmp = path.with_name(f".{name}.part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return "ok" if want is not None else "unverified"


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parent.parent / "build" / "imagenet-sample"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, default=default, help=f"folder (default {default})")
    p.add_argument("--jobs", "-j", type=int, default=8, help="parallel downloads (default 8)")
    args = p.parse_args(argv)
    known = read_manifest()
    try:
        names = list_files(known)
    except NoNetwork as e:
        print(f"fetch_imagenet_sample: no network, cannot reach github.com ({e})", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        states = list(pool.map(lambda n: fetch_one(args.out, n, known.get(n)), names))
    offline = [s for s in states if s.startswith("offline")]
    if offline and len(offline) == len(names):
        print(f"fetch_imagenet_sample: no network ({offline[0][9:]})", file=sys.stderr)
        return 2
    verified = sum(
        1 for n, s in zip(names, states, strict=True) if n in known and s in ("ok", "kept")
    )
    unverified = sum(1 for n in names if n not in known and (args.out / n).is_file())
    bad = [n for n, s in zip(names, states, strict=True) if s == "mismatch"]
    failed = [
        (n, s) for n, s in zip(names, states, strict=True) if s.startswith(("failed", "offline"))
    ]
    print(
        f"{args.out}: {verified + unverified} photographs, {verified} verified against "
        f"{MANIFEST.name}, {unverified} without a checksum (unverified)"
    )
    for n in bad:
        print(f"  checksum mismatch, deleted: {n}", file=sys.stderr)
    for n, s in failed[:10]:
        print(f"  {n}: {s}", file=sys.stderr)
    if failed:
        print(f"  {len(failed)} downloads failed; run again to retry them", file=sys.stderr)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
