"""Teacher-forced perplexity and greedy agreement, with the cache filled incrementally as decode fills it.

`compare_caches` prefills a short prefix, then feeds the rest `chunk` tokens at a time (chunk=1: token by
token) through an exact DynamicCache and through every candidate cache in lockstep, on the same tokens.
Per scored token it keeps the negative log-likelihood under each cache, whether the candidate's argmax
agrees with the exact cache's, and KL(exact || candidate). Only [tokens] vectors are kept, never the
[tokens, vocab] logits.

`greedy_agreement` generates greedily with the exact cache, then teacher-forces that sequence through each
candidate (token by token) and counts argmax agreement: a fair next-token agreement over a long
generation, without the cascade a free-running compressed generation would start after its first miss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..integrations.transformers import cache_kwargs

REFERENCE = "exact"


@dataclass
class TokenScores:
    """Per scored token: nll [N] (nats), agree [N] bool (argmax = reference argmax), kl [N] (nats)."""

    nll: torch.Tensor
    agree: torch.Tensor
    kl: torch.Tensor
    argmax: torch.Tensor = field(repr=False, default=None)

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.double().mean())

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def agreement(self) -> float:
        return float(self.agree.double().mean())

    @property
    def mean_kl(self) -> float:
        return float(self.kl.double().mean())


def _forward(model, ids, cache):
    out = model(ids, use_cache=True, **cache_kwargs(model, cache))
    return out.logits.float()


@torch.no_grad()
def compare_caches(
    model,
    input_ids: torch.Tensor,
    candidates: Mapping[str, Callable[[], object]],
    *,
    prefill: int = 64,
    chunk: int = 1,
    progress: bool = False,
    desc: str = "decode",
) -> dict[str, TokenScores]:
    """Score tokens prefill .. T-1 of input_ids [1, T] with an exact cache and each candidate cache.

    candidates: name -> factory of a fresh cache. Returns name -> TokenScores, plus REFERENCE for the exact
    cache (its `agree` is all True, `kl` zero).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got {tuple(input_ids.shape)}")
    t = input_ids.shape[1]
    if not 0 < prefill < t:
        raise ValueError(f"prefill must be in (0, {t}), got {prefill}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    names = [REFERENCE] + [n for n in candidates if n != REFERENCE]
    caches = {REFERENCE: DynamicCache(config=model.config)}
    caches.update({n: candidates[n]() for n in names[1:]})
    parts: dict[str, dict[str, list]] = {n: {"nll": [], "agree": [], "kl": [], "argmax": []} for n in names}

    steps = [(0, prefill)] + [(s, min(s + chunk, t - 1)) for s in range(prefill, t - 1, chunk)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t - prefill, desc=desc, unit="tok", leave=False)
    for s, e in steps:
        ids = input_ids[:, s:e]
        targets = input_ids[0, s + 1 : e + 1] if s > 0 else input_ids[0, prefill : prefill + 1]
        ref_lp = None
        for n in names:
            logits = _forward(model, ids, caches[n])[0]
            if s == 0:
                logits = logits[-1:]
            lp = torch.log_softmax(logits, dim=-1)
            am = lp.argmax(-1)
            p = parts[n]
            p["nll"].append(-lp.gather(-1, targets.view(-1, 1)).squeeze(-1))
            p["argmax"].append(am)
            if ref_lp is None:
                ref_lp, ref_am = lp, am
                p["agree"].append(torch.ones_like(am, dtype=torch.bool))
                p["kl"].append(torch.zeros(am.shape))
            else:
                p["agree"].append(am == ref_am)
                p["kl"].append((ref_lp.exp() * (ref_lp - lp)).sum(-1))
        if bar is not None:
            bar.update(targets.numel())
    if bar is not None:
        bar.close()
    return {n: TokenScores(*(torch.cat(parts[n][k]) for k in ("nll", "agree", "kl", "argmax"))) for n in names}


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, make_cache: Callable[[], object] | None = None, *,
               prefill: int = 64, chunk: int = 1) -> float:  # fmt: skip
    """Perplexity of tokens prefill .. T-1 with the cache make_cache() (default: exact), filled incrementally."""
    if make_cache is None:
        return compare_caches(model, input_ids, {}, prefill=prefill, chunk=chunk)[REFERENCE].ppl
    return compare_caches(model, input_ids, {"c": make_cache}, prefill=prefill, chunk=chunk)["c"].ppl


@torch.no_grad()
def greedy_generate(model, prompt_ids: torch.Tensor, new_tokens: int, make_cache=None) -> torch.Tensor:
    """Greedy continuation of prompt_ids [1, P] for exactly `new_tokens` tokens (EOS does not stop it).

    Returns [1, P + new_tokens]. Token by token through make_cache() (default: an exact DynamicCache)."""
    cache = make_cache() if make_cache is not None else DynamicCache(config=model.config)
    ids = prompt_ids
    step = prompt_ids
    for _ in range(new_tokens):
        nxt = _forward(model, step, cache)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        step = nxt
    return ids


@dataclass
class Agreement:
    tokens: int
    agreement: float  # fraction of positions whose argmax equals the exact greedy token
    first_miss: int | None  # index of the first disagreeing position (None: all agree)


@torch.no_grad()
def greedy_agreement(
    model,
    prompt_ids: torch.Tensor,
    candidates: Mapping[str, Callable[[], object]],
    *,
    new_tokens: int = 256,
    chunk: int = 1,
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Agreement]]:
    """Generate `new_tokens` greedily with the exact cache, then teacher-force that sequence through each
    candidate cache; returns (the generated sequence [1, P + new_tokens], name -> Agreement)."""
    seq = greedy_generate(model, prompt_ids, new_tokens)
    p = prompt_ids.shape[1]
    scores = compare_caches(model, seq, candidates, prefill=p, chunk=chunk, progress=progress, desc="agreement")
    generated = seq[0, p:]
    out = {}
    for name, sc in scores.items():
        agree = sc.argmax == generated  # position i predicts generated token i
        misses = (~agree).nonzero()
        out[name] = Agreement(int(agree.numel()), float(agree.double().mean()),
                              int(misses[0, 0]) if misses.numel() else None)  # fmt: skip
    return seq, out
