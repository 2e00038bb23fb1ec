"""The documented attention-interface API and the fused path inside transformers."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import turboquant_vllm as tq
from tests.helpers import rel_err
from tests.models import left_padded_batch, tiny_llama, tiny_qwen2
from turboquant_vllm import CompressedDynamicCache, TurboQuantCache
from turboquant_vllm.core.kvcodec import attention_reference
from turboquant_vllm.quality.fidelity import decode_logits
from turboquant_vllm.triton.attention_interface import (
    install_fused_tq4_kv,
    install_triton_fa,
    register_triton_fa,
    triton_fa_forward,
    triton_fa_tq4_kv_forward,
    uninstall_fused_tq4_kv,
)


def _module(causal=True):
    return SimpleNamespace(is_causal=causal, training=False)


def _qkv(b=2, hq=4, hkv=2, sq=7, skv=7, d=64, dtype=torch.float32):
    return (
        torch.randn(b, hq, sq, d, dtype=dtype),
        torch.randn(b, hkv, skv, d, dtype=dtype),
        torch.randn(b, hkv, skv, d, dtype=dtype),
    )


@pytest.mark.parametrize("case", ["causal_prefill", "decode", "padding_mask", "not_causal_kwarg", "mha"])
def test_triton_fa_forward_against_sdpa(case):
    torch.manual_seed(0)
    hkv = 4 if case == "mha" else 2
    sq = 1 if case == "decode" else 9
    q, k, v = _qkv(hkv=hkv, sq=sq, skv=9 if sq > 1 else 13)
    mask, kwargs, causal = None, {}, sq > 1
    if case == "padding_mask":
        pad = torch.ones(2, 9, dtype=torch.bool)
        pad[0, :3] = False
        mask = sdpa_mask(batch_size=2, q_length=9, kv_length=9, attention_mask=pad, allow_is_causal_skip=False)
        causal = False
    if case == "not_causal_kwarg":
        kwargs, causal = {"is_causal": False}, False
    out, weights = triton_fa_forward(_module(), q, k, v, mask, scaling=0.125, **kwargs)
    assert weights is None and out.shape == (2, sq, 4, 64)
    ref = attention_reference(q, k, v, mask, causal=causal, scale=0.125)
    rows = torch.ones(2, sq, dtype=torch.bool) if mask is None else mask[:, 0].any(-1)  # fully padded rows differ
    assert rel_err(out[rows], ref[rows]) < 1e-4
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=0.125, enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(out[rows], sdpa[rows]) < 1e-4


def test_register_is_idempotent_and_registers_a_mask():
    assert register_triton_fa() == register_triton_fa() == "triton_fa"
    assert "triton_fa" in AttentionInterface() and "triton_fa" in AttentionMaskInterface()
    assert AttentionMaskInterface._global_mapping["triton_fa"] is sdpa_mask


def test_install_triton_fa_matches_sdpa_model():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(14, 9))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        install_triton_fa(model)
        assert model.config._attn_implementation == "triton_fa"
        out = model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-4
    with pytest.raises(AttributeError, match="config"):
        install_triton_fa(object())


def _fused_and_unfused_logits(model, head_dim, make, ids, mask, prefill, chunk=1):
    cache_a = DynamicCache(config=model.config)
    make(cache_a)
    unfused = decode_logits(model, ids, cache_a, attention_mask=mask, prefill=prefill, chunk=chunk)
    cache_b = DynamicCache(config=model.config)
    compressed = make(cache_b)
    install_fused_tq4_kv(model, compressed)
    try:
        assert compressed.fused_mode
        fused = decode_logits(model, ids, cache_b, attention_mask=mask, prefill=prefill, chunk=chunk)
    finally:
        uninstall_fused_tq4_kv(model)
    return fused, unfused


@pytest.mark.parametrize("family,head_dim,bits,chunk", [("llama", 64, 4, 1), ("qwen2", 128, 3, 1), ("llama", 64, 2, 4)])
def test_fused_equals_unfused_on_same_compressed_data(family, head_dim, bits, chunk):
    model = tiny_llama() if family == "llama" else tiny_qwen2()
    ids, mask = left_padded_batch(lengths=(30, 22))

    def make(cache):
        return CompressedDynamicCache(cache, head_dim=head_dim, bits=bits)

    fused, unfused = _fused_and_unfused_logits(model, head_dim, make, ids, mask, prefill=18, chunk=chunk)
    assert rel_err(fused, unfused) < 1e-4


def test_fused_with_window_and_asymmetric_bits():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(26, 26))
    layer_caches = []

    def run(fused):
        cache = TurboQuantCache(model.config, k_bits=4, v_bits=2, window=5)
        layer_caches.append(cache)
        if fused:
            install_fused_tq4_kv(model, cache)
        try:
            return decode_logits(model, ids, cache, attention_mask=mask, prefill=12)
        finally:
            uninstall_fused_tq4_kv(model)

    assert rel_err(run(True), run(False)) < 1e-4
    assert layer_caches[0].layers[0].exact_keys.shape[-2] == 5


def test_uninstall_leaves_no_trace_and_two_models_do_not_interfere():
    m1, m2 = tiny_llama(seed=1), tiny_qwen2(seed=2)
    before_attn = set(AttentionInterface._global_mapping)
    before_mask = set(AttentionMaskInterface._global_mapping)
    c1 = DynamicCache(config=m1.config)
    comp1 = CompressedDynamicCache(c1, head_dim=64, bits=4)
    c2 = DynamicCache(config=m2.config)
    comp2 = CompressedDynamicCache(c2, head_dim=128, bits=4)
    n1 = install_fused_tq4_kv(m1, comp1)
    n2 = install_fused_tq4_kv(m2, comp2)
    assert n1 != n2 and m1.config._attn_implementation == n1 and m2.config._attn_implementation == n2
    ids, mask = left_padded_batch(lengths=(10, 10))
    with torch.no_grad():
        m1(ids, attention_mask=mask, past_key_values=c1)
        m2(ids, attention_mask=mask, past_key_values=c2)
        m1(ids[:, :1], attention_mask=torch.ones(2, 11, dtype=torch.long), past_key_values=c1)
    assert c1.get_seq_length() == 11 and c2.get_seq_length() == 10
    uninstall_fused_tq4_kv(m1)
    uninstall_fused_tq4_kv(m2)
    for m, comp in ((m1, comp1), (m2, comp2)):
        assert m.config._attn_implementation == "sdpa" and comp.fused_mode is False
        assert not any(name.startswith("_tq") for mod in m.modules() for name in vars(mod))
    assert set(AttentionInterface._global_mapping) - before_attn <= {"triton_fa"}
    assert set(AttentionMaskInterface._global_mapping) - before_mask <= {"triton_fa"}


def test_fused_forward_falls_back_without_cache():
    q, k, v = _qkv()
    a, _ = triton_fa_tq4_kv_forward(_module(), q, k, v, None)
    b, _ = triton_fa_forward(_module(), q, k, v, None)
    torch.testing.assert_close(a, b)


def test_enable_turboquant_one_call_and_context_manager():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(12, 8))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    cache = tq.enable_turboquant(model, bits=8)
    assert isinstance(cache, TurboQuantCache) and cache.fused_mode
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **tq.cache_kwargs(model, cache))
    tq.disable_turboquant(model)
    assert model.config._attn_implementation == "sdpa" and not cache.fused_mode
    assert torch.equal(out, ref)  # 8-bit keys and values keep the greedy path of this tiny model
    cache2 = TurboQuantCache(model.config, bits=4)
    with tq.fused_attention(model, cache2):
        assert cache2.fused_mode
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, **tq.cache_kwargs(model, cache2))
    assert model.config._attn_implementation == "sdpa" and not cache2.fused_mode


def test_enable_turboquant_uses_the_measured_policy():
    model = tiny_llama(layers=3)
    cache = tq.enable_turboquant(model, bits=4)
    try:
        widths = [(layer.layout.k_bits, layer.layout.v_bits) for layer in cache.layers]
        assert widths == [(8, 4), (4, 3), (4, 3)]  # layer 0 at 8-bit keys and 4-bit values
        assert all((layer.settings.window, layer.settings.sinks) == (64, 4) for layer in cache.layers)
        three = tq.enable_turboquant(model, bits=3)
        assert [(layer.layout.k_bits, layer.layout.v_bits) for layer in three.layers] == [(8, 4), (3, 2), (3, 2)]
        plain = tq.enable_turboquant(model, bits=4, k_bits=4, v_bits=4, window=0, sinks=0, layer_bits={})
        assert all(layer.layout.k_bits == 4 and layer.settings.sinks == 0 for layer in plain.layers)
    finally:
        tq.disable_turboquant(model)


# ---------------------------------------------------------------------------------------------- sink tokens
def _sink_step(sq, sinks=3, window=2, prefill=9, batch=2):
    """A fused layer holding `prefill` tokens, after an update with `sq` new tokens: returns the layer, the
    query, the exact segment update() returned and K/V of every visible token in sequence order (reference:
    the state before the update, materialized, plus the new tokens)."""
    from turboquant_vllm.cache.layer import CompressedLayer, TurboQuantSettings

    g = torch.Generator().manual_seed(sq)
    x = torch.randn(batch, 2, prefill + sq, 64, generator=g)
    y = torch.randn(batch, 2, prefill + sq, 64, generator=g)
    layer = CompressedLayer(64, TurboQuantSettings(k_bits=4, v_bits=3, window=window, sinks=sinks))
    layer.update(x[:, :, :prefill], y[:, :, :prefill])
    full_k, full_v = layer.materialize()
    full_k = torch.cat([full_k, x[:, :, prefill:]], dim=-2)
    full_v = torch.cat([full_v, y[:, :, prefill:]], dim=-2)
    layer.fused = True
    seg_k, seg_v = layer.update(x[:, :, prefill:], y[:, :, prefill:])
    assert layer.attend_sinks == sinks and layer.attend_compressed == prefill - sinks - window
    q = torch.randn(batch, 4, sq, 64, generator=g)
    return layer, q, seg_k, seg_v, full_k, full_v


@pytest.mark.parametrize("sq,mask_kind", [(1, "bool"), (3, "none"), (3, "bool"), (3, "additive")])
def test_fused_attention_with_sinks_equals_sequence_order_reference(sq, mask_kind):
    layer, q, seg_k, seg_v, full_k, full_v = _sink_step(sq)
    total = full_k.shape[-2]
    mask = None
    if mask_kind != "none":  # row 1 left-padded by 2 (two of its sink positions), causal over the sequence
        pad = torch.ones(2, total, dtype=torch.bool)
        pad[1, :2] = False
        mask = sdpa_mask(batch_size=2, q_length=sq, kv_length=total, cache_position=torch.arange(total - sq, total),
                         attention_mask=pad, allow_is_causal_skip=False)  # fmt: skip
        if mask_kind == "additive":  # transformers' additive masks use finfo(float32).min
            mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    holder = SimpleNamespace(layer=lambda i: layer)
    module = SimpleNamespace(is_causal=True, training=False, layer_idx=0)
    out, _ = triton_fa_tq4_kv_forward(module, q, seg_k, seg_v, mask, scaling=0.125, tq_cache=holder)
    ref = attention_reference(q, full_k, full_v, mask, causal=mask is None and sq > 1, scale=0.125)
    assert rel_err(out, ref) < 1e-4
    if mask is not None:  # one reordered mask per step, shared by the layers
        first = holder._kernel_mask_slot[2]
        triton_fa_tq4_kv_forward(module, q, seg_k, seg_v, mask, scaling=0.125, tq_cache=holder)
        assert holder._kernel_mask_slot[2] is first
        with torch.inference_mode():  # a mask without a version counter (generate() under inference_mode)
            inf_mask = mask.clone()
            out2, _ = triton_fa_tq4_kv_forward(module, q, seg_k, seg_v, inf_mask, scaling=0.125, tq_cache=holder)
        assert torch.equal(out2, out)
    with pytest.raises(RuntimeError, match="sink tokens"):  # a segment without its sinks is refused
        triton_fa_tq4_kv_forward(module, q, seg_k[:, :, 3:], seg_v[:, :, 3:], None, tq_cache=holder)


def test_fused_unfused_and_simulation_agree_with_sinks_window_padding_and_chunks():
    """Batch of 2 with left padding, prefill shorter than the sinks, chunks of 3 then decode, fused (interpreted
    Triton) vs unfused (SDPA over the sequence-order K/V) vs the fake-quant simulation (independent code)."""
    from turboquant_vllm.quality.baselines import parse_setting

    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(17, 12))

    def run(fused, chunk):
        cache = TurboQuantCache(model.config, k_bits=4, v_bits=3, window=3, sinks=6)
        if fused:
            install_fused_tq4_kv(model, cache)
        try:
            return decode_logits(model, ids, cache, attention_mask=mask, prefill=4, chunk=chunk), cache
        finally:
            uninstall_fused_tq4_kv(model)

    sim = parse_setting("tq:k=4,v=3,window=3,sink=6,sim=1").make_cache(model.config)
    ref = decode_logits(model, ids, sim, attention_mask=mask, prefill=4, chunk=3)
    unfused, _ = run(False, 3)
    fused, cache = run(True, 3)
    assert rel_err(fused, unfused) < 1e-4
    assert rel_err(unfused, ref) < 1e-3  # same codes up to rare rounding at bucket boundaries
    layer = cache.layers[0]
    assert layer.num_sinks == 6 and layer.num_compressed == 16 - 6 - 3
    exact = decode_logits(model, ids, DynamicCache(config=model.config), attention_mask=mask, prefill=4, chunk=3)
    assert rel_err(fused, exact) > 1e-4  # it is compressed


def test_fused_and_unfused_agree_with_batched_compression():
    """compress_every = 4 with sinks, a window and prefill chunks of 3 (shorter than a batch): fused (interpreted
    Triton) and unfused attention agree, and compressing in batches changes the output only a little."""
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(17, 12))

    def run(fused, every):
        cache = TurboQuantCache(model.config, k_bits=4, v_bits=3, window=3, sinks=6, compress_every=every)
        if fused:
            install_fused_tq4_kv(model, cache)
        try:
            return decode_logits(model, ids, cache, attention_mask=mask, prefill=4, chunk=3), cache
        finally:
            uninstall_fused_tq4_kv(model)

    fused, cache = run(True, 4)
    unfused, _ = run(False, 4)
    assert rel_err(fused, unfused) < 1e-4
    layer = cache.layers[0]
    assert layer.num_sinks == 6 and 6 + 3 <= layer.exact_keys.shape[-2] <= 6 + 3 + 3
    assert layer.num_compressed + layer.exact_keys.shape[-2] == 16
    at_once, _ = run(True, 1)
    assert 0 < rel_err(fused, at_once) < 0.05  # more exact tokens: close to, not equal to, compress_every = 1


def test_enable_turboquant_with_sinks_generates():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(5, 4))
    outs = []
    for fused in (True, False):
        cache = tq.enable_turboquant(model, bits=4, fused=fused, window=1, sinks=3)
        try:
            outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       **tq.cache_kwargs(model, cache)))  # fmt: skip
        finally:
            tq.disable_turboquant(model)
        assert cache.layers[1].num_sinks == 3 and cache.layers[1].num_compressed == 7 - 3 - 1
    assert torch.equal(outs[0], outs[1])
