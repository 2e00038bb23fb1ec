"""Vanilla Triton flash-attention forward (prefill and decode) with GQA, masks and log-sum-exp.

Pointers of the main kernel ``_fwd_kernel`` (every stride is in elements and passed explicitly, so
non-contiguous views work; a size-1 dimension of the mask is broadcast with stride 0):

    Q     [B, Hq,  Sq,  D]    fp16 / bf16 / fp32     strides (stride_qb, stride_qh, stride_qs, stride_qd)
    K     [B, Hkv, Skv, D]    same dtype as Q        strides (stride_kb, stride_kh, stride_ks, stride_kd)
    V     [B, Hkv, Skv, D]    same dtype as Q        strides (stride_vb, stride_vh, stride_vs, stride_vd)
    Mask  [B, Hq,  Sq,  Skv]  uint8 (bool viewed, 1 = attend) or additive float; read only when
                              MASK_KIND != 0         strides (stride_mb, stride_mh, stride_mq, stride_mk)
    Out   [NS, B, Hq, Sq, D]  one slice per KV split; strides (stride_os, stride_ob, stride_oh, stride_oq,
                              stride_od). Without splitting (NS = 1) it is the caller's [B, Sq, Hq, D] output
                              in the query dtype; with splitting a float32 workspace of normalised partials.
    Lse   [NS, B, Hq, Sq]     float32 natural-log log-sum-exp of the scaled, masked scores, per split;
                              strides (stride_ls, stride_lb, stride_lh, stride_lq); written when WRITE_LSE.

``_combine_kernel`` merges the NS partials (Part [NS, B, Hq, Sq, D] and PartLse [NS, B, Hq, Sq],
both float32) into Out [B, Sq, Hq, D] and, if asked, Lse [B, Hq, Sq].

Tiling. Query rows of one KV head are packed position-major: row r of a (batch, kv head) pair is
query position r // GROUP of query head kv_head * GROUP + r % GROUP, where GROUP = Hq / Hkv. A tile
of BLOCK_M rows therefore covers BLOCK_M / GROUP consecutive query positions for every head of the
group, so each K/V tile is read once for the whole group (GQA without repeating K/V), and for
decode (Sq = 1) the M dimension is filled by the group's heads instead of being mostly padding.
The grid is (row blocks, B * Hkv, KV splits). When row blocks x B x Hkv programs cannot fill the
GPU (decode, short chunks over a long context) the KV length is split over programs (flash-decoding)
and a second kernel combines the partials through their log-sum-exps.

Softmax is the FlashAttention-2 online softmax in float32 with exp2 (scores pre-multiplied by
scale * log2(e)). Causal masking is bottom-right aligned (query i sees keys j <= i + Skv - Sq): key
blocks entirely above the diagonal are never visited, and masks (causal, KV tail, head-dim padding)
are applied only in the boundary loop; fully visible blocks run an unmasked loop.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_tensor, interpreting, next_pow2, use_triton

__all__ = ["flash_attention"]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
# Row counts (GROUP * Sq) up to this use the decode configuration: one row block per (batch, kv head),
# BLOCK_M fitted to the rows, only BLOCK_N / warps / stages autotuned.
_DECODE_MAX_ROWS = 128
# Scores kept unscaled, scale and max subtraction one multiply-add (_attn_loop): causal 4K 0.307 vs 0.322 ms, 16K
# even (H100 2026-11-26, prefill_raw_scores). False: the scaled form (A/B runs)
RAW_SCORES = True

_MASK_NONE, _MASK_BOOL, _MASK_ADD = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv(ptrs, cols, Skv, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BOUNDARY: tl.constexpr):
    """Load a [BLOCK_N, BLOCK_D] K or V tile; masks only where the tile can leave the tensor."""
    if BOUNDARY:
        if EVEN_D:
            tile = tl.load(ptrs, mask=cols[:, None] < Skv, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(cols[:, None] < Skv) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _attn_loop(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    mask_rows,
    pos,
    row_valid,
    lo,
    hi,
    Skv,
    causal_offset,
    qk_scale,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    stride_mk,
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BOUNDARY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    RAW_SCORES: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi). BOUNDARY = the blocks may cross the causal diagonal
    or the end of the keys, so bounds and causal masks are applied; otherwise every key is visible.
    RAW_SCORES (qk_scale > 0, no additive mask): the scores stay unscaled, the row max is scaled once per row
    and each score's scale and max subtraction are one fused multiply-add before exp2 (m_i, l_i in log2 units
    either way)."""
    # Scores can be -inf for a whole row only when something masks them.
    CAN_BE_EMPTY: tl.constexpr = BOUNDARY or (MASK_KIND != 0)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_kv(
            k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
            cols,
            Skv,
            offs_d,
            HEAD_DIM,
            EVEN_D,
            BOUNDARY,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if not RAW_SCORES:
            s = s * qk_scale  # log2 units

        if MASK_KIND != 0:
            m_ptrs = mask_rows[:, None] + cols[None, :] * stride_mk
            if BOUNDARY:
                m_ok = row_valid[:, None] & (cols[None, :] < Skv)
            else:
                m_ok = row_valid[:, None]
            if MASK_KIND == 1:
                attend = tl.load(m_ptrs, mask=m_ok, other=0)
                s = tl.where(attend != 0, s, float("-inf"))
            else:
                bias = tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
                # finfo(float32).min * log2(e) would overflow to -inf (turning transformers' "masked"
                # rows into fully masked ones): clamp finite biases first, keep true -inf.
                bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2e38))
                s += bias * 1.4426950408889634
        if BOUNDARY:
            keep = cols[None, :] < Skv
            if CAUSAL:
                keep = keep & (cols[None, :] <= pos[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))

        if RAW_SCORES:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if CAN_BE_EMPTY:
            # A row that has seen only masked keys keeps m = -inf; subtract 0 instead so that
            # exp2(-inf - m) = 0 rather than NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if RAW_SCORES:
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        else:
            p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v = _load_kv(
            v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            cols,
            Skv,
            offs_d,
            HEAD_DIM,
            EVEN_D,
            BOUNDARY,
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    stride_os,
    stride_ob,
    stride_oh,
    stride_oq,
    stride_od,
    stride_ls,
    stride_lb,
    stride_lh,
    stride_lq,
    Sq,
    Skv,
    HKV,
    causal_offset,
    keys_per_split,
    qk_scale,
    tune_bucket,  # unused in the kernel: a coarse size bucket that keys the autotuner cache
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    RAW_SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Heavier causal row blocks (later query positions) are scheduled first.
    if CAUSAL:
        start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m // GROUP  # query position of each row
    head = kvh * GROUP + (offs_m % GROUP)  # query head of each row (int64)
    row_valid = pos < Sq
    d_valid = offs_d < HEAD_DIM

    # Q tile [BLOCK_M, BLOCK_D], read once.
    q_ptrs = Q + (b * stride_qb + head * stride_qh + pos.to(tl.int64) * stride_qs)[:, None]
    q_ptrs += offs_d[None, :] * stride_qd
    if EVEN_D:
        q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_rows = Mask + (b * stride_mb + head * stride_mh + pos.to(tl.int64) * stride_mq)

    # Key range of this program: its split, cut at the causal diagonal of the block's last row.
    pos_lo = (start_m * BLOCK_M) // GROUP
    pos_hi = tl.minimum((start_m * BLOCK_M + BLOCK_M - 1) // GROUP, Sq - 1)
    if CAUSAL:
        n_end = tl.minimum(Skv, pos_hi + causal_offset + 1)
        n_visible = tl.minimum(Skv, pos_lo + causal_offset + 1)  # keys below this are seen by every row
    else:
        n_end = Skv
        n_visible = Skv
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_end)
    full_hi = lo + (tl.maximum(tl.minimum(hi, n_visible) - lo, 0) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Blocks every row sees entirely: no bounds or causal masks.
    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, k_base, v_base, mask_rows, pos, row_valid, lo, full_hi, Skv, causal_offset,
        qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, stride_mk, offs_n, offs_d,
        HEAD_DIM, BLOCK_N, EVEN_D, CAUSAL, MASK_KIND, False, DOT_PRECISION, UPCAST,
        RAW_SCORES,
    )  # fmt: skip
    # Diagonal blocks and the partial last block.
    acc, l_i, m_i = _attn_loop(
        acc, l_i, m_i, q, k_base, v_base, mask_rows, pos, row_valid, full_hi, hi, Skv, causal_offset,
        qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, stride_mk, offs_n, offs_d,
        HEAD_DIM, BLOCK_N, EVEN_D, CAUSAL, MASK_KIND, True, DOT_PRECISION, UPCAST,
        RAW_SCORES,
    )  # fmt: skip

    # Rows that saw no key (all masked, or an empty split) have l = 0 and acc = 0: output 0, lse -inf.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    pos64 = pos.to(tl.int64)
    o_rows = split * stride_os + b * stride_ob + head * stride_oh + pos64 * stride_oq
    o_ptrs = Out + o_rows[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    if WRITE_LSE:
        lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453  # natural log
        lse = tl.where(empty, float("-inf"), lse)
        l_ptrs = Lse + split * stride_ls + b * stride_lb + head * stride_lh + pos64 * stride_lq
        tl.store(l_ptrs, lse, mask=row_valid)


@triton.jit
def _combine_kernel(
    Part,
    PartLse,
    Out,
    Lse,
    num_splits,
    Sq,
    HQ,
    stride_ps,
    stride_pb,
    stride_ph,
    stride_pq,
    stride_pd,
    stride_pls,
    stride_plb,
    stride_plh,
    stride_plq,
    stride_ob,
    stride_oq,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """One program per (batch, q head, query position): out = sum_s w_s o_s, w_s = softmax_s(lse_s)."""
    row = tl.program_id(0)
    qpos = (row % Sq).to(tl.int64)
    h = ((row // Sq) % HQ).to(tl.int64)
    b = (row // (Sq * HQ)).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits

    lse = tl.load(
        PartLse + offs_s * stride_pls + b * stride_plb + h * stride_plh + qpos * stride_plq,
        mask=s_valid,
        other=float("-inf"),
    )
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w = tl.exp(lse - lse_max)  # empty splits (lse = -inf) weigh 0
    total = tl.sum(w, 0)
    p_ptrs = Part + (b * stride_pb + h * stride_ph + qpos * stride_pq)
    p_ptrs = p_ptrs + offs_s[:, None] * stride_ps + offs_d[None, :] * stride_pd
    parts = tl.load(p_ptrs, mask=s_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_ptrs = Out + b * stride_ob + qpos * stride_oq + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        lse_out = tl.where(total == 0.0, float("-inf"), lse_max + tl.log(tl.where(total == 0.0, 1.0, total)))
        tl.store(Lse + b * stride_lb + h * stride_lh + qpos * stride_lq, lse_out)


# --------------------------------------------------------------------------------------------------
# Autotuning (GPU only; the interpreter runs one fixed config)
# --------------------------------------------------------------------------------------------------


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit in shared memory / registers for large head dims."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = []
    for c in configs:
        bm = c.kwargs.get("BLOCK_M", kwargs.get("BLOCK_M", 64))
        bn = c.kwargs["BLOCK_N"]
        if block_d >= 256 and (bn > 64 or c.num_stages > 2 or (bm > 64 and c.num_warps < 8)):
            continue
        kept.append(c)
    return kept or configs[:1]


_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3),
        (128, 64, 8, 3),
        (128, 128, 8, 3),
        (128, 128, 8, 2),
        (128, 64, 8, 2),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (64, 64, 4, 2),
        (64, 32, 4, 2),
    ]
]
# Decode: BLOCK_M is chosen by the launcher from the row count (GROUP * Sq).
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [
        (64, 4, 2),
        (64, 4, 3),
        (128, 4, 2),
        (128, 4, 3),
        (128, 8, 3),
        (32, 4, 4),
        (64, 2, 4),
    ]
]
_TUNE_KEY = ["BLOCK_D", "GROUP", "CAUSAL", "MASK_KIND", "WRITE_LSE", "tune_bucket"]
_PRUNE = {"early_config_prune": _prune}
_fwd_prefill = triton.autotune(_PREFILL_CONFIGS, key=_TUNE_KEY, prune_configs_by=_PRUNE)(_fwd_kernel)
_DECODE_KEY = [*_TUNE_KEY, "BLOCK_M"]
_fwd_decode = triton.autotune(_DECODE_CONFIGS, key=_DECODE_KEY, prune_configs_by=_PRUNE)(_fwd_kernel)

# The interpreter cannot autotune (and is slow): one small deterministic config.
_INTERP_BLOCK_M = 32
_INTERP_BLOCK_N = 16


# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def _validate(query, key, value, attention_mask, scale, out) -> None:
    check_tensor(query, "query", ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(key, "key", ndim=4, dtypes=FLOAT_DTYPES, device=query.device)
    check_tensor(value, "value", ndim=4, dtypes=FLOAT_DTYPES, device=query.device)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have the query dtype {query.dtype}, got {t.dtype}")
    b, hq, sq, d = query.shape
    bk, hkv, skv, dk = key.shape
    if bk != b:
        raise ValueError(f"key batch size must equal query batch size {b}, got {bk}")
    if dk != d:
        raise ValueError(f"key head_dim must equal query head_dim {d}, got {dk}")
    if tuple(value.shape) != tuple(key.shape):
        raise ValueError(f"value must have the key shape {tuple(key.shape)}, got {tuple(value.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads, got {hkv} kv heads")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask", ndim=4, device=query.device)
        if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
            raise TypeError(f"attention_mask must be bool or floating point, got {attention_mask.dtype}")
        target = (b, hq, sq, skv)
        if any(m not in (1, t) for m, t in zip(attention_mask.shape, target, strict=True)):
            raise ValueError(
                f"attention_mask shape must be broadcastable to [B, Hq, Sq, Skv] = {list(target)}, "
                f"got {list(attention_mask.shape)}"
            )
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if out is not None:
        check_tensor(out, "out", ndim=4, dtypes=(query.dtype,), device=query.device)
        if tuple(out.shape) != (b, sq, hq, d):
            raise ValueError(f"out must have shape [B, Sq, Hq, D] = {[b, sq, hq, d]}, got {list(out.shape)}")


def _torch_forward(query, key, value, attention_mask, causal, scale, want_lse):
    """Float32 PyTorch path (CPU without the interpreter): GQA by broadcasting, not repeating."""
    b, hq, sq, d = query.shape
    hkv, skv = key.shape[1], key.shape[2]
    g = hq // hkv
    q = query.float().reshape(b, hkv, g, sq, d)
    k = key.float().unsqueeze(2)
    v = value.float().unsqueeze(2)
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, Hkv, G, Sq, Skv]
    if attention_mask is not None:
        m = attention_mask.expand(b, hq, sq, skv).reshape(b, hkv, g, sq, skv)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    if causal:
        i = torch.arange(sq, device=query.device).view(-1, 1)
        j = torch.arange(skv, device=query.device).view(1, -1)
        scores = scores.masked_fill(j > i + (skv - sq), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with every key masked
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    o = (probs @ v).reshape(b, hq, sq, d).transpose(1, 2)
    return o, (lse.reshape(b, hq, sq) if want_lse else None)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(programs: int, skv: int, device: torch.device) -> int:
    """KV splits so that (row blocks x batch x kv heads x splits) programs fill the GPU about twice."""
    if device.type == "cuda":
        sms, min_keys = _sm_count(device), 512
    else:  # interpreter: small numbers so that tiny test shapes exercise the split path
        sms, min_keys = 4, 2 * _INTERP_BLOCK_N
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(skv, min_keys), 256))


def _forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    return_lse: bool,
    out: torch.Tensor | None,
    num_splits: int | None = None,
):
    """flash_attention without the argument checks; num_splits forces the KV split count (tests)."""
    b, hq, sq, d = query.shape
    hkv, skv = key.shape[1], key.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty(b, sq, hq, d, dtype=query.dtype, device=query.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=query.device) if return_lse else None
    result = (out, lse) if return_lse else out
    if out.numel() == 0:
        return result
    if skv == 0:  # nothing to attend to: every row is fully masked
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return result

    if not use_triton(query, key, value):
        o, lse_t = _torch_forward(query, key, value, attention_mask, causal, scale, return_lse)
        out.copy_(o)
        if lse is not None:
            lse.copy_(lse_t)
        return result

    # ---- Triton path ----
    group = hq // hkv
    rows = group * sq
    block_d = max(16, next_pow2(d))
    interp = interpreting()
    if attention_mask is None:
        mask_kind, mask, mask_strides = _MASK_NONE, query, (0, 0, 0, 0)
    else:
        if attention_mask.dtype == torch.bool:
            mask_kind, mask = _MASK_BOOL, attention_mask.view(torch.uint8)
        else:
            mask_kind, mask = _MASK_ADD, attention_mask
        mask = mask.expand(b, hq, sq, skv)  # size-1 dims get stride 0
        mask_strides = mask.stride()

    # Decode-sized row counts get one row block per (batch, kv head) with BLOCK_M fitted to the rows;
    # larger ones use the autotuned BLOCK_M (the split count assumes the largest, 128).
    decode = rows <= _DECODE_MAX_ROWS
    if decode:
        block_m = max(16, next_pow2(rows))
    else:
        block_m = _INTERP_BLOCK_M if interp else 128
    if num_splits is None:
        num_splits = _num_splits(triton.cdiv(rows, block_m) * b * hkv, skv, query.device)
    align = _INTERP_BLOCK_N if interp else 128  # split boundaries on key-block boundaries
    keys_per_split = triton.cdiv(triton.cdiv(skv, max(1, num_splits)), align) * align
    splits = triton.cdiv(skv, keys_per_split)

    if splits > 1:
        o_buf = torch.empty(splits, b, hq, sq, d, dtype=torch.float32, device=query.device)
        l_buf = torch.empty(splits, b, hq, sq, dtype=torch.float32, device=query.device)
        o_strides, l_strides = o_buf.stride(), l_buf.stride()
        write_lse = True
    else:
        o_buf = out
        ob, oq, oh, od = out.stride()
        o_strides = (0, ob, oh, oq, od)
        l_buf = lse if lse is not None else out  # dummy pointer when not written
        l_strides = (0, *lse.stride()) if lse is not None else (0, 0, 0, 0)
        write_lse = lse is not None

    args = (
        query, key, value, mask, o_buf, l_buf,
        *query.stride(), *key.stride(), *value.stride(), *mask_strides, *o_strides, *l_strides,
        sq, skv, hkv, skv - sq, keys_per_split, scale * _LOG2E,
        next_pow2(max(rows, keys_per_split)).bit_length(),
    )  # fmt: skip
    meta = dict(
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        EVEN_D=block_d == d,
        CAUSAL=bool(causal),
        MASK_KIND=mask_kind,
        WRITE_LSE=write_lse,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        # The interpreter's tl.dot is wrong on bf16; run bf16 tiles in float32 there.
        UPCAST=interp and query.dtype == torch.bfloat16,
        RAW_SCORES=RAW_SCORES and scale > 0 and mask_kind != _MASK_ADD,
    )
    if interp:
        grid = (triton.cdiv(rows, block_m), b * hkv, splits)
        _fwd_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=_INTERP_BLOCK_N)
    elif decode:
        grid = (triton.cdiv(rows, block_m), b * hkv, splits)
        _fwd_decode[grid](*args, **meta, BLOCK_M=block_m)
    else:
        grid = lambda m: (triton.cdiv(rows, m["BLOCK_M"]), b * hkv, splits)
        _fwd_prefill[grid](*args, **meta)

    if splits > 1:
        dummy_lse = lse if lse is not None else l_buf
        _combine_kernel[(b * hq * sq,)](
            o_buf, l_buf, out, dummy_lse, splits, sq, hq,
            *o_buf.stride(), *l_buf.stride(), *out.stride(),
            *(lse.stride() if lse is not None else (0, 0, 0)),
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(splits)), WRITE_LSE=lse is not None,
        )  # fmt: skip
    return result


def flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention forward: softmax(scale * Q K^T + mask) V, FlashAttention-2 style.

    Args:
        query: [B, Hq, Sq, D], float16 / bfloat16 / float32, any strides.
        key, value: [B, Hkv, Skv, D], query dtype and device; Hkv divides Hq (GQA, K/V not repeated).
        attention_mask: 4-D, broadcastable to [B, Hq, Sq, Skv]; bool (True = attend) or additive float.
        causal: bottom-right aligned, query i attends keys j <= i + (Skv - Sq).
        scale: score scale, default D ** -0.5.
        return_lse: also return the float32 [B, Hq, Sq] natural-log logsumexp of the scaled, masked scores.
        out: optional preallocated [B, Sq, Hq, D] output in the query dtype (any strides).

    Returns:
        [B, Sq, Hq, D] in the query dtype (transformers' attention output layout), plus the lse if asked.
        Rows whose keys are all masked give zeros (lse = -inf). D <= 256. Runs the Triton kernel on CUDA
        (or under TRITON_INTERPRET=1), a float32 PyTorch computation otherwise.
    """
    _validate(query, key, value, attention_mask, scale, out)
    return _forward(query, key, value, attention_mask, causal, scale, return_lse, out)
