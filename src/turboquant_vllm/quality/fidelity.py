"""Teacher-forced fidelity: logits with a compressed cache vs the exact cache, as decode sees them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@torch.no_grad()
def decode_logits(
    model,
    input_ids: torch.Tensor,
    cache,
    *,
    attention_mask: torch.Tensor | None = None,
    prefill: int,
    chunk: int = 1,
) -> torch.Tensor:
    """Prefill `prefill` tokens, then feed the rest `chunk` tokens at a time through `cache`.

    input_ids [B, T]; returns float32 logits [B, T - prefill, V] predicted at positions prefill-1 .. T-2
    (i.e. the logits that score tokens prefill .. T-1).
    """
    b, t = input_ids.shape
    if not 0 < prefill < t:
        raise ValueError(f"prefill must be in (0, {t}), got {prefill}")
    from ..integrations.transformers import cache_kwargs

    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    kw = cache_kwargs(model, cache)
    out = model(input_ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True, **kw)
    logits = [out.logits[:, -1:].float()]
    for s in range(prefill, t - 1, chunk):
        e = min(s + chunk, t - 1)
        out = model(input_ids[:, s:e], attention_mask=mask[:, :e], use_cache=True, **kw)
        logits.append(out.logits.float())
    return torch.cat(logits, dim=1)


@dataclass
class Fidelity:
    cosine: float  # mean cosine similarity of logit vectors
    rel_error: float  # ||l - l_ref|| / ||l_ref|| over all positions
    top1_agreement: float  # fraction of positions with the same argmax
    kl: float  # mean KL(p_ref || p) in nats


def compare_logits(logits: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None = None) -> Fidelity:
    """Compare [B, T, V] logits; `valid` [B, T] bool selects positions (e.g. not padding)."""
    if valid is None:
        valid = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    a, r = logits[valid].double(), ref[valid].double()
    cos = torch.nn.functional.cosine_similarity(a, r, dim=-1).mean().item()
    rel = ((a - r).norm() / r.norm()).item()
    top1 = (a.argmax(-1) == r.argmax(-1)).double().mean().item()
    kl = (r.log_softmax(-1).exp() * (r.log_softmax(-1) - a.log_softmax(-1))).sum(-1).mean().item()
    return Fidelity(cos, rel, top1, kl)


def cache_fidelity(
    model,
    input_ids: torch.Tensor,
    make_cache: Callable[[], object],
    *,
    attention_mask: torch.Tensor | None = None,
    prefill: int,
    chunk: int = 1,
) -> Fidelity:
    """Fidelity of the cache `make_cache()` returns against an exact DynamicCache on the same tokens."""
    ref = decode_logits(
        model,
        input_ids,
        DynamicCache(config=model.config),
        attention_mask=attention_mask,
        prefill=prefill,
        chunk=chunk,
    )
    got = decode_logits(model, input_ids, make_cache(), attention_mask=attention_mask, prefill=prefill, chunk=chunk)
    return compare_logits(got, ref)
