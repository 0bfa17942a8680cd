"""Generation from a checkpoint: naming, seeding, skipping finished videos, sharding, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m4v.generate import (
    TextToVideo,
    generate,
    main,
    read_prompts,
    sample_seed,
    video_filename,
)
from m4v.train import CheckpointError, train
from m4v.video_io import read_video, write_video

sys.path.insert(0, str(Path(__file__).parent))
from test_train import checkpoint_tensors, mini  # noqa: E402

PROMPTS = ["a red circle moves up on a blue background",
           "a green square moves to the left on a black background"]
FAST = {"steps": (1, 1, 1), "first_frame_steps": (1, 1, 1), "device": "cpu"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("run")
    train(mini(steps=2), folder, progress=False)
    return folder


def test_video_filename_sanitises_only_what_the_filesystem_forbids():
    assert video_filename("a cat, 'jumping' (slowly)!", 3) == "a cat, 'jumping' (slowly)!-3.mp4"
    assert video_filename("left/right\0x", 0) == "left_right_x-0.mp4"
    long = "é" * 300  # 2 bytes each
    name = video_filename(long, 12)
    assert len(name.encode()) <= 255 and name.endswith("-12.mp4")
    assert name[:-7] == "é" * ((255 - len("-12.mp4")) // 2)  # cut at a character boundary
    with pytest.raises(ValueError, match="prompt"):
        video_filename("", 0)


def test_sample_seed_depends_on_prompt_index_and_seed():
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in PROMPTS for i in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, PROMPTS[0], 1) == sample_seed(0, PROMPTS[0], 1)


def test_pipeline_loads_the_requested_weights(run_dir):
    stored = checkpoint_tensors(run_dir / "checkpoints/step_00000002")
    for which in ("ema", "model"):
        pipe = TextToVideo(run_dir, weights=which, **FAST)
        for name, value in pipe.wrapper.named_parameters():
            assert torch.equal(value, stored[f"{which}.{name}"]), (which, name)
    assert not torch.equal(stored["ema.model.x_embedder.weight"],
                           stored["model.model.x_embedder.weight"])


def test_generate_writes_skips_finished_videos_and_reproduces(run_dir, tmp_path):
    out = tmp_path / "videos"
    paths = generate(run_dir, PROMPTS, 2, out, progress=False, **FAST)
    assert [p.name for p in paths] == [f"{p}-{i}.mp4" for p in PROMPTS for i in range(2)]
    first = {p.name: read_video(p) for p in paths}
    assert all(v.shape == (3, 16, 16, 3) for v in first.values())  # 3 frames of 16x16
    assert not np.array_equal(first[paths[0].name], first[paths[1].name])  # seeds differ

    kept, broken = paths[0], paths[3]
    write_video(kept, np.zeros((3, 16, 16, 3), np.uint8))  # a finished video: must be kept
    kept_bytes = kept.read_bytes()
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated one: must be redone
    again = generate(run_dir, PROMPTS, 2, out, progress=False, **FAST)
    assert again == paths
    assert kept.read_bytes() == kept_bytes
    assert np.array_equal(read_video(broken), first[broken.name])  # same seed, same video


def test_ranks_split_the_work_and_match_one_process(run_dir, tmp_path):
    single = generate(run_dir, PROMPTS, 2, tmp_path / "one", progress=False, **FAST)
    shards = [generate(run_dir, PROMPTS, 2, tmp_path / "split", rank=r, world_size=2,
                       progress=False, **FAST) for r in range(2)]
    names = [p.name for shard in shards for p in shard]
    assert sorted(names) == sorted(p.name for p in single) and len(set(names)) == 4
    for path in single:
        assert np.array_equal(read_video(path), read_video(tmp_path / "split" / path.name))
    with pytest.raises(ValueError, match="rank/world_size"):
        generate(run_dir, PROMPTS, 1, tmp_path, rank=2, world_size=2)


def test_cli_with_a_prompt_file(run_dir, tmp_path, capsys):
    txt = tmp_path / "prompts.txt"
    txt.write_text(PROMPTS[0] + "\n\n" + PROMPTS[1] + "\n")
    vbench = tmp_path / "info.json"
    vbench.write_text(json.dumps([{"prompt_en": PROMPTS[0], "dimension": ["color"]}]))
    assert read_prompts(txt) == PROMPTS and read_prompts(vbench) == PROMPTS[:1]
    paths = main(["--checkpoint", str(run_dir / "checkpoints/step_00000002"), "--prompts",
                  str(txt), "--out", str(tmp_path / "v"), "--steps", "1,1,1",
                  "--first-frame-steps", "1,1,1", "--num-frames", "2", "--device", "cpu"])
    assert [p.name for p in paths] == [f"{p}-0.mp4" for p in PROMPTS]
    assert read_video(paths[0]).shape[0] == 2
    assert "2 written, 0 already there" in capsys.readouterr().out


def test_bad_input(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        generate(tmp_path / "nothing", PROMPTS, 1, tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        generate(tmp_path, PROMPTS, 1, tmp_path / "out")
    with pytest.raises(ValueError, match="prompts: got a string"):
        generate(run_dir, PROMPTS[0], 1, tmp_path)
    with pytest.raises(ValueError, match="num_samples: got 0"):
        generate(run_dir, PROMPTS, 0, tmp_path)
    with pytest.raises(ValueError, match="--prompts"):
        read_prompts(tmp_path / "missing.txt")
