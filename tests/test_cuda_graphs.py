"""The decode path can be captured in a CUDA graph (no host syncs). Runs only where CUDA exists."""

import pytest
import torch

from turboquant_vllm.layout import Codecs, CompressedKV, KVLayout

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _compressed(b=2, hkv=2, n=300, d=128, bits=4):
    from turboquant_vllm.kernels.tq_compress import tq_compress

    codecs = Codecs.build(KVLayout(d, bits, bits), device="cuda")
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    kp = torch.empty(b, hkv, 512, d * bits // 8, dtype=torch.uint8, device="cuda")
    vp = torch.empty_like(kp)
    norms = torch.empty(b, hkv, 512, 2, device="cuda", dtype=torch.bfloat16)  # the cache's interleaved store
    kn, vn = norms[..., 0], norms[..., 1]
    km, vm = k.float().mean(2), torch.zeros(b, hkv, d, device="cuda")
    tq_compress(k, km, codecs.rotation, codecs.k_boundaries, bits, kp, kn, 0)
    tq_compress(v, vm, codecs.rotation, codecs.v_boundaries, bits, vp, vn, 0)
    return CompressedKV(kp, kn, vp, vn, km, vm, n, codecs)


def test_decode_step_is_capturable():
    from turboquant_vllm.kernels.tq_attention import tq_attention
    from turboquant_vllm.kernels.tq_compress import tq_compress

    kv = _compressed()
    q = torch.randn(2, 8, 1, 128, device="cuda", dtype=torch.float16)
    ke = torch.randn(2, 2, 1, 128, device="cuda", dtype=torch.float16)
    ve = torch.randn_like(ke)
    out = torch.full((2, 1, 8, 128), float("nan"), device="cuda", dtype=torch.float16)
    c = kv.codecs

    def step():
        tq_compress(ke, kv.k_mean, c.rotation, c.k_boundaries, 4, kv.k_packed, kv.k_norms, kv.length)
        tq_compress(ve, kv.v_mean, c.rotation, c.v_boundaries, 4, kv.v_packed, kv.v_norms, kv.length)
        tq_attention(q, kv, ke, ve, out=out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    eager = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.fill_(float("nan"))
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    fresh = tq_attention(q, kv, ke, ve)
    torch.testing.assert_close(out, fresh, atol=2e-3, rtol=2e-3)
    assert not torch.equal(out, eager)  # the replay used the new query
