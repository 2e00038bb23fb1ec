"""KV-cache settings to compare at equal bytes: TurboQuant (the real cache) and fake-quant baselines.

A `Setting` names one way of storing K/V and builds a fresh cache for a model. TurboQuant MSE settings
(window, sinks and protected layers included) build the real `TurboQuantCache` (so the real code is what
is measured); the others are simulations for quality only: `FakeQuantLayer`, a DynamicLayer that quantizes K/V when they
enter the cache and stores the dequantized values. Like the compressed cache, what one step attends to
is the quantized past plus this step's new tokens (and any recent window) in full precision.

Codecs (per token per KV head; `bytes_k/bytes_v` count every stored byte: codes, scales, norms):
- fp16: round trip through float16, 2 * head_dim bytes each for K and V.
- fp8: float8_e4m3fn with one fp16 scale per token per head (amax / 448).
- int: randomised-Hadamard rotation + b-bit group-wise asymmetric min/max, fp16 scale + zero per group.
- tq: TurboQuant MSE (rotation + Lloyd-Max codebook + bfloat16 norm, as the cache stores it), keys centred per
  head by default.
- tq-prod: keys with TurboQuantProd ((b-1)-bit MSE + 1-bit QJL + two bfloat16 norms), values MSE.
- tq-out: fractional rates with outlier channels: per layer and KV head, the `n` channels with the largest RMS
  (of the centred keys, and of the values, over the first update's tokens after the sinks: the calibration)
  get their own TurboQuant MSE (rotation and codebook of dimension n, own norm) at `ok` / `ov` bits, the
  other head_dim - n channels another at `k` / `v` bits. K bytes: (n ok + (d - n) k) / 8 + 4 (two norms).
- kivi: KIVI-style: keys per-channel over groups of G tokens, values per-token group-wise; a residual of
  fewer than G recent tokens stays in full precision until its group is complete.

Settings are written as `kind:opt=val,...`, e.g. `tq:k=5,v=3`, `tq:k=4,v=4,window=64`, `tq:k=4,v=4,sink=4`,
`int:bits=4,group=32`, `fp8`, `kivi:bits=4`, `tq-prod:k=4,v=4`, `tq-out:k=3,v=3,ok=5,ov=4,n=16`,
`tq:k=4,v=4,skip=0+29`, `tq:k=4,v=3,lb=0:8/4+23:6/4` (layer 0 at K8/V4 and layer 23 at K6/V4, the others at
K4/V3: TurboQuantCache's `layer_bits`; `tq` only), `tq:cv=1` (centre values), `tq:ck=0` (no key centring),
`tq:bits=4,sim=1` (the fake-quant simulation of TurboQuantCache: the same numbers, tests/test_quality.py checks
it, and much faster on the CPU since nothing is dequantized per step), `tq:k=4,v=3,window=64,every=16` (the real
cache's `compress_every`: tokens leaving the window compressed 16 at a time; not in the simulation).

Bytes per token per KV head (`Setting.bytes_per_token_per_head`) average over the layers: a layer of `skip` costs
fp16 (4 * head_dim), a layer of `lb` its own codes and norms, (k * d / 8 + 2) + (v * d / 8 + 2); in every
compressed layer the window and sink tokens (and, with `every`, on average (every - 1) / 2 tokens waiting to be
compressed) cost fp16 at their share of the context.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..core.codebook import check_bits
from ..core.kvcodec import compress_reference, dequantize_reference
from ..core.quantizer import TurboQuantProd
from ..core.rotation import hadamard_rotation
from ..layout import NORM_BYTES, NORM_DTYPE, Codecs, KVLayout

FP8_MAX = 448.0  # largest finite float8_e4m3fn
KINDS = ("exact", "fp16", "fp8", "int", "tq", "tq-prod", "tq-out", "kivi")


# ---------------------------------------------------------------------------------------------- codecs
class Codec:
    """Fake-quantizes [B, H, S, D] tensors token by token. `begin` sees the first update's tokens after the
    sinks (e.g. for means), as the compressed cache centres on them."""

    def begin(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        pass

    def quant_k(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quant_v(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def bytes_k(self) -> float:
        raise NotImplementedError

    def bytes_v(self) -> float:
        raise NotImplementedError


class Fp16Codec(Codec):
    def __init__(self, head_dim: int):
        self.d = head_dim

    def quant_k(self, x):
        return x.to(torch.float16).to(x.dtype)

    quant_v = quant_k

    def bytes_k(self):
        return 2.0 * self.d

    bytes_v = bytes_k


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn with a per-vector (last dim) scale amax / 448, kept in fp16."""
    x32 = x.float()
    scale = (x32.abs().amax(-1, keepdim=True) / FP8_MAX).to(torch.float16).float().clamp_min(1e-12)
    q = (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


class Fp8Codec(Codec):
    def __init__(self, head_dim: int):
        self.d = head_dim

    def quant_k(self, x):
        return fp8_round_trip(x)

    quant_v = quant_k

    def bytes_k(self):
        return self.d + 2.0

    bytes_v = bytes_k


def groupwise_round_trip(x: torch.Tensor, bits: int, group: int, dim: int = -1) -> torch.Tensor:
    """Asymmetric min/max b-bit quantization in groups of `group` along `dim`; fp16 scale and zero."""
    x32 = x.float().movedim(dim, -1)
    shape = x32.shape
    if shape[-1] % group:
        raise ValueError(f"group {group} must divide the quantized dim {shape[-1]}")
    g = x32.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(torch.float16).float().clamp_min(1e-8)
    zero = lo.to(torch.float16).float()
    q = ((g - zero) / scale).round().clamp(0, levels)
    return (q * scale + zero).reshape(shape).movedim(-1, dim).to(x.dtype)


class IntGroupCodec(Codec):
    """Randomised Hadamard rotation (as QuaRot/SpinQuant) then b-bit group-wise min/max quantization."""

    def __init__(self, head_dim: int, k_bits: int, v_bits: int, group: int = 32, seed: int = 0, rotate=True):
        self.d, self.kb, self.vb, self.group = head_dim, k_bits, v_bits, min(group, head_dim)
        self.rot = hadamard_rotation(head_dim, seed) if rotate else None

    def _q(self, x, bits):
        if self.rot is None:
            return groupwise_round_trip(x, bits, self.group)
        rot = self.rot.to(x.device)
        y = groupwise_round_trip(x.float() @ rot.T, bits, self.group)
        return (y @ rot).to(x.dtype)

    def quant_k(self, x):
        return self._q(x, self.kb)

    def quant_v(self, x):
        return self._q(x, self.vb)

    def bytes_k(self):
        return self.d * self.kb / 8 + 4.0 * self.d / self.group

    def bytes_v(self):
        return self.d * self.vb / 8 + 4.0 * self.d / self.group


def _centring_means(keys, values, center_keys: bool, center_values: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) float32 means [B, H, D] of the calibration tokens, or zeros where centring is off."""
    zeros = torch.zeros(*keys.shape[:2], keys.shape[-1], dtype=torch.float32, device=keys.device)
    return (keys.float().mean(-2) if center_keys else zeros), (values.float().mean(-2) if center_values else zeros)


class TurboQuantCodec(Codec):
    """TurboQuant MSE, the same arithmetic as CompressedLayer (core/kvcodec.py references)."""

    def __init__(self, head_dim, k_bits, v_bits, *, seed=0, rotation="qr", center_keys=True, center_values=False):
        self.layout = KVLayout(head_dim, k_bits, v_bits)
        self.codecs = Codecs.build(self.layout, seed, rotation)
        self.center_keys, self.center_values = center_keys, center_values
        self.k_mean = self.v_mean = None

    def begin(self, keys, values):
        self.k_mean, self.v_mean = _centring_means(keys, values, self.center_keys, self.center_values)
        self.codecs = self.codecs.to(keys.device)

    def _q(self, x, mean, bounds, cents, bits):
        rot = self.codecs.rotation
        packed, norms = compress_reference(x, mean, rot, bounds, bits)
        return dequantize_reference(packed, norms.to(NORM_DTYPE), mean, rot, cents, bits).to(x.dtype)

    def quant_k(self, x):
        c = self.codecs
        return self._q(x, self.k_mean, c.k_boundaries, c.k_centroids, self.layout.k_bits)

    def quant_v(self, x):
        c = self.codecs
        return self._q(x, self.v_mean, c.v_boundaries, c.v_centroids, self.layout.v_bits)

    def bytes_k(self):
        return self.layout.k_bytes + NORM_BYTES

    def bytes_v(self):
        return self.layout.v_bytes + NORM_BYTES


class TurboQuantProdCodec(TurboQuantCodec):
    """Keys: TurboQuantProd ((k_bits - 1)-bit MSE + 1-bit QJL residual sketch), centred. Values: MSE."""

    def __init__(self, head_dim, k_bits, v_bits, *, seed=0, rotation="qr", center_keys=True, center_values=False):
        super().__init__(head_dim, k_bits, v_bits, seed=seed, rotation=rotation, center_keys=center_keys,
                         center_values=center_values)  # fmt: skip
        self.prod = TurboQuantProd(head_dim, k_bits, seed=seed, rotation=rotation)

    def quant_k(self, x):
        r = x.float() - self.k_mean.unsqueeze(-2)
        idx, norm, signs, rnorm = self.prod.quantize(r)
        norm, rnorm = norm.to(NORM_DTYPE).float(), rnorm.to(NORM_DTYPE).float()  # stored as the cache stores norms
        return (self.prod.dequantize(idx, norm, signs, rnorm) + self.k_mean.unsqueeze(-2)).to(x.dtype)

    def bytes_k(self):
        return self.layout.head_dim * self.layout.k_bits / 8 + 2 * NORM_BYTES


class OutlierChannelCodec(Codec):
    """TurboQuant MSE with `n_out` outlier channels per (batch, KV head) quantized apart at higher bits.

    Rule: at `begin` (the calibration tokens), the channels with the largest RMS of the centred keys (values:
    of the values, centred if `center_values`) are the outliers of that head; both subsets get an independent
    TurboQuant MSE (own rotation, codebook for their dimension, own bfloat16 norm). Fractional rates follow:
    e.g. head_dim 64, 16 outliers at 5 bits and 48 channels at 3 bits store 28 B + 4 B of norms per token,
    what plain 4-bit stores (32 B + 2 B)."""

    def __init__(self, head_dim, k_bits, v_bits, k_out_bits, v_out_bits, n_out, *, seed=0, rotation="qr",
                 center_keys=True, center_values=False):  # fmt: skip
        if not 0 < n_out < head_dim or n_out % 8 or (head_dim - n_out) % 8:
            raise ValueError(f"outlier channels must be a multiple of 8 in (0, {head_dim}), got {n_out}")
        self.d, self.n = head_dim, n_out
        self.bits = {"k": (k_bits, k_out_bits), "v": (v_bits, v_out_bits)}
        self.reg = Codecs.build(KVLayout(head_dim - n_out, k_bits, v_bits), seed, rotation)
        self.out = Codecs.build(KVLayout(n_out, k_out_bits, v_out_bits), seed + 1, rotation)
        self.center_keys, self.center_values = center_keys, center_values
        self.k_mean = self.v_mean = None
        self.split = {}

    def _channels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(outlier channel indices [B, H, n], the others [B, H, d - n]), each in increasing order."""
        rms = x.float().pow(2).mean(-2)  # [B, H, D]
        order = rms.argsort(dim=-1, descending=True)
        return order[..., : self.n].sort(-1).values, order[..., self.n :].sort(-1).values

    def begin(self, keys, values):
        self.k_mean, self.v_mean = _centring_means(keys, values, self.center_keys, self.center_values)
        self.reg, self.out = self.reg.to(keys.device), self.out.to(keys.device)
        self.split = {"k": self._channels(keys.float() - self.k_mean.unsqueeze(-2)),
                      "v": self._channels(values.float() - self.v_mean.unsqueeze(-2))}  # fmt: skip

    def _q(self, x, mean, which: str):
        r = x.float() - mean.unsqueeze(-2)
        out = torch.empty_like(r)
        for idx, codecs, bits in zip(self.split[which], (self.out, self.reg), self.bits[which][::-1], strict=True):
            gi = idx.unsqueeze(-2).expand(*r.shape[:-1], idx.shape[-1])
            part = r.gather(-1, gi)
            bounds = codecs.k_boundaries if which == "k" else codecs.v_boundaries
            cents = codecs.k_centroids if which == "k" else codecs.v_centroids
            zero = torch.zeros(*part.shape[:2], part.shape[-1], dtype=torch.float32, device=r.device)
            packed, norms = compress_reference(part, zero, codecs.rotation, bounds, bits)
            out.scatter_(-1, gi, dequantize_reference(packed, norms.to(NORM_DTYPE), zero, codecs.rotation, cents, bits))
        return (out + mean.unsqueeze(-2)).to(x.dtype)

    def quant_k(self, x):
        return self._q(x, self.k_mean, "k")

    def quant_v(self, x):
        return self._q(x, self.v_mean, "v")

    def _bytes(self, which: str) -> float:
        reg, hi = self.bits[which]
        return ((self.d - self.n) * reg + self.n * hi) / 8 + 2 * NORM_BYTES

    def bytes_k(self):
        return self._bytes("k")

    def bytes_v(self):
        return self._bytes("v")


# ---------------------------------------------------------------------------------------------- layers
class FakeQuantLayer(DynamicLayer):
    """DynamicLayer that stores K/V fake-quantized by `codec` (dequantized values are kept: a simulation).

    sink: the first `sink` tokens of the sequence are never quantized. window: the newest `window` tokens
    stay exact. What `update()` returns: the quantized past + (window + new tokens) exact, as the
    compressed cache does. The codec's `begin` sees the first update's tokens after the sinks (the first
    update that has any), as the compressed cache takes its centring means.
    """

    def __init__(self, codec: Codec, *, window: int = 0, sink: int = 0):
        super().__init__()
        self.codec, self.window, self.sink = codec, int(window), int(sink)
        self.q_keys = self.q_values = self.exact_keys = self.exact_values = None
        self.begun = False

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        empty = key_states[:, :, :0]
        self.q_keys, self.q_values = empty.clone(), empty.clone()
        self.exact_keys, self.exact_values = empty.clone(), empty.clone()
        self.keys, self.values = self.q_keys, self.q_values
        self.is_initialized = True

    def _begin(self, key_states, value_states) -> None:
        if self.begun:
            return
        skip = max(0, self.sink - self.get_seq_length())
        if key_states.shape[-2] > skip:
            self.codec.begin(key_states[:, :, skip:], value_states[:, :, skip:])
            self.begun = True

    def _quantize(self, k, v, start: int):
        n_sink = max(0, min(self.sink - start, k.shape[-2]))
        if n_sink == k.shape[-2]:
            return k, v
        qk, qv = self.codec.quant_k(k[:, :, n_sink:]), self.codec.quant_v(v[:, :, n_sink:])
        return torch.cat([k[:, :, :n_sink], qk], dim=-2), torch.cat([v[:, :, :n_sink], qv], dim=-2)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._begin(key_states, value_states)
        past_k, past_v = self.q_keys, self.q_values
        ek = torch.cat([self.exact_keys, key_states], dim=-2)
        ev = torch.cat([self.exact_values, value_states], dim=-2)
        overflow = ek.shape[-2] - self.window
        if overflow > 0:
            qk, qv = self._quantize(ek[:, :, :overflow], ev[:, :, :overflow], past_k.shape[-2])
            self.q_keys = torch.cat([past_k, qk], dim=-2)
            self.q_values = torch.cat([past_v, qv], dim=-2)
            self.exact_keys, self.exact_values = ek[:, :, overflow:], ev[:, :, overflow:]
        else:
            self.exact_keys, self.exact_values = ek, ev
        self.keys, self.values = self.q_keys, self.q_values
        return torch.cat([past_k, ek], dim=-2), torch.cat([past_v, ev], dim=-2)

    def dequantize(self, length=None):
        return self.q_keys, self.q_values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.q_keys.shape[-2] + self.exact_keys.shape[-2]

    def get_mask_sizes(self, query_length):
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("fake-quant layers are for teacher-forced quality runs")


class KiviLayer(FakeQuantLayer):
    """KIVI-style: keys quantized per channel over complete groups of `group` tokens, values per token
    (group-wise along head_dim); tokens of an incomplete group stay exact (the residual)."""

    def __init__(self, head_dim: int, bits: int, group: int = 32):
        super().__init__(Codec())
        self.head_dim, self.bits, self.group = head_dim, bits, group

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.q_keys, self.q_values
        ek = torch.cat([self.exact_keys, key_states], dim=-2)
        ev = torch.cat([self.exact_values, value_states], dim=-2)
        n = (ek.shape[-2] // self.group) * self.group
        if n:
            k = ek[:, :, :n]
            b, h, _, d = k.shape
            kg = k.reshape(b, h, n // self.group, self.group, d)
            qk = groupwise_round_trip(kg, self.bits, self.group, dim=-2).reshape(b, h, n, d)
            qv = groupwise_round_trip(ev[:, :, :n], self.bits, min(self.group, d))
            self.q_keys = torch.cat([past_k, qk], dim=-2)
            self.q_values = torch.cat([past_v, qv], dim=-2)
            self.exact_keys, self.exact_values = ek[:, :, n:], ev[:, :, n:]
        else:
            self.exact_keys, self.exact_values = ek, ev
        self.keys, self.values = self.q_keys, self.q_values
        return torch.cat([past_k, ek], dim=-2), torch.cat([past_v, ev], dim=-2)


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One way of storing the KV cache. See the module docstring for the spec syntax."""

    kind: str = "tq"
    k_bits: int = 4
    v_bits: int = 4
    window: int = 0
    sink: int = 0
    skip_layers: tuple[int, ...] = ()
    center_keys: bool = True
    center_values: bool = False
    group: int = 32
    seed: int = 0
    rotation: str = "qr"
    simulate: bool = False  # measure a `tq` setting on the fake-quant simulation instead of TurboQuantCache
    outliers: int = 0  # tq-out: outlier channels per head (default head_dim / 4)
    out_k_bits: int = 0  # tq-out: bits of the outlier key channels (default k_bits + 1)
    out_v_bits: int = 0  # tq-out: bits of the outlier value channels (default v_bits + 1)
    layer_bits: tuple[tuple[int, int, int], ...] = ()  # tq: (layer, k_bits, v_bits) of layers at their own widths
    compress_every: int = 1  # tq on the real cache: tokens leaving the window compressed this many at a time
    label: str = field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.compress_every != 1:
            if isinstance(self.compress_every, bool) or not isinstance(self.compress_every, int):
                raise ValueError(f"every= must be an int >= 1, got {self.compress_every!r}")
            if self.compress_every < 1 or self.kind != "tq" or self.simulate:
                raise ValueError("every= (compress_every) must be >= 1 and is only supported for tq on the real cache")
        if self.layer_bits:
            if self.kind != "tq":
                raise ValueError(f"per-layer bits (lb=) are only supported for the tq kind, not {self.kind!r}")
            lb = tuple(sorted((int(i), check_bits(int(k), "k_bits"), check_bits(int(v), "v_bits"))
                              for i, k, v in self.layer_bits))  # fmt: skip
            layers = [i for i, _, _ in lb]
            if len(set(layers)) != len(layers):
                raise ValueError(f"a layer is listed twice in layer_bits {lb}")
            both = sorted(set(layers) & set(self.skip_layers))
            if both:
                raise ValueError(f"layer(s) {both} are both kept exact (skip) and given their own bits (lb)")
            object.__setattr__(self, "layer_bits", lb)

    def bits_of_layer(self, layer: int) -> tuple[int, int]:
        """(k_bits, v_bits) of a compressed layer: its `layer_bits` entry, else the setting's."""
        for i, k, v in self.layer_bits:
            if i == layer:
                return k, v
        return self.k_bits, self.v_bits

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind in ("exact", "fp16", "fp8"):
            s = self.kind
        elif self.kind == "kivi":
            s = f"kivi{self.k_bits}"
        else:
            kv = f"{self.k_bits}" if self.k_bits == self.v_bits else f"K{self.k_bits}V{self.v_bits}"
            s = {"tq": "tq", "tq-prod": "tq-prod", "int": "int", "tq-out": "tq-out"}[self.kind] + kv
            if self.kind == "int":
                s += f"/g{self.group}"
            if self.kind == "tq-out":
                ok, ov = self.out_k_bits or self.k_bits + 1, self.out_v_bits or self.v_bits + 1
                s += f"+{self.outliers or 'd/4'}@K{ok}V{ov}"
        if self.kind in ("tq", "tq-prod", "tq-out"):
            if not self.center_keys:
                s += " nock"
            if self.center_values:
                s += " cv"
        if self.window:
            s += f" w{self.window}"
        if self.sink:
            s += f" sink{self.sink}"
        if self.skip_layers:
            s += " skip" + "+".join(map(str, self.skip_layers))
        if self.layer_bits:
            s += " lb" + "+".join(f"{i}:{k}/{v}" for i, k, v in self.layer_bits)
        if self.compress_every > 1:
            s += f" every{self.compress_every}"
        if self.simulate and self.kind == "tq":
            s += " (sim)"
        return s

    @property
    def spec(self) -> str:
        """This `tq` setting as a `parse_setting` string (the options that differ from the defaults)."""
        if self.kind != "tq" or self.simulate or self.seed or self.rotation != "qr":
            raise ValueError(f"spec is written for plain tq settings only, not {self.name!r}")
        opts = [f"k={self.k_bits}", f"v={self.v_bits}"]
        if self.window:
            opts.append(f"window={self.window}")
        if self.sink:
            opts.append(f"sink={self.sink}")
        if self.skip_layers:
            opts.append("skip=" + "+".join(map(str, self.skip_layers)))
        if self.layer_bits:
            opts.append("lb=" + "+".join(f"{i}:{k}/{v}" for i, k, v in self.layer_bits))
        if self.compress_every > 1:
            opts.append(f"every={self.compress_every}")
        if not self.center_keys:
            opts.append("ck=0")
        if self.center_values:
            opts.append("cv=1")
        return "tq:" + ",".join(opts)

    @property
    def uses_real_cache(self) -> bool:
        """True when this setting is measured on TurboQuantCache itself (not a simulation)."""
        return self.kind == "tq" and not self.simulate

    def codec(self, head_dim: int) -> Codec | None:
        kw = dict(seed=self.seed, rotation=self.rotation, center_keys=self.center_keys,
                  center_values=self.center_values)  # fmt: skip
        if self.kind == "fp16":
            return Fp16Codec(head_dim)
        if self.kind == "fp8":
            return Fp8Codec(head_dim)
        if self.kind == "int":
            return IntGroupCodec(head_dim, self.k_bits, self.v_bits, self.group, self.seed)
        if self.kind == "tq":
            return TurboQuantCodec(head_dim, self.k_bits, self.v_bits, **kw)
        if self.kind == "tq-prod":
            return TurboQuantProdCodec(head_dim, self.k_bits, self.v_bits, **kw)
        if self.kind == "tq-out":
            ok, ov = self.out_k_bits or self.k_bits + 1, self.out_v_bits or self.v_bits + 1
            return OutlierChannelCodec(head_dim, self.k_bits, self.v_bits, ok, ov, self.outliers or head_dim // 4,
                                       **kw)  # fmt: skip
        return None

    def quantized_bytes(self, head_dim: int, layer: int | None = None) -> float:
        """Bytes per token per KV head of a quantized token (no window, sinks or protected layers); with
        `layer`, at that layer's own bits (`layer_bits`)."""
        if layer is not None and self.layer_bits:
            k, v = self.bits_of_layer(layer)
            if (k, v) != (self.k_bits, self.v_bits):
                return replace(self, k_bits=k, v_bits=v, layer_bits=()).quantized_bytes(head_dim)
        if self.kind == "exact":
            return 4.0 * 2 * head_dim
        if self.kind == "kivi":
            d, g = head_dim, self.group
            return 2 * d * self.k_bits / 8 + 4.0 * d / g + 4.0 * d / min(g, d)
        c = self.codec(head_dim)
        return c.bytes_k() + c.bytes_v()

    def bytes_per_token_per_head(self, head_dim: int, num_layers: int = 1, tokens: int | None = None) -> float:
        """Average bytes per token per KV head over `num_layers` layers and a context of `tokens`.

        Exact tokens (window, sinks; KIVI's residual, on average group / 2; tokens waiting to be compressed, on
        average (compress_every - 1) / 2) and protected layers cost fp16
        (2 * 2 * head_dim); a layer of `layer_bits` costs its own quantized bytes (with the same exact-token
        share). Without `tokens`, the steady state (window and sinks amortized to zero)."""
        fp16 = 4.0 * head_dim
        if self.kind == "exact":
            return self.quantized_bytes(head_dim)
        exact = self.window + self.sink + (self.group / 2 if self.kind == "kivi" else 0) + (self.compress_every - 1) / 2
        share = min(exact, tokens) / tokens if tokens else 0.0
        skip = set(self.skip_layers)
        total = sum(
            fp16 if i in skip else self.quantized_bytes(head_dim, i) * (1 - share) + fp16 * share
            for i in range(num_layers)
        )
        return total / num_layers

    def bits_per_coord(self, head_dim: int, num_layers: int = 1, tokens: int | None = None) -> float:
        """Average stored bits per K or V coordinate (norms, scales, window and protected layers counted)."""
        return self.bytes_per_token_per_head(head_dim, num_layers, tokens) * 8 / (2 * head_dim)

    def make_cache(self, config) -> DynamicCache:
        """A fresh cache for a model config (or a model)."""
        config = getattr(config, "config", config)
        from ..cache.dynamic import TurboQuantCache, head_dim_of

        if self.kind == "exact":
            return DynamicCache(config=config)
        if self.uses_real_cache:
            return TurboQuantCache(config, k_bits=self.k_bits, v_bits=self.v_bits, window=self.window,
                                   sinks=self.sink, skip_layers=self.skip_layers,
                                   layer_bits={i: (k, v) for i, k, v in self.layer_bits}, seed=self.seed,
                                   rotation=self.rotation, center_keys=self.center_keys,
                                   center_values=self.center_values, compress_every=self.compress_every)  # fmt: skip
        head_dim = head_dim_of(config)
        cache = DynamicCache(config=config)
        skip = set(self.skip_layers)

        def make(i: int):
            if self.kind == "kivi":
                return KiviLayer(head_dim, self.k_bits, self.group)
            k, v = self.bits_of_layer(i)
            codec = replace(self, k_bits=k, v_bits=v, layer_bits=()).codec(head_dim)
            return FakeQuantLayer(codec, window=self.window, sink=self.sink)

        for i, layer in enumerate(cache.layers):
            if i not in skip and type(layer) is DynamicLayer:
                cache.layers[i] = make(i)
        return cache


def parse_setting(spec: str) -> Setting:
    """`kind[:opt=val,...]`; options k, v, bits, window, sink (or sinks), skip (a+b), lb (layer:k/v+...), ck, cv,
    every (compress_every), group, seed, rotation, sim, label; tq-out: n (outlier channels), ok, ov (their key /
    value bits)."""
    kind, _, opts = spec.strip().partition(":")
    kw: dict = {}
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, _, val = item.partition("=")
        key = key.strip().lower()
        if key in ("bits", "b"):
            kw["k_bits"] = kw["v_bits"] = int(val)
        elif key in ("k", "k_bits"):
            kw["k_bits"] = int(val)
        elif key in ("v", "v_bits"):
            kw["v_bits"] = int(val)
        elif key in ("window", "w"):
            kw["window"] = int(val)
        elif key in ("sink", "sinks"):
            kw["sink"] = int(val)
        elif key == "skip":
            kw["skip_layers"] = tuple(int(x) for x in val.replace("+", " ").split())
        elif key in ("lb", "layer_bits"):
            kw["layer_bits"] = tuple(_parse_layer_bits(x, spec) for x in val.replace("+", " ").split())
        elif key == "ck":
            kw["center_keys"] = val not in ("0", "false", "no")
        elif key == "cv":
            kw["center_values"] = val not in ("0", "false", "no")
        elif key in ("group", "g"):
            kw["group"] = int(val)
        elif key == "seed":
            kw["seed"] = int(val)
        elif key == "rotation":
            kw["rotation"] = val
        elif key == "sim":
            kw["simulate"] = val not in ("0", "false", "no")
        elif key == "label":
            kw["label"] = val
        elif key in ("every", "compress_every"):
            kw["compress_every"] = int(val)
        elif key in ("n", "outliers"):
            kw["outliers"] = int(val)
        elif key == "ok":
            kw["out_k_bits"] = int(val)
        elif key == "ov":
            kw["out_v_bits"] = int(val)
        else:
            raise ValueError(f"unknown option {key!r} in setting {spec!r}")
    return Setting(kind=kind.strip().lower(), **kw)


def _parse_layer_bits(item: str, spec: str) -> tuple[int, int, int]:
    """`layer:k/v` (e.g. `0:8/4`) -> (layer, k_bits, v_bits)."""
    layer, _, kv = item.partition(":")
    k, _, v = kv.partition("/")
    try:
        return int(layer), int(k), int(v)
    except ValueError:
        raise ValueError(f"lb entries are layer:k_bits/v_bits (e.g. 0:8/4), got {item!r} in {spec!r}") from None


def baseline_settings(bits: int = 4, head_dim: int = 64) -> list[Setting]:
    """The comparison set at one bit width: fp16, fp8, Hadamard+int (group 32 and group = head_dim, the
    latter at TurboQuant's bytes), KIVI, TurboQuant MSE and Prod (QJL)."""
    return [
        Setting("fp16"),
        Setting("fp8"),
        Setting("int", bits, bits, group=32),
        Setting("int", bits, bits, group=head_dim),
        Setting("kivi", bits, bits, group=32),
        Setting("tq", bits, bits),
        Setting("tq-prod", bits, bits),
    ]


def with_options(setting: Setting, **changes) -> Setting:
    return replace(setting, **changes)


def describe_bytes(setting: Setting, head_dim: int, num_layers: int, tokens: int | None) -> str:
    b = setting.bytes_per_token_per_head(head_dim, num_layers, tokens)
    return f"{b:.1f} B ({setting.bits_per_coord(head_dim, num_layers, tokens):.2f} bits)"


def settings_from(specs: Iterable[str]) -> list[Setting]:
    return [parse_setting(s) for s in specs]


def fp16_bytes(head_dim: int) -> float:
    return 4.0 * head_dim


def ratio_to_fp16(setting: Setting, head_dim: int, num_layers: int = 1, tokens: int | None = None) -> float:
    b = setting.bytes_per_token_per_head(head_dim, num_layers, tokens)
    return fp16_bytes(head_dim) / b if b else math.inf
