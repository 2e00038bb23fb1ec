"""A transformers cache layer that stores K/V as TurboQuant codes.

Storage (docs/LAYOUT.md): packed indices + bfloat16 norms per token (key and value norm side by side in one
[B, H, capacity, 2] tensor: one 4-byte word per token for the kernels), one centring mean per (batch, head),
and one full-precision buffer `exact_keys` / `exact_values` laid out [sinks | window]: the first `sinks`
tokens of the sequence (attention sinks, never compressed) followed by the most recent `window` tokens (and, with
`compress_every` > 1, up to compress_every - 1 older ones waiting to be compressed together).
No decompressed copy of the past is ever kept. In sequence order a layer holds

    [sink tokens (exact) | compressed tokens | window tokens (exact)]

"First tokens" are cache positions: with left padding, a padded row's sinks are its first `sinks`
positions, padding included (masked like any padding); its first real tokens are then compressed.

What `update()` returns, and what attention sees in one step:
- the compressed past: tokens [0, attend_compressed) of the store (`attention_view()`), and
- the exact segment: the `attend_sinks` sink tokens, then the recent-window tokens and this step's new
  tokens, in the model's dtype (one tensor, the buffer with the new tokens appended).
In fused mode `update()` returns only the exact segment (the fused attention reads the compressed past
through `attention_view()`, and puts the mask's sink columns after the compressed ones); otherwise it
returns every token in sequence order, [sinks, dequantized past, window + new], ready for any attention
backend. Both compute the same attention function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..core.codebook import check_bits
from ..core.kvcodec import dequantize_reference
from ..core.packing import check_packable_dim
from ..core.rotation import ROTATIONS
from ..kernels.tq_compress import compress_kv_unchecked
from ..layout import NORM_DTYPE, Codecs, CompressedKV, KVLayout

_GROW_TOKENS = 64
VALIDATE_MODES = ("always", "prefill", "never")


@dataclass(frozen=True)
class TurboQuantSettings:
    """How a compressed layer quantizes.

    k_bits, v_bits: bits per coordinate (1..8; the fused kernels support 2, 3 and 4).
    seed: seed of the rotation. rotation: "qr" or "hadamard".
    window: number of most recent tokens kept in full precision (0 = compress every past token); at least that
        many: see compress_every.
    sinks: number of first tokens of the sequence kept in full precision and never compressed
        (attention sinks; 0 = none). With left padding these are the first cache positions, padding included.
    center_keys / center_values: subtract a per-(batch, head) mean before quantizing, taken from the
        first update's tokens after the sinks (from the first update that has such tokens). Free in bits;
        for keys it is softmax-neutral and rescues models whose keys share a large offset (k_proj bias,
        e.g. Qwen2).
    validate: check new K/V for NaN/Inf: "always", "prefill" (only updates of more than one token;
        avoids a host sync per decode step on GPU) or "never". Default: "always" on CPU, "prefill" on GPU.
    compress_every: tokens that leave the window (or, without one, new tokens) are compressed once this many
        have gathered, all of them in one launch (1 = at once; an update that overflows by more compresses its
        whole overflow). Up to compress_every - 1 more tokens stay exact; eager decode then runs the compress
        kernel and trims the window once every compress_every steps (host time per step,
        benchmarks/RESULTS.md). The codes are those of compress_every = 1 (bit for bit in the tests, CPU and GPU).
    """

    k_bits: int = 4
    v_bits: int = 4
    seed: int = 0
    rotation: str = "qr"
    window: int = 0
    sinks: int = 0
    center_keys: bool = True
    center_values: bool = False
    validate: str | None = None
    compress_every: int = 1

    def __post_init__(self):
        check_bits(self.k_bits, "k_bits")
        check_bits(self.v_bits, "v_bits")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        for name, low in (("window", 0), ("sinks", 0), ("compress_every", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.validate is not None and self.validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES} or None, got {self.validate!r}")


def settings_for(bits: int, k_bits: int | None = None, v_bits: int | None = None, **options) -> TurboQuantSettings:
    """TurboQuantSettings where k_bits / v_bits default to bits (the form every cache constructor takes)."""
    return TurboQuantSettings(
        k_bits=check_bits(k_bits if k_bits is not None else bits, "k_bits"),
        v_bits=check_bits(v_bits if v_bits is not None else bits, "v_bits"),
        **options,
    )


def kernel_column_order(mask: torch.Tensor, sinks: int, compressed: int) -> torch.Tensor:
    """A mask's last dim from sequence order [sinks, compressed, rest] to the order of a kernel that takes the
    compressed tokens first and the exact segment [sinks, rest] after them: [compressed, sinks, rest]."""
    if not sinks or not compressed or mask.shape[-1] == 1:
        return mask
    s, n = sinks, sinks + compressed
    return torch.cat([mask[..., s:n], mask[..., :s], mask[..., n:]], dim=-1)


class CompressedLayer(DynamicLayer):
    """One attention layer's K/V, stored compressed. Shapes: [B, H_kv, tokens, head_dim]."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, head_dim: int, settings: TurboQuantSettings, codecs: Codecs | None = None, **kwargs):
        super().__init__()
        self.head_dim = check_packable_dim(head_dim)
        self.settings = settings
        self.layout = KVLayout(head_dim, settings.k_bits, settings.v_bits)
        self._codecs = codecs if codecs is not None else Codecs.build(self.layout, settings.seed, settings.rotation)
        if self._codecs.layout != self.layout:
            raise ValueError(f"codecs were built for {self._codecs.layout}, layer needs {self.layout}")
        self.fused = False
        self._clear()

    # ------------------------------------------------------------------ state
    @property
    def k_norms(self) -> torch.Tensor | None:
        """bfloat16 [B, H, capacity], a view of `norms` (stride 2 along the tokens)."""
        return None if self.norms is None else self.norms[..., 0]

    @property
    def v_norms(self) -> torch.Tensor | None:
        return None if self.norms is None else self.norms[..., 1]

    def _clear(self) -> None:
        self.k_packed = self.v_packed = self.norms = None
        self.k_mean = self.v_mean = None
        # full precision [sinks | window], [B, H, <= sinks + window + compress_every - 1, D]
        self.exact_keys = self.exact_values = None
        self.num_sinks = 0  # sink tokens held (the first num_sinks of exact_keys)
        self.num_compressed = 0
        self.attend_compressed = 0
        self.attend_sinks = 0
        self.keys = self.values = None
        self.is_initialized = False

    @property
    def codecs(self) -> Codecs:
        return self._codecs

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[0], key_states.shape[1]
        self._codecs = self._codecs.to(self.device)
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        self.k_packed = torch.empty(b, h, 0, self.layout.k_bytes, dtype=torch.uint8, device=self.device)
        self.v_packed = torch.empty(b, h, 0, self.layout.v_bytes, dtype=torch.uint8, device=self.device)
        self.norms = torch.empty(b, h, 0, 2, dtype=NORM_DTYPE, device=self.device)
        self.exact_keys = torch.empty(b, h, 0, d, dtype=self.dtype, device=self.device)
        self.exact_values = torch.empty(b, h, 0, d, dtype=self.dtype, device=self.device)
        # Placeholders so that code reading `layer.keys.dtype/device` keeps working; they hold no data.
        self.keys = self.exact_keys
        self.values = self.exact_values
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
            if t.dim() != 4:
                raise ValueError(f"{name} must be [batch, kv_heads, seq, head_dim], got shape {tuple(t.shape)}")
            if t.shape[-1] != self.head_dim:
                raise ValueError(
                    f"{name} has head_dim {t.shape[-1]}, but this compressed cache was built for "
                    f"head_dim={self.head_dim}"
                )
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} differ"
            )
        if key_states.device != value_states.device:
            raise ValueError(f"key_states on {key_states.device}, value_states on {value_states.device}")
        if self.is_initialized:
            expected = (self.batch_size, self.num_heads)
            if tuple(key_states.shape[:2]) != expected:
                raise ValueError(
                    f"key_states has [batch, kv_heads] = {list(key_states.shape[:2])}, cache holds {list(expected)}"
                )
            if key_states.device != self.device:
                raise ValueError(f"key_states on {key_states.device}, cache on {self.device}")
        mode = self.settings.validate or ("prefill" if key_states.is_cuda else "always")
        if mode == "always" or (mode == "prefill" and key_states.shape[-2] > 1):
            for name, t in (("key_states", key_states), ("value_states", value_states)):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{name} contains NaN or Inf values")

    # ------------------------------------------------------------------ storage
    def _capacity(self) -> int:
        return 0 if self.k_packed is None else self.k_packed.shape[2]

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` compressed tokens (preallocate, e.g. before CUDA-graph capture)."""
        if tokens <= self._capacity():
            return

        def grow(t: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(*t.shape[:2], tokens, *t.shape[3:], dtype=t.dtype, device=t.device)
            new[:, :, : self.num_compressed] = t[:, :, : self.num_compressed]
            return new

        self.k_packed, self.v_packed = grow(self.k_packed), grow(self.v_packed)
        self.norms = grow(self.norms)

    def _set_means(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        zeros = torch.zeros(b, h, d, dtype=torch.float32, device=self.device)
        self.k_mean = key_states.float().mean(dim=-2) if self.settings.center_keys else zeros
        self.v_mean = value_states.float().mean(dim=-2) if self.settings.center_values else zeros.clone()

    def _compress(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[-2]
        if n == 0:
            return
        need = self.num_compressed + n
        if need > self._capacity():
            self.reserve(-(-(need + max(_GROW_TOKENS, self._capacity() // 8)) // _GROW_TOKENS) * _GROW_TOKENS)
        c = self._codecs
        compress_kv_unchecked(keys, values, self.k_mean, self.v_mean, c.rotation, c.k_boundaries, c.v_boundaries,
                       self.layout.k_bits, self.layout.v_bits, self.k_packed, self.k_norms, self.v_packed,
                       self.v_norms, self.num_compressed)  # fmt: skip
        self.num_compressed = need

    # ------------------------------------------------------------------ cache-layer interface
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens; return what attention needs (see module docstring)."""
        self._check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states = key_states.to(self.dtype)
        value_states = value_states.to(self.dtype)
        sinks_before = self.num_sinks
        new_sinks = max(0, min(self.settings.sinks - sinks_before, key_states.shape[-2]))  # sinks still to fill
        if self.k_mean is None and key_states.shape[-2] > new_sinks:  # centre on tokens that get compressed
            self._set_means(key_states[:, :, new_sinks:], value_states[:, :, new_sinks:])

        # exact segment of this step: [sinks | window | new] (the sinks are complete whenever a window exists)
        if self.exact_keys.shape[-2]:
            exact_k = torch.cat([self.exact_keys, key_states], dim=-2)
            exact_v = torch.cat([self.exact_values, value_states], dim=-2)
        else:  # no sinks or window held (every token compressed): the new tokens alone
            exact_k, exact_v = key_states, value_states
        self.attend_compressed = self.num_compressed
        self.attend_sinks = sinks_before
        ns = self.num_sinks = sinks_before + new_sinks
        overflow = exact_k.shape[-2] - ns - self.settings.window
        if overflow >= self.settings.compress_every:  # compress_every 1: whenever a token leaves the window
            self._compress(exact_k[:, :, ns : ns + overflow], exact_v[:, :, ns : ns + overflow])
            if ns:
                self.exact_keys = torch.cat([exact_k[:, :, :ns], exact_k[:, :, ns + overflow :]], dim=-2)
                self.exact_values = torch.cat([exact_v[:, :, :ns], exact_v[:, :, ns + overflow :]], dim=-2)
            elif overflow == exact_k.shape[-2]:  # nothing left exact: an empty view, no copy
                self.exact_keys, self.exact_values = exact_k[:, :, :0], exact_v[:, :, :0]
            else:
                self.exact_keys = exact_k[:, :, overflow:].clone()
                self.exact_values = exact_v[:, :, overflow:].clone()
        else:
            self.exact_keys, self.exact_values = exact_k, exact_v
        self.keys, self.values = self.exact_keys, self.exact_values

        if self.fused or self.attend_compressed == 0:
            return exact_k, exact_v  # with nothing compressed before this step, this is sequence order
        past_k, past_v = self.dequantize(self.attend_compressed)
        s = sinks_before
        return (
            torch.cat([exact_k[:, :, :s], past_k, exact_k[:, :, s:]], dim=-2),
            torch.cat([exact_v[:, :, :s], past_v, exact_v[:, :, s:]], dim=-2),
        )

    def attention_view(self) -> CompressedKV:
        """The compressed past visible to the current step's attention (tokens [0, attend_compressed)).

        In sequence order these tokens sit between the `attend_sinks` sink tokens and the rest of the exact
        segment that update() returned in fused mode ([sinks | window | new]): a kernel that takes the
        compressed tokens first and the exact segment after them sees the sink columns moved behind the
        compressed ones (`kernel_column_order` does that to a mask)."""
        if not self.is_initialized:
            raise RuntimeError("attention_view() before the first update()")
        return CompressedKV(
            k_packed=self.k_packed,
            k_norms=self.k_norms,
            v_packed=self.v_packed,
            v_norms=self.v_norms,
            k_mean=self.k_mean,
            v_mean=self.v_mean,
            length=self.attend_compressed,
            codecs=self._codecs,
        )

    def dequantize(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct compressed tokens [0, length) as [B, H, length, D] in the model dtype (transient).

        Only the compressed store: sink and window tokens are not in it (`materialize()` gives every token)."""
        n = self.num_compressed if length is None else length
        if n == 0:  # nothing compressed (no means yet while a layer holds only sink tokens)
            empty = self.exact_keys[:, :, :0]
            return empty, self.exact_values[:, :, :0]
        c = self._codecs
        k = dequantize_reference(self.k_packed[:, :, :n], self.k_norms[:, :, :n], self.k_mean,
                                 c.rotation, c.k_centroids, self.layout.k_bits)  # fmt: skip
        v = dequantize_reference(self.v_packed[:, :, :n], self.v_norms[:, :, :n], self.v_mean,
                                 c.rotation, c.v_centroids, self.layout.v_bits)  # fmt: skip
        return k.to(self.dtype), v.to(self.dtype)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored token in sequence order, [sinks (exact), compressed (dequantized), window (exact)]."""
        if not self.is_initialized:
            raise RuntimeError("materialize() before the first update()")
        k, v = self.dequantize()
        s = self.num_sinks
        ek, ev = self.exact_keys, self.exact_values
        return (torch.cat([ek[:, :, :s], k, ek[:, :, s:]], dim=-2), torch.cat([ev[:, :, :s], v, ev[:, :, s:]], dim=-2))

    @property
    def sink_keys(self) -> torch.Tensor | None:
        return None if self.exact_keys is None else self.exact_keys[:, :, : self.num_sinks]

    @property
    def sink_values(self) -> torch.Tensor | None:
        return None if self.exact_values is None else self.exact_values[:, :, : self.num_sinks]

    @property
    def window_keys(self) -> torch.Tensor | None:
        """The exact tokens after the sinks: the window, and any tokens waiting to be compressed (compress_every)."""
        return None if self.exact_keys is None else self.exact_keys[:, :, self.num_sinks :]

    @property
    def window_values(self) -> torch.Tensor | None:
        return None if self.exact_values is None else self.exact_values[:, :, self.num_sinks :]

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.num_compressed + self.exact_keys.shape[-2]

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: remove that many newest tokens. Positive (legacy): keep that many tokens."""
        total = self.get_seq_length()
        keep = total + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, total)
        keep = max(keep, 0)
        if keep >= total or not self.is_initialized:
            return
        if keep <= self.num_sinks:  # into the sinks: nothing compressed remains, the next tokens are sinks again
            self.num_sinks = keep
            self.num_compressed = 0
            exact = keep
        elif keep <= self.num_sinks + self.num_compressed:
            self.num_compressed = keep - self.num_sinks
            exact = self.num_sinks
        else:
            exact = keep - self.num_compressed
        self.exact_keys = self.exact_keys[:, :, :exact]
        self.exact_values = self.exact_values[:, :, :exact]
        self.keys, self.values = self.exact_keys, self.exact_values
        self.attend_compressed = min(self.attend_compressed, self.num_compressed)
        self.attend_sinks = min(self.attend_sinks, self.num_sinks)

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        for name in (
            "k_packed",
            "v_packed",
            "norms",
            "k_mean",
            "v_mean",
            "exact_keys",
            "exact_values",
        ):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.keys, self.values = self.exact_keys, self.exact_values
        self.batch_size = self.k_packed.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self):
        raise NotImplementedError("offloading is not supported for compressed layers")

    def prefetch(self):
        return None

    # ------------------------------------------------------------------ accounting
    def vram_bytes(self) -> int:
        """Bytes of every tensor this layer holds (allocated capacity included)."""
        if not self.is_initialized:
            return 0
        held = (self.k_packed, self.v_packed, self.norms, self.k_mean, self.v_mean,
                self.exact_keys, self.exact_values)  # fmt: skip
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def used_bytes(self) -> int:
        """Bytes of the tokens actually stored (capacity slack excluded)."""
        if not self.is_initialized:
            return 0
        per_tok = self.layout.bytes_per_token_per_head * self.batch_size * self.num_heads
        exact = 2 * self.exact_keys.numel() * self.exact_keys.element_size()  # sinks and window
        means = 0 if self.k_mean is None else 2 * self.k_mean.numel() * 4
        return self.num_compressed * per_tok + exact + means

    def uncompressed_bytes(self) -> int:
        """Bytes the same tokens would take in the model dtype."""
        if not self.is_initialized:
            return 0
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.batch_size * self.num_heads * self.get_seq_length() * self.head_dim * elem
