"""Text encoders: ``encoder(prompts: list[str]) -> TextEmbedding(tokens, mask, pooled)``.

* ``BuiltinTextEncoder``    open_clip's packaged BPE + a small transformer; trains with the model
                            (the embedded default, no weights needed);
* ``T5TextEncoder``         T5 encoder from a local folder (tokens + mask, no pooled vector);
* ``CLIPTextEncoder``       CLIP text model from a local folder (pooled vector, tokens);
* ``PretrainedTextEncoder`` T5 tokens + CLIP pooled, frozen (real runs);
* ``EmbeddingCache`` / ``CachedTextEncoder``  on-disk cache of a frozen encoder's outputs.
"""

from m4v.text.builtin import BuiltinTextEncoder
from m4v.text.cache import CachedTextEncoder, EmbeddingCache
from m4v.text.clip import CLIPTextEncoder
from m4v.text.embedding import TextEmbedding
from m4v.text.pretrained import PretrainedTextEncoder
from m4v.text.t5 import T5TextEncoder

__all__ = [
    "BuiltinTextEncoder",
    "CLIPTextEncoder",
    "CachedTextEncoder",
    "EmbeddingCache",
    "PretrainedTextEncoder",
    "T5TextEncoder",
    "TextEmbedding",
]
