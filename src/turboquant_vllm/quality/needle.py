"""Needle in a haystack: can the model still read one fact back out of a compressed cache?

A sentence "The secret number is 48213." is put at a relative depth inside filler prose (the bundled
texts), the haystack is prefilled into the cache (so it is stored compressed), then the question is fed
as a second step (it attends to the compressed haystack, as a follow-up turn would) and the answer is
generated greedily. A trial is a hit when the first number in the answer is the secret number.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..integrations.transformers import cache_kwargs

INSTRUCTION = "Read the following text carefully and remember the secret number hidden in it.\n\n"
NEEDLE = "The secret number is {number}."
QUESTION = "\n\nQuestion: What is the secret number mentioned in the text above?\nAnswer: The secret number is"


@dataclass
class NeedlePrompt:
    context_ids: torch.Tensor  # [1, C]: instruction + haystack with the needle (prefilled)
    question_ids: torch.Tensor  # [1, Q]: the question (a second step)
    number: int
    depth: float  # requested relative depth
    needle_token: int  # index in context_ids where the needle sentence starts

    @property
    def length(self) -> int:
        return self.context_ids.shape[1] + self.question_ids.shape[1]


def split_sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if p]


def build_needle_prompt(tokenizer, filler: str, length: int, depth: float, number: int) -> NeedlePrompt:
    """A prompt of about `length` tokens (never more) with the needle at relative `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(number=number)

    def n_tok(s: str) -> int:
        return len(tokenizer(s, add_special_tokens=False).input_ids)

    question_ids = tokenizer(QUESTION, add_special_tokens=False, return_tensors="pt").input_ids
    budget = length - question_ids.shape[1] - n_tok(INSTRUCTION) - n_tok(needle) - 8
    if budget < 16:
        raise ValueError(f"length {length} is too short for a needle prompt")
    sentences = split_sentences(filler)
    if not sentences:
        raise ValueError("the filler text has no sentences")
    hay, used = [], 0
    for s in itertools.cycle(sentences):  # repeats the filler when it is shorter than the budget
        c = n_tok(" " + s)
        if used + c > budget:
            break
        hay.append(s)
        used += c
    cut = round(depth * len(hay))
    before, after = " ".join(hay[:cut]), " ".join(hay[cut:])
    prefix = INSTRUCTION + (before + " " if before else "")
    text = prefix + needle + (" " + after if after else "")
    enc = tokenizer(text, return_tensors="pt")
    ids = enc.input_ids
    while ids.shape[1] + question_ids.shape[1] > length and hay:  # tokenization is not additive: trim
        hay.pop()
        cut = min(cut, len(hay))
        before, after = " ".join(hay[:cut]), " ".join(hay[cut:])
        prefix = INSTRUCTION + (before + " " if before else "")
        text = prefix + needle + (" " + after if after else "")
        ids = tokenizer(text, return_tensors="pt").input_ids
    needle_token = len(tokenizer(prefix).input_ids) - 1
    return NeedlePrompt(ids, question_ids, number, depth, max(needle_token, 0))


def first_number(text: str) -> int | None:
    m = re.search(r"\d[\d,]*", text)
    return int(m.group(0).replace(",", "")) if m else None


@torch.no_grad()
def answer(model, tokenizer, prompt: NeedlePrompt, cache, max_new_tokens: int = 8) -> str:
    """Prefill the haystack, feed the question as a second step, generate greedily. Returns the answer text."""
    kw = cache_kwargs(model, cache)
    model(prompt.context_ids, use_cache=True, **kw)
    out = model(prompt.question_ids, use_cache=True, **kw)
    tokens = []
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        tokens.append(int(nxt))
        out = model(nxt, use_cache=True, **kw)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return tokenizer.decode(tokens, skip_special_tokens=True)


@dataclass
class NeedleTrial:
    length: int
    depth: float
    number: int
    answers: dict[str, str]
    hits: dict[str, bool]


def needle_test(
    model,
    tokenizer,
    filler: str,
    candidates: Mapping[str, Callable[[], object]],
    *,
    lengths: Sequence[int] = (512, 1024),
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    seed: int = 0,
    progress: bool = False,
) -> list[NeedleTrial]:
    """Every (length, depth) trial with the exact cache ("exact") and each candidate cache."""
    rng = random.Random(seed)
    trials = [(n, d, rng.randrange(10000, 99999)) for n in lengths for d in depths]
    names = ["exact", *[n for n in candidates if n != "exact"]]
    factories = {"exact": lambda: DynamicCache(config=model.config), **candidates}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(trials) * len(names), desc="needle", leave=False)
    out = []
    for length, depth, number in trials:
        prompt = build_needle_prompt(tokenizer, filler, length, depth, number)
        answers, hits = {}, {}
        for name in names:
            answers[name] = answer(model, tokenizer, prompt, factories[name]())
            hits[name] = first_number(answers[name]) == number
            if bar is not None:
                bar.update(1)
        out.append(NeedleTrial(prompt.length, depth, number, answers, hits))
    if bar is not None:
        bar.close()
    return out


def hit_rate(trials: Sequence[NeedleTrial], name: str) -> float:
    return sum(t.hits[name] for t in trials) / len(trials) if trials else float("nan")
