"""The compressed KV layout, documented to the byte (drawing: docs/LAYOUT.md).

Per compressed layer, for keys (and likewise values with v_bits):

    k_packed  uint8   [B, H_kv, capacity, head_dim * k_bits / 8]   codes, packed (core/packing.py)
    norms     bfloat16 [B, H_kv, capacity, 2]                      ||k - k_mean||, ||v - v_mean|| of each token
    k_mean    float32 [B, H_kv, head_dim]                          centring offset, fixed at the first update

A token's key is reconstructed as k_hat = k_mean + k_norm * (centroids[idx] @ Pi), where Pi is the
float32 [head_dim, head_dim] rotation (x_rot = x @ Pi.T). Attention reads the packed indices
directly: <q, k_hat> = <q, k_mean> + k_norm * <q @ Pi.T, centroids[idx]>.

Codes are sign-magnitude (core/kvcodec.py code_of_rank): the top bit of a code is the sign of its centroid,
the bits below rank its magnitude, so at 4 bits code c is +m_c for c < 8 and -m_(c-8) above. The Lloyd-Max
codebooks are symmetric about zero, so this is a relabelling (no quality change); it lets the decode kernel
read a magnitude index and a sign straight from the packed bits (tq_attention GATHER 3).

The paged layout used by serving engines is the same per token, with [num_blocks, H_kv, block_size, ...]
in place of [B, H_kv, capacity, ...] and a block table [B, max_blocks] int32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .core.codebook import check_bits, lloyd_max_codebook
from .core.kvcodec import centroids_by_code
from .core.packing import check_packable_dim, packed_bytes
from .core.rotation import make_rotation

# Norms are bfloat16: float32's range (no overflow for any finite input), a relative rounding error
# <= 2**-8 (0.4%), far below a code's direction error (docs/QUALITY.md measures it); 2 bytes saved per norm.
NORM_DTYPE = torch.bfloat16
NORM_BYTES = 2


@dataclass(frozen=True)
class KVLayout:
    """Static description of one compressed layer's storage."""

    head_dim: int
    k_bits: int
    v_bits: int

    def __post_init__(self):
        check_packable_dim(self.head_dim)
        check_bits(self.k_bits, "k_bits")
        check_bits(self.v_bits, "v_bits")

    @property
    def k_bytes(self) -> int:
        """Packed key bytes per token per KV head."""
        return packed_bytes(self.head_dim, self.k_bits)

    @property
    def v_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.v_bits)

    @property
    def bytes_per_token_per_head(self) -> int:
        """K + V bytes per token per KV head, norms included (means are per head, not per token)."""
        return self.k_bytes + self.v_bytes + 2 * NORM_BYTES

    def fp16_bytes_per_token_per_head(self) -> int:
        return 2 * 2 * self.head_dim

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes_per_token_per_head() / self.bytes_per_token_per_head


@dataclass
class CompressedKV:
    """A read-only view of a compressed layer handed to attention kernels (contiguous layout).

    Tokens [0, length) of every batch row are valid. Tensors are on one device.
    """

    k_packed: torch.Tensor  # uint8 [B, H_kv, capacity, k_bytes]
    k_norms: torch.Tensor  # bfloat16 [B, H_kv, capacity]
    v_packed: torch.Tensor  # uint8 [B, H_kv, capacity, v_bytes]
    v_norms: torch.Tensor  # bfloat16 [B, H_kv, capacity]
    k_mean: torch.Tensor  # float32 [B, H_kv, head_dim]
    v_mean: torch.Tensor  # float32 [B, H_kv, head_dim]
    length: int
    codecs: Codecs


@dataclass(frozen=True)
class Codecs:
    """Rotation and codebooks shared by every compressed layer of a cache (on one device)."""

    layout: KVLayout
    rotation: torch.Tensor  # float32 [head_dim, head_dim]
    k_centroids: torch.Tensor  # float32 [2**k_bits], indexed by stored code (kvcodec.centroids_by_code)
    k_boundaries: torch.Tensor  # float32 [2**k_bits - 1], increasing (bucketize gives ranks: kvcodec.code_of_rank)
    v_centroids: torch.Tensor  # float32 [2**v_bits], indexed by stored code
    v_boundaries: torch.Tensor  # float32 [2**v_bits - 1], increasing
    copies: dict = field(default_factory=dict, compare=False, repr=False)  # device -> Codecs, made by to()

    @classmethod
    def build(
        cls,
        layout: KVLayout,
        seed: int = 0,
        rotation: str = "qr",
        device: torch.device | str = "cpu",
    ) -> Codecs:
        kc = lloyd_max_codebook(layout.head_dim, layout.k_bits)
        vc = lloyd_max_codebook(layout.head_dim, layout.v_bits)
        return cls(
            layout=layout,
            rotation=make_rotation(layout.head_dim, seed, rotation).to(device),
            k_centroids=centroids_by_code(kc.centroids, layout.k_bits).to(device),
            k_boundaries=kc.boundaries.to(device),
            v_centroids=centroids_by_code(vc.centroids, layout.v_bits).to(device),
            v_boundaries=vc.boundaries.to(device),
        )

    def to(self, device: torch.device | str) -> Codecs:
        """These codecs on `device`: one copy per device, shared by every caller (the layers of a cache then
        hold the same tensors, so what the kernels derive from them is built once, not once per layer)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.rotation.device == device:
            return self
        if device not in self.copies:
            self.copies[device] = self._copy_to(device)
        return self.copies[device]

    def _copy_to(self, device: torch.device) -> Codecs:
        return Codecs(
            layout=self.layout,
            rotation=self.rotation.to(device),
            k_centroids=self.k_centroids.to(device),
            k_boundaries=self.k_boundaries.to(device),
            v_centroids=self.v_centroids.to(device),
            v_boundaries=self.v_boundaries.to(device),
        )
