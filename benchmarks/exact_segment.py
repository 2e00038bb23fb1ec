"""What a decode step of the cache adds to fused decode: the new token as a 1-token exact segment, and a
row-invariant bool mask ([B, 1, 1, N], as with padding). CUDA-graph replay medians, fp16, Hq 32, Hkv 8, d 128,
TQ4, SDPA at its best on N + 1 fp16 tokens in the same run. Also checks that a launch through the cached
compiled kernel (kernels/_launch.py) gives the same bits as one through Triton's own launch path.

    python benchmarks/exact_segment.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_gpu_script  # noqa: E402
from attention import make_compressed  # noqa: E402
from decode_paths import BW, sdpa_ms  # noqa: E402

import turboquant_vllm.kernels._launch as launch  # noqa: E402
import turboquant_vllm.kernels.tq_attention as tqa  # noqa: E402

SHAPES = [(16, 32768), (1, 32768), (1, 131072), (1, 4096), (16, 4096)]  # (B, compressed tokens)


def row(b: int, n: int) -> str:
    base = sdpa_ms(b, n + 1, 8, 128)
    kv, _, _ = make_compressed(b, 8, n, 128, 4, 4, torch.float16, "cuda")
    q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.float16)
    ke = torch.randn(b, 8, 1, 128, device="cuda", dtype=torch.float16)
    ve = torch.randn_like(ke)
    mask = torch.ones(b, 1, 1, n + 1, device="cuda", dtype=torch.bool)
    nbytes = b * 8 * n * kv.codecs.layout.bytes_per_token_per_head
    out = [f"B{b} N{n}: sdpa {base:.4f}"]
    for label, fn in [
        ("plain", lambda: tqa.tq_attention(q, kv, None, None)),
        ("exact1", lambda: tqa.tq_attention(q, kv, ke, ve)),
        ("exact1+mask", lambda: tqa.tq_attention(q, kv, ke, ve, attention_mask=mask)),
    ]:
        fn()
        t = tt.do_bench_cudagraph(fn, rep=60, return_mode="median")
        out.append(f"{label} {t:.4f} ({base / t:.2f}x {nbytes / (t * 1e-3) / BW * 100:.0f}%)")
    q2 = torch.randn_like(q)
    fast = tqa.tq_attention(q2, kv, ke, ve)  # same key as the timed calls: the cached kernel
    launch.ENABLED = False
    slow = tqa.tq_attention(q2, kv, ke, ve)  # Triton's own launch path
    launch.ENABLED = True
    out.append(f"cached launch == Triton launch: {torch.equal(fast, slow)}")
    return " | ".join(out)


def main() -> int:
    if not start_gpu_script():
        return 1
    for b, n in SHAPES:
        print(row(b, n), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
