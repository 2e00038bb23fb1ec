"""Triton flash-attention forward against the float32 reference and torch SDPA.

On CPU the kernel runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are tiny. Inputs are fresh random tensors in every test; outputs are poisoned with NaN where
the caller provides them.

Tolerances (relative Frobenius error against the float32 reference): float32 accumulates in float32
throughout, so 1e-5 (observed ~2e-7). For float16 the standard is "within 2-3x of plain PyTorch
float16 SDPA's own error against the float32 reference"; SDPA's error is dominated by rounding the
float16 output and P (~2.5e-4), so 2e-3 leaves about 8x margin and test_matches_torch_sdpa checks
the 3x ratio directly. bfloat16 has 8x coarser rounding: 1.6e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import turboquant_vllm.kernels.flash_attention as fa_mod
from tests.helpers import rel_err
from turboquant_vllm.core.kvcodec import attention_reference, sdpa
from turboquant_vllm.kernels.flash_attention import flash_attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float16, torch.float32]


def _qkv(b, hq, hkv, sq, skv, d, dtype, device):
    q = torch.randn(b, hq, sq, d, device=device).to(dtype)
    k = torch.randn(b, hkv, skv, d, device=device).to(dtype)
    v = torch.randn(b, hkv, skv, d, device=device).to(dtype)
    return q, k, v


def _scores(q, k, mask=None, causal=False, scale=None):
    """float32 [B, Hq, Sq, Skv] scaled, masked scores (for logsumexp checks)."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.float().repeat_interleave(hq // hkv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ kk.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    if causal:
        sq, skv = s.shape[-2:]
        i = torch.arange(sq, device=q.device).view(-1, 1)
        j = torch.arange(skv, device=q.device).view(1, -1)
        s = s.masked_fill(j > i + (skv - sq), float("-inf"))
    return s


def _left_padding_mask(b, skv, device):
    """bool [B, 1, 1, Skv]: row i of the batch has i * 5 + 3 leading pad keys."""
    pads = torch.tensor([i * 5 + 3 for i in range(b)], device=device)
    return (torch.arange(skv, device=device)[None, :] >= pads[:, None])[:, None, None, :]


def _check(out, ref, dtype, what=""):
    assert out.shape == ref.shape, what
    err = rel_err(out.float(), ref)
    assert err <= TOL[dtype], f"{what}: rel err {err:.2e} > {TOL[dtype]:.0e}"


# (B, Hq, Hkv, Sq, Skv, D, causal). G * Sq > 128 rows runs the prefill configuration (several row
# blocks, no KV split); smaller row counts run the decode one (all group heads in one tile, KV split).
CASES = {
    "prefill": (2, 4, 1, 37, 37, 64, False),
    "prefill_causal_gqa7": (1, 7, 1, 37, 37, 64, True),
    "prefill_causal_mha": (2, 2, 2, 37, 37, 64, True),
    "causal_gqa9_3": (1, 9, 3, 37, 37, 64, True),
    "chunk_causal_bottom_right": (1, 8, 2, 3, 70, 64, True),
    "decode": (2, 8, 2, 1, 53, 64, False),
    "decode_causal_gqa7": (1, 7, 1, 1, 53, 64, True),
    "more_queries_than_keys_causal": (1, 2, 1, 20, 8, 64, True),  # first 12 rows see no key
    "prefill_causal_offset1": (1, 2, 2, 130, 131, 64, True),  # diagonal ends one key past a block edge
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES), ids=str)
def test_matches_reference(case, dtype, device):
    b, hq, hkv, sq, skv, d, causal = CASES[case]
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, dtype, device)
    out = flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == (b, sq, hq, d)
    _check(out, attention_reference(q, k, v, causal=causal), dtype, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 96, 128, 256, 40])
def test_head_dims(d, dtype, device):
    # 96 and 40 exercise the padded (masked) head-dim tile; prefill- and decode-shaped calls.
    q, k, v = _qkv(1, 4, 1, 37, 41, d, dtype, device)
    _check(flash_attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True), dtype, "prefill")
    q, k, v = _qkv(2, 4, 2, 1, 45, d, dtype, device)
    _check(flash_attention(q, k, v), attention_reference(q, k, v), dtype, "decode")


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1), (7, 1), (9, 3)])
def test_gqa_ratios(hq, hkv, device):
    q, k, v = _qkv(2, hq, hkv, 19, 33, 64, torch.float16, device)
    _check(flash_attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq", [37, 1])
def test_bool_padding_mask(sq, dtype, device):
    b, hq, hkv, skv, d = 2, 4, 2, 37 if sq > 1 else 60, 64
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, dtype, device)
    mask = _left_padding_mask(b, skv, device)
    _check(flash_attention(q, k, v, attention_mask=mask), attention_reference(q, k, v, mask), dtype, "mask")
    # Padding mask together with causal, as transformers prefill does with left padding: the query rows
    # at pad positions see no key at all and must give zeros.
    out = flash_attention(q, k, v, attention_mask=mask, causal=True)
    _check(out, attention_reference(q, k, v, mask, causal=True), dtype, "mask+causal")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,skv", [(37, 37), (1, 50)])
def test_additive_mask(sq, skv, dtype, device):
    b, hq, hkv, d = 2, 4, 2, 64
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, dtype, device)
    # Full-shape additive mask: random finite biases, some -inf and some finfo.min entries (as transformers).
    mask = torch.randn(b, hq, sq, skv, device=device)
    mask[torch.rand_like(mask) < 0.2] = float("-inf")
    mask[torch.rand_like(mask) < 0.1] = torch.finfo(dtype).min
    mask[..., -1] = 0.0  # keep one key per row
    mask = mask.to(dtype)
    _check(flash_attention(q, k, v, attention_mask=mask), attention_reference(q, k, v, mask), dtype, "additive")
    # Broadcast dims (stride 0): [B, 1, Sq, Skv] in float32 with a float16 query.
    mask2 = torch.where(_left_padding_mask(b, skv, device), 0.0, float("-inf")).expand(b, 1, sq, skv).clone()
    out = flash_attention(q, k, v, attention_mask=mask2, causal=True)
    _check(out, attention_reference(q, k, v, mask2, causal=True), dtype, "broadcast additive")
    # transformers' float32 masks use finfo(float32).min: a row of only such biases is not "fully masked"
    # for the reference (uniform softmax), and must not overflow to -inf in the kernel either.
    mask3 = torch.zeros(b, 1, sq, skv, device=device)
    mask3[0, :, 0] = torch.finfo(torch.float32).min
    out = flash_attention(q, k, v, attention_mask=mask3)
    _check(out, attention_reference(q, k, v, mask3), dtype, "finfo.min row")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 1, 37, 37), (2, 8, 2, 1, 53), (1, 2, 1, 20, 8)], ids=str)
def test_return_lse(shape, dtype, device):
    b, hq, hkv, sq, skv = shape
    q, k, v = _qkv(b, hq, hkv, sq, skv, 64, dtype, device)
    mask = torch.rand(b, 1, sq, skv, device=device) > 0.3
    mask[0, 0, sq // 2] = False  # one fully masked query row
    out, lse = flash_attention(q, k, v, attention_mask=mask, causal=True, scale=0.3, return_lse=True)
    _check(out, attention_reference(q, k, v, mask, causal=True, scale=0.3), dtype, "out")
    ref_lse = torch.logsumexp(_scores(q, k, mask, causal=True, scale=0.3), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, sq)
    empty = ref_lse == float("-inf")
    assert empty.any()
    assert torch.equal(lse == float("-inf"), empty)
    assert not torch.isnan(lse).any()
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-4)


@pytest.mark.parametrize("sq,skv", [(37, 37), (1, 40)])
def test_fully_masked_rows_are_zero(sq, skv, device):
    b, hq, hkv, d = 2, 4, 2, 64
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, torch.float16, device)
    mask = torch.rand(b, hq, sq, skv, device=device) > 0.5
    mask[1] = False  # whole batch entry masked
    mask[0, 1, 0] = False  # one row
    out, lse = flash_attention(q, k, v, attention_mask=mask, return_lse=True)
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0) and torch.all(out[0, 0, 1] == 0)
    assert torch.all(lse[1] == float("-inf")) and lse[0, 1, 0] == float("-inf")
    _check(out, attention_reference(q, k, v, mask), torch.float16)
    # Additive all -inf rows behave the same.
    add = torch.zeros(b, 1, 1, skv, device=device)
    add[1] = float("-inf")
    out = flash_attention(q, k, v, attention_mask=add.half())
    assert not torch.isnan(out).any() and torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq", [37, 1])
def test_out_param_and_strided_inputs(sq, dtype, device):
    b, hq, hkv, skv, d = 2, 4, 2, 45, 64
    # transformers-style views: [B, S, H, D] storage transposed to [B, H, S, D]; K from a fused buffer.
    q = torch.randn(b, sq, hq, d, device=device).to(dtype).transpose(1, 2)
    kv = torch.randn(b, skv, 2 * hkv, d + 8, device=device).to(dtype)
    k = kv[:, :, :hkv, :d].transpose(1, 2)
    v = kv[:, :, hkv:, 8:].transpose(1, 2)
    assert not (k.is_contiguous() or v.is_contiguous())
    # Preallocated output poisoned with NaN, itself a strided view: every element must be written.
    buf = torch.full((b, sq, hq, 2 * d), float("nan"), device=device, dtype=dtype)
    out = buf[..., :d]
    res = flash_attention(q, k, v, causal=True, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "some output elements were not written"
    assert torch.isnan(buf[..., d:]).all(), "wrote outside out"
    _check(out, attention_reference(q, k, v, causal=True), dtype)


@pytest.mark.parametrize("sq", [2, 37])
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_split_kv(splits, sq, device):
    """Flash-decoding: KV length split over programs, partials merged by their log-sum-exps."""
    b, hq, hkv, skv, d = 2, 8, 2, 77, 64
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, torch.float16, device)
    mask = _left_padding_mask(b, skv, device)
    out = torch.full((b, sq, hq, d), float("nan"), device=device, dtype=torch.float16)
    out, lse = fa_mod._forward(q, k, v, mask, True, None, True, out, num_splits=splits)
    _check(out, attention_reference(q, k, v, mask, causal=True), torch.float16)
    ref_lse = torch.logsumexp(_scores(q, k, mask, causal=True), dim=-1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "name,b,hq,hkv,sq,skv,causal,use_mask",
    [
        ("causal", 1, 4, 4, 37, 37, True, False),
        ("decode", 2, 4, 4, 1, 60, False, False),
        ("padding_mask", 2, 4, 4, 37, 37, False, True),
        ("gqa", 2, 8, 2, 37, 37, True, False),
    ],
)
def test_matches_torch_sdpa(name, b, hq, hkv, sq, skv, causal, use_mask, device):
    """triton_fa_forward against SDPA: same result, and fp16 error within 3x SDPA's own fp16 error."""
    q, k, v = _qkv(b, hq, hkv, sq, skv, 64, torch.float16, device)
    mask = _left_padding_mask(b, skv, device) if use_mask else None
    out = flash_attention(q, k, v, attention_mask=mask, causal=causal)
    ref16 = sdpa(q, k, v, attention_mask=mask, causal=causal)
    ref32 = attention_reference(q, k, v, mask, causal=causal)
    assert rel_err(out.float(), ref16.float()) <= TOL[torch.float16], name
    err, err_sdpa = rel_err(out.float(), ref32), rel_err(ref16.float(), ref32)
    assert err <= 3 * err_sdpa + 1e-5, f"{name}: kernel {err:.2e} vs SDPA {err_sdpa:.2e}"
    # fp32 against fp32 SDPA directly (GQA expanded for F.sdpa).
    q, k, v = (t.float() for t in (q, k, v))
    g = hq // hkv
    ref = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(g, 1),
        v.repeat_interleave(g, 1),
        attn_mask=mask,
        is_causal=causal,
    ).transpose(1, 2)
    _check(flash_attention(q, k, v, attention_mask=mask, causal=causal), ref, torch.float32, name)


def test_bfloat16(device):
    # Under the interpreter the kernel upcasts bf16 tiles to float32 (the interpreter's bf16 tl.dot is wrong),
    # so this checks the bf16 loads/stores and plumbing there, and the real bf16 MMA path on a GPU.
    q, k, v = _qkv(2, 4, 2, 37, 37, 64, torch.bfloat16, device)
    out = flash_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    _check(out, attention_reference(q, k, v, causal=True), torch.bfloat16)
    q, k, v = _qkv(1, 4, 1, 1, 50, 128, torch.bfloat16, device)
    _check(flash_attention(q, k, v), attention_reference(q, k, v), torch.bfloat16, "decode")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_pytorch_path(dtype, monkeypatch):
    """The non-Triton path (CPU without the interpreter) has the same semantics."""
    monkeypatch.setattr(fa_mod, "use_triton", lambda *t: False)
    b, hq, hkv, sq, skv, d = 2, 6, 2, 5, 23, 32
    q, k, v = _qkv(b, hq, hkv, sq, skv, d, dtype, "cpu")
    mask = torch.rand(b, 1, sq, skv) > 0.3
    mask[1, 0, 2] = False
    out = torch.full((b, sq, hq, d), float("nan"), dtype=dtype)
    res, lse = flash_attention(q, k, v, attention_mask=mask, causal=True, return_lse=True, out=out)
    assert res is out
    _check(out, attention_reference(q, k, v, mask, causal=True), dtype)
    assert torch.all(out[1, 2] == 0)
    ref_lse = torch.logsumexp(_scores(q, k, mask, causal=True), dim=-1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    add = torch.randn(1, hq, 1, skv).to(dtype)
    _check(flash_attention(q, k, v, attention_mask=add), attention_reference(q, k, v, add), dtype, "additive")


def test_empty_shapes(device):
    q, k, v = _qkv(1, 2, 1, 3, 0, 64, torch.float16, device)
    out, lse = flash_attention(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    q, k, v = _qkv(1, 2, 1, 0, 5, 64, torch.float16, device)
    assert flash_attention(q, k, v).shape == (1, 0, 2, 64)


def _bad_inputs(device):
    q, k, v = _qkv(1, 4, 2, 5, 7, 64, torch.float16, device)
    m = torch.ones(1, 1, 5, 7, dtype=torch.bool, device=device)
    return {
        "query_int": (TypeError, "query", dict(query=q.to(torch.int32))),
        "query_3d": (ValueError, "query", dict(query=q[0])),
        "key_dtype": (TypeError, "key", dict(key=k.float())),
        "value_dtype": (TypeError, "value", dict(value=v.to(torch.bfloat16))),
        "key_device": (ValueError, "key", dict(key=torch.empty(k.shape, dtype=k.dtype, device="meta"))),
        "heads_not_divisible": (
            ValueError,
            "heads",
            dict(query=torch.randn(1, 3, 5, 64, device=device).half()),
        ),
        "head_dim_mismatch": (
            ValueError,
            "head_dim",
            dict(key=torch.randn(1, 2, 7, 32, device=device).half()),
        ),
        "value_shape": (ValueError, "value", dict(value=torch.randn(1, 2, 6, 64, device=device).half())),
        "head_dim_too_big": (
            ValueError,
            "head_dim",
            dict(
                query=q.new_zeros(1, 4, 5, 512),
                key=k.new_zeros(1, 2, 7, 512),
                value=v.new_zeros(1, 2, 7, 512),
            ),
        ),
        "mask_shape": (ValueError, "attention_mask", dict(attention_mask=m.new_ones(1, 1, 5, 8))),
        "mask_heads": (ValueError, "attention_mask", dict(attention_mask=m.new_ones(1, 3, 5, 7))),
        "mask_rank": (ValueError, "attention_mask", dict(attention_mask=m[0, 0])),
        "mask_dtype": (TypeError, "attention_mask", dict(attention_mask=m.long())),
        "out_shape": (ValueError, "out", dict(out=q.new_empty(1, 4, 5, 64))),
        "out_dtype": (TypeError, "out", dict(out=q.new_empty(1, 5, 4, 64, dtype=torch.float32))),
        "not_tensor": (TypeError, "value", dict(value=[1.0])),
    }, dict(query=q, key=k, value=v)


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")[0]))
def test_bad_inputs_raise(case, device):
    cases, base = _bad_inputs(device)
    exc, name, override = cases[case]
    kwargs = {**base, **override}
    q, k, v = kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")
    with pytest.raises(exc, match=name):
        flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("scale", [-0.2, 0.0], ids=str)
def test_nonpositive_scale(scale, device):
    """A scale <= 0 takes the scaled-scores form (the unscaled form takes the row max before scaling)."""
    q, k, v = _qkv(2, 4, 2, 9, 21, 64, torch.float32, device)
    out = flash_attention(q, k, v, causal=True, scale=scale)
    _check(out, attention_reference(q, k, v, None, causal=True, scale=scale), torch.float32, f"scale {scale}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_raw_scores_form_agrees(dtype, device, monkeypatch):
    """The fused multiply-add form of the softmax (unscaled scores) and the scaled form give the same output."""
    q, k, v = _qkv(1, 4, 2, 33, 40, 64, dtype, device)
    mask = torch.rand(1, 1, 33, 40, device=device) > 0.2
    outs = []
    for raw in (True, False):
        monkeypatch.setattr(fa_mod, "RAW_SCORES", raw)
        outs.append(flash_attention(q, k, v, attention_mask=mask, causal=True).float())
    assert not torch.isnan(outs[0]).any()
    assert rel_err(outs[0], outs[1]) <= TOL[dtype] / 4
