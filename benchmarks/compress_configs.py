"""tq_compress / tq_compress_kv over tile configs (tokens per block, warps, blocks per program, pipeline stages,
quantizer): CUDA-graph replay medians, fp16, head_dim 128, 4-bit; each config's packed
bytes compared with the binary-search quantizer's (the cell table may differ within ~1e-6 of a boundary). % of the
measured copy bandwidth on bytes read + written.

    python benchmarks/compress_configs.py
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton.testing as tt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, start_gpu_script  # noqa: E402

import turboquant_vllm.kernels.tq_compress as tqc  # noqa: E402
from turboquant_vllm.layout import NORM_DTYPE, Codecs, KVLayout  # noqa: E402

# (block_s, num_warps, tiles, num_stages, cell_table); the first is the binary-search quantizer (the reference output),
# the second the default
CONFIGS = [(64, 4, 1, None, False), (128, 8, 1, None, True), (64, 4, 1, None, True), (64, 8, 1, None, True),
           (32, 4, 1, None, True), (64, 4, 4, 1, True), (64, 4, 4, 2, True), (32, 4, 8, 2, True),
           (128, 4, 1, None, True), (64, 2, 1, None, True)]  # fmt: skip
SHAPES = [(16, 2048), (1, 32768), (16, 1)]  # (B, new tokens); 8 kv heads


def main() -> int:
    if not start_gpu_script():
        return 1
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    codecs = Codecs.build(KVLayout(128, 4, 4), device="cuda")
    default = dict(tqc.CONFIG)
    for b, s in SHAPES:
        k = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        kp = torch.empty(b, 8, s, 64, dtype=torch.uint8, device="cuda")
        kn = torch.empty(b, 8, s, device="cuda", dtype=NORM_DTYPE)
        vp, vn = torch.empty_like(kp), torch.empty_like(kn)
        mean = torch.zeros(b, 8, 128, device="cuda")
        one = functools.partial(tqc.tq_compress, k, mean, codecs.rotation, codecs.k_boundaries, 4, kp, kn, 0)
        pair = functools.partial(tqc.tq_compress_kv, k, v, mean, mean, codecs.rotation, codecs.k_boundaries,
                                 codecs.v_boundaries, 4, 4, kp, kn, vp, vn, 0)  # fmt: skip
        moved = k.numel() * 2 + kp.numel() + kn.numel() * kn.element_size()
        tqc.CONFIG.update(cell_table=False)
        one()
        ref = kp.clone()
        res = []
        for block_s, warps, tiles, stages, cells in CONFIGS:
            tqc.CONFIG.update(block_s=block_s, num_warps=warps, tiles=tiles, num_stages=stages, cell_table=cells)
            name = f"{block_s}/{warps}/t{tiles}/s{stages}{'/cells' if cells else '/search'}"
            try:
                kp.zero_()
                one()
                differ = (kp != ref).float().mean().item()  # packed bytes unlike the binary search's
                t = tt.do_bench_cudagraph(one, rep=50, return_mode="median")
                tp = tt.do_bench_cudagraph(pair, rep=50, return_mode="median")
            except Exception as e:  # a config over the shared-memory limit: say so, go on
                res.append(f"{name}: failed ({type(e).__name__})")
                continue
            res.append(f"{name}: {t:.4f} ms {100 * moved / (t * 1e-3) / bw:.0f}% pair {tp:.4f} ms "
                       f"{200 * moved / (tp * 1e-3) / bw:.0f}% bytes differing {differ:.1e}")  # fmt: skip
        tqc.CONFIG.update(default)
        print(f"B{b} S{s}:\n  " + "\n  ".join(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
