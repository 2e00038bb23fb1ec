"""Fused TurboQuant compression of new K or V tokens straight into the packed cache (Triton).

``tq_compress(x, mean, rotation, boundaries, bits, out_packed, out_norms, offset)`` writes tokens
``x[:, :, s]`` into positions ``offset + s`` of ``out_packed`` / ``out_norms`` in one pass per tile of
tokens: subtract the mean, take the norm, divide, rotate (``tl.dot`` with ``Pi^T``, IEEE float32),
quantize (index = number of boundaries < y, i.e. ``torch.bucketize``; a branch-free binary search over
the sorted boundaries), and pack per the plane layout of core/packing.py (docs/LAYOUT.md).

The rotation is computed per output byte group: for the plane of width w (R = D * w / 8 bytes), the
``8 / w`` coordinate runs ``[t * R, (t + 1) * R)`` land in the same bytes at bit ``w * t``, so the kernel
computes those rotated coordinates in column chunks of ``BLOCK_C`` and ORs them into the byte tile
without any data reshuffling. Every bit width 1..8 and every head_dim that is a multiple of 8 (up to
256 in the kernel; larger falls back to PyTorch) is supported.

Reference: ``core.kvcodec.compress_reference``. The kernel agrees with it exactly except where a rotated
coordinate is within float32 rounding (~1e-6) of a boundary (summation order of the dot product).
CPU tensors use the reference unless the Triton interpreter is on.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..core.codebook import check_bits
from ..core.kvcodec import compress_reference
from ._common import FLOAT_DTYPES, check_tensor, next_pow2, use_triton

__all__ = ["tq_compress"]

_MAX_HEAD_DIM = 256
# Rotation precision: 3xTF32 on tensor cores (float32-level accuracy, ~1e-7 relative); "ieee" (FMA) would
# be exact-fp32 but spills heavily on sm_90. The interpreter computes in float32 either way.
_DOT_PREC = "tf32x3"


@triton.jit
def _bucketize(y, bnd_ptr, BITS: tl.constexpr):
    """Number of boundaries < y (torch.bucketize, right=False) over 2**BITS - 1 sorted boundaries."""
    idx = tl.zeros(y.shape, dtype=tl.int32)
    for i in tl.static_range(BITS):
        cand = idx + (1 << (BITS - 1 - i))
        bnd = tl.load(bnd_ptr + cand - 1)
        idx = tl.where(y > bnd, cand, idx)
    return idx


@triton.jit
def _pack_plane(unit, pi_ptr, stride_pr, stride_pc, bnd_ptr, out_row_ptrs, stride_pd, smask, d, dmask,
                BITS: tl.constexpr, HEAD_DIM: tl.constexpr, W: tl.constexpr, START: tl.constexpr,
                LOW: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Quantize and store one plane: bytes [START, START + R) with R = HEAD_DIM * W / 8."""
    R: tl.constexpr = HEAD_DIM * W // 8
    for sub in range((R + BLOCK_C - 1) // BLOCK_C):  # runtime loops: unrolling them spills on sm_90
        u = sub * BLOCK_C + tl.arange(0, BLOCK_C)
        umask = u < R
        byte = tl.zeros([unit.shape[0], BLOCK_C], dtype=tl.int32)
        for t in range(8 // W):
            c = t * R + u
            # pit[k, j] = Pi[c_j, k]:  y[:, j] = unit @ Pi[c_j, :]^T = (unit @ Pi^T)[:, c_j]
            pit = tl.load(pi_ptr + (c * stride_pr)[None, :] + (d * stride_pc)[:, None],
                          mask=dmask[:, None] & umask[None, :], other=0.0)  # fmt: skip
            y = tl.dot(unit, pit, input_precision=DOT_PREC)
            idx = _bucketize(y, bnd_ptr, BITS)
            byte = byte | (((idx >> LOW) & ((1 << W) - 1)) << (W * t))
        tl.store(out_row_ptrs + ((START + u) * stride_pd)[None, :], byte.to(tl.uint8),
                 mask=smask[:, None] & umask[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["offset"])
def _tq_compress_kernel(
    x_ptr, stride_xb, stride_xh, stride_xs, stride_xd,
    mean_ptr, stride_mb, stride_mh, stride_md,
    pi_ptr, stride_pr, stride_pc,
    bnd_ptr,
    pk_ptr, stride_pb, stride_ph, stride_pn, stride_pd,
    nrm_ptr, stride_nb, stride_nh, stride_nn,
    H, S, offset,
    BITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Compress BLOCK_S tokens of one (batch, head).

    x     [B, H, S, D]          fp16/bf16/fp32  strides (stride_xb, stride_xh, stride_xs, stride_xd)
    mean  [B, H, D]             float32         strides (stride_mb, stride_mh, stride_md)
    pi    [D, D]                float32         strides (stride_pr, stride_pc); x_rot = x @ Pi.T
    bnd   [2**BITS - 1]         float32         contiguous, increasing
    pk    [B, H, cap, D*BITS/8] uint8           strides (stride_pb, stride_ph, stride_pn, stride_pd)
    nrm   [B, H, cap]           float32         strides (stride_nb, stride_nh, stride_nn)
    Token s goes to position offset + s. Grid (cdiv(S, BLOCK_S), B * H).
    """
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = s < S
    d = tl.arange(0, HEAD_DP)
    dmask = d < HEAD_DIM
    s64 = s.to(tl.int64)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + (s64 * stride_xs)[:, None]
                + (d * stride_xd)[None, :], mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    mu = tl.load(mean_ptr + b * stride_mb + h * stride_mh + d * stride_md, mask=dmask, other=0.0)
    r = tl.where(dmask[None, :], x - mu[None, :], 0.0)
    nrm = tl.sqrt(tl.sum(r * r, axis=1))
    unit = r / tl.maximum(nrm, 1.1754943508222875e-38)[:, None]
    pos = offset + s64
    tl.store(nrm_ptr + b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh + pos * stride_nn, nrm, mask=smask)
    out_rows = pk_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + (pos * stride_pn)[:, None]
    # Planes, widest first, lowest bits first (core/packing.py): 8 -> [8]; else the set bits among 4, 2, 1.
    if BITS == 8:
        _pack_plane(unit, pi_ptr, stride_pr, stride_pc, bnd_ptr, out_rows, stride_pd, smask, d, dmask, BITS, HEAD_DIM,
                    8, 0, 0, BLOCK_C, DOT_PREC)  # fmt: skip
    if (BITS & 4) != 0:
        _pack_plane(unit, pi_ptr, stride_pr, stride_pc, bnd_ptr, out_rows, stride_pd, smask, d, dmask, BITS, HEAD_DIM,
                    4, 0, 0, BLOCK_C, DOT_PREC)  # fmt: skip
    if (BITS & 2) != 0:
        _pack_plane(unit, pi_ptr, stride_pr, stride_pc, bnd_ptr, out_rows, stride_pd, smask, d, dmask, BITS, HEAD_DIM,
                    2, (BITS & 4) * HEAD_DIM // 8, BITS & 4, BLOCK_C, DOT_PREC)  # fmt: skip
    if (BITS & 1) != 0:
        _pack_plane(unit, pi_ptr, stride_pr, stride_pc, bnd_ptr, out_rows, stride_pd, smask, d, dmask, BITS, HEAD_DIM,
                    1, (BITS & 6) * HEAD_DIM // 8, BITS & 6, BLOCK_C, DOT_PREC)  # fmt: skip


def tq_compress(
    x: torch.Tensor,
    mean: torch.Tensor,
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    bits: int,
    out_packed: torch.Tensor,
    out_norms: torch.Tensor,
    offset: int,
) -> None:
    """Compress x [B, H, S, D] (fp16/bf16/fp32, any strides) into out_packed[:, :, offset:offset+S]
    (uint8 [B, H, cap, D*bits/8], any strides) and out_norms[:, :, offset:offset+S]
    (float32 [B, H, cap]). mean float32 [B, H, D]; rotation float32 [D, D]; boundaries float32
    [2**bits - 1] (increasing). Same result as core.kvcodec.compress_reference."""
    check_bits(bits)
    check_tensor(x, "x", ndim=4, dtypes=FLOAT_DTYPES)
    dev = x.device
    bsz, heads, seq, d = x.shape
    check_tensor(mean, "mean", ndim=3, dtypes=(torch.float32,), device=dev)
    if tuple(mean.shape) != (bsz, heads, d):
        raise ValueError(f"mean must have shape {(bsz, heads, d)}, got {tuple(mean.shape)}")
    check_tensor(rotation, "rotation", ndim=2, dtypes=(torch.float32,), device=dev)
    if tuple(rotation.shape) != (d, d):
        raise ValueError(f"rotation must have shape {(d, d)} (x head_dim), got {tuple(rotation.shape)}")
    check_tensor(boundaries, "boundaries", ndim=1, dtypes=(torch.float32,), device=dev)
    if boundaries.shape[0] != (1 << bits) - 1:
        raise ValueError(f"boundaries must have 2**bits - 1 = {(1 << bits) - 1} entries, got {boundaries.shape[0]}")
    if d < 8 or d % 8:
        raise ValueError(f"head_dim must be a positive multiple of 8 for bit packing, got {d}")
    check_tensor(out_packed, "out_packed", ndim=4, dtypes=(torch.uint8,), device=dev)
    check_tensor(out_norms, "out_norms", ndim=3, dtypes=(torch.float32,), device=dev)
    cap = out_packed.shape[2]
    if tuple(out_packed.shape) != (bsz, heads, cap, d * bits // 8):
        raise ValueError(
            f"out_packed must have shape {(bsz, heads, 'cap', d * bits // 8)} ([B, H, cap, D*bits/8]), "
            f"got {tuple(out_packed.shape)}"
        )
    if tuple(out_norms.shape) != (bsz, heads, cap):
        raise ValueError(f"out_norms must have shape {(bsz, heads, cap)}, got {tuple(out_norms.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset + seq > cap:
        raise ValueError(f"tokens [offset, offset + S) = [{offset}, {offset + seq}) exceed the capacity {cap}")
    if seq == 0 or bsz == 0 or heads == 0:
        return

    if not use_triton(x, mean, rotation, out_packed) or d > _MAX_HEAD_DIM:
        packed, norms = compress_reference(x, mean, rotation, boundaries, bits)
        out_packed[:, :, offset : offset + seq] = packed
        out_norms[:, :, offset : offset + seq] = norms
        return

    if bsz * heads > 65535:
        raise ValueError(f"B * H ({bsz * heads}) must be <= 65535 (CUDA grid limit)")
    hdp = max(16, next_pow2(d))
    block_s = 16
    block_c = 32
    bnd = boundaries.contiguous()
    grid = (triton.cdiv(seq, block_s), bsz * heads)
    _tq_compress_kernel[grid](
        x, *x.stride(),
        mean, *mean.stride(),
        rotation, *rotation.stride(),
        bnd,
        out_packed, *out_packed.stride(),
        out_norms, *out_norms.stride(),
        heads, seq, offset,
        BITS=bits, HEAD_DIM=d, HEAD_DP=hdp, BLOCK_S=block_s, BLOCK_C=block_c, DOT_PREC=_DOT_PREC,
        num_warps=4 if hdp <= 128 else 8,
    )  # fmt: skip
