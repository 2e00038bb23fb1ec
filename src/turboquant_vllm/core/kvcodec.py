"""PyTorch reference of the KV codec and of attention over compressed K/V.

These functions define what the Triton kernels compute (tests compare them) and are the
CPU path when Triton is not used. Layout: see turboquant_vllm/layout.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import pack, unpack


def code_of_rank(rank: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored code of each centroid rank (0 = the most negative centroid of the sorted, zero-symmetric codebook):
    the top bit is the sign (1 = negative), the bits below the rank of the magnitude, so code c and c + 2**(bits-1)
    are +m and -m. Ranks >= 2**(bits-1) map to rank - 2**(bits-1), the others to 2**bits - 1 - rank."""
    half = 1 << (bits - 1)
    return torch.where(rank >= half, rank - half, 2 * half - 1 - rank)


def rank_of_code(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of code_of_rank: the rank in the increasing codebook of each stored code."""
    half = 1 << (bits - 1)
    return torch.where(code < half, half + code, 2 * half - 1 - code)


def centroids_by_code(sorted_centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """The codebook indexed by stored code (code_of_rank): [+m_0, ..., +m_(h-1), -m_0, ..., -m_(h-1)], h =
    2**(bits-1), from the increasing centroids of a zero-symmetric codebook."""
    return sorted_centroids[rank_of_code(torch.arange(1 << bits, device=sorted_centroids.device), bits)]


def compress_reference(
    x: torch.Tensor,
    mean: torch.Tensor,
    rotation: torch.Tensor,
    boundaries: torch.Tensor,
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, S, d] (any float dtype), mean float32 [B, H, d] -> (packed uint8 [B, H, S, d*bits/8],
    norms float32 [B, H, S]). Codes are code_of_rank(bucketize(Pi (x - mean) / ||x - mean||, boundaries))
    (boundaries increasing); dequantize with the codebook in code order (centroids_by_code)."""
    r = x.float() - mean.float().unsqueeze(-2)
    norms = torch.linalg.vector_norm(r, dim=-1)
    unit = r / norms.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    idx = code_of_rank(torch.bucketize(unit @ rotation.T, boundaries), bits)
    return pack(idx, bits), norms


def dequantize_reference(
    packed: torch.Tensor,
    norms: torch.Tensor,
    mean: torch.Tensor,
    rotation: torch.Tensor,
    centroids: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """packed uint8 [B, H, N, d*bits/8], norms [B, H, N], mean [B, H, d], centroids [2**bits] in code order
    (centroids_by_code) -> float32 [B, H, N, d]."""
    d = rotation.shape[0]
    idx = unpack(packed, bits, d).long()
    return mean.float().unsqueeze(-2) + norms.float().unsqueeze(-1) * (centroids[idx] @ rotation)


def attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain float32 attention. query [B, Hq, Sq, d], keys/values [B, Hkv, Skv, d] (Hkv divides Hq),
    mask bool (True = attend) or additive, broadcastable to [B, Hq, Sq, Skv]; causal is bottom-right
    aligned (query i sees keys j <= i + Skv - Sq). Returns float32 [B, Sq, Hq, d]."""
    q = query.float()
    hq, hkv = q.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(hq // hkv, dim=1)
    v = values.float().repeat_interleave(hq // hkv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    sq, skv = scores.shape[-2], scores.shape[-1]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    if causal:
        i = torch.arange(sq, device=q.device).view(-1, 1)
        j = torch.arange(skv, device=q.device).view(1, -1)
        scores = scores.masked_fill(j > i + (skv - sq), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key masked give zeros
    return (probs @ v).transpose(1, 2)


def sdpa(query, keys, values, attention_mask=None, causal=False, scale=None) -> torch.Tensor:
    """torch SDPA with GQA in the query dtype; returns [B, Sq, Hq, d]."""
    hq, hkv = query.shape[1], keys.shape[1]
    if hkv != hq:
        keys = keys.repeat_interleave(hq // hkv, dim=1)
        values = values.repeat_interleave(hq // hkv, dim=1)
    sq, skv = query.shape[-2], keys.shape[-2]
    if causal and attention_mask is None and sq != skv:
        i = torch.arange(sq, device=query.device).view(-1, 1)
        j = torch.arange(skv, device=query.device).view(1, -1)
        attention_mask = j <= i + (skv - sq)
        causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=attention_mask, is_causal=causal and sq > 1, scale=scale
    )
    return out.transpose(1, 2)
