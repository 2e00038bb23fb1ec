"""Fused TurboQuant compression of new K or V tokens straight into the packed cache (Triton).

``tq_compress_kv(keys, values, ...)`` does keys and values in one launch (a decode step's form; the cache uses it).
``tq_compress(x, mean, rotation, boundaries, bits, out_packed, out_norms, offset)`` writes tokens
``x[:, :, s]`` into positions ``offset + s`` of ``out_packed`` / ``out_norms`` in one pass per tile of
BLOCK_S tokens: subtract the mean, take the norm, divide, rotate (``tl.dot`` with ``Pi^T``), quantize
(rank = number of boundaries < y, i.e. ``torch.bucketize``; the stored code is its sign-magnitude relabelling,
``core.kvcodec.code_of_rank``), and pack per the plane layout of core/packing.py (docs/LAYOUT.md).

Quantizer. On the GPU, for <= 4 bits and 16-bit inputs: a cell table held in the lanes of each warp (built from
immediates, ``_cell_table_asm``): y's cell on a uniform 32-cell grid picks, by one warp shuffle, the codes of
the two ranks the cell can give and the one boundary inside it; one compare chooses (~9 instructions per element
against ~16 for a binary search; the kernel was bound by integer / select issue: 31% -> 51-55% of copy bandwidth
on the H100). The packed boundary moves by < 256 ulp, so an index can differ from bucketize's within ~3e-5 of a
boundary (far inside the fp16 rotation's own ~1e-4). Elsewhere (float32
inputs, > 4 bits, the interpreter, during a CUDA-graph capture of a boundaries tensor never seen before): a
branch-free binary search over the boundaries held as scalars (<= 4 bits) or gathered (above).

Rotation precision. fp16 / bf16 inputs: one tensor-core pass with the unit vector and Pi in fp16 (float32
accumulation; Pi converted once per rotation tensor and cached). The result differs from the float32
reference by ~1e-4 relative, so an index can differ by one level where a rotated coordinate lies that close
to a boundary: a small fraction of indices (~1e-3; the tests bound it at 1%, each off by exactly one).
float32 inputs: 3xTF32 (float32-level accuracy; exact float32 under the interpreter).

The rotation is computed per sub-slice of U = D * w_min / 8 coordinates (w_min: the narrowest plane): sub-slice
t (coordinates [t U, (t + 1) U)) lands, for a plane of width w and R = D * w / 8 bytes, in byte chunk
[(t mod R/U) U, ...) at bit w * (t div R/U), so every plane is packed with shifts and ORs of whole tiles,
no reshuffling, and stored with vector stores. Every bit width 1..8 and every head_dim that is a multiple
of 8 (up to 256 in the kernel; larger falls back to PyTorch) is supported.

Reference: ``core.kvcodec.compress_reference``. CPU tensors use the reference unless the Triton
interpreter is on.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ..core.codebook import check_bits
from ..core.kvcodec import code_of_rank, compress_reference
from ..layout import NORM_DTYPE
from ._common import FLOAT_DTYPES, check_tensor, interpreting, next_pow2, use_triton, version_of
from ._launch import Launcher, Replay, fast_launch_enabled

__all__ = ["compress_kv_unchecked", "tq_compress", "tq_compress_kv"]

_MAX_HEAD_DIM = 256
# float32 inputs: 3xTF32 on tensor cores (float32-level accuracy, ~1e-7 relative); "ieee" (FMA) spills on sm_90.
_DOT_PREC = "tf32x3"
# Tokens per block and warps (module-level so benchmarks can sweep them; 128 / 8 best of 10 on the H100 with the cell
# table, benchmarks/compress_configs.py): 16-bit inputs, float32 inputs; blocks per program ("tiles": 1 = one block
# each, as measured so far; more re-use the rotation's columns from L1) and the software-pipelining depth of that
# loop ("num_stages": None = Triton's default); "cell_table": the warp-shuffle cell-table quantizer on the GPU for
# <= 4 bits (_quantize's QASM; False: the binary search).
CONFIG = {"block_s": 128, "num_warps": 8, "block_s_f32": 16, "num_warps_f32": 4, "tiles": 1, "num_stages": None,
          "cell_table": True}  # fmt: skip
_HALF_PI: dict = {}  # (data_ptr, device) -> (rotation, its version counter, fp16 copy): see _per_tensor


def _cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a ConstexprFunction in Triton 3.9: ~10 us a call from Python)."""
    return -(-a // b)


@triton.jit
def _code_of_rank(rank, BITS: tl.constexpr):
    """The stored code of a centroid rank (core.kvcodec.code_of_rank): sign on the top bit, magnitude rank below."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    return tl.where(rank >= HALF, rank - HALF, 2 * HALF - 1 - rank)


@triton.jit
def _quantize(y, bnd_ptr, BITS: tl.constexpr, QASM: tl.constexpr = ""):
    """The stored code of y (int32): core.kvcodec.code_of_rank of the number of the 2**BITS - 1 sorted boundaries
    < y (torch.bucketize's rank).

    QASM (GPU, BITS <= 4; built by _cell_table_asm): a cell table in the lanes of a warp. y's cell on a uniform
    grid of 32 cells (one FMA, a clamp, a round) selects by one warp shuffle the number of boundaries below the
    cell and the (at most one) boundary inside it; one compare finishes. ~9 instructions per element instead
    of the search's ~16 (the compress kernel is bound by integer / select issue, not by memory).

    BITS <= 4: a branch-free binary search whose thresholds are selected among the boundaries held as scalars
    (BITS compares and 2**(BITS-1) - 1 selects per element instead of 2**BITS - 1 compares and adds).
    Larger BITS: a binary search whose thresholds are gathered (BITS loads and compares per element; the
    linear count it replaces unrolled 255 compares at 8 bits, minutes of compilation on sm_90).
    """
    if QASM != "":  # the asm returns the code
        code = tl.inline_asm_elementwise(QASM, "=r,f", [y], dtype=tl.int32, is_pure=True, pack=1)
    else:
        code = _code_of_rank(_rank(y, bnd_ptr, BITS), BITS)
    return code


@triton.jit
def _rank(y, bnd_ptr, BITS: tl.constexpr):
    """Number of the 2**BITS - 1 sorted boundaries < y (torch.bucketize), int32: _quantize's search."""
    if BITS == 1:
        idx = (y > tl.load(bnd_ptr)).to(tl.int32)
    elif BITS == 2:
        p1 = y > tl.load(bnd_ptr + 1)
        p0 = y > tl.where(p1, tl.load(bnd_ptr + 2), tl.load(bnd_ptr))
        idx = tl.where(p1, 2, 0) + p0.to(tl.int32)
    elif BITS == 3:
        b0, b1, b2, b3 = tl.load(bnd_ptr), tl.load(bnd_ptr + 1), tl.load(bnd_ptr + 2), tl.load(bnd_ptr + 3)
        b4, b5, b6 = tl.load(bnd_ptr + 4), tl.load(bnd_ptr + 5), tl.load(bnd_ptr + 6)
        p2 = y > b3
        p1 = y > tl.where(p2, b5, b1)
        p0 = y > tl.where(p2, tl.where(p1, b6, b4), tl.where(p1, b2, b0))
        idx = tl.where(p2, 4, 0) + tl.where(p1, 2, 0) + p0.to(tl.int32)
    elif BITS == 4:
        b0, b1, b2, b3 = tl.load(bnd_ptr), tl.load(bnd_ptr + 1), tl.load(bnd_ptr + 2), tl.load(bnd_ptr + 3)
        b4, b5, b6, b7 = tl.load(bnd_ptr + 4), tl.load(bnd_ptr + 5), tl.load(bnd_ptr + 6), tl.load(bnd_ptr + 7)
        b8, b9, b10, b11 = tl.load(bnd_ptr + 8), tl.load(bnd_ptr + 9), tl.load(bnd_ptr + 10), tl.load(bnd_ptr + 11)
        b12, b13, b14 = tl.load(bnd_ptr + 12), tl.load(bnd_ptr + 13), tl.load(bnd_ptr + 14)
        p3 = y > b7
        p2 = y > tl.where(p3, b11, b3)
        p1 = y > tl.where(p3, tl.where(p2, b13, b9), tl.where(p2, b5, b1))
        t_hi = tl.where(p2, tl.where(p1, b14, b12), tl.where(p1, b10, b8))
        t_lo = tl.where(p2, tl.where(p1, b6, b4), tl.where(p1, b2, b0))
        p0 = y > tl.where(p3, t_hi, t_lo)
        idx = tl.where(p3, 8, 0) + tl.where(p2, 4, 0) + tl.where(p1, 2, 0) + p0.to(tl.int32)
    else:  # binary search, the thresholds gathered from the (L1-resident) boundary table: BITS steps
        idx = tl.zeros(y.shape, dtype=tl.int32)
        for step in tl.static_range(BITS):
            probe = idx + (1 << (BITS - 1 - step))
            idx = tl.where(y > tl.load(bnd_ptr + probe - 1), probe, idx)
    return idx


@triton.jit
def _acc_field(a0, a1, a2, a3, f, Q: tl.constexpr):
    """OR f into accumulator Q of (a0, a1, a2, a3)."""
    if Q == 0:
        a0 = a0 | f
    elif Q == 1:
        a1 = a1 | f
    elif Q == 2:
        a2 = a2 | f
    else:
        a3 = a3 | f
    return a0, a1, a2, a3


@triton.jit
def _store_chunks(out_rows, stride_pd, smask, a0, a1, a2, a3, START: tl.constexpr, N: tl.constexpr,
                  U: tl.constexpr, UP: tl.constexpr):  # fmt: skip
    """Store the N byte chunks (a0..a3, U bytes each) of one plane starting at byte START."""
    j = tl.arange(0, UP)
    m = smask[:, None] & (j < U)[None, :]
    tl.store(out_rows + ((START + j) * stride_pd)[None, :], a0.to(tl.uint8), mask=m)
    if N > 1:
        tl.store(out_rows + ((START + U + j) * stride_pd)[None, :], a1.to(tl.uint8), mask=m)
    if N > 2:
        tl.store(out_rows + ((START + 2 * U + j) * stride_pd)[None, :], a2.to(tl.uint8), mask=m)
        tl.store(out_rows + ((START + 3 * U + j) * stride_pd)[None, :], a3.to(tl.uint8), mask=m)


@triton.jit
def _round_bf16(x):
    """Non-negative float32 -> the nearest bfloat16 value (ties to even), as float32: the store's own
    conversion is then exact. For the interpreter, whose conversion truncates; the GPU's rounds to nearest
    even already, so both store torch's ``x.to(torch.bfloat16)``."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _compress_tile(
    x_ptr, stride_xb, stride_xh, stride_xs, stride_xd,
    mean_ptr, stride_mb, stride_mh, stride_md,
    pi_ptr, stride_pr, stride_pc,
    bnd_ptr,
    pk_ptr, stride_pb, stride_ph, stride_pn, stride_pd,
    nrm_ptr, stride_nb, stride_nh, stride_nn,
    H, S, offset, off_ptr, stride_ob,
    BITS: tl.constexpr, WMIN: tl.constexpr, P_C: tl.constexpr, U: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DP: tl.constexpr, UP: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
    OFFSET_ON_DEVICE: tl.constexpr,
    TILES: tl.constexpr,
    QASM: tl.constexpr,
    ROUND_NORMS: tl.constexpr,
):  # fmt: skip
    """Token blocks program_id(0) * TILES ... + TILES - 1 (BLOCK_S tokens each) of one (batch, head) (program_id(1)):
    one program walks TILES blocks, so the rotation's columns come from L2 once and from L1 after."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, HEAD_DP)
    dmask = d < HEAD_DIM
    j = tl.arange(0, UP)
    jm = j < U
    mu = tl.load(mean_ptr + b * stride_mb + h * stride_mh + d * stride_md, mask=dmask, other=0.0)
    if OFFSET_ON_DEVICE:
        base = tl.load(off_ptr + b * stride_ob).to(tl.int64)
    else:
        base = offset
    for i in range(TILES):
        s = (tl.program_id(0) * TILES + i) * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = s < S
        s64 = s.to(tl.int64)
        x_rows = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + (s64 * stride_xs)[:, None]
        x = tl.load(x_rows + (d * stride_xd)[None, :], mask=smask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        r = tl.where(dmask[None, :], x - mu[None, :], 0.0)
        nrm = tl.sqrt(tl.sum(r * r, axis=1))
        unit = (r / tl.maximum(nrm, 1.1754943508222875e-38)[:, None]).to(pi_ptr.dtype.element_ty)
        pos = base + s64
        nrm_ptrs = nrm_ptr + b.to(tl.int64) * stride_nb + h.to(tl.int64) * stride_nh + pos * stride_nn
        # the GPU's float32 -> bfloat16 store conversion rounds to nearest even, the interpreter's truncates
        tl.store(nrm_ptrs, _round_bf16(nrm) if ROUND_NORMS else nrm, mask=smask)
        out_rows = pk_ptr + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + (pos * stride_pn)[:, None]

        # byte chunks of each plane: 4-bit plane (up to 4 chunks), 2-bit (up to 2), 1-bit and 8-bit (1)
        z = tl.zeros([BLOCK_S, UP], dtype=tl.int32)
        c40, c41, c42, c43 = z, z, z, z
        c20, c21, c22, c23 = z, z, z, z
        c10, c11, c12, c13 = z, z, z, z
        for t in tl.static_range(P_C):
            # y[:, j] = unit @ Pi[t U + j, :]^T, i.e. rotated coordinates t U + j
            pit = tl.load(pi_ptr + ((t * U + j) * stride_pr)[None, :] + (d * stride_pc)[:, None],
                          mask=dmask[:, None] & jm[None, :], other=0.0)  # fmt: skip
            y = tl.dot(unit, pit, input_precision=DOT_PREC)
            idx = _quantize(y, bnd_ptr, BITS, QASM)
            if BITS == 8:
                c10 = idx
            else:
                if (BITS & 4) != 0:
                    c40, c41, c42, c43 = _acc_field(c40, c41, c42, c43, (idx & 15) << (4 * (t // (4 // WMIN))),
                                                    t % (4 // WMIN))  # fmt: skip
                if (BITS & 2) != 0:
                    c20, c21, c22, c23 = _acc_field(c20, c21, c22, c23,
                                                    ((idx >> (BITS & 4)) & 3) << (2 * (t // (2 // WMIN))),
                                                    t % (2 // WMIN))  # fmt: skip
                if (BITS & 1) != 0:
                    c10, c11, c12, c13 = _acc_field(c10, c11, c12, c13, ((idx >> (BITS & 6)) & 1) << t, 0)
        if BITS == 8:
            _store_chunks(out_rows, stride_pd, smask, c10, c11, c12, c13, 0, 1, U, UP)
        else:
            if (BITS & 4) != 0:
                _store_chunks(out_rows, stride_pd, smask, c40, c41, c42, c43, 0, 4 // WMIN, U, UP)
            if (BITS & 2) != 0:
                _store_chunks(out_rows, stride_pd, smask, c20, c21, c22, c23, (BITS & 4) * HEAD_DIM // 8, 2 // WMIN, U,
                              UP)  # fmt: skip
            if (BITS & 1) != 0:
                _store_chunks(out_rows, stride_pd, smask, c10, c11, c12, c13, (BITS & 6) * HEAD_DIM // 8, 1, U, UP)


@triton.jit(do_not_specialize=["offset"])
def _tq_compress_kernel(
    x_ptr, stride_xb, stride_xh, stride_xs, stride_xd,
    mean_ptr, stride_mb, stride_mh, stride_md,
    bnd_ptr,
    pk_ptr, stride_pb, stride_ph, stride_pn, stride_pd,
    nrm_ptr, stride_nb, stride_nh, stride_nn,
    x2_ptr, stride_x2b, stride_x2h, stride_x2s, stride_x2d,
    mean2_ptr, stride_m2b, stride_m2h, stride_m2d,
    bnd2_ptr,
    pk2_ptr, stride_p2b, stride_p2h, stride_p2n, stride_p2d,
    nrm2_ptr, stride_n2b, stride_n2h, stride_n2n,
    pi_ptr, stride_pr, stride_pc,
    H, S, offset, off_ptr, stride_ob,
    BITS: tl.constexpr, WMIN: tl.constexpr, P_C: tl.constexpr, U: tl.constexpr, UP: tl.constexpr,
    BITS2: tl.constexpr, WMIN2: tl.constexpr, P_C2: tl.constexpr, U2: tl.constexpr, UP2: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_S: tl.constexpr, DOT_PREC: tl.constexpr,
    OFFSET_ON_DEVICE: tl.constexpr, PAIR: tl.constexpr, TILES: tl.constexpr, ROUND_NORMS: tl.constexpr,
    QASM: tl.constexpr = "",
    QASM2: tl.constexpr = "",
):  # fmt: skip
    """Compress BLOCK_S tokens of one (batch, head): of x (program_id(2) == 0) or, with PAIR, of x2 (== 1; keys
    and values in one launch, each with its own mean, boundaries, bits and store; one rotation).

    x     [B, H, S, D]          fp16/bf16/fp32  strides (stride_xb, stride_xh, stride_xs, stride_xd)
    mean  [B, H, D]             float32         strides (stride_mb, stride_mh, stride_md)
    bnd   [2**BITS - 1]         float32         contiguous, increasing
    pk    [B, H, cap, D*BITS/8] uint8           strides (stride_pb, stride_ph, stride_pn, stride_pd)
    nrm   [B, H, cap]           bfloat16        strides (stride_nb, stride_nh, stride_nn)
    x2, mean2, bnd2, pk2, nrm2  the same for the second tensor, with BITS2 (read when the grid has 2 in dim 2)
    pi    [D, D]                float32 (float32 x) or float16 (16-bit x)  strides (stride_pr, stride_pc);
                                x_rot = x @ Pi.T
    off   [B] or [1] int32/int64 (OFFSET_ON_DEVICE)  stride stride_ob (0 to broadcast)
    WMIN: the narrowest plane's width; P_C = 8 / WMIN sub-slices of U = HEAD_DIM * WMIN / 8 coordinates (= the
    narrowest plane's bytes; padded to UP). Token s goes to position offset + s, where offset is the host int
    or, with OFFSET_ON_DEVICE, off[b] (read on the device: a CUDA graph replays it with the value of the moment).
    Grid (cdiv(S, BLOCK_S * TILES), B * H, 2 if PAIR else 1): each program walks TILES blocks of BLOCK_S tokens.
    """
    if not PAIR or tl.program_id(2) == 0:
        _compress_tile(x_ptr, stride_xb, stride_xh, stride_xs, stride_xd, mean_ptr, stride_mb, stride_mh, stride_md,
                       pi_ptr, stride_pr, stride_pc, bnd_ptr, pk_ptr, stride_pb, stride_ph, stride_pn, stride_pd,
                       nrm_ptr, stride_nb, stride_nh, stride_nn, H, S, offset, off_ptr, stride_ob, BITS, WMIN, P_C, U,
                       HEAD_DIM, HEAD_DP, UP, BLOCK_S, DOT_PREC, OFFSET_ON_DEVICE, TILES, QASM,
                       ROUND_NORMS)  # fmt: skip
    else:
        _compress_tile(x2_ptr, stride_x2b, stride_x2h, stride_x2s, stride_x2d, mean2_ptr, stride_m2b, stride_m2h,
                       stride_m2d, pi_ptr, stride_pr, stride_pc, bnd2_ptr, pk2_ptr, stride_p2b, stride_p2h, stride_p2n,
                       stride_p2d, nrm2_ptr, stride_n2b, stride_n2h, stride_n2n, H, S, offset, off_ptr, stride_ob,
                       BITS2, WMIN2, P_C2, U2, HEAD_DIM, HEAD_DP, UP2, BLOCK_S, DOT_PREC, OFFSET_ON_DEVICE,
                       TILES, QASM2, ROUND_NORMS)  # fmt: skip


_CELLS = 32  # one warp's lanes


def _f32_hex(x: float) -> str:
    return f"0f{struct.unpack('<I', struct.pack('<f', x))[0]:08X}"


def _cell_plan(bounds: list[float]) -> tuple[float, float, list[int]] | None:
    """A uniform grid of 32 cells for `bounds` (increasing, <= 15): (1 / w, -lo / w - 0.5, packed cell entries) or
    None. Cell c = clamp(floor((y - lo) / w), 0, 31) holds at most one boundary, every boundary at least 5% of a
    cell from its cell's edges (so a y whose cell rounds to a neighbour lies on the same side of every
    boundary, where a cell spans many float32 steps; in clusters a few ulp wide the index stays within those
    ulp of bucketize's). None for non-finite bounds or a grid whose constants overflow float32. Entry c: the
    float32 bits of the boundary in cell c (3e38 when none) with the low 8 bits replaced by the stored codes
    (kvcodec.code_of_rank) of the two ranks the cell can give: the number of boundaries below it (bits 0-3) and
    one more (bits 4-7). The boundary moves by < 256 ulp (< 3.1e-5 relative; fp16 inputs' rotation error is
    ~1e-4)."""
    n = len(bounds)
    if not 1 <= n <= 15 or not all(map(math.isfinite, bounds)):
        return None
    if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:], strict=False)):
        return None
    span = bounds[-1] - bounds[0]
    best = None
    for k in range(max(n, 1), _CELLS - 1):  # the boundaries spread over k cells
        w = span / k if span > 0 else 1.0
        for j in range(0, _CELLS - k):
            for f in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
                lo = bounds[0] - w * (j + f)
                pos = [(b - lo) / w for b in bounds]
                cells = [math.floor(p) for p in pos]
                if len(set(cells)) < n or cells[0] < 0 or cells[-1] >= _CELLS:
                    continue
                margin = min(min(p - c, c + 1 - p) for p, c in zip(pos, cells, strict=True))
                if best is None or margin > best[0] + 1e-9:
                    best = (margin, w, lo, cells)
    if best is None or best[0] < 0.05:
        return None
    _, w, lo, cells = best
    if not (abs(1.0 / w) < 1e38 and abs(lo / w) < 1e38):  # the grid's constants must be float32 numbers
        return None
    code = code_of_rank(torch.arange(n + 1), n.bit_length()).tolist()  # n + 1 = 2**bits levels
    entries = []
    for c in range(_CELLS):
        below = sum(1 for x in cells if x < c)
        inside = [bounds[i] for i, x in enumerate(cells) if x == c]
        raw = struct.unpack("<I", struct.pack("<f", inside[0] if inside else 3.0e38))[0]
        entries.append((raw & ~255) | code[below] | code[min(below + 1, n)] << 4)
    return 1.0 / w, -lo / w - 0.5, entries


def _cell_table_asm(bounds: list[float]) -> str:
    """PTX for _quantize's QASM: $0 (int32) = the code (core.kvcodec.code_of_rank) of the number of `bounds` < $1
    (float32); "" where no grid fits."""
    plan = _cell_plan(bounds)
    if plan is None:
        return ""
    scale, shift, entries = plan
    ops = ["{", ".reg .b32 tql, tqt, tqr;", ".reg .f32 tqf;", ".reg .pred tqp;", "mov.u32 tql, %laneid;",
           f"mov.b32 tqt, 0x{entries[0]:08X};"]  # fmt: skip
    for i in range(1, _CELLS):
        ops += [f"setp.eq.u32 tqp, tql, {i};", f"selp.b32 tqt, 0x{entries[i]:08X}, tqt, tqp;"]
    ops += [
        f"fma.rn.f32 tqf, $1, {_f32_hex(scale)}, {_f32_hex(shift)};",
        "max.f32 tqf, tqf, 0f00000000;",
        f"min.f32 tqf, tqf, {_f32_hex(_CELLS - 1.0)};",
        "add.rn.f32 tqf, tqf, 0f4B400000;",  # 1.5 * 2**23: the rounded cell number in the low mantissa bits
        "mov.b32 tqr, tqf;",
        "shfl.sync.idx.b32 tqr, tqt, tqr, 0x1f, -1;",  # lane = low 5 bits
        "mov.b32 tqf, tqr;",
        "setp.gt.f32 tqp, $1, tqf;",
        "@tqp shr.u32 tqr, tqr, 4;",  # above the cell's boundary: the next rank's code
        "and.b32 $0, tqr, 15;",
        "}",
    ]
    return " ".join(ops)


_QASM: dict = {}  # (data_ptr, device) -> (boundaries, its version counter, asm): see _per_tensor


def _memo_get(table: dict, tensor: torch.Tensor):
    """The value memoised in `table` for this tensor object with its current contents, else None (an in-place
    edit bumps the version counter; an entry holds its tensor, so the address cannot be reused while cached;
    inference tensors have no counter and are matched by identity)."""
    hit = table.get((tensor.data_ptr(), tensor.device))
    return hit[2] if hit is not None and hit[0] is tensor and hit[1] == version_of(tensor) else None


def _per_tensor(table: dict, tensor: torch.Tensor, build, limit: int):
    """build(tensor), memoised in `table` per tensor (see _memo_get); the table is cleared when full."""
    value = _memo_get(table, tensor)
    if value is None:
        value = build(tensor)
        if len(table) >= limit:
            table.clear()
        table[(tensor.data_ptr(), tensor.device)] = (tensor, version_of(tensor), value)
    return value


def _quantize_asm(boundaries: torch.Tensor, bits: int) -> str:
    """The QASM of a boundaries tensor, made once per tensor (one device-to-host copy at its first use; none
    during a CUDA-graph capture, which takes the binary search instead). "" where it does not apply."""
    if bits > 4 or not CONFIG["cell_table"] or interpreting() or boundaries.device.type != "cuda":
        return ""
    if _memo_get(_QASM, boundaries) is None and torch.cuda.is_current_stream_capturing():
        return ""
    return _per_tensor(_QASM, boundaries, lambda b: _cell_table_asm(b.float().cpu().tolist()), 64)


def _half_rotation(rotation: torch.Tensor) -> torch.Tensor:
    """fp16 copy of the rotation, made once per rotation tensor (a Codecs' rotation lives as long as its cache)."""
    return _per_tensor(_HALF_PI, rotation, lambda r: r.to(torch.float16), 64)


def _plan(x: torch.Tensor, mean, rotation, boundaries, bits: int, out_packed, out_norms, offset, name: str):
    """Validate one tensor's arguments (x: "x", "keys" or "values"); returns (B, H, S, D, on_device)."""
    check_bits(bits)
    check_tensor(x, name, ndim=4, dtypes=FLOAT_DTYPES)
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
    check_tensor(out_norms, "out_norms", ndim=3, dtypes=(NORM_DTYPE,), device=dev)
    cap = out_packed.shape[2]
    if tuple(out_packed.shape) != (bsz, heads, cap, d * bits // 8):
        raise ValueError(
            f"out_packed must have shape {(bsz, heads, 'cap', d * bits // 8)} ([B, H, cap, D*bits/8]), "
            f"got {tuple(out_packed.shape)}"
        )
    if tuple(out_norms.shape) != (bsz, heads, cap):
        raise ValueError(f"out_norms must have shape {(bsz, heads, cap)}, got {tuple(out_norms.shape)}")
    on_device = isinstance(offset, torch.Tensor)
    if on_device:
        check_tensor(offset, "offset", ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
        if offset.shape[0] not in (1, bsz):
            raise ValueError(f"an offset tensor must have shape [{bsz}] or [1], got {tuple(offset.shape)}")
    elif isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an int32/int64 tensor, got {type(offset).__name__}")
    elif offset < 0 or offset + seq > cap:
        raise ValueError(f"tokens [offset, offset + S) = [{offset}, {offset + seq}) exceed the capacity {cap}")
    return bsz, heads, seq, d, on_device


def _reference(x, mean, rotation, boundaries, bits, out_packed, out_norms, offset, on_device: bool) -> None:
    """The PyTorch path: compress_reference, written at the (host or device) offset."""
    bsz, _, seq, _ = x.shape
    packed, norms = compress_reference(x, mean, rotation, boundaries, bits)
    norms = norms.to(out_norms.dtype)
    if not on_device:
        out_packed[:, :, offset : offset + seq] = packed
        out_norms[:, :, offset : offset + seq] = norms
        return
    cap = out_packed.shape[2]
    pos = offset.to(torch.long).expand(bsz)[:, None] + torch.arange(seq, device=x.device)  # [B, S]
    if bool((pos < 0).any() or (pos >= cap).any()):  # the PyTorch path may check (it syncs anyway)
        raise ValueError(f"device offsets {offset.tolist()} + {seq} tokens exceed the capacity {cap}")
    rows = torch.arange(bsz, device=x.device)[:, None]
    out_packed.permute(0, 2, 1, 3)[rows, pos] = packed.permute(0, 2, 1, 3)
    out_norms.permute(0, 2, 1)[rows, pos] = norms.permute(0, 2, 1)


_COMPRESS = Launcher(_tq_compress_kernel)  # reuses the compiled kernel of an identical launch


@functools.lru_cache(maxsize=64)
def _geometry(bits: int, d: int) -> dict:
    """Constexprs of one tensor: the narrowest plane's width, its sub-slices and their padded width."""
    wmin = 8 if bits == 8 else (1 if bits & 1 else 2 if bits & 2 else 4)
    return dict(BITS=bits, WMIN=wmin, P_C=8 // wmin, U=d * wmin // 8, UP=max(16, next_pow2(d * wmin // 8)))


# A launch planned once is replayed (Replay) by the next one with the same _call_key: the other layers of a decode
# step. PLAN_REUSE = False: every launch plans (tests compare the two).
PLAN_REUSE = True
_PLANS: dict = {}
_PLANS_MAX = 64


def _launch(parts, rotation: torch.Tensor, offset, on_device: bool) -> None:
    """One launch for one or two (x, mean, boundaries, bits, out_packed, out_norms) parts sharing a shape."""
    if not (PLAN_REUSE and fast_launch_enabled()):
        _launch_planned(parts, rotation, offset, on_device, None)
        return
    x = parts[0][0]
    pi = rotation if x.dtype == torch.float32 else _half_rotation(rotation)
    ptr = {"pi": pi.data_ptr(), "off": offset.data_ptr() if on_device else 0}
    for i, (t, mean, bnd, _bits, pk, nr) in enumerate(parts):
        ptr.update({f"x{i}": t.data_ptr(), f"mean{i}": mean.data_ptr(), f"bnd{i}": bnd.data_ptr(),
                    f"pk{i}": pk.data_ptr(), f"nr{i}": nr.data_ptr()})  # fmt: skip
    key = _call_key(parts, rotation, offset, on_device, ptr)
    replay = _PLANS.get(key)
    if replay is not None:
        replay.run(ptr, x.device.index)
        return
    record: list = []
    _launch_planned(parts, rotation, offset, on_device, record)
    if len(record) == 2:
        replay = Replay.build(record[0], record[1:])
        if replay is not None:
            if len(_PLANS) >= _PLANS_MAX:
                _PLANS.clear()
            _PLANS[key] = replay


def _call_key(parts, rotation, offset, on_device: bool, ptr: dict) -> tuple:
    """What _launch_planned reads except the addresses (ptr, by role): shapes, strides, dtypes, bits, each pointer's
    offset from 16-byte alignment, the quantizer tables' values (the PTX), the write offset (a host int), the
    settings."""
    x = parts[0][0]
    key = (x.shape, x.device, len(parts), rotation.stride(), rotation.dtype, ptr["pi"] & 15, on_device,
           (offset.shape, offset.stride(), offset.dtype, ptr["off"] & 15) if on_device else offset,
           tuple(CONFIG.items()), len(parts) == 2 and parts[1][2] is parts[0][2])  # fmt: skip
    for i, (t, mean, bnd, bits, pk, nr) in enumerate(parts):
        key += (t.stride(), t.dtype, ptr[f"x{i}"] & 15, mean.shape, mean.stride(), mean.dtype, ptr[f"mean{i}"] & 15,
                bits, bnd.shape, bnd.stride(), bnd.dtype, ptr[f"bnd{i}"] & 15,
                "" if x.dtype == torch.float32 else _quantize_asm(bnd, bits), pk.shape, pk.stride(), pk.dtype,
                ptr[f"pk{i}"] & 15, nr.shape, nr.stride(), nr.dtype, ptr[f"nr{i}"] & 15)  # fmt: skip
    return key


def _launch_planned(parts, rotation: torch.Tensor, offset, on_device: bool, record) -> None:
    """Plan and launch; record (a list, or None) receives the named tensors and (grid, args, Launcher.last)."""
    x = parts[0][0]
    bsz, heads, seq, d = x.shape
    if bsz * heads > 65535:
        raise ValueError(f"B * H ({bsz * heads}) must be <= 65535 (CUDA grid limit)")
    hdp = max(16, next_pow2(d))
    if x.dtype == torch.float32:
        pi, block_s, warps = rotation, CONFIG["block_s_f32"], CONFIG["num_warps_f32"]
    else:
        pi, block_s, warps = _half_rotation(rotation), CONFIG["block_s"], CONFIG["num_warps"]
    interp = interpreting()
    if interp:
        block_s = 16
    block_s = min(block_s, max(16, next_pow2(seq)))
    tiles = max(1, min(CONFIG["tiles"], _cdiv(seq, block_s)))
    if hdp > 128:
        warps = max(warps, 8)
    options = {"num_warps": warps}
    if CONFIG["num_stages"] is not None:
        options["num_stages"] = CONFIG["num_stages"]
    args, geo = [], {}
    slots = parts if len(parts) == 2 else parts * 2  # a single part fills both kernel slots (the second unread)
    for i, (t, mean, bnd, bits, pk, nr) in enumerate(slots):
        args += [t, *t.stride(), mean, *mean.stride(), bnd.contiguous(), pk, *pk.stride(), nr, *nr.stride()]
        qasm = "" if x.dtype == torch.float32 else _quantize_asm(bnd, bits)  # float32: the exact search
        g = dict(_geometry(bits, d), QASM=qasm)
        geo.update(g if i == 0 else {f"{k}2": v for k, v in g.items()})
    off_args = (offset, offset.stride(0) if offset.shape[0] > 1 else 0) if on_device else (parts[0][5], 0)
    grid = (_cdiv(seq, block_s * tiles), bsz * heads, len(parts))
    all_args = (*args, pi, *pi.stride(), heads, seq, 0 if on_device else offset, *off_args)
    _COMPRESS(
        grid,
        all_args,
        dict(**geo, HEAD_DIM=d, HEAD_DP=hdp, BLOCK_S=block_s, DOT_PREC=_DOT_PREC, OFFSET_ON_DEVICE=on_device,
             PAIR=len(parts) == 2, TILES=tiles, ROUND_NORMS=interp),
        **options,
    )  # fmt: skip
    if record is not None:
        named = {"pi": pi, "off": offset if on_device else None}
        for i, (t, mean, bnd, _bits, pk, nr) in enumerate(parts):
            named.update({f"x{i}": t, f"mean{i}": mean, f"pk{i}": pk, f"nr{i}": nr})
            if i == 0 or bnd is not parts[0][2]:  # keys and values of one width share their boundaries (in the key)
                named[f"bnd{i}"] = bnd
        record += [named, (grid, all_args, _COMPRESS.last)]


def tq_compress(
    x: torch.Tensor,
    mean: torch.Tensor,
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    bits: int,
    out_packed: torch.Tensor,
    out_norms: torch.Tensor,
    offset: int | torch.Tensor,
) -> None:
    """Compress x [B, H, S, D] (fp16/bf16/fp32, any strides) into out_packed[:, :, offset:offset+S]
    (uint8 [B, H, cap, D*bits/8], any strides) and out_norms[:, :, offset:offset+S]
    (float32 [B, H, cap]). mean float32 [B, H, D]; rotation float32 [D, D]; boundaries float32
    [2**bits - 1] (increasing). Same result as core.kvcodec.compress_reference.

    offset: a host int, or an int32 / int64 tensor [B] or [1] on x's device holding each row's write position,
    read by the kernel (CUDA-graph capturable: nothing is read back to the host). A device offset is not
    range-checked on the host (that would sync): the caller keeps offset + S <= cap, as CompressedLayer does by
    reserving capacity first."""
    bsz, heads, seq, d, on_device = _plan(x, mean, rotation, boundaries, bits, out_packed, out_norms, offset, "x")
    if seq == 0 or bsz == 0 or heads == 0:
        return
    if not use_triton(x, mean, rotation, out_packed) or d > _MAX_HEAD_DIM:
        _reference(x, mean, rotation, boundaries, bits, out_packed, out_norms, offset, on_device)
        return
    _launch([(x, mean, boundaries, bits, out_packed, out_norms)], rotation, offset, on_device)


def tq_compress_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    k_mean: torch.Tensor,
    v_mean: torch.Tensor,
    rotation: torch.Tensor,
    k_boundaries: torch.Tensor,
    v_boundaries: torch.Tensor,
    k_bits: int,
    v_bits: int,
    k_packed: torch.Tensor,
    k_norms: torch.Tensor,
    v_packed: torch.Tensor,
    v_norms: torch.Tensor,
    offset: int | torch.Tensor,
) -> None:
    """tq_compress of keys and of values (same shape [B, H, S, D] and dtype, one rotation) in ONE launch:
    the same result as two tq_compress calls, for half the launches of a decode step."""
    kp = _plan(keys, k_mean, rotation, k_boundaries, k_bits, k_packed, k_norms, offset, "keys")
    vp = _plan(values, v_mean, rotation, v_boundaries, v_bits, v_packed, v_norms, offset, "values")
    if kp != vp or keys.dtype != values.dtype:
        raise ValueError(
            f"keys {tuple(keys.shape)} {keys.dtype} and values {tuple(values.shape)} {values.dtype} must match"
        )
    compress_kv_unchecked(keys, values, k_mean, v_mean, rotation, k_boundaries, v_boundaries, k_bits, v_bits,
                          k_packed, k_norms, v_packed, v_norms, offset)  # fmt: skip


def compress_kv_unchecked(keys, values, k_mean, v_mean, rotation, k_boundaries, v_boundaries, k_bits: int,
                          v_bits: int, k_packed, k_norms, v_packed, v_norms, offset) -> None:  # fmt: skip
    """tq_compress_kv without the argument checks, for a caller that owns the buffers and has checked the new
    tokens (CompressedLayer: its decode step's host time). Arguments as tq_compress_kv's."""
    bsz, heads, seq, d = keys.shape
    on_device = isinstance(offset, torch.Tensor)
    if seq == 0 or bsz == 0 or heads == 0:
        return
    if not use_triton(keys, values, k_mean, rotation, k_packed, v_packed) or d > _MAX_HEAD_DIM:
        _reference(keys, k_mean, rotation, k_boundaries, k_bits, k_packed, k_norms, offset, on_device)
        _reference(values, v_mean, rotation, v_boundaries, v_bits, v_packed, v_norms, offset, on_device)
        return
    _launch([(keys, k_mean, k_boundaries, k_bits, k_packed, k_norms),
             (values, v_mean, v_boundaries, v_bits, v_packed, v_norms)], rotation, offset, on_device)  # fmt: skip
