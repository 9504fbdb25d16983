"""Pipelines: a named job (corpus -> mine -> render) in a TOML file, re-run only where out of date.

Public names: Pipeline, load_pipeline, run_pipeline.

A pipeline file has three tables whose keys are the long options of the matching commands::

    name = "demo"                              # optional (default: the file name)
    description = "..."                        # optional

    [corpus]
    paths = ["../build/demo-corpus"]           # image folders and/or list files (required)
    recipe = "../data/demo_corpus.py"          # optional: `python RECIPE PATHS[0]` builds the corpus

    [mine]                                     # `patchmine mine` options
    out = "../out/demo.h5"                     # the result file (required)
    model = "efficientnet_lite0"               # model, weights, layers, k, per_image, input_size,
    layers = ["_blocks.2.add", "_fc"]          # resize, patch_size, min_inside, labels,
    k = 9                                      # channel_names, bottom_k, batch_size, workers,
                                               # device

    [render]                                   # optional: `patchmine render` options
    out = "../out/demo"                        # the gallery folder (required in [render])
    channels = "0-63"                          # layers, channels, overlay

Relative paths are relative to the folder of the pipeline file (so a pipeline runs the same from any
working directory), model files (``file.py:factory``) and weight checkpoints included.

Each step runs only when it is out of date, like make:

- corpus (only with a recipe): its first folder lacks the marker the last build left, or the recipe
  changed since (the marker holds the recipe's SHA-256). The recipe itself should be idempotent.
- mine: the result file is missing, was not made by a pipeline, its recorded settings (model,
  weights, layers, k, per_image, input_size, resize, patch_size, min_inside, labels, channel_names,
  bottom_k, the corpus file list, the model file, checkpoint, label file and channel names file)
  differ from the pipeline's, or a corpus image is newer than it. ``labels`` is "folder" or a CSV
  file and ``channel_names`` a file, both relative to the pipeline file. Settings that do not
  change the result (batch_size, workers, device) never re-run it. The settings are stored as JSON
  in the result's root attribute ``pipeline_settings``.
- render: the gallery's ``index.html`` is missing or older than the result file, or the render
  settings (stored in ``.patchmine-render.json`` in the gallery) changed.

``force`` re-runs every step. An interrupted mining run leaves a checkpoint that the next run of the
same pipeline continues from.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from patchmine.errors import UsageError, differences, nearest

if TYPE_CHECKING:
    from patchmine.corpus import Corpus

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Pipeline", "load_pipeline", "run_pipeline"]

RECIPE_MARKER = ".patchmine-recipe"
RENDER_MARKER = ".patchmine-render.json"

# table -> key -> (kind, required, what it is); kinds: str, strs (str or list of str), int (>= 1),
# int0 (>= 0), fraction (0 < F <= 1), bool, channels (str or list of int)
_SCHEMA: dict[str, dict[str, tuple[str, bool, str]]] = {
    "": {
        "name": ("str", False, "the pipeline's name"),
        "description": ("str", False, "one line about it"),
    },
    "corpus": {
        "paths": ("strs", True, "the image folders and/or list files to mine"),
        "recipe": ("str", False, "a script that builds the corpus into the first path"),
    },
    "mine": {
        "out": ("str", True, "the result file (.h5)"),
        "model": ("str", False, "model name or file.py:factory"),
        "weights": ("str", False, "weights name, none, or a checkpoint path"),
        "layers": ("strs", False, "node names"),
        "k": ("int", False, "entries per channel"),
        "per_image": ("int", False, "entries one image may give a channel"),
        "input_size": ("int", False, "input side"),
        "resize": ("int", False, "shorter side before the center crop"),
        "patch_size": ("int", False, "largest stored patch side"),
        "labels": ("str", False, '"folder" or a path,label CSV file'),
        "channel_names": ("str", False, "a file of channel names, one per line"),
        "bottom_k": ("bool", False, "also keep the k most negative activations"),
        "min_inside": ("fraction", False, "share of a unit's field inside the input, 0 < F <= 1"),
        "jpeg_draft": ("bool", False, "decode large JPEGs at reduced scale (faster, not exact)"),
        "projection": ("str", False, "deconvnet, guided, gradient or none: per-entry projections"),
        "projection_layers": ("strs", False, "the mined layers that get projections (default all)"),
        "batch_size": ("int", False, "batch size"),
        "workers": ("int0", False, "decoding worker processes"),
        "device": ("str", False, "cpu, cuda, ..."),
    },
    "render": {
        "out": ("str", True, "the gallery folder"),
        "layers": ("strs", False, "layer names"),
        "channels": ("channels", False, "channels such as 0-63"),
        "overlay": ("str", False, "heat, mask or none"),
    },
}
_TABLES = ("corpus", "mine", "render")
_REQUIRED_TABLES = ("corpus", "mine")
# [mine] keys the result depends on; batch_size, workers and device do not change it (DESIGN.md)
_RESULT_KEYS = (
    "model",
    "weights",
    "layers",
    "k",
    "per_image",
    "input_size",
    "resize",
    "patch_size",
    "min_inside",
    "labels",
    "channel_names",
    "bottom_k",
)


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file, every path resolved.

    ``mine`` holds keyword arguments of :func:`patchmine.mine.mine` and ``render`` those of
    :func:`patchmine.gallery.render` (without their positional paths; ``channels`` as written,
    a string such as "0-63" or a list).
    """

    path: Path
    name: str
    description: str
    corpus: tuple[Path, ...]
    recipe: Path | None
    result: Path
    mine: dict = field(default_factory=dict)
    gallery: Path | None = None
    render: dict = field(default_factory=dict)

    def settings(self, corpus: Corpus) -> dict:
        """What the result file depends on (compared with the one recorded in it)."""
        s = {key: self.mine.get(key) for key in _RESULT_KEYS}
        s["bottom_k"] = True if s["bottom_k"] else None  # off is what results before it hold
        s["corpus"] = corpus.fingerprint()
        for key in ("labels", "channel_names"):
            value = self.mine.get(key)
            if value and value != "folder" and Path(value).is_file():
                s[f"{key}_file"] = _sha256(Path(value))  # small files: their contents
        if self.mine.get("jpeg_draft"):  # only when on: files made before the option stay current
            s["jpeg_draft"] = True
        if self.mine.get("projection") not in (None, "none"):  # the same
            s["projection"] = self.mine["projection"]
            if self.mine.get("projection_layers"):
                s["projection_layers"] = list(self.mine["projection_layers"])
        model = self.mine.get("model") or ""
        if ":" in model and Path(model.rpartition(":")[0]).is_file():
            s["model_file"] = _file_stamp(Path(model.rpartition(":")[0]))
        weights = self.mine.get("weights")
        if weights and Path(weights).is_file():
            s["weights_file"] = _file_stamp(Path(weights))
        return s


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _check(where: str, key: str, kind: str, value):
    """One value of the kind the schema names, normalized; UsageError otherwise."""

    def bad(expected: str):
        return UsageError(f"{where}: {key} must be {expected}, got {value!r}")

    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if kind == "strs":
        if isinstance(value, str):
            value = [value]
        if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise bad("a string or a non-empty list of strings")
        return list(value)
    if kind in ("int", "int0"):
        low = 1 if kind == "int" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"a whole number >= {low}")
        return value
    if kind == "fraction":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad("a number in (0, 1]")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "channels":
        from patchmine.cli import parse_channels

        if not isinstance(value, (str, list)) or (
            isinstance(value, list) and not all(type(v) is int for v in value)
        ):
            raise bad('a string such as "0,5,9-20" or a list of channel numbers')
        parse_channels(value)  # raises on malformed ranges
        return value
    raise AssertionError(kind)


def _unknown(where: str, keys: list[str], valid: list[str]) -> UsageError:
    hints = []
    for key in keys:
        near = nearest(key, valid, n=1)
        hints.append(f"{key} (did you mean {near[0]}?)" if near else key)
    return UsageError(
        f"{where}: unknown key{'s' if len(keys) > 1 else ''} {', '.join(hints)}; "
        f"valid: {', '.join(valid)}"
    )


def _resolve(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _resolve_model(base: Path, spec: str) -> str:
    """``file.py:factory`` relative to the pipeline's folder; other model names unchanged."""
    target, sep, attr = spec.rpartition(":")
    if sep and (target.endswith(".py") or "/" in target):
        return f"{_resolve(base, target)}:{attr}"
    return spec


def _resolve_weights(base: Path, weights: str) -> str:
    """A checkpoint path relative to the pipeline's folder; weights names unchanged."""
    looks_like_path = "/" in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt"))
    return str(_resolve(base, weights)) if looks_like_path else weights


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Read and validate a pipeline file.

    Raises:
        UsageError: unreadable or malformed TOML, unknown keys or tables (listed, with the nearest
            valid names), missing required keys (named), values of the wrong type.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"pipeline file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read pipeline file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    base = path.resolve().parent
    top_valid = [*_SCHEMA[""], *_TABLES]
    unknown = [key for key in data if key not in top_valid]
    if unknown:
        raise _unknown(str(path), unknown, top_valid)
    missing = [t for t in _REQUIRED_TABLES if t not in data]
    if missing:
        raise UsageError(
            f"{path}: missing table{'s' if len(missing) > 1 else ''} "
            + ", ".join(f"[{t}]" for t in missing)
            + " (it needs at least [corpus] paths = [...] and [mine] out = ...)"
        )
    values: dict[str, dict] = {"": {}}
    for table, schema in _SCHEMA.items():
        raw = data if table == "" else data.get(table)
        if raw is None:
            continue
        where = f"{path} [{table}]" if table else str(path)
        if table and not isinstance(raw, dict):
            raise UsageError(f"{path}: {table} must be a table ([{table}]), got {raw!r}")
        items = {key: v for key, v in raw.items() if table or key not in _TABLES}
        unknown = [key for key in items if key not in schema]
        if unknown:
            raise _unknown(where, unknown, list(schema))
        missing = [key for key, (_, req, _) in schema.items() if req and key not in items]
        if missing:
            raise UsageError(
                f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                + "; ".join(f"{key} ({schema[key][2]})" for key in missing)
            )
        values[table] = {key: _check(where, key, schema[key][0], v) for key, v in items.items()}
    corpus, mine, render = values["corpus"], dict(values["mine"]), values.get("render")
    result = _resolve(base, mine.pop("out"))
    if "model" in mine:
        mine["model"] = _resolve_model(base, mine["model"])
    if "weights" in mine:
        mine["weights"] = _resolve_weights(base, mine["weights"])
    if mine.get("labels", "folder") != "folder":
        mine["labels"] = str(_resolve(base, mine["labels"]))
    if "channel_names" in mine:
        mine["channel_names"] = str(_resolve(base, mine["channel_names"]))
    if mine.get("projection", "none") not in ("deconvnet", "guided", "gradient", "none"):
        raise UsageError(
            f"{path} [mine]: projection must be deconvnet, guided, gradient or none, "
            f"got {mine['projection']!r}"
        )
    gallery, render_kw = None, {}
    if render is not None:
        render_kw = dict(render)
        gallery = _resolve(base, render_kw.pop("out"))
        if render_kw.get("overlay", "heat") not in ("heat", "mask", "none"):
            raise UsageError(
                f"{path} [render]: overlay must be heat, mask or none, got {render_kw['overlay']!r}"
            )
    return Pipeline(
        path=path,
        name=values[""].get("name", path.stem),
        description=values[""].get("description", ""),
        corpus=tuple(_resolve(base, p) for p in corpus["paths"]),
        recipe=_resolve(base, corpus["recipe"]) if "recipe" in corpus else None,
        result=result,
        mine=mine,
        gallery=gallery,
        render=render_kw,
    )


def _show(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory when inside it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Each `_why_*` says why a step must run, or returns None when it is up to date.


def _why_corpus(p: Pipeline) -> str | None:
    target = p.corpus[0]
    marker = target / RECIPE_MARKER
    if not target.exists():
        return f"{_show(target)} does not exist"
    if not marker.is_file():
        return f"{_show(target)} was not built by {_show(p.recipe)}"
    if marker.read_text().strip() != _sha256(p.recipe):
        return f"{_show(p.recipe)} changed since the last build"
    return None


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _why_mine(p: Pipeline, corpus: Corpus, settings: dict) -> str | None:
    from patchmine.store import open_result

    if not p.result.exists():
        return f"{_show(p.result)} does not exist"
    try:
        with open_result(p.result) as r:
            recorded = r.attrs.get("pipeline_settings")
    except Exception as e:  # noqa: BLE001 - any unreadable file is simply out of date
        return f"{_show(p.result)} cannot be read ({type(e).__name__}: {e})"
    if recorded is None:
        return f"{_show(p.result)} was not made by a pipeline"
    recorded = json.loads(recorded)
    changed = differences(recorded, settings, sorted(set(settings) | set(recorded)))
    if changed:
        what = []
        for key in changed:
            if key == "corpus":
                what.append("the corpus file list")
            elif key in ("model_file", "weights_file", "labels_file", "channel_names_file"):
                what.append(f"the {key.replace('_', ' ')}")
            else:
                what.append(f"{key} {_short(recorded.get(key))} -> {_short(settings.get(key))}")
        return "settings changed: " + ", ".join(what)
    made = p.result.stat().st_mtime_ns
    newer = sum(1 for i in range(len(corpus)) if _mtime_ns(corpus.file(i)) > made)
    if newer:
        return f"{newer} corpus image{'s are' if newer > 1 else ' is'} newer than {_show(p.result)}"
    return None


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0  # a missing file is counted (and named) by the mining run itself


def _render_settings(p: Pipeline) -> dict:
    return {key: p.render.get(key) for key in _SCHEMA["render"] if key != "out"}


def _why_render(p: Pipeline) -> str | None:
    index = p.gallery / "index.html"
    if not index.exists():
        return f"{_show(index)} does not exist"
    if index.stat().st_mtime_ns < p.result.stat().st_mtime_ns:
        return f"{_show(p.result)} is newer than {_show(index)}"
    marker = p.gallery / RENDER_MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != _render_settings(p):
        return "render settings changed"
    return None


def run_pipeline(
    pipeline: Pipeline | str | os.PathLike,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, str | None]:
    """Run the out-of-date steps of a pipeline, in order: corpus (recipe), mine, render.

    Args:
        pipeline: a :class:`Pipeline` or the path of a pipeline file.
        force: run every step, up to date or not.
        dry_run: only say what would run, and why.
        progress: tqdm bars and the mining summary.
        log: where the one-line step messages go ("mine: up to date (out/demo.h5)").

    Returns:
        Step name -> why it ran, or None where it was up to date (a dry run runs nothing, but
        reports the same).

    Raises:
        UsageError: a bad pipeline file, a failing recipe, or any usage error of mine / render.
    """
    from patchmine.cli import parse_channels
    from patchmine.corpus import discover
    from patchmine.gallery import render
    from patchmine.mine import mine

    p = pipeline if isinstance(pipeline, Pipeline) else load_pipeline(pipeline)
    done: dict[str, str | None] = {}

    def step(name: str, why: str | None, what: str) -> bool:
        done[name] = why
        if why is None:
            log(f"{name}: up to date ({what})")
            return False
        log(f"{name}: {'would run' if dry_run else 'running'} ({why})")
        return not dry_run

    if p.recipe is not None:
        if not p.recipe.is_file():
            raise UsageError(f"{p.path}: corpus recipe not found: {p.recipe}")
        if step("corpus", "--force" if force else _why_corpus(p), _show(p.corpus[0])):
            cmd = [sys.executable, str(p.recipe), str(p.corpus[0])]
            rc = subprocess.run(cmd, check=False).returncode
            if rc != 0:
                raise UsageError(f"corpus recipe {_show(p.recipe)} failed with exit status {rc}")
            (p.corpus[0] / RECIPE_MARKER).write_text(_sha256(p.recipe) + "\n")
    if dry_run and p.recipe is not None and done["corpus"] is not None:
        done["mine"] = "the corpus will be rebuilt"
        log("mine: would run (if the rebuilt corpus differs)")
    else:
        missing = [c for c in p.corpus if not c.exists()]
        if missing:
            raise UsageError(
                f"{p.path}: corpus path does not exist: {', '.join(map(str, missing))}"
                + (" (add a [corpus] recipe that builds it)" if p.recipe is None else "")
            )
        corpus = discover([str(c) for c in p.corpus])
        settings = p.settings(corpus)
        why = "--force" if force else _why_mine(p, corpus, settings)
        if step("mine", why, _show(p.result)):
            p.result.parent.mkdir(parents=True, exist_ok=True)
            checkpoint = p.result.with_name(p.result.name + ".ckpt")
            resume = checkpoint.exists() and not force and not p.result.exists()
            summary = mine(
                [str(c) for c in p.corpus],
                p.result,
                **p.mine,
                force=not resume,
                resume=resume,
                progress=progress,
                extra_attrs={
                    "pipeline": p.name,
                    "pipeline_settings": json.dumps(settings, sort_keys=True),
                },
            )
            if progress:
                log(str(summary))
    if p.gallery is None:
        return done
    if dry_run and done.get("mine") is not None:
        done["render"] = "the result file will change"
        log("render: would run (after mining)")
        return done
    index = p.gallery / "index.html"
    if step("render", "--force" if force else _why_render(p), _show(index)):
        options = {**p.render, "channels": parse_channels(p.render.get("channels"))}
        render(p.result, p.gallery, **options, progress=progress)
        (p.gallery / RENDER_MARKER).write_text(json.dumps(_render_settings(p), sort_keys=True))
    return done
