"""turboquant-vllm: TurboQuant KV-cache compression with attention over the compressed cache."""

from .cache import CompressedDynamicCache, CompressedLayer, TurboQuantCache, TurboQuantSettings
from .core.codebook import lloyd_max_codebook
from .core.packing import pack, unpack
from .core.quantizer import TurboQuantMSE, TurboQuantProd
from .integrations.transformers import (
    cache_kwargs,
    disable_turboquant,
    enable_turboquant,
    fused_attention,
    install_fused_tq4_kv,
    uninstall_fused_tq4_kv,
)
from .layout import KVLayout

__version__ = "0.1.0"

__all__ = [
    "CompressedDynamicCache",
    "CompressedLayer",
    "KVLayout",
    "TurboQuantCache",
    "TurboQuantMSE",
    "TurboQuantProd",
    "TurboQuantSettings",
    "cache_kwargs",
    "disable_turboquant",
    "enable_turboquant",
    "fused_attention",
    "install_fused_tq4_kv",
    "lloyd_max_codebook",
    "pack",
    "uninstall_fused_tq4_kv",
    "unpack",
]
