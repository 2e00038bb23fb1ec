"""Decode over the compressed cache, path by path: GPU correctness, then CUDA-graph timings of the joined-tile
path, the sub-tile path in several tile configs, and SDPA at its best, in the same run.

    python benchmarks/decode_paths.py [check | time | all] [comma-separated case indices]

check: fused decode (dense; exact segment + bool mask + causal; paged with a random block permutation) vs
PyTorch dequantize + float32 attention, over head_dim 64-256, K/V bits 2-6, fp16 / bf16 / fp32, Sq 1 and 4.
time: graph-replay medians of the dispatched path ("auto"), the joined-tile path, the sub-tile path in several tile
configs and, where B * Hkv < 32, at two split counts; % of bandwidth = compressed bytes read / time / 3.0 TB/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing as tt
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_gpu_script  # noqa: E402
from attention import check_decode, make_compressed  # noqa: E402

import turboquant_vllm.kernels.tq_attention as tqa  # noqa: E402
from turboquant_vllm.core.kvcodec import attention_reference, dequantize_reference  # noqa: E402

BW = 3.0e12
CHECK_CASES = [  # (B, Hq, Hkv, N, D, k_bits, v_bits, dtype, Sq)
    (2, 32, 8, 1000, 128, 4, 4, torch.float16, 1),
    (2, 32, 8, 777, 128, 3, 3, torch.bfloat16, 1),
    (1, 28, 4, 513, 96, 4, 2, torch.float16, 1),
    (2, 16, 16, 300, 64, 4, 4, torch.float16, 1),
    (1, 16, 2, 900, 256, 3, 2, torch.bfloat16, 1),
    (2, 32, 8, 640, 128, 5, 3, torch.float16, 1),
    (1, 32, 8, 1000, 128, 4, 4, torch.float32, 1),
    (2, 32, 8, 1000, 128, 4, 4, torch.float16, 4),
    (1, 32, 8, 1000, 128, 2, 2, torch.float16, 1),
    (1, 32, 8, 1000, 128, 6, 4, torch.float16, 1),
    (2, 32, 8, 1000, 128, 8, 4, torch.float16, 1),  # the default policies' layer 0 (8-bit keys)
    (1, 14, 2, 700, 64, 8, 4, torch.bfloat16, 1),
]
TIME_SHAPES = [  # (B, N, Hkv, D, k_bits, v_bits)
    (16, 32768, 8, 128, 4, 4), (1, 32768, 8, 128, 4, 4), (1, 131072, 8, 128, 4, 4), (1, 4096, 8, 128, 4, 4),
    (16, 32768, 8, 128, 3, 3), (16, 32768, 8, 128, 5, 3), (16, 32768, 32, 128, 4, 4), (16, 32768, 8, 64, 4, 4),
    (16, 32768, 8, 256, 4, 4), (16, 4096, 8, 128, 4, 4), (16, 32768, 8, 128, 8, 4), (16, 32768, 8, 128, 4, 3),
    (16, 32768, 8, 128, 3, 2), (16, 32768, 8, 64, 4, 3), (16, 32768, 8, 64, 3, 2), (16, 32768, 8, 64, 3, 3),
    (1, 32768, 8, 64, 4, 3),
]  # fmt: skip
SUBTILE_CONFIGS = [(32, 1, 3), (64, 1, 3), (32, 1, 2), (32, 1, 4), (16, 1, 4)]  # (BLOCK_N, num_warps, num_stages)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def dequantized(kv):
    c, lay = kv.codecs, kv.codecs.layout
    kh = dequantize_reference(kv.k_packed, kv.k_norms, kv.k_mean, c.rotation, c.k_centroids, lay.k_bits)
    vh = dequantize_reference(kv.v_packed, kv.v_norms, kv.v_mean, c.rotation, c.v_centroids, lay.v_bits)
    return kh, vh


def to_pages(x: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """[B, H, N, ...] -> [B * blocks, H, page, ...] placed by the block table."""
    b, h, n = x.shape[:3]
    nb = table.shape[1]
    pad = [0, 0] * (x.dim() - 3) + [0, nb * page - n]
    xp = F.pad(x, pad)
    out = torch.zeros(b * nb, h, page, *x.shape[3:], dtype=x.dtype, device=x.device)
    for i in range(b):
        out[table[i].long()] = xp[i].unflatten(1, (nb, page)).transpose(0, 1)
    return out


def check_case(b, hq, hkv, n, d, kb, vb, dt, sq) -> str:
    kv, _, _ = make_compressed(b, hkv, n, d, kb, vb, torch.float16, "cuda", seed=n)
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dt)
    kh, vh = dequantized(kv)
    ref = attention_reference(q.float(), kh, vh)
    out = torch.full((b, sq, hq, d), float("nan"), device="cuda", dtype=dt)
    tqa.tq_attention(q, kv, None, None, out=out)
    ke = torch.randn(b, hkv, 5, d, device="cuda", dtype=dt)
    ve = torch.randn_like(ke)
    mask = torch.ones(b, 1, sq, n + 5, dtype=torch.bool, device="cuda")
    mask[0, ..., :37] = False
    out2 = tqa.tq_attention(q, kv, ke, ve, attention_mask=mask, causal=True)
    ref2 = attention_reference(
        q.float(), torch.cat([kh, ke.float()], 2), torch.cat([vh, ve.float()], 2), attention_mask=mask, causal=True
    )
    page = 16
    table = torch.randperm(b * -(-n // page), device="cuda").view(b, -1).int()
    out3 = tqa.tq_attention_paged(
        q, to_pages(kv.k_packed, table, page), to_pages(kv.k_norms[..., None], table, page)[..., 0],
        to_pages(kv.v_packed, table, page), to_pages(kv.v_norms[..., None], table, page)[..., 0], table,
        torch.full((b,), n, dtype=torch.int32, device="cuda"), kv.k_mean, kv.v_mean, kv.codecs,
    )  # fmt: skip
    nan = bool(out.isnan().any() or out2.isnan().any() or out3.isnan().any())
    return (
        f"check B{b} Hq{hq}/{hkv} N{n} d{d} K{kb}V{vb} {str(dt)[6:]} Sq{sq}: dense {rel(out, ref):.1e} "
        f"exact+mask+causal {rel(out2, ref2):.1e} paged {rel(out3, ref):.1e} nan={nan}"
    )


def sdpa_ms(b: int, n: int, hkv: int, d: int) -> float:
    """SDPA at its best (flash / efficient / cuDNN) on fp16 K/V of the same shape, graph-replay median."""
    q = torch.randn(b, 32, 1, d, device="cuda", dtype=torch.float16)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    best = float("inf")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            run()
            best = min(best, tt.do_bench_cudagraph(run, rep=50, return_mode="median"))
        except RuntimeError:
            pass
    return best


class _FixedJoined:
    """The joined-tile path with one config (128 tokens, 4 warps, 2 stages), bypassing the autotuner."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg = dict(BLOCK_N=128, BLOCK_E=128, num_warps=4, num_stages=2)
            return tqa._tq_attn_kernel[grid](*args, **kwargs, **cfg)

        return launch


def time_shape(b, n, hkv, d, kb, vb) -> str:
    base = sdpa_ms(b, n, hkv, d)
    kv, _, _ = make_compressed(b, hkv, n, d, kb, vb, torch.float16, "cuda")
    q = torch.randn(b, 32, 1, d, device="cuda", dtype=torch.float16)
    nbytes = b * hkv * n * kv.codecs.layout.bytes_per_token_per_head

    def timed(label: str, splits: int | None = None) -> str:
        check_decode(q, kv)
        t = tt.do_bench_cudagraph(lambda: tqa.tq_attention(q, kv, None, None, num_kv_splits=splits), rep=50,
                                  return_mode="median")  # fmt: skip
        return f"{label}: {t:.4f} ({base / t:.2f}x {nbytes / (t * 1e-3) / BW * 100:.0f}%)"

    row = [f"B{b} N{n} Hkv{hkv} d{d} K{kb}V{vb}: sdpa {base:.4f}", timed("auto")]
    saved = tqa._tuned_attn_kernel, tqa.SUBTILE_DECODE
    tqa._tuned_attn_kernel, tqa.SUBTILE_DECODE = _FixedJoined, False
    row.append(timed("joined"))
    tqa._tuned_attn_kernel, tqa.SUBTILE_DECODE = saved[0], True
    for cfg in SUBTILE_CONFIGS:
        tqa.DECODE_CONFIG = cfg
        row.append(timed(f"sub {cfg[0]},{cfg[2]}" + (f",{cfg[1]}w" if cfg[1] != 1 else "")))
    tqa.DECODE_CONFIG = None
    if b * hkv < 32:  # few programs: the split count decides
        row += [timed(f"sub/{ns}", ns) for ns in (64, 128)]
    tqa._tuned_attn_kernel, tqa.SUBTILE_DECODE = saved
    return " | ".join(row)


def main() -> int:
    if not start_gpu_script():
        return 1
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    pick = [int(i) for i in sys.argv[2].split(",")] if len(sys.argv) > 2 else None  # e.g. "check 0,2"
    if mode in ("all", "check"):
        for i, case in enumerate(CHECK_CASES):
            if pick is None or i in pick:
                print(check_case(*case), flush=True)
    if mode in ("all", "time"):
        for i, shape in enumerate(TIME_SHAPES):
            if pick is not None and i not in pick:
                continue
            print(time_shape(*shape), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
