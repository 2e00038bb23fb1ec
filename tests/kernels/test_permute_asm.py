"""The decode loop's byte-permute centroid lookup (GATHER 3, tq_attention._permute_asm) checked on the CPU.

The PTX runs only on a GPU, so these tests execute the generated text with a small evaluator of the PTX
instructions it uses (semantics from the PTX ISA: prmt's default mode, lop3's truth table, 32-bit wrap-around)
and compare every output register with the codebook looked up in PyTorch.
"""

from __future__ import annotations

import random

import pytest
import torch

from turboquant_vllm.core.codebook import lloyd_max_codebook
from turboquant_vllm.core.kvcodec import centroids_by_code
from turboquant_vllm.kernels.tq_attention import _permute_asm, _permute_words

MASK32 = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 (default mode): byte i of the result is byte sel[4i+2:4i] of {b, a}; sel bit 4i+3 replicates its
    sign bit."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    out = 0
    for bit in range(32):
        idx = ((a >> bit & 1) << 2) | ((b >> bit & 1) << 1) | (c >> bit & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


_OPS = {
    "prmt.b32": _prmt,
    "lop3.b32": _lop3,
    "shr.u32": lambda a, s: a >> s,
    "shl.b32": lambda a, s: (a << s) & MASK32,
    "sub.u32": lambda a, b: (a - b) & MASK32,
    "or.b32": lambda a, b: a | b,
    "and.b32": lambda a, b: a & b,
    "popc.b32": lambda a: bin(a).count("1"),
    "mov.u32": lambda a: a,
}


def run_ptx(asm: str, inputs: dict[str, int], lane: int) -> dict[str, int]:
    """Execute the straight-line PTX block `asm` with registers `inputs` ($n) and %laneid = lane."""
    regs = dict(inputs, **{"%laneid": lane})
    body = asm.strip()
    assert body.startswith("{") and body.endswith("}")
    for stmt in body[1:-1].split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        assert op in _OPS, f"instruction the evaluator does not know: {op}"
        vals = [regs[a] if a in regs else int(a, 0) & MASK32 for a in args[1:]]
        regs[args[0]] = _OPS[op](*vals)
    return regs


def _bits(values: torch.Tensor, dtype: torch.dtype) -> list[int]:
    return [b & 0xFFFF for b in values.to(dtype).view(torch.int16).tolist()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_permute_lookup_matches_the_codebook(dtype, dim):
    values = centroids_by_code(lloyd_max_codebook(dim, 4).centroids, 4)  # the table the kernels get (Codecs)
    asm = _permute_asm(values.tolist(), dtype)
    assert asm, "a Lloyd-Max codebook is symmetric: the permute lookup must apply"
    table = _bits(values, dtype)
    rng = random.Random(dim)
    # every code at every nibble of both units, then random units
    units = [(sum(c << (4 * i) for i in range(8)), sum((15 - c) << (4 * i) for i in range(8))) for c in range(16)]
    units += [(rng.getrandbits(32), rng.getrandbits(32)) for _ in range(400)]
    for u0, u1 in units:
        regs = run_ptx(asm, {"$8": u0, "$9": u1}, lane=rng.randrange(32))
        for t in range(8):  # sub-tile T sits at bits 8 * (T % 4) + 4 * (T // 4) of a unit
            shift = 8 * (t % 4) + 4 * (t // 4)
            want = table[(u0 >> shift) & 15] | table[(u1 >> shift) & 15] << 16
            assert regs[f"${t}"] == want, (hex(u0), hex(u1), t)


def test_permute_lookup_declines_tables_it_cannot_hold():
    sorted_values = lloyd_max_codebook(128, 4).centroids
    sym = centroids_by_code(sorted_values, 4)
    assert _permute_words(sym.tolist(), torch.float16) is not None
    assert _permute_asm(sorted_values.tolist(), torch.float16) == ""  # increasing order is not the code order
    skewed = sym.clone()
    skewed[3] += 1e-2  # no longer symmetric
    assert _permute_asm(skewed.tolist(), torch.float16) == ""
    assert _permute_asm(sym.tolist(), torch.float32) == ""  # 32-bit values: two registers per code
    assert _permute_asm(centroids_by_code(lloyd_max_codebook(128, 3).centroids, 3).tolist(), torch.float16) == ""
    assert _permute_asm((sym.abs() + 1.0).tolist(), torch.float16) == ""  # every entry positive: no sign to fold
