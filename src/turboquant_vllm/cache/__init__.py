"""transformers caches that store K/V compressed with TurboQuant."""

from .dynamic import CompressedDynamicCache, TurboQuantCache, compress_layers, head_dim_of
from .layer import CompressedLayer, TurboQuantSettings

__all__ = [
    "CompressedDynamicCache",
    "CompressedLayer",
    "TurboQuantCache",
    "TurboQuantSettings",
    "compress_layers",
    "head_dim_of",
]
