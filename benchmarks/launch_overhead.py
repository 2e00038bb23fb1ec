"""Host cost of one eager fused decode call (B=1 x 32K, Hq 32 / Hkv 8, d 128, TQ4, fp16).

    python benchmarks/launch_overhead.py

Back-to-back eager calls are bound by the host when the GPU work is short (~37 us here under graph replay):
the wall time per call is then the Python + launch cost. Prints it, then a cProfile of 200 calls (own time):
Triton's launch path (jit.py run, the specialization of every argument, the launcher) against our own Python.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import start_gpu_script  # noqa: E402
from attention import make_compressed  # noqa: E402

from turboquant_vllm.kernels.tq_attention import tq_attention  # noqa: E402


def main() -> int:
    if not start_gpu_script():
        return 1
    kv, _, _ = make_compressed(1, 8, 32768, 128, 4, 4, torch.float16, "cuda")
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.float16)
    out = torch.empty(1, 1, 32, 128, device="cuda", dtype=torch.float16)
    for _ in range(20):
        tq_attention(q, kv, None, None, out=out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        tq_attention(q, kv, None, None, out=out)
    torch.cuda.synchronize()
    print(f"tq_attention: {1e6 * (time.perf_counter() - t0) / 200:.1f} us per call (eager, back to back)")
    with cProfile.Profile() as py:
        for _ in range(200):
            tq_attention(q, kv, None, None, out=out)
        torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(py, stream=buf).sort_stats("tottime").print_stats(35)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
