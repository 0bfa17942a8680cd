"""torch.hub entry points that VBench's subject consistency loads (``source="local"``).

See ``harness/vbench/dino.py``: the weights come from the ``path`` keyword, never a download.
"""

from harness.vbench.dino import load_dino

dependencies = ["torch", "timm"]


def dino_vitb16(pretrained=True, path=None, **kwargs):
    """DINO ViT-B/16 (architecture read from the checkpoint) from the local file ``path``;
    other keywords VBench passes (``read_frame``) are not the model's."""
    if not pretrained or path is None:
        raise ValueError("dino_vitb16: got no checkpoint (path=None); the harness loads DINO only "
                         "from a local file, pass path=<.../dino_vitbase16_pretrain.pth>")
    return load_dino(path)
