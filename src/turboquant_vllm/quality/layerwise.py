"""Per-layer fidelity on real K/V and queries, and diagnostics of known failure patterns.

`capture` runs the model once (no cache) with an attention function that records, per layer, the real
query (after RoPE), key and value tensors attention sees, then calls SDPA as usual. `layer_errors` puts
each layer's K/V through a setting's codec (the compressed layer itself for TurboQuant: a prefix update,
then the rest, as decode fills it) and compares, per layer: cosine and relative error of the reconstructed
K and V, and of the causal attention output computed with the real queries over reconstructed vs exact
K/V in two views: `attn_cos` reconstructs every past token of every query (the diagonal too: harsher than
decode), `attn_cos_decode` gives each query what a token-by-token decode step would see (`decode_attention`:
its own token and the layer's recent window exact, sinks exact, the rest reconstructed).

`diagnose` reports per layer: the shared key offset (||mean key|| / mean ||key||, max over heads), outlier
channels (max channel RMS / median channel RMS) and the attention mass on token 0 (attention sinks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache.layer import CompressedLayer
from ..core.kvcodec import attention_reference
from .baselines import FakeQuantLayer, KiviLayer, Setting

_names = itertools.count()


@dataclass
class LayerCapture:
    query: torch.Tensor  # [1, Hq, T, D] after RoPE
    key: torch.Tensor  # [1, Hkv, T, D] as stored in a cache
    value: torch.Tensor
    scaling: float


@contextlib.contextmanager
def _attention_recorder(model, store: dict[int, LayerCapture]):
    from ..integrations.transformers import _set_attn

    def record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        idx = getattr(module, "layer_idx", len(store))
        s = scaling if scaling is not None else query.shape[-1] ** -0.5
        store[idx] = LayerCapture(query.detach(), key.detach(), value.detach(), float(s))
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip

    name = f"tq_capture_{next(_names)}"
    previous = model.config._attn_implementation
    AttentionInterface.register(name, record)
    AttentionMaskInterface.register(name, sdpa_mask)
    _set_attn(model, name)
    try:
        yield
    finally:
        _set_attn(model, previous)
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@torch.no_grad()
def capture(model, input_ids: torch.Tensor) -> dict[int, LayerCapture]:
    """Per layer index: the real query, key and value of one forward over input_ids [1, T]."""
    store: dict[int, LayerCapture] = {}
    with _attention_recorder(model, store):
        model(input_ids, use_cache=False)
    return dict(sorted(store.items()))


def reconstruct(layer, keys: torch.Tensor, values: torch.Tensor, prefill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put keys/values [1, H, T, D] into a fresh cache layer (prefix, then the rest); return what it holds."""
    prefill = min(max(prefill, 1), keys.shape[-2])
    layer.update(keys[:, :, :prefill], values[:, :, :prefill])
    if prefill < keys.shape[-2]:
        layer.update(keys[:, :, prefill:], values[:, :, prefill:])
    if isinstance(layer, CompressedLayer):
        return layer.materialize()
    if isinstance(layer, FakeQuantLayer):
        return torch.cat([layer.q_keys, layer.exact_keys], -2), torch.cat([layer.q_values, layer.exact_values], -2)
    return layer.keys, layer.values


def _cos_rel(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """(mean cosine over vectors, min cosine over vectors, relative Frobenius error)."""
    a, r = x.double().flatten(0, -2), ref.double().flatten(0, -2)
    cos = torch.nn.functional.cosine_similarity(a, r, dim=-1, eps=1e-30)
    rel = float((a - r).norm() / r.norm().clamp_min(1e-30))
    return float(cos.mean()), float(cos.min()), rel


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keys_rec: torch.Tensor,
    values_rec: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention as token-by-token decode sees a windowed cache. query [1, Hq, T, D]; keys / values
    (exact) and keys_rec / values_rec (what the cache holds: [sinks exact | reconstructed | last window exact])
    [1, Hkv, T, D]. Query i takes key j exact when j >= i - window (the window's tokens and its own), else the
    reconstructed one. Returns float64 [1, T, Hq, D]."""
    q = query.double()
    g = q.shape[1] // keys.shape[1]

    def rep(x: torch.Tensor) -> torch.Tensor:
        return x.double().repeat_interleave(g, dim=1)

    t = q.shape[-2]
    i = torch.arange(t, device=q.device).view(-1, 1)
    j = torch.arange(t, device=q.device).view(1, -1)
    exact = j >= i - window  # [T, T]
    s_exact = (q @ rep(keys).transpose(-1, -2)) * scale
    s_rec = (q @ rep(keys_rec).transpose(-1, -2)) * scale
    scores = torch.where(exact, s_exact, s_rec).masked_fill(j > i, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p * exact) @ rep(values) + (p * ~exact) @ rep(values_rec)
    return out.transpose(1, 2)


def _window_of(layer) -> int | None:
    """The recent-window length of a cache layer that compresses (None for an exact layer, and for KIVI, whose
    exact residual follows its groups, not a window: layer_errors reports its decode view as NaN)."""
    if isinstance(layer, CompressedLayer):
        return layer.settings.window
    if isinstance(layer, FakeQuantLayer) and not isinstance(layer, KiviLayer):
        return layer.window
    return None


@dataclass
class LayerError:
    layer: int
    k_cos: float
    k_rel: float
    v_cos: float
    v_rel: float
    attn_cos: float  # mean over (token, head) of the attention-output cosine
    attn_cos_min_head: float  # the worst head's mean cosine
    attn_rel: float
    attn_cos_decode: float = 1.0  # mean over (token, head), each query seeing what a decode step sees
    attn_cos_decode_min_head: float = 1.0


@torch.no_grad()
def layer_errors(model, captures: dict[int, LayerCapture], setting: Setting, *, prefill: int = 64) -> list[LayerError]:
    """Per-layer K, V and attention-output errors of `setting` on the captured tensors."""
    cache = setting.make_cache(model.config)
    out = []
    for idx, c in captures.items():
        layer = cache.layers[idx]
        kq, vq = reconstruct(layer, c.key, c.value, prefill)
        k_cos, _, k_rel = _cos_rel(kq, c.key)
        v_cos, _, v_rel = _cos_rel(vq, c.value)
        ref = attention_reference(c.query, c.key, c.value, causal=True, scale=c.scaling)  # [1, T, Hq, D]
        got = attention_reference(c.query, kq, vq, causal=True, scale=c.scaling)
        per = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1, eps=1e-30)  # [1, T, Hq]
        rel = float((got - ref).double().norm() / ref.double().norm().clamp_min(1e-30))
        window = _window_of(layer)
        dec_cos = dec_min = float("nan") if isinstance(layer, KiviLayer) else 1.0  # KIVI: not modelled
        if window is not None:
            dec = decode_attention(c.query, c.key, c.value, kq, vq, window, c.scaling)
            per_dec = torch.nn.functional.cosine_similarity(dec, ref.double(), dim=-1, eps=1e-30)
            dec_cos, dec_min = float(per_dec.mean()), float(per_dec.mean((0, 1)).min())
        out.append(LayerError(idx, k_cos, k_rel, v_cos, v_rel, float(per.mean()), float(per.mean((0, 1)).min()), rel,
                              dec_cos, dec_min))  # fmt: skip
    return out


@torch.no_grad()
def repair_layers(
    model,
    captures: dict[int, LayerCapture],
    setting: Setting,
    min_cos: float,
    *,
    prefill: int = 64,
    rounds: int = 4,
    errors: list[LayerError] | None = None,
) -> tuple[Setting, list[LayerError]]:
    """Raise the bits of the layers whose decode-view attention cosine is below `min_cos`, one bit a round (keys
    in even rounds, values in odd ones, up to 8; a side at 8 passes its turn), re-measuring every round. Returns
    the last setting (a `tq` setting with those layers in `layer_bits`) and its per-layer errors; the caller
    checks whether it passes. errors: the setting's own per-layer errors, if already measured."""
    if setting.kind != "tq":
        raise ValueError(f"layer repair needs a tq setting, got {setting.name!r}")
    if errors is None:
        errors = layer_errors(model, captures, setting, prefill=prefill)
    for r in range(rounds):
        bad = [e.layer for e in errors if e.attn_cos_decode < min_cos and e.layer not in setting.skip_layers]
        if not bad:
            break
        own = {i: (k, v) for i, k, v in setting.layer_bits}
        if all(setting.bits_of_layer(i) == (8, 8) for i in bad):  # nothing left to raise
            break
        for i in bad:
            k, v = setting.bits_of_layer(i)
            keys_turn = (r % 2 == 0 and k < 8) or v >= 8  # a side already at 8 bits passes its turn
            own[i] = (min(8, k + 1), v) if keys_turn else (k, min(8, v + 1))
        setting = dataclasses.replace(setting, layer_bits=tuple((i, k, v) for i, (k, v) in sorted(own.items())),
                                      label="")  # fmt: skip
        errors = layer_errors(model, captures, setting, prefill=prefill)
    return setting, errors


def calibrate_layer_bits(
    model,
    input_ids: torch.Tensor,
    bits: int = 4,
    *,
    min_cos: float = 0.995,
    prefill: int = 64,
    rounds: int = 4,
    **policy,
) -> dict[int, tuple[int, int]]:
    """Per-layer (k_bits, v_bits) for `enable_turboquant(model, bits, layer_bits=...)`: the policy's own layer
    bits plus those `repair_layers` finds so that every layer's attention output, as decode sees it, keeps
    cosine >= min_cos on `input_ids` [1, T] (a few hundred to a few thousand tokens of the user's text).

    policy: cache keyword overrides of `default_policy(bits)` (k_bits, v_bits, window, sinks, skip_layers,
    layer_bits), as `enable_turboquant` takes them. Layers still below after `rounds` rounds keep their last
    bits; compare `layer_errors` yourself where that matters. CPU or GPU, float32 recommended.
    """
    from ..integrations.transformers import default_policy

    if not 0.0 < min_cos <= 1.0:
        raise ValueError(f"min_cos must be in (0, 1], got {min_cos}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    p = {**default_policy(bits), **policy}
    unknown = set(p) - {"k_bits", "v_bits", "window", "sinks", "skip_layers", "layer_bits"}
    if unknown:
        raise TypeError(f"unknown policy keys {sorted(unknown)}")
    skip = tuple(p.get("skip_layers", ()))
    setting = Setting(
        "tq",
        p.get("k_bits", bits),
        p.get("v_bits", bits),
        window=p.get("window", 0),
        sink=p.get("sinks", 0),
        skip_layers=skip,
        # a layer kept exact drops its own bits, as the cache does
        layer_bits=tuple((i, k, v) for i, (k, v) in sorted(p.get("layer_bits", {}).items()) if i not in skip),
    )
    fixed, _ = repair_layers(model, capture(model, input_ids), setting, min_cos, prefill=prefill, rounds=rounds)
    return {i: (k, v) for i, k, v in fixed.layer_bits}


@dataclass
class LayerDiagnosis:
    layer: int
    key_offset: float  # max over heads of ||mean_t k|| / mean_t ||k||
    channel_outlier: float  # max over heads of (max channel RMS / median channel RMS) of the keys
    sink_mass: float  # mean attention probability on token 0 (queries after the first 16 tokens)
    key_norm_max: float  # largest key norm


@torch.no_grad()
def diagnose(captures: dict[int, LayerCapture]) -> list[LayerDiagnosis]:
    out = []
    for idx, c in captures.items():
        k = c.key[0].float()  # [H, T, D]
        offset = (k.mean(1).norm(dim=-1) / k.norm(dim=-1).mean(1).clamp_min(1e-30)).max()
        rms = k.pow(2).mean(1).sqrt()  # [H, D]
        outlier = (rms.max(-1).values / rms.median(-1).values.clamp_min(1e-30)).max()
        q = c.query[0].float()
        hq, hkv = q.shape[0], k.shape[0]
        kk = k.repeat_interleave(hq // hkv, dim=0)
        t = q.shape[1]
        start = min(16, t - 1)
        scores = (q[:, start:] @ kk.transpose(-1, -2)) * c.scaling  # [Hq, T - start, T]
        i = torch.arange(start, t).view(-1, 1)
        j = torch.arange(t).view(1, -1)
        scores = scores.masked_fill(j > i, float("-inf"))
        sink = torch.softmax(scores, -1)[..., 0].mean()
        out.append(LayerDiagnosis(idx, float(offset), float(outlier), float(sink), float(k.norm(dim=-1).max())))
    return out


def warnings_for(
    diag: list[LayerDiagnosis],
    errors: list[LayerError] | None = None,
    *,
    offset: float = 0.95,
    outlier: float = 20.0,
    sink: float = 0.3,
    attn_cos: float = 0.9,
) -> list[str]:
    """Human-readable warnings for the known failure patterns (thresholds from docs/QUALITY.md: Qwen2.5's
    layers 0, 1, 2, 4, 8 have offsets ~1.0 and 23-95x outlier channels; SmolLM2's layers stay below both)."""
    msgs = []
    big = [d for d in diag if d.key_offset > offset]
    if big:
        worst = max(big, key=lambda d: d.key_offset)
        msgs.append(
            f"large shared key offset in layer(s) {[d.layer for d in big]} (worst: layer {worst.layer}, "
            f"||mean key|| / key norm = {worst.key_offset:.2f}): keep key centring on (the default); "
            "uncentred low-bit keys collapse on such layers"
        )
    out = [d for d in diag if d.channel_outlier > outlier]
    if out:
        worst = max(out, key=lambda d: d.channel_outlier)
        msgs.append(
            f"outlier key channels in layer(s) {[d.layer for d in out]} (worst: layer {worst.layer}, max/median "
            f"channel RMS = {worst.channel_outlier:.0f}, max key norm {worst.key_norm_max:.0f}): give keys more bits "
            "(K6/V3) or keep the worst layer exact (--skip-layers)"
        )
    sinks = [d for d in diag if d.sink_mass > sink]
    if sinks:
        worst = max(sinks, key=lambda d: d.sink_mass)
        msgs.append(
            f"attention sink at token 0 in {len(sinks)} layer(s) (worst: layer {worst.layer}, "
            f"{worst.sink_mass:.0%} of the attention): errors on that token's K/V weigh heavily; a recent window "
            "does not cover it, keeping the first tokens exact does (--sinks 4)"
        )
    if errors:
        bad = [e for e in errors if e.attn_cos < attn_cos]
        if bad:
            worst = min(bad, key=lambda e: e.attn_cos)
            msgs.append(
                f"attention output of layer(s) {[e.layer for e in bad]} deviates (worst: layer {worst.layer}, "
                f"cosine {worst.attn_cos:.3f}): keep it exact with --skip-layers {worst.layer}"
            )
    return msgs
