"""Training loop: config/overrides, data order, loss, exact resume, crash-safe checkpoints, errors.

Everything runs the real M4V + pyramidal flow objective at a miniature size (width 32, one block
per stage, 3 frames of 16x16 Shapes clips), a few steps each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from m4v.train import CheckpointError, TrainConfig, apply_overrides, parse_override, train
from m4v.train import checkpoint as ckpt_module
from m4v.train.__main__ import main as train_main
from m4v.train.batches import StepBatchSampler, epoch_permutation
from m4v.train.checkpoint import CheckpointManager, load_weights
from m4v.train.components import build_task
from m4v.train.config import config_diff
from m4v.train.metrics import read_metrics
from m4v.train.trainer import lr_factor, resolve_run_config

MINI = {
    "model.hidden_size": 32, "model.num_heads": 2, "model.text_dim": 16, "model.pooled_dim": 16,
    "model.max_text_len": 8, "model.mlp_ratio": 1.0, "model.temporal_dim": 2, "model.d_state": 4,
    "text.builtin_layers": 1, "text.builtin_heads": 2, "flow.image_fraction": 0.5,
    "data.num_workers": 0, "num_frames": 3, "resolution": [16, 16], "batch_size": 4,
    "warmup_steps": 2, "lr": 3e-3, "device": "cpu",
    "log_every": 1, "save_every": 2, "sample_at_end": False, "sample.num_prompts": 2,
    "sample.first_frame_steps": [1, 1, 1], "sample.steps": [1, 1, 1],
}


def mini(**changes) -> TrainConfig:
    return apply_overrides(TrainConfig.preset_config("tiny"), {**MINI, **changes})


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, read independently of the trainer (format_utils)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path / "state"), str(out))
    flat = flatten(torch.load(out, weights_only=False))
    out.unlink()
    return flat


def flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dicts of tensors -> {"a.b.c": tensor} (DTensors as their full value)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, torch.Tensor):
        return {prefix: tree.full_tensor() if hasattr(tree, "full_tensor") else tree}
    return {}


# ------------------------------------------------------------------------ configuration


def test_overrides_parse_types_and_errors():
    cfg = mini()
    changed = apply_overrides(cfg, dict(map(parse_override, [
        "lr=1e-3", "model.hidden_size=64", "sample.steps=[2,2,2]", "activation_checkpointing=null",
    ])))
    assert changed.lr == 1e-3 and changed.model.hidden_size == 64
    assert changed.sample.steps == (2, 2, 2) and changed.activation_checkpointing is None
    assert set(config_diff(cfg, changed)) == {"lr", "model.hidden_size", "sample.steps"}
    with pytest.raises(ValueError, match="lr: got 'abc', expected a number"):
        apply_overrides(cfg, dict([parse_override("lr=abc")]))
    with pytest.raises(ValueError, match="model has no field 'widht'"):
        apply_overrides(cfg, {"model.widht": 3})
    with pytest.raises(ValueError, match="parallel: got 'mpi', expected one of"):
        apply_overrides(cfg, {"parallel": "mpi"})
    with pytest.raises(ValueError, match=r"sample.steps: got \(2, 2\), expected 3 values"):
        apply_overrides(cfg, {"sample.steps": [2, 2]})
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_override("lr")
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_lr_schedule_warmup_then_cosine():
    cfg = mini(lr_schedule="cosine", warmup_steps=4, steps=14, min_lr_ratio=0.1)
    f = lr_factor(cfg)
    assert [f(k) for k in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert lr_factor(mini(warmup_steps=0))(50) == 1.0


def test_step_batches_split_the_global_batch_and_cover_each_epoch():
    n, batch = 10, 4
    single = StepBatchSampler(n, batch, 0, 1, seed=3)
    pair = [StepBatchSampler(n, batch, r, 2, seed=3) for r in range(2)]
    for step in range(7):
        assert pair[0].indices(step) + pair[1].indices(step) == single.indices(step)
    stream = [i for s in range(5) for i in single.indices(s)]  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] == list(epoch_permutation(n, 3, 0))
    resumed = StepBatchSampler(n, batch, 0, 1, seed=3, start_step=3)
    assert next(iter(resumed)) == single.indices(3)
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        StepBatchSampler(n, batch, 0, 3, seed=0)


# ------------------------------------------------------------------------ learning


def test_loss_falls_on_a_fixed_batch():
    cfg = mini()
    torch.manual_seed(0)
    task = build_task(cfg)
    batch = task.dataset[0], task.dataset[1]
    inputs = task.prepare({"video": torch.stack([b["video"] for b in batch]),
                           "caption": [b["caption"] for b in batch]}, torch.device("cpu"))
    opt = torch.optim.AdamW(task.module.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(7)  # the same noise, timesteps and stages every step
        loss, _ = task.module(**inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


def test_image_fraction_trains_the_first_frame_alone():
    seen = []
    for fraction in (1.0, 0.0):
        torch.manual_seed(0)
        task = build_task(mini(**{"flow.image_fraction": fraction}))
        def record(module, args, fraction=fraction):
            seen.append((fraction, tuple(args[1])))  # args: frames, frame_ids, sigma, ...

        task.module.model.register_forward_pre_hook(record)
        batch = [task.dataset[i] for i in range(4)]
        inputs = task.prepare({"video": torch.stack([b["video"] for b in batch]),
                               "caption": [b["caption"] for b in batch]}, torch.device("cpu"))
        for seed in range(6):
            torch.manual_seed(seed)
            task.module(**inputs)
    assert {ids for f, ids in seen if f == 1.0} == {(0,)}  # no history: images
    assert max(len(ids) for f, ids in seen if f == 0.0) > 1  # videos: frames with history


def test_ema_follows_the_warmed_up_decay():
    from m4v.train.ema import EMA, ema_decay_at

    layer = torch.nn.Linear(2, 1)
    ema = EMA(layer, decay=0.9)
    expected = layer.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            layer.weight.add_(1.0)
        ema.update(n)
        d = min(0.9, (1 + n) / (10 + n))
        assert ema_decay_at(0.9, n) == pytest.approx(d)
        expected = d * expected + (1 - d) * layer.weight.detach()
        assert torch.allclose(ema.state_dict()["weight"], expected, atol=1e-6)


def test_metrics_sinks_receive_what_the_jsonl_holds(tmp_path):
    from m4v.train.metrics import load_sink

    received = []
    train(mini(steps=2), tmp_path, sinks=[received.append], progress=False)
    assert received == read_metrics(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in received] == ["start", "train", "train", "checkpoint"]
    assert load_sink("json:dumps") is json.dumps
    with pytest.raises(ValueError, match="expected 'package.module:callable'"):
        load_sink("json.dumps")
    with pytest.raises(ValueError, match="cannot load"):
        load_sink("json:nothing_here")


# ------------------------------------------------------------------------ resume


def test_exact_resume_equals_straight_run(tmp_path, capsys):
    cfg4, cfg8 = mini(steps=4), mini(steps=8)
    first = train(cfg4, tmp_path / "resumed", progress=False)
    assert first.step == 4 and first.resumed_from is None
    second = train(cfg8, tmp_path / "resumed", progress=False)
    assert second.resumed_from == 4 and second.step == 8
    assert "resumed from step 4" in capsys.readouterr().out
    straight = train(cfg8, tmp_path / "straight", progress=False)

    a = checkpoint_tensors(second.checkpoint)
    b = checkpoint_tensors(straight.checkpoint)
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("optimizer.") for k in a)
    assert any(k.startswith("model.text_encoder.") for k in a)  # the trained text encoder
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics of the resumed run hold each step once, like the straight run
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed/metrics.jsonl")
             if r["event"] == "train"]
    assert steps == list(range(1, 9))
    # a re-run at the same --steps trains nothing and changes nothing
    before = tree_hash(tmp_path / "resumed/checkpoints")
    again = train(cfg8, tmp_path / "resumed", progress=False)
    assert again.step == 8 and tree_hash(tmp_path / "resumed/checkpoints") == before
    assert "nothing to train" in capsys.readouterr().out


def test_keeps_the_last_k_checkpoints(tmp_path):
    result = train(mini(steps=8, keep_last=2), tmp_path, progress=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000006", "step_00000008"]
    assert (tmp_path / "checkpoints/latest").read_text().strip() == result.checkpoint.name


@pytest.mark.parametrize("crash_point", ["writing state", "before the pointer"])
def test_crash_during_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch,
                                                                 crash_point, capsys):
    train(mini(steps=2), tmp_path, progress=False)
    good = tree_hash(tmp_path / "checkpoints/step_00000002")

    class Crash(RuntimeError):
        pass

    if crash_point == "writing state":
        real_save = ckpt_module.dcp.save

        def save_then_crash(state, **kw):
            real_save(state, **kw)  # some shards are on disk ...
            raise Crash  # ... and the process dies before the checkpoint is committed

        monkeypatch.setattr(ckpt_module.dcp, "save", save_then_crash)
    else:
        real_write = ckpt_module._write_text_durable

        def crash_on_pointer(path, text):
            if path.name == "latest":
                raise Crash
            real_write(path, text)

        monkeypatch.setattr(ckpt_module, "_write_text_durable", crash_on_pointer)
    with pytest.raises(Crash):
        train(mini(steps=4), tmp_path, progress=False)
    monkeypatch.undo()

    latest = CheckpointManager(tmp_path).latest()
    assert latest.name == "step_00000002"
    assert tree_hash(latest) == good
    cfg = mini(steps=4)
    load_weights(latest, build_task(cfg).module)  # loadable
    result = train(cfg, tmp_path, progress=False)
    assert "resumed from step 2" in capsys.readouterr().out
    assert result.step == 4 and result.checkpoint.name == "step_00000004"
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_resume_with_another_config_is_refused_and_loses_nothing(tmp_path):
    train(mini(steps=2), tmp_path, progress=False)
    before = tree_hash(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_run_config(tmp_path, None, {**MINI, "model.hidden_size": 64})
    message = str(err.value)
    assert "model.hidden_size: checkpoint 32, requested 64" in message
    assert "new --run-dir" in message and "config.json" in message
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.003, requested 0.01"):
        train(mini(steps=4, lr=1e-2), tmp_path, progress=False)
    assert tree_hash(tmp_path) == before
    # fields that do not change the state may differ (more steps, logging, samples)
    cfg, latest = resolve_run_config(tmp_path, None, {"steps": 6, "log_every": 3})
    assert cfg.steps == 6 and latest.name == "step_00000002"


# ------------------------------------------------------------------------ CLI and bad input


def cli_args(run_dir: Path, *extra: str) -> list[str]:
    sets = [f"{k}={json.dumps(v)}" for k, v in MINI.items()]
    return ["--run-dir", str(run_dir), "--set", *sets, *extra]


def test_cli_trains_logs_and_resumes(tmp_path, capsys):
    train_main(cli_args(tmp_path, "--steps", "2"))
    out = capsys.readouterr().out
    assert "training from scratch" in out and "checkpoint:" in out
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "loss_stage0"} <= set(train_records[0])
    assert json.loads((tmp_path / "config.json").read_text())["model"]["hidden_size"] == 32
    # no --preset: the run's own config is the base, so only --steps is needed to continue
    train_main(["--run-dir", str(tmp_path), "--steps", "3"])
    assert "resumed from step 2" in capsys.readouterr().out


def test_cli_bad_input_gives_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as err:
        train_main(cli_args(tmp_path / "run", "--steps", "1", "--set", "data.kind=folder",
                            f"data.path={missing}"))
    assert "data.path" in str(err.value) and "is not a folder" in str(err.value)
    with pytest.raises(SystemExit) as err:
        train_main(["--run-dir", str(tmp_path / "run"), "--set", "lr=fast"])
    assert str(err.value) == "error: lr: got 'fast', expected a number"


def test_captions_that_do_not_match_the_videos(tmp_path):
    from m4v.video_io import write_video

    folder = tmp_path / "data"
    folder.mkdir()
    write_video(folder / "a.mp4", np.zeros((4, 16, 16, 3), np.uint8))
    (folder / "captions.jsonl").write_text(
        json.dumps({"video": "a.mp4", "caption": "a red circle"}) + "\n"
        + json.dumps({"video": "b.mp4", "caption": "a blue square"}) + "\n")
    with pytest.raises(SystemExit) as err:
        train_main(cli_args(tmp_path / "run", "--steps", "1", "--set", "data.kind=folder",
                            f"data.path={folder}"))
    assert "b.mp4" in str(err.value) and "do not exist" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vae_stage_trains_and_exports_a_codec(tmp_path):
    with pytest.raises(SystemExit, match=r"num_frames: got 8, expected 1 \+ 8k for stage vae"):
        train_main(["--run-dir", str(tmp_path), "--stage", "vae"])
    from m4v.vae import load_codec

    cfg = apply_overrides(TrainConfig.preset_config("tiny"), {
        "stage": "vae", "num_frames": 9, "resolution": [16, 16], "batch_size": 2, "steps": 2,
        "log_every": 1, "vae.widths": [4, 8, 8, 8], "device": "cpu", "data.num_workers": 0,
    })
    result = train(cfg, tmp_path, progress=False)
    assert result.step == 2 and result.samples == [tmp_path / "vae"]
    assert [r["event"] for r in read_metrics(tmp_path / "metrics.jsonl")].count("train") == 2
    codec = load_codec(f"causal3d:{tmp_path / 'vae'}")
    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    assert codec.encode(video).shape == (1, 16, 2, 2, 2)
