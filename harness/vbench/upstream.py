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
* ``decord``: ``vbench.utils`` reads mp4 with ``decord.VideoReader`` (``load_video``,
  ``read_frames_decord_by_fps``). decord 0.6.0, the last release, fails on frame sizes whose RGB
  rows need padding (16x16, 48x48, 32x48: "DECORDArrayCopyFromTo: The size must exactly
  match"; the Shapes world and small test videos hit it) and has wheels for x86-64 only. The
  harness replaces that one class with ``PyAVVideoReader``, which decodes with PyAV (FFmpeg,
  like decord) and gives the same frames bit for bit where decord works (checked on 36x64 and
  64x64 H.264); VBench's own frame selection and transforms are unchanged. decord is then not
  needed at all: when it is not installed, a stand-in module lets ``vbench.utils`` import.
  The OpenCV readers of temporal flickering, motion smoothness and dynamic degree are kept.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import torch

from m4v.video_io import VideoDecodeError, probe_video


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
    use_cache_dir(cache_dir)
    try:
        prepare_vbench()
        module = importlib.import_module(f"vbench.{dimension}")
    except Exception as e:  # noqa: BLE001 - any import failure makes the dimension unavailable
        raise DimensionUnavailable(
            f"{dimension}: vbench.{dimension} cannot be imported here: {type(e).__name__}: {e}"
        ) from e
    return getattr(module, f"compute_{dimension}")


def prepare_vbench() -> None:
    """Import ``vbench.utils`` with the shims above and its video reader replaced (idempotent)."""
    install_pkg_resources_shim()
    install_decord_stand_in()
    utils = importlib.import_module("vbench.utils")
    utils.VideoReader = PyAVVideoReader


class FrameBatch(torch.Tensor):
    """A decord batch as vbench uses both of decord's bridges: a ``uint8`` torch tensor
    ``(t, h, w, 3)`` (the "torch" bridge) that also answers ``asnumpy()`` (the "native" one)."""

    def asnumpy(self) -> np.ndarray:
        return self.numpy()


class PyAVVideoReader:
    """The part of ``decord.VideoReader`` that vbench uses, decoding with PyAV.

    ``width``/``height`` (vbench's scene dimension asks for 384x384) resize each frame with
    FFmpeg's bicubic scaler at conversion to RGB.
    """

    def __init__(self, uri: str | os.PathLike, ctx=None, width: int = -1, height: int = -1,
                 num_threads: int = 0, **_):
        self.path = os.fspath(uri)
        info = probe_video(self.path)  # raises FileNotFoundError / VideoDecodeError
        self._len, self._fps = info.num_frames, info.fps
        self._size = ({"width": width, "height": height, "interpolation": "BICUBIC"}
                      if width and width > 0 and height and height > 0 else {})

    def __len__(self) -> int:
        return self._len

    def get_avg_fps(self) -> float:
        return self._fps

    def get_batch(self, indices: Sequence[int]) -> FrameBatch:
        """Frames ``indices`` (any order, repeats allowed) as ``(len(indices), h, w, 3)``."""
        wanted = [int(i) for i in indices]
        if not wanted or min(wanted) < 0 or max(wanted) >= self._len:
            raise IndexError(f"frame indices {wanted[:5]}...: expected 0 <= i < {self._len}")
        needed, frames = set(wanted), {}
        try:
            with av.open(self.path) as container:
                for index, frame in enumerate(container.decode(video=0)):
                    if index in needed:
                        frames[index] = frame.to_ndarray(format="rgb24", **self._size)
                    if index >= max(wanted):
                        break
        except av.FFmpegError as e:
            raise VideoDecodeError(f"cannot decode {self.path}: {e}") from e
        missing = needed - set(frames)
        if missing:
            raise VideoDecodeError(f"{self.path}: frames {sorted(missing)[:5]} not decoded")
        stacked = np.stack([frames[i] for i in wanted])
        return torch.from_numpy(stacked).as_subclass(FrameBatch)


def install_decord_stand_in() -> None:
    """Register a ``decord`` module for ``vbench.utils`` to import when decord is not installed
    (its reader is replaced by ``PyAVVideoReader`` right after the import)."""
    if "decord" in sys.modules or importlib.util.find_spec("decord") is not None:
        return
    stand_in = types.ModuleType("decord")
    stand_in.__doc__ = "m4v harness stand-in: vbench's video reads go through PyAV"
    stand_in.VideoReader = PyAVVideoReader
    stand_in.cpu = lambda device_id=0: None
    stand_in.bridge = types.SimpleNamespace(set_bridge=lambda name: None)
    sys.modules["decord"] = stand_in


def package_file(*parts: str) -> Path:
    """A file shipped inside the installed vbench package (found without importing it)."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        raise DimensionUnavailable("the vbench package is not installed "
                                   "(pip install --no-deps vbench==0.1.5)")
    return Path(next(iter(spec.submodule_search_locations)), *parts)
