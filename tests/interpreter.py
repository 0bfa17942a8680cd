"""Running test code under Triton's CPU interpreter, shared by the kernel tests.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so the code runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(code: str) -> None:
    """Run ``code`` (``{tests}`` in it: this folder, to import the test modules from) with
    ``TRITON_INTERPRET=1`` in a new Python process; fail with the end of its stderr."""
    code = code.format(tests=str(Path(__file__).parent))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
