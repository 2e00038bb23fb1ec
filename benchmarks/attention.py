"""Attention kernels on the GPU: fused decode over the compressed cache vs fp16 SDPA, prefill, compress.

    python benchmarks/attention.py [--quick] [--json PATH] [--out-dir DIR] [--plot PNG]
    python benchmarks/attention.py --plot-from RESULT.json --plot PNG      (redraw saved results, no GPU)

Every row times the fp16 SDPA baseline in the same run, at its best: the fastest of the flash,
memory-efficient and cuDNN backends on the same fixed shapes (cuDNN is the fastest on H100 at a fixed
length; in a real decode loop it re-plans whenever the KV length changes, ~40 ms a call, so this
baseline is kinder to SDPA than serving would be). Medians of triton.testing.do_bench (eager) and,
for decode, of CUDA-graph replays (launch gaps removed, same for both sides). Bytes moved over the
copy bandwidth measured in the same run give % of roofline. Correctness is checked before timing.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Progress,
    add_plot_arguments,
    copy_bandwidth,
    env_header,
    plot_only,
    print_table,
    save_figure,
    write_results,
)

from turboquant_vllm.core.kvcodec import attention_reference, dequantize_reference  # noqa: E402
from turboquant_vllm.kernels import tq_compress as tqc  # noqa: E402
from turboquant_vllm.kernels.flash_attention import flash_attention  # noqa: E402
from turboquant_vllm.kernels.tq_attention import tq_attention  # noqa: E402
from turboquant_vllm.kernels.tq_compress import tq_compress  # noqa: E402
from turboquant_vllm.layout import NORM_DTYPE, Codecs, CompressedKV, KVLayout  # noqa: E402


def bench(fn, graph: bool = False) -> float:
    """Median ms."""
    import triton.testing as tt

    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=60, return_mode="median"))
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def sdpa_best(q, k, v, *, causal=False, graph=False) -> tuple[float, str]:
    """Fastest of SDPA's flash, efficient and cuDNN backends on these shapes (fp16, enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    best = (math.inf, "none")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):

        def run(backend=backend):
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        try:
            with warnings.catch_warnings():  # a backend that refuses these shapes says why, once per shape
                warnings.simplefilter("ignore")
                run()
                t = bench(run, graph=graph)
        except Exception:  # backend not available for these shapes, or not capturable
            continue
        best = min(best, (t, backend.name.lower()))
    return best


def make_compressed(b, hkv, n, d, k_bits, v_bits, dtype, device, seed=0):
    """Random K/V compressed with the Triton compress kernel; also returns the fp16 K/V."""
    torch.manual_seed(seed)
    k = torch.randn(b, hkv, n, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, n, d, device=device, dtype=dtype)
    layout = KVLayout(d, k_bits, v_bits)
    codecs = Codecs.build(layout, device=device)
    kp = torch.empty(b, hkv, n, layout.k_bytes, dtype=torch.uint8, device=device)
    vp = torch.empty(b, hkv, n, layout.v_bytes, dtype=torch.uint8, device=device)
    norms = torch.empty(b, hkv, n, 2, dtype=NORM_DTYPE, device=device)  # the cache's store: (k, v) per token
    kn, vn = norms[..., 0], norms[..., 1]
    km = k.mean(dim=2, dtype=torch.float32)
    vm = torch.zeros(b, hkv, d, device=device)
    step = max(1, (1 << 27) // (b * hkv * d))  # bound the temporary of the compress kernel
    for s in range(0, n, step):
        tq_compress(k[:, :, s : s + step], km, codecs.rotation, codecs.k_boundaries, k_bits, kp, kn, s)
        tq_compress(v[:, :, s : s + step], vm, codecs.rotation, codecs.v_boundaries, v_bits, vp, vn, s)
    return CompressedKV(kp, kn, vp, vn, km, vm, n, codecs), k, v


def check_decode(q, kv, rel_tol=2e-2) -> float:
    """Fused decode vs PyTorch dequantize + fp32 attention on the same compressed data (first 2K tokens)."""
    n = min(kv.length, 2048)
    sub = CompressedKV(kv.k_packed[:1, :, :n], kv.k_norms[:1, :, :n], kv.v_packed[:1, :, :n], kv.v_norms[:1, :, :n],
                       kv.k_mean[:1], kv.v_mean[:1], n, kv.codecs)  # fmt: skip
    c = kv.codecs
    lay = c.layout
    kh = dequantize_reference(sub.k_packed, sub.k_norms, sub.k_mean, c.rotation, c.k_centroids, lay.k_bits)
    vh = dequantize_reference(sub.v_packed, sub.v_norms, sub.v_mean, c.rotation, c.v_centroids, lay.v_bits)
    ref = attention_reference(q[:1], kh, vh)
    out = tq_attention(q[:1], sub, None, None).float()
    err = float((out - ref).norm() / ref.norm())
    if not err < rel_tol or torch.isnan(out).any():
        raise RuntimeError(f"fused decode disagrees with the reference: rel err {err:.3e}")
    return err


PROGRESS = Progress(0, enabled=False)  # main() replaces it: the bar over every case of the run


def _report(line: str, case: str) -> None:
    """Print a finished case's line (above the progress bar) and advance the bar."""
    PROGRESS.write(line)
    PROGRESS.step(case)


def decode_shapes(cases, hq_list, d_list) -> list[tuple[int, int, int, int, int]]:
    """(B, N, Hq, Hkv, d) of every decode row that fits (fp16 K/V + their compressed copy + temporaries)."""
    return [(b, n, hq, hkv, d) for b, n in cases for hq, hkv in hq_list for d in d_list
            if b * hkv * n * d * 2 * 2 <= 20 * 2**30]  # fmt: skip


def decode_rows(cases, hq_list, d_list, bw, quick, graph):
    rows = []
    dev = "cuda"
    for b, n, hq, hkv, d in decode_shapes(cases, hq_list, d_list):
        fp16_bytes = b * hkv * n * d * 2 * 2
        torch.cuda.empty_cache()
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.float16)
        v = torch.randn_like(k)
        row = dict(kind="decode", B=b, N=n, Hq=hq, Hkv=hkv, d=d)
        t_sdpa, backend = sdpa_best(q, k, v)
        row.update(sdpa_ms=t_sdpa, sdpa_backend=backend, sdpa_pct_bw=100 * fp16_bytes / (t_sdpa * 1e-3) / bw)
        if graph:
            row["sdpa_graph_ms"] = sdpa_best(q, k, v, graph=True)[0]
        row["triton_fa_ms"] = bench(functools.partial(flash_attention, q, k, v))
        del k, v
        for bits in (4, 3):
            kv, _, _ = make_compressed(b, hkv, n, d, bits, bits, torch.float16, dev)
            row[f"tq{bits}_check_err"] = check_decode(q, kv)
            t = bench(functools.partial(tq_attention, q, kv, None, None))
            tq_bytes = b * hkv * n * kv.codecs.layout.bytes_per_token_per_head
            row[f"tq{bits}_ms"] = t
            row[f"tq{bits}_speedup"] = t_sdpa / t
            row[f"tq{bits}_pct_bw"] = 100 * tq_bytes / (t * 1e-3) / bw
            if graph:
                tg = bench(functools.partial(tq_attention, q, kv, None, None), graph=True)
                row[f"tq{bits}_graph_ms"] = tg
                row[f"tq{bits}_graph_speedup"] = row["sdpa_graph_ms"] / tg
            del kv
        rows.append(row)
        _report(_fmt_decode(row), f"decode {b}x{n // 1024}K d{d}")
    return rows


def _fmt_decode(r):
    return (
        f"decode B={r['B']:>2} N={r['N'] // 1024:>3}K Hq={r['Hq']} Hkv={r['Hkv']} d={r['d']}: "
        f"sdpa {r['sdpa_ms']:.4f} ms ({r['sdpa_backend']}, {r['sdpa_pct_bw']:.0f}% bw) | "
        f"tq4 {r['tq4_ms']:.4f} ms x{r['tq4_speedup']:.2f} ({r['tq4_pct_bw']:.0f}% bw) | "
        f"tq3 {r['tq3_ms']:.4f} ms x{r['tq3_speedup']:.2f} | triton_fa {r['triton_fa_ms']:.4f} ms"
    )


def prefill_rows(lengths):
    rows = []
    for s in lengths:
        q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        flops = 4 * 32 * s * s * 128 / 2  # causal
        t_sdpa, backend = sdpa_best(q, k, v, causal=True)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = flash_attention(q, k, v, causal=True)
        err = float((out.transpose(1, 2).float() - ref.float()).norm() / ref.float().norm())
        t = bench(functools.partial(flash_attention, q, k, v, causal=True))
        row = dict(kind="prefill", N=s, sdpa_ms=t_sdpa, sdpa_backend=backend, sdpa_tflops=flops / t_sdpa / 1e9,
                   triton_fa_ms=t, triton_fa_tflops=flops / t / 1e9, ratio=t_sdpa / t, check_err=err)  # fmt: skip
        rows.append(row)
        _report(f"prefill causal 1x{s}: sdpa {t_sdpa:.3f} ms ({row['sdpa_tflops']:.0f} TFLOP/s, {backend}) | "
                f"triton_fa {t:.3f} ms ({row['triton_fa_tflops']:.0f} TFLOP/s) = {100 * t_sdpa / t:.0f}% of SDPA; "
                f"rel err {err:.1e}", f"prefill {s // 1024}K")  # fmt: skip
    return rows


def chunked_rows(prefix=32768, chunk=2048):
    from torch.nn.attention.bias import causal_lower_right

    dev, d = "cuda", 128
    kv, k, v = make_compressed(1, 8, prefix, d, 4, 4, torch.float16, dev)
    q = torch.randn(1, 32, chunk, d, device=dev, dtype=torch.float16)
    ke = torch.randn(1, 8, chunk, d, device=dev, dtype=torch.float16)
    ve = torch.randn_like(ke)
    kf, vf = torch.cat([k, ke], dim=2), torch.cat([v, ve], dim=2)
    del k, v
    bias = causal_lower_right(chunk, prefix + chunk)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, kf, vf, attn_mask=bias, enable_gqa=True)

    def fused():
        return tq_attention(q, kv, ke, ve, causal=True)

    t_sdpa, t = bench(sdpa), bench(fused)
    flops = 4 * 32 * chunk * (prefix + chunk / 2) * d
    row = dict(kind="chunked_prefill", N=prefix, chunk=chunk, sdpa_ms=t_sdpa, tq4_ms=t, ratio=t_sdpa / t,
               sdpa_tflops=flops / t_sdpa / 1e9, tq4_tflops=flops / t / 1e9)  # fmt: skip
    _report(f"chunked prefill {chunk} over {prefix // 1024}K: sdpa fp16 {t_sdpa:.3f} ms | tq4 fused {t:.3f} ms "
            f"= {100 * row['ratio']:.0f}% of SDPA throughput", "chunked prefill")  # fmt: skip
    return [row]


def compress_rows(bw):
    rows = []
    for b, s in ((16, 2048), (1, 32768)):
        x = torch.randn(b, 8, s, 128, device="cuda", dtype=torch.float16)
        codecs = Codecs.build(KVLayout(128, 4, 4), device="cuda")
        kp = torch.empty(b, 8, s, 64, dtype=torch.uint8, device="cuda")
        kn = torch.empty(b, 8, s, dtype=NORM_DTYPE, device="cuda")
        mean = torch.zeros(b, 8, 128, device="cuda")
        fn = functools.partial(tq_compress, x, mean, codecs.rotation, codecs.k_boundaries, 4, kp, kn, 0)
        moved = x.numel() * 2 + kp.numel() + kn.numel() * kn.element_size()
        default = tqc.CONFIG["tiles"]
        for tiles in sorted({default, 1, 2, 4}):  # token blocks per program (the rotation re-read from L1)
            tqc.CONFIG["tiles"] = tiles
            t, tg = bench(fn), bench(fn, graph=True)  # eager includes the host's launch cost; graph replay does not
            rows.append(dict(kind="compress", B=b, N=s, tiles=tiles, ms=t, pct_bw=100 * moved / (t * 1e-3) / bw,
                             graph_ms=tg, graph_pct_bw=100 * moved / (tg * 1e-3) / bw))  # fmt: skip
            PROGRESS.write(f"compress 4-bit B={b} S={s} tiles={tiles}: {t:.4f} ms eager, {tg:.4f} ms graph replay, "
                           f"{100 * moved / (tg * 1e-3) / bw:.0f}% of copy bandwidth (graph)")  # fmt: skip
        tqc.CONFIG["tiles"] = default
        PROGRESS.step(f"compress {b}x{s // 1024}K")
    return rows


# decode targets of the project (speedup over SDPA at its best), drawn on the plot: (B, N, Hkv, d) -> target
DECODE_TARGETS = {(1, 4096, 8, 128): 1.0, (1, 32768, 8, 128): 1.3, (1, 131072, 8, 128): 2.5, (16, 32768, 8, 128): 2.5}
BANDWIDTH_TARGETS = {(16, 32768, 8, 128): 70.0}  # % of copy bandwidth


def _decode_points(rows: list[dict]) -> list[dict]:
    """Per decode row: label, speedups and TQ4 % of copy bandwidth, from CUDA-graph replays where measured (else
    eager). The graph-replay % of bandwidth is the eager one scaled by the time ratio (same bytes)."""
    points = []
    for r in rows:
        if r.get("kind") != "decode" or "tq4_ms" not in r:
            continue
        graph = r.get("tq4_graph_ms") is not None and r.get("sdpa_graph_ms") is not None
        t4 = r["tq4_graph_ms"] if graph else r["tq4_ms"]
        sdpa = r["sdpa_graph_ms"] if graph else r["sdpa_ms"]
        t3 = r.get("tq3_graph_ms") if graph else r.get("tq3_ms")
        n = r["N"]
        other = "" if (r["Hkv"], r["d"]) == (8, 128) else f"\nHkv {r['Hkv']}, d {r['d']}"
        points.append(dict(
            label=f"{r['B']} x {n // 1024}K{other}",
            key=(r["B"], n, r["Hkv"], r["d"]), tq4=sdpa / t4, tq3=None if t3 is None else sdpa / t3,
            pct=r["tq4_pct_bw"] * r["tq4_ms"] / t4, graph=graph,
        ))  # fmt: skip
    return points


def plot_decode(rows: list[dict], env: dict, path: str | Path) -> Path:
    """Two panels: fused TQ4 / TQ3 decode speedup over fp16 SDPA per shape (targets marked), and TQ4's % of the
    measured copy bandwidth. Writes a PNG at path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _decode_points(rows)
    if not points:
        raise ValueError("no decode rows with fused timings to plot")
    x = list(range(len(points)))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(points) + 2), 7.5), sharex=True)
    w = 0.38
    a1.bar([i - w / 2 for i in x], [p["tq4"] for p in points], w, label="fused TQ4", color="C0")
    a1.bar([i + w / 2 for i in x], [p["tq3"] or 0.0 for p in points], w, label="fused TQ3", color="C2")
    for i, p in enumerate(points):
        a1.annotate(f"{p['tq4']:.2f}x", (i - w / 2, p["tq4"]), ha="center", va="bottom", fontsize=8)
        target = DECODE_TARGETS.get(p["key"])
        if target is not None:
            a1.plot([i - w, i + w], [target, target], color="C3", lw=2, label="target" if i == 0 else None)
    a1.axhline(1.0, color="k", lw=0.8, ls="--")
    a1.set_ylabel("speedup over fp16 SDPA (x)")
    mode = "CUDA-graph replay" if all(p["graph"] for p in points) else "medians"
    a1.set_title(f"Decode attention over the compressed cache, Hq 32, fp16 ({mode})\n"
                 f"{env.get('gpu', env.get('device', ''))}", fontsize=9)  # fmt: skip
    handles, labels = a1.get_legend_handles_labels()
    seen = dict(zip(labels, handles, strict=False))
    a1.legend(seen.values(), seen.keys(), loc="upper left", fontsize=8)
    a2.bar(x, [p["pct"] for p in points], 0.6, color="C0")
    for i, p in enumerate(points):
        a2.annotate(f"{p['pct']:.0f}%", (i, p["pct"]), ha="center", va="bottom", fontsize=8)
        if p["key"] in BANDWIDTH_TARGETS:
            t = BANDWIDTH_TARGETS[p["key"]]
            a2.plot([i - w, i + w], [t, t], color="C3", lw=2)
    a2.set_ylim(0, 100)
    a2.set_ylabel("fused TQ4: % of copy bandwidth")
    a2.set_xticks(x, [p["label"] for p in points], fontsize=8)
    a2.set_xlabel("batch x context (Hkv 8, head_dim 128 unless said)")
    return save_figure(fig, path, env, ("date_utc", "torch", "triton"), (0, 0.02, 1, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the target shapes only")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timings")
    p.add_argument("--json", help="write all rows as JSON here")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/out"))
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_plot_arguments(p, "the decode speedups and % of bandwidth")
    args = p.parse_args(argv)
    if args.plot_from:
        return plot_only(p, args, lambda data, png: plot_decode(data["rows"], data.get("env", {}), png))
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU")
        return 2
    env = env_header()
    print(env)
    bw = copy_bandwidth("cuda")
    print(f"measured copy bandwidth: {bw / 1e12:.2f} TB/s (read + write)")
    graph = not args.no_graph
    if args.quick:
        cases = [(1, 4096), (1, 32768), (1, 131072), (16, 32768)]
    else:
        cases = [(b, n) for b in (1, 16, 64) for n in (4096, 32768, 131072)]
    decode_sets = [(cases, [(32, 8)], [128])]
    if not args.quick:  # MHA (Hkv = 32) and other head dims at the target shapes
        targets = [(1, 32768), (16, 32768)]
        decode_sets += [(targets, [(32, 32)], [128]), (targets, [(32, 8)], [64, 256])]
    total = sum(len(decode_shapes(*d)) for d in decode_sets) + 2 + 1 + 2  # + prefill, chunked, compress
    global PROGRESS
    PROGRESS = Progress(total, enabled=not args.no_progress, desc="attention bench")
    rows = []
    for decode_set in decode_sets:
        rows += decode_rows(*decode_set, bw, args.quick, graph)
    rows += prefill_rows([4096, 16384])
    rows += chunked_rows()
    rows += compress_rows(bw)
    PROGRESS.close()
    write_results(rows, args.out_dir, "attention", env=env)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"env": env, "copy_bw": bw, "rows": rows}, indent=1))
    dec = [r for r in rows if r["kind"] == "decode"]
    print_table(dec, ["B", "N", "Hq", "Hkv", "d", "sdpa_ms", "tq4_ms", "tq4_speedup", "tq4_pct_bw", "tq3_ms",
                      "tq3_speedup", "sdpa_graph_ms", "tq4_graph_ms", "tq4_graph_speedup", "triton_fa_ms"])  # fmt: skip
    if args.plot:
        print(f"wrote {plot_decode(rows, env, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
