"""The typed configuration of a training run, its presets, JSON form and command-line overrides.

One :class:`TrainConfig` describes a run completely: the model (:class:`m4v.config.M4VConfig`), the
latent codec, the text encoder, the data, the flow-matching loss, the optimisation and the
end-of-run samples. It is stored in every checkpoint, so generation rebuilds everything from a
checkpoint folder alone, and resuming compares it field by field with what was asked for.

Overrides use dotted paths: ``lr=1e-3`` (a field of TrainConfig), ``model.hidden_size=96``,
``data.kind=folder``, ``sample.steps=[2,2,2]``. Values are parsed as YAML scalars/lists and then
checked against the field's declared type, so ``lr=abc`` fails with the field name and the type.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from m4v.config import M4VConfig
from m4v.vae.causal3d import CausalVAE3DConfig

Stage = Literal["t2v", "vae"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class DataConfig:
    """Where the training clips come from.

    ``kind``: ``shapes`` (the procedural Shapes world, :mod:`m4v.data.shapes`), ``folder`` (videos
    with captions in a folder) or ``webdataset`` (tar shards; ``path`` is a shard pattern).
    Clip length and size are :attr:`TrainConfig.num_frames` / :attr:`TrainConfig.resolution`.
    """

    kind: Literal["shapes", "folder", "webdataset"] = "shapes"
    path: str | None = None  # folder: the video folder; webdataset: shard folder/pattern
    index: str | None = None  # folder: captions file (default: captions.jsonl or .csv in path)
    stride: int = 1  # folder/webdataset: frames between the sampled frames of a clip
    seed: int = 0  # Shapes world seed (training clips); evaluation uses other seeds
    num_workers: int = 0


@dataclass(frozen=True)
class TextConfig:
    """The text encoder (:mod:`m4v.text`).

    ``builtin``: a small transformer over open_clip's packaged BPE, trained with the model (its
    weights live in the checkpoint); its width is ``model.text_dim``. ``pretrained``: frozen T5
    tokens + CLIP pooled vector from local transformers folders (nothing is downloaded); with
    ``cache`` set, embeddings are cached on disk there so every caption is encoded once.
    """

    kind: Literal["builtin", "pretrained"] = "builtin"
    builtin_layers: int = 2
    builtin_heads: int = 4
    t5_path: str | None = None
    clip_path: str | None = None
    t5_tokenizer_path: str | None = None
    clip_tokenizer_path: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"  # pretrained encoders' weights
    cache: str | None = None


@dataclass(frozen=True)
class FlowConfig:
    """Pyramidal flow matching options (:class:`m4v.flow.PyramidFlowLoss`)."""

    stage_ratios: tuple[float, ...] = (1.0, 2.0, 1.0)
    text_dropout: float = 0.1
    history_noise: float = 1 / 3
    frame_sampling: Literal["batch", "sample"] = "batch"
    gamma: float = 1 / 3
    # share of steps that train on the clips' first latent frame alone (joint image-video
    # training; see m4v.train.objectives.FlowMatchingObjective)
    image_fraction: float = 0.0


@dataclass(frozen=True)
class SampleConfig:
    """Samples written to ``RUN_DIR/samples`` when training ends (and the generation defaults)."""

    num_prompts: int = 8
    num_samples: int = 1
    prompt_seed: int = 1  # Shapes world seed the sample prompts are drawn from
    first_frame_steps: tuple[int, ...] = (20, 20, 20)
    steps: tuple[int, ...] = (10, 10, 10)
    first_frame_guidance: float = 7.0
    guidance: float = 5.0
    fps: float = 8.0
    weights: Literal["ema", "model"] = "ema"


@dataclass(frozen=True)
class TrainConfig:
    stage: Stage = "t2v"
    preset: str = "tiny"
    model: M4VConfig = field(default_factory=lambda: M4VConfig.preset("tiny"))
    # latent codec, an m4v.vae.load_codec spec: "pixel[:factor]" (tiny default),
    # "causal3d:<folder>" (e.g. RUN_DIR/vae of a --stage vae run), "diffusers:<folder>"
    codec: str = "pixel"
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    vae: CausalVAE3DConfig = field(default_factory=lambda: CausalVAE3DConfig.preset("tiny"))
    # clips
    num_frames: int = 8
    resolution: tuple[int, int] = (32, 32)  # (H, W) of the video frames
    # optimisation
    steps: int = 1000
    batch_size: int = 16  # global: split over the ranks, so resuming on another world size keeps it
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine: final lr / lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA
    # bookkeeping
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    sample_at_end: bool = True
    # execution
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    activation_checkpointing: bool | None = None  # None: on with CUDA
    parallel: Parallel = "auto"  # auto: ddp under torchrun with >1 rank, else none
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_types(self)
        stages = self.model.pyramid_stages
        checks = {  # field: (valid, what is expected)
            "steps": (self.steps >= 0, ">= 0"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "grad_clip": (self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            "ema_decay": (0 <= self.ema_decay < 1, "in [0, 1) (0 disables the EMA)"),
            "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "save_every": (self.save_every >= 1, ">= 1"),
            "keep_last": (self.keep_last >= 1, ">= 1"),
            "num_frames": (self.num_frames >= 1, ">= 1"),
            "resolution": (min(self.resolution) >= 1, "(H, W) >= 1"),
            "sample.num_prompts": (self.sample.num_prompts >= 0, ">= 0"),
            "sample.num_samples": (self.sample.num_samples >= 1, ">= 1"),
            "sample.steps": (len(self.sample.steps) == stages, f"{stages} values (one per stage)"),
            "sample.first_frame_steps": (len(self.sample.first_frame_steps) == stages,
                                         f"{stages} values (one per stage)"),
            "flow.stage_ratios": (len(self.flow.stage_ratios) == stages,
                                  f"{stages} values (one per stage)"),
        }
        if self.stage == "vae":
            f = self.vae.factor
            checks["num_frames"] = ((self.num_frames - 1) % f == 0,
                                    f"1 + {f}k for stage vae (e.g. --set num_frames={1 + f})")
            checks["resolution"] = (all(s % f == 0 for s in self.resolution),
                                    f"multiples of {f} for stage vae")
        bad = [f"{k}: got {_get_path(self, k)!r}, expected {want}"
               for k, (ok, want) in checks.items() if not ok]
        if bad:
            raise ValueError("TrainConfig: " + "; ".join(bad))

    @staticmethod
    def preset_config(name: str) -> TrainConfig:
        if name not in TRAIN_PRESETS:
            raise ValueError(f"preset: got {name!r}, expected one of {sorted(TRAIN_PRESETS)}")
        return TRAIN_PRESETS[name]()

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def with_absolute_paths(self) -> TrainConfig:
        """The same config with every local path made absolute (codec folder, data, pretrained
        text encoders, embedding cache): a checkpoint then works from any working directory."""

        def absolute(path: str | None) -> str | None:
            return None if path is None else os.path.abspath(os.path.expanduser(path))

        kind, sep, arg = self.codec.partition(":")
        codec = f"{kind}:{absolute(arg)}" if sep and kind != "pixel" and arg else self.codec
        t, d = self.text, self.data
        text = dataclasses.replace(t, **{k: absolute(getattr(t, k)) for k in (
            "t5_path", "clip_path", "t5_tokenizer_path", "clip_tokenizer_path", "cache")})
        data = dataclasses.replace(d, path=absolute(d.path) if d.kind != "shapes" else d.path,
                                   index=absolute(d.index))
        return dataclasses.replace(self, codec=codec, text=text, data=data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainConfig:
        return from_dict(TrainConfig, data)


def _tiny() -> TrainConfig:
    # The embedded default: Shapes world, 8 frames of 32x32 -> PixelLatent 12 x 8 x 16 x 16,
    # builtin text encoder; sized to train and sample on 2 CPU cores in about 10 minutes.
    # Two departures from PyramidFlow's recipe, both measured on this budget (1500 steps,
    # shape-colour accuracy of 48 samples, chance 1/7): with stage ratios [1, 2, 1] and video
    # steps only the model ignored the text (shuffled captions gave the same loss): colours can
    # be read off the noisy frame itself except near sigma 1, and later frames copy them from
    # their history, so only the first frame's high-noise steps need the text. Training 3/4 of
    # the steps on first frames alone (images) made the backgrounds right (100%), and putting
    # half the batch on the coarsest stage, where a 32 px clip's shape first appears (one 8 px
    # cell), raised the shape colour from 0.23 to 0.33.
    return TrainConfig(
        preset="tiny", model=M4VConfig.preset("tiny"), steps=1200, batch_size=16, lr=2e-3,
        warmup_steps=50, save_every=400,
        flow=FlowConfig(stage_ratios=(2.0, 1.0, 1.0), image_fraction=0.75),
        data=DataConfig(num_workers=1),
        sample=SampleConfig(first_frame_steps=(4, 4, 4), steps=(2, 2, 2)),
    )


def _gpu(preset: str, batch_size: int, lr: float) -> TrainConfig:
    model = M4VConfig.preset(preset)
    return TrainConfig(
        preset=preset, model=model, codec="causal3d:runs/vae/vae",
        text=TextConfig(kind="pretrained"), data=DataConfig(kind="webdataset"),
        num_frames=121, resolution=(384, 640), steps=100_000, batch_size=batch_size, lr=lr,
        warmup_steps=1000, weight_decay=1e-4, save_every=1000, log_every=20,
    )


TRAIN_PRESETS = {
    "tiny": _tiny,
    "small": lambda: _gpu("small", 64, 3e-4),
    "m4v-2b": lambda: _gpu("m4v-2b", 256, 1e-4),
    "attention-2b": lambda: _gpu("attention-2b", 256, 1e-4),
}


# ---------------------------------------------------------------- dataclass <-> dict, overrides


def to_dict(obj: Any) -> Any:
    """Nested dataclasses -> plain JSON-able dicts (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (lists become tuples, ints floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name}: got {value!r}, expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(value, option, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{name}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}: got {value!r}, expected one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: got {value!r}, expected a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{name}: got {list(value)}, expected {len(args)} values")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in pairs)
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{name}: got {value!r}, expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: got {value!r}, expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: got {value!r}, expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}: got {value!r}, expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: got {value!r}, expected a string")
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, checking every value against the field's type."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{prefix or cls.__name__}: unknown fields "
                         f"{[prefix + u for u in unknown]}; {cls.__name__} has {sorted(names)}")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**values)


def _check_types(obj: Any) -> None:
    """Type-check the fields of a dataclass built directly in Python (not through from_dict)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value)
        else:
            _coerce(value, hints[f.name], f.name)


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.hidden_size=96"`` -> ``("model.hidden_size", 96)`` (value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set: got {text!r}, expected KEY=VALUE (e.g. lr=1e-3 or "
                         "model.hidden_size=96)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: cannot parse value {raw!r}: {e}") from e
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string
    return key, value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with dotted-path ``overrides`` applied, every value type-checked.

    A bare key names a field of TrainConfig; ``section.key`` a field of a nested config.
    """
    data = to_dict(cfg)
    for key, value in overrides.items():
        node, parts = data, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "TrainConfig"
                options = sorted(node) if isinstance(node, dict) else []
                raise ValueError(f"--set {key}: {where} has no field {part!r}; "
                                 f"its fields are {options}")
            if depth == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise ValueError(f"--set {key}: {key} is a section; set one of its fields, "
                                     f"e.g. {key}.{next(iter(node[part]))}=...")
                node[part] = value
            else:
                node = node[part]
    return from_dict(TrainConfig, data)


def config_diff(a: TrainConfig, b: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted.path: (value in a, value in b)}`` for every leaf field that differs."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
        elif x != y:
            out[path] = (x, y)

    walk(to_dict(a), to_dict(b), "")
    return out


# Fields that may change when a run resumes: they do not change what the checkpoint holds or what
# the loss is. Anything else differing is an error (the optimiser state, EMA and data order were
# produced under the stored values).
RESUMABLE_CHANGES = (
    "steps", "log_every", "save_every", "keep_last", "sample_at_end", "sample.", "precision",
    "activation_checkpointing", "parallel", "device", "data.num_workers",
)


def is_resumable_change(path: str) -> bool:
    return any(path == p or (p.endswith(".") and path.startswith(p)) for p in RESUMABLE_CHANGES)
