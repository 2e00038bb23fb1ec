"""Tiny models built from configs (random weights): for tests only, never quality evidence."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_llama(head_dim: int = 64, q_heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=q_heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        **kw,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(head_dim: int = 128, q_heads: int = 2, kv_heads: int = 1, layers: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=q_heads * head_dim,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        **kw,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2-style large shared key offset (k_proj bias)
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.normal_(0, 2.0)
    return model


def left_padded_batch(vocab: int = 96, lengths=(11, 7), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, n - length :] = 1
        ids[i, : n - length] = 0
    return ids, mask
