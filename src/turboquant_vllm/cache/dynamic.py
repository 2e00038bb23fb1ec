"""Caches whose full-attention layers are CompressedLayer objects.

- `TurboQuantCache(config, bits=4, ...)`: a DynamicCache built for a model config.
- `CompressedDynamicCache(cache, head_dim=128, bits=4)`: the documented wrapper; it puts compressed
  layers in place of an existing DynamicCache's full-attention layers, so passing the original `cache`
  to `generate()` compresses transparently.

Sliding-window layers (config.layer_types "sliding_attention") stay exact: they hold at most `window`
tokens, so compressing them saves little and would cost quality. Layers listed in `skip_layers` stay exact.
Within a compressed layer, the first `sinks` and the newest `window` tokens stay exact (TurboQuantSettings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.codebook import check_bits
from ..core.packing import check_packable_dim
from ..layout import Codecs, KVLayout
from .layer import CompressedLayer, TurboQuantSettings, settings_for


def head_dim_of(config) -> int:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else int(cfg.hidden_size // cfg.num_attention_heads)


def compress_layers(
    cache: DynamicCache,
    head_dim: int,
    settings: TurboQuantSettings,
    skip_layers: Iterable[int] = (),
    layer_bits: Mapping[int, tuple[int, int]] | None = None,
) -> Codecs:
    """Put CompressedLayer objects in place of the cache's full-attention DynamicLayers.

    skip_layers stay exact; layer_bits maps a layer index to its own (k_bits, v_bits). Layers that already
    hold tokens are compressed as they are. Returns the codecs of the default bit widths.
    """
    if not isinstance(cache, DynamicCache):
        raise TypeError(f"cache must be a transformers DynamicCache, got {type(cache).__name__}")
    skip = {int(i) for i in skip_layers}
    per_layer = {
        int(i): (check_bits(kb, "k_bits"), check_bits(vb, "v_bits")) for i, (kb, vb) in (layer_bits or {}).items()
    }
    codecs_by_bits: dict[tuple[int, int], Codecs] = {}

    def codecs_for(bits: tuple[int, int]) -> Codecs:
        if bits not in codecs_by_bits:
            codecs_by_bits[bits] = Codecs.build(KVLayout(head_dim, *bits), settings.seed, settings.rotation)
        return codecs_by_bits[bits]

    default_bits = (settings.k_bits, settings.v_bits)
    codecs = codecs_for(default_bits)

    def make(i: int) -> CompressedLayer:
        bits = per_layer.get(i, default_bits)
        layer_settings = dataclasses.replace(settings, k_bits=bits[0], v_bits=bits[1])
        return CompressedLayer(head_dim, layer_settings, codecs_for(bits))

    for i, layer in enumerate(cache.layers):
        if i in skip or type(layer) is not DynamicLayer:
            continue
        new = make(i)
        if layer.is_initialized and layer.get_seq_length() > 0:
            new.update(layer.keys, layer.values)
        cache.layers[i] = new
    if cache.layer_class_to_replicate is not None:
        cache.layer_class_to_replicate = _LazyLayerFactory(make, skip, cache)
    return codecs


def _mean_bytes_per_token_per_head(layers) -> float:
    """Bytes actually used per token per KV head over compressed layers (sinks, window and means included)."""
    per = [
        layer.used_bytes() / (layer.get_seq_length() * layer.batch_size * layer.num_heads)
        for layer in layers
        if layer.is_initialized and layer.get_seq_length() > 0
    ]
    return sum(per) / len(per) if per else 0.0


class _LazyLayerFactory:
    """Builds the layers of a cache created without a config, as `update()` reaches them."""

    def __init__(self, make, skip: set[int], cache: DynamicCache):
        self.make, self.skip, self.cache = make, skip, cache
        self.fused = False

    def __call__(self):
        i = len(self.cache.layers)
        if i in self.skip:
            return DynamicLayer()
        layer = self.make(i)
        layer.fused = self.fused
        return layer


class _CompressedCacheMixin:
    """Accounting and access shared by both cache flavours (`self._cache` is the DynamicCache)."""

    def compressed_layers(self) -> dict[int, CompressedLayer]:
        return {i: layer for i, layer in enumerate(self._cache.layers) if isinstance(layer, CompressedLayer)}

    def layer(self, layer_idx: int):
        return self._cache.layers[layer_idx]

    def get_compressed(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_packed [B, H, N, D*kb/8] uint8, k_norms [B, H, N] bf16, v_packed, v_norms) of the N stored tokens."""
        layer = self._cache.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            raise ValueError(f"layer {layer_idx} is not compressed ({type(layer).__name__})")
        if not layer.is_initialized:
            raise ValueError(f"layer {layer_idx} holds no tokens yet")
        n = layer.num_compressed
        return (
            layer.k_packed[:, :, :n],
            layer.k_norms[:, :, :n],
            layer.v_packed[:, :, :n],
            layer.v_norms[:, :, :n],
        )

    @property
    def fused_mode(self) -> bool:
        return self._fused_mode

    @fused_mode.setter
    def fused_mode(self, value: bool) -> None:
        self._fused_mode = bool(value)
        self._kernel_mask_slot = None  # the fused attention's reordered mask of the last step (integrations)
        for layer in self._cache.layers:
            if isinstance(layer, CompressedLayer):
                layer.fused = self._fused_mode
        factory = self._cache.layer_class_to_replicate
        if isinstance(factory, _LazyLayerFactory):
            factory.fused = self._fused_mode

    def vram_bytes(self) -> int:
        """Bytes held by the cache's K/V storage on its device(s), every layer included."""
        total = 0
        for layer in self._cache.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.vram_bytes()
            elif getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total

    def compression_stats(self) -> dict:
        """Tokens, bytes held/used, the uncompressed equivalent and the ratio, per cache."""
        comp = self.compressed_layers()
        used = sum(layer.used_bytes() for layer in comp.values())
        unc = sum(layer.uncompressed_bytes() for layer in comp.values())
        held = self.vram_bytes()
        tokens = max(
            (layer.get_seq_length() for layer in self._cache.layers if hasattr(layer, "get_seq_length")), default=0
        )
        layout = self.layout
        return {
            "head_dim": layout.head_dim,
            "k_bits": layout.k_bits,
            "v_bits": layout.v_bits,
            "tokens": tokens,
            "compressed_layers": len(comp),
            "total_layers": len(self._cache.layers),
            "bytes_per_token_per_head": layout.bytes_per_token_per_head,
            "mean_bytes_per_token_per_head": _mean_bytes_per_token_per_head(comp.values()),
            "compressed_bytes_used": used,
            "uncompressed_bytes_equivalent": unc,
            "vram_bytes": held,
            "compression_ratio": (unc / used) if used else 0.0,
        }


class TurboQuantCache(_CompressedCacheMixin, DynamicCache):
    """A DynamicCache that stores full-attention layers compressed with TurboQuant.

    Args:
        config: the model config (or the model); gives head_dim and the layer types.
        bits: bits per coordinate for K and V (k_bits / v_bits override it).
        window: recent tokens kept in full precision. sinks: first tokens kept in full precision (attention
            sinks; with left padding, the first cache positions). skip_layers: layer indices kept exact.
        layer_bits: {layer index: (k_bits, v_bits)} for layers that need other widths (e.g. the first/last).
        seed, rotation, center_keys, center_values, validate, compress_every: see TurboQuantSettings.
    """

    def __init__(
        self,
        config,
        bits: int = 4,
        *,
        k_bits: int | None = None,
        v_bits: int | None = None,
        window: int = 0,
        sinks: int = 0,
        skip_layers: Iterable[int] = (),
        layer_bits: Mapping[int, tuple[int, int]] | None = None,
        seed: int = 0,
        rotation: str = "qr",
        center_keys: bool = True,
        center_values: bool = False,
        validate: str | None = None,
        compress_every: int = 1,
    ):
        config = getattr(config, "config", config)
        super().__init__(config=config)
        settings = settings_for(bits, k_bits, v_bits, seed=seed, rotation=rotation, window=window, sinks=sinks,
                                center_keys=center_keys, center_values=center_values, validate=validate,
                                compress_every=compress_every)  # fmt: skip
        self._cache = self
        self.settings = settings
        self.skip_layers = tuple(sorted(int(i) for i in skip_layers))
        self.layer_bits = dict(layer_bits or {})
        self.codecs = compress_layers(self, head_dim_of(config), settings, self.skip_layers, self.layer_bits)
        self.layout = self.codecs.layout
        self._fused_mode = False

    @property
    def rotation(self) -> torch.Tensor:
        return self.codecs.rotation


class CompressedDynamicCache(_CompressedCacheMixin):
    """The documented wrapper: compress an existing DynamicCache in place.

        cache = DynamicCache(config=model.config)
        compressed = CompressedDynamicCache(cache, head_dim=128, bits=4)
        model.generate(..., past_key_values=cache)   # compressed transparently

    By default every token is compressed (no full-precision window or sink tokens, no protected layers);
    keys are centred per head (free in bits, see TurboQuantSettings). `k_bits` / `v_bits` override `bits`;
    `window` / `sinks` keep the newest / first tokens exact; `compress_every` compresses in batches
    (TurboQuantSettings).
    """

    def __init__(
        self,
        cache: DynamicCache,
        head_dim: int = 128,
        bits: int = 4,
        *,
        k_bits: int | None = None,
        v_bits: int | None = None,
        window: int = 0,
        sinks: int = 0,
        seed: int = 0,
        rotation: str = "qr",
        center_keys: bool = True,
        validate: str | None = None,
        compress_every: int = 1,
    ):
        check_packable_dim(head_dim)
        settings = settings_for(bits, k_bits, v_bits, seed=seed, rotation=rotation, window=window, sinks=sinks,
                                center_keys=center_keys, validate=validate, compress_every=compress_every)  # fmt: skip
        self._cache = cache
        self.cache = cache
        self.settings = settings
        self.head_dim = head_dim
        self.bits = settings.k_bits
        self.codecs = compress_layers(cache, head_dim, settings)
        self.layout = self.codecs.layout
        self._fused_mode = False

    @property
    def rotation(self) -> torch.Tensor:
        """The rotation Pi, float32 [head_dim, head_dim] (x_rot = x @ Pi.T)."""
        return self.codecs.rotation

    @property
    def centroids(self) -> torch.Tensor:
        """Key codebook centroids, float32 [2**k_bits], indexed by stored code (sign-magnitude order,
        core.kvcodec.centroids_by_code; values: `v_centroids`)."""
        return self.codecs.k_centroids

    @property
    def v_centroids(self) -> torch.Tensor:
        return self.codecs.v_centroids
