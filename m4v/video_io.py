"""Reading and writing mp4 videos with PyAV.

Two in-memory layouts are used across the project and both are accepted wherever a video is
written or measured:

* frames: ``uint8`` array ``(t, h, w, 3)``, RGB, what decoders and metrics work on;
* model tensors: floating ``(3, t, h, w)`` in ``[-1, 1]``, what datasets yield and models produce.

Writing is atomic: the file is encoded under a temporary name in the destination folder and moved
into place with ``os.replace``, so a crash never leaves a half-written mp4 under the final name
(resumable stages treat "exists and decodes" as "done").

Codecs. The default is H.264 High profile, yuv420p, CRF 1: every browser (HTML reports, user
studies) and every VBench reader plays it; luma is near lossless, chroma is stored at half
resolution, so colour bleeds by about one pixel at sharp colour edges. ``lossless=True`` stores
exact RGB (libx264rgb, qp 0; decoded frames equal the input bit for bit) but needs a player that
supports H.264 High 4:4:4, which browsers do not.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch

PathLike = str | os.PathLike
Source = PathLike | BinaryIO | bytes


class VideoDecodeError(OSError):
    """A video file or buffer that cannot be opened or decoded (corrupt, truncated, not a video)."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def to_frames(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any project video layout -> ``uint8`` frames ``(t, h, w, 3)``.

    ``uint8`` input must already be ``(t, h, w, 3)``; floating input must be ``(3, t, h, w)`` in
    ``[-1, 1]`` (values outside are clipped) and is rounded to the nearest of 256 levels.
    """
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        video = video.float().numpy() if video.is_floating_point() else video.numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video: got uint8 of shape {video.shape}, expected (t, h, w, 3)")
        return np.ascontiguousarray(video)
    if np.issubdtype(video.dtype, np.floating):
        if video.ndim != 4 or video.shape[0] != 3:
            raise ValueError(
                f"video: got {video.dtype} of shape {video.shape}, expected (3, t, h, w) in [-1, 1]"
            )
        if not np.isfinite(video).all():
            raise ValueError("video: contains NaN or infinite values")
        scaled = np.rint((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        return np.ascontiguousarray(scaled.transpose(1, 2, 3, 0))
    raise ValueError(
        f"video: got dtype {video.dtype}, expected uint8 (t, h, w, 3) or float (3, t, h, w)"
    )


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8`` frames ``(t, h, w, 3)`` -> float32 tensor ``(3, t, h, w)`` in ``[-1, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def encode_video(
    video: np.ndarray | torch.Tensor, fps: float = 8.0, *, lossless: bool = False, crf: int = 1
) -> bytes:
    """Encode a video to mp4 bytes (see the module docstring for the two codec choices)."""
    frames = to_frames(video)
    t, h, w, _ = frames.shape
    if t < 1:
        raise ValueError("video: got 0 frames, expected at least 1")
    if not fps > 0:
        raise ValueError(f"fps: got {fps}, expected > 0")
    if not lossless and (h % 2 or w % 2):
        raise ValueError(
            f"video: got frames of {h}x{w}; yuv420p H.264 needs even height and width "
            "(crop/pad the video or pass lossless=True)"
        )
    if not 0 <= crf <= 51:
        raise ValueError(f"crf: got {crf}, expected 0..51")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        rate = Fraction(fps).limit_denominator(1001)
        if lossless:
            stream = container.add_stream("libx264rgb", rate=rate)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0"}
        else:
            stream = container.add_stream("libx264", rate=rate)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
        stream.width, stream.height = w, h
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_video(
    path: PathLike,
    video: np.ndarray | torch.Tensor,
    fps: float = 8.0,
    *,
    lossless: bool = False,
    crf: int = 1,
) -> Path:
    """Write ``video`` (uint8 ``(t, h, w, 3)`` or float ``(3, t, h, w)`` in [-1, 1]) as an mp4.

    Atomic: ``path`` either keeps its previous state or holds the complete new file.
    """
    return write_bytes_atomic(path, encode_video(video, fps, lossless=lossless, crf=crf))


def _name(source: Source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<in-memory video>"


def _open(source: Source) -> av.container.InputContainer:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"video: no such file {os.fspath(source)!r}")
        source = os.fspath(source)
    elif isinstance(source, bytes):
        source = io.BytesIO(source)
    else:
        source.seek(0)
    try:
        container = av.open(source)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"cannot open video {_name(source)}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"video {_name(source)} has no video stream")
    return container


def probe_video(source: Source) -> VideoInfo:
    """Frame count, frame rate and size from the container header (decodes when the header
    carries no frame count)."""
    with _open(source) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        num_frames = stream.frames
        height, width = stream.codec_context.height, stream.codec_context.width
    if num_frames <= 0:
        num_frames = len(read_video(source))
    return VideoInfo(num_frames=num_frames, fps=fps, height=height, width=width)


def read_video(
    source: Source, start: int = 0, num_frames: int | None = None, stride: int = 1
) -> np.ndarray:
    """Decode frames ``start, start + stride, ...`` (``num_frames`` of them, or to the end) as
    ``uint8`` ``(t, h, w, 3)`` RGB. Decoding stops after the last requested frame.

    Raises ``FileNotFoundError`` for a missing file and ``VideoDecodeError`` for anything that
    cannot be decoded, including a request for more frames than the video has.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            f"start/num_frames/stride: got {start}/{num_frames}/{stride}, "
            "expected start >= 0, num_frames >= 1 or None, stride >= 1"
        )
    last = None if num_frames is None else start + (num_frames - 1) * stride
    frames: list[np.ndarray] = []
    with _open(source) as container:
        try:
            for index, frame in enumerate(container.decode(video=0)):
                if index >= start and (index - start) % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if last is not None and index >= last:
                    break
        except av.FFmpegError as e:
            raise VideoDecodeError(f"cannot decode video {_name(source)}: {e}") from e
    if not frames:
        raise VideoDecodeError(f"video {_name(source)} has no frames in the requested range")
    if num_frames is not None and len(frames) < num_frames:
        raise VideoDecodeError(
            f"video {_name(source)} has too few frames: asked for {num_frames} from frame "
            f"{start} with stride {stride}, decoded {len(frames)}"
        )
    return np.stack(frames)


def video_decodes(path: PathLike) -> bool:
    """True when ``path`` exists and every frame decodes (resumable stages use this as "done")."""
    try:
        read_video(path)
    except (OSError, ValueError):
        return False
    return True
