"""Running vbench 0.1.5's own dimension code in a current environment.

vbench pins numpy<2, transformers==4.33.2 and timm<=1.0.12; it is installed with ``--no-deps`` and
the harness bridges the few places where its code meets newer libraries:

* ``pkg_resources``: the ``openai-clip`` package that vbench imports as ``clip`` does
  ``from pkg_resources import packaging`` (only to compare torch versions); setuptools >= 81 no
  longer ships ``pkg_resources``. When it is absent, a module of that name exposing just
  ``packaging`` is registered (``install_pkg_resources_shim``).
* ``torch.load``: torch >= 2.6 loads with ``weights_only=True`` by default, which refuses
  checkpoints holding arbitrary pickled objects (training arguments, numpy scalars) that vbench's
  loaders expect to read. Inside ``trusted_torch_load()`` a ``torch.load`` call that does not say
  otherwise gets ``weights_only=False``. Only files of the local weight cache, which the user put
  there, are loaded this way: unpickling can execute code, so never point the cache at files of
  unknown origin.
* ``VBENCH_CACHE_DIR``: vbench reads it once, at import, into module globals (``CACHE_DIR``);
  ``use_cache_dir`` sets the variable and those globals, before a dimension's module is imported
  (``compute_function``): the ViCLIP tokenizer looks for its vocabulary there at import time.
* Video decoding: vbench reads mp4 with ``decord`` (``vbench.utils.load_video``) and OpenCV
  (``cv2.VideoCapture``) as upstream does; both are real dependencies (decord 0.6.0 ships a
  ``py3-none-manylinux2010_x86_64`` wheel, so it installs on any CPython 3 on x86-64 Linux).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class DimensionUnavailable(RuntimeError):
    """A dimension that cannot run here (missing weights, a missing or broken dependency)."""


def install_pkg_resources_shim() -> None:
    """Register a minimal ``pkg_resources`` (just ``packaging``) if setuptools does not ship one."""
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        return
    import packaging.version

    shim = types.ModuleType("pkg_resources")
    shim.__doc__ = "m4v harness shim: only `packaging`, for openai-clip's version check"
    shim.packaging = packaging
    sys.modules["pkg_resources"] = shim


@contextmanager
def trusted_torch_load() -> Iterator[None]:
    """``torch.load`` defaults to ``weights_only=False`` inside (for trusted local cache files)."""
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def use_cache_dir(cache_dir: str | os.PathLike) -> None:
    """Point vbench (already imported or not) at ``cache_dir``."""
    os.environ["VBENCH_CACHE_DIR"] = str(cache_dir)
    for name, module in list(sys.modules.items()):
        if (name == "vbench" or name.startswith("vbench.")) and hasattr(module, "CACHE_DIR"):
            module.CACHE_DIR = str(cache_dir)


def compute_function(dimension: str, cache_dir: str | os.PathLike) -> Callable:
    """``vbench.<dimension>.compute_<dimension>``, with vbench pointed at ``cache_dir`` first
    (some modules read files of the cache at import: ViCLIP's tokenizer vocabulary, fetched with
    wget when absent); raises ``DimensionUnavailable`` naming what failed to import."""
    if importlib.util.find_spec("vbench") is None:
        raise DimensionUnavailable(
            f"{dimension}: the vbench package is not installed "
            "(pip install --no-deps vbench==0.1.5, plus its real imports: see the README)"
        )
    install_pkg_resources_shim()
    use_cache_dir(cache_dir)
    try:
        module = importlib.import_module(f"vbench.{dimension}")
    except Exception as e:  # noqa: BLE001 - any import failure makes the dimension unavailable
        raise DimensionUnavailable(
            f"{dimension}: vbench.{dimension} cannot be imported here: {type(e).__name__}: {e}"
        ) from e
    return getattr(module, f"compute_{dimension}")


def package_file(*parts: str) -> Path:
    """A file shipped inside the installed vbench package (found without importing it)."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        raise DimensionUnavailable("the vbench package is not installed "
                                   "(pip install --no-deps vbench==0.1.5)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)
