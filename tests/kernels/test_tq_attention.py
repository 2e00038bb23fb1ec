"""tq_attention / tq_attention_paged (Triton; CPU interpreter here) against "PyTorch dequantize, then
float32 attention" on the same compressed data.

Tolerance: the kernel's error vs the float32 reference must be within 3x the error of the same-precision
PyTorch path (torch SDPA in the query dtype on the dequantized K/V rounded to that dtype), with a small
floor for float32 (where both are at rounding level), plus an absolute sanity bound.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests.helpers import rel_err
from turboquant_vllm.core.kvcodec import attention_reference, compress_reference, dequantize_reference, sdpa
from turboquant_vllm.kernels import tq_attention as tqa
from turboquant_vllm.kernels.tq_attention import tq_attention, tq_attention_paged
from turboquant_vllm.layout import NORM_DTYPE, Codecs, CompressedKV, KVLayout

F16, F32 = torch.float16, torch.float32
_FLOOR = {F32: 5e-6, F16: 5e-4, torch.bfloat16: 4e-3}
_SANITY = {F32: 2e-5, F16: 2e-3, torch.bfloat16: 2e-2}


@functools.cache
def _codecs(d: int, kb: int, vb: int, device: str) -> Codecs:
    return Codecs.build(KVLayout(d, kb, vb), seed=1, device=device)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_kv(b, hkv, n, d, kb, vb, device, extra=5, seed=0) -> CompressedKV:
    """Compress random K/V (non-zero means, offsets) with the reference; garbage beyond `n`."""
    g = _gen(seed)
    c = _codecs(d, kb, vb, device)
    k = torch.randn(b, hkv, n, d, generator=g) * 1.5 + 0.7 * torch.randn(b, hkv, 1, d, generator=g)
    v = torch.randn(b, hkv, n, d, generator=g) + 0.5 * torch.randn(b, hkv, 1, d, generator=g)
    km = torch.randn(b, hkv, d, generator=g) * 0.5
    vm = torch.randn(b, hkv, d, generator=g) * 0.5
    kp, kn = compress_reference(k, km, c.rotation.cpu(), c.k_boundaries.cpu(), kb)
    vp, vn = compress_reference(v, vm, c.rotation.cpu(), c.v_boundaries.cpu(), vb)
    cap = n + extra
    kp_all = torch.randint(0, 256, (b, hkv, cap, kp.shape[-1]), generator=g, dtype=torch.uint8)
    vp_all = torch.randint(0, 256, (b, hkv, cap, vp.shape[-1]), generator=g, dtype=torch.uint8)
    kn_all = (torch.rand(b, hkv, cap, generator=g) * 1e3).to(NORM_DTYPE)
    vn_all = (torch.rand(b, hkv, cap, generator=g) * 1e3).to(NORM_DTYPE)
    kp_all[:, :, :n], vp_all[:, :, :n], kn_all[:, :, :n], vn_all[:, :, :n] = kp, vp, kn, vn
    to = functools.partial(torch.Tensor.to, device=device)
    return CompressedKV(to(kp_all), to(kn_all), to(vp_all), to(vn_all), to(km), to(vm), n, c)


def dequant(kv: CompressedKV) -> tuple[torch.Tensor, torch.Tensor]:
    c, n = kv.codecs, kv.length
    k = dequantize_reference(kv.k_packed[:, :, :n], kv.k_norms[:, :, :n], kv.k_mean, c.rotation, c.k_centroids,
                             c.layout.k_bits)  # fmt: skip
    v = dequantize_reference(kv.v_packed[:, :, :n], kv.v_norms[:, :, :n], kv.v_mean, c.rotation, c.v_centroids,
                             c.layout.v_bits)  # fmt: skip
    return k, v


def _full_mask(mask, causal, shape, device):
    """bool/additive mask and causal flag -> one mask for torch SDPA (None if neither)."""
    b, hq, sq, skv = shape
    m = None
    if causal:
        i = torch.arange(sq, device=device).view(-1, 1)
        j = torch.arange(skv, device=device).view(1, -1)
        m = (j <= i + (skv - sq)).expand(b, hq, sq, skv)
    if mask is not None:
        if mask.dtype == torch.bool:
            m = mask.expand(b, hq, sq, skv) if m is None else (m & mask)
        else:
            add = mask.float().expand(b, hq, sq, skv)
            m = add if m is None else add.masked_fill(~m, float("-inf"))
    return m


def check_against_reference(out, q, k, v, *, mask=None, causal=False, scale=None):
    """out [B, Sq, Hq, D] vs float32 reference on K/V [B, Hkv, Skv, D] (float32)."""
    assert out.dtype == q.dtype
    ref = attention_reference(q.float(), k, v, attention_mask=mask, causal=causal, scale=scale)
    dt = q.dtype
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    fm = _full_mask(mask, causal, shape, q.device)
    low = sdpa(q, k.to(dt), v.to(dt), attention_mask=fm, scale=scale).float().nan_to_num(0.0)
    err_torch = rel_err(low, ref)
    err = rel_err(out.float(), ref)
    assert err <= max(3.0 * err_torch, _FLOOR[dt]), f"kernel err {err:.3g} vs torch {dt} err {err_torch:.3g}"
    assert err < _SANITY[dt], f"kernel err {err:.3g}"
    return err


def _exact(b, hkv, se, d, dtype, device, seed=7):
    if se == 0:
        return None, None
    g = _gen(seed)
    ke = (torch.randn(b, hkv, se, d, generator=g) * 1.5).to(device=device, dtype=dtype)
    ve = torch.randn(b, hkv, se, d, generator=g).to(device=device, dtype=dtype)
    return ke, ve


def _cat(kd, ke):
    return kd if ke is None else torch.cat([kd, ke.float()], dim=2)


def _run_dense(device, b, hq, hkv, sq, nc, se, d, kb, vb, causal, dtype, mask=None, **kw):
    kv = make_kv(b, hkv, nc, d, kb, vb, device)
    q = (torch.randn(b, hq, sq, d, generator=_gen(3))).to(device=device, dtype=dtype)
    ke, ve = _exact(b, hkv, se, d, dtype, device)
    out = torch.full((b, sq, hq, d), float("nan"), device=device, dtype=dtype)
    res = tq_attention(q, kv, ke, ve, attention_mask=mask, causal=causal, out=out, **kw)
    assert res is out
    assert not torch.isnan(out).any()
    kd, vd = dequant(kv)
    return check_against_reference(out, q, _cat(kd, ke), _cat(vd, ve), mask=mask, causal=causal)


# id: (B, Hq, Hkv, Sq, Nc, Se, D, k_bits, v_bits, causal, dtype)
DENSE_CASES = {
    "d64-tq4-decode-gqa4": (2, 4, 1, 1, 37, 1, 64, 4, 4, False, F32),
    "d64-tq4-decode-gqa4-fp16": (2, 4, 1, 1, 37, 1, 64, 4, 4, False, F16),
    "d96-k3v4-gqa3-sq5-causal": (2, 9, 3, 5, 70, 5, 96, 3, 4, True, F32),
    "d96-k3v4-gqa3-sq5-causal-fp16": (2, 9, 3, 5, 70, 5, 96, 3, 4, True, F16),
    "d128-k4v2-fp16": (2, 8, 2, 1, 37, 1, 128, 4, 2, False, F16),
    "d128-tq3-sq8-causal-fp16": (2, 8, 2, 8, 40, 8, 128, 3, 3, True, F16),
    "d128-tq4-mha": (2, 2, 2, 1, 21, 1, 128, 4, 4, False, F32),
    "d256-tq2-mha": (2, 2, 2, 1, 37, 1, 256, 2, 2, False, F32),
    "d256-k2v4-gqa2-causal-fp16": (2, 4, 2, 2, 21, 2, 256, 2, 4, True, F16),
    "gqa8-k4v3-fp16": (2, 16, 2, 1, 45, 1, 64, 4, 3, False, F16),
    "d96-tq2-fp16": (2, 4, 2, 2, 33, 2, 96, 2, 2, True, F16),
    "d64-k2v4-fp16": (2, 4, 1, 1, 33, 1, 64, 2, 4, False, F16),
    "d256-tq4-fp16": (1, 4, 2, 1, 33, 1, 256, 4, 4, False, F16),
    "nc0": (2, 4, 2, 3, 0, 3, 64, 4, 4, True, F32),
    "se0-fp16": (2, 4, 2, 2, 37, 0, 64, 4, 4, False, F16),
    "causal-se-lt-sq": (2, 4, 2, 6, 30, 2, 64, 4, 4, True, F32),
    "causal-no-exact": (2, 4, 2, 4, 30, 0, 64, 3, 2, True, F32),
    "prefill-chunk-3-row-blocks": (1, 4, 1, 33, 50, 33, 64, 4, 4, True, F32),
    "prefill-chunk-fp16": (2, 8, 2, 33, 50, 33, 64, 4, 3, True, F16),
    "bits-1-8": (1, 2, 1, 1, 20, 1, 64, 1, 8, False, F32),
    "bits-5-7": (1, 2, 1, 2, 20, 1, 64, 5, 7, False, F32),
    "bits-6-3-d96": (1, 2, 1, 1, 20, 1, 96, 6, 3, False, F32),
}


@pytest.mark.parametrize("case", list(DENSE_CASES), ids=list(DENSE_CASES))
def test_dense_matches_reference(device, case):
    _run_dense(device, *DENSE_CASES[case])


def test_bf16_cuda_only(device):
    if device != "cuda":
        pytest.skip("tl.dot on bf16 is not faithful in the Triton CPU interpreter")
    _run_dense(device, 2, 8, 2, 1, 300, 1, 128, 4, 4, False, torch.bfloat16)
    _run_dense(device, 2, 8, 2, 4, 300, 4, 128, 3, 2, True, torch.bfloat16)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_split_count_does_not_change_result(device, splits):
    _run_dense(device, 2, 4, 2, 2, 70, 3, 64, 4, 4, True, F32, num_kv_splits=splits)


@pytest.mark.parametrize("sq,causal", [(1, False), (3, True)])
def test_bool_left_padding_mask(device, sq, causal):
    b, hq, hkv, nc, se, d = 2, 4, 2, 37, sq, 64
    nk = nc + se
    mask = torch.ones(b, 1, sq, nk, dtype=torch.bool, device=device)
    mask[1, :, :, :9] = False  # row 1 is left-padded by 9 tokens (inside the compressed part)
    _run_dense(device, b, hq, hkv, sq, nc, se, d, 4, 4, causal, F32, mask=mask)
    _run_dense(device, b, hq, hkv, sq, nc, se, d, 3, 4, causal, F16, mask=mask)


def test_additive_mask_full_shape(device):
    b, hq, hkv, sq, nc, se, d = 2, 4, 2, 2, 30, 2, 64
    g = _gen(11)
    mask = torch.randn(b, hq, sq, nc + se, generator=g)
    mask[0, 1, 0, 5:20] = float("-inf")
    mask = mask.to(device)
    _run_dense(device, b, hq, hkv, sq, nc, se, d, 4, 4, True, F32, mask=mask)
    _run_dense(device, b, hq, hkv, sq, nc, se, d, 4, 4, False, F16, mask=mask.half())


@pytest.mark.parametrize("sq", [1, 3])
def test_masks_shared_by_every_row(device, sq):
    """A mask whose head and query strides are 0 ([B, 1, 1, N], broadcast: decode with padding) is read once per
    tile for all rows of a program (MASK_MODE 3 / 4): bool and additive, against the reference."""
    b, hq, hkv, nc, d = 2, 4, 2, 41, 64
    g = _gen(12)
    add = torch.randn(b, 1, 1, nc + sq, generator=g)
    add[1, :, :, :6] = float("-inf")
    keep = torch.rand(b, 1, 1, nc + sq, generator=g) > 0.3
    keep[..., -1] = True
    for mask in (add.expand(b, 1, sq, nc + sq).to(device), keep.expand(b, 1, sq, nc + sq).to(device)):
        _run_dense(device, b, hq, hkv, sq, nc, sq, d, 4, 4, sq > 1, F32, mask=mask)
        _run_dense(device, b, hq, hkv, sq, nc, sq, d, 4, 3, False, F16, mask=mask if mask.dtype == torch.bool
                   else mask.half())  # fmt: skip


def test_additive_mask_with_finfo_min(device):
    """transformers' additive masks use torch.finfo(float32).min: scaled by log2(e) it would overflow to -inf.
    Partly masked rows must match the reference, and a row masked everywhere by finfo.min gives PyTorch's equal
    weights (not zeros)."""
    b, hq, hkv, sq, nc, se, d = 2, 4, 2, 2, 30, 2, 64
    low = torch.finfo(torch.float32).min
    mask = torch.zeros(b, 1, sq, nc + se)
    mask[0, :, :, :7] = low  # left padding of row 0
    mask[1, 0, 1, :] = low  # every key of one query row
    _run_dense(device, b, hq, hkv, sq, nc, se, d, 4, 4, False, F32, mask=mask.to(device))


def test_fully_masked_rows_give_zeros(device):
    b, hq, hkv, sq, nc, se, d = 2, 4, 2, 2, 20, 2, 64
    mask = torch.ones(b, hq, sq, nc + se, dtype=torch.bool, device=device)
    mask[1, 3, 0] = False
    kv = make_kv(b, hkv, nc, d, 4, 4, device)
    q = torch.randn(b, hq, sq, d, generator=_gen(3)).to(device)
    ke, ve = _exact(b, hkv, se, d, F32, device)
    out = tq_attention(q, kv, ke, ve, attention_mask=mask)
    assert not torch.isnan(out).any()
    assert torch.all(out[1, 0, 3] == 0)
    kd, vd = dequant(kv)
    check_against_reference(out, q, _cat(kd, ke), _cat(vd, ve), mask=mask)


def test_noncontiguous_query_and_out_and_scale(device):
    b, hq, hkv, sq, nc, se, d = 2, 8, 2, 3, 40, 3, 96
    kv = make_kv(b, hkv, nc, d, 4, 3, device)
    q = torch.randn(b, sq, hq, d, generator=_gen(5)).to(device).transpose(1, 2)  # [B, Hq, Sq, D] view
    ke_full = torch.randn(b, se, hkv, 2 * d, generator=_gen(6)).to(device)
    ke, ve = ke_full[..., :d].transpose(1, 2), ke_full[..., d:].transpose(1, 2)
    out_buf = torch.full((b, hq, sq, d), float("nan"), device=device)
    out = out_buf.transpose(1, 2)  # [B, Sq, Hq, D] with head-major strides
    tq_attention(q, kv, ke, ve, causal=True, scale=0.3, out=out)
    assert not torch.isnan(out_buf).any()
    kd, vd = dequant(kv)
    check_against_reference(out, q, _cat(kd, ke), _cat(vd, ve), causal=True, scale=0.3)


def test_unaligned_packed_views_use_byte_units(device):
    """Packed K/V views at an odd byte offset can't be read as 16/32-bit units: the byte path must match."""
    b, hq, hkv, sq, nc, se, d = 2, 8, 2, 2, 40, 2, 128
    kv = make_kv(b, hkv, nc, d, 4, 3, device)

    def odd_view(t):
        buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        buf[..., 1:] = t
        return buf[..., 1:]

    odd = _replace(kv, k_packed=odd_view(kv.k_packed), v_packed=odd_view(kv.v_packed))
    assert tqa._max_unit(odd.k_packed) == 1 and tqa._max_unit(kv.k_packed) == 4
    q = torch.randn(b, hq, sq, d, generator=_gen(3)).to(device=device, dtype=F16)
    ke, ve = _exact(b, hkv, se, d, F16, device)
    out = tq_attention(q, odd, ke, ve, causal=True)
    ref = tq_attention(q, kv, ke, ve, causal=True)
    assert rel_err(out.float(), ref.float()) < 2e-3
    kd, vd = dequant(kv)
    check_against_reference(out, q, _cat(kd, ke), _cat(vd, ve), causal=True)


def test_split_heuristic_is_shape_derived():
    """About 2 resident programs per SM (132 SMs), chunks of >= 128 tokens, no device reads."""
    assert tqa._num_splits(8, 32768 // 128, 132) == 32  # B=1, Hkv=8, 32K: 256 programs
    assert tqa._num_splits(128, 32768 // 128, 132) == 2  # B=16: 256 programs
    assert tqa._num_splits(8, 4096 // 128, 132) == 32  # short sequence: 128 tokens per split
    assert tqa._num_splits(512, 1024, 132, 128) == 1  # chunked prefill: enough row blocks already


@pytest.mark.parametrize("b,tokens", [(16, 32768), (1, 131072), (64, 32768), (16, 4096)])
def test_exact_token_does_not_add_a_wave(monkeypatch, b, tokens):
    """The one exact token of a decode step must not change the compressed split count, and the compressed
    programs of the sub-tile path fit in one wave of 8 resident one-warp programs on 132 SMs when the shape
    allows (measured on the H100: a 9th split per row at 16 x 32K cost +58%)."""
    monkeypatch.setattr(tqa, "_num_sms", lambda i: 132)
    dev, bh = torch.device("cuda", 0), b * 8
    chunk, ns_c, ns_e = tqa._splits(bh, tokens, 1, None, dev, False, 16, tqa._DECODE_RESIDENT)
    chunk0, ns_c0, ns_e0 = tqa._splits(bh, tokens, 0, None, dev, False, 16, tqa._DECODE_RESIDENT)
    assert (ns_e, ns_e0) == (1, 0) and ns_c == ns_c0 and chunk == chunk0
    assert ns_c * chunk >= tokens and chunk % 128 == 0
    if bh <= 132 * tqa._DECODE_RESIDENT:
        assert bh * ns_c <= 132 * tqa._DECODE_RESIDENT, (bh, ns_c)


def test_pytorch_path_matches_kernel(device, monkeypatch):
    b, hq, hkv, sq, nc, se, d = 2, 4, 2, 3, 30, 3, 64
    kv = make_kv(b, hkv, nc, d, 3, 4, device)
    q = torch.randn(b, hq, sq, d, generator=_gen(3)).to(device)
    ke, ve = _exact(b, hkv, se, d, F32, device)
    kernel = tq_attention(q, kv, ke, ve, causal=True)
    monkeypatch.setattr(tqa, "use_triton", lambda *t: False)
    ref = tq_attention(q, kv, ke, ve, causal=True)
    assert rel_err(kernel, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# Paged
# --------------------------------------------------------------------------------------------------


def _run_paged(device, kb, vb, d, dtype, sq, se, causal, mean_b1, seq_lens=(5, 37, 64), hq=8, hkv=2, page=16):
    b = len(seq_lens)
    c = _codecs(d, kb, vb, device)
    g = _gen(21)
    max_blocks = max(-(-n // page) for n in seq_lens) + 1
    num_blocks = b * max_blocks + 3
    kpb, vpb = d * kb // 8, d * vb // 8
    k_packed = torch.randint(0, 256, (num_blocks, hkv, page, kpb), generator=g, dtype=torch.uint8)
    v_packed = torch.randint(0, 256, (num_blocks, hkv, page, vpb), generator=g, dtype=torch.uint8)
    k_norms = (torch.rand(num_blocks, hkv, page, generator=g) * 1e3).to(NORM_DTYPE)
    v_norms = (torch.rand(num_blocks, hkv, page, generator=g) * 1e3).to(NORM_DTYPE)
    block_table = torch.full((b, max_blocks), -1, dtype=torch.int32)
    mb = 1 if mean_b1 else b
    k_mean = torch.randn(mb, hkv, d, generator=g) * 0.5
    v_mean = torch.randn(mb, hkv, d, generator=g) * 0.5
    perm = torch.randperm(num_blocks, generator=g)
    used = 0
    per_seq = []
    for i, n in enumerate(seq_lens):
        k = torch.randn(1, hkv, n, d, generator=g) * 1.5
        v = torch.randn(1, hkv, n, d, generator=g)
        mi = 0 if mean_b1 else i
        kp, kn = compress_reference(k, k_mean[mi : mi + 1], c.rotation.cpu(), c.k_boundaries.cpu(), kb)
        vp, vn = compress_reference(v, v_mean[mi : mi + 1], c.rotation.cpu(), c.v_boundaries.cpu(), vb)
        kn, vn = kn.to(NORM_DTYPE), vn.to(NORM_DTYPE)  # as the cache stores them
        nb = -(-n // page)
        for j in range(nb):
            blk = int(perm[used])
            used += 1
            block_table[i, j] = blk
            sl = slice(j * page, min(n, (j + 1) * page))
            cnt = sl.stop - sl.start
            k_packed[blk, :, :cnt] = kp[0, :, sl]
            v_packed[blk, :, :cnt] = vp[0, :, sl]
            k_norms[blk, :, :cnt] = kn[0, :, sl]
            v_norms[blk, :, :cnt] = vn[0, :, sl]
        per_seq.append((kp, kn, vp, vn, mi))
    dev = functools.partial(torch.Tensor.to, device=device)
    q = torch.randn(b, hq, sq, d, generator=g).to(device=device, dtype=dtype)
    ke, ve = _exact(b, hkv, se, d, dtype, device)
    out = torch.full((b, sq, hq, d), float("nan"), device=device, dtype=dtype)
    res = tq_attention_paged(
        q, dev(k_packed), dev(k_norms), dev(v_packed), dev(v_norms), dev(block_table),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), dev(k_mean), dev(v_mean), c,
        key_exact=ke, value_exact=ve, causal=causal, out=out,
    )  # fmt: skip
    assert res is out
    assert not torch.isnan(out).any()
    for i, n in enumerate(seq_lens):
        kp, kn, vp, vn, mi = per_seq[i]
        kd = dequantize_reference(kp, kn, k_mean[mi : mi + 1], c.rotation.cpu(), c.k_centroids.cpu(), kb).to(device)
        vd = dequantize_reference(vp, vn, v_mean[mi : mi + 1], c.rotation.cpu(), c.v_centroids.cpu(), vb).to(device)
        kf = _cat(kd, None if ke is None else ke[i : i + 1])
        vf = _cat(vd, None if ve is None else ve[i : i + 1])
        mask = None
        if causal:  # compressed tokens all visible; bottom-right causal inside the exact segment
            qi = torch.arange(sq, device=device).view(-1, 1)
            j = torch.arange(n + se, device=device).view(1, -1)
            mask = (j < n) | (j - n <= qi + se - sq)
        check_against_reference(out[i : i + 1], q[i : i + 1], kf, vf, mask=mask)
    return out


# id: (k_bits, v_bits, D, dtype, Sq, Se, causal, mean_b1)
PAGED_CASES = {
    "tq4-decode": (4, 4, 64, F32, 1, 1, False, False),
    "k4v2-sq4-causal-fp16-mean1": (4, 2, 64, F16, 4, 4, True, True),
    "k3v4-d96-no-exact": (3, 4, 96, F32, 3, 0, False, False),
    "k2v3-d128-fp16": (2, 3, 128, F16, 1, 1, False, True),
    "causal-se-lt-sq": (4, 4, 64, F32, 4, 1, True, False),
}


@pytest.mark.parametrize("case", list(PAGED_CASES), ids=list(PAGED_CASES))
def test_paged_matches_reference(device, case):
    _run_paged(device, *PAGED_CASES[case])


def test_paged_empty_sequence(device):
    _run_paged(device, 4, 4, 64, F32, 1, 1, False, False, seq_lens=(0, 17))


def test_paged_pytorch_path_matches_kernel(device, monkeypatch):
    kernel = _run_paged(device, 3, 4, 64, F32, 2, 2, True, False)
    monkeypatch.setattr(tqa, "use_triton", lambda *t: False)
    ref = _run_paged(device, 3, 4, 64, F32, 2, 2, True, False)
    assert rel_err(kernel, ref) < 1e-5


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _dense_inputs(device):
    kv = make_kv(2, 2, 10, 64, 4, 4, device)
    q = torch.randn(2, 4, 1, 64, device=device)
    ke, ve = _exact(2, 2, 1, 64, F32, device)
    return q, kv, ke, ve


def _replace(kv, **kw):
    fields = dict(kv.__dict__)
    fields.update(kw)
    return CompressedKV(**fields)


BAD_DENSE = {
    "query-int": (lambda q, kv, ke, ve: ((q.long(), kv, ke, ve), {}), TypeError, "query"),
    "query-3d": (lambda q, kv, ke, ve: ((q[0], kv, ke, ve), {}), ValueError, "query"),
    "head-dim": (lambda q, kv, ke, ve: ((q[..., :32], kv, ke[..., :32], ve[..., :32]), {}), ValueError, "head_dim"),
    "hq-not-multiple": (lambda q, kv, ke, ve: ((q[:, :3], kv, ke, ve), {}), ValueError, "multiple"),
    "packed-last-dim": (
        lambda q, kv, ke, ve: ((q, _replace(kv, k_packed=kv.k_packed[..., :16]), ke, ve), {}), ValueError,
        "head_dim \\* bits / 8",
    ),
    "packed-dtype": (
        lambda q, kv, ke, ve: ((q, _replace(kv, v_packed=kv.v_packed.int()), ke, ve), {}), TypeError, "v_packed"
    ),
    "norms-shape": (
        lambda q, kv, ke, ve: ((q, _replace(kv, k_norms=kv.k_norms[:, :, :4]), ke, ve), {}), ValueError, "k_norms"
    ),
    "mean-shape": (
        lambda q, kv, ke, ve: ((q, _replace(kv, v_mean=kv.v_mean[:1]), ke, ve), {}), ValueError, "v_mean"
    ),
    "length": (lambda q, kv, ke, ve: ((q, _replace(kv, length=99), ke, ve), {}), ValueError, "length"),
    "exact-dtype": (lambda q, kv, ke, ve: ((q, kv, ke.half(), ve.half()), {}), TypeError, "key_exact"),
    "exact-shape": (lambda q, kv, ke, ve: ((q, kv, ke[:, :1], ve[:, :1]), {}), ValueError, "key_exact"),
    "exact-one-none": (lambda q, kv, ke, ve: ((q, kv, ke, None), {}), ValueError, "both"),
    "mask-shape": (
        lambda q, kv, ke, ve: ((q, kv, ke, ve), {"attention_mask": torch.ones(2, 1, 1, 5, dtype=torch.bool)}),
        ValueError, "attention_mask",
    ),
    "mask-dtype": (
        lambda q, kv, ke, ve: ((q, kv, ke, ve), {"attention_mask": torch.ones(2, 1, 1, 11, dtype=torch.int32)}),
        TypeError, "attention_mask",
    ),
    "out-shape": (lambda q, kv, ke, ve: ((q, kv, ke, ve), {"out": torch.empty(2, 4, 1, 64)}), ValueError, "out"),
    "out-dtype": (
        lambda q, kv, ke, ve: ((q, kv, ke, ve), {"out": torch.empty(2, 1, 4, 64, dtype=F16)}), TypeError, "out"
    ),
    "kv-type": (lambda q, kv, ke, ve: ((q, object(), ke, ve), {}), TypeError, "CompressedKV"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DENSE), ids=list(BAD_DENSE))
def test_dense_bad_inputs_raise(device, case):
    make, exc, match = BAD_DENSE[case]
    args, kw = make(*_dense_inputs(device))
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(exc, match=match):
        tq_attention(*args, **kw)


@pytest.mark.parametrize("sq", [1, 5])
def test_interleaved_norms_match_separate(device, sq):
    """The cache's [.., capacity, 2] norm store (one 32-bit load for a token's key and value norm) gives exactly
    what separate norm tensors give; a misaligned or float32 pair falls back to separate loads."""
    kv = make_kv(2, 2, 37, 64, 4, 3, device, seed=4)
    pair = torch.stack([kv.k_norms, kv.v_norms], dim=-1)
    paired = _replace(kv, k_norms=pair[..., 0], v_norms=pair[..., 1])
    assert tqa._paired_norms(paired.k_norms, paired.v_norms)
    assert not tqa._paired_norms(kv.k_norms, kv.v_norms)
    assert not tqa._paired_norms(pair[..., 1], pair[..., 0])  # value first: not the layout
    q = torch.randn(2, 8, sq, 64, generator=_gen(5)).to(device)
    ke, ve = _exact(2, 2, 3, 64, torch.float32, device)
    want = tq_attention(q, kv, ke, ve, causal=True)
    got = torch.full_like(want, float("nan"))
    tq_attention(q, paired, ke, ve, causal=True, out=got)
    assert torch.equal(got, want)


def test_paged_bad_inputs_raise(device):
    c = _codecs(64, 4, 4, device)
    q = torch.randn(2, 4, 1, 64, device=device)
    kp = torch.zeros(6, 2, 16, 32, dtype=torch.uint8, device=device)
    kn = torch.zeros(6, 2, 16, device=device, dtype=NORM_DTYPE)
    bt = torch.zeros(2, 3, dtype=torch.int32, device=device)
    sl = torch.tensor([3, 4], dtype=torch.int32, device=device)
    m = torch.zeros(2, 2, 64, device=device)
    tq_attention_paged(q, kp, kn, kp, kn, bt, sl, m, m, c)  # valid
    with pytest.raises(TypeError, match="block_table"):
        tq_attention_paged(q, kp, kn, kp, kn, bt.long(), sl, m, m, c)
    with pytest.raises(ValueError, match="seq_lens"):
        tq_attention_paged(q, kp, kn, kp, kn, bt, sl[:1], m, m, c)
    with pytest.raises(ValueError, match="k_mean"):
        tq_attention_paged(q, kp, kn, kp, kn, bt, sl, m[:, :1], m, c)
    with pytest.raises(ValueError, match="v_packed"):
        tq_attention_paged(q, kp, kn, kp[..., :16], kn, bt, sl, m, m, c)
    with pytest.raises(ValueError, match="head_dim"):
        tq_attention_paged(q, kp, kn, kp, kn, bt, sl, m, m, _codecs(128, 4, 4, device))
    with pytest.raises(TypeError, match="codecs"):
        tq_attention_paged(q, kp, kn, kp, kn, bt, sl, m, m, None)
    with pytest.raises(TypeError, match="k_norms"):  # float32 norms: not the layout (bfloat16)
        tq_attention_paged(q, kp, kn.float(), kp, kn, bt, sl, m, m, c)


# --------------------------------------------------------------------------------------------------
# Compiled-mode check without a GPU: the interpreter misses errors of Triton's compiled frontend
# (e.g. scf.if type mismatches) and register spills; compile the kernels for sm_90 in a subprocess.
# --------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", 90, 32))
except Exception as e:
    print("SKIP", type(e).__name__, e); sys.exit(0)
import turboquant_vllm.kernels.tq_attention as A
import turboquant_vllm.kernels.tq_compress as C
from turboquant_vllm.layout import Codecs, KVLayout

def compile_call(fn, args, kwargs):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    try:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, options = binder(*args, **kwargs, **opts)
        options, sig, constexprs, attrs = fn._pack_args(backend, dict(kwargs, **opts), bound, spec, options)
    except (AttributeError, TypeError) as e:  # Triton internals moved: not this test's business
        print("SKIP", type(e).__name__, e); sys.exit(0)
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=backend.target, options=options.__dict__)
    print("OK", fn.__name__, "subtile" if kwargs.get("SUBTILE") else "-", "shared", k.metadata.shared, resources(k))

def resources(k):  # 'regs N spill_bytes M' from Triton's bundled cuobjdump, or '' where it is missing
    import re, subprocess, tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"]); f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out, re.S)
    return f"regs {m.group(1)} spill_bytes {m.group(2)}" if m else ""

class Capture:
    def __init__(self, fn, tuned=False):
        self.fn, self.tuned = fn, tuned
    def __getitem__(self, grid):
        def call(*args, **kwargs):
            if self.tuned:  # one config the autotuner would try: (64, 4 or 8 warps, 2 stages) if not pruned
                keep = A._prune_attn_configs(A._ATTN_CONFIGS, {"q_ptr": args[0]}, **kwargs)
                pref = [c for w in (4, 8) for c in keep
                        if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == (64, w, 2)]
                cfg = (pref or keep)[0]
                kwargs = dict(kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            compile_call(self.fn, list(args), kwargs)
        return call

A.interpreting = C.interpreting = lambda: False
A._num_sms = lambda i: 132
A._pdl_on = lambda dev: True  # decode as programmatic dependent launches (griddepcontrol PTX)
C.use_triton = lambda *t: True
C._quantize_asm = lambda b, bits: C._cell_table_asm(b.tolist()) if bits <= 4 else ""  # the GPU's quantizer PTX
attn = A._tq_attn_kernel
A._tq_reduce_kernel = Capture(A._tq_reduce_kernel)
A._tq_qrot_kernel = Capture(A._tq_qrot_kernel)
A._tuned_attn_kernel = lambda: Capture(attn, tuned=True)
A._tq_attn_kernel = Capture(attn)  # the decode sub-tile path launches with a fixed config
C._tq_compress_kernel = Capture(C._tq_compress_kernel)
import turboquant_vllm.kernels._launch as L
L.ENABLED = False  # the Launchers hand every launch to the captures
A._QROT.fn, A._ATTN.fn, A._REDUCE.fn = A._tq_qrot_kernel, A._tq_attn_kernel, A._tq_reduce_kernel
C._COMPRESS.fn = C._tq_compress_kernel
for b, hq, hkv, sq, n, se, d, kb, vb, dt, causal, paged, mask in [
    (1, 32, 8, 1, 4096, 1, 128, 4, 4, torch.float16, False, False, torch.zeros(1, 1, 1, 4097)),  # decode, sub-tile
    (2, 28, 4, 4, 512, 4, 96, 3, 2, torch.bfloat16, True, True, None),
    (1, 8, 2, 40, 512, 40, 64, 2, 4, torch.float32, True, False, torch.zeros(1, 1, 40, 552)),
    (4, 32, 8, 1, 512, 1, 128, 4, 4, torch.bfloat16, True, False, None),  # sub-tile again, bf16, causal
    (16, 32, 8, 1, 256, 0, 128, 4, 4, torch.float16, False, False, None),  # 512 rows: 16-row reduction (tl.dot)
    (2, 32, 8, 1, 512, 1, 128, 8, 4, torch.float16, False, False, None),  # 8-bit keys (the policies' layer 0)
]:
    c = Codecs.build(KVLayout(d, kb, vb))
    q = torch.randn(b, hq, sq, d).to(dt)
    kp = torch.zeros(b, hkv, n, d * kb // 8, dtype=torch.uint8)
    vp = torch.zeros(b, hkv, n, d * vb // 8, dtype=torch.uint8)
    nrm, m = torch.zeros(b, hkv, n, 2, dtype=torch.bfloat16), torch.zeros(b, hkv, d)
    kn, vn = nrm[..., 0], nrm[..., 1]  # the cache's interleaved norms: one 32-bit load per token
    assert A._paired_norms(kn, vn)
    ke = torch.randn(b, hkv, se, d).to(dt)
    A._launch(q, paged=paged, kp=kp, kn=kn, vp=vp, vn=vn, k_mean=m, v_mean=m, codecs=c, n_comp=n,
              block_table=torch.zeros(b, 4, dtype=torch.int32), seq_lens=torch.zeros(b, dtype=torch.int32),
              max_tokens=n, key_exact=ke, value_exact=ke, mask=None if mask is None else mask.expand(b, hq, sq, n + se),
              causal=causal, causal_comp=causal and not paged, scale=None, out=None, num_kv_splits=None)
    C.tq_compress(q[:, :hkv], m, c.rotation, c.k_boundaries, kb, kp, kn, 0)
c = Codecs.build(KVLayout(128, 4, 3))  # keys and values in one launch, device offsets (the decode step's form)
x = torch.randn(2, 8, 1, 128).half()
kp, vp = torch.zeros(2, 8, 16, 64, dtype=torch.uint8), torch.zeros(2, 8, 16, 48, dtype=torch.uint8)
kn, m = torch.zeros(2, 8, 16, dtype=torch.bfloat16), torch.zeros(2, 8, 128)
C.tq_compress_kv(x, x, m, m, c.rotation, c.k_boundaries, c.v_boundaries, 4, 3, kp, kn, vp, kn.clone(),
                 torch.zeros(2, dtype=torch.int32))
"""


def test_kernels_compile_for_sm90(device):
    """Compile every kernel variant class for sm_90 (no GPU needed); skipped on CUDA (real runs compile)."""
    import os
    import subprocess
    import sys

    if device == "cuda":
        pytest.skip("the CUDA tests compile the kernels for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode == 0 and "SKIP" in r.stdout:
        pytest.skip(r.stdout.strip()[-300:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("OK _tq_attn_kernel") == 6 and r.stdout.count("OK _tq_compress_kernel") == 7, r.stdout
    assert r.stdout.count("OK _tq_reduce_kernel") == 6 and r.stdout.count("OK _tq_qrot_kernel") == 6, r.stdout
    # No spills, except in the one-warp sub-tile decode programs (cases 1, 4, 5): they keep 8 query sub-tiles,
    # 8 accumulators and two packed tiles in 255 registers, and the compiler may spill a little, mostly outside
    # the loop (Triton 3.6: 0-8 B; Triton 3.9: up to ~1 KB). Their speed was measured with them.
    lines = [line for line in r.stdout.splitlines() if "spill_bytes" in line]
    assert sum(" subtile " in line for line in lines) == 4, r.stdout
    spills = [line for line in lines if not line.endswith("spill_bytes 0") and " subtile " not in line]
    assert not spills, "register spills on sm_90:\n" + "\n".join(spills)
    for line in lines:
        if " subtile " in line:
            assert int(line.rsplit(" ", 1)[1]) <= 1024, f"a sub-tile decode program spills more than 1 KB: {line}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_table_asm_holds_the_codebook(dtype, bits):
    """The GPU lookup's PTX (GATHER 2) selects entry laneid mod 2**bits from immediates: they must be the codebook
    in the compute dtype, in order, and the shuffle must read lane $1."""
    import re

    from turboquant_vllm.kernels.tq_attention import _table_asm

    values = torch.randn(1 << bits).sort().values
    asm = _table_asm(values.tolist(), dtype)
    first = int(re.search(r"mov\.b32 tqt, (0x[0-9A-F]{8});", asm).group(1), 16)
    rest = [int(x, 16) for x in re.findall(r"selp\.b32 tqt, (0x[0-9A-F]{8}), tqt, tqp;", asm)]
    lanes = [int(x) for x in re.findall(r"setp\.eq\.u32 tqp, tql, (\d+);", asm)]
    assert lanes == list(range(1, 1 << bits))
    assert f"and.b32 tql, tql, {(1 << bits) - 1};" in asm and "shfl.sync.idx.b32" in asm and ", $1, 0x1f, -1;" in asm
    raw = torch.tensor([first, *rest], dtype=torch.int64)
    signed = raw - (raw >= 2 ** (8 * dtype.itemsize - 1)).long() * 2 ** (8 * dtype.itemsize)
    got = signed.to(torch.int16 if dtype.itemsize == 2 else torch.int32).view(dtype)
    assert torch.equal(got, values.to(dtype))


@pytest.mark.parametrize("one_round", [True, False])
def test_reduce_one_round_and_looped_agree(device, monkeypatch, one_round):
    """The reduction's one-round path (every load issued before any math) and its looped path give the same
    attention, with compressed and exact splits, masks and several splits per row."""
    plan = tqa._reduce_plan

    def forced(ns_c, ns, out_rows, hdp, interp):
        r, nsb, bk, bc, w, _, nse = plan(ns_c, ns, out_rows, hdp, interp)
        return min(r, 8), nsb, bk, bc, w, one_round, nse

    monkeypatch.setattr(tqa, "_reduce_plan", forced)
    b, hq, hkv, sq, nc, se, d = 2, 8, 2, 1, 70, 5, 64
    mask = torch.rand(b, 1, 1, nc + se, generator=_gen(11)) > 0.2
    mask[..., -1] = True
    err = _run_dense(device, b, hq, hkv, sq, nc, se, d, 4, 3, False, F32, mask=mask.to(device), num_kv_splits=5)
    assert err < 1e-4
    err = _run_dense(device, b, hq, hkv, 2, nc, 40, d, 3, 4, True, F32, num_kv_splits=3)  # several exact splits
    assert err < 1e-4


@pytest.mark.parametrize("tiles", [(64, 16, 1), (32, 32, 2), (128, 32, 4)])
def test_reduce_gpu_tiles(device, monkeypatch, tiles):
    """The one-row-a-program tilings the GPU picks at B = 1 (K step, column block, warps: several column programs
    per row, K in steps) merge and rotate back like the interpreter's whole-row plan; head_dim 96 leaves a
    partial column block and padded K."""
    plan = tqa._reduce_plan
    block_k, block_c, warps = tiles

    def forced(ns_c, ns, out_rows, hdp, interp):
        _, nsb, _, _, _, one, nse = plan(ns_c, ns, out_rows, hdp, interp)
        return 1, nsb, min(block_k, hdp), min(block_c, hdp), warps, one, nse

    monkeypatch.setattr(tqa, "_reduce_plan", forced)
    err = _run_dense(device, 1, 8, 2, 1, 90, 1, 96, 4, 4, False, F32, num_kv_splits=6)
    assert err < 1e-4
