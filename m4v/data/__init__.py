"""Video-text datasets: the synthetic Shapes world, a folder of videos, webdataset shards.

All yield dicts with ``"video"`` (3, t, h, w) float32 in [-1, 1] and ``"caption"`` (str).
"""

from m4v.data.clips import ClipSpec
from m4v.data.folder import VideoFolderDataset
from m4v.data.shapes import ShapesWorld, caption_for, parse_caption
from m4v.data.webdataset import WebVideoDataset, write_shards

__all__ = [
    "ClipSpec",
    "ShapesWorld",
    "VideoFolderDataset",
    "WebVideoDataset",
    "caption_for",
    "parse_caption",
    "write_shards",
]
