"""The VBench harness: VBench's real dimension code on small random-weight checkpoints written in
the upstream formats (tests/vbench_fixtures.py), the weights check, inputs, resumption, error
handling and the CLI."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vbench_fixtures import write_all

from harness.store import AGGREGATE, Store
from harness.vbench import __main__ as cli
from harness.vbench import dimensions as dims
from harness.vbench import runner, scoring, suites, upstream, weights
from harness.vbench.dino import interpolate_position_embedding, load_dino
from m4v.video_io import read_video, write_video

SEVEN = ("temporal_flickering", "background_consistency", "subject_consistency",
         "motion_smoothness", "dynamic_degree", "imaging_quality", "aesthetic_quality")
STATIC, MOVING = "a static texture-0.mp4", "a moving texture-0.mp4"
FRAMES = {STATIC: 6, MOVING: 4}
FPS = 16  # dynamic degree reads every round(fps / 8)-th frame: half the RAFT pairs


@pytest.fixture(scope="module", autouse=True)
def _isolated():
    """One torch thread (VBench's networks run frame by frame: fastest on a shared CPU); the
    VBENCH_CACHE_DIR that the harness sets for vbench is restored afterwards."""
    threads, env = torch.get_num_threads(), os.environ.get(weights.ENV_VAR)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop(weights.ENV_VAR, None)
    else:
        os.environ[weights.ENV_VAR] = env


def _texture(seed: int, size: int = 64) -> np.ndarray:
    """A smooth random RGB texture (size, size, 3) uint8: blurred noise, so that optical flow
    and codecs see structure rather than pixel noise."""
    noise = torch.rand(1, 3, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))
    up = F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)
    return (up.clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_cache")
    write_all(root)
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    texture = _texture(0)
    write_video(folder / STATIC, np.repeat(texture[None], FRAMES[STATIC], 0), fps=FPS)
    moving = np.stack([np.roll(texture, 3 * t, axis=1) for t in range(FRAMES[MOVING])])
    write_video(folder / MOVING, moving, fps=FPS)
    return folder


def _aggregates(store, checkpoint, suite):
    rows = store.records("SELECT dimension, value, detail FROM scores WHERE checkpoint = ? AND "
                         "suite = ? AND video = ?", [checkpoint, suite, AGGREGATE])
    return {r["dimension"]: r for r in rows}


def _flicker_reference(path) -> float:
    frames = read_video(path).astype(np.float64)
    return (255.0 - np.abs(np.diff(frames, axis=0)).mean()) / 255.0


def _aesthetic_reference(cache, path) -> float:
    """LAION aesthetic score of a video computed here from the cached files: CLIP image
    embedding (VBench's 224 px bicubic resize + centre crop + CLIP normalisation), L2-normalised,
    linear head, / 10, mean over frames."""
    import clip
    from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

    model, _ = clip.load(str(cache / dims.CLIP_L14.path), device="cpu")
    head = torch.nn.Linear(768, 1)
    head.load_state_dict(torch.load(cache / dims.AESTHETIC_HEAD.path))
    x = torch.from_numpy(read_video(path)).permute(0, 3, 1, 2)
    x = CenterCrop(224)(Resize(224, InterpolationMode.BICUBIC, antialias=False)(x)).float() / 255
    x = Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))(x)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(x).float(), dim=-1)
        return float((head(feats).squeeze(-1) / 10).mean())


def test_seven_dimensions_end_to_end(cache, videos, tmp_path):
    store = Store(tmp_path / "r.duckdb")
    items = suites.folder_items(videos)
    results = runner.evaluate(items, SEVEN, store, "tiny", "custom", cache_dir=cache,
                              device="cpu")
    by = {r.dimension: r for r in results}
    for name in SEVEN:
        assert by[name].status == "scored", (name, by[name].message)
        assert by[name].errors == {}
        assert set(by[name].scored) == {STATIC, MOVING}
        assert all(np.isfinite(v) for v in by[name].scored.values())

    # identical frames: cosine similarity 1 whatever the weights, and no flicker
    for name in ("subject_consistency", "background_consistency"):
        assert by[name].scored[STATIC] == pytest.approx(1.0, abs=1e-5)
        assert by[name].scored[MOVING] < 1.0 - 1e-6
    flicker = by["temporal_flickering"].scored
    assert flicker[STATIC] == pytest.approx(1.0, abs=1e-9)
    assert flicker[MOVING] == pytest.approx(_flicker_reference(videos / MOVING), abs=2e-3)
    assert flicker[MOVING] < 0.99
    assert set(by["dynamic_degree"].scored.values()) <= {0.0, 1.0}
    assert all(0.0 <= v <= 1.0 for v in by["motion_smoothness"].scored.values())
    for key in (STATIC, MOVING):
        assert by["aesthetic_quality"].scored[key] == pytest.approx(
            _aesthetic_reference(cache, videos / key), rel=1e-3, abs=1e-5)

    # aggregates as VBench forms them: frame-pair-weighted for the two consistency dimensions
    stored = _aggregates(store, "tiny", "custom")
    for name in SEVEN:
        v = by[name].scored
        if name in ("subject_consistency", "background_consistency"):
            expected = (v[STATIC] * 5 + v[MOVING] * 3) / 8  # frames - 1 pairs each
        else:
            expected = (v[STATIC] + v[MOVING]) / 2
        assert stored[name]["value"] == pytest.approx(expected, abs=1e-12)
        assert by[name].aggregate == pytest.approx(expected, abs=1e-12)
        assert json.loads(stored[name]["detail"])["num_videos"] == 2

    # per-video imaging quality is stored / 100, on the scale of VBench's own aggregate
    imaging = {r["video"]: r["value"] for r in store.records(
        "SELECT video, value FROM scores WHERE dimension = 'imaging_quality' AND video <> ''")}
    assert imaging == pytest.approx(by["imaging_quality"].scored)

    # the videos were registered with what was decoded
    registered = store.table("videos", checkpoint="tiny")
    assert dict(zip(registered["video"], registered["num_frames"], strict=True)) == FRAMES

    summary = runner.summarize(store, "tiny", "custom")
    assert summary["partial"] and summary["missing"] == list(scoring.SEMANTIC_DIMENSIONS)
    assert summary["semantic"] is None and summary["total"] == summary["quality"]
    stored = _aggregates(store, "tiny", "custom")
    assert stored["vbench_quality"]["value"] == pytest.approx(summary["quality"])
    assert json.loads(stored["vbench_total"]["detail"])["partial"] is True
    assert "vbench_semantic" not in stored


def test_aggregate_equals_vbench_own_result(cache, videos, tmp_path):
    """Our stored aggregate reproduces what VBench's compute function itself returns."""
    store = Store(tmp_path / "r.duckdb")
    items = suites.folder_items(videos)
    name = "background_consistency"
    runner.evaluate(items, [name], store, "m", "custom", cache_dir=cache, device="cpu")
    info = tmp_path / "info.json"
    info.write_text(json.dumps([{"prompt_en": i.prompt, "dimension": [name],
                                 "video_list": [str(i.path)]} for i in items]))
    own, _ = upstream.compute_function(name, cache)(str(info), "cpu",
                                                    dims.submodule_args(name, cache))
    assert _aggregates(store, "m", "custom")[name]["value"] == pytest.approx(own, abs=1e-12)


def _copy_good(videos, folder):
    folder.mkdir()
    for name in (STATIC, MOVING):
        shutil.copy(videos / name, folder / name)


def test_bad_videos_are_skipped_and_reruns_skip_stored_work(cache, videos, tmp_path,
                                                            monkeypatch):
    folder = tmp_path / "v"
    _copy_good(videos, folder)
    (folder / "garbage-0.mp4").write_bytes(b"not a video at all" * 100)
    data = (videos / MOVING).read_bytes()
    (folder / "truncated-0.mp4").write_bytes(data[: len(data) // 2])
    write_video(folder / "single frame-0.mp4", _texture(1)[None], fps=8)
    bad = {"garbage-0.mp4", "truncated-0.mp4", "single frame-0.mp4"}
    names = ["temporal_flickering", "background_consistency"]
    store = Store(tmp_path / "r.duckdb")

    first = runner.evaluate(suites.folder_items(folder), names, store, "m", "custom",
                            cache_dir=cache, device="cpu")
    for r in first:
        assert r.status == "scored"
        assert set(r.scored) == {STATIC, MOVING}
        assert set(r.errors) == bad
        assert "unreadable video" in r.errors["garbage-0.mp4"]
        assert "1 frame(s)" in r.errors["single frame-0.mp4"]
        assert r.num_videos == 2 and "3 video(s) skipped" in r.message
    errors = store.records("SELECT video, error FROM scores WHERE error IS NOT NULL")
    assert {e["video"] for e in errors} == bad and len(errors) == 2 * len(bad)
    aggregates = {k: r["value"] for k, r in _aggregates(store, "m", "custom").items()}

    # a second run computes nothing: every readable video already has a score
    def never(*args, **kwargs):
        raise AssertionError("VBench was called for work already stored")

    monkeypatch.setattr(runner.upstream, "compute_function", lambda name, cache: never)
    second = runner.evaluate(suites.folder_items(folder), names, store, "m", "custom",
                             cache_dir=cache, device="cpu")
    assert all(r.scored == {} and set(r.errors) == bad for r in second)
    assert {k: r["value"] for k, r in _aggregates(store, "m", "custom").items()} == aggregates
    for name in bad:
        (folder / name).unlink()
    third = runner.evaluate(suites.folder_items(folder), names, store, "m", "custom",
                            cache_dir=cache, device="cpu")
    assert [r.status for r in third] == ["up to date", "up to date"]
    monkeypatch.undo()

    # a new video: only it is scored, the aggregate covers all three
    shutil.copy(videos / MOVING, folder / "another moving texture-0.mp4")
    fourth = runner.evaluate(suites.folder_items(folder), names, store, "m", "custom",
                             cache_dir=cache, device="cpu")
    assert all(set(r.scored) == {"another moving texture-0.mp4"} for r in fourth)
    assert all(r.num_videos == 3 for r in fourth)


def test_a_video_vbench_cannot_score_is_isolated(videos, tmp_path, monkeypatch):
    folder = tmp_path / "v"
    _copy_good(videos, folder)
    shutil.copy(videos / STATIC, folder / "a second static texture-0.mp4")
    real = upstream.compute_function("temporal_flickering", tmp_path)

    def picky(json_path, device, args, **kwargs):
        listed = [v for e in json.loads(open(json_path).read()) for v in e["video_list"]]
        if any("moving" in v for v in listed):
            raise RuntimeError("decoder crashed")
        return real(json_path, device, args)

    monkeypatch.setattr(runner.upstream, "compute_function", lambda name, cache: picky)
    (result,) = runner.evaluate(suites.folder_items(folder), ["temporal_flickering"],
                                Store(tmp_path / "r.duckdb"), "m", "custom", device="cpu")
    assert result.status == "scored"
    assert set(result.errors) == {MOVING} and "decoder crashed" in result.errors[MOVING]
    assert set(result.scored) == {STATIC, "a second static texture-0.mp4"}


def test_a_dimension_that_fails_everywhere_is_failed_not_the_videos(videos, tmp_path,
                                                                    monkeypatch):
    def broken(json_path, device, args, **kwargs):
        raise RuntimeError("checkpoint is corrupt")

    folder = tmp_path / "v"
    _copy_good(videos, folder)
    shutil.copy(videos / STATIC, folder / "a third-0.mp4")
    monkeypatch.setattr(runner.upstream, "compute_function", lambda name, cache: broken)
    store = Store(tmp_path / "r.duckdb")
    (result,) = runner.evaluate(suites.folder_items(folder), ["temporal_flickering"], store,
                                "m", "custom", device="cpu")
    assert result.status == "failed" and "checkpoint is corrupt" in result.message
    assert result.aggregate is None
    assert store.records("SELECT * FROM scores WHERE video = ''") == []


def test_missing_weights_are_reported_and_other_dimensions_still_run(videos, tmp_path):
    empty = tmp_path / "empty_cache"
    store = Store(tmp_path / "r.duckdb")
    results = runner.evaluate(suites.folder_items(videos),
                              ["background_consistency", "temporal_flickering", "dynamic_degree"],
                              store, "m", "custom", cache_dir=empty, device="cpu")
    by = {r.dimension: r for r in results}
    assert by["background_consistency"].status == "unavailable"
    message = by["background_consistency"].message
    assert str(empty / "clip_model" / "ViT-B-32.pt") in message
    assert dims.CLIP_B32.url in message
    assert "unzip" in by["dynamic_degree"].message  # RAFT ships in a zip upstream
    assert by["temporal_flickering"].status == "scored"
    assert set(_aggregates(store, "m", "custom")) == {"temporal_flickering"}


def test_videos_too_small_for_a_dimension_make_it_not_applicable(cache, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    write_video(folder / "small-0.mp4", np.repeat(_texture(2, 32)[None], 4, 0), fps=8)
    store = Store(tmp_path / "r.duckdb")
    results = runner.evaluate(suites.folder_items(folder),
                              ["motion_smoothness", "temporal_flickering"], store, "m", "custom",
                              cache_dir=cache, device="cpu")
    assert [r.status for r in results] == ["not applicable", "scored"]
    assert "32x32 frames; motion_smoothness needs both sides >= 64 px" in results[0].message


def test_prompt_information_dimensions_need_the_standard_suite(cache, videos, tmp_path):
    (result,) = runner.evaluate(suites.folder_items(videos), ["appearance_style"],
                                Store(tmp_path / "r.duckdb"), "m", "custom", cache_dir=cache)
    assert result.status == "unavailable" and "standard prompt suite" in result.message


def test_unknown_dimension_and_import_failures(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="dimension"):
        runner.evaluate([], ["colour"], Store(tmp_path / "r.duckdb"), "m", "s")

    def no_detectron(name):
        raise ModuleNotFoundError("No module named 'detectron2'")

    monkeypatch.setattr(upstream.importlib, "import_module", no_detectron)
    with pytest.raises(upstream.DimensionUnavailable, match="detectron2"):
        upstream.compute_function("color", tmp_path)


def test_weights_listing(cache, capsys, monkeypatch):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(cache))
    assert weights.cache_dir() == cache
    assert weights.main([]) == 0
    out = capsys.readouterr().out
    assert f"present  {cache / dims.CLIP_B32.path}" in out
    assert f"missing  {cache / dims.GRIT.path}" in out and dims.GRIT.url in out
    assert "temporal_flickering  [ready]" in out and "color  [MISSING WEIGHTS]" in out
    ready = ["subject_consistency", "background_consistency", "temporal_flickering",
             "motion_smoothness", "aesthetic_quality", "imaging_quality", "dynamic_degree",
             "appearance_style"]
    assert weights.available_dimensions(cache) == ready
    assert "8/16 dimensions have all their weights" in out


def test_dino_loader_matches_timm_and_interpolates_like_dino(cache):
    from timm.models.vision_transformer import VisionTransformer

    path = cache / dims.DINO_B16.path
    model = load_dino(path)
    state = torch.load(path)
    reference = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2,
                                  num_heads=1, num_classes=0, qkv_bias=True).eval()
    reference.load_state_dict(state)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
        # VBench keeps the aspect ratio (shorter side 224): 298 px -> 18 patches, remainder dropped
        assert model(torch.randn(1, 3, 224, 298)).shape == (1, 64)
    pos = state["pos_embed"]
    assert interpolate_position_embedding(pos, 14, 14, square_input=True) is pos
    wide = interpolate_position_embedding(pos, 14, 18, square_input=False)
    assert wide.shape == (1, 1 + 14 * 18, 64) and torch.equal(wide[:, 0], pos[:, 0])
    # DINO's offset: scale factors (g + 0.1) / 14 sample the grid slightly off a plain resize
    plain = F.interpolate(pos[:, 1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2), size=(14, 18),
                          mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 64)
    assert not torch.allclose(wide[:, 1:], plain)


@pytest.mark.parametrize("size", [(16, 16), (48, 48), (36, 64)])
def test_vbench_video_loading_goes_through_pyav(tmp_path, size):
    """vbench.utils.load_video (VBench's own frame selection) reads through PyAVVideoReader:
    frame sizes that decord 0.6.0 rejects work, and frames equal an independent decode (and
    decord's, where decord is installed and works)."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, *size, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    write_video(path, frames, fps=8)
    upstream.compute_function("temporal_flickering", tmp_path)  # installs the reader
    import vbench.utils

    assert vbench.utils.VideoReader is upstream.PyAVVideoReader
    decoded = read_video(path)
    video = vbench.utils.load_video(str(path))  # (t, c, h, w) float, VBench's layout
    assert torch.equal(video, torch.from_numpy(decoded).permute(0, 3, 1, 2).float())
    middle = vbench.utils.load_video(str(path), num_frames=2, return_tensor=False)
    # VBench's "middle" sampling of 2 of 5 frames: intervals [0, 1] and [2, 4] -> frames 0, 3
    assert np.array_equal(middle, decoded[[0, 3]])
    batch = upstream.PyAVVideoReader(path).get_batch([4, 0, 4])
    assert batch.permute(0, 3, 1, 2).shape == (3, 3, *size)  # decord's torch bridge
    try:
        import decord

        reference = decord.VideoReader(str(path), num_threads=1).get_batch([4, 0, 4]).asnumpy()
    except Exception:  # noqa: BLE001 - decord absent, or one of the sizes it cannot read
        reference = decoded[[4, 0, 4]]
    assert np.array_equal(batch.asnumpy(), reference)
    with pytest.raises(IndexError):
        upstream.PyAVVideoReader(path).get_batch([5])


def test_trusted_torch_load(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "w": torch.ones(2)}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path)
    with upstream.trusted_torch_load():
        assert torch.load(path)["args"].lr == 0.1
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path)


def test_pkg_resources_for_openai_clip():
    upstream.install_pkg_resources_shim()
    from pkg_resources import packaging

    assert packaging.version.parse("1.10") > packaging.version.parse("1.9")


def test_standard_suite_is_vbench_own():
    entries = suites.standard_prompts()
    assert len(entries) == 944  # 946 entries, two prompts listed twice for other dimensions
    assert sum(len(e.dimensions) for e in entries) == 1362  # dimension tags of the 946 entries
    bund = next(e for e in entries if e.prompt == "The bund Shanghai, oil painting")
    assert bund.dimensions == {"appearance_style", "overall_consistency", "aesthetic_quality",
                               "imaging_quality"}
    assert bund.auxiliary_info["appearance_style"] == {"appearance_style": "oil painting"}
    counts = {d: sum(d in e.dimensions for e in entries) for d in scoring.ALL_DIMENSIONS}
    assert counts["temporal_flickering"] == 75 and counts["human_action"] == 100


def test_expected_items_and_prompt_files(tmp_path):
    entries = [suites.PromptEntry("a cat"), suites.PromptEntry("a dog")]
    write_video(tmp_path / "a cat-0.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    write_video(tmp_path / "a cat-2.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    items, missing = suites.expected_items(entries, tmp_path, 3)
    assert [(i.key, i.sample_index) for i in items] == [("a cat-0.mp4", 0), ("a cat-2.mp4", 2)]
    assert missing == ["a cat-1.mp4", "a dog-0.mp4", "a dog-1.mp4", "a dog-2.mp4"]
    text = tmp_path / "p.txt"
    text.write_text("# comment\na cat\n\na dog\na cat\n")
    assert [e.prompt for e in suites.read_prompt_file(text)] == ["a cat", "a dog"]
    yml = tmp_path / "p.yaml"
    yml.write_text("name: x\nprompts:\n  - one\n  - two\n")
    assert [e.prompt for e in suites.read_prompt_file(yml)] == ["one", "two"]
    yml.write_text("prompts: 3\n")
    with pytest.raises(ValueError, match="list of strings"):
        suites.read_prompt_file(yml)
    text.write_text("a/b\n")
    with pytest.raises(ValueError, match="file names"):
        suites.read_prompt_file(text)


def test_folder_items_and_prompt_mapping(videos, tmp_path):
    assert runner.prompt_from_filename("a cat-12.mp4") == ("a cat", 12)
    assert runner.prompt_from_filename("a cat.mp4") == ("a cat", None)
    items = suites.folder_items(videos)
    assert [(i.key, i.prompt) for i in items] == [(MOVING, "a moving texture"),
                                                   (STATIC, "a static texture")]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({MOVING: "texture sliding right", STATIC: "still texture"}))
    assert [i.prompt for i in suites.folder_items(videos, mapping)] == [
        "texture sliding right", "still texture"]
    mapping.write_text(json.dumps({MOVING: "x"}))
    with pytest.raises(ValueError, match="no prompt for"):
        suites.folder_items(videos, mapping)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    assert cli.main(["--checkpoint", str(tmp_path / "nothing"), "--store", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint:") and "does not exist" in err
    (tmp_path / "empty-run").mkdir()
    assert cli.main(["--checkpoint", str(tmp_path / "empty-run"), "--store", str(db)]) == 1
    assert capsys.readouterr().err.startswith("error: checkpoint: no complete checkpoint")


def test_cli_on_a_folder_of_videos(cache, videos, tmp_path, capsys):
    db = tmp_path / "r.duckdb"
    argv = ["--videos", str(videos), "--name", "some-model", "--cache-dir", str(cache),
            "--store", str(db), "--device", "cpu",
            "--dimensions", "temporal_flickering", "background_consistency"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = _aggregates(Store(db), "some-model", "custom")
    total = summary["vbench_total"]["value"]
    assert "| Model" in out and "Total" in out and "background consistency" in out
    assert f"{100 * total:.2f}*" in out and "partial" in out
    assert str(db) in out
    assert cli.main(argv) == 0  # the re-run finds everything stored
    assert "up to date" in capsys.readouterr().out


def test_cli_standard_suite_folder(cache, videos, tmp_path, capsys):
    """Videos named after standard-suite prompts are evaluated on the dimensions their prompts
    serve, with VBench's per-prompt information (appearance style: the expected style)."""
    folder = tmp_path / "standard"
    folder.mkdir()
    shutil.copy(videos / STATIC, folder / "The bund Shanghai, oil painting-0.mp4")
    shutil.copy(videos / MOVING, folder / "In a still frame, a stop sign-0.mp4")
    db = tmp_path / "r.duckdb"
    argv = ["--videos", str(folder), "--suite", "standard", "--cache-dir", str(cache),
            "--store", str(db), "--device", "cpu", "--dimensions", "temporal_flickering",
            "appearance_style", "background_consistency"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "4718 expected video(s) missing" in out  # 944 prompts x 5 samples - 2
    scores = Store(db).scores(suite=suites.STANDARD_SUITE, aggregate=False)
    assert sorted(zip(scores["dimension"], scores["video"], strict=True)) == [
        ("appearance_style", "The bund Shanghai, oil painting-0.mp4"),
        ("temporal_flickering", "In a still frame, a stop sign-0.mp4"),
    ]
    assert "background_consistency  no videos" in out


def test_cli_default_flow_from_a_training_run(tmp_path, capsys):
    """`nox -s vbench` without arguments: latest checkpoint under runs/ -> Shapes suite videos
    (m4v.generate) -> Shapes metrics + VBench dimensions -> store -> table; a re-run reuses
    the videos and the stored scores."""
    from test_train import MINI

    from m4v.train.__main__ import main as train_main

    runs = tmp_path / "runs"
    overrides = [f"{k}={json.dumps(v)}" for k, v in MINI.items()]
    train_main(["--run-dir", str(runs / "mini"), "--steps", "2", "--no-samples",
                "--set", *overrides])
    db, out_dir = tmp_path / "r.duckdb", tmp_path / "videos"
    argv = ["--runs-dir", str(runs), "--samples", "1", "--store", str(db), "--out",
            str(out_dir), "--device", "cpu", "--dimensions", "temporal_flickering"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert len(list(out_dir.glob("*.mp4"))) == 32  # suites/shapes.yaml: 32 prompts
    store = Store(db)
    label = "mini/step_00000002"
    assert store.table("checkpoints")[["checkpoint", "step"]].values.tolist() == [[label, 2]]
    stored = _aggregates(store, label, "shapes")
    assert {"temporal_flickering", "shapes_all", "shapes_colour", "vbench_total"} <= set(stored)
    assert json.loads(stored["shapes_all"]["detail"])["num_videos"] == 32
    assert label in out and "shapes colour" in out
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "0 written, 32 already there" in out and "up to date" in out
