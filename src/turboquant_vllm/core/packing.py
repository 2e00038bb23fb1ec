"""Bit packing of b-bit codebook indices, b in 1..8, exactly b * d / 8 bytes per vector.

Layout ("planes, slice-major"; drawn in docs/LAYOUT.md):
- b is split into planes by its binary digits, widest first: 8 -> [8], 7 -> [4, 2, 1],
  6 -> [4, 2], 5 -> [4, 1], 4 -> [4], 3 -> [2, 1], 2 -> [2], 1 -> [1].
  The first (widest) plane holds the lowest bits of each index, the next plane the next bits.
- A plane of width w covers all d coordinates in R = d * w / 8 bytes. Coordinate c lives in
  byte (c mod R) at bit offset w * (c div R). E.g. 4 bits, d = 128: byte j = idx[j] | idx[j + 64] << 4.
- The planes are concatenated in that order along the last (byte) dim.

This layout keeps every plane's bytes for a run of coordinates contiguous, so a kernel loads
[tokens, R] byte tiles with 16-byte vector loads and gets whole slices of the head dim with
one shift and mask. d must be a multiple of 8 (every head_dim in use is).
"""

from __future__ import annotations

import torch

from .codebook import check_bits


def planes(bits: int) -> tuple[int, ...]:
    """Plane widths for a bit width, widest first (lowest index bits first)."""
    check_bits(bits)
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


def packed_bytes(dim: int, bits: int) -> int:
    """Bytes per packed vector of dim b-bit indices."""
    check_packable_dim(dim)
    return dim * check_bits(bits) // 8


def check_packable_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"head_dim must be an int, got {type(dim).__name__}")
    if dim < 8 or dim % 8:
        raise ValueError(f"head_dim must be a positive multiple of 8 for bit packing, got {dim}")
    return dim


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer indices [..., d] in [0, 2**bits) into uint8 [..., d * bits / 8]."""
    d = check_packable_dim(indices.shape[-1])
    check_bits(bits)
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    idx = indices.to(torch.int32)
    out = []
    low = 0
    for w in planes(bits):
        r = d * w // 8
        part = (idx >> low) & ((1 << w) - 1)  # [..., d]
        part = part.reshape(*idx.shape[:-1], 8 // w, r)  # [..., slice, byte]
        shifts = (torch.arange(8 // w, device=idx.device, dtype=torch.int32) * w).view(-1, 1)
        out.append((part << shifts).sum(dim=-2).to(torch.uint8))
        low += w
    return torch.cat(out, dim=-1)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack: uint8 [..., d * bits / 8] -> uint8 indices [..., d]."""
    check_packable_dim(dim)
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if packed.shape[-1] != dim * bits // 8:
        raise ValueError(f"packed last dim must be head_dim * bits / 8 = {dim * bits // 8}, got {packed.shape[-1]}")
    data = packed.to(torch.int32)
    idx = torch.zeros(*packed.shape[:-1], dim, dtype=torch.int32, device=packed.device)
    start = 0
    low = 0
    for w in planes(bits):
        r = dim * w // 8
        plane = data[..., start : start + r].unsqueeze(-2)  # [..., 1, r]
        shifts = (torch.arange(8 // w, device=packed.device, dtype=torch.int32) * w).view(-1, 1)
        vals = (plane >> shifts) & ((1 << w) - 1)  # [..., slice, r]
        idx |= vals.reshape(*packed.shape[:-1], dim) << low
        start += r
        low += w
    return idx.to(torch.uint8)
