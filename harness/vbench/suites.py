"""The three kinds of input the VBench harness evaluates, as lists of ``VideoItem``.

* VBench's standard prompt suite: ``VBench_full_info.json`` shipped inside the vbench package
  (946 entries: 944 distinct prompts, each tagged with the dimensions it serves and, for the
  semantic dimensions, auxiliary information such as the expected object or colour), 5 samples
  per prompt named ``{prompt}-{i}.mp4``, i = 0..4.
* a custom prompt list (text file, one prompt a line; or a YAML/JSON list, or a mapping with a
  ``prompts`` list such as ``suites/shapes.yaml``): every video is evaluated on every requested
  dimension that needs no prompt information (VBench's ``custom_input`` mode).
* a folder of ``.mp4`` videos from any model (``custom_input`` as well): the prompt of
  ``{prompt}-{i}.mp4`` or ``{prompt}.mp4`` comes from the file name (VBench's rule) unless a
  JSON file maps file names to prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harness.vbench import upstream
from harness.vbench.runner import VideoItem, prompt_from_filename

STANDARD_SUITE = "vbench_standard"
STANDARD_SAMPLES = 5


@dataclass(frozen=True)
class PromptEntry:
    prompt: str
    dimensions: frozenset[str] | None = None  # None: every requested dimension
    auxiliary_info: dict = field(default_factory=dict)


def standard_prompts() -> list[PromptEntry]:
    """VBench's standard suite, one entry per distinct prompt (entries repeating a prompt for
    other dimensions are merged), in the file's order."""
    path = upstream.package_file("VBench_full_info.json")
    merged: dict[str, PromptEntry] = {}
    for raw in json.loads(path.read_text()):
        prompt = raw["prompt_en"]
        old = merged.get(prompt, PromptEntry(prompt, frozenset()))
        merged[prompt] = PromptEntry(
            prompt,
            old.dimensions | frozenset(raw["dimension"]),
            {**old.auxiliary_info, **raw.get("auxiliary_info", {})},
        )
    return list(merged.values())


def read_prompt_file(path: str | os.PathLike) -> list[PromptEntry]:
    """Prompts from a ``.txt`` (one a line; blank lines and ``#`` comments skipped) or a
    ``.yaml``/``.yml``/``.json`` file holding a list or a mapping with a ``prompts`` list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts: no such file {str(path)!r}")
    if path.suffix in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
        prompts = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts file {path}: expected a list of strings or a mapping "
                             "with a 'prompts' list of strings")
    else:
        lines = (line.strip() for line in path.read_text().splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path}: holds no prompt")
    bad = [p for p in prompts if "/" in p or "\0" in p]
    if bad:
        raise ValueError(f"prompts file {path}: prompts cannot be file names: {bad[:3]}")
    return [PromptEntry(p) for p in dict.fromkeys(prompts)]


def expected_items(entries: Sequence[PromptEntry], folder: str | os.PathLike, samples: int
                   ) -> tuple[list[VideoItem], list[str]]:
    """The videos ``{prompt}-{i}.mp4`` (i < ``samples``) of ``entries`` in ``folder``: the items
    present, and the file names missing (VBench warns that missing videos make results unfair)."""
    if samples < 1:
        raise ValueError(f"samples: got {samples}, expected >= 1")
    folder = Path(folder)
    items, missing = [], []
    for entry in entries:
        for i in range(samples):
            path = folder / f"{entry.prompt}-{i}.mp4"
            if path.is_file():
                items.append(VideoItem(path, entry.prompt, entry.dimensions,
                                       entry.auxiliary_info, sample_index=i))
            else:
                missing.append(path.name)
    return items, missing


def folder_items(folder: str | os.PathLike, prompt_file: str | os.PathLike | None = None
                 ) -> list[VideoItem]:
    """Every ``.mp4`` in ``folder`` (sorted), prompts from the file names or from
    ``prompt_file``, a JSON mapping of file name to prompt covering every video."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"videos: {str(folder)!r} is not a folder of videos")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".mp4" and p.is_file())
    if not paths:
        raise ValueError(f"videos: no .mp4 file in {folder}")
    mapping = None
    if prompt_file is not None:
        mapping = json.loads(Path(prompt_file).read_text())
        if not isinstance(mapping, dict):
            raise ValueError(f"prompt_file {prompt_file}: expected a JSON object "
                             "{file name: prompt}")
        absent = [p.name for p in paths if p.name not in mapping]
        if absent:
            raise ValueError(f"prompt_file {prompt_file}: no prompt for {absent[:5]}")
    items = []
    for path in paths:
        prompt, index = prompt_from_filename(path)
        items.append(VideoItem(path, mapping[path.name] if mapping else prompt,
                               sample_index=index))
    return items
