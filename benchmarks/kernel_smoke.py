"""GPU smoke test + timings of the TurboQuant kernels at realistic sizes (standalone; needs CUDA).

    python benchmarks/kernel_smoke.py [--quick] [--bits 4 4] [--no-check]

1. tq_compress vs core.kvcodec.compress_reference (index mismatch fraction, norm error) and its time.
2. Decode (Sq = 1, one exact token): tq_attention vs "dequantize, float32 attention" per batch row,
   timed with triton.testing.do_bench next to torch SDPA on fp16 K/V of the same length
   (FLASH_ATTENTION backend, enable_gqa=True). Effective bandwidth uses the bytes in
   kernels/tq_attention.py's docstring: D * (k_bits + v_bits) / 8 + 8 per token per KV head.
3. Paged decode: the same data scattered into random 16-token blocks must match the dense kernel.
4. Chunked prefill: a 2K-token chunk over a 32K compressed prefix (causal) vs SDPA on fp16 K/V
   (bottom-right causal via torch.nn.attention.bias.causal_lower_right when available).

Shapes: Hq = 32, Hkv = 8, D = 128; B in 1..16, N up to 32K. Prints one table per section.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

GiB = 1 << 30

# Problem sizes (module constants so that a CPU dry run of the script's logic can shrink them).
HQ, HKV, D = 32, 8, 128
COMPRESS_DIMS = (64, 96, 128, 256)
COMPRESS_SHAPES = ((1, 8, 1), (4, 8, 2048))  # (B, H, S)
DECODE_SIZES = ((1, 1024), (1, 4096), (1, 16384), (1, 32768), (4, 8192), (4, 32768), (8, 8192), (8, 32768),
                (16, 4096), (16, 16384), (16, 32768))  # fmt: skip
DECODE_SIZES_QUICK = ((1, 4096), (1, 32768), (8, 8192), (16, 32768))
PAGED_SIZES = ((4, 8192), (16, 32768))
PREFILL_SIZES = ((1, 32768, 2048), (1, 8192, 2048))  # (B, compressed prefix, chunk)


def _bench(fn, warmup=25, rep=100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep))  # ms


def _table(rows, cols):
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)))
    sys.stdout.flush()


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _sdpa_fp16(q, k, v, causal_lower_right=False):
    """A callable running torch SDPA in fp16 with GQA on the FLASH backend (or the default backend, with a
    note, where FLASH rejects the inputs), and the backend's name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mask = None
    if causal_lower_right:
        from torch.nn.attention.bias import causal_lower_right as clr

        mask = clr(q.shape[-2], k.shape[-2])

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def default():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    try:
        flash()
        return flash, "flash"
    except Exception as e:  # noqa: BLE001
        print(f"  [sdpa] FLASH_ATTENTION + enable_gqa failed ({type(e).__name__}: {str(e)[:120]}); default backend")
        default()
        return default, "default"


def _graph_time(fn) -> float | None:
    """ms per replay of fn captured in a CUDA graph (after an eager warm-up), None if capture fails."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return _bench(g.replay)
    except Exception as e:  # noqa: BLE001
        print(f"  [graph] capture failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def _make_cache(b, hkv, n, d, kb, vb, dev, seed=0):
    """Random fp16 K/V compressed with tq_compress into a [B, Hkv, cap, ...] cache."""
    from turboquant_vllm.kernels.tq_compress import tq_compress
    from turboquant_vllm.layout import NORM_DTYPE, Codecs, CompressedKV, KVLayout

    g = torch.Generator(device=dev).manual_seed(seed)
    c = Codecs.build(KVLayout(d, kb, vb), device=dev)
    k = torch.randn(b, hkv, n, d, device=dev, generator=g, dtype=torch.float16)
    v = torch.randn(b, hkv, n, d, device=dev, generator=g, dtype=torch.float16)
    k += 0.5 * torch.randn(b, hkv, 1, d, device=dev, generator=g, dtype=torch.float16)
    km = k[:, :, : min(n, 256)].float().mean(2)
    vm = v[:, :, : min(n, 256)].float().mean(2)
    cap = n + 64
    kp = torch.zeros(b, hkv, cap, d * kb // 8, dtype=torch.uint8, device=dev)
    vp = torch.zeros(b, hkv, cap, d * vb // 8, dtype=torch.uint8, device=dev)
    norms = torch.zeros(b, hkv, cap, 2, device=dev, dtype=NORM_DTYPE)  # the cache's store: (k, v) per token
    kn, vn = norms[..., 0], norms[..., 1]
    tq_compress(k, km, c.rotation, c.k_boundaries, kb, kp, kn, 0)
    tq_compress(v, vm, c.rotation, c.v_boundaries, vb, vp, vn, 0)
    return CompressedKV(kp, kn, vp, vn, km, vm, n, c), k, v


def section_compress(args, dev):
    from turboquant_vllm.core.kvcodec import compress_reference
    from turboquant_vllm.core.packing import unpack
    from turboquant_vllm.kernels.tq_compress import tq_compress
    from turboquant_vllm.layout import NORM_DTYPE, Codecs, KVLayout

    print("\n== tq_compress vs compress_reference ==")
    rows = []
    for d in COMPRESS_DIMS:
        for bits in (2, 3, 4):
            for b, h, s in COMPRESS_SHAPES:
                c = Codecs.build(KVLayout(d, bits, bits), device=dev)
                x = torch.randn(b, h, s, d, device=dev, dtype=torch.float16) * 2
                mean = torch.randn(b, h, d, device=dev) * 0.3
                pk = torch.zeros(b, h, s + 5, d * bits // 8, dtype=torch.uint8, device=dev)
                nr = torch.zeros(b, h, s + 5, device=dev, dtype=NORM_DTYPE)
                tq_compress(x, mean, c.rotation, c.k_boundaries, bits, pk, nr, 5)
                rp, rn = compress_reference(x, mean, c.rotation, c.k_boundaries, bits)
                diff = (unpack(pk[:, :, 5:], bits, d).int() - unpack(rp, bits, d).int()).abs()
                row = dict(d=d, bits=bits, B=b, H=h, S=s, mismatch=float(diff.ne(0).float().mean()),
                           maxdiff=int(diff.max()),
                           norm_rel=float(((nr[:, :, 5:].float() - rn).abs() / rn).max()))  # fmt: skip
                # norms are rounded to bfloat16: <= half a unit (2**-8 relative)
                row["ok"] = row["mismatch"] < 1e-3 and row["maxdiff"] <= 1 and row["norm_rel"] <= 2**-8
                if d == D:
                    args_ = (x, mean, c.rotation, c.k_boundaries, bits)
                    row["tq_us"] = 1e3 * _bench(functools.partial(tq_compress, *args_, pk, nr, 5))
                    row["ref_us"] = 1e3 * _bench(functools.partial(compress_reference, *args_))
                rows.append(row)
    _table(rows, ["d", "bits", "B", "H", "S", "mismatch", "maxdiff", "norm_rel", "ok", "tq_us", "ref_us"])
    return all(r["ok"] for r in rows)


def _check_decode(out, q, kv, ke, ve):
    """Relative error of out [B, 1, Hq, D] vs dequantize + float32 attention, one batch row at a time."""
    from turboquant_vllm.core.kvcodec import attention_reference, dequantize_reference

    c, n = kv.codecs, kv.length
    num = den = 0.0
    for i in range(q.shape[0]):
        sl = slice(i, i + 1)
        k = dequantize_reference(kv.k_packed[sl, :, :n], kv.k_norms[sl, :, :n], kv.k_mean[sl], c.rotation,
                                 c.k_centroids, c.layout.k_bits)  # fmt: skip
        v = dequantize_reference(kv.v_packed[sl, :, :n], kv.v_norms[sl, :, :n], kv.v_mean[sl], c.rotation,
                                 c.v_centroids, c.layout.v_bits)  # fmt: skip
        k = torch.cat([k, ke[sl].float()], 2)
        v = torch.cat([v, ve[sl].float()], 2)
        ref = attention_reference(q[sl].float(), k, v)
        num += float((out[sl].float() - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
        k = v = ref = None
    return math.sqrt(num / max(den, 1e-30))


def section_decode(args, dev, kb, vb):
    from turboquant_vllm.kernels.tq_attention import tq_attention

    print(f"\n== decode: tq_attention (K{kb}/V{vb}) vs SDPA fp16, Hq={HQ} Hkv={HKV} D={D} ==")
    hq, hkv, d = HQ, HKV, D
    bytes_tok = d * (kb + vb) // 8 + 8
    sizes = DECODE_SIZES_QUICK if args.quick else DECODE_SIZES
    rows, ok = [], True
    for b, n in sizes:
        try:
            kv, k16, v16 = _make_cache(b, hkv, n, d, kb, vb, dev)
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
            ke = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.float16)
            ve = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.float16)
            out = torch.full((b, 1, hq, d), float("nan"), device=dev, dtype=torch.float16)
            tq_attention(q, kv, ke, ve, out=out)
            row = dict(B=b, N=n)
            if not args.no_check:
                row["rel_err"] = _check_decode(out, q, kv, ke, ve)
                row["ok"] = bool(row["rel_err"] < 2e-3 and not torch.isnan(out).any())
                ok &= row["ok"]
            call = functools.partial(tq_attention, q, kv, ke, ve, out=out)
            t_tq = _bench(call)
            ref_out = out.clone()
            t_graph = _graph_time(call)
            if t_graph is not None:
                row["graph_same"] = bool(torch.equal(out, ref_out))
                ok &= row["graph_same"]
            kf = torch.cat([k16, ke], 2)
            vf = torch.cat([v16, ve], 2)
            sd, backend = _sdpa_fp16(q, kf, vf)
            t_sd = _bench(sd)
            tq_bytes = b * hkv * n * bytes_tok
            sd_bytes = b * hkv * (n + 1) * 4 * d
            row.update(tq_us=1e3 * t_tq, graph_us=None if t_graph is None else 1e3 * t_graph, sdpa_us=1e3 * t_sd,
                       speedup=t_sd / t_tq,
                       tq_GBs=tq_bytes / t_tq / 1e6, sdpa_GBs=sd_bytes / t_sd / 1e6, sdpa=backend)  # fmt: skip
            rows.append(row)
            kv = k16 = v16 = kf = vf = None
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            ok = False
            print(f"  B={b} N={n}: {type(e).__name__}: {e}")
            traceback.print_exc()
    _table(
        rows,
        [
            "B",
            "N",
            "rel_err",
            "ok",
            "graph_same",
            "tq_us",
            "graph_us",
            "sdpa_us",
            "speedup",
            "tq_GBs",
            "sdpa_GBs",
            "sdpa",
        ],
    )
    return ok


def section_paged(args, dev, kb, vb):
    from turboquant_vllm.kernels.tq_attention import tq_attention, tq_attention_paged
    from turboquant_vllm.layout import NORM_DTYPE

    print(f"\n== paged decode (K{kb}/V{vb}, block 16) vs dense tq_attention on the same data ==")
    hq, hkv, d, page = HQ, HKV, D, 16
    rows, ok = [], True
    for b, n in PAGED_SIZES[:1] if args.quick else PAGED_SIZES:
        kv, _, _ = _make_cache(b, hkv, n, d, kb, vb, dev)
        g = torch.Generator().manual_seed(1)
        lens = torch.randint(1, n + 1, (b,), generator=g)
        lens[0] = n
        nbps = -(-n // page)
        nblocks = b * nbps
        perm = torch.randperm(nblocks, generator=g).to(dev)
        bt = perm.view(b, nbps).to(torch.int32)
        kp = torch.empty(nblocks, hkv, page, kv.k_packed.shape[-1], dtype=torch.uint8, device=dev)
        vp = torch.empty(nblocks, hkv, page, kv.v_packed.shape[-1], dtype=torch.uint8, device=dev)
        norms = torch.empty(nblocks, hkv, page, 2, device=dev, dtype=NORM_DTYPE)
        kn, vn = norms[..., 0], norms[..., 1]
        for i in range(b):
            blocks = bt[i].long()
            kp[blocks] = kv.k_packed[i, :, : nbps * page].view(hkv, nbps, page, -1).transpose(0, 1)
            vp[blocks] = kv.v_packed[i, :, : nbps * page].view(hkv, nbps, page, -1).transpose(0, 1)
            kn[blocks] = kv.k_norms[i, :, : nbps * page].reshape(hkv, nbps, page).transpose(0, 1)
            vn[blocks] = kv.v_norms[i, :, : nbps * page].reshape(hkv, nbps, page).transpose(0, 1)
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        ke = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.float16)
        ve = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.float16)
        sl = lens.to(torch.int32).to(dev)
        paged = tq_attention_paged(q, kp, kn, vp, vn, bt, sl, kv.k_mean, kv.v_mean, kv.codecs, key_exact=ke,
                                   value_exact=ve)  # fmt: skip
        errs = []
        for i in range(b):
            one = type(kv)(kv.k_packed[i : i + 1], kv.k_norms[i : i + 1], kv.v_packed[i : i + 1],
                           kv.v_norms[i : i + 1], kv.k_mean[i : i + 1], kv.v_mean[i : i + 1], int(lens[i]),
                           kv.codecs)  # fmt: skip
            dense = tq_attention(q[i : i + 1], one, ke[i : i + 1], ve[i : i + 1])
            errs.append(float((paged[i : i + 1].float() - dense.float()).norm() / dense.float().norm()))
        t = _bench(functools.partial(tq_attention_paged, q, kp, kn, vp, vn, bt, sl, kv.k_mean, kv.v_mean, kv.codecs,
                                     key_exact=ke, value_exact=ve))  # fmt: skip
        row = dict(B=b, N_max=n, tokens=int(lens.sum()), max_rel_diff=max(errs), tq_us=1e3 * t)
        row["ok"] = row["max_rel_diff"] < 2e-3
        ok &= row["ok"]
        rows.append(row)
    _table(rows, ["B", "N_max", "tokens", "max_rel_diff", "ok", "tq_us"])
    return ok


def section_prefill(args, dev, kb, vb):
    from turboquant_vllm.kernels.tq_attention import tq_attention

    print(f"\n== chunked prefill (K{kb}/V{vb}): Sq = Se = chunk over a compressed prefix, causal ==")
    hq, hkv, d = HQ, HKV, D
    rows, ok = [], True
    for b, n, sq in PREFILL_SIZES[:1] if args.quick else PREFILL_SIZES:
        kv, k16, v16 = _make_cache(b, hkv, n, d, kb, vb, dev)
        q = torch.randn(b, hq, sq, d, device=dev, dtype=torch.float16)
        ke = torch.randn(b, hkv, sq, d, device=dev, dtype=torch.float16)
        ve = torch.randn(b, hkv, sq, d, device=dev, dtype=torch.float16)
        out = tq_attention(q, kv, ke, ve, causal=True)
        row = dict(B=b, Nc=n, Sq=sq)
        if not args.no_check:
            from turboquant_vllm.core.kvcodec import attention_reference, dequantize_reference

            c = kv.codecs
            kd = dequantize_reference(kv.k_packed[:, :, :n], kv.k_norms[:, :, :n], kv.k_mean, c.rotation,
                                      c.k_centroids, kb)  # fmt: skip
            vd = dequantize_reference(kv.v_packed[:, :, :n], kv.v_norms[:, :, :n], kv.v_mean, c.rotation,
                                      c.v_centroids, vb)  # fmt: skip
            rows_chk = slice(max(0, sq - 256), sq)  # last 256 queries (full prefix + most of the chunk)
            k = torch.cat([kd, ke.float()], 2)
            v = torch.cat([vd, ve.float()], 2)
            ref = attention_reference(q[:, :, rows_chk].float(), k[:, :, : n + sq], v[:, :, : n + sq], causal=True)
            row["rel_err"] = float((out[:, rows_chk].float() - ref).norm() / ref.norm())
            row["ok"] = bool(row["rel_err"] < 2e-3)
            ok &= row["ok"]
            kd = vd = k = v = ref = None
        t_tq = _bench(functools.partial(tq_attention, q, kv, ke, ve, causal=True), warmup=5, rep=20)
        kf = torch.cat([k16, ke], 2)
        vf = torch.cat([v16, ve], 2)
        try:
            sd, backend = _sdpa_fp16(q, kf, vf, causal_lower_right=True)
        except Exception as e:  # noqa: BLE001
            print(f"  causal_lower_right SDPA failed ({type(e).__name__}); timing non-causal SDPA instead")
            sd, backend = _sdpa_fp16(q, kf, vf)
            backend += "-noncausal"
        t_sd = _bench(sd, warmup=5, rep=20)
        flops = 4 * b * hq * sq * d * (n + sq / 2)
        row.update(tq_ms=t_tq, sdpa_ms=t_sd, tq_vs_sdpa=t_sd / t_tq, tq_TFLOPs=flops / t_tq / 1e9, sdpa=backend)
        rows.append(row)
        kv = k16 = v16 = kf = vf = None
        torch.cuda.empty_cache()
    _table(rows, ["B", "Nc", "Sq", "rel_err", "ok", "tq_ms", "sdpa_ms", "tq_vs_sdpa", "tq_TFLOPs", "sdpa"])
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes")
    ap.add_argument("--no-check", action="store_true", help="timings only (skip the float32 references)")
    ap.add_argument("--bits", type=int, nargs=2, default=(4, 4), metavar=("K_BITS", "V_BITS"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_smoke.py needs a CUDA device")
        return 2
    dev = "cuda"
    p = torch.cuda.get_device_properties(0)
    import triton

    print(f"device {p.name}, {p.multi_processor_count} SMs, {p.total_memory / GiB:.0f} GiB; torch {torch.__version__}, "
          f"triton {triton.__version__}")  # fmt: skip
    torch.manual_seed(0)
    kb, vb = args.bits
    t0 = time.time()
    results = {}
    for name, fn in (
        ("compress", lambda: section_compress(args, dev)),
        ("decode", lambda: section_decode(args, dev, kb, vb)),
        ("paged", lambda: section_paged(args, dev, kb, vb)),
        ("prefill", lambda: section_prefill(args, dev, kb, vb)),
    ):
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            results[name] = f"error: {type(e).__name__}: {e}"
    print(f"\nsummary ({time.time() - t0:.0f} s):", results)
    return 0 if all(v is True for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
