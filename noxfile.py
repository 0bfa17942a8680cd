"""Sessions: tests, lint, train, vbench, profile.

All sessions share ONE environment, ``.nox/m4v``: torch with torchvision is several GB, and a
separate copy per session would triple the install. The environment is (re)installed only when
``pyproject.toml`` or the pins below change (a stamp file records their hash).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
ENV = ROOT / ".nox" / "m4v"
PYTHON = ENV / "bin" / "python"
# torchvision (needed by open_clip, timm and vbench) is built against one torch release.
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# vbench 0.1.5 pins numpy<2, transformers==4.33.2 and timm<=1.0.12, and pyiqa (its MUSIQ for
# imaging_quality) pulls a long list it does not need for MUSIQ; both would break the rest of the
# environment, so they are installed without their pins and their real imports come from the
# `vbench` extra of pyproject.toml.
NO_DEPS = ["vbench==0.1.5", "pyiqa==0.1.16"]


def _stamp() -> str:
    text = (ROOT / "pyproject.toml").read_text() + repr((TORCH, NO_DEPS, sys.version_info[:2]))
    return hashlib.sha256(text.encode()).hexdigest()


def env(session: nox.Session) -> str:
    """Create or update the shared environment; return its python."""
    stamp = ENV / ".stamp"
    if not PYTHON.exists():
        session.run(sys.executable, "-m", "venv", str(ENV))
    if not stamp.exists() or stamp.read_text() != _stamp():
        pip = [str(PYTHON), "-m", "pip", "install", "--quiet"]
        session.run(*pip, "--upgrade", "pip")
        session.run(*pip, *TORCH)
        session.run(*pip, "-e", f"{ROOT}[all]")
        session.run(*pip, "--no-deps", *NO_DEPS)
        stamp.write_text(_stamp())
    return str(PYTHON)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU; GPU tests skip without CUDA). Extra args go to pytest."""
    py = env(session)
    session.run(py, "-m", "pytest", *(session.posargs or ["-q"]), success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    py = env(session)
    session.run(py, "-m", "ruff", "check", "m4v", "harness", "tests", "benchmarks", "noxfile.py")


@nox.session
def train(session: nox.Session) -> None:
    """Train the embedded default (tiny M4V on the Shapes world) into runs/default."""
    py = env(session)
    args = session.posargs or ["--preset", "tiny", "--run-dir", "runs/default"]
    session.run(py, "-m", "m4v.train", *args)


@nox.session
def vbench(session: nox.Session) -> None:
    """Evaluate the latest checkpoint of `nox -s train` (Shapes suite + VBench dimensions)."""
    py = env(session)
    session.run(py, "-m", "harness.vbench", *session.posargs)


@nox.session
def profile(session: nox.Session) -> None:
    """FLOPs of M4V vs the attention alternative (and a sweep); latency where a GPU is present."""
    py = env(session)
    session.run(py, "-m", "harness.profile", *(session.posargs or ["flops"]))
