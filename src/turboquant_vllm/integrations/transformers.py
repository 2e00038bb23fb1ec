"""transformers integration: attention functions registered through `AttentionInterface`.

- "triton_fa": a vanilla flash attention (kernels/flash_attention.py) over exact K/V.
- fused TurboQuant attention: `install_fused_tq4_kv(model, compressed)` registers, under a name of its
  own, `triton_fa_tq4_kv_forward` bound to that compressed cache (an explicit handle: nothing is stored
  on the model's modules), switches the model to it and puts the cache in fused mode. Each layer's
  attention then reads the compressed past of `compressed.layer(module.layer_idx)` directly.
  `uninstall_fused_tq4_kv(model)` is its exact inverse (back to "sdpa", names unregistered).

Every registered name also gets `sdpa_mask` in `AttentionMaskInterface`; without it transformers would
build no mask for a custom name and padding would be silently ignored.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache.layer import CompressedLayer, kernel_column_order
from ..kernels._common import version_of

TRITON_FA = "triton_fa"
_FUSED_PREFIX = "tq4_fused_"
_counter = itertools.count()
_lock = threading.Lock()
_installed: dict[str, object] = {}  # registered fused name -> compressed cache it is bound to


def _is_causal(module, query: torch.Tensor, attention_mask, is_causal: bool | None) -> bool:
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and query.shape[2] > 1 and attention_mask is None


def _check_dropout(module, dropout: float) -> None:
    if dropout and getattr(module, "training", False):
        raise ValueError(f"dropout={dropout} is not supported by the Triton attention (inference only)")


def triton_fa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Flash attention over exact K/V.

    query [B, Hq, Sq, D], key/value [B, Hkv, Skv, D] (Hkv divides Hq; K/V are not repeated),
    attention_mask bool/additive [B, 1|Hq, Sq, Skv] or None. Causal when Sq > 1, no mask is given and
    module.is_causal (unless `is_causal=` says otherwise). Returns ([B, Sq, Hq, D], None).
    """
    from ..kernels.flash_attention import flash_attention

    _check_dropout(module, dropout)
    causal = _is_causal(module, query, attention_mask, is_causal)
    out = flash_attention(query, key, value, attention_mask=attention_mask, causal=causal, scale=scaling)
    return out, None


def _kernel_mask(tq_cache, mask: torch.Tensor | None, sinks: int, compressed: int) -> torch.Tensor | None:
    """`mask` with its columns in the kernel's order (`kernel_column_order`). transformers builds one mask per
    forward and hands the same tensor to every layer: the reordered mask is kept (with a reference to the
    mask, so the identity check cannot be fooled by a reused address) and reused by the next layers."""
    if mask is None or not sinks or not compressed or mask.shape[-1] == 1:
        return mask
    key = (version_of(mask), sinks, compressed)
    slot = getattr(tq_cache, "_kernel_mask_slot", None)
    if slot is not None and slot[0] is mask and slot[1] == key:
        return slot[2]
    out = kernel_column_order(mask, sinks, compressed)
    tq_cache._kernel_mask_slot = (mask, key, out)
    return out


def triton_fa_tq4_kv_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    tq_cache=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the compressed cache of `module.layer_idx` plus the exact K/V passed in.

    `tq_cache` is the compressed cache (bound by install_fused_tq4_kv). Without one, or for a layer
    that is not compressed (sliding-window or protected layers), this is `triton_fa_forward`.
    key/value are the exact segment the compressed layer returned from update() in fused mode:
    [sink tokens | window | new tokens]. The kernel takes the compressed tokens first and the exact
    segment after them, so the sink tokens (sequence positions [0, S)) move behind the compressed ones:
    the mask's columns are reordered to match. Bottom-right causal masking stays right: query i of Sq
    sees exact key e iff e <= i + Se - Sq, and Se - Sq = S + window (+ tokens waiting to be compressed) >= S,
    so the sinks (older than every query) are always visible, as are the window and the compressed tokens.
    """
    layer = None
    if tq_cache is not None:
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            raise ValueError("fused TurboQuant attention needs module.layer_idx to find its cache layer")
        layer = tq_cache.layer(idx)
    if not isinstance(layer, CompressedLayer) or not layer.fused or layer.attend_compressed == 0:
        return triton_fa_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)

    from ..kernels.tq_attention import tq_attention

    _check_dropout(module, dropout)
    causal = _is_causal(module, query, attention_mask, is_causal)
    sinks, compressed = layer.attend_sinks, layer.attend_compressed
    if sinks and key.shape[-2] - query.shape[2] < sinks:
        raise RuntimeError(
            f"exact segment of {key.shape[-2]} tokens for {query.shape[2]} queries cannot start with {sinks} "
            "sink tokens older than every query: pass the segment update() returned"
        )
    mask = _kernel_mask(tq_cache, attention_mask, sinks, compressed)
    out = tq_attention(query, layer.attention_view(), key, value, attention_mask=mask, causal=causal, scale=scaling)
    return out, None


def _register(name: str, fn) -> None:
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def _unregister(name: str) -> None:
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def register_triton_fa() -> str:
    """Register "triton_fa" (attention + sdpa-style mask). Idempotent. Returns the name."""
    _register(TRITON_FA, triton_fa_forward)
    return TRITON_FA


def _config_of(model):
    config = getattr(model, "config", None)
    if config is None:
        raise AttributeError(f"{type(model).__name__} has no `config`; pass a transformers PreTrainedModel")
    return config


def _set_attn(model, name: str) -> None:
    config = _config_of(model)
    config._attn_implementation = name
    for module in model.modules():  # sub-models with configs of their own (e.g. the text model)
        sub = getattr(module, "config", None)
        if sub is not None and sub is not config and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = name


def install_triton_fa(model) -> None:
    """Register "triton_fa" and switch `model` to it (model.config._attn_implementation)."""
    _config_of(model)
    _set_attn(model, register_triton_fa())


def install_fused_tq4_kv(model, compressed) -> str:
    """Make `model` attend directly over `compressed` (a CompressedDynamicCache or TurboQuantCache).

    Registers triton_fa_tq4_kv_forward bound to this cache under a fresh name, switches the model to
    it and sets `compressed.fused_mode = True`. Returns the registered name.
    """
    config = _config_of(model)
    if not hasattr(compressed, "layer") or not hasattr(compressed, "fused_mode"):
        raise TypeError(f"compressed must be a CompressedDynamicCache or TurboQuantCache, got {type(compressed)}")
    current = getattr(config, "_attn_implementation", None)
    if isinstance(current, str) and current.startswith(_FUSED_PREFIX):
        uninstall_fused_tq4_kv(model)
    with _lock:
        name = f"{_FUSED_PREFIX}{next(_counter)}"
        _register(name, functools.partial(triton_fa_tq4_kv_forward, tq_cache=compressed))
        _installed[name] = compressed
    register_triton_fa()  # the fallback for non-compressed layers
    _set_attn(model, name)
    compressed.fused_mode = True
    return name


def uninstall_fused_tq4_kv(model) -> None:
    """Undo install_fused_tq4_kv: back to "sdpa", the bound name unregistered, fused mode off."""
    config = _config_of(model)
    name = getattr(config, "_attn_implementation", None)
    if isinstance(name, str) and name.startswith(_FUSED_PREFIX):
        with _lock:
            compressed = _installed.pop(name, None)
            _unregister(name)
        if compressed is not None:
            compressed.fused_mode = False
    _set_attn(model, "sdpa")


@contextlib.contextmanager
def fused_attention(model, compressed):
    """Context manager form: fused attention over `compressed` inside the block, "sdpa" after."""
    install_fused_tq4_kv(model, compressed)
    try:
        yield compressed
    finally:
        uninstall_fused_tq4_kv(model)


def default_policy(bits: int) -> dict:
    """The measured best setting for a bit budget (docs/QUALITY.md, token by token on SmolLM2-135M and
    Qwen2.5-Coder-0.5B with the real cache). At 4 and 3 bits: keys `bits`, values `bits - 1` (keys carry
    nearly all the loss), the 4 first tokens (attention sinks) and the 64 newest tokens exact, and the first
    layer at 8-bit keys and 4-bit values (Qwen2-style models collapse with it at the policy's bits; kept exact it
    cost 0.35 bit more for the same perplexity). Stored, norms and exact tokens counted, at 8K tokens of
    context: 3.82 / 2.86 bits per coordinate at head_dim 128 (28 layers), 3.93-3.96 / 2.98-3.01 at head_dim 64
    (30 / 24 layers; bfloat16 norms). Other budgets: no policy (every token, every layer at `bits`)."""
    if bits in (3, 4):
        return {"k_bits": bits, "v_bits": bits - 1, "window": 64, "sinks": 4, "layer_bits": {0: (8, 4)}}
    return {}


def enable_turboquant(model, bits: int = 4, *, fused: bool = True, **cache_kwargs):
    """One call: a fresh TurboQuantCache for `model` with the fused attention bound to it.

    `bits` is the budget in bits per coordinate; the cache uses `default_policy(bits)` unless cache_kwargs
    say otherwise (e.g. k_bits=4, v_bits=4, window=0, sinks=0, skip_layers=() for plain TQ4).

    Call again for the next independent `generate()` (a fresh cache, rebound). Returns the cache.
    cache_kwargs: k_bits, v_bits, window, sinks, skip_layers, layer_bits, seed, rotation, center_keys,
    center_values, validate, compress_every (e.g. 16: fewer launches a decode step, up to 15 more exact tokens).
    """
    from ..cache.dynamic import TurboQuantCache

    cache = TurboQuantCache(_config_of(model), bits, **{**default_policy(bits), **cache_kwargs})
    if fused:
        install_fused_tq4_kv(model, cache)
    return cache


def disable_turboquant(model) -> None:
    """Undo enable_turboquant (same as uninstall_fused_tq4_kv)."""
    uninstall_fused_tq4_kv(model)


def cache_kwargs(model, cache) -> dict:
    """{"cache": cache} where the model takes `cache=` (transformers >= 5.24), else {"past_key_values": cache}.

    `model.generate(**inputs, **cache_kwargs(model, cache))` runs without deprecation warnings on every 5.x.
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}
