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
(one float per query row) because compressed and exact keys share one softmax. Values are accumulated
in the rotated space: ``acc_rot = sum_n p_n v_norm_n centroids_v[vidx_n]``; the compressed part's output
is ``acc_rot @ Pi + (sum_n p_n) * v_mean``. The exact segment is attended in the original space.

Pipeline: 3 launches for any call, decode included.
  0. ``_tq_qrot_kernel``   grid (blocks of 64 of the B*Hkv*G*Sq query rows, column blocks):
     ``q_rot = scale * log2(e) * q @ Pi.T`` and ``scale * log2(e) * <q, k_mean>`` once per call (tl.dot, tf32 /
     3xTF32 for float32), float32, in the workspace allocation after the partials. No split program reads Pi.
  1. ``_tq_attn_kernel``   grid (row blocks, B*Hkv, NS_C + NS_E): flash-decoding. Program (mb, bh, split)
     takes BLOCK_M query rows of the whole GQA group of kv head bh (rows r = g * Sq + s), so every
     compressed tile is read once per group.
     Splits ``< NS_C`` walk a chunk of compressed tokens:
       prologue: the rotated query rows and ``<q, k_mean>`` from step 0, gathered into the column order of the
       K tiles (below) and kept in registers.
       loop: per tile of BLOCK_N tokens, each plane of the packed K (then V) bytes is loaded ONCE, as a
       [BLOCK_N, R_W / E] tile of E-byte units (E = 4 at 4 bits, 2 at 2 / 3 bits for head_dim 128: 16-byte
       vector loads), prefetched one tile ahead by hand so the HBM latency overlaps the compute. The head dim
       is split into NT = E * 8 / W sub-tiles (W: widest plane): sub-tile T = (byte e = T % E of each unit,
       field f = T // E of that byte) holds coordinates E * col + e + f * R_W, so its indices are ONE shift
       (and, for 3 / 5 bits, one more shift and a bit-select per extra plane) of the unit tile: no byte
       extraction, no per-element loads of the packed data. Centroids: on the GPU (bits <= 5) a warp shuffle
       per element from a register holding, in lane l, codebook entry l mod 2**bits (no address arithmetic,
       no memory); otherwise (and in the interpreter) a load per element from the <= 1 KB codebook in the
       compute dtype, addressed as aligned_base | idx * itemsize (one L1 wavefront per warp at 4 bits). The NT
       sub-tiles are placed side by side with tl.join (register-local) into one [BLOCK_N, NT * UWP] tile whose
       columns are a fixed permutation of the coordinates (_tile_coords); q_rot and the back-rotation use the
       same permutation (Pi's rows gathered accordingly), so ONE tl.dot per tile for the scores and one for
       P @ V (norms applied to the [M, N] score tile; P pre-multiplied by the value norms).
       epilogue: the unnormalised partial is stored in the rotated space, each column at its coordinate.
     Splits ``>= NS_C`` walk a chunk of the exact segment in the original space with bottom-right causal
     masking. Every split writes float32 partials (m, l in base 2, unnormalised acc) to one workspace.
     Decode has a second form of the compressed splits, the sub-tile path (``_comp_subtiles``, SUBTILE):
       one warp per program, no joined tile. The scores are sum_T q_rot[:, sub-tile T] . centroids(T)^T
       (one tl.dot per sub-tile) and the values accumulate into one rotated-space accumulator per sub-tile.
       Every dot operand is an elementwise function of the packed units (a shift, then GATHER 2: the warp
       shuffle inside one unary inline-asm block whose lane table comes from immediates), so the compiler
       converts the packed units to the MMA operand layout (4 bytes per 8 codes at 4 bits) rather than 16-bit
       values, and shared memory carries ~1 wavefront per token per head instead of ~18. 4-bit codes with a
       symmetric codebook (Lloyd-Max's), head_dim <= 128, take GATHER 3 instead: one unary inline-asm block per
       two units returns all eight sub-tiles' fp16x2 operand registers from byte permutes, no shuffle
       (_permute_asm; 16 x 32K 15% faster on the H100, the same outputs bit for bit). Taken for every
       decode-sized row block (<= 16 rows) in 16-bit (``_use_subtile``, tiles from ``_decode_config``;
       benchmarks/RESULTS.md has the measurements).
  2. ``_tq_reduce_kernel`` grid (row tiles, column blocks): merges the NS partials of each output row with
     all splits loaded at once (no serial chain of loads): the compressed splits' rotated partials are merged
     and multiplied by Pi (``o = R @ Pi + L_c * v_mean``), the exact splits' added in the original space;
     divides by l, writes ``[B, Sq, Hq, D]`` (any strides) in the query dtype.
  Host side: a call is planned from host numbers only (shapes, strides, lengths, dtypes, alignments: _call_key)
  and its three launches recorded (_CallPlan); the next call with the same key (the other layers of a decode
  step) allocates its workspace, fills in its addresses and launches the same compiled kernels (~2x less host
  time per call on the H100 host, benchmarks/RESULTS.md).
  Decode (G * Sq <= 128 rows; 64 for head_dim 256, 32 for float32) uses one row block and splits the KV length over
  programs (``_num_splits``: enough programs for ~8 resident one-warp programs per SM on the sub-tile path, ~2
  otherwise, in one wave where possible, chunk >= 128 tokens, sized for the compressed tokens). The split
  count
  comes from host-side numbers only: B*Hkv, the SM count and the token bound (``kv.length``, a host int,
  in the dense path; ``max_blocks * block_size`` in the paged path, whose per-sequence lengths are read
  on the device). No ``.item()``, ``.tolist()`` or other host sync in the launch path: the paged call is
  CUDA-graph capturable. Chunked prefill (more rows) tiles the rows in blocks of 128 (64 for head_dim
  256); splits then shrink to about one per segment.

Bytes read per decode step, per token and per KV head (the roofline's numerator):
  compressed token: ``D * (k_bits + v_bits) / 8 + 4`` (packed K and V indices + two bfloat16 norms);
  head_dim 128: TQ4 132 B, K4/V3 116 B, TQ3 100 B, TQ2 68 B (fp16 K/V: 512 B). The paged variant adds
  ``4 / block_size`` B of block table. Exact token: ``2 * D * itemsize`` B.
  Per program, independent of the length: the rotated query rows (D * 4 B per row) and the float32 partials
  ((D + 2) * 4 B per row) written once and read once. Per call: Pi once per row block in steps 0 and 2.

Tiles: BLOCK_M = max(16, next_pow2(G * Sq)) rows (decode) or 128 / 64 / 32 (prefill; 16-bit head_dim
<= 128 / 256 / float32); BLOCK_N: the sub-tile decode path uses ``_decode_config`` (32 or 64 tokens, one warp),
the joined path is autotuned on GPU (32 / 64 / 128 tokens, 4 / 8 warps, configs that spill on sm_90 pruned);
16 under the interpreter. Sub-tile widths are padded to a power of two >= 16 with masks
(head_dim 96, 4 bits: 24 -> 32). Packed views that are not aligned to E bytes fall back to E = 1. Chunk of
tokens per split: a multiple of 128 (16 under the interpreter).

Supported in the kernels: bits 1..8 for K and V independently (every plane layout of core/packing.py;
2, 3 and 4 are the fast ones), head_dim up to 256 (any multiple of 8; non-powers of two padded with
masks), any GQA ratio, fp16 / bf16 / fp32. head_dim > 256 falls back to the PyTorch path. CPU tensors use
the PyTorch path unless the Triton interpreter is on (tests).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (sm_90+): Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

from ..core.kvcodec import attention_reference, dequantize_reference
from ..core.packing import planes
from ..layout import NORM_DTYPE, Codecs, CompressedKV
from ._common import FLOAT_DTYPES, check_tensor, interpreting, next_pow2, use_triton
from ._launch import Launcher, Replay, fast_launch_enabled

__all__ = ["tq_attention", "tq_attention_paged"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2
_MAX_GRID_YZ = 65535  # CUDA limit of grid dims 1 and 2


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a ConstexprFunction in Triton 3.9: ~10 us a call from Python)."""
    return -(-a // b)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_units(row_ptrs, nmask, stride_byte, BITS: tl.constexpr, W: tl.constexpr, E: tl.constexpr,
                HEAD_DIM: tl.constexpr, UWP: tl.constexpr):  # fmt: skip
    """Every plane of BLOCK_N packed rows, loaded once, as int32 tiles (u8, u4, u2, u1) of [BLOCK_N, UWP] units.

    A unit is E bytes (uint32 / uint16 / uint8). Planes (core/packing.py): 8 -> [8]; else the set bits of
    BITS among 4, 2, 1, widest (W) first, starting at byte (BITS & ~(2w - 1)) * HEAD_DIM / 8, R_p =
    HEAD_DIM * w / 8 bytes each. Column col < UW = R_W / E of a plane tile holds unit col mod (R_p / E):
    one contiguous run for the widest plane (16-byte vector loads), R_W / R_p runs for narrower ones.
    Columns >= UW and rows outside nmask are 0; absent planes are returned as nmask. E > 1 needs unit
    stride between the bytes of a row (checked by the launcher).
    """
    col = tl.arange(0, UWP)
    lmask = nmask[:, None] & (col < HEAD_DIM * W // 8 // E)[None, :]
    if E == 4:
        ptrs = row_ptrs.to(tl.pointer_type(tl.uint32))
    elif E == 2:
        ptrs = row_ptrs.to(tl.pointer_type(tl.uint16))
    else:
        ptrs = row_ptrs
    u8 = nmask
    u4 = nmask
    u2 = nmask
    u1 = nmask
    if E == 1:
        if BITS == 8:
            u8 = tl.load(ptrs + (col * stride_byte)[None, :], mask=lmask, other=0).to(tl.int32)
        else:
            if (BITS & 4) != 0:
                off = _wrap(col, HEAD_DIM // 2, UWP)
                u4 = tl.load(ptrs + (off * stride_byte)[None, :], mask=lmask, other=0).to(tl.int32)
            if (BITS & 2) != 0:
                off = (BITS & 4) * HEAD_DIM // 8 + _wrap(col, HEAD_DIM // 4, UWP)
                u2 = tl.load(ptrs + (off * stride_byte)[None, :], mask=lmask, other=0).to(tl.int32)
            if (BITS & 1) != 0:
                off = (BITS & 6) * HEAD_DIM // 8 + _wrap(col, HEAD_DIM // 8, UWP)
                u1 = tl.load(ptrs + (off * stride_byte)[None, :], mask=lmask, other=0).to(tl.int32)
    else:
        if BITS == 8:
            u8 = tl.load(ptrs + col[None, :], mask=lmask, other=0).to(tl.int32)
        else:
            if (BITS & 4) != 0:
                off = _wrap(col, HEAD_DIM // 2 // E, UWP)
                u4 = tl.load(ptrs + off[None, :], mask=lmask, other=0).to(tl.int32)
            if (BITS & 2) != 0:
                off = (BITS & 4) * HEAD_DIM // 8 // E + _wrap(col, HEAD_DIM // 4 // E, UWP)
                u2 = tl.load(ptrs + off[None, :], mask=lmask, other=0).to(tl.int32)
            if (BITS & 1) != 0:
                off = (BITS & 6) * HEAD_DIM // 8 // E + _wrap(col, HEAD_DIM // 8 // E, UWP)
                u1 = tl.load(ptrs + off[None, :], mask=lmask, other=0).to(tl.int32)
    return u8, u4, u2, u1


@triton.jit
def _wrap(col, PERIOD: tl.constexpr, UWP: tl.constexpr):
    """col mod PERIOD, written so that the compiler still sees a contiguous run when it needs no wrap (the
    widest plane: 16-byte vector loads)."""
    if PERIOD >= UWP:
        return col
    else:
        return col % PERIOD


@triton.jit
def _field(u, T: tl.constexpr, W_PL: tl.constexpr, R_PL: tl.constexpr, LOW: tl.constexpr, W: tl.constexpr,
           E: tl.constexpr, HEAD_DIM: tl.constexpr, UWP: tl.constexpr, LG: tl.constexpr,
           MASK: tl.constexpr = True):  # fmt: skip
    """Index bits of sub-tile T held by one plane tile u (width W_PL, R_PL bytes), already shifted to their
    byte offset in the codebook table: bits LOW .. LOW + W_PL - 1 of the index, times 2**LG. MASK=False
    leaves whatever other bits the shift brought along (the shuffle gather masks or ignores them).

    Sub-tile T covers coordinates c = E * col + e + f * R_W (e = T % E, f = T // E; R_W: widest plane).
    In plane p, c sits in unit col mod (R_PL / E), byte e, bit W_PL * (f * R_W / R_PL + col div (R_PL / E)).
    """
    R_W = HEAD_DIM * W // 8
    UW = R_W // E
    DIV = R_PL // E
    DST = LOW + LG
    M = ((1 << W_PL) - 1) << DST
    s0 = 8 * (T % E) + W_PL * (T // E) * (R_W // R_PL)
    if DIV >= UW:  # the widest plane: one shift
        if not MASK:
            r = u >> s0
        elif s0 >= DST:
            r = (u >> (s0 - DST)) & M
        else:
            r = (u << (DST - s0)) & M
    else:  # a narrower plane: the bit position steps every DIV columns (padded columns clamped)
        col = tl.minimum(tl.arange(0, UWP), UW - 1)
        sh = s0 + W_PL * (col // DIV)
        s1 = s0 + W_PL * ((UW - 1) // DIV)
        if s0 >= DST:
            r = u >> (sh - DST)[None, :]
        elif s1 <= DST:
            r = u << (DST - sh)[None, :]
        else:
            r = (u >> tl.maximum(sh - DST, 0)[None, :]) << tl.maximum(DST - sh, 0)[None, :]
        if MASK:
            r = r & M
    return r


@triton.jit
def _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, T: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr,
              E: tl.constexpr, HEAD_DIM: tl.constexpr, UWP: tl.constexpr, cdt: tl.constexpr,
              GATHER: tl.constexpr, TAB_ASM: tl.constexpr):  # fmt: skip
    """centroids[idx] of sub-tile T as a [BLOCK_N, UWP] tile in cdt (the codebook table's dtype).

    GATHER 0 (any bits; the interpreter): a load per element. tab_base is the table's address as int64,
    aligned to its size rounded up to a power of two, so entry idx is at tab_base | (idx << LG): one shift
    and one and-or per plane, then the load (a 16-entry fp16 table is one 32-byte sector: one wavefront).
    GATHER 1 (bits <= 5, GPU): a warp shuffle per element, no address: lane_tab holds, in every lane l, the
    bits of entry l mod 2**BITS, and shfl.sync.idx reads lane idx (its low 5 bits: the bits above BITS only
    pick a replica), e.g. 4 bits: one shift and one SHFL per element.
    GATHER 2 (bits <= 5, GPU): the same shuffle inside one unary inline-asm block (TAB_ASM, _table_asm) that
    builds the lane's table entry from immediates, so the compiler can move tl.dot's operand-layout
    conversion up to the packed units (4x fewer bytes through shared memory than the values).
    GATHER 3 (4 bits, symmetric codebook, sub-tile path) does not come here: _permute_vals returns every
    sub-tile of a unit tile at once.
    """
    if GATHER >= 1:
        LG = 0
    else:
        LG = cdt.primitive_bitwidth // 16  # log2 of the element size: fp16 / bf16 1, fp32 2
    if BITS == 8:
        off = _field(u8, T, 8, HEAD_DIM, 0, W, E, HEAD_DIM, UWP, LG)
    elif BITS == 4 or BITS == 2 or BITS == 1:
        if BITS == 4:
            off = _field(u4, T, 4, HEAD_DIM // 2, 0, W, E, HEAD_DIM, UWP, LG, GATHER == 0)
        elif BITS == 2:
            off = _field(u2, T, 2, HEAD_DIM // 4, 0, W, E, HEAD_DIM, UWP, LG, GATHER == 0)
        else:
            off = _field(u1, T, 1, HEAD_DIM // 8, 0, W, E, HEAD_DIM, UWP, LG, GATHER == 0)
    elif GATHER >= 1:  # two planes (3 = [2, 1], 5 = [4, 1]): one bit-select merges them, no masks
        if (BITS & 4) != 0:
            lo = _field(u4, T, 4, HEAD_DIM // 2, 0, W, E, HEAD_DIM, UWP, 0, False)
            hi = _field(u1, T, 1, HEAD_DIM // 8, 4, W, E, HEAD_DIM, UWP, 0, False)
            off = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 15, 0xE4;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                            is_pure=True, pack=1)  # (lo & 15) | (hi & ~15): one LOP3  # fmt: skip
        else:
            lo = _field(u2, T, 2, HEAD_DIM // 4, 0, W, E, HEAD_DIM, UWP, 0, False)
            hi = _field(u1, T, 1, HEAD_DIM // 8, 2, W, E, HEAD_DIM, UWP, 0, False)
            off = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 3, 0xE4;", "=r,r,r", [lo, hi], dtype=tl.int32,
                                            is_pure=True, pack=1)  # (lo & 3) | (hi & ~3): one LOP3  # fmt: skip
    else:
        off = 0
        if (BITS & 4) != 0:
            off = _field(u4, T, 4, HEAD_DIM // 2, 0, W, E, HEAD_DIM, UWP, LG)
        if (BITS & 2) != 0:
            off = off | _field(u2, T, 2, HEAD_DIM // 4, BITS & 4, W, E, HEAD_DIM, UWP, LG)
        if (BITS & 1) != 0:
            off = off | _field(u1, T, 1, HEAD_DIM // 8, BITS & 6, W, E, HEAD_DIM, UWP, LG)
    if GATHER == 2:
        if cdt.primitive_bitwidth == 16:
            v = tl.inline_asm_elementwise(TAB_ASM, "=h,r", [off], dtype=tl.int16, is_pure=True, pack=1)
        else:
            v = tl.inline_asm_elementwise(TAB_ASM, "=r,r", [off], dtype=tl.int32, is_pure=True, pack=1)
        return v.to(cdt, bitcast=True)
    elif GATHER == 1:
        v = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;", "=r,r,r", [lane_tab, off],
                                      dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
        if cdt.primitive_bitwidth == 16:
            return v.to(tl.int16).to(cdt, bitcast=True)
        else:
            return v.to(cdt, bitcast=True)
    else:
        return tl.load((tab_base | off.to(tl.int64)).to(tl.pointer_type(cdt)))


@triton.jit
def _lane_table(tab_ptr, like, LEVELS: tl.constexpr, GATHER: tl.constexpr):
    """GATHER 1: int32 tensor shaped like `like` whose value in lane l is the bits of entry l mod LEVELS
    (LEVELS <= 32) of the table. Built from scalars and %laneid only (no tensor load), so it takes the
    layout of its user with no data movement: every register holds its own lane's entry. GATHER 0: like."""
    if GATHER == 1:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.zeros_like(like)], dtype=tl.int32,
                                         is_pure=True, pack=1) % LEVELS  # fmt: skip
        if tab_ptr.dtype.element_ty.primitive_bitwidth == 16:
            t = tl.zeros_like(like) + tl.load(tab_ptr).to(tl.int16, bitcast=True).to(tl.int32)
        else:
            t = tl.zeros_like(like) + tl.load(tab_ptr).to(tl.int32, bitcast=True)
        for i in tl.static_range(1, LEVELS):
            if tab_ptr.dtype.element_ty.primitive_bitwidth == 16:
                e = tl.load(tab_ptr + i).to(tl.int16, bitcast=True).to(tl.int32)
            else:
                e = tl.load(tab_ptr + i).to(tl.int32, bitcast=True)
            t = tl.where(lane == i, e, t)
        return t
    else:
        return like


@triton.jit
def _permute_vals(u4, cdt: tl.constexpr, TAB_ASM: tl.constexpr):
    """GATHER 3 (4 bits, 4-byte units, 16-bit cdt, symmetric table): the 8 sub-tiles' centroids of a [BLOCK_N, UWP]
    unit tile at once, a tuple of 8 tiles in cdt (sub-tile order). One unary inline-asm block per two units
    (_permute_asm): byte-permute lookups whose outputs are already the MMA operand's fp16x2 registers. Unary, so
    the compiler still converts the packed units (not the values) to the MMA operand layout."""
    r = tl.inline_asm_elementwise(TAB_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [u4],
                                  dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16,
                                         tl.int16), is_pure=True, pack=2)  # fmt: skip
    return (r[0].to(cdt, bitcast=True), r[1].to(cdt, bitcast=True), r[2].to(cdt, bitcast=True),
            r[3].to(cdt, bitcast=True), r[4].to(cdt, bitcast=True), r[5].to(cdt, bitcast=True),
            r[6].to(cdt, bitcast=True), r[7].to(cdt, bitcast=True))  # fmt: skip


@triton.jit
def _tile_vals(u8, u4, u2, u1, tab_base, lane_tab, BITS: tl.constexpr, W: tl.constexpr, E: tl.constexpr,
               NT: tl.constexpr, HEAD_DIM: tl.constexpr, UWP: tl.constexpr, cdt: tl.constexpr,
               GATHER: tl.constexpr, TAB_ASM: tl.constexpr):  # fmt: skip
    """The NT sub-tiles side by side, [BLOCK_N, NT * UWP] in cdt: column p holds sub-tile bitrev(p % NT), column
    p // NT (tl.join keeps each pair in one thread: no data movement). _tile_coords maps columns to coordinates."""
    x = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 0, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
    if NT >= 2:
        x = tl.join(
            x, _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 1, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        )
    if NT >= 4:
        y2 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 2, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        y3 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 3, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        x = tl.join(x, tl.join(y2, y3))
    if NT >= 8:
        y4 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 4, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        y5 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 5, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        y6 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 6, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        y7 = _sub_vals(u8, u4, u2, u1, tab_base, lane_tab, 7, BITS, W, E, HEAD_DIM, UWP, cdt, GATHER, TAB_ASM)
        x = tl.join(x, tl.join(tl.join(y4, y5), tl.join(y6, y7)))
    return tl.reshape(x, [x.shape[0], NT * UWP])


@triton.jit
def _tile_coords(W: tl.constexpr, E: tl.constexpr, NT: tl.constexpr, HEAD_DIM: tl.constexpr, UWP: tl.constexpr):
    """Head-dim coordinate of each column of a _tile_vals tile, and the mask of real (unpadded) columns.

    Column p: sub-tile T = bitrev(p % NT), column col = p // NT; coordinate E * col + T % E + (T // E) * R_W.
    """
    p = tl.arange(0, NT * UWP)
    col = p // NT
    r = p % NT
    if NT == 8:
        t = ((r & 1) << 2) | (r & 2) | (r >> 2)
    elif NT == 4:
        t = ((r & 1) << 1) | (r >> 1)
    else:
        t = r
    R_W = HEAD_DIM * W // 8
    return E * col + t % E + (t // E) * R_W, col < R_W // E


@triton.jit
def _load_qr(qr_ptr, q_row, rmask, W: tl.constexpr, E: tl.constexpr, NT: tl.constexpr, HEAD_DIM: tl.constexpr,
             HEAD_DP: tl.constexpr, UWP: tl.constexpr):  # fmt: skip
    """float32 [BLOCK_M, NT * UWP]: rows q_row of the rotated query buffer in the column order of _tile_vals."""
    c, cm = _tile_coords(W, E, NT, HEAD_DIM, UWP)
    return tl.load(qr_ptr + q_row[:, None] * HEAD_DP + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)


@triton.jit
def _store_rot(ws_ptr, w_lin, rmask, acc, W: tl.constexpr, E: tl.constexpr, NT: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, UWP: tl.constexpr):  # fmt: skip
    """Store a rotated-space accumulator (column order of _tile_vals) at its coordinates of workspace rows w_lin."""
    c, cm = _tile_coords(W, E, NT, HEAD_DIM, UWP)
    tl.store(ws_ptr + w_lin[:, None] * HEAD_DP + c[None, :], acc, mask=rmask[:, None] & cm[None, :])


@triton.jit
def _sub_coords(T: tl.constexpr, W: tl.constexpr, E: tl.constexpr, HEAD_DIM: tl.constexpr, UWP: tl.constexpr):
    """Coordinates of the UWP columns of sub-tile T (E * col + T % E + (T // E) * R_W) and the real-column mask."""
    col = tl.arange(0, UWP)
    R_W = HEAD_DIM * W // 8
    return E * col + T % E + (T // E) * R_W, col < R_W // E


@triton.jit
def _load_qr_subs(qr_ptr, q_row, rmask, cdt: tl.constexpr, W: tl.constexpr, E: tl.constexpr, NT: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, UWP: tl.constexpr):  # fmt: skip
    """Tuple of NT tiles [BLOCK_M, UWP] in cdt: the rotated query's columns of sub-tile T (padding columns 0)."""
    out = ()
    for T in tl.static_range(NT):
        c, cm = _sub_coords(T, W, E, HEAD_DIM, UWP)
        qt = tl.load(qr_ptr + q_row[:, None] * HEAD_DP + c[None, :], mask=rmask[:, None] & cm[None, :], other=0.0)
        out = out + (qt.to(cdt),)
    return out


@triton.jit
def _store_rot_subs(ws_ptr, w_lin, rmask, accs, W: tl.constexpr, E: tl.constexpr, NT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, UWP: tl.constexpr):  # fmt: skip
    """Store the NT rotated-space sub-tile accumulators at their coordinates of workspace rows w_lin."""
    for T in tl.static_range(NT):
        c, cm = _sub_coords(T, W, E, HEAD_DIM, UWP)
        tl.store(ws_ptr + w_lin[:, None] * HEAD_DP + c[None, :], accs[T], mask=rmask[:, None] & cm[None, :])


@triton.jit
def _tile_rows(n, nmask, b, bt_ptr, stride_btb, stride_btn, stride_kpb, stride_kpn, stride_knb, stride_knn,
               stride_vpb, stride_vpn, stride_vnb, stride_vnn, PAGED: tl.constexpr,
               PAGE_SIZE: tl.constexpr):  # fmt: skip
    """Row offsets (k packed, k norms, v packed, v norms) of compressed tokens n (head offsets excluded)."""
    if PAGED:
        blk = tl.load(bt_ptr + b.to(tl.int64) * stride_btb + (n // PAGE_SIZE) * stride_btn, mask=nmask,
                      other=0).to(tl.int64)  # fmt: skip
        slot = (n % PAGE_SIZE).to(tl.int64)
        return (blk * stride_kpb + slot * stride_kpn, blk * stride_knb + slot * stride_knn,
                blk * stride_vpb + slot * stride_vpn, blk * stride_vnb + slot * stride_vnn)  # fmt: skip
    else:
        n64 = n.to(tl.int64)
        b64 = b.to(tl.int64)
        return (b64 * stride_kpb + n64 * stride_kpn, b64 * stride_knb + n64 * stride_knn,
                b64 * stride_vpb + n64 * stride_vpn, b64 * stride_vnb + n64 * stride_vnn)  # fmt: skip


@triton.jit
def _load_norms(kn_head, kn_row, vn_head, vn_row, nmask, PAIRED: tl.constexpr):
    """(key norms, value norms) float32 [BLOCK_N] of one tile. PAIRED: a token's (k, v) bfloat16 pair is one
    aligned 4-byte word at the key norm's address (the cache's [.., capacity, 2] store), so one 32-bit load
    (asynchronous-copy capable, unlike a 2-byte one) gives both: k in the low half, v in the high half."""
    if PAIRED:
        w = tl.load((kn_head + kn_row).to(tl.pointer_type(tl.int32)), mask=nmask, other=0)
        kn = (w << 16).to(tl.float32, bitcast=True)
        vn = (w & -65536).to(tl.float32, bitcast=True)
    else:
        kn = tl.load(kn_head + kn_row, mask=nmask, other=0.0).to(tl.float32)
        vn = tl.load(vn_head + vn_row, mask=nmask, other=0.0).to(tl.float32)
    return kn, vn


@triton.jit
def _mask_bias(mv):
    """An additive mask in base 2. Finite biases are clamped first: torch.finfo(float32).min * log2(e) would
    overflow to -inf, and a row masked that way everywhere must give PyTorch's answer (equal weights), not an
    empty row. A true -inf stays -inf (fully masked rows give zeros)."""
    b = mv.to(tl.float32)
    return tl.where(b == float("-inf"), b, tl.maximum(b, -2e38)) * 1.4426950408889634


@triton.jit
def _masked_scores(sc, col, cmask, last, rmask, mask_ptr, m_row, stride_mk, CAUSAL: tl.constexpr,
                   MASK_MODE: tl.constexpr):  # fmt: skip
    """Scores [BLOCK_M, BLOCK_N] with every invisible key at -inf: keys outside cmask, (CAUSAL) columns after
    `last` (the last visible column of each row, bottom-right over the whole key sequence), and the attention
    mask read at columns `col` of [compressed, exact] order. MASK_MODE 1 bool, 2 additive (in base 2): one mask
    row per query row (m_row [BLOCK_M]); 3 / 4 the same when every row of the program reads the same mask row
    (m_row a scalar: a [B, 1, 1, N] decode mask broadcast over heads), loaded once as [BLOCK_N]."""
    valid = cmask[None, :]
    if CAUSAL:
        valid = valid & (col[None, :] <= last[:, None])
    if MASK_MODE == 1:
        mv = tl.load(mask_ptr + m_row[:, None] + (col.to(tl.int64) * stride_mk)[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0)  # fmt: skip
        valid = valid & (mv != 0)
    if MASK_MODE == 3:
        mv = tl.load(mask_ptr + m_row + col.to(tl.int64) * stride_mk, mask=cmask, other=0)
        valid = valid & (mv != 0)[None, :]
    sc = tl.where(valid, sc, float("-inf"))
    if MASK_MODE == 2:
        mv = tl.load(mask_ptr + m_row[:, None] + (col.to(tl.int64) * stride_mk)[None, :],
                     mask=rmask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        sc = sc + _mask_bias(mv)
    if MASK_MODE == 4:
        mv = tl.load(mask_ptr + m_row + col.to(tl.int64) * stride_mk, mask=cmask, other=0.0)
        sc = sc + _mask_bias(mv)[None, :]
    return sc


@triton.jit
def _online_softmax_step(sc, m_i, l_i):
    """One FlashAttention-2 step in base 2; returns (p, alpha, m_new, l_new). Fully masked rows stay 0."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc - m_safe[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@triton.jit
def _comp_subtiles(
    qr_ptr, qm_ptr, q_row, rmask, kp_ptr, stride_kpb, stride_kph, stride_kpn, stride_kpd,
    kn_ptr, stride_knb, stride_knh, stride_knn, vp_ptr, stride_vpb, stride_vph, stride_vpn, stride_vpd,
    vn_ptr, stride_vnb, stride_vnh, stride_vnn, kc_ptr, vc_ptr, bt_ptr, stride_btb, stride_btn,
    mask_ptr, stride_mk, m_row, ws_ptr, w_lin, b, kvh, s, start, end, nc, se_len, SQ,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr,
    K_BITS: tl.constexpr, K_W: tl.constexpr, K_E: tl.constexpr, K_NT: tl.constexpr, K_UWP: tl.constexpr,
    V_BITS: tl.constexpr, V_W: tl.constexpr, V_E: tl.constexpr, V_NT: tl.constexpr, V_UWP: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL_COMP: tl.constexpr, MASK_MODE: tl.constexpr,
    K_GATHER: tl.constexpr, V_GATHER: tl.constexpr, K_TAB: tl.constexpr, V_TAB: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIRED_NORMS: tl.constexpr,
):  # fmt: skip
    """Compressed tokens [start, end) of one split, sub-tile by sub-tile (the decode path, one warp).

    Same result as the joined-tile path of _tq_attn_kernel, but the K scores are a sum of K_NT dots
    (q_rot's columns of sub-tile T against the centroids of sub-tile T) and the values accumulate into V_NT
    rotated-space accumulators, one per sub-tile. Every operand of those dots is an elementwise function of
    the packed units (shift, then the table shuffle of GATHER 2), so the compiler converts the packed units to
    the MMA operand layout (4 bytes per 8 or 16 codes) instead of the 16-bit values, and no tile is joined.
    Writes the unnormalised rotated-space partial output to the workspace; returns (m_i, l_i).
    """
    cdt = kc_ptr.dtype.element_ty  # the codebooks are in the compute dtype (= query dtype)
    nn = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    qkm = tl.load(qm_ptr + q_row, mask=rmask, other=0.0)
    qr = _load_qr_subs(qr_ptr, q_row, rmask, cdt, K_W, K_E, K_NT, HEAD_DIM, HEAD_DP, K_UWP)
    accs = ()
    for _T in tl.static_range(V_NT):
        accs = accs + (tl.zeros([BLOCK_M, V_UWP], dtype=tl.float32),)
    kbase = kc_ptr.to(tl.int64)
    vbase = vc_ptr.to(tl.int64)
    klane = _lane_table(kc_ptr, tl.zeros([BLOCK_N, K_UWP], dtype=tl.int32), 1 << K_BITS, K_GATHER)
    vlane = _lane_table(vc_ptr, tl.zeros([BLOCK_N, V_UWP], dtype=tl.int32), 1 << V_BITS, V_GATHER)
    k_head = kp_ptr + kvh.to(tl.int64) * stride_kph
    kn_head = kn_ptr + kvh.to(tl.int64) * stride_knh
    v_head = vp_ptr + kvh.to(tl.int64) * stride_vph
    vn_head = vn_ptr + kvh.to(tl.int64) * stride_vnh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + nn
        nmask = n < end
        k_row, kn_row, v_row, vn_row = _tile_rows(n, nmask, b, bt_ptr, stride_btb, stride_btn, stride_kpb, stride_kpn,
                                                  stride_knb, stride_knn, stride_vpb, stride_vpn, stride_vnb,
                                                  stride_vnn, PAGED, PAGE_SIZE)  # fmt: skip
        k8, k4, k2, k1 = _load_units(k_head + k_row[:, None], nmask, stride_kpd, K_BITS, K_W, K_E, HEAD_DIM, K_UWP)
        kn, vn = _load_norms(kn_head, kn_row, vn_head, vn_row, nmask, PAIRED_NORMS)
        sc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if K_GATHER == 3:
            kts = _permute_vals(k4, cdt, K_TAB)
        for T in tl.static_range(K_NT):
            if K_GATHER == 3:
                kt = kts[T]
            else:
                kt = _sub_vals(k8, k4, k2, k1, kbase, klane, T, K_BITS, K_W, K_E, HEAD_DIM, K_UWP, cdt, K_GATHER,
                               K_TAB)  # fmt: skip
            sc = tl.dot(qr[T], tl.trans(kt), sc, input_precision=DOT_PREC)
        sc = sc * kn[None, :] + qkm[:, None]
        sc = _masked_scores(sc, n, nmask, s + nc + se_len - SQ, rmask, mask_ptr, m_row, stride_mk, CAUSAL_COMP,
                            MASK_MODE)  # fmt: skip
        p, alpha, m_i, l_i = _online_softmax_step(sc, m_i, l_i)
        v8, v4, v2, v1 = _load_units(v_head + v_row[:, None], nmask, stride_vpd, V_BITS, V_W, V_E, HEAD_DIM, V_UWP)
        pv = (p * vn[None, :]).to(cdt)
        new = ()
        if V_GATHER == 3:
            vts = _permute_vals(v4, cdt, V_TAB)
        for T in tl.static_range(V_NT):
            if V_GATHER == 3:
                vt = vts[T]
            else:
                vt = _sub_vals(v8, v4, v2, v1, vbase, vlane, T, V_BITS, V_W, V_E, HEAD_DIM, V_UWP, cdt, V_GATHER,
                               V_TAB)  # fmt: skip
            new = new + (tl.dot(pv, vt, accs[T] * alpha[:, None], input_precision=DOT_PREC),)
        accs = new
    _store_rot_subs(ws_ptr, w_lin, rmask, accs, V_W, V_E, V_NT, HEAD_DIM, HEAD_DP, V_UWP)
    return m_i, l_i


@triton.jit(do_not_specialize=["n_comp", "se_len", "chunk", "NS_C", "NS"])  # change with the length: one binary
def _tq_attn_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    qr_ptr, qm_ptr,
    kp_ptr, stride_kpb, stride_kph, stride_kpn, stride_kpd,
    kn_ptr, stride_knb, stride_knh, stride_knn,
    vp_ptr, stride_vpb, stride_vph, stride_vpn, stride_vpd,
    vn_ptr, stride_vnb, stride_vnh, stride_vnn,
    kc_ptr, vc_ptr,
    bt_ptr, stride_btb, stride_btn, sl_ptr,
    ke_ptr, stride_keb, stride_keh, stride_kes, stride_ked,
    ve_ptr, stride_veb, stride_veh, stride_ves, stride_ved,
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk,
    ws_ptr,
    HKV, SQ, M_TOTAL, MP, NS_C, NS, n_comp, se_len, chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr,
    K_BITS: tl.constexpr, K_W: tl.constexpr, K_E: tl.constexpr, K_NT: tl.constexpr, K_UWP: tl.constexpr,
    V_BITS: tl.constexpr, V_W: tl.constexpr, V_E: tl.constexpr, V_NT: tl.constexpr, V_UWP: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, PAIRED_NORMS: tl.constexpr,
    CAUSAL: tl.constexpr, CAUSAL_COMP: tl.constexpr, MASK_MODE: tl.constexpr,
    K_GATHER: tl.constexpr, V_GATHER: tl.constexpr, SUBTILE: tl.constexpr, K_TAB: tl.constexpr,
    V_TAB: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    """Split-KV attention over compressed tokens (splits < NS_C) or the exact segment (splits >= NS_C).

    q     [B, Hq, Sq, D]              query dtype   strides (stride_qb, stride_qh, stride_qs, stride_qd)
    kp    dense [B, Hkv, cap, D*kb/8] / paged [num_blocks, Hkv, PAGE_SIZE, D*kb/8]   uint8
          strides (stride_kpb, stride_kph, stride_kpn, stride_kpd)
    kn    dense [B, Hkv, cap] / paged [num_blocks, Hkv, PAGE_SIZE]  bfloat16  strides (stride_knb, stride_knh,
          stride_knn)
    vp, vn    as kp, kn with v_bits
    kc, vc    [2**bits] codebooks in the query dtype, each aligned to its size rounded up to a power of two
    bt    [B, max_blocks] int32  strides (stride_btb, stride_btn)       (PAGED only)
    sl    [B] int32 contiguous: compressed tokens per sequence        (PAGED only; dense: n_comp)
    ke/ve [B, Hkv, Se, D]             query dtype   strides (stride_ke*, stride_ve*)   (read when se_len > 0)
    mask  [B, Hq, Sq, Nc + Se] expanded view, uint8 (bool, 1 = attend) or additive float
          strides (stride_mb, stride_mh, stride_mq, stride_mk)         (read when MASK_MODE != 0; modes 3 / 4:
          stride_mh == 0 and (Sq == 1 or stride_mq == 0), one row per batch row)
    qr    float32 [B*Hkv, MP, HEAD_DP] rotated query rows, qm float32 [B*Hkv, MP] (_tq_qrot_kernel), contiguous
    ws    float32 workspace, contiguous: acc [B*Hkv, NS, MP, HEAD_DP] (unnormalised; splits < NS_C in the rotated
          space, the others in the original space), then m [B*Hkv, NS, MP] (running max, base 2), then
          l [B*Hkv, NS, MP]; rows >= M_TOTAL are not written.
    K geometry: widest plane K_W bits, units of K_E bytes, K_NT = K_E * 8 / K_W sub-tiles of
    R_W / K_E columns (padded to K_UWP), sub-tile T holding coordinates K_E * col + T % K_E + (T // K_E) * R_W
    (R_W = D * K_W / 8). V likewise. Grid (row blocks, B * Hkv, NS): the split is the slowest grid dimension,
    so the GPU starts every compressed split before the exact segment's short programs (splits >= NS_C).
    PDL (launched as a programmatic dependent launch): wait for the previous kernel's results before any load.
    (Letting the reduction launch early from here was measured slower: 1 x 4K 15.7 vs 14.6 us, H100.)
    """
    if PDL:
        gdc_wait()
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
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
    if PAGED:
        nc = tl.load(sl_ptr + b)
    else:
        nc = n_comp
    s_max = tl.max(tl.where(rmask, s, 0), axis=0)
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + s.to(tl.int64) * stride_qs
    if MASK_MODE >= 3:  # one mask row for the whole program (head and query strides 0, or Sq = 1)
        m_row = b.to(tl.int64) * stride_mb
    elif MASK_MODE != 0:
        m_row = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + s.to(tl.int64) * stride_mq
    else:
        m_row = q_off  # unused
    w_lin = (bh.to(tl.int64) * NS + split) * MP + rows
    q_row = bh.to(tl.int64) * MP + rows  # row of the rotated query buffer
    n_rows = tl.num_programs(1).to(tl.int64) * NS * MP
    wm_ptr = ws_ptr + n_rows * HEAD_DP
    wl_ptr = wm_ptr + n_rows

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    cdt = q_ptr.dtype.element_ty  # compute dtype of the tl.dot operands (= query dtype)

    if split < NS_C:
        start = split * chunk
        end = tl.minimum(start + chunk, nc)
        if CAUSAL_COMP:
            # bottom-right over the whole key sequence: key j visible to row s iff j <= s + nc + Se - Sq
            end = tl.minimum(end, s_max + nc + se_len - SQ + 1)
        if SUBTILE:
            m_i, l_i = _comp_subtiles(
                qr_ptr, qm_ptr, q_row, rmask, kp_ptr, stride_kpb, stride_kph, stride_kpn, stride_kpd, kn_ptr,
                stride_knb, stride_knh, stride_knn, vp_ptr, stride_vpb, stride_vph, stride_vpn, stride_vpd, vn_ptr,
                stride_vnb, stride_vnh, stride_vnn, kc_ptr, vc_ptr, bt_ptr, stride_btb, stride_btn, mask_ptr,
                stride_mk, m_row, ws_ptr, w_lin, b, kvh, s, start, end, nc, se_len, SQ, HEAD_DIM, HEAD_DP, K_BITS,
                K_W, K_E, K_NT, K_UWP, V_BITS, V_W, V_E, V_NT, V_UWP, PAGED, PAGE_SIZE, CAUSAL_COMP, MASK_MODE,
                K_GATHER, V_GATHER, K_TAB, V_TAB, DOT_PREC, BLOCK_M, BLOCK_N, PAIRED_NORMS,
            )  # fmt: skip
        else:
            # the rotated query (pre-scaled by scale * log2(e)) and <q, k_mean>, from _tq_qrot_kernel
            qkm = tl.load(qm_ptr + q_row, mask=rmask, other=0.0)
            qr = _load_qr(qr_ptr, q_row, rmask, K_W, K_E, K_NT, HEAD_DIM, HEAD_DP, K_UWP).to(cdt)
            acc_r = tl.zeros([BLOCK_M, V_NT * V_UWP], dtype=tl.float32)  # rotated space, _tile_vals column order
            kbase = kc_ptr.to(tl.int64)
            vbase = vc_ptr.to(tl.int64)
            k_head = kp_ptr + kvh.to(tl.int64) * stride_kph
            kn_head = kn_ptr + kvh.to(tl.int64) * stride_knh
            v_head = vp_ptr + kvh.to(tl.int64) * stride_vph
            vn_head = vn_ptr + kvh.to(tl.int64) * stride_vnh
            # software pipelining by hand: the packed bytes and norms of tile i + 1 are loaded (into registers)
            # while tile i is computed, so the HBM latency overlaps the tile building.
            n = start + nn
            nmask = n < end
            k_row, kn_row, v_row, vn_row = _tile_rows(n, nmask, b, bt_ptr, stride_btb, stride_btn, stride_kpb,
                                                      stride_kpn, stride_knb, stride_knn, stride_vpb, stride_vpn,
                                                      stride_vnb, stride_vnn, PAGED, PAGE_SIZE)  # fmt: skip
            k8, k4, k2, k1 = _load_units(k_head + k_row[:, None], nmask, stride_kpd, K_BITS, K_W, K_E, HEAD_DIM,
                                         K_UWP)  # fmt: skip
            v8, v4, v2, v1 = _load_units(v_head + v_row[:, None], nmask, stride_vpd, V_BITS, V_W, V_E, HEAD_DIM,
                                         V_UWP)  # fmt: skip
            kn, vn = _load_norms(kn_head, kn_row, vn_head, vn_row, nmask, PAIRED_NORMS)
            klane = _lane_table(kc_ptr, tl.zeros([BLOCK_N, K_UWP], dtype=tl.int32), 1 << K_BITS, K_GATHER)
            vlane = _lane_table(vc_ptr, tl.zeros([BLOCK_N, V_UWP], dtype=tl.int32), 1 << V_BITS, V_GATHER)
            for _ in range(start, end, BLOCK_N):
                nx = n + BLOCK_N
                nxmask = nx < end
                k_row, kn_row, v_row, vn_row = _tile_rows(nx, nxmask, b, bt_ptr, stride_btb, stride_btn, stride_kpb,
                                                          stride_kpn, stride_knb, stride_knn, stride_vpb, stride_vpn,
                                                          stride_vnb, stride_vnn, PAGED, PAGE_SIZE)  # fmt: skip
                k8x, k4x, k2x, k1x = _load_units(k_head + k_row[:, None], nxmask, stride_kpd, K_BITS, K_W, K_E,
                                                 HEAD_DIM, K_UWP)  # fmt: skip
                v8x, v4x, v2x, v1x = _load_units(v_head + v_row[:, None], nxmask, stride_vpd, V_BITS, V_W, V_E,
                                                 HEAD_DIM, V_UWP)  # fmt: skip
                knx, vnx = _load_norms(kn_head, kn_row, vn_head, vn_row, nxmask, PAIRED_NORMS)
                kh = _tile_vals(
                    k8, k4, k2, k1, kbase, klane, K_BITS, K_W, K_E, K_NT, HEAD_DIM, K_UWP, cdt, K_GATHER, K_TAB
                )
                sc = tl.dot(qr, tl.trans(kh), input_precision=DOT_PREC)
                sc = sc * kn[None, :] + qkm[:, None]
                sc = _masked_scores(sc, n, nmask, s + nc + se_len - SQ, rmask, mask_ptr, m_row, stride_mk, CAUSAL_COMP,
                                    MASK_MODE)  # fmt: skip
                p, alpha, m_i, l_i = _online_softmax_step(sc, m_i, l_i)
                # values: P @ V, P pre-multiplied by the value norms
                pv = (p * vn[None, :]).to(cdt)
                vh = _tile_vals(
                    v8, v4, v2, v1, vbase, vlane, V_BITS, V_W, V_E, V_NT, HEAD_DIM, V_UWP, cdt, V_GATHER, V_TAB
                )
                acc_r = tl.dot(pv, vh, acc_r * alpha[:, None], input_precision=DOT_PREC)
                n = nx
                nmask = nxmask
                k8, k4, k2, k1 = k8x, k4x, k2x, k1x
                v8, v4, v2, v1 = v8x, v4x, v2x, v1x
                kn = knx
                vn = vnx
            _store_rot(ws_ptr, w_lin, rmask, acc_r, V_W, V_E, V_NT, HEAD_DIM, HEAD_DP, V_UWP)
    else:
        start = (split - NS_C) * chunk
        end = tl.minimum(start + chunk, se_len)
        if CAUSAL:
            end = tl.minimum(end, s_max + se_len - SQ + 1)
        q = tl.load(q_ptr + q_off[:, None] + (d * stride_qd)[None, :], mask=rmask[:, None] & dmask[None, :],
                    other=0.0)  # fmt: skip
        q = (q.to(tl.float32) * qk_scale).to(cdt)
        acc = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
        ke_base = ke_ptr + b.to(tl.int64) * stride_keb + kvh.to(tl.int64) * stride_keh
        ve_base = ve_ptr + b.to(tl.int64) * stride_veb + kvh.to(tl.int64) * stride_veh
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            emask = e < end
            ld_mask = emask[:, None] & dmask[None, :]
            e64 = e.to(tl.int64)
            k = tl.load(ke_base + (e64 * stride_kes)[:, None] + (d * stride_ked)[None, :], mask=ld_mask, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            # exact key e is column nc + e; bottom-right causal: e <= s + Se - Sq
            sc = _masked_scores(sc, nc + e, emask, s + nc + se_len - SQ, rmask, mask_ptr, m_row, stride_mk, CAUSAL,
                                MASK_MODE)  # fmt: skip
            p, alpha, m_i, l_i = _online_softmax_step(sc, m_i, l_i)
            v = tl.load(ve_base + (e64 * stride_ves)[:, None] + (d * stride_ved)[None, :], mask=ld_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(cdt), v, input_precision=DOT_PREC)
        tl.store(ws_ptr + w_lin[:, None] * HEAD_DP + d[None, :], acc, mask=rmask[:, None])

    tl.store(wm_ptr + w_lin, m_i, mask=rmask)
    tl.store(wl_ptr + w_lin, l_i, mask=rmask)


@triton.jit
def _flat_rows(i, BH, M_TOTAL, HKV, GROUP: tl.constexpr, SQ):
    """Rows i of the BH * M_TOTAL (kv head, row) pairs: (valid, bh, r, batch, kv head, q head, query position),
    row r = g * Sq + s of kv head bh being query head kvh * GROUP + g at position s."""
    bh = i // M_TOTAL
    r = i % M_TOTAL
    kvh = bh % HKV
    return i < BH * M_TOTAL, bh, r, bh // HKV, kvh, kvh * GROUP + r // SQ, r % SQ


@triton.jit
def _tq_qrot_kernel(
    q_ptr, stride_qb, stride_qh, stride_qs, stride_qd,
    pi_ptr, stride_pr, stride_pc,
    km_ptr, stride_kmb, stride_kmh, stride_kmd,
    qr_ptr, qm_ptr,
    BH, HKV, SQ, M_TOTAL, MP, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """The query in the rotated space, once per call: qr = qk_scale * q @ Pi.T and qm = qk_scale * <q, k_mean>.

    q   [B, Hq, Sq, D]  query dtype   strides (stride_qb, stride_qh, stride_qs, stride_qd)
    pi  [D, D]          float32       strides (stride_pr, stride_pc)
    km  [B or 1, Hkv, D] float32      strides (stride_kmb (0 to broadcast), stride_kmh, stride_kmd)
    qr  float32 [B * Hkv, MP, HEAD_DP] contiguous (row r = g * Sq + s of kv head bh; padding columns 0)
    qm  float32 [B * Hkv, MP] contiguous. Rows r >= M_TOTAL are not written.
    Program i takes BLOCK_M of the BH * M_TOTAL query rows (row j: kv head bh = j // M_TOTAL, r = j % M_TOTAL),
    across kv heads, so that one load of Pi's columns serves many heads at decode.
    Grid (cdiv(BH * M_TOTAL, BLOCK_M), HEAD_DP // BLOCK_C); column block 0 also writes qm.
    PDL: wait for the previous kernel before any load, then let the attention kernel launch (it waits for this).
    """
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    jmask, bh, r, b, kvh, h, s = _flat_rows(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), BH, M_TOTAL, HKV,
                                            GROUP, SQ)  # fmt: skip
    q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + s.to(tl.int64) * stride_qs
    q_row = bh.to(tl.int64) * MP + r
    km_off = b.to(tl.int64) * stride_kmb + kvh.to(tl.int64) * stride_kmh
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < HEAD_DIM
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    qkm = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kc in tl.static_range(HEAD_DP // BLOCK_K):
        k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < HEAD_DIM
        qc = tl.load(q_ptr + q_off[:, None] + (k * stride_qd)[None, :], mask=jmask[:, None] & km[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        pit = tl.load(pi_ptr + (cols * stride_pr)[None, :] + (k * stride_pc)[:, None],
                      mask=km[:, None] & cmask[None, :], other=0.0)  # fmt: skip
        acc = tl.dot(qc, pit, acc, input_precision=PREC)
        kmv = tl.load(km_ptr + km_off[:, None] + (k * stride_kmd)[None, :], mask=jmask[:, None] & km[None, :],
                      other=0.0)  # fmt: skip
        qkm += tl.sum(qc * kmv, axis=1)
    tl.store(qr_ptr + q_row[:, None] * HEAD_DP + cols[None, :], acc * qk_scale, mask=jmask[:, None])
    if tl.program_id(1) == 0:
        tl.store(qm_ptr + q_row, qkm * qk_scale, mask=jmask)


@triton.jit(do_not_specialize=["BH", "NS_C", "NS"])
def _tq_reduce_kernel(
    ws_ptr,
    o_ptr, stride_ob, stride_os, stride_oh, stride_od,
    pi_ptr, stride_pr, stride_pc,
    vm_ptr, stride_vmb, stride_vmh, stride_vmd,
    BH, HKV, SQ, M_TOTAL, MP, NS_C, NS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, PREC: tl.constexpr, BLOCK_R: tl.constexpr,
    NS_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ONE_ROUND: tl.constexpr,
    NSE_BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Merge the split partials of BLOCK_R output rows, rotate the compressed part back, normalise, store the
    columns of block program_id(1).

    ws  float32 workspace of _tq_attn_kernel (acc [BH, NS, MP, HEAD_DP], then m and l [BH, NS, MP]); splits
        < NS_C hold rotated-space partials of compressed tokens, the others original-space partials of exact ones
    pi  [D, D] float32; vm [B or 1, Hkv, D] float32 (value mean, stride_vmb 0 to broadcast)
    o   [B, Sq, Hq, D]   query dtype   strides (stride_ob, stride_os, stride_oh, stride_od)
    o = (sum_c w_c acc_c @ Pi + (sum_c w_c l_c) v_mean + sum_e w_e acc_e) / sum_s w_s l_s, w_s = 2^(m_s - max m).
    Output row i (of BH * M_TOTAL) is row r = i % M_TOTAL of kv head bh = i // M_TOTAL. NS_BLOCK splits of a
    row are loaded at once (a serial chain of loads per split would be latency bound); the rotated partials
    are merged BLOCK_K coordinates at a time and multiplied by the rows of Pi they meet. ONE_ROUND (NS_C <=
    NS_BLOCK, NS - NS_C <= NSE_BLOCK, few rows): every load of the program (m, l, all partials, Pi, v_mean) is
    issued before any math, one round trip instead of one per phase (the latency of small decode calls).
    Grid (cdiv(BH * M_TOTAL, BLOCK_R), cdiv(HEAD_DIM, BLOCK_C)). PDL: wait for the attention kernel first.
    """
    if PDL:
        gdc_wait()
    imask, bh, r, b, kvh, h, s = _flat_rows(tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R), BH, M_TOTAL, HKV,
                                            GROUP, SQ)  # fmt: skip
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < HEAD_DIM
    sp = tl.arange(0, NS_BLOCK)
    n_rows = BH.to(tl.int64) * NS * MP
    wm_ptr = ws_ptr + n_rows * HEAD_DP
    wl_ptr = wm_ptr + n_rows
    row0 = bh.to(tl.int64) * NS * MP + r  # [BLOCK_R]: split 0 of each row
    o_row = b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
    vmv = tl.load(vm_ptr + b[:, None] * stride_vmb + kvh[:, None] * stride_vmh + (c * stride_vmd)[None, :],
                  mask=imask[:, None] & cmask[None, :], other=0.0)  # fmt: skip
    if ONE_ROUND:
        lin = row0[:, None] + (sp * MP)[None, :]  # compressed splits [0, NS_C)
        comp = imask[:, None] & (sp < NS_C)[None, :]
        se_i = tl.arange(0, NSE_BLOCK)
        lin_e = row0[:, None] + ((NS_C + se_i) * MP)[None, :]  # exact splits [NS_C, NS)
        exact = imask[:, None] & ((NS_C + se_i) < NS)[None, :]
        m = tl.load(wm_ptr + lin, mask=comp, other=float("-inf"))
        lv = tl.load(wl_ptr + lin, mask=comp, other=0.0)
        m_e = tl.load(wm_ptr + lin_e, mask=exact, other=float("-inf"))
        l_e = tl.load(wl_ptr + lin_e, mask=exact, other=0.0)
        x = tl.load(ws_ptr + lin_e[:, :, None] * HEAD_DP + c[None, None, :],
                    mask=exact[:, :, None] & cmask[None, None, :], other=0.0)  # fmt: skip
        parts = ()
        pis = ()
        for kb in tl.static_range(HEAD_DP // BLOCK_K):
            k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            parts = parts + (tl.load(ws_ptr + lin[:, :, None] * HEAD_DP + k[None, None, :],
                                     mask=comp[:, :, None] & (k < HEAD_DIM)[None, None, :], other=0.0),)  # fmt: skip
            pis = pis + (tl.load(pi_ptr + (k * stride_pr)[:, None] + (c * stride_pc)[None, :],
                                 mask=(k < HEAD_DIM)[:, None] & cmask[None, :], other=0.0),)  # fmt: skip
        m_max = tl.maximum(tl.max(m, axis=1), tl.max(m_e, axis=1))
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_safe[:, None])  # 0 where masked (m = -inf)
        w_e = tl.exp2(m_e - m_safe[:, None])
        l_comp = tl.sum(w * lv, axis=1)
        l_all = l_comp + tl.sum(w_e * l_e, axis=1)
        o = l_comp[:, None] * vmv + tl.sum(w_e[:, :, None] * x, axis=1)
        for kb in tl.static_range(HEAD_DP // BLOCK_K):
            rk = tl.sum(w[:, :, None] * parts[kb], axis=1)  # [BLOCK_R, BLOCK_K] merged rotated coordinates
            o += tl.sum(rk[:, :, None] * pis[kb][None, :, :], axis=1)
    else:
        m_all = tl.full([BLOCK_R, NS_BLOCK], float("-inf"), dtype=tl.float32)
        for s0 in range(0, NS, NS_BLOCK):
            lin = row0[:, None] + ((s0 + sp) * MP)[None, :]
            smask = imask[:, None] & ((s0 + sp) < NS)[None, :]
            m_all = tl.maximum(m_all, tl.load(wm_ptr + lin, mask=smask, other=float("-inf")))
        m_max = tl.max(m_all, axis=1)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)

        # compressed splits: l and the rotated partials, every BLOCK_K-wide slice of a split block loaded at once
        # (one round of loads when NS_C <= NS_BLOCK), merged over the splits, then rotated back: times Pi[slice, c]
        l_acc = tl.zeros([BLOCK_R, NS_BLOCK], dtype=tl.float32)
        rks = ()
        for _kb in tl.static_range(HEAD_DP // BLOCK_K):
            rks = rks + (tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32),)
        for s0 in range(0, NS_C, NS_BLOCK):
            lin = row0[:, None] + ((s0 + sp) * MP)[None, :]
            smask = imask[:, None] & ((s0 + sp) < NS_C)[None, :]
            w = tl.exp2(tl.load(wm_ptr + lin, mask=smask, other=float("-inf")) - m_safe[:, None])
            l_acc += w * tl.load(wl_ptr + lin, mask=smask, other=0.0)
            new = ()
            for kb in tl.static_range(HEAD_DP // BLOCK_K):
                k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                a = tl.load(ws_ptr + lin[:, :, None] * HEAD_DP + k[None, None, :],
                            mask=smask[:, :, None] & (k < HEAD_DIM)[None, None, :], other=0.0)  # fmt: skip
                new = new + (rks[kb] + tl.sum(w[:, :, None] * a, axis=1),)
            rks = new
        l_comp = tl.sum(l_acc, axis=1)
        o = l_comp[:, None] * vmv
        for kb in tl.static_range(HEAD_DP // BLOCK_K):
            k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            pi = tl.load(pi_ptr + (k * stride_pr)[:, None] + (c * stride_pc)[None, :],
                         mask=(k < HEAD_DIM)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
            if BLOCK_R >= 16:
                o = tl.dot(rks[kb], pi, o, input_precision=PREC)
            else:
                o += tl.sum(rks[kb][:, :, None] * pi[None, :, :], axis=1)

        # exact splits: original space
        le_acc = tl.zeros([BLOCK_R, NS_BLOCK], dtype=tl.float32)
        x_acc = tl.zeros([BLOCK_R, NS_BLOCK, BLOCK_C], dtype=tl.float32)
        for s0 in range(NS_C, NS, NS_BLOCK):
            lin = row0[:, None] + ((s0 + sp) * MP)[None, :]
            smask = imask[:, None] & ((s0 + sp) < NS)[None, :]
            w = tl.exp2(tl.load(wm_ptr + lin, mask=smask, other=float("-inf")) - m_safe[:, None])
            le_acc += w * tl.load(wl_ptr + lin, mask=smask, other=0.0)
            a = tl.load(ws_ptr + lin[:, :, None] * HEAD_DP + c[None, None, :],
                        mask=smask[:, :, None] & cmask[None, None, :], other=0.0)  # fmt: skip
            x_acc += w[:, :, None] * a
        l_all = l_comp + tl.sum(le_acc, axis=1)
        o = o + tl.sum(x_acc, axis=1)

    inv = tl.where(l_all > 0.0, 1.0 / tl.where(l_all > 0.0, l_all, 1.0), 0.0)
    o = o * inv[:, None]
    tl.store(o_ptr + o_row[:, None] + (c * stride_od)[None, :], o.to(o_ptr.dtype.element_ty),
             mask=imask[:, None] & cmask[None, :])  # fmt: skip


# launches that reuse the compiled kernel of an identical earlier launch (kernels/_launch.py)
_QROT = Launcher(_tq_qrot_kernel)
_ATTN = Launcher(_tq_attn_kernel)
_REDUCE = Launcher(_tq_reduce_kernel)

_ATTN_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_E": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (64, 8, 2), (128, 8, 2), (32, 8, 2)]
]  # the packed bytes are prefetched by hand one tile ahead (num_stages only pipelines the norms)


def _prune_attn_configs(configs, named_args, **kwargs):
    """Drop tiles that spill registers on sm_90 (ptxas through Triton 3.9's sm_90 compile of every class: decode
    TQ4 / TQ3 / K4V2 fp16, bf16 GQA-7 Sq=4, chunked prefill, float32). Configs that exceed shared memory are
    skipped by the autotuner itself (OutOfResources)."""
    hdp = kwargs.get("HEAD_DP", named_args.get("HEAD_DP"))
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))
    q = named_args.get("q_ptr")
    fp32 = q is not None and q.dtype == torch.float32
    keep = []
    for c in configs:
        bn, warps = c.kwargs["BLOCK_N"], c.num_warps
        if block_m >= 64 and (bn > 32 or warps < 8):  # prefill row tiles: big accumulators
            continue
        if (fp32 or hdp > 128) and (warps < 8 or bn > 64):
            continue
        if block_m >= 32 and warps < 8 and bn > 32:
            continue
        keep.append(c)
    return keep or configs[:1]


@functools.cache
def _tuned_attn_kernel():
    return triton.autotune(
        configs=_ATTN_CONFIGS,
        key=["BLOCK_M", "HEAD_DP", "K_BITS", "V_BITS", "K_E", "V_E", "PAGED", "MASK_MODE", "CAUSAL"],
        prune_configs_by={"early_config_prune": _prune_attn_configs},
    )(_tq_attn_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pdl_on(device: torch.device) -> bool:
    """Programmatic dependent launch available: a CUDA device of compute capability >= 9 and a Triton with GDC."""
    return device.type == "cuda" and _pdl_capable(device.index or 0)


@functools.lru_cache(maxsize=16)
def _pdl_capable(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


# --------------------------------------------------------------------------------------------------
# Python side: validation
# --------------------------------------------------------------------------------------------------


def _check_codecs(codecs, head_dim: int, device: torch.device) -> None:
    if not isinstance(codecs, Codecs):
        raise TypeError(f"codecs must be a turboquant_vllm.layout.Codecs, got {type(codecs).__name__}")
    key = (id(codecs), head_dim, device)
    if _CODECS_OK.get(key) is codecs:  # a Codecs is frozen: validated once per (object, head_dim, device)
        return
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
    if len(_CODECS_OK) >= 64:
        _CODECS_OK.clear()
    _CODECS_OK[key] = codecs


def _check_query(query: torch.Tensor) -> None:
    check_tensor(query, "query", ndim=4, dtypes=FLOAT_DTYPES)


def _check_store(packed, norms, pname, nname, lead: tuple[int, ...], bits: int, head_dim: int, device) -> None:
    """packed uint8 [*lead, n, D*bits/8] and norms bfloat16 [*lead, n] (lead = (rows, Hkv))."""
    check_tensor(packed, pname, ndim=4, dtypes=(torch.uint8,), device=device)
    check_tensor(norms, nname, ndim=3, dtypes=(NORM_DTYPE,), device=device)
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

# Centroid lookup on the GPU for bits <= 5: warp shuffle (True) or an L1 load per element (False, as in the
# interpreter). Module-level so benchmarks can compare the two.
SHUFFLE_GATHER = True
# 4-bit symmetric codebooks on the sub-tile path: byte-permute lookups (GATHER 3) instead of shuffles.
PERMUTE_GATHER = os.environ.get("TQ_PERMUTE", "1") != "0"
SUBTILE_DECODE = True  # decode (<= 16 query rows per program): the sub-tile path with one warp per program
DECODE_CONFIG: tuple[int, int, int] | None = None  # (BLOCK_N, num_warps, num_stages) override of the sub-tile path
DECODE_MAXNREG: int | None = None  # register cap of the sub-tile path (None: the compiler's choice, measured best)
# query rotation: (rows, columns, K step) per program, warps. The whole K in one step (one round of loads):
# 2.9 vs 4.6 us at B = 1 (1 x 128K call 73.7 vs 75.2 us, 1 x 4K 13.8 vs 14.2; H100 2026-11-26, qrot_tile_sweep)
_QROT_TILE = (64, 32, 128, 4)
_DECODE_RESIDENT = 8  # one-warp programs an SM needs resident to keep enough loads in flight
# Decode's three kernels as programmatic dependent launches (sm_90+, the sub-tile path, light grids): each
# kernel's launch and start overlap the end of the one before; each waits (griddepcontrol.wait) before its first
# load. TQ_PDL=0: off.
PDL = os.environ.get("TQ_PDL", "1") != "0"
_PDL_MAX_ROWS = 32  # PDL on a full wave only for at most this many (row block, b, kv head) rows (_launch_planned)
# A call planned once is replayed from its _CallPlan by the next call with the same key (_call_key): the other
# layers of a decode step. PLAN_REUSE = False: every call plans (tests compare the two).
PLAN_REUSE = True
_PLANS: dict = {}
_PLANS_MAX = 64
_MIN_CHUNK = 128  # tokens per split on the GPU (a multiple of every autotuned BLOCK_N)
_SPLIT_OVERHEAD = 1  # fixed cost of one program (its query rows, partials, ramp-up), in units of _MIN_CHUNK tokens
_MAX_SPLITS = 128
_CODEBOOKS: dict = {}  # (kind, id(codecs), dtype) -> (codecs, value): see _per_codecs
_CODEBOOKS_MAX = 512
_CODECS_OK: dict = {}  # (id(codecs), head_dim, device) -> codecs, validated once


def _widest_plane(bits: int) -> int:
    return 8 if bits == 8 else (4 if bits & 4 else 2 if bits & 2 else 1)


@functools.lru_cache(maxsize=256)
def _geometry(bits: int, d: int, max_unit: int) -> tuple[int, int, int]:
    """(W, E, UWP) of one side: widest plane width, unit bytes, padded sub-tile width (see _tq_attn_kernel).

    E is the widest unit (4 / 2 / 1 bytes, <= max_unit, <= W so there are at most 8 sub-tiles) that keeps
    >= 16 columns per sub-tile (tl.dot's minimum). 4 bits, head_dim 128: E = 4, 8 sub-tiles of 16 columns;
    2 and 3 bits: E = 2, 8 sub-tiles of 16.
    """
    w = _widest_plane(bits)
    r_w = d * w // 8
    e = 1
    for cand in (4, 2):
        if cand <= max_unit and cand <= w and r_w % cand == 0 and r_w // cand >= 16:
            e = cand
            break
    return w, e, max(16, next_pow2(r_w // e))


def _max_unit(packed: torch.Tensor) -> int:
    """Widest unit (bytes) the kernel may load from this packed tensor: unit-stride bytes, aligned rows."""
    if packed.stride(-1) != 1:
        return 1
    for e in (4, 2):
        if packed.data_ptr() % e == 0 and all(st % e == 0 for st in packed.stride()[:-1]):
            return e
    return 1


def _per_codecs(kind: str, codecs: Codecs, dtype: torch.dtype, build):
    """build(codecs, dtype), memoised per (kind, Codecs object, dtype). Every layer holds its own device Codecs,
    so the bound leaves room for two kinds over 128 layers: a model never rebuilds them step after step."""
    key = (kind, id(codecs), dtype)
    hit = _CODEBOOKS.get(key)
    if hit is not None and hit[0] is codecs:
        return hit[1]
    value = build(codecs, dtype)
    if len(_CODEBOOKS) >= _CODEBOOKS_MAX:
        _CODEBOOKS.clear()
    _CODEBOOKS[key] = (codecs, value)
    return value


def _codebooks(codecs: Codecs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The K / V codebooks in the compute dtype, built once per (Codecs, dtype), each 1 KB aligned (the kernel
    addresses entry idx as base | idx * itemsize)."""

    def build(codecs, dtype):
        buf = torch.zeros(3 * 1024, dtype=torch.uint8, device=codecs.rotation.device)
        off = -buf.data_ptr() % 1024
        tabs = []
        for i, cent in enumerate((codecs.k_centroids, codecs.v_centroids)):
            t = buf[off + i * 1024 : off + i * 1024 + cent.numel() * dtype.itemsize].view(dtype)
            t.copy_(cent)
            tabs.append(t)
        return tabs[0], tabs[1]

    return _per_codecs("tables", codecs, dtype, build)


def _bit_patterns(values: list[float], dtype: torch.dtype) -> list[int]:
    """The values rounded to `dtype` (2 or 4 bytes), as unsigned integers of their bits."""
    raw = torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16 if dtype.itemsize == 2 else torch.int32)
    return [b & (0xFFFF if dtype.itemsize == 2 else 0xFFFFFFFF) for b in raw.tolist()]


def _table_asm(values: list[float], dtype: torch.dtype) -> str:
    """PTX of GATHER 2: $0 = values[$1 mod 32 mod len] in `dtype` (len = 2**bits <= 32).

    Lane l's source register holds entry l mod len, chosen from immediates by setp/selp on %laneid (the
    compiler keeps one copy per loop iteration: every use computes the same thing), then one shfl.sync.idx
    reads lane $1 (its low 5 bits; higher bits are ignored, lower-width tables are replicated across lanes).
    """
    n = len(values)
    bits = [f"0x{b:08X}" for b in _bit_patterns(values, dtype)]
    ops = ["{", ".reg .b32 tql, tqt, tqr;", ".reg .pred tqp;", "mov.u32 tql, %laneid;"]
    ops += [f"and.b32 tql, tql, {n - 1};", f"mov.b32 tqt, {bits[0]};"]
    for i in range(1, n):
        ops += [f"setp.eq.u32 tqp, tql, {i};", f"selp.b32 tqt, {bits[i]}, tqt, tqp;"]
    if dtype.itemsize == 2:
        ops += ["shfl.sync.idx.b32 tqr, tqt, $1, 0x1f, -1;", "cvt.u16.u32 $0, tqr;", "}"]
    else:
        ops += ["shfl.sync.idx.b32 $0, tqt, $1, 0x1f, -1;", "}"]
    return " ".join(ops)


def _permute_words(values: list[float], dtype: torch.dtype) -> tuple[int, int, int, int] | None:
    """GATHER 3's tables, or None where it does not apply: a 16-entry 16-bit codebook in sign-magnitude code
    order (core.kvcodec.centroids_by_code; values[8 + j] == -values[j] bit for bit, values[:8] positive). Returns
    the low bytes of the magnitudes m_j = values[j] as two little-endian words (m_0..m_3, m_4..m_7), then their
    high bytes likewise."""
    if len(values) != 16 or dtype.itemsize != 2:
        return None
    bits = _bit_patterns(values, dtype)
    mags = bits[:8]
    if any(m & 0x8000 for m in mags) or any(bits[8 + j] != mags[j] | 0x8000 for j in range(8)):
        return None

    def word(bs: list[int]) -> int:
        return bs[0] | bs[1] << 8 | bs[2] << 16 | bs[3] << 24

    lo, hi = [m & 0xFF for m in mags], [m >> 8 for m in mags]
    return word(lo[:4]), word(lo[4:]), word(hi[:4]), word(hi[4:])


def _permute_asm(values: list[float], dtype: torch.dtype) -> str:
    """PTX of GATHER 3 for a codebook _permute_words accepts ("" otherwise).

    One block takes two packed 4-bit units ($8, $9: pack=2; 8 codes each, sub-tile T at bits
    8 * (T % 4) + 4 * (T // 4)) and returns the eight sub-tiles' values, $T = values[code T of $8] in the low half
    and values[code T of $9] in the high half: the MMA operand's register. A code's low 3 bits index its
    magnitude, its bit 3 is the sign: byte permutes (prmt) look the magnitudes' low and high bytes up in two
    8-byte tables, four codes per prmt, and the sign bits are moved into the high bytes: ~2 instructions per
    code, no shuffle (16 x 32K decode 15% faster than GATHER 2 on the H100, same outputs). Each table's second
    word is an immediate; its first is `imm | (popc(%laneid) >> 6)` (= imm): ptxas cannot prove that value
    uniform, so it keeps it in a register for the whole loop instead of copying an immediate from a uniform
    register before every prmt (-123 copies per 32-token tile).
    """
    words = _permute_words(values, dtype)
    if words is None:
        return ""
    ops = ["{", ".reg .b32 tqx, tqj, tqs, tqa, tql, tqh, tqz, tq0, tq2;"]
    ops += ["mov.u32 tqz, %laneid;", "popc.b32 tqz, tqz;", "shr.u32 tqz, tqz, 6;"]
    ops += [f"or.b32 tq0, tqz, 0x{words[0]:08X};", f"or.b32 tq2, tqz, 0x{words[2]:08X};"]
    # word x: byte e of both units interleaved, [u0.e, u1.e, u0.e+1, u1.e+1]: sub-tiles e, e + 4, e + 1, e + 5
    for sel, (t0, t1, t2, t3) in (("0x5140", (0, 4, 1, 5)), ("0x7362", (2, 6, 3, 7))):
        ops += [f"prmt.b32 tqx, $8, $9, {sel};"]
        ops += ["and.b32 tqj, tqx, 0x77777777;"]  # the magnitude index of each code (prmt selectors)
        ops += ["shl.b32 tqs, tqx, 4;"]
        for half, (oa, ob) in enumerate(((t0, t1), (t2, t3))):
            if half:
                ops += ["shr.u32 tqj, tqj, 16;"]
            ops += [f"prmt.b32 tql, tq0, 0x{words[1]:08X}, tqj;", f"prmt.b32 tqh, tq2, 0x{words[3]:08X}, tqj;"]
            ops += [f"prmt.b32 tqa, tqs, tqx, {'0x7362' if half else '0x5140'};"]  # byte i msb: code i's sign
            ops += ["lop3.b32 tqh, tqh, tqa, 0x80808080, 0xF8;"]  # h | (a & 0x80..)
            ops += [f"prmt.b32 ${oa}, tql, tqh, 0x6240;", f"prmt.b32 ${ob}, tql, tqh, 0x7351;"]
    ops += ["}"]
    return " ".join(ops)


def _table_asms(codecs: Codecs, dtype: torch.dtype) -> tuple[str, str, str, str]:
    """(K, V) GATHER-2 PTX and (K, V) GATHER-3 PTX ("" where it does not apply) for a Codecs, built once per
    (Codecs, dtype) (one device-to-host copy, at first use)."""

    def build(codecs, dtype):
        kv, vv = codecs.k_centroids.cpu().tolist(), codecs.v_centroids.cpu().tolist()
        k = _table_asm(kv, dtype) if codecs.layout.k_bits <= 5 else ""
        v = _table_asm(vv, dtype) if codecs.layout.v_bits <= 5 else ""
        k3 = _permute_asm(kv, dtype) if codecs.layout.k_bits == 4 else ""
        v3 = _permute_asm(vv, dtype) if codecs.layout.v_bits == 4 else ""
        return k, v, k3, v3

    return _per_codecs("asm", codecs, dtype, build)


@functools.lru_cache(maxsize=256)
def _shape_plan(hq: int, sq: int, d: int, hkv: int, dtype: torch.dtype, interp: bool):
    """Tile shapes from the head counts, Sq, head_dim and dtype (interpreter: fewest, widest steps)."""
    group = hq // hkv
    rows = group * sq
    hdp = max(16, next_pow2(d))
    single_max = 32 if dtype == torch.float32 else (128 if hdp <= 128 else 64)  # bigger row tiles spill on sm_90
    if rows <= single_max:
        block_m, m_blocks = max(16, next_pow2(rows)), 1
    else:
        # chunked prefill: big row tiles amortise the tile building over more query rows
        block_m, m_blocks = single_max, _cdiv(rows, single_max)
    # float32 queries: 3xTF32 (float32-level accuracy on tensor cores; "ieee" FMA dots spill on sm_90).
    prec = "tf32x3" if dtype == torch.float32 else "tf32"
    meta = dict(GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, DOT_PREC=prec, BLOCK_M=block_m)
    return group, rows, hdp, block_m, m_blocks, block_m * m_blocks, prec, meta


@functools.lru_cache(maxsize=4096)
def _num_splits(programs: int, chunks: int, sms: int, block_m: int = 16, resident: int = 2) -> int:
    """Splits of the compressed token range for `programs` (B*Hkv*row blocks) and `chunks` (tokens / _MIN_CHUNK).

    Model: an SM holding k programs takes k / resident * (chunks / ns + overhead) once it holds >= `resident`
    programs (fewer cannot keep enough loads in flight, and run no faster); the overhead of a split grows with
    its partials (BLOCK_M rows). Fewest splits among the cheapest.
    """
    overhead = _SPLIT_OVERHEAD + block_m / 16
    best, best_cost = 1, float("inf")
    for ns in range(1, min(chunks, _MAX_SPLITS) + 1):
        k = -(-programs * ns // sms)
        cost = max(k, resident) / resident * (-(-chunks // ns) + overhead)
        if cost < best_cost:
            best, best_cost = ns, cost
    return best


def _splits(programs: int, max_tokens: int, se: int, num_kv_splits, device, interp: bool, block_m: int,
            resident: int = 2):  # fmt: skip
    """(chunk, NS_C, NS_E) from host-side numbers only. The chunk is sized for the compressed tokens alone; the
    exact segment (at decode one new token, or a window of recent ones) takes ceil(Se / chunk) more splits, short
    programs left out of the cost model. Sizing the chunk for both put one more compressed split on every row at
    one exact token and spilled 16 x 32K decode into a second wave (+58%, H100)."""
    align = 16 if interp else _MIN_CHUNK
    base = max_tokens if max_tokens > 0 else max(1, se)
    if num_kv_splits is not None:
        want = int(num_kv_splits)
        if want < 1:
            raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    elif interp:
        want = _cdiv(16, programs)
    else:
        want = _num_splits(programs, _cdiv(base, align), _num_sms(device.index or 0), block_m, resident)
    want = max(1, min(want, _cdiv(base, align)))
    chunk = _cdiv(_cdiv(base, want), align) * align
    return chunk, max(1, _cdiv(max_tokens, chunk)), _cdiv(se, chunk)


@functools.lru_cache(maxsize=256)
def _reduce_plan(ns_c: int, ns: int, out_rows: int, hdp: int, interp: bool):
    """(BLOCK_R, NS_BLOCK, BLOCK_K, BLOCK_C, num_warps, ONE_ROUND, NSE_BLOCK) of the reduction: all compressed
    splits of a row in one round of loads (up to 128; ~8K elements of partials a program), few programs' worth
    of serial latency (interpreter: few big programs). ONE_ROUND where the compressed splits fit one block, the
    exact ones (NS - NS_C: one at decode) one more, and the row block is small."""
    ns_block = min(next_pow2(max(ns_c, 1)), 128)
    nse_block = next_pow2(max(ns - ns_c, 1))
    fits = ns_c <= ns_block and nse_block <= 16
    if interp:
        block_r = min(next_pow2(out_rows), max(1, (1 << 14) // (ns_block * hdp)))
        return block_r, ns_block, hdp, hdp, 4, fits and block_r < 16, nse_block
    block_c = min(hdp, 64)
    block_k = min(hdp, 32)
    if ns_block <= 16 and (out_rows // 16) * (hdp // block_c) >= 64:
        # 16 rows a program, the back-rotation one tl.dot: each program reads Pi's columns once for 16 rows
        # (with fewer rows, every row block re-reads Pi: 512 rows x 8 splits at B = 16 read 16 MB of it)
        return 16, ns_block, block_k, block_c, 4, False, nse_block
    by_rows = 1 << (max(1, out_rows // 256).bit_length() - 1)  # keep >= ~256 programs where there are rows
    block_r = max(1, min(8192 // (ns_block * hdp), by_rows))
    # fewer rows: a broadcast product [BLOCK_R, BLOCK_K, BLOCK_C] for the back-rotation, kept small
    block_r = min(block_r, 4096 // (block_k * block_c))
    one_round = fits and block_r * ns_block * hdp <= 16384
    if block_r == 1 and one_round and hdp <= 128:
        # one row a program (B = 1 decode): warps and tiles grow with the partials, ~128 floats of them a thread.
        # Graph-replay medians of the whole call, H100 2026-11-26 (reduce_tiling_b1): 32 splits (1 x 4K) 1 warp,
        # 16 columns: 10.9 vs 12.8 us with 4 warps and 64; 64 splits (1 x 8K) 2 warps, 32 columns: 12.8 vs 14.0;
        # 128 splits (1 x 16K - 128K) 4 warps, 32 columns, the whole K at once: 17.9 vs 18.2, 69.9 vs 70.9.
        # Not head_dim 256: 1 x 8K there took 33.3 us this way against 29.2 (b1_reduce_pdl_ab)
        warps = min(4, max(1, ns_block * hdp // 4096))
        block_c = min(hdp, 16 * warps if warps < 4 else 32)
        block_k = min(hdp, 64 if warps < 4 else 128)
        return 1, ns_block, block_k, block_c, warps, True, nse_block
    # several rows a program: 8 warps from 8K partials (one row: 4; 1 x 128K 4.6 vs 7.6 us with 8, H100 2026-11-26)
    warps = 8 if block_r * ns_block * hdp >= 8192 and block_r > 1 else 4
    # one round: every partial of the block in registers at once (<= 16K floats: ~64 registers a thread at 8 warps)
    return block_r, ns_block, block_k, block_c, warps, one_round, nse_block


def _decode_config(hdp: int, rows: int, k_bits: int = 4, v_bits: int = 4) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the sub-tile path. Graph-replay medians on the H100 (2026-11-25,
    TQ4, B = 16 x 32K unless said): 32-token tiles are faster for head_dim 128 with GQA (0.298 vs 0.308 ms;
    B = 1 x 128K 0.094 vs 0.098), head_dim 256 (0.746 vs 1.19) and two-plane codes (3 / 5 bits); 64-token
    tiles for head_dim 64 (0.166 vs 0.192; K3/V2 0.333 vs 0.463) except where the values have two planes
    (2026-11-26: K4/V3 0.318 with 32 tokens and 2 stages vs 0.325, at 1 x 32K 0.0288 vs 0.0311; K3/V3 0.517
    with 3 stages vs 0.667) and one query row per kv head (MHA decode: 1.16 vs 1.30); head_dim 256 with 2
    stages (0.634 vs 0.738)."""
    if rows == 1:
        return 64, 1, 3
    if hdp <= 64:
        if len(planes(v_bits)) == 1:
            return 64, 1, 3
        return (32, 1, 3) if len(planes(k_bits)) > 1 else (32, 1, 2)
    return (32, 1, 2) if hdp > 128 else (32, 1, 3)


def _use_subtile(block_m: int, dtype: torch.dtype, interp: bool) -> bool:
    """The sub-tile path for decode-sized row blocks in 16-bit, at every batch and length (the H100 measurements
    of 2026-11-25 favour it at every decode shape once the rotation left the split programs). float32 and bigger
    row blocks spill with one warp; the interpreter takes it for float32 too, so that the CPU tests cover it."""
    return SUBTILE_DECODE and block_m <= 16 and (interp or dtype != torch.float32)


def _paired_norms(kn: torch.Tensor, vn: torch.Tensor) -> bool:
    """Key and value norms interleaved as one bfloat16 [..., 2] store (the cache's): each token's pair is one
    4-byte-aligned word at its key norm, read by a single 32-bit load."""
    return (
        kn.dtype == vn.dtype == torch.bfloat16
        and kn.stride() == vn.stride()
        and vn.data_ptr() == kn.data_ptr() + 2
        and kn.data_ptr() % 4 == 0
        and all(st % 2 == 0 for st in kn.stride())
    )


def _launch(query, *, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens, max_tokens,
            key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits):  # fmt: skip
    """Plan and launch the three kernels; a call whose plan is known (an earlier layer of the same decode step:
    same shapes, strides, lengths, dtypes and pointer alignments) only fills in the addresses (_CallPlan)."""
    if not (PLAN_REUSE and fast_launch_enabled()):
        return _launch_planned(query, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens,
                               max_tokens, key_exact, value_exact, mask, causal, causal_comp, scale, out,
                               num_kv_splits, None)  # fmt: skip
    ptr = _addresses(query, kp, kn, vp, vn, k_mean, v_mean, codecs, block_table, seq_lens, key_exact, value_exact,
                     mask)  # fmt: skip
    key = _call_key(query, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens, max_tokens,
                    key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits, ptr)  # fmt: skip
    plan = _PLANS.get(key)
    if plan is not None:
        return plan.run(ptr, out)
    record: list = []
    out = _launch_planned(query, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens,
                          max_tokens, key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits,
                          record)  # fmt: skip
    plan = _CallPlan.build(record)
    if plan is not None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return out


def _addresses(query, kp, kn, vp, vn, k_mean, v_mean, codecs, block_table, seq_lens, key_exact, value_exact,
               mask) -> dict:  # fmt: skip
    """The call's addresses by role (_launch_planned's named tensors; absent ones: the query's / key norms', which
    the kernels get as dummy pointers)."""
    kc, vc = _codebooks(codecs, query.dtype)
    q, kn_p = query.data_ptr(), kn.data_ptr()
    return {
        "q": q, "pi": codecs.rotation.data_ptr(), "k_mean": k_mean.data_ptr(), "v_mean": v_mean.data_ptr(),
        "kp": kp.data_ptr(), "kn": kn_p, "vp": vp.data_ptr(), "vn": vn.data_ptr(),
        "kc": kc.data_ptr(), "vc": vc.data_ptr(),
        "bt": kn_p if block_table is None else block_table.data_ptr(),
        "sl": kn_p if seq_lens is None else seq_lens.data_ptr(),
        "ke": q if key_exact is None else key_exact.data_ptr(),
        "ve": q if value_exact is None else value_exact.data_ptr(),
        "mask": q if mask is None else mask.data_ptr(),
    }  # fmt: skip


def _call_key(query, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens, max_tokens,
              key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits, ptr) -> tuple:  # fmt: skip
    """Everything _launch_planned reads except the addresses themselves: shapes, strides, dtypes, lengths, flags,
    each pointer's offset from 16-byte alignment (Triton specializes on it; the packed bytes' unit width and the
    paired norms depend on it too), the codecs' layout and codebook values (not the Codecs object: every layer
    has its own, with the same values) and the module settings benchmarks flip."""
    key = (
        query.shape, query.stride(), query.dtype, query.device, ptr["q"] & 15,
        kp.shape, kp.stride(), kp.dtype, ptr["kp"] & 15, vp.shape, vp.stride(), vp.dtype, ptr["vp"] & 15,
        kn.stride(), kn.dtype, ptr["kn"] & 15, vn.stride(), vn.dtype, ptr["vn"] - ptr["kn"],
        k_mean.shape, k_mean.stride(), k_mean.dtype, ptr["k_mean"] & 15,
        v_mean.shape, v_mean.stride(), v_mean.dtype, ptr["v_mean"] & 15,
        codecs.layout, codecs.rotation.stride(), codecs.rotation.dtype, ptr["pi"] & 15,
        _codebook_key(codecs, query.dtype),
        n_comp, max_tokens, causal, causal_comp, scale, num_kv_splits, paged,
        SHUFFLE_GATHER, PERMUTE_GATHER, SUBTILE_DECODE, DECODE_CONFIG, DECODE_MAXNREG, PDL, _PDL_MAX_ROWS,
        _DECODE_RESIDENT, _MIN_CHUNK, _SPLIT_OVERHEAD, _MAX_SPLITS, _QROT_TILE,
    )  # fmt: skip
    for role, t in (("ke", key_exact), ("ve", value_exact), ("mask", mask), ("bt", block_table), ("sl", seq_lens)):
        key += (None,) if t is None else (t.shape, t.stride(), t.dtype, ptr[role] & 15)
    key += (None,) if out is None else (out.shape, out.stride(), out.dtype, out.data_ptr() & 15)
    return key


def _codebook_key(codecs: Codecs, dtype: torch.dtype) -> tuple:
    """The codebook values as the kernels see them (the shuffle tables' PTX; their memo's key is the Codecs)."""
    return _table_asms(codecs, dtype) if codecs.layout.k_bits <= 5 or codecs.layout.v_bits <= 5 else ()


class _CallPlan:
    """A planned call: its launches as a Replay, the workspace size (the rotated query's and <q, k_mean>'s byte
    offsets in it) and the output's shape, for the calls with the same _call_key."""

    __slots__ = ("replay", "ws_numel", "ws_offsets", "out_shape", "out_dtype", "device")

    @staticmethod
    def build(record: list):
        """From _launch_planned's record: the named tensors, then (grid, args, Launcher.last) per launch."""
        if len(record) != 4:
            return None
        named = record[0]
        replay = Replay.build(named, record[1:])
        if replay is None:
            return None
        plan = _CallPlan()
        ws, out = named["ws"], named["out"]
        plan.replay = replay
        plan.ws_numel = ws.numel()
        plan.ws_offsets = tuple(named[r].data_ptr() - ws.data_ptr() for r in ("qr", "qm"))  # bytes
        plan.out_shape, plan.out_dtype, plan.device = tuple(out.shape), out.dtype, out.device
        return plan

    def run(self, ptr: dict, out: torch.Tensor | None) -> torch.Tensor:
        """Launch with the call's addresses (_addresses), a fresh workspace and `out` (allocated when None)."""
        if out is None:
            out = torch.empty(self.out_shape, device=self.device, dtype=self.out_dtype)
        ws = torch.empty(self.ws_numel, device=self.device, dtype=torch.float32)
        w = ws.data_ptr()
        ptr = {**ptr, "ws": w, "qr": w + self.ws_offsets[0], "qm": w + self.ws_offsets[1], "out": out.data_ptr()}
        self.replay.run(ptr, self.device.index)
        return out


def _launch_planned(query, paged, kp, kn, vp, vn, k_mean, v_mean, codecs, n_comp, block_table, seq_lens, max_tokens,
                    key_exact, value_exact, mask, causal, causal_comp, scale, out, num_kv_splits, record):  # fmt: skip
    """Plan the call from its shapes and launch it. record (a list, or None): receives the named tensors, then
    (grid, args, Launcher.last) per launch, for _CallPlan."""
    bsz, hq, sq, d = query.shape
    hkv = kp.shape[1]
    se = 0 if key_exact is None else key_exact.shape[2]
    lay = codecs.layout
    dev = query.device
    interp = interpreting()
    group, rows, hdp, block_m, m_blocks, mp, prec, meta = _shape_plan(hq, sq, d, hkv, query.dtype, interp)
    k_w, k_e, k_uwp = _geometry(lay.k_bits, d, _max_unit(kp))
    v_w, v_e, v_uwp = _geometry(lay.v_bits, d, _max_unit(vp))
    if out is None:
        out = torch.empty(bsz, sq, hq, d, device=dev, dtype=query.dtype)
    if bsz == 0 or hq == 0 or sq == 0:
        return out
    bh = bsz * hkv
    subtile = _use_subtile(block_m, query.dtype, interp)
    resident = _DECODE_RESIDENT if subtile and not interp else 2
    chunk, ns_c, ns_e = _splits(bh * m_blocks, max_tokens, se, num_kv_splits, dev, interp, block_m, resident)
    ns = ns_c + ns_e
    # PDL for light grids (<= 2 programs per SM; latency-bound calls: 1 x 4K 16.0 -> 14.6 us) and for full waves
    # of few (b, kv head) rows (B * Hkv <= 32, i.e. many splits: 1 x 128K 71.2 -> 70.2 us, 1 x 32K 26.8 -> 25.8,
    # 4 x 32K 75.2 -> 73.3, head_dim 64 alike). Not for full waves of many rows: head_dim 64 with B * Hkv >= 64
    # (1024 programs of 8 or 16 splits) ran 26-39% slower (16 x 32K 163.6 -> 227.7 us, H100 2026-11-26); the
    # early-launched programs appear to land unevenly across the SMs. Leaving the attention kernel as a plain
    # launch there and only the rotation and the reduction as dependent launches gained nothing.
    pdl = PDL and subtile and not interp and _pdl_on(dev)
    pdl = pdl and (m_blocks * bh * ns <= 2 * _num_sms(dev.index or 0) or m_blocks * bh <= _PDL_MAX_ROWS)
    pdl_opt = {"launch_pdl": True} if pdl else {}
    if bh > _MAX_GRID_YZ or ns > _MAX_GRID_YZ:
        raise ValueError(f"B * Hkv ({bh}) and the KV split count ({ns}) must be <= {_MAX_GRID_YZ} (CUDA grid limit)")
    scale = d**-0.5 if scale is None else float(scale)
    kc, vc = _codebooks(codecs, query.dtype)
    # one float32 buffer: the split partials (acc, m, l), then the rotated query and <q, k_mean> (scaled)
    n_ws = bh * ns * mp * (hdp + 2)
    ws = torch.empty(n_ws + bh * mp * (hdp + 1), device=dev, dtype=torch.float32)
    qr = ws[n_ws : n_ws + bh * mp * hdp]
    qm = ws[n_ws + bh * mp * hdp :]
    pi = codecs.rotation
    kmb = k_mean.stride(0) if k_mean.shape[0] > 1 else 0
    vmb = v_mean.stride(0) if v_mean.shape[0] > 1 else 0
    q_block = min(max(16, next_pow2(bh * rows)), _QROT_TILE[0])
    rot_c = hdp if interp else min(_QROT_TILE[1], hdp)
    q_grid = (_cdiv(bh * rows, q_block), hdp // rot_c, 1)
    q_args = (query, *query.stride(), pi, *pi.stride(), k_mean, kmb, k_mean.stride(1), k_mean.stride(2), qr, qm,
              bh, hkv, sq, rows, mp, scale * _LOG2E)  # fmt: skip
    _QROT(
        q_grid,
        q_args,
        dict(GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, PREC=prec, BLOCK_M=q_block,
             BLOCK_K=hdp if interp else min(_QROT_TILE[2], hdp), BLOCK_C=rot_c, PDL=pdl),
        num_warps=_QROT_TILE[3],
        **pdl_opt,
    )  # fmt: skip
    if record is not None:
        record.append((q_grid, q_args, _QROT.last))
    ke = key_exact if key_exact is not None else query
    ve = value_exact if value_exact is not None else query
    if mask is None:
        mask_mode, mask_t, mstr = _MASK_NONE, query, (0, 0, 0, 0)
    elif mask.dtype == torch.bool:
        mask_mode, mask_t = _MASK_BOOL, mask.view(torch.uint8)
        mstr = mask_t.stride()
    else:
        mask_mode, mask_t, mstr = _MASK_ADD, mask, mask.stride()
    if mask is not None and mstr[1] == 0 and (sq == 1 or mstr[2] == 0):
        mask_mode += 2  # the same mask row for every query row of a batch row: loaded once per tile
    if paged:
        bt, bt_str, sl, page = block_table, block_table.stride(), seq_lens, kp.shape[2]
    else:
        bt, bt_str, sl, page = kn, (0, 0), kn, 1
    args = (
        query, *query.stride(),
        qr, qm,
        kp, *kp.stride(), kn, *kn.stride(),
        vp, *vp.stride(), vn, *vn.stride(),
        kc, vc,
        bt, *bt_str, sl,
        ke, *ke.stride(), ve, *ve.stride(),
        mask_t, *mstr,
        ws,
        hkv, sq, rows, mp, ns_c, ns, n_comp, se, chunk, scale * _LOG2E,
    )  # fmt: skip
    grid = (m_blocks, bh, ns)  # split slowest: compressed splits first, exact ones last (see the kernel)
    shfl = SHUFFLE_GATHER and not interp  # inline PTX: not in the interpreter
    gather = 2 if subtile else 1
    k_gather = gather if shfl and lay.k_bits <= 5 else 0
    v_gather = gather if shfl and lay.v_bits <= 5 else 0
    k_tab, v_tab, k_perm, v_perm = _table_asms(codecs, query.dtype) if subtile and shfl else ("",) * 4
    permute = PERMUTE_GATHER and hdp <= 128  # head_dim 256 spills either way, more with GATHER 3 (slower, H100)
    if permute and k_gather == 2 and k_perm and k_e == 4:
        k_gather, k_tab = 3, k_perm
    if permute and v_gather == 2 and v_perm and v_e == 4:
        v_gather, v_tab = 3, v_perm
    flags = dict(
        K_BITS=lay.k_bits, K_W=k_w, K_E=k_e, K_NT=k_e * (8 // k_w), K_UWP=k_uwp, V_BITS=lay.v_bits, V_W=v_w, V_E=v_e,
        V_NT=v_e * (8 // v_w), V_UWP=v_uwp, K_GATHER=k_gather, V_GATHER=v_gather, SUBTILE=subtile,
        K_TAB=k_tab if k_gather >= 2 else "", V_TAB=v_tab if v_gather >= 2 else "", PAGED=paged, PAGE_SIZE=page,
        PAIRED_NORMS=_paired_norms(kn, vn),
        CAUSAL=bool(causal), CAUSAL_COMP=bool(causal_comp), MASK_MODE=mask_mode,
    )  # fmt: skip
    attn_plan = None
    if interp:
        _tq_attn_kernel[grid](*args, **meta, **flags, BLOCK_N=16, BLOCK_E=16, num_warps=1 if subtile else 4)
    elif subtile:
        bn, warps, stages = DECODE_CONFIG or _decode_config(hdp, rows, lay.k_bits, lay.v_bits)
        extra = {} if DECODE_MAXNREG is None else {"maxnreg": DECODE_MAXNREG}
        _ATTN(grid, args, {**meta, **flags, "BLOCK_N": bn, "BLOCK_E": 16, "PDL": pdl}, num_warps=warps,
              num_stages=stages, **extra, **pdl_opt)  # fmt: skip
        attn_plan = _ATTN.last
    else:
        _tuned_attn_kernel()[grid](*args, **meta, **flags)
    if record is not None:
        record.append((grid, args, attn_plan))

    out_rows = bh * rows
    block_r, ns_block, block_k, block_c, r_warps, one_round, nse_block = _reduce_plan(ns_c, ns, out_rows, hdp, interp)
    r_grid = (_cdiv(out_rows, block_r), _cdiv(d, block_c), 1)
    r_args = (ws, out, *out.stride(), pi, *pi.stride(), v_mean, vmb, v_mean.stride(1), v_mean.stride(2),
              bh, hkv, sq, rows, mp, ns_c, ns)  # fmt: skip
    _REDUCE(
        r_grid,
        r_args,
        dict(GROUP=group, HEAD_DIM=d, HEAD_DP=hdp, PREC=prec, BLOCK_R=block_r, NS_BLOCK=ns_block, BLOCK_K=block_k,
             BLOCK_C=block_c, ONE_ROUND=one_round, NSE_BLOCK=nse_block, PDL=pdl),
        num_warps=r_warps,
        **pdl_opt,
    )  # fmt: skip
    if record is not None:
        record.append((r_grid, r_args, _REDUCE.last))
        # the caller's tensors by role (None where absent: the kernels then get the query / key norms as dummy
        # pointers, found here under those roles)
        named = dict(q=query, pi=pi, k_mean=k_mean, v_mean=v_mean, kp=kp, kn=kn, vp=vp, vn=vn, kc=kc, vc=vc,
                     bt=block_table, sl=seq_lens, ke=key_exact, ve=value_exact, mask=None if mask is None else mask_t,
                     ws=ws, qr=qr, qm=qm, out=out)  # fmt: skip
        record.insert(0, named)
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

    query [B, Hq, Sq, D]; k_packed uint8 [num_blocks, Hkv, block_size, D*k_bits/8]; k_norms bfloat16
    [num_blocks, Hkv, block_size] (v likewise; fastest as the two views of one [num_blocks, Hkv, block_size, 2]
    store, a token's pair then read by one 32-bit load); block_table int32 [B, max_blocks]; seq_lens int32 [B]
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
