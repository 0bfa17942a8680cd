"""Checks for weight folders on local disk: nothing is ever downloaded, so a missing or incomplete
folder must say exactly what to put where."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def require_folder(path: str | os.PathLike, what: str, needs: dict[str, tuple[str, ...]]) -> Path:
    """Return ``path`` as a Path if, for every role in ``needs``, one of its file names exists
    there; else FileNotFoundError naming the folder and all expected files.

    needs: role -> acceptable file names, e.g. {"config": ("config.json",)}.
    """
    folder = Path(path)
    if folder.is_dir():
        missing = {
            role: names
            for role, names in needs.items()
            if not any((folder / n).is_file() for n in names)
        }
    else:
        missing = needs
    if missing:
        state = "does not exist" if not folder.is_dir() else "is incomplete"
        lines = "; ".join(f"{role}: {' or '.join(names)}" for role, names in missing.items())
        raise FileNotFoundError(
            f"{what} folder {str(folder)!r} {state}. Expected there ({lines}). Weights are never "
            "downloaded: copy a Hugging Face transformers folder (as written by save_pretrained, "
            "e.g. a pipeline's text_encoder/ and tokenizer/ folders) to this path."
        )
    return folder


def folder_fingerprint(*folders: Path) -> str:
    """Short hash of the folders' config/tokenizer file contents and weight file names and sizes:
    changes when the weights change, cheap even for 10 GB folders."""
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            h.update(f.name.encode())
            if f.suffix in (".json", ".txt", ".model"):
                h.update(f.read_bytes())
            else:
                h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]
