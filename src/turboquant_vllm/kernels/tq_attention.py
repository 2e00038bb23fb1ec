"""Attention directly over the TurboQuant-compressed KV cache (Triton), plus its PyTorch reference.

Public API
----------
``tq_attention(query, kv, key_exact, value_exact, *, attention_mask, causal, scale, out)``
    Dense compressed layer (``layout.CompressedKV``): tokens ``[0, kv.length)`` of every batch row are
    compressed, ``key_exact`` / ``value_exact`` (original space, query dtype) follow them.
``tq_attention_paged(query, k_packed, k_norms, v_packed, v_norms, block_table, seq_lens, k_mean, v_mean,
codecs, *, key_exact, value_exact, causal, scale, out)``
    vLLM-style paged layout, per-sequence compressed lengths read on the device.

Both return ``[B, Sq, Hq, D]`` in the query dtype and equal (up to rounding) "dequantize with
``core.kvcodec.dequantize_reference``, concatenate the exact segment, float32 attention".

Math (docs/LAYOUT.md). With ``q_rot = q @ Pi.T`` the score of compressed key n is
``scale * (<q, k_mean> + k_norm[n] * <q_rot, centroids_k[idx_n]>)``; the ``<q, k_mean>`` term is kept
(one float per query row, computed once) because compressed and exact keys share one softmax. Values
are accumulated in the rotated space: ``acc_rot = sum_n p_n v_norm_n centroids_v[vidx_n]``; the output
of the compressed part is ``acc_rot @ Pi + (sum_n p_n) * v_mean``. The exact segment is attended in
the original space (no rotation of exact keys) and merged in the reduction.

Pipeline (3 launches for any call, decode included):
  1. ``_tq_qrot_kernel``   grid (MP / 16, B*Hkv): ``q_rot = q @ Pi.T`` and ``<q, k_mean>``, both pre-scaled
     by ``scale * log2(e)``, into a small scratch (rows of one GQA group packed as r = g * Sq + s);
     program (0, 0) also writes the K/V codebooks in the compute dtype (gathered per element below).
  2. ``_tq_attn_kernel``   grid (row blocks, NS_C + NS_E, B*Hkv): flash-decoding. Program (mb, split, bh)
     takes the BLOCK_M query rows ``mb`` of the whole GQA group of kv head bh, so every compressed
     tile is read once per group. Splits ``< NS_C`` walk a chunk of compressed tokens and build the
     [BLOCK_N, D] centroid tile in registers (``_dequant_tile``), then ``tl.dot`` for the scores (norms
     applied to the [M, N] score tile) and for P @ V (P pre-multiplied by the value norms). Tile
     building: 4-bit (and 2-bit) K/V in fp16/bf16 load the [BLOCK_N, D/2] ([BLOCK_N, D/4]) packed bytes
     with 16-byte loads and gather, per byte, both (all four) centroids from a 256-entry int32 (int64)
     table, so positions 2j, 2j+1 of the tile hold coordinates j, j + D/2 (4j + t: j + t D/4); q_rot
     is written in that permuted order and the back-rotation reads Pi's rows permuted likewise. Other
     bit widths (and fp32) unpack every coordinate (plane byte + shift + mask, docs/LAYOUT.md) and
     gather one centroid from the (L1-resident) codebook in the compute dtype. Splits ``>= NS_C`` walk
     a chunk of the exact segment in the original space with bottom-right causal masking. Each split
     writes float32 partials (m, l, acc) in base 2.
  3. ``_tq_reduce_kernel`` grid (cdiv(G*Sq, 16), B*Hkv): merges the partials, rotates the compressed
     accumulator back once (``@ Pi``), adds ``l_c * v_mean`` and the exact accumulators, divides by l,
     writes ``[B, Sq, Hq, D]`` (any strides) in the query dtype.
  Decode (G * Sq <= 128 rows, 64 for head_dim 256) uses one row block and splits the KV length over
  programs (target: 2 programs per SM). The split count comes from host-side numbers only: B*Hkv, the
  SM count and the token bound (``kv.length``, a host int, in the dense path; ``max_blocks *
  block_size`` in the paged path, whose per-sequence lengths are read on the device). No ``.item()``,
  ``.tolist()`` or other host sync in the launch path: the paged call is CUDA-graph capturable.
  Chunked prefill (more rows) tiles the rows in blocks of 128 (64 for head_dim 256); splits then
  shrink to about one per segment.

Bytes read per decode step, per token and per KV head (the roofline's numerator):
  compressed token: ``D * (k_bits + v_bits) / 8 + 8`` (packed K and V indices + two float32 norms);
  head_dim 128: TQ4 136 B, K4/V3 120 B, TQ3 104 B, TQ2 72 B (fp16 K/V: 512 B). The paged variant adds
  ``4 / block_size`` B of block table. Exact token: ``2 * D * itemsize`` B.
  Per (batch, kv head) and call, independent of the length: q (G*Sq*D*itemsize), Pi (D*D*4 from L2, in
  the rotation and reduction programs), means (2*D*4), and per split the float32 partials
  (G*Sq rows padded to >= 16, (D + 2) * 4 B each) written once and read once.

Tiles: BLOCK_M = max(16, next_pow2(G * Sq)) rows (decode) or 128 / 64 (prefill); BLOCK_N (autotuned on
GPU: 32 / 64 / 128 tokens, 4 / 8 warps; 16 under the interpreter); the head dim is padded to HEAD_DP =
next_pow2(D) with masks. Chunk of tokens per split: a multiple of 128 (of 16 under the interpreter).

Supported in the kernels: bits 1..8 for K and V independently (every plane layout of core/packing.py),
head_dim up to 256 (any multiple of 8; non-powers of two padded with masks), any GQA ratio, fp16 / bf16 /
fp32. head_dim > 256 falls back to the PyTorch path. CPU tensors use the PyTorch path unless the Triton
interpreter is on (tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..core.kvcodec import attention_reference, dequantize_reference
from ..layout import Codecs, CompressedKV
from ._common import FLOAT_DTYPES, check_tensor, interpreting, next_pow2, use_triton

__all__ = ["tq_attention", "tq_attention_paged"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2
_REDUCE_ROWS = 16  # rows per reduction / rotation program (minimum tl.dot M)
_MAX_GRID_YZ = 65535  # CUDA limit of grid dims 1 and 2


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _plane_bits(row_ptrs, d, ld_mask, stride_byte, W: tl.constexpr, R: tl.constexpr, START: tl.constexpr,
                LOW: tl.constexpr):  # fmt: skip
    """Bits of one plane (width W, R bytes, at byte START) for head-dim coordinates d, shifted to LOW.

    Coordinate c of the plane sits in byte START + c mod R at bit W * (c div R) (core/packing.py).
    row_ptrs [BLOCK_N, 1] uint8 pointers to each token's packed row; returns int32 [BLOCK_N, len(d)].
    """
    byte = START + d % R
    shift = W * (d // R)
    v = tl.load(row_ptrs + (byte * stride_byte)[None, :], mask=ld_mask, other=0).to(tl.int32)
    return ((v >> shift[None, :]) & ((1 << W) - 1)) << LOW


@triton.jit
def _unpack_idx(row_ptrs, d, ld_mask, stride_byte, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DP: tl.constexpr):  # fmt: skip
    """Codebook indices int32 [BLOCK_N, HEAD_DP] of BLOCK_N packed tokens (0 where ld_mask is False).

    Planes, widest first and lowest bits first: 8 -> [8]; otherwise the set bits of BITS among 4, 2, 1.
    The plane of width w starts at byte (BITS & ~(2w - 1)) * HEAD_DIM / 8 and holds bits from
    BITS & ~(2w - 1) (the widths before it).
    """
    idx = tl.zeros([BLOCK_N, HEAD_DP], dtype=tl.int32)
    if BITS == 8:
        idx += _plane_bits(row_ptrs, d, ld_mask, stride_byte, 8, HEAD_DIM, 0, 0)
    if (BITS & 4) != 0:
        idx += _plane_bits(row_ptrs, d, ld_mask, stride_byte, 4, HEAD_DIM // 2, 0, 0)
    if (BITS & 2) != 0:
        idx += _plane_bits(row_ptrs, d, ld_mask, stride_byte, 2, HEAD_DIM // 4,
                           (BITS & 4) * HEAD_DIM // 8, BITS & 4)  # fmt: skip
    if (BITS & 1) != 0:
        idx += _plane_bits(row_ptrs, d, ld_mask, stride_byte, 1, HEAD_DIM // 8,
                           (BITS & 6) * HEAD_DIM // 8, BITS & 6)  # fmt: skip
    return idx


@triton.jit
def _coord_of(p, FIELDS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Head-dim coordinate held at kernel position p of a dequantized tile (see _dequant_tile)."""
    return p // FIELDS + (p % FIELDS) * (HEAD_DIM // FIELDS)


@triton.jit
def _bits16(x, cdt: tl.constexpr):
    """float32 -> the 16-bit pattern of x in cdt, as a non-negative int32."""
    return x.to(cdt).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _build_table(c_ptr, tab_ptr, LEVELS: tl.constexpr, FIELDS: tl.constexpr, cdt: tl.constexpr):
    """Codebook table read by _dequant_tile. FIELDS = 1: the centroids in cdt. FIELDS = 2 (4 bits):
    int32 [256], entry b = bits(c[b & 15]) | bits(c[b >> 4]) << 16. FIELDS = 4 (2 bits): int64 [256],
    field t (16 bits at 16 t) = bits(c[(b >> 2 t) & 3])."""
    if FIELDS == 1:
        lv = tl.arange(0, LEVELS)
        tl.store(tab_ptr + lv, tl.load(c_ptr + lv).to(cdt))
    elif FIELDS == 2:
        b = tl.arange(0, 256)
        lo = _bits16(tl.load(c_ptr + (b & 15)), cdt)
        hi = _bits16(tl.load(c_ptr + (b >> 4)), cdt)
        tl.store(tab_ptr + b, lo | (hi << 16))
    else:
        b = tl.arange(0, 256)
        e = tl.zeros([256], dtype=tl.int64)
        for t in tl.static_range(4):
            e = e | (_bits16(tl.load(c_ptr + ((b >> (2 * t)) & 3)), cdt).to(tl.int64) << (16 * t))
        tl.store(tab_ptr + b, e)


@triton.jit
def _dequant_tile(row_ptrs, nmask, stride_byte, tab_ptr, cdt: tl.constexpr, BITS: tl.constexpr,
                  FIELDS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DP: tl.constexpr):  # fmt: skip
    """centroids[idx] of BLOCK_N packed tokens as a [BLOCK_N, HEAD_DP] tile in the compute dtype.

    FIELDS = 1 (any bits): position p = coordinate p; per element a shift/mask unpack and a gather.
    FIELDS = 2 (4 bits, 16-bit dtypes): byte j holds coordinates j and j + D/2; one int32 gather per
    byte returns both centroids, placed at positions 2j and 2j + 1.
    FIELDS = 4 (2 bits, 16-bit dtypes): byte j holds j + t D/4 (t < 4); one int64 gather, positions 4j + t.
    I.e. position p holds coordinate _coord_of(p) = p // F + (p % F) * D / F; q_rot (scores) and the
    back-rotation (values) use the same permutation. Positions >= HEAD_DIM hold junk (masked elsewhere).
    """
    if FIELDS == 1:
        d = tl.arange(0, HEAD_DP)
        idx = _unpack_idx(row_ptrs, d, nmask[:, None] & (d < HEAD_DIM)[None, :], stride_byte, BITS, HEAD_DIM,
                          BLOCK_N, HEAD_DP)  # fmt: skip
        tile = tl.load(tab_ptr + idx)
    elif FIELDS == 2:
        j = tl.arange(0, HEAD_DP // 2)
        byt = tl.load(row_ptrs + (j * stride_byte)[None, :], mask=nmask[:, None] & (j < HEAD_DIM // 2)[None, :],
                      other=0).to(tl.int32)  # fmt: skip
        pr = tl.load(tab_ptr + byt)
        lo = (pr & 0xFFFF).to(tl.int16)
        hi = (pr >> 16).to(tl.int16)
        tile = tl.reshape(tl.join(lo, hi), [BLOCK_N, HEAD_DP]).to(cdt, bitcast=True)
    else:
        j = tl.arange(0, HEAD_DP // 4)
        byt = tl.load(row_ptrs + (j * stride_byte)[None, :], mask=nmask[:, None] & (j < HEAD_DIM // 4)[None, :],
                      other=0).to(tl.int32)  # fmt: skip
        qd = tl.load(tab_ptr + byt)
        w0 = (qd & 0xFFFF).to(tl.int16)
        w1 = ((qd >> 16) & 0xFFFF).to(tl.int16)
        w2 = ((qd >> 32) & 0xFFFF).to(tl.int16)
        w3 = ((qd >> 48) & 0xFFFF).to(tl.int16)
        tile = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, HEAD_DP]).to(cdt, bitcast=True)
    return tile


@triton.jit
def _tq_qrot_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    pi_ptr, stride_pr, stride_pc,
    km_ptr, stride_kmb, stride_kmh, stride_kmd,
    qr_ptr, qkm_ptr,
    kc_ptr, vc_ptr, ktab_ptr, vtab_ptr,
    HKV, SQ, M_TOTAL, MP, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr, K_LEVELS: tl.constexpr, V_LEVELS: tl.constexpr,
    K_FIELDS: tl.constexpr, V_FIELDS: tl.constexpr,
):  # fmt: skip
    """Rotate and pre-scale the queries of one GQA group; program (0, 0) also converts the codebooks.

    q    [B, Hq, Sq, D]          fp16/bf16/fp32   strides (stride_qb, stride_qh, stride_qs, stride_qd)
    pi   [D, D]                  float32          strides (stride_pr, stride_pc); x_rot = x @ Pi.T
    km   [B or 1, Hkv, D]        float32          strides (stride_kmb (0 to broadcast), stride_kmh, stride_kmd)
    qr   [B*Hkv, MP, HEAD_DP]    query dtype      contiguous; row r = g * Sq + s of kv head bh, pad rows/cols 0;
                                                  position p holds rotated coordinate _coord_of(p, K_FIELDS)
    qkm  [B*Hkv, MP]             float32          contiguous; scale * log2(e) * <q, k_mean>
    kc, vc [K_LEVELS], [V_LEVELS] float32         contiguous centroids
    ktab, vtab                                    contiguous tables built from kc / vc (_build_table): query
                                                  dtype [LEVELS] (FIELDS 1), int32 [256] (2), int64 [256] (4)
    Grid (MP / BLOCK_M, B * Hkv).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    if (pid_m == 0) & (bh == 0):
        _build_table(kc_ptr, ktab_ptr, K_LEVELS, K_FIELDS, qr_ptr.dtype.element_ty)
        _build_table(vc_ptr, vtab_ptr, V_LEVELS, V_FIELDS, qr_ptr.dtype.element_ty)
    b = bh // HKV
    kvh = bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M_TOTAL
    g = rows // SQ
    s = rows % SQ
    h = kvh * GROUP + g
    d = tl.arange(0, HEAD_DP)
    dmask = d < HEAD_DIM
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + s.to(tl.int64) * stride_qs
    q = tl.load(q_ptr + q_off[:, None] + (d * stride_qd)[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    km = tl.load(km_ptr + b * stride_kmb + kvh * stride_kmh + d * stride_kmd, mask=dmask, other=0.0)
    qkm = tl.sum(q * km[None, :], axis=1) * qk_scale
    row_lin = bh.to(tl.int64) * MP + rows
    tl.store(qkm_ptr + row_lin, qkm)
    for cb in tl.static_range(HEAD_DP // BLOCK_C):
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        # pit[k, c] = Pi[coord(c), k]: q_rot in the kernel's (permuted) position order
        pit = tl.load(pi_ptr + (_coord_of(c, K_FIELDS, HEAD_DIM) * stride_pr)[None, :] + (d * stride_pc)[:, None],
                      mask=dmask[:, None] & (c < HEAD_DIM)[None, :], other=0.0)  # fmt: skip
        y = tl.dot(q, pit, input_precision=DOT_PREC) * qk_scale
        tl.store(qr_ptr + row_lin[:, None] * HEAD_DP + c[None, :], y.to(qr_ptr.dtype.element_ty))


@triton.jit
def _online_softmax_step(sc, m_i, l_i):
    """One FlashAttention-2 step in base 2; returns (p, alpha, m_new, l_new). Fully masked rows stay 0."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@triton.jit(do_not_specialize=["n_comp", "se_len"])  # lengths change every decode step: one binary
def _tq_attn_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    qr_ptr, qkm_ptr,
    kp_ptr, stride_kpb, stride_kph, stride_kpn, stride_kpd,
    kn_ptr, stride_knb, stride_knh, stride_knn,
    vp_ptr, stride_vpb, stride_vph, stride_vpn, stride_vpd,
    vn_ptr, stride_vnb, stride_vnh, stride_vnn,
    kc_ptr, vc_ptr,
    bt_ptr, stride_btb, stride_btn, sl_ptr,
    ke_ptr, stride_keb, stride_keh, stride_kes, stride_ked,
    ve_ptr, stride_veb, stride_veh, stride_ves, stride_ved,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    wm_ptr, wl_ptr, wacc_ptr,
    HKV, SQ, M_TOTAL, MP, NS_C, NS, n_comp, se_len, chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, K_FIELDS: tl.constexpr, V_FIELDS: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr, CAUSAL_COMP: tl.constexpr, MASK_MODE: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Split-KV attention over compressed tokens (splits < NS_C) or the exact segment (splits >= NS_C).

    q     [B, Hq, Sq, D]              query dtype   strides (stride_qb, stride_qh, stride_qs, stride_qd)
    qr    [B*Hkv, MP, HEAD_DP]        query dtype   contiguous (from _tq_qrot_kernel, pre-scaled)
    qkm   [B*Hkv, MP]                 float32       contiguous (pre-scaled <q, k_mean>)
    kp    dense [B, Hkv, cap, D*kb/8] / paged [num_blocks, Hkv, PAGE_SIZE, D*kb/8]   uint8
          strides (stride_kpb, stride_kph, stride_kpn, stride_kpd)
    kn    dense [B, Hkv, cap] / paged [num_blocks, Hkv, PAGE_SIZE]  float32  strides (stride_knb, stride_knh,
          stride_knn)
    vp, vn    as kp, kn with v_bits
    kc, vc    codebook tables from _tq_qrot_kernel (_build_table; layout per K_FIELDS / V_FIELDS)
    bt    [B, max_blocks] int32  strides (stride_btb, stride_btn)       (PAGED only)
    sl    [B] int32 contiguous: compressed tokens per sequence        (PAGED only; dense: n_comp)
    ke/ve [B, Hkv, Se, D]             query dtype   strides (stride_ke*, stride_ve*)   (read when se_len > 0)
    mask  [B, Hq, Sq, Nc + Se] expanded view, uint8 (bool, 1 = attend) or additive float
          strides (stride_mb, stride_mh, stride_mq, stride_mk)         (read when MASK_MODE != 0)
    wm/wl [B*Hkv, NS, MP]             float32 contiguous: running max (base 2) / sum of each split
    wacc  [B*Hkv, NS, MP, HEAD_DP]    float32 contiguous: unnormalised accumulator (rotated space, position
          order _coord_of(., V_FIELDS), for compressed splits; original space for exact splits; the
          reduction tells them apart by index)
    Grid (row blocks, NS, B * Hkv).
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // HKV
    kvh = bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M_TOTAL
    g = rows // SQ
    s = rows % SQ
    h = kvh * GROUP + g
    d = tl.arange(0, HEAD_DP)
    dmask = d < HEAD_DIM
    nn = tl.arange(0, BLOCK_N)
    row_lin = bh.to(tl.int64) * MP + rows
    if PAGED:
        nc = tl.load(sl_ptr + b)
    else:
        nc = n_comp
    s_max = tl.max(tl.where(rmask, s, 0), axis=0)
    if MASK_MODE != 0:
        m_row = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + s.to(tl.int64) * stride_mq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    cdt = q_ptr.dtype.element_ty  # compute dtype of the tl.dot operands (= query dtype = qr dtype)

    if split < NS_C:
        start = split * chunk
        end = tl.minimum(start + chunk, nc)
        if CAUSAL_COMP:
            # bottom-right over the whole key sequence: key j visible to row s iff j <= s + nc + Se - Sq
            end = tl.minimum(end, s_max + nc + se_len - SQ + 1)
        qr = tl.load(qr_ptr + row_lin[:, None] * HEAD_DP + d[None, :])
        qkm = tl.load(qkm_ptr + row_lin)
        k_head = kvh.to(tl.int64) * stride_kph
        kn_head = kvh.to(tl.int64) * stride_knh
        v_head = kvh.to(tl.int64) * stride_vph
        vn_head = kvh.to(tl.int64) * stride_vnh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + nn
            nmask = n < end
            if PAGED:
                blk = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + (n // PAGE_SIZE) * stride_btn, mask=nmask,
                              other=0).to(tl.int64)  # fmt: skip
                slot = (n % PAGE_SIZE).to(tl.int64)
                k_row = blk * stride_kpb + slot * stride_kpn
                kn_row = blk * stride_knb + slot * stride_knn
                v_row = blk * stride_vpb + slot * stride_vpn
                vn_row = blk * stride_vnb + slot * stride_vnn
            else:
                n64 = n.to(tl.int64)
                k_row = b.to(tl.int64) * stride_kpb + n64 * stride_kpn
                kn_row = b.to(tl.int64) * stride_knb + n64 * stride_knn
                v_row = b.to(tl.int64) * stride_vpb + n64 * stride_vpn
                vn_row = b.to(tl.int64) * stride_vnb + n64 * stride_vnn
            kh = _dequant_tile(kp_ptr + (k_head + k_row)[:, None], nmask, stride_kpd, kc_ptr, cdt, K_BITS,
                               K_FIELDS, HEAD_DIM, BLOCK_N, HEAD_DP)  # fmt: skip
            kn = tl.load(kn_ptr + kn_head + kn_row, mask=nmask, other=0.0)
            sc = tl.dot(qr, tl.trans(kh), input_precision=DOT_PREC)
            sc = sc * kn[None, :] + qkm[:, None]
            valid = nmask[None, :]
            if CAUSAL_COMP:
                valid = valid & (n[None, :] <= (s + nc + se_len - SQ)[:, None])
            if MASK_MODE == 1:
                mv = tl.load(mask_ptr + m_row[:, None] + (n.to(tl.int64) * stride_mk)[None, :],
                             mask=rmask[:, None] & nmask[None, :], other=0)  # fmt: skip
                valid = valid & (mv != 0)
            sc = tl.where(valid, sc, float("-inf"))
            if MASK_MODE == 2:
                mv = tl.load(mask_ptr + m_row[:, None] + (n.to(tl.int64) * stride_mk)[None, :],
                             mask=rmask[:, None] & nmask[None, :], other=0.0)  # fmt: skip
                sc = sc + mv.to(tl.float32) * 1.4426950408889634
            p, alpha, m_i, l_i = _online_softmax_step(sc, m_i, l_i)
            vh = _dequant_tile(vp_ptr + (v_head + v_row)[:, None], nmask, stride_vpd, vc_ptr, cdt, V_BITS,
                               V_FIELDS, HEAD_DIM, BLOCK_N, HEAD_DP)  # fmt: skip
            vn = tl.load(vn_ptr + vn_head + vn_row, mask=nmask, other=0.0)
            pv = (p * vn[None, :]).to(cdt)
            acc = acc * alpha[:, None] + tl.dot(pv, vh, input_precision=DOT_PREC)
    else:
        start = (split - NS_C) * chunk
        end = tl.minimum(start + chunk, se_len)
        if CAUSAL:
            end = tl.minimum(end, s_max + se_len - SQ + 1)
        q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + s.to(tl.int64) * stride_qs
        q = tl.load(q_ptr + q_off[:, None] + (d * stride_qd)[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)  # fmt: skip
        q = (q.to(tl.float32) * qk_scale).to(cdt)
        ke_base = ke_ptr + b.to(tl.int64) * stride_keb + kvh.to(tl.int64) * stride_keh
        ve_base = ve_ptr + b.to(tl.int64) * stride_veb + kvh.to(tl.int64) * stride_veh
        for e0 in range(start, end, BLOCK_N):
            e = e0 + nn
            emask = e < end
            ld_mask = emask[:, None] & dmask[None, :]
            e64 = e.to(tl.int64)
            k = tl.load(ke_base + (e64 * stride_kes)[:, None] + (d * stride_ked)[None, :], mask=ld_mask, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            valid = emask[None, :]
            if CAUSAL:
                valid = valid & (e[None, :] <= (s + se_len - SQ)[:, None])
            key = (nc + e).to(tl.int64)
            if MASK_MODE == 1:
                mv = tl.load(mask_ptr + m_row[:, None] + (key * stride_mk)[None, :],
                             mask=rmask[:, None] & emask[None, :], other=0)  # fmt: skip
                valid = valid & (mv != 0)
            sc = tl.where(valid, sc, float("-inf"))
            if MASK_MODE == 2:
                mv = tl.load(mask_ptr + m_row[:, None] + (key * stride_mk)[None, :],
                             mask=rmask[:, None] & emask[None, :], other=0.0)  # fmt: skip
                sc = sc + mv.to(tl.float32) * 1.4426950408889634
            p, alpha, m_i, l_i = _online_softmax_step(sc, m_i, l_i)
            v = tl.load(ve_base + (e64 * stride_ves)[:, None] + (d * stride_ved)[None, :], mask=ld_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdt), v, input_precision=DOT_PREC)

    w_lin = (bh.to(tl.int64) * NS + split) * MP + rows
    tl.store(wm_ptr + w_lin, m_i)
    tl.store(wl_ptr + w_lin, l_i)
    tl.store(wacc_ptr + w_lin[:, None] * HEAD_DP + d[None, :], acc)


@triton.jit
def _tq_reduce_kernel(
    wm_ptr, wl_ptr, wacc_ptr,
    pi_ptr, stride_pr, stride_pc,
    vm_ptr, stride_vmb, stride_vmh, stride_vmd,
    o_ptr, stride_ob, stride_os, stride_oh, stride_od,
    HKV, SQ, M_TOTAL, MP, NS_C, NS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_PREC: tl.constexpr, V_FIELDS: tl.constexpr,
):  # fmt: skip
    """Merge the split partials, rotate the compressed part back, add v_mean, normalise, store.

    wm/wl [B*Hkv, NS, MP], wacc [B*Hkv, NS, MP, HEAD_DP]   float32 contiguous (from _tq_attn_kernel)
    pi    [D, D]               float32  strides (stride_pr, stride_pc); x = x_rot @ Pi
    vm    [B or 1, Hkv, D]     float32  strides (stride_vmb (0 to broadcast), stride_vmh, stride_vmd)
    o     [B, Sq, Hq, D]       query dtype  strides (stride_ob, stride_os, stride_oh, stride_od)
    Grid (cdiv(M_TOTAL, BLOCK_M), B * Hkv).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M_TOTAL
    g = rows // SQ
    s = rows % SQ
    h = kvh * GROUP + g
    d = tl.arange(0, HEAD_DP)
    base = bh.to(tl.int64) * NS * MP + rows

    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for sp in range(0, NS):
        m_all = tl.maximum(m_all, tl.load(wm_ptr + base + sp * MP))
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)

    l_c = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_rot = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    for sp in range(0, NS_C):
        w = tl.exp2(tl.load(wm_ptr + base + sp * MP) - m_safe)
        l_c += w * tl.load(wl_ptr + base + sp * MP)
        acc_rot += w[:, None] * tl.load(wacc_ptr + (base + sp * MP)[:, None] * HEAD_DP + d[None, :])
    l_all = l_c
    for sp in range(NS_C, NS):
        l_all = l_all + tl.exp2(tl.load(wm_ptr + base + sp * MP) - m_safe) * tl.load(wl_ptr + base + sp * MP)
    inv = tl.where(l_all > 0.0, 1.0 / tl.where(l_all > 0.0, l_all, 1.0), 0.0)

    o_row = b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
    for cb in tl.static_range(HEAD_DP // BLOCK_C):
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < HEAD_DIM
        # pi[p, c] = Pi[coord(p), c]: acc_rot positions are in the kernel's (permuted) order
        pi = tl.load(pi_ptr + (_coord_of(d, V_FIELDS, HEAD_DIM) * stride_pr)[:, None] + (c * stride_pc)[None, :],
                     mask=(d < HEAD_DIM)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        o = tl.dot(acc_rot, pi, input_precision=DOT_PREC)
        vm = tl.load(vm_ptr + b * stride_vmb + kvh * stride_vmh + c * stride_vmd, mask=cmask, other=0.0)
        o += l_c[:, None] * vm[None, :]
        for sp in range(NS_C, NS):
            w = tl.exp2(tl.load(wm_ptr + base + sp * MP) - m_safe)
            o += w[:, None] * tl.load(wacc_ptr + (base + sp * MP)[:, None] * HEAD_DP + c[None, :])
        o = o * inv[:, None]
        tl.store(o_ptr + o_row[:, None] + (c * stride_od)[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])  # fmt: skip


_ATTN_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [
        (32, 4, 1), (32, 4, 2), (32, 4, 3), (32, 8, 2),
        (64, 4, 1), (64, 4, 2), (64, 4, 3), (64, 8, 1), (64, 8, 2), (64, 8, 3),
        (128, 8, 1), (128, 8, 2),
    ]
]  # fmt: skip


def _prune_attn_configs(configs, named_args, **kwargs):
    """Drop tiles that spill registers on sm_90 (checked with ptxas). Configs that exceed shared memory
    are skipped by the autotuner itself (OutOfResources)."""
    hdp = kwargs.get("HEAD_DP", named_args.get("HEAD_DP"))
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    keep = []
    for c in configs:
        bn = c.kwargs["BLOCK_N"]
        if block_m >= 64 and bn > 64:
            continue
        if block_m * hdp >= 128 * 128 and c.num_warps == 4:
            continue
        keep.append(c)
    return keep or configs[:1]


@functools.cache
def _tuned_attn_kernel():
    return triton.autotune(
        configs=_ATTN_CONFIGS,
        key=["BLOCK_M", "HEAD_DP", "K_BITS", "V_BITS", "PAGED", "MASK_MODE", "CAUSAL"],
        prune_configs_by={"early_config_prune": _prune_attn_configs},
    )(_tq_attn_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------------
# Python side: validation
# --------------------------------------------------------------------------------------------------


def _check_codecs(codecs, head_dim: int, device: torch.device) -> None:
    if not isinstance(codecs, Codecs):
        raise TypeError(f"codecs must be a turboquant_vllm.layout.Codecs, got {type(codecs).__name__}")
    lay = codecs.layout
    if lay.head_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} differs from codecs.layout.head_dim {lay.head_dim}")
    check_tensor(codecs.rotation, "codecs.rotation", ndim=2, dtypes=(torch.float32,), device=device)
    if tuple(codecs.rotation.shape) != (head_dim, head_dim):
        raise ValueError(f"codecs.rotation must have shape {(head_dim, head_dim)}, got {tuple(codecs.rotation.shape)}")
    tables = (("k_centroids", codecs.k_centroids, lay.k_bits), ("v_centroids", codecs.v_centroids, lay.v_bits))
    for name, t, bits in tables:
        check_tensor(t, f"codecs.{name}", ndim=1, dtypes=(torch.float32,), device=device)
        if t.shape[0] != 1 << bits:
            raise ValueError(f"codecs.{name} must have 2**bits = {1 << bits} entries, got {t.shape[0]}")


def _check_query(query: torch.Tensor) -> None:
    check_tensor(query, "query", ndim=4, dtypes=FLOAT_DTYPES)


def _check_store(packed, norms, pname, nname, lead: tuple[int, ...], bits: int, head_dim: int, device) -> None:
    """packed uint8 [*lead, n, D*bits/8] and norms float32 [*lead, n] (lead = (rows, Hkv))."""
    check_tensor(packed, pname, ndim=4, dtypes=(torch.uint8,), device=device)
    check_tensor(norms, nname, ndim=3, dtypes=(torch.float32,), device=device)
    want = head_dim * bits // 8
    if packed.shape[-1] != want:
        raise ValueError(f"{pname} last dim must be head_dim * bits / 8 = {want}, got {packed.shape[-1]}")
    if tuple(packed.shape[:2]) != lead:
        raise ValueError(f"{pname} must have leading dims {lead}, got shape {tuple(packed.shape)}")
    if tuple(norms.shape) != tuple(packed.shape[:3]):
        raise ValueError(f"{nname} must have shape {tuple(packed.shape[:3])}, got {tuple(norms.shape)}")


def _check_mean(t, name: str, batch: int, hkv: int, head_dim: int, device, allow_one: bool) -> None:
    check_tensor(t, name, ndim=3, dtypes=(torch.float32,), device=device)
    ok_b = t.shape[0] == batch or (allow_one and t.shape[0] == 1)
    if not ok_b or tuple(t.shape[1:]) != (hkv, head_dim):
        want = f"[{batch}{' or 1' if allow_one else ''}, {hkv}, {head_dim}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def _check_exact(query, key_exact, value_exact, hkv: int):
    """Returns (key_exact, value_exact, Se) with empty segments normalised to None."""
    if (key_exact is None) != (value_exact is None):
        raise ValueError("key_exact and value_exact must both be given or both be None")
    if key_exact is None:
        return None, None, 0
    b, _, _, d = query.shape
    for name, t in (("key_exact", key_exact), ("value_exact", value_exact)):
        check_tensor(t, name, ndim=4, device=query.device)
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have the query dtype {query.dtype}, got {t.dtype}")
        if t.shape[0] != b or t.shape[1] != hkv or t.shape[3] != d:
            raise ValueError(f"{name} must have shape [{b}, {hkv}, Se, {d}], got {tuple(t.shape)}")
    if key_exact.shape != value_exact.shape:
        raise ValueError(
            f"key_exact and value_exact shapes differ: {tuple(key_exact.shape)} vs {tuple(value_exact.shape)}"
        )
    se = key_exact.shape[2]
    if se == 0:
        return None, None, 0
    return key_exact, value_exact, se


def _check_out(out, b: int, sq: int, hq: int, d: int, dtype, device) -> None:
    if out is None:
        return
    check_tensor(out, "out", ndim=4, device=device)
    if out.dtype != dtype:
        raise TypeError(f"out must have the query dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != (b, sq, hq, d):
        raise ValueError(f"out must have shape {(b, sq, hq, d)} ([B, Sq, Hq, D]), got {tuple(out.shape)}")


def _check_mask(mask, shape: tuple[int, int, int, int], device) -> torch.Tensor | None:
    """A 4-D expanded (stride-0 broadcast) view of the mask, or None."""
    if mask is None:
        return None
    check_tensor(mask, "attention_mask", device=device)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attention_mask must be bool or floating point, got {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"attention_mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} is not broadcastable to [B, Hq, Sq, Nc + Se] = {shape}"
        )
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.expand(shape)


# --------------------------------------------------------------------------------------------------
# PyTorch references (CPU path)
# --------------------------------------------------------------------------------------------------


def _finish(o32: torch.Tensor, dtype, out):
    if out is None:
        return o32.to(dtype)
    out.copy_(o32)
    return out


def _dense_reference(query, kv: CompressedKV, key_exact, value_exact, mask, causal, scale, out):
    c = kv.codecs
    lay = c.layout
    n = kv.length
    k = dequantize_reference(kv.k_packed[:, :, :n], kv.k_norms[:, :, :n], kv.k_mean, c.rotation, c.k_centroids,
                             lay.k_bits)  # fmt: skip
    v = dequantize_reference(kv.v_packed[:, :, :n], kv.v_norms[:, :, :n], kv.v_mean, c.rotation, c.v_centroids,
                             lay.v_bits)  # fmt: skip
    if key_exact is not None:
        k = torch.cat([k, key_exact.float()], dim=2)
        v = torch.cat([v, value_exact.float()], dim=2)
    o = attention_reference(query, k, v, attention_mask=mask, causal=causal, scale=scale)
    return _finish(o, query.dtype, out)


def _gather_pages(packed, block_table_row, n: int) -> torch.Tensor:
    """[num_blocks, Hkv, PS, ...] -> [1, Hkv, n, ...] for one sequence."""
    ps = packed.shape[2]
    nb = -(-n // ps)
    blocks = block_table_row[:nb].long()
    g = packed[blocks].transpose(0, 1)  # [Hkv, nb, PS, ...]
    g = g.reshape(g.shape[0], nb * ps, *g.shape[3:])
    return g[:, :n].unsqueeze(0)


def _paged_reference(query, k_packed, k_norms, v_packed, v_norms, block_table, seq_lens, k_mean, v_mean, codecs,
                     key_exact, value_exact, causal, scale, out):  # fmt: skip
    lay = codecs.layout
    bsz, _, sq, _ = query.shape
    se = 0 if key_exact is None else key_exact.shape[2]
    res = []
    for b, n in enumerate(seq_lens.tolist()):
        km = k_mean[b if k_mean.shape[0] > 1 else 0].unsqueeze(0)
        vm = v_mean[b if v_mean.shape[0] > 1 else 0].unsqueeze(0)
        k = dequantize_reference(_gather_pages(k_packed, block_table[b], n), _gather_pages(k_norms, block_table[b], n),
                                 km, codecs.rotation, codecs.k_centroids, lay.k_bits)  # fmt: skip
        v = dequantize_reference(_gather_pages(v_packed, block_table[b], n), _gather_pages(v_norms, block_table[b], n),
                                 vm, codecs.rotation, codecs.v_centroids, lay.v_bits)  # fmt: skip
        if key_exact is not None:
            k = torch.cat([k, key_exact[b : b + 1].float()], dim=2)
            v = torch.cat([v, value_exact[b : b + 1].float()], dim=2)
        mask = None
        if causal:
            i = torch.arange(sq, device=query.device).view(-1, 1)
            j = torch.arange(n + se, device=query.device).view(1, -1)
            mask = (j < n) | (j - n <= i + se - sq)
        res.append(attention_reference(query[b : b + 1], k, v, attention_mask=mask, scale=scale))
    o = torch.cat(res, dim=0) if res else query.new_zeros(0, sq, query.shape[1], query.shape[3], dtype=torch.float32)
    return _finish(o, query.dtype, out)


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def _fields(bits: int, dtype: torch.dtype) -> int:
    """Centroids fetched per gather (see _dequant_tile): 2 at 4 bits, 4 at 2 bits (16-bit dtypes), else 1."""
    if dtype in (torch.float16, torch.bfloat16):
        return {4: 2, 2: 4}.get(bits, 1)
    return 1


def _table_view(buf: torch.Tensor, fields: int, levels: int, dtype: torch.dtype) -> torch.Tensor:
    """The codebook table (written by _tq_qrot_kernel) as a typed view of 2048 scratch bytes."""
    if fields == 1:
        return buf.view(dtype)[:levels]
    return buf.view(torch.int32 if fields == 2 else torch.int64)[:256]


def _plan(query, hkv: int, max_tokens: int, se: int, num_kv_splits: int | None):
    """Tile shapes and split counts from shapes only (no device reads)."""
    bsz, hq, sq, d = query.shape
    group = hq // hkv
    rows = group * sq
    hdp = max(16, next_pow2(d))
    interp = interpreting()
    single_max = 128 if hdp <= 128 else 64
    if rows <= single_max:
        block_m = max(16, next_pow2(rows))
        m_blocks = 1
    else:
        # chunked prefill: big row tiles amortise the unpack + centroid gathers over more query rows
        block_m = single_max
        m_blocks = triton.cdiv(rows, block_m)
    mp = m_blocks * block_m
    align = 16 if interp else 128  # chunk multiple of every autotuned BLOCK_N
    total = max(1, max_tokens + se)
    if num_kv_splits is not None:
        want = int(num_kv_splits)
        if want < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    else:
        target = 16 if interp else 2 * _num_sms(query.device.index or 0)
        want = triton.cdiv(target, bsz * hkv * m_blocks)
    want = max(1, min(want, triton.cdiv(total, align)))
    chunk = triton.cdiv(triton.cdiv(total, want), align) * align
    ns_c = max(1, triton.cdiv(max_tokens, chunk))
    ns_e = triton.cdiv(se, chunk)
    return group, rows, hdp, block_m, m_blocks, mp, chunk, ns_c, ns_e


def _launch(query, *, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens, max_tokens,
            key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits):  # fmt: skip
    bsz, hq, sq, d = query.shape
    hkv = kp.shape[1]
    se = 0 if key_exact is None else key_exact.shape[2]
    group, rows, hdp, block_m, m_blocks, mp, chunk, ns_c, ns_e = _plan(query, hkv, max_tokens, se, num_kv_splits)
    ns = ns_c + ns_e
    bh = bsz * hkv
    dev = query.device
    lay = codecs.layout
    scale = d**-0.5 if scale is None else float(scale)
    qk_scale = scale * _LOG2E
    # float32 queries: 3xTF32 (float32-level accuracy on tensor cores; "ieee" FMA dots spill on sm_90).
    dot_prec = "tf32x3" if query.dtype == torch.float32 else "tf32"
    block_c = min(hdp, 32)
    aux_warps = 8 if hdp > 128 else 4
    if out is None:
        out = torch.empty(bsz, sq, hq, d, device=dev, dtype=query.dtype)
    if bsz == 0 or hq == 0 or sq == 0:
        return out
    if bh > _MAX_GRID_YZ or ns > _MAX_GRID_YZ:
        raise ValueError(f"B * Hkv ({bh}) and the KV split count ({ns}) must be <= {_MAX_GRID_YZ} (CUDA grid limit)")

    qr = torch.empty(bh, mp, hdp, device=dev, dtype=query.dtype)
    qkm = torch.empty(bh, mp, device=dev, dtype=torch.float32)
    k_levels, v_levels = 1 << lay.k_bits, 1 << lay.v_bits
    k_fields, v_fields = _fields(lay.k_bits, query.dtype), _fields(lay.v_bits, query.dtype)
    tabs = torch.empty(2, 2048, device=dev, dtype=torch.uint8)
    ktab = _table_view(tabs[0], k_fields, k_levels, query.dtype)
    vtab = _table_view(tabs[1], v_fields, v_levels, query.dtype)
    wm = torch.empty(bh, ns, mp, device=dev, dtype=torch.float32)
    wl = torch.empty(bh, ns, mp, device=dev, dtype=torch.float32)
    wacc = torch.empty(bh, ns, mp, hdp, device=dev, dtype=torch.float32)
    pi = codecs.rotation
    kmb = k_mean.stride(0) if k_mean.shape[0] > 1 else 0
    vmb = v_mean.stride(0) if v_mean.shape[0] > 1 else 0

    _tq_qrot_kernel[(mp // _REDUCE_ROWS, bh)](
        query, *query.stride(),
        pi, *pi.stride(),
        k_mean, kmb, k_mean.stride(1), k_mean.stride(2),
        qr, qkm,
        codecs.k_centroids.contiguous(), codecs.v_centroids.contiguous(), ktab, vtab,
        hkv, sq, rows, mp, qk_scale,
        GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, BLOCK_M=_REDUCE_ROWS, BLOCK_C=block_c, DOT_PREC=dot_prec,
        K_LEVELS=k_levels, V_LEVELS=v_levels, K_FIELDS=k_fields, V_FIELDS=v_fields,
        num_warps=aux_warps,
    )  # fmt: skip

    ke = key_exact if key_exact is not None else query
    ve = value_exact if value_exact is not None else query
    if mask is None:
        mask_mode, mask_t, mstr = _MASK_NONE, query, (0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        mask_mode, mask_t = _MASK_BOOL, mask.view(torch.uint8)
        mstr = mask_t.stride()
    else:
        mask_mode, mask_t, mstr = _MASK_ADD, mask, mask.stride()
    if paged:
        bt, bt_str, sl, page = block_table, block_table.stride(), seq_lens, kp.shape[2]
    else:
        bt, bt_str, sl, page = kn, (0, 0), kn, 1
    args = (
        query, *query.stride(),
        qr, qkm,
        kp, *kp.stride(), kn, *kn.stride(),
        vp, *vp.stride(), vn, *vn.stride(),
        ktab, vtab,
        bt, *bt_str, sl,
        ke, *ke.stride(), ve, *ve.stride(),
        mask_t, *mstr,
        wm, wl, wacc,
        hkv, sq, rows, mp, ns_c, ns, n_comp, se, chunk, qk_scale,
    )  # fmt: skip
    meta = dict(
        GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, K_BITS=lay.k_bits, V_BITS=lay.v_bits, K_FIELDS=k_fields,
        V_FIELDS=v_fields, PAGED=paged,
        PAGE_SIZE=page, CAUSAL=bool(causal), CAUSAL_COMP=bool(causal_comp), MASK_MODE=mask_mode,
        DOT_PREC=dot_prec, BLOCK_M=block_m,
    )  # fmt: skip
    grid = (m_blocks, ns, bh)
    if interpreting():
        _tq_attn_kernel[grid](*args, **meta, BLOCK_N=16, num_warps=4)
    else:
        _tuned_attn_kernel()[grid](*args, **meta)

    _tq_reduce_kernel[(triton.cdiv(rows, _REDUCE_ROWS), bh)](
        wm, wl, wacc,
        pi, *pi.stride(),
        v_mean, vmb, v_mean.stride(1), v_mean.stride(2),
        out, *out.stride(),
        hkv, sq, rows, mp, ns_c, ns,
        GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, BLOCK_M=_REDUCE_ROWS, BLOCK_C=block_c, DOT_PREC=dot_prec,
        V_FIELDS=v_fields, num_warps=aux_warps,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def tq_attention(
    query: torch.Tensor,
    kv: CompressedKV,
    key_exact: torch.Tensor | None,
    value_exact: torch.Tensor | None,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
) -> torch.Tensor:
    """Attention of `query` over a compressed past followed by an exact segment.

    query [B, Hq, Sq, D] fp16/bf16/fp32 in the original (unrotated) space, any strides.
    kv: compressed tokens [0, kv.length) of every batch row (layout.CompressedKV).
    key_exact / value_exact [B, Hkv, Se, D] (query dtype) or None: keys at positions Nc .. Nc + Se - 1.
    attention_mask: bool (True = attend) or additive, broadcastable to [B, Hq, Sq, Nc + Se].
    causal: bottom-right aligned over the whole key sequence (query i sees keys j <= i + Nc + Se - Sq).
    out: optional [B, Sq, Hq, D] output (query dtype). num_kv_splits: override the split heuristic
    (tests / benchmarks). Returns [B, Sq, Hq, D] in the query dtype. GQA: q head h uses kv head h // G.
    """
    _check_query(query)
    if not isinstance(kv, CompressedKV):
        raise TypeError(f"kv must be a turboquant_vllm.layout.CompressedKV, got {type(kv).__name__}")
    bsz, hq, sq, d = query.shape
    dev = query.device
    _check_codecs(kv.codecs, d, dev)
    lay = kv.codecs.layout
    check_tensor(kv.k_packed, "kv.k_packed", ndim=4, dtypes=(torch.uint8,), device=dev)
    hkv = kv.k_packed.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the kv heads ({hkv})")
    _check_store(kv.k_packed, kv.k_norms, "kv.k_packed", "kv.k_norms", (bsz, hkv), lay.k_bits, d, dev)
    _check_store(kv.v_packed, kv.v_norms, "kv.v_packed", "kv.v_norms", (bsz, hkv), lay.v_bits, d, dev)
    if kv.v_packed.shape[2] != kv.k_packed.shape[2]:
        raise ValueError(
            f"kv.v_packed capacity {kv.v_packed.shape[2]} differs from kv.k_packed capacity {kv.k_packed.shape[2]}"
        )
    _check_mean(kv.k_mean, "kv.k_mean", bsz, hkv, d, dev, allow_one=False)
    _check_mean(kv.v_mean, "kv.v_mean", bsz, hkv, d, dev, allow_one=False)
    n = kv.length
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"kv.length must be an int, got {type(n).__name__}")
    if not 0 <= n <= kv.k_packed.shape[2]:
        raise ValueError(f"kv.length must be in [0, capacity = {kv.k_packed.shape[2]}], got {n}")
    key_exact, value_exact, se = _check_exact(query, key_exact, value_exact, hkv)
    mask = _check_mask(attention_mask, (bsz, hq, sq, n + se), dev)
    _check_out(out, bsz, sq, hq, d, query.dtype, dev)

    tensors = [query, kv.k_packed, kv.v_packed, kv.codecs.rotation]
    if not use_triton(*tensors) or d > _MAX_HEAD_DIM:
        # PyTorch path: CPU without the interpreter, or head_dim > 256 (not tiled by the kernels).
        return _dense_reference(query, kv, key_exact, value_exact, mask, causal, scale, out)
    return _launch(
        query, paged=False, kp=kv.k_packed, kn=kv.k_norms, vp=kv.v_packed, vn=kv.v_norms, k_mean=kv.k_mean,
        v_mean=kv.v_mean, codecs=kv.codecs, n_comp=n, block_table=None, seq_lens=None, max_tokens=n,
        key_exact=key_exact, value_exact=value_exact, mask=mask, causal=causal, causal_comp=causal and se < sq,
        scale=scale, out=out, num_kv_splits=num_kv_splits,
    )  # fmt: skip


def tq_attention_paged(
    query: torch.Tensor,
    k_packed: torch.Tensor,
    k_norms: torch.Tensor,
    v_packed: torch.Tensor,
    v_norms: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    k_mean: torch.Tensor,
    v_mean: torch.Tensor,
    codecs: Codecs,
    *,
    key_exact: torch.Tensor | None = None,
    value_exact: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
) -> torch.Tensor:
    """Attention over a paged compressed cache (vLLM-style), per-sequence lengths read on the device.

    query [B, Hq, Sq, D]; k_packed uint8 [num_blocks, Hkv, block_size, D*k_bits/8]; k_norms float32
    [num_blocks, Hkv, block_size] (v likewise); block_table int32 [B, max_blocks]; seq_lens int32 [B]
    (compressed tokens of each sequence, <= max_blocks * block_size); k_mean / v_mean float32 [B or 1, Hkv, D].
    Optional exact segment key_exact / value_exact [B, Hkv, Se, D] following each sequence's compressed
    tokens. All compressed tokens precede all queries; `causal` (bottom-right) applies to the exact
    segment: query i sees exact key e iff e <= i + Se - Sq. Returns [B, Sq, Hq, D] in the query dtype.
    No host sync on CUDA inputs (CUDA-graph friendly for fixed shapes).
    """
    _check_query(query)
    bsz, hq, sq, d = query.shape
    dev = query.device
    _check_codecs(codecs, d, dev)
    lay = codecs.layout
    check_tensor(k_packed, "k_packed", ndim=4, dtypes=(torch.uint8,), device=dev)
    nblk, hkv, page = k_packed.shape[:3]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of the kv heads ({hkv})")
    _check_store(k_packed, k_norms, "k_packed", "k_norms", (nblk, hkv), lay.k_bits, d, dev)
    _check_store(v_packed, v_norms, "v_packed", "v_norms", (nblk, hkv), lay.v_bits, d, dev)
    if v_packed.shape[2] != page:
        raise ValueError(f"v_packed block_size {v_packed.shape[2]} differs from k_packed block_size {page}")
    check_tensor(block_table, "block_table", ndim=2, dtypes=(torch.int32,), device=dev)
    if block_table.shape[0] != bsz:
        raise ValueError(f"block_table must have shape [{bsz}, max_blocks], got {tuple(block_table.shape)}")
    check_tensor(seq_lens, "seq_lens", ndim=1, dtypes=(torch.int32,), device=dev)
    if seq_lens.shape[0] != bsz:
        raise ValueError(f"seq_lens must have shape [{bsz}], got {tuple(seq_lens.shape)}")
    _check_mean(k_mean, "k_mean", bsz, hkv, d, dev, allow_one=True)
    _check_mean(v_mean, "v_mean", bsz, hkv, d, dev, allow_one=True)
    key_exact, value_exact, se = _check_exact(query, key_exact, value_exact, hkv)
    _check_out(out, bsz, sq, hq, d, query.dtype, dev)

    tensors = [query, k_packed, v_packed, block_table, seq_lens, codecs.rotation]
    if not use_triton(*tensors) or d > _MAX_HEAD_DIM:
        return _paged_reference(query, k_packed, k_norms, v_packed, v_norms, block_table, seq_lens, k_mean, v_mean,
                                codecs, key_exact, value_exact, causal, scale, out)  # fmt: skip
    if not seq_lens.is_contiguous():
        seq_lens = seq_lens.contiguous()
    return _launch(
        query, paged=True, kp=k_packed, kn=k_norms, vp=v_packed, vn=v_norms, k_mean=k_mean, v_mean=v_mean,
        codecs=codecs, n_comp=0, block_table=block_table, seq_lens=seq_lens,
        max_tokens=block_table.shape[1] * page, key_exact=key_exact, value_exact=value_exact, mask=None,
        causal=causal, causal_comp=False, scale=scale, out=out, num_kv_splits=num_kv_splits,
    )  # fmt: skip
