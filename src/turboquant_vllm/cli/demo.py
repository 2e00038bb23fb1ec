"""`turboquant-vllm demo`: compress a model's KV cache on the CPU and show what it costs and saves.

With no --model, a small Llama-shaped model is built from a config (random weights, no download):
it shows the mechanics (memory, fidelity of the logits, the same generate() call), not model quality.
Pass --model DIR (a local transformers model, or --gguf FILE inside DIR) for a real one.
"""

from __future__ import annotations

import argparse

import torch


def build_demo_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
    )
    return LlamaForCausalLM(cfg).eval()


def load_model(path: str | None, gguf: str | None, dtype: torch.dtype):
    if path is None:
        return build_demo_model().to(dtype), "tiny Llama from a config (random weights)"
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    return model, f"{path}{'/' + gguf if gguf else ''}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model directory (default: a tiny model built from a config)")
    p.add_argument("--gguf", help="GGUF file name inside --model")
    p.add_argument("--bits", type=int, default=4, help="bits per coordinate for K and V (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from transformers import DynamicCache

    from ..cache.dynamic import CompressedDynamicCache, head_dim_of
    from ..integrations.transformers import cache_kwargs
    from ..quality.fidelity import compare_logits, decode_logits

    dtype = getattr(torch, args.dtype)
    model, name = load_model(args.model, args.gguf, dtype)
    vocab = model.config.vocab_size
    head_dim = head_dim_of(model.config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.prompt_tokens + args.new_tokens), generator=g)
    print(f"model: {name}; head_dim {head_dim}; {args.batch} x {args.prompt_tokens} prompt tokens; {args.bits}-bit K/V")

    def compressed_cache():
        cache = DynamicCache(config=model.config)
        return cache, CompressedDynamicCache(cache, head_dim=head_dim, bits=args.bits)

    # 1. generate() with an exact and with a compressed cache
    prompt = ids[:, : args.prompt_tokens]
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, do_sample=False)
    if model.generation_config.pad_token_id is None:
        gen["pad_token_id"] = 0
    exact = DynamicCache(config=model.config)
    ref = model.generate(prompt, **gen, **cache_kwargs(model, exact))
    cache, compressed = compressed_cache()
    out = model.generate(prompt, **gen, **cache_kwargs(model, cache))
    same = (out[:, args.prompt_tokens :] == ref[:, args.prompt_tokens :]).float().mean().item()

    exact_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in exact.layers)
    stats = compressed.compression_stats()
    fp16_bytes = exact_bytes * 2 // torch.empty(0, dtype=dtype).element_size()
    print("\nKV-cache memory after generate():")
    print(f"  {'exact cache (' + args.dtype + '):':<30}{exact_bytes / 2**20:8.2f} MiB")
    print(f"  same tokens in fp16:          {fp16_bytes / 2**20:8.2f} MiB")
    print(f"  compressed, bytes used:       {stats['compressed_bytes_used'] / 2**20:8.2f} MiB "
          f"({stats['bytes_per_token_per_head']} B/token/head)")  # fmt: skip
    print(f"  compressed, bytes held:       {stats['vram_bytes'] / 2**20:8.2f} MiB (incl. growth slack)")
    print(f"  saved vs fp16:                {fp16_bytes / max(stats['compressed_bytes_used'], 1):8.2f}x")

    # 2. teacher-forced fidelity, token by token as decode sees it
    prefill = args.prompt_tokens
    ref_logits = decode_logits(model, ids, DynamicCache(config=model.config), prefill=prefill)
    got_logits = decode_logits(model, ids, compressed_cache()[0], prefill=prefill)
    fid = compare_logits(got_logits, ref_logits)
    print(f"\nFidelity over {ids.shape[1] - prefill} decode steps (compressed vs exact cache):")
    print(f"  logits cosine {fid.cosine:.5f}, relative error {fid.rel_error:.4f}, KL {fid.kl:.2e} nats")
    print(f"  next-token (argmax) agreement {fid.top1_agreement:.1%}; greedy continuation identical: {same:.1%}")
    if args.model is None:
        print("(random weights: these numbers show the mechanics, not a model's quality; see docs/QUALITY.md)")
    return 0
