"""The compressed cache inside transformers generate(), on tiny models built from configs."""

import gc
import inspect
import weakref

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from tests.models import left_padded_batch, tiny_llama, tiny_qwen2
from turboquant_vllm import CompressedDynamicCache, CompressedLayer, TurboQuantCache, cache_kwargs
from turboquant_vllm.core.kvcodec import compress_reference, dequantize_reference
from turboquant_vllm.kernels._common import pytorch_only
from turboquant_vllm.quality.fidelity import cache_fidelity


@pytest.fixture(autouse=True)
def _cache_tests_use_the_pytorch_kernels():
    """These tests exercise the cache; the kernels have their own interpreter tests (tests/kernels)."""
    with pytorch_only():
        yield


# Teacher-forced decode fidelity of the logits (random-weight models; regression bounds, not quality claims).
# Measured 2026-11-25 on the tiny models below: cosine 0.999 / 0.996 / 0.981 at 4 / 3 / 2 bits.
MIN_COSINE = {4: 0.995, 3: 0.985, 2: 0.95}
MAX_REL_ERR = {4: 0.10, 3: 0.20, 2: 0.35}


def documented_cache(model, head_dim, **kw):
    cache = DynamicCache(config=model.config)
    compressed = CompressedDynamicCache(cache, head_dim=head_dim, **kw)
    return cache, compressed


@pytest.mark.parametrize("family,head_dim", [("llama", 64), ("qwen2", 128)])
def test_logits_fidelity_per_bit_width(family, head_dim):
    model = tiny_llama() if family == "llama" else tiny_qwen2()
    ids, mask = left_padded_batch(lengths=(40, 33))
    results = {}
    for bits in (4, 3, 2):
        fid = cache_fidelity(
            model,
            ids,
            lambda bits=bits: documented_cache(model, head_dim, bits=bits)[0],
            attention_mask=mask,
            prefill=20,
        )
        print(f"{family} hd{head_dim} {bits}-bit: cosine {fid.cosine:.5f} rel_err {fid.rel_error:.4f}")
        assert fid.cosine >= MIN_COSINE[bits] and fid.rel_error <= MAX_REL_ERR[bits], (bits, fid)
        results[bits] = fid.rel_error
    assert results[4] < results[3] < results[2]


def test_documented_usage_pattern():
    model = tiny_llama()
    cache, compressed = documented_cache(model, 64, bits=4)
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    ids, mask = left_padded_batch(lengths=(30, 24))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 36)
    k_packed, k_norms, v_packed, v_norms = compressed.get_compressed(0)
    n = cache.get_seq_length()
    assert n == 35  # the last generated token is never fed back
    assert k_packed.shape == (2, 2, n, 32) and k_packed.dtype == torch.uint8
    assert v_packed.shape == (2, 2, n, 32) and k_norms.shape == v_norms.shape == (2, 2, n)
    assert k_norms.dtype == v_norms.dtype == torch.bfloat16
    assert compressed.rotation.shape == (64, 64) and compressed.centroids.shape == (16,)
    assert compressed.fused_mode is False
    stats = compressed.compression_stats()
    assert stats["tokens"] == n and stats["bytes_per_token_per_head"] == 32 + 32 + 4  # two bfloat16 norms
    assert stats["compression_ratio"] > 3.0
    assert compressed.vram_bytes() > 0


def test_generate_matches_exact_cache_greedy_at_high_bits():
    # At 8 bits the compressed cache must reproduce the exact greedy continuation.
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(20, 14))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    cache, _ = documented_cache(model, 64, bits=8)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)


def test_generate_with_cache_keyword_where_supported():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(12, 9))
    cache, compressed = documented_cache(model, 64, bits=4)
    kwargs = cache_kwargs(model, cache)
    assert list(kwargs) == ["cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"]
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **kwargs)
    assert compressed.get_compressed(1)[0].shape[2] == 15


@pytest.mark.parametrize("head_dim", [96, 256])
def test_other_head_dims_and_dtypes(head_dim):
    model = tiny_llama(head_dim=head_dim, q_heads=2, kv_heads=1)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        cache, compressed = documented_cache(model, head_dim, bits=3)
        ids, mask = left_padded_batch(lengths=(9, 12))
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, past_key_values=cache)
        assert compressed.get_compressed(0)[0].shape[-1] == head_dim * 3 // 8


def test_sampling_and_beam_search():
    model = tiny_qwen2()
    ids, mask = left_padded_batch(lengths=(10, 8))
    cache, _ = documented_cache(model, 128, bits=4)
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=20, past_key_values=cache)
    assert out.shape == (2, 15)
    cache, _ = documented_cache(model, 128, bits=8)
    beams = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, past_key_values=cache
    )
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(beams, ref)


def _filled_layer(bits=4, tokens=9, batch=3, window=0):
    from turboquant_vllm.cache.layer import TurboQuantSettings

    layer = CompressedLayer(64, TurboQuantSettings(k_bits=bits, v_bits=bits, window=window))
    k, v = torch.randn(batch, 2, tokens, 64), torch.randn(batch, 2, tokens, 64)
    layer.update(k, v)
    return layer, k, v


def test_layer_update_matches_reference_codec():
    layer, k, v = _filled_layer()
    c = layer.codecs
    packed, norms = compress_reference(k, layer.k_mean, c.rotation, c.k_boundaries, 4)
    n = layer.num_compressed
    mismatch = (layer.k_packed[:, :, :n] != packed).float().mean().item()
    assert mismatch < 1e-3
    torch.testing.assert_close(layer.k_norms[:, :, :n], norms.to(torch.bfloat16))  # stored as bfloat16
    k_hat, _ = layer.dequantize()
    ref = dequantize_reference(packed, norms.to(torch.bfloat16), layer.k_mean, c.rotation, c.k_centroids, 4)
    torch.testing.assert_close(k_hat, ref, atol=1e-2, rtol=0)
    # keys are centred: the stored mean is the prefill's per-head mean
    torch.testing.assert_close(layer.k_mean, k.mean(dim=-2))


def test_reorder_select_repeat_and_crop():
    layer, k, v = _filled_layer(batch=3, tokens=9)
    full_k, full_v = layer.dequantize()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    torch.testing.assert_close(layer.dequantize()[0], full_k[idx])
    layer.batch_select_indices(torch.tensor([0, 1]))
    torch.testing.assert_close(layer.dequantize()[1], full_v[torch.tensor([2, 0])])
    layer.batch_repeat_interleave(2)
    assert layer.dequantize()[0].shape[0] == 4 and layer.batch_size == 4
    layer.crop(-3)
    assert layer.get_seq_length() == 6
    torch.testing.assert_close(layer.dequantize()[0], full_k[torch.tensor([2, 2, 0, 0])][:, :, :6])
    layer.crop(4)  # legacy: keep 4 tokens
    assert layer.get_seq_length() == 4


def test_window_keeps_recent_tokens_exact_and_crop_through_it():
    layer, k, v = _filled_layer(tokens=9, window=4)
    assert layer.num_compressed == 5 and layer.exact_keys.shape[-2] == 4
    torch.testing.assert_close(layer.exact_keys, k[:, :, 5:])
    nk, nv = torch.randn(3, 2, 1, 64), torch.randn(3, 2, 1, 64)
    keys, values = layer.update(nk, nv)
    assert keys.shape[-2] == 10  # 5 compressed (dequantized) + 4 window + 1 new
    torch.testing.assert_close(keys[:, :, 5:], torch.cat([k[:, :, 5:], nk], dim=-2))
    assert layer.num_compressed == 6
    layer.crop(-2)
    assert layer.get_seq_length() == 8 and layer.exact_keys.shape[-2] == 2


def test_compress_every_batches_the_same_codes():
    """Tokens leaving the window are compressed in batches of compress_every, into the codes compress_every = 1
    gives them; until then they stay exact and update() returns them as they came."""
    from turboquant_vllm.cache.layer import TurboQuantSettings

    torch.manual_seed(0)
    k, v = torch.randn(2, 2, 14, 64), torch.randn(2, 2, 14, 64)
    one = CompressedLayer(64, TurboQuantSettings(window=2, sinks=1))
    batched = CompressedLayer(64, TurboQuantSettings(window=2, sinks=1, compress_every=3))
    one.update(k[:, :, :5], v[:, :, :5])
    keys, _ = batched.update(k[:, :, :5], v[:, :, :5])
    assert batched.num_compressed == 0 and torch.equal(keys, k[:, :, :5])  # overflow 2 < 3: all exact
    flushes = 0
    for t in range(5, 14):
        one.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        keys, values = batched.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        n, exact = batched.num_compressed, batched.exact_keys.shape[-2]
        assert n + exact == t + 1 and 1 + 2 <= exact <= 1 + 2 + 2
        assert keys.shape[-2] == t + 1  # sequence order: [sink, compressed before this step, exact rest]
        seen = batched.attend_compressed
        torch.testing.assert_close(keys[:, :, 1 + seen :], k[:, :, 1 + seen : t + 1], rtol=0, atol=0)
        torch.testing.assert_close(values[:, :, :1], v[:, :, :1], rtol=0, atol=0)
        if n == one.num_compressed:
            flushes += 1
            assert torch.equal(batched.k_packed[:, :, :n], one.k_packed[:, :, :n])
            assert torch.equal(batched.v_packed[:, :, :n], one.v_packed[:, :, :n])
            assert torch.equal(batched.norms[:, :, :n], one.norms[:, :, :n])
        else:
            assert n < one.num_compressed
    assert flushes == 3  # steps 5, 8 and 11 compress 3 tokens each


@pytest.mark.parametrize("window,sinks", [(0, 0), (2, 1), (3, 0)])
def test_compress_every_random_schedule_against_compress_every_one(window, sinks):
    """Updates of 1-7 tokens (overflows larger than compress_every included) and a crop while tokens wait: the
    batched layer holds every token once, in order, with the codes its twin (compress_every = 1) gives them."""
    from turboquant_vllm.cache.layer import TurboQuantSettings

    g = torch.Generator().manual_seed(window * 10 + sinks)
    total = 40
    k, v = torch.randn(2, 2, total, 64, generator=g), torch.randn(2, 2, total, 64, generator=g)
    one = CompressedLayer(64, TurboQuantSettings(window=window, sinks=sinks))
    batched = CompressedLayer(64, TurboQuantSettings(window=window, sinks=sinks, compress_every=3))
    t, cropped = 0, False
    while t < total:
        n = min(int(torch.randint(1, 8, (1,), generator=g)), total - t)
        one.update(k[:, :, t : t + n], v[:, :, t : t + n])
        keys, values = batched.update(k[:, :, t : t + n], v[:, :, t : t + n])
        t += n
        s, seen = batched.attend_sinks, batched.attend_compressed
        assert keys.shape[-2] == t and batched.get_seq_length() == t
        exact_after = batched.exact_keys.shape[-2] - batched.num_sinks
        assert exact_after <= window + 2 and (exact_after >= window or batched.num_compressed == 0)
        past_k, past_v = batched.dequantize(seen)
        assert torch.equal(keys[:, :, :s], k[:, :, :s]) and torch.equal(values[:, :, :s], v[:, :, :s])
        assert torch.equal(keys[:, :, s : s + seen], past_k) and torch.equal(values[:, :, s : s + seen], past_v)
        assert torch.equal(keys[:, :, s + seen :], k[:, :, s + seen : t])
        nc = batched.num_compressed
        assert nc <= one.num_compressed
        assert torch.equal(batched.k_packed[:, :, :nc], one.k_packed[:, :, :nc])
        assert torch.equal(batched.v_packed[:, :, :nc], one.v_packed[:, :, :nc])
        assert torch.equal(batched.norms[:, :, :nc], one.norms[:, :, :nc])
        mk, mv = batched.materialize()
        ns = batched.num_sinks
        assert mk.shape[-2] == t and torch.equal(mk[:, :, ns + nc :], k[:, :, ns + nc : t])
        assert torch.equal(mv[:, :, :ns], v[:, :, :ns])
        if not cropped and t > 8 and exact_after > window:  # crop while tokens wait to be compressed
            one.crop(-2)
            batched.crop(-2)
            t -= 2
            cropped = True
            assert batched.get_seq_length() == t == one.get_seq_length()
    assert cropped


def test_materialize_with_only_sink_tokens():
    from turboquant_vllm.cache.layer import TurboQuantSettings

    layer = CompressedLayer(64, TurboQuantSettings(sinks=4))
    k, v = torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64)
    layer.update(k, v)
    assert layer.k_mean is None and layer.num_compressed == 0
    mk, mv = layer.materialize()
    assert torch.equal(mk, k) and torch.equal(mv, v)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_compress_every_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="compress_every"):
        TurboQuantCache(tiny_llama().config, bits=4, compress_every=bad)


def test_cache_crop_used_by_assisted_decoding():
    model = tiny_llama()
    cache, compressed = documented_cache(model, 64, bits=4)
    ids, mask = left_padded_batch(lengths=(12, 12))
    model(ids, attention_mask=mask, past_key_values=cache)
    cache.crop(-5)
    assert cache.get_seq_length() == 7
    assert compressed.get_compressed(0)[0].shape[2] == 7


def test_sliding_window_layers_stay_exact_and_skip_layers():
    model = tiny_qwen2(layers=3, layer_types=["sliding_attention", "full_attention", "full_attention"],
                       use_sliding_window=True, sliding_window=16)  # fmt: skip
    cache = TurboQuantCache(model.config, bits=4, skip_layers=[2])
    assert isinstance(cache.layers[0], DynamicSlidingWindowLayer)
    assert isinstance(cache.layers[1], CompressedLayer)
    assert type(cache.layers[2]) is DynamicLayer
    ids, mask = left_padded_batch(lengths=(20, 20))
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, past_key_values=cache)
    assert cache.compression_stats()["compressed_layers"] == 1


def test_cache_without_config_compresses_lazily():
    model = tiny_llama()
    cache = DynamicCache()
    compressed = CompressedDynamicCache(cache, head_dim=64, bits=4)
    ids, mask = left_padded_batch(lengths=(8, 8))
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, past_key_values=cache)
    assert len(cache.layers) == 2 and all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    assert compressed.get_compressed(1)[0].shape[2] == 9


def test_memory_really_drops_and_no_leak():
    model = tiny_llama(head_dim=128, q_heads=2, kv_heads=2)
    ids = torch.randint(3, 96, (2, 300))
    exact = DynamicCache(config=model.config)
    model(ids, past_key_values=exact)
    exact_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in exact.layers)
    cache, compressed = documented_cache(model, 128, bits=4)
    model(ids, past_key_values=cache)
    held = compressed.vram_bytes()
    # fp32 model: 1024 B/token/head exact vs 132 compressed; capacity slack and means included in `held`
    assert held < exact_bytes / 5, (held, exact_bytes)
    refs = []
    for _ in range(3):
        c, comp = documented_cache(model, 128, bits=4)
        model.generate(ids[:, :20], max_new_tokens=2, do_sample=False, past_key_values=c)
        refs.append(weakref.ref(c))
        del c, comp
    gc.collect()
    assert all(r() is None for r in refs)


def test_bad_construction_and_update_inputs():
    model = tiny_llama()
    for bad_dim in (0, 60, 7):
        with pytest.raises(ValueError, match="head_dim"):
            documented_cache(model, bad_dim)
    for bad_bits in (0, 9, -1):
        with pytest.raises(ValueError, match="bits"):
            documented_cache(model, 64, bits=bad_bits)
    with pytest.raises(ValueError, match="k_bits"):
        documented_cache(model, 64, k_bits=12)
    with pytest.raises(TypeError, match="DynamicCache"):
        CompressedDynamicCache(object(), head_dim=64)
    cache, _ = documented_cache(model, 64, bits=4)
    with pytest.raises(ValueError, match="head_dim=64"):
        cache.update(torch.randn(1, 2, 3, 128), torch.randn(1, 2, 3, 128), 0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        cache.update(torch.ones(1, 2, 3, 64, dtype=torch.int64), torch.ones(1, 2, 3, 64, dtype=torch.int64), 0)
    bad = torch.randn(1, 2, 3, 64)
    bad[0, 1, 2, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.update(bad, torch.randn(1, 2, 3, 64), 0)
    cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), 0)
    with pytest.raises(ValueError, match="batch, kv_heads"):
        cache.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64), 0)
    with pytest.raises(ValueError, match="differ"):
        cache.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 2, 64), 0)


def test_per_layer_bits_and_mean_bytes():
    model = tiny_llama(layers=3)
    cache = TurboQuantCache(model.config, bits=3, layer_bits={0: (8, 8), 2: (4, 2)})
    assert [(layer.layout.k_bits, layer.layout.v_bits) for layer in cache.layers] == [(8, 8), (3, 3), (4, 2)]
    ids, mask = left_padded_batch(lengths=(16, 16))
    model(ids, attention_mask=mask, past_key_values=cache)
    stats = cache.compression_stats()
    expected = ((64 + 64 + 4) + (24 + 24 + 4) + (32 + 16 + 4)) / 3 + 2 * 64 * 4 / 16  # + the two means per head
    assert stats["mean_bytes_per_token_per_head"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="k_bits"):
        TurboQuantCache(model.config, bits=3, layer_bits={0: (0, 8)})


# ---------------------------------------------------------------------------------------------- sink tokens
def _sink_layer(sinks=3, window=2, bits=4, **kw):
    from turboquant_vllm.cache.layer import TurboQuantSettings

    return CompressedLayer(64, TurboQuantSettings(k_bits=bits, v_bits=bits, window=window, sinks=sinks, **kw))


def _expected_sequence(layer, x, y, n, sinks, window):
    """Independent reference of what a layer holds after n tokens: sinks and window exact, the rest through
    the reference codec with means taken from the first update's tokens after the sinks."""
    c = layer.codecs
    mid = slice(sinks, max(sinks, n - window))
    out = []
    for t, bounds, cents, mean in ((x, c.k_boundaries, c.k_centroids, layer.k_mean),
                                   (y, c.v_boundaries, c.v_centroids, layer.v_mean)):  # fmt: skip
        packed, norms = compress_reference(t[:, :, mid], mean, c.rotation, bounds, 4)
        deq = dequantize_reference(packed, norms.to(torch.bfloat16), mean, c.rotation, cents, 4)
        out.append(torch.cat([t[:, :, :sinks], deq, t[:, :, mid.stop : n]], dim=-2))
    return out


def test_sinks_stay_exact_and_update_returns_sequence_order():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 2, 14, 64, generator=g), torch.randn(2, 2, 14, 64, generator=g)
    layer = _sink_layer(sinks=3, window=2)
    # prefill shorter than the sinks: everything exact, no mean yet (nothing after the sinks)
    k, v = layer.update(x[:, :, :2], y[:, :, :2])
    assert torch.equal(k, x[:, :, :2]) and layer.num_sinks == 2 and layer.k_mean is None
    # a chunk that completes the sinks and starts the window: the mean comes from its tokens after the sinks
    k, v = layer.update(x[:, :, 2:6], y[:, :, 2:6])
    assert torch.equal(k, x[:, :, :6]) and layer.num_sinks == 3 and layer.num_compressed == 1
    torch.testing.assert_close(layer.k_mean, x[:, :, 3:6].mean(-2))
    assert layer.attend_compressed == 0 and layer.attend_sinks == 2
    for n in range(6, 14):  # decode
        k, v = layer.update(x[:, :, n : n + 1], y[:, :, n : n + 1])
        assert layer.attend_sinks == 3 and layer.attend_compressed == n - 3 - 2
        ref_k, ref_v = _expected_sequence(layer, x, y, n, 3, 2)
        torch.testing.assert_close(k[:, :, :n], ref_k, atol=1e-5, rtol=0)
        torch.testing.assert_close(v[:, :, :n], ref_v, atol=1e-5, rtol=0)
        assert torch.equal(k[:, :, :3], x[:, :, :3]) and torch.equal(v[:, :, :3], y[:, :, :3])  # bit-exact sinks
        assert torch.equal(k[:, :, n:], x[:, :, n : n + 1])
    assert layer.get_seq_length() == 14 and layer.num_compressed == 14 - 5
    assert torch.equal(layer.sink_keys, x[:, :, :3]) and torch.equal(layer.window_values, y[:, :, 12:])
    mk, mv = layer.materialize()
    ref_k, ref_v = _expected_sequence(layer, x, y, 14, 3, 2)
    torch.testing.assert_close(mk, ref_k, atol=1e-5, rtol=0)
    torch.testing.assert_close(mv, ref_v, atol=1e-5, rtol=0)
    assert layer.dequantize()[0].shape[-2] == 9  # the compressed store only
    # fused mode returns the exact segment [sinks | window | new] only
    layer.fused = True
    k, v = layer.update(x[:, :, :1], y[:, :, :1])
    assert k.shape[-2] == 3 + 2 + 1 and torch.equal(k[:, :, :3], x[:, :, :3]) and layer.attend_compressed == 9


def test_sink_bytes_count_as_exact_bytes():
    layer = _sink_layer(sinks=3, window=2)
    layer.update(torch.randn(2, 2, 11, 64), torch.randn(2, 2, 11, 64))
    per_tok = layer.layout.bytes_per_token_per_head  # 72
    exact = 2 * (3 + 2) * 64 * 4  # K and V of the sinks and the window, float32
    assert layer.used_bytes() == 2 * 2 * (6 * per_tok + exact) + 2 * 2 * 2 * 64 * 4  # + the two means per head
    assert layer.uncompressed_bytes() == 2 * 2 * 2 * 11 * 64 * 4
    assert layer.vram_bytes() >= layer.used_bytes()


def test_crop_into_sinks_and_refill():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 12, 64, generator=g)
    layer = _sink_layer(sinks=4, window=2)
    layer.update(x[:, :, :10], x[:, :, :10])
    assert (layer.num_sinks, layer.num_compressed, layer.get_seq_length()) == (4, 4, 10)
    layer.crop(-3)  # into the compressed tokens: the window is gone
    assert (layer.num_sinks, layer.num_compressed, layer.exact_keys.shape[-2]) == (4, 3, 4)
    layer.crop(6)  # legacy form: keep 6
    assert (layer.num_sinks, layer.num_compressed, layer.get_seq_length()) == (4, 2, 6)
    layer.crop(2)  # into the sinks
    assert (layer.num_sinks, layer.num_compressed, layer.get_seq_length()) == (2, 0, 2)
    k, _ = layer.update(x[:, :, 2:9], x[:, :, 2:9])  # positions 2, 3 become sinks again
    assert torch.equal(k, x[:, :, :9]) and (layer.num_sinks, layer.num_compressed) == (4, 3)
    assert torch.equal(layer.sink_keys, x[:, :, :4]) and torch.equal(layer.window_keys, x[:, :, 7:9])
    layer.crop(-9)
    assert layer.get_seq_length() == 0 and layer.num_sinks == 0


def test_sinks_follow_reorder_select_repeat():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 9, 64, generator=g)
    layer = _sink_layer(sinks=2, window=1)
    layer.update(x, x)
    full_k, _ = layer.materialize()
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.materialize()[0], full_k[[2, 0, 0]])
    layer.batch_select_indices(torch.tensor([0, 1]))
    layer.batch_repeat_interleave(2)
    assert layer.batch_size == 4 and torch.equal(layer.sink_keys, x[[2, 2, 0, 0], :, :2])
    torch.testing.assert_close(layer.materialize()[0], full_k[[2, 2, 0, 0]])


def test_sinks_settings_validation_and_threading():
    from turboquant_vllm.cache.layer import TurboQuantSettings

    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="sinks"):
            TurboQuantSettings(sinks=bad)
    model = tiny_llama()
    cache = TurboQuantCache(model.config, bits=4, sinks=4, window=8)
    assert all(layer.settings.sinks == 4 and layer.settings.window == 8 for layer in cache.layers)
    plain, _ = documented_cache(model, 64, bits=4)
    assert all(layer.settings.sinks == 0 and layer.settings.window == 0 for layer in plain.layers)
    _, comp = documented_cache(model, 64, bits=4, sinks=2, window=1)
    assert comp.settings.sinks == 2 and comp.settings.window == 1


def test_generate_with_sinks_left_padding_and_beams():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(14, 9))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = TurboQuantCache(model.config, bits=8, sinks=3, window=2)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)
    exact = DynamicCache(config=model.config)
    model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, past_key_values=exact)
    for layer, ex in zip(cache.layers, exact.layers, strict=True):
        assert layer.num_sinks == 3 and torch.equal(layer.sink_keys, ex.keys[:, :, :3])  # never compressed
        assert torch.equal(layer.sink_values, ex.values[:, :, :3])
    # a prompt shorter than the sinks, then decode fills them
    short = model.generate(ids[:, -2:], max_new_tokens=4, do_sample=False,
                           past_key_values=TurboQuantCache(model.config, bits=8, sinks=5))  # fmt: skip
    assert torch.equal(short, model.generate(ids[:, -2:], max_new_tokens=4, do_sample=False))
    qwen = tiny_qwen2()
    ids, mask = left_padded_batch(lengths=(10, 8))
    cache, _ = documented_cache(qwen, 128, bits=8, sinks=3, window=2)
    beams = qwen.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                          past_key_values=cache)  # fmt: skip
    assert torch.equal(beams, qwen.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False))


def test_sinks_improve_fidelity_over_compressing_them():
    model = tiny_llama()
    ids, mask = left_padded_batch(lengths=(40, 40))
    plain = cache_fidelity(model, ids, lambda: TurboQuantCache(model.config, bits=2), attention_mask=mask, prefill=8)
    sunk = cache_fidelity(model, ids, lambda: TurboQuantCache(model.config, bits=2, sinks=8), attention_mask=mask,
                          prefill=8)  # fmt: skip
    assert sunk.rel_error < plain.rel_error


def test_codecs_are_moved_once_per_device():
    """Every layer of a cache moves the shared codecs to its device: one copy per device, so the kernels'
    derived tables (fp16 rotation, quantizer PTX, codebooks) are built once, not once per layer."""
    from turboquant_vllm.layout import Codecs, KVLayout

    c = Codecs.build(KVLayout(64, 4, 3))
    moved = c.to("meta")
    assert moved is c.to(torch.device("meta")) and moved.rotation.device.type == "meta"
    assert c.to("cpu") is c and moved.layout == c.layout
